// The master's view of one worker process (Node: cluster.Worker in the primary).
//   auto w = co_await master.fork();
//   co_await w->online();  co_await w->send({"hello"});  Message m = co_await w->receive();
//   w->disconnect();  ExitStatus s = co_await w->exited();
// One-shot events (online, disconnected, exited) are latches: awaiting after the fact
// completes at once. Every operation takes an Asio completion token (default: use_awaitable)
// and honours cancellation, so `co_await (w->online() || timer.async_wait(use_awaitable))`
// is a timeout.
#pragma once

#include "cocluster/detail/config.hpp"

#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include "cocluster/detail/as_tuple.hpp"
#include <asio/post.hpp>
#include <asio/posix/stream_descriptor.hpp>
#include <asio/steady_timer.hpp>
#include <asio/use_awaitable.hpp>

#include <array>
#include <chrono>
#include <map>
#include <memory>
#include <optional>

#include <fmt/core.h>

#include "cocluster/detail/async_latch.hpp"
#include "cocluster/detail/completion.hpp"
#include "cocluster/detail/async_queue.hpp"
#include "cocluster/detail/log.hpp"
#include "cocluster/detail/master/listener_table.hpp"
#include "cocluster/detail/master/worker_link.hpp"
#include "cocluster/detail/process.hpp"
#include "cocluster/detail/read_channel.hpp"
#include "cocluster/detail/spawn.hpp"
#include "cocluster/events.hpp"
#include "cocluster/ipc/channel.hpp"
#include "cocluster/ipc/protocol.hpp"
#include "cocluster/worker_state.hpp"

namespace cocluster {

namespace detail {
struct master_access;
struct supervisor_access;
// The master's ends of a worker's piped stdin, stdout, stderr (empty: not piped).
using stdio_pipes = std::array<std::optional<asio::posix::stream_descriptor>, 3>;

// What a Master shares with its workers; workers hold it weakly, so a worker outliving its
// master (in an event someone kept) is harmless.
struct master_state {
  explicit master_state(asio::any_io_executor e) : ex(std::move(e)) {}
  asio::any_io_executor ex;
  std::map<int, std::shared_ptr<Worker>> workers;   // Node: cluster.workers
  std::map<int, std::shared_ptr<Worker>> unreaped;  // every worker whose process is not reaped
  event_hub events;                                 // every open EventStream
  std::unique_ptr<EventStream> default_events;      // master.events(): null until called
  std::unique_ptr<listener_table> listeners;        // the listeners workers asked for

  void emit(Event e) {
    events.emit(e);
  }
};
}  // namespace detail

class Worker : public std::enable_shared_from_this<Worker> {
  struct passkey {};

 public:
  // Made by Master::fork only.
  Worker(passkey, int id, detail::Process process, ipc::Channel channel,
         std::weak_ptr<detail::master_state> master, std::size_t max_unread, std::size_t max_unread_bytes,
         detail::stdio_pipes stdio = {}, ReadyOn ready_on = ReadyOn::listening)
      : stdin_(std::move(stdio[0])),
        stdout_(std::move(stdio[1])),
        stderr_(std::move(stdio[2])),
        id_(id),
        process_(std::move(process)),
        link_(std::make_shared<detail::worker_link>(id, process_.pid(), std::move(channel))),
        channel_(link_->channel()),
        master_(std::move(master)),
        messages_(channel_.get_executor(), detail::async_queue<Message>::unbounded, /*inline_delivery=*/true),
        listening_(channel_.get_executor()),
        online_(channel_.get_executor()),
        ready_(channel_.get_executor()),
        disconnected_(channel_.get_executor()),
        exited_(channel_.get_executor()),
        ready_on_(ready_on) {
    detail::bound_inbox(messages_, max_unread, max_unread_bytes);
    channel_.read_past_bad_frames();  // a worker that breaks the protocol is read to its end (broke_protocol())
  }

  using executor_type = asio::any_io_executor;
  // The master's executor: every operation completes on it unless its handler has another.
  const executor_type& get_executor() const noexcept { return channel_.get_executor(); }

  int id() const noexcept { return id_; }
  pid_t pid() const noexcept { return process_.pid(); }
  // Node: worker.isConnected(). False from the moment the channel is gone or closing
  // (close_channel(), kill(), a protocol error).
  bool is_connected() const noexcept { return connected_ && !channel_closing_; }
  // Node: worker.isDead(). True once the process has ended and that is reported: after
  // disconnected(), just before exited() completes (disconnect always comes first here).
  bool is_dead() const noexcept { return dead_; }
  // Node: worker.state: none → online → listening → disconnected → dead.
  WorkerState state() const noexcept { return state_; }
  // Node: worker.exitedAfterDisconnect — unset until disconnect(), kill() or the first of
  // the disconnect/exit events, then whether the worker left on purpose.
  std::optional<bool> exited_after_disconnect() const noexcept { return exited_after_disconnect_; }
  // True once the master has killed this worker (SIGKILL) because its event loop sent no
  // heartbeat for Settings::heartbeat_timeout (no Node equivalent; gunicorn's timeout).
  bool unresponsive() const noexcept { return unresponsive_; }
  // All of the above at once: what each event on master.events() carries.
  WorkerSnapshot snapshot() const noexcept {
    return {state_, exited_after_disconnect_, is_connected(), dead_, unresponsive_};
  }

  // Ours (Node has none; gunicorn counts requests for max_requests): the connections this
  // worker has open now (on a shared socket, an accept waiting for a connection counts as
  // one), and every connection it has taken since it started (handed over by
  // the master, or accepted on a SharedSocket or ReusePort listener; not those of an adopted
  // acceptor), as it last reported them. It reports only once count_connections() asked it
  // (LeastConnections asks when the worker joins its listener, a Supervisor with
  // max_connections when it forks the worker), then after each turn of its event loop in
  // which either changed; so both are 0 until then, and can be one loop turn old.
  void count_connections() { link_->count_connections(); }
  std::uint32_t open_connections() const noexcept { return link_->open_connections(); }
  std::uint64_t connections_served() const noexcept { return link_->connections_served(); }

  // Completes when the worker runtime has announced itself (Node's 'online'). Fails with
  // error::worker_exited once the process has exited without coming online. Signature:
  // void(std::error_code); at once if it has happened. Cancellation (per-operation): stops
  // this wait only. The same holds for listening(), disconnected() and exited() below.
  template <class CompletionToken = asio::use_awaitable_t<>>
  auto online(CompletionToken&& token = {}) {
    return online_.async_wait(std::forward<CompletionToken>(token));
  }

  // Ours (Node has no readiness): true once the worker counts as ready by the Settings::ready_on
  // it was forked with: its first server listens, or it called this_worker.ready().
  bool is_ready() const noexcept { return ready_.is_set() && !ready_failed_; }
  // Completes when the worker is ready (see is_ready(); the `ready` event follows). Fails with
  // error::worker_not_connected if its channel ends first (it will not serve), and
  // error::worker_exited if it exits first. Signature: void(std::error_code); at once if
  // settled. Cancellation (per-operation): stops this wait only.
  template <class CompletionToken = asio::use_awaitable_t<>>
  auto ready(CompletionToken&& token = {}) {
    return ready_.async_wait(std::forward<CompletionToken>(token));
  }

  // Node: the worker's 'listening' event. The address of the next server the worker listens
  // on through the master (one per server, in order; the real port for listen(0)). After the
  // disconnect, what was announced can still be read; then error::worker_not_connected.
  template <class CompletionToken = asio::use_awaitable_t<>>
  auto listening(CompletionToken&& token = {}) {
    return listening_.async_pop(std::forward<CompletionToken>(token));
  }

  // Completes when the channel to the worker has closed, whoever closed it.
  template <class CompletionToken = asio::use_awaitable_t<>>
  auto disconnected(CompletionToken&& token = {}) {
    return disconnected_.async_wait(std::forward<CompletionToken>(token));
  }

  // Completes with the exit code or signal once the process has ended and been reaped.
  template <class CompletionToken = asio::use_awaitable_t<>>
  auto exited(CompletionToken&& token = {}) {
    return exited_.async_wait(std::forward<CompletionToken>(token));
  }

  // Node: worker.process.stdin/stdout/stderr. The master's end of the worker's pipe set up by
  // Settings::silent or Settings::stdio, on the master's executor; nullptr when that fd is
  // not piped (Node: null). Read them like any Asio stream: async_read_until(*w->stdout_pipe(),
  // ...) ends with asio::error::eof once the worker (and any child holding the fd) has closed
  // it. A pipe nobody reads fills up (64 KiB) and then blocks the worker's writes, as in Node.
  // Writing to stdin_pipe() after the worker has closed its stdin raises SIGPIPE unless the
  // master ignores it (Node ignores SIGPIPE process-wide; cocluster changes no disposition).
  asio::posix::stream_descriptor* stdin_pipe() noexcept { return stdin_ ? &*stdin_ : nullptr; }
  asio::posix::stream_descriptor* stdout_pipe() noexcept { return stdout_ ? &*stdout_ : nullptr; }
  asio::posix::stream_descriptor* stderr_pipe() noexcept { return stderr_ ? &*stderr_ : nullptr; }

  // Node: worker.send(message[, handle]). Completes once queued (waits while the channel's
  // send queue is full); the handle is moved out of `message` and closed here once sent.
  // Signature: void(std::error_code). Errors: error::worker_not_connected after the disconnect,
  // error::message_too_large, asio::error::bad_descriptor (a handle made from a closed socket),
  // std::errc::too_many_files_open (a received handle that was lost: Handle::lost()), a
  // system error from sendmsg. Cancellation (per-operation,
  // terminal) while it waits for room: the message is not sent.
  template <class CompletionToken = asio::use_awaitable_t<>>
  auto send(Message message, CompletionToken&& token = {}) {
    return asio::async_initiate<CompletionToken, void(std::error_code)>(
        initiate_send{this}, token, ipc::Envelope(ipc::message_kind::user, std::move(message)));
  }

  // What the master holds unread from this worker (receive() takes it): messages, and their
  // bytes. Once either reaches its Settings bound (max_unread_messages, max_unread_bytes) the
  // master reads no more from the worker until receive() makes room. Node has no such bound.
  std::size_t unread_messages() const noexcept { return messages_.size(); }
  std::size_t unread_bytes() const noexcept { return messages_.weight(); }

  // Node: worker.on('message'). The next user message from the worker, in order. Messages
  // that arrived before the disconnect can still be read; then error::worker_not_connected.
  // Signature: void(std::error_code, Message). Cancellation (per-operation, terminal): the
  // message stays queued for the next receive().
  template <class CompletionToken = asio::use_awaitable_t<>>
  auto receive(CompletionToken&& token = {}) {
    return asio::async_initiate<CompletionToken, void(std::error_code, Message)>(initiate_receive{this}, token);
  }

  // Node: worker.disconnect() in the primary. Asks the worker to close its servers and then
  // its channel; the worker leaves master.workers() at once.
  void disconnect() {
    if (!is_connected() || disconnect_sent_) return;
    disconnect_sent_ = true;
    exited_after_disconnect_ = true;
    leave_workers();
    link_->send(ipc::protocol::Disconnect{});
  }

  // Node: worker.process.disconnect() in the primary. Closes the channel (what is queued is
  // written first) without the graceful disconnect: the worker is not asked to close its
  // servers or wait for its connections. It sees an unexpected disconnect and runs its
  // on_disconnect() handler, by default exit(0), at once. exited_after_disconnect() stays as
  // it was (false at the disconnect unless disconnect() or kill() came first); the worker stays
  // in master.workers() until it has exited, as in Node.
  void close_channel() {
    if (!connected_ || channel_closing_) return;
    channel_closing_ = true;
    detail::debug("Worker {} channel closed by the master", pid());
    // No listener hands it anything more (a hand-off could not be written); what it was
    // handed before waits for its acks, which are still read, until its channel ends.
    if (auto m = master_.lock(); m && m->listeners) m->listeners->worker_leaving(*link_);
    channel_.async_shutdown([](std::error_code) {});
  }

  // Node: process.kill(worker.process.pid, sig): a signal and nothing else (no disconnect,
  // unlike kill()). Sent through the pidfd, so it never reaches a recycled pid. Throws
  // std::system_error: ESRCH once the worker has been reaped, EINVAL for a bad signal.
  void signal(int sig) {
    std::error_code ec;
    signal(sig, ec);
    if (ec) throw std::system_error(ec, fmt::format("signal {} to worker {}", sig, id_));
  }
  void signal(int sig, std::error_code& ec) noexcept { ec = process_.signal(sig); }

  // Node: worker.kill(signal) in the primary: the worker is disconnected and signalled, and
  // exited_after_disconnect becomes true (unless the disconnect event made it false already:
  // a crash, a channel the worker closed; then, as Node's, kill() only signals). Node
  // disconnects, then signals; we signal first,
  // then stop writing to the channel (what is queued is dropped, sends waiting for room fail
  // with error::channel_closed, the worker reads EOF), so that a worker killed by a signal
  // always reports that signal (it cannot win a race to exit(0) on EOF) and a busy worker
  // needs no cooperation. A worker that handles the signal still sees its channel end.
  // is_connected() is false at once, and the worker leaves master.workers(); no connection
  // is handed to it any more. What it sends until it has gone is still read, as after
  // close_channel(): the acks of the connections it took before it died (which it may have
  // served) are counted, and only those it had not taken go to other workers, when its
  // channel ends (Node: all of them, at the disconnect). `disconnect` follows then; no
  // `online`, `listening` or `ready` comes after kill(), whatever the worker had sent.
  //
  // Throws std::system_error if the signal cannot be sent to a worker that has not exited
  // (EINVAL for a bad signal number), and leaves the worker as it was (connected, a member of
  // its listeners); the error_code form reports it instead. After the exit,
  // kill() is harmless (Node's is too).
  void kill(int sig = SIGTERM) {
    std::error_code ec;
    kill(sig, ec);
    if (ec) throw std::system_error(ec, fmt::format("kill({}) of worker {}", sig, id_));
  }
  void kill(int sig, std::error_code& ec) {
    ec.clear();
    if (!dead_) {
      ec = process_.signal(sig);
      if (ec == std::errc::no_such_process) ec.clear();  // it is exiting: the exit will say so
      if (ec) return;  // (a bad signal number): nothing happened, the worker serves on
      // On purpose, unless the disconnect event said otherwise already (a crash, a channel
      // the worker closed): Node's kill() of a worker that is not connected only signals.
      if (!exited_after_disconnect_) exited_after_disconnect_ = true;
    }
    if (connected_ && !leaving_) {
      leaving_ = true;
      leave_workers();
      link_->mark_disconnected();  // nothing more is sent to it
      if (auto m = master_.lock(); m && m->listeners) m->listeners->worker_leaving(*link_);
      channel_closing_ = true;
      detail::debug("Worker {} killed: the master writes nothing more to it", pid());
      channel_.shut_writes();
    }
  }

  // How long a worker that broke the protocol has to end its channel (its runtime does at
  // once) before it is killed with SIGKILL (docs/DESIGN.md, "Protocol errors").
  static constexpr std::chrono::seconds protocol_error_grace{5};

 private:
  friend struct detail::master_access;
  friend struct detail::supervisor_access;

  using as_tuple_t = cocluster::detail::as_tuple_t<asio::use_awaitable_t<>>;

  bool can_send() const noexcept { return connected_ && !channel_closing_ && channel_.is_open(); }

  // The initiations run on the master's executor (run_on) and complete what is ready at once
  // (complete_now: an awaiting coroutine resumes without a trip through the scheduler).
  struct initiate_send {
    Worker* self;
    template <class Handler>
    void operator()(Handler&& handler, ipc::Envelope envelope) const {
      detail::run_on(self->get_executor(), std::forward<Handler>(handler), [self = self, e = std::move(envelope)](auto h) mutable {
        const auto& ex = self->get_executor();
        // Closed by kill() or close_channel(): the read loop may not have seen it yet.
        if (!self->can_send()) return detail::complete_now(std::move(h), ex, std::error_code(error::worker_not_connected));
        std::error_code ec;
        if (self->channel_.try_send(e, ec)) return detail::complete_now(std::move(h), ex, ec);
        self->channel_.async_send(std::move(e), std::move(h));  // the send queue is full: wait for room
      });
    }
  };

  struct initiate_receive {
    Worker* self;
    template <class Handler>
    void operator()(Handler&& handler) const {
      detail::run_on(self->get_executor(), std::forward<Handler>(handler), [self = self](auto h) {
        if (auto m = self->messages_.try_pop())
          return detail::complete_now(std::move(h), self->get_executor(), std::error_code{}, std::move(*m));
        self->messages_.async_pop(std::move(h));
      });
    }
  };

  void start() {
    auto self = shared_from_this();
    asio::co_spawn(channel_.get_executor(), read_loop(self), asio::detached);
    asio::co_spawn(channel_.get_executor(), watch_exit(self), asio::detached);
  }

  static asio::awaitable<void> read_loop(std::shared_ptr<Worker> self) {
    // A bad frame (the channel dropped it) or a bad message ends a read_channel with
    // protocol_error, the channel still open: it is read on (broke_protocol()).
    std::error_code end;
    while ((end = co_await self->read_messages()) == error::protocol_error && self->channel_.is_open()) {
      // (A message's rule is in protocol_detail_; a dropped frame's, in the channel's detail.)
      self->broke_protocol(self->protocol_detail_.empty() ? self->channel_.error_detail()
                                                          : std::exchange(self->protocol_detail_, {}));
      // A turn of the loop per bad frame: a worker writing nothing else must not keep the
      // master from its other work (read_channel yields every read_budget messages).
      co_await asio::post(self->channel_.get_executor(), asio::use_awaitable);
    }
    self->on_channel_end(end);
  }

  // One read_channel over the channel (read_loop() holds this worker meanwhile).
  asio::awaitable<std::error_code> read_messages() {
    co_return co_await detail::read_channel(
        channel_, messages_, fmt::format("worker {} (pid {})", id_, pid()),
        [this](const ipc::Envelope& e) { return on_internal(e); },
        [this] { emit(EventType::message); },
        [this](bool paused) {
          if (!paused) return reading_resumed();  // (whether or not the worker sends more)
          reading_paused_ = true;
          detail::debug("Worker {}: {} unread messages ({} bytes); reading paused until the master receives", pid(),
                        messages_.size(), messages_.weight());
        });
  }

  // The worker's internal messages: lifecycle ones here, listening ones straight to the
  // master's listener table (which answers through this worker's link).
  bool on_internal(const ipc::Envelope& envelope) {
    namespace p = ipc::protocol;
    if (!p::sent_by_worker(envelope.message.data))  // (before decoding: see sent_by_worker)
      return protocol_error("unexpected internal message from the worker");
    auto message = p::decode(envelope.message.data);
    if (!message || envelope.has_handle() || envelope.internal_fds_lost != 0)
      return protocol_error("unexpected internal message from the worker");
    auto master = master_.lock();
    detail::listener_table* listeners = master ? master->listeners.get() : nullptr;
    return std::visit(
        [&](auto& m) -> bool {
          using T = std::decay_t<decltype(m)>;
          // (A heartbeat is believed too: the worker's loop turns, it is no hung one.)
          constexpr bool believed_when_broken = std::is_same_v<T, p::Accepted> || std::is_same_v<T, p::AcceptedBatch> ||
                                                std::is_same_v<T, p::Close> || std::is_same_v<T, p::Heartbeat>;
          if (broken_ && !believed_when_broken) return true;  // broke_protocol()
          if constexpr (std::is_same_v<T, p::Online>) {
            if (online_.is_set() || leaving_) return true;  // killed: what it had sent changes nothing
            detail::debug("Worker {} online", pid());
            state_ = WorkerState::online;
            online_.set();
            emit(EventType::online);
            if (ready_on_ == ReadyOn::online) mark_ready();
          } else if constexpr (std::is_same_v<T, p::Heartbeat>) {
            if (heartbeat_timeout_.count() == 0) return protocol_error("a heartbeat the master did not ask for");
            last_heartbeat_ = std::chrono::steady_clock::now();
            start_heartbeat_clock();  // at the first beat: the loop turns (warming up before it is not a hang)
          } else if constexpr (std::is_same_v<T, p::ExitedAfterDisconnect>) {
            exited_after_disconnect_ = true;  // sent before the worker's EOF, so it is seen first
          } else if constexpr (std::is_same_v<T, p::QueryServer>) {
            if (listeners) listeners->query(link_, m);
          } else if constexpr (std::is_same_v<T, p::Listening>) {
            std::optional<Address> announce;
            if (listeners && !listeners->listening(*link_, m.server, announce))
              return protocol_error("listening for a server the worker does not hold");
            if (announce && !leaving_) announce_listening(std::move(*announce));
          } else if constexpr (std::is_same_v<T, p::Accepted>) {
            if (listeners) listeners->accepted(*link_, m);
          } else if constexpr (std::is_same_v<T, p::AcceptedBatch>) {
            if (listeners) listeners->accepted(*link_, m);
          } else if constexpr (std::is_same_v<T, p::Close>) {
            if (listeners) listeners->close(*link_, m.server);
          } else if constexpr (std::is_same_v<T, p::OpenConnections>) {
            link_->reported_connections(m);
          } else if constexpr (std::is_same_v<T, p::Ready>) {
            if (!leaving_) mark_ready();  // this_worker.ready(): ready whatever ready_on says
          } else {  // Disconnect, QueryReply, NewConn(Batch), CountConnections, HeartbeatRequest (refused above: sent_by_worker)
            return protocol_error("unexpected internal message from the worker");
          }
          return true;
        },
        *message);
  }

  // Master::fork() does not wait for the exec: the child's report pipe says how it went
  // (EOF: exec succeeded; a record: the step that failed). Read when it is readable, or at
  // the latest when the process has exited, so that the error comes before the exit.
  void watch_exec(detail::unique_fd report, detail::spawn_request described, detail::child_launch launch) {
    exec_launch_ = std::move(launch);  // first: whatever throws below, the Worker keeps it
    exec_report_.emplace(get_executor(), report.release());
    exec_described_ = std::make_unique<detail::spawn_request>(std::move(described));
    exec_report_->async_wait(asio::posix::stream_descriptor::wait_read,
                             [weak = weak_from_this()](std::error_code ec) {
                               if (auto self = weak.lock(); self && !ec) self->read_exec_report();
                             });
  }

  void read_exec_report() {
    if (!exec_report_) return;
    detail::spawn_detail::child_failure failure{};
    const int fd = exec_report_->native_handle();
    const ssize_t n = detail::retry_on_eintr([&] { return ::read(fd, &failure, sizeof failure); });
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) && !dead_) {  // woken for nothing
      return exec_report_->async_wait(asio::posix::stream_descriptor::wait_read,
                                      [weak = weak_from_this()](std::error_code ec) {
                                        if (auto self = weak.lock(); self && !ec) self->read_exec_report();
                                      });
    }
    auto error = detail::exec_report_result(*exec_described_, n < 0 ? ssize_t(-1) : n, failure);
    exec_report_.reset();  // closes it (a pending wait completes with operation_aborted)
    exec_described_.reset();
    exec_launch_.free_if_left();  // kept while a failing child has not exited yet
    if (!error) return;
    detail::log_error("cannot start worker {} (pid {}): {}", id_, pid(), error->what());
    emit(EventType::error, error->code(), error->what());
  }

  // Settings::heartbeat_timeout: ask the worker to beat every `interval` (before it is online:
  // the request waits in the channel); the clock starts at `online`.
  void watch_heartbeat(std::chrono::milliseconds interval, std::chrono::milliseconds timeout) {
    heartbeat_timeout_ = timeout;
    link_->send(ipc::protocol::HeartbeatRequest{static_cast<std::uint32_t>(interval.count())});
  }

  // One timer per worker, re-armed at the deadline rather than at each beat: a beat costs a
  // clock read. At the deadline: killed if nothing came since last_heartbeat_ + timeout.
  // The read loop reads again after a pause (the master received: read_channel's
  // on_pause(false)): the beats that waited behind the backlog get a whole timeout. (Not at
  // the next message read: a worker whose loop blocked right after the message that filled
  // the inbox sends none, and would never be killed.)
  void reading_resumed() {
    if (!reading_paused_) return;
    reading_paused_ = false;
    if (heartbeat_timer_) last_heartbeat_ = std::chrono::steady_clock::now();
  }

  void start_heartbeat_clock() {
    if (heartbeat_timeout_.count() == 0 || heartbeat_timer_) return;
    last_heartbeat_ = std::chrono::steady_clock::now();
    heartbeat_timer_.emplace(get_executor());
    arm_heartbeat_timer();
  }

  void arm_heartbeat_timer() {
    heartbeat_timer_->expires_at(last_heartbeat_ + heartbeat_timeout_);
    heartbeat_timer_->async_wait([weak = weak_from_this()](std::error_code ec) {
      auto self = weak.lock();
      if (ec || !self || self->dead_ || !self->connected_) return;
      const auto now = std::chrono::steady_clock::now();
      // The master is not reading this worker (its inbox is full): the beats wait in the
      // socket through no fault of the worker's. (When reading resumes, the clock restarts.)
      if (self->reading_paused_) self->last_heartbeat_ = now;
      if (now - self->last_heartbeat_ < self->heartbeat_timeout_) return self->arm_heartbeat_timer();
      self->kill_unresponsive(std::chrono::duration_cast<std::chrono::milliseconds>(now - self->last_heartbeat_));
    });
  }

  void kill_unresponsive(std::chrono::milliseconds silent) {
    unresponsive_ = true;
    const std::string why = fmt::format(
        "unresponsive: no heartbeat for {} ms (heartbeat_timeout {} ms); its event loop is blocked, killed with SIGKILL",
        silent.count(), heartbeat_timeout_.count());
    detail::log_error("worker {} (pid {}): {}", id_, pid(), why);
    emit(EventType::error, std::make_error_code(std::errc::timed_out), why);
    // Not kill(): exited_after_disconnect stays false, so that the exit reads as a failure
    // (a supervisor replaces the worker). The channel then ends and the exit follows.
    if (auto ec = process_.signal(SIGKILL); ec && ec != std::errc::no_such_process)
      detail::log_error("worker {} (pid {}): SIGKILL failed: {}", id_, pid(), ec.message());
  }

  // The worker's server listens at `a`: Node's 'listening', on the worker then the cluster.
  void announce_listening(Address a) {
    detail::debug("Worker {} listening on {}:{} ({})", pid(), a.address, a.port, to_string(a.type));
    if (state_ == WorkerState::online) state_ = WorkerState::listening;
    listening_.push(a);
    emit(EventType::listening, {}, {}, {}, std::move(a));
    if (ready_on_ == ReadyOn::listening) mark_ready();
  }

  // Once: ready() completes, then the `ready` event (after the event that made it ready).
  void mark_ready() {
    if (ready_.is_set()) return;
    detail::debug("Worker {} ready", pid());
    ready_.set();
    emit(EventType::ready);
  }

  // A message that breaks the protocol (a frame that does: the channel drops it). read_loop()
  // reads on (broke_protocol()).
  bool protocol_error(std::string why) {
    protocol_detail_ = std::move(why);
    return false;
  }

  // The worker sent what is not our protocol. Of what it sends from now on only what hands
  // connections back is believed: which ones it took (accepted, accepted_batch) and which
  // servers it closed (and its heartbeats). It is disconnected, and its channel is read to
  // the end: ending the channel at once lost the acknowledgements behind the bad frame, and
  // the connections the worker took from its socket meanwhile were served twice, by it and by
  // the worker they went to again. It leaves master.workers() and every listener (nothing more
  // is handed to it), is sent `disconnect`, then EOF (its runtime closes its servers, which
  // drops what it was handed and did not take, and its channel). A worker whose channel has
  // not ended protocol_error_grace later (no runtime, or a hung one) is killed with SIGKILL:
  // what it was handed goes to the others at the end. Said once, in the log and as an `error`
  // event; it will not be ready.
  void broke_protocol(std::string why) {
    if (broken_) return;
    broken_ = true;
    detail::log_error("worker {} (pid {}): protocol error: {}; disconnecting it, its channel read to the end",
                      id_, pid(), why);
    emit(EventType::error, error::protocol_error, why);
    if (!ready_.is_set()) {
      ready_failed_ = true;
      ready_.fail(error::worker_not_connected);
    }
    grace_timer_.emplace(get_executor());
    arm_grace();
    if (leaving_ || channel_closing_) return;  // killed or closed already: read to its end as it is
    leaving_ = true;
    leave_workers();
    if (auto m = master_.lock(); m && m->listeners) m->listeners->worker_leaving(*link_);
    if (!std::exchange(disconnect_sent_, true)) link_->send(ipc::protocol::Disconnect{});
    link_->mark_disconnected();
    channel_closing_ = true;
    channel_.async_shutdown([](std::error_code) {});  // the disconnect, then EOF
  }

  // broke_protocol()'s deadline. Not while the master's reading of this worker is paused (its
  // inbox is full): the end the worker sent may be waiting there, unread.
  void arm_grace() {
    grace_timer_->expires_after(protocol_error_grace);
    grace_timer_->async_wait([weak = weak_from_this()](std::error_code ec) {
      auto self = weak.lock();
      if (ec || !self || !self->connected_ || self->dead_) return;
      if (self->reading_paused_) return self->arm_grace();
      const auto e = self->process_.signal(SIGKILL);
      if (e == std::errc::no_such_process) return;  // it has exited: its end comes
      if (e) return detail::log_error("worker {} (pid {}): SIGKILL failed: {}", self->id_, self->pid(), e.message());
      detail::log_error("worker {} (pid {}): its channel did not end within {} s of its protocol error; "
                        "killed with SIGKILL",
                        self->id_, self->pid(), protocol_error_grace.count());
    });
  }

  void on_channel_end(std::error_code ec) {
    connected_ = false;
    if (heartbeat_timer_) heartbeat_timer_->cancel();
    if (grace_timer_) grace_timer_->cancel();  // it may live on, serving what it took
    link_->mark_disconnected();
    const bool clean = ec == asio::error::eof || ec == error::channel_closed || ec == asio::error::operation_aborted;
    if (!clean) {
      std::string why = !protocol_detail_.empty() ? protocol_detail_ : channel_.error_detail();
      if (why.empty()) why = ec.message();
      detail::log_error("worker {} (pid {}): {}: {}; disconnected", id_, pid(), ec.message(), why);
      emit(EventType::error, ec, why);
    }
    channel_.close();
    if (auto m = master_.lock(); m && m->listeners) m->listeners->worker_gone(*link_);
    if (!exited_after_disconnect_) exited_after_disconnect_ = false;
    messages_.close(error::worker_not_connected);
    listening_.close(error::worker_not_connected);
    if (!ready_.is_set()) ready_failed_ = true;
    ready_.fail(error::worker_not_connected);  // a worker that will not serve is never ready
    state_ = WorkerState::disconnected;
    detail::debug("Worker {} disconnect", pid());
    disconnected_.set();
    emit(EventType::disconnect);
  }

  static asio::awaitable<void> watch_exit(std::shared_ptr<Worker> self) {
    auto [ec, status] = co_await self->process_.async_wait(as_tuple_t{});
    if (ec) co_return;  // the master is being torn down
    self->read_exec_report();  // a failed exec is reported before the exit, whatever woke first
    self->exec_launch_.child_left();  // reaped: it is gone
    self->exec_launch_.free_if_left();
    if (self->grace_timer_) self->grace_timer_->cancel();  // reaped: nothing left to kill
    if (self->connected_) {
      // Everything the dead process sent is already in our socket: read it all (lifting the
      // unread-message bound), so 'disconnect' always comes before 'exit'.
      self->messages_.lift_bounds();
      self->channel_.mark_peer_gone();
      co_await self->disconnected_.async_wait(as_tuple_t{});
    }
    // Dead from here on, not before: a `disconnect` emitted above reads as Node's does.
    self->dead_ = true;
    if (!self->exited_after_disconnect_) self->exited_after_disconnect_ = false;
    self->online_.fail(error::worker_exited);
    if (!self->ready_.is_set()) self->ready_failed_ = true;
    self->ready_.fail(error::worker_exited);
    self->leave_workers();
    if (auto m = self->master_.lock()) m->unreaped.erase(self->id_);
    detail::debug("Worker {} exit ({})", self->pid(),
                  status.killed_by_signal() ? status.signal_name() : "code " + std::to_string(status.code));
    self->state_ = WorkerState::dead;
    self->exited_.set(status);
    self->emit(EventType::exit, {}, {}, status);
  }

  void leave_workers() {
    if (auto m = master_.lock()) m->workers.erase(id_);
  }

  void emit(EventType type, std::error_code ec = {}, std::string detail = {}, ExitStatus status = {},
            Address address = {}) {
    auto m = master_.lock();
    if (!m || !m->events.has_subscribers()) return;
    Event e{type, shared_from_this()};
    e.exit = status;
    e.error = ec;
    e.detail = std::move(detail);
    e.address = std::move(address);
    e.snapshot = snapshot();
    m->emit(std::move(e));
  }

  std::optional<asio::posix::stream_descriptor> stdin_, stdout_, stderr_;
  int id_;
  detail::Process process_;
  std::shared_ptr<detail::worker_link> link_;  // id, pid, channel: what the listeners hold
  ipc::Channel& channel_;                      // link_->channel()
  std::weak_ptr<detail::master_state> master_;
  detail::async_queue<Message> messages_;
  detail::async_queue<Address> listening_;  // one entry per server announced; bounded by them
  detail::async_latch<> online_;
  detail::async_latch<> ready_;
  detail::async_latch<> disconnected_;
  detail::async_latch<ExitStatus> exited_;
  ReadyOn ready_on_;
  bool ready_failed_ = false;  // ready_ was settled by a failure (is_set() is then true too)
  WorkerState state_ = WorkerState::none;
  bool connected_ = true;
  bool dead_ = false;
  bool disconnect_sent_ = false;
  bool channel_closing_ = false;  // close_channel(), kill(), broke_protocol(): our side is being shut down
  // kill(), broke_protocol(): no listener hands it anything from then on, and nothing it sent
  // after is announced. (close_channel() makes it leave the listeners too, without this flag.)
  bool leaving_ = false;
  std::optional<bool> exited_after_disconnect_;
  std::string protocol_detail_;  // why the last message broke the protocol, until read_loop() reads it
  bool broken_ = false;          // broke_protocol()
  // Settings::heartbeat_timeout (0: not watched), the last beat, and the deadline's timer.
  std::chrono::milliseconds heartbeat_timeout_{0};
  std::chrono::steady_clock::time_point last_heartbeat_{};
  std::optional<asio::steady_timer> heartbeat_timer_;
  std::optional<asio::steady_timer> grace_timer_;  // broke_protocol(): its channel must end by then
  bool reading_paused_ = false;  // read_channel waits for room in messages_
  // Until the exec is known to have succeeded or failed (watch_exec).
  std::optional<asio::posix::stream_descriptor> exec_report_;
  std::unique_ptr<detail::spawn_request> exec_described_;
  detail::child_launch exec_launch_;  // what the child may read until its execve (spawn.hpp)
  bool unresponsive_ = false;
};

namespace detail {
// The parts of Worker that only Master uses.
struct master_access {
  static std::shared_ptr<Worker> make(int id, Process p, ipc::Channel c, std::weak_ptr<master_state> m,
                                      std::size_t max_unread, std::size_t max_unread_bytes, stdio_pipes stdio = {},
                                      ReadyOn ready_on = ReadyOn::listening) {
    return std::make_shared<Worker>(Worker::passkey{}, id, std::move(p), std::move(c), std::move(m), max_unread,
                                    max_unread_bytes, std::move(stdio), ready_on);
  }
  // Starts reading the channel and watching the process; after the `fork` event is posted,
  // since the read loop may process `online` before this returns.
  static void start(Worker& w) { w.start(); }
  static void watch_exec(Worker& w, unique_fd report, spawn_request described, child_launch launch) {
    w.watch_exec(std::move(report), std::move(described), std::move(launch));
  }
  static void watch_heartbeat(Worker& w, std::chrono::milliseconds interval, std::chrono::milliseconds timeout) {
    w.watch_heartbeat(interval, timeout);
  }
  static void close_channel(Worker& w) { w.channel_.close(); }
  static Process& process(Worker& w) { return w.process_; }
};

// What a Supervisor watches of a Worker beyond its public operations.
struct supervisor_access {
  // `f` runs on the master's executor after each report of the worker's connections
  // (connections_served() has its new value); one at a time: a second replaces the first.
  static void on_connections_reported(Worker& w, std::function<void()> f) { w.link_->on_reported(std::move(f)); }
};
}  // namespace detail

}  // namespace cocluster
