// For an operation whose failure has a description that use_awaitable's exception should keep
// (Master::fork: "execve /path", "setuid(65534) for ..."): the operation is one Asio
// initiation for every completion token (use_awaitable, as_tuple(use_awaitable), use_future, a
// callback, deferred, detached, ...); the others complete what is ready with complete_now
// (detail/completion.hpp), which cannot carry a description:
//   return detail::async_operation<void(std::error_code, std::shared_ptr<Worker>)>(
//       std::forward<Token>(token), [this] { return start_now(); }, initiate_fork{this});
// `try_now` says whether the operation can complete at once: an empty optional (wait: run
// the initiation), or the result. With use_awaitable the result is returned without
// suspending the coroutine (no trip through the scheduler: the fast path of a receive loop
// over queued messages); with any other token the initiation runs, and it completes
// through the handler's executor as Asio requires. For an error, use_awaitable throws
// std::system_error(ec, what) with the result's `what`.
#pragma once

#include "cocluster/detail/config.hpp"

#include <asio/async_result.hpp>
#include <asio/use_awaitable.hpp>

#include <optional>
#include <string>
#include <system_error>
#include <tuple>
#include <type_traits>
#include <utility>

#include "cocluster/detail/pending_handler.hpp"

namespace cocluster::detail {

// What an operation with completion signature void(std::error_code, T...) completes with.
template <class... T>
struct op_result {
  std::error_code ec;
  std::tuple<T...> values;
  std::string what;  // for use_awaitable's exception: what failed, in words (may be empty)
};

template <class Signature>
struct signature_traits;
template <class T>
struct signature_traits<void(std::error_code, T)> {
  using result = op_result<T>;
  using value = T;
};

template <class Signature, class Token, class TryNow, class Initiation>
auto async_operation(Token&& token, TryNow try_now, Initiation initiation) {
  using traits = signature_traits<Signature>;
  if constexpr (is_use_awaitable<Token>) {
    return [](TryNow try_now, Initiation initiation) -> asio::awaitable<typename traits::value> {
      std::optional<typename traits::result> now = try_now();
      if (!now) {
        asio::use_awaitable_t<> wait;
        co_return co_await asio::async_initiate<asio::use_awaitable_t<>, Signature>(std::move(initiation), wait);
      }
      if (now->ec) throw std::system_error(now->ec, now->what);
      co_return std::move(std::get<0>(now->values));
    }(std::move(try_now), std::move(initiation));
  } else {
    return asio::async_initiate<Token, Signature>(std::move(initiation), token);
  }
}

}  // namespace cocluster::detail
