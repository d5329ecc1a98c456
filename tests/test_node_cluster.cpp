// Node's cluster behaviours one by one (../shared/reference/node-cluster.md and
// node-cluster-invariants.md), and the examples of Node's documentation translated to C++.
// Each test is named after the behaviour it checks.
#include <poll.h>
#include <spawn.h>
#include <sys/prctl.h>
#include <sys/wait.h>

#include <doctest/doctest.h>

#include <filesystem>
#include <list>
#include <regex>
#include <sstream>

#include "cocluster/cocluster.hpp"
#include "support.hpp"
#include "worker_scenario.hpp"

using namespace cocluster;
using namespace test;
using namespace asio::experimental::awaitable_operators;
using asio::ip::tcp;
using as_tuple_t = cocluster::detail::as_tuple_t<asio::use_awaitable_t<>>;

// ---- the worker side ("node") ----
//
// A line server in the manner of Node's examples. Listens on 127.0.0.1:TEST_PORT (default 0)
// at start if TEST_LISTEN_NOW is set, else on the master's "listen". Each connection answers
// every line with "echo:<line>" (and with TEST_NOTIFY set, sends the master "notifyRequest"
// first, as the request-counting example does) until the client closes it. Messages:
// "listen"; "state" (answers "<state> <exited_after_disconnect>"); "shutdown" (closes every
// open connection: the example's "initiate graceful close"); "disconnect"; "kill"; "whoami"
// (Node's cluster.worker example); "disconnect_then_kill"; "send_after_disconnect" (disconnects, then tries to send:
// exits with 42 if that fails with error::channel_closed); "close_channel" (process.disconnect());
// "is_dead"; "watch_sigusr1" (answers "watching", then "got SIGUSR1" for each SIGUSR1);
// "run_nested_master" (runs this executable as a master of its own and reports how it went);
// "fork_holder" (forks a child, without exec, that holds the channel: answers "holder <pid>");
// "exit42". Environment: TEST_ON_DISCONNECT installs an on_disconnect handler that writes
// "on_disconnect <pid>" on stdout and exits 0; TEST_ATEXIT an atexit handler, registered
// before start(), that ends the process with 40 if this_worker.is_dead() is true then, else 41.

namespace {

struct node_worker {
  std::optional<Server<tcp>> server;
  std::list<std::shared_ptr<tcp::socket>> connections;
  std::string state_before_start;
};

node_worker* self = nullptr;

awaitable<void> serve_lines(std::shared_ptr<tcp::socket> socket) {
  auto it = self->connections.insert(self->connections.end(), socket);
  std::string buffer;
  for (;;) {
    auto [ec, n] = co_await asio::async_read_until(*socket, asio::dynamic_buffer(buffer), '\n', as_tuple_t{});
    if (ec) break;
    const std::string line = buffer.substr(0, n - 1);
    buffer.erase(0, n);
    if (std::getenv("TEST_NOTIFY")) co_await this_worker.send({"notifyRequest"});
    const std::string reply = "echo:" + line + "\n";
    auto [wec, w] = co_await asio::async_write(*socket, asio::buffer(reply), as_tuple_t{});
    if (wec) break;
  }
  self->connections.erase(it);  // the last owner of the socket: the connection has ended
}

awaitable<void> accept_lines() {
  for (;;) {
    auto [ec, socket] = co_await self->server->accept(as_tuple_t{});
    if (ec) co_return;
    asio::co_spawn(socket.get_executor(), serve_lines(std::make_shared<tcp::socket>(std::move(socket))),
                   asio::detached);
  }
}

awaitable<void> listen_lines() {
  const char* port = std::getenv("TEST_PORT");
  const tcp::endpoint at(asio::ip::make_address("127.0.0.1"), port ? std::stoi(port) : 0);
  self->server.emplace(co_await this_worker.listen(at));
  asio::co_spawn(co_await asio::this_coro::executor, accept_lines(), asio::detached);
}

std::string describe(std::optional<bool> flag) { return !flag ? "unset" : *flag ? "true" : "false"; }

// Runs this executable as a master (cluster_main's COCLUSTER_TEST_ROLE=nested_master: one echo
// worker, one round trip) with this worker's environment as it is now, and says how it ended
// and whether our identity was still in the environment it got.
std::string run_nested_master() {
  const bool id_set = std::getenv("COCLUSTER_WORKER_ID") != nullptr;
  const bool fd_set = std::getenv("COCLUSTER_CHANNEL_FD") != nullptr;
  const pid_t pid = test::spawn_this_executable({"COCLUSTER_TEST_ROLE=nested_master"});
  int status = 0;
  if (pid < 0 || ::waitpid(pid, &status, 0) != pid) return "nested could not run";
  const std::string how = WIFEXITED(status) ? "exit " + std::to_string(WEXITSTATUS(status))
                                            : "signal " + std::to_string(WTERMSIG(status));
  return "nested " + how + " id=" + (id_set ? "set" : "unset") + " fd=" + (fd_set ? "set" : "unset");
}

awaitable<void> report_signals(std::shared_ptr<asio::signal_set> signals) {
  for (;;) {
    auto [ec, sig] = co_await signals->async_wait(as_tuple_t{});
    if (ec) co_return;
    co_await this_worker.send({"got SIGUSR1"});
  }
}

// A pending signal wait would keep the process alive after its disconnect.
awaitable<void> cancel_on_disconnect(std::shared_ptr<asio::signal_set> signals) {
  co_await this_worker.disconnected();
  signals->cancel();
}

awaitable<void> node_worker_loop() {
  if (std::getenv("TEST_LISTEN_NOW")) co_await listen_lines();
  for (;;) {
    auto [ec, m] = co_await this_worker.receive(as_tuple_t{});
    if (ec) co_return;
    if (m.data == "listen") {
      co_await listen_lines();
      co_await this_worker.send({"listening"});
    } else if (m.data == "state") {
      co_await this_worker.send({self->state_before_start + " " + std::string(to_string(this_worker.state())) + " " +
                                 describe(this_worker.exited_after_disconnect())});
    } else if (m.data == "shutdown") {
      for (auto& c : self->connections) c->close();
    } else if (m.data == "disconnect") {
      this_worker.disconnect();
    } else if (m.data == "kill") {
      this_worker.kill();
    } else if (m.data == "whoami") {
      co_await this_worker.send({"I am worker #" + std::to_string(this_worker.id()) +
                                 " is_worker=" + std::to_string(is_worker()) + " is_master=" + std::to_string(is_master())});
    } else if (m.data == "disconnect_then_kill") {
      this_worker.disconnect();  // no connections: the channel's shutdown completes soon
      asio::steady_timer settle(co_await asio::this_coro::executor, std::chrono::milliseconds(100));
      co_await settle.async_wait(use_awaitable);
      this_worker.kill();
    } else if (m.data == "start_again") {
      std::error_code ec;
      this_worker.start(co_await asio::this_coro::executor, ec);
      // (Named first: GCC 12 destroys a conditional's temporary twice inside a co_await's braced list.)
      Message reply(ec == asio::error::already_started ? std::string("already_started") : "start: " + ec.message());
      co_await this_worker.send(std::move(reply));
    } else if (m.data == "close_channel") {
      this_worker.close_channel();
    } else if (m.data == "is_dead") {
      co_await this_worker.send({"is_dead " + std::to_string(this_worker.is_dead())});
    } else if (m.data == "watch_sigusr1") {
      auto signals = std::make_shared<asio::signal_set>(co_await asio::this_coro::executor, SIGUSR1);
      asio::co_spawn(signals->get_executor(), report_signals(signals), asio::detached);
      asio::co_spawn(signals->get_executor(), cancel_on_disconnect(signals), asio::detached);
      co_await this_worker.send({"watching"});
    } else if (m.data == "run_nested_master") {
      co_await this_worker.send({run_nested_master()});
    } else if (m.data == "fork_holder") {
      const pid_t holder = ::fork();
      if (holder == 0) {
        for (;;) ::pause();  // holds every fd of the worker, the channel's end among them
      }
      co_await this_worker.send({"holder " + std::to_string(holder)});
    } else if (m.data == "exit42") {
      std::exit(42);
    } else if (m.data == "send_after_disconnect") {
      this_worker.disconnect();
      co_await this_worker.disconnected();
      auto [sent] = co_await this_worker.send({"too late"}, as_tuple_t{});
      std::exit(sent == error::channel_closed ? 42 : 43);
    }
  }
}

}  // namespace

WORKER_SCENARIO(node) {
  asio::io_context io;  // first: the worker's server and sockets go before it (Asio's rule)
  node_worker w;
  self = &w;
  w.state_before_start = std::string(to_string(this_worker.state()));
  if (std::getenv("TEST_ATEXIT")) std::atexit([] { ::_exit(this_worker.is_dead() ? 40 : 41); });
  this_worker.start(io.get_executor());
  if (std::getenv("TEST_ON_DISCONNECT"))
    this_worker.on_disconnect([] {
      const std::string line = "on_disconnect " + std::to_string(::getpid()) + "\n";
      const bool written = ::write(1, line.data(), line.size()) == static_cast<ssize_t>(line.size());
      std::exit(written ? 0 : 1);
    });
  asio::co_spawn(io, node_worker_loop(), asio::detached);
  io.run();
  return 0;
}

// ---- the master side ----

namespace {

Env node_env() { return {{"COCLUSTER_TEST_SCENARIO", "node"}}; }

// A node worker that listens at start. (Built outside coroutines: GCC 12 rejects a braced
// initializer list inside a co_await expression.)
Env listening_env(std::uint16_t port = 0, bool notify = false) {
  Env env = node_env();
  env["TEST_LISTEN_NOW"] = "1";
  env["TEST_PORT"] = std::to_string(port);
  if (notify) env["TEST_NOTIFY"] = "1";
  return env;
}

awaitable<tcp::socket> connect_to(std::uint16_t port) {
  tcp::socket s(co_await asio::this_coro::executor);
  co_await s.async_connect({asio::ip::make_address("127.0.0.1"), port}, use_awaitable);
  co_return s;
}

// Writes one line and reads the answer; "" if the connection ended first.
awaitable<std::string> ask(tcp::socket& s, const std::string& line) {
  const std::string out = line + "\n";
  auto [wec, w] = co_await asio::async_write(s, asio::buffer(out), as_tuple_t{});
  if (wec) co_return "";
  std::string in;
  auto [ec, n] = co_await asio::async_read_until(s, asio::dynamic_buffer(in), '\n', as_tuple_t{});
  if (ec) co_return "";
  co_return in.substr(0, n - 1);
}

// True if the peer closed the connection (EOF or reset) rather than sending something.
awaitable<bool> closed_by_peer(tcp::socket& s) {
  char c;
  auto [ec, n] = co_await s.async_read_some(asio::buffer(&c, 1), as_tuple_t{});
  co_return ec == asio::error::eof || ec == asio::error::connection_reset;
}

// A node worker that listens at start, and a client connection it has accepted and answered
// (so the worker holds it: a connection its disconnect must wait for).
struct served_worker {
  std::shared_ptr<Worker> worker;
  tcp::socket client;
};

template <class Policy>
awaitable<served_worker> fork_with_connection(Master<Policy>& master) {
  auto w = co_await master.fork(listening_env());
  const Address at = co_await w->listening();
  tcp::socket client = co_await connect_to(at.port);
  const std::string answer = co_await ask(client, "hello");
  if (answer != "echo:hello") throw std::runtime_error("the worker did not answer: '" + answer + "'");
  co_return served_worker{std::move(w), std::move(client)};
}

template <class Policy>
awaitable<void> disconnect_lets_a_connection_finish(asio::io_context& io, Policy policy) {
  Master<Policy> master(io.get_executor(), {}, policy);
  served_worker served = co_await fork_with_connection(master);  // the worker holds the connection
  auto& w = served.worker;
  auto& client = served.client;
  CHECK(w->state() == WorkerState::listening);

  w->disconnect();
  CHECK(w->exited_after_disconnect() == true);
  CHECK(master.workers().empty());  // Node: at once on a master-side disconnect()
  // The worker has closed its server, but the connection it holds is served to the end, and
  // the channel stays open while it is.
  CHECK((co_await ask(client, "after")) == "echo:after");
  CHECK(w->is_connected());
  CHECK(w->state() == WorkerState::listening);

  client.close();  // the last connection ends: now the worker disconnects and exits by itself
  co_await w->disconnected();
  CHECK(w->state() != WorkerState::listening);
  CHECK((co_await w->exited()) == ExitStatus{0, 0});
  CHECK(w->state() == WorkerState::dead);
  CHECK(w->exited_after_disconnect() == true);
}

}  // namespace

TEST_CASE("worker.disconnect(): servers close, existing connections finish, then the channel closes (round robin)") {
  run_bounded([](asio::io_context& io) { return disconnect_lets_a_connection_finish(io, RoundRobin{}); });
}

TEST_CASE("worker.disconnect(): servers close, existing connections finish, then the channel closes (shared socket)") {
  run_bounded([](asio::io_context& io) { return disconnect_lets_a_connection_finish(io, SharedSocket{}); });
}

TEST_CASE("Node's disconnect-with-timeout example: a connection that never ends keeps the worker until kill()") {
  // cluster.fork(); on 'listening': send('shutdown'), disconnect(), setTimeout(kill, 2000);
  // on 'disconnect': clearTimeout. Here the worker ignores "shutdown" (its connection never
  // ends), so the timeout is what ends it: disconnect cannot come while the connection is open.
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor());
    auto [worker, client] = co_await fork_with_connection(master);  // accepted: a connection that never ends

    worker->disconnect();
    asio::steady_timer timeout(io, 300ms);
    auto which = co_await (worker->disconnected() || timeout.async_wait(use_awaitable));
    CHECK(which.index() == 1);  // the timeout fired
    CHECK(worker->is_connected());
    worker->kill();
    const ExitStatus s = co_await worker->exited();
    CHECK(s.signal == SIGTERM);
    CHECK(worker->exited_after_disconnect() == true);
    const bool closed = co_await closed_by_peer(client);
    CHECK(closed);
  });
}

TEST_CASE("Node's disconnect-with-timeout example: a worker that ends its connections on 'shutdown' disconnects first") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor());
    auto [worker, client] = co_await fork_with_connection(master);

    co_await worker->send({"shutdown"});
    worker->disconnect();
    asio::steady_timer timeout(io, 20s);  // a bound only: the disconnect does not wait for it
    auto which = co_await (worker->disconnected() || timeout.async_wait(use_awaitable));
    CHECK(which.index() == 0);
    const bool closed = co_await closed_by_peer(client);
    CHECK(closed);
    CHECK((co_await worker->exited()) == ExitStatus{0, 0});
  });
}

TEST_CASE("worker.kill() in a worker: it tells the master and exits with 0 without waiting for its connections") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor());
    auto [w, client] = co_await fork_with_connection(master);
    co_await w->send({"kill"});
    CHECK((co_await w->exited()) == ExitStatus{0, 0});
    CHECK(w->exited_after_disconnect() == true);
    CHECK_FALSE(w->is_connected());
    const bool closed = co_await closed_by_peer(client);
    CHECK(closed);
  });
}

TEST_CASE("worker.disconnect() in a worker waits for its connections too, and the master sees exitedAfterDisconnect") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor());
    auto [w, client] = co_await fork_with_connection(master);
    co_await w->send({"disconnect"});
    co_await w->send({"state"});  // answered after the disconnect began: messages still flow
    const Message state = co_await w->receive();
    CHECK(state.data == "none listening true");
    CHECK((co_await ask(client, "two")) == "echo:two");
    CHECK(w->is_connected());
    client.close();
    co_await w->disconnected();
    CHECK((co_await w->exited()) == ExitStatus{0, 0});
    CHECK(w->exited_after_disconnect() == true);
  });
}

TEST_CASE("repeated and concurrent disconnect() and kill() calls are harmless") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor());
    auto a = co_await master.fork(node_env());
    auto b = co_await master.fork(node_env());
    co_await a->online();
    co_await b->online();
    a->disconnect();
    a->disconnect();
    co_await b->send({"disconnect"});
    b->disconnect();
    co_await a->disconnected();
    a->disconnect();
    a->kill();  // after the disconnect: just the signal, or nothing if it has exited
    CHECK(a->exited_after_disconnect() == true);
    co_await a->exited();
    a->kill();
    a->disconnect();
    CHECK((co_await b->exited()) == ExitStatus{0, 0});
    CHECK(b->exited_after_disconnect() == true);
  });
}

TEST_CASE("worker.state: none, online, listening, disconnected, dead in the master; none, online, listening in the worker") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor());
    auto w = co_await master.fork(node_env());
    co_await w->online();
    CHECK(w->state() == WorkerState::online);  // it listens only when asked
    co_await w->send({"state"});
    CHECK((co_await w->receive()).data == "none online unset");
    co_await w->send({"listen"});
    CHECK((co_await w->receive()).data == "listening");
    co_await w->listening();
    CHECK(w->state() == WorkerState::listening);
    co_await w->send({"state"});
    CHECK((co_await w->receive()).data == "none listening unset");
    w->disconnect();
    co_await w->disconnected();
    CHECK((w->state() == WorkerState::disconnected || w->state() == WorkerState::dead));
    co_await w->exited();
    CHECK(w->state() == WorkerState::dead);
    CHECK(to_string(w->state()) == "dead");
  });
}

TEST_CASE("cluster.disconnect(): completes when every worker has disconnected and the listeners are closed; the cycle repeats on the same port") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor());
    std::uint16_t port = 0;
    for (int cycle = 0; cycle < 2; ++cycle) {
      const Env env = listening_env(port);
      auto a = co_await master.fork(env);
      auto b = co_await master.fork(env);
      const Address at_a = co_await a->listening();
      const Address at_b = co_await b->listening();
      CHECK(at_a.port == at_b.port);
      if (cycle == 0) port = at_a.port;
      CHECK(at_a.port == port);
      co_await master.disconnect();
      CHECK(master.workers().empty());
      CHECK_FALSE(a->is_connected());
      CHECK_FALSE(b->is_connected());
      // The master's listener is closed: the port can be bound again.
      tcp::acceptor probe(io);
      probe.open(tcp::v4());
      std::error_code ec;
      probe.bind({asio::ip::make_address("127.0.0.1"), port}, ec);
      CHECK_MESSAGE(!ec, ec.message());
      probe.close();
      co_await a->exited();
      co_await b->exited();
    }
  });
}

TEST_CASE("cluster.disconnect() with no workers completes (on a later turn of the loop)") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor());
    bool done = false;
    master.disconnect([&](std::error_code ec) { done = !ec; });
    CHECK_FALSE(done);  // never inline
    co_await master.disconnect();
    CHECK(done);
  });
}

TEST_CASE("Node's request-counting example: workers notify the master of each request by message") {
  // Master: numReqs += 1 for each {cmd: 'notifyRequest'} from any worker.
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor());
    auto& events = master.events();
    const Env env = listening_env(0, /*notify=*/true);
    auto first = co_await master.fork(env);
    co_await master.fork(env);
    const Address at = co_await first->listening();
    int num_reqs = 0;
    int answered = 0;
    constexpr int requests = 20;
    for (int i = 0; i < requests; ++i) {
      tcp::socket client = co_await connect_to(at.port);
      answered += (co_await ask(client, "GET /")) == "echo:GET /";
    }
    while (num_reqs < requests) {
      const Event e = co_await events.next();
      if (e.type != EventType::message) continue;
      const Message m = co_await e.worker->receive();
      if (m.data == "notifyRequest") ++num_reqs;
    }
    CHECK(answered == requests);
    CHECK(num_reqs == requests);
    co_await master.disconnect();
  });
}

TEST_CASE("Node's fork/listening/exit timeout example, written with ||") {
  // cluster.on('fork', start a timeout); 'listening' clears it; 'exit' clears it and reports.
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor());
    auto watch = [&](std::shared_ptr<Worker> w, std::chrono::milliseconds limit) -> awaitable<std::string> {
      asio::steady_timer timeout(io, limit);
      auto which = co_await (w->listening() || w->exited() || timeout.async_wait(use_awaitable));
      if (which.index() == 0) co_return "listening";
      co_return "Something must be wrong with the connection ...";  // exited, or the timeout
    };
    auto listens = co_await master.fork(listening_env());
    CHECK((co_await watch(listens, 20s)) == "listening");
    auto never_listens = co_await master.fork(node_env());
    CHECK((co_await watch(never_listens, 300ms)) == "Something must be wrong with the connection ...");
    auto exits = co_await master.fork(scenario_env("exit3"));
    CHECK((co_await watch(exits, 20s)) == "Something must be wrong with the connection ...");
    CHECK(exits->is_dead());
    co_await master.disconnect();
  });
}

TEST_CASE("Node's restart-on-exit example: a supervision loop forks a replacement for a worker that dies") {
  // cluster.on('exit', (worker, code, signal) => { log; cluster.fork(); });
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor());
    auto& events = master.events();
    auto first = co_await master.fork(node_env());
    auto second = co_await master.fork(node_env());
    co_await first->online();
    co_await second->online();
    first->kill(SIGKILL);
    std::string log;
    for (;;) {
      const Event e = co_await events.next();
      if (e.type != EventType::exit) continue;
      log = "worker " + std::to_string(e.worker->pid()) + " died (" + e.exit.signal_name() + "). restarting...";
      co_await master.fork(node_env());
      break;
    }
    CHECK(log == "worker " + std::to_string(first->pid()) + " died (SIGKILL). restarting...");
    const auto workers = master.workers();
    CHECK(workers.size() == 2);
    CHECK(workers.count(2) == 1);
    CHECK(workers.count(3) == 1);  // ids are never reused
    co_await workers.at(3)->online();
    co_await master.disconnect();
  });
}

TEST_CASE("Node's eachWorker example: a message to every worker in cluster.workers") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor());
    for (int i = 0; i < 3; ++i) co_await master.fork(node_env());
    for (auto& [id, w] : master.workers()) co_await w->send({"state"});
    for (auto& [id, w] : master.workers()) CHECK((co_await w->receive()).data == "none online unset");
    co_await master.disconnect();
  });
}

// ---- NODE_DEBUG=cluster ----

namespace {

// Runs this executable as a master (cluster_main's COCLUSTER_TEST_ROLE=master: 3 workers,
// their pids on stdout) with `debug_env` added, and returns its stderr once the 3 pids are out.
struct debug_run {
  pid_t master = -1;
  std::vector<pid_t> workers;
  std::string stderr_text;
};

debug_run run_master_with(const std::string& debug_env) {
  auto [out_read, out_write] = cocluster::detail::make_pipe();
  auto [err_read, err_write] = cocluster::detail::make_pipe();
  // Both debug variables given: the one tested, and the other one empty (off).
  const bool node = debug_env.rfind("NODE_DEBUG=", 0) == 0;
  debug_run run;
  run.master = spawn_this_executable({"COCLUSTER_TEST_ROLE=master", debug_env, node ? "COCLUSTER_DEBUG=" : "NODE_DEBUG="},
                                     out_write.get(), err_write.get());
  REQUIRE(run.master > 0);
  out_write.reset();
  err_write.reset();
  std::string line;
  char c;
  while (::read(out_read.get(), &c, 1) == 1 && c != '\n') line += c;
  std::istringstream in(line);
  for (pid_t p; in >> p;) run.workers.push_back(p);
  // Every worker is online: its line is written. Stop the master (its workers follow) and
  // read what it wrote until its stderr closes.
  ::kill(run.master, SIGKILL);
  ::waitpid(run.master, nullptr, 0);
  // The workers still hold stderr; they exit on the channel's EOF.
  char buf[4096];
  for (ssize_t n; (n = ::read(err_read.get(), buf, sizeof buf)) > 0;) run.stderr_text.append(buf, n);
  // Reaped here if they were re-parented to this process (another test makes it a subreaper).
  for (pid_t w : run.workers) ::waitpid(w, nullptr, 0);
  return run;
}

}  // namespace

TEST_CASE("NODE_DEBUG=cluster and COCLUSTER_DEBUG=1 print '<master pid>,Master Worker <pid> online' per worker") {
  for (std::string env : {"COCLUSTER_DEBUG=1", "NODE_DEBUG=net,cluster"}) {
    CAPTURE(env);
    const debug_run run = run_master_with(env);
    REQUIRE(run.workers.size() == 3);
    for (pid_t w : run.workers) {
      const std::string expected = std::to_string(run.master) + ",Master Worker " + std::to_string(w) + " online\n";
      CHECK_MESSAGE(run.stderr_text.find(expected) != std::string::npos, run.stderr_text);
    }
    // Every line has Node's prefix: "<pid>,Master " or "<pid>,Worker ".
    std::istringstream lines(run.stderr_text);
    const std::regex prefix(R"(^[0-9]+,(Master|Worker) .+)");
    for (std::string l; std::getline(lines, l);) CHECK_MESSAGE(std::regex_match(l, prefix), l);
  }
  const debug_run quiet = run_master_with("COCLUSTER_DEBUG=0");
  CHECK(quiet.stderr_text.empty());
}

TEST_CASE("cluster.isMaster / isWorker and Node's cluster.worker example ('I am worker #id'); this_worker in the master is an error") {
  CHECK(is_master());
  CHECK_FALSE(is_worker());
  CHECK(this_worker.state() == WorkerState::none);
  CHECK_THROWS_WITH_AS(this_worker.disconnect(), doctest::Contains("master"), std::system_error);
  asio::io_context here;
  std::error_code ec;
  this_worker.start(here.get_executor(), ec);  // the error_code form of start()
  CHECK(ec == error::not_a_worker);
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor());
    auto a = co_await master.fork(node_env());
    auto b = co_await master.fork(node_env());
    co_await a->send({"whoami"});
    co_await b->send({"whoami"});
    CHECK((co_await a->receive()).data == "I am worker #1 is_worker=1 is_master=0");
    CHECK((co_await b->receive()).data == "I am worker #2 is_worker=1 is_master=0");
    co_await a->send({"start_again"});
    CHECK((co_await a->receive()).data == "already_started");
    co_await master.disconnect();
  });
}

TEST_CASE("Node's worker 'exit' example: killed by a signal, exited with an error code, or success") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor());
    auto describe_exit = [](ExitStatus s) {
      if (s.signal) return "worker was killed by signal: " + s.signal_name();
      if (s.code != 0) return "worker exited with error code: " + std::to_string(s.code);
      return std::string("worker success!");
    };
    auto killed = co_await master.fork(node_env());
    auto failing = co_await master.fork(scenario_env("exit3"));
    auto fine = co_await master.fork(node_env());
    co_await killed->online();
    killed->kill(SIGKILL);
    co_await fine->online();
    fine->disconnect();
    const ExitStatus k = co_await killed->exited();
    const ExitStatus f = co_await failing->exited();
    const ExitStatus s = co_await fine->exited();
    CHECK(describe_exit(k) == "worker was killed by signal: SIGKILL");
    CHECK(describe_exit(f) == "worker exited with error code: 3");
    CHECK(describe_exit(s) == "worker success!");
  });
}

TEST_CASE("send() in a worker after its disconnect fails with channel_closed") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor());
    auto w = co_await master.fork(node_env());
    co_await w->send({"send_after_disconnect"});
    CHECK((co_await w->exited()) == ExitStatus{42, 0});
    CHECK(w->exited_after_disconnect() == true);
  });
}

TEST_CASE("worker.kill() in a worker after its disconnect() exits at once, even while the master is not reading") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Settings settings;
    settings.max_unread_messages = 1;  // two unread replies pause the master's reading
    Master<> master(io.get_executor(), settings);
    auto w = co_await master.fork(node_env());
    co_await w->send({"whoami"});
    co_await w->send({"whoami"});
    co_await w->send({"disconnect_then_kill"});
    CHECK((co_await w->exited()) == ExitStatus{0, 0});
    CHECK(w->exited_after_disconnect() == true);
  });
}

// ---- a master that breaks the protocol ----

TEST_CASE("a worker closes every fd a master hands it: a newconn for no server is refused, an fd that is no socket is a protocol error") {
  // The channel leaves an internal message's fd to the runtime, which makes the socket on a
  // tracked executor. The master is the worker's trusted parent: the runtime does not ask the
  // kernel what the fd is (no getsockopt), it only compares the declared type with the
  // server's. This checks that no fd is kept whatever the master sends. The test plays the
  // master by hand over a raw channel.
  namespace p = ipc::protocol;
  const int fds_before = open_fd_count();
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    auto [ours, theirs] = cocluster::detail::make_socketpair(SOCK_SEQPACKET);
    cocluster::detail::spawn_request r;
    r.exec = "/proc/self/exe";
    r.argv = {r.exec};
    r.env = {"COCLUSTER_WORKER_ID=1", "COCLUSTER_CHANNEL_FD=3", "COCLUSTER_TEST_SCENARIO=node", "TEST_LISTEN_NOW=1"};
    cocluster::detail::Process worker(io.get_executor(), cocluster::detail::spawn(r, std::move(theirs)));
    ipc::Channel master(io.get_executor(), std::move(ours));
    auto next = [&]() -> awaitable<p::InternalMessage> {
      ipc::Envelope e = co_await master.async_receive(use_awaitable);
      auto m = p::decode(e.message.data);
      if (e.kind != ipc::message_kind::internal || !m) throw std::runtime_error("not an internal message");
      co_return *m;
    };
    CHECK(std::holds_alternative<p::Online>(co_await next()));
    const p::InternalMessage query = co_await next();
    REQUIRE(std::holds_alternative<p::QueryServer>(query));
    p::QueryReply reply;
    reply.seq = std::get<p::QueryServer>(query).seq;
    reply.server = 7;
    reply.address = "127.0.0.1";
    reply.port = 9;
    master.send_internal(p::encode(reply));
    CHECK(std::holds_alternative<p::Listening>(co_await next()));

    // A connection for a server the worker does not have: refused, and its fd closed.
    tcp::acceptor acceptor(io, {asio::ip::make_address("127.0.0.1"), 0});
    tcp::socket client(io);
    client.connect(acceptor.local_endpoint());
    tcp::socket handed = acceptor.accept();
    p::NewConn stray;
    stray.server = 99;
    stray.seq = 1;
    master.send_internal(p::encode(stray), 1, cocluster::detail::unique_fd(handed.release()));
    const p::InternalMessage refusal = co_await next();
    REQUIRE(std::holds_alternative<p::Accepted>(refusal));
    CHECK(std::get<p::Accepted>(refusal).server == 99);
    CHECK_FALSE(std::get<p::Accepted>(refusal).ok);
    const bool closed = co_await closed_by_peer(client);  // the worker's copy was the last
    CHECK(closed);

    // A pipe declared as a TCP socket, for the server it has: the channel takes no fd that is
    // not a socket at all (one fstat), from anyone: a protocol error; the worker closes the
    // channel and the pipe.
    auto [pipe2_read, pipe2_write] = cocluster::detail::make_pipe();
    p::NewConn wrong;
    wrong.server = 7;
    wrong.seq = 2;
    master.send_internal(p::encode(wrong), 1, std::move(pipe2_read));
    auto [ec, e] = co_await master.async_receive(as_tuple_t{});
    CHECK(ec == asio::error::eof);
    pollfd pfd2{pipe2_write.get(), 0, 0};
    CHECK(::poll(&pfd2, 1, 10000) == 1);
    CHECK((pfd2.revents & POLLERR) != 0);
    const ExitStatus s = co_await worker.async_wait(use_awaitable);
    CHECK(s == ExitStatus{0, 0});  // an unexpected end of the channel: Node's exit(0)
  });
  CHECK(open_fd_count() == fds_before);
}
// ---- issue 10: what an independent check of Node's own tests found ----

namespace {

// Reads `fd` until EOF or `limit`; false on the limit.
bool read_to_eof(int fd, std::string& out, std::chrono::milliseconds limit) {
  const auto deadline = std::chrono::steady_clock::now() + limit;
  char buf[4096];
  for (;;) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    pollfd pfd{fd, POLLIN, 0};
    if (left.count() <= 0 || ::poll(&pfd, 1, static_cast<int>(left.count())) != 1) return false;
    const ssize_t n = ::read(fd, buf, sizeof buf);
    if (n <= 0) return n == 0;
    out.append(buf, static_cast<std::size_t>(n));
  }
}

}  // namespace

TEST_CASE("a worker whose master is SIGKILLed runs its on_disconnect handler and exits 0 (50 times): the parent-death signal never pre-empts it") {
  // Node: a worker exits with 0 when its channel closes (test-cluster-master-kill.js). The
  // kernel's parent-death signal arrives with the EOF; it must not be what ends the worker.
  REQUIRE(::prctl(PR_SET_CHILD_SUBREAPER, 1) == 0);  // orphaned workers come to this process
  int handlers_ran = 0;
  int clean_exits = 0;
  constexpr int rounds = 50;
  constexpr int workers = 2;
  for (int round = 0; round < rounds; ++round) {
    auto [out_read, out_write] = cocluster::detail::make_pipe();
    const pid_t master = spawn_this_executable({"COCLUSTER_TEST_ROLE=master", "TEST_WORKERS=2", "TEST_ON_DISCONNECT=1",
                                                "COCLUSTER_TEST_SCENARIO=node"},
                                               out_write.get());
    REQUIRE(master > 0);
    out_write.reset();
    std::string line;
    char c;
    while (::read(out_read.get(), &c, 1) == 1 && c != '\n') line += c;
    std::istringstream in(line);
    std::vector<pid_t> pids;
    for (pid_t p; in >> p;) pids.push_back(p);
    REQUIRE(pids.size() == workers);
    std::vector<cocluster::detail::unique_fd> pidfds;
    for (pid_t p : pids) {
      std::error_code ec;
      pidfds.push_back(cocluster::detail::pidfd_open(p, ec));
      REQUIRE_FALSE(ec);
    }
    REQUIRE(::kill(master, SIGKILL) == 0);
    REQUIRE(::waitpid(master, nullptr, 0) == master);
    // Every worker writes its line and exits; the pipe ends when the last one has.
    std::string rest;
    const bool ended = read_to_eof(out_read.get(), rest, 20s);
    CHECK_MESSAGE(ended, "the workers still hold stdout 20 s after their master was killed");
    for (std::size_t i = 0; i < pids.size(); ++i) {
      if (!ended) ::kill(pids[i], SIGKILL);
      siginfo_t info{};
      REQUIRE(::waitid(P_PIDFD, static_cast<id_t>(pidfds[i].get()), &info, WEXITED) == 0);
      const bool exited_0 = info.si_code == CLD_EXITED && info.si_status == 0;
      CHECK_MESSAGE(exited_0, "round " << round << ": worker " << pids[i] << " ended with si_code " << info.si_code
                                       << ", status " << info.si_status);
      clean_exits += exited_0;
      const bool ran = rest.find("on_disconnect " + std::to_string(pids[i]) + "\n") != std::string::npos;
      CHECK_MESSAGE(ran, "round " << round << ": no on_disconnect line from " << pids[i] << " in '" << rest << "'");
      handlers_ran += ran;
    }
  }
  ::prctl(PR_SET_CHILD_SUBREAPER, 0);
  CHECK(handlers_ran == rounds * workers);
  CHECK(clean_exits == rounds * workers);
}

TEST_CASE("a worker's identity leaves its environment at start(): a cocluster program it runs is a master") {
  // Node deletes NODE_UNIQUE_ID in the worker for this reason.
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor());
    auto w = co_await master.fork(node_env());
    co_await w->send({"run_nested_master"});
    CHECK((co_await w->receive()).data == "nested exit 0 id=unset fd=unset");
    co_await w->send({"whoami"});  // the worker itself still knows who it is
    CHECK((co_await w->receive()).data == "I am worker #1 is_worker=1 is_master=0");
    co_await master.disconnect();
  });
}

TEST_CASE("the cluster 'disconnect' event reads state disconnected, even when taken after the exit (a child of the worker holds its channel)") {
  // Node's listeners run when the event is emitted; ours are read later from a queue, so each
  // event carries what they would have read then.
  REQUIRE(::prctl(PR_SET_CHILD_SUBREAPER, 1) == 0);  // the holder comes to this process
  pid_t holder = -1;
  run_bounded([&](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor());
    auto& events = master.events();
    auto w = co_await master.fork(node_env());
    co_await w->send({"fork_holder"});
    const std::string answer = (co_await w->receive()).data;
    REQUIRE(answer.rfind("holder ", 0) == 0);
    holder = std::stoi(answer.substr(7));
    co_await w->send({"exit42"});
    CHECK((co_await w->exited()) == ExitStatus{42, 0});  // the channel's end was read first
    CHECK(w->state() == WorkerState::dead);  // by now; the events below were emitted before
    std::optional<Event> disconnect, exit;
    while (!exit) {
      Event e = co_await events.next();
      if (e.type == EventType::disconnect) disconnect = e;
      if (e.type == EventType::exit) exit = e;
    }
    REQUIRE(disconnect);
    CHECK(disconnect->snapshot.state == WorkerState::disconnected);
    CHECK_FALSE(disconnect->snapshot.is_connected);
    CHECK_FALSE(disconnect->snapshot.is_dead);
    CHECK(disconnect->snapshot.exited_after_disconnect == false);
    CHECK(exit->snapshot.state == WorkerState::dead);
    CHECK(exit->snapshot.is_dead);
    CHECK(exit->exit == ExitStatus{42, 0});
  });
  if (holder > 0) {
    ::kill(holder, SIGKILL);
    ::waitpid(holder, nullptr, 0);
  }
  ::prctl(PR_SET_CHILD_SUBREAPER, 0);
  CHECK(holder > 0);
}

TEST_CASE("every cluster event carries the worker's state when it was emitted: fork, online, listening, disconnect, exit") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor());
    auto& events = master.events();
    auto w = co_await master.fork(listening_env());
    co_await w->listening();
    w->disconnect();
    co_await w->exited();
    std::vector<std::pair<EventType, WorkerSnapshot>> seen;
    while (seen.empty() || seen.back().first != EventType::exit) {
      const Event e = co_await events.next();
      if (e.worker) seen.emplace_back(e.type, e.snapshot);
    }
    const std::vector<std::pair<EventType, WorkerSnapshot>> expected = {
        {EventType::fork, {WorkerState::none, std::nullopt, true, false}},
        {EventType::online, {WorkerState::online, std::nullopt, true, false}},
        {EventType::listening, {WorkerState::listening, std::nullopt, true, false}},
        {EventType::ready, {WorkerState::listening, std::nullopt, true, false}},  // ours: ready on listening
        {EventType::disconnect, {WorkerState::disconnected, true, false, false}},
        {EventType::exit, {WorkerState::dead, true, false, true}},
    };
    REQUIRE(seen.size() == expected.size());
    for (std::size_t i = 0; i < seen.size(); ++i) {
      CAPTURE(i);
      CHECK(seen[i].first == expected[i].first);
      CHECK(seen[i].second == expected[i].second);
    }
  });
}

TEST_CASE("worker.isDead() in a worker: false while it runs, true in its exit handlers") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor());
    Env env = node_env();
    env["TEST_ATEXIT"] = "1";
    auto w = co_await master.fork(env);
    co_await w->send({"is_dead"});
    CHECK((co_await w->receive()).data == "is_dead 0");
    co_await w->send({"kill"});
    CHECK((co_await w->exited()) == ExitStatus{40, 0});  // 40: the atexit handler read true
  });
}

TEST_CASE("cluster.setupMaster() merges: setup_merge() changes only the fields given, so exec is kept") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    const std::string exe = std::filesystem::read_symlink("/proc/self/exe").string();
    Settings initial;
    initial.exec = exe;  // not the default (/proc/self/exe)
    initial.env = scenario_env("report");
    Master<> master(io.get_executor(), initial);
    auto& events = master.events();
    master.setup_merge({.args = std::vector<std::string>{"--merged"}});
    CHECK(master.settings().exec == exe);
    CHECK(master.settings().args == std::vector<std::string>{"--merged"});
    CHECK(master.settings().env == scenario_env("report"));
    const Event setup = co_await events.next();
    REQUIRE(setup.type == EventType::setup);
    CHECK(setup.settings->exec == exe);
    CHECK(setup.settings->args == std::vector<std::string>{"--merged"});
    auto w = co_await master.fork();  // runs `exe` with the merged arguments
    co_await w->send({"report"});
    const std::string report = (co_await w->receive()).data;
    CHECK_MESSAGE(report.find(" argv=--merged ") != std::string::npos, report);
    w->disconnect();
    co_await w->exited();
    // setup() replaces: what it is not given goes back to the defaults.
    master.setup(Settings{.args = std::vector<std::string>{"--replaced"}});
    CHECK(master.settings().exec == "/proc/self/exe");
    CHECK(master.settings().env.empty());
  });
}

TEST_CASE("worker.process.disconnect() in the master: the channel closes without the graceful disconnect, and the worker exits 0 at once") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor());
    auto [w, client] = co_await fork_with_connection(master);  // a connection the worker holds
    w->close_channel();
    CHECK_FALSE(w->is_connected());  // Node: process.connected is false at once
    auto [ec] = co_await w->send({"too late"}, as_tuple_t{});
    CHECK(ec == error::worker_not_connected);
    co_await w->disconnected();
    // A graceful disconnect would wait for the client's connection; this does not.
    CHECK((co_await w->exited()) == ExitStatus{0, 0});
    CHECK(w->exited_after_disconnect() == false);
    const bool closed = co_await closed_by_peer(client);
    CHECK(closed);
  });
}

TEST_CASE("process.disconnect() in a worker: the master sees a disconnect it did not ask for, and the worker exits 0 at once") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor());
    auto [w, client] = co_await fork_with_connection(master);
    co_await w->send({"close_channel"});
    co_await w->disconnected();
    CHECK((co_await w->exited()) == ExitStatus{0, 0});
    CHECK(w->exited_after_disconnect() == false);
    const bool closed = co_await closed_by_peer(client);
    CHECK(closed);
  });
}

TEST_CASE("worker.signal(SIGUSR1) reaches a worker that handles it, through the pidfd, and the worker stays connected") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor());
    auto w = co_await master.fork(node_env());
    co_await w->send({"watch_sigusr1"});
    CHECK((co_await w->receive()).data == "watching");
    w->signal(SIGUSR1);
    CHECK((co_await w->receive()).data == "got SIGUSR1");
    CHECK(w->is_connected());
    CHECK(w->state() == WorkerState::online);
    co_await w->send({"state"});
    CHECK((co_await w->receive()).data == "none online unset");
    w->disconnect();
    co_await w->exited();
    // Reaped: the pidfd is closed, so a signal now is ESRCH, never another process.
    std::error_code ec;
    w->signal(SIGUSR1, ec);
    CHECK(ec == std::errc::no_such_process);
    CHECK_THROWS_AS(w->signal(SIGUSR1), std::system_error);
  });
}
