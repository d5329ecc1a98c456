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
//
// Every asynchronous operation takes any completion token (use_awaitable by default,
// as_tuple(use_awaitable), use_future, asio::experimental::deferred, a callback, detached).
// Its initiation runs on the executor given to start(), so use_future works from another
// thread. A coroutine whose result is ready (a queued message, room in the send queue) resumes
// without a trip through the scheduler; every other handler is posted, as from any Asio
// operation.
#pragma once

#include "cocluster/detail/config.hpp"

#include <asio/any_io_executor.hpp>
#include <asio/async_result.hpp>
#include <asio/error.hpp>
#include <asio/use_awaitable.hpp>

#include <functional>
#include <memory>
#include <optional>
#include <system_error>

#include "cocluster/detail/worker/operations.hpp"
#include "cocluster/detail/worker/runtime.hpp"
#include "cocluster/detail/worker_identity.hpp"
#include "cocluster/server.hpp"
#include "cocluster/settings.hpp"
#include "cocluster/worker_state.hpp"

namespace cocluster {

// Node: cluster.isWorker / cluster.isPrimary (and its older name cluster.isMaster), from
// NODE_UNIQUE_ID; ours is COCLUSTER_WORKER_ID, read at the first call and kept after start()
// removes it from the environment.
inline bool is_worker() noexcept { return detail::identity().is_worker; }
inline bool is_primary() noexcept { return !is_worker(); }
inline bool is_master() noexcept { return is_primary(); }

// The worker's API as one object, so code reads like Node's: this_worker.send(...).
struct this_worker_t {
  // Attaches to the channel the master gave this process and announces `online`.
  // Throws std::system_error(error::not_a_worker) in the master. Once `max_unread_messages`
  // unread messages, or `max_unread_bytes` of them, are held, the worker stops reading its
  // channel (the master's sends then wait; nothing is dropped), so a flood of messages or
  // passed sockets cannot exhaust its memory or fds... up to those bounds: a worker that
  // receives handles and reads slowly wants a count below its RLIMIT_NOFILE. The byte bound is
  // checked before each message is read: a single larger message is still delivered.
  void start(asio::any_io_executor ex, ipc::ChannelOptions options = {},
             std::size_t max_unread_messages = default_max_unread_messages,
             std::size_t max_unread_bytes = default_max_unread_bytes) const {
    detail::worker::runtime::start(std::move(ex), options, max_unread_messages, max_unread_bytes);
  }
  // The same, reporting instead of throwing: error::not_a_worker in the master,
  // asio::error::already_started on a second call, error::protocol_error when fd 3 is not a
  // cocluster channel, a system error from fcntl.
  void start(asio::any_io_executor ex, std::error_code& ec, ipc::ChannelOptions options = {},
             std::size_t max_unread_messages = default_max_unread_messages,
             std::size_t max_unread_bytes = default_max_unread_bytes) const {
    ec.clear();
    if (detail::worker::runtime::find()) {
      ec = asio::error::already_started;
      return;
    }
    try {
      detail::worker::runtime::start(std::move(ex), options, max_unread_messages, max_unread_bytes);
    } catch (const std::system_error& e) {
      ec = e.code();
    }
  }
  bool is_started() const { return detail::worker::runtime::find() != nullptr; }

  // Node: cluster.worker.id. Known before start(): it comes from the environment.
  int id() const { return detail::identity().id; }
  bool is_connected() const { return runtime().is_connected(); }
  // Node: cluster.worker.isDead() in a worker: true once the process is exiting (exit() was
  // called: by kill(), by the default reaction to the master's death, or by anyone), so it
  // reads true in atexit handlers registered before start() and in the destructors of statics
  // made before start() (they run after start()'s own atexit hook); false while it runs.
  bool is_dead() const noexcept { return detail::worker::runtime::is_exiting(); }
  // Node: cluster.worker.state: none before start(), then online, listening, disconnected.
  WorkerState state() const {
    auto* r = detail::worker::runtime::find();
    return r ? r->state() : WorkerState::none;
  }
  // Node: cluster.worker.exitedAfterDisconnect: unset until disconnect(), kill() or the
  // channel's end; then whether this worker is leaving on purpose (or was asked to).
  std::optional<bool> exited_after_disconnect() const { return runtime().exited_after_disconnect(); }

  // Node: process.send(message[, handle]). Completes once the message is queued (the handle
  // is moved out at once and closed once written, or on failure).
  //   Completion signature: void(std::error_code).
  //   Errors: error::channel_closed (the channel is closing or gone), error::message_too_large,
  //   asio::error::bad_descriptor (a handle made from a closed socket),
  //   std::errc::too_many_files_open (a received handle that was lost: Handle::lost()),
  //   a system error from sendmsg (EPIPE: the master is gone).
  //   Cancellation: per-operation, terminal, while the send waits for room in the full send
  //   queue: completes with asio::error::operation_aborted and the message is not sent (its
  //   handle is closed). A queued message is never taken back.
  template <class CompletionToken = asio::use_awaitable_t<>>
  auto send(Message message, CompletionToken&& token = {}) const {
    return asio::async_initiate<CompletionToken, void(std::error_code)>(
        detail::worker::initiate_send{&runtime()}, token, ipc::Envelope(ipc::message_kind::user, std::move(message)));
  }

  // Node: process.on('message'). The next message from the master, in order.
  //   Completion signature: void(std::error_code, Message).
  //   Errors: error::worker_not_connected once the channel has ended and every message
  //   read before its end has been received.
  //   Cancellation: per-operation, terminal: completes with asio::error::operation_aborted,
  //   and no message is taken.
  template <class CompletionToken = asio::use_awaitable_t<>>
  auto receive(CompletionToken&& token = {}) const {
    return asio::async_initiate<CompletionToken, void(std::error_code, Message)>(
        detail::worker::initiate_receive{&runtime()}, token);
  }

  // Node: process.on('disconnect'). Completes when the channel to the master has closed (at
  // once, posted, if it has).
  //   Completion signature: void(std::error_code); no error in practice.
  //   Cancellation: per-operation, terminal: completes with asio::error::operation_aborted.
  template <class CompletionToken = asio::use_awaitable_t<>>
  auto disconnected(CompletionToken&& token = {}) const {
    return asio::async_initiate<CompletionToken, void(std::error_code)>(
        detail::worker::initiate_disconnected{&runtime()}, token);
  }

  // Node: server.listen() in a worker, which goes through the master: the master creates the
  // listener for this address (once per address, port and type, whichever worker asks first)
  // and, by its policy, hands connections over or gives this worker a copy. Endpoint is a
  // tcp, udp or local::stream_protocol endpoint; the result is Server<its protocol>.
  // Port 0: every worker's Nth listen(0) gets the same port. A Unix path is relative to this
  // worker's cwd.
  //   Completion signature: void(std::error_code, Server<Endpoint::protocol_type>).
  //   Errors: the master's errno (EADDRINUSE, EACCES, EADDRNOTAVAIL, EMFILE past 1,024
  //   listeners, ...); error::worker_not_connected once the channel is gone or the worker
  //   is disconnecting; error::protocol_error if the master's reply lacks its listener.
  //   Cancellation: per-operation, terminal: completes with asio::error::operation_aborted;
  //   a listener the master creates afterwards is closed again.
  template <class Endpoint, class CompletionToken = asio::use_awaitable_t<>>
  auto listen(const Endpoint& endpoint, ListenOptions options = {}, CompletionToken&& token = {}) const {
    using Protocol = typename Endpoint::protocol_type;
    return asio::async_initiate<CompletionToken, void(std::error_code, Server<Protocol>)>(
        detail::worker::initiate_listen<Protocol>{&runtime()}, token, detail::worker::target_of(endpoint), options);
  }

  // Node: server.listen({fd}) in a worker: listens on `fd`, an fd open in the master (a bound
  // socket of Protocol's kind; the master makes it listen if it does not yet). As listen(),
  // and EBADF, ENOTSOCK, EINVAL if the master's fd is not such a socket.
  template <class Protocol, class CompletionToken = asio::use_awaitable_t<>>
  auto listen_fd(int fd, ListenOptions options = {}, CompletionToken&& token = {}) const {
    return asio::async_initiate<CompletionToken, void(std::error_code, Server<Protocol>)>(
        detail::worker::initiate_listen<Protocol>{&runtime()}, token, detail::worker::fd_target<Protocol>(fd), options);
  }

  // Node: server.listen(handle): a server on a listener this process already has; the master
  // is not involved. Works in the master too.
  Server<asio::ip::tcp> adopt(asio::ip::tcp::acceptor acceptor) const { return adopt_stream(std::move(acceptor)); }
  Server<asio::local::stream_protocol> adopt(asio::local::stream_protocol::acceptor acceptor) const {
    return adopt_stream(std::move(acceptor));
  }
  Server<asio::ip::udp> adopt(asio::ip::udp::socket socket) const {
    return Server<asio::ip::udp>(std::make_shared<detail::worker::datagram_server>(nullptr, std::move(socket)));
  }

  // Ours (Node has no readiness; PM2: process.send('ready') with wait_ready): tells the master
  // this worker serves. With the master's Settings::ready_on = ReadyOn::explicit_ready, only
  // this makes it ready (worker->ready(), master.ready(), the `ready` event, a Supervisor's
  // boot timer and reload); with the default (listening) its first listen already did, and
  // this is harmless. Once; later calls do nothing. Throws std::system_error
  // (error::worker_not_connected) once the channel is gone or the worker is leaving; the
  // error_code form reports it instead.
  void ready() const {
    std::error_code ec;
    ready(ec);
    if (ec) throw std::system_error(ec, "this_worker.ready()");
  }
  void ready(std::error_code& ec) const { runtime().ready(ec); }

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
  static detail::worker::runtime& runtime() { return detail::worker::runtime::get(); }

  template <class Acceptor>
  static Server<typename Acceptor::protocol_type> adopt_stream(Acceptor acceptor) {
    using Protocol = typename Acceptor::protocol_type;
    auto local = acceptor.local_endpoint();
    auto ex = acceptor.get_executor();
    return Server<Protocol>(
        std::make_shared<detail::worker::stream_server<Protocol>>(ex, nullptr, std::move(acceptor), std::move(local)));
  }
};

inline constexpr this_worker_t this_worker{};

}  // namespace cocluster
