// LeastConnections (HAProxy's leastconn): the master hands each connection to the worker with
// the fewest connections open, so a worker holding long-lived connections gets fewer new ones.
//   cocluster::Master<cocluster::LeastConnections> master(ex);   // COCLUSTER_SCHED_POLICY=leastconn
// Each worker reports its count of open connections (OpenConnections, coalesced: at most one
// message per turn of its event loop, and only when the count changed); the master adds what
// it has handed to the worker since and not yet had acknowledged. Ties go to the lowest id.
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
  int choose() override {
    int best = 0;
    std::size_t best_load = 0;
    for (auto& [id, m] : members()) {
      if (m.in_flight >= window_) continue;
      const std::size_t load = open_connections(id) + m.in_flight;
      if (best == 0 || load < best_load) best = id, best_load = load;
    }
    return best;
  }
  void on_joined(const Member& m) override { count_connections(m.id); }

  std::size_t window_;
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
