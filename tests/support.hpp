// Shared by the test programs: a time bound for every test, and fd counting.
#pragma once

#include <arpa/inet.h>
#include <dirent.h>
#include <netinet/in.h>
#include <poll.h>
#include <spawn.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <asio/co_spawn.hpp>
#include <asio/experimental/awaitable_operators.hpp>
#include <asio/io_context.hpp>
#include <asio/ip/tcp.hpp>
#include <asio/read.hpp>
#include <asio/steady_timer.hpp>
#include <asio/use_awaitable.hpp>
#include <asio/version.hpp>
#if ASIO_VERSION >= 102400
#include <asio/deferred.hpp>
#else
#include <asio/experimental/deferred.hpp>
#endif

#include "cocluster/detail/as_tuple.hpp"
#include "cocluster/detail/syscalls.hpp"
#include "cocluster/events.hpp"
#include "cocluster/exit_status.hpp"
#include "cocluster/log.hpp"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <fstream>
#include <functional>
#include <memory>
#include <optional>
#include <ostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace cocluster {
// For doctest's messages: "{code 0, signal SIGKILL}".
inline std::ostream& operator<<(std::ostream& os, const ExitStatus& s) {
  return os << "{code " << s.code << ", signal " << (s.signal ? s.signal_name() : "none") << "}";
}
inline std::ostream& operator<<(std::ostream& os, EventType t) { return os << to_string(t); }
}  // namespace cocluster

namespace test {

// Asio's lazy completion token under the name the Asio in use has (experimental before 1.24).
#if ASIO_VERSION >= 102400
inline constexpr auto deferred = asio::deferred;
#else
inline constexpr auto deferred = asio::experimental::deferred;
#endif

using namespace std::chrono_literals;
using asio::awaitable;
using asio::use_awaitable;

// A client that has sent its request and reads the answer to EOF, whoever answers it and
// whenever (await_answer): `done` once the read has ended, `ec` empty at EOF.
struct pending_request {
  asio::ip::tcp::socket socket;
  std::string reply;
  std::error_code ec;
  bool done = false;
};

inline awaitable<void> await_answer(std::shared_ptr<pending_request> r) {
  auto [ec, n] = co_await asio::async_read(r->socket, asio::dynamic_buffer(r->reply),
                                           cocluster::as_tuple(use_awaitable));
  r->ec = ec == asio::error::eof ? std::error_code() : ec;
  r->done = true;
}

// cocluster's log lines while it lives, one per line in `text`, instead of stderr
// (set_log_sink): for a test to look for the line an error should write. Resets the sink.
struct captured_log {
  std::string text;
  captured_log() {
    cocluster::set_log_sink([this](cocluster::LogLevel, std::string_view line) { text.append(line).append("\n"); });
  }
  ~captured_log() { cocluster::set_log_sink({}); }
  captured_log(const captured_log&) = delete;
  captured_log& operator=(const captured_log&) = delete;
  bool has(std::string_view line) const { return text.find(line) != std::string::npos; }
};

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

// Starts this executable again with `extra` ("NAME=value" entries) ahead of this process's
// environment, so they win, and its stdout and stderr on `out` and `err` when given.
// The child's pid, or -1.
inline pid_t spawn_this_executable(std::vector<std::string> extra, int out = -1, int err = -1) {
  for (char** e = environ; *e; ++e) extra.emplace_back(*e);
  std::vector<char*> envp;
  for (auto& s : extra) envp.push_back(s.data());
  envp.push_back(nullptr);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  if (out >= 0) posix_spawn_file_actions_adddup2(&actions, out, 1);
  if (err >= 0) posix_spawn_file_actions_adddup2(&actions, err, 2);
  char self[] = "/proc/self/exe";
  char* argv[] = {self, nullptr};
  pid_t pid = -1;
  const int rc = posix_spawn(&pid, self, &actions, nullptr, argv, envp.data());
  posix_spawn_file_actions_destroy(&actions);
  return rc == 0 ? pid : -1;
}

// An intermediate master (this executable with COCLUSTER_TEST_ROLE=master, see cluster_main)
// and its workers, for the tests that kill the master: its stdout (which the workers inherit)
// and a pidfd per worker. Call with PR_SET_CHILD_SUBREAPER set, so that the orphaned workers
// come to this process to be waited for.
struct orphan_run {
  pid_t master = -1;
  std::vector<pid_t> workers;
  std::vector<cocluster::detail::unique_fd> pidfds;
  cocluster::detail::unique_fd out;  // read end of the master's (and the workers') stdout
};

// Starts it with `extra` in its environment and returns once every worker is online (the
// master printed their pids); nullopt if it did not start.
inline std::optional<orphan_run> start_intermediate_master(std::vector<std::string> extra) {
  auto [out_read, out_write] = cocluster::detail::make_pipe();
  extra.insert(extra.begin(), "COCLUSTER_TEST_ROLE=master");
  orphan_run run;
  run.master = spawn_this_executable(std::move(extra), out_write.get());
  if (run.master < 0) return std::nullopt;
  out_write.reset();
  run.out = std::move(out_read);
  std::string line;
  char c;
  while (::read(run.out.get(), &c, 1) == 1 && c != '\n') line += c;
  std::istringstream in(line);
  for (pid_t p; in >> p;) {
    std::error_code ec;
    auto fd = cocluster::detail::pidfd_open(p, ec);
    if (ec) return std::nullopt;
    run.workers.push_back(p);
    run.pidfds.push_back(std::move(fd));
  }
  return run;
}

// Waits up to `limit` for the process behind `pidfd` to end (SIGKILLs it past that) and reaps
// it. True if it ended within the limit; `info` says how.
inline bool reap_within(const cocluster::detail::unique_fd& pidfd, std::chrono::milliseconds limit, siginfo_t& info) {
  pollfd pfd{pidfd.get(), POLLIN, 0};
  const bool ended = ::poll(&pfd, 1, static_cast<int>(limit.count())) == 1;
  if (!ended) ::syscall(SYS_pidfd_send_signal, pidfd.get(), SIGKILL, nullptr, 0);
  info = siginfo_t{};
  ::waitid(P_PIDFD, static_cast<id_t>(pidfd.get()), &info, WEXITED);
  return ended;
}

// The open fds of this process, in order, as "0,1,2,3" (the directory stream's own excluded).
inline std::string open_fds() {
  DIR* d = ::opendir("/proc/self/fd");
  if (!d) return "?";
  const int own = ::dirfd(d);
  std::vector<int> fds;
  while (auto* e = ::readdir(d))
    if (e->d_name[0] != '.' && std::atoi(e->d_name) != own) fds.push_back(std::atoi(e->d_name));
  ::closedir(d);
  std::sort(fds.begin(), fds.end());
  std::string out;
  for (int fd : fds) out += (out.empty() ? "" : ",") + std::to_string(fd);
  return out;
}

// What fd `fd` of this process is ("pipe:[123]", "/dev/null", ...), or "closed".
inline std::string fd_target(int fd) {
  char target[4096];
  const ssize_t n = ::readlink(("/proc/self/fd/" + std::to_string(fd)).c_str(), target, sizeof target);
  return n < 0 ? "closed" : std::string(target, static_cast<std::size_t>(n));
}

// This process's parent-death signal (PR_GET_PDEATHSIG), or -1.
inline int parent_death_signal() {
  int sig = -1;
  ::prctl(PR_GET_PDEATHSIG, &sig);
  return sig;
}

// Leaves this process no fd free: RLIMIT_NOFILE (soft) down to its lowest free fd, so every fd
// below it is in use and the next one fails with EMFILE. Returns the limit it had: put it back
// with setrlimit(RLIMIT_NOFILE, &returned).
inline rlimit leave_no_fd_free() {
  rlimit saved{};
  ::getrlimit(RLIMIT_NOFILE, &saved);
  const int lowest = ::dup(2);
  ::close(lowest);
  const rlimit none_left{static_cast<rlim_t>(lowest), saved.rlim_max};
  ::setrlimit(RLIMIT_NOFILE, &none_left);
  return saved;
}

// The TCP sockets whose local address is 127.0.0.1:port, from /proc/net/tcp (one line per
// socket, however many fds and processes share it): each one's state (the kernel's number:
// 1 ESTABLISHED, 10 LISTEN) and rx_queue (for a listening socket: the connections waiting in
// its accept queue).
struct tcp_socket_line {
  int state = 0;
  std::size_t rx_queue = 0;
};
inline std::vector<tcp_socket_line> loopback_tcp_sockets(unsigned short port) {
  std::ifstream tcp("/proc/net/tcp");
  std::string line;
  std::getline(tcp, line);  // the header
  char want[32];
  std::snprintf(want, sizeof want, "%08X:%04X", htonl(INADDR_LOOPBACK), port);  // as the kernel prints it
  std::vector<tcp_socket_line> found;
  while (std::getline(tcp, line)) {
    std::istringstream fields(line);
    std::string slot, local, remote, state, queues;  // queues: tx_queue:rx_queue
    fields >> slot >> local >> remote >> state >> queues;
    if (local != want) continue;
    found.push_back({std::stoi(state, nullptr, 16), std::stoul(queues.substr(queues.find(':') + 1), nullptr, 16)});
  }
  return found;
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
