// What travels between master and workers: bytes, plus at most one handle (a socket or a
// listener), which arrives as the matching Asio object.
//   co_await worker.send({"take this", std::move(tcp_socket)});
//   Message m = co_await this_worker.receive();  auto* s = std::get_if<asio::ip::tcp::socket>(&m.handle);
// Sending moves the handle: the sender's copy is closed once it is on its way.
#pragma once

#include "cocluster/detail/config.hpp"

#include <sys/socket.h>

#include <asio/ip/tcp.hpp>
#include <asio/ip/udp.hpp>
#include <asio/local/stream_protocol.hpp>

#include <cstdint>
#include <string>
#include <system_error>
#include <variant>

#include "cocluster/detail/unique_fd.hpp"
#include "cocluster/error.hpp"

namespace cocluster {

// Node: the `sendHandle` of child.send(). The index of each alternative is its wire tag.
using Handle = std::variant<std::monostate,                          // no handle
                            asio::ip::tcp::socket,                   // a connected TCP socket
                            asio::ip::tcp::acceptor,                 // a listening TCP socket
                            asio::ip::udp::socket,                   // a UDP socket
                            asio::local::stream_protocol::socket,    // a connected Unix socket
                            asio::local::stream_protocol::acceptor>; // a listening Unix socket

// Not an aggregate on purpose: GCC 12 miscompiles aggregate temporaries passed to a
// co_await-ed call (`co_await w->send({"hi"})` freed a pointer into the coroutine frame).
struct Message {
  Message() = default;
  Message(std::string d) : data(std::move(d)) {}
  Message(const char* d) : data(d) {}
  Message(std::string d, Handle h) : data(std::move(d)), handle(std::move(h)) {}

  std::string data;
  Handle handle;

  bool has_handle() const noexcept { return handle.index() != 0; }
};

namespace detail {

using handle_tag = std::uint8_t;
inline constexpr handle_tag no_handle = 0;
inline constexpr handle_tag handle_tag_count = std::variant_size_v<Handle>;

// Takes the fd out of `h` (which is left empty). An empty or closed handle gives no fd.
inline std::pair<handle_tag, unique_fd> release_handle(Handle& h, std::error_code& ec) {
  ec.clear();
  auto tag = static_cast<handle_tag>(h.index());
  unique_fd fd = std::visit(
      [&](auto& object) -> unique_fd {
        if constexpr (std::is_same_v<std::decay_t<decltype(object)>, std::monostate>) {
          return {};
        } else {
          if (!object.is_open()) {
            ec = asio::error::bad_descriptor;
            return {};
          }
          return unique_fd(object.release(ec));
        }
      },
      h);
  h = std::monostate{};
  if (ec) return {no_handle, unique_fd()};
  return {tag, std::move(fd)};
}

inline int socket_option(int fd, int option) {
  int value = -1;
  socklen_t len = sizeof value;
  if (::getsockopt(fd, SOL_SOCKET, option, &value, &len) != 0) return -1;
  return value;
}

// Turns a received fd into the Asio object its tag names, after checking that the fd really
// is such a socket: a peer is not trusted. On failure `fd` is closed and ec is protocol_error.
inline Handle adopt_handle(const asio::any_io_executor& ex, handle_tag tag, unique_fd fd,
                           std::error_code& ec) {
  ec.clear();
  if (tag == no_handle) return {};
  const int domain = socket_option(fd.get(), SO_DOMAIN);
  const int type = socket_option(fd.get(), SO_TYPE);
  const int listening = socket_option(fd.get(), SO_ACCEPTCONN);
  const bool inet = domain == AF_INET || domain == AF_INET6;
  const bool stream = type == SOCK_STREAM;

  auto make = [&](auto object, auto protocol) -> Handle {
    object.assign(protocol, fd.get(), ec);
    if (ec) return {};
    (void)fd.release();
    return Handle(std::move(object));
  };
  switch (tag) {
    case 1:
      if (inet && stream && listening == 0)
        return make(asio::ip::tcp::socket(ex), domain == AF_INET ? asio::ip::tcp::v4() : asio::ip::tcp::v6());
      break;
    case 2:
      if (inet && stream && listening == 1)
        return make(asio::ip::tcp::acceptor(ex), domain == AF_INET ? asio::ip::tcp::v4() : asio::ip::tcp::v6());
      break;
    case 3:
      if (inet && type == SOCK_DGRAM)
        return make(asio::ip::udp::socket(ex), domain == AF_INET ? asio::ip::udp::v4() : asio::ip::udp::v6());
      break;
    case 4:
      if (domain == AF_UNIX && stream && listening == 0)
        return make(asio::local::stream_protocol::socket(ex), asio::local::stream_protocol());
      break;
    case 5:
      if (domain == AF_UNIX && stream && listening == 1)
        return make(asio::local::stream_protocol::acceptor(ex), asio::local::stream_protocol());
      break;
  }
  ec = error::protocol_error;
  return {};
}

}  // namespace detail
}  // namespace cocluster
