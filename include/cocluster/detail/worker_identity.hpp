// Which process this is: a worker knows its id and its channel from two environment variables
// the master sets (Node: NODE_UNIQUE_ID). They are read once, at the first question, and
// this_worker.start() then removes them, so programs the worker runs are masters again.
//   if (detail::identity().is_worker) { int id = detail::identity().id; ... }
#pragma once

#include "cocluster/detail/config.hpp"

#include <charconv>
#include <cstdlib>
#include <string_view>

namespace cocluster::detail {

// The names the master sets in a worker's environment (and nowhere else).
inline constexpr const char* worker_id_variable = "COCLUSTER_WORKER_ID";
inline constexpr const char* channel_fd_variable = "COCLUSTER_CHANNEL_FD";
// Set to 1 by a Supervisor that handles signals: see detail/worker/master_signals.hpp.
inline constexpr const char* master_signals_variable = "COCLUSTER_MASTER_SIGNALS";

struct worker_identity {
  bool is_worker = false;  // the id variable is set, whatever its value
  int id = -1;             // -1 when absent or not a number
  int channel_fd = -1;
};

inline int env_int(const char* name) {
  const char* v = std::getenv(name);
  int out = -1;
  if (!v) return -1;
  std::string_view s(v);
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), out);
  return ec == std::errc() && p == s.data() + s.size() ? out : -1;
}

// Read on first use and kept for the life of the process (a forked child without exec keeps
// it too, as it keeps the rest of its parent's memory).
inline const worker_identity& identity() noexcept {
  static const worker_identity self = [] {
    worker_identity w;
    w.is_worker = std::getenv(worker_id_variable) != nullptr;
    w.id = env_int(worker_id_variable);
    w.channel_fd = env_int(channel_fd_variable);
    return w;
  }();
  return self;
}

// Node deletes NODE_UNIQUE_ID once the worker has set up for the same reason: a program
// this worker runs (or a library that looks) must not believe it is a cocluster worker.
inline void forget_identity_in_environment() noexcept {
  (void)identity();  // read before it goes
  ::unsetenv(worker_id_variable);
  ::unsetenv(channel_fd_variable);
}

}  // namespace cocluster::detail
