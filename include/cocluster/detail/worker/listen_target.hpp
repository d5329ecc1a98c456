// What a worker's listen() asks the master for, from the endpoint it was given (the fields of
// query_server that name a listener), and back: the endpoint of a Unix path the master bound.
//   listen_target t = target_of(tcp::endpoint(tcp::v4(), 80));   // {v4, "0.0.0.0", 80, -1}
#pragma once

#include <sys/un.h>

#include <asio/ip/tcp.hpp>
#include <asio/ip/udp.hpp>
#include <asio/local/stream_protocol.hpp>

#include <cstdint>
#include <filesystem>
#include <string>
#include <type_traits>

#include "cocluster/address.hpp"
#include "cocluster/detail/unix_path.hpp"

namespace cocluster::detail::worker {

struct listen_target {
  AddressType type = AddressType::v4;
  std::string address;
  std::uint16_t port = 0;
  int fd = -1;
};

template <class Endpoint>
listen_target target_of(const Endpoint& ep) {
  using Protocol = typename Endpoint::protocol_type;
  listen_target t;
  if constexpr (std::is_same_v<Protocol, asio::local::stream_protocol>) {
    t.type = AddressType::unix_path;
    // Node resolves a Unix path against the worker's cwd, before the master sees it.
    std::error_code ec;
    auto absolute = std::filesystem::absolute(std::string(ep.path()), ec);
    t.address = ec ? std::string(ep.path()) : absolute.lexically_normal().string();
  } else {
    const bool udp = std::is_same_v<Protocol, asio::ip::udp>;
    const bool v4 = ep.address().is_v4();
    t.type = udp ? (v4 ? AddressType::udp4 : AddressType::udp6) : (v4 ? AddressType::v4 : AddressType::v6);
    t.address = ep.address().to_string();
    t.port = ep.port();
  }
  return t;
}

// For listen_fd: the master's fd says its own family; the type only names the protocol.
template <class Protocol>
listen_target fd_target(int fd) {
  listen_target t;
  if constexpr (std::is_same_v<Protocol, asio::local::stream_protocol>) t.type = AddressType::unix_path;
  else if constexpr (std::is_same_v<Protocol, asio::ip::udp>) t.type = AddressType::udp4;
  else t.type = AddressType::v4;
  t.fd = fd;
  return t;
}

// `path` as an endpoint: itself if it fits sun_path, else relative to our cwd (the master bound
// the same shorter form), else an empty endpoint: where the server is stays in the master's
// Address. Never throws (Asio's constructor does for a long path).
inline asio::local::stream_protocol::endpoint unix_endpoint(const std::string& path) {
  const std::string fits = short_unix_path(path);
  if (fits.empty()) return {};
  return {fits};
}

}  // namespace cocluster::detail::worker
