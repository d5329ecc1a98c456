// cocluster's own error conditions, as std::error_code in the `cocluster` category.
//   catch (const std::system_error& e) { if (e.code() == cocluster::error::channel_closed) ... }
// System errors stay in std::system_category().
#pragma once

#include "cocluster/detail/config.hpp"

#include <string>
#include <system_error>

namespace cocluster {

enum class error {
  channel_closed = 1,     // the channel was closed (locally or by EOF) before the operation ran
  protocol_error,         // the peer sent something that is not our protocol
  message_too_large,      // a message is larger than ChannelOptions::max_message_size
  worker_not_connected,   // send/disconnect on a worker whose channel is gone
  worker_exited,          // the worker process ended before the awaited event
  not_a_worker,           // a worker-side call in the master
  // Supervisor (supervisor.hpp):
  restart_limit_reached,  // more crashes than SupervisorSettings::max_restarts in restart_window
  boot_timeout,           // a worker was not ready within SupervisorSettings::boot_timeout
  reload_rolled_back,     // a reload's replacement did not become ready: the old workers stay
  workers_killed,         // a stop had to kill workers that did not drain in time
  supervisor_stopped,     // the supervisor is stopping or stopped
  // exec failures are the system errno (ENOENT, EACCES, ...) with the path in what()
};

namespace detail {
class error_category final : public std::error_category {
 public:
  const char* name() const noexcept override { return "cocluster"; }
  std::string message(int ev) const override {
    switch (static_cast<error>(ev)) {
      case error::channel_closed: return "channel closed";
      case error::protocol_error: return "protocol error";
      case error::message_too_large: return "message too large";
      case error::worker_not_connected: return "worker not connected";
      case error::worker_exited: return "worker exited";
      case error::not_a_worker: return "not a worker process";
      case error::restart_limit_reached: return "too many worker restarts in the restart window";
      case error::boot_timeout: return "a worker was not ready within the boot timeout";
      case error::reload_rolled_back: return "reload rolled back: a replacement was not ready in time";
      case error::workers_killed: return "workers were killed after the drain timeout";
      case error::supervisor_stopped: return "the supervisor is stopping";
    }
    return "unknown cocluster error";
  }
};
}  // namespace detail

inline const std::error_category& error_category() noexcept {
  static const detail::error_category category;
  return category;
}

inline std::error_code make_error_code(error e) noexcept {
  return {static_cast<int>(e), error_category()};
}

}  // namespace cocluster

template <>
struct std::is_error_code_enum<cocluster::error> : std::true_type {};
