// An error line that clients or workers can cause once per connection (a connection closed
// because too many wait, a Dispatch function that throws): at most one such line per second
// from one place, so that an overload or a bad client cannot flood the log. The next line
// written from that place says how many were left out before it.
#pragma once

#include "cocluster/detail/config.hpp"

#include <fmt/core.h>

#include <chrono>
#include <cstddef>
#include <string>
#include <utility>

#include "cocluster/detail/log.hpp"

namespace cocluster::detail {

class rate_limited_log {
 public:
  using clock = std::chrono::steady_clock;
  static constexpr clock::duration interval = std::chrono::seconds(1);

  // log_error(format, args...) unless a line was written from here less than `interval` ago;
  // then only counted. Never throws.
  template <class... Args>
  void error(fmt::format_string<Args...> format, Args&&... args) noexcept {
    error_at(clock::now(), format, std::forward<Args>(args)...);
  }

  // The same at a given time (the tests' clock).
  template <class... Args>
  void error_at(clock::time_point now, fmt::format_string<Args...> format, Args&&... args) noexcept {
    if (written_ && now - last_ < interval) {
      ++left_out_;
      return;
    }
    try {
      std::string line = fmt::format(format, std::forward<Args>(args)...);
      if (left_out_ > 0)
        line += fmt::format(" ({} more like this since the last such line, {} ms before, not logged)", left_out_,
                            std::chrono::duration_cast<std::chrono::milliseconds>(now - last_).count());
      log_error("{}", line);
    } catch (...) {
    }
    written_ = true;
    last_ = now;
    left_out_ = 0;
  }

  // Lines counted and not written since the last one written.
  std::size_t left_out() const noexcept { return left_out_; }

 private:
  bool written_ = false;
  clock::time_point last_{};
  std::size_t left_out_ = 0;
};

}  // namespace cocluster::detail
