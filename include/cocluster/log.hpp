// Where cocluster's few lines go: its debug lines (COCLUSTER_DEBUG=1 or NODE_DEBUG=cluster, in
// Node's format "<pid>,Master Worker <pid> online") and its error lines ("cocluster: Master
// <pid>: ..."). By default both are written to stderr; a program with its own logging takes
// them instead:
//   cocluster::set_log_sink([](cocluster::LogLevel level, std::string_view line) { my_log(level, line); });
// The sink is process-wide (set it before starting the master or the worker runtime), runs on
// the thread that logs, and must not throw (what it throws is dropped). It can be called until
// the Master is destroyed (a listener closing writes the count of the lines it left out): what
// it uses must outlive the Master, or set another sink before.
#pragma once

#include "cocluster/detail/config.hpp"

#include <functional>
#include <string_view>
#include <utility>

namespace cocluster {

enum class LogLevel { debug, error };

// One line, without its newline.
using LogSink = std::function<void(LogLevel, std::string_view)>;

namespace detail {
inline LogSink& log_sink() {
  static LogSink sink;  // empty: stderr
  return sink;
}
}  // namespace detail

// An empty sink restores stderr.
inline void set_log_sink(LogSink sink) { detail::log_sink() = std::move(sink); }

}  // namespace cocluster
