// (Master process.) The socket syscalls of the master's listeners, in one place: opening a listener for a
// query_server key, reading its address back, and accepting raw connections.
#pragma once

#include "cocluster/detail/config.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cstddef>
#include <cstring>
#include <filesystem>
#include <string>
#include <system_error>

#include "cocluster/address.hpp"
#include "cocluster/detail/master/socket_activation.hpp"
#include "cocluster/detail/syscalls.hpp"
#include "cocluster/detail/unix_path.hpp"
#include "cocluster/message.hpp"

namespace cocluster::detail {

// What a worker asked to listen on (the fields of query_server that name a listener).
struct listen_request {
  AddressType type = AddressType::v4;
  std::string address;  // IP text or an absolute Unix path; empty with fd >= 0
  std::uint16_t port = 0;
  int fd = -1;          // listen({fd}): an fd of the master's
  int backlog = 511;    // Node's default
  int unix_mode = -1;   // a Unix path's permission bits after bind, or -1: the umask's
  bool reuse_port = false;  // SO_REUSEPORT before bind (IP stream sockets only): see reuse_port_twin
  int defer_accept = 0;     // TCP_DEFER_ACCEPT seconds (TCP sockets we bind only), 0: off
};

inline bool is_datagram(AddressType t) noexcept { return t == AddressType::udp4 || t == AddressType::udp6; }

// Fills `ss` for an IP address; false if `text` is not an address of that family.
inline bool ip_sockaddr(AddressType type, const std::string& text, std::uint16_t port, sockaddr_storage& ss,
                        socklen_t& len) {
  std::memset(&ss, 0, sizeof ss);
  if (type == AddressType::v4 || type == AddressType::udp4) {
    auto* a = reinterpret_cast<sockaddr_in*>(&ss);
    a->sin_family = AF_INET;
    a->sin_port = htons(port);
    len = sizeof *a;
    return ::inet_pton(AF_INET, text.c_str(), &a->sin_addr) == 1;
  }
  auto* a = reinterpret_cast<sockaddr_in6*>(&ss);
  a->sin6_family = AF_INET6;
  a->sin6_port = htons(port);
  len = sizeof *a;
  return ::inet_pton(AF_INET6, text.c_str(), &a->sin6_addr) == 1;
}

// The listener's own address (the real port after listen(0)); `type` says how to read it.
inline Address socket_address(int fd, AddressType type) {
  sockaddr_storage ss{};
  socklen_t len = sizeof ss;
  Address out;
  out.type = type;
  if (::getsockname(fd, reinterpret_cast<sockaddr*>(&ss), &len) != 0) return out;
  char text[INET6_ADDRSTRLEN] = {};
  const bool datagram = is_datagram(type);
  if (ss.ss_family == AF_INET) {
    auto* a = reinterpret_cast<sockaddr_in*>(&ss);
    ::inet_ntop(AF_INET, &a->sin_addr, text, sizeof text);
    out = {text, ntohs(a->sin_port), datagram ? AddressType::udp4 : AddressType::v4};
  } else if (ss.ss_family == AF_INET6) {
    auto* a = reinterpret_cast<sockaddr_in6*>(&ss);
    ::inet_ntop(AF_INET6, &a->sin6_addr, text, sizeof text);
    out = {text, ntohs(a->sin6_port), datagram ? AddressType::udp6 : AddressType::v6};
  } else if (ss.ss_family == AF_UNIX) {
    auto* a = reinterpret_cast<sockaddr_un*>(&ss);
    const std::size_t n = len > offsetof(sockaddr_un, sun_path) ? len - offsetof(sockaddr_un, sun_path) : 0;
    out = {std::string(a->sun_path, strnlen(a->sun_path, n)), 0, AddressType::unix_path};
  }
  return out;
}

// The handle kind a connection accepted on a stream listener of this type travels as.
inline handle_tag connection_tag(AddressType type) noexcept {
  return static_cast<handle_tag>(type == AddressType::unix_path ? handle_kind::unix_socket : handle_kind::tcp_socket);
}

// The Handle tag a listener of this type travels as.
inline handle_tag listener_tag(AddressType type) noexcept {
  if (is_datagram(type)) return static_cast<handle_tag>(handle_kind::udp_socket);
  if (type == AddressType::unix_path) return static_cast<handle_tag>(handle_kind::unix_acceptor);
  return static_cast<handle_tag>(handle_kind::tcp_acceptor);
}

// A duplicate of the master's fd `r.fd`, checked to be a socket of the requested kind, and put
// into the listening state if it is a stream socket that is not listening yet.
inline unique_fd adopt_master_fd(const listen_request& r, std::error_code& ec) {
  unique_fd fd = dup_cloexec(r.fd, ec);
  if (ec) return {};
  const int domain = socket_option(fd.get(), SO_DOMAIN);
  const int type = socket_option(fd.get(), SO_TYPE);
  const bool inet = domain == AF_INET || domain == AF_INET6;
  const bool fits = is_datagram(r.type) ? inet && type == SOCK_DGRAM
                    : r.type == AddressType::unix_path ? domain == AF_UNIX && type == SOCK_STREAM
                                                       : inet && type == SOCK_STREAM;
  if (!fits) {
    ec = std::make_error_code(domain < 0 ? std::errc::not_a_socket : std::errc::invalid_argument);
    return {};
  }
  if (type == SOCK_STREAM && socket_option(fd.get(), SO_ACCEPTCONN) != 1 && ::listen(fd.get(), r.backlog) != 0) {
    ec = last_error();
    return {};
  }
  const int flags = ::fcntl(fd.get(), F_GETFL);
  if (flags < 0 || ::fcntl(fd.get(), F_SETFL, flags | O_NONBLOCK) != 0) {
    ec = last_error();
    return {};
  }
  return fd;
}

// Opens a non-blocking, close-on-exec listener for `r` (bound and, for streams, listening).
// `bound_path` receives the Unix path actually bound (to remove on close); `adopted`, if
// given, whether the socket is one this process did not bind (r.fd, or systemd's).
inline unique_fd open_listener(const listen_request& r, std::string& bound_path, std::error_code& ec,
                               bool* adopted = nullptr) {
  ec.clear();
  bound_path.clear();
  if (adopted) *adopted = true;
  if (r.fd >= 0) return adopt_master_fd(r, ec);
  // A listener systemd passed for this address (socket activation) instead of a bind.
  if (unique_fd passed = take_activated_listener(r.type, r.address, r.port, ec); passed || ec) return passed;
  if (adopted) *adopted = false;
  sockaddr_storage ss{};
  socklen_t len = 0;
  int domain = AF_UNIX;
  if (r.type == AddressType::unix_path) {
    std::string path = short_unix_path(r.address);  // absolute, from the worker
    if (r.address.find('\0') != std::string::npos) {  // an abstract name: not a path (the worker says so)
      ec = std::make_error_code(std::errc::invalid_argument);
      return {};
    }
    if (r.address.empty() || path.empty()) {
      ec = std::make_error_code(r.address.empty() ? std::errc::invalid_argument : std::errc::filename_too_long);
      return {};
    }
    auto* a = reinterpret_cast<sockaddr_un*>(&ss);
    a->sun_family = AF_UNIX;
    std::memcpy(a->sun_path, path.c_str(), path.size() + 1);
    len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + path.size() + 1);
    bound_path = r.address;  // absolute: removed on close even if this process changes directory
  } else {
    if (!ip_sockaddr(r.type, r.address, r.port, ss, len)) {
      ec = std::make_error_code(std::errc::invalid_argument);
      return {};
    }
    domain = ss.ss_family;
  }
  const bool datagram = is_datagram(r.type);
  unique_fd fd(::socket(domain, (datagram ? SOCK_DGRAM : SOCK_STREAM) | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (!fd) {
    ec = last_error();
    return {};
  }
  const int one = 1;
  if (domain != AF_UNIX && !datagram && ::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) != 0) {
    ec = last_error();
    return {};
  }
  if (r.reuse_port && domain != AF_UNIX && !datagram) {
    // SO_REUSEPORT would let this socket join any group its user already has on the port (a
    // second instance of the program, or another of our keys on it): the connections would be
    // split between them without a word. A bind without it tells whether the port is taken.
    if (r.port != 0) {
      unique_fd probe(::socket(domain, SOCK_STREAM | SOCK_CLOEXEC, 0));
      if (!probe || ::setsockopt(probe.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) != 0 ||
          ::bind(probe.get(), reinterpret_cast<sockaddr*>(&ss), len) != 0) {
        ec = last_error();
        return {};
      }
    }
    if (::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEPORT, &one, sizeof one) != 0) {
      ec = last_error();
      return {};
    }
  }
  if (::bind(fd.get(), reinterpret_cast<sockaddr*>(&ss), len) != 0) {
    ec = last_error();
    bound_path.clear();  // not ours: someone else's socket file, or none
    return {};
  }
  // The mode asked for, before anyone can connect (the umask is process-wide: not touched).
  const bool mode_failed = !bound_path.empty() && r.unix_mode >= 0 &&
                           ::chmod(bound_path.c_str(), static_cast<mode_t>(r.unix_mode & 07777)) != 0;
  // (Set before listen(): no connection is accepted without it.)
  if (mode_failed || (r.defer_accept > 0 && domain != AF_UNIX && !datagram &&
                      ::setsockopt(fd.get(), IPPROTO_TCP, TCP_DEFER_ACCEPT, &r.defer_accept, sizeof r.defer_accept) != 0) ||
      (!datagram && ::listen(fd.get(), r.backlog) != 0)) {
    ec = last_error();
    if (!bound_path.empty()) ::unlink(bound_path.c_str());
    bound_path.clear();
    return {};
  }
  return fd;
}

// Another listening socket in the SO_REUSEPORT group of `listener` (an IP stream listener that
// was bound with SO_REUSEPORT): same address and port, same IPV6_V6ONLY, non-blocking and
// close-on-exec, with its TCP_DEFER_ACCEPT. The kernel spreads new connections over the group's sockets.
inline unique_fd reuse_port_twin(int listener, int backlog, std::error_code& ec) {
  ec.clear();
  sockaddr_storage ss{};
  socklen_t len = sizeof ss;
  if (::getsockname(listener, reinterpret_cast<sockaddr*>(&ss), &len) != 0) {
    ec = last_error();
    return {};
  }
  unique_fd fd(::socket(ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (!fd) {
    ec = last_error();
    return {};
  }
  const int one = 1;
  int v6only = 0;
  socklen_t v6len = sizeof v6only;
  int defer = 0;
  socklen_t defer_len = sizeof defer;
  if (::getsockopt(listener, IPPROTO_TCP, TCP_DEFER_ACCEPT, &defer, &defer_len) != 0 ||
      (defer > 0 && ::setsockopt(fd.get(), IPPROTO_TCP, TCP_DEFER_ACCEPT, &defer, sizeof defer) != 0) ||
      ::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) != 0 ||
      ::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEPORT, &one, sizeof one) != 0 ||
      (ss.ss_family == AF_INET6 && (::getsockopt(listener, IPPROTO_IPV6, IPV6_V6ONLY, &v6only, &v6len) != 0 ||
                                    ::setsockopt(fd.get(), IPPROTO_IPV6, IPV6_V6ONLY, &v6only, sizeof v6only) != 0)) ||
      ::bind(fd.get(), reinterpret_cast<sockaddr*>(&ss), len) != 0 || ::listen(fd.get(), backlog) != 0) {
    ec = last_error();
    return {};
  }
  return fd;
}

// One connection from a listening socket, non-blocking and close-on-exec, with the peer's
// sockaddr. An empty fd with ec clear: nothing to accept now.
inline unique_fd accept_connection(int listener, std::string& remote, std::error_code& ec) {
  sockaddr_storage ss{};
  socklen_t len = sizeof ss;
  unique_fd fd = accept_connection(listener, reinterpret_cast<sockaddr*>(&ss), &len, ec);
  if (fd) remote.assign(reinterpret_cast<const char*>(&ss), std::min<std::size_t>(len, sizeof ss));
  return fd;
}

}  // namespace cocluster::detail
