// The dispatch policies beyond Node: a user's Dispatch<F>, Sticky (IPv4 and IPv6),
// LeastConnections and ReusePort. Real workers (the `serve` scenario of test_listen.cpp: "port N", then
// "worker <id>\n" per connection, or `hold` below) and clients bound to 127.0.0.x addresses.
#include "cocluster/policy/dispatch.hpp"

#include <arpa/inet.h>
#include <asio/strand.hpp>
#include <asio/use_future.hpp>
#include <dirent.h>
#include <doctest/doctest.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <functional>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <thread>

#include "cocluster/cocluster.hpp"
#include "cocluster/detail/async_latch.hpp"
#include "support.hpp"
#include "worker_scenario.hpp"

using namespace cocluster;
using namespace test;
using asio::ip::tcp;
using as_tuple_t = cocluster::detail::as_tuple_t<asio::use_awaitable_t<>>;

namespace {

Env serve_on_port_zero() {
  Env env = scenario_env("serve");
  env["TEST_LISTEN"] = "tcp4:127.0.0.1:0";
  return env;
}

asio::ip::address_v4 loopback(int last_octet) {
  return asio::ip::address_v4((127u << 24) | static_cast<unsigned>(last_octet));
}

// The port of a worker's first message, "port N".
unsigned short reported_port(const std::string& report) {
  REQUIRE_MESSAGE(report.rfind("port ", 0) == 0, report);
  return static_cast<unsigned short>(std::stoi(report.substr(5)));
}

// The worker's side of reported_port(): listens on 127.0.0.1:0 and tells the master "port N".
awaitable<cocluster::Server<tcp>> listen_and_report_port() {
  auto server = co_await this_worker.listen(tcp::endpoint(asio::ip::address_v4::loopback(), 0));
  co_await this_worker.send(Message("port " + std::to_string(server.local_endpoint().port())));
  co_return server;
}

// Returns once `done()` holds, looking every 5 ms (a wait for an event, not a timing assumption;
// run_bounded bounds it): for what the master learns from messages the test does not see.
awaitable<void> poll_until(std::function<bool()> done) {
  asio::steady_timer poll(co_await asio::this_coro::executor);
  while (!done()) {
    poll.expires_after(5ms);
    co_await poll.async_wait(use_awaitable);
  }
}

// One request from source address `from`: the id of the worker that answered (0: none).
awaitable<int> ask_from(asio::ip::address_v4 from, tcp::endpoint where) {
  tcp::socket s(co_await asio::this_coro::executor);
  s.open(tcp::v4());
  s.bind(tcp::endpoint(from, 0));
  co_await s.async_connect(where, use_awaitable);
  co_await asio::async_write(s, asio::buffer("hi\n", 3), use_awaitable);
  std::string reply;
  co_await asio::async_read(s, asio::dynamic_buffer(reply), as_tuple_t{});  // to EOF
  if (reply.rfind("worker ", 0) != 0) co_return 0;
  co_return std::stoi(reply.substr(7));
}

// `per_source` requests from each of 127.0.0.1 .. 127.0.0.<sources>, `concurrency` at a time:
// for each source's last octet, the worker ids that answered it and how often.
awaitable<std::map<int, std::map<int, int>>> ask_from_sources(tcp::endpoint where, int sources, int per_source,
                                                              int concurrency) {
  std::map<int, std::map<int, int>> served;
  const int total = sources * per_source;
  int next = 0, done = 0;
  std::exception_ptr failure;
  auto ex = co_await asio::this_coro::executor;
  auto one_client = [&]() -> awaitable<void> {
    while (next < total) {
      const int octet = 1 + next++ % sources;
      ++served[octet][co_await ask_from(loopback(octet), where)];
    }
  };
  for (int i = 0; i < concurrency; ++i)
    asio::co_spawn(ex, one_client(), [&](std::exception_ptr e) {
      if (e) failure = e;
      ++done;
    });
  co_await poll_until([&] { return done == concurrency; });  // a wait for the clients, not a timing assumption
  if (failure) std::rethrow_exception(failure);
  co_return served;
}

// `n` connections to `where` that say "hold" and are answered by `w` (a "hold" worker, the
// only one listening), which keeps them open: returned once `w` has said "holding n" and the
// master has its report of them.
awaitable<std::vector<tcp::socket>> held_by(Worker& w, tcp::endpoint where, int n) {
  std::vector<tcp::socket> held;
  for (int i = 0; i < n; ++i) {
    tcp::socket s(co_await asio::this_coro::executor);
    co_await s.async_connect(where, use_awaitable);
    co_await asio::async_write(s, asio::buffer("hold\n", 5), use_awaitable);
    std::string line;
    co_await asio::async_read_until(s, asio::dynamic_buffer(line), '\n', use_awaitable);
    REQUIRE(line == "worker " + std::to_string(w.id()) + "\n");
    held.push_back(std::move(s));
  }
  const Message holding = co_await w.receive();
  CHECK(holding.data == "holding " + std::to_string(n));
  // Its report comes at the end of a turn of its loop, in no order against "holding n".
  co_await poll_until([&] { return w.open_connections() == static_cast<std::uint32_t>(n); });
  co_return held;
}

// `n` clients connect to `where` and send "hi", one after another and synchronously: the master
// (this thread's loop) does not run meanwhile, so it accepts them in one burst.
std::vector<tcp::socket> connect_burst(asio::io_context& io, tcp::endpoint where, int n) {
  std::vector<tcp::socket> sockets;
  for (int i = 0; i < n; ++i) {
    tcp::socket& s = sockets.emplace_back(io);
    s.connect(where);
    asio::write(s, asio::buffer("hi\n", 3));
  }
  return sockets;
}

// The answers to a burst, each read to EOF as it comes: how many of each reply; `first` is set
// at the first one, `all` once every socket has answered or ended.
struct burst_answers {
  explicit burst_answers(asio::io_context& io, std::vector<tcp::socket>& sockets)
      : first(io.get_executor()), all(io.get_executor()), expected(sockets.size()) {
    for (auto& s : sockets)
      asio::co_spawn(io, [this, &s]() -> awaitable<void> {
        std::string reply;
        co_await asio::async_read(s, asio::dynamic_buffer(reply), as_tuple_t{});
        ++by_reply[reply];
        first.set();
        if (++answered == expected) all.set();
      }, asio::detached);
  }
  std::map<std::string, int> by_reply;
  cocluster::detail::async_latch<> first, all;
  std::size_t expected, answered = 0;
};

template <class Policy>
awaitable<std::pair<std::vector<std::shared_ptr<Worker>>, tcp::endpoint>> start_serving(Master<Policy>& master, int n,
                                                                                        Env env = serve_on_port_zero()) {
  std::vector<std::shared_ptr<Worker>> workers;
  for (int i = 0; i < n; ++i) workers.push_back(co_await master.fork(env));
  unsigned short port = 0;
  for (auto& w : workers) {
    Message m = co_await w->receive();
    port = reported_port(m.data);
    co_await w->listening();
  }
  co_return std::pair{std::move(workers), tcp::endpoint(loopback(1), port)};
}

// A user's routing function: the client 127.0.0.N goes to worker N (if it is live).
struct by_last_octet {
  int operator()(const Remote& remote, const HandoffListener::Members& live) const {
    if (!remote.address().is_v4() || remote.port() == 0) return 0;
    const int id = remote.address().to_v4().to_bytes()[3];
    return live.count(id) ? id : 0;
  }
};

static_assert(cocluster::Policy<Dispatch<by_last_octet>> && cocluster::Policy<Sticky> &&
              cocluster::Policy<LeastConnections> && cocluster::Policy<ReusePort>);

// Reads one line from `s` and answers "worker <id>\n": the line ("" if it could not be read).
awaitable<std::string> answer_with_id(tcp::socket& s) {
  std::string line;
  auto [rec, n] = co_await asio::async_read_until(s, asio::dynamic_buffer(line), '\n', as_tuple_t{});
  if (rec) co_return std::string();
  const std::string reply = "worker " + std::to_string(this_worker.id()) + "\n";
  co_await asio::async_write(s, asio::buffer(reply), as_tuple_t{});
  co_return line;
}

// Answers "worker <id>\n" to the first line of each connection `server` accepts, then closes
// it; until the server closes.
awaitable<void> answer_each(cocluster::Server<tcp>& server) {
  auto ex = co_await asio::this_coro::executor;
  for (;;) {
    auto [ec, socket] = co_await server.accept(as_tuple_t{});
    if (ec) co_return;
    asio::co_spawn(ex, [s = std::move(socket)]() mutable -> awaitable<void> { co_await answer_with_id(s); },
                   asio::detached);
  }
}

// Answers "worker <id>\n" to each line "hi" (then closes) or "hold" (then keeps the connection
// open); after the TEST_HOLD-th held connection, tells the master "holding N".
awaitable<void> hold_worker() {
  auto ex = co_await asio::this_coro::executor;
  auto server = co_await listen_and_report_port();
  const std::size_t hold = std::stoul(std::getenv("TEST_HOLD"));
  auto held = std::make_shared<std::vector<tcp::socket>>();
  for (;;) {
    auto [ec, socket] = co_await server.accept(as_tuple_t{});
    if (ec) co_return;
    asio::co_spawn(ex, [s = std::move(socket), held, hold]() mutable -> awaitable<void> {
      if (co_await answer_with_id(s) != "hold\n") co_return;
      held->push_back(std::move(s));
      if (held->size() == hold) co_await this_worker.send(Message("holding " + std::to_string(hold)));
    }, asio::detached);
  }
}

}  // namespace

WORKER_SCENARIO(hold) {
  asio::io_context io;
  this_worker.start(io.get_executor());
  asio::co_spawn(io, hold_worker(), asio::detached);
  io.run();
  return 0;
}

namespace {

// Accepts TEST_BLOCK_AFTER connections, tells the master "accepted N" and blocks its event loop
// (a synchronous read of the last one) until that connection's client writes a line; then
// answers "worker <id>\n" to the first line of each later connection and closes it, keeping the
// first N open. Its accept is always waiting (the "port N" message goes without a wait), so a
// batch of N hand-offs is accepted inside its delivery, in one turn of the loop: the N acks are
// written at once, and the report of the N connections, posted for the end of that turn,
// cannot go until the loop runs again.
awaitable<void> block_after_accepting_worker() {
  auto server = co_await this_worker.listen(tcp::endpoint(asio::ip::address_v4::loopback(), 0));
  this_worker.send(Message("port " + std::to_string(server.local_endpoint().port())), [](std::error_code) {});
  const std::size_t n = std::stoul(std::getenv("TEST_BLOCK_AFTER"));
  std::vector<tcp::socket> first;
  while (first.size() < n) {
    auto [ec, socket] = co_await server.accept(as_tuple_t{});
    if (ec) co_return;
    first.push_back(std::move(socket));
  }
  this_worker.send(Message("accepted " + std::to_string(n)), [](std::error_code) {});  // written now
  std::string go;
  std::error_code blocked;
  asio::read_until(first.back(), asio::dynamic_buffer(go), '\n', blocked);  // the loop stops here
  co_await answer_each(server);
}

}  // namespace

WORKER_SCENARIO(block_after_accepting) {
  asio::io_context io;
  this_worker.start(io.get_executor());
  asio::co_spawn(io, block_after_accepting_worker(), asio::detached);
  io.run();
  return 0;
}

namespace {

// A worker on the same port as the one that reported `report` ("port N"), listening, that
// answers each connection and closes it (hold_worker, never holding).
template <class Policy>
awaitable<std::shared_ptr<Worker>> fork_second_on(Master<Policy>& master, const std::string& report) {
  Env env = scenario_env("hold");
  env["TEST_HOLD"] = "1000";
  std::shared_ptr<Worker> second = co_await master.fork(env);
  const Message first = co_await second->receive();  // (g++ 12: no co_await inside CHECK in a template)
  CHECK(first.data == report);
  co_await second->listening();
  co_return second;
}

}  // namespace

TEST_CASE("a user-written Dispatch function routes each connection by the client's address") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<Dispatch<by_last_octet>> master(io.get_executor(), {}, Dispatch(by_last_octet{}));
    auto [workers, where] = co_await start_serving(master, 3);
    auto served = co_await ask_from_sources(where, 3, 20, 6);
    CHECK(served == std::map<int, std::map<int, int>>{{1, {{1, 20}}}, {2, {{2, 20}}}, {3, {{3, 20}}}});
    co_await master.disconnect();
  });
}

TEST_CASE("Dispatch with a lambda: a connection for a worker that is not live waits until one is") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    // Clients from 127.0.0.2 belong to worker 2, which does not exist until forked below.
    auto route = [](const Remote& r, const HandoffListener::Members&) { return r.address().to_v4().to_bytes()[3] == 2 ? 2 : 1; };
    Master<Dispatch<decltype(route)>> master(io.get_executor(), {}, Dispatch(route));
    auto [workers, where] = co_await start_serving(master, 1);
    int answered_by = -1;
    asio::co_spawn(io, ask_from(loopback(2), where), [&](std::exception_ptr e, int id) { answered_by = e ? -2 : id; });
    auto first = co_await ask_from_sources(where, 1, 5, 1);  // 127.0.0.1 is served meanwhile
    CHECK(first == std::map<int, std::map<int, int>>{{1, {{1, 5}}}});
    CHECK(answered_by == -1);  // still waiting: worker 2 is not there
    auto second = co_await master.fork(serve_on_port_zero());
    (void)co_await second->receive();
    co_await poll_until([&] { return answered_by != -1; });
    CHECK(answered_by == 2);
    co_await master.disconnect();
  });
}

namespace {

// A worker that breaks the protocol while a hand-off waits, unread, in its channel. It listens
// (reporting "port N"), then accepts two connections: on the first (the trigger) a thread of
// its own waits for a byte and then writes a packet that is no frame into the channel; on the
// second it tells the master "accepted 2" and blocks its event loop in a synchronous read of a
// line. Once that line comes it closes both and answers "worker <id>\n" to the first line of
// each later connection, among them the hand-offs that arrived while it was blocked.
awaitable<void> breaks_protocol_worker(int channel, std::thread& garbage) {
  auto server = co_await listen_and_report_port();
  auto [tec, trigger] = co_await server.accept(as_tuple_t{});
  auto [bec, block] = co_await server.accept(as_tuple_t{});
  if (tec || bec) co_return;
  garbage = std::thread([fd = trigger.native_handle(), channel] {
    pollfd p{fd, POLLIN, 0};
    while (::poll(&p, 1, -1) < 0) {
    }
    ::send(channel, "not a cocluster frame", 21, MSG_NOSIGNAL);
  });
  this_worker.send(Message("accepted 2"), [](std::error_code) {});  // written now
  std::string go;
  std::error_code blocked;
  asio::read_until(block, asio::dynamic_buffer(go), '\n', blocked);  // the loop stops here
  garbage.join();  // (it has written: the trigger came before the line)
  trigger.close();
  block.close();
  co_await answer_each(server);
}

}  // namespace

WORKER_SCENARIO(breaks_protocol_holding_a_handoff) {
  const int channel = std::stoi(std::getenv("COCLUSTER_CHANNEL_FD"));  // (start() takes it out of the environment)
  asio::io_context io;
  this_worker.start(io.get_executor());
  std::thread garbage;
  asio::co_spawn(io, breaks_protocol_worker(channel, garbage), asio::detached);
  io.run();
  if (garbage.joinable()) garbage.join();
  return 0;
}

TEST_CASE("a worker that breaks the protocol keeps the hand-offs it takes afterwards: each connection is served once") {
  captured_log log;
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    std::map<int, int> routed;  // connections placed, by worker id: the lowest live one
    auto route = [&routed](const Remote&, const HandoffListener::Members& live) {
      const int id = live.empty() ? 0 : live.begin()->first;
      ++routed[id];
      return id;
    };
    Master<Dispatch<decltype(route)>> master(io.get_executor(), {}, Dispatch(route));
    auto& events = master.events();
    auto first = co_await master.fork(scenario_env("breaks_protocol_holding_a_handoff"));
    const Message port = co_await first->receive();
    co_await first->listening();
    const tcp::endpoint where(loopback(1), reported_port(port.data));
    tcp::socket trigger(io), block(io), victim(io);
    co_await trigger.async_connect(where, use_awaitable);
    co_await block.async_connect(where, use_awaitable);
    const Message accepted = co_await first->receive();
    CHECK(accepted.data == "accepted 2");  // its loop is blocked from here on
    co_await victim.async_connect(where, use_awaitable);
    co_await asio::async_write(victim, asio::buffer("hi\n", 3), use_awaitable);
    co_await poll_until([&] { return routed[first->id()] == 3; });  // handed to it, in its channel
    auto second = co_await fork_second_on(master, port.data);
    co_await asio::async_write(trigger, asio::buffer("x", 1), use_awaitable);  // the bad packet
    for (;;) {
      const Event e = co_await events.next();
      if (e.type == EventType::error && e.worker == first) {
        CHECK(e.error == error::protocol_error);
        break;
      }
    }
    co_await asio::async_write(block, asio::buffer("go\n", 3), use_awaitable);  // its loop runs again
    std::string reply;
    co_await asio::async_read(victim, asio::dynamic_buffer(reply), as_tuple_t{});  // to EOF
    // It took the connection it had been handed: its acknowledgement, behind the bad packet,
    // was read. Ending its channel at the bad packet gave the connection to the second worker
    // too, which answered first.
    CHECK(reply == "worker " + std::to_string(first->id()) + "\n");
    CHECK(routed[second->id()] == 0);
    CHECK((co_await first->exited()) == ExitStatus{0, 0});  // it left on the EOF it was given
    CHECK(co_await ask_from(loopback(1), where) == second->id());
    co_await master.disconnect();
  });
  CHECK_MESSAGE(log.has("protocol error: frame with a bad magic byte; disconnecting it"), "the log was: " << log.text);
}

TEST_CASE("Dispatch: connections waiting for an absent worker are bounded and do not stop the others") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<Dispatch<by_last_octet>> master(io.get_executor(), {}, Dispatch(by_last_octet{}));
    auto [workers, where] = co_await start_serving(master, 1);
    // 300 clients of worker 9, which never comes: 256 wait in the master, the rest are closed.
    constexpr int absent_clients = 300;
    const int over = absent_clients - static_cast<int>(HandoffListener::max_waiting_per_worker);
    std::vector<std::shared_ptr<tcp::socket>> clients;
    int closed = 0;
    for (int i = 0; i < absent_clients; ++i) {
      auto s = std::make_shared<tcp::socket>(io);
      s->open(tcp::v4());
      s->bind(tcp::endpoint(loopback(9), 0));
      co_await s->async_connect(where, use_awaitable);
      co_await asio::async_write(*s, asio::buffer("hi\n", 3), as_tuple_t{});  // fails if closed already
      auto buf = std::make_shared<std::string>();
      // Closed unanswered: EOF, or a reset when the master closed it with "hi" unread.
      asio::async_read(*s, asio::dynamic_buffer(*buf), [&closed, s, buf](std::error_code ec, std::size_t) {
        if (ec && buf->empty()) ++closed;
      });
      clients.push_back(s);
    }
    // Connected after all of them, so accepted after them: worker 1's client is still served.
    CHECK(co_await ask_from(loopback(1), where) == 1);
    co_await poll_until([&] { return closed >= over; });
    CHECK(closed == over);
    co_await master.disconnect();  // the last worker leaves: the waiting ones are closed too
    co_await poll_until([&] { return closed >= absent_clients; });
  });
}

TEST_CASE("Dispatch: a master full of connections for absent workers serves the others, and closes the oldest of them for more") {
  // 16 absent ids x 256 fill the master (max_waiting), with no event of theirs ever to come:
  // the test holds both ends of each connection.
  constexpr int absent_ids = 16;
  constexpr int per_id = static_cast<int>(HandoffListener::max_waiting_per_worker);
  static_assert(absent_ids * per_id == static_cast<int>(HandoffListener::max_waiting));
  rlimit saved{};
  REQUIRE(::getrlimit(RLIMIT_NOFILE, &saved) == 0);
  const rlim_t needed = 2 * absent_ids * per_id + 256;  // both ends of each, and the rest
  REQUIRE_MESSAGE((saved.rlim_max == RLIM_INFINITY || saved.rlim_max >= needed), "RLIMIT_NOFILE's hard limit ",
                  saved.rlim_max, " is below the ", needed, " this test needs");
  rlimit raised = saved;
  raised.rlim_cur = std::max<rlim_t>(saved.rlim_cur, needed);
  REQUIRE(::setrlimit(RLIMIT_NOFILE, &raised) == 0);
  struct restore_limit {
    rlimit saved;
    ~restore_limit() { ::setrlimit(RLIMIT_NOFILE, &saved); }
  } restore{saved};
  captured_log log;
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    // The client 127.0.0.N goes to worker N, there or not.
    auto route = [](const Remote& r, const HandoffListener::Members&) { return int(r.address().to_v4().to_bytes()[3]); };
    Master<Dispatch<decltype(route)>> master(io.get_executor(), {}, Dispatch(route));
    auto [workers, where] = co_await start_serving(master, 1);
    const tcp::endpoint at = where;  // (clang 14: a lambda cannot capture a structured binding)
    auto park = [&io, at](int id) -> awaitable<std::shared_ptr<tcp::socket>> {
      auto s = std::make_shared<tcp::socket>(io);
      s->open(tcp::v4());
      s->bind(tcp::endpoint(loopback(id), 0));
      co_await s->async_connect(at, use_awaitable);
      co_return s;
    };
    std::map<int, std::vector<std::shared_ptr<tcp::socket>>> parked;
    for (int id = 10; id < 10 + absent_ids; ++id)
      for (int i = 0; i < per_id; ++i) parked[id].push_back(co_await park(id));
    // Connected after all of them: the master, full, still accepts it for worker 1.
    CHECK(co_await ask_from(loopback(1), where) == workers[0]->id());
    // One more for an absent worker: the oldest 256 waiting, worker 10's, are closed for it.
    int closed = 0;
    for (auto& s : parked[10]) {
      auto buf = std::make_shared<std::string>();
      asio::async_read(*s, asio::dynamic_buffer(*buf), [&closed, s, buf](std::error_code, std::size_t) { ++closed; });
    }
    parked[10 + absent_ids].push_back(co_await park(10 + absent_ids));
    co_await poll_until([&] { return closed == per_id; });
    pollfd still{parked[11].front()->native_handle(), POLLIN, 0};  // the next oldest: open, nothing to read
    CHECK(::poll(&still, 1, 0) == 0);
    co_await master.disconnect();
  }, 120s);
  CHECK_MESSAGE(log.has("closed the 256 oldest connection(s) waiting for workers that do not listen on it"),
                "the log was: " << log.text);
}

TEST_CASE("Dispatch: a routing function that throws has its connection closed, and the master carries on") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    auto route = [](const Remote& r, const HandoffListener::Members&) {
      if (r.address() == asio::ip::make_address("127.0.0.3")) throw std::runtime_error("no route for 127.0.0.3");
      return 1;
    };
    Master<Dispatch<decltype(route)>> master(io.get_executor(), {}, Dispatch(route));
    auto [workers, where] = co_await start_serving(master, 1);
    {  // closed unanswered (EOF, or a reset if "hi" was unread when the master closed it)
      tcp::socket s(io);
      s.open(tcp::v4());
      s.bind(tcp::endpoint(loopback(3), 0));
      co_await s.async_connect(where, use_awaitable);
      co_await asio::async_write(s, asio::buffer("hi\n", 3), as_tuple_t{});
      std::string reply;
      auto [ec, n] = co_await asio::async_read(s, asio::dynamic_buffer(reply), as_tuple_t{});
      CHECK(ec);
      CHECK(reply.empty());
    }
    CHECK(co_await ask_from(loopback(1), where) == 1);
    co_await master.disconnect();
  });
}

TEST_CASE("Dispatch naming an id no worker can have, or a worker not listening here: the log says so") {
  captured_log log;
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    // 127.0.0.2: worker -2 (no such id: closed); 127.0.0.3: worker 7 (none: waits); else worker 1.
    auto route = [](const Remote& r, const HandoffListener::Members&) {
      const int octet = r.address().to_v4().to_bytes()[3];
      return octet == 2 ? -2 : octet == 3 ? 7 : 1;
    };
    Master<Dispatch<decltype(route)>> master(io.get_executor(), {}, Dispatch(route));
    auto [workers, where] = co_await start_serving(master, 1);
    CHECK(co_await ask_from(loopback(2), where) == 0);  // closed unanswered
    tcp::socket waiting(io);
    waiting.open(tcp::v4());
    waiting.bind(tcp::endpoint(loopback(3), 0));
    co_await waiting.async_connect(where, use_awaitable);
    // Connected after it, so accepted after it: worker 1's client is served meanwhile.
    CHECK(co_await ask_from(loopback(1), where) == 1);
    co_await master.disconnect();  // (the waiting one is closed with the listener)
  });
  CHECK_MESSAGE(log.has("closing a connection: the policy named worker -2, and worker ids are positive"), log.text);
  CHECK_MESSAGE(log.has("connections wait for worker 7, which does not listen on it (not there yet, or gone)"), log.text);
}

namespace {

// Listens ("port N"), then accepts with a callback that throws on its first connection, out of
// io.run(), which the scenario runs again after accepting anew; every other connection is
// answered "worker <id>\n" and closed. On a strand: a callback runs as the connection is
// delivered, and the exception goes through the delivery (an io_context's own executor would
// catch it there and rethrow it from run(); a strand's dispatch does not).
int accept_handler_throws_once() {
  asio::io_context io;
  auto strand = asio::make_strand(io);
  this_worker.start(strand);
  std::optional<cocluster::Server<tcp>> server;
  bool thrown = false;
  std::function<void()> arm = [&] {
    server->accept([&](std::error_code ec, tcp::socket s) {
      if (ec) return;
      if (!std::exchange(thrown, true)) throw std::runtime_error("the user's accept handler failed");
      const std::string reply = "worker " + std::to_string(this_worker.id()) + "\n";
      std::error_code ignored;
      asio::write(s, asio::buffer(reply), ignored);
      arm();
    });
  };
  asio::co_spawn(strand, [&]() -> awaitable<void> {
    server.emplace(co_await listen_and_report_port());
    arm();
  }, asio::detached);
  for (;;) {
    try {
      io.run();
      return 0;
    } catch (const std::runtime_error&) {
      arm();
      io.restart();
    }
  }
}

}  // namespace

WORKER_SCENARIO(accept_handler_throws_once) { return accept_handler_throws_once(); }

TEST_CASE("round robin: an accept handler that throws on the first of a batch of hand-offs strands none of the others") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<RoundRobin> master(io.get_executor());  // window 8: the 8 go out in one frame
    auto w = co_await master.fork(scenario_env("accept_handler_throws_once"));
    const tcp::endpoint where(loopback(1), reported_port((co_await w->receive()).data));
    co_await w->listening();
    // Connected without a turn of the loop in between: the master accepts all 8 at once.
    std::vector<std::shared_ptr<tcp::socket>> clients;
    for (int i = 0; i < 8; ++i) {
      auto s = std::make_shared<tcp::socket>(io);
      s->connect(where);
      clients.push_back(s);
    }
    int answered = 0, unanswered = 0;
    for (auto& s : clients) {
      auto reply = std::make_shared<std::string>();
      asio::async_read(*s, asio::dynamic_buffer(*reply), [&, s, reply](std::error_code, std::size_t) {
        ++(*reply == "worker " + std::to_string(w->id()) + "\n" ? answered : unanswered);
      });
    }
    co_await poll_until([&] { return answered + unanswered == 8; });
    CHECK(answered == 7);  // the first was dropped by the handler that threw
    CHECK(unanswered == 1);
    co_await master.disconnect();
  });
}

TEST_CASE("Sticky: 1,000 connections from 10 addresses each stay on one worker; a SIGKILLed worker moves only its own clients") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<Sticky> master(io.get_executor());
    auto [workers, where] = co_await start_serving(master, 4);
    auto before = co_await ask_from_sources(where, 10, 100, 16);
    std::map<int, int> owner;  // source octet -> worker id
    std::set<int> used;
    for (auto& entry : before) {  // (no structured bindings: clang before 16 cannot use them in CHECK_MESSAGE)
      const int octet = entry.first;
      const auto& by_worker = entry.second;
      CHECK_MESSAGE(by_worker.size() == 1, "127.0.0.", octet, " reached ", by_worker.size(), " workers");
      owner[octet] = by_worker.begin()->first;
      CHECK(by_worker.begin()->first != 0);
      CHECK(by_worker.begin()->second == 100);
      used.insert(owner[octet]);
    }
    REQUIRE(owner.size() == 10);
    CHECK(used.size() >= 2);  // the hash spreads clients (fixed ids and addresses: deterministic)

    const int victim = owner[1];
    workers[static_cast<std::size_t>(victim - 1)]->signal(SIGKILL);
    ExitStatus status = co_await workers[static_cast<std::size_t>(victim - 1)]->exited();
    CHECK(status.signal == SIGKILL);

    auto after = co_await ask_from_sources(where, 10, 100, 16);
    for (auto& entry : after) {
      const int octet = entry.first;
      const auto& by_worker = entry.second;
      CHECK_MESSAGE(by_worker.size() == 1, "127.0.0.", octet, " reached ", by_worker.size(), " workers after the kill");
      const int now = by_worker.begin()->first;
      CHECK(now != 0);
      CHECK(now != victim);
      if (owner[octet] != victim) CHECK_MESSAGE(now == owner[octet], "127.0.0.", octet, " moved from worker ", owner[octet], " to ", now);
    }
    co_await master.disconnect();
  });
}

TEST_CASE("RuntimePolicy knows sticky by name") {
  ::setenv("COCLUSTER_SCHED_POLICY", "sticky", 1);
  CHECK(RuntimePolicy().resolve() == Scheduling::sticky);
  ::unsetenv("COCLUSTER_SCHED_POLICY");
  CHECK(parse_scheduling("sticky") == Scheduling::sticky);
  CHECK_FALSE(parse_scheduling("Sticky"));
}

// The issue's test of LeastConnections, for the policy as a type and chosen by name. Two clients
// at a time: however a light worker's window stands (1 if it fell behind: slow_ack), the two
// light ones always have room for both, so the held worker is never the only one with room.
// (At 8 clients, a window of 1 for each light worker sent 22 of the 50 to the held one; that
// RuntimePolicy gives LeastConnections its own window of 8 is held by the RuntimePolicy window
// test, with stopped workers.)
template <class Policy>
awaitable<void> fifty_idle_held(asio::io_context& io, Policy policy) {
  Master<Policy> master(io.get_executor(), {}, policy);
  Env env = scenario_env("hold");
  env["TEST_HOLD"] = "50";
  std::shared_ptr<Worker> first = co_await master.fork(env);
  const Message hello = co_await first->receive();
  const std::string report = hello.data;
  const tcp::endpoint where(loopback(1), reported_port(report));
  auto held = co_await held_by(*first, where, 50);
  std::vector<std::shared_ptr<Worker>> others;
  for (int i = 0; i < 2; ++i) {
    others.push_back(co_await master.fork(env));
    const Message m = co_await others.back()->receive();
    CHECK(m.data == report);
    co_await others.back()->listening();
  }
  auto served = co_await ask_from_sources(where, 1, 50, 2);
  CHECK(served[1][1] == 0);
  CHECK(served[1][2] + served[1][3] == 50);
  CHECK(served[1][0] == 0);
  // Worker 1 keeps its held connections (a disconnect would wait for them): end them all.
  for (auto& [id, w] : master.workers()) w->kill();
  co_await first->exited();
  for (auto& w : others) co_await w->exited();
}

TEST_CASE("LeastConnections: with one worker holding 50 idle connections, the next 50 go to the others") {
  SUBCASE("as a type") {
    run_bounded([](asio::io_context& io) { return fifty_idle_held(io, LeastConnections{}); });
  }
  SUBCASE("by name (RuntimePolicy)") {
    run_bounded([](asio::io_context& io) { return fifty_idle_held(io, RuntimePolicy(Scheduling::least_connections)); });
  }
}

TEST_CASE("LeastConnections: connections a worker acknowledged count until its report of them arrives") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<LeastConnections> master(io.get_executor());
    Env hold = scenario_env("hold");
    hold["TEST_HOLD"] = "8";
    auto holder = co_await master.fork(hold);  // worker 1
    const std::string report = (co_await holder->receive()).data;
    const tcp::endpoint where(loopback(1), reported_port(report));
    auto held = co_await held_by(*holder, where, 8);  // the only worker takes them all
    Env blocking = scenario_env("block_after_accepting");
    blocking["TEST_BLOCK_AFTER"] = "8";
    auto blocker = co_await master.fork(blocking);  // worker 2
    CHECK((co_await blocker->receive()).data == report);
    co_await blocker->listening();
    // 8 clients connect while the master does not run (this thread blocks here): it accepts them
    // in one burst and hands all 8 to worker 2 (none open, against 8), in one batch.
    std::vector<tcp::socket> taken;
    for (int i = 0; i < 8; ++i) taken.emplace_back(io).connect(where);
    // Worker 2 accepted the 8 and blocks its loop: the master has read its 8 acks (written before
    // this message), and no report of the 8 connections can come until it is unblocked.
    CHECK((co_await blocker->receive()).data == "accepted 8");
    // 9 more in one burst: worker 2 holds 8 as worker 1 does, so they share them. (Counting only
    // its last report, 0, and what it has not acknowledged, the master gave it all it could: 8.)
    auto sockets = connect_burst(io, where, 9);
    burst_answers answers(io, sockets);
    // A first answer (worker 1's: worker 2 is blocked) says the burst was handed out, in one go.
    co_await answers.first.async_wait(use_awaitable);
    asio::write(taken.back(), asio::buffer("go\n", 3));  // unblocks worker 2
    co_await answers.all.async_wait(use_awaitable);
    CHECK(answers.by_reply["worker 1\n"] >= 4);
    CHECK(answers.by_reply["worker 2\n"] >= 4);
    CHECK(answers.by_reply["worker 1\n"] + answers.by_reply["worker 2\n"] == 9);
    for (auto& [id, w] : master.workers()) w->kill();  // both keep connections open
    co_await holder->exited();
    co_await blocker->exited();
  });
}

TEST_CASE("LeastConnections: a worker's report replaces the acknowledged hand-offs counted before it") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<LeastConnections> master(io.get_executor());
    Env env = scenario_env("hold");
    env["TEST_HOLD"] = "1000";  // never reached: every connection is answered and closed
    auto first = co_await master.fork(env);
    const std::string report = (co_await first->receive()).data;
    const tcp::endpoint where(loopback(1), reported_port(report));
    for (int i = 0; i < 10; ++i) CHECK(co_await ask_from(loopback(1), where) == 1);  // served and closed
    co_await poll_until([&] { return first->connections_served() == 10 && first->open_connections() == 0; });
    auto second = co_await fork_second_on(master, report);
    // Both hold nothing: a burst of 8 (one accept burst, this thread blocks meanwhile) is shared,
    // not all given to worker 2 as if worker 1 still held the 10 it acknowledged.
    auto sockets = connect_burst(io, where, 8);
    burst_answers answers(io, sockets);
    co_await answers.all.async_wait(use_awaitable);
    CHECK(answers.by_reply["worker 1\n"] >= 3);
    CHECK(answers.by_reply["worker 2\n"] >= 3);
    CHECK(answers.by_reply["worker 1\n"] + answers.by_reply["worker 2\n"] == 8);
    co_await master.disconnect();
  });
}

// Tells a `serve` worker `what` ("exhaust": no fd left; "release": its fds back; "ping") and
// checks its answer.
awaitable<void> tell(Worker& w, const std::string& what, const std::string& answer) {
  co_await w.send(Message(what));
  const Message reply = co_await w.receive();
  CHECK_MESSAGE(reply.data == answer, what, " was answered ", reply.data);
}

// Worker 1 left with no fd free (RLIMIT_NOFILE): every connection handed to it arrives without
// its fd, and it refuses them. Each is answered by worker 2, none is lost, worker 1 stays
// connected (it used to lose its channel to the first such hand-off), and once it has fds again
// it is handed connections again. Sticky (worker 1's clients) and LeastConnections (worker 1 is
// the idlest) would name worker 1 again at once: a refused connection went back and forth
// between it and the master for as long as its fds stayed in use.
template <class Policy>
void exhausted_worker_case(Policy policy) {
  run_bounded([policy](asio::io_context& io) -> awaitable<void> {
    Master<Policy> master(io.get_executor(), {}, policy);
    auto [workers, where] = co_await start_serving(master, 2);
    const std::shared_ptr<Worker> first = workers[0];
    co_await tell(*first, "exhaust", "exhausted");
    auto during = co_await ask_from_sources(where, 10, 4, 4);
    int answered = 0;
    for (auto& source : during) {
      for (auto& by : source.second) {
        CHECK_MESSAGE(by.first == 2, "127.0.0.", source.first, ": ", by.second, " answered by worker ", by.first);
        answered += by.second;
      }
    }
    CHECK(answered == 40);
    CHECK(first->is_connected());
    co_await tell(*first, "release", "released");
    // Its rest after the last refusal ends by itself: asked until worker 1 answers again (a wait
    // for that event; run_bounded bounds it).
    for (bool back = false; !back;) {
      auto after = co_await ask_from_sources(where, 10, 1, 4);
      for (auto& source : after) back = back || source.second.count(1) != 0;
    }
    CHECK(first->is_connected());
    co_await master.disconnect();
  });
}

TEST_CASE("Sticky: a worker with no fd left refuses its clients' connections; another worker answers them until it has fds again") {
  exhausted_worker_case(Sticky{});
}

TEST_CASE("LeastConnections: a worker with no fd left refuses the connections handed to it; another worker answers them") {
  exhausted_worker_case(LeastConnections{});
}

TEST_CASE("RoundRobin: a worker with no fd left refuses the connections handed to it; another worker answers them") {
  exhausted_worker_case(RoundRobin{});
}

TEST_CASE("Dispatch: a connection routed to a worker with no fd left waits for it, and is answered by it once it has fds again") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<Dispatch<by_last_octet>> master(io.get_executor(), {}, Dispatch(by_last_octet{}));
    auto [workers, where] = co_await start_serving(master, 2);
    co_await tell(*workers[0], "exhaust", "exhausted");
    // 127.0.0.1 is worker 1's alone: its connection is refused, waits, and is offered again
    // at the end of each of worker 1's rests; meanwhile 127.0.0.2's go to worker 2.
    int waiting_for_1 = -1;
    asio::co_spawn(io, ask_from(loopback(1), where), [&](std::exception_ptr e, int id) { waiting_for_1 = e ? 0 : id; });
    std::map<int, int> from_2;
    for (int i = 0; i < 10; ++i) ++from_2[co_await ask_from(loopback(2), where)];
    CHECK(from_2 == std::map<int, int>{{2, 10}});
    CHECK(waiting_for_1 == -1);  // worker 1 can take no connection yet, and nobody else gets it
    CHECK(workers[0]->is_connected());
    co_await tell(*workers[0], "release", "released");
    co_await poll_until([&] { return waiting_for_1 != -1; });
    CHECK(waiting_for_1 == 1);
    co_await master.disconnect();
  });
}

// SharedSocket and ReusePort: the only worker, accepting on a socket of its own, has no fd
// left for the next connection. Its accept does not fail (EMFILE is tried again every 100 ms),
// so it serves the connection once it has fds again. Its accept used to complete with EMFILE,
// which ends an accept loop written as Node's (the serve scenario's): the port was never served
// again.
template <class Policy>
void exhausted_acceptor_case(Policy policy) {
  run_bounded([policy](asio::io_context& io) -> awaitable<void> {
    Master<Policy> master(io.get_executor(), {}, policy);
    auto [workers, where] = co_await start_serving(master, 1);
    const std::shared_ptr<Worker> only = workers[0];
    co_await tell(*only, "exhaust", "exhausted");
    tcp::socket client(io);
    co_await client.async_connect(where, use_awaitable);  // in the backlog: the worker's accept is woken
    co_await asio::async_write(client, asio::buffer("hi\n", 3), use_awaitable);
    // The listener became readable before this message was sent: the worker has tried (and
    // failed) to accept when it answers.
    co_await tell(*only, "ping", "pong");
    // A while for the accept to fail again on its retries (what it shows, not what it needs to
    // pass: without the retry the client is never answered, however long this is).
    asio::steady_timer a_while(io, 250ms);
    co_await a_while.async_wait(use_awaitable);
    co_await tell(*only, "release", "released");
    std::string reply;
    co_await asio::async_read(client, asio::dynamic_buffer(reply), as_tuple_t{});  // to EOF
    CHECK(reply == "worker 1\n");
    CHECK(only->is_connected());
    co_await master.disconnect();
  });
}

TEST_CASE("SharedSocket: an accept that finds no fd left waits and tries again; the connection is served once there are fds") {
  exhausted_acceptor_case(SharedSocket{});
}

TEST_CASE("ReusePort: an accept that finds no fd left waits and tries again; the connection is served once there are fds") {
  exhausted_acceptor_case(ReusePort{});
}

TEST_CASE("RoundRobin with a window: a worker SIGKILLed holding a batch of unacknowledged connections has every one answered by another") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<RoundRobin> master(io.get_executor(), {}, RoundRobin{.window = 8});
    Env env = scenario_env("hold");
    env["TEST_HOLD"] = "1000";  // never reached: every connection is answered and closed
    auto first = co_await master.fork(env);
    const std::string report = (co_await first->receive()).data;
    auto second = co_await master.fork(env);
    CHECK((co_await second->receive()).data == report);
    co_await first->listening();
    co_await second->listening();
    const tcp::endpoint where(loopback(1), reported_port(report));
    // Worker 1 stops: what it is handed stays unacknowledged in its channel.
    REQUIRE(::kill(first->pid(), SIGSTOP) == 0);
    // 16 clients connect and send while the master does not run (this thread blocks here; the
    // kernel completes the handshakes): it accepts them in one burst and hands each worker its
    // window, 8 connections in one frame.
    constexpr int clients = 16;
    std::vector<tcp::socket> sockets;
    for (int i = 0; i < clients; ++i) {
      tcp::socket& s = sockets.emplace_back(io);
      s.connect(where);
      asio::write(s, asio::buffer("hi\n", 3));
    }
    std::map<std::string, int> answers;
    int answered = 0;
    cocluster::detail::async_latch<> half(io.get_executor()), all(io.get_executor());
    for (auto& s : sockets)
      asio::co_spawn(io, [&]() -> awaitable<void> {
        std::string reply;
        co_await asio::async_read(s, asio::dynamic_buffer(reply), as_tuple_t{});  // to EOF
        ++answers[reply];
        if (++answered == clients / 2) half.set();
        if (answered == clients) all.set();
      }, asio::detached);
    // Worker 2's window is answered: the burst was handed out (worker 1's batch with it).
    co_await half.async_wait(use_awaitable);
    CHECK(answers == std::map<std::string, int>{{"worker 2\n", clients / 2}});
    first->kill(SIGKILL);
    CHECK((co_await first->exited()).signal == SIGKILL);
    // Every connection worker 1 held goes to worker 2: none is reset, none lost.
    co_await all.async_wait(use_awaitable);
    CHECK(answers == std::map<std::string, int>{{"worker 2\n", clients}});
    co_await master.disconnect();
  }, 60s);
}

TEST_CASE("RuntimePolicy knows leastconn by name") {
  ::setenv("COCLUSTER_SCHED_POLICY", "leastconn", 1);
  CHECK(RuntimePolicy().resolve() == Scheduling::least_connections);
  ::unsetenv("COCLUSTER_SCHED_POLICY");
}

TEST_CASE("Remote reads IPv4 and IPv6 peers; Sticky's hash is the address's, not the port's") {
  sockaddr_in6 a6{};
  a6.sin6_family = AF_INET6;
  a6.sin6_port = htons(1000);
  ::inet_pton(AF_INET6, "2001:db8::7", &a6.sin6_addr);
  sockaddr_in6 b6 = a6;
  b6.sin6_port = htons(2000);
  const std::string bytes_a(reinterpret_cast<const char*>(&a6), sizeof a6), bytes_b(reinterpret_cast<const char*>(&b6), sizeof b6);
  const Remote ra(bytes_a), rb(bytes_b);
  CHECK(ra.family() == AF_INET6);
  CHECK(ra.address() == asio::ip::make_address("2001:db8::7"));
  CHECK(ra.port() == 1000);
  CHECK(ra.address_bytes().size() == 16);
  CHECK(ra.address_bytes() == rb.address_bytes());
  CHECK(cocluster::detail::hash_address(ra.address_bytes()) == cocluster::detail::hash_address(rb.address_bytes()));

  sockaddr_in a4{};
  a4.sin_family = AF_INET;
  a4.sin_port = htons(80);
  ::inet_pton(AF_INET, "192.0.2.9", &a4.sin_addr);
  const std::string bytes4(reinterpret_cast<const char*>(&a4), sizeof a4);
  const Remote r4(bytes4);
  CHECK(r4.family() == AF_INET);
  CHECK(r4.address() == asio::ip::make_address("192.0.2.9"));
  CHECK(r4.port() == 80);
  CHECK(r4.address_bytes().size() == 4);
  // The same client on a dual-stack listener, as ::ffff:192.0.2.9: the same bytes, the same worker.
  sockaddr_in6 m6{};
  m6.sin6_family = AF_INET6;
  m6.sin6_port = htons(81);
  ::inet_pton(AF_INET6, "::ffff:192.0.2.9", &m6.sin6_addr);
  const std::string bytes_m(reinterpret_cast<const char*>(&m6), sizeof m6);
  CHECK(Remote(bytes_m).address_bytes() == r4.address_bytes());
  CHECK(Remote().family() == AF_UNSPEC);
  CHECK(Remote().address_bytes().empty());
}

TEST_CASE("Sticky over IPv6: every connection from ::1 reaches one worker") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<Sticky> master(io.get_executor());
    Env env = scenario_env("serve");
    env["TEST_LISTEN"] = "tcp6:::1:0";
    std::vector<std::shared_ptr<Worker>> workers;
    for (int i = 0; i < 3; ++i) workers.push_back(co_await master.fork(env));
    unsigned short port = 0;
    for (auto& w : workers) {
      Message m = co_await w->receive();
      if (m.data.rfind("error", 0) == 0) {  // no IPv6 loopback on this machine
        MESSAGE("skipped: ", m.data);
        co_await master.disconnect();
        co_return;
      }
      port = reported_port(m.data);
      co_await w->listening();
    }
    const tcp::endpoint where(asio::ip::address_v6::loopback(), port);
    std::set<int> answered_by;
    for (int i = 0; i < 30; ++i) {
      tcp::socket s(io);
      co_await s.async_connect(where, use_awaitable);
      co_await asio::async_write(s, asio::buffer("hi\n", 3), use_awaitable);
      std::string reply;
      co_await asio::async_read(s, asio::dynamic_buffer(reply), as_tuple_t{});
      REQUIRE(reply.rfind("worker ", 0) == 0);
      answered_by.insert(std::stoi(reply.substr(7)));
    }
    CHECK(answered_by.size() == 1);
    co_await master.disconnect();
  });
}

TEST_CASE("ReusePort: 4 workers share the one port listen(0) gave, each on its own socket") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<ReusePort> master(io.get_executor());
    std::set<std::string> reports;
    std::vector<std::shared_ptr<Worker>> workers;
    for (int i = 0; i < 4; ++i) workers.push_back(co_await master.fork(serve_on_port_zero()));
    for (auto& w : workers) {
      reports.insert((co_await w->receive()).data);
      co_await w->listening();
    }
    REQUIRE(reports.size() == 1);  // one port for all four
    const tcp::endpoint where(loopback(1), reported_port(*reports.begin()));
    auto served = co_await ask_from_sources(where, 1, 80, 8);
    CHECK(served[1].count(0) == 0);   // every connection answered
    CHECK(served[1].size() >= 2);     // the kernel spread them (all 80 on one of 4 sockets: 4^-79)
    co_await master.disconnect();
  });
}

TEST_CASE("ReusePort: a port another SO_REUSEPORT socket of this user holds is in use, as under the other policies") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    // Another instance of the program, say: its socket would take the new sockets into its group.
    tcp::acceptor other(io, tcp::v4());
    other.set_option(asio::socket_base::reuse_address(true));
    const int one = 1;
    REQUIRE(::setsockopt(other.native_handle(), SOL_SOCKET, SO_REUSEPORT, &one, sizeof one) == 0);
    other.bind(tcp::endpoint(loopback(1), 0));
    other.listen();
    Master<ReusePort> master(io.get_executor());
    Env env = scenario_env("serve");
    env["TEST_LISTEN"] = "tcp4:127.0.0.1:" + std::to_string(other.local_endpoint().port());
    auto w = co_await master.fork(env);
    const std::string report = (co_await w->receive()).data;
    CHECK_MESSAGE(report.rfind("error " + std::to_string(EADDRINUSE) + " ", 0) == 0, report);
    co_await master.disconnect();
  });
}

TEST_CASE("RuntimePolicy knows reuseport by name") {
  ::setenv("COCLUSTER_SCHED_POLICY", "reuseport", 1);
  CHECK(RuntimePolicy().resolve() == Scheduling::reuse_port);
  CHECK(RuntimePolicy().reuse_port());
  ::unsetenv("COCLUSTER_SCHED_POLICY");
  CHECK_FALSE(RuntimePolicy(Scheduling::shared).reuse_port());
}

namespace {

// The id in a "serve" worker's answer ("worker <id>"), 0 for none (pending_request: support.hpp).
int answered_by(const pending_request& r) { return r.reply.rfind("worker ", 0) == 0 ? std::stoi(r.reply.substr(7)) : 0; }

}  // namespace

TEST_CASE("ReusePort: connections queued in a SIGKILLed worker's backlog are answered, not reset; its replacement adopts its socket") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<ReusePort> master(io.get_executor());
    auto [workers, where] = co_await start_serving(master, 4);
    auto& victim = workers[1];
    victim->signal(SIGSTOP);  // it accepts nothing now: what the kernel gives its socket waits there

    // Open connections in rounds until some stay unanswered: the three others answer theirs,
    // so those are in the stopped worker's backlog. (The bound only sorts them: one a live
    // worker answers late is still answered, by that worker, and checked below.)
    std::vector<std::shared_ptr<pending_request>> all;
    std::set<pending_request*> unanswered;
    asio::steady_timer poll(io);
    for (int round = 0; round < 8 && unanswered.empty(); ++round) {
      std::vector<std::shared_ptr<pending_request>> batch;
      for (int i = 0; i < 16; ++i) {
        auto r = std::make_shared<pending_request>(pending_request{tcp::socket(io), {}, {}, false});
        co_await r->socket.async_connect(where, use_awaitable);  // queued in one socket's backlog
        co_await asio::async_write(r->socket, asio::buffer("hi\n", 3), use_awaitable);
        asio::co_spawn(io, await_answer(r), asio::detached);
        batch.push_back(r);
      }
      const auto bound = std::chrono::steady_clock::now() + 1s;
      auto answered = [&] { return std::all_of(batch.begin(), batch.end(), [](auto& r) { return r->done; }); };
      while (!answered() && std::chrono::steady_clock::now() < bound) {
        poll.expires_after(5ms);
        co_await poll.async_wait(use_awaitable);
      }
      for (auto& r : batch) {
        if (!r->done) unanswered.insert(r.get());
        all.push_back(r);
      }
    }
    REQUIRE_MESSAGE(!unanswered.empty(), "no connection reached the stopped worker in ", all.size());

    victim->signal(SIGKILL);
    ExitStatus status = co_await victim->exited();
    CHECK(status.signal == SIGKILL);

    // No replacement yet: the master hands what waited in the dead worker's socket to the others.
    while (!std::all_of(all.begin(), all.end(), [](auto& r) { return r->done; })) {  // bounded by run_bounded
      poll.expires_after(5ms);
      co_await poll.async_wait(use_awaitable);
    }
    for (auto& r : all) {
      CHECK_MESSAGE(!r->ec, "a connection failed: ", r->ec.message());  // none reset
      const int id = answered_by(*r);
      CHECK(id != 0);
      CHECK(id != victim->id());
    }
    MESSAGE(unanswered.size(), " of ", all.size(), " connections waited in the stopped worker's backlog");

    // The replacement takes the dead worker's socket (the port's fourth): the kernel's share of
    // it reaches the replacement (80 connections over 4 sockets, none on it: 0.75^80).
    auto replacement = co_await master.fork(serve_on_port_zero());
    CHECK((co_await replacement->receive()).data == "port " + std::to_string(where.port()));
    co_await replacement->listening();
    auto served = co_await ask_from_sources(where, 1, 80, 8);
    CHECK(served[1].count(0) == 0);
    CHECK(served[1].count(victim->id()) == 0);
    CHECK(served[1].count(replacement->id()) == 1);
    co_await master.disconnect();
  });
}

// ---- Master::keep_listeners: a listener whose last worker died waits for the next ----

namespace {

// `n` clients that sent "hi" to `where`, reading their answers (whoever answers, whenever).
awaitable<std::vector<std::shared_ptr<pending_request>>> send_hi(asio::io_context& io, tcp::endpoint where, int n) {
  std::vector<std::shared_ptr<pending_request>> out;
  for (int i = 0; i < n; ++i) {
    auto r = std::make_shared<pending_request>(pending_request{tcp::socket(io), {}, {}, false});
    co_await r->socket.async_connect(where, use_awaitable);
    co_await asio::async_write(r->socket, asio::buffer("hi\n", 3), use_awaitable);
    asio::co_spawn(io, await_answer(r), asio::detached);
    out.push_back(r);
  }
  co_return out;
}

bool all_done(const std::vector<std::shared_ptr<pending_request>>& rs) {
  return std::all_of(rs.begin(), rs.end(), [](auto& r) { return r->done; });
}

// Whether a connection to `where` is refused now (nothing listens: the port is free).
awaitable<bool> refused(tcp::endpoint where) {
  tcp::socket s(co_await asio::this_coro::executor);
  auto [ec] = co_await s.async_connect(where, as_tuple_t{});
  co_return ec == asio::error::connection_refused;
}

// Both workers stopped with connections waiting for them (under RoundRobin handed to them or
// held by the master, under SharedSocket in the backlog, under ReusePort in the backlogs of
// both their sockets), then SIGKILLed: the master keeps the listener, and the next worker to
// listen, alone, answers every one of them, on the same port. Without keep_listeners() they
// are reset with the listener (and the port is another).
template <class P>
awaitable<void> kept_listener_serves_the_next_worker(asio::io_context& io) {
  Master<P> master(io.get_executor());
  master.keep_listeners(std::chrono::hours(1));
  std::pair<std::vector<std::shared_ptr<Worker>>, tcp::endpoint> started = co_await start_serving(master, 2);
  const std::vector<std::shared_ptr<Worker>>& workers = started.first;
  const tcp::endpoint where = started.second;
  for (auto& w : workers) w->signal(SIGSTOP);
  auto waiting = co_await send_hi(io, where, 16);
  // One after the other, the first first: under ReusePort the first's socket is drained to the
  // second meanwhile, and the second's is left with nobody holding the listener, so the next
  // worker adopts the first's and must be handed what waits in the second's.
  for (auto& w : workers) {
    w->signal(SIGKILL);
    co_await w->exited();
  }

  std::shared_ptr<Worker> next = co_await master.fork(serve_on_port_zero());
  const Message report = co_await next->receive();
  CHECK(reported_port(report.data) == where.port());
  co_await poll_until([&] { return all_done(waiting); });  // bounded by run_bounded
  for (auto& r : waiting) {
    CHECK_MESSAGE(!r->ec, "a connection failed: ", r->ec.message());
    CHECK_MESSAGE(answered_by(*r) == next->id(), "answer: '", r->reply, "'");
  }
  CHECK(co_await ask_from(loopback(1), where) == next->id());

  // Back to Node's rule: the last worker's death now closes the listener, and the port is free.
  master.keep_listeners(0ms);
  next->signal(SIGKILL);
  co_await next->exited();
  CHECK(co_await refused(where));
}

}  // namespace

TEST_CASE("keep_listeners: RoundRobin: what waited for two dead workers is answered by the next one to listen") {
  run_bounded([](asio::io_context& io) { return kept_listener_serves_the_next_worker<RoundRobin>(io); });
}

TEST_CASE("keep_listeners: SharedSocket: what waited in the backlog of two dead workers is answered by the next one") {
  run_bounded([](asio::io_context& io) { return kept_listener_serves_the_next_worker<SharedSocket>(io); });
}

TEST_CASE("keep_listeners: ReusePort: the next worker adopts one dead worker's socket and is handed the other's backlog") {
  run_bounded([](asio::io_context& io) { return kept_listener_serves_the_next_worker<ReusePort>(io); });
}

TEST_CASE("keep_listeners: a kept listener no worker comes back to is closed after the linger, with what waited in it") {
  captured_log log;
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<RoundRobin> master(io.get_executor());
    master.keep_listeners(100ms);
    auto [workers, where] = co_await start_serving(master, 1);
    workers[0]->signal(SIGSTOP);
    auto waiting = co_await send_hi(io, where, 4);  // handed to the stopped worker
    workers[0]->signal(SIGKILL);
    co_await workers[0]->exited();
    co_await poll_until([&] { return all_done(waiting); });  // closed when the 100 ms are over
    for (auto& r : waiting) CHECK(r->reply.empty());
    CHECK(co_await refused(where));
  });
  CHECK_MESSAGE(log.has("no worker listened on it within 100 ms"), "the log was: " << log.text);
}

TEST_CASE("keep_listeners: each call gives the listeners kept so far its linger from now") {
  captured_log log;
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<RoundRobin> master(io.get_executor());
    master.keep_listeners(std::chrono::hours(1));
    auto [workers, where] = co_await start_serving(master, 1);
    workers[0]->signal(SIGKILL);
    co_await workers[0]->exited();
    auto waiting = co_await send_hi(io, where, 2);  // kept for an hour
    master.keep_listeners(50ms);                    // now 50 ms from now
    CHECK(master.listener_linger() == 50ms);
    co_await poll_until([&] { return all_done(waiting); });
    for (auto& r : waiting) CHECK(r->reply.empty());
    CHECK(co_await refused(where));
  });
  CHECK_MESSAGE(log.has("no worker listened on it within 50 ms"), "the log was: " << log.text);
}

TEST_CASE("keep_listeners: a worker that listens on a kept listener's port under another key gets the port") {
  captured_log log;
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<RoundRobin> master(io.get_executor());
    master.keep_listeners(std::chrono::hours(1));
    auto [workers, where] = co_await start_serving(master, 1);  // listen(0): its key has port 0
    workers[0]->signal(SIGKILL);
    co_await workers[0]->exited();
    // The same port by its number: another key. The kept listener gives way instead of EADDRINUSE.
    Env env = scenario_env("serve");
    env["TEST_LISTEN"] = "tcp4:127.0.0.1:" + std::to_string(where.port());
    auto next = co_await master.fork(env);
    CHECK((co_await next->receive()).data == "port " + std::to_string(where.port()));
    co_await next->listening();
    CHECK(co_await ask_from(loopback(1), where) == next->id());
    co_await master.disconnect();
  });
  CHECK_MESSAGE(log.has("kept for the next worker, closed: a worker listens on 127.0.0.1:"), "the log was: " << log.text);
}

TEST_CASE("keep_listeners: 0 closes the listeners kept so far at once; a worker that closes its server is never kept") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<RoundRobin> master(io.get_executor());
    master.keep_listeners(std::chrono::hours(1));
    // A worker that closes its server: the port is free at once (Node's rule 14 holds).
    auto closer = co_await master.fork(serve_on_port_zero());
    const tcp::endpoint first(loopback(1), reported_port((co_await closer->receive()).data));
    co_await closer->listening();
    closer->disconnect();  // it closes its servers first
    co_await closer->exited();
    CHECK(co_await refused(first));

    auto [workers, where] = co_await start_serving(master, 1);
    workers[0]->signal(SIGKILL);
    co_await workers[0]->exited();
    auto waiting = co_await send_hi(io, where, 2);  // kept: the backlog takes them
    CHECK_FALSE(all_done(waiting));
    master.keep_listeners(0ms);
    CHECK(co_await refused(where));
    co_await poll_until([&] { return all_done(waiting); });
    for (auto& r : waiting) CHECK(r->reply.empty());
  });
}

TEST_CASE("ReusePort: a worker that leaves for good (a reload's last, a scale-down) leaves no socket whose connections hang") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<ReusePort> master(io.get_executor());
    auto [workers, where] = co_await start_serving(master, 3);
    // As a rolling reload's last step or a scale-down: the worker goes, nobody takes its place,
    // and the kernel still hashes a third of the new connections to its socket.
    auto& gone = workers[0];
    gone->disconnect();
    co_await gone->exited();
    auto served = co_await ask_from_sources(where, 1, 60, 6);  // one that hung: run_bounded fails
    CHECK(served[1].count(0) == 0);
    CHECK(served[1].count(gone->id()) == 0);
    CHECK(served[1][workers[1]->id()] + served[1][workers[2]->id()] == 60);
    co_await master.disconnect();
  });
}

namespace {

// The highest fd this process has open (the directory stream's own excluded).
int highest_open_fd() {
  DIR* d = ::opendir("/proc/self/fd");
  REQUIRE(d != nullptr);
  const int own = ::dirfd(d);
  int highest = -1;
  while (auto* e = ::readdir(d))
    if (e->d_name[0] != '.' && std::atoi(e->d_name) != own) highest = std::max(highest, std::atoi(e->d_name));
  ::closedir(d);
  return highest;
}

}  // namespace

TEST_CASE("ReusePort: a dead worker's socket the master could not drain for want of an fd is drained once it has one") {
  captured_log log;
  run_bounded([&](asio::io_context& io) -> awaitable<void> {
    Master<ReusePort> master(io.get_executor());
    auto [first, where] = co_await start_serving(master, 1);
    // Every fd below `floor` is taken, so that what the master opens for the next worker (its
    // channel, pidfd and socket) lies at `floor` or above: a limit of `floor` then leaves the
    // master no fd free, even once that worker's fds are closed.
    std::vector<cocluster::detail::unique_fd> fillers;
    const int floor = highest_open_fd() + 1;
    for (int fd; (fd = ::dup(2)) < floor;) {
      REQUIRE(fd >= 0);
      fillers.emplace_back(fd);
    }
    ::close(floor);  // (the dup that reached it)
    auto [second, same] = co_await start_serving(master, 1);
    REQUIRE(same == where);
    rlimit saved{};
    REQUIRE(::getrlimit(RLIMIT_NOFILE, &saved) == 0);
    const rlimit none_left{static_cast<rlim_t>(floor), saved.rlim_max};
    REQUIRE(::setrlimit(RLIMIT_NOFILE, &none_left) == 0);
    struct restore_limit {
      rlimit saved;
      ~restore_limit() { ::setrlimit(RLIMIT_NOFILE, &saved); }
    } restore{saved};
    const int spare = ::dup(2);  // (none: else the drain below would not fail)
    const int why = errno;
    if (spare >= 0) ::close(spare);
    REQUIRE_MESSAGE(spare < 0, "an fd below the limit is free: ", spare);
    REQUIRE(why == EMFILE);
    // The second worker dies; its socket stays in the group, and the master cannot copy it to
    // accept from it (EMFILE).
    second[0]->signal(SIGKILL);
    (void)co_await second[0]->exited();
    co_await poll_until([&] { return log.has("cannot accept from a socket no worker holds"); });
    ::setrlimit(RLIMIT_NOFILE, &saved);
    fillers.clear();
    // About half the new connections hash to the dead worker's socket: each is answered by the
    // first worker (one that hung: run_bounded fails).
    auto served = co_await ask_from_sources(where, 1, 32, 4);
    CHECK(served[1][first[0]->id()] == 32);
    co_await master.disconnect();
  });
}

// Starts one accept with a cancellation slot of its own and cancels it: "cancelled: <error>"
// to the master. (Since the master may hand a ReusePort worker connections, its accept on its
// own socket is cancelled by the runtime too; the user's cancellation must still end it.)
WORKER_SCENARIO(cancel_accept) {
  asio::io_context io;
  this_worker.start(io.get_executor());
  asio::co_spawn(io, [&io]() -> awaitable<void> {
    auto server = co_await listen_and_report_port();
    asio::cancellation_signal cancel;
    cocluster::detail::async_latch<std::error_code> done(io.get_executor());
    server.accept(asio::bind_cancellation_slot(cancel.slot(), [&](std::error_code ec, tcp::socket) { done.set(ec); }));
    asio::post(io, [&] { cancel.emit(asio::cancellation_type::terminal); });
    const std::error_code ec = co_await done.async_wait(use_awaitable);
    co_await this_worker.send(Message("cancelled: " + ec.message()));
    (void)co_await this_worker.receive(as_tuple_t{});  // until the channel ends
  }, asio::detached);
  io.run();
  return 0;
}

TEST_CASE("ReusePort and SharedSocket: a user's cancellation ends an accept") {
  const std::string aborted = asio::error::make_error_code(asio::error::operation_aborted).message();
  run_bounded([&](asio::io_context& io) -> awaitable<void> {
    Master<ReusePort> master(io.get_executor());
    auto w = co_await master.fork(scenario_env("cancel_accept"));
    (void)reported_port((co_await w->receive()).data);
    CHECK((co_await w->receive()).data == "cancelled: " + aborted);
    co_await master.disconnect();
  });
  run_bounded([&](asio::io_context& io) -> awaitable<void> {
    Master<SharedSocket> master(io.get_executor());
    auto w = co_await master.fork(scenario_env("cancel_accept"));
    (void)reported_port((co_await w->receive()).data);
    CHECK((co_await w->receive()).data == "cancelled: " + aborted);
    co_await master.disconnect();
  });
}

// The same while the accept waits to try again after EMFILE: listens ("port N"), waits for
// "go" (a client is then in the backlog), leaves itself no fd free, starts one accept and
// cancels it 300 ms later (it has failed and waited at least twice by then): "cancelled:
// <error>". Then, with fds again, accepts the client and answers it "served".
WORKER_SCENARIO(cancel_accept_out_of_fds) {
  asio::io_context io;
  this_worker.start(io.get_executor());
  asio::co_spawn(io, [&io]() -> awaitable<void> {
    auto server = co_await listen_and_report_port();
    (void)co_await this_worker.receive();  // "go"
    const rlimit saved = leave_no_fd_free();
    asio::cancellation_signal cancel;
    cocluster::detail::async_latch<std::error_code> done(io.get_executor());
    server.accept(asio::bind_cancellation_slot(cancel.slot(), [&](std::error_code ec, tcp::socket) { done.set(ec); }));
    asio::steady_timer later(io, 300ms);
    co_await later.async_wait(use_awaitable);
    cancel.emit(asio::cancellation_type::terminal);
    const std::error_code ec = co_await done.async_wait(use_awaitable);
    ::setrlimit(RLIMIT_NOFILE, &saved);
    co_await this_worker.send(Message("cancelled: " + ec.message()));
    {  // (destroyed, not only closed: a disconnect waits until the sockets are gone)
      tcp::socket client = co_await server.accept();
      co_await asio::async_write(client, asio::buffer("served\n", 7), use_awaitable);
    }
    (void)co_await this_worker.receive(as_tuple_t{});  // until the channel ends
  }, asio::detached);
  io.run();
  return 0;
}

template <class Policy>
void cancel_while_out_of_fds_case() {
  const std::string aborted = asio::error::make_error_code(asio::error::operation_aborted).message();
  run_bounded([&](asio::io_context& io) -> awaitable<void> {
    Master<Policy> master(io.get_executor());
    const std::shared_ptr<Worker> w = co_await master.fork(scenario_env("cancel_accept_out_of_fds"));
    const Message port = co_await w->receive();
    tcp::socket client(io);
    co_await client.async_connect(tcp::endpoint(loopback(1), reported_port(port.data)), use_awaitable);
    co_await w->send(Message("go"));
    const Message cancelled = co_await w->receive();  // (not inside CHECK: a template)
    CHECK(cancelled.data == "cancelled: " + aborted);
    std::string reply;
    co_await asio::async_read(client, asio::dynamic_buffer(reply), as_tuple_t{});  // to EOF
    CHECK(reply == "served\n");
    co_await master.disconnect();
  });
}

TEST_CASE("SharedSocket and ReusePort: a user's cancellation ends an accept waiting to try again after EMFILE") {
  cancel_while_out_of_fds_case<SharedSocket>();
  cancel_while_out_of_fds_case<ReusePort>();
}

// ---- an accept whose handler has an executor of its own (a strand, another thread's loop,
// use_future): the steps that touch the runtime run on the runtime's executor ----

// Listens ("port N"), then starts two accepts of one server: A, whose handler is bound to
// another io_context that this worker runs only at the end, and B, a plain callback. Says
// "armed", answers B's connection "B", then runs the other io_context (A's handler gets its
// connection there) and answers A's "A". Taking a connection (accept4 on our own socket, or a
// hand-off from the queue with its acknowledgement) belongs to the accept, not to its
// handler: A takes the first connection although its handler cannot run yet, and the master,
// which hands the next connection only once the first is acknowledged (a window of 1), can
// then hand B the second.
WORKER_SCENARIO(accept_for_another_executor) {
  asio::io_context io;
  this_worker.start(io.get_executor());
  asio::co_spawn(io, [&io]() -> awaitable<void> {
    auto server = co_await listen_and_report_port();
    asio::io_context elsewhere;
    std::optional<tcp::socket> a, b;
    cocluster::detail::async_latch<std::error_code> b_done(io.get_executor());
    bool a_done = false;
    server.accept(asio::bind_executor(elsewhere, [&](std::error_code ec, tcp::socket s) {
      if (!ec) a = std::move(s);
      a_done = true;
    }));
    server.accept([&](std::error_code ec, tcp::socket s) {
      if (!ec) b = std::move(s);
      b_done.set(ec);
    });
    co_await this_worker.send(Message("armed"));
    if (!co_await b_done.async_wait(use_awaitable)) co_await asio::async_write(*b, asio::buffer("B\n", 2), use_awaitable);
    b.reset();
    server.close();  // (on B's failure, A ends with operation_aborted: nothing stays bound to `elsewhere`)
    while (!a_done) {  // A's handler runs in `elsewhere`, once it is queued there (its abort goes through `io`)
      elsewhere.poll();
      elsewhere.restart();
      if (!a_done) co_await asio::post(io, use_awaitable);
    }
    if (a) co_await asio::async_write(*a, asio::buffer("A\n", 2), use_awaitable);
    a.reset();
    (void)co_await this_worker.receive(as_tuple_t{});  // until the channel ends
  }, asio::detached);
  io.run();
  return 0;
}

// Compiled, never run: handlers whose executor is a strand of an any_io_executor (what
// asio::make_strand(co_await this_coro::executor) gives; asio::executor_work_guard alone cannot
// keep its work count), and use_future, for accept() and receive().
[[maybe_unused]] void handler_executors_compile(cocluster::Server<tcp>& server, asio::any_io_executor ex) {
  server.accept(asio::bind_executor(asio::make_strand(ex), [](std::error_code, tcp::socket) {}));
  (void)server.accept(asio::use_future);
  this_worker.receive(asio::bind_executor(asio::make_strand(ex), [](std::error_code, Message) {}));
  (void)this_worker.receive(asio::use_future);
}

template <class Policy>
void accept_for_another_executor_case(Policy policy) {
  run_bounded([&](asio::io_context& io) -> awaitable<void> {
    Master<Policy> master(io.get_executor(), {}, policy);
    const std::shared_ptr<Worker> w = co_await master.fork(scenario_env("accept_for_another_executor"));
    const Message port = co_await w->receive();  // (not inside an expression: a template)
    const tcp::endpoint where(loopback(1), reported_port(port.data));
    const Message armed = co_await w->receive();
    REQUIRE(armed.data == "armed");
    tcp::socket first(io), second(io);
    co_await first.async_connect(where, use_awaitable);
    co_await second.async_connect(where, use_awaitable);
    std::string to_second, to_first;
    co_await asio::async_read(second, asio::dynamic_buffer(to_second), as_tuple_t{});  // to EOF
    co_await asio::async_read(first, asio::dynamic_buffer(to_first), as_tuple_t{});
    CHECK(to_first == "A\n");  // (not inside CHECK_MESSAGE with the other: a template)
    CHECK(to_second == "B\n");
    co_await master.disconnect();
  }, 20s);
}

TEST_CASE("an accept whose handler runs on another executor takes its connection on the worker's own") {
  SUBCASE("RoundRobin{.window = 1}") { accept_for_another_executor_case(RoundRobin{.window = 1}); }
  SUBCASE("SharedSocket") { accept_for_another_executor_case(SharedSocket{}); }
  SUBCASE("ReusePort") { accept_for_another_executor_case(ReusePort{}); }
}

// ---- a connection the worker has taken and written to must never reach another
// worker (Node's child.js sends the ack before server.onconnection runs) ----

// Listens on 127.0.0.1:0 ("port N" to the master), takes one connection, writes "A\n" on it
// with a plain (synchronous) write, tells the master "served", then, with TEST_AFTER=hang,
// its loop stops turning for good (a hung request handler: only SIGKILL, e.g. the
// heartbeat's, ends it), else it keeps the connection and its loop running until the channel
// ends.
WORKER_SCENARIO(serve_then_report) {
  asio::io_context io;
  this_worker.start(io.get_executor());
  asio::co_spawn(io, []() -> awaitable<void> {
    auto server = co_await listen_and_report_port();
    tcp::socket s = co_await server.accept();
    asio::write(s, asio::buffer("A\n", 2));
    co_await this_worker.send(Message("served"));
    if (const char* after = std::getenv("TEST_AFTER"); after && std::string_view(after) == "hang")
      for (;;) std::this_thread::sleep_for(std::chrono::hours(1));
    (void)co_await this_worker.receive(as_tuple_t{});  // until the channel ends
  }, asio::detached);
  io.run();
  return 0;
}

namespace {

// A client that sent "hi" to a serve_then_report worker at `where` and read its "A".
awaitable<tcp::socket> client_served_by_first(tcp::endpoint where) {
  tcp::socket client(co_await asio::this_coro::executor);
  co_await client.async_connect(where, use_awaitable);
  co_await asio::async_write(client, asio::buffer("hi\n", 3), use_awaitable);
  std::string reply;
  co_await asio::async_read_until(client, asio::dynamic_buffer(reply), '\n', use_awaitable);
  CHECK(reply == "A\n");  // worker 1 took the connection and answered on it
  co_return client;
}

// Once worker 1 has died: its client reads the end of the connection, nothing from another worker.
awaitable<void> expect_no_second_answer(tcp::socket client) {
  std::string reply;
  co_await asio::async_read(client, asio::dynamic_buffer(reply), as_tuple_t{});  // to EOF
  CHECK_MESSAGE(reply.empty(), "the connection worker 1 served was handed to worker 2 as well: ", reply);
}

}  // namespace

TEST_CASE("a connection a worker took and wrote to is not handed to another worker when the first dies") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<RoundRobin> master(io.get_executor());
    Env hang = scenario_env("serve_then_report");
    hang["TEST_AFTER"] = "hang";
    auto first = co_await master.fork(hang);
    const std::string report = (co_await first->receive()).data;
    co_await first->listening();
    const tcp::endpoint where(loopback(1), reported_port(report));
    tcp::socket client = co_await client_served_by_first(where);
    // Sent by worker 1 after it took the connection: the channel is in order, so its ack
    // (Node: sent before the server sees the connection) has been read by now.
    CHECK((co_await first->receive()).data == "served");
    auto second = co_await fork_second_on(master, report);
    first->kill(SIGKILL);  // what the heartbeat does to a hung worker
    CHECK((co_await first->exited()).signal == SIGKILL);
    co_await expect_no_second_answer(std::move(client));
    co_await master.disconnect();
  }, 60s);
}

TEST_CASE("the ack of a connection precedes what the worker sends after accept() returned it") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    // 127.0.0.1's connections go to worker 1 while it lives, else to worker 2.
    auto route = [](const Remote&, const HandoffListener::Members& live) { return live.count(1) ? 1 : 2; };
    Master<Dispatch<decltype(route)>> master(io.get_executor(), {}, Dispatch(route));
    auto first = co_await master.fork(scenario_env("serve_then_report"));
    const std::string report = (co_await first->receive()).data;
    co_await first->listening();
    auto second = co_await fork_second_on(master, report);
    const tcp::endpoint where(loopback(1), reported_port(report));
    tcp::socket client(io);
    std::string reply;
    cocluster::detail::async_latch<> answered(io.get_executor());
    asio::co_spawn(io, [&]() -> awaitable<void> {
      co_await client.async_connect(where, use_awaitable);
      co_await asio::async_write(client, asio::buffer("hi\n", 3), use_awaitable);
      co_await asio::async_read_until(client, asio::dynamic_buffer(reply), '\n', use_awaitable);
      answered.set();
    }, asio::detached);
    // Waiting before worker 1 sends it: the master's user code runs as "served" is read.
    CHECK((co_await first->receive()).data == "served");
    first->kill(SIGKILL);  // Node would have read worker 1's ack of the connection before this
    CHECK((co_await first->exited()).signal == SIGKILL);
    co_await answered.async_wait(use_awaitable);
    CHECK(reply == "A\n");
    reply.clear();
    co_await asio::async_read(client, asio::dynamic_buffer(reply), as_tuple_t{});  // to EOF
    CHECK_MESSAGE(reply.empty(), "the connection worker 1 served was handed to worker 2 as well: ", reply);
    co_await master.disconnect();
  }, 60s);
}

// Twice: with the killed worker's own socket empty, and with a message of the master's unread
// in it (its loop hung after it served): the kernel then reports ECONNRESET to the master once,
// before the acks still queued for it, which must be read all the same.
TEST_CASE("a connection a worker took is not handed to another worker when the master kills the first before reading its ack") {
  for (const bool unread_by_worker : {false, true}) {
    CAPTURE(unread_by_worker);
    run_bounded([unread_by_worker](asio::io_context& io) -> awaitable<void> {
      Settings settings;
      settings.max_unread_messages = 1;  // one unread message of a worker's pauses the master's reading of it
      Master<RoundRobin> master(io.get_executor(), settings);
      Env env = scenario_env("serve_then_report");
      if (unread_by_worker) env["TEST_AFTER"] = "hang";
      auto first = co_await master.fork(env);
      const Address bound = co_await first->listening();
      // Its "port N", never received, pauses the reading: the ack of the connection below will
      // wait in the channel, unread, as when kill() comes before the master's loop reads it.
      co_await poll_until([&] { return first->unread_messages() == 1; });
      const std::string report = "port " + std::to_string(bound.port);
      const tcp::endpoint where(loopback(1), bound.port);
      tcp::socket client = co_await client_served_by_first(where);
      CHECK(first->unread_messages() == 1);  // and the master has read nothing since "port N"
      auto second = co_await fork_second_on(master, report);
      if (unread_by_worker) co_await first->send(Message("never read"));  // its loop has stopped
      first->kill(SIGKILL);
      CHECK(!first->is_connected());
      CHECK((co_await first->exited()).signal == SIGKILL);
      co_await expect_no_second_answer(std::move(client));
      co_await master.disconnect();
    }, 60s);
  }
}

// Keeps running when its channel ends (on_disconnect does not exit); listens on 127.0.0.1:0
// ("port N"), takes one connection and writes "A\n" on it, then closes it.
WORKER_SCENARIO(serve_past_channel_end) {
  asio::io_context io;
  this_worker.start(io.get_executor());
  this_worker.on_disconnect([] {});  // finish what we serve, then end when the loop runs dry
  asio::co_spawn(io, []() -> awaitable<void> {
    auto server = co_await listen_and_report_port();
    auto [ec, s] = co_await server.accept(as_tuple_t{});
    if (ec) co_return;
    co_await asio::async_write(s, asio::buffer("A\n", 2), as_tuple_t{});
  }, asio::detached);
  io.run();
  return 0;
}

TEST_CASE("a worker that reads a newconn and its channel's end in one turn still acks the connection it took") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    bool routed = false;
    auto route = [&routed](const Remote&, const HandoffListener::Members& live) {
      routed = true;
      return live.count(1) ? 1 : 2;
    };
    Master<Dispatch<decltype(route)>> master(io.get_executor(), {}, Dispatch(route));
    auto first = co_await master.fork(scenario_env("serve_past_channel_end"));
    const std::string report = (co_await first->receive()).data;
    co_await first->listening();
    auto second = co_await fork_second_on(master, report);
    const tcp::endpoint where(loopback(1), reported_port(report));
    REQUIRE(::kill(first->pid(), SIGSTOP) == 0);  // the newconn and the EOF wait in its socket
    tcp::socket client(io);
    co_await client.async_connect(where, use_awaitable);
    co_await asio::async_write(client, asio::buffer("hi\n", 3), use_awaitable);
    // The route is asked, and the newconn written, in one distribution.
    co_await poll_until([&] { return routed; });
    first->close_channel();  // Node: worker.process.disconnect(); the master still reads the worker
    REQUIRE(::kill(first->pid(), SIGCONT) == 0);
    CHECK((co_await first->exited()).code == 0);
    std::string reply;
    co_await asio::async_read(client, asio::dynamic_buffer(reply), as_tuple_t{});  // to EOF
    CHECK_MESSAGE(reply == "A\n", "worker 1 took the connection, yet: ", reply);
    co_await master.disconnect();
  }, 60s);
}

// ---- connections waiting in the master, in per-worker lines ----

// Listens on 127.0.0.1:0 ("port N"), then answers each connection with "worker <id> <n>\n", n
// counting from 0 in the order accept() returned them (the order the master handed them), and
// closes it. It reads nothing: its clients send nothing, so the close is a clean FIN.
WORKER_SCENARIO(serve_numbered) {
  asio::io_context io;
  this_worker.start(io.get_executor());
  asio::co_spawn(io, []() -> awaitable<void> {
    auto server = co_await listen_and_report_port();
    for (int n = 0;; ++n) {
      auto [ec, s] = co_await server.accept(as_tuple_t{});
      if (ec) co_return;
      const std::string reply = "worker " + std::to_string(this_worker.id()) + " " + std::to_string(n) + "\n";
      co_await asio::async_write(s, asio::buffer(reply), as_tuple_t{});
    }
  }, asio::detached);
  io.run();
  return 0;
}

namespace {

// `replies.size()` clients from `from`, each connected once the one before is (so the master
// accepts them in that order); client k's answer, read to EOF, goes to replies[k], and
// `answered` counts the answers (or ends: an empty reply).
awaitable<void> connect_in_order(asio::ip::address_v4 from, tcp::endpoint where, std::vector<std::string>& replies,
                                 std::size_t& answered) {
  auto ex = co_await asio::this_coro::executor;
  for (std::string& reply : replies) {
    auto s = std::make_shared<tcp::socket>(ex);
    s->open(tcp::v4());
    s->bind(tcp::endpoint(from, 0));
    co_await s->async_connect(where, use_awaitable);
    asio::async_read(*s, asio::dynamic_buffer(reply), [s, &answered](std::error_code, std::size_t) { ++answered; });
  }
}

std::string numbered_reply(int worker, std::size_t n) {
  return "worker " + std::to_string(worker) + " " + std::to_string(n) + "\n";
}

// How many of `replies` (numbered_reply's) came from worker `id`.
std::size_t replies_by(const std::vector<std::string>& replies, int id) {
  const std::string by = "worker " + std::to_string(id) + " ";
  return static_cast<std::size_t>(std::count_if(replies.begin(), replies.end(), [&](const std::string& r) { return r.starts_with(by); }));
}

}  // namespace

TEST_CASE("Dispatch: connections waiting for one worker are not routed again when another worker takes connections") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    // 127.0.0.1's clients go to worker 1, the others to worker 2; `calls` counts the routing.
    std::size_t calls = 0;
    auto route = [&calls](const Remote& r, const HandoffListener::Members&) {
      ++calls;
      return r.address() == asio::ip::address(loopback(1)) ? 1 : 2;
    };
    Master<Dispatch<decltype(route)>> master(io.get_executor(), {}, Dispatch(route, 1));
    auto [workers, where] = co_await start_serving(master, 2, scenario_env("serve_numbered"));
    REQUIRE(::kill(workers[0]->pid(), SIGSTOP) == 0);
    // Worker 1's clients: the first is handed to it (its window of 1), 99 wait for it.
    std::vector<std::string> first(100);
    std::size_t first_answered = 0;
    co_await connect_in_order(loopback(1), where, first, first_answered);
    co_await poll_until([&] { return calls >= first.size(); });
    CHECK(calls == first.size());  // each accepted and routed once (none asked again as more came)
    // Worker 2 takes 50 connections, one after the other, each acknowledged: each is routed
    // once, and none of the 99 waiting for worker 1 is routed again (before: 99 calls per ack).
    std::vector<std::string> second(1);
    for (int i = 0; i < 50; ++i) {
      std::size_t answered = 0;
      co_await connect_in_order(loopback(2), where, second, answered);
      co_await poll_until([&] { return answered == 1; });
      CHECK(second[0] == numbered_reply(2, i));
      second[0].clear();
    }
    CHECK(calls == first.size() + 50);
    CHECK(first_answered == 0);
    // Worker 1 resumes: its clients are answered in the order they connected, each waiting
    // one routed once more (when worker 1 had room for it).
    REQUIRE(::kill(workers[0]->pid(), SIGCONT) == 0);
    co_await poll_until([&] { return first_answered == first.size(); });
    for (std::size_t k = 0; k < first.size(); ++k) CHECK(first[k] == numbered_reply(1, k));
    CHECK(calls == first.size() + 50 + (first.size() - 1));
    co_await master.disconnect();
  }, 60s);
}

TEST_CASE("Dispatch: a SIGKILLed worker's full line goes to another worker ahead of its own line, each in order, every connection answered") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    // 127.0.0.1's clients go to worker 1 while it lives, then to worker 2; 127.0.0.2's to
    // worker 2; 127.0.0.3's to worker 3 (which keeps the master accepting while 1 and 2 stop).
    std::size_t calls = 0;
    auto route = [&calls](const Remote& r, const HandoffListener::Members& live) {
      ++calls;
      const int octet = r.address().to_v4().to_bytes()[3];
      return octet == 1 && !live.count(1) ? 2 : octet;
    };
    Master<Dispatch<decltype(route)>> master(io.get_executor(), {}, Dispatch(route, 1));
    auto [workers, where] = co_await start_serving(master, 3, scenario_env("serve_numbered"));
    REQUIRE(::kill(workers[0]->pid(), SIGSTOP) == 0);
    REQUIRE(::kill(workers[1]->pid(), SIGSTOP) == 0);
    // Worker 1: one handed to it, a full line of max_waiting_per_worker waiting for it.
    // Worker 2: one handed to it, 19 waiting for it.
    std::vector<std::string> ones(1 + HandoffListener::max_waiting_per_worker), twos(20);
    std::size_t answered = 0;
    co_await connect_in_order(loopback(1), where, ones, answered);
    co_await connect_in_order(loopback(2), where, twos, answered);
    co_await poll_until([&] { return calls >= ones.size() + twos.size(); });
    CHECK(calls == ones.size() + twos.size());  // each accepted and routed once
    workers[0]->kill(SIGKILL);
    CHECK((co_await workers[0]->exited()).signal == SIGKILL);
    // Its connections (the one handed to it, then its line, in order) were given back and
    // routed again, to worker 2, and none was closed for want of room there.
    CHECK(calls == 2 * ones.size() + twos.size());
    CHECK(answered == 0);
    // A fourth worker joins: every line is asked again. Worker 2's now holds more than
    // max_waiting_per_worker (257 given back, 19 of its own): none of them is closed.
    auto fourth = co_await master.fork(scenario_env("serve_numbered"));
    co_await fourth->listening();
    REQUIRE(::kill(workers[1]->pid(), SIGCONT) == 0);
    co_await poll_until([&] { return answered == ones.size() + twos.size(); });
    // Worker 2 takes the one it held, then worker 1's connections in order, then its own line.
    CHECK(twos[0] == numbered_reply(2, 0));
    for (std::size_t k = 0; k < ones.size(); ++k) CHECK(ones[k] == numbered_reply(2, 1 + k));
    for (std::size_t k = 1; k < twos.size(); ++k) CHECK(twos[k] == numbered_reply(2, ones.size() + k));
    co_await master.disconnect();
  }, 60s);
}

TEST_CASE("Sticky: a SIGKILLed worker's waiting clients go to their next worker, each source in order; another worker's waiting clients stay") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<Sticky> master(io.get_executor(), {}, Sticky{.window = 1});
    auto [workers, where] = co_await start_serving(master, 3, scenario_env("serve_numbered"));
    // Which worker serves 127.0.0.1 .. 127.0.0.20 (fixed: the hash of fixed addresses and ids).
    std::map<int, std::vector<int>> sources_of;  // worker id -> the last octets of its clients
    std::map<int, std::size_t> served;           // worker id -> connections it has answered
    const tcp::endpoint to = where;  // (clang: a lambda cannot capture a structured binding)
    auto ask_one = [&](int octet) -> awaitable<std::string> {
      std::vector<std::string> reply(1);
      std::size_t answered = 0;
      co_await connect_in_order(loopback(octet), to, reply, answered);
      co_await poll_until([&] { return answered == 1; });
      co_return reply[0];
    };
    for (int octet = 1; octet <= 20; ++octet) {
      const std::string reply = co_await ask_one(octet);
      REQUIRE_MESSAGE(reply.rfind("worker ", 0) == 0, reply);
      const int id = std::stoi(reply.substr(7));
      sources_of[id].push_back(octet);
      ++served[id];
    }
    REQUIRE(sources_of.size() == 3);
    REQUIRE(::kill(workers[0]->pid(), SIGSTOP) == 0);
    REQUIRE(::kill(workers[1]->pid(), SIGSTOP) == 0);
    // 5 clients from each source of workers 1 and 2, source after source: each worker is
    // handed one (its window), the others wait in its line.
    constexpr std::size_t per_source = 5;
    std::map<int, std::vector<std::string>> replies;  // by source
    std::size_t answered = 0, clients = 0;
    for (int w : {1, 2})
      for (int octet : sources_of[w]) replies[octet].resize(per_source), clients += per_source;
    for (int w : {1, 2})
      for (int octet : sources_of[w]) co_await connect_in_order(loopback(octet), where, replies[octet], answered);
    // Worker 3 answers a client that connected after them all: every one has been accepted.
    const std::string barrier = co_await ask_one(sources_of[3].front());
    CHECK(barrier == numbered_reply(3, served[3]++));
    workers[0]->kill(SIGKILL);
    CHECK((co_await workers[0]->exited()).signal == SIGKILL);
    REQUIRE(::kill(workers[1]->pid(), SIGCONT) == 0);
    co_await poll_until([&] { return answered == clients; });
    // Each source's clients were answered by one worker, in the order they connected: worker
    // 2's by worker 2 (none moved), worker 1's by their next worker. On worker 2, worker 1's
    // clients (given back) came before its own waiting ones.
    std::size_t last_given_back = 0, first_own = SIZE_MAX;
    std::map<int, int> moved_to;  // worker id -> worker 1's sources it took
    for (int w : {1, 2})
      for (int octet : sources_of[w]) {
        const std::vector<std::string>& r = replies[octet];
        REQUIRE_MESSAGE(r.front().rfind("worker ", 0) == 0, "127.0.0.", octet, ": ", r.front());
        const int by = std::stoi(r.front().substr(7));
        if (w == 2) {
          CHECK(by == 2);
        } else {
          CHECK(by != 1);
          ++moved_to[by];
        }
        std::size_t previous = 0;
        for (std::size_t k = 0; k < r.size(); ++k) {
          REQUIRE_MESSAGE(r[k].rfind("worker " + std::to_string(by) + " ", 0) == 0, "127.0.0.", octet, " #", k, ": ", r[k]);
          const std::size_t n = std::stoul(r[k].substr(r[k].rfind(' ') + 1));
          if (k != 0) CHECK(n > previous);
          previous = n;
          if (by != 2) continue;
          if (w == 1) last_given_back = std::max(last_given_back, n);
          else if (octet != sources_of[2].front() || k != 0) first_own = std::min(first_own, n);  // (not the one it held)
        }
      }
    CHECK(last_given_back < first_own);
    // (Fixed by the hash: worker 1's sources went to both workers, so the order on worker 2 was checked.)
    CHECK(moved_to.size() == 2);
    MESSAGE("sources of workers 1, 2, 3: ", sources_of[1].size(), ", ", sources_of[2].size(), ", ", sources_of[3].size(),
            "; worker 1's went to 2: ", moved_to[2], ", to 3: ", moved_to[3]);
    co_await master.disconnect();
  }, 60s);
}

TEST_CASE("Dispatch: a connection waiting for a worker that has left is routed again at the next event, not only when a worker joins") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    // The user's own table says where 127.0.0.1's clients go, and learns of worker 1's exit
    // after the listener does (as a session table updated from an exit handler would).
    int home = 1;
    std::size_t calls = 0;
    auto route = [&home, &calls](const Remote& r, const HandoffListener::Members&) {
      ++calls;
      return r.address() == asio::ip::address(loopback(1)) ? home : 2;
    };
    Master<Dispatch<decltype(route)>> master(io.get_executor(), {}, Dispatch(route));
    auto [workers, where] = co_await start_serving(master, 2, scenario_env("serve_numbered"));
    workers[0]->kill(SIGKILL);
    CHECK((co_await workers[0]->exited()).signal == SIGKILL);  // it has left the listener before
    // A client of worker 1 while the table still names it: it waits for an id that is no member.
    std::vector<std::string> stale(1);
    std::size_t stale_answered = 0;
    co_await connect_in_order(loopback(1), where, stale, stale_answered);
    co_await poll_until([&] { return calls >= 1; });
    home = 2;  // the table learns of the exit; no worker joins from here on
    // A client of worker 2: its accept is an event, at which the waiting one is asked again
    // and handed first (before, it waited until some worker joined: here, for ever).
    std::vector<std::string> fresh(1);
    std::size_t fresh_answered = 0;
    co_await connect_in_order(loopback(2), where, fresh, fresh_answered);
    co_await poll_until([&] { return fresh_answered == 1; });
    REQUIRE(fresh[0] == numbered_reply(2, 1));  // "worker 2 0": the waiting one was not asked again
    co_await poll_until([&] { return stale_answered == 1; });
    CHECK(stale[0] == numbered_reply(2, 0));
    co_await master.disconnect();
  }, 30s);
}

namespace {

// The server side of 127.0.0.1:port: its connections (accepted or not), and how many of them
// wait in the listening socket's accept queue, i.e. the ones the master has not accepted.
// Nullopt while nothing listens there.
struct server_side {
  std::size_t connections = 0;
  std::size_t queued = 0;
};
std::optional<server_side> server_side_of(unsigned short port) {
  std::optional<server_side> found;
  std::size_t connections = 0;
  for (const tcp_socket_line& s : loopback_tcp_sockets(port)) {
    if (s.state == 1) ++connections;                           // TCP_ESTABLISHED
    if (s.state == 10) found = server_side{0, s.rx_queue};     // TCP_LISTEN
  }
  if (found) found->connections = connections;
  return found;
}

}  // namespace

TEST_CASE("RuntimePolicy: a window given is the chosen policy's; without one the policy keeps its own (8)") {
  // Both workers are stopped: neither acknowledges, so round robin (LeastConnections: the one
  // with fewer in flight) hands them connections until each holds its window, and the rest wait
  // in the kernel's accept queue. Worker 2 then goes on and answers all but worker 1's, which
  // worker 1 answers when it goes on. (Neither has kept pace: the falling-behind rule does not
  // judge them.)
  const std::pair<Scheduling, std::optional<std::size_t>> cases[] = {
      {Scheduling::round_robin, std::nullopt}, {Scheduling::round_robin, 1}, {Scheduling::round_robin, 4},
      {Scheduling::least_connections, std::nullopt}};
  for (const auto& [scheduling_case, window_case] : cases) {
    const Scheduling scheduling = scheduling_case;  // (clang 14 does not capture a structured binding)
    const std::optional<std::size_t> window = window_case;
    CAPTURE(scheduling == Scheduling::least_connections);
    CAPTURE(window.value_or(0));
    run_bounded([scheduling, window](asio::io_context& io) -> awaitable<void> {
      Master<RuntimePolicy> master(io.get_executor(), {}, RuntimePolicy(scheduling, window));
      CHECK(master.policy().window() == window);
      auto [workers, where] = co_await start_serving(master, 2, scenario_env("serve_numbered"));
      for (auto& w : workers) REQUIRE(::kill(w->pid(), SIGSTOP) == 0);
      const std::size_t held = window.value_or(8);
      std::vector<std::string> replies(20);
      std::size_t answered = 0;
      co_await connect_in_order(loopback(1), where, replies, answered);
      // Every connection has reached the server side, and the master has accepted (and handed)
      // all it will. (Another window leaves another number waiting: this wait never ends, and
      // the test fails on its time bound.)
      const unsigned short port = where.port();  // (clang 14 does not capture a structured binding)
      co_await poll_until([&] {
        auto side = server_side_of(port);
        return side && side->connections == replies.size() && side->queued == replies.size() - 2 * held;
      });
      REQUIRE(::kill(workers[1]->pid(), SIGCONT) == 0);
      co_await poll_until([&] { return answered == replies.size() - held; });
      REQUIRE(::kill(workers[0]->pid(), SIGCONT) == 0);
      co_await poll_until([&] { return answered == replies.size(); });
      CHECK(replies_by(replies, workers[0]->id()) == held);
      co_await master.disconnect();
    }, 30s);
  }
}

// One client, answered before the next one connects: its reply (serve_numbered's).
awaitable<std::string> one_reply(tcp::endpoint where) {
  std::vector<std::string> reply(1);
  std::size_t answered = 0;
  co_await connect_in_order(loopback(1), where, reply, answered);
  co_await poll_until([&] { return answered == 1; });
  co_return reply[0];
}

// The falling-behind tests' close: both workers stopped, `clients` connect, and exactly 3 wait
// in the accept queue (the rest fill the two workers' windows as the rule left them). Worker 2
// goes on and answers all but the `first_holds` worker 1 was handed (the 3 go to worker 2:
// worker 1 has no room); then worker 1 answers those. Returns how many replies are worker 1's.
// (Another split never reaches these waits: the test fails on its time bound.)
awaitable<std::size_t> three_wait_then_second_first(tcp::endpoint where, const Worker& first, const Worker& second,
                                                    std::size_t clients, std::size_t first_holds) {
  const unsigned short port = where.port();
  REQUIRE(::kill(first.pid(), SIGSTOP) == 0);
  REQUIRE(::kill(second.pid(), SIGSTOP) == 0);
  std::vector<std::string> replies(clients);
  std::size_t answered = 0;
  co_await connect_in_order(loopback(1), where, replies, answered);
  co_await poll_until([&] {
    auto side = server_side_of(port);
    return side && side->connections == replies.size() && side->queued == 3;
  });
  REQUIRE(::kill(second.pid(), SIGCONT) == 0);
  co_await poll_until([&] { return answered == replies.size() - first_holds; });
  REQUIRE(::kill(first.pid(), SIGCONT) == 0);
  co_await poll_until([&] { return answered == replies.size(); });
  co_return replies_by(replies, first.id());
}

// The falling-behind tests' opening: worker 1 (serving alone, `first`) is stopped and handed
// client A, whose ack can only be late (`a` gets A's reply once worker 1 goes on;
// `past_slow_ack` expires 4 x slow_ack after the hand-off). Then worker 2 joins and answers 8
// clients in turn: connections handed after A, of whose acks one within slow_ack is the evidence
// the rule needs. (LeastConnections: each after worker 2's report of the one before, so that
// worker 2 is lighter than worker 1 again, not equal.)
template <class Policy>
awaitable<std::shared_ptr<Worker>> stop_first_then_join(Master<Policy>& master, tcp::endpoint where, pid_t first,
                                                        std::vector<std::string>& a, std::size_t& a_answered,
                                                        asio::steady_timer& past_slow_ack) {
  const unsigned short port = where.port();
  REQUIRE(::kill(first, SIGSTOP) == 0);
  co_await connect_in_order(loopback(1), where, a, a_answered);
  co_await poll_until([&] {  // accepted, so handed
    auto side = server_side_of(port);
    return side && side->connections == 1 && side->queued == 0;
  });
  past_slow_ack.expires_after(4 * HandoffListener::slow_ack);
  auto second = co_await master.fork(scenario_env("serve_numbered"));
  const Message hello = co_await second->receive();
  CHECK(hello.data == "port " + std::to_string(port));
  co_await second->listening();
  for (std::size_t k = 0; k < 8; ++k) {
    const std::string reply = co_await one_reply(where);
    CHECK(reply == numbered_reply(second->id(), k));
    if constexpr (std::is_same_v<Policy, LeastConnections>)
      co_await poll_until([&] { return second->connections_served() == k + 1 && second->open_connections() == 0; });
  }
  co_return second;
}

// A worker that falls behind (the ack of one of its hand-offs comes later than
// HandoffListener::slow_ack, while the other worker acknowledged one handed after it within
// slow_ack) is handed one connection at a time, whatever the policy's window; the other worker
// takes the rest. The stops make worker 1's ack late: the test waits past slow_ack before it
// continues worker 1 (a lower bound). Worker 2's evidence needs one of its 8 acks within
// slow_ack, and so does worker 1's that it kept pace before (only such a worker is judged):
// the two timing assumptions here, of one kind.
template <class Policy>
awaitable<void> behind_holds_one(asio::io_context& io, Policy policy, std::size_t window) {
  Master<Policy> master(io.get_executor(), {}, policy);
  auto [workers, where] = co_await start_serving(master, 1, scenario_env("serve_numbered"));
  const pid_t first = workers[0]->pid();
  // Worker 1 keeps pace first: 8 clients in turn, of whose acks one within slow_ack is enough.
  constexpr std::size_t warm = 8;
  for (std::size_t k = 0; k < warm; ++k) {
    const std::string reply = co_await one_reply(where);
    CHECK(reply == numbered_reply(workers[0]->id(), k));
  }
  std::vector<std::string> a(1);
  std::size_t a_answered = 0;
  asio::steady_timer past_slow_ack(io);
  auto second = co_await stop_first_then_join(master, where, first, a, a_answered, past_slow_ack);
  co_await past_slow_ack.async_wait(use_awaitable);
  REQUIRE(::kill(first, SIGCONT) == 0);
  co_await poll_until([&] { return a_answered == 1; });
  CHECK(a[0] == numbered_reply(workers[0]->id(), warm));
  // Both stopped, window + 4 clients: worker 1 is handed one, worker 2 its window, 3 wait.
  // Worker 2 goes on and answers all but worker 1's one (the 3 come to it: worker 1 has no
  // room); then worker 1 answers that one. (Had worker 1 its window too, none would wait, and
  // worker 2 would never answer all but one: these waits would not end, and the test fails on
  // its time bound.)
  const std::size_t by_first = co_await three_wait_then_second_first(where, *workers[0], *second, window + 4, 1);
  CHECK(by_first == 1);
  co_await master.disconnect();
}

TEST_CASE("A worker that falls behind is handed one connection at a time, whatever the window (RoundRobin, LeastConnections)") {
  SUBCASE("RoundRobin{.window = 4}") {
    run_bounded([](asio::io_context& io) { return behind_holds_one(io, RoundRobin{.window = 4}, 4); }, 30s);
  }
  SUBCASE("LeastConnections (window 8)") {
    run_bounded([](asio::io_context& io) { return behind_holds_one(io, LeastConnections{}, 8); }, 30s);
  }
}

// A worker just started is not judged: its first acks may come late (a new process's first
// accepts are slow, over slow_ack under ASan), and a window of 1 for it would send bursts to a
// heavier peer (LeastConnections with one worker holding 50 took 22 of 50 that way in CI).
// Worker 1 is stopped before it takes anything, so its first ack is late while worker 2's
// come in time; it keeps its window: with both stopped, each is handed its window and 3 wait.
// (Judged, it would hold one and 6 would wait: the wait would not end.)
TEST_CASE("A worker just started is not judged by its first acks: it keeps its window") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    constexpr std::size_t window = 4;
    Master<RoundRobin> master(io.get_executor(), {}, RoundRobin{.window = window});
    auto [workers, where] = co_await start_serving(master, 1, scenario_env("serve_numbered"));
    const pid_t first = workers[0]->pid();
    std::vector<std::string> a(1);  // worker 1 takes nothing before A
    std::size_t a_answered = 0;
    asio::steady_timer past_slow_ack(io);
    auto second = co_await stop_first_then_join(master, where, first, a, a_answered, past_slow_ack);
    co_await past_slow_ack.async_wait(use_awaitable);
    REQUIRE(::kill(first, SIGCONT) == 0);
    co_await poll_until([&] { return a_answered == 1; });  // late, and worker 2 kept pace meanwhile
    const std::size_t by_first = co_await three_wait_then_second_first(where, *workers[0], *second, 2 * window + 3, window);
    CHECK(by_first == window);
    co_await master.disconnect();
  }, 30s);
}

// Late together is not behind: both workers stopped past slow_ack while each holds two
// hand-offs made in turn, as when the master is slow to read every ack. Worker 2 goes on
// first, so worker 1's late acks are read after worker 2's ack of a later hand-off; that was
// late too, so it says nothing against worker 1, and both keep their window. (Counted as
// evidence, they made worker 1's window 1: 6 clients would wait below, not 3.) Both kept pace
// before they stopped, so the rule does judge them here.
TEST_CASE("Workers late together do not fall behind: each keeps its window") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    constexpr std::size_t window = 4;
    Master<RoundRobin> master(io.get_executor(), {}, RoundRobin{.window = window});
    auto [workers, where] = co_await start_serving(master, 2, scenario_env("serve_numbered"));
    const unsigned short port = where.port();  // (clang 14 does not capture a structured binding)
    // Both keep pace first (only such a worker is judged): 16 clients in turn, 8 each, of whose
    // acks one within slow_ack each is enough for the rule to look at them below.
    std::vector<std::string> warm(16);
    for (auto& reply : warm) reply = co_await one_reply(where);
    for (auto& w : workers) CHECK(replies_by(warm, w->id()) == 8);
    for (auto& w : workers) REQUIRE(::kill(w->pid(), SIGSTOP) == 0);
    std::vector<std::string> first(4);
    std::size_t answered = 0;
    co_await connect_in_order(loopback(1), where, first, answered);
    co_await poll_until([&] {
      auto side = server_side_of(port);
      return side && side->connections == first.size() && side->queued == 0;
    });
    asio::steady_timer past_slow_ack(io, 4 * HandoffListener::slow_ack);
    co_await past_slow_ack.async_wait(use_awaitable);
    REQUIRE(::kill(workers[1]->pid(), SIGCONT) == 0);
    co_await poll_until([&] { return answered == 2; });
    REQUIRE(::kill(workers[0]->pid(), SIGCONT) == 0);
    co_await poll_until([&] { return answered == first.size(); });
    for (auto& w : workers) CHECK(replies_by(first, w->id()) == 2);  // handed in turn: two each
    // Both stopped, two windows and 3 more: each is handed its window, 3 wait. Worker 2 goes on
    // and answers all but worker 1's window; then worker 1 answers its window. (Had worker 1
    // fallen behind, it would hold one and 6 would wait: the first wait would not end.)
    const std::size_t by_first = co_await three_wait_then_second_first(where, *workers[0], *workers[1], 2 * window + 3, window);
    CHECK(by_first == window);
    co_await master.disconnect();
  }, 30s);
}
