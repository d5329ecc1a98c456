// Makes a worker's server from the master's query_reply (and the listener it carries under
// SharedSocket, or for UDP): which state type depends on the protocol.
//   auto server = make_server<tcp>(ex, &link, reply, tag, std::move(fd), ec);
#pragma once

#include <asio/ip/address.hpp>

#include <memory>
#include <optional>
#include <system_error>
#include <type_traits>

#include "cocluster/detail/worker/datagram_server.hpp"
#include "cocluster/detail/worker/listen_target.hpp"
#include "cocluster/detail/worker/stream_server.hpp"
#include "cocluster/detail/worker/trusted_fd.hpp"
#include "cocluster/ipc/protocol.hpp"

namespace cocluster::detail::worker {

template <class Protocol>
using server_state = std::conditional_t<std::is_same_v<Protocol, asio::ip::udp>, datagram_server, stream_server<Protocol>>;

// The listener's protocol (for Asio's assign): the family of the address the master replied with.
template <class Protocol>
Protocol reply_protocol(const ipc::protocol::QueryReply& r) {
  if constexpr (std::is_same_v<Protocol, asio::local::stream_protocol>) {
    return Protocol();
  } else {
    std::error_code ec;
    const auto address = asio::ip::make_address(r.address, ec);
    return !ec && address.is_v6() ? Protocol::v6() : Protocol::v4();
  }
}

// nullptr with `ec` set if the reply does not make a server (error::protocol_error: the handle
// is missing or not the declared kind).
template <class Protocol>
std::shared_ptr<server_state<Protocol>> make_server(const asio::any_io_executor& ex, server_link* link,
                                                    const ipc::protocol::QueryReply& r, std::uint8_t tag, unique_fd fd,
                                                    std::error_code& ec) {
  ec.clear();
  if constexpr (std::is_same_v<Protocol, asio::ip::udp>) {
    auto socket = from_master<asio::ip::udp::socket>(ex, reply_protocol<Protocol>(r), tag, std::move(fd), ec);
    if (!socket) return nullptr;
    return std::make_shared<datagram_server>(link, std::move(*socket));
  } else {
    using acceptor_type = typename Protocol::acceptor;
    using endpoint_type = typename Protocol::endpoint;
    if (r.shared) {
      auto acceptor = from_master<acceptor_type>(ex, reply_protocol<Protocol>(r), tag, std::move(fd), ec);
      if (!acceptor) return nullptr;
      endpoint_type local = acceptor->local_endpoint(ec);
      if (ec) return nullptr;
      return std::make_shared<stream_server<Protocol>>(ex, link, std::move(*acceptor), local);
    }
    endpoint_type local;
    if constexpr (std::is_same_v<Protocol, asio::local::stream_protocol>) {
      local = unix_endpoint(r.address);
    } else {
      auto address = asio::ip::make_address(r.address, ec);
      if (ec) return nullptr;
      local = endpoint_type(address, r.port);
    }
    return std::make_shared<stream_server<Protocol>>(ex, link, std::nullopt, local);
  }
}

}  // namespace cocluster::detail::worker
