// The master-wide event stream, for supervision loops (Node: cluster.on('fork'|'online'|...)).
//   auto& events = master.events();           // subscribe before forking to see every event
//   for (;;) { Event e = co_await events.next();  if (e.type == EventType::exit) co_await master.fork(); }
// A worker's own awaitables (online(), exited(), ...) complete before the matching event here.
#pragma once

#include "cocluster/detail/config.hpp"

#include <asio/use_awaitable.hpp>

#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <system_error>

#include "cocluster/address.hpp"
#include "cocluster/detail/async_queue.hpp"
#include "cocluster/exit_status.hpp"
#include "cocluster/settings.hpp"

namespace cocluster {

class Worker;

enum class EventType { fork, online, listening, message, disconnect, exit, error, setup };

inline std::string_view to_string(EventType t) {
  constexpr std::string_view names[] = {"fork", "online", "listening", "message", "disconnect", "exit", "error", "setup"};
  return names[static_cast<int>(t)];
}

struct Event {
  // A constructor rather than an aggregate, so that callers naming only the first fields
  // (Event{EventType::fork, w}) need not spell out the fields added since.
  Event() = default;
  Event(EventType t, std::shared_ptr<Worker> w, ExitStatus status = {}, std::error_code ec = {},
        std::string what = {}, Address a = {}, std::shared_ptr<const Settings> s = {})
      : type(t), worker(std::move(w)), exit(status), error(ec), detail(std::move(what)), address(std::move(a)),
        settings(std::move(s)) {}

  EventType type = EventType::error;
  std::shared_ptr<Worker> worker;  // null only for setup (and an error before any worker exists)
  ExitStatus exit;                 // for exit
  std::error_code error;           // for error
  std::string detail;              // for error: what happened, in words
  Address address;                 // for listening
  // For setup: the settings as they were then, defaults filled in (Node: the event's argument,
  // "advisory only"; master.settings() is the current value).
  std::shared_ptr<const Settings> settings;
};
// `message` says that worker->receive() has a message waiting; the message itself (and its
// handle, which has one owner) is taken with receive(). `listening` comes once per server a
// worker listens on through the master, after worker->listening() has the address.

class EventStream {
 public:
  explicit EventStream(asio::any_io_executor ex) : queue_(std::move(ex)) {}

  template <class CompletionToken = asio::use_awaitable_t<>>
  auto next(CompletionToken&& token = {}) {
    return queue_.async_pop(std::forward<CompletionToken>(token));
  }
  std::size_t pending() const noexcept { return queue_.size(); }

  void push(Event e) { queue_.push(std::move(e)); }

 private:
  detail::async_queue<Event> queue_;
};

}  // namespace cocluster
