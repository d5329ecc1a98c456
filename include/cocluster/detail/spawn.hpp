// Starting a worker process: a child made with clone(CLONE_VM | CLONE_VFORK | CLONE_PIDFD),
// then exec of an executable, with exactly stdio and the channel inherited (as fd 3), the
// environment given, and the parent's death as a backstop signal. This file is the one
// launcher: every child of cocluster is set up here (run_child), and nowhere else.
//   auto child = detail::spawn(request, std::move(channel_end), std::move(stdio_fds));  // waits for exec
//   detail::check_spawnable(request);  auto started = detail::spawn_start(request, ...);  // does not
// Throws std::system_error naming the step that failed (fork, chdir, setuid, execve, ...).
// A failure in the child is reported through a close-on-exec pipe; nothing between the clone
// and the exec allocates or throws, and the child leaves with _exit.
// Why not fork(2): a fork copies the master's page tables, then every page the master writes
// (until that child has exec'd) faults and is copied, and the child's exec tears the copy down
// again; all of it grows with the master's memory and with the number of children not yet
// exec'd. A CLONE_VM child borrows the master's memory instead, on a stack of its own; with
// CLONE_VFORK the calling thread sleeps meanwhile (other threads run on), and wakes once the
// child's execve has replaced its memory (or it has exited): tens of microseconds, not the
// program's start-up, which runs in parallel with the next clone. glibc's posix_spawn(3)
// works the same way, but cannot set the ids or the parent-death signal, nor say which step
// failed.
// Master::fork() checks up front and then does not wait for the report, so that many workers
// start in parallel.
#pragma once

#include "cocluster/detail/config.hpp"

#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <optional>
#include <string>
#include <system_error>
#include <vector>

#include "cocluster/detail/syscalls.hpp"
#include "cocluster/detail/unique_fd.hpp"

namespace cocluster::detail {

// The channel end a worker inherits is always this fd (COCLUSTER_CHANNEL_FD says so too).
inline constexpr int worker_channel_fd = 3;

struct spawn_request {
  std::string exec;                // path of the executable
  std::vector<std::string> argv;   // argv[0] included
  std::vector<std::string> env;    // "NAME=value", the whole environment
  std::string cwd;                 // empty: the parent's
  std::optional<uid_t> uid;        // set after chdir, before exec (unset: the parent's)
  std::optional<gid_t> gid;
  int death_signal = SIGTERM;      // sent to the child when the parent dies
};

struct spawned_process {
  pid_t pid = -1;
  unique_fd pidfd;
};

namespace spawn_detail {

// The child's steps, in order; a failure names one of them.
enum class step : std::int32_t { prctl, chdir, dup2_stdio, dup2, close_range, setgroups, setgid, setuid, execve };
inline constexpr const char* step_names[] = {"prctl",     "chdir",  "dup2 stdio", "dup2",  "close_range",
                                             "setgroups", "setgid", "setuid",     "execve"};
inline constexpr std::int32_t step_count = std::size(step_names);

// What the child reports through the pipe when a step fails: which step, and errno.
struct child_failure {
  std::int32_t step;
  std::int32_t error;
};

// Everything the child needs, as plain values prepared by the parent: the child only reads it.
struct child_plan {
  const char* exec;
  char* const* argv;
  char* const* envp;
  const char* cwd;             // null: stay in the parent's
  std::array<int, 3> stdio;    // copied onto 0, 1, 2; -1: inherited. All above 4.
  int channel;                 // becomes fd 3; above 4
  int report;                  // the failure pipe, becomes fd 4; above 4
  pid_t parent;
  int death_signal;
  bool clear_groups;           // setgroups(0): only a root parent may (and must) drop them
  std::optional<gid_t> gid;
  std::optional<uid_t> uid;
};

// The code a child runs before its execve shares the parent's memory (CLONE_VM): it is not
// instrumented by AddressSanitizer, whose stack poisoning would outlive a frame that never
// returns and land on the parent's shadow memory.
#if defined(__clang__) || defined(__GNUC__)
#define COCLUSTER_CHILD_CODE __attribute__((no_sanitize("address")))
#else
#define COCLUSTER_CHILD_CODE
#endif

[[noreturn]] COCLUSTER_CHILD_CODE inline void fail_in_child(int report_fd, step s) noexcept {
  const child_failure f{static_cast<std::int32_t>(s), errno};
  (void)!::write(report_fd, &f, sizeof f);
  ::_exit(127);
}

// The ids through the system calls themselves: glibc's wrappers, in a process it believes has
// several threads (the parent's, whose memory the child shares), would signal each of them.
COCLUSTER_CHILD_CODE inline long raw_setgroups_none() noexcept { return ::syscall(SYS_setgroups, 0, nullptr); }
COCLUSTER_CHILD_CODE inline long raw_setgid(gid_t gid) noexcept { return ::syscall(SYS_setgid, gid); }
COCLUSTER_CHILD_CODE inline long raw_setuid(uid_t uid) noexcept { return ::syscall(SYS_setuid, uid); }

// Runs in the child, in the parent's memory on a stack of its own, while the parent's thread
// sleeps (CLONE_VFORK): it only reads the plan and makes async-signal-safe system calls from
// here to execve; it writes nothing but its own stack and errno.
// Starts with every signal blocked (the parent blocked them around the clone): the parent's
// handlers are reset to the default first, so none of them can run in the child.
[[noreturn]] COCLUSTER_CHILD_CODE inline void run_child(const child_plan& p) noexcept {
  for (int sig = 1; sig < NSIG; ++sig) ::signal(sig, SIG_DFL);
  sigset_t none;
  ::sigemptyset(&none);
  ::sigprocmask(SIG_SETMASK, &none, nullptr);
  int report = p.report;
  if (p.cwd && ::chdir(p.cwd) != 0) fail_in_child(report, step::chdir);
  // Every source fd is above 4 (the parent made sure), so no dup2 onto 0..4 can clobber one
  // still to be copied, and none is its own target (dup2 would then keep close-on-exec).
  for (int i = 0; i < 3; ++i)
    if (p.stdio[i] >= 0 && ::dup2(p.stdio[i], i) < 0) fail_in_child(report, step::dup2_stdio);
  if (::dup2(p.channel, worker_channel_fd) < 0) fail_in_child(report, step::dup2);
  if (::dup3(report, 4, O_CLOEXEC) < 0) fail_in_child(report, step::dup2);
  report = 4;
  if (::close_range(5, ~0U, 0) != 0) fail_in_child(report, step::close_range);
  // libuv's order: groups, then gid (needs the privilege the uid change gives up), then uid.
  if (p.clear_groups && raw_setgroups_none() != 0) fail_in_child(report, step::setgroups);
  if (p.gid && raw_setgid(*p.gid) != 0) fail_in_child(report, step::setgid);
  if (p.uid && raw_setuid(*p.uid) != 0) fail_in_child(report, step::setuid);
  // After the ids: changing them clears the parent-death signal.
  if (::prctl(PR_SET_PDEATHSIG, p.death_signal) != 0) fail_in_child(report, step::prctl);
  if (::getppid() != p.parent) ::_exit(0);  // the parent died before prctl took effect
  ::execve(p.exec, p.argv, p.envp);
  fail_in_child(report, step::execve);
}

// clone(2)'s entry point for the child.
COCLUSTER_CHILD_CODE inline int child_main(void* plan) noexcept { run_child(*static_cast<const child_plan*>(plan)); }

// The child's stack while it runs in the parent's memory: mapped for one launch, with a guard
// page below it, unmapped once the child has exec'd or exited (when clone returns).
class child_stack {
 public:
  static constexpr std::size_t size = 64 * 1024;  // run_child needs a few KiB (glibc's lazy binding the most)
  child_stack() : guard_(static_cast<std::size_t>(::sysconf(_SC_PAGESIZE))) {
    void* p = ::mmap(nullptr, guard_ + size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
    if (p == MAP_FAILED) throw_last_error("mmap (a stack for the child)");
    base_ = static_cast<char*>(p);
    if (::mprotect(base_, guard_, PROT_NONE) != 0) {
      const int error = errno;
      ::munmap(base_, guard_ + size);
      throw std::system_error(error, std::system_category(), "mprotect (the child's stack guard)");
    }
  }
  child_stack(const child_stack&) = delete;
  child_stack& operator=(const child_stack&) = delete;
  ~child_stack() { ::munmap(base_, guard_ + size); }
  void* top() const noexcept { return base_ + guard_ + size; }  // stacks grow down; 16-byte aligned

 private:
  std::size_t guard_;
  char* base_ = nullptr;
};

inline std::vector<char*> c_strings(const std::vector<std::string>& v) {
  std::vector<char*> out;
  out.reserve(v.size() + 1);
  for (auto& s : v) out.push_back(const_cast<char*>(s.c_str()));
  out.push_back(nullptr);
  return out;
}

inline unique_fd above_four(unique_fd fd) {
  if (fd.get() > 4) return fd;
  int moved = ::fcntl(fd.get(), F_DUPFD_CLOEXEC, 5);
  if (moved < 0) throw_last_error("fcntl(F_DUPFD_CLOEXEC)");
  return unique_fd(moved);
}

// The what() of a failed step: the step, what it was given, and the executable.
inline std::string describe_failure(const spawn_request& r, const child_failure& f) {
  if (f.step < 0 || f.step >= step_count) return "spawn " + r.exec;
  const std::string name = step_names[f.step];
  switch (static_cast<step>(f.step)) {
    case step::chdir: return name + " " + r.cwd + " for " + r.exec;
    case step::setgid: return name + "(" + std::to_string(r.gid.value_or(0)) + ") for " + r.exec;
    case step::setuid: return name + "(" + std::to_string(r.uid.value_or(0)) + ") for " + r.exec;
    default: return name + " " + r.exec;
  }
}

// Whether this process has capability `bit` in its effective set (/proc/self/status CapEff).
inline constexpr int CAP_SETGID_BIT = 6;
inline constexpr int CAP_SETUID_BIT = 7;
inline bool has_capability(int bit) {
  std::FILE* f = std::fopen("/proc/self/status", "re");
  if (!f) return true;  // unknown: let the child be the judge
  char line[256];
  bool has = true;
  while (std::fgets(line, sizeof line, f))
    if (std::strncmp(line, "CapEff:", 7) == 0) {
      has = (std::strtoull(line + 7, nullptr, 16) >> bit) & 1ULL;
      break;
    }
  std::fclose(f);
  return has;
}

}  // namespace spawn_detail

#undef COCLUSTER_CHILD_CODE

// What spawn_start() leaves to check: the child's failure pipe, whose EOF means execve
// succeeded (it is close-on-exec), and a child_failure record that it did not.
struct started_process {
  spawned_process process;
  unique_fd exec_report;  // read end; non-blocking
};

// Before forking, the failures a child would meet that can be seen from here, with the
// description the child's report would have: a working directory that cannot be entered, an
// executable that is missing or not executable, a uid or gid this process may not take.
// Throws std::system_error. What passes can still fail in the child (a script's missing
// interpreter, a race): spawn_start() leaves that to its caller.
inline void check_spawnable(const spawn_request& r) {
  using namespace spawn_detail;
  auto fail = [&](int error, step s) {
    throw std::system_error(error, std::system_category(), describe_failure(r, {static_cast<std::int32_t>(s), error}));
  };
  struct stat st {};
  if (!r.cwd.empty()) {
    if (::stat(r.cwd.c_str(), &st) != 0) fail(errno, step::chdir);
    if (!S_ISDIR(st.st_mode)) fail(ENOTDIR, step::chdir);
  }
  const std::string path = r.exec.empty() || r.exec[0] == '/' || r.cwd.empty() ? r.exec : r.cwd + "/" + r.exec;
  if (::stat(path.c_str(), &st) != 0) fail(errno, step::execve);
  if (!S_ISREG(st.st_mode)) fail(EACCES, step::execve);
  if (!r.uid && !r.gid && ::access(path.c_str(), X_OK) != 0) fail(errno, step::execve);  // as the worker will be
  if (::geteuid() == 0) return;
  // Without privilege (CAP_SETGID/CAP_SETUID aside: then the child is the judge), an id can
  // only be one this process has already.
  if (r.gid && !has_capability(CAP_SETGID_BIT)) {
    gid_t real, effective, saved;
    if (::getresgid(&real, &effective, &saved) == 0 && *r.gid != real && *r.gid != effective && *r.gid != saved)
      fail(EPERM, step::setgid);
  }
  if (r.uid && !has_capability(CAP_SETUID_BIT)) {
    uid_t real, effective, saved;
    if (::getresuid(&real, &effective, &saved) == 0 && *r.uid != real && *r.uid != effective && *r.uid != saved)
      fail(EPERM, step::setuid);
  }
}

// Starts the child and returns once it has begun its execve (or failed before), without
// waiting for the program to start up: several workers can be started in a row, and their
// start-ups run in parallel. `stdio[i]`, when open, becomes the child's fd i (the parent's fd
// i otherwise). The fds given are the parent's to close: they are closed here once the child
// has its copies. Throws std::system_error when the clone fails ("fork <exec>": EAGAIN under
// RLIMIT_NPROC, ...); a failure in the child arrives on exec_report (exec_report_result()),
// and the child exits with 127.
inline started_process spawn_start(const spawn_request& r, unique_fd channel_end, std::array<unique_fd, 3> stdio = {}) {
  using namespace spawn_detail;
  channel_end = above_four(std::move(channel_end));
  for (auto& fd : stdio)
    if (fd) fd = above_four(std::move(fd));
  auto [report_read, report_write] = make_pipe();
  report_write = above_four(std::move(report_write));
  auto argv = c_strings(r.argv);
  auto envp = c_strings(r.env);
  const child_plan plan{r.exec.c_str(),
                        argv.data(),
                        envp.data(),
                        r.cwd.empty() ? nullptr : r.cwd.c_str(),
                        {stdio[0].get(), stdio[1].get(), stdio[2].get()},
                        channel_end.get(),
                        report_write.get(),
                        ::getpid(),
                        r.death_signal,
                        (r.uid || r.gid) && ::geteuid() == 0,
                        r.gid,
                        r.uid};
  child_stack stack;

  // CLONE_VM: the child runs in our memory (nothing copied); CLONE_VFORK: this thread sleeps
  // until the child's execve has replaced that memory with its own, or the child has exited,
  // so the plan and the stack outlive their use; CLONE_PIDFD: the pidfd comes with the child
  // (close-on-exec); SIGCHLD: reaped like a forked child.
  sigset_t all, before;
  ::sigfillset(&all);
  ::pthread_sigmask(SIG_SETMASK, &all, &before);
  int pidfd = -1;
  const pid_t pid = ::clone(&child_main, stack.top(), CLONE_VM | CLONE_VFORK | CLONE_PIDFD | SIGCHLD,
                            const_cast<child_plan*>(&plan), &pidfd);
  const int clone_errno = errno;
  ::pthread_sigmask(SIG_SETMASK, &before, nullptr);
  if (pid < 0) throw std::system_error(clone_errno, std::system_category(), "fork " + r.exec);

  report_write.reset();
  channel_end.reset();
  for (auto& fd : stdio) fd.reset();
  const int flags = ::fcntl(report_read.get(), F_GETFL);
  if (flags >= 0) ::fcntl(report_read.get(), F_SETFL, flags | O_NONBLOCK);
  return {{pid, unique_fd(pidfd)}, std::move(report_read)};
}

// What the child said through exec_report once it is readable: nullopt when execve succeeded
// (EOF), else the error and the description of the step that failed ("execve /path", ...).
// `n` is what read(2) returned for a child_failure read into `f`.
inline std::optional<std::system_error> exec_report_result(const spawn_request& r, ssize_t n,
                                                           spawn_detail::child_failure f) {
  if (n == 0) return std::nullopt;
  if (n != static_cast<ssize_t>(sizeof f)) f = {-1, EIO};
  return std::system_error(f.error, std::system_category(), spawn_detail::describe_failure(r, f));
}

// fork + exec, waiting for the exec: returns once the child runs the executable. Throws
// std::system_error naming the step that failed (the child is reaped then).
inline spawned_process spawn(const spawn_request& r, unique_fd channel_end, std::array<unique_fd, 3> stdio = {}) {
  started_process started = spawn_start(r, std::move(channel_end), std::move(stdio));
  pollfd p{started.exec_report.get(), POLLIN, 0};
  retry_on_eintr([&] { return ::poll(&p, 1, -1); });
  spawn_detail::child_failure failure{};
  const int report_fd = started.exec_report.get();  // clang before 16 cannot capture a structured binding
  const ssize_t n = retry_on_eintr([&] { return ::read(report_fd, &failure, sizeof failure); });
  if (auto error = exec_report_result(r, n, failure)) {  // it exits with 127
    started.process.pidfd.reset();
    retry_on_eintr([&] { return ::waitpid(started.process.pid, nullptr, 0); });
    throw *error;
  }
  return std::move(started.process);
}

}  // namespace cocluster::detail
