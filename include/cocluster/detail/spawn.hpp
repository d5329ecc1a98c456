// Starting a worker process: fork + exec of an executable, with exactly stdio and the channel
// inherited (as fd 3), the environment given, and the parent's death as a backstop signal.
//   auto child = detail::spawn(request);   // throws std::system_error if exec fails
// exec failure is reported by the child through a close-on-exec pipe; nothing between fork
// and exec allocates or throws, and the child leaves with _exit.
#pragma once

#include <pthread.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdint>
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
  int channel_fd = -1;             // becomes fd 3 in the child
  int death_signal = SIGTERM;      // sent to the child when the parent dies
};

struct spawned_process {
  pid_t pid = -1;
  unique_fd pidfd;
};

namespace spawn_detail {

// What the child reports through the pipe when a step fails: which step, and errno.
struct child_failure {
  std::int32_t step;
  std::int32_t error;
};
inline constexpr const char* step_names[] = {"chdir", "dup2", "close_range", "execve", "prctl"};

[[noreturn]] inline void fail_in_child(int report_fd, int step) noexcept {
  child_failure f{step, errno};
  (void)!::write(report_fd, &f, sizeof f);
  ::_exit(127);
}

// Runs in the forked child: only async-signal-safe calls from here to execve.
// Starts with every signal blocked (the parent blocked them around fork): the parent's
// handlers are reset to the default first, so none of them can run in the child.
[[noreturn]] inline void run_child(const spawn_request& r, char* const* argv, char* const* envp,
                                   pid_t parent, int report_fd) noexcept {
  for (int sig = 1; sig < NSIG; ++sig) ::signal(sig, SIG_DFL);
  sigset_t none;
  ::sigemptyset(&none);
  ::sigprocmask(SIG_SETMASK, &none, nullptr);
  if (::prctl(PR_SET_PDEATHSIG, r.death_signal) != 0) fail_in_child(report_fd, 4);
  if (::getppid() != parent) ::_exit(0);  // the parent died before prctl took effect
  if (!r.cwd.empty() && ::chdir(r.cwd.c_str()) != 0) fail_in_child(report_fd, 0);
  // Both fds are above 4 (the parent made sure), so these dup2s cannot clobber each other.
  if (::dup2(r.channel_fd, worker_channel_fd) < 0) fail_in_child(report_fd, 1);
  if (::dup3(report_fd, 4, O_CLOEXEC) < 0) fail_in_child(report_fd, 1);
  report_fd = 4;
  if (::close_range(5, ~0U, 0) != 0) fail_in_child(report_fd, 2);
  ::execve(r.exec.c_str(), argv, envp);
  fail_in_child(report_fd, 3);
}

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

}  // namespace spawn_detail

inline spawned_process spawn(spawn_request r, unique_fd channel_end) {
  using namespace spawn_detail;
  channel_end = above_four(std::move(channel_end));
  r.channel_fd = channel_end.get();
  auto [report_read, report_write] = make_pipe();
  report_write = above_four(std::move(report_write));
  auto argv = c_strings(r.argv);
  auto envp = c_strings(r.env);
  const pid_t parent = ::getpid();

  sigset_t all, before;
  ::sigfillset(&all);
  ::pthread_sigmask(SIG_SETMASK, &all, &before);
  const pid_t pid = ::fork();
  if (pid == 0) run_child(r, argv.data(), envp.data(), parent, report_write.get());
  const int fork_errno = errno;
  ::pthread_sigmask(SIG_SETMASK, &before, nullptr);
  if (pid < 0) throw std::system_error(fork_errno, std::system_category(), "fork");

  report_write.reset();
  channel_end.reset();
  child_failure failure{};
  const ssize_t n = retry_on_eintr([&] { return ::read(report_read.get(), &failure, sizeof failure); });
  if (n != 0) {  // the child reported a failure (or the pipe broke): it exits with 127
    retry_on_eintr([&] { return ::waitpid(pid, nullptr, 0); });
    const int err = n == static_cast<ssize_t>(sizeof failure) ? failure.error : EIO;
    const char* step = n == static_cast<ssize_t>(sizeof failure) && failure.step >= 0 && failure.step < 5
                           ? step_names[failure.step]
                           : "spawn";
    throw std::system_error(err, std::system_category(), std::string(step) + " " + r.exec);
  }
  std::error_code ec;
  unique_fd pidfd = pidfd_open(pid, ec);
  if (ec) {
    ::kill(pid, SIGKILL);
    retry_on_eintr([&] { return ::waitpid(pid, nullptr, 0); });
    throw std::system_error(ec, "pidfd_open");
  }
  return {pid, std::move(pidfd)};
}

}  // namespace cocluster::detail
