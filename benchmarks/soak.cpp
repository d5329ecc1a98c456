// soak: many round-robin hand-offs and many messages through one master, with the master's
// open fds and resident memory read before and after: both should stay flat.
//   ninja -C build benchmarks/soak && build/benchmarks/soak [--handoffs 1000000] [--messages 1000000]
// Prints the counts, fds and RSS at start (after a warm-up) and at the end, then a JSON line.
// Exits 1 if a request went unanswered, the fd count grew, or RSS grew by more than 16 MiB.
#include "cocluster/cocluster.hpp"

#include <asio.hpp>
#include <fmt/core.h>

#include <atomic>
#include <charconv>
#include <chrono>
#include <cstring>
#include <dirent.h>
#include <fstream>
#include <string>
#include <thread>

using asio::awaitable;
using asio::use_awaitable;
using asio::ip::tcp;
using namespace std::chrono_literals;

namespace {

int open_fds() {
  DIR* d = ::opendir("/proc/self/fd");
  int n = 0;
  while (auto* e = ::readdir(d))
    if (e->d_name[0] != '.') ++n;
  ::closedir(d);
  return n - 1;
}

long rss_kib() {
  std::ifstream in("/proc/self/status");
  for (std::string line; std::getline(in, line);)
    if (line.rfind("VmRSS:", 0) == 0) return std::atol(line.c_str() + 6);
  return -1;
}

// ---- worker: answers each connection's line with "ok", echoes each message ----

awaitable<void> answer(tcp::socket s) {
  std::string line;
  auto [ec, n] = co_await asio::async_read_until(s, asio::dynamic_buffer(line), '\n', cocluster::as_tuple(use_awaitable));
  if (!ec) co_await asio::async_write(s, asio::buffer("ok\n", 3), cocluster::as_tuple(use_awaitable));
}

int run_worker() {
  asio::io_context io;
  cocluster::this_worker.start(io.get_executor());
  asio::co_spawn(io, []() -> awaitable<void> {
    auto server = co_await cocluster::this_worker.listen(tcp::endpoint(asio::ip::address_v4::loopback(), 0));
    co_await cocluster::this_worker.send({std::to_string(server.local_endpoint().port())});
    asio::co_spawn(co_await asio::this_coro::executor, [&server]() -> awaitable<void> {
      for (;;) {
        auto [ec, s] = co_await server.accept(cocluster::as_tuple(use_awaitable));
        if (ec) co_return;
        asio::co_spawn(s.get_executor(), answer(std::move(s)), asio::detached);
      }
    }, asio::detached);
    for (;;) {
      auto [ec, m] = co_await cocluster::this_worker.receive(cocluster::as_tuple(use_awaitable));
      if (ec) co_return;
      co_await cocluster::this_worker.send(std::move(m));
    }
  }, asio::detached);
  io.run();
  return 0;
}

awaitable<void> client(tcp::endpoint where, std::atomic<long>& left, std::atomic<long>& answered) {
  auto ex = co_await asio::this_coro::executor;
  while (left-- > 0) {
    tcp::socket s(ex);
    auto [cec] = co_await s.async_connect(where, cocluster::as_tuple(use_awaitable));
    if (cec) continue;
    co_await asio::async_write(s, asio::buffer("hi\n", 3), cocluster::as_tuple(use_awaitable));
    std::string reply;
    co_await asio::async_read(s, asio::dynamic_buffer(reply), cocluster::as_tuple(use_awaitable));
    if (reply == "ok\n") ++answered;
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (cocluster::is_worker()) return run_worker();
  long handoffs = 1'000'000, messages = 1'000'000;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string_view a = argv[i];
    long v = 0;
    auto [p, ec] = std::from_chars(argv[i + 1], argv[i + 1] + std::strlen(argv[i + 1]), v);
    if (ec != std::errc() || v <= 0 || (a != "--handoffs" && a != "--messages")) {
      fmt::print(stderr, "usage: soak [--handoffs N] [--messages N]\n");
      return 2;
    }
    (a == "--handoffs" ? handoffs : messages) = v;
  }
  asio::io_context io;
  cocluster::Master<cocluster::RoundRobin> master(io.get_executor());
  int fds_start = 0, fds_end = 0;
  long rss_start = 0, rss_end = 0, answered_total = 0, echoed = 0;
  double seconds = 0;
  bool failed = false;
  asio::co_spawn(io, [&]() -> awaitable<void> {
    auto a = co_await master.fork();
    auto b = co_await master.fork();
    const auto port = static_cast<unsigned short>(std::stoi((co_await a->receive()).data));
    co_await b->receive();
    const tcp::endpoint where(asio::ip::address_v4::loopback(), port);
    auto run_clients = [&](long count) -> awaitable<long> {  // on their own thread
      std::atomic<long> left{count}, answered{0};
      std::atomic<bool> done{false};
      asio::io_context client_io;
      for (int i = 0; i < 32; ++i) asio::co_spawn(client_io, client(where, left, answered), asio::detached);
      std::thread t([&] {
        client_io.run();
        done = true;
      });
      asio::steady_timer poll(io);
      while (!done) {
        poll.expires_after(20ms);
        co_await poll.async_wait(use_awaitable);
      }
      t.join();
      co_return answered.load();
    };
    auto round_trips = [&](long count) -> awaitable<long> {
      long n = 0;
      for (long i = 0; i < count; ++i) {
        co_await a->send({"m"});
        n += (co_await a->receive()).data == "m";
      }
      co_return n;
    };
    co_await run_clients(2000);  // warm-up: Asio's and the allocator's own lazily made state
    co_await round_trips(2000);
    fds_start = open_fds();
    rss_start = rss_kib();
    const auto t0 = std::chrono::steady_clock::now();
    answered_total = co_await run_clients(handoffs);
    echoed = co_await round_trips(messages);
    seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    fds_end = open_fds();
    rss_end = rss_kib();
    co_await master.disconnect();
  }, [&](std::exception_ptr e) {
    if (e) {
      failed = true;
      try {
        std::rethrow_exception(e);
      } catch (const std::exception& x) {
        fmt::print(stderr, "soak: {}\n", x.what());
      }
    }
  });
  io.run();
  fmt::print("soak: {} round-robin hand-offs ({} answered), {} message round trips ({} echoed), {:.1f} s\n", handoffs,
             answered_total, messages, echoed, seconds);
  fmt::print("  master fds  {:>8} -> {:<8}\n  master RSS  {:>8} -> {:<8} KiB\n", fds_start, fds_end, rss_start, rss_end);
  fmt::print("{{\"handoffs\":{},\"answered\":{},\"messages\":{},\"echoed\":{},\"fds_start\":{},\"fds_end\":{},"
             "\"rss_kib_start\":{},\"rss_kib_end\":{}}}\n",
             handoffs, answered_total, messages, echoed, fds_start, fds_end, rss_start, rss_end);
  const bool ok = !failed && answered_total == handoffs && echoed == messages && fds_end <= fds_start &&
                  rss_end - rss_start <= 16 * 1024;
  return ok ? 0 : 1;
}
