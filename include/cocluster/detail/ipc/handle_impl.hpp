// The machinery behind Handle (message.hpp): the check that an fd is the socket its kind says,
// adoption into an Asio object, and the forms the protocol layer uses (wire bytes, a variant).
#pragma once

#include <sys/socket.h>
#include <sys/stat.h>

#include <string>
#include <system_error>
#include <variant>

#include "cocluster/message.hpp"

namespace cocluster::detail {

// The raw wire byte of a handle_kind, as the protocol layer (worker.hpp, the policies) passes it.
using handle_tag = std::uint8_t;
inline constexpr handle_tag no_handle = 0;
inline constexpr handle_tag handle_tag_count = handle_kind_count;

// One fstat: what the channel checks of every received fd (a pipe or a file is never a handle).
inline bool is_socket(int fd) noexcept {
  struct stat st;
  return ::fstat(fd, &st) == 0 && S_ISSOCK(st.st_mode);
}

inline int socket_option(int fd, int option) noexcept {
  int value = -1;
  socklen_t len = sizeof value;
  if (::getsockopt(fd, SOL_SOCKET, option, &value, &len) != 0) return -1;
  return value;
}

// The address family of `fd` if it is a socket of kind `k` (family, type, listening state),
// else -1. Three getsockopt calls: paid once, by whoever adopts the handle.
inline int family_if_kind(int fd, handle_kind k) noexcept {
  const int domain = socket_option(fd, SO_DOMAIN);
  const int type = socket_option(fd, SO_TYPE);
  const bool inet = domain == AF_INET || domain == AF_INET6;
  auto listening = [&] { return socket_option(fd, SO_ACCEPTCONN); };
  bool ok = false;
  switch (k) {
    case handle_kind::none: break;
    case handle_kind::tcp_socket: ok = inet && type == SOCK_STREAM && listening() == 0; break;
    case handle_kind::tcp_acceptor: ok = inet && type == SOCK_STREAM && listening() == 1; break;
    case handle_kind::udp_socket: ok = inet && type == SOCK_DGRAM; break;
    case handle_kind::unix_socket: ok = domain == AF_UNIX && type == SOCK_STREAM && listening() == 0; break;
    case handle_kind::unix_acceptor: ok = domain == AF_UNIX && type == SOCK_STREAM && listening() == 1; break;
  }
  return ok ? domain : -1;
}

template <class Protocol>
Protocol protocol_for_family(int family) {
  if constexpr (std::is_same_v<Protocol, asio::local::stream_protocol>) return Protocol();
  else return family == AF_INET6 ? Protocol::v6() : Protocol::v4();
}

// The five Asio objects a handle can become, for code that takes whichever its kind says
// (the worker runtime's listeners and handed-over connections).
using any_socket = std::variant<std::monostate, asio::ip::tcp::socket, asio::ip::tcp::acceptor, asio::ip::udp::socket,
                                asio::local::stream_protocol::socket, asio::local::stream_protocol::acceptor>;

}  // namespace cocluster::detail

namespace cocluster {

template <handle_object Socket, class ExecutorOrContext>
Socket Handle::adopt(ExecutorOrContext&& ex, std::error_code& ec) {
  Socket object(ex);
  ec.clear();
  if (!fd_) {
    ec = lost_ ? std::make_error_code(std::errc::too_many_files_open) : asio::error::bad_descriptor;
    return object;
  }
  if (kind_ != handle_kind_of<Socket>) {
    ec = std::make_error_code(std::errc::wrong_protocol_type);
    return object;
  }
  const int family = detail::family_if_kind(fd_.get(), kind_);
  if (family < 0) {
    ec = error::protocol_error;
    return object;
  }
  object.assign(detail::protocol_for_family<typename Socket::protocol_type>(family), fd_.get(), ec);
  if (ec) return object;
  (void)fd_.release();
  kind_ = handle_kind::none;
  return object;
}

template <handle_object Socket, class ExecutorOrContext>
Socket Handle::adopt(ExecutorOrContext&& ex) {
  std::error_code ec;
  const handle_kind declared = kind_;
  Socket object = adopt<Socket>(std::forward<ExecutorOrContext>(ex), ec);
  if (ec) {
    std::string what = std::string("cocluster::Handle::adopt: a handle declared as ") + to_string(declared) +
                       ", adopted as " + to_string(handle_kind_of<Socket>);
    if (ec == error::protocol_error) what += ", is not such a socket";
    if (ec == std::errc::too_many_files_open) what += ", was lost on its way: this process had no fd free";
    throw std::system_error(ec, what);
  }
  return object;
}

}  // namespace cocluster

namespace cocluster::detail {

// Turns a received fd into the Asio object `tag` names, after checking that the fd really is
// such a socket: a peer is not trusted. On failure `fd` is closed and ec is protocol_error.
inline any_socket adopt_handle(const asio::any_io_executor& ex, handle_tag tag, unique_fd fd, std::error_code& ec) {
  ec.clear();
  if (tag == no_handle) return {};
  Handle h(static_cast<handle_kind>(tag), std::move(fd));
  auto as = [&](auto object) -> any_socket {
    if (ec) return {};
    return any_socket(std::move(object));
  };
  any_socket out;
  switch (static_cast<handle_kind>(tag)) {
    case handle_kind::tcp_socket: out = as(h.adopt<asio::ip::tcp::socket>(ex, ec)); break;
    case handle_kind::tcp_acceptor: out = as(h.adopt<asio::ip::tcp::acceptor>(ex, ec)); break;
    case handle_kind::udp_socket: out = as(h.adopt<asio::ip::udp::socket>(ex, ec)); break;
    case handle_kind::unix_socket: out = as(h.adopt<asio::local::stream_protocol::socket>(ex, ec)); break;
    case handle_kind::unix_acceptor: out = as(h.adopt<asio::local::stream_protocol::acceptor>(ex, ec)); break;
    default: ec = error::protocol_error;
  }
  if (ec) ec = error::protocol_error;
  return out;
}

}  // namespace cocluster::detail
