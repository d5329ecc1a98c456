// (Master process.) systemd's notify protocol (sd_notify(3)), written here without libsystemd:
// one datagram of "KEY=value" lines to the Unix socket named by NOTIFY_SOCKET (a path, or
// '@' for the abstract namespace). Without NOTIFY_SOCKET (not run by systemd, or not
// Type=notify) every call does nothing. Workers never see NOTIFY_SOCKET, WATCHDOG_* or
// LISTEN_* (the Master drops them from their environment): only the master speaks to systemd.
//   cocluster::systemd::notify_ready("serving 4 workers");   // Type=notify: started
//   cocluster::systemd::notify_reloading();  ... reload ...  cocluster::systemd::notify_ready();
//   cocluster::systemd::notify_stopping();
//   cocluster::systemd::Watchdog watchdog(io.get_executor());  // WATCHDOG=1 at half WATCHDOG_USEC
// Each call has a throwing form (std::system_error naming the socket) and an std::error_code&
// form; "nothing to notify" is no error. A supervisor calls these at its readiness, reload
// and stop (see docs/deploy.md for the unit file).
#pragma once

#include "cocluster/detail/config.hpp"

#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <asio/any_io_executor.hpp>
#include <asio/steady_timer.hpp>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

#include "cocluster/detail/log.hpp"
#include "cocluster/detail/master/socket_activation.hpp"
#include "cocluster/detail/syscalls.hpp"
#include "cocluster/detail/unique_fd.hpp"

namespace cocluster::systemd {

// True when NOTIFY_SOCKET is set: notify() will send.
inline bool notify_enabled() noexcept {
  const char* socket = std::getenv("NOTIFY_SOCKET");
  return socket && *socket;
}

// Sends `state` ("READY=1", or several "KEY=value" lines separated by '\n') to NOTIFY_SOCKET.
// True if sent; false when NOTIFY_SOCKET is unset (nothing to do, no error). Errors: EINVAL
// for a NOTIFY_SOCKET that is neither an absolute path nor '@'-abstract, EAFNOSUPPORT for
// other schemes (vsock), ENAMETOOLONG, or the errno of socket/sendto (ECONNREFUSED: nobody
// listens there).
inline bool notify(std::string_view state, std::error_code& ec) noexcept {
  ec.clear();
  const char* name = std::getenv("NOTIFY_SOCKET");
  if (!name || !*name) return false;
  const std::string_view path(name);
  if (path[0] != '/' && path[0] != '@') {
    ec = std::make_error_code(path.find(':') != std::string_view::npos ? std::errc::address_family_not_supported
                                                                         : std::errc::invalid_argument);
    return false;
  }
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof addr.sun_path) {
    ec = std::make_error_code(std::errc::filename_too_long);
    return false;
  }
  std::memcpy(addr.sun_path, path.data(), path.size());
  if (path[0] == '@') addr.sun_path[0] = '\0';  // abstract: the name is exactly the bytes given
  const auto len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + path.size() + (path[0] == '@' ? 0 : 1));
  detail::unique_fd fd(::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0));
  if (!fd) {
    ec = detail::last_error();
    return false;
  }
  const ssize_t n = detail::retry_on_eintr([&] {
    return ::sendto(fd.get(), state.data(), state.size(), MSG_NOSIGNAL, reinterpret_cast<const sockaddr*>(&addr), len);
  });
  if (n < 0) {
    ec = detail::last_error();
    return false;
  }
  return true;
}
inline bool notify(std::string_view state) {
  std::error_code ec;
  const bool sent = notify(state, ec);
  if (ec) throw std::system_error(ec, "sd_notify to NOTIFY_SOCKET=" + std::string(std::getenv("NOTIFY_SOCKET")));
  return sent;
}

namespace notify_detail {
inline std::string with_status(std::string state, std::string_view status) {
  if (!status.empty()) state += "\nSTATUS=" + std::string(status);
  return state;
}
inline std::string reloading_state() {
  timespec now{};
  ::clock_gettime(CLOCK_MONOTONIC, &now);
  const auto usec = static_cast<unsigned long long>(now.tv_sec) * 1000000ULL +
                    static_cast<unsigned long long>(now.tv_nsec) / 1000ULL;
  return "RELOADING=1\nMONOTONIC_USEC=" + std::to_string(usec);  // Type=notify-reload wants both
}
}  // namespace notify_detail

// READY=1 (startup, or a reload, finished), with STATUS= when `status` is not empty.
inline bool notify_ready(std::string_view status, std::error_code& ec) {
  return notify(notify_detail::with_status("READY=1", status), ec);
}
inline bool notify_ready(std::string_view status = {}) { return notify(notify_detail::with_status("READY=1", status)); }
// RELOADING=1 and MONOTONIC_USEC= (systemd 253's Type=notify-reload needs both); send
// notify_ready() when the reload is over.
inline bool notify_reloading(std::error_code& ec) { return notify(notify_detail::reloading_state(), ec); }
inline bool notify_reloading() { return notify(notify_detail::reloading_state()); }
// STOPPING=1: the service is shutting down.
inline bool notify_stopping(std::error_code& ec) { return notify("STOPPING=1", ec); }
inline bool notify_stopping() { return notify("STOPPING=1"); }
// STATUS=...: a line `systemctl status` shows.
inline bool notify_status(std::string_view status, std::error_code& ec) {
  return notify("STATUS=" + std::string(status), ec);
}
inline bool notify_status(std::string_view status) { return notify("STATUS=" + std::string(status)); }
// WATCHDOG=1: keep-alive for WatchdogSec= (Watchdog below sends it on a timer).
inline bool notify_watchdog(std::error_code& ec) { return notify("WATCHDOG=1", ec); }
inline bool notify_watchdog() { return notify("WATCHDOG=1"); }

// WATCHDOG_USEC when it is set for this process (WATCHDOG_PID unset or this pid), else nullopt.
inline std::optional<std::chrono::microseconds> watchdog_timeout() noexcept {
  const char* usec = std::getenv("WATCHDOG_USEC");
  if (!usec || !*usec) return std::nullopt;
  if (const char* pid = std::getenv("WATCHDOG_PID"); pid && *pid) {
    char* end = nullptr;
    const long long p = std::strtoll(pid, &end, 10);
    if (*end != '\0' || p != static_cast<long long>(::getpid())) return std::nullopt;
  }
  // Digits only, as systemd writes it: strtoull would take "-1" as 2^64 - 1, and a count past
  // the microseconds' range would wrap negative.
  if (*usec < '0' || *usec > '9') return std::nullopt;
  char* end = nullptr;
  errno = 0;
  const unsigned long long value = std::strtoull(usec, &end, 10);
  if (*end != '\0' || value == 0 || errno == ERANGE || value > static_cast<unsigned long long>(INT64_MAX / 2))
    return std::nullopt;
  return std::chrono::microseconds(static_cast<std::chrono::microseconds::rep>(value));
}

// Sends WATCHDOG=1 every half of WATCHDOG_USEC from a timer on `ex`, for as long as it lives,
// when systemd asked this process for it (WatchdogSec=); otherwise does nothing (active()
// is false). Because the timer runs on the master's event loop, a master whose loop is stuck
// stops feeding the watchdog and systemd restarts it. A failed send is logged once. Its
// pending timer keeps io_context::run() from returning: destroy it when the master stops.
class Watchdog {
 public:
  explicit Watchdog(asio::any_io_executor ex) {
    const auto timeout = watchdog_timeout();
    if (!timeout) return;
    // At least 1 ms apart (a WATCHDOG_USEC of a few microseconds must not make the master's
    // loop a busy one; systemd could not be kept happy by it anyway), at most a day (a huge
    // one must not overflow the timer's nanoseconds).
    state_ = std::make_shared<state>(std::move(ex), std::clamp(*timeout / 2, std::chrono::microseconds(1000),
                                                               std::chrono::microseconds(std::chrono::hours(24))));
    notify_watchdog(state_->last_error);  // at once: the first interval starts at exec
    if (state_->last_error) cocluster::detail::log_error("systemd watchdog: {}", state_->last_error.message());
    tick(state_);
  }
  Watchdog(const Watchdog&) = delete;
  Watchdog& operator=(const Watchdog&) = delete;
  ~Watchdog() {
    if (state_) state_->timer.cancel();
  }
  bool active() const noexcept { return state_ != nullptr; }
  // Half of WATCHDOG_USEC (at least 1 ms, at most a day), or zero when not active.
  std::chrono::microseconds interval() const noexcept { return state_ ? state_->interval : std::chrono::microseconds(0); }

 private:
  struct state {
    state(asio::any_io_executor ex, std::chrono::microseconds i) : timer(std::move(ex)), interval(i) {}
    asio::steady_timer timer;
    std::chrono::microseconds interval;
    std::error_code last_error;
  };
  static void tick(const std::shared_ptr<state>& s) {
    s->timer.expires_after(s->interval);
    s->timer.async_wait([weak = std::weak_ptr<state>(s)](std::error_code ec) {
      auto s = weak.lock();
      if (ec || !s) return;
      std::error_code sent;
      notify_watchdog(sent);
      if (sent && sent != s->last_error) cocluster::detail::log_error("systemd watchdog: {}", sent.message());
      s->last_error = sent;
      tick(s);
    });
  }
  std::shared_ptr<state> state_;
};

// Socket activation (sd_listen_fds(3)): the listeners systemd passed to this process (fd and
// its LISTEN_FDNAMES name), empty when none were or LISTEN_PID names another process. The
// Master takes them at construction; a worker's listen() on the address one of them is bound
// to (same port, same address or both wildcards, or the same Unix path) is then served
// through it instead of a socket the master binds. listen_fd(fd) names one explicitly.
using PassedListener = cocluster::detail::activated_listener;
inline const std::vector<PassedListener>& passed_listeners() { return cocluster::detail::activated_listeners(); }

// The variables that are the master's alone: Master::fork() drops them from every worker's
// environment (a worker must not notify systemd nor take the passed listeners as its own).
inline constexpr const char* master_only_variables[] = {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID",
                                                        "LISTEN_FDS",    "LISTEN_PID",    "LISTEN_FDNAMES"};

}  // namespace cocluster::systemd
