// chaos: workers SIGKILLed under load. 4 round-robin workers answer one line per connection;
// 64 client connections at a time ask them (each connect, send a line, read the answer to
// EOF) while every 200 ms a random worker is SIGKILLed and a replacement forked. Prints what
// was attempted, answered, and failed (reset or closed without an answer; each such
// connection was in the hands of a worker that was killed), then one JSON line.
//   ninja -C build benchmarks/chaos && build/benchmarks/chaos [--seconds 10] [--clients 64] [--workers 4]
// Exits 1 if the master failed, a client hung (connected, then no answer and no end within
// 5 s), or more connections failed than the killed workers could have been serving (kills x
// clients). A connect that does not complete within the 5 s is counted apart and is no
// failure: the kernel completes a connect before anyone accepts it (the backlog holds far more
// than 64), so one that never completes never reached the master (on loopback, 200,000
// connections in 10 s reuse every client port several times while the server's side of each
// is in TIME_WAIT, and a SYN the kernel takes for an old duplicate waits for a retransmission).
#include "cocluster/cocluster.hpp"

#include <asio.hpp>
#include <fmt/core.h>

#include <atomic>
#include <charconv>
#include <chrono>
#include <random>
#include <string>
#include <thread>

using asio::awaitable;
using asio::use_awaitable;
using asio::ip::tcp;
using namespace std::chrono_literals;

namespace {

struct options {
  int seconds = 10;
  int clients = 64;
  int workers = 4;
};

// ---- worker: one line in, "worker <id>" out, close ----

awaitable<void> answer(tcp::socket s) {
  std::string line;
  auto [ec, n] = co_await asio::async_read_until(s, asio::dynamic_buffer(line), '\n', cocluster::as_tuple(use_awaitable));
  if (ec) co_return;
  const std::string reply = "worker " + std::to_string(cocluster::this_worker.id()) + "\n";
  co_await asio::async_write(s, asio::buffer(reply), cocluster::as_tuple(use_awaitable));
}

int run_worker() {
  asio::io_context io;
  cocluster::this_worker.start(io.get_executor());
  asio::co_spawn(io, []() -> awaitable<void> {
    const char* port = std::getenv("CHAOS_PORT");
    auto server = co_await cocluster::this_worker.listen(tcp::endpoint(asio::ip::address_v4::loopback(),
                                                                       static_cast<unsigned short>(std::atoi(port))));
    for (;;) {
      auto [ec, s] = co_await server.accept(cocluster::as_tuple(use_awaitable));
      if (ec) co_return;
      asio::co_spawn(s.get_executor(), answer(std::move(s)), asio::detached);
    }
  }, asio::detached);
  io.run();
  return 0;
}

// ---- clients (their own thread and io_context) ----

struct tally {
  std::atomic<long> attempted{0}, answered{0}, failed{0}, hung{0}, unconnected{0};
};

awaitable<void> client(tcp::endpoint where, std::chrono::steady_clock::time_point until, tally& t) {
  auto ex = co_await asio::this_coro::executor;
  while (std::chrono::steady_clock::now() < until) {
    ++t.attempted;
    tcp::socket s(ex);
    asio::steady_timer bound(ex, 5s);
    bool timed_out = false;
    bound.async_wait([&](std::error_code ec) {
      if (!ec) {
        timed_out = true;
        s.close();
      }
    });
    auto [cec] = co_await s.async_connect(where, cocluster::as_tuple(use_awaitable));
    const bool connected = !cec;
    std::string reply;
    if (connected) {
      co_await asio::async_write(s, asio::buffer("hi\n", 3), cocluster::as_tuple(use_awaitable));
      co_await asio::async_read(s, asio::dynamic_buffer(reply), cocluster::as_tuple(use_awaitable));
    }
    bound.cancel();
    if (reply.rfind("worker ", 0) == 0) ++t.answered;
    else if (timed_out) ++(connected ? t.hung : t.unconnected);
    else ++t.failed;
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (cocluster::is_worker()) return run_worker();
  options o;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string_view a = argv[i];
    int v = 0;
    auto [p, ec] = std::from_chars(argv[i + 1], argv[i + 1] + std::strlen(argv[i + 1]), v);
    if (ec != std::errc() || v <= 0) {
      fmt::print(stderr, "chaos: {} {}: not a positive number\n", a, argv[i + 1]);
      return 2;
    }
    if (a == "--seconds") o.seconds = v;
    else if (a == "--clients") o.clients = v;
    else if (a == "--workers") o.workers = v;
    else {
      fmt::print(stderr, "chaos: unknown argument {}\nusage: chaos [--seconds S] [--clients C] [--workers N]\n", a);
      return 2;
    }
  }

  // A free port, so the workers' listen and the replacements' share one.
  unsigned short port = 0;
  {
    asio::io_context probe;
    tcp::acceptor a(probe, {asio::ip::address_v4::loopback(), 0});
    port = a.local_endpoint().port();
  }
  ::setenv("CHAOS_PORT", std::to_string(port).c_str(), 1);

  asio::io_context io;
  cocluster::Master<cocluster::RoundRobin> master(io.get_executor());
  tally t;
  long kills = 0;
  bool master_failed = false;
  asio::co_spawn(io, [&]() -> awaitable<void> {
    std::vector<std::shared_ptr<cocluster::Worker>> workers;
    for (int i = 0; i < o.workers; ++i) workers.push_back(co_await master.fork());
    for (auto& w : workers) co_await w->listening();

    asio::io_context client_io;
    const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(o.seconds);
    for (int i = 0; i < o.clients; ++i)
      asio::co_spawn(client_io, client({asio::ip::address_v4::loopback(), port}, until, t), asio::detached);
    std::atomic<bool> clients_done{false};
    std::thread clients([&] {
      client_io.run();
      clients_done = true;
    });

    std::mt19937 random(12345);
    asio::steady_timer tick(io);
    while (std::chrono::steady_clock::now() < until) {
      tick.expires_after(200ms);
      co_await tick.async_wait(use_awaitable);
      auto& victim = workers[random() % workers.size()];
      victim->kill(SIGKILL);
      ++kills;
      co_await victim->exited();
      victim = co_await master.fork();
      co_await victim->listening();
    }
    // The clients end by themselves (their deadline has passed); the loop keeps serving them.
    while (!clients_done) {
      tick.expires_after(10ms);
      co_await tick.async_wait(use_awaitable);
    }
    clients.join();
    co_await master.disconnect();
  }, [&](std::exception_ptr e) {
    if (e) {
      master_failed = true;
      try {
        std::rethrow_exception(e);
      } catch (const std::exception& x) {
        fmt::print(stderr, "chaos: master: {}\n", x.what());
      }
    }
    io.stop();
  });
  io.run();

  const long attempted = t.attempted, answered = t.answered, failed = t.failed, hung = t.hung,
             unconnected = t.unconnected;
  fmt::print("chaos: {} s, {} workers (round robin), {} clients, a worker SIGKILLed every 200 ms\n", o.seconds,
             o.workers, o.clients);
  fmt::print("  attempted {:>9}\n  answered  {:>9}\n  failed    {:>9}  (reset or closed before an answer)\n"
             "  hung      {:>9}  (connected, no answer and no end within 5 s)\n"
             "  no connect{:>9}  (the connect itself timed out: the kernel never completed it, the master never saw it)\n"
             "  kills     {:>9}\n",
             attempted, answered, failed, hung, unconnected, kills);
  fmt::print("{{\"attempted\":{},\"answered\":{},\"failed\":{},\"hung\":{},\"connect_timed_out\":{},\"kills\":{}}}\n",
             attempted, answered, failed, hung, unconnected, kills);
  const bool ok = !master_failed && hung == 0 && failed <= kills * o.clients && answered > 0;
  return ok ? 0 : 1;
}
