// A master, N workers that echo what they are sent (Node's worker.send example), and a
// supervision loop over the master-wide event stream. Run: echo_cluster [--workers N]
//   the master sends each worker a greeting and a connected socket; each worker answers and
//   writes into the socket; then the master disconnects the cluster and reports the exits.
#include <cocluster/cocluster.hpp>

#include <asio.hpp>
#include <fmt/core.h>

#include <cstring>
#include <string>

using namespace cocluster;
using asio::awaitable;
using asio::use_awaitable;

awaitable<void> worker_main() {
  for (;;) {
    Message m = co_await this_worker.receive();
    if (m.handle.is<asio::local::stream_protocol::socket>()) {
      // (The error_code form: a socket can be closed or lost on its way, as at this process's fd limit.)
      std::error_code ec;
      auto socket = m.handle.adopt<asio::local::stream_protocol::socket>(co_await asio::this_coro::executor, ec);
      const std::string line = fmt::format("written by worker {} (pid {})\n", this_worker.id(), ::getpid());
      if (!ec) co_await asio::async_write(socket, asio::buffer(line), use_awaitable);
      else fmt::print(stderr, "worker {}: the socket sent with \"{}\": {}\n", this_worker.id(), m.data, ec.message());
    }
    co_await this_worker.send({fmt::format("worker {} echoes: {}", this_worker.id(), m.data)});
  }
}

// Prints every lifecycle event until `count` workers have exited.
awaitable<void> supervise(Master<>& master, int count) {
  for (int exits = 0; exits < count;) {
    Event e = co_await master.events().next();
    if (e.type == EventType::exit) ++exits;
    if (e.type == EventType::message) continue;  // the loop in master_main takes those
    if (e.type == EventType::setup) continue;    // every fork() posts one (Node's fork runs setup)
    fmt::print("event {:<10} worker {}{}\n", to_string(e.type), e.worker ? e.worker->id() : 0,
               e.type != EventType::exit ? ""
               : e.exit.killed_by_signal()
                   ? fmt::format(" (killed by {})", e.exit.signal_name())
                   : fmt::format(" (code {}, after disconnect: {})", e.exit.code, *e.worker->exited_after_disconnect()));
  }
}

awaitable<void> master_main(Master<>& master, int count) {
  std::vector<std::shared_ptr<Worker>> workers;
  for (int i = 0; i < count; ++i) workers.push_back(co_await master.fork());
  for (auto& w : workers) {
    co_await w->online();
    asio::local::stream_protocol::socket ours(co_await asio::this_coro::executor), theirs(ours.get_executor());
    asio::local::connect_pair(ours, theirs);
    co_await w->send({"hello from the master"});
    co_await w->send({"and a socket", std::move(theirs)});
    fmt::print("{}\n", (co_await w->receive()).data);
    fmt::print("{}\n", (co_await w->receive()).data);
    asio::streambuf line;
    co_await asio::async_read_until(ours, line, '\n', use_awaitable);
    fmt::print("socket: {}", std::string(asio::buffers_begin(line.data()), asio::buffers_end(line.data())));
  }
  co_await master.disconnect();
  for (auto& w : workers) co_await w->exited();
}

int main(int argc, char** argv) {
  asio::io_context io;
  if (is_worker()) {
    this_worker.start(io.get_executor());
    asio::co_spawn(io, worker_main(), asio::detached);
    io.run();  // returns once the master has disconnected us
    return 0;
  }
  int count = 4;
  for (int i = 1; i + 1 < argc; ++i)
    if (std::strcmp(argv[i], "--workers") == 0) count = std::max(1, std::atoi(argv[i + 1]));
  Master<> master(io.get_executor());
  master.events();  // subscribe before the first fork
  asio::co_spawn(io, supervise(master, count), asio::detached);
  int status = 0;
  asio::co_spawn(io, master_main(master, count), [&](std::exception_ptr e) {
    if (!e) return;
    try {
      std::rethrow_exception(e);
    } catch (const std::exception& x) {
      fmt::print(stderr, "error: {}\n", x.what());
    }
    status = 1;
    io.stop();
  });
  io.run();
  return status;
}
