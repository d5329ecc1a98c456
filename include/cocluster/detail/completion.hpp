// How an operation (of the worker's or the master's) completes when its result is ready in the initiation (a
// queued message, room in the send queue, a connection waiting): Asio's rule is that an
// initiating function never runs the handler itself, so the completion is posted. A coroutine
// awaiting with use_awaitable (or as_tuple(use_awaitable)) is an exception: it is already
// suspended when the initiation runs, so resuming it here is what a posted completion would
// do, without the trip through the scheduler.
//   if (auto v = queue.try_pop()) return detail::complete_now(std::move(handler), ex, std::error_code{}, std::move(*v));
#pragma once

#include "cocluster/detail/config.hpp"

#include <asio/any_io_executor.hpp>
#include <asio/associated_executor.hpp>
#include <asio/dispatch.hpp>
#include "cocluster/detail/as_tuple.hpp"
#include <asio/post.hpp>
#include <asio/use_awaitable.hpp>

#include <exception>
#include <type_traits>
#include <utility>

namespace cocluster::detail {

// True for the handlers that resume a coroutine: Asio's awaitable handler, alone or behind
// as_tuple. An unknown handler type is simply not one, and its completion is posted.
template <class Handler>
struct resumes_coroutine : std::false_type {};
template <class Executor, class... Args>
struct resumes_coroutine<asio::detail::awaitable_handler<Executor, Args...>> : std::true_type {};
#if ASIO_VERSION >= 102400
template <class Inner>
struct resumes_coroutine<asio::detail::as_tuple_handler<Inner>> : resumes_coroutine<Inner> {};
#else
template <class Inner>
struct resumes_coroutine<asio::experimental::detail::as_tuple_handler<Inner>> : resumes_coroutine<Inner> {};
#endif

// Each resumption from an initiation runs on the stack of the one before it until a coroutine
// really suspends: a loop over a full queue would nest without end. Past this depth the
// completion is posted, which unwinds the stack.
inline constexpr int max_inline_resumptions = 16;

inline int& inline_resumptions() noexcept {
  thread_local int depth = 0;
  return depth;
}

// Completes `handler` with `args` from inside an initiation running on `ex` (the runtime's
// executor): resumes an awaiting coroutine at once when it runs on `ex` too, or when its own
// executor runs in this thread (asio::dispatch decides: a strand, a socket's tracked
// executor); posts anything else to the handler's executor (`ex` if it has none). Nothing of
// the caller's may be touched after this returns: the coroutine may have run on.
template <class Handler, class... Args>
void complete_now(Handler&& handler, const asio::any_io_executor& ex, Args&&... args) {
  using handler_type = std::decay_t<Handler>;
  if constexpr (resumes_coroutine<handler_type>::value) {
    if (inline_resumptions() < max_inline_resumptions) {
      ++inline_resumptions();
      struct unnest {
        ~unnest() { --inline_resumptions(); }
      } guard;
      try {
        handler_type h(std::forward<Handler>(handler));
        auto handler_ex = asio::get_associated_executor(h);
        if (handler_ex == ex) {
          std::move(h)(std::forward<Args>(args)...);
        } else {
          asio::dispatch(handler_ex, [h = std::move(h), ... a = std::decay_t<Args>(std::forward<Args>(args))]() mutable {
            std::move(h)(std::move(a)...);
          });
        }
      } catch (...) {
        // From the code the coroutine ran (or its co_spawn's completion handler): it leaves
        // io_context::run(), as it would have from a posted completion.
        asio::post(ex, [e = std::current_exception()] { std::rethrow_exception(e); });
      }
      return;
    }
  }
  auto handler_ex = asio::get_associated_executor(handler, ex);
  asio::post(handler_ex, [h = handler_type(std::forward<Handler>(handler)), ... a = std::decay_t<Args>(std::forward<Args>(args))]() mutable {
    std::move(h)(std::move(a)...);
  });
}

// Runs `body(handler)` on `ex`, the runtime's executor, where the worker's state lives: at
// once for a coroutine already running there (it called the initiating function), else
// through asio::dispatch, so a caller on another thread (a use_future caller) is safe too.
template <class Handler, class Body>
void run_on(const asio::any_io_executor& ex, Handler&& handler, Body body) {
  using handler_type = std::decay_t<Handler>;
  if constexpr (resumes_coroutine<handler_type>::value) {
    if (asio::get_associated_executor(handler) == ex) return body(std::forward<Handler>(handler));
  }
  asio::dispatch(ex, [body = std::move(body), h = handler_type(std::forward<Handler>(handler))]() mutable {
    body(std::move(h));
  });
}

}  // namespace cocluster::detail
