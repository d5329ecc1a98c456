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
#include <asio/associated_cancellation_slot.hpp>
#include <asio/associated_executor.hpp>
#include <asio/dispatch.hpp>
#include "cocluster/detail/as_tuple.hpp"
#include "cocluster/detail/handler_work.hpp"
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

// A handler wrapped to complete on another executor (below) resumes a coroutine if the handler
// it wraps does: complete_now then runs it at once, and its asio::dispatch to the coroutine's
// own executor resumes the coroutine there at once when it can.
template <class Handler>
class completion_elsewhere;
template <class Inner>
struct resumes_coroutine<completion_elsewhere<Inner>> : resumes_coroutine<Inner> {};
template <class Handler>
struct is_completion_elsewhere : std::false_type {};
template <class Inner>
struct is_completion_elsewhere<completion_elsewhere<Inner>> : std::true_type {};

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

// Runs `body(handler)` on `ex`, for a handler whose executor is `ex` (run_on's second half): at
// once for a coroutine already running there (it called the initiating function), else
// through asio::dispatch, so a caller on another thread (a use_future caller) is safe too.
template <class Handler, class Body>
void run_here_or_dispatch(const asio::any_io_executor& ex, Handler&& handler, Body body) {
  using handler_type = std::decay_t<Handler>;
  // (A wrapped handler's executor is `ex` whatever thread its coroutine runs on: dispatched.)
  if constexpr (resumes_coroutine<handler_type>::value && !is_completion_elsewhere<handler_type>::value) {
    if (asio::get_associated_executor(handler) == ex) return body(std::forward<Handler>(handler));
  }
  asio::dispatch(ex, [body = std::move(body), h = handler_type(std::forward<Handler>(handler))]() mutable {
    body(std::move(h));
  });
}

// A handler of another executor than `ex`, the runtime's, given to an operation whose steps
// after the initiation touch the runtime's state (an accept that waits, then takes a
// connection and acknowledges it). Those steps run on `ex`, which is this wrapper's executor,
// and only the completion goes to the handler's own executor (asio::dispatch), whose work
// count stays up until then. Its cancellation slot is the handler's. (Asio's own composed
// operations run their steps on the handler's executor: theirs touch only the operation's
// state, ours the runtime's, which is single-threaded.)
template <class Handler>
class completion_elsewhere {
 public:
  using executor_type = asio::any_io_executor;
  using cancellation_slot_type = asio::associated_cancellation_slot_t<Handler>;

  completion_elsewhere(Handler handler, asio::any_io_executor ex)
      : handler_(std::move(handler)), work_(asio::get_associated_executor(handler_, ex)), ex_(std::move(ex)) {}

  executor_type get_executor() const noexcept { return ex_; }
  cancellation_slot_type get_cancellation_slot() const noexcept {
    return asio::get_associated_cancellation_slot(handler_);
  }

  template <class... Args>
  void operator()(Args&&... args) {
    auto ex = work_.get_executor();
    asio::dispatch(ex, [h = std::move(handler_), ... a = std::decay_t<Args>(std::forward<Args>(args))]() mutable {
      std::move(h)(std::move(a)...);
    });
    work_.reset();  // after the handler is queued (see pending_handler)
  }

 private:
  Handler handler_;
  handler_work<asio::associated_executor_t<Handler, asio::any_io_executor>> work_;
  asio::any_io_executor ex_;
};

// Runs `body(handler)` where the handler's executor is `ex`, else `body` with the handler
// wrapped in completion_elsewhere: either way the handler `body` gets has `ex` as its executor.
// Called in the initiation, on the caller's thread, so that the handler's executor counts the
// work from the start (run_on does).
template <class Handler, class Body>
void with_steps_on(const asio::any_io_executor& ex, Handler&& handler, Body&& body) {
  using handler_type = std::decay_t<Handler>;
  using handler_executor = asio::associated_executor_t<handler_type, asio::any_io_executor>;
  // (An executor that is no io executor, use_future's, is never `ex`.)
  if constexpr (std::is_convertible_v<handler_executor, asio::any_io_executor>) {
    if (asio::any_io_executor(asio::get_associated_executor(handler, ex)) == ex)
      return body(handler_type(std::forward<Handler>(handler)));
  }
  body(completion_elsewhere<handler_type>(handler_type(std::forward<Handler>(handler)), ex));
}

// Runs `body(handler)` on `ex`, the executor that owns the state an initiation touches (the
// worker runtime's, the master's): every initiation of ours goes through here. The handler
// `body` gets has `ex` as its executor: a handler of another executor (a strand, another
// thread's io_context, use_future) is wrapped first, on the caller's thread, so that its own
// executor counts the work from the call on (an io_context running nothing else does not
// return meanwhile) and gets only the completion (completion_elsewhere). Then `body` runs at
// once for a coroutine already running on `ex`, else through asio::dispatch.
template <class Handler, class Body>
void run_on(const asio::any_io_executor& ex, Handler&& handler, Body body) {
  with_steps_on(ex, std::forward<Handler>(handler), [&](auto bound) {
    run_here_or_dispatch(ex, std::move(bound), std::move(body));
  });
}

}  // namespace cocluster::detail
