// The master's asynchronous operations with every kind of completion token: each is one
// async_initiate path, so use_awaitable, as_tuple(use_awaitable), use_future, a callback,
// deferred and detached all work, with the completion signatures the headers document.
#include "cocluster/master.hpp"

#include <asio/detached.hpp>
#include <asio/executor_work_guard.hpp>
#include <asio/use_future.hpp>
#include <asio/version.hpp>

#include <doctest/doctest.h>

#include <future>
#include <thread>

#include "cocluster/cocluster.hpp"
#include "worker_scenario.hpp"
#include "support.hpp"

using namespace cocluster;
using namespace test;

namespace {

using test::deferred;

using as_tuple_t = cocluster::detail::as_tuple_t<asio::use_awaitable_t<>>;

// Waits (without blocking the loop) until a callback has run.
awaitable<void> until(const bool& done) {
  asio::steady_timer poll(co_await asio::this_coro::executor);
  while (!done) {
    poll.expires_after(std::chrono::milliseconds(2));
    co_await poll.async_wait(use_awaitable);
  }
}

}  // namespace

TEST_CASE("tokens: fork, online, send, receive, disconnect, exited with as_tuple(use_awaitable)") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor());
    auto [fec, w] = co_await master.fork({}, as_tuple_t{});
    REQUIRE_FALSE(fec);
    auto [oec] = co_await w->online(as_tuple_t{});
    CHECK_FALSE(oec);
    auto [sec] = co_await w->send({"tuple"}, as_tuple_t{});
    CHECK_FALSE(sec);
    auto [rec, m] = co_await w->receive(as_tuple_t{});
    CHECK_FALSE(rec);
    CHECK(m.data == "tuple");
    auto [dec] = co_await master.disconnect(as_tuple_t{});
    CHECK_FALSE(dec);
    auto [xec, status] = co_await w->exited(as_tuple_t{});
    CHECK(status == ExitStatus{0, 0});
    // After the disconnect: the error comes as a value, not an exception.
    auto [late] = co_await w->send({"late"}, as_tuple_t{});
    CHECK(late == error::worker_not_connected);
    auto [nothing, empty] = co_await w->receive(as_tuple_t{});
    CHECK(nothing == error::worker_not_connected);
  });
}

TEST_CASE("tokens: the same operations with plain callbacks, and detached") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor());
    auto& events = master.events();
    bool forked = false;
    std::shared_ptr<Worker> w;
    master.fork({}, [&](std::error_code ec, std::shared_ptr<Worker> worker) {
      CHECK_FALSE(ec);
      w = std::move(worker);
      forked = true;
    });
    CHECK_FALSE(forked);  // a callback never runs inside the initiating call
    co_await until(forked);
    REQUIRE(w);
    w->send({"detached"}, asio::detached);
    bool received = false;
    w->receive([&](std::error_code ec, Message m) {
      CHECK_FALSE(ec);
      CHECK(m.data == "detached");
      received = true;
    });
    co_await until(received);
    bool next = false;
    events.next([&](std::error_code ec, Event e) {
      CHECK_FALSE(ec);
      CHECK(e.type == EventType::setup);
      next = true;
    });
    co_await until(next);
    bool disconnected = false;
    master.disconnect([&](std::error_code ec) {
      CHECK_FALSE(ec);
      disconnected = true;
    });
    co_await until(disconnected);
    CHECK_FALSE(w->is_connected());
    bool exited = false;
    w->exited([&](std::error_code ec, ExitStatus s) {
      CHECK_FALSE(ec);
      CHECK(s == ExitStatus{0, 0});
      exited = true;
    });
    co_await until(exited);
  });
}

TEST_CASE("tokens: deferred operations start when they are invoked, not when they are made") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor());
    auto fork_later = master.fork({}, deferred);
    CHECK(master.workers().empty());  // nothing started yet
    std::shared_ptr<Worker> w = co_await std::move(fork_later)(use_awaitable);
    CHECK(master.workers().size() == 1);
    auto send_later = w->send({"deferred"}, deferred);
    auto receive_later = w->receive(deferred);
    co_await std::move(send_later)(use_awaitable);
    CHECK((co_await std::move(receive_later)(use_awaitable)).data == "deferred");
    auto disconnect_later = master.disconnect(deferred);
    CHECK(w->is_connected());  // made, not started
    co_await std::move(disconnect_later)(use_awaitable);
    CHECK_FALSE(w->is_connected());
    co_await w->exited();
  });
}

TEST_CASE("tokens: use_future, with the loop on another thread") {
  asio::io_context io;
  auto work = asio::make_work_guard(io);
  std::thread loop([&] { io.run(); });
  // Every call into the master happens on the loop's thread; the futures are waited for here.
  auto on_loop = [&](auto f) {
    std::promise<decltype(f())> p;
    asio::post(io, [&] { p.set_value(f()); });
    return p.get_future().get();
  };
  {
    auto master = std::make_unique<Master<>>(io.get_executor());
    std::future<std::shared_ptr<Worker>> forked = on_loop([&] { return master->fork({}, asio::use_future); });
    std::shared_ptr<Worker> w = forked.get();
    REQUIRE(w);
    on_loop([&] { return w->online(asio::use_future); }).get();
    on_loop([&] { return w->send({"future"}, asio::use_future); }).get();
    CHECK(on_loop([&] { return w->receive(asio::use_future); }).get().data == "future");
    on_loop([&] { return master->disconnect(asio::use_future); }).get();
    CHECK(on_loop([&] { return w->exited(asio::use_future); }).get() == ExitStatus{0, 0});
    // An error reaches the future as an exception.
    auto late = on_loop([&] { return w->send({"late"}, asio::use_future); });
    CHECK_THROWS_AS(late.get(), std::system_error);
    on_loop([&] {
      master.reset();  // the Master is destroyed on its loop's thread
      return 0;
    });
  }
  work.reset();
  loop.join();
}

TEST_CASE("tokens: fork with use_awaitable throws the spawn's own error, naming the step") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Settings settings;
    settings.exec = "/nonexistent/worker";
    Master<> master(io.get_executor(), settings);
    try {
      co_await master.fork();
      FAIL("fork() of a missing executable succeeded");
    } catch (const std::system_error& e) {
      CHECK(e.code() == std::errc::no_such_file_or_directory);
      CHECK(std::string(e.what()).find("execve /nonexistent/worker") != std::string::npos);
    }
  });
}
