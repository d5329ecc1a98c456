// An error line that clients or workers can cause once per connection (a connection closed
// because too many wait, a Dispatch function that throws): at most one such line per second
// from one place, so that an overload or a bad client cannot flood the log. The lines left out
// are counted; the next line written from that place says how many. Made with an executor, it
// also writes the count by itself once a whole second has passed with no line to carry it (the
// burst is over), and flush() writes it at once (the owner calls it as it closes; the
// destructor too): a burst's count is never lost for want of a later line.
//   rate_limited_log log(ex);   log.error("closing a connection: {}", why);   log.flush();
#pragma once

#include "cocluster/detail/config.hpp"

#include <asio/any_io_executor.hpp>
#include <asio/steady_timer.hpp>
#include <fmt/core.h>

#include <chrono>
#include <cstddef>
#include <memory>
#include <optional>
#include <string>
#include <system_error>
#include <utility>

#include "cocluster/detail/log.hpp"

namespace cocluster::detail {

class rate_limited_log {
 public:
  using clock = std::chrono::steady_clock;
  static constexpr clock::duration interval = std::chrono::seconds(1);

  rate_limited_log() = default;  // no executor: the count waits for the next line, or flush()
  explicit rate_limited_log(const asio::any_io_executor& ex) { state_->timer.emplace(ex); }
  rate_limited_log(const rate_limited_log&) = delete;
  rate_limited_log& operator=(const rate_limited_log&) = delete;
  ~rate_limited_log() { flush(); }  // (the timer goes with state_; its handler holds a weak_ptr)

  // log_error(format, args...) unless a line was written from here less than `interval` ago;
  // then only counted. Never throws.
  template <class... Args>
  void error(fmt::format_string<Args...> format, Args&&... args) noexcept {
    error_at(clock::now(), format, std::forward<Args>(args)...);
  }

  // The same at a given time (the tests' clock).
  template <class... Args>
  void error_at(clock::time_point now, fmt::format_string<Args...> format, Args&&... args) noexcept {
    state& s = *state_;
    if (s.written && now - s.last < interval) {
      s.last_counted = now;
      if (s.left_out++ == 0) s.flush_later(state_);
      return;
    }
    try {
      s.last_line = fmt::format(format, std::forward<Args>(args)...);
      std::string line = s.last_line;
      if (s.left_out > 0)
        line += fmt::format(" ({} more like this since the last such line, {} ms before, not logged)", s.left_out,
                            std::chrono::duration_cast<std::chrono::milliseconds>(now - s.last).count());
      log_error("{}", line);
    } catch (...) {
    }
    s.written = true;
    s.last = now;
    s.left_out = 0;
  }

  // Writes how many lines were left out since the last line written, if any, now, and stops
  // waiting to write it.
  void flush() noexcept {
    state_->flush_at(clock::now());
    if (state_->timer) state_->timer->cancel();
  }

  // What the executor's wait does at its end, at a given time (the tests' clock): writes the
  // count if no line was counted for `interval` (the burst is over; while it goes on, its next
  // line, written once `interval` has passed, carries the count and says why it is now), else
  // waits again until then.
  void flush_if_quiet_at(clock::time_point now) noexcept { state_->flush_if_quiet_at(state_, now); }

  // Lines counted and not written since the last line written.
  std::size_t left_out() const noexcept { return state_->left_out; }

 private:
  struct state {
    bool written = false;
    clock::time_point last{};          // the last line written (a count line too)
    clock::time_point last_counted{};  // the last line left out
    std::size_t left_out = 0;
    std::string last_line;                    // the last line written with a reason, without its count
    std::optional<asio::steady_timer> timer;  // with an executor: writes the count once quiet

    void flush_at(clock::time_point now) noexcept {
      if (left_out == 0) return;
      try {
        log_error("{} more like this in the {} ms before this line, not logged: {}", left_out,
                  std::chrono::duration_cast<std::chrono::milliseconds>(now - last).count(), last_line);
      } catch (...) {
      }
      last = now;  // a line was written: the next one within `interval` is counted again
      left_out = 0;
    }

    void flush_if_quiet_at(const std::shared_ptr<state>& self, clock::time_point now) noexcept {
      if (left_out == 0) return;
      if (now - last_counted >= interval) return flush_at(now);
      flush_later(self);
    }

    // Waits until `interval` after the last line left out (armed by the first one left out after
    // a line, and again only by the wait's own end: not a timer operation per line).
    void flush_later(const std::shared_ptr<state>& self) noexcept {
      if (!timer) return;
      try {
        timer->expires_at(last_counted + interval);
        timer->async_wait([weak = std::weak_ptr<state>(self)](std::error_code ec) {
          if (auto s = weak.lock(); s && !ec) s->flush_if_quiet_at(s, clock::now());
        });
      } catch (...) {  // (no memory for the wait: the count waits for the next line, or flush())
      }
    }
  };
  std::shared_ptr<state> state_ = std::make_shared<state>();
};

}  // namespace cocluster::detail
