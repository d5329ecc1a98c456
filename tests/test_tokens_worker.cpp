// Every asynchronous operation of the worker side with every kind of completion token:
// use_awaitable, as_tuple(use_awaitable), use_future (from a thread that is not the one
// running the io_context), a plain callback, asio::experimental::deferred (Asio 1.22 has
// deferred only there) and detached. The operations run in a real worker (the tokens scenario),
// which reports what each completion brought by message; the master checks the reports.
#include "cocluster/this_worker.hpp"

#include <doctest/doctest.h>

#include <asio/use_future.hpp>

#include <atomic>
#include <future>
#include <sstream>
#include <thread>
#include <variant>

#include "cocluster/cocluster.hpp"
#include "worker_scenario.hpp"
#include "support.hpp"

using namespace cocluster;
using namespace test;
using asio::ip::tcp;

namespace {

enum class token { awaitable, as_tuple, future, callback, deferred, detached };
constexpr token all_tokens[] = {token::awaitable, token::as_tuple, token::future,
                                token::callback,  token::deferred, token::detached};

std::string name(token t) {
  constexpr const char* names[] = {"awaitable", "as_tuple", "future", "callback", "deferred", "detached"};
  return names[static_cast<int>(t)];
}

// ---- the worker side (the tokens scenario) ----
//
// The scenario runs on the process's main thread while another thread runs the io_context:
// use_future and deferred operations are started from the main thread (not the runtime's),
// callbacks from the io_context's thread, coroutines on it. Steps, each reported to the
// master: send, receive, listen + accept, accept with detached, listen_fd, disconnected (the
// exit code says how many of its completions arrived).

// What a completion brought: its error, and its value (none for detached, or on error).
template <class V>
struct outcome {
  using value_type = std::conditional_t<std::is_void_v<V>, std::monostate, V>;
  outcome() = default;  // co_spawn's use_future wants one
  outcome(std::error_code e, std::optional<value_type> v) : ec(e), value(std::move(v)) {}
  std::error_code ec;
  std::optional<value_type> value;
};

// Runs `start(token)` (an operation with completion signature void(std::error_code[, V]))
// with token `t` and waits for its outcome.
template <class V, class Start>
outcome<V> run(asio::io_context& io, token t, Start start) {
  using out = outcome<V>;
  using value_type = typename out::value_type;
  auto callback = [](std::promise<out>& p) {
    if constexpr (std::is_void_v<V>) return [&p](std::error_code ec) { p.set_value(out(ec, value_type{})); };
    else return [&p](std::error_code ec, V v) { p.set_value(out(ec, std::move(v))); };
  };
  switch (t) {
    case token::awaitable:
      return asio::co_spawn(
                 io,
                 [&]() -> awaitable<out> {
                   try {
                     if constexpr (std::is_void_v<V>) {
                       co_await start(use_awaitable);
                       co_return out({}, value_type{});
                     } else {
                       V v = co_await start(use_awaitable);
                       co_return out({}, std::move(v));
                     }
                   } catch (const std::system_error& e) {
                     co_return out(e.code(), std::nullopt);
                   }
                 },
                 asio::use_future)
          .get();
    case token::as_tuple:
      return asio::co_spawn(
                 io,
                 [&]() -> awaitable<out> {
                   if constexpr (std::is_void_v<V>) {
                     auto [ec] = co_await start(cocluster::as_tuple(use_awaitable));
                     co_return out(ec, value_type{});
                   } else {
                     auto [ec, v] = co_await start(cocluster::as_tuple(use_awaitable));
                     co_return out(ec, std::move(v));
                   }
                 },
                 asio::use_future)
          .get();
    case token::future: {
      auto f = start(asio::use_future);  // started on this thread, not the runtime's
      try {
        if constexpr (std::is_void_v<V>) {
          f.get();
          return out({}, value_type{});
        } else {
          return out({}, f.get());
        }
      } catch (const std::system_error& e) {
        return out(e.code(), std::nullopt);
      }
    }
    case token::callback: {
      std::promise<out> p;
      auto f = p.get_future();
      asio::post(io, [&] { start(callback(p)); });  // started on the runtime's thread
      return f.get();
    }
    case token::deferred: {
      auto op = start(test::deferred);  // nothing has started yet
      std::promise<out> p;
      auto f = p.get_future();
      std::move(op)(callback(p));  // now, from this thread
      return f.get();
    }
    case token::detached:
      start(asio::detached);
      return out({}, std::nullopt);
  }
  throw std::logic_error("unknown token");
}

// Runs `f` on the io_context's thread and waits for it (servers are closed there).
template <class F>
void on_io(asio::io_context& io, F f) {
  std::promise<void> done;
  asio::post(io, [&] {
    f();
    done.set_value();
  });
  done.get_future().get();
}

std::string describe(const std::error_code& ec) { return ec ? "error " + ec.message() : "ok"; }

void say(const std::string& text) { this_worker.send({text}, asio::use_future).get(); }
std::string hear() { return this_worker.receive(asio::use_future).get().data; }

void send_step(asio::io_context& io) {
  std::string results = "send:results";
  for (token t : all_tokens) {
    auto o = run<void>(io, t, [&](auto&& tok) { return this_worker.send({"send:" + name(t)}, tok); });
    results += " " + (t == token::detached ? std::string("-") : describe(o.ec));
  }
  say(results);
}

void receive_step(asio::io_context& io) {
  say("receive:ready");
  std::string results = "receive:results";
  for (token t : all_tokens) {
    auto o = run<Message>(io, t, [&](auto&& tok) { return this_worker.receive(tok); });
    results += " " + (o.value ? o.value->data : o.ec ? describe(o.ec) : "-");
  }
  results += " " + hear();  // the message after the one the detached receive took
  say(results);
}

void listen_and_accept_step(asio::io_context& io) {
  const tcp::endpoint any_port(asio::ip::make_address("127.0.0.1"), 0);
  for (token t : all_tokens) {
    auto listened = run<Server<tcp>>(io, t, [&](auto&& tok) { return this_worker.listen(any_port, {}, tok); });
    if (t == token::detached) {  // the server is made and dropped: the master sees it listen
      say("listen:detached");
      continue;
    }
    if (!listened.value) {
      say("listen:" + name(t) + " " + describe(listened.ec));
      continue;
    }
    Server<tcp>& server = *listened.value;
    const bool on_worker_executor = server.get_executor() == asio::any_io_executor(io.get_executor());
    say("listen:" + name(t) + " executor=" + std::to_string(on_worker_executor) + " " +
        std::to_string(server.local_endpoint().port()));
    // Half the tokens with the peer overload.
    const bool with_peer = t == token::awaitable || t == token::future || t == token::deferred;
    tcp::endpoint peer;
    auto accepted = run<tcp::socket>(io, t, [&](auto&& tok) {
      return with_peer ? server.accept(peer, tok) : server.accept(tok);
    });
    const bool open = accepted.value && accepted.value->is_open();
    say("accept:" + name(t) + " " + describe(accepted.ec) + " open=" + std::to_string(open) +
        " peer=" + (with_peer ? std::to_string(peer.port()) : "-"));
    on_io(io, [&] {
      accepted.value.reset();
      listened.value.reset();
    });
  }
}

void detached_accept_step(asio::io_context& io) {
  const tcp::endpoint any_port(asio::ip::make_address("127.0.0.1"), 0);
  auto listened = run<Server<tcp>>(io, token::awaitable, [&](auto&& tok) { return this_worker.listen(any_port, {}, tok); });
  if (!listened.value) return say("accept-detached:listen " + describe(listened.ec));
  run<tcp::socket>(io, token::detached, [&](auto&& tok) { return listened.value->accept(tok); });
  say("accept-detached:listening " + std::to_string(listened.value->local_endpoint().port()));
  // The master connects; the detached accept takes the connection and drops it, so the
  // master's client reads EOF while this server is still open.
  const std::string next = hear();
  on_io(io, [&] { listened.value.reset(); });
  say("accept-detached:" + next);
}

void listen_fd_step(asio::io_context& io) {
  const int fd = std::stoi(std::getenv("TEST_FD"));
  for (token t : all_tokens) {
    auto listened = run<Server<tcp>>(io, t, [&](auto&& tok) { return this_worker.listen_fd<tcp>(fd, {}, tok); });
    if (t == token::detached) {
      say("listen_fd:detached");
      continue;
    }
    say("listen_fd:" + name(t) + " " +
        (listened.value ? std::to_string(listened.value->local_endpoint().port()) : describe(listened.ec)));
    on_io(io, [&] { listened.value.reset(); });
  }
}

}  // namespace

WORKER_SCENARIO(tokens) {
  asio::io_context io;
  this_worker.start(io.get_executor());
  auto work = asio::make_work_guard(io);
  std::thread runner([&] { io.run(); });
  send_step(io);
  receive_step(io);
  listen_and_accept_step(io);
  detached_accept_step(io);
  listen_fd_step(io);
  // disconnected: counted here so that every completion has run before the exit code is taken.
  std::atomic<int> completed{0};
  {
    asio::co_spawn(io, [&]() -> awaitable<void> {
      co_await this_worker.disconnected();
      ++completed;
    }, asio::detached);
    asio::co_spawn(io, [&]() -> awaitable<void> {
      auto [ec] = co_await this_worker.disconnected(cocluster::as_tuple(use_awaitable));
      if (!ec) ++completed;
    }, asio::detached);
    auto future = this_worker.disconnected(asio::use_future);
    on_io(io, [&] { this_worker.disconnected([&](std::error_code ec) { completed += !ec; }); });
    this_worker.disconnected(test::deferred)([&](std::error_code ec) { completed += !ec; });
    this_worker.disconnected(asio::detached);
    say(std::string("disconnected:armed primary=") + (is_primary() ? "1" : "0"));
    try {
      future.get();
      ++completed;
    } catch (const std::system_error&) {
    }
  }
  work.reset();
  runner.join();  // the channel is gone: the io_context runs dry once every completion has run
  return completed;
}

// ---- the master side ----

namespace {

awaitable<std::string> next_report(Worker& w) { co_return (co_await w.receive()).data; }

// "listen:awaitable 41234" -> 41234
std::uint16_t port_in(const std::string& report) {
  return static_cast<std::uint16_t>(std::stoi(report.substr(report.rfind(' ') + 1)));
}

template <class Policy>
awaitable<void> token_matrix(asio::io_context& io, Policy policy) {
  CHECK(is_primary());  // Node: cluster.isPrimary, the newer name of isMaster
  CHECK(is_master());
  Master<Policy> master(io.get_executor(), {}, policy);
  tcp::acceptor bound(io);  // for listen_fd: a socket the master bound and the worker names
  bound.open(tcp::v4());
  bound.bind({asio::ip::make_address("127.0.0.1"), 0});
  Env env = scenario_env("tokens");
  env["TEST_FD"] = std::to_string(bound.native_handle());
  auto w = co_await master.fork(env);

  // send
  for (token t : all_tokens) CHECK((co_await next_report(*w)) == "send:" + name(t));
  CHECK((co_await next_report(*w)) == "send:results ok ok ok ok ok -");

  // receive: six messages for six receives, then one more for the receive after the detached one
  CHECK((co_await next_report(*w)) == "receive:ready");
  for (token t : all_tokens) co_await w->send({"r:" + name(t)});
  co_await w->send({"r:after"});
  CHECK((co_await next_report(*w)) == "receive:results r:awaitable r:as_tuple r:future r:callback r:deferred - r:after");

  // listen + accept
  for (token t : all_tokens) {
    const std::string report = co_await next_report(*w);
    const Address listening = co_await w->listening();
    if (t == token::detached) {
      CHECK(report == "listen:detached");
      CHECK(listening.port != 0);
      continue;
    }
    REQUIRE_MESSAGE(report.rfind("listen:" + name(t) + " executor=1 ", 0) == 0, report);
    const std::uint16_t port = port_in(report);
    CHECK(listening.port == port);
    tcp::socket client(io);
    co_await client.async_connect({asio::ip::make_address("127.0.0.1"), port}, use_awaitable);
    const bool with_peer = t == token::awaitable || t == token::future || t == token::deferred;
    const std::string peer = with_peer ? std::to_string(client.local_endpoint().port()) : "-";
    CHECK((co_await next_report(*w)) == "accept:" + name(t) + " ok open=1 peer=" + peer);
  }

  // accept with detached
  const std::string listening_report = co_await next_report(*w);
  REQUIRE_MESSAGE(listening_report.rfind("accept-detached:listening ", 0) == 0, listening_report);
  co_await w->listening();
  tcp::socket client(io);
  co_await client.async_connect({asio::ip::make_address("127.0.0.1"), port_in(listening_report)}, use_awaitable);
  char c;
  auto [eof, n] = co_await client.async_read_some(asio::buffer(&c, 1), cocluster::as_tuple(use_awaitable));
  CHECK(eof == asio::error::eof);  // taken and dropped while the server was still open
  co_await w->send({"next"});
  CHECK((co_await next_report(*w)) == "accept-detached:next");

  // listen_fd
  for (token t : all_tokens) {
    const std::string report = co_await next_report(*w);
    const Address listening = co_await w->listening();
    CHECK(listening.port == bound.local_endpoint().port());
    if (t == token::detached) CHECK(report == "listen_fd:detached");
    else CHECK(report == "listen_fd:" + name(t) + " " + std::to_string(bound.local_endpoint().port()));
  }

  // disconnected: five completions the worker can count (detached's cannot be seen)
  CHECK((co_await next_report(*w)) == "disconnected:armed primary=0");
  w->disconnect();
  CHECK((co_await w->exited()) == ExitStatus{5, 0});
}

}  // namespace

TEST_CASE("every worker-side operation works with every completion token (round robin)") {
  run_bounded([](asio::io_context& io) { return token_matrix(io, RoundRobin{}); }, 60s);
}

TEST_CASE("every worker-side operation works with every completion token (shared socket)") {
  run_bounded([](asio::io_context& io) { return token_matrix(io, SharedSocket{}); }, 60s);
}
