// Dispatch<F>: the user's function picks the worker of each connection from the client's
// address and the live workers (the child_process reference's routing by remoteAddress, as a
// policy; Node's cluster has no such hook). The master accepts and hands off as RoundRobin does.
//   auto route = [&](const cocluster::Remote& r, const cocluster::HandoffListener::Members& live) {
//     return r.address() == special ? special_id : normal_id;   // a worker id; 0: wait
//   };
//   cocluster::Master<cocluster::Dispatch<decltype(route)>> master(ex, {}, cocluster::Dispatch(route));
// `live` leaves out a worker that has just refused a connection (it had no fd left for it):
// it rests for HandoffListener::refusal_rest (100 ms), and the refused connection is asked for
// again without it.
// F is called on the master's executor when a connection is accepted, and again for one that
// waits for worker w when w takes a connection or leaves, or any worker joins (for one it gave
// 0 or an id not in `live`: when any worker takes a connection, leaves or joins, or another
// connection comes); it must not block. It returns a
// worker id from `live`. A worker whose window is full, 0 or an id not (yet) in `live` keeps
// the connection waiting in the master, in order, at most HandoffListener::max_waiting_per_worker
// per id: one more is closed, with a log line (F sees each worker's in_flight and can route
// around a full one); the first to wait for an id that does not listen here is logged too.
// HandoffListener::refuse closes it at once, and so does any other id below 0 (with a log
// line: no worker has one). If F throws, the connection is closed and the exception's what()
// logged; the master carries on.
#pragma once

#include "cocluster/detail/config.hpp"

#include <algorithm>
#include <concepts>
#include <exception>
#include <cstddef>
#include <memory>
#include <type_traits>
#include <utility>

#include "cocluster/detail/rate_limited_log.hpp"
#include "cocluster/policy/handoff_listener.hpp"
#include "cocluster/policy/policy.hpp"
#include "cocluster/policy/remote.hpp"

namespace cocluster {

namespace detail {

template <class F>
class dispatch_listener final : public HandoffListener {
 public:
  dispatch_listener(ListenerArgs args, const F& f, std::size_t window)
      : HandoffListener(std::move(args)), f_(f), window_(window), threw_(executor()) {}

 private:
  // choose() (HandoffListener's): accept while some worker has room; which one is F's to say.
  int choose_for(const Remote& remote) override {
    try {
      return static_cast<int>(f_(remote, members()));
    } catch (const std::exception& e) {
      threw_.error("Dispatch: the routing function threw: {}; the connection is closed", e.what());
    } catch (...) {
      threw_.error("Dispatch: the routing function threw; the connection is closed");
    }
    return refuse;
  }
  bool can_take(const Member& m) const override { return m.in_flight < window_; }
  void close() override {
    threw_.flush();  // the throws counted since its last line
    HandoffListener::close();
  }

  F f_;
  std::size_t window_;
  rate_limited_log threw_;  // a function that throws for every connection must not flood the log
};

}  // namespace detail

template <class F>
  requires std::copy_constructible<F> &&
           std::convertible_to<std::invoke_result_t<const F&, const Remote&, const HandoffListener::Members&>, int>
class Dispatch {
 public:
  // `window`: connections a worker may have been handed and not yet accepted (as RoundRobin's;
  // a full worker's connections wait for it, in order).
  explicit Dispatch(F f, std::size_t window = 8) : f_(std::move(f)), window_(std::max<std::size_t>(window, 1)) {}

  std::shared_ptr<Listener> make_listener(ListenerArgs args) const {
    return std::make_shared<detail::dispatch_listener<F>>(std::move(args), f_, window_);
  }

 private:
  F f_;
  std::size_t window_;
};

}  // namespace cocluster
