// The peer of a connection the master accepted, as a policy that routes by client address
// sees it (Node: socket.remoteAddress / remotePort): a view of accept4's sockaddr, no copy.
//   int choose_for(const Remote& r) override { return r.address() == special ? 2 : 1; }
#pragma once

#include "cocluster/detail/config.hpp"

#include <netinet/in.h>
#include <sys/socket.h>

#include <asio/ip/address.hpp>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string_view>

namespace cocluster {

class Remote {
 public:
  Remote() = default;
  // `sockaddr` must outlive the view (the master's copy of the connection holds it).
  explicit Remote(std::string_view sockaddr) noexcept : bytes_(sockaddr) {}

  // AF_INET, AF_INET6, AF_UNIX, or AF_UNSPEC when the kernel gave no address.
  int family() const noexcept {
    if (bytes_.size() < sizeof(sa_family_t)) return AF_UNSPEC;
    sa_family_t f;
    std::memcpy(&f, bytes_.data(), sizeof f);
    return f;
  }
  bool is_ip() const noexcept {
    return (family() == AF_INET && bytes_.size() >= sizeof(sockaddr_in)) ||
           (family() == AF_INET6 && bytes_.size() >= sizeof(sockaddr_in6));
  }

  // The client's IP address; the unspecified v4 address for a Unix socket's peer.
  asio::ip::address address() const noexcept {
    if (family() == AF_INET && bytes_.size() >= sizeof(sockaddr_in)) {
      sockaddr_in a;
      std::memcpy(&a, bytes_.data(), sizeof a);
      return asio::ip::address_v4(ntohl(a.sin_addr.s_addr));
    }
    if (family() == AF_INET6 && bytes_.size() >= sizeof(sockaddr_in6)) {
      sockaddr_in6 a;
      std::memcpy(&a, bytes_.data(), sizeof a);
      asio::ip::address_v6::bytes_type b;
      std::memcpy(b.data(), &a.sin6_addr, b.size());
      return asio::ip::address_v6(b, a.sin6_scope_id);
    }
    return {};
  }
  std::uint16_t port() const noexcept {
    if (!is_ip()) return 0;
    in_port_t p;  // sin_port and sin6_port sit at the same offset
    std::memcpy(&p, bytes_.data() + offsetof(sockaddr_in, sin_port), sizeof p);
    return ntohs(p);
  }

  // The address bytes alone (4 for IPv4, 16 for IPv6, empty otherwise): what identifies a
  // client across its connections, for hashing. An IPv4 client on a dual-stack listener
  // (::ffff:a.b.c.d) gives its 4 IPv4 bytes: it is the same client on either kind of listener.
  std::string_view address_bytes() const noexcept {
    if (family() == AF_INET && bytes_.size() >= sizeof(sockaddr_in))
      return bytes_.substr(offsetof(sockaddr_in, sin_addr), sizeof(in_addr));
    if (family() == AF_INET6 && bytes_.size() >= sizeof(sockaddr_in6)) {
      const std::string_view v6 = bytes_.substr(offsetof(sockaddr_in6, sin6_addr), sizeof(in6_addr));
      static constexpr char v4_mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, '\xff', '\xff'};
      const bool mapped = v6.substr(0, sizeof v4_mapped) == std::string_view(v4_mapped, sizeof v4_mapped);
      return mapped ? v6.substr(sizeof v4_mapped) : v6;
    }
    return {};
  }
  // The whole sockaddr as accept4 wrote it.
  std::string_view sockaddr_bytes() const noexcept { return bytes_; }

 private:
  std::string_view bytes_;
};

}  // namespace cocluster
