// Entry point of test_cluster. The same executable is the master (doctest runs the tests),
// every worker (the WORKER_SCENARIO named by COCLUSTER_TEST_SCENARIO, each written beside the
// tests that use it; see worker_scenario.hpp), and, for the master-death
// tests, an intermediate master process (COCLUSTER_TEST_ROLE=master), or a master started by
// a worker (COCLUSTER_TEST_ROLE=nested_master).
#define DOCTEST_CONFIG_IMPLEMENT
#define DOCTEST_CONFIG_NO_POSIX_SIGNALS  // forked workers must not inherit doctest's handlers
#include "cocluster/cocluster.hpp"

#include <iostream>

#include <doctest/doctest.h>

#include "support.hpp"
#include "worker_scenario.hpp"

using namespace cocluster;
using asio::awaitable;
using asio::use_awaitable;

// Echoes every message back (see run_echo_worker).
awaitable<void> test::echo_messages() {
  for (;;) {
    auto [ec, m] = co_await this_worker.receive(cocluster::as_tuple(use_awaitable));
    if (ec) co_return;
    std::string reply = std::move(m.data);
    auto read_token = [&](auto socket) -> awaitable<void> {
      char token[8];
      co_await asio::async_read(socket, asio::buffer(token), use_awaitable);
      reply += "|" + std::string(token, sizeof token);
    };
    const auto& ex = co_await asio::this_coro::executor;
    if (m.handle.is<asio::ip::tcp::socket>()) co_await read_token(m.handle.adopt<asio::ip::tcp::socket>(ex));
    else if (m.handle.is<asio::local::stream_protocol::socket>())
      co_await read_token(m.handle.adopt<asio::local::stream_protocol::socket>(ex));
    auto [sent] = co_await this_worker.send({std::move(reply)}, cocluster::as_tuple(use_awaitable));
    if (sent) co_return;
  }
}

int test::run_echo_worker(const std::function<void(asio::io_context&)>& before) {
  asio::io_context io;
  this_worker.start(io.get_executor());
  if (before) before(io);
  asio::co_spawn(io, echo_messages(), asio::detached);
  io.run();
  return 0;
}

WORKER_SCENARIO(echo) { return test::run_echo_worker(); }

namespace {

int run_worker(int argc, char** argv) {
  test::at_start().inherited_fds = test::open_fds();  // before this process opens any of its own
  test::at_start().pdeathsig_at_exec = test::parent_death_signal();
  const char* env = std::getenv("COCLUSTER_TEST_SCENARIO");
  const std::string_view name = env ? env : "echo";
  auto it = test::scenario_registry().find(name);
  if (it == test::scenario_registry().end()) {
    std::cerr << "test_cluster: no worker scenario named '" << name << "'\n";
    return 99;
  }
  return it->second(argc, argv);
}

// The intermediate master of the master-death and socket-activation tests: forks TEST_WORKERS
// workers (default 3; they inherit this environment, so its COCLUSTER_TEST_SCENARIO), prints
// their pids once they are online (and listening, with TEST_AWAIT_LISTENING), then serves
// until killed.
int run_intermediate_master() {
  asio::io_context io;
  Master<RuntimePolicy> master(io.get_executor());  // round robin unless COCLUSTER_SCHED_POLICY says otherwise
  const char* count = std::getenv("TEST_WORKERS");
  const int workers = count ? std::atoi(count) : 3;
  asio::co_spawn(io, [&]() -> awaitable<void> {
    std::string pids;
    const bool listening = std::getenv("TEST_AWAIT_LISTENING") != nullptr;
    for (int i = 0; i < workers; ++i) {
      auto w = co_await master.fork();
      co_await w->online();
      if (listening) co_await w->listening();
      pids += std::to_string(w->pid()) + " ";
    }
    std::cout << pids << std::endl;
  }, asio::detached);
  io.run();
  return 0;
}

// A master started by a worker: one echo worker, one round trip; exits 0 if it went well.
int run_nested_master() {
  asio::io_context io;
  Master<> master(io.get_executor());
  int rc = 1;
  asio::co_spawn(io, [&]() -> awaitable<void> {
    auto w = co_await master.fork(scenario_env("echo"));
    co_await w->send({"ping"});
    const Message m = co_await w->receive();
    w->disconnect();
    const ExitStatus s = co_await w->exited();
    rc = m.data == "ping" && s == ExitStatus{0, 0} ? 0 : 1;
  }, asio::detached);
  io.run();
  return rc;
}

}  // namespace

int main(int argc, char** argv) {
  if (is_worker()) return run_worker(argc, argv);
  const char* role = std::getenv("COCLUSTER_TEST_ROLE");
  if (role && std::string_view(role) == "master") return run_intermediate_master();
  if (role && std::string_view(role) == "nested_master") return run_nested_master();
  doctest::Context context(argc, argv);
  return context.run();
}
