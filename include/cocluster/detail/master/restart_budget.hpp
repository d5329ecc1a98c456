// (Master process.) How a Supervisor paces the replacement of crashed workers: an exponential
// backoff that starts again after a stable uptime (PM2's exp_backoff_restart_delay), and a
// restart intensity, at most `max_restarts` in any `window` (Erlang/OTP's intensity/period,
// systemd's StartLimitBurst/StartLimitIntervalSec). Every crash is charged, however long the
// worker ran. Pure bookkeeping: the caller owns the clock and the timers.
//   if (!budget.charge(now)) fail();  else wait(budget.next_delay(uptime)), then fork.
#pragma once

#include "cocluster/detail/config.hpp"

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <deque>

namespace cocluster::detail {

class restart_budget {
 public:
  using clock = std::chrono::steady_clock;

  struct limits {
    std::size_t max_restarts;
    clock::duration window;
    clock::duration first_delay;
    double factor;
    clock::duration max_delay;
    clock::duration reset_after;
  };

  explicit restart_budget(limits l) : limits_(l) {}

  // One more restart at `now`. False when it would be more than max_restarts within the window
  // ending at `now`: the caller stops restarting.
  bool charge(clock::time_point now) {
    while (!recent_.empty() && now - recent_.front() >= limits_.window) recent_.pop_front();
    recent_.push_back(now);
    if (recent_.size() > limits_.max_restarts + 1) recent_.pop_front();
    return recent_.size() <= limits_.max_restarts;
  }
  // Restarts charged in the window ending at `now`.
  std::size_t recent(clock::time_point now) const {
    return static_cast<std::size_t>(std::count_if(recent_.begin(), recent_.end(),
                                                  [&](auto t) { return now - t < limits_.window; }));
  }

  // The wait before the next replacement of a worker that ran for `uptime`: first_delay, then
  // factor times the previous one up to max_delay; from first_delay again after a worker ran
  // reset_after or longer.
  clock::duration next_delay(clock::duration uptime) {
    if (uptime >= limits_.reset_after || delay_ == clock::duration::zero()) {
      delay_ = limits_.first_delay;
    } else {
      const auto grown = std::chrono::duration_cast<clock::duration>(delay_ * limits_.factor);
      delay_ = std::min(std::max(grown, delay_), limits_.max_delay);
    }
    return delay_;
  }

 private:
  limits limits_;
  std::deque<clock::time_point> recent_;  // at most max_restarts + 1 entries
  clock::duration delay_{};
};

}  // namespace cocluster::detail
