// Node's child_process example "sending a socket object", in C++: two workers started with the
// arguments `normal` and `special` (as child_process.fork(module, ['normal'])), and a master
// that routes each connection by the client's address. Each worker answers
// "handled by <priority> priority" and closes.
//   priority_routing --port P [--host H] [--special ADDR] [--mode send|dispatch] [--grace SECONDS]
// --mode send (the default) is the reference's: the master owns the server and never reads a
// connection (as pauseOnConnect), and sends it with worker->send({"socket", socket}) to the
// special worker when the client's address is ADDR (default 74.125.127.100, the reference's),
// else to the normal one. --mode dispatch is the same routing as a policy, Dispatch<F>: the
// workers listen() and the master hands each connection to the worker F names.
// Prints `listening on HOST:PORT` once both workers are ready (--port 0: the real port).
// SIGTERM or SIGINT: the master disconnects both workers, each of which answers the
// connections it has taken and exits (one still connected after --grace seconds, 5 by default,
// is killed with SIGKILL, and what it had taken is lost); exit code 0. Connections the master holds are closed unanswered,
// as in Node: --mode send closes its server first, then the sockets still waiting for room in
// a worker's channel; --mode dispatch closes the listener, and with it the connections waiting
// there for a worker (say, for a stalled one), when the last worker leaves it. A worker's
// death, or its exit before it is ready, also stops the master, with exit code 1: nothing
// replaces the worker.
// Bad arguments: a message and exit 2. A socket closed in transit is reported by its worker,
// which carries on.
#include "cocluster/cocluster.hpp"

#include <asio.hpp>
#include <asio/experimental/awaitable_operators.hpp>
#include <fmt/core.h>

#include <sys/resource.h>

#include <algorithm>
#include <charconv>
#include <csignal>
#include <cstdlib>
#include <functional>
#include <optional>
#include <string>

using asio::awaitable;
using asio::use_awaitable;
using asio::ip::tcp;
using cocluster::as_tuple;

namespace {

struct options {
  std::string host = "127.0.0.1";
  int port = -1;
  asio::ip::address special = asio::ip::make_address("74.125.127.100");
  bool dispatch = false;
  std::chrono::seconds grace{5};  // how long a disconnecting worker may take before SIGKILL
};

options parse(int argc, char** argv) {
  options o;
  for (int i = 1; i < argc; ++i) {
    const std::string_view a = argv[i];
    if (a != "--port" && a != "--host" && a != "--special" && a != "--mode" && a != "--grace")
      throw std::invalid_argument(fmt::format("unknown argument {}", a));
    if (i + 1 >= argc) throw std::invalid_argument(fmt::format("{} needs a value", a));
    const std::string_view v = argv[++i];
    std::error_code ec;
    if (a == "--port") {
      auto [p, err] = std::from_chars(v.data(), v.data() + v.size(), o.port);
      if (err != std::errc() || p != v.data() + v.size()) throw std::invalid_argument(fmt::format("--port {}: not a number", v));
      if (o.port < 0 || o.port > 65535) throw std::invalid_argument(fmt::format("--port {}: out of range 0..65535", v));
    } else if (a == "--host") {
      o.host = v;
      asio::ip::make_address(o.host, ec);
      if (ec) throw std::invalid_argument(fmt::format("--host {}: not an IP address", v));
    } else if (a == "--special") {
      o.special = asio::ip::make_address(std::string(v), ec);
      if (ec) throw std::invalid_argument(fmt::format("--special {}: not an IP address", v));
    } else if (a == "--grace") {
      int seconds = -1;
      auto [p, err] = std::from_chars(v.data(), v.data() + v.size(), seconds);
      if (err != std::errc() || p != v.data() + v.size() || seconds < 0 || seconds > 3600)
        throw std::invalid_argument(fmt::format("--grace {}: expected whole seconds, 0..3600", v));
      o.grace = std::chrono::seconds(seconds);
    } else {  // --mode
      if (v != "send" && v != "dispatch") throw std::invalid_argument(fmt::format("--mode {}: expected send or dispatch", v));
      o.dispatch = v == "dispatch";
    }
  }
  if (o.port < 0) throw std::invalid_argument("--port is required");
  return o;
}

// An IPv4 client of a dual-stack listener arrives as ::ffff:a.b.c.d.
bool same_address(asio::ip::address a, asio::ip::address b) {
  auto plain = [](asio::ip::address x) -> asio::ip::address {
    if (x.is_v6() && x.to_v6().is_v4_mapped()) return asio::ip::make_address_v4(asio::ip::v4_mapped, x.to_v6());
    return x;
  };
  return plain(a) == plain(b);
}

// ---- worker: `priority_routing normal` or `priority_routing special` ----

// Node: `if (socket) socket.end(...)`: the connection may have been closed in transit; then
// this says so and the worker carries on (sends never raise SIGPIPE: Asio uses MSG_NOSIGNAL).
awaitable<void> answer(tcp::socket socket, std::string priority) {
  std::error_code ec;
  socket.remote_endpoint(ec);  // ENOTCONN once the peer has reset it
  const std::string reply = fmt::format("handled by {} priority\n", priority);
  if (!ec) std::tie(ec, std::ignore) = co_await asio::async_write(socket, asio::buffer(reply), as_tuple(use_awaitable));
  if (ec) fmt::print(stderr, "priority_routing: {} worker: a connection closed in transit: {}\n", priority, ec.message());
  socket.shutdown(tcp::socket::shutdown_send, ec);
  socket.close(ec);
}

awaitable<void> worker_main(std::string priority) {
  auto ex = co_await asio::this_coro::executor;
  if (const char* where = std::getenv("PRIORITY_ROUTING_LISTEN")) {  // --mode dispatch
    const std::string spec = where;
    const auto colon = spec.rfind(':');
    const tcp::endpoint ep(asio::ip::make_address(spec.substr(0, colon)),
                           static_cast<unsigned short>(std::stoi(spec.substr(colon + 1))));
    auto [ec, server] = co_await cocluster::this_worker.listen(ep, {}, as_tuple(use_awaitable));
    if (ec == cocluster::error::worker_not_connected) co_return;  // the master stopped us first
    if (ec) {
      fmt::print(stderr, "priority_routing: {} worker: cannot listen on {}: {}\n", priority, spec, ec.message());
      std::exit(1);
    }
    for (;;) {
      auto [aec, socket] = co_await server.accept(as_tuple(use_awaitable));
      if (aec) co_return;  // closed: the master disconnected us
      asio::co_spawn(ex, answer(std::move(socket), priority), asio::detached);
    }
  }
  for (;;) {  // --mode send: process.on('message', (m, socket) => ...)
    auto [ec, m] = co_await cocluster::this_worker.receive(as_tuple(use_awaitable));
    if (ec) co_return;
    if (m.data != "socket" || !m.handle.is<tcp::socket>()) continue;
    std::error_code aec;
    tcp::socket socket = m.handle.adopt<tcp::socket>(ex, aec);
    if (aec) continue;
    asio::co_spawn(ex, answer(std::move(socket), priority), asio::detached);
  }
}

// ---- master ----

// --mode dispatch's routing function: the special worker for the special address, else the
// normal one (their ids are set once both are forked; 0 until then: connections wait).
struct route_by_address {
  struct ids {
    int normal = 0;
    int special = 0;
  };
  std::shared_ptr<ids> workers = std::make_shared<ids>();
  asio::ip::address special;

  int operator()(const cocluster::Remote& remote, const cocluster::HandoffListener::Members&) const {
    return same_address(remote.address(), special) ? workers->special : workers->normal;
  }
};

std::string how(const cocluster::ExitStatus& s) { return s.signal ? s.signal_name() : "code " + std::to_string(s.code); }

// Waits until each of `count` workers has had an `until` event (online, or listening: its
// address goes to *where), reading the master's events, which are subscribed before the first
// fork so that none is missed. A worker that exits first ends the wait: its exit event is
// returned.
awaitable<std::optional<cocluster::Event>> wait_for_each(cocluster::EventStream& events, cocluster::EventType until,
                                                         std::size_t count, cocluster::Address* where = nullptr) {
  for (std::size_t reached = 0; reached < count;) {
    cocluster::Event e = co_await events.next(use_awaitable);
    if (e.type == cocluster::EventType::exit) co_return e;
    if (e.type != until) continue;
    ++reached;
    if (where) *where = e.address;
  }
  co_return std::nullopt;
}

// Disconnects the workers (killing one still connected after `grace`) and waits for their exits.
// SIGKILL, not kill()'s SIGTERM: a stopped worker (SIGSTOP) would keep SIGTERM pending forever.
awaitable<void> stop_workers(const std::vector<std::shared_ptr<cocluster::Worker>>& workers, std::chrono::seconds grace) {
  auto ex = co_await asio::this_coro::executor;
  for (auto& w : workers) w->disconnect();
  asio::steady_timer timeout(ex, grace);
  for (auto& w : workers) {
    using namespace asio::experimental::awaitable_operators;
    auto which = co_await (w->disconnected(use_awaitable) || timeout.async_wait(use_awaitable));
    if (which.index() == 1) w->kill(SIGKILL);
  }
  for (auto& w : workers) co_await w->exited();
}

// Waits for SIGTERM/SIGINT or a worker's death, then calls stop_accepting() and stops the
// workers (see stop_workers). The exit code: 0, or 1 if a worker died (nothing replaces it).
awaitable<int> serve_until_stopped(cocluster::EventStream& events, const std::vector<std::shared_ptr<cocluster::Worker>>& workers,
                                   std::function<void()> stop_accepting, std::chrono::seconds grace) {
  auto ex = co_await asio::this_coro::executor;
  int code = 0;
  asio::signal_set signals(ex, SIGINT, SIGTERM);
  for (bool stop = false; !stop;) {
    using namespace asio::experimental::awaitable_operators;
    auto which = co_await (signals.async_wait(use_awaitable) || events.next(use_awaitable));
    if (which.index() == 0) break;
    const cocluster::Event& e = std::get<1>(which);
    if (e.type == cocluster::EventType::exit) {
      fmt::print(stderr, "priority_routing: worker {} died ({}); stopping\n", e.worker->id(), how(e.exit));
      code = 1;
      stop = true;
    }
  }
  stop_accepting();
  co_await stop_workers(workers, grace);
  co_return code;
}

// A worker and what the master holds for it.
struct destination {
  std::shared_ptr<cocluster::Worker> worker;
  std::size_t sending = 0;  // sockets sent to it that its channel has not taken yet
  std::size_t refused = 0;  // connections closed since `sending` reached its bound
  std::size_t unsent = 0;   // connections closed because it could no longer take them
};

// The fds the master may hold for one worker: the sockets in its channel's send queue and the
// sends waiting for room there. A quarter of the soft RLIMIT_NOFILE, less a reserve for stdio,
// the listener, the workers' channels and pidfds, so that a stalled worker holds neither the
// master's fds nor the other worker's clients: at its bound, its new connections are closed.
struct fd_bounds {
  std::size_t queue;    // ChannelOptions::send_queue_capacity: the library's 256, or less
  std::size_t sending;  // sends waiting for room in that queue
};
fd_bounds fd_bounds_per_worker() {
  constexpr std::size_t reserve = 64;
  rlimit limit{};
  std::size_t soft = std::size_t{1} << 16;
  if (::getrlimit(RLIMIT_NOFILE, &limit) == 0 && limit.rlim_cur != RLIM_INFINITY)
    soft = std::min<std::size_t>(soft, limit.rlim_cur);
  const std::size_t per_worker = std::max<std::size_t>(soft > reserve ? (soft - reserve) / 4 : 0, 2);
  const std::size_t queue = std::min<std::size_t>(cocluster::ipc::ChannelOptions{}.send_queue_capacity, per_worker / 2);
  return {queue, per_worker - queue};
}

// Both destinations, and whether the master is stopping (then a send that fails is expected:
// the worker was disconnected, and its connection is closed without a word).
struct senders {
  destination normal, special;
  std::size_t max_sending = 0;
  bool stopping = false;
};

// The reference's master: accept (never read), then send the socket to the chosen worker.
// Sends are not awaited here: a worker whose channel is full delays only its own clients.
// Errors that clients or a stalled worker cause once per connection are logged once a burst.
awaitable<void> send_connections(std::shared_ptr<tcp::acceptor> acceptor, std::shared_ptr<senders> all,
                                 asio::ip::address special_address) {
  asio::steady_timer pause(acceptor->get_executor());
  std::size_t accept_errors = 0;
  for (;;) {
    tcp::endpoint peer;  // from accept itself: the connection may be reset already
    auto [ec, socket] = co_await acceptor->async_accept(peer, as_tuple(use_awaitable));
    if (ec == asio::error::operation_aborted || !acceptor->is_open()) co_return;
    if (ec) {  // EMFILE and the like: wait a moment rather than spin
      if (accept_errors++ == 0) fmt::print(stderr, "priority_routing: accept: {}; retrying every 100 ms\n", ec.message());
      pause.expires_after(std::chrono::milliseconds(100));
      co_await pause.async_wait(as_tuple(use_awaitable));
      continue;
    }
    if (accept_errors > 0) fmt::print(stderr, "priority_routing: accepting again after {} failed accepts\n", accept_errors);
    accept_errors = 0;
    std::shared_ptr<destination> to(all, same_address(peer.address(), special_address) ? &all->special : &all->normal);
    if (to->sending >= all->max_sending) {
      if (to->refused++ == 0)
        fmt::print(stderr, "priority_routing: worker {} has {} connections not taken; closing its new ones until it takes them\n",
                   to->worker->id(), to->sending);
      continue;  // ~socket closes it
    }
    ++to->sending;
    to->worker->send(cocluster::Message("socket", std::move(socket)), [all, to](std::error_code sec) {
      if (--to->sending == 0 && to->refused > 0) {
        fmt::print(stderr, "priority_routing: {} connections for worker {} closed while it took none\n", to->refused,
                   to->worker->id());
        to->refused = 0;
      }
      // The socket is closed with the message. A worker gone before we stop (it died: its exit
      // stops us soon) fails every send to it: said once, counted after.
      if (sec && !all->stopping && to->unsent++ == 0)
        fmt::print(stderr, "priority_routing: send to worker {}: {}; closing its connections\n", to->worker->id(), sec.message());
    });
  }
}

awaitable<int> master_send(options o) {
  auto ex = co_await asio::this_coro::executor;
  auto acceptor =
      std::make_shared<tcp::acceptor>(ex, tcp::endpoint(asio::ip::make_address(o.host), static_cast<unsigned short>(o.port)));
  const fd_bounds bounds = fd_bounds_per_worker();
  cocluster::Settings settings;
  settings.channel.send_queue_capacity = bounds.queue;
  cocluster::Master<> master(ex, std::move(settings));
  auto& events = master.events();  // before the first fork, so that no worker's exit goes unseen
  // child_process.fork('subprocess.js', ['normal']) (a variable first: GCC 12 mishandles a
  // braced list inside co_await).
  const std::vector<std::string> as_normal{"normal"}, as_special{"special"};
  auto normal = co_await master.fork(cocluster::Env(), as_normal);
  auto special = co_await master.fork(cocluster::Env(), as_special);
  const std::vector<std::shared_ptr<cocluster::Worker>> both{normal, special};
  if (auto died = co_await wait_for_each(events, cocluster::EventType::online, both.size())) {
    fmt::print(stderr, "priority_routing: worker {} exited ({}) before coming online; stopping\n", died->worker->id(),
               how(died->exit));
    co_await stop_workers(both, o.grace);
    co_return 1;
  }
  fmt::print("listening on {}:{}\n", o.host, acceptor->local_endpoint().port());
  std::fflush(stdout);
  auto all = std::make_shared<senders>(senders{{normal}, {special}, bounds.sending});
  asio::co_spawn(ex, send_connections(acceptor, all, o.special), asio::detached);
  // As Node's server.close() first: no connection is accepted that no worker will take.
  const int code = co_await serve_until_stopped(events, both, [&] {
    all->stopping = true;
    acceptor->close();
  }, o.grace);
  for (const destination* d : {&all->normal, &all->special})
    if (d->unsent > 1)
      fmt::print(stderr, "priority_routing: {} connections for worker {} closed unsent\n", d->unsent, d->worker->id());
  co_return code;
}

awaitable<int> master_dispatch(options o) {
  auto ex = co_await asio::this_coro::executor;
  route_by_address route;
  route.special = o.special;
  cocluster::Master<cocluster::Dispatch<route_by_address>> master(ex, {}, cocluster::Dispatch(route));
  auto& events = master.events();  // before the first fork, so that no worker's exit goes unseen
  const cocluster::Env env{{"PRIORITY_ROUTING_LISTEN", fmt::format("{}:{}", o.host, o.port)}};
  const std::vector<std::string> as_normal{"normal"}, as_special{"special"};
  auto normal = co_await master.fork(env, as_normal);
  auto special = co_await master.fork(env, as_special);
  route.workers->normal = normal->id();
  route.workers->special = special->id();
  const std::vector<std::shared_ptr<cocluster::Worker>> both{normal, special};
  cocluster::Address where;
  if (auto died = co_await wait_for_each(events, cocluster::EventType::listening, both.size(), &where)) {
    // A worker that cannot listen says why and exits (its error reaches it, not us).
    fmt::print(stderr, "priority_routing: worker {} exited ({}) before listening{}; stopping\n", died->worker->id(),
               how(died->exit), died->exit.signal ? "" : " (see its error above)");
    co_await stop_workers(both, o.grace);
    co_return 1;
  }
  fmt::print("listening on {}:{}\n", o.host, where.port);
  std::fflush(stdout);
  co_return co_await serve_until_stopped(events, both, [] {}, o.grace);  // the workers' disconnect closes the listener
}

}  // namespace

int main(int argc, char** argv) {
  asio::io_context io;
  if (cocluster::is_worker()) {
    std::signal(SIGINT, SIG_IGN);  // Ctrl-C reaches the whole process group: the master decides
    const std::string priority = argc > 1 ? argv[1] : "normal";
    cocluster::this_worker.start(io.get_executor());
    asio::co_spawn(io, worker_main(priority), asio::detached);
    io.run();
    return 0;
  }
  options o;
  try {
    o = parse(argc, argv);
  } catch (const std::invalid_argument& e) {
    fmt::print(stderr, "priority_routing: {}\nusage: priority_routing --port P [--host H] [--special ADDR] [--mode send|dispatch] [--grace SECONDS]\n",
               e.what());
    return 2;
  }
  int code = 1;
  asio::co_spawn(io, o.dispatch ? master_dispatch(o) : master_send(o), [&](std::exception_ptr e, int c) {
    code = c;
    if (!e) return;
    try {
      std::rethrow_exception(e);
    } catch (const std::exception& x) {
      fmt::print(stderr, "priority_routing: {}\n", x.what());
      code = 1;
    }
  });
  io.run();
  return code;
}
