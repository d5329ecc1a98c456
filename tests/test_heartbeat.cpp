// Hung workers (Settings::heartbeat_timeout): a worker whose event loop stops turning is killed
// by the master and its exit reported; one whose loop keeps turning, however busy, is not.
#include <chrono>
#include <stdexcept>
#include <thread>

#include <asio/post.hpp>
#include <asio/steady_timer.hpp>

#include <doctest/doctest.h>

#include "cocluster/cocluster.hpp"
#include "support.hpp"
#include "worker_scenario.hpp"

using namespace cocluster;
using namespace test;

// ---- the workers ----

// At the first message, blocks its event loop for good (only SIGKILL ends it).
WORKER_SCENARIO(block_loop_on_message) {
  asio::io_context io;
  this_worker.start(io.get_executor());
  asio::co_spawn(io, []() -> awaitable<void> {
    (void)co_await this_worker.receive();
    for (;;) std::this_thread::sleep_for(std::chrono::hours(1));
  }, asio::detached);
  io.run();
  return 0;
}

// At a message "N", runs N short tasks one after the other on its loop (2 ms each, always
// busy), then answers "done N" and echoes from then on.
WORKER_SCENARIO(busy_short_tasks) {
  asio::io_context io;
  this_worker.start(io.get_executor());
  asio::co_spawn(io, []() -> awaitable<void> {
    const Message m = co_await this_worker.receive();
    const int tasks = std::stoi(m.data);
    for (int i = 0; i < tasks; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(2));  // the loop is blocked for 2 ms ...
      co_await asio::post(co_await asio::this_coro::executor, use_awaitable);  // ... then turns
    }
    co_await this_worker.send({"done " + m.data});
    co_await test::echo_messages();
  }, asio::detached);
  io.run();
  return 0;
}

// Sends "0" .. "199" at once (its sends wait while the master does not read), then echoes.
WORKER_SCENARIO(flood_200) {
  asio::io_context io;
  this_worker.start(io.get_executor());
  asio::co_spawn(io, []() -> awaitable<void> {
    for (int i = 0; i < 200; ++i) co_await this_worker.send({std::to_string(i)});
    co_await test::echo_messages();
  }, asio::detached);
  io.run();
  return 0;
}

// Beats for a while (its loop turning), sends "one", then blocks its loop for good.
WORKER_SCENARIO(send_then_block) {
  asio::io_context io;
  this_worker.start(io.get_executor());
  asio::co_spawn(io, []() -> awaitable<void> {
    asio::steady_timer beating(co_await asio::this_coro::executor, std::chrono::milliseconds(300));
    co_await beating.async_wait(use_awaitable);
    co_await this_worker.send({"one"});
    for (;;) std::this_thread::sleep_for(std::chrono::hours(1));
  }, asio::detached);
  io.run();
  return 0;
}

// Starts the runtime, then sets up for 3 heartbeat timeouts (1.5 s) before its loop first
// runs (blocking, as a program loading its data would), then echoes.
WORKER_SCENARIO(slow_warm_up) {
  return test::run_echo_worker([](asio::io_context&) { std::this_thread::sleep_for(std::chrono::milliseconds(1500)); });
}

// ---- the master side ----

TEST_CASE("heartbeat: a worker whose event loop is blocked is killed with SIGKILL and its exit reported") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Settings s;
    s.heartbeat_interval = std::chrono::milliseconds(50);
    s.heartbeat_timeout = std::chrono::milliseconds(500);
    Master<> master(io.get_executor(), s);
    auto events = master.subscribe();
    auto w = co_await master.fork(scenario_env("block_loop_on_message"));
    co_await w->online();
    CHECK_FALSE(w->unresponsive());
    co_await w->send({"block"});
    const ExitStatus status = co_await w->exited();  // the worker would never exit by itself
    CHECK(status.signal == SIGKILL);
    CHECK(w->unresponsive());
    CHECK(w->exited_after_disconnect() == false);  // not on purpose: a supervisor replaces it
    bool error_seen = false, exit_seen = false;
    while (!exit_seen) {
      const Event e = co_await events.next();
      if (e.type == EventType::error && e.worker == w) {
        error_seen = true;
        CHECK(e.error == std::errc::timed_out);
        CHECK(e.detail.find("unresponsive") != std::string::npos);
        CHECK(e.snapshot.unresponsive);
      }
      if (e.type == EventType::exit && e.worker == w) {
        exit_seen = true;
        CHECK(error_seen);  // the error comes before the exit
        CHECK(e.exit.signal == SIGKILL);
        CHECK(e.snapshot.unresponsive);
        CHECK(e.snapshot.exited_after_disconnect == false);
      }
    }
  });
}

TEST_CASE("heartbeat: a busy worker whose loop keeps turning outlives several timeouts") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Settings s;
    s.heartbeat_interval = std::chrono::milliseconds(50);
    s.heartbeat_timeout = std::chrono::milliseconds(1000);
    Master<> master(io.get_executor(), s);
    auto w = co_await master.fork(scenario_env("busy_short_tasks"));
    co_await w->online();
    // 1500 tasks of 2 ms: at least 3 s of work, 3 timeouts, the loop never idle for long.
    co_await w->send({"1500"});
    CHECK((co_await w->receive()).data == "done 1500");
    co_await w->send({"still here"});
    CHECK((co_await w->receive()).data == "still here");
    CHECK_FALSE(w->unresponsive());
    w->disconnect();
    CHECK(co_await w->exited() == ExitStatus{0, 0});  // the beat's timer does not keep it alive
    CHECK_FALSE(w->unresponsive());
  });
}

TEST_CASE("heartbeat: a worker the master has stopped reading (its inbox is full) is not killed") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Settings s;
    s.heartbeat_interval = std::chrono::milliseconds(50);
    s.heartbeat_timeout = std::chrono::milliseconds(1000);
    s.max_unread_messages = 1;  // the master stops reading this worker after one unread message
    Master<> master(io.get_executor(), s);
    auto w = co_await master.fork(scenario_env("flood_200"));
    co_await w->online();
    // Three timeouts without reading: the beats wait in the socket behind the messages.
    asio::steady_timer not_reading(io, std::chrono::milliseconds(3000));
    co_await not_reading.async_wait(use_awaitable);
    CHECK_FALSE(w->unresponsive());
    for (int i = 0; i < 200; ++i) CHECK((co_await w->receive()).data == std::to_string(i));
    co_await w->send({"after"});
    CHECK((co_await w->receive()).data == "after");
    CHECK_FALSE(w->unresponsive());
    w->disconnect();
    CHECK(co_await w->exited() == ExitStatus{0, 0});
  });
}

TEST_CASE("heartbeat: a worker whose loop blocks right after the message that filled the master's inbox is killed once the master receives") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Settings s;
    s.heartbeat_interval = std::chrono::milliseconds(50);
    s.heartbeat_timeout = std::chrono::milliseconds(500);
    s.max_unread_messages = 1;  // "one" fills the inbox: the master stops reading, its clock with it
    Master<> master(io.get_executor(), s);
    auto w = co_await master.fork(scenario_env("send_then_block"));
    co_await w->online();
    asio::steady_timer not_reading(io, std::chrono::milliseconds(1500));
    co_await not_reading.async_wait(use_awaitable);
    CHECK_FALSE(w->unresponsive());
    CHECK((co_await w->receive()).data == "one");
    // Reading goes on and finds nothing more: the clock runs again (before, it stayed stopped
    // until a next message that never came).
    const ExitStatus status = co_await w->exited();
    CHECK(status.signal == SIGKILL);
    CHECK(w->unresponsive());
  });
}

TEST_CASE("heartbeat: a worker setting up before its event loop runs is not killed: the clock starts at its first beat") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Settings s;
    s.heartbeat_interval = std::chrono::milliseconds(50);
    s.heartbeat_timeout = std::chrono::milliseconds(500);
    Master<> master(io.get_executor(), s);
    auto w = co_await master.fork(scenario_env("slow_warm_up"));
    co_await w->online();  // sent by start(), before the 1.5 s of setting up
    co_await w->send({"after warm-up"});
    auto [ec, echo] = co_await w->receive(cocluster::as_tuple(use_awaitable));
    CHECK(!ec);
    CHECK(echo.data == "after warm-up");
    CHECK_FALSE(w->unresponsive());
    co_await master.disconnect();
    CHECK((co_await w->exited()).code == 0);
  });
}

TEST_CASE("heartbeat: an idle worker with the heartbeat on disconnects and exits with 0") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor(), Settings{.heartbeat_timeout = std::chrono::milliseconds(400)});
    auto w = co_await master.fork();
    co_await w->online();
    co_await w->send({"ping"});
    CHECK((co_await w->receive()).data == "ping");
    w->disconnect();
    CHECK(co_await w->exited() == ExitStatus{0, 0});
    CHECK_FALSE(w->unresponsive());
  });
}

TEST_CASE("heartbeat: an interval not below the timeout is refused with a clear message") {
  asio::io_context io;
  Settings bad;
  bad.heartbeat_timeout = std::chrono::milliseconds(100);
  bad.heartbeat_interval = std::chrono::milliseconds(100);
  CHECK_THROWS_WITH_AS(Master<>(io.get_executor(), bad),
                       "cocluster: heartbeat_interval (100 ms) must be below heartbeat_timeout (100 ms)",
                       std::invalid_argument);
  Master<> master(io.get_executor());
  CHECK_THROWS_AS(master.setup(bad), std::invalid_argument);
  CHECK(master.settings().heartbeat_timeout.count() == 0);  // unchanged
  SettingsPatch patch;
  patch.heartbeat_timeout = std::chrono::milliseconds(10);
  patch.heartbeat_interval = std::chrono::milliseconds(20);
  CHECK_THROWS_AS(master.setup_merge(patch), std::invalid_argument);
  patch.heartbeat_interval = std::chrono::milliseconds(5);
  master.setup_merge(patch);
  Settings never;  // "never" is 0, not the largest count
  never.heartbeat_timeout = std::chrono::milliseconds::max();
  CHECK_THROWS_WITH_AS(master.setup(never),
                       ("cocluster: heartbeat_timeout (" + std::to_string(never.heartbeat_timeout.count()) +
                        " ms) above a day; 0 turns the heartbeat off").c_str(),
                       std::invalid_argument);
  CHECK(master.settings().heartbeat_interval.count() == 5);
}
