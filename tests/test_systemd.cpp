// systemd: the notify protocol against a fake NOTIFY_SOCKET (this process binds the datagram
// socket and reads what is sent), the watchdog, socket activation with a listener passed as
// systemd would (fd 3, LISTEN_FDS, LISTEN_PID), and workers that see none of it.
#include "cocluster/systemd.hpp"

#include <fcntl.h>
#include <poll.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <asio/connect.hpp>
#include <asio/read.hpp>
#include <asio/read_until.hpp>
#include <asio/write.hpp>

#include <algorithm>
#include <cstdlib>
#include <exception>
#include <cstring>
#include <functional>
#include <sstream>
#include <vector>
#include <string>

#include <doctest/doctest.h>

#include "cocluster/cocluster.hpp"
#include "support.hpp"
#include "worker_scenario.hpp"

using namespace cocluster;
using namespace test;
using asio::ip::tcp;
using as_tuple_t = cocluster::detail::as_tuple_t<asio::use_awaitable_t<>>;

namespace {

// Sets (or, with nullptr, unsets) an environment variable for one scope.
class scoped_env {
 public:
  scoped_env(const char* name, const char* value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old;
    value ? ::setenv(name, value, 1) : ::unsetenv(name);
  }
  ~scoped_env() { old_ ? ::setenv(name_.c_str(), old_->c_str(), 1) : ::unsetenv(name_.c_str()); }
  scoped_env(const scoped_env&) = delete;
  scoped_env& operator=(const scoped_env&) = delete;

 private:
  std::string name_;
  std::optional<std::string> old_;
};

// The fake systemd end: a datagram socket bound at `name` ('@' first: abstract namespace).
struct fake_notify_socket {
  explicit fake_notify_socket(const std::string& name) : name(name), fd(::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0)) {
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    std::memcpy(a.sun_path, name.data(), name.size());
    if (name[0] == '@') a.sun_path[0] = '\0';
    else ::unlink(name.c_str());
    const auto len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + name.size() + (name[0] == '@' ? 0 : 1));
    REQUIRE(::bind(fd.get(), reinterpret_cast<sockaddr*>(&a), len) == 0);
  }
  ~fake_notify_socket() {
    if (name[0] != '@') ::unlink(name.c_str());
  }
  // The next datagram; "<nothing>" if none comes within the failure bound.
  std::string receive() const {
    pollfd p{fd.get(), POLLIN, 0};
    if (::poll(&p, 1, 10000) != 1) return "<nothing>";
    char buf[512];
    const ssize_t n = ::recv(fd.get(), buf, sizeof buf, 0);
    return n < 0 ? "<error>" : std::string(buf, static_cast<std::size_t>(n));
  }
  std::string name;
  cocluster::detail::unique_fd fd;
};

std::string temp_socket_name(const char* what) {
  return "/tmp/cocluster-test-" + std::string(what) + "-" + std::to_string(::getpid()) + ".sock";
}

}  // namespace

// ---- the workers ----

// Sends the systemd variables it sees ("NAME=value;" for each set one, so "" when none is).
WORKER_SCENARIO(report_systemd_env) {
  asio::io_context io;
  this_worker.start(io.get_executor());
  std::string seen;
  for (const char* v : systemd::master_only_variables)
    if (const char* value = std::getenv(v)) seen += std::string(v) + "=" + value + ";";
  asio::co_spawn(io, [seen]() -> awaitable<void> { co_await this_worker.send({seen}); }, asio::detached);
  io.run();
  return 0;
}

// Listens on 127.0.0.1:TEST_PORT through the master and answers each connection with
// "served by <id>; <the systemd variables it sees>\n", then closes it.
WORKER_SCENARIO(serve_activated_port) {
  asio::io_context io;
  this_worker.start(io.get_executor());
  std::string seen;
  for (const char* v : systemd::master_only_variables)
    if (const char* value = std::getenv(v)) seen += std::string(v) + "=" + value + ";";
  const auto port = static_cast<unsigned short>(std::atoi(std::getenv("TEST_PORT")));
  asio::co_spawn(io, [seen, port]() -> awaitable<void> {
    auto server = co_await this_worker.listen(tcp::endpoint(asio::ip::make_address("127.0.0.1"), port));
    for (;;) {
      auto [ec, socket] = co_await server.accept(as_tuple_t{});
      if (ec) co_return;
      const std::string reply = "served by " + std::to_string(this_worker.id()) + "; " + seen + "\n";
      co_await asio::async_write(socket, asio::buffer(reply), as_tuple_t{});
    }
  }, asio::detached);
  io.run();
  return 0;
}

// ---- sd_notify ----

TEST_CASE("sd_notify: READY, RELOADING, STOPPING and STATUS reach NOTIFY_SOCKET, a path or '@' abstract") {
  fake_notify_socket path_socket(temp_socket_name("notify"));
  {
    scoped_env env("NOTIFY_SOCKET", path_socket.name.c_str());
    CHECK(systemd::notify_enabled());
    CHECK(systemd::notify_ready("serving 4 workers"));
    CHECK(path_socket.receive() == "READY=1\nSTATUS=serving 4 workers");
    timespec before{};
    ::clock_gettime(CLOCK_MONOTONIC, &before);
    CHECK(systemd::notify_reloading());
    const std::string reloading = path_socket.receive();
    REQUIRE(reloading.rfind("RELOADING=1\nMONOTONIC_USEC=", 0) == 0);
    const auto usec = std::stoull(reloading.substr(std::strlen("RELOADING=1\nMONOTONIC_USEC=")));
    CHECK(usec >= static_cast<unsigned long long>(before.tv_sec) * 1000000ULL);
    CHECK(systemd::notify_ready());
    CHECK(path_socket.receive() == "READY=1");
    CHECK(systemd::notify_status("draining"));
    CHECK(path_socket.receive() == "STATUS=draining");
    CHECK(systemd::notify_stopping());
    CHECK(path_socket.receive() == "STOPPING=1");
  }
  const std::string abstract = "@cocluster-test-notify-" + std::to_string(::getpid());
  fake_notify_socket abstract_socket(abstract);
  {
    scoped_env env("NOTIFY_SOCKET", abstract.c_str());
    std::error_code ec;
    CHECK(systemd::notify_ready({}, ec));
    CHECK_FALSE(ec);
    CHECK(abstract_socket.receive() == "READY=1");
  }
}

TEST_CASE("sd_notify: nothing to do without NOTIFY_SOCKET; a bad one is an error that says so") {
  {
    scoped_env env("NOTIFY_SOCKET", nullptr);
    CHECK_FALSE(systemd::notify_enabled());
    std::error_code ec;
    CHECK_FALSE(systemd::notify_ready({}, ec));
    CHECK_FALSE(ec);
    CHECK_FALSE(systemd::notify_stopping());  // the throwing form does not throw either
  }
  {
    scoped_env env("NOTIFY_SOCKET", "relative/path");
    std::error_code ec;
    CHECK_FALSE(systemd::notify_stopping(ec));
    CHECK(ec == std::errc::invalid_argument);
    CHECK_THROWS_WITH_AS(systemd::notify_stopping(), doctest::Contains("NOTIFY_SOCKET=relative/path"), std::system_error);
  }
  {
    const std::string nobody = temp_socket_name("nobody");  // nothing bound there
    scoped_env env("NOTIFY_SOCKET", nobody.c_str());
    std::error_code ec;
    CHECK_FALSE(systemd::notify_ready({}, ec));
    CHECK(ec);  // ENOENT
  }
}

TEST_CASE("sd_notify: the watchdog sends WATCHDOG=1 at half of WATCHDOG_USEC, only for WATCHDOG_PID") {
  fake_notify_socket socket(temp_socket_name("watchdog"));
  scoped_env notify("NOTIFY_SOCKET", socket.name.c_str());
  const std::string own_pid = std::to_string(::getpid());
  const std::string other_pid = std::to_string(::getppid());
  asio::io_context io;
  {
    scoped_env usec("WATCHDOG_USEC", "100000");
    scoped_env pid("WATCHDOG_PID", other_pid.c_str());
    CHECK_FALSE(systemd::watchdog_timeout());
    systemd::Watchdog watchdog(io.get_executor());
    CHECK_FALSE(watchdog.active());
  }
  {
    scoped_env usec("WATCHDOG_USEC", nullptr);
    CHECK_FALSE(systemd::watchdog_timeout());
  }
  // Not what systemd writes: not a watchdog (strtoull alone took "-1" for 2^64 - 1, which
  // wrapped to a negative interval, clamped to 1 us: a busy loop).
  for (const char* bad : {"-1", "+5", " 5", "abc", "99999999999999999999999", "18446744073709551615"}) {
    scoped_env usec("WATCHDOG_USEC", bad);
    CHECK_MESSAGE(!systemd::watchdog_timeout(), bad);
  }
  {
    scoped_env usec("WATCHDOG_USEC", "2");  // 2 us: sent every millisecond, not every microsecond
    systemd::Watchdog tiny(io.get_executor());
    CHECK(tiny.interval().count() == 1000);
    CHECK(socket.receive() == "WATCHDOG=1");
  }
  io.poll();  // its cancelled tick, so that each run_one() below runs the next watchdog's
  io.restart();
  scoped_env usec("WATCHDOG_USEC", "100000");
  scoped_env pid("WATCHDOG_PID", own_pid.c_str());
  REQUIRE(systemd::watchdog_timeout());
  CHECK(systemd::watchdog_timeout()->count() == 100000);
  systemd::Watchdog watchdog(io.get_executor());
  REQUIRE(watchdog.active());
  CHECK(watchdog.interval().count() == 50000);
  CHECK(socket.receive() == "WATCHDOG=1");  // at once
  for (int i = 0; i < 3; ++i) {             // then from the timer, on the event loop
    io.run_one();
    CHECK(socket.receive() == "WATCHDOG=1");
  }
}

TEST_CASE("systemd: workers see no NOTIFY_SOCKET, WATCHDOG_* or LISTEN_*, even when the master has them") {
  scoped_env a("NOTIFY_SOCKET", "/run/systemd/notify");
  scoped_env b("WATCHDOG_USEC", "30000000");
  scoped_env c("WATCHDOG_PID", "1");
  scoped_env d("LISTEN_FDS", "1");
  scoped_env e("LISTEN_PID", "1");  // not this process: nothing is adopted here
  scoped_env f("LISTEN_FDNAMES", "web");
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor());
    auto w = co_await master.fork(scenario_env("report_systemd_env"));
    CHECK((co_await w->receive()).data == "");
    w->disconnect();
    CHECK(co_await w->exited() == ExitStatus{0, 0});
  });
}

// ---- socket activation ----

namespace {

// A listener as systemd would pass it: bound to 127.0.0.1:0 and listening here, kept open by
// this process too, so that a master that bound 127.0.0.1:port itself would fail with
// EADDRINUSE. `reuse_port`: with SO_REUSEPORT (systemd's ReusePort=yes).
cocluster::detail::unique_fd passed_listener(unsigned short& port, bool reuse_port = false) {
  cocluster::detail::unique_fd listener(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  const int one = 1;
  if (reuse_port) REQUIRE(::setsockopt(listener.get(), SOL_SOCKET, SO_REUSEPORT, &one, sizeof one) == 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  REQUIRE(::bind(listener.get(), reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
  REQUIRE(::listen(listener.get(), 16) == 0);
  socklen_t len = sizeof a;
  REQUIRE(::getsockname(listener.get(), reinterpret_cast<sockaddr*>(&a), &len) == 0);
  port = ntohs(a.sin_port);
  return listener;
}

// Runs this executable as a master as systemd starts it: `listener` at fd 3, LISTEN_PID its
// own pid (known only after the fork), `workers` workers serving 127.0.0.1:port
// (serve_activated_port), `extra` in its environment. Then `clients`; the master and its
// workers are ended and reaped whatever happens.
void with_activated_master(const cocluster::detail::unique_fd& listener, unsigned short port, int workers,
                           std::vector<std::string> extra, std::function<awaitable<void>(asio::io_context&)> clients) {
  auto [out_read, out_write] = cocluster::detail::make_pipe();
  std::vector<std::string> env = {"COCLUSTER_TEST_ROLE=master",  "TEST_WORKERS=" + std::to_string(workers),
                                  "COCLUSTER_TEST_SCENARIO=serve_activated_port", "TEST_PORT=" + std::to_string(port),
                                  "LISTEN_FDS=1", "LISTEN_FDNAMES=web", "LISTEN_PID=0000000000"};
  const std::size_t listen_pid_at = 6;
  env.insert(env.end(), extra.begin(), extra.end());
  // Not systemd's variables, and no scheduling policy from where the suite runs: the test
  // master's policy is the one `extra` names (round robin if none).
  for (char** e = environ; *e; ++e)
    if (std::strncmp(*e, "LISTEN_", 7) != 0 && std::strncmp(*e, "COCLUSTER_SCHED_POLICY=", 23) != 0 &&
        std::strncmp(*e, "NODE_CLUSTER_SCHED_POLICY=", 26) != 0)
      env.emplace_back(*e);
  std::vector<char*> envp;
  for (auto& s : env) envp.push_back(s.data());
  envp.push_back(nullptr);
  char* listen_pid = env[listen_pid_at].data() + std::strlen("LISTEN_PID=");
  char self[] = "/proc/self/exe";
  char* argv[] = {self, nullptr};
  REQUIRE(::prctl(PR_SET_CHILD_SUBREAPER, 1) == 0);  // its workers come to this process once it ends
  const pid_t master = ::fork();
  REQUIRE(master >= 0);
  if (master == 0) {  // async-signal-safe only: the pid written into the prepared string
    unsigned long p = static_cast<unsigned long>(::getpid());
    for (int i = 9; i >= 0; --i, p /= 10) listen_pid[i] = static_cast<char>('0' + p % 10);
    if (::dup2(out_write.get(), 1) < 0) ::_exit(126);
    if (listener.get() == 3 ? ::fcntl(3, F_SETFD, 0) < 0 : ::dup2(listener.get(), 3) < 0) ::_exit(126);
    ::execve(self, argv, envp.data());
    ::_exit(127);
  }
  out_write.reset();
  std::string line;
  char c;
  while (::read(out_read.get(), &c, 1) == 1 && c != '\n') line += c;  // its workers' pids, once online
  std::istringstream pids(line);
  std::vector<cocluster::detail::unique_fd> worker_pidfds;
  pid_t worker = -1;
  while (pids >> worker) {
    std::error_code ec;
    auto pidfd = cocluster::detail::pidfd_open(worker, ec);
    if (!ec) worker_pidfds.push_back(std::move(pidfd));
  }
  if (worker_pidfds.size() != static_cast<std::size_t>(workers)) {  // it did not start them: end it before failing
    ::kill(master, SIGKILL);
    ::waitpid(master, nullptr, 0);
    for (auto& fd : worker_pidfds) {
      siginfo_t info;
      (void)reap_within(fd, 10000ms, info);
    }
    ::prctl(PR_SET_CHILD_SUBREAPER, 0);
    FAIL("the activated master did not report its online workers: '" << line << "'");
  }

  std::exception_ptr failed;  // the master and its workers are ended and reaped whatever happens
  try {
    run_bounded(std::move(clients));
  } catch (...) {
    failed = std::current_exception();
  }

  ::kill(master, SIGKILL);  // its workers exit on the channel's EOF
  int status = 0;
  CHECK(::waitpid(master, &status, 0) == master);
  for (auto& fd : worker_pidfds) {
    siginfo_t info;
    CHECK(reap_within(fd, 10000ms, info));
  }
  ::prctl(PR_SET_CHILD_SUBREAPER, 0);
  if (failed) std::rethrow_exception(failed);
}

// TCP sockets listening on 127.0.0.1:port (one per socket, however many fds and processes share it).
int listening_sockets(unsigned short port) {
  const auto sockets = loopback_tcp_sockets(port);
  return static_cast<int>(std::count_if(sockets.begin(), sockets.end(), [](const tcp_socket_line& s) { return s.state == 10; }));
}

// One request to 127.0.0.1:port: the answer's line ("" if none came).
awaitable<std::string> ask_activated(unsigned short port) {
  tcp::socket client(co_await asio::this_coro::executor);
  co_await client.async_connect(tcp::endpoint(asio::ip::make_address("127.0.0.1"), port), use_awaitable);
  std::string reply;
  auto [ec, n] = co_await asio::async_read_until(client, asio::dynamic_buffer(reply), '\n', as_tuple_t{});
  co_return ec ? std::string() : reply;
}

}  // namespace

TEST_CASE("socket activation: a worker's listen() on the passed listener's address is served through it") {
  unsigned short port = 0;
  auto listener = passed_listener(port);
  with_activated_master(listener, port, 1, {}, [port](asio::io_context&) -> awaitable<void> {
    // Served by the worker (not by anyone binding the port: it is taken), which sees no
    // LISTEN_* (nor anything else of systemd's).
    for (int i = 0; i < 3; ++i) CHECK(co_await ask_activated(port) == "served by 1; \n");
  });
}

TEST_CASE("socket activation under ReusePort: the passed listener is shared, even with SO_REUSEPORT") {
  // systemd's ReusePort=yes. Sockets of the master's own in its group would need the same
  // owner (a service with User= has another) and would leave systemd's socket to nobody.
  unsigned short port = 0;
  auto listener = passed_listener(port, /*reuse_port=*/true);
  with_activated_master(listener, port, 2, {"COCLUSTER_SCHED_POLICY=reuseport", "TEST_AWAIT_LISTENING=1"},
                        [port](asio::io_context&) -> awaitable<void> {
    // Both workers listen: the master has answered both (another socket of its own would be
    // there by now).
    CHECK(listening_sockets(port) == 1);
    for (int i = 0; i < 6; ++i) {
      const std::string reply = co_await ask_activated(port);
      CHECK((reply == "served by 1; \n" || reply == "served by 2; \n"));
    }
  });
}
