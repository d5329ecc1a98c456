// The state behind a worker's Server<udp>: the socket, always a copy of the master's (or an
// adopted one). Datagrams are read from it directly; the master never hands any over.
#pragma once

#include <asio/ip/udp.hpp>

#include "cocluster/detail/worker/server_base.hpp"
#include "cocluster/detail/worker/server_link.hpp"

namespace cocluster::detail::worker {

class datagram_server final : public server_base {
 public:
  // `link` is null for an adopted socket: the master never knew it.
  datagram_server(server_link* link, asio::ip::udp::socket socket) : link_(link), socket_(std::move(socket)) {}
  ~datagram_server() override { close(); }

  asio::ip::udp::socket& socket() noexcept { return socket_; }
  bool is_open() const noexcept { return open_; }

  delivery deliver(unique_fd, std::uint8_t, std::uint32_t, const std::string&) override { return delivery::refused; }

  void close() override {
    if (!open_) return;
    open_ = false;
    std::error_code ignored;
    socket_.close(ignored);
    if (link_) link_->closed(*this);
  }

 private:
  server_link* link_;
  asio::ip::udp::socket socket_;
  bool open_ = true;
};

}  // namespace cocluster::detail::worker
