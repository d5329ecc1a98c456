// A program that uses cocluster the way a user's does, from outside the project's build:
// scripts/consumers builds it each supported way (meson, CMake, pkg-config) with strict
// warnings and runs it. The README's first example, returning what it saw.
#include <cocluster/cocluster.hpp>

// Asio's configuration is the user's: nothing of ours may define it in this program.
#ifdef ASIO_NO_DEPRECATED
#error "ASIO_NO_DEPRECATED reached a consumer's code through cocluster's build files"
#endif

using namespace cocluster;

int main() {
  asio::io_context io;
  if (is_worker()) {
    this_worker.start(io.get_executor());
    asio::co_spawn(io, []() -> asio::awaitable<void> {
      for (;;) {
        Message m = co_await this_worker.receive();
        co_await this_worker.send(std::move(m));
      }
    }, asio::detached);
    io.run();
    return 0;
  }
  Master<> master(io.get_executor());
  bool ok = false;
  asio::co_spawn(io, [&]() -> asio::awaitable<void> {
    auto w = co_await master.fork();
    co_await w->online();
    co_await w->send({"hello"});
    Message echo = co_await w->receive();
    w->disconnect();
    ExitStatus s = co_await w->exited();
    ok = echo.data == "hello" && s.code == 0 && s.signal == 0;
  }, asio::detached);
  io.run();
  return ok ? 0 : 1;
}
