// Readiness (worker->ready(), this_worker.ready(), master.ready()) and the Supervisor: restarts
// and the restart limit, the boot timer, rolling reload and its rollback under a client's load,
// and a graceful stop on SIGTERM to a supervising master alone or to its whole process group.
#include "cocluster/cocluster.hpp"

#include <poll.h>
#include <signal.h>
#include <unistd.h>

#include <asio.hpp>
#include <doctest/doctest.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "support.hpp"
#include "worker_scenario.hpp"

using namespace cocluster;
using namespace test;
using asio::ip::tcp;

namespace {

bool env_set(const char* name) { return std::getenv(name) && std::string_view(std::getenv(name)) == "1"; }

// One connection of sv_http: a line in; "ping" is answered with this worker's pid, "slow" with
// "started", then "draining" once the worker's server has closed (its master disconnects it),
// then, after the client's "finish", "done". Then the connection closes.
awaitable<void> serve(tcp::socket socket, bool& draining, asio::steady_timer& drain_signal) {
  asio::streambuf in;
  auto [ec, n] = co_await asio::async_read_until(socket, in, '\n', cocluster::as_tuple(use_awaitable));
  if (ec) co_return;
  std::string line;
  std::getline(std::istream(&in) >> std::ws, line);
  std::string reply = std::to_string(::getpid()) + "\n";
  if (line == "slow") {
    co_await asio::async_write(socket, asio::buffer(std::string("started\n")), cocluster::as_tuple(use_awaitable));
    if (!draining) co_await drain_signal.async_wait(cocluster::as_tuple(use_awaitable));
    co_await asio::async_write(socket, asio::buffer(std::string("draining\n")), cocluster::as_tuple(use_awaitable));
    auto [fec, fn] = co_await asio::async_read_until(socket, in, '\n', cocluster::as_tuple(use_awaitable));
    if (fec) co_return;
    reply = "done\n";
  }
  co_await asio::async_write(socket, asio::buffer(reply), cocluster::as_tuple(use_awaitable));
}

}  // namespace

// A TCP server on 127.0.0.1:0 (every worker's first listen(0) shares a port). TEST_EXIT=1: exits
// with 3 right after start(); TEST_EXIT_CLEAN=1: with 0. The message "grow" makes it hold
// 64 MiB more. TEST_NEVER_LISTEN=1: never listens (never ready by default).
// TEST_READY_ON_GO=1: calls this_worker.ready() when the master sends "go". TEST_LISTEN_ON_GO=1:
// listens only once the master sends "go" (and is ready by listening). The message "block"
// blocks its event loop for good.
WORKER_SCENARIO(sv_http) {
  asio::io_context io;
  this_worker.start(io.get_executor());
  if (env_set("TEST_EXIT")) return 3;
  if (env_set("TEST_EXIT_CLEAN")) return 0;
  bool draining = false, went = false;
  asio::steady_timer drain_signal(io, asio::steady_timer::time_point::max());
  asio::steady_timer go_signal(io, asio::steady_timer::time_point::max());
  asio::co_spawn(io, [&]() -> awaitable<void> {
    for (;;) {
      auto [ec, m] = co_await this_worker.receive(cocluster::as_tuple(use_awaitable));
      if (ec) co_return;
      if (m.data == "go") {
        went = true;
        go_signal.cancel();
        if (!env_set("TEST_LISTEN_ON_GO")) this_worker.ready();  // (with it: ready once listening)
      }
      if (m.data == "block")  // its event loop stops turning for good: only SIGKILL ends it
        for (;;) std::this_thread::sleep_for(std::chrono::hours(1));
      if (m.data == "grow") {  // 64 MiB more resident memory
        static std::vector<char> ballast;
        ballast.assign(64u << 20, 'x');
        co_await this_worker.send({"grown"});
      }
    }
  }, asio::detached);
  if (!env_set("TEST_NEVER_LISTEN"))
    asio::co_spawn(io, [&]() -> awaitable<void> {
      if (env_set("TEST_LISTEN_ON_GO") && !went) co_await go_signal.async_wait(cocluster::as_tuple(use_awaitable));
      auto server = co_await this_worker.listen(tcp::endpoint(asio::ip::make_address("127.0.0.1"), 0));
      for (;;) {
        auto [ec, socket] = co_await server.accept(cocluster::as_tuple(use_awaitable));
        if (ec) break;
        asio::co_spawn(io, serve(std::move(socket), draining, drain_signal), asio::detached);
      }
      draining = true;  // the server closed: the master is disconnecting this worker
      drain_signal.cancel();
    }, asio::detached);
  io.run();
  return 0;
}

namespace {

Env http_env(Env extra = {}) {
  Env env = scenario_env("sv_http");
  env.merge(extra);
  return env;
}

// What a fresh sv_http worker holds: the memory tests set max_memory above it (a worker under
// ASan holds about 190 MiB as soon as it is ready, one built plainly a few MiB), so that only a
// worker that was told to "grow" is above the limit.
awaitable<std::size_t> fresh_worker_rss(asio::io_context& io) {
  Master<> probe(io.get_executor(), Settings{.env = http_env()});
  auto w = co_await probe.fork();
  co_await probe.ready();
  const std::size_t rss = cocluster::detail::resident_bytes(w->pid()).value_or(0);
  co_await probe.disconnect();
  REQUIRE(rss > 0);
  MESSAGE("a fresh worker holds ", rss >> 20, " MiB");
  co_return rss;
}

// A boot timeout that the workers which do listen must meet: an ASan build of the test binary
// takes 0.8 s to start on a busy 2-CPU VM (200 ms failed there: the first worker was killed),
// and the tests that wait for it to expire three times stay short.
constexpr std::chrono::milliseconds boot_timeout_past_start{2000};

// One request to the sv_http servers at `port`: the pid that answered, or 0 if it failed.
awaitable<pid_t> ping(unsigned short port) {
  auto ex = co_await asio::this_coro::executor;
  tcp::socket s(ex);
  auto [cec] = co_await s.async_connect(tcp::endpoint(asio::ip::make_address("127.0.0.1"), port),
                                        cocluster::as_tuple(use_awaitable));
  if (cec) co_return 0;
  auto [wec, wn] = co_await asio::async_write(s, asio::buffer(std::string("ping\n")), cocluster::as_tuple(use_awaitable));
  if (wec) co_return 0;
  std::string reply;
  auto [rec, rn] = co_await asio::async_read(s, asio::dynamic_buffer(reply), cocluster::as_tuple(use_awaitable));
  if (rec != asio::error::eof) co_return 0;
  co_return static_cast<pid_t>(std::atoi(reply.c_str()));
}

struct load {
  std::size_t ok = 0, failed = 0;
  std::set<pid_t> pids;
  bool stop = false, done = false;
};

// Requests one after another until `l.stop`; then l.done.
awaitable<void> keep_asking(unsigned short port, load& l) {
  while (!l.stop) {
    const pid_t pid = co_await ping(port);
    if (pid > 0) {
      ++l.ok;
      l.pids.insert(pid);
    } else {
      ++l.failed;
    }
  }
  l.done = true;
}

// Polls `done` every millisecond until it holds (the test's bound ends a wait that never does).
awaitable<void> until_true(asio::io_context& io, std::function<bool()> done) {
  asio::steady_timer t(io);
  while (!done()) {
    t.expires_after(1ms);
    co_await t.async_wait(use_awaitable);
  }
}

awaitable<void> until(asio::io_context& io, const bool& flag) {
  co_await until_true(io, [&] { return flag; });
}

std::set<pid_t> pids_of(const std::vector<std::shared_ptr<Worker>>& ws) {
  std::set<pid_t> out;
  for (auto& w : ws) out.insert(w->pid());
  return out;
}

}  // namespace

TEST_CASE("readiness: a worker is ready when it listens; master.ready() when all are; a ready event follows") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor());
    auto& events = master.events();
    auto a = co_await master.fork(http_env());
    auto b = co_await master.fork(http_env());
    co_await master.ready();
    CHECK(a->is_ready());
    CHECK(b->is_ready());
    bool saw_listening = false, saw_ready_after = false;
    while (!saw_ready_after) {
      Event e = co_await events.next();
      if (e.worker != a) continue;
      if (e.type == EventType::listening) saw_listening = true;
      if (e.type == EventType::ready) saw_ready_after = saw_listening;
    }
    CHECK(saw_ready_after);
    co_await master.disconnect();
  });
}

TEST_CASE("readiness: with ReadyOn::explicit_ready only this_worker.ready() makes a listening worker ready") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor(), Settings{.ready_on = ReadyOn::explicit_ready});
    auto a = co_await master.fork(http_env());
    auto b = co_await master.fork(http_env());
    co_await a->listening();
    co_await b->listening();
    bool all_ready = false;
    asio::co_spawn(io, [&]() -> awaitable<void> {
      co_await master.ready();
      all_ready = true;
    }, asio::detached);
    co_await a->send({"go"});
    co_await a->ready();
    // b cannot be ready: it is told only now, so master.ready() is still waiting.
    CHECK(a->is_ready());
    CHECK_FALSE(b->is_ready());
    CHECK_FALSE(all_ready);
    co_await b->send({"go"});
    co_await until(io, all_ready);
    CHECK(b->is_ready());
    co_await master.disconnect();
  });
}

TEST_CASE("readiness: a worker that exits before it is ready fails ready() with worker_exited or not_connected") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor());
    Env exits = http_env({{"TEST_EXIT", "1"}});
    auto w = co_await master.fork(exits);
    auto [ec] = co_await w->ready(cocluster::as_tuple(use_awaitable));
    CHECK((ec == error::worker_exited || ec == error::worker_not_connected));
    CHECK_FALSE(w->is_ready());
    co_await master.ready();  // nobody left to wait for
  });
}

TEST_CASE("supervisor: a crash loop stops after max_restarts with restart_limit_reached and no process left") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor(), Settings{.env = http_env({{"TEST_EXIT", "1"}})});
    auto& events = master.events();
    Supervisor<> supervisor(master, {.workers = 2, .restart_delay = 1ms, .max_restarts = 3,
                                     .restart_window = std::chrono::milliseconds(60000)});
    auto [ec] = co_await supervisor.run(cocluster::as_tuple(use_awaitable));
    CHECK(ec == error::restart_limit_reached);
    CHECK(ec.message().find("restarts") != std::string::npos);
    CHECK(master.workers().empty());
    std::size_t forks = 0, exits = 0;
    while (events.pending() > 0) {
      Event e = co_await events.next();
      forks += e.type == EventType::fork;
      exits += e.type == EventType::exit;
    }
    // 2, then the restarts started before the 4th crash (one too many) stopped it (a restart
    // still in its backoff then is not started). Every one of them has exited.
    CHECK(supervisor.restarts() >= 2);
    CHECK(supervisor.restarts() <= 3);
    CHECK(forks == 2 + supervisor.restarts());
    CHECK(exits == forks);
  });
}

TEST_CASE("supervisor: a worker that dies is replaced and the replacement is ready; stop() drains and run() succeeds") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor(), Settings{.env = http_env()});
    Supervisor<> supervisor(master, {.workers = 2, .restart_delay = 1ms});
    std::error_code result = asio::error::would_block;
    bool ran = false;
    asio::co_spawn(io, supervisor.run(cocluster::as_tuple(use_awaitable)), [&](std::exception_ptr, std::tuple<std::error_code> r) {
      result = std::get<0>(r);
      ran = true;
    });
    co_await until_true(io, [&] { return supervisor.workers().size() >= 2; });
    co_await master.ready();
    auto before = supervisor.workers();
    REQUIRE(before.size() == 2);
    before[0]->signal(SIGKILL);
    co_await before[0]->exited();
    // The replacement: a new worker, ready.
    co_await until_true(io, [&] { return supervisor.workers().size() >= 2 && supervisor.workers().back() != before[1]; });
    co_await master.ready();
    auto after = supervisor.workers();
    CHECK(after.size() == 2);
    CHECK(supervisor.restarts() == 1);
    CHECK(pids_of(after).count(before[0]->pid()) == 0);
    CHECK(pids_of(after).count(before[1]->pid()) == 1);
    supervisor.stop();
    co_await until(io, ran);
    CHECK(result == std::error_code());
    for (auto& w : after) CHECK(w->exited_after_disconnect() == true);
  });
}

namespace {

// The only worker, stopped while 16 clients connect and ask (under RoundRobin the master
// accepts them and hands them to it; under SharedSocket and ReusePort they wait in the
// backlog), then SIGKILLed: its replacement answers every one, on the same port. Without
// keep_listeners the listener was closed with them. Once the supervision has stopped, the port
// is free.
template <class P>
void only_worker_crash_loses_nothing() {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<P> master(io.get_executor(), Settings{.env = http_env()});
    Supervisor<P> supervisor(master, {.workers = 1, .restart_delay = 1ms});
    bool ran = false;
    asio::co_spawn(io, supervisor.run(cocluster::as_tuple(use_awaitable)), [&](std::exception_ptr, std::tuple<std::error_code>) { ran = true; });
    co_await until_true(io, [&] { return supervisor.workers().size() == 1; });
    co_await master.ready();
    auto first = supervisor.workers().front();
    const Address where = co_await first->listening();
    const tcp::endpoint at(asio::ip::make_address("127.0.0.1"), where.port);
    first->signal(SIGSTOP);
    std::vector<std::shared_ptr<pending_request>> pings;
    for (int i = 0; i < 16; ++i) {
      auto p = std::make_shared<pending_request>(pending_request{tcp::socket(io), {}, {}, false});
      co_await p->socket.async_connect(at, use_awaitable);
      co_await asio::async_write(p->socket, asio::buffer(std::string("ping\n")), use_awaitable);
      asio::co_spawn(io, await_answer(p), asio::detached);
      pings.push_back(p);
    }
    first->signal(SIGKILL);
    co_await first->exited();
    co_await until_true(io, [&] { return std::all_of(pings.begin(), pings.end(), [](auto& p) { return p->done; }); });
    co_await until_true(io, [&] { return supervisor.workers().size() == 1 && supervisor.workers().front() != first; });
    const pid_t replacement = supervisor.workers().front()->pid();
    for (auto& p : pings) {
      CHECK_MESSAGE(!p->ec, "a connection failed: ", p->ec.message());
      CHECK_MESSAGE(std::atoi(p->reply.c_str()) == replacement, "answer: '", p->reply, "'");
    }
    CHECK(supervisor.restarts() == 1);
    CHECK(co_await ping(where.port) == replacement);
    supervisor.stop();
    co_await until(io, ran);
    CHECK(co_await ping(where.port) == 0);  // nothing kept: refused
  });
}

}  // namespace

TEST_CASE("supervisor: the only worker's crash loses no connection: its replacement answers what waited (RoundRobin)") {
  only_worker_crash_loses_nothing<RoundRobin>();
}

TEST_CASE("supervisor: the only worker's crash loses no connection: its replacement answers what waited (SharedSocket)") {
  only_worker_crash_loses_nothing<SharedSocket>();
}

TEST_CASE("supervisor: a listener kept for a replacement still in its backoff waits for it, and closes when the supervisor goes") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor(), Settings{.env = http_env()});
    unsigned short port = 0;
    {
      // The listener waits for the restart's own backoff (an hour), not the longest (two).
      Supervisor<> supervisor(master, {.workers = 1, .restart_delay = std::chrono::hours(1),
                                       .max_restart_delay = std::chrono::hours(2)});
      asio::co_spawn(io, supervisor.run(cocluster::as_tuple(use_awaitable)), asio::detached);
      co_await until_true(io, [&] { return supervisor.workers().size() == 1; });
      co_await master.ready();
      auto w = supervisor.workers().front();
      port = (co_await w->listening()).port;
      CHECK(master.listener_linger() > std::chrono::hours(2));  // run(): the longest backoff
      w->signal(SIGKILL);
      co_await w->exited();
      co_await until_true(io, [&] { return master.listener_linger() < std::chrono::hours(2); });  // the restart's
      tcp::socket early(io);  // kept: the backlog takes it
      co_await early.async_connect(tcp::endpoint(asio::ip::make_address("127.0.0.1"), port), use_awaitable);
    }
    CHECK(master.listener_linger() == 0ms);  // the Master's own again
    CHECK(co_await ping(port) == 0);         // closed: refused
  });
}

TEST_CASE("supervisor: a replacement that dies before it is ready closes the kept listener: clients are refused, not left waiting") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor(), Settings{.env = http_env()});
    // The first restart at once, the next a second later, then an hour: still supervising.
    Supervisor<> supervisor(master, {.workers = 1, .restart_delay = 1ms, .backoff_factor = 1000,
                                     .max_restart_delay = std::chrono::hours(1), .max_restarts = 100});
    bool ran = false;
    asio::co_spawn(io, supervisor.run(cocluster::as_tuple(use_awaitable)), [&](std::exception_ptr, std::tuple<std::error_code>) { ran = true; });
    co_await until_true(io, [&] { return supervisor.workers().size() == 1; });
    co_await master.ready();
    auto first = supervisor.workers().front();
    const unsigned short port = (co_await first->listening()).port;
    master.setup_merge({.env = http_env({{"TEST_EXIT", "1"}})});  // replacements exit at start
    first->signal(SIGKILL);
    co_await first->exited();
    // Kept, until the replacement exits unready: then refused.
    const tcp::endpoint at(asio::ip::make_address("127.0.0.1"), port);
    auto refused = [&]() -> awaitable<bool> {
      tcp::socket s(io);
      auto [ec] = co_await s.async_connect(at, cocluster::as_tuple(use_awaitable));
      co_return ec == asio::error::connection_refused;
    };
    asio::steady_timer poll(io);
    while (!co_await refused()) {  // bounded by run_bounded
      poll.expires_after(5ms);
      co_await poll.async_wait(use_awaitable);
    }
    CHECK(supervisor.restarts() >= 1);
    CHECK_FALSE(ran);
    supervisor.stop();
    co_await until(io, ran);
  });
}

TEST_CASE("supervisor: a worker whose loop is blocked is killed after the heartbeat timer and replaced") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor(), Settings{.env = http_env()});
    Supervisor<> supervisor(master, {.workers = 1, .restart_delay = 1ms, .heartbeat = 400ms});
    CHECK(master.settings().heartbeat_timeout == 400ms);  // the supervisor's timer is the Master's
    bool ran = false;
    asio::co_spawn(io, supervisor.run(cocluster::as_tuple(use_awaitable)), [&](std::exception_ptr, std::tuple<std::error_code>) {
      ran = true;
    });
    co_await until_true(io, [&] { return !supervisor.workers().empty(); });
    co_await master.ready();
    auto hung = supervisor.workers().front();
    co_await hung->send({"block"});
    const ExitStatus status = co_await hung->exited();
    CHECK(status.signal == SIGKILL);
    CHECK(hung->unresponsive());
    co_await until_true(io, [&] { return !supervisor.workers().empty() && supervisor.workers().front() != hung; });
    co_await master.ready();
    CHECK(supervisor.restarts() == 1);
    CHECK(supervisor.workers().front()->pid() != hung->pid());
    supervisor.stop();
    co_await until(io, ran);
  });
}

TEST_CASE("supervisor: Restart::on_failure lets a clean exit go, and run() completes once no worker is left") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor(), Settings{.env = http_env({{"TEST_EXIT_CLEAN", "1"}})});
    auto& events = master.events();
    Supervisor<> supervisor(master, {.workers = 2, .restart = Restart::on_failure, .restart_delay = 1ms});
    auto [ec] = co_await supervisor.run(cocluster::as_tuple(use_awaitable));
    CHECK(ec == std::error_code());
    CHECK(supervisor.restarts() == 0);
    std::size_t forks = 0, clean_exits = 0;
    while (events.pending() > 0) {
      Event e = co_await events.next();
      forks += e.type == EventType::fork;
      clean_exits += e.type == EventType::exit && e.exit == ExitStatus{0, 0};
    }
    CHECK(forks == 2);
    CHECK(clean_exits == 2);
  });
}

TEST_CASE("supervisor: add_worker() starts one more, remove_worker() retires the newest; neither is a restart") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor(), Settings{.env = http_env()});
    Supervisor<> supervisor(master, {.workers = 1});
    bool ran = false;
    std::error_code result = asio::error::would_block;
    asio::co_spawn(io, supervisor.run(cocluster::as_tuple(use_awaitable)), [&](std::exception_ptr, std::tuple<std::error_code> r) {
      result = std::get<0>(r);
      ran = true;
    });
    auto wait_count = [&](std::size_t n) -> awaitable<void> {
      co_await until_true(io, [&] { return supervisor.workers().size() == n; });
    };
    co_await wait_count(1);
    const auto first = supervisor.workers().front();
    supervisor.add_worker();
    co_await wait_count(2);
    co_await master.ready();
    const auto added = supervisor.workers().back();
    CHECK(added != first);
    supervisor.remove_worker();
    co_await wait_count(1);
    CHECK(supervisor.workers().front() == first);
    CHECK((co_await added->exited()) == ExitStatus{0, 0});  // drained by its disconnect
    CHECK(added->exited_after_disconnect() == true);
    supervisor.remove_worker();  // never below one
    CHECK(supervisor.workers().size() == 1);
    CHECK(supervisor.restarts() == 0);
    supervisor.stop();
    co_await until(io, ran);
    CHECK(result == std::error_code());
  });
}

TEST_CASE("supervisor: a worker above max_memory is recycled: its replacement is ready before it leaves") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    const std::size_t limit = (co_await fresh_worker_rss(io)) + (std::size_t{32} << 20);  // "grow" adds 64 MiB
    Master<> master(io.get_executor(), Settings{.env = http_env()});
    auto& events = master.events();
    Supervisor<> supervisor(master, {.workers = 2, .max_memory = limit,
                                     .recycle_check_interval = std::chrono::milliseconds(20)});
    bool ran = false;
    asio::co_spawn(io, supervisor.run(cocluster::as_tuple(use_awaitable)), [&](std::exception_ptr, std::tuple<std::error_code>) { ran = true; });
    co_await until_true(io, [&] { return supervisor.workers().size() >= 2; });
    co_await master.ready();
    const auto big = supervisor.workers().front();
    const auto other = supervisor.workers().back();
    co_await big->send({"grow"});
    CHECK((co_await big->receive()).data == "grown");
    CHECK((co_await big->exited()) == ExitStatus{0, 0});  // retired by a disconnect
    co_await until_true(io, [&] { return supervisor.recycles() != 0; });  // counted once the supervisor has seen that exit too
    const auto now = supervisor.workers();
    REQUIRE(now.size() == 2);
    CHECK(now.front() == other);
    CHECK(now.back()->is_ready());
    CHECK(supervisor.recycles() == 1);
    CHECK(supervisor.restarts() == 0);
    // The replacement's `ready` came before the old worker's `exit`.
    bool replacement_ready = false, ready_first = false;
    while (events.pending() > 0) {
      Event e = co_await events.next();
      if (e.type == EventType::ready && e.worker == now.back()) replacement_ready = true;
      if (e.type == EventType::exit && e.worker == big) ready_first = replacement_ready;
    }
    CHECK(ready_first);
    supervisor.stop();
    co_await until(io, ran);
  });
}

namespace {

// What the events emitted so far say of the recycling: every fork after the first `initial`
// is a replacement, in flight until the exit of the worker it replaces (no worker crashes in
// these tests), so at most one may be in flight; and an old worker's disconnect comes after
// its replacement's ready.
struct recycle_order {
  long max_in_flight = 0;
  std::size_t disconnects_before_ready = 0;
  std::vector<std::pair<EventType, std::shared_ptr<Worker>>> log;  // fork, ready, disconnect, exit
};

awaitable<recycle_order> read_recycle_order(EventStream& events, long initial) {
  recycle_order r;
  long forks = 0, exits = 0;
  std::shared_ptr<Worker> replacement;
  bool replacement_ready = true;
  while (events.pending() > 0) {
    Event e = co_await events.next();
    switch (e.type) {
      case EventType::fork:
        if (++forks > initial) replacement = e.worker, replacement_ready = false;
        break;
      case EventType::ready:
        if (e.worker == replacement) replacement_ready = true;
        break;
      case EventType::disconnect:
        if (e.worker != replacement && !replacement_ready) ++r.disconnects_before_ready;
        break;
      case EventType::exit: ++exits; break;
      default: continue;
    }
    r.log.emplace_back(e.type, e.worker);
    r.max_in_flight = std::max(r.max_in_flight, forks - initial - exits);
  }
  co_return r;
}

}  // namespace

namespace {

// One worker, five connections one after another: it reports each one it took, once.
template <class P>
awaitable<void> five_served(asio::io_context& io) {
  Master<P> master(io.get_executor(), Settings{.env = http_env()});
  auto w = co_await master.fork();
  w->count_connections();
  const Address where = co_await w->listening();
  for (int i = 0; i < 5; ++i) CHECK((co_await ping(where.port)) == w->pid());
  co_await until_true(io, [&] { return w->connections_served() >= 5; });
  CHECK(w->connections_served() == 5);
  co_await master.disconnect();
}

}  // namespace

TEST_CASE("connections_served() counts every connection a worker took: handed over, or accepted on a shared or SO_REUSEPORT socket") {
  run_bounded([](asio::io_context& io) { return five_served<RoundRobin>(io); });
  run_bounded([](asio::io_context& io) { return five_served<SharedSocket>(io); });
  run_bounded([](asio::io_context& io) { return five_served<ReusePort>(io); });
}

TEST_CASE("supervisor: workers that served max_connections are recycled one at a time, each replacement ready first; no request fails") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor(), Settings{.env = http_env()});
    auto& events = master.events();
    Supervisor<>* sup = nullptr;
    // Seen by each retirement as it begins (before the disconnect): the workers retired before
    // it have all exited, and the supervised ones (the replacement among them) are all ready.
    std::vector<std::shared_ptr<Worker>> retired;
    std::size_t overlapping = 0, not_ready = 0;
    bool stopping = false;
    SupervisorSettings settings{.workers = 2, .max_connections = 20, .recycle_check_interval = 5ms};
    settings.before_disconnect = [&](std::shared_ptr<Worker> w) -> awaitable<void> {
      if (stopping) co_return;
      for (auto& r : retired) overlapping += !r->is_dead();
      const auto now = sup->workers();
      not_ready += now.size() != 2;
      for (auto& o : now) not_ready += !o->is_ready();
      retired.push_back(w);
    };
    Supervisor<> supervisor(master, settings);
    sup = &supervisor;
    bool ran = false;
    asio::co_spawn(io, supervisor.run(cocluster::as_tuple(use_awaitable)), [&](std::exception_ptr, std::tuple<std::error_code>) { ran = true; });
    co_await until_true(io, [&] { return supervisor.workers().size() == 2; });
    co_await master.ready();
    const auto first = supervisor.workers();
    for (auto& w : first) CHECK(supervisor.connection_limit(*w) == 20);  // no jitter
    const Address where = co_await first.front()->listening();
    // 100 connections, one after another, and more until both first workers have reported 20.
    std::size_t failed = 0, asked = 0;
    while (asked < 100 || first[0]->connections_served() < 20 || first[1]->connections_served() < 20) {
      failed += (co_await ping(where.port)) == 0;
      ++asked;
    }
    // Both are due: both are recycled (perhaps after the load). A recycling is counted once
    // the supervisor has seen its worker's exit too, which can come a turn after is_dead().
    co_await until_true(io, [&] { return first[0]->is_dead() && first[1]->is_dead(); });
    co_await until_true(io, [&] { return supervisor.recycles() >= 2; });
    CHECK(failed == 0);
    CHECK(overlapping == 0);
    CHECK(not_ready == 0);
    CHECK(supervisor.recycles() <= retired.size());  // (a replacement may be being recycled in turn)
    CHECK(supervisor.restarts() == 0);
    for (auto& w : first) {
      CHECK(w->connections_served() >= 20);
      CHECK(w->exited_after_disconnect() == true);
      CHECK((co_await w->exited()) == ExitStatus{0, 0});
    }
    const recycle_order order = co_await read_recycle_order(events, 2);
    CHECK(order.max_in_flight == 1);
    CHECK(order.disconnects_before_ready == 0);
    MESSAGE(asked << " connections; " << supervisor.recycles() << " workers recycled");
    stopping = true;
    supervisor.stop();
    co_await until(io, ran);
  });
}

TEST_CASE("supervisor: each worker's connection limit is max_connections plus its own jitter") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor(), Settings{.env = http_env()});
    Supervisor<> supervisor(master, {.workers = 8, .max_connections = 1000, .max_connections_jitter = 1000000});
    bool ran = false;
    asio::co_spawn(io, supervisor.run(cocluster::as_tuple(use_awaitable)), [&](std::exception_ptr, std::tuple<std::error_code>) { ran = true; });
    co_await until_true(io, [&] { return supervisor.workers().size() == 8; });
    co_await master.ready();
    std::set<std::uint64_t> limits;
    for (auto& w : supervisor.workers()) {
      const std::uint64_t limit = supervisor.connection_limit(*w);
      CHECK(limit >= 1000);
      CHECK(limit <= 1001000);
      limits.insert(limit);
    }
    // Eight draws from a million and one values: all equal has a chance of 1e-42.
    CHECK(limits.size() > 1);
    const auto one = supervisor.workers().front();
    supervisor.stop();
    co_await until(io, ran);
    CHECK(supervisor.connection_limit(*one) == 0);  // no longer supervised
  });
}

TEST_CASE("supervisor: recycling for memory and for connections never overlaps: one waits for the other") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    // Workers listen only when told "go": a replacement takes no connection (and is not ready)
    // until the test lets it, so both first workers reach their limits while the first
    // recycling waits.
    const std::size_t limit = (co_await fresh_worker_rss(io)) + (std::size_t{32} << 20);  // "grow" adds 64 MiB
    Master<> master(io.get_executor(), Settings{.env = http_env({{"TEST_LISTEN_ON_GO", "1"}})});
    auto& events = master.events();
    Supervisor<> supervisor(master, {.workers = 2, .max_connections = 20, .max_memory = limit,
                                     .recycle_check_interval = 5ms});
    bool ran = false;
    asio::co_spawn(io, supervisor.run(cocluster::as_tuple(use_awaitable)), [&](std::exception_ptr, std::tuple<std::error_code>) { ran = true; });
    co_await until_true(io, [&] { return supervisor.workers().size() == 2; });
    const auto first = supervisor.workers();
    for (auto& w : first) co_await w->send({"go"});
    co_await master.ready();
    const Address where = co_await first.front()->listening();
    co_await first[0]->send({"grow"});  // above max_memory: its recycling starts at the next look
    CHECK((co_await first[0]->receive()).data == "grown");
    co_await until_true(io, [&] { return master.workers().size() == 3; });  // its replacement, waiting for "go"
    // Now both reach max_connections while the memory recycling is in flight.
    std::size_t failed = 0;
    while (first[0]->connections_served() < 20 || first[1]->connections_served() < 20)
      failed += (co_await ping(where.port)) == 0;
    CHECK(failed == 0);
    // Each replacement in turn: let it listen; its predecessor leaves; then the next one.
    for (int i = 0; i < 2; ++i) {
      co_await until_true(io, [&] {
        for (auto& [id, w] : master.workers())
          if (!w->is_ready()) return true;
        return false;
      });
      std::size_t booting = 0;
      for (auto& [id, w] : master.workers())
        if (!w->is_ready()) {
          ++booting;
          co_await w->send({"go"});
        }
      CHECK(booting == 1);
      co_await until_true(io, [&] { return supervisor.recycles() == std::size_t(i + 1); });
    }
    CHECK(first[0]->is_dead());
    CHECK(first[1]->is_dead());
    CHECK(supervisor.restarts() == 0);
    const recycle_order order = co_await read_recycle_order(events, 2);
    CHECK(order.max_in_flight == 1);
    CHECK(order.disconnects_before_ready == 0);
    // fork, fork, ready, ready (the first two); then fork R1, ready R1, disconnect, exit, and
    // the same for R2: nothing interleaved.
    std::vector<EventType> types;
    for (auto& [t, w] : order.log) types.push_back(t);
    const std::vector<EventType> expected{EventType::fork,       EventType::fork,  EventType::ready,
                                          EventType::ready,      EventType::fork,  EventType::ready,
                                          EventType::disconnect, EventType::exit,  EventType::fork,
                                          EventType::ready,      EventType::disconnect, EventType::exit};
    CHECK(types == expected);
    supervisor.stop();
    co_await until(io, ran);
  });
}

TEST_CASE("supervisor: max_memory below what a fresh worker holds: one recycling, then an error line, never a loop") {
  std::vector<std::string> lines;
  set_log_sink([&](LogLevel, std::string_view line) { lines.emplace_back(line); });
  struct restore_stderr {
    ~restore_stderr() { set_log_sink({}); }
  } restore;
  run_bounded([&](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor(), Settings{.env = http_env()});
    Supervisor<> supervisor(master, {.workers = 1, .max_memory = std::size_t{1} << 20,  // every worker is above
                                     .recycle_check_interval = 5ms});
    bool ran = false;
    asio::co_spawn(io, supervisor.run(cocluster::as_tuple(use_awaitable)), [&](std::exception_ptr, std::tuple<std::error_code>) { ran = true; });
    // The first worker is recycled for memory once: nothing says yet that the limit is too low.
    co_await until_true(io, [&] { return supervisor.recycles() == 1; });
    auto said = [&](std::string_view what) {
      return std::count_if(lines.begin(), lines.end(), [&](const std::string& l) { return l.find(what) != l.npos; });
    };
    CHECK(said("a fresh worker needs more than max_memory") == 1);
    const auto fresh = supervisor.workers().front();
    // Its replacement is left alone. (Were it not, the next look, 5 ms on, would fork a
    // replacement for it: 50 looks give that every chance to show.)
    asio::steady_timer fifty_looks(io, 250ms);
    co_await fifty_looks.async_wait(use_awaitable);
    CHECK(master.workers().size() == 1);
    CHECK(!fresh->is_dead());
    CHECK(supervisor.recycles() == 1);
    CHECK(said("recycling it") == 1);
    supervisor.stop();
    co_await until(io, ran);
  });
}

TEST_CASE("supervisor: a recycling whose replacement is never ready leaves the worker serving, and stops nothing") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor(), Settings{.env = http_env()});
    auto& events = master.events();
    // max_restarts = 1: were a failed recycling a crash, the second would stop the pool.
    Supervisor<> supervisor(master, {.workers = 1, .restart_delay = 1ms, .max_restarts = 1,
                                     .boot_timeout = boot_timeout_past_start, .max_connections = 2,
                                     .recycle_check_interval = 5ms});
    std::error_code result = asio::error::would_block;
    bool ran = false;
    asio::co_spawn(io, supervisor.run(cocluster::as_tuple(use_awaitable)), [&](std::exception_ptr, std::tuple<std::error_code> r) {
      result = std::get<0>(r);
      ran = true;
    });
    co_await until_true(io, [&] { return supervisor.workers().size() == 1; });
    co_await master.ready();
    const auto old = supervisor.workers().front();
    const Address where = co_await old->listening();
    master.setup_merge({.env = http_env({{"TEST_NEVER_LISTEN", "1"}})});  // replacements never ready
    for (int i = 0; i < 2; ++i) CHECK((co_await ping(where.port)) == old->pid());
    // Three replacements forked and retired in turn (each one's exit comes before the next fork).
    std::size_t forks = 0, exits = 0;
    while (exits < 3) {
      Event e = co_await events.next();
      if (e.type == EventType::fork && e.worker != old) ++forks;
      if (e.type == EventType::exit) {
        CHECK(e.worker != old);
        ++exits;
      }
    }
    CHECK(forks >= 3);
    CHECK_FALSE(ran);  // nothing stopped the pool
    CHECK((co_await ping(where.port)) == old->pid());  // the old worker still serves
    CHECK(supervisor.recycles() == 0);
    CHECK(supervisor.restarts() == 0);
    supervisor.stop();
    co_await until(io, ran);
    CHECK_FALSE(result);
    CHECK(old->exited_after_disconnect() == true);
  });
}

TEST_CASE("supervisor: a worker not ready within the boot timer is killed and counts as a crash") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor(), Settings{.env = http_env({{"TEST_NEVER_LISTEN", "1"}})});
    auto& events = master.events();
    Supervisor<> supervisor(master, {.workers = 1, .restart_delay = 1ms, .max_restarts = 1,
                                     .boot_timeout = std::chrono::milliseconds(200)});
    auto [ec] = co_await supervisor.run(cocluster::as_tuple(use_awaitable));
    CHECK(ec == error::restart_limit_reached);
    std::size_t killed = 0;
    while (events.pending() > 0) {
      Event e = co_await events.next();
      if (e.type == EventType::exit && e.exit.signal == SIGKILL) ++killed;
    }
    CHECK(killed == 2);  // the first and its one replacement
  });
}

TEST_CASE("supervisor: under systemd it sends READY=1 when ready, RELOADING=1 and READY=1 around a reload, STOPPING=1") {
  // The fake systemd end: a datagram socket, named by NOTIFY_SOCKET for this test only.
  const std::string path = "/tmp/cocluster-test-sv-notify-" + std::to_string(::getpid()) + ".sock";
  ::unlink(path.c_str());
  const char* old = std::getenv("NOTIFY_SOCKET");
  const std::optional<std::string> saved = old ? std::optional<std::string>(old) : std::nullopt;
  ::setenv("NOTIFY_SOCKET", path.c_str(), 1);
  run_bounded([&](asio::io_context& io) -> awaitable<void> {
    asio::local::datagram_protocol::socket systemd_end(io, asio::local::datagram_protocol::endpoint(path));
    auto next = [&]() -> awaitable<std::string> {
      char buf[512];
      const std::size_t n = co_await systemd_end.async_receive(asio::buffer(buf), use_awaitable);
      co_return std::string(buf, n);
    };
    Master<> master(io.get_executor(), Settings{.env = http_env()});
    Supervisor<> supervisor(master, {.workers = 1, .restart_delay = 1ms});
    bool ran = false;
    asio::co_spawn(io, supervisor.run(cocluster::as_tuple(use_awaitable)), [&](std::exception_ptr, std::tuple<std::error_code>) {
      ran = true;
    });
    CHECK(co_await next() == "READY=1\nSTATUS=1 workers ready");
    auto [ec, replaced] = co_await supervisor.reload(cocluster::as_tuple(use_awaitable));
    CHECK(!ec);
    CHECK(replaced == 1);
    const std::string reloading = co_await next();
    CHECK_MESSAGE(reloading.rfind("RELOADING=1\nMONOTONIC_USEC=", 0) == 0, reloading);
    CHECK(co_await next() == "READY=1\nSTATUS=1 workers ready");
    supervisor.stop();
    CHECK(co_await next() == "STOPPING=1");
    co_await until(io, ran);
  });
  saved ? ::setenv("NOTIFY_SOCKET", saved->c_str(), 1) : ::unsetenv("NOTIFY_SOCKET");
  ::unlink(path.c_str());
}

TEST_CASE("supervisor: a worker that crashes while its replacement boots is replaced once, by the reload") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor(), Settings{.env = http_env({{"TEST_READY_ON_GO", "1"}}),
                                                .ready_on = ReadyOn::explicit_ready});
    Supervisor<> supervisor(master, {.workers = 1, .restart_delay = 1ms});
    bool ran = false;
    asio::co_spawn(io, supervisor.run(cocluster::as_tuple(use_awaitable)), [&](std::exception_ptr, std::tuple<std::error_code>) {
      ran = true;
    });
    asio::steady_timer t(io);
    co_await until_true(io, [&] { return !supervisor.workers().empty(); });
    auto old = supervisor.workers().front();
    co_await old->send({"go"});
    co_await old->ready();
    std::error_code reload_ec = asio::error::would_block;
    std::size_t replaced = 0;
    asio::co_spawn(io, supervisor.reload(cocluster::as_tuple(use_awaitable)),
                   [&](std::exception_ptr, std::tuple<std::error_code, std::size_t> r) {
                     std::tie(reload_ec, replaced) = r;
                   });
    // The replacement is forked and waits for "go"; meanwhile the old worker crashes.
    std::shared_ptr<Worker> fresh;
    while (!fresh) {
      for (auto& [id, w] : master.workers())
        if (w != old) fresh = w;
      t.expires_after(1ms);
      co_await t.async_wait(use_awaitable);
    }
    old->signal(SIGKILL);
    co_await old->exited();
    co_await fresh->send({"go"});
    co_await until_true(io, [&] { return reload_ec != asio::error::would_block; });
    CHECK(!reload_ec);
    CHECK(replaced == 1);
    CHECK(supervisor.restarts() == 0);  // the reload's replacement took its place, nothing else
    REQUIRE(supervisor.workers().size() == 1);
    CHECK(supervisor.workers().front() == fresh);
    CHECK(master.workers().size() == 1);
    supervisor.stop();
    co_await until(io, ran);
  });
}

TEST_CASE("supervisor: a reload whose replacement exits after it was ready, while another boots, rolls back: the pool stays whole") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor(), Settings{.env = http_env({{"TEST_READY_ON_GO", "1"}}),
                                                .ready_on = ReadyOn::explicit_ready});
    Supervisor<> supervisor(master, {.workers = 2, .restart_delay = 1ms, .reload_batch = 2});
    bool ran = false;
    asio::co_spawn(io, supervisor.run(cocluster::as_tuple(use_awaitable)), [&](std::exception_ptr, std::tuple<std::error_code>) {
      ran = true;
    });
    co_await until_true(io, [&] { return supervisor.workers().size() == 2; });
    const auto old = supervisor.workers();
    for (auto& w : old) {
      co_await w->send({"go"});
      co_await w->ready();
    }
    std::error_code reload_ec = asio::error::would_block;
    asio::co_spawn(io, supervisor.reload(cocluster::as_tuple(use_awaitable)),
                   [&](std::exception_ptr, std::tuple<std::error_code, std::size_t> r) { reload_ec = std::get<0>(r); });
    // Both replacements are forked and wait for "go".
    std::vector<std::shared_ptr<Worker>> fresh;
    co_await until_true(io, [&] {
      fresh.clear();
      for (auto& [id, w] : master.workers())
        if (std::find(old.begin(), old.end(), w) == old.end()) fresh.push_back(w);
      return fresh.size() == 2;
    });
    // The first is ready, then crashes (the new code fails on its first request, say) while
    // the second still boots; then the second is ready.
    co_await fresh[0]->send({"go"});
    co_await fresh[0]->ready();
    fresh[0]->signal(SIGKILL);
    co_await fresh[0]->exited();
    co_await fresh[1]->send({"go"});
    co_await until_true(io, [&] { return reload_ec != asio::error::would_block; });
    CHECK(reload_ec == error::reload_rolled_back);
    CHECK(supervisor.workers() == old);  // the old workers serve on, both of them
    co_await fresh[1]->exited();          // the other replacement is retired
    CHECK(supervisor.restarts() == 0);
    supervisor.stop();
    co_await until(io, ran);
  });
}

TEST_CASE("supervisor: a before_disconnect hook that ignores cancellation does not hold a stop past drain_timeout") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor(), Settings{.env = http_env()});
    // The hook waits until the test lets it go, deaf to cancellation (a user's own wait).
    auto release = std::make_shared<asio::steady_timer>(io, std::chrono::steady_clock::time_point::max());
    bool hook_ended = false;
    SupervisorSettings settings{.workers = 1, .drain_timeout = 100ms};
    settings.before_disconnect = [release, &hook_ended](std::shared_ptr<Worker>) -> awaitable<void> {
      co_await asio::this_coro::reset_cancellation_state(asio::disable_cancellation());
      co_await release->async_wait(cocluster::as_tuple(use_awaitable));
      hook_ended = true;
    };
    Supervisor<> supervisor(master, settings);
    bool ran = false;
    asio::co_spawn(io, supervisor.run(cocluster::as_tuple(use_awaitable)), [&](std::exception_ptr, std::tuple<std::error_code>) { ran = true; });
    co_await until_true(io, [&] { return supervisor.workers().size() == 1; });
    co_await master.ready();
    supervisor.stop();
    co_await until(io, ran);  // (before: the drain waited for the hook, so for ever)
    CHECK(master.workers().empty());
    CHECK_FALSE(hook_ended);  // it runs on, told to stop, not waited for
    release->cancel();
    co_await until(io, hook_ended);
  });
}

TEST_CASE("supervisor: run() that ends by itself with recycling on leaves nothing to keep io_context::run() going") {
  asio::io_context io;
  std::optional<std::error_code> result;
  Master<> master(io.get_executor(), Settings{.env = http_env({{"TEST_EXIT_CLEAN", "1"}})});
  Supervisor<> supervisor(master, {.workers = 1, .restart = Restart::on_failure, .restart_delay = 1ms,
                                   .max_connections = 1000, .recycle_check_interval = 10ms});
  asio::co_spawn(io, supervisor.run(cocluster::as_tuple(use_awaitable)),
                 [&](std::exception_ptr, std::tuple<std::error_code> r) { result = std::get<0>(r); });
  io.run_for(30s);
  CHECK(result == std::error_code());
  CHECK(io.stopped());  // it ran out of work (before: the recycling look re-armed its timer for good)
}

TEST_CASE("supervisor: destroyed while its workers live, it gives SIGTERM and SIGINT back to their default actions") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor(), Settings{.env = http_env()});
    auto handler_of = [](int sig) {
      struct sigaction now {};
      ::sigaction(sig, nullptr, &now);
      return now.sa_handler;
    };
    std::optional<Supervisor<>> supervisor(std::in_place, master, SupervisorSettings{.workers = 1});
    supervisor->handle_signals();
    asio::co_spawn(io, supervisor->run(cocluster::as_tuple(use_awaitable)), asio::detached);
    co_await master.ready();
    const auto term = handler_of(SIGTERM), interrupt = handler_of(SIGINT);  // Asio's, for the supervisor
    supervisor.reset();  // the worker lives on (the Master's to end)
    // Asio's handlers are gone (it puts back the default action), though a coroutine watching
    // the live worker still holds the supervisor's state.
    const bool term_back = handler_of(SIGTERM) != term, interrupt_back = handler_of(SIGINT) != interrupt;
    CHECK(term_back);
    CHECK(interrupt_back);
    CHECK(master.workers().size() == 1);
    co_await master.disconnect();
  });
}

TEST_CASE("supervisor: a rolling reload under load fails no request and changes every worker's pid") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor(), Settings{.env = http_env()});
    Supervisor<> supervisor(master, {.workers = 3});
    bool ran = false;
    asio::co_spawn(io, supervisor.run(cocluster::as_tuple(use_awaitable)), [&](std::exception_ptr, std::tuple<std::error_code>) { ran = true; });
    co_await until_true(io, [&] { return supervisor.workers().size() >= 3; });
    co_await master.ready();
    const Address where = co_await supervisor.workers().front()->listening();
    const auto before = pids_of(supervisor.workers());
    load l;
    asio::co_spawn(io, keep_asking(where.port, l), asio::detached);
    co_await until_true(io, [&] { return l.ok >= 20; });  // the load is flowing before the reload starts
    auto [ec, replaced] = co_await supervisor.reload(cocluster::as_tuple(use_awaitable));
    const std::size_t during = l.ok;
    co_await until_true(io, [&] { return l.ok >= during + 20; });  // and after it ends
    l.stop = true;
    co_await until(io, l.done);
    CHECK(ec == std::error_code());
    CHECK(replaced == 3);
    CHECK(l.failed == 0);
    const auto after = pids_of(supervisor.workers());
    CHECK(after.size() == 3);
    for (pid_t p : before) CHECK(after.count(p) == 0);
    CHECK(supervisor.restarts() == 0);
    MESSAGE(l.ok << " requests during the reload, answered by " << l.pids.size() << " pids");
    supervisor.stop();
    co_await until(io, ran);
  });
}

TEST_CASE("supervisor: a reload whose replacement never becomes ready rolls back; no request fails, old pids stay") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor(), Settings{.env = http_env()});
    Supervisor<> supervisor(master, {.workers = 2, .boot_timeout = boot_timeout_past_start});
    bool ran = false;
    asio::co_spawn(io, supervisor.run(cocluster::as_tuple(use_awaitable)), [&](std::exception_ptr, std::tuple<std::error_code>) { ran = true; });
    co_await until_true(io, [&] { return supervisor.workers().size() >= 2; });
    co_await master.ready();
    const Address where = co_await supervisor.workers().front()->listening();
    const auto before = pids_of(supervisor.workers());
    // Replacements from now on never listen, so never become ready.
    master.setup_merge({.env = http_env({{"TEST_NEVER_LISTEN", "1"}})});
    load l;
    asio::co_spawn(io, keep_asking(where.port, l), asio::detached);
    co_await until_true(io, [&] { return l.ok >= 20; });
    auto [ec, replaced] = co_await supervisor.reload(cocluster::as_tuple(use_awaitable));
    const std::size_t during = l.ok;
    co_await until_true(io, [&] { return l.ok >= during + 20; });
    l.stop = true;
    co_await until(io, l.done);
    CHECK(ec == error::reload_rolled_back);
    CHECK(replaced == 0);
    CHECK(l.failed == 0);
    CHECK(pids_of(supervisor.workers()) == before);
    CHECK(l.pids == before);
    CHECK(master.workers().size() == 2);  // the replacement is gone
    supervisor.stop();
    co_await until(io, ran);
  });
}

// A supervising master in its own process group, run as a worker of the test's master: it
// forks two sv_http workers under a Supervisor that handles signals, then sends
// "PORT PID1 PID2" to the test and exits with 0 if run() succeeded (1 otherwise).
WORKER_SCENARIO(sv_signal_master) {
  ::setpgid(0, 0);
  asio::io_context io;
  this_worker.start(io.get_executor());
  Master<> master(io.get_executor(), Settings{.env = http_env()});
  Supervisor<> supervisor(master, {.workers = 2, .drain_timeout = std::chrono::milliseconds(20000)});
  supervisor.handle_signals();
  int rc = 2;
  asio::co_spawn(io, [&]() -> awaitable<void> {
    auto [ec] = co_await supervisor.run(cocluster::as_tuple(use_awaitable));
    rc = ec ? 1 : 0;
    io.stop();
  }, asio::detached);
  asio::co_spawn(io, [&]() -> awaitable<void> {
    co_await until_true(io, [&] { return supervisor.workers().size() >= 2; });
    co_await master.ready();
    const Address where = co_await supervisor.workers().front()->listening();
    std::string report = std::to_string(where.port);
    for (auto& w : supervisor.workers()) report += " " + std::to_string(w->pid());
    co_await this_worker.send({report});
  }, asio::detached);
  io.run();
  return rc;
}

namespace {

// The slow request, SIGTERM (to the master or its group) while it is in flight, the drain
// seen by the client, then the answer; every process exits and the master with 0.
awaitable<void> stop_with_slow_request(asio::io_context& io, bool to_group) {
  Master<> master(io.get_executor());
  auto m = co_await master.fork(scenario_env("sv_signal_master"));
  std::istringstream report((co_await m->receive()).data);
  unsigned short port = 0;
  report >> port;
  std::vector<detail::unique_fd> workers;
  for (pid_t p; report >> p;) {
    std::error_code ec;
    workers.push_back(detail::pidfd_open(p, ec));
    REQUIRE_FALSE(ec);
  }
  REQUIRE(workers.size() == 2);
  tcp::socket s(io);
  co_await s.async_connect(tcp::endpoint(asio::ip::make_address("127.0.0.1"), port), use_awaitable);
  co_await asio::async_write(s, asio::buffer(std::string("slow\n")), use_awaitable);
  asio::streambuf in;
  co_await asio::async_read_until(s, in, "started\n", use_awaitable);
  if (to_group) ::kill(-m->pid(), SIGTERM);
  else m->signal(SIGTERM);
  // The worker survives the signal and learns of the drain from its master's disconnect.
  auto [dec, dn] = co_await asio::async_read_until(s, in, "draining\n", cocluster::as_tuple(use_awaitable));
  const std::error_code drained = dec;  // (a structured binding cannot be captured before C++20 in clang)
  CHECK_MESSAGE(!drained, "the worker did not report draining: " << drained.message());
  co_await asio::async_write(s, asio::buffer(std::string("finish\n")), use_awaitable);
  auto [rec, rn] = co_await asio::async_read(s, in, cocluster::as_tuple(use_awaitable));
  std::string all(asio::buffers_begin(in.data()), asio::buffers_end(in.data()));
  CHECK(rec == asio::error::eof);
  CHECK(all.find("done\n") != std::string::npos);
  const ExitStatus status = co_await m->exited();
  CHECK(status == ExitStatus{0, 0});
  for (auto& fd : workers) {
    pollfd pfd{fd.get(), POLLIN, 0};
    CHECK(::poll(&pfd, 1, 5000) == 1);  // ended (reaped by their master)
  }
}

}  // namespace

TEST_CASE("supervisor signals: SIGTERM to the master lets a slow request complete, then all exit with 0") {
  run_bounded([](asio::io_context& io) { return stop_with_slow_request(io, false); });
}

TEST_CASE("supervisor signals: SIGTERM to the whole process group drains too: the slow request completes, exit 0") {
  run_bounded([](asio::io_context& io) { return stop_with_slow_request(io, true); });
}

// ---- review (rev2): recycling paths the tests above do not reach ----

namespace {

// Sends "go" once to every worker not ready yet (TEST_LISTEN_ON_GO), until `done`.
awaitable<void> let_booting_go(asio::io_context& io, Master<>& master, std::set<int>& went, std::function<bool()> done) {
  asio::steady_timer t(io);
  while (!done()) {
    for (auto& [id, w] : master.workers())
      if (!w->is_ready() && !w->is_dead() && went.insert(id).second)
        co_await w->send({"go"}, cocluster::as_tuple(use_awaitable));
    t.expires_after(1ms);
    co_await t.async_wait(use_awaitable);
  }
}

}  // namespace

TEST_CASE("a worker reaching max_connections is recycled at once, not at the next look an hour away") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor(), Settings{.env = http_env()});
    Supervisor<> supervisor(master, {.workers = 1, .max_connections = 3, .recycle_check_interval = std::chrono::hours(1)});
    bool ran = false;
    asio::co_spawn(io, supervisor.run(cocluster::as_tuple(use_awaitable)), [&](std::exception_ptr, std::tuple<std::error_code>) { ran = true; });
    co_await until_true(io, [&] { return supervisor.workers().size() == 1; });
    co_await master.ready();
    const auto old = supervisor.workers().front();
    const Address where = co_await old->listening();
    for (int i = 0; i < 3; ++i) CHECK((co_await ping(where.port)) == old->pid());
    co_await until_true(io, [&] { return supervisor.recycles() == 1; });  // only the report's wake-up can do it
    CHECK(old->is_dead());
    supervisor.stop();
    co_await until(io, ran);
  });
}

TEST_CASE("reload() asked during a recycling waits for it, then replaces every worker") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor(), Settings{.env = http_env({{"TEST_LISTEN_ON_GO", "1"}})});
    Supervisor<> supervisor(master, {.workers = 1, .max_connections = 2, .recycle_check_interval = 5ms});
    bool ran = false;
    asio::co_spawn(io, supervisor.run(cocluster::as_tuple(use_awaitable)), [&](std::exception_ptr, std::tuple<std::error_code>) { ran = true; });
    co_await until_true(io, [&] { return supervisor.workers().size() == 1; });
    const auto old = supervisor.workers().front();
    std::set<int> went{old->id()};
    co_await old->send({"go"});
    co_await master.ready();
    const Address where = co_await old->listening();
    for (int i = 0; i < 2; ++i) CHECK((co_await ping(where.port)) == old->pid());
    co_await until_true(io, [&] { return master.workers().size() == 2; });  // the replacement, waiting for "go"
    std::optional<std::pair<std::error_code, std::size_t>> reloaded;
    asio::co_spawn(io, supervisor.reload(cocluster::as_tuple(use_awaitable)),
                   [&](std::exception_ptr, std::tuple<std::error_code, std::size_t> r) {
                     reloaded.emplace(std::get<0>(r), std::get<1>(r));
                   });
    co_await let_booting_go(io, master, went, [&] { return reloaded.has_value(); });
    CHECK(reloaded->first == std::error_code());
    CHECK(reloaded->second == 1);
    CHECK(supervisor.recycles() == 1);
    CHECK(old->is_dead());
    CHECK(supervisor.workers().size() == 1);
    supervisor.stop();
    co_await until(io, ran);
  });
}

TEST_CASE("a worker killed while being recycled: its replacement takes its place, no restart") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor(), Settings{.env = http_env({{"TEST_LISTEN_ON_GO", "1"}})});
    auto& events = master.events();
    Supervisor<> supervisor(master, {.workers = 1, .restart_delay = 1ms, .max_connections = 2, .recycle_check_interval = 5ms});
    bool ran = false;
    asio::co_spawn(io, supervisor.run(cocluster::as_tuple(use_awaitable)), [&](std::exception_ptr, std::tuple<std::error_code>) { ran = true; });
    co_await until_true(io, [&] { return supervisor.workers().size() == 1; });
    const auto old = supervisor.workers().front();
    std::set<int> went{old->id()};
    co_await old->send({"go"});
    co_await master.ready();
    const Address where = co_await old->listening();
    for (int i = 0; i < 2; ++i) CHECK((co_await ping(where.port)) == old->pid());
    co_await until_true(io, [&] { return master.workers().size() == 2; });
    old->signal(SIGKILL);
    co_await old->exited(cocluster::as_tuple(use_awaitable));
    co_await let_booting_go(io, master, went, [&] { return supervisor.recycles() == 1; });
    CHECK(supervisor.restarts() == 0);
    CHECK(supervisor.workers().size() == 1);
    supervisor.stop();
    co_await until(io, ran);
    std::size_t forks = 0;
    while (events.pending() > 0) forks += (co_await events.next()).type == EventType::fork;
    CHECK(forks == 2);
  });
}

TEST_CASE("stop() during a recycling: the replacement is retired, a waiting reload fails with supervisor_stopped") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor(), Settings{.env = http_env()});
    Supervisor<> supervisor(master, {.workers = 1, .max_connections = 2, .recycle_check_interval = 5ms});
    std::error_code result = asio::error::would_block;
    bool ran = false;
    asio::co_spawn(io, supervisor.run(cocluster::as_tuple(use_awaitable)), [&](std::exception_ptr, std::tuple<std::error_code> r) {
      result = std::get<0>(r);
      ran = true;
    });
    co_await until_true(io, [&] { return supervisor.workers().size() == 1; });
    const auto old = supervisor.workers().front();
    co_await master.ready();
    const Address where = co_await old->listening();
    master.setup_merge({.env = http_env({{"TEST_NEVER_LISTEN", "1"}})});  // the replacement never gets ready
    for (int i = 0; i < 2; ++i) CHECK((co_await ping(where.port)) == old->pid());
    co_await until_true(io, [&] { return master.workers().size() == 2; });
    std::optional<std::error_code> reloaded;
    asio::co_spawn(io, supervisor.reload(cocluster::as_tuple(use_awaitable)),
                   [&](std::exception_ptr, std::tuple<std::error_code, std::size_t> r) { reloaded = std::get<0>(r); });
    supervisor.stop();
    co_await until(io, ran);
    co_await until_true(io, [&] { return reloaded.has_value(); });
    CHECK(*reloaded == error::supervisor_stopped);
    CHECK(!result);
    CHECK(supervisor.recycles() == 0);
    CHECK(master.workers().empty());
  });
}
