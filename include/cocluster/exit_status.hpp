// How a worker process ended: an exit code, or the signal that killed it.
// Node: the (code, signal) pair of the 'exit' event; signal_name() gives Node's string.
#pragma once

#include "cocluster/detail/config.hpp"

#include <signal.h>
#include <string.h>

#include <string>

namespace cocluster {

struct ExitStatus {
  int code = 0;    // exit code when the process exited by itself
  int signal = 0;  // the signal that killed it, 0 when it exited by itself

  bool killed_by_signal() const noexcept { return signal != 0; }
  // "SIGKILL" for SIGKILL, "" when no signal killed it.
  std::string signal_name() const {
    if (signal == 0) return {};
    const char* abbrev = ::sigabbrev_np(signal);
    return abbrev ? std::string("SIG") + abbrev : std::to_string(signal);
  }
  friend bool operator==(const ExitStatus&, const ExitStatus&) = default;
};

}  // namespace cocluster
