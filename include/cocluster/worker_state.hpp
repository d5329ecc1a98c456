// Node: worker.state, in the master and in the worker.
#pragma once

#include "cocluster/detail/config.hpp"

#include <string_view>

namespace cocluster {

// The master's view moves none → online → listening → disconnected → dead (listening at the
// first server; a worker that never listens goes from online to disconnected). A worker's view
// of itself: none before this_worker.start(), then online, listening, disconnected.
enum class WorkerState { none, online, listening, disconnected, dead };

inline std::string_view to_string(WorkerState s) {
  constexpr std::string_view names[] = {"none", "online", "listening", "disconnected", "dead"};
  return names[static_cast<int>(s)];
}

}  // namespace cocluster
