// A worker's server (Node: the net.Server / dgram.Socket a worker listens on), as
// this_worker.listen() returns it. The same type whatever the master's policy:
//   auto server = co_await this_worker.listen(tcp::endpoint(tcp::v4(), 8080));
//   for (;;) { tcp::socket s = co_await server.accept();  co_spawn(ex, serve(std::move(s)), detached); }
// Under RoundRobin the master hands each connection over; under SharedSocket the server
// accepts on its copy of the listener. close() (or the destructor) tells the master.
#pragma once

#include "cocluster/detail/config.hpp"

#include <asio/async_result.hpp>
#include <asio/error.hpp>
#include <asio/ip/tcp.hpp>
#include <asio/ip/udp.hpp>
#include <asio/local/stream_protocol.hpp>
#include <asio/use_awaitable.hpp>

#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <system_error>
#include <type_traits>

#include "cocluster/detail/worker/datagram_server.hpp"
#include "cocluster/detail/worker/stream_server.hpp"

namespace cocluster {

// Node: the options of server.listen() that reach the master.
struct ListenOptions {
  int backlog = 511;  // Node's default
  // A Unix path's permission bits (0600, 0666, ...), set by the master right after it binds
  // the path and before it listens; unset: what the master's umask gives. Node has
  // readableAll/writableAll, which add read or write for everyone. The first worker to listen
  // on a path decides (the others share that listener).
  std::optional<unsigned> unix_mode{};
  // Ours (nginx: listen ... deferred; HAProxy: defer-accept; systemd: DeferAcceptSec=): a TCP
  // connection reaches accept() only once its first bytes have arrived. A worker (or, under
  // RoundRobin, the master) is woken once per connection instead of twice, and a client that
  // connects and says nothing is not accepted meanwhile. Linux rounds the time up to its SYN-ACK
  // retransmissions (30 s: 31 s); then it sends one more, and a client that acknowledges it is
  // passed on without data (one that does not is dropped). Only for protocols where the client
  // speaks first (HTTP, TLS): a server that greets first (SMTP, SSH) would wait out the timer.
  // 0 (the default): off. For TCP addresses the master binds; on a Unix path, a UDP address or
  // listen_fd() the listen() fails with EINVAL (a passed socket keeps its own; systemd's are
  // set in the .socket unit, and the master says so). The first worker to listen on an
  // address decides, as for backlog; the master logs a later one that asks otherwise.
  std::chrono::seconds defer_accept{0};
};

namespace detail::worker {

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
  // The state, for an operation that needs it: a Server whose listen() failed (an error_code
  // token gets one) or that was moved from has none, and says so instead of crashing.
  State& state_for(const char* operation) const {
    if (!s_)
      throw std::system_error(asio::error::bad_descriptor,
                              std::string("cocluster::Server::") + operation +
                                  ": the server is not listening (its listen() failed, or it was moved from)");
    return *s_;
  }

  std::shared_ptr<State> s_;
};

}  // namespace detail::worker

// A stream server (TCP or Unix). Move-only; closing or destroying it closes the server.
template <class Protocol>
class Server : public detail::worker::server_handle<detail::worker::stream_server<Protocol>> {
  using state = detail::worker::stream_server<Protocol>;
  using detail::worker::server_handle<state>::s_;

 public:
  using protocol_type = Protocol;
  using socket_type = typename Protocol::socket;
  using endpoint_type = typename Protocol::endpoint;
  using executor_type = asio::any_io_executor;

  explicit Server(std::shared_ptr<state> s) : detail::worker::server_handle<state>(std::move(s)) {}

  // The worker's executor, where accept() runs and connections are made.
  // (None, for a Server that is not listening.)
  executor_type get_executor() const noexcept { return s_ ? s_->executor() : executor_type(); }

  // Node: server.on('connection'). The next connection, as an ordinary Asio socket on the
  // worker's executor.
  //   Completion signature: void(std::error_code, socket_type).
  //   Errors: asio::error::operation_aborted once the server is closed (and for an accept
  //   whose connection was taken off the queue as it closed); on a socket of its own
  //   (SharedSocket, ReusePort, listen_fd), accept4's errors, except those of one connection
  //   (ECONNABORTED and the network errors Linux passes through accept: the next one is taken,
  //   and the 64th in a row is reported)
  //   and running out of fds or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM): then the accept logs
  //   it (at most once a second) and tries again every 100 ms, as the master's accepting does,
  //   until it has a connection.
  //   Cancellation: per-operation, terminal: the accept completes with operation_aborted (a
  //   connection the master hands over later waits for the next accept()). Emit it on the
  //   worker's executor (Asio's cancellation signals are not thread-safe).
  //   A Server that is not listening (its listen() failed, with an error_code token, or it was
  //   moved from) throws std::system_error (bad_descriptor) here, before anything starts.
  // The socket is close-on-exec (programs the worker runs do not hold it open) and
  // non-blocking. A connection already waiting (handed over, or in the socket's backlog)
  // completes a coroutine's accept() without a trip through the scheduler; other tokens get it
  // posted, as from any Asio operation. A handler with an executor of its own (a strand,
  // another thread's io_context, use_future) gets the completion there; the connection is
  // taken on the worker's executor all the same, even before that handler runs.
  template <class Token = asio::use_awaitable_t<>>
  auto accept(Token&& token = {}) {
    this->state_for("accept");  // (throws std::system_error, bad_descriptor, if it is not listening)
    return asio::async_initiate<Token, void(std::error_code, socket_type)>(typename state::initiate_accept{}, token,
                                                                            s_, static_cast<endpoint_type*>(nullptr));
  }
  // The same, and the peer's address (round robin: as the master's accept saw it), which
  // must outlive the operation.
  template <class Token = asio::use_awaitable_t<>>
  auto accept(endpoint_type& peer, Token&& token = {}) {
    this->state_for("accept");
    return asio::async_initiate<Token, void(std::error_code, socket_type)>(typename state::initiate_accept{}, token,
                                                                            s_, &peer);
  }

  // Where the server listens (for listen(0): the port the master got).
  endpoint_type local_endpoint() const { return this->state_for("local_endpoint").local_endpoint(); }
  // True if the master hands connections over (RoundRobin), false if this worker accepts.
  bool round_robin() const noexcept { return s_ && s_->round_robin(); }
};

// A UDP server: the socket itself, shared with the other workers on the same address.
template <>
class Server<asio::ip::udp> : public detail::worker::server_handle<detail::worker::datagram_server> {
 public:
  using protocol_type = asio::ip::udp;
  using endpoint_type = asio::ip::udp::endpoint;
  using executor_type = asio::any_io_executor;

  explicit Server(std::shared_ptr<detail::worker::datagram_server> s) : server_handle(std::move(s)) {}

  executor_type get_executor() const noexcept { return s_ ? s_->socket().get_executor() : executor_type(); }
  asio::ip::udp::socket& socket() { return state_for("socket").socket(); }
  endpoint_type local_endpoint() const { return state_for("local_endpoint").socket().local_endpoint(); }
};

}  // namespace cocluster
