// The worker process's side (Node: cluster.worker, process.send, process.on('message')).
//   if (cocluster::is_worker()) {
//     cocluster::this_worker.start(io.get_executor());          // announces `online`
//     co_spawn(io, [&]() -> awaitable<void> {
//       for (;;) { Message m = co_await this_worker.receive();  co_await this_worker.send(std::move(m)); }
//     }, detached);
//   }
// When the channel to the master closes unexpectedly (the master died), the worker exits with
// code 0 unless on_disconnect() installed another handler. A disconnect the master asked for
// (or this_worker.disconnect()) instead lets the process end once its io_context runs dry.
#pragma once

#include <fcntl.h>

#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/use_awaitable.hpp>

#include <charconv>
#include <cstdlib>
#include <functional>
#include <stdexcept>
#include <string_view>

#include "cocluster/detail/async_latch.hpp"
#include "cocluster/detail/async_queue.hpp"
#include "cocluster/detail/log.hpp"
#include "cocluster/detail/read_channel.hpp"
#include "cocluster/detail/spawn.hpp"
#include "cocluster/ipc/channel.hpp"
#include "cocluster/ipc/protocol.hpp"

namespace cocluster {

// Node: cluster.isWorker / cluster.isMaster, from NODE_UNIQUE_ID; ours is COCLUSTER_WORKER_ID.
inline bool is_worker() noexcept { return std::getenv("COCLUSTER_WORKER_ID") != nullptr; }
inline bool is_master() noexcept { return !is_worker(); }

namespace detail {

inline int env_int(const char* name) {
  const char* v = std::getenv(name);
  int out = -1;
  if (!v) return -1;
  std::string_view s(v);
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), out);
  return ec == std::errc() && p == s.data() + s.size() ? out : -1;
}

// The one per-process worker runtime (Node has the same singleton in its worker).
class worker_runtime {
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
    const int id = env_int("COCLUSTER_WORKER_ID");
    const int fd = env_int("COCLUSTER_CHANNEL_FD");
    if (id < 1 || fd < 0 || socket_option(fd, SO_TYPE) != SOCK_SEQPACKET)
      throw std::system_error(error::protocol_error,
                              "COCLUSTER_WORKER_ID/COCLUSTER_CHANNEL_FD do not name a cocluster channel");
    // Programs this worker runs must not hold the master's channel open.
    ::fcntl(fd, F_SETFD, FD_CLOEXEC);
    // Never destroyed: the runtime lives as long as the process, like Node's.
    current() = new worker_runtime(std::move(ex), id, unique_fd(fd), options, max_unread);
    current()->run();
  }

  int id() const noexcept { return id_; }
  bool is_connected() const noexcept { return connected_; }
  ipc::Channel& channel() noexcept { return channel_; }
  async_queue<Message>& messages() noexcept { return messages_; }
  async_latch<>& disconnected() noexcept { return disconnected_; }
  void set_unexpected_disconnect_handler(std::function<void()> h) { on_unexpected_disconnect_ = std::move(h); }

  // Node: cluster.worker.disconnect() in the worker: tell the master we leave on purpose,
  // then close our side once every queued message is written.
  void disconnect() {
    if (!connected_ || disconnecting_) return;
    send_internal(ipc::protocol::ExitedAfterDisconnect{});
    begin_disconnect();
  }

 private:
  using as_tuple_t = asio::experimental::as_tuple_t<asio::use_awaitable_t<>>;

  static worker_runtime*& current() {
    static worker_runtime* runtime = nullptr;
    return runtime;
  }

  worker_runtime(asio::any_io_executor ex, int id, unique_fd fd, ipc::ChannelOptions options, std::size_t max_unread)
      : id_(id),
        channel_(ex, std::move(fd), options),
        messages_(ex, std::max<std::size_t>(max_unread, 1), /*inline_delivery=*/true),
        disconnected_(ex) {}

  void run() {
    send_internal(ipc::protocol::Online{});
    asio::co_spawn(channel_.get_executor(), read_loop(), asio::detached);
  }

  void send_internal(ipc::protocol::InternalMessage m) {
    channel_.async_send({ipc::message_kind::internal, {ipc::protocol::encode(m), {}}}, [](std::error_code) {});
  }

  // Servers close here once workers listen through the master; then our side of the channel.
  void begin_disconnect() {
    disconnecting_ = true;
    channel_.async_shutdown([](std::error_code) {});
  }

  bool on_internal(const ipc::Envelope& envelope) {
    auto m = ipc::protocol::decode(envelope.message.data);
    if (!m || !std::holds_alternative<ipc::protocol::Disconnect>(*m)) {
      log_error("unexpected internal message from the master; closing the channel");
      return false;
    }
    debug("Worker {} disconnect requested by the master", id_);
    begin_disconnect();
    return true;
  }

  asio::awaitable<void> read_loop() {
    const std::error_code end = co_await read_channel(
        channel_, messages_, [this](const ipc::Envelope& e) { return on_internal(e); }, [] {},
        [this] { debug("Worker {}: {} unread messages; reading paused", id_, messages_.size()); });
    if (end != asio::error::eof && end != error::channel_closed)
      log_error("worker {}: channel to the master failed: {} ({})", id_, end.message(), channel_.error_detail());
    connected_ = false;
    channel_.close();
    messages_.close(error::worker_not_connected);
    disconnected_.set();
    if (disconnecting_) co_return;
    // Node: a worker whose channel closes without a disconnect exits with 0 (the master died).
    debug("Worker {} lost its channel ({}); exiting", id_, end.message());
    if (on_unexpected_disconnect_) on_unexpected_disconnect_();
    else std::exit(0);
  }

  int id_;
  ipc::Channel channel_;
  async_queue<Message> messages_;
  async_latch<> disconnected_;
  bool connected_ = true;
  bool disconnecting_ = false;
  std::function<void()> on_unexpected_disconnect_;
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
  int id() const { return detail::env_int("COCLUSTER_WORKER_ID"); }
  bool is_connected() const { return runtime().is_connected(); }

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

  // Node: cluster.worker.disconnect() in a worker.
  void disconnect() const { runtime().disconnect(); }

  // Replaces the default exit(0) when the channel closes without a disconnect.
  void on_disconnect(std::function<void()> handler) const {
    runtime().set_unexpected_disconnect_handler(std::move(handler));
  }

 private:
  static detail::worker_runtime& runtime() { return *detail::worker_runtime::instance(); }
};

inline constexpr this_worker_t this_worker{};

}  // namespace cocluster
