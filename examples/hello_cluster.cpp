// An HTTP/1.1 hello-world server on N worker processes sharing one port, the program Node's
// cluster documentation opens with.
//   hello_cluster --workers 2 --port 8000 [--host 127.0.0.1] [--policy NAME] [--window N]
//                 [--drain-timeout S] [--max-connections N] [--stall-ms MS [--stall-every N]]
//                 [--defer-accept S]
// --policy: rr, none (Node's), sticky, leastconn, reuseport (RuntimePolicy's names). --window:
// the policy's window (without it, its own: 8 for each); none and reuseport
// hand nothing off, so --window with them is an error. --stall-ms: worker 1 blocks its loop
// MS ms on every Nth request it serves (10), for policy_bench --stalled.
// --max-connections: a worker is recycled after serving N connections (the Supervisor's
// max_connections; 0, the default: never), which also has every worker report its counts.
// --defer-accept: ListenOptions::defer_accept (nginx's `listen ... deferred`): a connection
// reaches a worker once its request has arrived (0, the default: off).
// A cocluster::Supervisor keeps the workers: prints `listening on HOST:PORT` once every worker
// is ready (listens), and replaces a worker that dies. SIGHUP reloads them one at a time (a
// new one ready before the old one leaves), then prints `reloaded N workers`. SIGTERM or
// SIGINT, to the master or to its whole process group, stops gracefully: each worker is
// disconnected, stops accepting, closes its idle keep-alive connections, answers the requests
// in hand, reports, and leaves; one still running after the drain timeout (5 s) is killed.
// Then one JSON line with the connections each worker served; exit 0 (3: workers had to be
// killed, 1: a crash loop hit the restart limit).
// Without --policy, COCLUSTER_SCHED_POLICY decides (rr). Bad arguments: a message and exit 2.
// Requests are framed by Content-Length (a body is read and ignored); Transfer-Encoding gets
// 501, a malformed request 400, headers over 8 KiB 431, a body over 1 MiB 413, each followed
// by closing the connection, so no request can hide inside another one's body.
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
#include <map>
#include <optional>
#include <string>
#include <thread>

using asio::awaitable;
using asio::use_awaitable;
using asio::ip::tcp;

namespace {

struct options {
  int workers = 2;
  std::string host = "127.0.0.1";
  unsigned short port = 8000;
  std::optional<cocluster::Scheduling> policy;
  // Connections handed to a worker and not yet accepted (RoundRobin, Sticky, LeastConnections);
  // without --window, the policy's own default (8 for each; Node's round robin has 1).
  std::optional<std::size_t> window;
  int drain_timeout = 5;  // seconds from a worker's disconnect to its kill
  int max_connections = 0;  // SupervisorSettings::max_connections (0: off)
  // For benchmarks/policy_bench --stalled: worker 1 blocks its event loop stall_ms on every
  // stall_every-th request it serves (a slow handler, as a real server has now and then).
  int stall_ms = 0;
  int stall_every = 10;
  int defer_accept = 0;  // seconds (ListenOptions::defer_accept; 0: off)
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
  auto in_range = [&](std::string_view s, const char* what, int low, int high) {
    const int v = number(s, what);
    if (v < low || v > high) throw std::invalid_argument(fmt::format("{} {}: out of range {}..{}", what, s, low, high));
    return v;
  };
  for (int i = 1; i < argc; ++i) {
    std::string_view a = argv[i];
    auto value = [&]() -> std::string_view {
      if (i + 1 >= argc) throw std::invalid_argument(fmt::format("{} needs a value", a));
      return argv[++i];
    };
    if (a == "--workers") o.workers = in_range(value(), "--workers", 1, 1024);
    else if (a == "--port") o.port = static_cast<unsigned short>(in_range(value(), "--port", 0, 65535));
    else if (a == "--host") {
      o.host = value();
      std::error_code ec;
      asio::ip::make_address(o.host, ec);
      if (ec) throw std::invalid_argument(fmt::format("--host {}: not an IP address", o.host));
    } else if (a == "--window") o.window = in_range(value(), "--window", 1, 1 << 20);
    else if (a == "--drain-timeout") o.drain_timeout = in_range(value(), "--drain-timeout", 0, 86400);
    else if (a == "--max-connections") o.max_connections = in_range(value(), "--max-connections", 0, 2'000'000'000);
    else if (a == "--stall-ms") o.stall_ms = in_range(value(), "--stall-ms", 0, 60000);
    else if (a == "--stall-every") o.stall_every = in_range(value(), "--stall-every", 1, 1 << 20);
    else if (a == "--defer-accept") o.defer_accept = in_range(value(), "--defer-accept", 0, 3600);
    else if (a == "--policy") {
      auto name = value();
      o.policy = cocluster::parse_scheduling(name);
      if (!o.policy) throw std::invalid_argument(fmt::format("--policy {}: expected {}", name, cocluster::scheduling_names));
    } else {
      throw std::invalid_argument(fmt::format("unknown argument {}", a));
    }
  }
  return o;
}

// ---- worker ----

constexpr std::size_t max_head = 8 * 1024;
constexpr std::size_t max_body = 1 << 20;

// One request's head, checked as RFC 9112 asks of a server that must not be confused about
// where a request ends: a request line, then `name: value` fields without folding.
struct request {
  int status = 200;  // else the error to answer with, then close
  bool close = false;
  std::size_t body = 0;
};

std::string lower(std::string_view s) {
  std::string out(s);
  std::transform(out.begin(), out.end(), out.begin(), [](unsigned char c) { return std::tolower(c); });
  return out;
}

request parse_head(std::string_view head) {
  request r;
  auto bad = [&](int status) {
    r.status = status;
    r.close = true;
    return r;
  };
  // A CR, LF or NUL anywhere but in the CRLFs that end lines: another parser in front of us
  // could read the request's end elsewhere (RFC 9112 2.2).
  for (std::size_t i = 0; i < head.size(); ++i) {
    const char c = head[i];
    if (c == '\0' || (c == '\r' && (i + 1 >= head.size() || head[i + 1] != '\n')) ||
        (c == '\n' && (i == 0 || head[i - 1] != '\r')))
      return bad(400);
  }
  const auto line_end = head.find("\r\n");
  const std::string_view line = head.substr(0, line_end);
  const auto sp1 = line.find(' ');
  const auto sp2 = sp1 == std::string_view::npos ? sp1 : line.find(' ', sp1 + 1);
  if (sp1 == 0 || sp2 == std::string_view::npos || sp2 == sp1 + 1 || line.find(' ', sp2 + 1) != std::string_view::npos)
    return bad(400);
  const std::string_view version = line.substr(sp2 + 1);
  if (version != "HTTP/1.1" && version != "HTTP/1.0") return bad(version.rfind("HTTP/", 0) == 0 ? 505 : 400);
  bool keep_alive = false, saw_length = false, chunked = false;
  std::size_t length = 0;
  for (std::size_t at = line_end + 2; at < head.size();) {
    const auto end = head.find("\r\n", at);
    const std::string_view field = head.substr(at, end - at);
    at = end + 2;
    if (field.empty()) break;
    const auto colon = field.find(':');
    if (colon == 0 || colon == std::string_view::npos || field[0] == ' ' || field[0] == '\t' ||
        field.substr(0, colon).find_first_of(" \t") != std::string_view::npos)
      return bad(400);  // no name, folding, or whitespace before the colon
    // A field name is a token (RFC 9110 5.1).
    for (char c : field.substr(0, colon))
      if (!(std::isalnum(static_cast<unsigned char>(c)) || std::string_view("!#$%&'*+-.^_`|~").find(c) != std::string_view::npos))
        return bad(400);
    const std::string name = lower(field.substr(0, colon));
    std::string_view value = field.substr(colon + 1);
    while (!value.empty() && (value.front() == ' ' || value.front() == '\t')) value.remove_prefix(1);
    while (!value.empty() && (value.back() == ' ' || value.back() == '\t')) value.remove_suffix(1);
    if (name == "content-length") {
      std::size_t n = 0;
      auto [p, ec] = std::from_chars(value.data(), value.data() + value.size(), n);
      if (value.empty() || ec != std::errc() || p != value.data() + value.size()) return bad(400);
      if (saw_length && n != length) return bad(400);  // two different lengths: which one?
      saw_length = true;
      length = n;
    } else if (name == "transfer-encoding") {
      chunked = true;
    } else if (name == "connection") {
      const std::string v = lower(value);
      if (v.find("close") != std::string::npos) r.close = true;
      if (v.find("keep-alive") != std::string::npos) keep_alive = true;
    }
  }
  if (chunked) return bad(501);  // not implemented here; never guessed at
  if (length > max_body) return bad(413);
  if (version == "HTTP/1.0" && !keep_alive) r.close = true;
  r.body = length;
  return r;
}

const char* reason(int status) {
  switch (status) {
    case 200: return "OK";
    case 400: return "Bad Request";
    case 413: return "Content Too Large";
    case 431: return "Request Header Fields Too Large";
    case 501: return "Not Implemented";
    case 505: return "HTTP Version Not Supported";
  }
  return "Error";
}

// A response; the body is `text` and a newline.
std::string response(int status, std::string_view text, bool close) {
  return fmt::format("HTTP/1.1 {} {}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{}\r\n{}\n", status,
                     reason(status), text.size() + 1, close ? "Connection: close\r\n" : "", text);
}

struct worker_state {
  int stall_ms = 0, stall_every = 10;  // see options
  std::string ok, ok_close;  // the answer to every good request, made once (worker_main)
  std::size_t requests = 0;
  std::size_t connections = 0;
  bool stopping = false;
  std::list<tcp::socket*> idle;  // sessions between requests, nothing read: closed on stop
};

// Closing with unread input makes the kernel send a reset, which can destroy the response
// before the client reads it: end our side, then read what the client still sends until it
// closes too (at most 64 KiB and 2 s), as nginx's lingering close does. As nginx's
// `lingering_close on` (its default), only when the client may still be sending: bytes past
// the request already read (or a refused request's own), a last read that filled the buffer,
// a body read, or a close the client did not ask for (stopping: a keep-alive client may send
// its next request, pipelined, after our last read). Else the socket simply closes, with a
// FIN: a short read of a TCP socket took all the kernel held at that moment, and a client
// that asked to close sends nothing after its request (bytes it sends anyway get a reset).
// That spares a shutdown, a read and a wait for the client's FIN per connection.
awaitable<void> linger(tcp::socket& socket) {
  std::error_code ec;
  socket.shutdown(tcp::socket::shutdown_send, ec);
  if (ec) co_return;
  // The timer's completion may already be queued when the last read ends: it must not touch
  // the socket after this frame is gone, so it looks at a flag it shares.
  auto reading = std::make_shared<bool>(true);
  asio::steady_timer deadline(socket.get_executor(), std::chrono::seconds(2));
  deadline.async_wait([&socket, reading](std::error_code e) {
    if (!e && *reading) socket.cancel();
  });
  char sink[4096];
  for (std::size_t drained = 0; drained < 64 * 1024;) {
    auto [rec, n] = co_await socket.async_read_some(asio::buffer(sink), cocluster::as_tuple(use_awaitable));
    if (rec) break;
    drained += n;
  }
  *reading = false;
  deadline.cancel();
}

// Reads requests one at a time. A connection is idle only while it has no byte of a next
// request: a request whose head is still arriving when the worker stops is answered.
awaitable<void> session(tcp::socket socket, worker_state& st) {
  std::string buffer;
  char chunk[4096];
  bool drained = true;  // the last read was short: the kernel had nothing more then (see linger())
  for (bool served = false;; served = true) {
    std::size_t head_end;
    while ((head_end = buffer.find("\r\n\r\n")) == std::string::npos && buffer.size() <= max_head) {
      // Idle: between two requests of a keep-alive connection. A connection that has not had
      // its first request yet is not idle: the client is sending it (answered, then closed).
      const bool idle = buffer.empty() && served;
      if (idle && st.stopping) co_return;
      auto me = idle ? st.idle.insert(st.idle.end(), &socket) : st.idle.end();
      auto [ec, n] = co_await socket.async_read_some(asio::buffer(chunk), cocluster::as_tuple(use_awaitable));
      if (idle) st.idle.erase(me);
      if (ec) co_return;
      buffer.append(chunk, n);
      drained = n < sizeof chunk;
    }
    request r = head_end == std::string::npos ? request{431, true, 0} : parse_head(std::string_view(buffer).substr(0, head_end + 4));
    if (r.status == 200) {
      buffer.erase(0, head_end + 4);
      // The body, read and ignored (never kept): it is not a next request.
      std::size_t left = r.body;
      const std::size_t buffered = std::min(left, buffer.size());
      buffer.erase(0, buffered);
      left -= buffered;
      while (left > 0) {
        auto [ec, n] = co_await socket.async_read_some(asio::buffer(chunk, std::min(left, sizeof chunk)),
                                                       cocluster::as_tuple(use_awaitable));
        if (ec) co_return;
        left -= n;
        drained = false;  // it read what it asked for: more may wait
      }
    }
    if (st.stall_ms > 0 && cocluster::this_worker.id() == 1 && ++st.requests % st.stall_every == 0)
      std::this_thread::sleep_for(std::chrono::milliseconds(st.stall_ms));  // blocks the loop: on purpose
    const bool close = r.close || st.stopping;
    const std::string refusal = r.status == 200 ? std::string() : response(r.status, reason(r.status), close);
    const std::string& answer = r.status != 200 ? refusal : close ? st.ok_close : st.ok;
    auto [wec, wn] = co_await asio::async_write(socket, asio::buffer(answer), cocluster::as_tuple(use_awaitable));
    if (wec) co_return;
    if (close) {
      if (!buffer.empty() || !drained || !r.close) co_await linger(socket);
      co_return;
    }
  }
}

awaitable<void> worker_main(options o, worker_state& st) {
  using namespace cocluster;
  auto ex = co_await asio::this_coro::executor;
  const std::string hello = fmt::format("hello from worker {}", this_worker.id());
  st.ok = response(200, hello, false);
  st.ok_close = response(200, hello, true);
  auto server = co_await this_worker.listen(tcp::endpoint(asio::ip::make_address(o.host), o.port),
                                            ListenOptions{.defer_accept = std::chrono::seconds(o.defer_accept)});
  asio::co_spawn(ex, [&]() -> awaitable<void> {
    for (;;) {
      auto [ec, socket] = co_await server.accept(cocluster::as_tuple(use_awaitable));
      if (ec) co_return;  // closed
      ++st.connections;
      asio::co_spawn(ex, session(std::move(socket), st), asio::detached);
    }
  }, asio::detached);
  // Node's example: the master's 'shutdown' message (the supervisor's before_disconnect) lets
  // the worker end its long-lived connections (here: idle keep-alive ones; requests in hand
  // are answered with Connection: close). The disconnect then closes the server and waits.
  for (;;) {
    auto [ec, m] = co_await this_worker.receive(cocluster::as_tuple(use_awaitable));
    if (ec) co_return;  // disconnected
    if (m.data != "stop") continue;
    st.stopping = true;
    // Idle: nothing of a next request read. Bytes already waiting in the socket are a request
    // in progress: that session answers it, then closes.
    for (auto* s : st.idle) {
      std::error_code ec;
      if (s->available(ec) == 0) s->close(ec);
    }
    co_await this_worker.send(fmt::format("{}", st.connections));
  }
}

// ---- master ----

// Prints `listening on HOST:PORT` once the first `workers` workers are ready.
awaitable<void> announce(cocluster::Master<cocluster::RuntimePolicy>& master, int workers) {
  using namespace cocluster;
  auto& events = master.events();
  Address where;
  for (int ready = 0; ready < workers;) {
    auto [ec, e] = co_await events.next(as_tuple(use_awaitable));
    if (ec) co_return;  // the master is gone
    if (e.type == EventType::listening) where = e.address;
    if (e.type == EventType::ready) ++ready;
  }
  fmt::print("listening on {}:{}\n", where.address, where.port);
  std::fflush(stdout);
}

awaitable<int> master_main(options o, cocluster::Master<cocluster::RuntimePolicy>& master) {
  using namespace cocluster;
  std::map<int, std::size_t> served;  // connections each worker served, reported as it leaves
  SupervisorSettings settings;
  settings.workers = static_cast<std::size_t>(o.workers);
  settings.drain_timeout = std::chrono::seconds(o.drain_timeout);
  settings.max_connections = static_cast<std::uint64_t>(o.max_connections);
  settings.before_disconnect = [&](std::shared_ptr<Worker> w) -> awaitable<void> {
    co_await w->send("stop");
    Message m = co_await w->receive();
    served[w->id()] = std::strtoul(m.data.c_str(), nullptr, 10);
  };
  Supervisor<RuntimePolicy> supervisor(master, settings);
  supervisor.handle_signals([](std::error_code ec, std::size_t n) {
    if (ec) fmt::print(stderr, "hello_cluster: reload: {} ({} workers replaced)\n", ec.message(), n);
    else fmt::print("reloaded {} workers\n", n);
    std::fflush(stdout);
  });
  master.events();  // subscribed before the first fork
  asio::co_spawn(co_await asio::this_coro::executor, announce(master, o.workers), asio::detached);
  auto [ec] = co_await supervisor.run(as_tuple(use_awaitable));
  std::string json = "{\"workers\":[";
  for (auto& [id, n] : served) json += fmt::format("{}{{\"id\":{},\"connections\":{}}}", json.back() == '[' ? "" : ",", id, n);
  json += "]}";
  fmt::print("{}\n", json);
  if (ec) fmt::print(stderr, "hello_cluster: {}\n", ec.message());
  co_return ec == error::restart_limit_reached ? 1 : ec ? 3 : 0;
}

}  // namespace

int main(int argc, char** argv) {
  options o;
  try {
    o = parse(argc, argv);
  } catch (const std::exception& e) {
    fmt::print(stderr, "hello_cluster: {}\nusage: hello_cluster [--workers N] [--port P] [--host H] [--policy NAME] [--window N] [--drain-timeout S]\n"
               "                     [--max-connections N] [--stall-ms MS [--stall-every N]] [--defer-accept S]\n",
               e.what());
    return 2;
  }
  // (Not Asio 1.37's reactor.reset_edge_on_partial_read: it spares a failed recvfrom per
  // keep-alive request, but a short read that also took the client's FIN leaves the end of
  // the connection unannounced, and the session waits for it forever: benchmarks/README.md,
  // "A keep-alive request's system calls".)
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
    st.stall_ms = o.stall_ms;
    st.stall_every = o.stall_every;
    cocluster::this_worker.start(io.get_executor());
    asio::co_spawn(io, worker_main(o, st), report);
    io.run();
    return 0;
  }
  std::optional<cocluster::RuntimePolicy> policy;
  try {
    policy.emplace(o.policy, o.window);  // without --policy: COCLUSTER_SCHED_POLICY, checked here
    if (o.window && !policy->has_window()) {  // said, not ignored: the user expects it to matter
      const char* from = policy->environment_variable();
      throw std::invalid_argument(fmt::format("--window {}: policy {} (from {}) hands nothing off and has no window; "
                                              "--window is for rr, sticky and leastconn",
                                              *o.window, cocluster::scheduling_name(policy->resolve()),
                                              from ? from : "--policy"));
    }
  } catch (const std::invalid_argument& e) {
    fmt::print(stderr, "hello_cluster: {}\n", e.what());
    return 2;
  }
  cocluster::Master<cocluster::RuntimePolicy> master(io.get_executor(), {}, *policy);
  int rc = 1;
  asio::co_spawn(io, master_main(o, master), [&](std::exception_ptr e, int code) {
    report(e);
    rc = code;
    io.stop();
  });
  io.run();
  return rc;
}
