// Shared by the test programs: a time bound for every test, and fd counting.
#pragma once

#include <dirent.h>

#include <asio/co_spawn.hpp>
#include <asio/experimental/awaitable_operators.hpp>
#include <asio/io_context.hpp>
#include <asio/steady_timer.hpp>
#include <asio/use_awaitable.hpp>

#include "cocluster/events.hpp"
#include "cocluster/exit_status.hpp"

#include <chrono>
#include <exception>
#include <functional>
#include <ostream>
#include <stdexcept>
#include <string>

namespace cocluster {
// For doctest's messages: "{code 0, signal SIGKILL}".
inline std::ostream& operator<<(std::ostream& os, const ExitStatus& s) {
  return os << "{code " << s.code << ", signal " << (s.signal ? s.signal_name() : "none") << "}";
}
inline std::ostream& operator<<(std::ostream& os, EventType t) { return os << to_string(t); }
}  // namespace cocluster

namespace test {

using namespace std::chrono_literals;
using asio::awaitable;
using asio::use_awaitable;

// Runs `body` on a fresh io_context until it and everything it started are done. Fails the
// test (by throwing) if the body takes longer than `limit`; the body is then cancelled, so
// its Master's destructor reaps every worker it started.
inline void run_bounded(std::function<awaitable<void>(asio::io_context&)> body,
                        std::chrono::seconds limit = 30s) {
  asio::io_context io;
  std::exception_ptr failure;
  bool finished = false;
  asio::co_spawn(
      io,
      [&]() -> awaitable<void> {
        using namespace asio::experimental::awaitable_operators;
        asio::steady_timer timer(io, limit);
        // `||` waits for the first *success*: a body that throws is caught here, so its
        // exception ends the test at once instead of after the time limit.
        auto guarded = [&]() -> awaitable<std::exception_ptr> {
          try {
            co_await body(io);
          } catch (...) {
            co_return std::current_exception();
          }
          co_return nullptr;
        };
        auto which = co_await (guarded() || timer.async_wait(use_awaitable));
        if (which.index() == 1)
          throw std::runtime_error("test timed out after " + std::to_string(limit.count()) + " s");
        if (auto failed = std::get<0>(which)) std::rethrow_exception(failed);
      },
      [&](std::exception_ptr e) {
        failure = e;
        finished = true;
        if (e) io.stop();  // the body is gone (its Master reaped its workers): do not wait on leftovers
      });
  io.run();
  if (failure) std::rethrow_exception(failure);
  if (!finished) throw std::runtime_error("io_context ran dry before the test finished");
}

// Open fds of this process (the directory stream's own fd excluded).
inline int open_fd_count() {
  DIR* d = ::opendir("/proc/self/fd");
  if (!d) return -1;
  int n = 0;
  while (auto* e = ::readdir(d))
    if (e->d_name[0] != '.') ++n;
  ::closedir(d);
  return n - 1;
}

}  // namespace test
