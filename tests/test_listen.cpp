// Listening through the master: RoundRobin and SharedSocket with real workers and sockets.
#include "cocluster/server.hpp"

#include <doctest/doctest.h>
#include <netinet/in.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <fcntl.h>
#include <unistd.h>

#include <filesystem>
#include <functional>
#include <map>
#include <numeric>
#include <tuple>
#include <vector>

#include "cocluster/cocluster.hpp"
#include "cocluster/detail/worker/tracked_executor.hpp"
#include "support.hpp"
#include "worker_scenario.hpp"

using namespace cocluster;
using namespace test;
using asio::ip::tcp;
using asio::ip::udp;
using local_stream = asio::local::stream_protocol;
using as_tuple_t = cocluster::detail::as_tuple_t<asio::use_awaitable_t<>>;

// ---- the worker side: the serve and stall scenarios ----

namespace {

// TEST_LISTEN: "tcp4:ADDR:PORT", "tcp6:ADDR:PORT", "udp4:ADDR:PORT", "unix:PATH" ("unix:@NAME": abstract), "fd:N".
struct target {
  std::string kind, address;
  unsigned short port = 0;
};

target parse_target(std::string spec) {
  target t;
  auto colon = spec.find(':');
  t.kind = spec.substr(0, colon);
  std::string rest = spec.substr(colon + 1);
  if (t.kind == "unix" || t.kind == "fd") {
    t.address = rest;
    if (t.kind == "unix" && !rest.empty() && rest[0] == '@') t.address[0] = '\0';  // an abstract name, as ss shows it
    return t;
  }
  auto last = rest.rfind(':');
  t.address = rest.substr(0, last);
  t.port = static_cast<unsigned short>(std::stoi(rest.substr(last + 1)));
  return t;
}

// What a connection was when accept() gave it, before any operation: close-on-exec,
// O_NONBLOCK, and whether Asio knows it is non-blocking ("1 1 1"; Asio's own accept: "0 0 0").
template <class Socket>
std::string fd_flags(Socket& socket) {
  const int fd = socket.native_handle();
  return std::to_string((::fcntl(fd, F_GETFD) & FD_CLOEXEC) != 0) + " " +
         std::to_string((::fcntl(fd, F_GETFL) & O_NONBLOCK) != 0) + " " + std::to_string(socket.native_non_blocking());
}

// Whether the connection's socket runs on the worker's io_context executor itself, tracked
// (detail::worker::track): small enough for any_io_executor to hold without an allocation,
// where a tracked any_io_executor is allocated once per connection. "1" or "0".
template <class Socket>
std::string tracked_in_place(Socket& socket) {
  using in_place = cocluster::detail::worker::tracked_executor<asio::io_context::executor_type>;
  return socket.get_executor().target_type() == typeid(in_place) ? "1" : "0";
}

// Answers each connection with "worker <id>\n" once it has read a line, then closes it. To the
// line "flags" it answers "worker <id> flags <fd_flags> tracked <0|1>\n", then reads one byte with a
// synchronous read (which must wait for it, not fail with EAGAIN) and says "read ok\n".
template <class Socket>
awaitable<void> answer(Socket socket) {
  const std::string flags = fd_flags(socket) + " tracked " + tracked_in_place(socket);
  std::string line;
  auto [ec, n] = co_await asio::async_read_until(socket, asio::dynamic_buffer(line), '\n', as_tuple_t{});
  if (ec) co_return;
  std::string reply = "worker " + std::to_string(this_worker.id());
  if (line == "flags\n") {
    reply += " flags " + flags + "\n";
    co_await asio::async_write(socket, asio::buffer(reply), as_tuple_t{});
    char byte;
    std::error_code read_ec;
    socket.read_some(asio::buffer(&byte, 1), read_ec);  // blocks this worker until the client sends it
    reply = read_ec ? "read " + read_ec.message() + "\n" : "read ok\n";
  } else {
    reply += "\n";
  }
  co_await asio::async_write(socket, asio::buffer(reply), as_tuple_t{});
}

template <class Server>
awaitable<void> accept_loop(Server& server) {
  for (;;) {
    auto [ec, socket] = co_await server.accept(as_tuple_t{});
    if (ec) co_return;
    asio::co_spawn(socket.get_executor(), answer(std::move(socket)), asio::detached);
  }
}

awaitable<void> udp_loop(Server<udp>& server) {
  char buf[64];
  udp::endpoint from;
  for (;;) {
    auto [ec, n] = co_await server.socket().async_receive_from(asio::buffer(buf), from, as_tuple_t{});
    if (ec) co_return;
    const std::string reply = "worker " + std::to_string(this_worker.id()) + "\n";
    co_await server.socket().async_send_to(asio::buffer(reply), from, as_tuple_t{});
  }
}

// Listens on TEST_LISTEN and reports "port N" (or "error <errno>"); serves unless stalling;
// the master's "close" closes the server ("closed"), "listen" listens again; "exhaust" leaves
// no fd free (RLIMIT_NOFILE down to the lowest free fd: "exhausted"), "release" restores it
// ("released"); "ping" is answered "pong".
awaitable<void> listen_worker(bool stall) {
  const target t = parse_target(std::getenv("TEST_LISTEN"));
  std::optional<Server<tcp>> tcp_server;
  std::optional<Server<local_stream>> unix_server;
  std::optional<Server<udp>> udp_server;
  rlimit saved{};
  auto listen = [&]() -> awaitable<std::string> {
    try {
      if (t.kind == "tcp4" || t.kind == "tcp6") {
        tcp_server.emplace(co_await this_worker.listen(tcp::endpoint(asio::ip::make_address(t.address), t.port)));
        if (!stall) asio::co_spawn(co_await asio::this_coro::executor, accept_loop(*tcp_server), asio::detached);
        co_return "port " + std::to_string(tcp_server->local_endpoint().port());
      }
      if (t.kind == "fd") {
        tcp_server.emplace(co_await this_worker.listen_fd<tcp>(std::stoi(t.address)));
        asio::co_spawn(co_await asio::this_coro::executor, accept_loop(*tcp_server), asio::detached);
        co_return "port " + std::to_string(tcp_server->local_endpoint().port());
      }
      if (t.kind == "unix") {
        unix_server.emplace(co_await this_worker.listen(local_stream::endpoint(t.address)));
        asio::co_spawn(co_await asio::this_coro::executor, accept_loop(*unix_server), asio::detached);
        co_return "path " + unix_server->local_endpoint().path();
      }
      udp_server.emplace(co_await this_worker.listen(udp::endpoint(asio::ip::make_address(t.address), t.port)));
      asio::co_spawn(co_await asio::this_coro::executor, udp_loop(*udp_server), asio::detached);
      co_return "port " + std::to_string(udp_server->local_endpoint().port());
    } catch (const std::system_error& e) {
      co_return "error " + std::to_string(e.code().value()) + " " + e.what();
    }
  };
  co_await this_worker.send({co_await listen()});
  for (;;) {
    auto [ec, m] = co_await this_worker.receive(as_tuple_t{});
    if (ec) co_return;
    if (m.data == "close") {
      if (tcp_server) tcp_server->close();
      if (unix_server) unix_server->close();
      if (udp_server) udp_server->close();
      co_await this_worker.send({"closed"});
    } else if (m.data == "listen") {
      co_await this_worker.send({co_await listen()});
    } else if (m.data == "exhaust") {
      saved = leave_no_fd_free();
      co_await this_worker.send({"exhausted"});
    } else if (m.data == "ping") {
      co_await this_worker.send({"pong"});
    } else if (m.data == "release") {
      if (saved.rlim_max != 0) ::setrlimit(RLIMIT_NOFILE, &saved);  // (after an "exhaust" only)
      co_await this_worker.send({"released"});
    }
  }
}

int run_listen_worker(bool stall) {
  asio::io_context io;
  this_worker.start(io.get_executor());
  asio::co_spawn(io, listen_worker(stall), asio::detached);
  io.run();
  return 0;
}

}  // namespace

// Listens on TEST_LISTEN and reports "port N" (or "path P", "error <errno> <what>"); then serves
// each connection with "worker <id>\n"; "close" closes the server, "listen" listens again.
WORKER_SCENARIO(serve) { return run_listen_worker(false); }
// The same, but never accepts.
WORKER_SCENARIO(stall) { return run_listen_worker(true); }

// Listens on TEST_LISTEN (a TCP port another process holds) with an error_code token, then
// uses the Server it got: reports what listen() gave and what accept() and local_endpoint() did.
WORKER_SCENARIO(use_failed_server) {
  asio::io_context io;
  this_worker.start(io.get_executor());
  asio::co_spawn(io, []() -> awaitable<void> {
    const target t = parse_target(std::getenv("TEST_LISTEN"));
    auto [ec, server] =
        co_await this_worker.listen(tcp::endpoint(asio::ip::make_address(t.address), t.port), {}, as_tuple_t{});
    std::string report = "listen " + std::to_string(ec.value());
    try {
      (void)co_await server.accept(as_tuple_t{});
      report += "; accept completed";
    } catch (const std::system_error& e) {
      report += "; accept: " + std::to_string(e.code().value()) + " " + e.what();
    }
    try {
      (void)server.local_endpoint();
      report += "; local_endpoint returned";
    } catch (const std::system_error& e) {
      report += "; local_endpoint: " + std::string(e.what());
    }
    co_await this_worker.send({report});
  }, asio::detached);
  io.run();
  return 0;
}

// ---- the master side: the tests ----

namespace {

Env listen_env(std::string_view scenario_name, const std::string& spec) {
  Env env = scenario_env(scenario_name);
  env["TEST_LISTEN"] = spec;
  return env;
}

// One request: connect, send a line, read the answer to EOF. Returns the worker id (0 if the
// connection ended without an answer).
template <class Endpoint>
awaitable<int> ask(Endpoint where) {
  typename Endpoint::protocol_type::socket s(co_await asio::this_coro::executor);
  co_await s.async_connect(where, use_awaitable);
  co_await asio::async_write(s, asio::buffer("hi\n", 3), use_awaitable);
  std::string reply;
  co_await asio::async_read(s, asio::dynamic_buffer(reply), as_tuple_t{});  // to EOF, or an error: both end the answer
  if (reply.rfind("worker ", 0) != 0) co_return 0;
  co_return std::stoi(reply.substr(7));
}

// A "flags" request (answer()): the worker's reply to EOF, after sending the byte its
// synchronous read waits for once the first line is in.
template <class Endpoint>
awaitable<std::string> ask_flags(Endpoint where) {
  typename Endpoint::protocol_type::socket s(co_await asio::this_coro::executor);
  co_await s.async_connect(where, use_awaitable);
  co_await asio::async_write(s, asio::buffer("flags\n", 6), use_awaitable);
  std::string reply;
  auto [ec, n] = co_await asio::async_read_until(s, asio::dynamic_buffer(reply), '\n', as_tuple_t{});
  if (ec) co_return reply + " (" + ec.message() + ")";
  co_await asio::async_write(s, asio::buffer("x", 1), use_awaitable);
  co_await asio::async_read(s, asio::dynamic_buffer(reply), as_tuple_t{});  // to EOF
  co_return reply;
}

// Returns once `done()` holds, looking every 5 ms (a wait, not a timing assumption).
awaitable<void> wait_until(std::function<bool()> done) {
  asio::steady_timer poll(co_await asio::this_coro::executor);
  while (!done()) {
    poll.expires_after(5ms);
    co_await poll.async_wait(use_awaitable);
  }
}

// `n` clients asking at once, as detached coroutines; how many each worker id answered
// (0: no answer, -1: the client failed), and how many have finished.
struct asks_in_flight {
  std::map<int, int> served;
  int finished = 0;
};
template <class Endpoint>
std::shared_ptr<asks_in_flight> ask_at_once(asio::io_context& io, Endpoint where, int n) {
  auto state = std::make_shared<asks_in_flight>();
  for (int i = 0; i < n; ++i)
    asio::co_spawn(io, ask(where), [state](std::exception_ptr e, int id) {
      ++state->served[e ? -1 : id];
      ++state->finished;
    });
  return state;
}

// `total` requests, `concurrency` at a time; how many each worker id answered (0: none).
template <class Endpoint>
awaitable<std::map<int, int>> ask_many(Endpoint where, int total, int concurrency) {
  std::map<int, int> served;
  int next = 0;
  auto ex = co_await asio::this_coro::executor;
  auto one_client = [&]() -> awaitable<void> {
    while (next < total) {
      ++next;
      ++served[co_await ask(where)];
    }
  };
  int done = 0;
  for (int i = 0; i < concurrency; ++i)
    asio::co_spawn(ex, one_client(), [&](std::exception_ptr e) {
      if (e) served[-1]++;  // a client failed: the caller's check sees it
      ++done;
    });
  co_await wait_until([&] { return done == concurrency; });
  co_return served;
}

struct cluster {
  std::vector<std::shared_ptr<Worker>> workers;
  std::vector<std::string> reports;  // each worker's first message ("port N", "error ...")
};

template <class Policy>
awaitable<cluster> start(Master<Policy>& master, int n, const Env& env) {
  cluster c;
  for (int i = 0; i < n; ++i) c.workers.push_back(co_await master.fork(env));
  for (auto& w : c.workers) {
    Message m = co_await w->receive();
    c.reports.push_back(m.data);
  }
  co_return c;
}

unsigned short port_of(const std::string& report) {
  REQUIRE_MESSAGE(report.rfind("port ", 0) == 0, report);
  return static_cast<unsigned short>(std::stoi(report.substr(5)));
}

template <class Policy>
awaitable<void> four_workers_share_port_zero(asio::io_context& io, bool check_fairness) {
  Master<Policy> master(io.get_executor());
  auto& events = master.events();
  auto c = co_await start(master, 4, listen_env("serve", "tcp4:127.0.0.1:0"));
  const unsigned short port = port_of(c.reports[0]);
  CHECK(port != 0);
  for (auto& w : c.workers) {
    Address a = co_await w->listening();
    CHECK(a.port == port);
    CHECK(a.address == "127.0.0.1");
    CHECK(a.type == AddressType::v4);
  }
  for (auto& r : c.reports) CHECK(port_of(r) == port);
  int listening_events = 0;
  while (events.pending() > 0) {
    Event e = co_await events.next();
    if (e.type == EventType::listening) ++listening_events;
  }
  CHECK(listening_events == 4);

  const tcp::endpoint where(asio::ip::address_v4::loopback(), port);
  // One at a time, so the free queue's order is the rotation: exactly 100 each.
  auto served = co_await ask_many(where, 400, check_fairness ? 1 : 16);
  int answered = 0;
  for (const auto& entry : served) {
    const int id = entry.first;  // not a structured binding: doctest's macros capture it (clang 14)
    const int n = entry.second;
    CHECK_MESSAGE(id > 0, "connections not answered: ", n);
    if (id > 0) answered += n;
    if (check_fairness && id > 0) CHECK_MESSAGE(std::abs(n - 100) <= 1, "worker ", id, " served ", n);
  }
  CHECK(answered == 400);
  if (check_fairness) CHECK(served.size() == 4);
  co_await master.disconnect();
}

}  // namespace

TEST_CASE("round robin: 4 workers on listen(0) share one port and each answers 100 of 400 connections") {
  run_bounded([](asio::io_context& io) { return four_workers_share_port_zero<RoundRobin>(io, true); }, 120s);
}

TEST_CASE("round robin: 400 concurrent connections are all answered") {
  run_bounded([](asio::io_context& io) { return four_workers_share_port_zero<RoundRobin>(io, false); }, 120s);
}

TEST_CASE("shared socket: 4 workers on listen(0) share one port and answer 400 concurrent connections") {
  run_bounded([](asio::io_context& io) { return four_workers_share_port_zero<SharedSocket>(io, false); }, 120s);
}

TEST_CASE("round robin: connections handed to a worker that is SIGKILLed are answered by the others") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<RoundRobin> master(io.get_executor(), {}, RoundRobin{2});
    cluster c;
    for (auto scenario_name : {"serve", "serve", "stall"}) {
      c.workers.push_back(co_await master.fork(listen_env(scenario_name, "tcp4:127.0.0.1:0")));
      c.reports.push_back((co_await c.workers.back()->receive()).data);  // in order: worker 3 is last in turn
    }
    const tcp::endpoint where(asio::ip::address_v4::loopback(), port_of(c.reports[0]));
    for (auto& w : c.workers) co_await w->listening();

    // 20 clients at once: the 3rd connection accepted goes to worker 3, which never accepts;
    // it takes up to its window (2) of them. The others answer the rest.
    auto asks = ask_at_once(io, where, 20);
    co_await wait_until([&] { return asks->finished >= 18; });
    c.workers[2]->kill(SIGKILL);
    CHECK((co_await c.workers[2]->exited()).signal == SIGKILL);
    co_await wait_until([&] { return asks->finished == 20; });
    auto& served = asks->served;
    CHECK(served.count(3) == 0);
    CHECK(served.count(0) == 0);
    CHECK(served.count(-1) == 0);
    CHECK(served[1] + served[2] == 20);
    co_await master.disconnect();
  }, 120s);
}

TEST_CASE("round robin: connections waiting on a worker that closes its server go to another worker") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<RoundRobin> master(io.get_executor(), {}, RoundRobin{3});
    cluster c;
    for (auto scenario_name : {"stall", "serve"}) {
      c.workers.push_back(co_await master.fork(listen_env(scenario_name, "tcp4:127.0.0.1:0")));
      c.reports.push_back((co_await c.workers.back()->receive()).data);
    }
    const tcp::endpoint where(asio::ip::address_v4::loopback(), port_of(c.reports[0]));
    for (auto& w : c.workers) co_await w->listening();
    // The first connection goes to worker 1 (first in turn), which does not accept.
    auto asks = ask_at_once(io, where, 10);
    co_await wait_until([&] { return asks->finished >= 7; });
    co_await c.workers[0]->send({"close"});
    CHECK((co_await c.workers[0]->receive()).data == "closed");
    co_await wait_until([&] { return asks->finished == 10; });
    CHECK(asks->served[2] == 10);
    co_await master.disconnect();
  }, 60s);
}

namespace {
// Another process listening on 127.0.0.1:port (0: any); its port is read back from a pipe.
// It exits when the pipe's other end closes or on SIGKILL.
struct port_holder {
  pid_t pid = -1;
  unsigned short port = 0;
  int control = -1;  // our end: closing it ends the holder

  port_holder(const port_holder&) = delete;
  port_holder& operator=(const port_holder&) = delete;
  explicit port_holder(unsigned short wanted) {
    int to_child[2], from_child[2];
    REQUIRE(::pipe2(to_child, O_CLOEXEC) == 0);
    REQUIRE(::pipe2(from_child, O_CLOEXEC) == 0);
    pid = ::fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
      ::close(to_child[1]);  // or our own copy of the write end would keep read() from ending
      ::close(from_child[0]);
      const int s = ::socket(AF_INET, SOCK_STREAM, 0);
      const int one = 1;  // earlier connections' TIME_WAIT must not stop us; a listener still does
      ::setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
      sockaddr_in a{};
      a.sin_family = AF_INET;
      a.sin_port = htons(wanted);
      a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
      socklen_t len = sizeof a;
      unsigned short got = 0;
      if (::bind(s, reinterpret_cast<sockaddr*>(&a), len) == 0 && ::listen(s, 8) == 0 &&
          ::getsockname(s, reinterpret_cast<sockaddr*>(&a), &len) == 0)
        got = ntohs(a.sin_port);
      (void)!::write(from_child[1], &got, sizeof got);
      char c;
      (void)!::read(to_child[0], &c, 1);  // until the test closes its end
      ::_exit(0);
    }
    ::close(to_child[0]);
    ::close(from_child[1]);
    control = to_child[1];
    REQUIRE(::read(from_child[0], &port, sizeof port) == sizeof port);
    ::close(from_child[0]);
    REQUIRE(port != 0);
  }
  void release() {
    if (pid < 0) return;
    ::close(control);
    int status = 0;
    ::waitpid(pid, &status, 0);
    pid = -1;
  }
  ~port_holder() { release(); }
};
}  // namespace

TEST_CASE("a port held by another process: the worker's listen() fails with EADDRINUSE and the master carries on") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    std::optional<port_holder> holder(std::in_place, 0);
    const auto taken = holder->port;
    for (bool shared : {false, true}) {
      Master<RuntimePolicy> master(io.get_executor(), {},
                                   RuntimePolicy(shared ? Scheduling::shared : Scheduling::round_robin));
      auto& events = master.events();
      auto c = co_await start(master, 1, listen_env("serve", "tcp4:127.0.0.1:" + std::to_string(taken)));
      CHECK_MESSAGE(c.reports[0].rfind("error " + std::to_string(EADDRINUSE) + " ", 0) == 0, c.reports[0]);
      // what() is the error's own message: listen() completes with an error_code, as Asio's
      // operations do, so the exception no longer names the address (the caller knows it).
      CHECK(c.reports[0].find(std::system_category().message(EADDRINUSE)) != std::string::npos);
      // The master is fine, the entry was not kept: once the port is free the same listen works.
      holder.reset();
      co_await c.workers[0]->send({"listen"});
      const std::string second = (co_await c.workers[0]->receive()).data;
      CHECK(port_of(second) == taken);
      CHECK(co_await ask(tcp::endpoint(asio::ip::address_v4::loopback(), taken)) == c.workers[0]->id());
      while (events.pending() > 0) CHECK((co_await events.next()).type != EventType::error);
      co_await master.disconnect();
      co_await c.workers[0]->exited();  // under SharedSocket the worker held a copy of the listener
      if (!shared) holder.emplace(taken);  // held again for the SharedSocket round
    }
  }, 60s);
}

TEST_CASE("a Server whose listen() failed says so when used: accept() and local_endpoint() throw bad_descriptor") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    port_holder holder(0);
    Master<RoundRobin> master(io.get_executor());
    auto w = co_await master.fork(listen_env("use_failed_server", "tcp4:127.0.0.1:" + std::to_string(holder.port)));
    const std::string report = (co_await w->receive()).data;
    const std::string not_listening = "the server is not listening (its listen() failed, or it was moved from)";
    CHECK_MESSAGE(report.rfind("listen " + std::to_string(EADDRINUSE) + "; accept: " + std::to_string(EBADF) +
                                   " cocluster::Server::accept: " + not_listening,
                               0) == 0,
                  report);
    CHECK_MESSAGE(report.find("; local_endpoint: cocluster::Server::local_endpoint: " + not_listening) != std::string::npos,
                  report);
    co_await master.disconnect();
    CHECK((co_await w->exited()) == ExitStatus{0, 0});
  }, 60s);
}

TEST_CASE("an abstract Unix socket name: the worker's listen() fails with EINVAL, and the master carries on") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<RoundRobin> master(io.get_executor());
    auto& events = master.events();
    auto c = co_await start(master, 1, listen_env("serve", "unix:@cocluster-test-" + std::to_string(::getpid())));
    CHECK_MESSAGE(c.reports[0].rfind("error " + std::to_string(EINVAL) + " ", 0) == 0, c.reports[0]);
    auto d = co_await start(master, 1, listen_env("serve", "tcp4:127.0.0.1:0"));
    CHECK(co_await ask(tcp::endpoint(asio::ip::address_v4::loopback(), port_of(d.reports[0]))) == d.workers[0]->id());
    while (events.pending() > 0) CHECK((co_await events.next()).type != EventType::error);
    co_await master.disconnect();
  }, 60s);
}

// ---- ListenOptions::defer_accept (TCP_DEFER_ACCEPT) ----

// Listens with defer_accept 30 s (TEST_DEFER_SECONDS, if set: that many) on TEST_DEFER_ON: "tcp" (127.0.0.1:0, "port N" to the
// master), "unix" (a path in the cwd) or "udp" (127.0.0.1:0); a failed listen() says "error E".
// Then answers each connection it accepts, at once, with "<id> <k>\n" (k: how many this worker
// has accepted so far, this one included), reads a line and closes.
WORKER_SCENARIO(defer_accept) {
  asio::io_context io;
  this_worker.start(io.get_executor());
  asio::co_spawn(io, [&io]() -> awaitable<void> {
    const char* seconds = std::getenv("TEST_DEFER_SECONDS");
    const ListenOptions deferred{.defer_accept = std::chrono::seconds(seconds ? std::atoi(seconds) : 30)};
    const std::string on = std::getenv("TEST_DEFER_ON") ? std::getenv("TEST_DEFER_ON") : "tcp";
    std::error_code ec;
    if (on == "unix") {
      std::tie(ec, std::ignore) = co_await this_worker.listen(
          local_stream::endpoint("defer-" + std::to_string(::getpid())), deferred, as_tuple_t{});
    } else if (on == "udp") {
      std::tie(ec, std::ignore) = co_await this_worker.listen(
          udp::endpoint(asio::ip::address_v4::loopback(), 0), deferred, as_tuple_t{});
    }
    if (on != "tcp") {
      co_await this_worker.send(Message("error " + std::to_string(ec.value())));
      co_return;
    }
    auto [lec, server] = co_await this_worker.listen(tcp::endpoint(asio::ip::address_v4::loopback(), 0), deferred,
                                                     as_tuple_t{});
    if (lec) {
      co_await this_worker.send(Message("error " + std::to_string(lec.value())));
      co_return;
    }
    co_await this_worker.send(Message("port " + std::to_string(server.local_endpoint().port())));
    for (int k = 1;; ++k) {
      auto [aec, s] = co_await server.accept(as_tuple_t{});
      if (aec) co_return;
      asio::co_spawn(io, [s = std::move(s), k]() mutable -> awaitable<void> {
        const std::string reply = std::to_string(this_worker.id()) + " " + std::to_string(k) + "\n";
        co_await asio::async_write(s, asio::buffer(reply), as_tuple_t{});
        std::string line;
        co_await asio::async_read_until(s, asio::dynamic_buffer(line), '\n', as_tuple_t{});
      }, asio::detached);
    }
  }, asio::detached);
  io.run();
  return 0;
}

namespace {

// Two workers listening with defer_accept; 8 clients connect and say nothing, then 8 connect
// and send a line. No worker accepts a silent one: each worker's answers to the speaking ones
// are 1, 2, ... in full. (Without the option the silent ones, first in the queue, would be
// accepted first and take the low numbers.)
template <class Policy>
void defer_accept_case() {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<Policy> master(io.get_executor());
    std::vector<std::shared_ptr<Worker>> workers;
    unsigned short port = 0;
    for (int i = 0; i < 2; ++i) {
      workers.push_back(co_await master.fork(scenario_env("defer_accept")));
      const Message m = co_await workers.back()->receive();
      REQUIRE_MESSAGE(m.data.rfind("port ", 0) == 0, m.data);
      port = static_cast<unsigned short>(std::stoi(m.data.substr(5)));
    }
    const tcp::endpoint where(asio::ip::address_v4::loopback(), port);
    std::vector<tcp::socket> silent, speaking;
    for (int i = 0; i < 8; ++i) {
      silent.emplace_back(io);
      co_await silent.back().async_connect(where, use_awaitable);
    }
    std::map<std::string, std::vector<int>> numbers;  // worker id -> the k of each answer
    for (int i = 0; i < 8; ++i) {
      speaking.emplace_back(io);
      co_await speaking.back().async_connect(where, use_awaitable);
      co_await asio::async_write(speaking.back(), asio::buffer("hi\n", 3), use_awaitable);
    }
    for (auto& s : speaking) {
      std::string reply;
      co_await asio::async_read_until(s, asio::dynamic_buffer(reply), '\n', use_awaitable);
      const auto space = reply.find(' ');
      REQUIRE_MESSAGE(space != std::string::npos, reply);
      numbers[reply.substr(0, space)].push_back(std::stoi(reply.substr(space + 1)));
    }
    for (auto& entry : numbers) {  // (no structured binding: clang 14 cannot capture one in CHECK_MESSAGE)
      std::vector<int>& ks = entry.second;
      std::sort(ks.begin(), ks.end());
      std::vector<int> expected(ks.size());
      std::iota(expected.begin(), expected.end(), 1);
      CHECK_MESSAGE(ks == expected, "worker ", entry.first, " accepted a silent connection first");
    }
    silent.clear();  // (their sessions, had any been accepted, end with them)
    speaking.clear();
    co_await master.disconnect();
  });
}

}  // namespace

TEST_CASE("ListenOptions::defer_accept: a connection reaches accept() once its client has sent something") {
  SUBCASE("RoundRobin") { defer_accept_case<RoundRobin>(); }
  SUBCASE("SharedSocket") { defer_accept_case<SharedSocket>(); }
  SUBCASE("ReusePort (every worker's socket has it)") { defer_accept_case<ReusePort>(); }
}

TEST_CASE("ListenOptions::defer_accept: a later worker asking otherwise listens on the first one's socket, and the log says so") {
  captured_log log;
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<RoundRobin> master(io.get_executor());
    std::vector<std::string> ports;
    for (const char* seconds : {"30", "30", "0"}) {
      Env env = scenario_env("defer_accept");
      env["TEST_DEFER_SECONDS"] = seconds;
      auto w = co_await master.fork(env);
      ports.push_back((co_await w->receive()).data);
      REQUIRE_MESSAGE(ports.back().rfind("port ", 0) == 0, ports.back());
    }
    CHECK(ports[1] == ports[0]);
    CHECK(ports[2] == ports[0]);
    co_await master.disconnect();
  });
  CHECK_MESSAGE(log.has("asks for defer_accept 0 s, but the listener was made with 30 s"), log.text);
  CHECK_MESSAGE(log.text.find("asks for defer_accept 30 s") == std::string::npos, log.text);  // the second one agreed
}

TEST_CASE("ListenOptions::defer_accept on a Unix path or a UDP address: listen() fails with EINVAL") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor());
    for (const char* on : {"unix", "udp"}) {
      Env env = scenario_env("defer_accept");
      env["TEST_DEFER_ON"] = on;
      auto w = co_await master.fork(env);
      const Message m = co_await w->receive();
      CHECK_MESSAGE(m.data == "error " + std::to_string(EINVAL), on, ": ", m.data);
    }
    co_await master.disconnect();
  });
}

TEST_CASE("the master refuses a Unix path with a NUL byte (an abstract name a worker did not check): EINVAL, nothing bound") {
  const auto dir = std::filesystem::temp_directory_path() / ("cocluster-test-nul-" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  detail::listen_request r;
  r.type = AddressType::unix_path;
  r.address = (dir / "x").string() + std::string(1, '\0') + "name";  // as the worker's cwd made it
  std::string bound;
  std::error_code ec;
  detail::unique_fd fd = detail::open_listener(r, bound, ec);
  CHECK(!fd);
  CHECK(ec == std::errc::invalid_argument);
  CHECK_FALSE(std::filesystem::exists(dir / "x"));  // the part before the NUL was not bound
  std::filesystem::remove_all(dir);
}

TEST_CASE("when the last worker closes its server the master closes the listener and the port is free") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    for (bool shared : {false, true}) {
      Master<RuntimePolicy> master(io.get_executor(), {},
                                   RuntimePolicy(shared ? Scheduling::shared : Scheduling::round_robin));
      auto c = co_await start(master, 2, listen_env("serve", "tcp4:127.0.0.1:0"));
      const auto port = port_of(c.reports[0]);
      co_await c.workers[0]->send({"close"});
      CHECK((co_await c.workers[0]->receive()).data == "closed");
      CHECK(co_await ask(tcp::endpoint(asio::ip::address_v4::loopback(), port)) == c.workers[1]->id());
      co_await c.workers[1]->send({"close"});
      CHECK((co_await c.workers[1]->receive()).data == "closed");
      // Both closed: nobody listens on the port, and we can take it.
      // (SO_REUSEADDR: our earlier connections left TIME_WAIT entries on the port; a listening
      // socket would still make bind fail.)
      tcp::acceptor again(io);
      again.open(tcp::v4());
      again.set_option(tcp::acceptor::reuse_address(true));
      std::error_code ec;
      again.bind(tcp::endpoint(asio::ip::address_v4::loopback(), port), ec);
      CHECK_MESSAGE(!ec, ec.message());
      co_await master.disconnect();
    }
  }, 60s);
}

TEST_CASE("workers listen on a Unix socket path relative to their cwd; the path is removed when they are gone") {
  const auto dir = std::filesystem::temp_directory_path() / ("cocluster-test-" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  const auto path = dir / "server.sock";
  run_bounded([&](asio::io_context& io) -> awaitable<void> {
    for (bool shared : {false, true}) {
      Settings settings;
      settings.cwd = dir.string();
      Master<RuntimePolicy> master(io.get_executor(), settings,
                                   RuntimePolicy(shared ? Scheduling::shared : Scheduling::round_robin));
      auto c = co_await start(master, 2, listen_env("serve", "unix:server.sock"));
      for (auto& r : c.reports) CHECK(r == "path " + path.string());
      Address a = co_await c.workers[0]->listening();
      CHECK(a.type == AddressType::unix_path);
      CHECK(a.address == path.string());
      auto served = co_await ask_many(local_stream::endpoint(path.string()), 20, 4);
      CHECK(served[1] + served[2] == 20);
      co_await master.disconnect();
      for (auto& w : c.workers) co_await w->exited();
      CHECK_FALSE(std::filesystem::exists(path));
    }
  }, 60s);
  std::filesystem::remove_all(dir);
}

TEST_CASE("UDP datagrams reach workers under both policies") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    for (bool shared : {false, true}) {
      Master<RuntimePolicy> master(io.get_executor(), {},
                                   RuntimePolicy(shared ? Scheduling::shared : Scheduling::round_robin));
      auto c = co_await start(master, 2, listen_env("serve", "udp4:127.0.0.1:0"));
      const auto port = port_of(c.reports[0]);
      CHECK(port_of(c.reports[1]) == port);
      Address a = co_await c.workers[1]->listening();
      CHECK(a.type == AddressType::udp4);
      CHECK(a.port == port);
      udp::socket client(io, udp::endpoint(asio::ip::address_v4::loopback(), 0));
      char buf[64];
      for (int i = 0; i < 10; ++i) {
        co_await client.async_send_to(asio::buffer("ping", 4), udp::endpoint(asio::ip::address_v4::loopback(), port),
                                      use_awaitable);
        udp::endpoint from;
        const std::size_t n = co_await client.async_receive_from(asio::buffer(buf), from, use_awaitable);
        const std::string reply(buf, n);
        CHECK((reply == "worker 1\n" || reply == "worker 2\n"));
      }
      co_await master.disconnect();
    }
  }, 60s);
}

TEST_CASE("IPv6 and listen({fd}) on a socket the master bound") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor());
    // IPv6 loopback, where the host has it.
    std::error_code ec;
    tcp::acceptor probe(io);
    probe.open(tcp::v6(), ec);
    if (!ec) probe.bind(tcp::endpoint(asio::ip::address_v6::loopback(), 0), ec);
    probe.close();
    if (!ec) {
      auto c = co_await start(master, 2, listen_env("serve", "tcp6:::1:0"));
      Address a = co_await c.workers[0]->listening();
      CHECK(a.type == AddressType::v6);
      CHECK(a.address == "::1");
      auto served = co_await ask_many(tcp::endpoint(asio::ip::address_v6::loopback(), port_of(c.reports[0])), 10, 2);
      CHECK(served[1] + served[2] == 10);
    }
    // A bound socket, not listening yet, open in the master: the worker names its fd.
    tcp::acceptor bound(io);
    bound.open(tcp::v4());
    bound.bind(tcp::endpoint(asio::ip::address_v4::loopback(), 0));
    const int fd = bound.native_handle();
    auto w = co_await master.fork(listen_env("serve", "fd:" + std::to_string(fd)));
    const auto port = port_of((co_await w->receive()).data);
    CHECK(port == bound.local_endpoint().port());
    CHECK(co_await ask(tcp::endpoint(asio::ip::address_v4::loopback(), port)) == w->id());
    co_await master.disconnect();
  }, 60s);
}

TEST_CASE("adopt() serves on a listener this process already has, without the master") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    auto server = this_worker.adopt(tcp::acceptor(io, tcp::endpoint(asio::ip::address_v4::loopback(), 0)));
    CHECK_FALSE(server.round_robin());
    tcp::socket client(io);
    co_await client.async_connect(server.local_endpoint(), use_awaitable);
    tcp::endpoint peer;
    tcp::socket accepted = co_await server.accept(peer);
    CHECK(peer == client.local_endpoint());
    CHECK(fd_flags(accepted) == "1 1 1");
    server.close();
    auto [ec, none] = co_await server.accept(as_tuple_t{});
    CHECK(ec);
  });
}

namespace {
// Each worker's connections, whether it accepted them or the master handed them over, are
// close-on-exec (a child the worker starts must not hold them open) and non-blocking, and Asio
// knows it (no ioctl at the first operation); a synchronous read on one still waits for data.
// Their executor is the io_context's own, tracked in place (tracked_in_place()).
template <class Policy>
awaitable<void> connections_are_cloexec_and_nonblocking(asio::io_context& io, std::string spec) {
  Master<Policy> master(io.get_executor());
  auto c = co_await start(master, 2, listen_env("serve", spec));
  for (auto& w : c.workers) co_await w->listening();
  for (int i = 0; i < 8; ++i) {
    std::string reply;
    if (spec.rfind("unix:", 0) == 0) reply = co_await ask_flags(local_stream::endpoint(spec.substr(5)));
    else reply = co_await ask_flags(tcp::endpoint(asio::ip::address_v4::loopback(), port_of(c.reports[0])));
    CHECK_MESSAGE(reply.find(" flags 1 1 1 tracked 1\nread ok\n") != std::string::npos, reply);
  }
  co_await master.disconnect();
}
}  // namespace

TEST_CASE("a worker's connections are close-on-exec and non-blocking, and a synchronous read on one waits") {
  const std::string unix_path = "cloexec-test-" + std::to_string(::getpid()) + ".sock";
  SUBCASE("round robin") {
    run_bounded([](asio::io_context& io) { return connections_are_cloexec_and_nonblocking<RoundRobin>(io, "tcp4:127.0.0.1:0"); }, 60s);
  }
  SUBCASE("shared socket") {
    run_bounded([](asio::io_context& io) { return connections_are_cloexec_and_nonblocking<SharedSocket>(io, "tcp4:127.0.0.1:0"); }, 60s);
  }
  SUBCASE("reuseport") {
    run_bounded([](asio::io_context& io) { return connections_are_cloexec_and_nonblocking<ReusePort>(io, "tcp4:127.0.0.1:0"); }, 60s);
  }
  SUBCASE("shared socket on a Unix socket") {
    run_bounded([&](asio::io_context& io) { return connections_are_cloexec_and_nonblocking<SharedSocket>(io, "unix:" + unix_path); }, 60s);
  }
}

TEST_CASE("adopt(): an accept started before any client waits without blocking the worker's loop") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    tcp::acceptor blocking(io, tcp::endpoint(asio::ip::address_v4::loopback(), 0));  // Asio opens it blocking
    REQUIRE((::fcntl(blocking.native_handle(), F_GETFL) & O_NONBLOCK) == 0);
    auto server = this_worker.adopt(std::move(blocking));
    std::optional<std::string> accepted;
    asio::co_spawn(io, [&]() -> awaitable<void> {
      tcp::socket s = co_await server.accept();
      accepted = fd_flags(s);
    }, asio::detached);
    tcp::socket client(io);  // runs only if the accept above did not block the thread
    co_await client.async_connect(server.local_endpoint(), use_awaitable);
    co_await wait_until([&] { return accepted.has_value(); });
    CHECK(*accepted == "1 1 1");
  });
}

TEST_CASE("no fd leaks in the master after 10,000 round-robin hand-offs") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<RoundRobin> master(io.get_executor());
    auto c = co_await start(master, 2, listen_env("serve", "tcp4:127.0.0.1:0"));
    for (auto& w : c.workers) co_await w->listening();
    const tcp::endpoint where(asio::ip::address_v4::loopback(), port_of(c.reports[0]));
    co_await ask_many(where, 100, 8);  // warm up: Asio's own lazily opened fds
    const int before = open_fd_count();
    auto served = co_await ask_many(where, 10000, 32);
    CHECK(served[1] + served[2] == 10000);
    CHECK(open_fd_count() == before);
    co_await master.disconnect();
  }, 240s);
}

TEST_CASE("RuntimePolicy reads COCLUSTER_SCHED_POLICY, then NODE_CLUSTER_SCHED_POLICY, and rejects other values") {
  struct restore_env {
    ~restore_env() {
      ::unsetenv("COCLUSTER_SCHED_POLICY");
      ::unsetenv("NODE_CLUSTER_SCHED_POLICY");
    }
  } restore;
  ::unsetenv("COCLUSTER_SCHED_POLICY");
  ::unsetenv("NODE_CLUSTER_SCHED_POLICY");
  auto read_from = [](const RuntimePolicy& p) {
    const char* v = p.environment_variable();
    return std::string(v ? v : "-");
  };
  CHECK(RuntimePolicy().resolve() == Scheduling::round_robin);  // Node's default
  CHECK(read_from(RuntimePolicy()) == "-");
  ::setenv("NODE_CLUSTER_SCHED_POLICY", "none", 1);
  CHECK(RuntimePolicy().resolve() == Scheduling::shared);
  CHECK(read_from(RuntimePolicy()) == "NODE_CLUSTER_SCHED_POLICY");
  ::setenv("COCLUSTER_SCHED_POLICY", "rr", 1);  // ours first
  CHECK(RuntimePolicy().resolve() == Scheduling::round_robin);
  CHECK(read_from(RuntimePolicy()) == "COCLUSTER_SCHED_POLICY");
  CHECK(RuntimePolicy(Scheduling::shared).resolve() == Scheduling::shared);  // an explicit choice wins
  CHECK(read_from(RuntimePolicy(Scheduling::shared)) == "-");
  ::setenv("COCLUSTER_SCHED_POLICY", "roundrobin", 1);
  CHECK_THROWS_WITH_AS(RuntimePolicy().resolve(), "COCLUSTER_SCHED_POLICY=roundrobin: expected rr or none, or beyond Node: sticky, leastconn or reuseport",
                       std::invalid_argument);
  asio::io_context io;
  CHECK_THROWS_AS(Master<RuntimePolicy>(io.get_executor()), std::invalid_argument);  // frozen, and checked, here
}

TEST_CASE("scheduling_name and parse_scheduling: one name per Scheduling, each read back") {
  for (auto s : {Scheduling::round_robin, Scheduling::shared, Scheduling::sticky, Scheduling::least_connections,
                 Scheduling::reuse_port})
    CHECK(parse_scheduling(scheduling_name(s)) == s);
  CHECK(std::string_view(scheduling_name(Scheduling::round_robin)) == "rr");  // Node's spellings
  CHECK(std::string_view(scheduling_name(Scheduling::shared)) == "none");
  CHECK_FALSE(parse_scheduling("roundrobin"));
  CHECK_FALSE(parse_scheduling(""));
}

TEST_CASE("RuntimePolicy::has_window: the policies that hand connections off have one, SharedSocket and ReusePort not") {
  for (auto s : {Scheduling::round_robin, Scheduling::sticky, Scheduling::least_connections})
    CHECK(RuntimePolicy(s).has_window());
  for (auto s : {Scheduling::shared, Scheduling::reuse_port}) CHECK_FALSE(RuntimePolicy(s, 4).has_window());
}

TEST_CASE("a Unix socket path longer than sun_path works through its shorter relative form") {
  // /tmp/<93 characters>/server.sock is 110 characters, over sun_path's 108; relative to /tmp
  // (the master's cwd here) and to the directory itself (the workers' cwd) it fits.
  const std::string name = "cocluster-" + std::to_string(::getpid()) + "-" + std::string(93, 'x');
  const std::string short_name = name.substr(0, 93);
  const auto dir = std::filesystem::path("/tmp") / short_name;
  std::filesystem::create_directories(dir);
  const auto old_cwd = std::filesystem::current_path();
  std::filesystem::current_path("/tmp");
  run_bounded([&](asio::io_context& io) -> awaitable<void> {
    for (bool shared : {false, true}) {
      Settings settings;
      settings.cwd = dir.string();
      Master<RuntimePolicy> master(io.get_executor(), settings,
                                   RuntimePolicy(shared ? Scheduling::shared : Scheduling::round_robin));
      auto c = co_await start(master, 2, listen_env("serve", "unix:server.sock"));
      for (auto& r : c.reports) CHECK_MESSAGE(r.rfind("path ", 0) == 0, r);
      Address a = co_await c.workers[0]->listening();
      CHECK(a.address == (dir / "server.sock").string());
      auto served = co_await ask_many(local_stream::endpoint(short_name + "/server.sock"), 10, 2);
      CHECK(served[1] + served[2] == 10);
      co_await master.disconnect();
      for (auto& w : c.workers) co_await w->exited();
      CHECK_FALSE(std::filesystem::exists(dir / "server.sock"));
    }
  }, 60s);
  std::filesystem::current_path(old_cwd);
  std::filesystem::remove_all(dir);
}

// ---- a policy written outside the library ----

namespace {

// Every connection to the worker with the lowest id that has none in hand (a policy that only
// chooses: HandoffListener does the accepting, the acknowledgements and the hand-backs).
class lowest_id_listener final : public HandoffListener {
 public:
  using HandoffListener::HandoffListener;

 private:
  int choose() override {
    for (auto& [id, m] : members())
      if (m.in_flight == 0) return id;
    return 0;
  }
};

struct LowestId {
  std::shared_ptr<Listener> make_listener(ListenerArgs args) const {
    return std::make_shared<lowest_id_listener>(std::move(args));
  }
};

static_assert(cocluster::Policy<LowestId>);
static_assert(cocluster::Policy<RoundRobin> && cocluster::Policy<SharedSocket> && cocluster::Policy<RuntimePolicy>);
static_assert(!cocluster::Policy<int>);

}  // namespace

namespace {

// A user's policy for TCP only: it throws for a Unix path.
struct TcpOnly {
  std::shared_ptr<Listener> make_listener(ListenerArgs args) const {
    if (args.address.type == AddressType::unix_path)
      throw std::invalid_argument("TcpOnly serves TCP, not " + args.address.address);
    return RoundRobin{}.make_listener(std::move(args));
  }
};

}  // namespace

TEST_CASE("a policy that throws for an address: the worker's listen() fails with ENOTSUP, the log says why, the master carries on") {
  captured_log log;
  const auto dir = std::filesystem::temp_directory_path() / ("cocluster-test-tcponly-" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  const auto path = dir / "server.sock";
  const std::string real_path = (std::filesystem::canonical(dir) / "server.sock").string();
  run_bounded([&](asio::io_context& io) -> awaitable<void> {
    Settings settings;
    settings.cwd = dir.string();
    Master<TcpOnly> master(io.get_executor(), settings);
    auto c = co_await start(master, 1, listen_env("serve", "unix:server.sock"));
    CHECK_MESSAGE(c.reports[0].rfind("error " + std::to_string(EOPNOTSUPP) + " ", 0) == 0, c.reports[0]);
    CHECK_FALSE(std::filesystem::exists(path));  // the path the master bound for it is gone
    // Again: the same error, not EADDRINUSE from a path left behind.
    co_await c.workers[0]->send({"listen"});
    const std::string again = (co_await c.workers[0]->receive()).data;
    CHECK_MESSAGE(again.rfind("error " + std::to_string(EOPNOTSUPP) + " ", 0) == 0, again);
    // TCP is served.
    auto d = co_await start(master, 1, listen_env("serve", "tcp4:127.0.0.1:0"));
    CHECK(co_await ask(tcp::endpoint(asio::ip::address_v4::loopback(), port_of(d.reports[0]))) == d.workers[0]->id());
    co_await master.disconnect();
  }, 60s);
  std::filesystem::remove_all(dir);
  // (The worker resolved the path from its cwd: the directory's real path, if TMPDIR is a link.)
  CHECK_MESSAGE(log.has("the policy threw: TcpOnly serves TCP, not " + real_path + "; listen() fails with ENOTSUP"),
                log.text);
}

TEST_CASE("Sticky on a Unix socket: it serves, and the log says every connection goes to one worker") {
  captured_log log;
  const auto dir = std::filesystem::temp_directory_path() / ("cocluster-test-sticky-" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  run_bounded([&](asio::io_context& io) -> awaitable<void> {
    Settings settings;
    settings.cwd = dir.string();
    Master<Sticky> master(io.get_executor(), settings);
    auto c = co_await start(master, 2, listen_env("serve", "unix:server.sock"));
    auto served = co_await ask_many(local_stream::endpoint((dir / "server.sock").string()), 10, 1);
    CHECK(served.size() == 1);  // one worker answered all
    co_await master.disconnect();
  }, 60s);
  std::filesystem::remove_all(dir);
  CHECK_MESSAGE(log.has("Sticky on a Unix socket sends every connection to one worker"), log.text);
}

// Listens on TEST_LISTEN and reports "port N", but accepts nothing until the master says "go";
// then closes its channel (Node's process.disconnect(); on_disconnect does not exit) and
// serves as "serve" does. What it was handed before can no longer be acknowledged.
// Listens on TEST_LISTEN, reports "port N" and waits for the master's "go": the server then;
// none if anything else comes (or the channel ends).
awaitable<std::optional<Server<tcp>>> listen_then_wait_for_go() {
  const target t = parse_target(std::getenv("TEST_LISTEN"));
  auto server = co_await this_worker.listen(tcp::endpoint(asio::ip::make_address(t.address), t.port));
  co_await this_worker.send({"port " + std::to_string(server.local_endpoint().port())});
  auto [ec, m] = co_await this_worker.receive(as_tuple_t{});
  if (ec || m.data != "go") co_return std::nullopt;
  co_return std::move(server);
}

WORKER_SCENARIO(close_channel_then_accept) {
  asio::io_context io;
  this_worker.start(io.get_executor());
  this_worker.on_disconnect([] {});
  asio::co_spawn(io, []() -> awaitable<void> {
    auto server = co_await listen_then_wait_for_go();
    if (!server) co_return;
    this_worker.close_channel();
    co_await accept_loop(*server);  // ends when the channel's end closes the server
  }, asio::detached);
  io.run();
  return 0;
}

TEST_CASE("a worker that closed its channel never takes a connection it was handed: the master gives it to another worker") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<LowestId> master(io.get_executor());
    auto first = co_await start(master, 1, listen_env("close_channel_then_accept", "tcp4:127.0.0.1:0"));
    auto second = co_await start(master, 1, listen_env("serve", "tcp4:127.0.0.1:0"));
    REQUIRE(port_of(second.reports[0]) == port_of(first.reports[0]));
    const tcp::endpoint where(asio::ip::address_v4::loopback(), port_of(first.reports[0]));
    co_await first.workers[0]->listening();
    co_await second.workers[0]->listening();
    // A goes to worker 1, which holds it unacknowledged; so B goes to worker 2, and once B is
    // answered, A's hand-off (accepted and sent before B's) is with worker 1.
    tcp::socket a(io);
    co_await a.async_connect(where, use_awaitable);
    co_await asio::async_write(a, asio::buffer("hi\n", 3), use_awaitable);
    CHECK(co_await ask(where) == second.workers[0]->id());
    co_await first.workers[0]->send({"go"});
    std::string reply;
    co_await asio::async_read(a, asio::dynamic_buffer(reply), as_tuple_t{});  // to EOF
    CHECK(reply == "worker " + std::to_string(second.workers[0]->id()) + "\n");
    co_await master.disconnect();
  });
}

TEST_CASE("the master closes a stopped worker's channel: no connection waits for it, the other worker answers each") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<RoundRobin> master(io.get_executor(), {}, RoundRobin{.window = 1});
    auto c = co_await start(master, 2, listen_env("serve", "tcp4:127.0.0.1:0"));
    const tcp::endpoint where(asio::ip::address_v4::loopback(), port_of(c.reports[0]));
    for (auto& w : c.workers) co_await w->listening();
    REQUIRE(::kill(c.workers[0]->pid(), SIGSTOP) == 0);
    c.workers[0]->close_channel();  // it cannot read what the master writes until SIGCONT
    for (int i = 0; i < 4; ++i) CHECK(co_await ask(where) == c.workers[1]->id());
    REQUIRE(::kill(c.workers[0]->pid(), SIGCONT) == 0);
    co_await master.disconnect();
  });
}

// Listens on TEST_LISTEN and reports "port N"; on "go" shuts the reading half of its channel
// (shutdown(SHUT_RD): the master's writes fail with EPIPE from then on) and blocks its loop,
// so it neither reads nor ends its channel until it is killed.
WORKER_SCENARIO(shut_reading_then_block) {
  asio::io_context io;
  this_worker.start(io.get_executor());
  asio::co_spawn(io, []() -> awaitable<void> {
    auto server = co_await listen_then_wait_for_go();
    if (!server) co_return;
    ::shutdown(cocluster::detail::worker_channel_fd, SHUT_RD);  // (the runtime unset COCLUSTER_CHANNEL_FD)
    ::sleep(120);  // (killed by the test long before)
  }, asio::detached);
  io.run();
  return 0;
}

TEST_CASE("a hand-off the master cannot write to a worker (EPIPE: it shut its reading) goes to another worker at once") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<LowestId> master(io.get_executor());
    auto first = co_await start(master, 1, listen_env("shut_reading_then_block", "tcp4:127.0.0.1:0"));
    auto second = co_await start(master, 1, listen_env("serve", "tcp4:127.0.0.1:0"));
    REQUIRE(port_of(second.reports[0]) == port_of(first.reports[0]));
    const tcp::endpoint where(asio::ip::address_v4::loopback(), port_of(first.reports[0]));
    auto& shut = first.workers[0];
    co_await shut->listening();
    co_await second.workers[0]->listening();
    co_await shut->send({"go"});
    // Until the master's writes to worker 1 fail (its shutdown is asynchronous to us); each
    // probe is a message it never reads. Worker 1 stays a member of the listener meanwhile.
    asio::steady_timer pause(io);
    for (;;) {
      auto [ec] = co_await shut->send({"probe"}, as_tuple_t{});
      if (ec) break;
      pause.expires_after(10ms);
      co_await pause.async_wait(use_awaitable);
    }
    // LowestId names worker 1 for each: its hand-off cannot be written, so it goes back and
    // worker 2 answers, while worker 1 lives on (before, each waited for worker 1's end).
    for (int i = 0; i < 3; ++i) CHECK(co_await ask(where) == second.workers[0]->id());
    shut->kill();
    (void)co_await shut->exited();
    co_await master.disconnect();
  });
}

// Listens 1,026 times on 127.0.0.1:0, keeping each server (Node's index makes each a listener
// of its own), and reports "<i>:<errno> " for each listen that failed; then waits.
WORKER_SCENARIO(listen_many) {
  asio::io_context io;
  this_worker.start(io.get_executor());
  asio::co_spawn(io, []() -> awaitable<void> {
    std::vector<Server<tcp>> servers;
    std::string report;
    for (int i = 0; i < 1026; ++i) {
      auto [ec, server] = co_await this_worker.listen(tcp::endpoint(asio::ip::address_v4::loopback(), 0), {}, as_tuple_t{});
      if (ec) report += std::to_string(i) + ":" + std::to_string(ec.value()) + " ";
      else servers.push_back(std::move(server));
    }
    co_await this_worker.send({report});
    (void)co_await this_worker.receive(as_tuple_t{});
  }, asio::detached);
  io.run();
  return 0;
}

TEST_CASE("a worker holding 1,024 listeners gets EMFILE for more, the master says so once, and killing it is fine") {
  // The master holds a socket per listener: its soft limit must be above them (raise_fd_limit
  // raises it to the hard one at the fork).
  rlimit limit{};
  REQUIRE(::getrlimit(RLIMIT_NOFILE, &limit) == 0);
  const rlim_t needed = detail::listener_table::max_servers_per_worker + 256;
  if (limit.rlim_max != RLIM_INFINITY && limit.rlim_max < needed) {  // the machine's setting: said, not failed
    MESSAGE("the hard RLIMIT_NOFILE is ", limit.rlim_max, ", below the ", needed, " this test needs: not checked");
    return;
  }
  captured_log log;
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<RoundRobin> master(io.get_executor());
    auto w = co_await master.fork(scenario_env("listen_many"));
    CHECK((co_await w->receive()).data == "1024:" + std::to_string(EMFILE) + " 1025:" + std::to_string(EMFILE) + " ");
    w->kill();  // the master leaves every listener it holds
    (void)co_await w->exited();
    CHECK(master.workers().empty());
    co_await master.disconnect();
  }, 60s);
  const std::string line = "holds 1024 listeners, the most one worker may";
  const auto first = log.text.find(line);
  CHECK_MESSAGE(first != std::string::npos, log.text);
  CHECK_MESSAGE(log.text.find(line, first + 1) == std::string::npos, log.text);  // once
}

TEST_CASE("a policy written outside the library: every connection to the lowest worker id, then to the next when it leaves") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<LowestId> master(io.get_executor());
    auto c = co_await start(master, 3, listen_env("serve", "tcp4:127.0.0.1:0"));
    const tcp::endpoint where(asio::ip::address_v4::loopback(), port_of(c.reports[0]));
    for (auto& w : c.workers) co_await w->listening();
    auto served = co_await ask_many(where, 30, 1);
    CHECK(served == std::map<int, int>{{1, 30}});
    co_await c.workers[0]->send({"close"});
    CHECK((co_await c.workers[0]->receive()).data == "closed");
    served = co_await ask_many(where, 30, 1);
    CHECK(served == std::map<int, int>{{2, 30}});
    co_await master.disconnect();
  });
}
