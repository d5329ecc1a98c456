// detail/completion.hpp: how an initiation completes a result it already has. A waiting
// coroutine resumes at once, any other handler is posted, and resumptions never nest without
// bound.
#include "cocluster/detail/completion.hpp"

#include <doctest/doctest.h>

#include <asio/bind_executor.hpp>
#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include "cocluster/detail/as_tuple.hpp"
#include <asio/io_context.hpp>
#include <asio/use_awaitable.hpp>

#include <future>
#include <thread>

namespace {

using cocluster::detail::complete_now;
using cocluster::detail::max_inline_resumptions;

// An operation whose result is ready as soon as it starts: void(std::error_code, int).
template <class Token>
auto async_ready(const asio::any_io_executor& ex, int value, Token&& token) {
  return asio::async_initiate<Token, void(std::error_code, int)>(
      [ex](auto handler, int v) { complete_now(std::move(handler), ex, std::error_code{}, v); }, token, value);
}

// How many handlers the io_context ran for a coroutine that awaits `n` ready operations.
std::size_t handlers_for(int n, bool as_tuple, long& sum) {
  asio::io_context io;
  sum = 0;
  asio::co_spawn(io, [&]() -> asio::awaitable<void> {
    for (int i = 0; i < n; ++i) {
      if (as_tuple) {
        auto [ec, v] = co_await async_ready(io.get_executor(), 1, cocluster::as_tuple(asio::use_awaitable));
        sum += ec ? 0 : v;
      } else {
        sum += co_await async_ready(io.get_executor(), 1, asio::use_awaitable);
      }
    }
  }, asio::detached);
  return io.run();
}

}  // namespace

TEST_CASE("a ready result resumes a coroutine waiting with use_awaitable or as_tuple without a trip through the scheduler") {
  for (bool as_tuple : {false, true}) {
    CAPTURE(as_tuple);
    long sum = 0;
    // One ready operation is the baseline: co_spawn's own handlers (it posts its last step
    // only when its coroutine never suspended).
    const std::size_t one = handlers_for(1, as_tuple, sum);
    const std::size_t some = handlers_for(max_inline_resumptions - 1, as_tuple, sum);
    CHECK(sum == max_inline_resumptions - 1);
    CHECK(some == one);
  }
}

TEST_CASE("ready results resume a coroutine at most 16 deep, then one is posted: a million in a row do not overflow the stack") {
  long sum = 0;
  const std::size_t one = handlers_for(1, false, sum);
  const std::size_t many = handlers_for(1'000'000, false, sum);
  CHECK(sum == 1'000'000);
  CHECK(many > one);  // some went through the scheduler...
  CHECK(many - one <= 1'000'000 / max_inline_resumptions + 1);  // ...one in 17
}

TEST_CASE("a ready result is posted to a callback, never run inside the initiating function") {
  asio::io_context io;
  int got = 0;
  async_ready(io.get_executor(), 7, [&](std::error_code ec, int v) { got = ec ? -1 : v; });
  CHECK(got == 0);
  CHECK(io.run() == 1);
  CHECK(got == 7);
}

TEST_CASE("a ready result resumes a coroutine of another thread's io_context on that thread, not the caller's") {
  // As run_on does for a caller on another thread: the initiation hops to `a`'s thread, where
  // the result is ready; the coroutine belongs to `b`, run by its own thread.
  asio::io_context a, b;
  auto b_work = asio::make_work_guard(b);
  std::thread b_thread([&] { b.run(); });
  const auto b_id = b_thread.get_id();
  std::promise<std::thread::id> resumed_on;
  asio::co_spawn(b, [&]() -> asio::awaitable<void> {
    co_await asio::async_initiate<const asio::use_awaitable_t<>&, void(std::error_code, int)>(
        [&](auto handler) {
          asio::post(a, [&a, h = std::move(handler)]() mutable {
            complete_now(std::move(h), a.get_executor(), std::error_code{}, 1);
          });
        },
        asio::use_awaitable);
    resumed_on.set_value(std::this_thread::get_id());
  }, asio::detached);
  auto resumed = resumed_on.get_future();
  auto a_work = asio::make_work_guard(a);
  CHECK(a.run_one() == 1);  // the initiation's hop, which completes the operation
  CHECK(resumed.get() == b_id);
  b_work.reset();
  b_thread.join();
}

TEST_CASE("run_on: a handler of another io_context counts as that io_context's work from the call until it has run") {
  // `owner` holds the state (a worker's runtime) and is not running yet; `other` runs the
  // caller. Without the count, other.poll() would run out of work and stop before the
  // completion came back to it (an io_context::run() on its own thread would return).
  asio::io_context owner, other;
  auto owner_work = asio::make_work_guard(owner);
  int got = 0;
  bool body_ran = false;
  asio::post(other, [&] {
    cocluster::detail::run_on(owner.get_executor(), asio::bind_executor(other, [&](int v) { got = v; }), [&](auto h) {
      body_ran = true;
      CHECK(owner.get_executor().running_in_this_thread());
      std::move(h)(42);  // completes at once, from owner's thread: the handler goes to `other`
    });
  });
  CHECK(other.poll() == 1);  // the call; the body waits for `owner`
  CHECK_FALSE(body_ran);
  CHECK_FALSE(other.stopped());  // the handler's work keeps it
  CHECK(owner.poll() == 1);
  CHECK(body_ran);
  CHECK(got == 0);  // not on owner's thread
  CHECK(other.poll() == 1);
  CHECK(got == 42);
  CHECK(other.stopped());  // nothing more: the count ended with the handler
}
