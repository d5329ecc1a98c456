// (Master process.) Listeners passed by systemd's socket activation (sd_listen_fds(3)): when
// LISTEN_PID is this process, fds 3 .. 3+LISTEN_FDS-1 are listening sockets named by
// LISTEN_FDNAMES. They are taken once per process (the Master's constructor asks first) and
// marked close-on-exec. A worker's listen() on the address one of them is bound to is then
// served by a duplicate of it instead of a socket the master binds (open_listener asks here
// first), so the service keeps its port across restarts and needs no privilege to bind it.
//   const auto& passed = detail::activated_listeners();            // [{3, "web"}, ...]
//   unique_fd fd = detail::take_activated_listener(type, "0.0.0.0", 8080, ec);   // empty: none
// fd 3 is the channel only in workers: in the master it is free for systemd's sockets, and
// spawn() puts the channel there in the child whatever the master holds at 3.
#pragma once

#include "cocluster/detail/config.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

#include "cocluster/address.hpp"
#include "cocluster/detail/ipc/handle_impl.hpp"
#include "cocluster/detail/log.hpp"
#include "cocluster/detail/syscalls.hpp"
#include "cocluster/detail/unix_path.hpp"

namespace cocluster::detail {

// The first fd systemd passes (SD_LISTEN_FDS_START).
inline constexpr int listen_fds_start = 3;

struct activated_listener {
  int fd = -1;
  std::string name;  // from LISTEN_FDNAMES; "unknown" when not named (as systemd says)
};

namespace socket_activation_detail {

inline std::vector<activated_listener> read_environment() {
  std::vector<activated_listener> out;
  const char* pid = std::getenv("LISTEN_PID");
  const char* fds = std::getenv("LISTEN_FDS");
  if (!pid || !fds) return out;
  char* end = nullptr;
  const long long owner = std::strtoll(pid, &end, 10);
  if (*end != '\0' || owner != static_cast<long long>(::getpid())) return out;  // meant for another process
  const long long n = std::strtoll(fds, &end, 10);
  if (*end != '\0' || n <= 0 || n > 4096) {
    if (n != 0 || *end != '\0') log_error("socket activation: ignoring LISTEN_FDS={}", fds);
    return out;
  }
  std::vector<std::string> names;
  if (const char* text = std::getenv("LISTEN_FDNAMES")) {
    std::string_view rest(text);
    for (;;) {
      const auto colon = rest.find(':');
      names.emplace_back(rest.substr(0, colon));
      if (colon == std::string_view::npos) break;
      rest.remove_prefix(colon + 1);
    }
  }
  for (int i = 0; i < static_cast<int>(n); ++i) {
    const int fd = listen_fds_start + i;
    if (::fcntl(fd, F_SETFD, FD_CLOEXEC) != 0) {  // not open: systemd's promise is broken
      log_error("socket activation: LISTEN_FDS={} but fd {} is not open", fds, fd);
      continue;
    }
    const auto k = static_cast<std::size_t>(i);
    out.push_back({fd, k < names.size() && !names[k].empty() ? names[k] : "unknown"});
  }
  return out;
}

inline bool is_wildcard(const sockaddr_storage& ss) {
  if (ss.ss_family == AF_INET) return reinterpret_cast<const sockaddr_in&>(ss).sin_addr.s_addr == htonl(INADDR_ANY);
  if (ss.ss_family == AF_INET6)
    return std::memcmp(&reinterpret_cast<const sockaddr_in6&>(ss).sin6_addr, &in6addr_any, sizeof in6addr_any) == 0;
  return false;
}

inline std::uint16_t port_of(const sockaddr_storage& ss) {
  if (ss.ss_family == AF_INET) return ntohs(reinterpret_cast<const sockaddr_in&>(ss).sin_port);
  if (ss.ss_family == AF_INET6) return ntohs(reinterpret_cast<const sockaddr_in6&>(ss).sin6_port);
  return 0;
}

// Whether the passed socket `fd` is what listen(type, address, port) asks for: the same kind
// of socket, bound to that address and port (a wildcard request takes a wildcard socket of the
// other family too when it serves both: systemd's ListenStream=8080 is [::]:8080 dual-stack),
// or to that Unix path. Port 0 (any port) never matches.
inline bool matches(int fd, AddressType type, const std::string& address, std::uint16_t port) {
  const int domain = socket_option(fd, SO_DOMAIN);
  const int socktype = socket_option(fd, SO_TYPE);
  const bool datagram = type == AddressType::udp4 || type == AddressType::udp6;
  if (socktype != (datagram ? SOCK_DGRAM : SOCK_STREAM)) return false;
  if (!datagram && socket_option(fd, SO_ACCEPTCONN) != 1) return false;  // Accept=yes passes connections
  sockaddr_storage bound{};
  socklen_t len = sizeof bound;
  if (::getsockname(fd, reinterpret_cast<sockaddr*>(&bound), &len) != 0) return false;
  if (type == AddressType::unix_path) {
    if (domain != AF_UNIX) return false;
    const auto& un = reinterpret_cast<const sockaddr_un&>(bound);
    const std::size_t n = len > offsetof(sockaddr_un, sun_path) ? len - offsetof(sockaddr_un, sun_path) : 0;
    const std::string path(un.sun_path, strnlen(un.sun_path, n));
    return !path.empty() && (path == address || path == short_unix_path(address));
  }
  if (domain != AF_INET && domain != AF_INET6) return false;
  if (port == 0 || port_of(bound) != port) return false;
  const bool want_v4 = type == AddressType::v4 || type == AddressType::udp4;
  sockaddr_storage wanted{};
  wanted.ss_family = want_v4 ? AF_INET : AF_INET6;
  void* wanted_addr = want_v4 ? static_cast<void*>(&reinterpret_cast<sockaddr_in&>(wanted).sin_addr)
                              : static_cast<void*>(&reinterpret_cast<sockaddr_in6&>(wanted).sin6_addr);
  if (::inet_pton(wanted.ss_family, address.c_str(), wanted_addr) != 1) return false;
  if (bound.ss_family == wanted.ss_family) {
    if (want_v4)
      return reinterpret_cast<const sockaddr_in&>(bound).sin_addr.s_addr ==
             reinterpret_cast<const sockaddr_in&>(wanted).sin_addr.s_addr;
    return std::memcmp(&reinterpret_cast<const sockaddr_in6&>(bound).sin6_addr,
                       &reinterpret_cast<const sockaddr_in6&>(wanted).sin6_addr, sizeof(in6_addr)) == 0;
  }
  // 0.0.0.0 asked, [::] passed: the same service if that socket takes IPv4 too.
  int v6only = 1;
  socklen_t optlen = sizeof v6only;
  return want_v4 && bound.ss_family == AF_INET6 && is_wildcard(wanted) && is_wildcard(bound) &&
         ::getsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &v6only, &optlen) == 0 && v6only == 0;
}

}  // namespace socket_activation_detail

// The listeners systemd passed to this process (empty when none, or when LISTEN_PID names
// another process). Read at the first call; the fds stay open for the process's life.
inline const std::vector<activated_listener>& activated_listeners() {
  static const std::vector<activated_listener> passed = [] {
    auto l = socket_activation_detail::read_environment();
    for (auto& p : l) debug("socket activation: fd {} ({}) passed by systemd", p.fd, p.name);
    return l;
  }();
  return passed;
}

// A non-blocking, close-on-exec duplicate of the passed listener bound where the request
// says, or an empty fd (ec clear) when none is. The passed fd itself stays open, so that the
// address can be listened on again after its last worker closed it.
inline unique_fd take_activated_listener(AddressType type, const std::string& address, std::uint16_t port,
                                         std::error_code& ec) {
  ec.clear();
  for (const auto& p : activated_listeners()) {
    if (!socket_activation_detail::matches(p.fd, type, address, port)) continue;
    unique_fd fd = dup_cloexec(p.fd, ec);
    if (ec) return {};
    const int flags = ::fcntl(fd.get(), F_GETFL);
    if (flags < 0 || ::fcntl(fd.get(), F_SETFL, flags | O_NONBLOCK) != 0) {
      ec = last_error();
      return {};
    }
    debug("socket activation: {}:{} served by fd {} ({})", address, port, p.fd, p.name);
    return fd;
  }
  return {};
}

}  // namespace cocluster::detail
