// RuntimePolicy: RoundRobin or SharedSocket, chosen when the program runs (Node:
// cluster.schedulingPolicy from NODE_CLUSTER_SCHED_POLICY).
//   cocluster::Master<cocluster::RuntimePolicy> master(ex);   // COCLUSTER_SCHED_POLICY=rr|none
//   cocluster::Master<cocluster::RuntimePolicy> master(ex, {}, {cocluster::Scheduling::shared});
#pragma once

#include "cocluster/detail/config.hpp"

#include <cstdlib>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>

#include "cocluster/policy/round_robin.hpp"
#include "cocluster/policy/shared_socket.hpp"

namespace cocluster {

// Node: cluster.SCHED_RR / cluster.SCHED_NONE.
enum class Scheduling { round_robin, shared };

// "rr" or "none" (Node's spellings); nullopt for anything else.
inline std::optional<Scheduling> parse_scheduling(std::string_view name) {
  if (name == "rr") return Scheduling::round_robin;
  if (name == "none") return Scheduling::shared;
  return std::nullopt;
}

struct RuntimePolicy {
  RuntimePolicy() = default;
  RuntimePolicy(std::optional<Scheduling> s, std::size_t w = 1) : scheduling_override(s), window(w) {}

  // Unset: COCLUSTER_SCHED_POLICY, else NODE_CLUSTER_SCHED_POLICY, else round robin.
  std::optional<Scheduling> scheduling_override;
  std::size_t window = 1;  // as RoundRobin::window

  // The choice, read once (the Master freezes it when it is made). An unknown value in the
  // environment is an error, not a silent default: throws std::invalid_argument.
  Scheduling resolve() const {
    if (scheduling_override) return *scheduling_override;
    for (const char* name : {"COCLUSTER_SCHED_POLICY", "NODE_CLUSTER_SCHED_POLICY"}) {
      const char* value = std::getenv(name);
      if (!value || !*value) continue;
      if (auto s = parse_scheduling(value)) return *s;
      throw std::invalid_argument(std::string(name) + "=" + value + ": expected rr or none");
    }
    return Scheduling::round_robin;
  }

  detail::schedule scheduling() const {
    return resolve() == Scheduling::round_robin ? RoundRobin{window}.scheduling() : SharedSocket{}.scheduling();
  }
};

}  // namespace cocluster
