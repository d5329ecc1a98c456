// The raw syscalls cocluster uses, in one place: each checked, each retried on EINTR,
// each returning an owning type or a std::error_code.
#pragma once

#include "cocluster/detail/config.hpp"

#include <fcntl.h>
#include <signal.h>
#include <sys/resource.h>
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

// One connection from listening socket `listener`, non-blocking and close-on-exec, with its
// peer's address in `addr` (`*len`: the room there, then the length written). An empty fd with
// `ec` clear: no connection is waiting.
inline unique_fd accept_connection(int listener, sockaddr* addr, socklen_t* len, std::error_code& ec) noexcept {
  const int fd = retry_on_eintr([&] { return ::accept4(listener, addr, len, SOCK_NONBLOCK | SOCK_CLOEXEC); });
  if (fd < 0) {
    ec = errno == EAGAIN || errno == EWOULDBLOCK ? std::error_code() : last_error();
    return {};
  }
  ec.clear();
  return unique_fd(fd);
}

// accept(2) errors that concern one connection only (Linux passes pending network errors
// through accept): take the next one.
inline bool is_connection_error(const std::error_code& ec) noexcept {
  switch (ec.value()) {
    case ECONNABORTED: case EPROTO: case ENETDOWN: case ENOPROTOOPT: case EHOSTDOWN: case ENONET:
    case EHOSTUNREACH: case EOPNOTSUPP: case ENETUNREACH: case EPERM: case ETIMEDOUT:
      return true;
  }
  return false;
}

// Settings::raise_fd_limit: the soft RLIMIT_NOFILE up to the hard one, as Node does at start.
// A failure (a seccomp filter, a limit the kernel refuses) leaves the limit as it was: the
// process runs as it would have without the raise.
inline void raise_fd_limit() noexcept {
  rlimit limit{};
  if (::getrlimit(RLIMIT_NOFILE, &limit) != 0 || limit.rlim_cur >= limit.rlim_max) return;
  limit.rlim_cur = limit.rlim_max;
  (void)::setrlimit(RLIMIT_NOFILE, &limit);
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
