// policy_bench: HTTP hello world on one port shared by worker processes (2 by default):
// cocluster's listening policies beside Node's cluster, nginx and a raw baseline, in one run.
//   ninja -C build benchmarks/policy_bench benchmarks/raw_rr_server && build/benchmarks/policy_bench [--quick]
//   [--concurrency C] [--duration S] [--workers N] [--client-threads T] [--only=NAME,NAME]
//   [--sources N] [--stalled] [--rate R] [--runs N] [--svg FILE] [--rr-windows N,N]
// Servers (NAME; a prefix such as `node` selects both of its rows):
//   cocluster-POLICY              examples/hello_cluster --policy POLICY, for each policy
//                                 RuntimePolicy knows: rr, none, reuseport, leastconn, sticky
//                                 (each at its own default window: 8)
//   cocluster-rr-wN               the same, round robin with --window N (Node's window is 1, ours 8),
//                                 for each N of --rr-windows (1; e.g. `--rr-windows 1,2,4`)
//   node-rr, node-none            node/hello_cluster.js: Node's cluster, SCHED_RR / SCHED_NONE
//   nginx                         2 worker_processes, `listen reuseport`, `return 200` (when installed)
//   raw-rr, raw-none              raw_rr_server: a blocking accept4() master passing fds over
//                                 SCM_RIGHTS, or workers accepting from the inherited socket
// Every server but nginx takes `--workers N --port P --policy rr|none`, prints
// `listening on HOST:PORT` when ready and, on SIGTERM, one JSON line of per-worker connection
// counts, from which we compute each worker's share and Jain's fairness index.
// Each server is loaded by a client built in here (Asio, in this process): "close" runs C loops
// of connect, GET with `Connection: close`, read to EOF (connections/s, latency of the whole
// connection); "keep-alive" runs C connections sending requests one after another (requests/s,
// latency per request). Then by `wrk` in both modes when it is installed, on a fresh start of
// the server: the shares (Jain's index) are the built-in client's, wrk's are counted apart.
// The built-in client connects from N client addresses in turn, 127.0.0.1 and the N-1 after it
// (--sources, 1024; all of 127.0.0.0/8 is local on Linux: no setup). Sticky routes by the
// client's address, and hashing few keys to workers is uneven by nature (16 addresses over 8
// workers: Jain about 0.7 expected, 0.563 in one run), where a real server sees thousands of
// clients: with 1024, Sticky's index is near 1 (about 0.993 expected) and the other policies,
// which do not look at the address, measured the same as with 16 and 256.
// --stalled: only our policies, each with worker 1 blocking its loop 50 ms on every 10th
// request (hello_cluster --stall-ms 50 --stall-every 10); compare the latency table's p99 and
// max, and how many close requests the stall reached (40 ms or more: their share says whether
// the p99 is the stall's, at 1% or more, or the healthy worker's tail). --svg FILE: connections/s and each worker's share as a chart.
// --rate R: the close mode offers R connections/s (1 to 1e7) on a schedule instead of C loops
// (open loop: each starts when due, whether or not the earlier ones have ended, and its latency
// runs from when it was due). A closed loop's client waiting on a stalled worker sends nothing
// meanwhile, so the arrivals the stall would have delayed are never made ("coordinated
// omission"; wrk2 was written for it), and each server is measured at its own rate; at a fixed
// R every server meets the same arrivals, as long as the client keeps up (its lag is noted).
// The close rate shown is what completed, and the conn/s targets are left out. The keep-alive
// mode and wrk stay closed loops. With --stalled, worker 1 serves at most 1000 * 10 / 50 = 200
// connections/s: a policy that cannot move connections off it (ReusePort, Sticky) is
// overloaded at any R above about 200 x workers, which is what it would meet in service.
// 3 s per mode after 0.5 s of warm-up (--quick: 0.5 s after 0.1 s; wrk runs whole seconds).
// Prints tables, the issue's targets (met or not, never an exit code), then one JSON object as
// its last line. --runs N: the whole comparison N times; the tables and the chart show the
// first run, then each ratio as "first run (min-max over the N runs)"; the JSON has every run.
// Every server runs in its own session (setsid) and its process group is SIGKILLed on every
// way out: normal end, error, timeout, SIGINT/SIGTERM/SIGHUP, and, through a guard process
// (spawn_guard), our own death by SIGKILL.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

// First, though nothing else of cocluster is used here: with clang and an Asio older than 1.24
// it turns on Asio's co_await before Asio's own configuration is read.
#include <cocluster/detail/config.hpp>

#include <asio.hpp>
#include <fmt/core.h>
#include <fmt/format.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#ifndef BENCH_HELLO_CLUSTER
#define BENCH_HELLO_CLUSTER ""  // meson defines it once examples/hello_cluster exists
#endif
#ifndef BENCH_NODE_HELLO
#define BENCH_NODE_HELLO "benchmarks/node/hello_cluster.js"
#endif
#ifndef BENCH_RAW_SERVER
#define BENCH_RAW_SERVER ""
#endif

namespace {

using namespace std::chrono_literals;
using asio::awaitable;
using asio::use_awaitable;
using asio::ip::tcp;
using Clock = std::chrono::steady_clock;
using Figures = std::map<std::string, double>;  // "close_conn_per_s" -> 12345; absent if not measured

struct Options {
  int workers = 2, concurrency = 64, client_threads = 1;
  double duration = 3.0, warmup = 0.5;  // seconds per mode; the warm-up is not counted
  int runs = 1;                         // --runs N: the whole comparison N times
  int sources = 1024;                   // client source addresses: 127.0.0.1 and the N-1 after it
  bool stalled = false;                 // --stalled: worker 1 blocks 50 ms on 1 request in 10
  double rate = 0;                      // --rate R: close mode offers R connections/s (open loop); 0: C loops
  std::string only;                     // empty: every server
  std::vector<int> rr_windows{1};       // --rr-windows: a cocluster-rr-wN server for each N (1: Node's)
  std::string svg;                      // --svg FILE: the chart
  std::string hello_cluster, node_script, raw_server;
  int nginx_conf_port = 0;  // --nginx-conf PORT: print nginx's configuration and exit
};

// Nearest-rank percentile.
double percentile(std::vector<double>& v, double p) {
  std::sort(v.begin(), v.end());
  auto rank = static_cast<std::size_t>(std::ceil(p * static_cast<double>(v.size())));
  return v[std::clamp<std::size_t>(rank, 1, v.size()) - 1];
}

// ---- cleanup on every way out ----

volatile std::sig_atomic_t g_server_group = 0;  // the running server's process group (its pid)
volatile std::sig_atomic_t g_guard_pid = 0;     // see spawn_guard
volatile std::sig_atomic_t g_lifeline = -1;     // our end of the guard's pipe
volatile std::sig_atomic_t g_wrk_pid = 0;
const char* g_phase = "";

// Reaps what is left of process group `group`, for at most `ms` milliseconds. Its members are
// our children, or become ours when their parent dies: we are a child subreaper (main).
// Async-signal-safe, like everything the signal handler below calls.
void reap_group(pid_t group, int ms) {
  const timespec tick{0, 1'000'000};
  for (int i = 0; i < ms; ++i) {
    while (::waitpid(-group, nullptr, WNOHANG) > 0) {
    }
    if (::kill(-group, 0) != 0) return;  // nobody left, not even a zombie
    ::nanosleep(&tick, nullptr);
  }
}

// SIGKILLs the running server's whole process group (its workers too, even once its master
// has gone), removes its temporary directory (nginx) and reaps it all.
void end_server() {
  if (const int fd = g_lifeline; fd >= 0) {
    g_lifeline = -1;
    ::close(fd);  // the guard's cue
  }
  if (const pid_t guard = g_guard_pid; guard > 0) {
    g_guard_pid = 0;
    ::waitpid(guard, nullptr, 0);
  }
  if (const pid_t group = g_server_group; group > 0) {
    g_server_group = 0;
    ::kill(-group, SIGKILL);
    reap_group(group, 2000);
  }
}

void kill_children() {
  end_server();
  if (const pid_t wrk = g_wrk_pid; wrk > 0) {
    g_wrk_pid = 0;
    ::kill(wrk, SIGKILL);
    ::waitpid(wrk, nullptr, 0);
  }
}

void on_fatal_signal(int sig) {
  kill_children();
  const char* what = sig == SIGALRM ? "policy_bench: timed out in " : "policy_bench: interrupted in ";
  (void)!::write(2, what, std::strlen(what));
  (void)!::write(2, g_phase, std::strlen(g_phase));
  (void)!::write(2, "\n", 1);
  ::_exit(sig == SIGALRM ? 2 : 128 + sig);
}

void install_cleanup() {
  ::prctl(PR_SET_CHILD_SUBREAPER, 1);  // orphaned server workers become ours to reap
  for (int sig : {SIGINT, SIGTERM, SIGHUP, SIGALRM}) std::signal(sig, on_fatal_signal);
  std::signal(SIGPIPE, SIG_IGN);
  std::atexit(kill_children);
  std::set_terminate([] {
    kill_children();
    std::abort();
  });
}

// ---- child processes ----

bool executable(const std::string& path) { return !path.empty() && ::access(path.c_str(), X_OK) == 0; }

std::optional<std::string> find_program(const char* name, std::initializer_list<const char*> extra_dirs = {}) {
  const char* path = std::getenv("PATH");
  std::string dirs = path ? path : "";
  for (const char* d : extra_dirs) dirs += std::string(":") + d;
  for (std::size_t pos = 0; pos <= dirs.size();) {
    std::size_t end = std::min(dirs.find(':', pos), dirs.size());
    std::string candidate = dirs.substr(pos, end - pos) + "/" + name;
    if (end > pos && executable(candidate)) return candidate;
    pos = end + 1;
  }
  return std::nullopt;
}

[[noreturn]] void fail(const char* what) { throw std::system_error(errno, std::system_category(), what); }

// A child with its stdout on a pipe to us; stdin is /dev/null, stderr is ours.
struct Child {
  pid_t pid = -1;
  int out = -1;
  std::string pending;  // read but not yet returned by read_line
};

Child spawn(const std::vector<std::string>& args, bool own_session) {
  std::vector<char*> argv;
  for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  int p[2];
  if (::pipe2(p, O_CLOEXEC) != 0) fail("pipe2");
  const pid_t parent = ::getpid();
  std::fflush(stdout);
  const pid_t pid = ::fork();
  if (pid < 0) fail("fork");
  if (pid == 0) {  // async-signal-safe calls only
    if (own_session) ::setsid();
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);  // if we die without cleaning up (SIGKILL)
    if (::getppid() != parent) ::_exit(127);
    ::dup2(p[1], 1);
    const int null = ::open("/dev/null", O_RDONLY);
    if (null >= 0) ::dup2(null, 0);
    for (int sig : {SIGINT, SIGTERM, SIGHUP, SIGALRM, SIGPIPE}) std::signal(sig, SIG_DFL);
    ::execvp(argv[0], argv.data());
    ::_exit(127);
  }
  ::close(p[1]);
  return {pid, p[0], {}};
}

// The one way a server ends: a process in a session of its own waits for EOF on a pipe only we
// hold open, then SIGKILLs the server's process group and removes `temp_dir`. We close the
// pipe (end_server) on every way out we see; the kernel closes it when we die without seeing
// it (SIGKILL, or a test runner killing our process group). Sets g_guard_pid and g_lifeline.
void spawn_guard(pid_t group, const std::string& temp_dir) {
  int lifeline[2];
  if (::pipe2(lifeline, O_CLOEXEC) != 0) fail("pipe2");
  const pid_t pid = ::fork();
  if (pid < 0) fail("fork");
  if (pid == 0) {  // we have one thread when we fork, so the child may call anything
    ::setsid();
    for (int sig : {SIGINT, SIGTERM, SIGHUP, SIGALRM}) std::signal(sig, SIG_DFL);
    ::close(lifeline[1]);
    ::close_range(3, lifeline[0] - 1, 0);  // nothing else of ours stays open because of it
    ::close_range(lifeline[0] + 1, ~0U, 0);
    pollfd pfd{lifeline[0], POLLIN, 0};
    while (::poll(&pfd, 1, -1) < 0 && errno == EINTR) {
    }
    ::kill(-group, SIGKILL);
    std::error_code ignored;
    if (!temp_dir.empty()) std::filesystem::remove_all(temp_dir, ignored);
    ::_exit(0);
  }
  ::close(lifeline[0]);
  g_guard_pid = pid;
  g_lifeline = lifeline[1];
}

// The next line of the child's stdout, or nullopt at EOF or the deadline.
std::optional<std::string> read_line(Child& c, Clock::time_point deadline) {
  for (;;) {
    if (auto nl = c.pending.find('\n'); nl != std::string::npos) {
      std::string line = c.pending.substr(0, nl);
      c.pending.erase(0, nl + 1);
      return line;
    }
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
    if (left <= 0) return std::nullopt;
    pollfd pfd{c.out, POLLIN, 0};
    const int ready = ::poll(&pfd, 1, static_cast<int>(left));
    if (ready < 0 && errno == EINTR) continue;
    if (ready <= 0) return std::nullopt;
    char buf[4096];
    const ssize_t got = ::read(c.out, buf, sizeof buf);
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) return std::nullopt;
    c.pending.append(buf, got);
  }
}

// waitpid with a deadline; the exit status, or nullopt if it is still running.
std::optional<int> wait_for(pid_t pid, Clock::time_point deadline) {
  for (;;) {
    int status = 0;
    const pid_t r = ::waitpid(pid, &status, WNOHANG);
    if (r == pid) return status;
    if (r < 0) return -1;
    if (Clock::now() >= deadline) return std::nullopt;
    std::this_thread::sleep_for(10ms);
  }
}

std::string describe(int status) {
  if (WIFEXITED(status)) return fmt::format("exit code {}", WEXITSTATUS(status));
  if (WIFSIGNALED(status)) return fmt::format("signal {}", WTERMSIG(status));
  return "unknown status";
}

bool can_connect(int port) {
  try {
    asio::io_context io;
    tcp::socket s(io);
    s.connect({asio::ip::address_v4::loopback(), static_cast<unsigned short>(port)});
    return true;
  } catch (const std::system_error&) {
    return false;
  }
}

int free_port() {
  asio::io_context io;
  tcp::acceptor a(io, {asio::ip::address_v4::loopback(), 0});
  return a.local_endpoint().port();
}

// ---- the servers ----

struct Config {
  std::string name, policy;       // policy: "rr", "none" or "" (nginx)
  std::vector<std::string> argv;  // without --workers/--port/--policy
  std::string skipped;            // why it can't run, or empty
  bool nginx = false;
};

// nginx's counterpart of the common command line: its configuration, with every path in
// `dir` (benchmarks/cost_per_request.sh takes it from --nginx-conf, with `dir` ".": nginx
// resolves a relative path against its prefix, -p).
std::string nginx_conf(int workers, int port, int concurrency, const std::string& dir) {
  return fmt::format(R"(worker_processes {0};
daemon off;
master_process on;
pid {1}/nginx.pid;
error_log {1}/error.log warn;
events {{ worker_connections {2}; }}
http {{
  access_log off;
  default_type text/plain;
  client_body_temp_path {1}/client_body;
  proxy_temp_path {1}/proxy;
  fastcgi_temp_path {1}/fastcgi;
  uwsgi_temp_path {1}/uwsgi;
  scgi_temp_path {1}/scgi;
  keepalive_requests 1000000000;
  server {{
    listen 127.0.0.1:{3} reuseport;
    location / {{ return 200 "hello\n"; }}
  }}
}}
)",
                     workers, dir, std::max(4096, 4 * concurrency), port);
}

// That configuration in a temporary prefix.
class NginxPrefix {
 public:
  NginxPrefix(int workers, int port, int concurrency) {
    char tmpl[] = "/tmp/policy_bench.XXXXXX";
    if (!::mkdtemp(tmpl)) fail("mkdtemp");
    dir_ = tmpl;
    std::ofstream conf(conf_path());
    conf << nginx_conf(workers, port, concurrency, dir_);
  }
  NginxPrefix(const NginxPrefix&) = delete;
  NginxPrefix& operator=(const NginxPrefix&) = delete;
  ~NginxPrefix() {
    std::error_code ignored;
    std::filesystem::remove_all(dir_, ignored);
  }
  std::string dir() const { return dir_; }
  std::string conf_path() const { return dir_ + "/nginx.conf"; }
  std::string error_log() const {
    std::ifstream in(dir_ + "/error.log");
    return {std::istreambuf_iterator<char>(in), {}};
  }

 private:
  std::string dir_;
};

class Server {
 public:
  Server(const Config& config, const Options& opt) : config_(config), port_(free_port()) {
    std::vector<std::string> args = config.argv;
    if (config.nginx) {
      nginx_.emplace(opt.workers, port_, opt.concurrency);
      args.insert(args.end(), {"-c", nginx_->conf_path(), "-p", nginx_->dir(), "-e", nginx_->dir() + "/error.log"});
    } else {
      args.insert(args.end(), {"--workers", std::to_string(opt.workers), "--port", std::to_string(port_), "--policy",
                               config.policy});
    }
    command_ = fmt::format("{}", fmt::join(args, " "));
    child_ = spawn(args, true);
    g_server_group = child_.pid;
    try {
      spawn_guard(child_.pid, nginx_ ? nginx_->dir() : "");
      wait_until_listening();
    } catch (...) {
      kill_group();
      throw;
    }
  }
  ~Server() { kill_group(); }
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  int port() const { return port_; }
  const std::string& command() const { return command_; }

  // SIGTERM to the server's own pid (its master) only; returns its JSON line, if any.
  std::optional<std::string> stop() {
    std::optional<std::string> json;
    ::kill(child_.pid, SIGTERM);
    const auto deadline = Clock::now() + 10s;
    if (!config_.nginx) {
      while (auto line = read_line(child_, deadline)) {
        if (line->starts_with("{")) {
          json = std::move(*line);
          break;
        }
      }
    }
    if (auto status = wait_for(child_.pid, deadline)) {
      if (*status != 0)
        fmt::print(stderr, "policy_bench: {} ended with {} after SIGTERM\n", config_.name, describe(*status));
    } else {
      fmt::print(stderr, "policy_bench: {} did not exit within 10 s of SIGTERM; killing it\n", config_.name);
    }
    kill_group();
    return json;
  }

 private:
  void wait_until_listening() {
    const auto deadline = Clock::now() + 20s;
    if (!config_.nginx) {  // every other server says so, with its port
      for (;;) {
        auto line = read_line(child_, deadline);
        if (!line) throw std::runtime_error(why_not_listening());
        if (line->starts_with("listening on ")) {
          port_ = std::atoi(line->c_str() + line->rfind(':') + 1);
          break;
        }
        fmt::print(stderr, "[{}] {}\n", config_.name, *line);
      }
    }
    while (!can_connect(port_)) {  // nginx says nothing: poll until it accepts
      if (Clock::now() > deadline) throw std::runtime_error(why_not_listening());
      if (auto status = wait_for(child_.pid, Clock::now())) {
          throw std::runtime_error(fmt::format("exited before listening ({})", describe(*status)));
      }
      std::this_thread::sleep_for(20ms);
    }
  }

  std::string why_not_listening() {
    std::string why = "no `listening on` line within 20 s";
    if (auto status = wait_for(child_.pid, Clock::now() + 1s)) {  // its stdout ended: it is exiting
      why = fmt::format("exited before listening ({})", describe(*status));
    }
    if (nginx_) why += "; error.log: " + nginx_->error_log();
    return why;
  }

  void kill_group() {
    if (child_.pid <= 0) return;
    end_server();
    ::close(child_.out);
    child_.pid = -1;
  }

  Config config_;
  int port_;
  std::optional<NginxPrefix> nginx_;
  std::string command_;
  Child child_;
};

// One request with `Connection: close`, before any measurement: the server answers 200.
void probe(int port) {
  asio::io_context io;
  tcp::socket s(io);
  s.connect({asio::ip::address_v4::loopback(), static_cast<unsigned short>(port)});
  const std::string request = fmt::format("GET / HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\n\r\n", port);
  asio::write(s, asio::buffer(request));
  std::string response;
  asio::error_code ec;
  asio::read(s, asio::dynamic_buffer(response), ec);
  if (ec != asio::error::eof) throw std::system_error(ec, "probe request");
  if (!response.starts_with("HTTP/1.1 200")) throw std::runtime_error("probe request: " + response.substr(0, 40));
}

// ---- the built-in load client ----

struct Load {
  tcp::endpoint endpoint;
  std::vector<asio::ip::address_v4> sources;  // empty: the kernel's choice (127.0.0.1)
  std::size_t loops = 1;                      // concurrent loops, numbered 0 .. loops-1
  std::string request;
  // Counted: a connection completed in [measure_from, stop_at); with --rate, one due then.
  Clock::time_point measure_from, stop_at;

  // The address loop `loop` connects from for its `k`th connection: the loops take the
  // addresses in turn, so every address is used even when there are more than loops.
  asio::ip::address_v4 source(std::size_t loop, std::size_t k) const {
    return sources.empty() ? asio::ip::address_v4{} : sources[(loop + k * loops) % sources.size()];
  }
};

struct Tally {
  long done = 0, errors = 0;
  std::vector<double> us;
  std::string first_error;

  void record(const Load& load, Clock::time_point t0, const asio::error_code& ec) {
    const auto t1 = Clock::now();
    if (t1 < load.measure_from || t1 >= load.stop_at) return;
    count(t0, t1, ec);
  }

  // Open loop (--rate): a connection's latency runs from when it was due, not from when it
  // began, and it is a sample when it was due in [measure_from, stop_at), whenever it ends:
  // a wait is never cut short by the end of the run. The rate is still what completed in
  // [measure_from, stop_at) (`completed`), as in the closed loop.
  void record_due(const Load& load, Clock::time_point due, const asio::error_code& ec) {
    const auto t1 = Clock::now();
    if (!ec && t1 >= load.measure_from && t1 < load.stop_at) ++completed;
    if (due < load.measure_from || due >= load.stop_at) return;
    count(due, t1, ec);
  }
  // One not ended, or never started, when the client stopped waiting: a sample, with its
  // wait so far (at least 5 s), and counted apart.
  void record_unfinished(const Load& load, Clock::time_point due) {
    if (due < load.measure_from || due >= load.stop_at) return;
    ++unfinished;
    us.push_back(std::chrono::duration<double, std::micro>(Clock::now() - due).count());
  }
  long completed = 0, unfinished = 0;
  std::vector<double> late_us;  // how late each connection due in the window started (client lag)

 private:
  // One measured connection: an error, or a latency from `from` to `to`.
  void count(Clock::time_point from, Clock::time_point to, const asio::error_code& ec) {
    if (ec) {
      if (errors++ == 0) first_error = ec.message();
      return;
    }
    ++done;
    us.push_back(std::chrono::duration<double, std::micro>(to - from).count());
  }
};

asio::error_code bad_response() { return std::make_error_code(std::errc::protocol_error); }

// Reads one response (status 200, a Content-Length body) and removes it from `buf`.
awaitable<asio::error_code> read_response(tcp::socket& s, std::string& buf) {
  asio::error_code ec;
  const std::size_t head_size =
      co_await asio::async_read_until(s, asio::dynamic_buffer(buf), "\r\n\r\n", asio::redirect_error(use_awaitable, ec));
  if (ec) co_return ec;
  std::string_view head(buf.data(), head_size);
  if (!head.starts_with("HTTP/1.1 200")) co_return bad_response();
  std::size_t body = 0;
  bool have_length = false;
  for (std::size_t at = head.find("\r\n"); at != std::string_view::npos && at + 2 < head.size();
       at = head.find("\r\n", at + 2)) {
    constexpr std::string_view key = "content-length:";
    std::string_view line = head.substr(at + 2, key.size());
    if (std::equal(line.begin(), line.end(), key.begin(), key.end(),
                   [](char a, char b) { return std::tolower(static_cast<unsigned char>(a)) == b; })) {
      body = std::strtoul(head.data() + at + 2 + key.size(), nullptr, 10);
      have_length = line.size() == key.size();
      break;
    }
  }
  if (!have_length) co_return bad_response();
  if (buf.size() < head_size + body)
    co_await asio::async_read(s, asio::dynamic_buffer(buf), asio::transfer_exactly(head_size + body - buf.size()),
                              asio::redirect_error(use_awaitable, ec));
  if (ec) co_return ec;
  buf.erase(0, head_size + body);
  co_return asio::error_code{};
}

// Opens `s` and connects it from `source` (unspecified: the kernel's choice). Sticky routes by
// the client's address, so the load comes from several: 127.0.0.0/8 is all local on Linux.
awaitable<void> connect_from(tcp::socket& s, const Load& load, const asio::ip::address_v4& source,
                             asio::error_code& ec) {
  if (!source.is_unspecified()) {
    s.open(tcp::v4(), ec);
    // The port is chosen at connect(), per destination, instead of one per bind().
    if (!ec) s.set_option(asio::detail::socket_option::boolean<IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT>(true), ec);
    if (!ec) s.bind({source, 0}, ec);
    if (ec) co_return;
  }
  co_await s.async_connect(load.endpoint, asio::redirect_error(use_awaitable, ec));
}

awaitable<void> pause_after_error() {
  asio::steady_timer t(co_await asio::this_coro::executor, 10ms);
  co_await t.async_wait(use_awaitable);
}

// One connection: connect, GET with `Connection: close`, the response, EOF, close.
awaitable<asio::error_code> one_close(const Load& load, const asio::ip::address_v4& source, std::string& buf) {
  tcp::socket s(co_await asio::this_coro::executor);
  asio::error_code ec;
  co_await connect_from(s, load, source, ec);
  if (!ec) co_await asio::async_write(s, asio::buffer(load.request), asio::redirect_error(use_awaitable, ec));
  buf.clear();
  if (!ec) ec = co_await read_response(s, buf);
  if (!ec) {  // the server must close after a `Connection: close` response
    char extra[64];
    const std::size_t n = co_await s.async_read_some(asio::buffer(extra), asio::redirect_error(use_awaitable, ec));
    ec = ec == asio::error::eof && n == 0 && buf.empty() ? asio::error_code{} : ec ? ec : bad_response();
  }
  co_return ec;
}

// One loop of connections, each after the last (closed loop).
awaitable<void> close_loop(const Load& load, std::size_t loop, Tally& tally) {
  std::string buf;
  for (std::size_t k = 0; Clock::now() < load.stop_at; ++k) {
    const auto t0 = Clock::now();
    const asio::error_code ec = co_await one_close(load, load.source(loop, k), buf);
    tally.record(load, t0, ec);
    if (ec) co_await pause_after_error();
  }
}

// --rate: connections started on a schedule, one every `period` from `first` on, whether or
// not the earlier ones have ended (open loop: a server that stalls meets the same arrivals as
// one that does not, as long as the client keeps up: Tally::late_us says how late each
// started). At most `limit` open at once: one due beyond that starts when one ends, late and
// still timed from when it was due. Each counts from when it was due (Tally::record_due); one
// never started when the client stops waiting (more than 5 s behind) counts as unfinished.
awaitable<void> open_loop(const Load& load, Clock::duration period, Clock::time_point first, std::size_t loop,
                          long limit, Tally& tally, long& open) {
  const auto ex = co_await asio::this_coro::executor;
  asio::steady_timer timer(ex);
  struct schedule {  // the dues not started yet, if the client stops waiting first
    const Load& load;
    Tally& tally;
    Clock::duration period;
    Clock::time_point next;
    ~schedule() {
      for (; next < load.stop_at; next += period) tally.record_unfinished(load, next);
    }
  } left{load, tally, period, first};
  for (std::size_t k = 0; left.next < load.stop_at; ++k, left.next += period) {
    const auto due = left.next;
    if (due > Clock::now()) {
      timer.expires_at(due);
      co_await timer.async_wait(use_awaitable);
    } else {
      co_await asio::post(ex, use_awaitable);  // behind schedule: let the open ones move meanwhile
    }
    while (open >= limit) {  // the client's own limit: it falls behind, and says so (late_us)
      timer.expires_after(1ms);
      co_await timer.async_wait(use_awaitable);
    }
    if (due >= load.measure_from)
      tally.late_us.push_back(std::chrono::duration<double, std::micro>(Clock::now() - due).count());
    ++open;
    asio::co_spawn(
        ex,
        [&load, &tally, &open, due, source = load.source(loop, k)]() -> awaitable<void> {
          // Counted as unfinished if the client stops waiting first (its frame is destroyed).
          struct pending {
            const Load& load;
            Tally& tally;
            long& open;
            Clock::time_point due;
            bool ended = false;
            ~pending() {
              --open;
              if (!ended) tally.record_unfinished(load, due);
            }
          } p{load, tally, open, due};
          std::string buf;
          const asio::error_code ec = co_await one_close(load, source, buf);
          p.ended = true;
          tally.record_due(load, due, ec);
        },
        asio::detached);
  }
  while (open > 0) {  // until the last one ends, or the client stops waiting (run_load)
    timer.expires_after(1ms);
    co_await timer.async_wait(use_awaitable);
  }
}

// One connection sending requests one after another; reconnects if the server closes it.
// A connection's first request is not counted unless it fails: it also waits for the
// connection to reach a worker (the master's hand-off, or the accept), which the close mode
// measures; keep-alive latency is that of one request on a connection a worker holds.
awaitable<void> keepalive_loop(const Load& load, std::size_t loop, Tally& tally) {
  const auto ex = co_await asio::this_coro::executor;
  for (std::size_t k = 0; Clock::now() < load.stop_at; ++k) {
    tcp::socket s(ex);
    asio::error_code ec;
    const auto connect_start = Clock::now();
    co_await connect_from(s, load, load.source(loop, k), ec);
    if (ec) tally.record(load, connect_start, ec);
    std::string buf;
    for (bool first = true; !ec && Clock::now() < load.stop_at; first = false) {
      const auto t0 = Clock::now();
      co_await asio::async_write(s, asio::buffer(load.request), asio::redirect_error(use_awaitable, ec));
      if (!ec) ec = co_await read_response(s, buf);
      if (!first || ec) tally.record(load, t0, ec);
    }
    if (ec) co_await pause_after_error();
  }
}

// --stalled: worker 1 blocks its loop stall_ms on every stall_every-th request it serves; a
// request that took at least delayed_ms is counted as one the stall reached.
constexpr int stall_ms = 50, stall_every = 10;
constexpr double delayed_ms = 0.8 * stall_ms;

struct ModeResult {
  double rate = 0, p50_ms = 0, p99_ms = 0, max_ms = 0;
  long errors = 0, stuck = 0;
  long samples = 0;  // latencies measured (the unfinished included, with their wait so far)
  long delayed = 0;  // requests that took delayed_ms or more
  double late_p99_ms = 0, late_max_ms = 0;  // --rate: how late the client started connections
  std::string first_error;
};

ModeResult run_load(int port, bool close, const Options& opt) {
  Load load;
  load.endpoint = {asio::ip::address_v4::loopback(), static_cast<unsigned short>(port)};
  for (int i = 1; opt.sources > 1 && i <= opt.sources; ++i)  // 127.0.0.1, ..., 127.0.0.255, 127.0.1.0, ...
    load.sources.push_back(asio::ip::address_v4((127u << 24) + static_cast<unsigned>(i)));
  load.loops = static_cast<std::size_t>(opt.concurrency);
  load.request = fmt::format("GET / HTTP/1.1\r\nHost: 127.0.0.1:{}\r\n{}\r\n", port, close ? "Connection: close\r\n" : "");
  load.measure_from = Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(opt.warmup));
  load.stop_at = load.measure_from + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(opt.duration));

  const bool open = close && opt.rate > 0;
  const int threads = open ? std::max(opt.client_threads, 1) : std::clamp(opt.client_threads, 1, opt.concurrency);
  if (open) load.loops = static_cast<std::size_t>(threads);  // thread t's kth takes address t + k*threads
  // One schedule, the threads' dues interleaved: thread t's are start + (t + k*threads)/rate.
  const auto start = Clock::now();
  const auto gap = std::chrono::duration<double>(open ? 1.0 / opt.rate : 0.0);
  // Connections open at once, per thread: what the fd limit leaves (the limit is the process's).
  rlimit fds{};
  ::getrlimit(RLIMIT_NOFILE, &fds);
  const long limit = std::max<long>(1, (static_cast<long>(std::min<rlim_t>(fds.rlim_cur, 1 << 20)) - 256) / threads);
  std::vector<Tally> tallies(threads);
  std::vector<long> unfinished(threads, 0);
  auto run = [&](int t) {
    long open_now = 0;  // before io: the connections io destroys count themselves out of it
    asio::io_context io(1);
    if (open) {
      const auto first = start + std::chrono::duration_cast<Clock::duration>(gap * t);
      const auto period = std::chrono::duration_cast<Clock::duration>(gap * threads);
      asio::co_spawn(io, open_loop(load, period, first, static_cast<std::size_t>(t), limit, tallies[t], open_now),
                     [](std::exception_ptr e) {
                       if (e) std::rethrow_exception(e);
                     });
      io.run_until(load.stop_at + 5s);  // a server that stops answering can't hang us
      io.stop();
      return;  // ~io_context: what has not ended is counted as unfinished (open_loop)
    }
    int loops = opt.concurrency / threads + (t < opt.concurrency % threads ? 1 : 0);
    long running = loops;
    for (int i = 0; i < loops; ++i) {
      const auto loop = static_cast<std::size_t>(t) + static_cast<std::size_t>(i) * threads;
      asio::co_spawn(io, close ? close_loop(load, loop, tallies[t]) : keepalive_loop(load, loop, tallies[t]),
                     [&](std::exception_ptr e) {
                       --running;
                       if (e) std::rethrow_exception(e);
                     });
    }
    io.run_until(load.stop_at + 5s);  // a server that stops answering can't hang us
    unfinished[t] = running;
  };  // ~io_context destroys any loop still waiting
  std::vector<std::thread> pool;
  for (int t = 1; t < threads; ++t) pool.emplace_back(run, t);
  run(0);
  for (auto& th : pool) th.join();

  ModeResult r;
  std::vector<double> us, late;
  long done = 0;
  for (int t = 0; t < threads; ++t) {
    done += open ? tallies[t].completed : tallies[t].done;
    r.errors += tallies[t].errors;
    r.stuck += unfinished[t] + tallies[t].unfinished;
    if (r.first_error.empty()) r.first_error = tallies[t].first_error;
    us.insert(us.end(), tallies[t].us.begin(), tallies[t].us.end());
    late.insert(late.end(), tallies[t].late_us.begin(), tallies[t].late_us.end());
  }
  r.rate = static_cast<double>(done) / opt.duration;
  r.samples = static_cast<long>(us.size());
  if (!late.empty()) {
    r.late_p99_ms = percentile(late, 0.99) / 1e3;
    r.late_max_ms = late.back() / 1e3;
  }
  if (!us.empty()) {
    r.p50_ms = percentile(us, 0.50) / 1e3;
    r.p99_ms = percentile(us, 0.99) / 1e3;
    r.max_ms = us.back() / 1e3;  // sorted by percentile()
    r.delayed = std::count_if(us.begin(), us.end(), [](double v) { return v >= delayed_ms * 1e3; });
  }
  return r;
}

// ---- wrk ----

// "2.50ms", "721.00us", "1.02s", "1.00m" in milliseconds.
std::optional<double> wrk_time_ms(const std::string& text) {
  char* end = nullptr;
  const double v = std::strtod(text.c_str(), &end);
  if (end == text.c_str()) return std::nullopt;
  const std::string unit = end;
  if (unit == "us") return v / 1e3;
  if (unit == "ms") return v;
  if (unit == "s") return v * 1e3;
  if (unit == "m") return v * 60e3;
  if (unit == "h") return v * 3600e3;
  return std::nullopt;
}

std::optional<ModeResult> run_wrk(const std::string& wrk, int port, bool close, const Options& opt) {
  const int seconds = std::max(1, static_cast<int>(std::lround(opt.duration)));  // wrk takes whole seconds
  std::vector<std::string> args{wrk, fmt::format("-t{}", std::min(2, opt.concurrency)),
                                fmt::format("-c{}", opt.concurrency), fmt::format("-d{}s", seconds), "--latency"};
  if (close) args.insert(args.end(), {"-H", "Connection: close"});
  args.push_back(fmt::format("http://127.0.0.1:{}/", port));
  Child c = spawn(args, false);
  g_wrk_pid = c.pid;
  std::vector<std::string> lines;
  const auto deadline = Clock::now() + std::chrono::seconds(seconds + 30);
  while (auto line = read_line(c, deadline)) lines.push_back(std::move(*line));
  ::kill(c.pid, SIGKILL);  // normally gone already
  int status = 0;
  ::waitpid(c.pid, &status, 0);
  g_wrk_pid = 0;
  ::close(c.out);

  ModeResult r;
  bool have_rate = false, in_distribution = false;
  for (const auto& line : lines) {
    char word[64] = {}, value[64] = {};
    long connect = 0, read = 0, write = 0, timeout = 0, non2xx = 0;
    if (std::sscanf(line.c_str(), " Requests/sec: %63s", value) == 1) {
      r.rate = std::strtod(value, nullptr);
      have_rate = true;
    } else if (line.find("Latency Distribution") != std::string::npos) {
      in_distribution = true;
    } else if (in_distribution && std::sscanf(line.c_str(), " %63s %63s", word, value) == 2 && word[0] &&
               word[std::strlen(word) - 1] == '%') {
      if (std::string(word) == "50%") r.p50_ms = wrk_time_ms(value).value_or(0);
      if (std::string(word) == "99%") r.p99_ms = wrk_time_ms(value).value_or(0);
    } else if (std::sscanf(line.c_str(), " Socket errors: connect %ld, read %ld, write %ld, timeout %ld", &connect,
                           &read, &write, &timeout) == 4) {
      in_distribution = false;
      r.errors += connect + read + write + timeout;
      r.first_error = line.substr(line.find_first_not_of(' '));
    } else if (std::sscanf(line.c_str(), " Non-2xx or 3xx responses: %ld", &non2xx) == 1) {
      r.errors += non2xx;
    } else {
      in_distribution = in_distribution && line.find('%') != std::string::npos;
    }
  }
  if (!have_rate) {
    fmt::print(stderr, "policy_bench: `{}` printed no Requests/sec ({}):\n{}\n", fmt::join(args, " "),
               describe(status), fmt::join(lines, "\n"));
    return std::nullopt;
  }
  return r;
}

// ---- fairness, from {"workers":[{"id":1,"connections":123},...]} ----

struct WorkerCount {
  int id;
  double connections;
};

std::optional<double> json_number_after(std::string_view object, std::string_view key) {
  const auto at = object.find(fmt::format("\"{}\":", key));
  if (at == std::string_view::npos) return std::nullopt;
  const std::string rest(object.substr(at + key.size() + 3));
  char* end = nullptr;
  const double v = std::strtod(rest.c_str(), &end);
  return end == rest.c_str() ? std::nullopt : std::optional<double>(v);
}

std::vector<WorkerCount> parse_worker_counts(const std::string& json) {
  std::vector<WorkerCount> out;
  const auto list = json.find("\"workers\"");
  if (list == std::string::npos) return out;
  for (std::size_t open = json.find('{', list); open != std::string::npos; open = json.find('{', open + 1)) {
    const std::size_t close = json.find('}', open);
    if (close == std::string::npos) break;
    std::string_view object(json.data() + open, close - open);
    auto id = json_number_after(object, "id");
    auto connections = json_number_after(object, "connections");
    if (id && connections) out.push_back({static_cast<int>(*id), *connections});
  }
  return out;
}

// Jain's fairness index: 1 when every worker served the same number, 1/n when one served all.
std::optional<double> jain(const std::vector<WorkerCount>& w) {
  double sum = 0, squares = 0;
  for (const auto& x : w) {
    sum += x.connections;
    squares += x.connections * x.connections;
  }
  if (w.empty() || squares == 0) return std::nullopt;
  return sum * sum / (static_cast<double>(w.size()) * squares);
}

// ---- one server, start to stop ----

struct Result {
  Config config;
  std::string status = "ok";  // or why it was skipped or failed
  std::string command;
  Figures f;
  std::vector<WorkerCount> workers;
  std::vector<std::string> notes;  // errors seen by the clients
};

void put(Figures& f, const std::string& prefix, const ModeResult& m, const char* rate_key) {
  f[prefix + rate_key] = m.rate;
  if (m.p50_ms > 0) {
    f[prefix + "p50_ms"] = m.p50_ms;
    f[prefix + "p99_ms"] = m.p99_ms;
    if (m.max_ms > 0) f[prefix + "max_ms"] = m.max_ms;  // wrk reports none
  }
  f[prefix + "errors"] = static_cast<double>(m.errors);
}

void note_errors(Result& r, const char* what, const ModeResult& m) {
  if (m.errors) r.notes.push_back(fmt::format("{}: {} errors (first: {})", what, m.errors, m.first_error));
  if (m.stuck) r.notes.push_back(fmt::format("{}: {} connections still waiting 5 s after the end", what, m.stuck));
}

Result run_server(const Config& config, const Options& opt, const std::optional<std::string>& wrk) {
  Result r;
  r.config = config;
  if (!config.skipped.empty()) {
    r.status = "skipped: " + config.skipped;
    return r;
  }
  const double wrk_seconds = std::max(1.0, std::round(opt.duration));
  g_phase = config.name.c_str();
  ::alarm(static_cast<unsigned>(60 + 2 * (opt.warmup + opt.duration + 5) + (wrk ? 40 + 2 * (wrk_seconds + 30) : 0)));
  // Each worker's share: `counts` from the server's JSON line as it stops.
  auto shares = [&](Server& server, const char* jain_key) {
    auto json = server.stop();
    if (config.nginx) return std::vector<WorkerCount>{};
    std::vector<WorkerCount> counts;
    if (json) counts = parse_worker_counts(*json);
    if (counts.empty()) r.notes.push_back("no per-worker counts: " + json.value_or("no JSON line after SIGTERM"));
    if (auto j = jain(counts)) r.f[jain_key] = *j;
    return counts;
  };
  try {
    {
      Server server(config, opt);
      r.command = server.command();
      probe(server.port());
      const ModeResult close = run_load(server.port(), true, opt);
      const ModeResult keep = run_load(server.port(), false, opt);
      put(r.f, "close_", close, "conn_per_s");
      put(r.f, "ka_", keep, "req_per_s");
      // How many requests the stall reached, whatever the rate: the close p99 is the stall's
      // only when they are 1% of all, and otherwise the healthy worker's tail.
      if (opt.stalled) {
        r.f["close_ge_40ms"] = static_cast<double>(close.delayed);
        r.f["close_samples"] = static_cast<double>(close.samples);
      }
      if (opt.rate > 0) {  // the client's own lag is in every latency: shown beside them
        r.f["close_late_p99_ms"] = close.late_p99_ms;
        r.f["close_late_max_ms"] = close.late_max_ms;
        if (close.late_p99_ms > 1.0)
          r.notes.push_back(fmt::format("close: the client started connections late (p99 {:.2f} ms, max {:.2f} ms): "
                                        "that lag is in every latency; offer a lower --rate",
                                        close.late_p99_ms, close.late_max_ms));
      }
      note_errors(r, "close", close);
      note_errors(r, "keep-alive", keep);
      r.workers = shares(server, "jain");  // the built-in client's connections only
    }
    if (wrk) {  // a server of its own: wrk connects from 127.0.0.1 only, which Sticky sends to one worker
      Server server(config, opt);
      if (auto m = run_wrk(*wrk, server.port(), true, opt)) {
        put(r.f, "wrk_close_", *m, "req_per_s");
        note_errors(r, "wrk close", *m);
      }
      if (auto m = run_wrk(*wrk, server.port(), false, opt)) {
        put(r.f, "wrk_ka_", *m, "req_per_s");
        note_errors(r, "wrk keep-alive", *m);
      }
      shares(server, "wrk_jain");
    }
  } catch (const std::exception& e) {
    r.status = std::string("failed: ") + e.what();
  }
  ::alarm(0);
  return r;
}

// ---- report ----

std::optional<double> get(const Figures& f, const std::string& key) {
  auto it = f.find(key);
  return it == f.end() ? std::nullopt : std::optional<double>(it->second);
}

std::string grouped(double v) {  // 12345.6 -> "12,346"
  std::string digits = fmt::format("{:.0f}", v), out;
  for (std::size_t i = 0; i < digits.size(); ++i) {
    if (i && (digits.size() - i) % 3 == 0 && std::isdigit(static_cast<unsigned char>(digits[i - 1]))) out += ',';
    out += digits[i];
  }
  return out;
}

std::string cell(std::optional<double> v, int precision) {
  if (!v) return "-";
  return precision < 0 ? grouped(*v) : fmt::format("{:.{}f}", *v, precision);
}

std::optional<double> ratio(const Figures& f, const Figures* base, const std::string& key) {
  if (!base) return std::nullopt;
  auto v = get(f, key), b = get(*base, key);
  if (!v || !b || *b <= 0) return std::nullopt;
  return *v / *b;
}

std::string json_string(std::string_view s) {
  std::string out = "\"";
  for (char ch : s) {
    if (ch == '"' || ch == '\\') out += {'\\', ch};
    else if (static_cast<unsigned char>(ch) < 0x20) out += fmt::format("\\u{:04x}", static_cast<int>(ch));
    else out += ch;
  }
  return out + "\"";
}

std::string json_number(std::optional<double> v) { return v ? fmt::format("{:.3f}", *v) : "null"; }

std::string cpu_model() {
  std::ifstream in("/proc/cpuinfo");
  for (std::string line; std::getline(in, line);)
    if (line.starts_with("model name")) return line.substr(line.find(':') + 2);
  return "unknown";
}

const Result* find(const std::vector<Result>& results, std::string_view name) {
  for (const auto& r : results)
    if (r.config.name == name && r.status == "ok") return &r;
  return nullptr;
}

// Whether the master hands each connection to a worker (else the workers accept themselves).
bool handed_off(std::string_view policy) { return policy == "rr" || policy == "leastconn" || policy == "sticky"; }

// "x raw" compares with raw of the same kind (hand-off: raw-rr; accepting workers: raw-none); nginx (the kernel spreads its reuseport
// sockets) with raw-none.
const Figures* raw_for(const std::vector<Result>& results, const Result& r) {
  const Result* raw = find(results, handed_off(r.config.policy) ? "raw-rr" : "raw-none");
  return raw ? &raw->f : nullptr;
}

void print_table(const char* title, const char* rate_label, const std::string& prefix, const char* rate_key,
                 const std::vector<Result>& results) {
  const Result* nginx = find(results, "nginx");
  fmt::print("\n{:<20}{:>12}{:>9}{:>9}{:>13}{:>9}{:>9}{:>14}{:>14}\n", title, rate_label, "p50 ms", "p99 ms",
             "k-a req/s", "p50 ms", "p99 ms", "x nginx c/k", "x raw c/k");
  for (const auto& r : results) {
    if (r.status != "ok") {
      fmt::print("{:<20}{}\n", r.config.name, r.status);
      continue;
    }
    const std::string c = prefix + "close_", k = prefix + "ka_";
    auto pair = [&](const Figures* base) {
      return fmt::format("{}/{}", cell(ratio(r.f, base, c + rate_key), 2), cell(ratio(r.f, base, k + "req_per_s"), 2));
    };
    fmt::print("{:<20}{:>12}{:>9}{:>9}{:>13}{:>9}{:>9}{:>14}{:>14}\n", r.config.name, cell(get(r.f, c + rate_key), -1),
               cell(get(r.f, c + "p50_ms"), 2), cell(get(r.f, c + "p99_ms"), 2), cell(get(r.f, k + "req_per_s"), -1),
               cell(get(r.f, k + "p50_ms"), 2), cell(get(r.f, k + "p99_ms"), 2), pair(nginx ? &nginx->f : nullptr),
               pair(raw_for(results, r)));
  }
}

// One server's figures as a JSON object's members (without braces).
std::string server_json(const std::vector<Result>& results, const Result& r) {
  std::string json = fmt::format("\"status\":{}", json_string(r.status));
  if (r.status != "ok") return json;
  const Result* nginx = find(results, "nginx");
  for (const auto& [key, value] : r.f) json += fmt::format(",\"{}\":{}", key, json_number(value));
  for (const char* key : {"close_conn_per_s", "ka_req_per_s", "wrk_close_req_per_s", "wrk_ka_req_per_s"}) {
    const std::string stem = std::string(key).substr(0, std::string(key).find("_per_s"));
    json += fmt::format(",\"{}_x_nginx\":{},\"{}_x_raw\":{}", stem, json_number(ratio(r.f, nginx ? &nginx->f : nullptr, key)),
                        stem, json_number(ratio(r.f, raw_for(results, r), key)));
  }
  if (!r.config.nginx) {
    double sum = 0;
    for (const auto& w : r.workers) sum += w.connections;
    json += ",\"workers\":[";
    for (std::size_t i = 0; i < r.workers.size(); ++i)
      json += fmt::format("{}{{\"id\":{},\"connections\":{:.0f},\"share\":{}}}", i ? "," : "", r.workers[i].id,
                          r.workers[i].connections,
                          json_number(sum > 0 ? std::optional<double>(r.workers[i].connections / sum) : std::nullopt));
    json += "]";
  }
  return json;
}

std::string servers_json(const std::vector<Result>& results) {
  std::string json = "{";
  for (const auto& r : results)
    json += fmt::format("{}{}:{{{}}}", json.size() > 1 ? "," : "", json_string(r.config.name), server_json(results, r));
  return json + "}";
}

// ---- several runs: ratios as "first run (min-max)"; the issue's targets ----

// A figure of one server in one run (a ratio to another server of the same run, or its own).
struct Metric {
  std::string label;
  std::function<std::optional<double>(const std::vector<Result>&, const Result&)> of;
  int precision = 2;  // decimals; -1: by magnitude (milliseconds)
};

// r's figure `key` / the same figure of server `base_name` in the same run.
std::optional<double> ratio_to(const std::vector<Result>& run, const Result& r, std::string_view base_name,
                               const std::string& key) {
  const Result* base = find(run, base_name);
  return base ? ratio(r.f, &base->f, key) : std::nullopt;
}

std::vector<Metric> summary_metrics() {
  std::vector<Metric> m;
  for (const auto& [what, key] : {std::pair{"close", "close_conn_per_s"}, std::pair{"k-a", "ka_req_per_s"},
                                  std::pair{"wrk close", "wrk_close_req_per_s"}, std::pair{"wrk k-a", "wrk_ka_req_per_s"}}) {
    const std::string rate = key;
    m.push_back({fmt::format("{} x nginx", what), [rate](const auto& run, const Result& r) { return ratio_to(run, r, "nginx", rate); }});
    m.push_back({fmt::format("{} x raw", what), [rate](const auto& run, const Result& r) { return ratio(r.f, raw_for(run, r), rate); }});
  }
  m.push_back({"close x node-rr", [](const auto& run, const Result& r) { return ratio_to(run, r, "node-rr", "close_conn_per_s"); }});
  m.push_back({"Jain", [](const auto&, const Result& r) { return get(r.f, "jain"); }, 3});
  m.push_back({fmt::format("close >={:.0f} ms", delayed_ms), [](const auto&, const Result& r) { return get(r.f, "close_ge_40ms"); }, 0});
  for (const auto& [mode, key] : {std::pair{"close", "close_p99_ms"}, std::pair{"k-a", "ka_p99_ms"}}) {
    const std::string k = key;
    m.push_back({std::string(mode) + " p99 ms", [k](const auto&, const Result& r) { return get(r.f, k); }, -1});
    m.push_back({std::string(mode) + " p99 x nginx", [k](const auto& run, const Result& r) { return ratio_to(run, r, "nginx", k); }});
  }
  return m;
}

struct Spread {
  std::optional<double> first;  // the first run's value
  double low = 0, high = 0;
  int n = 0;  // runs with a value
};

Spread spread(const std::vector<std::vector<Result>>& runs, const std::string& name, const Metric& metric) {
  Spread s;
  for (std::size_t i = 0; i < runs.size(); ++i) {
    const Result* r = find(runs[i], name);
    auto v = r ? metric.of(runs[i], *r) : std::nullopt;
    if (!v) continue;
    if (i == 0) s.first = v;
    s.low = s.n ? std::min(s.low, *v) : *v;
    s.high = s.n ? std::max(s.high, *v) : *v;
    ++s.n;
  }
  return s;
}

// "0.91 (0.88-0.95)": the first run's value and the range over the runs that have one.
std::string spread_cell(const Spread& s, std::size_t runs, int precision) {
  if (!s.n) return "-";
  const int p = precision >= 0 ? precision : s.high >= 100 ? 0 : s.high >= 10 ? 1 : 2;
  const std::string first = s.first ? fmt::format("{:.{}f}", *s.first, p) : "-";
  if (runs < 2) return first;
  return fmt::format("{} ({:.{}f}-{:.{}f}{})", first, s.low, p, s.high, p, s.n < static_cast<int>(runs) ? "*" : "");
}

void print_summary(const std::vector<std::vector<Result>>& runs) {
  const auto metrics = summary_metrics();
  std::vector<std::string> names;
  for (const auto& r : runs.front())
    if (r.status == "ok") names.push_back(r.config.name);
  std::vector<const Metric*> shown;  // those with a figure for some server
  for (const auto& m : metrics)
    for (const auto& name : names)
      if (spread(runs, name, m).n) {
        shown.push_back(&m);
        break;
      }
  fmt::print("\nsummary over {} runs: first run (min-max over the runs; * a run without this figure)\n", runs.size());
  constexpr std::size_t per_table = 4;
  for (std::size_t from = 0; from < shown.size(); from += per_table) {
    const std::size_t to = std::min(shown.size(), from + per_table);
    fmt::print("\n{:<20}", "");
    for (std::size_t i = from; i < to; ++i) fmt::print("{:>22}", shown[i]->label);
    fmt::print("\n");
    for (const auto& name : names) {
      fmt::print("{:<20}", name);
      for (std::size_t i = from; i < to; ++i) fmt::print("{:>22}", spread_cell(spread(runs, name, *shown[i]), runs.size(), shown[i]->precision));
      fmt::print("\n");
    }
  }
}

// The issue's targets (issue 14, "Measure"), for the figures this run has: printed, never an
// exit code (one run on a loaded machine proves neither way).
void print_targets(const Options& opt, const std::vector<std::vector<Result>>& runs) {
  struct Row {
    std::string what;
    Spread s;
    int precision;
    bool met;                 // in the first run
    int met_in = 0, of = 0;   // runs that meet it, of the runs with the figure
  };
  std::vector<Row> rows;
  auto check = [&](std::string what, const std::string& name, const Metric& m, auto ok) {
    const Spread s = spread(runs, name, m);
    if (!s.first) return;
    Row row{std::move(what), s, m.precision, ok(*s.first)};
    for (const auto& run : runs)
      if (const Result* r = find(run, name))
        if (auto v = m.of(run, *r)) {
          ++row.of;
          row.met_in += ok(*v) ? 1 : 0;
        }
    rows.push_back(std::move(row));
  };
  auto at_least = [](double goal) { return [goal](double v) { return v >= goal; }; };
  for (const char* client : {"", "wrk_"}) {
    // An open loop's close rate is the one it offered, whatever the server could do.
    if (!*client && opt.rate > 0) continue;
    const std::string who = *client ? "wrk" : "built-in client";
    const std::string rate = std::string(client) + (*client ? "close_req_per_s" : "close_conn_per_s");
    const Metric x_nginx{"", [rate](const auto& run, const Result& r) { return ratio_to(run, r, "nginx", rate); }};
    const Metric x_raw_rr{"", [rate](const auto& run, const Result& r) { return ratio_to(run, r, "raw-rr", rate); }};
    const Metric x_node{"", [rate](const auto& run, const Result& r) { return ratio_to(run, r, "node-rr", rate); }};
    check(fmt::format("ReusePort conn/s >= 1.00 x nginx ({})", who), "cocluster-reuseport", x_nginx, at_least(1.0));
    check(fmt::format("RoundRobin conn/s >= 0.95 x raw-rr ({})", who), "cocluster-rr", x_raw_rr, at_least(0.95));
    check(fmt::format("RoundRobin conn/s >= 3 x Node SCHED_RR ({})", who), "cocluster-rr", x_node, at_least(3.0));
    // The same two for each RoundRobin{.window = N} run: the target is the default's (a window
    // of 8); these rows show what another window does (1: Node's), they do not stand in for it.
    for (int n : opt.rr_windows) {
      const std::string name = fmt::format("cocluster-rr-w{}", n);
      check(fmt::format("  RoundRobin{{.window = {}}} >= 0.95 x raw-rr ({})", n, who), name, x_raw_rr, at_least(0.95));
      check(fmt::format("  RoundRobin{{.window = {}}} >= 3 x Node SCHED_RR ({})", n, who), name, x_node, at_least(3.0));
    }
  }
  if (opt.stalled) {  // LeastConnections' close-mode p99 below SharedSocket's and ReusePort's
    for (const auto& [other, policy] : {std::pair{"cocluster-none", "SharedSocket"}, std::pair{"cocluster-reuseport", "ReusePort"}}) {
      const std::string base = other;
      const Metric m{"", [base](const auto& run, const Result& r) { return ratio_to(run, r, base, "close_p99_ms"); }};
      check(fmt::format("stalled: LeastConnections close p99 / {}'s < 1{}", policy, opt.rate > 0 ? " (open loop)" : ""),
            "cocluster-leastconn", m,
            [](double v) { return v < 1.0; });
    }
  }
  const bool large = opt.workers >= 8 && opt.concurrency >= 512 && !opt.stalled;
  if (large) {
    const Metric jain{"", [](const auto&, const Result& r) { return get(r.f, "jain"); }, 3};
    const Metric p99{"", [](const auto& run, const Result& r) { return ratio_to(run, r, "nginx", "ka_p99_ms"); }};
    for (const auto& r : runs.front()) {
      if (!r.config.name.starts_with("cocluster-")) continue;
      check(fmt::format("{}: Jain >= 0.95", r.config.name), r.config.name, jain, at_least(0.95));
      check(fmt::format("{}: keep-alive p99 <= 2 x nginx's", r.config.name), r.config.name, p99,
            [](double v) { return v <= 2.0; });
    }
  }
  fmt::print("\ntargets (issue 14), the first run's figure{}:\n", runs.size() > 1 ? " (min-max over the runs)" : "");
  for (const auto& row : rows)
    fmt::print("  {:<66}{:>20}  {}{}\n", row.what, spread_cell(row.s, runs.size(), row.precision),
               !row.what.starts_with(' ') ? (row.met ? "met" : "NOT MET") : (row.met ? "(met)" : "(not met)"),  // indented: shown, not a target
               runs.size() > 1 ? fmt::format(" (met in {} of {} runs)", row.met_in, row.of) : std::string());
  if (rows.empty()) fmt::print("  (none of the figures the targets need is in this run)\n");
  if (!large) fmt::print("  (Jain >= 0.95 and keep-alive p99 within 2 x nginx's: --workers 8 --concurrency 512)\n");
  // With more busy workers than CPUs, a keep-alive request's tail is its worker's wait for a
  // CPU, whatever the server (perf sched: benchmarks/README.md, "One client thread or one per
  // CPU"); it moves from run to run more than between servers.
  if (large)
    fmt::print("  (keep-alive p99 with more workers than CPUs is mostly the workers' wait for a CPU, nginx's too: "
               "compare over several runs)\n");
  if (!opt.stalled) fmt::print("  (LeastConnections' p99 under a stalled worker: --stalled)\n");
  if (opt.rate > 0) fmt::print("  (the built-in client's conn/s targets: not with --rate, whose close rate is the one offered)\n");
}

// Prints the first run's tables, then (several runs) each ratio's range, the targets, and
// one JSON line with every run's figures.
void report(const Options& opt, const std::vector<std::vector<Result>>& runs, bool have_wrk, const std::string& command) {
  const std::vector<Result>& results = runs.front();
  const long nproc = ::sysconf(_SC_NPROCESSORS_ONLN);
  const std::string cpu = cpu_model();
  fmt::print("policy_bench: HTTP GET / on 127.0.0.1, {} workers per server, {} concurrent connections, "
             "{:.1f} s per mode after {:.1f} s of warm-up\n",
             opt.workers, opt.concurrency, opt.duration, opt.warmup);
  fmt::print("machine: {} CPUs ({}). The load client ({} thread{} in this process, then wrk -t2) runs on the same CPUs "
             "as the servers and takes a share of them: read the ratios, not the absolute rates.\n",
             nproc, cpu, opt.client_threads, opt.client_threads == 1 ? "" : "s");
  if (runs.size() > 1)
    fmt::print("{} runs: the tables show the first run; its ratios and their range over the runs follow them\n",
               runs.size());
  if (opt.stalled)
    fmt::print("stalled: worker 1 of each server blocks its loop {} ms on every {}th request it serves\n", stall_ms,
               stall_every);
  if (opt.rate > 0)
    fmt::print("close mode: open loop, {:.0f} connections/s offered, each timed from when it was due "
               "(keep-alive: {} loops)\n",
               opt.rate, opt.concurrency);
  if (opt.sources > 1)
    fmt::print("built-in client: connections from {} source addresses, 127.0.0.1 to {}, in turn (wrk: 127.0.0.1 only)\n",
               opt.sources, asio::ip::address_v4((127u << 24) + static_cast<unsigned>(opt.sources)).to_string());
  print_table("built-in client", "close conn/s", "", "conn_per_s", results);
  // --stalled adds a column: the close requests the stall reached (delayed_ms or more), and
  // their share of all.
  const auto delayed_cell = [&](const std::string& text) { return opt.stalled ? fmt::format("{:>16}", text) : ""; };
  fmt::print("\n{:<20}{:>10}{:>10}{:>10}{}{:>12}{:>10}{:>10}\n", "latency (ms)", "close p50", "p99", "max",
             delayed_cell(fmt::format(">={:.0f} ms", delayed_ms)), "k-a p50", "p99", "max");
  for (const auto& r : results) {
    if (r.status != "ok") continue;
    std::string delayed = "-";
    const auto n = get(r.f, "close_ge_40ms"), samples = get(r.f, "close_samples");
    if (n && samples && *samples > 0) delayed = fmt::format("{:.0f} ({:.2f}%)", *n, 100 * *n / *samples);
    fmt::print("{:<20}{:>10}{:>10}{:>10}{}{:>12}{:>10}{:>10}\n", r.config.name, cell(get(r.f, "close_p50_ms"), 2),
               cell(get(r.f, "close_p99_ms"), 2), cell(get(r.f, "close_max_ms"), 2), delayed_cell(delayed),
               cell(get(r.f, "ka_p50_ms"), 2), cell(get(r.f, "ka_p99_ms"), 2), cell(get(r.f, "ka_max_ms"), 2));
  }
  if (have_wrk) print_table("wrk", "close req/s", "wrk_", "req_per_s", results);
  else if (opt.stalled) fmt::print("\n(--stalled: no wrk run; wrk cannot make a worker stall)\n");
  else fmt::print("\n(wrk not installed: no wrk figures; apt-get install wrk)\n");

  fmt::print("\n{:<20}{}\n", "fairness",
             "connections per worker from the built-in client (share), Jain's index (wrk's, on a server of its own)");
  for (const auto& r : results) {
    if (r.status != "ok") continue;
    if (r.config.nginx) {
      fmt::print("{:<20}n/a (nginx reports no per-worker counts)\n", r.config.name);
      continue;
    }
    double sum = 0;
    for (const auto& w : r.workers) sum += w.connections;
    std::string counts;
    for (const auto& w : r.workers)
      counts += fmt::format("{}#{}: {} ({:.1f}%)", counts.empty() ? "" : "  ", w.id, grouped(w.connections),
                            sum > 0 ? 100 * w.connections / sum : 0.0);
    fmt::print("{:<20}{}  Jain {}{}\n", r.config.name, counts.empty() ? "-" : counts, cell(get(r.f, "jain"), 3),
               get(r.f, "wrk_jain") ? fmt::format(" (wrk: {:.3f})", *get(r.f, "wrk_jain")) : "");
  }
  fmt::print("\nc/k: close / keep-alive rates. x nginx: rate / nginx's rate. x raw: rate / the raw server's rate with "
             "the same policy (nginx: raw-none). Latency: close = connect to EOF, keep-alive = one request.\n");
  for (std::size_t i = 0; i < runs.size(); ++i) {
    const std::string run = runs.size() > 1 ? fmt::format("run {}: ", i + 1) : "";
    for (const auto& r : runs[i]) {
      for (const auto& n : r.notes) fmt::print("note: {}{}: {}\n", run, r.config.name, n);
      if (i > 0 && r.status != "ok") fmt::print("note: {}{}: {}\n", run, r.config.name, r.status);
    }
  }
  for (const auto& r : results)
    if (!r.command.empty()) fmt::print("command: {}: {}\n", r.config.name, r.command);

  if (runs.size() > 1) print_summary(runs);
  print_targets(opt, runs);

  std::string json = fmt::format(
      "{{\"machine\":{{\"nproc\":{},\"cpu\":{}}},\"command\":{},\"workers\":{},\"concurrency\":{},\"duration_s\":{},"
      "\"warmup_s\":{},\"client_threads\":{},\"sources\":{},\"stalled\":{},\"close_rate\":{},\"wrk\":{},\"servers\":{}",
      nproc, json_string(cpu), json_string(command), opt.workers, opt.concurrency, opt.duration, opt.warmup,
      opt.client_threads, opt.sources, opt.stalled, opt.rate, have_wrk, servers_json(results));
  if (runs.size() > 1) {  // "servers" is the first run; "runs" has every run, the first included
    json += ",\"runs\":[";
    for (std::size_t i = 0; i < runs.size(); ++i) json += (i ? "," : "") + servers_json(runs[i]);
    json += "]";
  }
  fmt::print("{}}}\n", json);
}

// ---- the chart ----

std::string xml_escape(std::string_view s) {
  std::string out;
  for (char ch : s) {
    if (ch == '&') out += "&amp;";
    else if (ch == '<') out += "&lt;";
    else if (ch == '>') out += "&gt;";
    else if (ch == '"') out += "&quot;";
    else out += ch;
  }
  return out;
}

// --svg FILE: for each server that ran, its close connections/s and keep-alive requests/s as
// bars (built-in client), and each worker's share of the connections as one stacked bar.
// Plain SVG written here: no plotting dependency.
void write_svg(const Options& opt, const std::vector<Result>& results) {
  std::vector<const Result*> ok;
  for (const auto& r : results)
    if (r.status == "ok") ok.push_back(&r);
  // Each measure on its own scale: its best server's bar is 4/5 of the width.
  double top[2] = {1, 1};
  for (const Result* r : ok) {
    top[0] = std::max(top[0], get(r->f, "close_conn_per_s").value_or(0));
    top[1] = std::max(top[1], get(r->f, "ka_req_per_s").value_or(0));
  }
  const int label_w = 150, bar_w = 330, gap = 40, share_w = 260, row_h = 34, head = 64;
  const int width = label_w + bar_w + gap + share_w + 80;
  const int height = head + row_h * static_cast<int>(ok.size()) + 40;
  static constexpr const char* palette[] = {"#4e79a7", "#f28e2b", "#e15759", "#76b7b2",
                                            "#59a14f", "#edc948", "#b07aa1", "#ff9da7"};
  std::string svg = fmt::format(
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{0}\" height=\"{1}\" viewBox=\"0 0 {0} {1}\" "
      "font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n",
      width, height);
  svg += fmt::format("<text x=\"10\" y=\"20\" font-size=\"14\" font-weight=\"bold\">policy_bench: {} workers, {} "
                     "connections{}</text>\n",
                     opt.workers, opt.concurrency, opt.stalled ? ", worker 1 stalled" : "");
  svg += fmt::format("<text x=\"{}\" y=\"44\"><tspan fill=\"#4e79a7\">&#9632;</tspan> close conn/s  "
                     "<tspan fill=\"#a0cbe8\">&#9632;</tspan> keep-alive req/s (each on its own scale)</text>\n",
                     label_w);
  svg += fmt::format("<text x=\"{}\" y=\"44\">share of connections per worker</text>\n", label_w + bar_w + gap);
  for (std::size_t i = 0; i < ok.size(); ++i) {
    const Result& r = *ok[i];
    const int y = head + row_h * static_cast<int>(i);
    svg += fmt::format("<text x=\"10\" y=\"{}\">{}</text>\n", y + 18, xml_escape(r.config.name));
    int line = 0;
    for (const char* key : {"close_conn_per_s", "ka_req_per_s"}) {
      const double v = get(r.f, key).value_or(0);
      const double w = 0.8 * bar_w * v / top[line];
      svg += fmt::format("<rect x=\"{}\" y=\"{}\" width=\"{:.1f}\" height=\"12\" fill=\"{}\"/>"
                         "<text x=\"{:.1f}\" y=\"{}\" font-size=\"10\">{}</text>\n",
                         label_w, y + 4 + 13 * line, w, line ? "#a0cbe8" : "#4e79a7", label_w + w + 3,
                         y + 14 + 13 * line, grouped(v));
      ++line;
    }
    double sum = 0;
    for (const auto& w : r.workers) sum += w.connections;
    const int x0 = label_w + bar_w + gap;
    if (sum <= 0) {
      svg += fmt::format("<text x=\"{}\" y=\"{}\" fill=\"#777\">no per-worker counts</text>\n", x0, y + 18);
      continue;
    }
    double x = x0;
    for (std::size_t k = 0; k < r.workers.size(); ++k) {
      const double w = share_w * r.workers[k].connections / sum;
      svg += fmt::format("<rect x=\"{:.1f}\" y=\"{}\" width=\"{:.1f}\" height=\"22\" fill=\"{}\" stroke=\"white\">"
                         "<title>worker {}: {:.1f}%</title></rect>\n",
                         x, y + 4, w, palette[k % std::size(palette)], r.workers[k].id,
                         100 * r.workers[k].connections / sum);
      x += w;
    }
    if (auto j = get(r.f, "jain"))
      svg += fmt::format("<text x=\"{}\" y=\"{}\" font-size=\"10\">Jain {:.3f}</text>\n", x0 + share_w + 4, y + 19, *j);
  }
  svg += fmt::format("<text x=\"10\" y=\"{}\" font-size=\"10\" fill=\"#555\">{} CPUs ({}); {}; "
                     "the client shares the CPUs</text>\n</svg>\n",
                     height - 12, ::sysconf(_SC_NPROCESSORS_ONLN), xml_escape(cpu_model()),
                     opt.runs > 1 ? fmt::format("the first of {} runs", opt.runs) : "one run");
  std::ofstream out(opt.svg);
  out << svg;
  if (!out) fmt::print(stderr, "policy_bench: could not write {}\n", opt.svg);
  else fmt::print(stderr, "policy_bench: chart written to {}\n", opt.svg);
}

// ---- configuration ----

std::string exe_dir() {
  std::error_code ec;
  auto self = std::filesystem::read_symlink("/proc/self/exe", ec);
  return ec ? std::string(".") : self.parent_path().lexically_normal().string();
}

std::string first_set(std::initializer_list<std::string> candidates) {
  for (const auto& c : candidates)
    if (!c.empty()) return c;
  return {};
}

std::vector<Config> configs(const Options& opt) {
  std::vector<Config> out;
  const std::string hello = opt.hello_cluster;
  const std::string missing =
      executable(hello) ? "" : fmt::format("no executable {} (build examples/hello_cluster)", hello);
  // --stalled: worker 1 blocks its loop 50 ms on every 10th request it serves; only our
  // policies are compared there (the others cannot be told to stall).
  std::vector<std::string> stall;
  if (opt.stalled) stall = {"--stall-ms", std::to_string(stall_ms), "--stall-every", std::to_string(stall_every)};
  auto hello_with = [&](std::vector<std::string> extra) {
    std::vector<std::string> argv{hello};
    argv.insert(argv.end(), extra.begin(), extra.end());
    argv.insert(argv.end(), stall.begin(), stall.end());
    return argv;
  };
  // Every policy RuntimePolicy knows by name (COCLUSTER_SCHED_POLICY, hello_cluster --policy).
  for (const char* policy : {"rr", "none", "reuseport", "leastconn", "sticky"})
    out.push_back({fmt::format("cocluster-{}", policy), policy, hello_with({}), missing});
  // Round robin with N connections in flight per worker instead of 8 (RoundRobin::window; Node's: 1).
  for (int n : opt.rr_windows)
    out.push_back({fmt::format("cocluster-rr-w{}", n), "rr", hello_with({"--window", std::to_string(n)}), missing});
  if (opt.stalled) return out;
  const auto node = find_program("node");
  for (const char* policy : {"rr", "none"}) {
    std::string skipped = !node ? "node not installed"
                          : ::access(opt.node_script.c_str(), R_OK) != 0
                              ? fmt::format("{} not found (--node-script=PATH)", opt.node_script)
                              : "";
    out.push_back({fmt::format("node-{}", policy), policy, {node.value_or("node"), opt.node_script}, skipped});
  }
  const auto nginx = find_program("nginx", {"/usr/sbin", "/usr/local/sbin"});
  out.push_back({"nginx", "", {nginx.value_or("nginx")}, nginx ? "" : "nginx not installed (apt-get install nginx)", true});
  for (const char* policy : {"rr", "none"})
    out.push_back({fmt::format("raw-{}", policy), policy, {opt.raw_server},
                   executable(opt.raw_server) ? ""
                                              : fmt::format("no executable {} (ninja benchmarks/raw_rr_server)",
                                                            opt.raw_server)});
  return out;
}

bool wanted(const std::string& only, const std::string& name) {
  if (only.empty()) return true;
  for (std::size_t pos = 0; pos <= only.size();) {
    const std::size_t end = std::min(only.find(',', pos), only.size());
    const std::string item = only.substr(pos, end - pos);
    if (!item.empty() && (name == item || name.starts_with(item + "-"))) return true;
    pos = end + 1;
  }
  return false;
}

// "2,4,8": each a window of 1 to 1024, none twice (each names a server); "" runs none.
bool parse_windows(const std::string& list, std::vector<int>& out) {
  std::vector<int> windows;
  for (std::size_t pos = 0; pos < list.size();) {
    const std::size_t end = std::min(list.find(',', pos), list.size());
    const std::string item = list.substr(pos, end - pos);
    char* rest = nullptr;
    const long n = std::strtol(item.c_str(), &rest, 10);
    if (item.empty() || *rest != '\0' || n < 1 || n > 1024 ||
        std::find(windows.begin(), windows.end(), static_cast<int>(n)) != windows.end()) {
      fmt::print(stderr, "policy_bench: --rr-windows wants windows of 1 to 1024, each once, as in 1,2,4; not `{}`\n", list);
      return false;
    }
    windows.push_back(static_cast<int>(n));
    pos = end + 1;
  }
  out = std::move(windows);
  return true;
}

int usage(const char* argv0, bool asked = false) {
  fmt::print(asked ? stdout : stderr,
             "usage: {} [--quick] [--concurrency C] [--duration S] [--warmup S] [--workers N] [--client-threads T]\n"
             "       [--only=cocluster,node,nginx,raw or full names like raw-rr] [--sources N] [--stalled]\n"
             "       [--rate R] [--runs N] [--svg FILE] [--rr-windows N,N] [--hello-cluster=PATH]\n"
             "       [--node-script=PATH] [--raw-server=PATH]\n"
             "  --nginx-conf PORT  print the nginx configuration the comparison uses (--workers, --concurrency;\n"
             "               paths relative to nginx's -p prefix) and exit\n"
             "  --rate R     the close mode offers R connections/s, each started when due whatever the ones\n"
             "               before it do, its latency from when it was due (open loop; 0: --concurrency loops)\n"
             "  --sources N  the built-in client connects from 127.0.0.1 and the N-1 addresses after it, in turn\n"
             "               (1024; no setup: 127.0.0.0/8 is local). Sticky hashes the client's address, and a\n"
             "               real server sees thousands; 16 over 8 workers left two workers without a client.\n"
             "  --runs N     the whole comparison N times (1): the tables and --svg show the first run, then\n"
             "               each ratio as `first run (min-max over the runs)`; the JSON line has every run.\n"
             "  --rr-windows N,N  round robin is also run at each of these windows (1), as cocluster-rr-wN:\n"
             "               connections a worker may hold unacknowledged (RoundRobin::window: 8; Node's is 1).\n",
             argv0);
  return asked ? 0 : 64;
}

}  // namespace

int main(int argc, char** argv) {
  Options opt;
  const auto env = [](const char* name) { return std::string(std::getenv(name) ? std::getenv(name) : ""); };
  const std::string dir = exe_dir();
  opt.hello_cluster = first_set({env("BENCH_HELLO_CLUSTER"), BENCH_HELLO_CLUSTER, (std::filesystem::path(dir) / "../examples/hello_cluster").lexically_normal().string()});
  opt.node_script = first_set({env("BENCH_NODE_HELLO"), BENCH_NODE_HELLO});
  opt.raw_server = first_set({env("BENCH_RAW_SERVER"), BENCH_RAW_SERVER, dir + "/raw_rr_server"});
  std::string command = argv[0];
  for (int i = 1; i < argc; ++i) command += std::string(" ") + argv[i];

  for (int i = 1; i < argc; ++i) {
    std::string_view arg = argv[i];
    std::string value;  // `--name value` or `--name=value`
    auto takes = [&](std::string_view name) {
      if (arg.starts_with(name) && arg.size() > name.size() && arg[name.size()] == '=') {
        value = arg.substr(name.size() + 1);
        return true;
      }
      if (arg == name && i + 1 < argc) {
        value = argv[++i];
        return true;
      }
      return false;
    };
    if (arg == "--help" || arg == "-h") return usage(argv[0], true);
    else if (arg == "--quick") opt.duration = 0.5, opt.warmup = 0.1;
    else if (takes("--concurrency")) opt.concurrency = std::atoi(value.c_str());
    else if (takes("--duration")) opt.duration = std::atof(value.c_str());
    else if (takes("--warmup")) opt.warmup = std::atof(value.c_str());
    else if (takes("--workers")) opt.workers = std::atoi(value.c_str());
    else if (takes("--client-threads")) opt.client_threads = std::atoi(value.c_str());
    else if (takes("--only")) opt.only = value;
    else if (takes("--sources")) opt.sources = std::atoi(value.c_str());
    else if (takes("--runs")) opt.runs = std::atoi(value.c_str());
    else if (takes("--svg")) opt.svg = value;
    else if (takes("--rr-windows")) {
      if (!parse_windows(value, opt.rr_windows)) return usage(argv[0]);
    }
    else if (arg == "--stalled") opt.stalled = true;
    else if (takes("--rate")) {
      char* end = nullptr;
      opt.rate = std::strtod(value.c_str(), &end);
      if (end == value.c_str() || *end != '\0' || !std::isfinite(opt.rate) || opt.rate < 1 || opt.rate > 1e7)
        return usage(argv[0]);
    }
    else if (takes("--hello-cluster")) opt.hello_cluster = value;
    else if (takes("--node-script")) opt.node_script = value;
    else if (takes("--raw-server")) opt.raw_server = value;
    else if (takes("--nginx-conf")) opt.nginx_conf_port = std::atoi(value.c_str());
    else return usage(argv[0]);
  }
  if (opt.concurrency < 1 || opt.duration <= 0 || opt.workers < 1 || opt.client_threads < 1 || opt.sources < 1 ||
      opt.sources > 65535 || opt.runs < 1 || opt.warmup < 0)
    return usage(argv[0]);

  if (opt.nginx_conf_port > 0) {  // --workers and --concurrency apply; paths relative to nginx's prefix
    fmt::print("{}", nginx_conf(opt.workers, opt.nginx_conf_port, opt.concurrency, "."));
    return 0;
  }
  install_cleanup();
  // Every fd the hard limit allows: an open loop keeps a connection open per arrival the
  // server has not answered yet.
  if (rlimit fds{}; ::getrlimit(RLIMIT_NOFILE, &fds) == 0 && fds.rlim_cur < fds.rlim_max) {
    fds.rlim_cur = fds.rlim_max;
    ::setrlimit(RLIMIT_NOFILE, &fds);
  }
  // wrk connects from one address and cannot stall: the built-in client only for these runs.
  const auto wrk = opt.stalled ? std::nullopt : find_program("wrk");
  std::vector<std::vector<Result>> runs(static_cast<std::size_t>(opt.runs));
  for (int i = 0; i < opt.runs; ++i) {
    for (const Config& config : configs(opt)) {
      if (!wanted(opt.only, config.name)) continue;
      if (opt.runs > 1) fmt::print(stderr, "policy_bench: run {} of {}: {}...\n", i + 1, opt.runs, config.name);
      else fmt::print(stderr, "policy_bench: {}...\n", config.name);
      runs[i].push_back(run_server(config, opt, wrk));
    }
  }
  report(opt, runs, wrk.has_value(), command);
  if (!opt.svg.empty()) write_svg(opt, runs.front());  // the run whose tables are printed
}
