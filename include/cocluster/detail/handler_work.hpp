// Keeps a handler's executor counted as having work while the handler waits, so that an
// io_context running nothing else does not return from run() meanwhile (what Asio's own
// operations do for their handlers). asio::executor_work_guard alone does not do for every
// executor: a strand of an any_io_executor (asio::make_strand(co_await this_coro::executor))
// is an old-style executor to it, and its on_work_started() calls one any_io_executor lacks.
// A standard executor is therefore kept through the outstanding_work.tracked property, as
// Asio's handler_work does, and only the others through the guard.
//   handler_work<asio::associated_executor_t<H, asio::any_io_executor>> work(ex);  ...  work.reset();
#pragma once

#include "cocluster/detail/config.hpp"

#include <asio/execution/executor.hpp>
#include <asio/execution/outstanding_work.hpp>
#include <asio/executor_work_guard.hpp>
#include <asio/prefer.hpp>

#include <optional>
#include <type_traits>
#include <utility>

namespace cocluster::detail {

template <class Executor, class = void>
class handler_work {  // an old-style executor (on_work_started / on_work_finished)
 public:
  explicit handler_work(const Executor& ex) : guard_(ex) {}
  Executor get_executor() const noexcept { return guard_.get_executor(); }
  void reset() noexcept { guard_.reset(); }

 private:
  asio::executor_work_guard<Executor> guard_;
};

template <class Executor>
class handler_work<Executor, std::enable_if_t<asio::execution::is_executor<Executor>::value>> {
 public:
  explicit handler_work(const Executor& ex)
      : ex_(ex), tracked_(std::in_place, asio::prefer(ex, asio::execution::outstanding_work.tracked)) {}
  Executor get_executor() const noexcept { return ex_; }
  void reset() noexcept { tracked_.reset(); }

 private:
  using tracked_type =
      std::decay_t<decltype(asio::prefer(std::declval<const Executor&>(), asio::execution::outstanding_work.tracked))>;
  Executor ex_;
  std::optional<tracked_type> tracked_;
};

}  // namespace cocluster::detail
