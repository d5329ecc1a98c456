// RuntimePolicy: a policy chosen by name when the program runs (Node:
// cluster.schedulingPolicy from NODE_CLUSTER_SCHED_POLICY). Node's rr and none, and ours
// beyond Node: sticky, leastconn, reuseport.
//   cocluster::Master<cocluster::RuntimePolicy> master(ex);   // COCLUSTER_SCHED_POLICY=rr|none|sticky|leastconn|reuseport
//   cocluster::Master<cocluster::RuntimePolicy> master(ex, {}, {cocluster::Scheduling::shared});
#pragma once

#include "cocluster/detail/config.hpp"

#include <cstdlib>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>

#include "cocluster/policy/least_connections.hpp"
#include "cocluster/policy/reuse_port.hpp"
#include "cocluster/policy/round_robin.hpp"
#include "cocluster/policy/shared_socket.hpp"
#include "cocluster/policy/sticky.hpp"

namespace cocluster {

// Node: cluster.SCHED_RR / cluster.SCHED_NONE; then the policies Node does not have.
enum class Scheduling { round_robin, shared, sticky, least_connections, reuse_port };

// The names COCLUSTER_SCHED_POLICY takes, for messages.
inline constexpr const char* scheduling_names = "rr or none, or beyond Node: sticky, leastconn or reuseport";

// Each Scheduling's name: "rr" and "none" (Node's spellings), "sticky", "leastconn", "reuseport".
constexpr const char* scheduling_name(Scheduling s) noexcept {
  switch (s) {
    case Scheduling::round_robin: return "rr";
    case Scheduling::shared: return "none";
    case Scheduling::sticky: return "sticky";
    case Scheduling::least_connections: return "leastconn";
    case Scheduling::reuse_port: return "reuseport";
  }
  return "";  // not reached: every Scheduling is above
}

// The Scheduling named `name` (scheduling_name's); nullopt for anything else.
inline std::optional<Scheduling> parse_scheduling(std::string_view name) {
  for (Scheduling s : {Scheduling::round_robin, Scheduling::shared, Scheduling::sticky, Scheduling::least_connections,
                       Scheduling::reuse_port})
    if (name == scheduling_name(s)) return s;
  return std::nullopt;
}

struct RuntimePolicy {
  // The choice is made here, once (Node freezes cluster.schedulingPolicy too): `s` if given,
  // else COCLUSTER_SCHED_POLICY, else NODE_CLUSTER_SCHED_POLICY, else round robin. An unknown
  // value in the environment is an error, not a silent default: throws std::invalid_argument.
  // `window`: the chosen policy's window (RoundRobin::window, Sticky's, LeastConnections');
  // without it each policy keeps its own default, as when it is named as a type (RoundRobin:
  // 8, Node's 1; Sticky and LeastConnections: 8). SharedSocket and ReusePort have none.
  RuntimePolicy(std::optional<Scheduling> s = std::nullopt, std::optional<std::size_t> window = std::nullopt)
      : window_(window) {
    if (s) choice_ = *s;
    else read_environment();
  }

  Scheduling resolve() const noexcept { return choice_; }
  // The environment variable the choice was read from; null when it was given, or is the default.
  const char* environment_variable() const noexcept { return variable_; }
  std::optional<std::size_t> window() const noexcept { return window_; }  // as given
  // Whether the chosen policy has a window to set (it hands connections off: RoundRobin,
  // Sticky, LeastConnections). A window given for SharedSocket or ReusePort is not used.
  bool has_window() const noexcept {
    switch (choice_) {
      case Scheduling::round_robin:
      case Scheduling::sticky:
      case Scheduling::least_connections: return true;
      case Scheduling::shared:
      case Scheduling::reuse_port: return false;
    }
    return false;  // not reached: every Scheduling is above
  }
  bool reuse_port() const noexcept { return choice_ == Scheduling::reuse_port; }  // as ReusePort's

  std::shared_ptr<Listener> make_listener(ListenerArgs args) const {
    switch (choice_) {
      case Scheduling::round_robin: return with_window(RoundRobin{}).make_listener(std::move(args));
      case Scheduling::shared: return SharedSocket{}.make_listener(std::move(args));
      case Scheduling::sticky: return with_window(Sticky{}).make_listener(std::move(args));
      case Scheduling::least_connections: return with_window(LeastConnections{}).make_listener(std::move(args));
      case Scheduling::reuse_port: return ReusePort{}.make_listener(std::move(args));
    }
    return nullptr;  // not reached: every Scheduling is above
  }

 private:
  template <class Policy>
  Policy with_window(Policy p) const {
    if (window_) p.window = *window_;
    return p;
  }

  void read_environment() {
    for (const char* name : {"COCLUSTER_SCHED_POLICY", "NODE_CLUSTER_SCHED_POLICY"}) {
      const char* value = std::getenv(name);
      if (!value || !*value) continue;
      auto s = parse_scheduling(value);
      if (!s) throw std::invalid_argument(std::string(name) + "=" + value + ": expected " + scheduling_names);
      choice_ = *s;
      variable_ = name;
      return;
    }
  }

  Scheduling choice_ = Scheduling::round_robin;  // Node's default
  const char* variable_ = nullptr;
  std::optional<std::size_t> window_;
};

}  // namespace cocluster
