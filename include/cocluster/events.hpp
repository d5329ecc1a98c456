// The master-wide event stream, for supervision loops (Node: cluster.on('fork'|'online'|...)).
//   auto& events = master.events();           // subscribe before forking to see every event
//   for (;;) { Event e = co_await events.next();  if (e.type == EventType::exit) co_await master.fork(); }
// A worker's own awaitables (online(), exited(), ...) complete before the matching event here.
#pragma once

#include "cocluster/detail/config.hpp"

#include <asio/use_awaitable.hpp>

#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <system_error>

#include "cocluster/address.hpp"
#include "cocluster/detail/async_queue.hpp"
#include "cocluster/exit_status.hpp"
#include "cocluster/settings.hpp"
#include "cocluster/worker_state.hpp"

namespace cocluster {

class Worker;

enum class EventType { fork, online, listening, message, disconnect, exit, error, setup };

inline std::string_view to_string(EventType t) {
  constexpr std::string_view names[] = {"fork", "online", "listening", "message", "disconnect", "exit", "error", "setup"};
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
};
// `message` says that worker->receive() has a message waiting; the message itself (and its
// handle, which has one owner) is taken with receive(). `listening` comes once per server a
// worker listens on through the master, after worker->listening() has the address.

class EventStream {
 public:
  using executor_type = asio::any_io_executor;
  explicit EventStream(asio::any_io_executor ex) : ex_(ex), queue_(std::move(ex)) {}

  const executor_type& get_executor() const noexcept { return ex_; }

  // The next event, in order. Signature: void(std::error_code, Event). Cancellation
  // (per-operation, terminal): no event is lost.
  template <class CompletionToken = asio::use_awaitable_t<>>
  auto next(CompletionToken&& token = {}) {
    return queue_.async_pop(std::forward<CompletionToken>(token));
  }
  std::size_t pending() const noexcept { return queue_.size(); }

  void push(Event e) { queue_.push(std::move(e)); }

 private:
  asio::any_io_executor ex_;
  detail::async_queue<Event> queue_;
};

}  // namespace cocluster
