// The worker process's side (Node: cluster.worker, process.send, process.on('message')).
//   if (cocluster::is_worker()) {
//     cocluster::this_worker.start(io.get_executor());          // announces `online`
//     co_spawn(io, [&]() -> awaitable<void> {
//       for (;;) { Message m = co_await this_worker.receive();  co_await this_worker.send(std::move(m)); }
//     }, detached);
//   }
// When the channel to the master closes unexpectedly (the master died, or either side closed
// the channel itself), the worker exits with code 0 unless on_disconnect() installed another
// handler. A disconnect the master asked for (or this_worker.disconnect()) instead lets the
// process end once its io_context runs dry.
#pragma once

#include <fcntl.h>
#include <sys/un.h>

#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/use_awaitable.hpp>

#include <atomic>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <map>
#include <set>
#include <stdexcept>
#include <string_view>

#include <fmt/core.h>

#include "cocluster/detail/async_latch.hpp"
#include "cocluster/detail/async_queue.hpp"
#include "cocluster/detail/log.hpp"
#include "cocluster/detail/parent_death.hpp"
#include "cocluster/detail/read_channel.hpp"
#include "cocluster/detail/spawn.hpp"
#include "cocluster/detail/tracked_executor.hpp"
#include "cocluster/detail/worker_identity.hpp"
#include "cocluster/ipc/channel.hpp"
#include "cocluster/ipc/protocol.hpp"
#include "cocluster/server.hpp"
#include "cocluster/worker_state.hpp"

namespace cocluster {

// Node: cluster.isWorker / cluster.isMaster, from NODE_UNIQUE_ID; ours is COCLUSTER_WORKER_ID,
// read at the first call and kept after start() removes it from the environment.
inline bool is_worker() noexcept { return detail::identity().is_worker; }
inline bool is_master() noexcept { return !is_worker(); }

namespace detail {

// What listen() asks the master for (the fields of query_server that name a listener).
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

template <class Protocol>
constexpr AddressType fd_address_type() {  // for listen_fd: the family comes from the fd
  if constexpr (std::is_same_v<Protocol, asio::local::stream_protocol>) return AddressType::unix_path;
  else if constexpr (std::is_same_v<Protocol, asio::ip::udp>) return AddressType::udp4;
  else return AddressType::v4;
}

// `path` as an endpoint: itself if it fits sun_path, else relative to our cwd (the master bound
// the same shorter form), else an empty endpoint: where the server is stays in the master's
// Address. Never throws (Asio's constructor does for a long path).
inline asio::local::stream_protocol::endpoint unix_endpoint(const std::string& path) {
  constexpr std::size_t limit = sizeof(sockaddr_un{}.sun_path);
  if (path.size() < limit) return {path};
  std::error_code ec;
  auto relative = std::filesystem::path(path).lexically_relative(std::filesystem::current_path(ec)).string();
  if (!ec && !relative.empty() && relative.size() < limit) return {relative};
  return {};
}

// Builds the worker's server from the master's reply; the state type depends on the protocol.
template <class Protocol>
std::shared_ptr<worker_server> make_server(const asio::any_io_executor& ex, server_host* host,
                                           const ipc::protocol::QueryReply& r, any_socket& handle, std::error_code& ec) {
  ec.clear();
  if constexpr (std::is_same_v<Protocol, asio::ip::udp>) {
    auto* socket = std::get_if<asio::ip::udp::socket>(&handle);
    if (!socket) {
      ec = error::protocol_error;
      return nullptr;
    }
    return std::make_shared<datagram_server>(host, std::move(*socket));
  } else {
    using acceptor_type = typename Protocol::acceptor;
    using endpoint_type = typename Protocol::endpoint;
    if (r.shared) {
      auto* acceptor = std::get_if<acceptor_type>(&handle);
      if (!acceptor) {
        ec = error::protocol_error;
        return nullptr;
      }
      endpoint_type local = acceptor->local_endpoint(ec);
      if (ec) return nullptr;
      return std::make_shared<stream_server<Protocol>>(ex, host, std::move(*acceptor), local);
    }
    endpoint_type local;
    if constexpr (std::is_same_v<Protocol, asio::local::stream_protocol>) {
      local = unix_endpoint(r.address);
    } else {
      auto address = asio::ip::make_address(r.address, ec);
      if (ec) return nullptr;
      local = endpoint_type(address, r.port);
    }
    return std::make_shared<stream_server<Protocol>>(ex, host, std::nullopt, local);
  }
}

// The one per-process worker runtime (Node has the same singleton in its worker).
class worker_runtime final : public server_host {
 public:
  static worker_runtime* instance(bool required = true) {
    if (!current() && required) {
      if (!is_worker())
        throw std::system_error(error::not_a_worker, "this_worker used in the master process");
      throw std::logic_error("cocluster: call this_worker.start(executor) before using this_worker");
    }
    return current();
  }

  static void start(asio::any_io_executor ex, ipc::ChannelOptions options, std::size_t max_unread) {
    if (!is_worker()) throw std::system_error(error::not_a_worker, "this_worker.start() in the master process");
    if (current()) throw std::logic_error("cocluster: this_worker.start() called twice");
    const int id = identity().id;
    const int fd = identity().channel_fd;
    if (id < 1 || fd < 0 || socket_option(fd, SO_TYPE) != SOCK_SEQPACKET)
      throw std::system_error(error::protocol_error, fmt::format("{}/{} do not name a cocluster channel",
                                                                 worker_id_variable, channel_fd_variable));
    // Programs this worker runs must not hold the master's channel open, nor think they are
    // workers (Node deletes NODE_UNIQUE_ID here).
    ::fcntl(fd, F_SETFD, FD_CLOEXEC);
    forget_identity_in_environment();
    // The master's death ends this worker through the channel's EOF (on_disconnect); the
    // kernel's parent-death signal becomes a backstop that waits for that path.
    if (!parent_death::arm()) debug("Worker {}: parent-death backstop unavailable; SIGTERM stays", id);
    std::atexit([] { exiting() = true; });
    // Never destroyed: the runtime lives as long as the process, like Node's.
    current() = new worker_runtime(std::move(ex), id, unique_fd(fd), options, max_unread);
    current()->run();
  }

  int id() const noexcept { return id_; }
  bool is_connected() const noexcept { return connected_; }
  // True once the process is exiting: std::exit has been called (by the runtime or anyone).
  static bool is_exiting() noexcept { return exiting(); }
  WorkerState state() const noexcept { return state_; }
  // True once this worker leaves on purpose (disconnect(), kill(), or the master's request),
  // false once its channel ended otherwise, unset until then.
  std::optional<bool> exited_after_disconnect() const noexcept {
    if (disconnecting_) return true;
    if (!connected_) return false;
    return std::nullopt;
  }
  ipc::Channel& channel() noexcept { return channel_; }
  async_queue<Message>& messages() noexcept { return messages_; }
  async_latch<>& disconnected() noexcept { return disconnected_; }
  void set_unexpected_disconnect_handler(std::function<void()> h) { on_unexpected_disconnect_ = std::move(h); }

  // server_host: the user's accept() took a handed-over connection.
  void connection_accepted(std::uint32_t server, std::uint32_t seq) override {
    if (connected_) channel_.post_internal(ipc::protocol::encode(ipc::protocol::Accepted{server, seq, true}));
  }

  // server_host: every connection's socket holds a token; a disconnect waits for the last.
  asio::any_io_executor connection_executor() override {
    ++live_connections_;
    return tracked_executor(channel_.get_executor(), std::make_shared<connection_token>(this));
  }

  // server_host: the server is closed (by the user, its destructor, or a disconnect).
  void server_closed(worker_server& server) override {
    if (server.id == 0) return;  // adopted: the master never knew it
    servers_.erase(server.id);
    release_index(server.index_key, server.index);
    if (connected_ && !shut_down_) channel_.post_internal(ipc::protocol::encode(ipc::protocol::Close{server.id}));
  }

  // Node: the worker's side of server.listen() (cluster._getServer): asks the master for the
  // listener of `t`, and makes the server from its answer.
  template <class Protocol>
  asio::awaitable<std::shared_ptr<worker_server>> listen(listen_target t, ListenOptions options) {
    const std::string index_key = fmt::format("{}:{}:{}:{}", t.address, t.port, to_string(t.type), t.fd);
    auto& indexes = indexes_[index_key];
    const std::uint32_t index = indexes.next++;
    indexes.open.insert(index);
    ipc::protocol::QueryServer q;
    q.seq = ++last_query_;
    q.type = static_cast<std::uint8_t>(t.type);
    q.address = t.address;
    q.port = t.port;
    q.fd = t.fd;
    q.index = index;
    q.backlog = static_cast<std::uint32_t>(std::max(options.backlog, 1));
    pending_query pending;
    pending.index_key = index_key;
    pending.index = index;
    pending.describe = t.fd >= 0 ? fmt::format("listen on the master's fd {}", t.fd)
                       : t.type == AddressType::unix_path ? fmt::format("listen on {}", t.address)
                                                          : fmt::format("listen on {}:{}", t.address, t.port);
    pending.make = [this](const ipc::protocol::QueryReply& r, any_socket& h, std::error_code& ec) {
      return make_server<Protocol>(channel_.get_executor(), this, r, h, ec);
    };
    const std::string describe = pending.describe;
    auto [ec, server] = co_await asio::async_initiate<const as_tuple_t&,
                                                      void(std::error_code, std::shared_ptr<worker_server>)>(
        [this](auto handler, ipc::protocol::QueryServer q, pending_query p) {
          p.handler = pending_handler<std::shared_ptr<worker_server>>(std::move(handler), channel_.get_executor());
          if (!connected_ || disconnecting_ || !channel_.post_internal(ipc::protocol::encode(q))) {
            release_index(p.index_key, p.index);
            return p.handler.complete(error::worker_not_connected, nullptr);
          }
          const std::uint32_t seq = q.seq;
          auto slot = p.handler.cancellation_slot();
          queries_.emplace(seq, std::move(p));
          if (slot.is_connected())
            slot.assign([this, seq](asio::cancellation_type) {
              // The entry stays, without a handler, so that a late success is closed again.
              if (auto it = queries_.find(seq); it != queries_.end() && it->second.handler)
                std::exchange(it->second.handler, {}).complete(asio::error::operation_aborted, nullptr);
            });
        },
        as_tuple_t{}, std::move(q), std::move(pending));
    if (ec) throw std::system_error(ec, describe);
    co_return server;
  }

  // Node: cluster.worker.disconnect() in the worker: tell the master we leave on purpose,
  // close every server, wait until their connections have ended, then close our side of the
  // channel once every queued message is written.
  void disconnect() {
    if (!connected_ || disconnecting_) return;
    send_internal(ipc::protocol::ExitedAfterDisconnect{});
    begin_disconnect();
  }

  // Node: cluster.worker.kill() / destroy() in the worker: tell the master we leave on
  // purpose, and exit with 0 once that is written, without waiting for servers.
  void kill() {
    if (!connected_ || shut_down_done_) exit_process(0);  // nothing of ours is left to write
    if (shut_down_) {
      exit_when_shut_down_ = true;  // the channel is already closing: exit when it has
      return;
    }
    if (!disconnecting_) send_internal(ipc::protocol::ExitedAfterDisconnect{});
    disconnecting_ = true;
    exit_when_shut_down_ = true;
    close_servers();
    shut_down_channel();
  }

  // Node: process.disconnect() in a worker: the channel closes once what is queued is written,
  // without the graceful disconnect (servers and connections are not waited for). The master
  // sees a disconnect that was not asked for; this worker then takes the unexpected path
  // (on_disconnect(), by default exit(0)), as Node's worker exits at once.
  void close_channel() {
    if (!connected_ || shut_down_) return;
    debug("Worker {} closes its channel", id_);
    shut_down_channel();
  }

 private:
  using as_tuple_t = asio::experimental::as_tuple_t<asio::use_awaitable_t<>>;

  static std::atomic<bool>& exiting() {
    static std::atomic<bool> flag{false};
    return flag;
  }

  [[noreturn]] static void exit_process(int code) {
    exiting() = true;
    std::exit(code);
  }

  static worker_runtime*& current() {
    static worker_runtime* runtime = nullptr;
    return runtime;
  }

  // Held by every copy of a connection socket's executor (detail::tracked_executor). The
  // last copy may go on any thread (with a strand over a thread pool, Asio drops an operation's
  // executor where the operation completed) or inside Asio's cleanup of an operation: the count
  // is only ever touched on the runtime's executor.
  struct connection_token {
    explicit connection_token(worker_runtime* r) : runtime(r) {}
    ~connection_token() {
      try {
        asio::post(runtime->channel_.get_executor(), [r = runtime] { r->connection_ended(); });
      } catch (...) {  // out of memory: count it here rather than never
        runtime->connection_ended();
      }
    }
    worker_runtime* runtime;  // never destroyed
  };

  worker_runtime(asio::any_io_executor ex, int id, unique_fd fd, ipc::ChannelOptions options, std::size_t max_unread)
      : id_(id),
        channel_(ex, std::move(fd), options),
        messages_(ex, std::max<std::size_t>(max_unread, 1), /*inline_delivery=*/true),
        disconnected_(ex) {}

  void run() {
    state_ = WorkerState::online;
    send_internal(ipc::protocol::Online{});
    asio::co_spawn(channel_.get_executor(), read_loop(), asio::detached);
  }

  struct pending_query {
    pending_handler<std::shared_ptr<worker_server>> handler;  // empty once the listen() was cancelled
    std::function<std::shared_ptr<worker_server>(const ipc::protocol::QueryReply&, any_socket&, std::error_code&)> make;
    std::string index_key;
    std::uint32_t index = 0;
    std::string describe;  // "listen on 0.0.0.0:80", for the error
  };

  struct index_set {  // Node: the indexes map of lib/internal/cluster/child.js
    std::uint32_t next = 0;
    std::set<std::uint32_t> open;
  };

  void send_internal(ipc::protocol::InternalMessage m) { channel_.post_internal(ipc::protocol::encode(m)); }

  void release_index(const std::string& key, std::uint32_t index) {
    auto it = indexes_.find(key);
    if (it == indexes_.end()) return;
    it->second.open.erase(index);
    if (it->second.open.empty()) indexes_.erase(it);  // the next listen on the key is index 0 again
  }

  // Node: a disconnecting worker closes its servers (the master re-dispatches what it handed
  // over and not yet accepted), waits until their connections have ended, then closes its side
  // of the channel once every message is written. Until then messages flow both ways.
  void begin_disconnect() {
    disconnecting_ = true;
    close_servers();
    if (live_connections_ == 0) shut_down_channel();
    else debug("Worker {} disconnecting: waiting for {} connections to end", id_, live_connections_);
  }

  void connection_ended() {
    --live_connections_;
    if (live_connections_ == 0 && disconnecting_ && !shut_down_ && connected_) shut_down_channel();
  }

  void shut_down_channel() {
    shut_down_ = true;
    channel_.async_shutdown([this](std::error_code) {
      shut_down_done_ = true;
      if (exit_when_shut_down_) exit_process(0);  // Node: a worker's kill() exits with 0
    });
  }

  void close_servers() {
    std::vector<std::shared_ptr<worker_server>> open;
    for (auto& [id, weak] : servers_)
      if (auto s = weak.lock()) open.push_back(std::move(s));
    for (auto& s : open) s->close();  // each erases itself from servers_
    servers_.clear();
  }

  bool on_internal(ipc::Envelope& envelope) {
    namespace p = ipc::protocol;
    auto m = p::decode(envelope.message.data);
    const bool handle_allowed = m && (std::holds_alternative<p::QueryReply>(*m) || std::holds_alternative<p::NewConn>(*m));
    if (!m || (envelope.has_handle() && !handle_allowed)) {
      log_error("unexpected internal message from the master; closing the channel");
      return false;
    }
    // The handle is made here, on the executor it belongs to, and checked to be what its type
    // says (adopt_handle), as the channel does for user messages.
    auto adopt = [&](asio::any_io_executor ex, any_socket& out) {
      std::error_code ec;
      out = adopt_handle(ex, envelope.internal_tag, std::move(envelope.internal_fd), ec);
      if (ec) log_error("a handle from the master is not the socket its type says; closing the channel");
      return !ec;
    };
    any_socket handle;
    if (auto* reply = std::get_if<p::QueryReply>(&*m)) {
      if (!adopt(channel_.get_executor(), handle)) return false;
      on_query_reply(*reply, handle);
    } else if (auto* conn = std::get_if<p::NewConn>(&*m)) {
      auto it = servers_.find(conn->server);
      auto server = it == servers_.end() ? nullptr : it->second.lock();
      if (server && !adopt(connection_executor(), handle)) return false;
      if (!server || !server->deliver(handle, conn->seq, conn->remote))
        send_internal(p::Accepted{conn->server, conn->seq, false});  // the master gives it to another worker
    } else if (std::holds_alternative<p::Disconnect>(*m)) {
      debug("Worker {} disconnect requested by the master", id_);
      if (!disconnecting_) begin_disconnect();
    } else {
      log_error("unexpected internal message from the master; closing the channel");
      return false;
    }
    return true;
  }

  void on_query_reply(const ipc::protocol::QueryReply& r, any_socket& handle) {
    auto it = queries_.find(r.seq);
    if (it == queries_.end()) return;  // not ours: ignored, as Node ignores stray replies
    pending_query q = std::move(it->second);
    queries_.erase(it);
    std::error_code ec;
    std::shared_ptr<worker_server> server;
    if (r.errno_value != 0) ec.assign(r.errno_value, std::system_category());
    else if (disconnecting_) ec = error::worker_not_connected;  // its servers are closed already
    else server = q.make(r, handle, ec);
    if (!server || !q.handler) {  // failed, or the listen() was cancelled meanwhile
      if (r.errno_value == 0 && !shut_down_) send_internal(ipc::protocol::Close{r.server});
      release_index(q.index_key, q.index);
      if (q.handler) q.handler.complete(ec, nullptr);
      return;
    }
    // Registered now, before the next message: a newconn may follow the reply at once.
    server->id = r.server;
    server->index_key = std::move(q.index_key);
    server->index = q.index;
    servers_.emplace(r.server, server);
    state_ = WorkerState::listening;
    send_internal(ipc::protocol::Listening{r.server});
    q.handler.complete({}, std::move(server));
  }

  asio::awaitable<void> read_loop() {
    const std::error_code end = co_await read_channel(
        channel_, messages_, [this](ipc::Envelope& e) { return on_internal(e); }, [] {},
        [this] { debug("Worker {}: {} unread messages; reading paused", id_, messages_.size()); });
    parent_death::stand_down();  // whatever the master did, the orderly path runs from here
    if (end != asio::error::eof && end != error::channel_closed)
      log_error("worker {}: channel to the master failed: {} ({})", id_, end.message(), channel_.error_detail());
    connected_ = false;
    state_ = WorkerState::disconnected;
    channel_.close();
    close_servers();  // nothing more will be handed over; the master is gone or let us go
    auto queries = std::move(queries_);
    queries_.clear();
    for (auto& [seq, q] : queries)
      if (q.handler) q.handler.complete(error::worker_not_connected, nullptr);
    messages_.close(error::worker_not_connected);
    disconnected_.set();
    if (exit_when_shut_down_) exit_process(0);
    if (disconnecting_) co_return;
    // Node: a worker whose channel closes without a disconnect exits with 0 (the master died).
    debug("Worker {} lost its channel ({}); exiting", id_, end.message());
    if (on_unexpected_disconnect_) on_unexpected_disconnect_();
    else exit_process(0);
  }

  int id_;
  ipc::Channel channel_;
  async_queue<Message> messages_;
  async_latch<> disconnected_;
  bool connected_ = true;
  bool disconnecting_ = false;
  bool shut_down_ = false;  // our side of the channel is closing: no more close messages
  bool shut_down_done_ = false;       // ...and everything we queued is written
  bool exit_when_shut_down_ = false;  // kill(): exit(0) once our side is closed
  WorkerState state_ = WorkerState::none;
  std::size_t live_connections_ = 0;
  std::function<void()> on_unexpected_disconnect_;
  std::uint32_t last_query_ = 0;
  std::map<std::uint32_t, pending_query> queries_;                    // by seq
  std::map<std::uint32_t, std::weak_ptr<worker_server>> servers_;     // by the master's id
  std::map<std::string, index_set> indexes_;
};

}  // namespace detail

// The worker's API as one object, so code reads like Node's: this_worker.send(...).
struct this_worker_t {
  // Attaches to the channel the master gave this process and announces `online`.
  // Throws std::system_error(error::not_a_worker) in the master. Beyond `max_unread_messages`
  // unread messages the worker stops reading its channel (the master's sends then wait), so a
  // flood of messages or passed sockets cannot exhaust its memory or fds... up to that count:
  // a worker that receives handles and reads slowly wants a limit below its RLIMIT_NOFILE.
  void start(asio::any_io_executor ex, ipc::ChannelOptions options = {},
             std::size_t max_unread_messages = 65536) const {
    detail::worker_runtime::start(std::move(ex), options, max_unread_messages);
  }
  bool is_started() const { return detail::worker_runtime::instance(false) != nullptr; }

  // Node: cluster.worker.id. Known before start(): it comes from the environment.
  int id() const { return detail::identity().id; }
  bool is_connected() const { return runtime().is_connected(); }
  // Node: cluster.worker.isDead() in a worker: true once the process is exiting (exit() was
  // called: by kill(), by the default reaction to the master's death, or by anyone), so it
  // reads true in atexit handlers and static destructors; false while the worker runs.
  bool is_dead() const noexcept { return detail::worker_runtime::is_exiting(); }
  // Node: cluster.worker.state: none before start(), then online, listening, disconnected.
  WorkerState state() const {
    auto* r = detail::worker_runtime::instance(false);
    return r ? r->state() : WorkerState::none;
  }
  // Node: cluster.worker.exitedAfterDisconnect: unset until disconnect(), kill() or the
  // channel's end; then whether this worker is leaving on purpose (or was asked to).
  std::optional<bool> exited_after_disconnect() const { return runtime().exited_after_disconnect(); }

  // Node: process.send(message[, handle]). Completes once queued.
  template <class CompletionToken = asio::use_awaitable_t<>>
  auto send(Message message, CompletionToken&& token = {}) const {
    if constexpr (detail::is_use_awaitable<CompletionToken>)
      return detail::send_now_or_wait(runtime().channel(), {ipc::message_kind::user, std::move(message)});
    else
      return runtime().channel().async_send({ipc::message_kind::user, std::move(message)},
                                            std::forward<CompletionToken>(token));
  }

  // Node: process.on('message'). The next message from the master, in order.
  template <class CompletionToken = asio::use_awaitable_t<>>
  auto receive(CompletionToken&& token = {}) const {
    if constexpr (detail::is_use_awaitable<CompletionToken>) return detail::pop_now_or_wait(runtime().messages());
    else return runtime().messages().async_pop(std::forward<CompletionToken>(token));
  }

  // Node: process.on('disconnect'). Completes when the channel to the master has closed.
  template <class CompletionToken = asio::use_awaitable_t<>>
  auto disconnected(CompletionToken&& token = {}) const {
    return runtime().disconnected().async_wait(std::forward<CompletionToken>(token));
  }

  // Node: server.listen() in a worker, which goes through the master: the master creates the
  // listener for this address (once per address, port and type, whichever worker asks first)
  // and, by its policy, hands connections over or gives this worker a copy. Endpoint is a
  // tcp, udp or local::stream_protocol endpoint; the result is Server<its protocol>.
  // Port 0: every worker's Nth listen(0) gets the same port. A Unix path is relative to this
  // worker's cwd. Errors are the master's: std::system_error with EADDRINUSE, EACCES, ...
  template <class Endpoint, class CompletionToken = asio::use_awaitable_t<>>
  auto listen(const Endpoint& endpoint, ListenOptions options = {}, CompletionToken&& token = {}) const {
    using Protocol = typename Endpoint::protocol_type;
    return start_listen<Protocol>(detail::target_of(endpoint), options, std::forward<CompletionToken>(token));
  }

  // Node: server.listen({fd}) in a worker: listens on `fd`, an fd open in the master (a bound
  // socket of Protocol's kind; the master makes it listen if it does not yet).
  template <class Protocol, class CompletionToken = asio::use_awaitable_t<>>
  auto listen_fd(int fd, ListenOptions options = {}, CompletionToken&& token = {}) const {
    detail::listen_target t;
    t.type = detail::fd_address_type<Protocol>();
    t.fd = fd;
    return start_listen<Protocol>(std::move(t), options, std::forward<CompletionToken>(token));
  }

  // Node: server.listen(handle): a server on a listener this process already has; the master
  // is not involved. Works in the master too.
  Server<asio::ip::tcp> adopt(asio::ip::tcp::acceptor acceptor) const { return adopt_stream(std::move(acceptor)); }
  Server<asio::local::stream_protocol> adopt(asio::local::stream_protocol::acceptor acceptor) const {
    return adopt_stream(std::move(acceptor));
  }
  Server<asio::ip::udp> adopt(asio::ip::udp::socket socket) const {
    return Server<asio::ip::udp>(std::make_shared<detail::datagram_server>(nullptr, std::move(socket)));
  }

  // Node: cluster.worker.disconnect() in a worker: closes every server listening through the
  // master, waits until the connections they accepted have ended (each socket and every
  // operation on it destroyed), then closes the channel; the process ends when its io_context
  // runs out of work. Long-lived connections keep it alive: the master can kill() it after a
  // timeout, or send a message that makes the worker end them.
  void disconnect() const { runtime().disconnect(); }

  // Node: cluster.worker.kill() in a worker: tells the master this worker leaves on purpose,
  // then exits with 0 without waiting for servers or connections.
  void kill() const { runtime().kill(); }

  // Node: process.disconnect() in a worker. Closes the channel (what is queued is written
  // first) without the graceful disconnect: no waiting for servers or connections. Then, as
  // for any disconnect this worker did not ask for with disconnect(), the on_disconnect()
  // handler runs, by default exit(0). The master sees exited_after_disconnect() false.
  void close_channel() const { runtime().close_channel(); }

  // Replaces the default exit(0) when the channel closes without a disconnect (the master
  // died, or either side called close_channel()). When the master dies, this handler runs
  // before the kernel's parent-death signal can end the process: that signal only ends a
  // worker whose event loop has not reached the channel's end within 2 s.
  void on_disconnect(std::function<void()> handler) const {
    runtime().set_unexpected_disconnect_handler(std::move(handler));
  }

 private:
  static detail::worker_runtime& runtime() { return *detail::worker_runtime::instance(); }

  template <class Protocol>
  using server_state =
      std::conditional_t<std::is_same_v<Protocol, asio::ip::udp>, detail::datagram_server, detail::stream_server<Protocol>>;

  template <class Protocol>
  static asio::awaitable<Server<Protocol>> listen_through_master(detail::listen_target t, ListenOptions options) {
    auto server = co_await runtime().listen<Protocol>(std::move(t), options);
    co_return Server<Protocol>(std::static_pointer_cast<server_state<Protocol>>(std::move(server)));
  }

  template <class Protocol, class CompletionToken>
  static auto start_listen(detail::listen_target t, ListenOptions options, CompletionToken&& token) {
    if constexpr (detail::is_use_awaitable<CompletionToken>)
      return listen_through_master<Protocol>(std::move(t), options);
    else
      return asio::co_spawn(runtime().channel().get_executor(), listen_through_master<Protocol>(std::move(t), options),
                            std::forward<CompletionToken>(token));
  }

  template <class Acceptor>
  static Server<typename Acceptor::protocol_type> adopt_stream(Acceptor acceptor) {
    using Protocol = typename Acceptor::protocol_type;
    auto local = acceptor.local_endpoint();
    auto ex = acceptor.get_executor();
    return Server<Protocol>(
        std::make_shared<detail::stream_server<Protocol>>(ex, nullptr, std::move(acceptor), std::move(local)));
  }
};

inline constexpr this_worker_t this_worker{};

}  // namespace cocluster
