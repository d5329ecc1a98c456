// An HTTP/1.1 hello-world server on N worker processes sharing one port, the program Node's
// cluster documentation opens with.
//   hello_cluster --workers 2 --port 8000 [--host 127.0.0.1] [--policy rr|none] [--window N]
// Prints `listening on HOST:PORT` once every worker listens, and replaces a worker that dies.
// On SIGTERM or SIGINT the master tells each worker to stop (it closes its idle keep-alive
// connections and reports), then disconnects it: the worker stops accepting and leaves once
// the requests in hand are answered. A worker still connected after 5 s is killed (Node's
// disconnect-with-timeout pattern). Then one JSON line with the connections each served. Without --policy, COCLUSTER_SCHED_POLICY decides (rr).
#include "cocluster/cocluster.hpp"

#include <asio.hpp>
#include <asio/experimental/awaitable_operators.hpp>
#include <fmt/core.h>

#include <algorithm>
#include <cctype>
#include <charconv>
#include <csignal>
#include <cstdlib>
#include <list>
#include <string>

using asio::awaitable;
using asio::use_awaitable;
using asio::ip::tcp;

namespace {

struct options {
  int workers = 2;
  std::string host = "127.0.0.1";
  unsigned short port = 8000;
  std::optional<cocluster::Scheduling> policy;
  int window = 1;  // round robin: connections handed to a worker and not yet accepted (Node: 1)
};

options parse(int argc, char** argv) {
  options o;
  auto number = [](std::string_view s, const char* what) {
    int v = -1;
    auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
    if (ec != std::errc() || p != s.data() + s.size() || v < 0)
      throw std::invalid_argument(fmt::format("{}: not a number: {}", what, s));
    return v;
  };
  for (int i = 1; i < argc; ++i) {
    std::string_view a = argv[i];
    auto value = [&]() -> std::string_view {
      if (i + 1 >= argc) throw std::invalid_argument(fmt::format("{} needs a value", a));
      return argv[++i];
    };
    if (a == "--workers") o.workers = std::max(1, number(value(), "--workers"));
    else if (a == "--port") o.port = static_cast<unsigned short>(number(value(), "--port"));
    else if (a == "--host") o.host = value();
    else if (a == "--window") o.window = std::max(1, number(value(), "--window"));
    else if (a == "--policy") {
      auto name = value();
      o.policy = cocluster::parse_scheduling(name);
      if (!o.policy) throw std::invalid_argument(fmt::format("--policy {}: expected rr or none", name));
    } else {
      throw std::invalid_argument(fmt::format("unknown argument {}", a));
    }
  }
  return o;
}

// ---- worker ----

bool wants_close(std::string_view head) {
  std::string lower(head);
  std::transform(lower.begin(), lower.end(), lower.begin(), [](unsigned char c) { return std::tolower(c); });
  const bool http10 = lower.find("http/1.0\r\n") != std::string::npos;
  if (lower.find("\r\nconnection: close") != std::string::npos) return true;
  return http10 && lower.find("\r\nconnection: keep-alive") == std::string::npos;
}

struct worker_state {
  std::size_t connections = 0;
  bool stopping = false;
  std::list<tcp::socket*> idle;  // sessions waiting for a request: closed on stop
};

awaitable<void> session(tcp::socket socket, worker_state& st) {
  const std::string body = fmt::format("hello from worker {}\n", cocluster::this_worker.id());
  std::string buffer;
  for (;;) {
    auto me = st.idle.insert(st.idle.end(), &socket);
    auto [ec, n] = co_await asio::async_read_until(socket, asio::dynamic_buffer(buffer), "\r\n\r\n",
                                                   cocluster::as_tuple(use_awaitable));
    st.idle.erase(me);
    if (ec) co_return;
    const bool close = wants_close(std::string_view(buffer).substr(0, n)) || st.stopping;
    buffer.erase(0, n);
    std::string response = fmt::format("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{}\r\n{}",
                                       body.size(), close ? "Connection: close\r\n" : "", body);
    auto [wec, wn] = co_await asio::async_write(socket, asio::buffer(response), cocluster::as_tuple(use_awaitable));
    if (wec || close) co_return;
  }
}

awaitable<void> worker_main(options o, worker_state& st) {
  using namespace cocluster;
  auto ex = co_await asio::this_coro::executor;
  auto server = co_await this_worker.listen(tcp::endpoint(asio::ip::make_address(o.host), o.port));
  asio::co_spawn(ex, [&]() -> awaitable<void> {
    for (;;) {
      auto [ec, socket] = co_await server.accept(cocluster::as_tuple(use_awaitable));
      if (ec) co_return;  // closed
      ++st.connections;
      asio::co_spawn(ex, session(std::move(socket), st), asio::detached);
    }
  }, asio::detached);
  // Node's example: the master's 'shutdown' message lets the worker end its long-lived
  // connections (here: idle keep-alive ones; requests in hand are answered with
  // Connection: close). The master's disconnect then closes the server and waits for them.
  for (;;) {
    auto [ec, m] = co_await this_worker.receive(cocluster::as_tuple(use_awaitable));
    if (ec) co_return;  // disconnected
    if (m.data != "stop") continue;
    st.stopping = true;
    for (auto* s : st.idle) s->close();
    co_await this_worker.send(fmt::format("{}", st.connections));
  }
}

// ---- master ----

awaitable<void> master_main(options o, cocluster::Master<cocluster::RuntimePolicy>& master) {
  using namespace cocluster;
  auto ex = co_await asio::this_coro::executor;
  std::vector<std::shared_ptr<Worker>> workers;
  for (int i = 0; i < o.workers; ++i) workers.push_back(co_await master.fork());
  Address where;
  for (auto& w : workers) where = co_await w->listening();
  fmt::print("listening on {}:{}\n", where.address, where.port);
  std::fflush(stdout);

  // Node's documentation: cluster.on('exit', () => cluster.fork()). A worker that dies is
  // replaced; connections handed to it and not yet accepted have gone to the others already.
  bool stopping = false;
  asio::co_spawn(ex, [&]() -> awaitable<void> {
    auto& events = master.events();
    for (;;) {
      Event e = co_await events.next();
      if (stopping) co_return;
      if (e.type != EventType::exit || e.worker->exited_after_disconnect().value_or(false)) continue;
      fmt::print(stderr, "hello_cluster: worker {} died ({}); starting another\n", e.worker->id(),
                 e.exit.signal ? e.exit.signal_name() : "code " + std::to_string(e.exit.code));
      auto fresh = co_await master.fork();
      std::replace(workers.begin(), workers.end(), e.worker, fresh);
    }
  }, asio::detached);

  asio::signal_set signals(ex, SIGINT, SIGTERM);
  co_await signals.async_wait(use_awaitable);
  stopping = true;
  std::string json = "{\"workers\":[";
  for (auto& w : workers) {
    std::size_t served = 0;
    try {
      co_await w->send("stop");
      Message m = co_await w->receive();
      served = std::stoul(m.data);
    } catch (const std::exception& e) {
      fmt::print(stderr, "worker {}: {}\n", w->id(), e.what());
    }
    json += fmt::format("{}{{\"id\":{},\"connections\":{}}}", &w == &workers.front() ? "" : ",", w->id(), served);
  }
  json += "]}";
  // Node's documentation: disconnect, and kill a worker that has not disconnected in time
  // (a client that keeps its connection open would otherwise keep the worker forever).
  for (auto& w : workers) w->disconnect();
  asio::steady_timer timeout(ex, std::chrono::seconds(5));
  for (auto& w : workers) {
    using namespace asio::experimental::awaitable_operators;
    auto which = co_await (w->disconnected() || timeout.async_wait(use_awaitable));
    if (which.index() == 1 && w->is_connected()) {
      fmt::print(stderr, "hello_cluster: worker {} still has connections after 5 s; killing it\n", w->id());
      w->kill();
    }
  }
  for (auto& w : workers) co_await w->exited();
  fmt::print("{}\n", json);
}

}  // namespace

int main(int argc, char** argv) {
  options o;
  try {
    o = parse(argc, argv);
  } catch (const std::exception& e) {
    fmt::print(stderr, "hello_cluster: {}\nusage: hello_cluster [--workers N] [--port P] [--host H] [--policy rr|none] [--window N]\n",
               e.what());
    return 2;
  }
  asio::io_context io;
  auto report = [](std::exception_ptr e) {
    if (!e) return;
    try {
      std::rethrow_exception(e);
    } catch (const std::exception& x) {
      fmt::print(stderr, "hello_cluster: {}\n", x.what());
      std::exit(1);
    }
  };
  if (cocluster::is_worker()) {
    worker_state st;
    std::signal(SIGINT, SIG_IGN);  // Ctrl-C reaches the whole process group: the master decides
    cocluster::this_worker.start(io.get_executor());
    asio::co_spawn(io, worker_main(o, st), report);
    io.run();
    return 0;
  }
  cocluster::Master<cocluster::RuntimePolicy> master(io.get_executor(), {}, cocluster::RuntimePolicy(o.policy, o.window));
  asio::co_spawn(io, master_main(o, master), [&](std::exception_ptr e) {
    report(e);
    io.stop();
  });
  io.run();
  return 0;
}
