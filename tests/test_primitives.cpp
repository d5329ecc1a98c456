// The coroutine primitives under Master and Worker: latch and queue, the checked syscalls, and
// round robin's choice of a worker.
#include "cocluster/detail/async_latch.hpp"
#include "cocluster/detail/async_queue.hpp"
#include "cocluster/detail/rate_limited_log.hpp"
#include "cocluster/detail/spawn.hpp"
#include "cocluster/detail/syscalls.hpp"
#include "cocluster/error.hpp"
#include "cocluster/log.hpp"
#include "cocluster/policy/round_robin.hpp"

#include "cocluster/detail/as_tuple.hpp"

#include <doctest/doctest.h>

#include <chrono>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "support.hpp"

using namespace cocluster;
using namespace test;
using namespace asio::experimental::awaitable_operators;

TEST_CASE("a latch completes waiters from before and after it is set, with the same value") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    cocluster::detail::async_latch<int> latch(io.get_executor());
    int early = 0;
    asio::co_spawn(io, [&]() -> awaitable<void> { early = co_await latch.async_wait(use_awaitable); }, asio::detached);
    co_await asio::post(io, use_awaitable);  // let the early waiter park
    CHECK_FALSE(latch.is_set());
    latch.set(7);
    latch.set(8);  // ignored: the first result stands
    const int late = co_await latch.async_wait(use_awaitable);
    CHECK(late == 7);
    co_await asio::post(io, use_awaitable);
    CHECK(early == 7);
  });
}

TEST_CASE("a failed latch reports its error to every waiter") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    cocluster::detail::async_latch<> latch(io.get_executor());
    latch.fail(error::worker_exited);
    try {
      co_await latch.async_wait(use_awaitable);
      FAIL("a failed latch completed without error");
    } catch (const std::system_error& e) {
      CHECK(e.code() == error::worker_exited);
    }
  });
}

TEST_CASE("latch || timer completes with the timer when the latch is never set") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    cocluster::detail::async_latch<> latch(io.get_executor());
    asio::steady_timer timer(io, 10ms);
    auto r = co_await (latch.async_wait(use_awaitable) || timer.async_wait(use_awaitable));
    CHECK(r.index() == 1);
    latch.set();  // the cancelled waiter is gone: nothing dangles
    co_await latch.async_wait(use_awaitable);
  });
}

TEST_CASE("a queue hands values out in order and to waiting consumers") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    cocluster::detail::async_queue<int> q(io.get_executor());
    std::vector<int> got;
    asio::co_spawn(io, [&]() -> awaitable<void> {
      for (int i = 0; i < 3; ++i) got.push_back(co_await q.async_pop(use_awaitable));
    }, asio::detached);
    co_await asio::post(io, use_awaitable);
    q.push(1);
    q.push(2);
    q.push(3);
    for (int i = 0; i < 3; ++i) co_await asio::post(io, use_awaitable);
    CHECK(got == std::vector<int>{1, 2, 3});
  });
}

TEST_CASE("a bounded queue makes async_push wait until a pop makes room") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    cocluster::detail::async_queue<int> q(io.get_executor(), 2);
    int a = 1, b = 2, c = 3;
    CHECK(q.try_push(a));
    CHECK(q.try_push(b));
    CHECK_FALSE(q.try_push(c));
    bool pushed = false;
    asio::co_spawn(io, [&]() -> awaitable<void> {
      co_await q.async_push(3, use_awaitable);
      pushed = true;
    }, asio::detached);
    co_await asio::post(io, use_awaitable);
    CHECK_FALSE(pushed);
    CHECK(co_await q.async_pop(use_awaitable) == 1);
    co_await asio::post(io, use_awaitable);
    CHECK(pushed);
    CHECK(q.size() == 2);
  });
}

TEST_CASE("a closed queue drains what it holds, then fails consumers with the close reason") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    cocluster::detail::async_queue<int> q(io.get_executor());
    q.push(5);
    q.close(error::worker_not_connected);
    q.push(6);  // ignored after close
    CHECK(co_await q.async_pop(use_awaitable) == 5);
    auto [ec, v] = co_await q.async_pop(cocluster::as_tuple(use_awaitable));
    CHECK(ec == error::worker_not_connected);
  });
}

TEST_CASE("a queue pop honours cancellation and loses no value") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    cocluster::detail::async_queue<int> q(io.get_executor());
    asio::steady_timer timer(io, 5ms);
    auto r = co_await (q.async_pop(use_awaitable) || timer.async_wait(use_awaitable));
    CHECK(r.index() == 1);
    q.push(9);  // no cancelled consumer may swallow it
    CHECK(co_await q.async_pop(use_awaitable) == 9);
  });
}

TEST_CASE("pidfd_open of a pid that does not exist reports ESRCH") {
  std::error_code ec;
  auto fd = cocluster::detail::pidfd_open(0x3fffffff, ec);
  CHECK_FALSE(fd);
  CHECK(ec == std::errc::no_such_process);
}

TEST_CASE("pidfd_send_signal on a bad fd reports EBADF") {
  CHECK(cocluster::detail::pidfd_send_signal(-1, 0) == std::errc::bad_file_descriptor);
}

TEST_CASE("socketpair with an invalid type reports the error") {
  std::error_code ec;
  auto [a, b] = cocluster::detail::make_socketpair(12345, ec);
  CHECK(ec);
  CHECK_FALSE(a);
}

TEST_CASE("spawning a missing executable throws ENOENT naming it, and leaks no fd") {
  const int before = open_fd_count();
  auto [mine, theirs] = cocluster::detail::make_socketpair();
  cocluster::detail::spawn_request r;
  r.exec = "/nonexistent/cocluster-worker";
  r.argv = {r.exec};
  try {
    cocluster::detail::spawn(r, std::move(theirs));
    FAIL("spawn of a missing executable succeeded");
  } catch (const std::system_error& e) {
    CHECK(e.code() == std::errc::no_such_file_or_directory);
    CHECK(std::string(e.what()).find("/nonexistent/cocluster-worker") != std::string::npos);
  }
  mine.reset();
  CHECK(open_fd_count() == before);
}

TEST_CASE("spawning into a missing working directory reports chdir's error") {
  auto [mine, theirs] = cocluster::detail::make_socketpair();
  cocluster::detail::spawn_request r;
  r.exec = "/bin/true";
  r.argv = {r.exec};
  r.cwd = "/nonexistent-dir";
  try {
    cocluster::detail::spawn(r, std::move(theirs));
    FAIL("spawn into a missing directory succeeded");
  } catch (const std::system_error& e) {
    CHECK(e.code() == std::errc::no_such_file_or_directory);
    CHECK(std::string(e.what()).find("chdir") != std::string::npos);
  }
}

TEST_CASE("a waiter completed before the io_context runs is still delivered") {
  // Regression: dropping the waiter's work count before queueing its completion stopped an
  // io_context that had not started yet, and the completion was never run.
  asio::io_context io;
  cocluster::detail::async_latch<int> latch(io.get_executor());
  int got = 0;
  latch.async_wait([&](std::error_code, int v) { got = v; });
  latch.set(5);
  io.run();
  CHECK(got == 5);
}

namespace {

// The library's log lines while it lives (then stderr again).
struct logged_lines {
  std::vector<std::string> lines;
  logged_lines() {
    cocluster::set_log_sink([this](cocluster::LogLevel, std::string_view line) { lines.emplace_back(line); });
  }
  ~logged_lines() { cocluster::set_log_sink({}); }
  logged_lines(const logged_lines&) = delete;
  logged_lines& operator=(const logged_lines&) = delete;
};

}  // namespace

TEST_CASE("rate_limited_log: one line a second from one place; the next line says how many were left out") {
  logged_lines logged;
  std::vector<std::string>& lines = logged.lines;
  using namespace std::chrono_literals;
  cocluster::detail::rate_limited_log log;
  const auto t0 = cocluster::detail::rate_limited_log::clock::now();
  for (int i = 0; i < 1000; ++i) log.error_at(t0 + i * 1ms, "closing connection {}", i);
  REQUIRE(lines.size() == 1);
  CHECK(lines[0].find("closing connection 0") != std::string::npos);
  CHECK(lines[0].find("more like this") == std::string::npos);
  CHECK(log.left_out() == 999);
  log.error_at(t0 + 1000ms, "closing connection {}", 1000);
  REQUIRE(lines.size() == 2);
  CHECK(lines[1].find("closing connection 1000 (999 more like this since the last such line, 1000 ms before, not logged)") !=
        std::string::npos);
  CHECK(log.left_out() == 0);
  log.error_at(t0 + 5000ms, "closing connection {}", 1001);  // a quiet while: written, nothing left out
  REQUIRE(lines.size() == 3);
  CHECK(lines[2].find("more like this") == std::string::npos);
}

TEST_CASE("rate_limited_log: a burst's count is written once the burst is over; an ongoing one brings a fresh line every second") {
  logged_lines logged;
  std::vector<std::string>& lines = logged.lines;
  using namespace std::chrono_literals;
  using clock = cocluster::detail::rate_limited_log::clock;
  auto has = [&](std::size_t i, std::string_view what) { return lines.at(i).find(what) != std::string::npos; };
  SUBCASE("what the wait does, on the tests' clock") {
    cocluster::detail::rate_limited_log log;
    const auto t0 = clock::now();
    log.error_at(t0, "closing connection {}", 0);
    log.error_at(t0 + 10ms, "closing connection {}", 1);
    log.flush_if_quiet_at(t0 + 1000ms);  // one was left out 990 ms ago: the burst may go on
    CHECK(lines.size() == 1);
    log.error_at(t0 + 1000ms, "closing connection {}", 2);  // carries the count, with its own reason
    REQUIRE(lines.size() == 2);
    CHECK(has(1, "closing connection 2 (1 more like this since the last such line, 1000 ms before, not logged)"));
    log.error_at(t0 + 1001ms, "closing connection {}", 3);
    log.flush_if_quiet_at(t0 + 2000ms);  // 999 ms after the last one left out: not yet
    CHECK(lines.size() == 2);
    log.flush_if_quiet_at(t0 + 2001ms);  // a second without one: the burst is over
    REQUIRE(lines.size() == 3);
    CHECK(has(2, "1 more like this in the 1001 ms before this line, not logged: closing connection 2"));
    log.flush_if_quiet_at(t0 + 5000ms);  // nothing left out: nothing written
    CHECK(lines.size() == 3);
  }
  SUBCASE("the executor's wait writes it; flush() writes it at once and stops waiting; so does the destructor") {
    asio::io_context io;
    cocluster::detail::rate_limited_log log(io.get_executor());
    const auto t0 = clock::now();
    for (int i = 0; i < 1000; ++i) log.error_at(t0 + i * 1us, "closing connection {}", i);
    REQUIRE(lines.size() == 1);
    io.run();  // until a second after the last one left out: no other line comes
    REQUIRE(lines.size() == 2);
    CHECK(has(1, "999 more like this in the "));
    CHECK(has(1, " ms before this line, not logged: closing connection 0"));
    CHECK(log.left_out() == 0);
    log.error("closing connection {}", 1000);  // within a second of the count line: counted
    CHECK(log.left_out() == 1);
    log.flush();
    REQUIRE(lines.size() == 3);
    CHECK(has(2, "1 more like this in the "));
    io.restart();
    io.poll();  // the wait flush() cancelled ends now: nothing is left to wait for
    CHECK(io.stopped());
    CHECK(lines.size() == 3);
    {
      cocluster::detail::rate_limited_log scoped;  // no executor
      scoped.error("refused {}", 1);
      scoped.error("refused {}", 2);
      CHECK(lines.size() == 4);
    }
    REQUIRE(lines.size() == 5);  // its destructor wrote the count
    CHECK(has(4, "1 more like this in the "));
    CHECK(has(4, "not logged: refused 1"));
  }
}

// Round robin's free list (policy/round_robin.hpp), driven as its listener drives it: a
// hand-off moves a worker one level up, an acknowledgement one level down.
namespace {
struct turns {
  cocluster::detail::free_levels free;
  std::size_t window;
  std::map<int, std::size_t> in_flight;
  std::map<int, std::size_t> own;  // a worker's own window, where it is not `window`
  explicit turns(std::size_t w, std::initializer_list<int> ids) : window(w) {
    for (int id : ids) free.joined(id, in_flight[id] = 0, window);
  }
  std::size_t window_of(int id) const { return own.count(id) ? own.at(id) : window; }
  int hand() {  // the next connection: to whom
    const int id = free.next();
    if (id != 0) free.moved(id, in_flight[id], in_flight[id] + 1, window_of(id)), ++in_flight[id];
    return id;
  }
  void ack(int id) { free.moved(id, in_flight[id], in_flight[id] - 1, window_of(id)), --in_flight[id]; }
};
}  // namespace

TEST_CASE("round robin at a window of 1 is Node's free list: each connection to the worker idle longest, none to a busy one") {
  turns t(1, {1, 2, 3});
  CHECK(t.hand() == 1);
  CHECK(t.hand() == 2);
  CHECK(t.hand() == 3);
  CHECK(t.hand() == 0);  // every one busy: the connection waits
  t.ack(2);
  t.ack(1);
  CHECK(t.hand() == 2);  // free first
  CHECK(t.hand() == 1);
  CHECK(t.hand() == 0);
  t.ack(3);
  t.free.left(3);
  CHECK(t.hand() == 0);  // it left while free
  t.free.joined(4, 0, t.window);
  CHECK(t.hand() == 4);
}

TEST_CASE("round robin with a window: an idle worker first, then the least busy in turn; a slow one gets more only when all have as many") {
  turns t(3, {1, 2});
  CHECK(t.hand() == 1);
  CHECK(t.hand() == 2);
  CHECK(t.hand() == 1);  // neither idle: both have one, and 1 came to that first
  CHECK(t.hand() == 2);
  t.ack(2);
  t.ack(2);
  CHECK(t.hand() == 2);  // idle, where 1 has two waiting
  CHECK(t.hand() == 2);  // the least busy: it has one, 1 has two
  CHECK(t.hand() == 1);  // two each: 1 came to two first
  CHECK(t.hand() == 2);
  CHECK(t.hand() == 0);  // both full (3)
  t.ack(1);
  CHECK(t.hand() == 1);
  CHECK(t.hand() == 0);

  // Worker 1 never acknowledges (its loop is blocked); worker 2 takes each one at once.
  turns slow(8, {1, 2});
  int to_slow = 0;
  for (int i = 0; i < 100; ++i) {
    const int id = slow.hand();
    REQUIRE(id != 0);
    if (id == 1) ++to_slow;
    else slow.ack(2);
  }
  CHECK(to_slow == 1);  // only the first, when both were idle
}

TEST_CASE("round robin: a worker back from a rest keeps what it had; one that left is in no level") {
  turns t(2, {1, 2});
  CHECK(t.hand() == 1);
  t.free.left(1);  // rests with one unacknowledged
  CHECK(t.hand() == 2);
  t.free.joined(1, t.in_flight[1], t.window);  // back with one, behind 2, which has one too
  CHECK(t.hand() == 2);
  CHECK(t.hand() == 1);
  CHECK(t.hand() == 0);
  t.free.left(2);  // gone with two unacknowledged
  t.ack(1);
  CHECK(t.hand() == 1);
  CHECK(t.hand() == 0);

  // Acknowledgements while it rests are counted without a word to the levels: it comes back
  // where its count says. A join of an id already in a level moves it, never doubles it.
  turns r(3, {1, 2});
  CHECK(r.hand() == 1);
  CHECK(r.hand() == 2);
  CHECK(r.hand() == 1);
  r.free.left(1);  // rests with two
  --r.in_flight[1];
  --r.in_flight[1];
  r.free.joined(1, r.in_flight[1], r.window);  // back idle, where 2 has one
  CHECK(r.hand() == 1);
  r.free.joined(2, r.in_flight[2], r.window);  // again, with its one: behind 1 in that level, once
  CHECK(r.hand() == 1);
  CHECK(r.hand() == 2);
  CHECK(r.hand() == 1);
  CHECK(r.hand() == 2);
  CHECK(r.hand() == 0);
}

TEST_CASE("a worker that fell behind: its window is 1, and grows back by one per regrow_acks acks") {
  using cocluster::HandoffListener;
  HandoffListener::Member m;
  CHECK(m.window(8) == 8);  // never late: the policy's window
  CHECK(m.window(1) == 1);
  m.slowed = true;  // it fell behind (slow_ack)
  CHECK(m.window(8) == 1);
  m.prompt_acks = HandoffListener::regrow_acks - 1;
  CHECK(m.window(8) == 1);
  m.prompt_acks = HandoffListener::regrow_acks;
  CHECK(m.window(8) == 2);
  m.prompt_acks = 7 * HandoffListener::regrow_acks;
  CHECK(m.window(8) == 8);
  m.prompt_acks = 100 * HandoffListener::regrow_acks;
  CHECK(m.window(8) == 8);  // never past the policy's
  CHECK(m.window(3) == 3);

  // In round robin's levels: a worker whose window drops to 1 while it holds 3 gets nothing until
  // it has acknowledged all 3, then one at a time, while the other keeps its window of 3.
  turns t(3, {1, 2});
  CHECK(t.hand() == 1);
  CHECK(t.hand() == 2);
  CHECK(t.hand() == 1);
  CHECK(t.hand() == 2);
  CHECK(t.hand() == 1);  // 1 holds 3 (full), 2 holds 2
  t.own[1] = 1;  // a late ack: its window is 1 now
  t.ack(1);
  CHECK(t.hand() == 2);  // 2's third
  CHECK(t.hand() == 0);
  t.ack(1);
  CHECK(t.hand() == 0);  // 1 still holds one
  t.ack(1);
  CHECK(t.hand() == 1);  // idle: one
  CHECK(t.hand() == 0);  // and no more
  t.ack(2);
  CHECK(t.hand() == 2);
}
