// A worker's server (Node: the net.Server / dgram.Socket a worker listens on), as
// this_worker.listen() returns it. The same type whatever the master's policy:
//   auto server = co_await this_worker.listen(tcp::endpoint(tcp::v4(), 8080));
//   for (;;) { tcp::socket s = co_await server.accept();  co_spawn(ex, serve(std::move(s)), detached); }
// Under RoundRobin the master hands each connection over; under SharedSocket the server
// accepts on its copy of the listener. close() (or the destructor) tells the master.
#pragma once

#include <asio/bind_cancellation_slot.hpp>
#include <asio/bind_executor.hpp>
#include <asio/ip/tcp.hpp>
#include <asio/ip/udp.hpp>
#include <asio/local/stream_protocol.hpp>
#include <asio/use_awaitable.hpp>

#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>

#include "cocluster/detail/async_queue.hpp"
#include "cocluster/message.hpp"

namespace cocluster {

// Node: the options of server.listen() that reach the master.
struct ListenOptions {
  int backlog = 511;  // Node's default
};

namespace detail {

class worker_server;

// What a worker's server needs from the worker runtime (detail::worker_runtime).
class server_host {
 public:
  virtual ~server_host() = default;
  // Sends accepted{server, seq, ok}: the master may close its copy of the connection.
  virtual void connection_accepted(std::uint32_t server, std::uint32_t seq) = 0;
  // The server closed: tell the master, forget it.
  virtual void server_closed(worker_server& server) = 0;
  // The executor a new connection's socket is made on: the worker's, tracked, so that a
  // disconnect can wait until every connection is gone (Node: server.close() waits for them).
  virtual asio::any_io_executor connection_executor() = 0;
};

// The runtime's view of one server (any protocol).
class worker_server {
 public:
  virtual ~worker_server() = default;
  // A round-robin connection for this server; false if it cannot take it (then the runtime
  // refuses it and `h` is closed).
  virtual bool deliver(any_socket& h, std::uint32_t seq, const std::string& remote) = 0;
  // Closes the server; `tell_host` false when the runtime itself is closing it.
  virtual void close(bool tell_host = true) = 0;

  std::uint32_t id = 0;     // the master's listener id; 0 for an adopted handle
  std::string index_key;    // Node's indexesKey: address:port:type:fd
  std::uint32_t index = 0;  // which of the worker's listens on index_key this is
};

template <class Endpoint>
Endpoint endpoint_from_sockaddr(const std::string& bytes) {
  Endpoint ep;
  if (!bytes.empty() && bytes.size() <= ep.capacity()) {
    std::memcpy(ep.data(), bytes.data(), bytes.size());
    ep.resize(bytes.size());
  }
  return ep;
}

// A stream server: an acceptor (shared listener, adopted handle) or a queue of connections the
// master handed over (round robin).
template <class Protocol>
class stream_server final : public worker_server, public std::enable_shared_from_this<stream_server<Protocol>> {
 public:
  using socket_type = typename Protocol::socket;
  using acceptor_type = typename Protocol::acceptor;
  using endpoint_type = typename Protocol::endpoint;

  stream_server(asio::any_io_executor ex, server_host* host, std::optional<acceptor_type> acceptor,
                endpoint_type local)
      : ex_(ex),
        host_(host),
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

  bool deliver(any_socket& h, std::uint32_t seq, const std::string& remote) override {
    auto* socket = std::get_if<socket_type>(&h);
    if (!open_ || !socket || acceptor_) return false;
    handed_.push(incoming{std::move(*socket), seq, endpoint_from_sockaddr<endpoint_type>(remote)});
    return true;
  }

  void close(bool tell_host = true) override {
    if (!open_) return;
    open_ = false;
    std::error_code ignored;
    if (acceptor_) acceptor_->close(ignored);
    handed_.close(asio::error::operation_aborted);
    while (handed_.try_pop()) {  // the master has given them to other workers already
    }
    if (host_ && tell_host) host_->server_closed(*this);
  }

  // Any completion token; use_awaitable takes the path below instead (no trip through the
  // scheduler when a connection is queued).
  template <class Token>
  static auto async_accept(std::shared_ptr<stream_server> self, endpoint_type* peer, Token&& token) {
    return asio::async_initiate<Token, void(std::error_code, socket_type)>(
        [](auto handler, std::shared_ptr<stream_server> self, endpoint_type* peer) {
          if (self->acceptor_) {
            auto ex = self->connection_executor();
            if (peer) self->acceptor_->async_accept(ex, *peer, std::move(handler));
            else self->acceptor_->async_accept(ex, std::move(handler));
            return;
          }
          auto slot = asio::get_associated_cancellation_slot(handler);
          auto ex = asio::get_associated_executor(handler, self->ex_);
          auto& queue = self->handed_;
          queue.async_pop(asio::bind_cancellation_slot(
              slot, asio::bind_executor(ex, [self = std::move(self), peer, h = std::move(handler)](
                                                std::error_code ec, incoming in) mutable {
                // Closed after the pop: the master has given this connection to another worker.
                if (!ec && !self->open_) ec = asio::error::operation_aborted;
                if (ec) return std::move(h)(ec, socket_type(self->ex_));
                if (peer) *peer = in.remote;
                if (self->host_) self->host_->connection_accepted(self->id, in.seq);
                std::move(h)(ec, std::move(*in.socket));
              })));
        },
        token, std::move(self), peer);
  }

  static asio::awaitable<socket_type> accept(std::shared_ptr<stream_server> self, endpoint_type* peer) {
    if (self->acceptor_) {
      auto ex = self->connection_executor();
      if (peer) co_return co_await self->acceptor_->async_accept(ex, *peer, asio::use_awaitable);
      co_return co_await self->acceptor_->async_accept(ex, asio::use_awaitable);
    }
    incoming in = co_await pop_now_or_wait(self->handed_);
    if (!self->open_)  // closed while the completion was on its way: the master re-dispatched it
      throw std::system_error(asio::error::operation_aborted);
    if (peer) *peer = in.remote;
    if (self->host_) self->host_->connection_accepted(self->id, in.seq);
    co_return std::move(*in.socket);
  }

 private:
  // Adopted servers (no host) make plain sockets: the master never knew them.
  asio::any_io_executor connection_executor() const { return host_ ? host_->connection_executor() : ex_; }

  struct incoming {
    std::optional<socket_type> socket;  // optional: the queue wants a default value
    std::uint32_t seq = 0;
    endpoint_type remote;
  };

  asio::any_io_executor ex_;
  server_host* host_;
  std::optional<acceptor_type> acceptor_;
  async_queue<incoming> handed_;  // round robin: bounded by the master's window
  endpoint_type local_;
  bool open_ = true;
};

// A UDP socket: always a copy of the master's (or adopted).
class datagram_server final : public worker_server {
 public:
  datagram_server(server_host* host, asio::ip::udp::socket socket) : host_(host), socket_(std::move(socket)) {}
  ~datagram_server() override { close(); }

  asio::ip::udp::socket& socket() noexcept { return socket_; }
  bool is_open() const noexcept { return open_; }

  bool deliver(any_socket&, std::uint32_t, const std::string&) override { return false; }
  void close(bool tell_host = true) override {
    if (!open_) return;
    open_ = false;
    std::error_code ignored;
    socket_.close(ignored);
    if (host_ && tell_host) host_->server_closed(*this);
  }

 private:
  server_host* host_;
  asio::ip::udp::socket socket_;
  bool open_ = true;
};

// What both kinds of Server share: move-only ownership of the state, and closing it when
// closed, destroyed or assigned over.
template <class State>
class server_handle {
 public:
  explicit server_handle(std::shared_ptr<State> s) : s_(std::move(s)) {}
  server_handle(server_handle&&) noexcept = default;
  server_handle& operator=(server_handle&& other) noexcept {
    if (this != &other) {
      close();
      s_ = std::move(other.s_);
    }
    return *this;
  }
  ~server_handle() { close(); }

  bool is_open() const noexcept { return s_ && s_->is_open(); }
  // Node: server.close(). Tells the master.
  void close() {
    if (s_) s_->close();
  }

 protected:
  std::shared_ptr<State> s_;
};

}  // namespace detail

// A stream server (TCP or Unix). Move-only; closing or destroying it closes the server.
template <class Protocol>
class Server : public detail::server_handle<detail::stream_server<Protocol>> {
  using state = detail::stream_server<Protocol>;
  using detail::server_handle<state>::s_;

 public:
  using protocol_type = Protocol;
  using socket_type = typename Protocol::socket;
  using endpoint_type = typename Protocol::endpoint;

  explicit Server(std::shared_ptr<state> s) : detail::server_handle<state>(std::move(s)) {}

  // The next connection, as an ordinary Asio socket on the worker's executor. Fails with
  // asio::error::operation_aborted once the server is closed.
  template <class Token = asio::use_awaitable_t<>>
  auto accept(Token&& token = {}) {
    if constexpr (detail::is_use_awaitable<Token>) return state::accept(s_, nullptr);
    else return state::async_accept(s_, nullptr, std::forward<Token>(token));
  }
  // The same, and the peer's address (round robin: as the master's accept saw it).
  template <class Token = asio::use_awaitable_t<>>
  auto accept(endpoint_type& peer, Token&& token = {}) {
    if constexpr (detail::is_use_awaitable<Token>) return state::accept(s_, &peer);
    else return state::async_accept(s_, &peer, std::forward<Token>(token));
  }

  // Where the server listens (for listen(0): the port the master got).
  endpoint_type local_endpoint() const { return s_->local_endpoint(); }
  // True if the master hands connections over (RoundRobin), false if this worker accepts.
  // close(): pending accept()s fail with operation_aborted.
  bool round_robin() const noexcept { return s_ && s_->round_robin(); }
};

// A UDP server: the socket itself, shared with the other workers on the same address.
template <>
class Server<asio::ip::udp> : public detail::server_handle<detail::datagram_server> {
 public:
  using protocol_type = asio::ip::udp;
  using endpoint_type = asio::ip::udp::endpoint;

  explicit Server(std::shared_ptr<detail::datagram_server> s) : server_handle(std::move(s)) {}

  asio::ip::udp::socket& socket() noexcept { return s_->socket(); }
  endpoint_type local_endpoint() const { return s_->socket().local_endpoint(); }
};

}  // namespace cocluster
