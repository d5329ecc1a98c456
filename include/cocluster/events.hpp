// The master-wide event stream, for supervision loops (Node: cluster.on('fork'|'online'|...)).
//   auto& events = master.events();           // subscribe before forking to see every event
//   for (;;) { Event e = co_await events.next();  if (e.type == EventType::exit) co_await master.fork(); }
// A worker's own awaitables (online(), exited(), ...) complete before the matching event here.
#pragma once

#include "cocluster/detail/config.hpp"

#include <asio/use_awaitable.hpp>

#include <algorithm>
#include <deque>
#include <memory>
#include <vector>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <system_error>

#include "cocluster/address.hpp"
#include "cocluster/detail/pending_handler.hpp"
#include "cocluster/exit_status.hpp"
#include "cocluster/settings.hpp"
#include "cocluster/worker_state.hpp"

namespace cocluster {

class Worker;

// lagged is ours (Node's listeners cannot fall behind): see EventStream. ready is ours too
// (Node has no readiness): the worker serves, by Settings::ready_on (worker->ready()).
enum class EventType { fork, online, listening, message, disconnect, exit, error, setup, lagged, ready };

inline std::string_view to_string(EventType t) {
  constexpr std::string_view names[] = {"fork",       "online", "listening", "message", "disconnect",
                                        "exit",       "error",  "setup",     "lagged",  "ready"};
  return names[static_cast<int>(t)];
}

// What a Node listener would read from the worker at the moment its event was emitted. The
// stream is a queue, so by the time an event is taken the worker may have moved on (a
// `disconnect` taken after the exit was reaped): read these, not worker->state().
struct WorkerSnapshot {
  WorkerState state = WorkerState::none;        // Node: worker.state
  std::optional<bool> exited_after_disconnect;  // Node: worker.exitedAfterDisconnect
  bool is_connected = false;                    // Node: worker.isConnected()
  bool is_dead = false;                         // Node: worker.isDead()
  bool unresponsive = false;                    // worker.unresponsive(): killed for its heartbeat
  friend bool operator==(const WorkerSnapshot&, const WorkerSnapshot&) = default;
};

struct Event {
  // The type and the worker; the other fields are set by name (e.exit = ...), each only for
  // the events it concerns. (Not an aggregate: see Message.)
  Event() = default;
  Event(EventType t, std::shared_ptr<Worker> w) : type(t), worker(std::move(w)) {}

  EventType type = EventType::error;
  std::shared_ptr<Worker> worker;  // null only for setup (and an error before any worker exists)
  ExitStatus exit;                 // for exit
  std::error_code error;           // for error
  std::string detail;              // for error: what happened, in words
  Address address;                 // for listening
  // For setup: the settings as they were then, defaults filled in (Node: the event's argument,
  // "advisory only"; master.settings() is the current value).
  std::shared_ptr<const Settings> settings;
  // For every event with a worker: the worker as it was when the event was emitted.
  WorkerSnapshot snapshot;
  // For lagged: how many events this subscriber lost there.
  std::size_t lost = 0;
};
// `message` says that worker->receive() has a message waiting; the message itself (and its
// handle, which has one owner) is taken with receive(). `listening` comes once per server a
// worker listens on through the master, after worker->listening() has the address.

namespace detail {
class event_hub;
}

// One subscriber's view of the master-wide events (Node: the listeners of cluster.on(...)).
// Any number of streams may be open; each gets every event emitted from its subscription on,
// in order. A stream holds at most `capacity` unread events: past that it keeps no more, and
// its last entry becomes one `lagged` event whose `lost` counts what it missed (the master
// never blocks and never grows for a subscriber that stopped reading). Move-only; destroying
// it unsubscribes.
//   EventStream events = master.subscribe();
//   for (;;) { Event e = co_await events.next();  ... }
class EventStream {
 public:
  using executor_type = asio::any_io_executor;
  static constexpr std::size_t default_capacity = 65536;

  EventStream(asio::any_io_executor ex, std::size_t capacity = default_capacity)
      : s_(std::make_shared<state>(std::move(ex), std::max<std::size_t>(capacity, 1))) {}
  EventStream(EventStream&&) noexcept = default;
  EventStream& operator=(EventStream&&) noexcept = default;

  const executor_type& get_executor() const noexcept { return s_->ex; }

  // The next event, in order. Signature: void(std::error_code, Event). One next() at a time
  // (another fails with asio::error::already_started). Cancellation (per-operation,
  // terminal): no event is lost.
  template <class CompletionToken = asio::use_awaitable_t<>>
  auto next(CompletionToken&& token = {}) {
    return asio::async_initiate<CompletionToken, void(std::error_code, Event)>(initiate_next{s_, s_->ex}, token);
  }
  // Unread events (a lagged marker counts as one).
  std::size_t pending() const noexcept { return s_->events.size(); }
  std::size_t capacity() const noexcept { return s_->capacity; }

 private:
  friend class detail::event_hub;

  struct state {
    state(asio::any_io_executor e, std::size_t c) : ex(std::move(e)), capacity(c) {}
    ~state() { close(); }

    // The master is gone: a waiting next() fails, and so does every later one once the
    // events kept are read.
    void close() {
      closed = true;
      if (waiter) std::exchange(waiter, {}).complete(asio::error::operation_aborted, Event{});
    }

    void push(const Event& e) {
      if (waiter) return std::exchange(waiter, {}).complete({}, e);  // posted
      if (events.size() < capacity) return events.push_back(e);
      if (events.back().type != EventType::lagged) {
        Event marker(EventType::lagged, nullptr);
        events.push_back(std::move(marker));  // capacity + 1 entries at most
      }
      ++events.back().lost;
    }

    asio::any_io_executor ex;
    std::size_t capacity;
    std::deque<Event> events;
    detail::pending_handler<Event> waiter;
    bool closed = false;
  };

  // Holds the state weakly: a parked handler (which keeps this initiation alive inside a
  // coroutine frame) must not keep its own stream alive.
  struct initiate_next {
    std::weak_ptr<state> weak;
    asio::any_io_executor ex;
    template <class Handler>
    void operator()(Handler&& handler) const {
      detail::pending_handler<Event> h(std::forward<Handler>(handler), ex);
      auto s = weak.lock();
      if (!s) return h.complete(asio::error::operation_aborted, Event{});
      if (!s->events.empty()) {
        Event e = std::move(s->events.front());
        s->events.pop_front();
        return h.complete({}, std::move(e));
      }
      if (s->closed) return h.complete(asio::error::operation_aborted, Event{});
      if (s->waiter) return h.complete(asio::error::already_started, Event{});
      auto slot = h.cancellation_slot();
      s->waiter = std::move(h);
      if (slot.is_connected())
        slot.assign([weak = std::weak_ptr<state>(s)](asio::cancellation_type) {
          if (auto st = weak.lock(); st && st->waiter)
            std::exchange(st->waiter, {}).complete(asio::error::operation_aborted, Event{});
        });
    }
  };

  std::shared_ptr<state> s_;
};

namespace detail {

// The master's side: every open stream gets each event (the streams are held weakly, so a
// stream the user dropped is forgotten at the next event).
class event_hub {
 public:
  // False when nobody listens: the caller need not even build the event.
  bool has_subscribers() {
    std::erase_if(streams_, [](auto& w) { return w.expired(); });
    return !streams_.empty();
  }
  void add(const EventStream& stream) { streams_.push_back(stream.s_); }
  void emit(const Event& e) {
    for (auto& w : streams_)
      if (auto s = w.lock()) s->push(e);
  }
  // The master is going away: every subscriber's waiting next() fails.
  void close_all() {
    for (auto& w : streams_)
      if (auto s = w.lock()) s->close();
    streams_.clear();
  }

 private:
  std::vector<std::weak_ptr<EventStream::state>> streams_;
};

}  // namespace detail

}  // namespace cocluster
