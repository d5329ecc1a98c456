// Entry point of test_cluster. The same executable is the master (doctest runs the tests),
// every worker (a scenario picked by COCLUSTER_TEST_SCENARIO), and, for the master-death
// tests, an intermediate master process (COCLUSTER_TEST_ROLE=master), or a master started by
// a worker (COCLUSTER_TEST_ROLE=nested_master).
#define DOCTEST_CONFIG_IMPLEMENT
#define DOCTEST_CONFIG_NO_POSIX_SIGNALS  // forked workers must not inherit doctest's handlers
#include "cocluster/cocluster.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <limits.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <iostream>

#include <doctest/doctest.h>

#include "scenarios.hpp"
#include "support.hpp"

using namespace cocluster;
using asio::awaitable;
using asio::use_awaitable;

namespace {

std::string open_fds() {
  std::string out;
  DIR* d = ::opendir("/proc/self/fd");
  const int own = ::dirfd(d);
  std::vector<int> fds;
  while (auto* e = ::readdir(d))
    if (e->d_name[0] != '.' && std::atoi(e->d_name) != own) fds.push_back(std::atoi(e->d_name));
  ::closedir(d);
  std::sort(fds.begin(), fds.end());
  for (int fd : fds) out += (out.empty() ? "" : ",") + std::to_string(fd);
  return out;
}

// Echoes every message back. A message with a socket handle is answered with its data, "|",
// and the 8 bytes read from that socket (its peer wrote them before the handoff).
awaitable<void> echo() {
  for (;;) {
    auto [ec, m] = co_await this_worker.receive(asio::experimental::as_tuple(use_awaitable));
    if (ec) co_return;
    std::string reply = std::move(m.data);
    auto read_token = [&](auto socket) -> awaitable<void> {
      char token[8];
      co_await asio::async_read(socket, asio::buffer(token), use_awaitable);
      reply += "|" + std::string(token, sizeof token);
    };
    const auto& ex = co_await asio::this_coro::executor;
    if (m.handle.is<asio::ip::tcp::socket>()) co_await read_token(m.handle.adopt<asio::ip::tcp::socket>(ex));
    else if (m.handle.is<asio::local::stream_protocol::socket>())
      co_await read_token(m.handle.adopt<asio::local::stream_protocol::socket>(ex));
    auto [sent] = co_await this_worker.send({std::move(reply)}, asio::experimental::as_tuple(use_awaitable));
    if (sent) co_return;
  }
}

// Writes one raw packet into the channel as a broken worker would, then waits for the master
// to close the channel.
int misbehave(std::string_view how) {
  const int fd = std::stoi(std::getenv("COCLUSTER_CHANNEL_FD"));
  ipc::frame_header h;
  h.flags = ipc::frame_header::first | ipc::frame_header::last;
  std::string packet;
  std::vector<int> fds;
  if (how == scenario::garbage) {
    packet = "this is not a cocluster frame";
  } else if (how == scenario::oversized) {
    h.flags = ipc::frame_header::first;
    h.total_size = 1u << 30;  // 1 GiB, over the 64 MiB default
    packet.assign(reinterpret_cast<char*>(&h), sizeof h);
    packet += std::string(1000, 'x');
  } else {  // ten_fds
    h.handle_kind = 1;
    h.total_size = 3;
    packet.assign(reinterpret_cast<char*>(&h), sizeof h);
    packet += "abc";
    for (int i = 0; i < 10; ++i) fds.push_back(::open("/dev/null", O_RDONLY));
  }
  iovec iov{packet.data(), packet.size()};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  std::vector<char> control(CMSG_SPACE(sizeof(int) * 10));
  if (!fds.empty()) {
    msg.msg_control = control.data();
    msg.msg_controllen = CMSG_SPACE(sizeof(int) * fds.size());
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
    std::memcpy(CMSG_DATA(c), fds.data(), sizeof(int) * fds.size());
  }
  if (::sendmsg(fd, &msg, MSG_NOSIGNAL) < 0) return 2;
  char c;
  while (::recv(fd, &c, 1, 0) > 0) {
  }
  return 0;
}

std::string fd_target(int fd) {
  char target[PATH_MAX];
  const ssize_t n = ::readlink(("/proc/self/fd/" + std::to_string(fd)).c_str(), target, sizeof target);
  return n < 0 ? "closed" : std::string(target, static_cast<std::size_t>(n));
}

// "uid=U gid=G groups=N cwd=C argv=a|b fd0=T fd1=T fd2=T node_unique_id=X id=I", each
// value free of spaces (the test's paths are), read again for every report.
int parent_death_signal() {
  int sig = -1;
  ::prctl(PR_GET_PDEATHSIG, &sig);
  return sig;
}

int pdeathsig_at_exec = -1;  // spawn's, before this_worker.start() replaces it

std::string report_process(int argc, char** argv) {
  char cwd[PATH_MAX];
  std::string args;
  for (int i = 1; i < argc; ++i) args += (i > 1 ? "|" : "") + std::string(argv[i]);
  const char* node_id = std::getenv("NODE_UNIQUE_ID");
  return "uid=" + std::to_string(::getuid()) + " gid=" + std::to_string(::getgid()) +
         " groups=" + std::to_string(::getgroups(0, nullptr)) + " cwd=" + (::getcwd(cwd, sizeof cwd) ? cwd : "?") +
         " argv=" + args + " fd0=" + fd_target(0) + " fd1=" + fd_target(1) + " fd2=" + fd_target(2) +
         " node_unique_id=" + (node_id ? node_id : "unset") + " id=" + std::to_string(this_worker.id()) +
         " pdeathsig=" + std::to_string(parent_death_signal()) + " pdeathsig_at_exec=" + std::to_string(pdeathsig_at_exec);
}

int run_worker(int argc, char** argv) {
  const std::string inherited_fds = open_fds();  // before this process opens any of its own
  pdeathsig_at_exec = parent_death_signal();
  const char* env = std::getenv("COCLUSTER_TEST_SCENARIO");
  const std::string_view s = env ? env : scenario::echo;
  if (s == scenario::garbage || s == scenario::oversized || s == scenario::ten_fds) return misbehave(s);
  if (s == scenario::serve || s == scenario::stall) return run_listen_worker(s);
  if (s == scenario::node) return run_node_worker();
  if (s == scenario::never_online) {
    char c;
    while (::recv(std::stoi(std::getenv("COCLUSTER_CHANNEL_FD")), &c, 1, 0) > 0) {
    }
    return 0;
  }
  if (s == scenario::stdio_lines) {
    const bool written = ::write(1, "out 1\nout 2\n", 12) == 12 && ::write(2, "err 1\n", 6) == 6;
    return written ? 0 : 1;
  }
  if (s == scenario::echo_stdin) {
    std::string line = "echo: ";
    char c;
    while (::read(0, &c, 1) == 1 && c != '\n') line += c;
    line += '\n';
    return ::write(1, line.data(), line.size()) == static_cast<ssize_t>(line.size()) ? 0 : 1;
  }
  if (s == scenario::count_sockets) {
    const rlimit few{300, 300};
    ::setrlimit(RLIMIT_NOFILE, &few);
  }
  asio::io_context io;
  this_worker.start(io.get_executor());
  if (s == scenario::count_sockets) {
    asio::co_spawn(io, []() -> awaitable<void> {
      int sockets = 0;
      for (int i = 0; i < 3000; ++i) {
        sockets += (co_await this_worker.receive()).has_handle();
        // A slow consumer: without a bound on unread handles the reader would run ahead of
        // it and use up the 300 fds.
        for (int yield = 0; yield < 8; ++yield) co_await asio::post(asio::use_awaitable);
      }
      co_await this_worker.send({std::to_string(sockets)});
    }, asio::detached);
    io.run();
    return 0;
  }
  if (s == scenario::exit3) std::exit(3);
  if (s == scenario::report) {
    asio::co_spawn(io, [argc, argv]() -> awaitable<void> {
      for (;;) {
        auto [ec, m] = co_await this_worker.receive(asio::experimental::as_tuple(use_awaitable));
        if (ec) co_return;
        co_await this_worker.send({report_process(argc, argv)});
      }
    }, asio::detached);
    io.run();
    return 0;
  }
  if (s == scenario::flood_then_socket) {
    asio::co_spawn(io, []() -> awaitable<void> {
      for (int i = 0; i < 200; ++i) co_await this_worker.send({std::to_string(i)});
      asio::local::stream_protocol::socket a(co_await asio::this_coro::executor), b(a.get_executor());
      asio::local::connect_pair(a, b);
      co_await this_worker.send({"socket", std::move(a)});
      std::_Exit(5);  // everything is in the master's socket; the master has read little of it
    }, asio::detached);
    io.run();
  }
  if (s == scenario::busy) {
    static volatile unsigned long spins = 0;  // volatile: a loop without side effects is UB
    for (;;) spins = spins + 1;
  }
  if (s == scenario::self_disconnect) this_worker.disconnect();
  if (s == scenario::report_env) {
    const char* extra = std::getenv("TEST_EXTRA");
    const char* setting = std::getenv("TEST_SETTING");
    const std::string report = "id=" + std::to_string(this_worker.id()) + " extra=" + (extra ? extra : "") +
                               " setting=" + (setting ? setting : "") + " fds=" + inherited_fds;
    this_worker.send({report}, [](std::error_code) {});
  }
  if (s == scenario::exit7_on_disconnect) this_worker.on_disconnect([] { std::exit(7); });
  if (s == scenario::hello_first) this_worker.send({"hello"}, [](std::error_code) {});
  asio::co_spawn(io, echo(), asio::detached);
  io.run();
  return 0;
}

// The intermediate master of the master-death tests: forks TEST_WORKERS workers (default 3;
// they inherit this environment, so its COCLUSTER_TEST_SCENARIO), prints their pids once
// they are online, then serves until killed.
int run_intermediate_master() {
  asio::io_context io;
  Master<> master(io.get_executor());
  const char* count = std::getenv("TEST_WORKERS");
  const int workers = count ? std::atoi(count) : 3;
  asio::co_spawn(io, [&]() -> awaitable<void> {
    std::string pids;
    for (int i = 0; i < workers; ++i) {
      auto w = co_await master.fork();
      co_await w->online();
      pids += std::to_string(w->pid()) + " ";
    }
    std::cout << pids << std::endl;
  }, asio::detached);
  io.run();
  return 0;
}

// A master started by a worker: one echo worker, one round trip; exits 0 if it went well.
int run_nested_master() {
  asio::io_context io;
  Master<> master(io.get_executor());
  int rc = 1;
  asio::co_spawn(io, [&]() -> awaitable<void> {
    auto w = co_await master.fork(scenario_env(scenario::echo));
    co_await w->send({"ping"});
    const Message m = co_await w->receive();
    w->disconnect();
    const ExitStatus s = co_await w->exited();
    rc = m.data == "ping" && s == ExitStatus{0, 0} ? 0 : 1;
  }, asio::detached);
  io.run();
  return rc;
}

}  // namespace

int main(int argc, char** argv) {
  if (is_worker()) return run_worker(argc, argv);
  const char* role = std::getenv("COCLUSTER_TEST_ROLE");
  if (role && std::string_view(role) == "master") return run_intermediate_master();
  if (role && std::string_view(role) == "nested_master") return run_nested_master();
  doctest::Context context(argc, argv);
  return context.run();
}
