// RoundRobin (Node: cluster.SCHED_RR, the default): the master accepts every connection and
// hands it to the worker idle longest, or, when none is idle, to the least busy one that has
// room in its window (free_levels); the worker acknowledges it.
//   cocluster::Master<cocluster::RoundRobin> master(ex, {}, cocluster::RoundRobin{.window = 4});
// The master keeps its copy of a connection until the worker's `accepted`, so a connection
// handed to a worker that dies or closes its server first goes to another worker.
#pragma once

#include "cocluster/detail/config.hpp"

#include <algorithm>
#include <memory>
#include <vector>

#include "cocluster/policy/handoff_listener.hpp"
#include "cocluster/policy/policy.hpp"

namespace cocluster {

namespace detail {

// Node: RoundRobinHandle's free list, kept per number of unacknowledged hand-offs: level k
// holds the workers that have k (fewer than their window: the policy's, or 1 for a worker that
// fell behind, HandoffListener::Member::window), in the order they came to it. The
// next connection goes to the first of the lowest level that has one: to an idle worker
// whenever there is one, the one idle longest, as in Node (where a worker is free once it has
// acknowledged); only when none is idle, to the least busy, in turn. A worker that is slow to
// accept (a blocked loop) therefore gets another connection only when every other worker
// has as many waiting. At a window of 1 there is one level: Node's free list.
class free_levels {
 public:
  // The worker that takes the next connection; 0 when every one is full (or there is none).
  int next() const noexcept {
    for (const auto& level : levels_)
      if (!level.empty()) return level.front();
    return 0;
  }
  // `id` has `in_flight` now, and had `before` (it was in that level if it had room); it has
  // room while in_flight is below `window` (its own: HandoffListener::Member::window).
  void moved(int id, std::size_t before, std::size_t in_flight, std::size_t window) {
    if (before < levels_.size()) std::erase(levels_[before], id);
    enter(id, in_flight, window);
  }
  // `id` starts (or starts again) with `in_flight`, at the back of its level.
  void joined(int id, std::size_t in_flight, std::size_t window) {
    left(id);
    enter(id, in_flight, window);
  }
  void left(int id) {
    for (auto& level : levels_) std::erase(level, id);
  }

 private:
  void enter(int id, std::size_t in_flight, std::size_t window) {
    if (in_flight >= window) return;  // full: in no level until it acknowledges
    if (levels_.size() <= in_flight) levels_.resize(in_flight + 1);
    levels_[in_flight].push_back(id);
  }

  // Levels 0 to the highest number of unacknowledged hand-offs a worker has had (at most a
  // window's); a few workers each, so erasing from one is cheap.
  std::vector<std::vector<int>> levels_;
};

class round_robin_listener : public HandoffListener {
 public:
  round_robin_listener(ListenerArgs args, std::size_t window) : HandoffListener(std::move(args)), window_(window) {}

 private:
  int choose() override { return free_.next(); }
  void on_joined(const Member& m) override {  // (back from a rest: it may have some)
    free_.joined(m.id, m.in_flight, m.window(window_));
  }
  void on_left(int id) override { free_.left(id); }
  void on_handed(const Member& m) override { free_.moved(m.id, m.in_flight - 1, m.in_flight, m.window(window_)); }
  void on_acknowledged(const Member& m) override {  // (falling behind makes its window 1)
    free_.moved(m.id, m.in_flight + 1, m.in_flight, m.window(window_));
  }

  std::size_t window_;
  free_levels free_;
};

}  // namespace detail

struct RoundRobin {
  // Connections a worker may have been handed and not yet accepted (8; Node: 1). Whatever the
  // window, an idle worker gets the next connection when there is one (free_levels); a window
  // over 1 lets the master hand a connection to a busy worker when none is idle instead of
  // waiting for an ack, and lets hand-offs travel in batches (up to 16 connections in one
  // frame; a worker's refusals of one loop turn in one message). A worker whose loop blocks
  // holds what it was handed meanwhile: once it has fallen behind (HandoffListener::slow_ack)
  // its window is 1 until it keeps pace again, so it holds one connection at each block, not
  // `window`. Measured on a 2-core machine (2026-11-27,
  // benchmarks/README.md, "RoundRobin's window"): under wrk, window 1 made 0.63x the raw
  // round-robin master's connections/s, 2 made 0.69x, 4 0.84x, 8 0.86x (2 workers; 8 workers:
  // 0.80, 0.83, 0.84x); with one worker blocking its loop 50 ms on one request in ten, the close
  // p99 over five runs was 7.1-10.9 ms at window 1, 6.2-7.1 at 2, 5.5-12.6 at 4, 4.6-7.0 at 8
  // (before the window of 1 for a worker that fell behind: 53.7-103.0 ms in most runs at 4, 8).
  // So the default is 8: Node's window of 1 makes the master wait for an ack whenever no worker
  // is idle. RoundRobin{.window = 1} schedules as Node's round robin does.
  std::size_t window = 8;  // 0 counts as 1 (there is no unbounded window), as in every policy here

  std::shared_ptr<Listener> make_listener(ListenerArgs args) const {
    return std::make_shared<detail::round_robin_listener>(std::move(args), std::max<std::size_t>(window, 1));
  }
};

}  // namespace cocluster
