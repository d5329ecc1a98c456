// The state behind a worker's Server<tcp> or Server<local::stream_protocol>: an acceptor (a
// copy of the master's listener under SharedSocket or ReusePort, or an adopted one) and a
// queue of the connections the master hands over (RoundRobin; ReusePort while the master
// drains the socket of a worker that left), and the one initiation of accept().
#pragma once

#include <asio/associated_cancellation_slot.hpp>
#include <asio/associated_executor.hpp>
#include <asio/async_result.hpp>
#include <asio/bind_cancellation_slot.hpp>
#include <asio/bind_executor.hpp>
#include <asio/error.hpp>
#include <asio/ip/tcp.hpp>
#include <asio/steady_timer.hpp>

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>

#include "cocluster/detail/async_queue.hpp"
#include "cocluster/detail/completion.hpp"
#include "cocluster/detail/rate_limited_log.hpp"
#include "cocluster/detail/syscalls.hpp"
#include "cocluster/detail/worker/connection_socket.hpp"
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
        local_(std::move(local)),
        // Shared with the other workers (SharedSocket): not an adopted one, and not a
        // ReusePort socket of our own (the kernel already hashed the connection to us). TCP
        // only: the gate must see the accept queue to stop waiting when it grows, and a Unix
        // listener does not tell its length (SIOCINQ is EINVAL there); gated without it, a
        // worker holding 200 connections would accept at most 1,000 a second.
        gated_(std::is_same_v<Protocol, asio::ip::tcp> && link_ && acceptor_ &&
               !reuse_port(acceptor_->native_handle())) {
    // accept4 is tried before anything waits on the socket: it must not block. (Asio's first
    // operation on it would set O_NONBLOCK too; an adopted socket or a passed one may be blocking.)
    std::error_code ignored;
    if (acceptor_) acceptor_->native_non_blocking(true, ignored);
  }

  ~stream_server() override { close(); }

  const asio::any_io_executor& executor() const noexcept { return ex_; }
  bool is_open() const noexcept { return open_; }
  const endpoint_type& local_endpoint() const noexcept { return local_; }
  bool round_robin() const noexcept { return !acceptor_; }

  delivery deliver(unique_fd fd, std::uint8_t tag, std::uint32_t seq, const std::string& remote) override {
    // (fd closes here; the master re-dispatches. After our channel stopped writing, nothing
    // can tell it the connection was taken: it goes to another worker once our end is read.)
    if (!open_ || !fd || (link_ && !link_->can_acknowledge())) return delivery::refused;
    std::error_code ec;
    if (tag != wire_tag<socket_type>()) return delivery::malformed;  // (fd closes here)
    // The socket is made on a tracked executor: the runtime counts it until it is gone.
    auto socket = adopt_connection<socket_type>(link_->connection_executor(), local_.protocol(), std::move(fd),
                                                connection_origin::handed_by_master, ec);
    if (!socket) return delivery::refused;
    handed_.push(incoming{std::move(*socket), seq, endpoint_from_sockaddr<endpoint_type>(remote)});
    // Accepts waiting on our own socket (or to try it again) end, and take it (ReusePort:
    // start_accept()).
    if (acceptor_ && accepts_waiting_ != 0) acceptor_->cancel(ec);
    if (retry_) retry_->cancel();
    return delivery::queued;
  }

  void close() override {
    if (!open_) return;
    open_ = false;
    std::error_code ignored;
    if (acceptor_) acceptor_->close(ignored);
    if (defer_) defer_->cancel();
    if (retry_) retry_->cancel();
    accept_log_.flush();
    handed_.close(asio::error::operation_aborted);
    while (handed_.try_pop()) {  // the master gives them to other workers when it reads close
    }
    if (link_) link_->closed(*this);
  }

  // Server::accept(): void(std::error_code, socket_type); `peer`, if given, is filled first.
  struct initiate_accept {
    template <class Handler>
    void operator()(Handler&& handler, std::shared_ptr<stream_server> self, endpoint_type* peer) const {
      // Every step of an accept touches the runtime's state, so each runs on the runtime's
      // executor; a handler of another executor (a strand, another thread's loop, use_future)
      // gets only the completion there.
      auto ex = self->ex_;
      run_on(ex, std::forward<Handler>(handler), [self = std::move(self), peer](auto h) mutable {
        stream_server& server = *self;
        server.initiate(std::move(self), peer, std::move(h));
      });
    }
  };

 private:
  // The accept itself, with a handler whose executor is ex_ (see initiate_accept).
  template <class Handler>
  void initiate(std::shared_ptr<stream_server> self, endpoint_type* peer, Handler h) {
    if (!open_) return complete_now(std::move(h), ex_, asio::error::operation_aborted, socket_type(ex_));
    if (acceptor_) {  // our own listening socket: accept4, onto a tracked executor
      const auto delay = accept_delay();
      if (delay.count() == 0) return start_accept(peer, std::move(h), /*initiating=*/true);
      // Busier than a worker should be: let an idle one win the next connection.
      deferring_ = true;
      if (!defer_) defer_.emplace(ex_);  // made when first needed
      defer_->expires_after(delay);
      return accept_after(*defer_, peer, std::move(h));
    }
    if (auto in = pop_handed()) {  // a connection is waiting: no trip through the scheduler
      socket_type socket = take(*in, peer);
      return complete_now(std::move(h), ex_, std::error_code{}, std::move(socket));
    }
    auto slot = asio::get_associated_cancellation_slot(h);
    handed_.async_pop(asio::bind_cancellation_slot(
        slot, asio::bind_executor(ex_, [self = std::move(self), peer, h = std::move(h)](std::error_code ec,
                                                                                         incoming in) mutable {
          // Closed after the pop: the master has given this connection to another worker.
          if (!ec && !self->open_) ec = asio::error::operation_aborted;
          if (ec) return std::move(h)(ec, socket_type(self->ex_));
          // Our channel stopped writing after the pop (only for a delivery that was posted:
          // deliver() checks first, and a waiting pop runs inside it): the connection is the
          // master's to give again (it closes here); wait for the next, as if it had not come.
          if (self->link_ && !self->link_->can_acknowledge()) return self->initiate(self, peer, std::move(h));
          socket_type socket = self->take(in, peer);
          std::move(h)(ec, std::move(socket));
        })));
  }

  struct incoming {
    std::optional<socket_type> socket;  // optional: the queue wants a default value
    std::uint32_t seq = 0;
    endpoint_type remote;
  };

  // The next handed-over connection, if one waits and can be taken: none once our channel
  // stopped writing (see deliver()), and those that waited are closed.
  std::optional<incoming> pop_handed() {
    if (link_ && !link_->can_acknowledge()) {
      while (handed_.try_pop()) {
      }
      return std::nullopt;
    }
    return handed_.try_pop();
  }

  // A handed-over connection leaves the queue for the user: tell the master it was taken.
  socket_type take(incoming& in, endpoint_type* peer) {
    if (peer) *peer = in.remote;
    if (link_) link_->accepted(id, in.seq);
    if (link_) link_->took_connection();
    return std::move(*in.socket);
  }

  // Load-aware accepting on a shared socket (Puma: wait_for_less_busy_worker). Every worker
  // is woken for a new connection and the one already running, i.e. the busiest, most often
  // wins: an accept is tried at once when it starts. Left alone, one of 8 workers took
  // half the connections (Jain 0.36). A worker with more than `busy_threshold` connections open
  // waits `defer_per_connection` per connection over it (at most `max_defer`) before it accepts
  // again, so an idle peer takes the next one; not when more than `queue_limit` connections
  // wait in the accept queue (nobody keeps up: there is no idle peer to wait for). One accept
  // waits at a time; another one started meanwhile accepts at once.
  static constexpr std::size_t busy_threshold = 4;
  static constexpr std::chrono::microseconds defer_per_connection{5};
  static constexpr std::chrono::microseconds max_defer{1000};
  static constexpr std::size_t queue_limit = 16;

  std::chrono::microseconds accept_delay() {
    if (!gated_ || deferring_) return {};
    const std::size_t open = link_->live_connections();
    if (open <= busy_threshold || waiting_connections() > queue_limit) return {};
    return std::min<std::chrono::microseconds>(max_defer, defer_per_connection * static_cast<long>(open - busy_threshold));
  }

  // Connections in the listening socket's accept queue (TCP_INFO of a listener: tcpi_unacked).
  std::size_t waiting_connections() {
    tcp_info info{};
    socklen_t len = sizeof info;
    if (::getsockopt(acceptor_->native_handle(), IPPROTO_TCP, TCP_INFO, &info, &len) != 0) return 0;
    return info.tcpi_unacked;
  }

  static bool reuse_port(int fd) {
    int on = 0;
    socklen_t len = sizeof on;
    return ::getsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &on, &len) == 0 && on != 0;
  }

  // Accepts on our own socket; a connection the master handed us meanwhile comes first. The
  // master hands a server with a socket of its own connections only while it drains the
  // socket of a ReusePort worker that left; deliver() then cancels the waiting accepts, and
  // each one that the user did not cancel takes a handed connection or starts again.
  //
  // The accept is our own accept4, tried at once (as Asio's accept is: under load a connection
  // is most often waiting), else again when the socket is readable. Asio's accept would give a
  // socket without close-on-exec (a child the worker starts would keep its connections open)
  // and one Asio must treat as blocking and as a possible dup, which costs two system calls
  // per connection (connection_socket.hpp). Called from the initiation (`initiating`) or from
  // the handler of a wait that ended.
  template <class Handler>
  void start_accept(endpoint_type* peer, Handler&& h, bool initiating = false) {
    if (auto in = pop_handed()) {  // (never, for an adopted server: the master hands it none)
      socket_type socket = take(*in, peer);
      return complete(std::forward<Handler>(h), initiating, std::error_code{}, std::move(socket));
    }
    std::error_code ec;
    if (auto socket = accept_here(peer, ec)) {
      // A connection accepted is one more taken (server_link::took_connection), as a hand-off is.
      if (link_) link_->took_connection();
      return complete(std::forward<Handler>(h), initiating, std::error_code{}, std::move(*socket));
    }
    if (out_of_resources(ec)) return retry_accept(ec, peer, std::forward<Handler>(h));
    if (ec) return complete(std::forward<Handler>(h), initiating, ec, socket_type(ex_));
    // None waiting. The wait gets no cancellation slot of the user's: the user's slot marks the
    // accept cancelled first, then cancels the wait (deliver() cancels it too).
    auto slot = asio::get_associated_cancellation_slot(h);
    user_cancel* cancel = slot.is_connected() ? &slot.template emplace<user_cancel>(user_cancel{this}) : nullptr;
    ++accepts_waiting_;
    acceptor_->async_wait(
        asio::socket_base::wait_read,
        asio::bind_executor(ex_, [self = this->shared_from_this(), peer, cancel,
                                  h = std::forward<Handler>(h)](std::error_code ec) mutable {
          --self->accepts_waiting_;
          const bool by_user = cancel && cancel->cancelled;
          if (cancel) asio::get_associated_cancellation_slot(h).clear();
          if (by_user || !self->open_) return std::move(h)(asio::error::operation_aborted, socket_type(self->ex_));
          if (ec && ec != asio::error::operation_aborted) return std::move(h)(ec, socket_type(self->ex_));
          self->start_accept(peer, std::move(h));  // readable, or woken: takes a handed connection or accepts
        }));
  }

  // One connection waiting on our own socket, as a socket on a tracked executor (adopted
  // servers: a plain one); `*peer` is its address. None (ec clear) when none is waiting. A
  // connection's own error (Linux passes pending network errors through accept) is skipped,
  // as Asio's accept skips ECONNABORTED, 64 times in a row at most.
  std::optional<socket_type> accept_here(endpoint_type* peer, std::error_code& ec) {
    // (A bound: an error that comes back on every call, EPERM from a seccomp filter, must not
    // spin the loop. After 64 in a row the last one is reported, as Asio's accept did.)
    for (int tries = 0; tries < 64; ++tries) {
      endpoint_type remote;
      socklen_t len = static_cast<socklen_t>(remote.capacity());
      unique_fd fd = accept_connection(acceptor_->native_handle(), remote.data(), &len, ec);
      if (!fd) {
        if (is_connection_error(ec)) continue;
        return std::nullopt;
      }
      auto socket = adopt_connection<socket_type>(connection_executor(), local_.protocol(), std::move(fd),
                                                  connection_origin::accepted_here, ec);
      if (socket && peer) {
        remote.resize(std::min<std::size_t>(len, remote.capacity()));
        *peer = remote;
      }
      return socket;
    }
    return std::nullopt;  // ec: the last connection error
  }

  // An initiation hands its result to complete_now (Asio's rule: it never runs the handler
  // itself); a wait's handler runs it.
  template <class Handler, class... Args>
  void complete(Handler&& h, bool initiating, Args&&... args) {
    if (initiating) return complete_now(std::forward<Handler>(h), ex_, std::forward<Args>(args)...);
    std::forward<Handler>(h)(std::forward<Args>(args)...);
  }

  // The user's cancellation of an accept: in the slot's own storage (no allocation per
  // accept), marked, then the Asio accept or the timer it waits on is cancelled; the other
  // accepts woken with it start again. Each wait holds the server, so `self` outlives it: the
  // wait's handler clears the slot first thing (a late cancellation then finds nothing), and
  // one that comes after the wait has ended but before its handler ran is still seen.
  struct user_cancel {
    stream_server* self;
    bool cancelled = false;
    void operator()(asio::cancellation_type) {
      cancelled = true;
      std::error_code ignored;
      if (self->acceptor_) self->acceptor_->cancel(ignored);
      if (self->defer_) self->defer_->cancel();
      if (self->retry_) self->retry_->cancel();
    }
  };

  // Waits on `timer` (the load-aware gate's defer_ or retry_, its expiry set), then accepts.
  // Woken early (another accept's cancellation, a handed connection, close()) it accepts now,
  // or completes with operation_aborted if the user cancelled or the server is closed.
  template <class Handler>
  void accept_after(asio::steady_timer& timer, endpoint_type* peer, Handler&& h) {
    auto slot = asio::get_associated_cancellation_slot(h);
    user_cancel* cancel = slot.is_connected() ? &slot.template emplace<user_cancel>(user_cancel{this}) : nullptr;
    const bool gate = &timer == (defer_ ? &*defer_ : nullptr);
    timer.async_wait(asio::bind_executor(
        ex_, [self = this->shared_from_this(), peer, cancel, gate, h = std::forward<Handler>(h)](std::error_code) mutable {
          if (gate) self->deferring_ = false;
          const bool by_user = cancel && cancel->cancelled;
          if (cancel) asio::get_associated_cancellation_slot(h).clear();
          if (by_user || !self->open_) return std::move(h)(asio::error::operation_aborted, socket_type(self->ex_));
          self->start_accept(peer, std::move(h));
        }));
  }

  // No fd or no memory for the next connection: transient, and not the caller's to handle.
  // accept() tries again after accept_retry_delay (the master's own accepting does the same,
  // as nginx does), saying so at most once a second; the connection waits in the backlog (for
  // another worker, under SharedSocket). Reported to the caller, it used to end the accept
  // loop of a server written as Node's ("an error: closed"), leaving the socket unserved.
  static constexpr std::chrono::milliseconds accept_retry_delay{100};
  // (Asio's errors are of its own system category, which std::errc does not match.)
  static bool out_of_resources(const std::error_code& ec) noexcept {
    if (ec.category() != asio::error::get_system_category() && ec.category() != std::system_category()) return false;
    const int e = ec.value();
    return e == EMFILE || e == ENFILE || e == ENOBUFS || e == ENOMEM;
  }

  template <class Handler>
  void retry_accept(const std::error_code& why, endpoint_type* peer, Handler&& h) {
    accept_log_.error("accept on {}: {}; trying again every {} ms", describe(local_), why.message(),
                      accept_retry_delay.count());
    if (!retry_) retry_.emplace(ex_);  // made when first needed
    // Accepts that fail while others wait join their wait (setting a new expiry would cancel
    // the waits already started); one that fails after the expiry, before the earlier waits'
    // handlers ran, sets the next one.
    if (retry_->expiry() <= asio::steady_timer::clock_type::now()) retry_->expires_after(accept_retry_delay);
    accept_after(*retry_, peer, std::forward<Handler>(h));
  }

  static std::string describe(const endpoint_type& e) {
    if constexpr (std::is_same_v<Protocol, asio::ip::tcp>) {
      return e.address().to_string() + ":" + std::to_string(e.port());
    } else {
      std::string path = e.path();
      if (!path.empty() && path[0] == '\0') path[0] = '@';  // an abstract socket, as ss shows it
      return path;
    }
  }

  // Adopted servers make plain sockets: the master never knew them.
  asio::any_io_executor connection_executor() const { return link_ ? link_->connection_executor() : ex_; }

  asio::any_io_executor ex_;
  server_link* link_;
  std::optional<acceptor_type> acceptor_;
  async_queue<incoming> handed_;  // bounded by the master's window
  std::size_t accepts_waiting_ = 0;  // accepts waiting for acceptor_ to be readable
  endpoint_type local_;
  std::optional<asio::steady_timer> defer_;  // a busy worker's pause before its next accept (made at the first)
  std::optional<asio::steady_timer> retry_;  // accepts waiting to try again after EMFILE & co (made at the first)
  rate_limited_log accept_log_;              // (no executor: no timer of it keeps the loop running)
  bool gated_;             // accepting on a socket shared with other workers
  bool deferring_ = false;  // an accept waits on defer_
  bool open_ = true;
};

}  // namespace cocluster::detail::worker
