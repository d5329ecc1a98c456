// cocluster's only output: debug lines when COCLUSTER_DEBUG=1 or NODE_DEBUG contains
// "cluster", in Node's format ("<pid>,Master Worker <pid> online"), and error lines always.
#pragma once

#include "cocluster/detail/config.hpp"

#include <unistd.h>

#include <fmt/core.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string_view>

#include "cocluster/detail/worker_identity.hpp"
#include "cocluster/log.hpp"

namespace cocluster::detail {

inline bool debug_enabled() {
  static const bool enabled = [] {
    const char* ours = std::getenv("COCLUSTER_DEBUG");
    if (ours && *ours && std::strcmp(ours, "0") != 0) return true;
    const char* node = std::getenv("NODE_DEBUG");
    return node && std::strstr(node, "cluster") != nullptr;
  }();
  return enabled;
}

inline const char* process_role() { return identity().is_worker ? "Worker" : "Master"; }

// One finished line to the sink, or to stderr. Never throws.
inline void write_line(LogLevel level, const std::string& line) noexcept {
  try {
    if (auto& sink = log_sink()) return sink(level, line);
    fmt::print(stderr, "{}\n", line);
  } catch (...) {
  }
}

// Logging never throws: it runs in the middle of teardown paths (a closed stderr must not
// leave a worker half disconnected).
template <class... Args>
void debug(fmt::format_string<Args...> format, Args&&... args) noexcept {
  if (!debug_enabled()) return;
  try {
    write_line(LogLevel::debug,
               fmt::format("{},{} {}", ::getpid(), process_role(), fmt::format(format, std::forward<Args>(args)...)));
  } catch (...) {
  }
}

template <class... Args>
void log_error(fmt::format_string<Args...> format, Args&&... args) noexcept {
  try {
    write_line(LogLevel::error, fmt::format("cocluster: {} {}: {}", process_role(), ::getpid(),
                                            fmt::format(format, std::forward<Args>(args)...)));
  } catch (...) {
  }
}

}  // namespace cocluster::detail
