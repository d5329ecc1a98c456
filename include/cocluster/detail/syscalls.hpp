// The raw syscalls cocluster uses, in one place: each checked, each retried on EINTR,
// each returning an owning type or a std::error_code.
#pragma once

#include "cocluster/detail/config.hpp"

#include <fcntl.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <system_error>
#include <utility>

#include "cocluster/detail/unique_fd.hpp"

namespace cocluster::detail {

inline std::error_code last_error() noexcept { return {errno, std::system_category()}; }

template <class F>
auto retry_on_eintr(F&& f) {
  for (;;) {
    auto r = f();
    if (r != -1 || errno != EINTR) return r;
  }
}

[[noreturn]] inline void throw_last_error(const char* what) {
  throw std::system_error(last_error(), what);
}

// Both ends close-on-exec; the spawner clears the flag on the one fd a worker inherits.
inline std::pair<unique_fd, unique_fd> make_socketpair(int type, std::error_code& ec) noexcept {
  int fds[2];
  if (::socketpair(AF_UNIX, type | SOCK_CLOEXEC, 0, fds) != 0) {
    ec = last_error();
    return {};
  }
  ec.clear();
  return {unique_fd(fds[0]), unique_fd(fds[1])};
}

inline std::pair<unique_fd, unique_fd> make_socketpair(int type = SOCK_SEQPACKET) {
  std::error_code ec;
  auto p = make_socketpair(type, ec);
  if (ec) throw std::system_error(ec, "socketpair");
  return p;
}

inline std::pair<unique_fd, unique_fd> make_pipe() {
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0) throw_last_error("pipe2");
  return {unique_fd(fds[0]), unique_fd(fds[1])};
}

inline unique_fd pidfd_open(pid_t pid, std::error_code& ec) noexcept {
  int fd = static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
  if (fd < 0) {
    ec = last_error();
    return {};
  }
  ec.clear();
  return unique_fd(fd);
}

// Signals through the pidfd, so a recycled pid can never be hit.
inline std::error_code pidfd_send_signal(int pidfd, int sig) noexcept {
  if (::syscall(SYS_pidfd_send_signal, pidfd, sig, nullptr, 0) != 0) return last_error();
  return {};
}

// Reaps the child behind `pidfd` if it has exited; returns false while it still runs.
// With `block`, waits for the exit.
inline bool pidfd_try_reap(int pidfd, siginfo_t& info, std::error_code& ec, bool block = false) noexcept {
  info = {};
  const int options = WEXITED | (block ? 0 : WNOHANG);
  if (retry_on_eintr([&] { return ::waitid(P_PIDFD, static_cast<id_t>(pidfd), &info, options); }) != 0) {
    ec = last_error();
    return false;
  }
  ec.clear();
  return info.si_pid != 0;
}

inline unique_fd dup_cloexec(int fd, std::error_code& ec) noexcept {
  int d = ::fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (d < 0) {
    ec = last_error();
    return {};
  }
  ec.clear();
  return unique_fd(d);
}

}  // namespace cocluster::detail
