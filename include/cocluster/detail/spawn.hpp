// Starting a worker process: a child made with clone(CLONE_VM | CLONE_PIDFD), then exec of an
// executable, with exactly stdio and the channel inherited (as fd 3), the environment given,
// and the parent's death as a backstop signal. This file is the one launcher: every child of
// cocluster is set up here (run_child), and nowhere else.
//   auto child = detail::spawn(request, std::move(channel_end), std::move(stdio_fds));  // waits for exec
//   detail::check_spawnable(request);  auto started = detail::spawn_start(request, ...);  // does not
// Throws std::system_error naming the step that failed (fork, chdir, setuid, execve, ...).
// A failure in the child is reported through a close-on-exec pipe; nothing between the clone
// and the exec allocates or throws, and the child leaves with exit_group.
// Why not fork(2): a fork copies the master's page tables, then every page the master writes
// faults and is copied while that child has not exec'd, and the child's exec tears its copy
// down again; all of it grows with the master's memory, and with 32 workers the master spent
// twice the raw program's CPU per child. Why not vfork (CLONE_VFORK, as posix_spawn(3)):
// the master's thread would sleep until each child's execve, and on a busy machine every
// wake-up waits for a CPU behind the children already starting: 32 of them took about twice
// as long as the raw program's 32 forks (2 cores, other builds running).
// So the child runs in the master's memory, on a stack of its own, beside the master's
// thread, and touches nothing of the master's: it reads its plan and makes raw system calls
// (child_syscall: no libc, no errno, no PLT), then execs. The plan, its strings and the stack
// stay allocated until the child has left (child_launch). Where no raw system call is written
// (not x86-64), CLONE_VFORK keeps the master's thread asleep instead.
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
#include <memory>
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
// No std::array or std::optional: their accessors are functions, which an unoptimised build
// calls (possibly through the PLT), and the child calls nothing (see child_syscall).
struct child_plan {
  const char* exec;
  char* const* argv;
  char* const* envp;
  const char* cwd;             // null: stay in the parent's
  int stdio[3];                // copied onto 0, 1, 2; -1: inherited. All above 4.
  int channel;                 // becomes fd 3; above 4
  int report;                  // the failure pipe, becomes fd 4; above 4
  pid_t parent;
  int death_signal;
  bool clear_groups;           // setgroups(0): only a root parent may (and must) drop them
  bool set_gid, set_uid;
  gid_t gid;
  uid_t uid;
};

// Code the child runs before its execve, in the parent's memory (CLONE_VM) and, on x86-64,
// beside the parent's thread, on that thread's TLS: it is all inlined into child_main (a call
// could go through the PLT, whose first use writes the GOT and the thread's TLS), makes no
// libc call (errno is that thread's), and is not instrumented (AddressSanitizer's stack
// poisoning would land on the parent's shadow memory and outlive the frame; UBSan's handlers,
// ThreadSanitizer, MemorySanitizer, SafeStack and -finstrument-functions would run code or
// write state on the parent's thread). Builds with -pg or --coverage still instrument it.
#if defined(__clang__)
#define COCLUSTER_CHILD_NO_INSTRUMENT \
  no_instrument_function, no_sanitize("address", "undefined", "thread", "memory", "safe-stack")
#elif defined(__GNUC__)
#define COCLUSTER_CHILD_NO_INSTRUMENT no_instrument_function, no_sanitize("address", "undefined", "thread")
#endif
#if defined(__clang__) || defined(__GNUC__)
#define COCLUSTER_CHILD_CODE __attribute__((always_inline, COCLUSTER_CHILD_NO_INSTRUMENT))
#define COCLUSTER_CHILD_ENTRY __attribute__((COCLUSTER_CHILD_NO_INSTRUMENT))
#else
#error "cocluster: the spawn code needs GCC or clang attributes"
#endif

#if defined(__x86_64__) && !defined(COCLUSTER_SPAWN_VFORK)
// The parent's thread does not wait for the child's execve: see spawn_start().
inline constexpr bool child_runs_beside_parent = true;
// A system call without libc: -errno on failure, as the kernel returns it.
COCLUSTER_CHILD_CODE inline long child_syscall(long n, long a = 0, long b = 0, long c = 0, long d = 0) noexcept {
  long ret;
  asm volatile("mov %5, %%r10\n\tsyscall"
               : "=a"(ret)
               : "a"(n), "D"(a), "S"(b), "d"(c), "r"(d)
               : "rcx", "r11", "r10", "memory");
  return ret;
}
#else
// Elsewhere (or with COCLUSTER_SPAWN_VFORK defined, in every translation unit of the program
// alike, to try this path on x86-64, as scripts/test's libc++ build does): libc's
// syscall(), which sets errno, so the parent's thread sleeps until the child's execve
// (CLONE_VFORK), as posix_spawn(3) does.
inline constexpr bool child_runs_beside_parent = false;
COCLUSTER_CHILD_CODE inline long child_syscall(long n, long a = 0, long b = 0, long c = 0, long d = 0) noexcept {
  const long r = ::syscall(n, a, b, c, d);
  return r == -1 ? -errno : r;
}
#endif

[[noreturn]] COCLUSTER_CHILD_CODE inline void fail_in_child(int report_fd, step s, long result) noexcept {
  child_failure f;
  f.step = static_cast<std::int32_t>(s);
  f.error = static_cast<std::int32_t>(-result);
  child_syscall(SYS_write, report_fd, reinterpret_cast<long>(&f), sizeof f);
  for (;;) child_syscall(SYS_exit_group, 127);
}

// The kernel's struct sigaction (rt_sigaction(2)), with a 64-bit signal mask.
struct kernel_sigaction {
  unsigned long handler;
  unsigned long flags;
  unsigned long restorer;
  unsigned long mask;
};

// Runs in the child: only system calls from here to execve, and it writes nothing but its own
// stack. Starts with every signal blocked (the parent blocked them around the clone): the
// parent's handlers are reset to the default first, so none of them can run in the child.
[[noreturn]] COCLUSTER_CHILD_CODE inline void run_child(const child_plan& p) noexcept {
  for (long sig = 1; sig < NSIG; ++sig) {  // SIGKILL and SIGSTOP refuse: they are the default
    kernel_sigaction dfl;
    dfl.handler = 0;  // SIG_DFL
    dfl.flags = 0;
    dfl.restorer = 0;
    dfl.mask = 0;
    child_syscall(SYS_rt_sigaction, sig, reinterpret_cast<long>(&dfl), 0, sizeof dfl.mask);
  }
  unsigned long none = 0;
  child_syscall(SYS_rt_sigprocmask, SIG_SETMASK, reinterpret_cast<long>(&none), 0, sizeof none);
  int report = p.report;
  long r;
  if (p.cwd && (r = child_syscall(SYS_chdir, reinterpret_cast<long>(p.cwd))) < 0) fail_in_child(report, step::chdir, r);
  // Every source fd is above 4 (the parent made sure), so no copy onto 0..4 can clobber one
  // still to be copied, and none is its own target (dup3 would refuse).
  for (int i = 0; i < 3; ++i)
    if (p.stdio[i] >= 0 && (r = child_syscall(SYS_dup3, p.stdio[i], i, 0)) < 0)
      fail_in_child(report, step::dup2_stdio, r);
  if ((r = child_syscall(SYS_dup3, p.channel, worker_channel_fd, 0)) < 0) fail_in_child(report, step::dup2, r);
  if ((r = child_syscall(SYS_dup3, report, 4, O_CLOEXEC)) < 0) fail_in_child(report, step::dup2, r);
  report = 4;
  if ((r = child_syscall(SYS_close_range, 5, ~0U, 0)) < 0) fail_in_child(report, step::close_range, r);
  // libuv's order: groups, then gid (needs the privilege the uid change gives up), then uid.
  // The system calls set the ids of this process alone (it has one thread): glibc's wrappers
  // would also signal every thread of the parent, whose thread list the child can see.
  if (p.clear_groups && (r = child_syscall(SYS_setgroups, 0, 0)) < 0) fail_in_child(report, step::setgroups, r);
  if (p.set_gid && (r = child_syscall(SYS_setgid, p.gid)) < 0) fail_in_child(report, step::setgid, r);
  if (p.set_uid && (r = child_syscall(SYS_setuid, p.uid)) < 0) fail_in_child(report, step::setuid, r);
  // After the ids: changing them clears the parent-death signal.
  if ((r = child_syscall(SYS_prctl, PR_SET_PDEATHSIG, p.death_signal)) < 0) fail_in_child(report, step::prctl, r);
  if (child_syscall(SYS_getppid) != p.parent)  // the parent died before prctl took effect
    for (;;) child_syscall(SYS_exit_group, 0);
  r = child_syscall(SYS_execve, reinterpret_cast<long>(p.exec), reinterpret_cast<long>(p.argv),
                    reinterpret_cast<long>(p.envp));
  fail_in_child(report, step::execve, r);
}

// clone(2)'s entry point for the child: everything it runs is inlined here.
COCLUSTER_CHILD_ENTRY inline int child_main(void* plan) noexcept { run_child(*static_cast<const child_plan*>(plan)); }

// The child's stack while it runs in the parent's memory: mapped for one launch, with a guard
// page below it.
class child_stack {
 public:
  static constexpr std::size_t size = 64 * 1024;  // run_child needs a few hundred bytes
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

// What a child reads, and runs on, until it has left this process's memory: its plan, the
// strings the plan points to (exec, cwd, argv, envp: one buffer), and its stack.
struct launch_memory {
  std::vector<char> text;
  std::vector<char*> argv, envp;
  child_plan plan{};
  child_stack stack;

  explicit launch_memory(const spawn_request& r) {
    std::size_t size = r.exec.size() + r.cwd.size() + 2;
    for (auto& a : r.argv) size += a.size() + 1;
    for (auto& e : r.env) size += e.size() + 1;
    text.reserve(size);
    auto add = [&](const std::string& s) {
      const std::size_t at = text.size();
      text.insert(text.end(), s.begin(), s.end());
      text.push_back('\0');
      return at;
    };
    const std::size_t exec_at = add(r.exec), cwd_at = add(r.cwd);
    std::vector<std::size_t> argv_at, env_at;
    argv_at.reserve(r.argv.size());
    env_at.reserve(r.env.size());
    for (auto& a : r.argv) argv_at.push_back(add(a));
    for (auto& e : r.env) env_at.push_back(add(e));
    // The buffer is complete (it was reserved whole): pointers into it stay valid.
    argv.reserve(argv_at.size() + 1);
    envp.reserve(env_at.size() + 1);
    for (std::size_t at : argv_at) argv.push_back(text.data() + at);
    for (std::size_t at : env_at) envp.push_back(text.data() + at);
    argv.push_back(nullptr);
    envp.push_back(nullptr);
    plan.exec = text.data() + exec_at;
    plan.argv = argv.data();
    plan.envp = envp.data();
    plan.cwd = r.cwd.empty() ? nullptr : text.data() + cwd_at;
  }
};

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
#undef COCLUSTER_CHILD_ENTRY
#undef COCLUSTER_CHILD_NO_INSTRUMENT

// The memory a started child may still be using (spawn_detail::launch_memory), and a way to
// tell when it no longer is: a duplicate of the report pipe's read end, which hangs up
// (POLLHUP) once every copy of the write end is closed, the child's by its execve or its
// exit. Memory the child may still be using is never freed: destroyed before the child has
// left (someone gave up on it early), this object leaves it allocated.
class child_launch {
 public:
  child_launch() = default;
  child_launch(std::unique_ptr<spawn_detail::launch_memory> memory, unique_fd watch) noexcept
      : memory_(std::move(memory)), watch_(std::move(watch)) {}
  child_launch(child_launch&&) noexcept = default;
  child_launch& operator=(child_launch&& other) noexcept {
    if (this != &other) {
      abandon();
      memory_ = std::move(other.memory_);
      watch_ = std::move(other.watch_);
      left_ = other.left_;
    }
    return *this;
  }
  ~child_launch() { abandon(); }

  // The child is known to have left (it has exec'd or exited, or never was).
  void child_left() noexcept { left_ = true; }

  // Frees the memory if the child has left it; keeps it otherwise.
  void free_if_left() noexcept {
    if (memory_ && has_left()) {
      memory_.reset();
      watch_.reset();
    }
  }

 private:
  bool has_left() noexcept {
    if (!left_) {
      pollfd p{watch_.get(), 0, 0};
      left_ = ::poll(&p, 1, 0) == 1 && (p.revents & POLLHUP);
    }
    return left_;
  }
  void abandon() noexcept {
    if (memory_ && !has_left()) (void)memory_.release();  // left allocated on purpose
    memory_.reset();
    watch_.reset();
  }

  std::unique_ptr<spawn_detail::launch_memory> memory_;
  unique_fd watch_;
  bool left_ = false;
};

// What spawn_start() leaves to check: the child's failure pipe, whose EOF means execve
// succeeded (it is close-on-exec), and a child_failure record that it did not; and the memory
// the child may still be using, to keep until then.
struct started_process {
  spawned_process process;
  unique_fd exec_report;  // read end; non-blocking
  child_launch launch;    // keep until exec_report has said how it went, or the child is reaped
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

// Starts the child and returns at once, without waiting for its execve (on x86-64; elsewhere
// once the child has begun its execve): several workers can be started in a row, and their
// execs and start-ups run in parallel. `stdio[i]`, when open, becomes the child's fd i (the
// parent's fd i otherwise). The fds given are the parent's to close: they are closed here once
// the child has its copies. Throws std::system_error when the clone fails ("fork <exec>":
// EAGAIN under RLIMIT_NPROC, ...); a failure in the child arrives on exec_report
// (exec_report_result()), and the child exits with 127. Keep `launch` until exec_report has
// said how it went, or the child is reaped.
inline started_process spawn_start(const spawn_request& r, unique_fd channel_end, std::array<unique_fd, 3> stdio = {}) {
  using namespace spawn_detail;
  channel_end = above_four(std::move(channel_end));
  for (auto& fd : stdio)
    if (fd) fd = above_four(std::move(fd));
  auto [report_read, report_write] = make_pipe();
  report_write = above_four(std::move(report_write));
  std::error_code ec;
  unique_fd watch = dup_cloexec(report_read.get(), ec);
  if (ec) throw std::system_error(ec, "dup of the exec report pipe");
  auto memory = std::make_unique<launch_memory>(r);
  child_plan& plan = memory->plan;
  for (int i = 0; i < 3; ++i) plan.stdio[i] = stdio[i].get();
  plan.channel = channel_end.get();
  plan.report = report_write.get();
  plan.parent = ::getpid();
  plan.death_signal = r.death_signal;
  plan.clear_groups = (r.uid || r.gid) && ::geteuid() == 0;
  plan.set_gid = r.gid.has_value();
  plan.gid = r.gid.value_or(0);
  plan.set_uid = r.uid.has_value();
  plan.uid = r.uid.value_or(0);
  void* const stack_top = memory->stack.top();
  child_launch launch(std::move(memory), std::move(watch));

  // CLONE_VM: the child runs in our memory, on its own stack (nothing is copied, as fork(2)
  // would copy the page tables and then every page either side writes); CLONE_PIDFD: the
  // pidfd comes with the child (close-on-exec); SIGCHLD: reaped like a forked child. Where
  // the child needs libc (child_syscall), CLONE_VFORK: this thread sleeps until its execve.
  // A child that changes its uid or gid gets a copy of our memory instead (as from fork(2)):
  // the kernel resets the dumpable flag of the memory whose task changes ids, which would be
  // ours (no more core dumps or same-uid ptrace of the master), and a child running as
  // another user must not run inside our memory, where a process of that user could reach it.
  const bool own_memory = r.uid || r.gid;
  const int flags = own_memory ? CLONE_PIDFD | SIGCHLD
                               : CLONE_VM | CLONE_PIDFD | SIGCHLD | (child_runs_beside_parent ? 0 : CLONE_VFORK);
  sigset_t all, before;
  ::sigfillset(&all);
  ::pthread_sigmask(SIG_SETMASK, &all, &before);
  int pidfd = -1;
  const pid_t pid = ::clone(&child_main, stack_top, flags, &plan, &pidfd);
  const int clone_errno = errno;
  ::pthread_sigmask(SIG_SETMASK, &before, nullptr);
  if (pid < 0) {
    launch.child_left();  // there is none
    throw std::system_error(clone_errno, std::system_category(), "fork " + r.exec);
  }
  if (own_memory || !child_runs_beside_parent) launch.child_left();  // it uses none of ours (now)

  report_write.reset();
  channel_end.reset();
  for (auto& fd : stdio) fd.reset();
  const int flags_now = ::fcntl(report_read.get(), F_GETFL);
  if (flags_now >= 0) ::fcntl(report_read.get(), F_SETFL, flags_now | O_NONBLOCK);
  return {{pid, unique_fd(pidfd)}, std::move(report_read), std::move(launch)};
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

// Starts the child and waits for its exec: returns once the child runs the executable. Throws
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
    started.launch.child_left();  // reaped
    throw *error;
  }
  return std::move(started.process);
}

}  // namespace cocluster::detail
