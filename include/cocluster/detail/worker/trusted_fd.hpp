// Turns an fd the master sent with an internal message (a listener in query_reply) into its
// Asio object; a connection in newconn becomes a socket through connection_socket.hpp, after
// the same check of its tag (wire_tag). The master is this worker's own parent and
// trusted, so nothing asks the kernel more than the channel's one fstat of every fd it
// receives (is it a socket at all; user handles, which can come from anywhere, are checked
// with three getsockopt calls when adopted): only the declared type is compared with the one
// the message needs, which costs nothing.
//   auto socket = worker::from_master<tcp::socket>(ex, tcp::v4(), envelope.internal_tag, std::move(fd), ec);
#pragma once

#include <asio/any_io_executor.hpp>
#include <asio/ip/tcp.hpp>
#include <asio/ip/udp.hpp>
#include <asio/local/stream_protocol.hpp>

#include <cstdint>
#include <optional>
#include <system_error>
#include <type_traits>

#include "cocluster/detail/unique_fd.hpp"
#include "cocluster/error.hpp"
#include "cocluster/message.hpp"

namespace cocluster::detail::worker {

// The handle byte of a frame (docs/DESIGN.md, "Wire format"): which Asio object an fd is.
template <class Object>
constexpr std::uint8_t wire_tag() {
  static_assert(handle_kind_of<Object> != handle_kind::none, "not a type the wire carries");
  return static_cast<std::uint8_t>(handle_kind_of<Object>);
}

// `fd` as an Object of `protocol` on `ex`. error::protocol_error if the master declared another
// type (or sent no fd); a system error if Asio cannot register it. `fd` is closed on failure.
template <class Object, class Protocol>
std::optional<Object> from_master(const asio::any_io_executor& ex, const Protocol& protocol, std::uint8_t tag,
                                  unique_fd fd, std::error_code& ec) {
  ec.clear();
  if (!fd || tag != wire_tag<Object>()) {
    ec = error::protocol_error;
    return std::nullopt;
  }
  Object object(ex);
  object.assign(protocol, fd.get(), ec);
  if (ec) return std::nullopt;
  (void)fd.release();
  return object;
}

}  // namespace cocluster::detail::worker
