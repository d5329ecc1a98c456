// A completion handler for void(std::error_code, Args...) parked until an event happens,
// type-erased (Asio 1.22 has no any_completion_handler). It keeps its executor's work count
// up while parked. complete() posts; complete_inline() dispatches (runs the handler at once
// when called on its executor), which is only for callers that are not inside an initiating
// function and whose state is consistent: the handler may call back into them.
#pragma once

#include "cocluster/detail/config.hpp"

#include <asio/associated_cancellation_slot.hpp>
#include <asio/associated_executor.hpp>
#include <asio/any_io_executor.hpp>
#include <asio/dispatch.hpp>
#include <asio/post.hpp>
#include <asio/use_awaitable.hpp>

#include <memory>
#include <system_error>
#include <type_traits>
#include <utility>

#include "cocluster/detail/handler_work.hpp"

namespace cocluster::detail {

// The default token gets fast paths that complete without a trip through the scheduler when
// they can; any other token goes through async_initiate as usual.
template <class Token>
inline constexpr bool is_use_awaitable = std::is_same_v<std::decay_t<Token>, asio::use_awaitable_t<>>;

template <class... Args>
class pending_handler {
 public:
  pending_handler() = default;

  template <class Handler>
  pending_handler(Handler&& handler, const asio::any_io_executor& fallback)
      : impl_(std::make_unique<impl<std::decay_t<Handler>>>(std::forward<Handler>(handler), fallback)) {}

  explicit operator bool() const noexcept { return impl_ != nullptr; }

  asio::cancellation_slot cancellation_slot() const noexcept {
    return impl_ ? impl_->cancellation_slot() : asio::cancellation_slot();
  }

  // Clears the handler's cancellation slot, then posts the completion to its executor.
  void complete(std::error_code ec, Args... args) {
    auto p = std::move(impl_);
    p->complete(false, ec, std::move(args)...);
  }
  void complete_inline(std::error_code ec, Args... args) {
    auto p = std::move(impl_);
    p->complete(true, ec, std::move(args)...);
  }

 private:
  struct base {
    virtual ~base() = default;
    virtual asio::cancellation_slot cancellation_slot() const noexcept = 0;
    virtual void complete(bool dispatch, std::error_code ec, Args&&... args) = 0;
  };

  template <class Handler>
  struct impl final : base {
    using executor_type = asio::associated_executor_t<Handler, asio::any_io_executor>;

    impl(Handler h, const asio::any_io_executor& fallback)
        : handler(std::move(h)), work(asio::get_associated_executor(handler, fallback)) {}

    asio::cancellation_slot cancellation_slot() const noexcept override {
      return asio::get_associated_cancellation_slot(handler);
    }

    void complete(bool dispatch, std::error_code ec, Args&&... args) override {
      auto slot = asio::get_associated_cancellation_slot(handler);
      if (slot.is_connected()) slot.clear();
      auto ex = work.get_executor();
      auto f = [h = std::move(handler), ec, ... a = std::move(args)]() mutable { std::move(h)(ec, std::move(a)...); };
      // The guard goes after the handler is queued (or has run): dropping the work count to
      // zero first would stop an io_context that has not started running yet.
      if (dispatch) asio::dispatch(ex, std::move(f));
      else asio::post(ex, std::move(f));
      work.reset();
    }

    Handler handler;
    handler_work<executor_type> work;
  };

  std::unique_ptr<base> impl_;
};

}  // namespace cocluster::detail
