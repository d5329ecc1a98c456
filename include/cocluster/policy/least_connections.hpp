// LeastConnections (HAProxy's leastconn): the master hands each connection to the worker with
// the fewest connections open, so a worker holding long-lived connections gets fewer new ones.
//   cocluster::Master<cocluster::LeastConnections> master(ex);   // COCLUSTER_SCHED_POLICY=leastconn
// A worker's load is its last count of open connections (OpenConnections, coalesced: at most
// one message per turn of its event loop or per millisecond, and only when the count
// changed), plus the hand-offs it has acknowledged since that report (each ack is written at
// once, the report later: a worker whose loop then blocks would look idle), plus what the
// master has handed to it and not yet had acknowledged. Of the connections the master handed
// it, it never counts fewer than the worker holds (one may count twice until the next
// report). Equal loads take turns.
// A blocked worker looks light (it holds few connections, a busy one many): one that fell
// behind (HandoffListener::slow_ack) has a window of 1 until it keeps pace again
// (HandoffListener::Member::window), so it holds one connection, not 8, at each block after
// the first.
// The master accepts and hands off as RoundRobin does.
#pragma once

#include "cocluster/detail/config.hpp"

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>

#include "cocluster/policy/handoff_listener.hpp"
#include "cocluster/policy/policy.hpp"

namespace cocluster {

namespace detail {

class least_connections_listener final : public HandoffListener {
 public:
  least_connections_listener(ListenerArgs args, std::size_t window)
      : HandoffListener(std::move(args)), window_(window) {}

 private:
  // Looks at the members in turn from the one after the last chosen, so that equal loads
  // rotate (HAProxy's leastconn does round robin among equals too).
  int choose() override {
    const auto& all = members();
    if (all.empty()) return 0;
    int best = 0;
    std::size_t best_load = 0;
    auto it = all.upper_bound(last_);
    for (std::size_t n = 0; n < all.size(); ++n, ++it) {
      if (it == all.end()) it = all.begin();
      const Member& m = it->second;
      if (m.in_flight >= m.window(window_)) continue;  // full (a worker that fell behind: at 1)
      const std::size_t load = open_connections(m.id) + m.in_flight;
      if (best == 0 || load < best_load) best = m.id, best_load = load;
    }
    return best;
  }
  void on_joined(const Member& m) override { count_connections(m.id); }
  void on_handed(const Member& m) override { last_ = m.id; }

  std::size_t window_;
  int last_ = 0;  // the member handed the last connection
};

}  // namespace detail

struct LeastConnections {
  // Connections a worker may have been handed and not yet accepted, as RoundRobin's.
  std::size_t window = 8;

  std::shared_ptr<Listener> make_listener(ListenerArgs args) const {
    return std::make_shared<detail::least_connections_listener>(std::move(args), std::max<std::size_t>(window, 1));
  }
};

}  // namespace cocluster
