// (Master process.) How much memory a worker holds: its resident set, from /proc/PID/statm, for
// a Supervisor's recycling (SupervisorSettings::max_memory).
//   if (auto rss = detail::resident_bytes(w->pid()); rss && *rss > limit) recycle(w);
#pragma once

#include "cocluster/detail/config.hpp"

#include <sys/types.h>
#include <unistd.h>

#include <cstddef>
#include <fstream>
#include <optional>
#include <string>

namespace cocluster::detail {

// The resident set size of `pid` in bytes; nullopt if it cannot be read (the process is gone).
inline std::optional<std::size_t> resident_bytes(pid_t pid) {
  std::ifstream statm("/proc/" + std::to_string(pid) + "/statm");
  std::size_t size = 0, resident = 0;
  if (!(statm >> size >> resident)) return std::nullopt;
  return resident * static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
}

}  // namespace cocluster::detail
