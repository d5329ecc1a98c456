// Where a server listens, as the master's `listening` event reports it (Node: the `address`
// argument of cluster.on('listening'): {address, port, addressType}).
//   Address a = co_await worker->listening();  fmt::print("{}:{} ({})\n", a.address, a.port, to_string(a.type));
#pragma once

#include "cocluster/detail/config.hpp"

#include <cstdint>
#include <string>
#include <string_view>

namespace cocluster {

// Node's addressType: 4, 6, -1 (a Unix path), 'udp4', 'udp6'.
enum class AddressType : std::uint8_t { v4, v6, unix_path, udp4, udp6 };

inline std::string_view to_string(AddressType t) {
  constexpr std::string_view names[] = {"4", "6", "unix", "udp4", "udp6"};
  return names[static_cast<int>(t)];
}

struct Address {
  std::string address;  // an IP address as text, or the Unix socket's path
  std::uint16_t port = 0;
  AddressType type = AddressType::v4;

  friend bool operator==(const Address&, const Address&) = default;
};

}  // namespace cocluster
