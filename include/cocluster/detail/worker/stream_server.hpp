// The state behind a worker's Server<tcp> or Server<local::stream_protocol>: an acceptor (a
// copy of the master's listener under SharedSocket, or an adopted one), or a queue of the
// connections the master hands over (RoundRobin), and the one initiation of accept().
#pragma once

#include <asio/associated_cancellation_slot.hpp>
#include <asio/associated_executor.hpp>
#include <asio/async_result.hpp>
#include <asio/bind_cancellation_slot.hpp>
#include <asio/bind_executor.hpp>
#include <asio/error.hpp>

#include <cstring>
#include <memory>
#include <optional>
#include <string>

#include "cocluster/detail/async_queue.hpp"
#include "cocluster/detail/completion.hpp"
#include "cocluster/detail/worker/server_base.hpp"
#include "cocluster/detail/worker/server_link.hpp"
#include "cocluster/detail/worker/trusted_fd.hpp"

namespace cocluster::detail::worker {

// The peer's address as accept4 wrote it in the master (newconn's `remote`).
template <class Endpoint>
Endpoint endpoint_from_sockaddr(const std::string& bytes) {
  Endpoint ep;
  if (!bytes.empty() && bytes.size() <= ep.capacity()) {
    std::memcpy(ep.data(), bytes.data(), bytes.size());
    ep.resize(bytes.size());
  }
  return ep;
}

template <class Protocol>
class stream_server final : public server_base, public std::enable_shared_from_this<stream_server<Protocol>> {
 public:
  using socket_type = typename Protocol::socket;
  using acceptor_type = typename Protocol::acceptor;
  using endpoint_type = typename Protocol::endpoint;

  // `link` is null for an adopted acceptor: the master never knew it.
  stream_server(asio::any_io_executor ex, server_link* link, std::optional<acceptor_type> acceptor,
                endpoint_type local)
      : ex_(ex),
        link_(link),
        acceptor_(std::move(acceptor)),
        // deliver() runs in the runtime's read loop, a completion handler: a waiting accept()
        // may run at once (as a waiting receive() does for messages).
        handed_(std::move(ex), async_queue<incoming>::unbounded, /*inline_delivery=*/true),
        local_(std::move(local)) {}

  ~stream_server() override { close(); }

  const asio::any_io_executor& executor() const noexcept { return ex_; }
  bool is_open() const noexcept { return open_; }
  const endpoint_type& local_endpoint() const noexcept { return local_; }
  bool round_robin() const noexcept { return !acceptor_; }

  delivery deliver(unique_fd fd, std::uint8_t tag, std::uint32_t seq, const std::string& remote) override {
    if (!open_ || acceptor_ || !fd) return delivery::refused;  // fd closes here; the master re-dispatches
    std::error_code ec;
    // The socket is made on a tracked executor: the runtime counts it until it is gone.
    auto socket = from_master<socket_type>(link_->connection_executor(), local_.protocol(), tag, std::move(fd), ec);
    if (!socket) return ec == error::protocol_error ? delivery::malformed : delivery::refused;
    handed_.push(incoming{std::move(*socket), seq, endpoint_from_sockaddr<endpoint_type>(remote)});
    return delivery::queued;
  }

  void close() override {
    if (!open_) return;
    open_ = false;
    std::error_code ignored;
    if (acceptor_) acceptor_->close(ignored);
    handed_.close(asio::error::operation_aborted);
    while (handed_.try_pop()) {  // the master gives them to other workers when it reads close
    }
    if (link_) link_->closed(*this);
  }

  // Server::accept(): void(std::error_code, socket_type); `peer`, if given, is filled first.
  struct initiate_accept {
    template <class Handler>
    void operator()(Handler&& handler, std::shared_ptr<stream_server> self, endpoint_type* peer) const {
      auto ex = self->ex_;
      run_on(ex, std::forward<Handler>(handler), [self = std::move(self), peer](auto h) mutable {
        if (self->acceptor_) {  // shared listener: Asio's accept, onto a tracked executor
          auto connection_ex = self->connection_executor();
          if (peer) self->acceptor_->async_accept(connection_ex, *peer, std::move(h));
          else self->acceptor_->async_accept(connection_ex, std::move(h));
          return;
        }
        if (auto in = self->handed_.try_pop()) {  // a connection is waiting: no trip through the scheduler
          socket_type socket = self->take(*in, peer);
          return complete_now(std::move(h), self->ex_, std::error_code{}, std::move(socket));
        }
        auto slot = asio::get_associated_cancellation_slot(h);
        auto handler_ex = asio::get_associated_executor(h, self->ex_);
        auto& queue = self->handed_;
        queue.async_pop(asio::bind_cancellation_slot(
            slot, asio::bind_executor(handler_ex, [self = std::move(self), peer, h = std::move(h)](
                                                      std::error_code ec, incoming in) mutable {
              // Closed after the pop: the master has given this connection to another worker.
              if (!ec && !self->open_) ec = asio::error::operation_aborted;
              if (ec) return std::move(h)(ec, socket_type(self->ex_));
              socket_type socket = self->take(in, peer);
              std::move(h)(ec, std::move(socket));
            })));
      });
    }
  };

 private:
  struct incoming {
    std::optional<socket_type> socket;  // optional: the queue wants a default value
    std::uint32_t seq = 0;
    endpoint_type remote;
  };

  // A handed-over connection leaves the queue for the user: tell the master it was taken.
  socket_type take(incoming& in, endpoint_type* peer) {
    if (peer) *peer = in.remote;
    if (link_) link_->accepted(id, in.seq);
    return std::move(*in.socket);
  }

  // Adopted servers make plain sockets: the master never knew them.
  asio::any_io_executor connection_executor() const { return link_ ? link_->connection_executor() : ex_; }

  asio::any_io_executor ex_;
  server_link* link_;
  std::optional<acceptor_type> acceptor_;
  async_queue<incoming> handed_;  // round robin: bounded by the master's window
  endpoint_type local_;
  bool open_ = true;
};

}  // namespace cocluster::detail::worker
