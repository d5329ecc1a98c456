// The worker process's runtime (Node has the same singleton in its worker): the channel to
// the master, the inbox of its messages, the servers listening through it, and the worker's
// lifecycle from start() to the channel's end. this_worker (this_worker.hpp) is its face.
//   runtime::start(ex, options, max_unread, max_unread_bytes);   runtime& r = runtime::get();
#pragma once

#include <fcntl.h>

#include <asio/associated_cancellation_slot.hpp>
#include <asio/associated_executor.hpp>
#include <asio/bind_cancellation_slot.hpp>
#include <asio/bind_executor.hpp>
#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/steady_timer.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <functional>
#include <map>
#include <optional>
#include <stdexcept>

#include <fmt/core.h>

#include "cocluster/detail/async_latch.hpp"
#include "cocluster/detail/async_queue.hpp"
#include "cocluster/detail/log.hpp"
#include "cocluster/detail/parent_death.hpp"
#include "cocluster/detail/rate_limited_log.hpp"
#include "cocluster/detail/read_channel.hpp"
#include "cocluster/detail/worker/listen_target.hpp"
#include "cocluster/detail/worker/make_server.hpp"
#include "cocluster/detail/worker/master_signals.hpp"
#include "cocluster/detail/worker/server_link.hpp"
#include "cocluster/detail/worker_identity.hpp"
#include "cocluster/ipc/channel.hpp"
#include "cocluster/ipc/protocol.hpp"
#include "cocluster/server.hpp"
#include "cocluster/worker_state.hpp"

namespace cocluster::detail::worker {

// Where the channel to the master is. Each phase only ever follows the ones before it; the
// only way back is none.
enum class phase {
  connected,      // talking to the master
  disconnecting,  // leaving gracefully: servers closed, waiting for their connections to end
  shutting_down,  // our side of the channel closes once everything queued is written
  shut_down,      // ...and it has: the master reads our EOF after our last message
  closed,         // the channel has ended (the master closed it, died, or broke the protocol)
};

// Why this worker leaves, once it does (Node: exitedAfterDisconnect, and kill()'s exit).
enum class intent {
  none,        // not on purpose (yet): a channel that ends now is unexpected (on_disconnect)
  disconnect,  // disconnect(), or the master asked: end once the io_context runs dry
  exit,        // kill(): exit(0) as soon as our side of the channel is shut down (or gone)
};

class runtime {
 public:
  // The runtime, or nullptr before start() (and in the master).
  static runtime* find() noexcept { return current(); }
  // The runtime; throws when there is none: std::system_error(not_a_worker) in the master,
  // std::logic_error in a worker that has not called start().
  static runtime& get() {
    if (!current()) {
      if (!identity().is_worker)
        throw std::system_error(error::not_a_worker, "this_worker used in the master process");
      throw std::logic_error("cocluster: call this_worker.start(executor) before using this_worker");
    }
    return *current();
  }

  static void start(asio::any_io_executor ex, ipc::ChannelOptions options, std::size_t max_unread,
                    std::size_t max_unread_bytes) {
    if (!identity().is_worker) throw std::system_error(error::not_a_worker, "this_worker.start() in the master process");
    if (current()) throw std::logic_error("cocluster: this_worker.start() called twice");
    const int id = identity().id;
    const int fd = identity().channel_fd;
    if (id < 1 || fd < 0 || socket_option(fd, SO_TYPE) != SOCK_SEQPACKET)
      throw std::system_error(error::protocol_error, fmt::format("{}/{} do not name a cocluster channel",
                                                                 worker_id_variable, channel_fd_variable));
    // Programs this worker runs must not hold the master's channel open, nor think they are
    // workers (Node deletes NODE_UNIQUE_ID here).
    if (::fcntl(fd, F_SETFD, FD_CLOEXEC) != 0)
      throw std::system_error(errno, std::system_category(), "this_worker.start(): fcntl(FD_CLOEXEC) on the channel");
    forget_identity_in_environment();
    if (master_signals::adopt()) debug("Worker {}: SIGTERM/SIGINT from others than the master are left to it", id);
    // The master's death ends this worker through the channel's EOF (on_disconnect); the
    // kernel's parent-death signal becomes a backstop that waits for that path.
    if (!parent_death::arm()) debug("Worker {}: parent-death backstop unavailable; SIGTERM stays", id);
    std::atexit([] { exiting() = true; });
    // Never destroyed: the runtime lives as long as the process, like Node's.
    current() = new runtime(std::move(ex), id, unique_fd(fd), options, max_unread, max_unread_bytes);
    current()->run();
  }

  int id() const noexcept { return id_; }
  const asio::any_io_executor& executor() const noexcept { return channel_.get_executor(); }
  bool is_connected() const noexcept { return phase_ != phase::closed; }
  // True once the process is exiting: std::exit has been called (by the runtime or anyone).
  static bool is_exiting() noexcept { return exiting(); }
  WorkerState state() const noexcept { return state_; }
  // True once this worker leaves on purpose (disconnect(), kill(), or the master's request),
  // false once its channel ended otherwise, unset until then.
  std::optional<bool> exited_after_disconnect() const noexcept {
    if (intent_ != intent::none) return true;
    if (phase_ == phase::closed) return false;
    return std::nullopt;
  }
  ipc::Channel& channel() noexcept { return channel_; }
  async_queue<Message>& messages() noexcept { return messages_; }
  async_latch<>& disconnected() noexcept { return disconnected_; }
  void set_unexpected_disconnect_handler(std::function<void()> h) { on_unexpected_disconnect_ = std::move(h); }

  // Node: the worker's side of server.listen() (cluster._getServer): asks the master for the
  // listener of `t` and parks `handler` until the reply has made the server:
  // void(std::error_code, Server<Protocol>). Cancellable (terminal):
  // the handler completes with operation_aborted, and a server the reply makes later is
  // closed again.
  template <class Protocol, class Handler>
  void query_server(listen_target t, ListenOptions options, Handler&& handler) {
    using state = server_state<Protocol>;
    auto ex = asio::get_associated_executor(handler, executor());
    auto slot = asio::get_associated_cancellation_slot(handler);
    // The registry holds servers of every protocol: the parked handler takes the common base.
    pending_query p;
    p.handler = pending_handler<std::shared_ptr<server_base>>(
        asio::bind_cancellation_slot(
            slot, asio::bind_executor(ex, [h = std::decay_t<Handler>(std::forward<Handler>(handler))](
                                              std::error_code ec, std::shared_ptr<server_base> s) mutable {
              std::move(h)(ec, Server<Protocol>(std::static_pointer_cast<state>(std::move(s))));
            })),
        executor());
    p.make = [this](const ipc::protocol::QueryReply& r, std::uint8_t tag, unique_fd fd, std::error_code& ec) {
      return std::shared_ptr<server_base>(make_server<Protocol>(executor(), &link_, r, tag, std::move(fd), ec));
    };
    if (t.type == AddressType::unix_path && t.address.find('\0') != std::string::npos) {
      log_error("listen on an abstract Unix socket name: not supported, the master binds paths in the file system; "
                "listen() fails with EINVAL");
      return p.handler.complete(std::make_error_code(std::errc::invalid_argument), nullptr);
    }
    const bool tcp_address = t.fd < 0 && (t.type == AddressType::v4 || t.type == AddressType::v6);
    if (options.defer_accept.count() < 0 || (options.defer_accept.count() > 0 && !tcp_address)) {
      log_error("listen with defer_accept {} s: {}; listen() fails with EINVAL", options.defer_accept.count(),
                options.defer_accept.count() < 0 ? "a negative time"
                                                 : "only for a TCP address the master binds (not a Unix path, UDP "
                                                   "or listen_fd)");
      return p.handler.complete(std::make_error_code(std::errc::invalid_argument), nullptr);
    }
    p.index_key = fmt::format("{}:{}:{}:{}", t.address, t.port, to_string(t.type), t.fd);
    p.index = link_.take_index(p.index_key);
    p.describe = t.fd >= 0 ? fmt::format("listen on the master's fd {}", t.fd)
                 : t.type == AddressType::unix_path ? fmt::format("listen on {}", t.address)
                                                    : fmt::format("listen on {}:{}", t.address, t.port);
    ipc::protocol::QueryServer q;
    q.seq = ++last_query_;
    q.type = static_cast<std::uint8_t>(t.type);
    q.address = t.address;
    q.port = t.port;
    q.fd = t.fd;
    q.index = p.index;
    q.backlog = static_cast<std::uint32_t>(std::max(options.backlog, 1));
    if (options.unix_mode) q.unix_mode = static_cast<std::int32_t>(*options.unix_mode & 07777);
    q.defer_accept = static_cast<std::uint32_t>(std::min<std::int64_t>(options.defer_accept.count(), INT32_MAX));
    if (phase_ == phase::closed || intent_ != intent::none || !channel_.send_internal(ipc::protocol::encode(q))) {
      link_.release_index(p.index_key, p.index);
      return p.handler.complete(error::worker_not_connected, nullptr);
    }
    const std::uint32_t seq = q.seq;
    queries_.emplace(seq, std::move(p));
    if (slot.is_connected())
      slot.assign([this, seq](asio::cancellation_type) {
        // The entry stays, without a handler, so that a late success is closed again.
        if (auto it = queries_.find(seq); it != queries_.end() && it->second.handler)
          std::exchange(it->second.handler, {}).complete(asio::error::operation_aborted, nullptr);
      });
  }

  // Node: cluster.worker.disconnect() in the worker: tell the master we leave on purpose,
  // close every server, wait until their connections have ended, then close our side of the
  // channel once every queued message is written.
  void disconnect() {
    if (phase_ == phase::closed || intent_ != intent::none) return;
    send_internal(ipc::protocol::ExitedAfterDisconnect{});
    leave(intent::disconnect);
  }

  // Ours: this worker has warmed up and serves (the master's Settings::ready_on decides
  // whether its first listening server already counted). Once; later calls do nothing.
  // error::worker_not_connected once the channel is gone or the worker is leaving.
  void ready(std::error_code& ec) {
    ec.clear();
    if (phase_ != phase::connected || intent_ != intent::none) {
      ec = error::worker_not_connected;
      return;
    }
    if (ready_sent_) return;
    ready_sent_ = true;
    send_internal(ipc::protocol::Ready{});
  }

  // Node: cluster.worker.kill() / destroy() in the worker: tell the master we leave on
  // purpose, and exit with 0 once that is written, without waiting for servers.
  void kill() {
    if (intent_ == intent::none && phase_ < phase::shutting_down) send_internal(ipc::protocol::ExitedAfterDisconnect{});
    leave(intent::exit);
  }

  // Node: process.disconnect() in a worker: the channel closes once what is queued is written,
  // without the graceful disconnect (servers and connections are not waited for). The master
  // sees a disconnect that was not asked for; this worker then takes the unexpected path
  // (on_disconnect(), by default exit(0)), as Node's worker exits at once.
  void close_channel() {
    if (phase_ >= phase::shutting_down) return;
    debug("Worker {} closes its channel", id_);
    enter(phase::shutting_down);
  }

 private:
  struct pending_query {
    pending_handler<std::shared_ptr<server_base>> handler;  // empty once the listen() was cancelled
    std::function<std::shared_ptr<server_base>(const ipc::protocol::QueryReply&, std::uint8_t, unique_fd,
                                               std::error_code&)>
        make;
    std::string index_key;
    std::uint32_t index = 0;
    std::string describe;  // "listen on 0.0.0.0:80", for the log
  };

  static std::atomic<bool>& exiting() {
    static std::atomic<bool> flag{false};
    return flag;
  }

  [[noreturn]] static void exit_process(int code) {
    exiting() = true;
    std::exit(code);
  }

  static runtime*& current() {
    static runtime* r = nullptr;
    return r;
  }

  runtime(asio::any_io_executor ex, int id, unique_fd fd, ipc::ChannelOptions options, std::size_t max_unread,
          std::size_t max_unread_bytes)
      : id_(id),
        channel_(ex, std::move(fd), options),
        messages_(ex, async_queue<Message>::unbounded, /*inline_delivery=*/true),
        disconnected_(ex),
        link_(channel_) {
    bound_inbox(messages_, max_unread, max_unread_bytes);
  }

  void run() {
    state_ = WorkerState::online;
    send_internal(ipc::protocol::Online{});
    asio::co_spawn(channel_.get_executor(), read_loop(), asio::detached);
  }

  // The acks of this loop turn go first (server_link::flush_acks).
  void send_internal(ipc::protocol::InternalMessage m) {
    link_.flush_acks();
    channel_.send_internal(ipc::protocol::encode(m));
  }

  // disconnect(), kill() and the master's disconnect: this worker now leaves on purpose.
  void leave(intent why) {
    if (why == intent::exit) {
      intent_ = intent::exit;
      if (phase_ >= phase::shut_down) exit_process(0);  // nothing of ours is left to write
      if (phase_ == phase::shutting_down) return;       // exits once it is shut down
      link_.close_servers();
      return enter(phase::shutting_down);  // without waiting for connections
    }
    if (intent_ != intent::none) return;
    intent_ = why;
    if (phase_ == phase::connected) enter(phase::disconnecting);
  }

  // Every change of phase, and what it sets off.
  void enter(phase next) {
    phase_ = next;
    switch (next) {
      case phase::connected:
        break;
      case phase::disconnecting:
        // Node: a disconnecting worker closes its servers (the master re-dispatches what it
        // handed over and not yet accepted), waits until their connections have ended, then
        // closes its side of the channel once every message is written. Messages flow meanwhile.
        link_.close_servers();
        if (link_.live_connections() == 0) return enter(phase::shutting_down);
        debug("Worker {} disconnecting: waiting for {} connections to end", id_, link_.live_connections());
        link_.async_wait_no_connections([this](std::error_code ec) {
          if (!ec && phase_ == phase::disconnecting) enter(phase::shutting_down);
        });
        break;
      case phase::shutting_down:
        if (heartbeat_timer_) heartbeat_timer_->cancel();
        link_.flush_acks();  // the master reads them before our end
        channel_.async_shutdown([this](std::error_code) {
          if (phase_ == phase::shutting_down) enter(phase::shut_down);
        });
        break;
      case phase::shut_down:
        if (intent_ == intent::exit) exit_process(0);  // Node: a worker's kill() exits with 0
        break;
      case phase::closed:
        state_ = WorkerState::disconnected;
        if (heartbeat_timer_) heartbeat_timer_->cancel();
        link_.flush_acks();  // our write side may still be open: the master reads them before our end
        channel_.close();
        link_.close_servers();  // nothing more will be handed over; the master is gone or let us go
        link_.stop();
        fail_queries();
        messages_.close(error::worker_not_connected);
        disconnected_.set();
        if (intent_ == intent::exit) exit_process(0);
        if (intent_ == intent::disconnect) break;
        // Node: a worker whose channel closes without a disconnect exits with 0 (the master died).
        debug("Worker {} lost its channel; exiting", id_);
        if (on_unexpected_disconnect_) on_unexpected_disconnect_();
        else exit_process(0);
        break;
    }
  }

  // Settings::heartbeat_timeout in the master: a Heartbeat every `interval` from a timer on
  // this worker's event loop, so that it stops when the loop stops turning. It stops once our
  // side of the channel shuts down (a pending timer would keep the io_context from running
  // dry, which a disconnected worker waits for).
  void start_heartbeat(std::chrono::milliseconds interval) {
    if (interval.count() == 0) return;
    heartbeat_interval_ = interval;
    if (!heartbeat_timer_) heartbeat_timer_.emplace(executor());
    send_beat();  // the first at once: the master's clock starts when our loop turns
    beat();
  }

  void beat() {
    heartbeat_timer_->expires_after(heartbeat_interval_);
    heartbeat_timer_->async_wait([this](std::error_code ec) {
      if (ec || phase_ >= phase::shutting_down) return;
      send_beat();
      beat();
    });
  }

  // One beat waiting to be written is enough: while the master does not read us, more would
  // pile up in the send queue (and past its backlog bound we would stop reading the master).
  void send_beat() {
    if (channel_.written_total() < last_beat_) return;
    send_internal(ipc::protocol::Heartbeat{});
    last_beat_ = channel_.queued_total();
  }

  void fail_queries() {
    auto queries = std::move(queries_);
    queries_.clear();
    for (auto& [seq, q] : queries)
      if (q.handler) q.handler.complete(error::worker_not_connected, nullptr);
  }

  bool on_internal(ipc::Envelope& envelope) {
    namespace p = ipc::protocol;
    auto m = p::decode(envelope.message.data);
    const bool handle_allowed = m && (std::holds_alternative<p::QueryReply>(*m) || std::holds_alternative<p::NewConn>(*m) ||
                                      std::holds_alternative<p::NewConnBatch>(*m));
    const bool batch = m && std::holds_alternative<p::NewConnBatch>(*m);
    const std::size_t lost = envelope.internal_fds_lost;
    if (!m || ((envelope.internal_fd || envelope.message.has_handle() || lost != 0) && !handle_allowed) ||
        ((!envelope.internal_extra_fds.empty() || (envelope.internal_fd ? 1 : 0) + lost > 1) && !batch)) {
      log_error("unexpected internal message from the master; closing the channel");
      return false;
    }
    // Fds the kernel could not give us (no fd left under RLIMIT_NOFILE): a hand-off that lost
    // its fd is refused, so that the master gives it to another worker, and a listen's reply
    // fails that listen with EMFILE; the channel goes on (a worker with all its fds in use
    // keeps serving what it holds).
    if (lost != 0) lost_fds_log_.error("{} fd(s) the master sent were lost: no fd left (RLIMIT_NOFILE); {}", lost,
                                       std::holds_alternative<p::QueryReply>(*m) ? "the listen fails with EMFILE"
                                                                                : "refused, the master gives the connection(s) to other workers");
    if (auto* reply = std::get_if<p::QueryReply>(&*m)) {
      on_query_reply(*reply, envelope.internal_tag, std::move(envelope.internal_fd), lost != 0);
    } else if (auto* conn = std::get_if<p::NewConn>(&*m)) {
      auto server = link_.find(conn->server);
      const delivery d = server ? server->deliver(std::move(envelope.internal_fd), envelope.internal_tag, conn->seq,
                                                  conn->remote)
                                : delivery::refused;
      if (d == delivery::malformed) {
        log_error("a connection from the master is not of its server's kind; closing the channel");
        return false;
      }
      if (d == delivery::refused)  // the master gives it to another worker; its fd is closed
        link_.refused(conn->server, conn->seq);
    } else if (auto* conns = std::get_if<p::NewConnBatch>(&*m)) {
      // One fd per connection, in order: a count that does not match is the master's bug.
      const std::size_t n = conns->seqs.size();
      const std::size_t received = (envelope.internal_fd ? 1 : 0) + envelope.internal_extra_fds.size();
      if (n < 2 || conns->remotes.size() != n || received + lost != n || (!envelope.internal_fd && received != 0)) {
        log_error("a batch of connections from the master does not match its fds; closing the channel");
        return false;
      }
      auto server = link_.find(conns->server);
      // A waiting accept() runs its handler as the connection is delivered: one that throws
      // (on a strand, whose dispatch lets it through; an io_context's executor keeps it for
      // run()) must not strand the rest of the batch (their fds would close here while the
      // master keeps its copies, unanswered). Each is delivered; the first exception goes on
      // from here, any other leaves run() after it, as each would from its own completion.
      std::exception_ptr thrown;
      for (std::size_t i = 0; i < n; ++i) {
        unique_fd fd = i >= received ? unique_fd()  // lost: refused below
                       : i == 0      ? std::move(envelope.internal_fd)
                                     : std::move(envelope.internal_extra_fds[i - 1]);
        delivery d = delivery::queued;
        try {
          d = server ? server->deliver(std::move(fd), envelope.internal_tag, conns->seqs[i], conns->remotes[i])
                     : delivery::refused;
        } catch (...) {  // from the user's handler: the connection was taken
          if (!thrown) thrown = std::current_exception();
          else rethrow_from_run(executor(), std::current_exception());
        }
        if (d == delivery::malformed) {
          log_error("a connection from the master is not of its server's kind; closing the channel");
          if (thrown) rethrow_from_run(executor(), thrown);
          return false;
        }
        if (d == delivery::refused) link_.refused(conns->server, conns->seqs[i]);
      }
      if (thrown) std::rethrow_exception(thrown);
    } else if (std::holds_alternative<p::CountConnections>(*m)) {
      link_.report_connections();
    } else if (auto* beat = std::get_if<p::HeartbeatRequest>(&*m)) {
      start_heartbeat(std::chrono::milliseconds(beat->interval_ms));
    } else if (std::holds_alternative<p::Disconnect>(*m)) {
      debug("Worker {} disconnect requested by the master", id_);
      leave(intent::disconnect);
    } else {
      log_error("unexpected internal message from the master; closing the channel");
      return false;
    }
    return true;
  }

  void on_query_reply(const ipc::protocol::QueryReply& r, std::uint8_t tag, unique_fd fd, bool fd_lost) {
    auto it = queries_.find(r.seq);
    if (it == queries_.end()) return;  // not ours: ignored, as Node ignores stray replies
    pending_query q = std::move(it->second);
    queries_.erase(it);
    std::error_code ec;
    std::shared_ptr<server_base> server;
    if (r.errno_value != 0) ec.assign(r.errno_value, std::system_category());
    else if (intent_ != intent::none) ec = error::worker_not_connected;  // its servers are closed already
    else if (fd_lost) ec = std::make_error_code(std::errc::too_many_files_open);
    else server = q.make(r, tag, std::move(fd), ec);
    if (!server || !q.handler) {  // failed, or the listen() was cancelled meanwhile
      if (r.errno_value == 0) send_internal(ipc::protocol::Close{r.server});
      link_.release_index(q.index_key, q.index);
      if (ec) debug("Worker {}: {} failed: {}", id_, q.describe, ec.message());
      if (q.handler) q.handler.complete(ec, nullptr);
      return;
    }
    // Registered now, before the next message: a newconn may follow the reply at once.
    server->id = r.server;
    server->index_key = std::move(q.index_key);
    server->index = q.index;
    link_.add(server);
    state_ = WorkerState::listening;
    send_internal(ipc::protocol::Listening{r.server});
    q.handler.complete({}, std::move(server));
  }

  asio::awaitable<void> read_loop() {
    const std::error_code end = co_await read_channel(
        channel_, messages_, "the master", [this](ipc::Envelope& e) { return on_internal(e); }, [] {},
        [this](bool paused) {
          if (paused)
            debug("Worker {}: {} unread messages ({} bytes); reading paused", id_, messages_.size(), messages_.weight());
        });
    parent_death::stand_down();  // whatever the master did, the orderly path runs from here
    if (end != asio::error::eof && end != error::channel_closed)
      log_error("worker {}: channel to the master failed: {} ({})", id_, end.message(), channel_.error_detail());
    else debug("Worker {}: channel ended ({})", id_, end.message());
    enter(phase::closed);
  }

  int id_;
  ipc::Channel channel_;
  async_queue<Message> messages_;
  async_latch<> disconnected_;
  server_link link_;
  phase phase_ = phase::connected;
  intent intent_ = intent::none;
  WorkerState state_ = WorkerState::none;
  std::function<void()> on_unexpected_disconnect_;
  std::uint32_t last_query_ = 0;
  bool ready_sent_ = false;
  std::map<std::uint32_t, pending_query> queries_;  // by seq
  std::optional<asio::steady_timer> heartbeat_timer_;  // while the master asks for a heartbeat
  std::chrono::milliseconds heartbeat_interval_{0};
  std::uint64_t last_beat_ = 0;  // channel_.queued_total() after the last beat was queued
  // Fds lost to RLIMIT_NOFILE: a line a second at most. No executor: its count of lines left
  // out goes with the next line or at exit, and no timer of it keeps the loop running.
  rate_limited_log lost_fds_log_;
};

}  // namespace cocluster::detail::worker
