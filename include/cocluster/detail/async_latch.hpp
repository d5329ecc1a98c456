// A one-shot event with a value (cppcoro's async_manual_reset_event, carrying a result):
// every waiter, before or after set(), completes with the same result.
//   detail::async_latch<int> exited(ex);  exited.set(3);  int code = co_await exited.async_wait(asio::use_awaitable);
// Waiting honours per-operation cancellation (completes with asio::error::operation_aborted).
#pragma once

#include "cocluster/detail/config.hpp"

#include <asio/async_result.hpp>
#include <asio/error.hpp>

#include <list>
#include <optional>
#include <tuple>

#include "cocluster/detail/pending_handler.hpp"

namespace cocluster::detail {

template <class... Args>
class async_latch {
 public:
  explicit async_latch(asio::any_io_executor ex) : ex_(std::move(ex)) {}
  async_latch(const async_latch&) = delete;
  async_latch& operator=(const async_latch&) = delete;
  ~async_latch() { release(asio::error::operation_aborted, Args{}...); }

  bool is_set() const noexcept { return result_.has_value(); }

  // The first set() or fail() wins; later calls are ignored.
  void set(Args... args) { settle({}, std::move(args)...); }
  void fail(std::error_code ec) { settle(ec, Args{}...); }

  template <class Token>
  auto async_wait(Token&& token) {
    return asio::async_initiate<Token, void(std::error_code, Args...)>(
        [this](auto handler) {
          pending_handler<Args...> h(std::move(handler), ex_);
          if (result_) {
            std::apply([&](auto&&... r) { h.complete(r...); }, *result_);
            return;
          }
          park(std::move(h));
        },
        token);
  }

 private:
  using waiter_list = std::list<pending_handler<Args...>>;

  void park(pending_handler<Args...> h) {
    auto slot = h.cancellation_slot();
    waiters_.push_back(std::move(h));
    if (slot.is_connected()) {
      auto it = std::prev(waiters_.end());
      slot.assign([this, it](asio::cancellation_type) {
        auto w = std::move(*it);
        waiters_.erase(it);
        w.complete(asio::error::operation_aborted, Args{}...);
      });
    }
  }

  void settle(std::error_code ec, Args... args) {
    if (result_) return;
    result_.emplace(ec, args...);
    release(ec, std::move(args)...);
  }

  void release(std::error_code ec, const Args&... args) {
    waiter_list waiters = std::move(waiters_);
    waiters_.clear();
    for (auto& w : waiters) w.complete(ec, args...);
  }

  asio::any_io_executor ex_;
  std::optional<std::tuple<std::error_code, Args...>> result_;
  waiter_list waiters_;
};

}  // namespace cocluster::detail
