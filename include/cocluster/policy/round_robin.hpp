// RoundRobin (Node: cluster.SCHED_RR, the default): the master accepts every connection and
// hands it to the next worker in turn that has room in its window; the worker acknowledges it.
//   cocluster::Master<cocluster::RoundRobin> master(ex, {}, cocluster::RoundRobin{.window = 4});
// The master keeps its copy of a connection until the worker's `accepted`, so a connection
// handed to a worker that dies or closes its server first goes to another worker.
#pragma once

#include "cocluster/detail/config.hpp"

#include <algorithm>
#include <deque>
#include <memory>

#include "cocluster/policy/handoff_listener.hpp"
#include "cocluster/policy/policy.hpp"

namespace cocluster {

namespace detail {

// Node: RoundRobinHandle. `free_` holds the workers with room in their window, in turn order:
// a worker goes to the back when it is handed a connection and still has room, or when an
// acknowledgement gives it room again.
class round_robin_listener : public HandoffListener {
 public:
  round_robin_listener(ListenerArgs args, std::size_t window) : HandoffListener(std::move(args)), window_(window) {}

 private:
  int choose() override { return free_.empty() ? 0 : free_.front(); }
  void on_joined(const Member& m) override {  // (back from a rest, it may still be full)
    if (m.in_flight < window_) free_.push_back(m.id);
  }
  void on_left(int id) override { free_.erase(std::remove(free_.begin(), free_.end(), id), free_.end()); }
  void on_handed(const Member& m) override {
    free_.pop_front();  // it was the front: choose() named it
    if (m.in_flight < window_) free_.push_back(m.id);
  }
  void on_acknowledged(const Member& m) override {
    if (m.in_flight + 1 == window_) free_.push_back(m.id);  // it was full: it has room again
  }

  std::size_t window_;
  std::deque<int> free_;
};

}  // namespace detail

struct RoundRobin {
  // Connections a worker may have been handed and not yet accepted (Node: 1). A larger window
  // keeps a worker busy while its acknowledgements travel, and lets hand-offs travel in
  // batches (up to 16 connections in one frame; a worker's refusals of one loop turn in one
  // message), at the price of connections waiting on a worker that is busy when another one
  // is idle. The default stays Node's 1: in policy_bench on a 2-core machine (2026-11-26,
  // benchmarks/README.md, three runs) a window of 8 made 0.99-1.09x the raw round-robin
  // master's connections/s at 8 workers against window 1's 0.86-0.98x, but 0.83-0.95x at 2
  // workers against 0.87-1.29x, and under wrk at 8 workers 0.78-0.86x against 0.80-1.03x. No
  // clear gain, and a stalled worker holds up to 8 connections instead of 1.
  std::size_t window = 1;  // 0 counts as 1 (there is no unbounded window), as in every policy here

  std::shared_ptr<Listener> make_listener(ListenerArgs args) const {
    return std::make_shared<detail::round_robin_listener>(std::move(args), std::max<std::size_t>(window, 1));
  }
};

}  // namespace cocluster
