// A worker's life as the master sees it: fork, online, disconnect, kill, exit, and the
// master-wide event stream. Every worker is a real process (this executable, re-executed).
#include "cocluster/master.hpp"

#include <spawn.h>
#include <poll.h>
#include <sys/prctl.h>

#include <sstream>

#include <doctest/doctest.h>

#include "cocluster/cocluster.hpp"
#include "scenarios.hpp"
#include "support.hpp"

using namespace cocluster;
using namespace test;
using namespace asio::experimental::awaitable_operators;

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
    auto w = co_await master.fork(scenario_env(scenario::busy));
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

TEST_CASE("kill() defaults to SIGTERM") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor());
    auto w = co_await master.fork(scenario_env(scenario::busy));
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
    auto w = co_await master.fork(scenario_env(scenario::exit3));
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
    auto w = co_await master.fork(scenario_env(scenario::self_disconnect));
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
    auto w = co_await master.fork(scenario_env(scenario::exit7_on_disconnect));
    co_await w->online();
    w->kill(0);
    CHECK((co_await w->exited()) == ExitStatus{7, 0});
  });
}

TEST_CASE("online() || timer completes with the timer for a worker that never comes online") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor());
    auto w = co_await master.fork(scenario_env(scenario::never_online));
    asio::steady_timer timer(io, 200ms);
    auto first = co_await (w->online() || timer.async_wait(use_awaitable));
    CHECK(first.index() == 1);
    w->kill(SIGKILL);
    CHECK((co_await w->exited()).signal == SIGKILL);
    // online() after the worker is gone fails instead of waiting for ever.
    auto [ec] = co_await w->online(cocluster::as_tuple(use_awaitable));
    CHECK(ec);
  });
}

TEST_CASE("ids start at 1 and are never reused; workers() forgets a worker after disconnect and exit") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor());
    auto first = co_await master.fork(scenario_env(scenario::exit3));
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
    auto env = scenario_env(scenario::report_env);
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
  // Orphaned workers are re-parented to this process, so it can watch and reap them.
  REQUIRE(::prctl(PR_SET_CHILD_SUBREAPER, 1) == 0);
  auto [out_read, out_write] = cocluster::detail::make_pipe();
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, out_write.get(), 1);
  std::vector<std::string> env_strings = {"COCLUSTER_TEST_ROLE=master"};
  for (char** e = environ; *e; ++e) env_strings.emplace_back(*e);
  std::vector<char*> envp;
  for (auto& s : env_strings) envp.push_back(s.data());
  envp.push_back(nullptr);
  char self[] = "/proc/self/exe";
  char* argv[] = {self, nullptr};
  pid_t master_pid = -1;
  REQUIRE(posix_spawn(&master_pid, self, &actions, nullptr, argv, envp.data()) == 0);
  posix_spawn_file_actions_destroy(&actions);
  out_write.reset();

  std::string line;
  char c;
  while (::read(out_read.get(), &c, 1) == 1 && c != '\n') line += c;
  std::vector<pid_t> pids;
  std::istringstream in(line);
  for (pid_t p; in >> p;) pids.push_back(p);
  REQUIRE(pids.size() == 3);
  std::vector<cocluster::detail::unique_fd> pidfds;
  for (pid_t p : pids) {
    std::error_code ec;
    pidfds.push_back(cocluster::detail::pidfd_open(p, ec));
    REQUIRE_FALSE(ec);
  }
  REQUIRE(::kill(master_pid, SIGKILL) == 0);
  REQUIRE(::waitpid(master_pid, nullptr, 0) == master_pid);
  const auto killed_at = std::chrono::steady_clock::now();
  for (std::size_t i = 0; i < pids.size(); ++i) {
    const auto left = 1000ms - std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - killed_at);
    pollfd pfd{pidfds[i].get(), POLLIN, 0};
    const int ready = ::poll(&pfd, 1, static_cast<int>(std::max(left, 0ms).count()));
    CHECK_MESSAGE(ready == 1, "worker " << pids[i] << " still runs a second after its master was killed");
    if (ready != 1) ::kill(pids[i], SIGKILL);
    siginfo_t info{};
    ::waitid(P_PIDFD, static_cast<id_t>(pidfds[i].get()), &info, WEXITED);
  }
  ::prctl(PR_SET_CHILD_SUBREAPER, 0);
}
