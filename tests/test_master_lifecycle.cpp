// A worker's life as the master sees it: fork, online, disconnect, kill, exit, and the
// master-wide event stream. Every worker is a real process (this executable, re-executed).
#include "cocluster/master.hpp"

#include <spawn.h>
#include <poll.h>
#include <sys/prctl.h>

#include <future>
#include <sstream>
#include <thread>

#include <doctest/doctest.h>

#include "cocluster/cocluster.hpp"
#include "support.hpp"
#include "worker_scenario.hpp"

using namespace cocluster;
using namespace test;
using namespace asio::experimental::awaitable_operators;

// ---- the workers ----

WORKER_SCENARIO(exit3) {  // exits with 3 after online
  asio::io_context io;
  this_worker.start(io.get_executor());
  return 3;
}

WORKER_SCENARIO(busy) {  // spins after online, never reads
  asio::io_context io;
  this_worker.start(io.get_executor());
  static volatile unsigned long spins = 0;  // volatile: a loop without side effects is UB
  for (;;) spins = spins + 1;
}

WORKER_SCENARIO(never_online) {  // never starts the runtime; waits for the channel's end
  char c;
  while (::recv(cocluster::detail::identity().channel_fd, &c, 1, 0) > 0) {
  }
  return 0;
}

WORKER_SCENARIO(self_disconnect) {  // this_worker.disconnect() at once
  return run_echo_worker([](asio::io_context&) { this_worker.disconnect(); });
}

// Sends "id=I extra=E setting=S fds=F": its id, two variables and the fds it was started with.
WORKER_SCENARIO(report_env) {
  return run_echo_worker([](asio::io_context&) {
    const char* extra = std::getenv("TEST_EXTRA");
    const char* setting = std::getenv("TEST_SETTING");
    const std::string report = "id=" + std::to_string(this_worker.id()) + " extra=" + (extra ? extra : "") +
                               " setting=" + (setting ? setting : "") + " fds=" + at_start().inherited_fds;
    this_worker.send({report}, [](std::error_code) {});
  });
}

WORKER_SCENARIO(exit7_on_disconnect) {  // its on_disconnect handler exits with 7
  return run_echo_worker([](asio::io_context&) { this_worker.on_disconnect([] { std::exit(7); }); });
}

WORKER_SCENARIO(close_channel_and_stay) {  // closes its channel at once, then lives on (never reads)
  asio::io_context io;
  this_worker.start(io.get_executor());
  this_worker.on_disconnect([] {});
  asio::post(io, [] { this_worker.close_channel(); });
  io.run();
  for (;;) std::this_thread::sleep_for(std::chrono::hours(1));
}

// ---- the master side ----

TEST_CASE("8 forked workers come online, answer a round trip and exit with 0 after disconnect()") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor());
    std::vector<std::shared_ptr<Worker>> workers;
    for (int i = 0; i < 8; ++i) workers.push_back(co_await master.fork());
    for (int i = 0; i < 8; ++i) CHECK(workers[i]->id() == i + 1);
    CHECK(master.workers().size() == 8);

    int awaited_before_exit = 0;  // exited() awaited before the exit happens
    for (auto& w : workers)
      asio::co_spawn(io, [w, &awaited_before_exit]() -> awaitable<void> {
        if (co_await w->exited() == ExitStatus{0, 0}) ++awaited_before_exit;
      }, asio::detached);

    for (auto& w : workers) co_await w->online();
    for (auto& w : workers) {
      co_await w->send({"ping " + std::to_string(w->id())});
      CHECK((co_await w->receive()).data == "ping " + std::to_string(w->id()));
    }
    for (auto& w : workers) w->disconnect();
    CHECK(master.workers().empty());  // a primary-side disconnect() removes at once
    for (auto& w : workers) {
      co_await w->disconnected();
      const ExitStatus s = co_await w->exited();  // and awaited again after the exit
      CHECK(s == ExitStatus{0, 0});
      CHECK(w->exited_after_disconnect() == true);
      CHECK(w->is_dead());
      CHECK_FALSE(w->is_connected());
    }
    co_await asio::post(io, use_awaitable);
    CHECK(awaited_before_exit == 8);
  });
}

TEST_CASE("kill(SIGKILL) reports the signal and sets exited_after_disconnect") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor());
    // A worker busy in a loop: the signal must not need its cooperation.
    auto w = co_await master.fork(scenario_env("busy"));
    co_await w->online();
    CHECK_FALSE(w->exited_after_disconnect().has_value());
    w->kill(SIGKILL);
    CHECK(w->exited_after_disconnect() == true);
    const ExitStatus s = co_await w->exited();
    CHECK(s.signal == SIGKILL);
    CHECK(s.signal_name() == "SIGKILL");
    CHECK(w->exited_after_disconnect() == true);
    CHECK(master.workers().empty());
  });
}

TEST_CASE("kill() after the worker closed its channel leaves exited_after_disconnect false (Node: kill() then only signals)") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor());
    auto w = co_await master.fork(scenario_env("close_channel_and_stay"));
    co_await w->disconnected();
    CHECK(w->exited_after_disconnect() == false);
    w->kill(SIGKILL);  // the cleanup a user's disconnect handler might do
    const ExitStatus s = co_await w->exited();
    CHECK(s.signal == SIGKILL);
    CHECK(w->exited_after_disconnect() == false);  // the worker left; nobody asked it to
  });
}

TEST_CASE("kill() with a bad signal number fails with EINVAL and changes nothing: the worker serves on") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor());
    auto w = co_await master.fork();
    co_await w->online();
    std::error_code ec;
    w->kill(9999, ec);
    CHECK(ec == std::errc::invalid_argument);
    CHECK_THROWS_AS(w->kill(9999), std::system_error);
    CHECK(w->is_connected());
    CHECK_FALSE(w->exited_after_disconnect().has_value());
    CHECK(master.workers().size() == 1);
    co_await w->send({"still here"});
    CHECK((co_await w->receive()).data == "still here");
    w->disconnect();
    CHECK(co_await w->exited() == ExitStatus{0, 0});
  });
}

TEST_CASE("kill() defaults to SIGTERM") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor());
    auto w = co_await master.fork(scenario_env("busy"));
    co_await w->online();
    w->kill();
    CHECK((co_await w->exited()).signal == SIGTERM);
    CHECK(w->exited_after_disconnect() == true);
  });
}

TEST_CASE("a worker that exits by itself with 3 reports code 3 and exited_after_disconnect false") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor());
    auto events = &master.events();
    auto w = co_await master.fork(scenario_env("exit3"));
    const ExitStatus s = co_await w->exited();
    CHECK(s == ExitStatus{3, 0});
    CHECK(w->exited_after_disconnect() == false);
    CHECK(master.workers().empty());
    // Node's order: (setup, which fork() runs first,) fork, online, disconnect, exit
    // (disconnect is processed before the reap).
    std::string seen;
    while (events->pending()) seen += std::string(to_string((co_await events->next()).type)) + " ";
    CHECK(seen == "setup fork online disconnect exit ");
  });
}

TEST_CASE("a worker's own disconnect() sets exited_after_disconnect and it exits with 0") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor());
    auto w = co_await master.fork(scenario_env("self_disconnect"));
    co_await w->disconnected();
    CHECK(w->exited_after_disconnect() == true);
    CHECK((co_await w->exited()) == ExitStatus{0, 0});
  });
}

TEST_CASE("a worker whose channel closes without a disconnect exits with 0") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor());
    auto w = co_await master.fork();
    co_await w->online();
    w->kill(0);  // signal 0 sends nothing: this only closes the channel from our side
    CHECK((co_await w->exited()) == ExitStatus{0, 0});
  });
}

TEST_CASE("a worker's on_disconnect handler replaces the exit on an unexpected channel close") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor());
    auto w = co_await master.fork(scenario_env("exit7_on_disconnect"));
    co_await w->online();
    w->kill(0);
    CHECK((co_await w->exited()) == ExitStatus{7, 0});
  });
}

TEST_CASE("online() || timer completes with the timer for a worker that never comes online") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor());
    auto w = co_await master.fork(scenario_env("never_online"));
    asio::steady_timer timer(io, 200ms);
    auto first = co_await (w->online() || timer.async_wait(use_awaitable));
    CHECK(first.index() == 1);
    w->kill(SIGKILL);
    CHECK((co_await w->exited()).signal == SIGKILL);
    // online() after the worker is gone fails instead of waiting for ever.
    auto [ec] = co_await w->online(cocluster::as_tuple(use_awaitable));
    CHECK(ec == error::worker_exited);
  });
}

TEST_CASE("ids start at 1 and are never reused; workers() forgets a worker after disconnect and exit") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor());
    auto first = co_await master.fork(scenario_env("exit3"));
    CHECK(first->id() == 1);
    CHECK(master.workers().count(1) == 1);
    co_await first->exited();
    CHECK(master.workers().count(1) == 0);
    auto second = co_await master.fork();
    CHECK(second->id() == 2);
    second->disconnect();
    co_await second->exited();
  });
}

TEST_CASE("a worker gets its id, fork(env) and Settings::env, and inherits only stdio and its channel") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Settings settings;
    settings.env = {{"TEST_SETTING", "from-settings"}, {"TEST_EXTRA", "overridden"}};
    Master<> master(io.get_executor(), settings);
    // An fd the master has open without close-on-exec must not reach the worker.
    const int leaky = ::open("/dev/null", O_RDONLY);
    auto env = scenario_env("report_env");
    env["TEST_EXTRA"] = "from-fork";
    auto w = co_await master.fork(env);
    ::close(leaky);
    const Message report = co_await w->receive();
    CHECK(report.data == "id=1 extra=from-fork setting=from-settings fds=0,1,2,3");
    w->disconnect();
    co_await w->exited();
  });
}

TEST_CASE("fork() of a missing executable fails with ENOENT, posts an error event, leaks nothing") {
  const int before = open_fd_count();
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Settings settings;
    settings.exec = "/nonexistent/worker";
    Master<> master(io.get_executor(), settings);
    auto& events = master.events();
    auto [ec, w] = co_await master.fork({}, cocluster::as_tuple(use_awaitable));
    CHECK(ec == std::errc::no_such_file_or_directory);
    CHECK(w == nullptr);
    CHECK(master.workers().empty());
    const Event setup = co_await events.next();  // fork() runs setup first
    CHECK(setup.type == EventType::setup);
    const Event e = co_await events.next();
    CHECK(e.type == EventType::error);
    CHECK(e.detail.find("/nonexistent/worker") != std::string::npos);
  });
  CHECK(open_fd_count() == before);
}

TEST_CASE("master.disconnect() disconnects every worker and completes when all have") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor());
    std::vector<std::shared_ptr<Worker>> ws;
    for (int i = 0; i < 3; ++i) ws.push_back(co_await master.fork());
    for (auto& w : ws) co_await w->online();
    co_await master.disconnect();
    for (auto& w : ws) CHECK_FALSE(w->is_connected());
    CHECK(master.workers().empty());
    for (auto& w : ws) CHECK((co_await w->exited()) == ExitStatus{0, 0});
  });
}

TEST_CASE("killing the master with SIGKILL makes its workers exit within a second") {
  REQUIRE(::prctl(PR_SET_CHILD_SUBREAPER, 1) == 0);  // orphaned workers come to this process
  auto run = start_intermediate_master({});
  REQUIRE(run);
  REQUIRE(run->workers.size() == 3);
  REQUIRE(::kill(run->master, SIGKILL) == 0);
  REQUIRE(::waitpid(run->master, nullptr, 0) == run->master);
  const auto killed_at = std::chrono::steady_clock::now();
  for (std::size_t i = 0; i < run->workers.size(); ++i) {
    const auto left = 1000ms - std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - killed_at);
    siginfo_t info;
    const bool ended = reap_within(run->pidfds[i], std::max(left, 0ms), info);
    CHECK_MESSAGE(ended, "worker " << run->workers[i] << " still runs a second after its master was killed");
  }
  ::prctl(PR_SET_CHILD_SUBREAPER, 0);
}

TEST_CASE("a worker whose loop is stuck when its master dies is ended by the parent-death backstop (SIGKILL)") {
  // The orderly path (the channel's EOF) needs the loop; a worker spinning in user code never
  // gets there, so the kernel's parent-death signal arms a timer that ends it.
  REQUIRE(::prctl(PR_SET_CHILD_SUBREAPER, 1) == 0);
  auto run = start_intermediate_master({"TEST_WORKERS=1", "COCLUSTER_TEST_SCENARIO=busy"});
  REQUIRE(run);
  REQUIRE(run->workers.size() == 1);
  REQUIRE(::kill(run->master, SIGKILL) == 0);
  REQUIRE(::waitpid(run->master, nullptr, 0) == run->master);
  siginfo_t info;
  const bool ended = reap_within(run->pidfds[0], 20000ms, info);  // the grace is 2 s
  CHECK(ended);
  CHECK(info.si_code == CLD_KILLED);
  CHECK(info.si_status == SIGKILL);
  ::prctl(PR_SET_CHILD_SUBREAPER, 0);
}

TEST_CASE("the parent-death signal that follows the end of the master's forking thread leaves the worker running") {
  // PR_SET_PDEATHSIG fires when the thread that forked the child ends, though the master
  // lives on. The backstop sees its parent is still the master and stands down.
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    auto ends = cocluster::detail::make_socketpair(SOCK_SEQPACKET);  // named: a lambda captures one end
    auto& ours = ends.first;
    auto& theirs = ends.second;
    cocluster::detail::spawn_request r;
    r.exec = "/proc/self/exe";
    r.argv = {r.exec};
    r.env = {"COCLUSTER_WORKER_ID=1", "COCLUSTER_CHANNEL_FD=3"};  // the echo scenario
    // The thread forks, and ends once the worker is online (before that, spawn's SIGTERM
    // would still be the parent-death signal).
    std::promise<cocluster::detail::spawned_process> spawned;
    std::promise<void> online_seen;
    std::thread forking([&] {
      spawned.set_value(cocluster::detail::spawn(r, std::move(theirs)));
      online_seen.get_future().wait();
    });
    cocluster::detail::Process worker(io.get_executor(), spawned.get_future().get());
    ipc::Channel channel(io.get_executor(), std::move(ours));
    ipc::Envelope online = co_await channel.async_receive(use_awaitable);
    CHECK(online.kind == ipc::message_kind::internal);
    online_seen.set_value();
    forking.join();
    // Longer than the grace: a backstop that ignored its parent would have ended the worker.
    asio::steady_timer past_grace(io, cocluster::detail::parent_death::grace + 1s);
    co_await past_grace.async_wait(use_awaitable);
    co_await channel.async_send({ipc::message_kind::user, {"still here?"}}, use_awaitable);
    ipc::Envelope echo = co_await channel.async_receive(use_awaitable);
    CHECK(echo.message.data == "still here?");
    channel.close();  // an unexpected end: the worker exits with 0
    CHECK((co_await worker.async_wait(use_awaitable)) == ExitStatus{0, 0});
  });
}

TEST_CASE("set_log_sink takes cocluster's error lines instead of stderr, until it is reset") {
  std::vector<std::pair<LogLevel, std::string>> lines;
  set_log_sink([&](LogLevel level, std::string_view line) { lines.emplace_back(level, std::string(line)); });
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Settings settings;
    settings.exec = "/nonexistent/worker";
    Master<> master(io.get_executor(), settings);
    auto [ec, w] = co_await master.fork({}, cocluster::as_tuple(use_awaitable));
    CHECK(ec == std::errc::no_such_file_or_directory);
  });
  set_log_sink({});
  REQUIRE(lines.size() == 1);
  CHECK(lines[0].first == LogLevel::error);
  CHECK(lines[0].second == "cocluster: Master " + std::to_string(::getpid()) +
                               ": cannot start worker 1: execve /nonexistent/worker: No such file or directory");
}

TEST_CASE("any number of event subscribers each see every event from their subscription on (Node's listeners)") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor());
    EventStream early = master.subscribe();
    auto w = co_await master.fork();
    co_await w->online();
    EventStream late = master.subscribe();  // after fork and online
    w->disconnect();
    co_await w->exited();
    auto types = [](EventStream& s) -> awaitable<std::vector<EventType>> {
      std::vector<EventType> seen;
      while (s.pending() > 0) seen.push_back((co_await s.next()).type);
      co_return seen;
    };
    const std::vector<EventType> all = {EventType::setup, EventType::fork, EventType::online, EventType::disconnect,
                                        EventType::exit};
    const std::vector<EventType> since = {EventType::disconnect, EventType::exit};
    const auto early_saw = co_await types(early);
    const auto late_saw = co_await types(late);
    CHECK(early_saw == all);
    CHECK(late_saw == since);
    {
      EventStream dropped = master.subscribe();  // destroyed: unsubscribed
    }
    co_await master.fork();
    CHECK((co_await early.next()).type == EventType::setup);
    CHECK((co_await late.next()).type == EventType::setup);
    co_await master.disconnect();
  });
}

TEST_CASE("a subscriber that stops reading keeps at most its capacity, then one lagged event counting what it lost") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor());
    EventStream slow = master.subscribe(4);
    EventStream keeping_up = master.subscribe();
    auto w = co_await master.fork();  // setup, fork
    co_await w->online();             // online
    for (int i = 0; i < 10; ++i) co_await w->send({"m" + std::to_string(i)});
    for (int i = 0; i < 10; ++i) co_await w->receive();  // 10 message events
    // The last receive() resumed inside the read loop, before it posted that message's event.
    co_await asio::post(io, use_awaitable);
    const std::size_t emitted = keeping_up.pending();
    CHECK(emitted == 13);
    CHECK(slow.pending() == 5);  // four events and the marker
    std::vector<Event> got;
    while (slow.pending() > 0) got.push_back(co_await slow.next());
    CHECK(got[0].type == EventType::setup);
    CHECK(got[3].type == EventType::message);
    CHECK(got[4].type == EventType::lagged);
    CHECK(got[4].lost == emitted - 4);
    // Reading again makes room: the next events arrive as usual.
    w->disconnect();
    CHECK((co_await slow.next()).type == EventType::disconnect);
    co_await w->exited();
  });
}

TEST_CASE("a subscriber waiting for the next event when the Master goes away is told (operation_aborted), and the loop ends") {
  asio::io_context io;
  std::error_code seen;
  bool done = false;
  auto master = std::make_unique<Master<>>(io.get_executor());
  EventStream events = master->subscribe();
  asio::co_spawn(io, [&]() -> awaitable<void> {
    auto [ec, e] = co_await events.next(cocluster::as_tuple(use_awaitable));
    seen = ec;
    done = true;
  }, asio::detached);
  asio::post(io, [&] { master.reset(); });
  io.run_for(10s);  // returns once nothing is left to do: nothing may keep the loop alive
  CHECK(done);
  CHECK(seen == asio::error::operation_aborted);
  CHECK(io.stopped());
}
