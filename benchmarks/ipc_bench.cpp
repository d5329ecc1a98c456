// ipc_bench: what the master-worker channel costs, beside a raw baseline and Node's cluster.
//   ninja -C build benchmarks/ipc_bench && build/benchmarks/ipc_bench [--quick] [--only=raw,cocluster,node]
//     [--spawn-only]
// One-way 64-byte message rate, round trip p50/p99, fd hand-offs per second, and fork-to-online
// time for 1, 8 and 32 workers (--spawn-only: that alone). Prints a table, then one JSON
// object as its last line.
// "raw" does the same work with no framework: two processes, blocking send/recv on a
// SOCK_SEQPACKET socketpair, SCM_RIGHTS by hand, and fork+exec of this same executable as a
// child that writes one byte back. Fork to online counts, on both sides, from the first fork
// to the last child's first message, with the same executable loaded; raw and cocluster take
// turns, round by round. "node" runs node/ipc_bench.js when `node` is on PATH
// (--node-script=PATH or $BENCH_NODE_SCRIPT if the source tree has moved).
// The workers are this executable again: main() dispatches on is_worker() and BENCH_MODE.
#include <fcntl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

// cocluster first: with clang and an Asio older than 1.24 it turns on Asio's co_await before
// Asio's own configuration is read.
#include <cocluster/cocluster.hpp>

#include <asio.hpp>
#include <asio/experimental/awaitable_operators.hpp>
#include <fmt/core.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <optional>
#include <string>
#include <vector>

#ifndef BENCH_NODE_SCRIPT
#define BENCH_NODE_SCRIPT "benchmarks/node/ipc_bench.js"
#endif

extern char** environ;

namespace {

using namespace std::chrono_literals;
using asio::awaitable;
using asio::use_awaitable;
using cocluster::this_worker;
using Clock = std::chrono::steady_clock;
using Figures = std::map<std::string, double>;  // "rtt_p50_us" -> 12.3; absent if not measured

struct Counts {
  long oneway = 200'000, rtt = 20'000, fd = 50'000, warmup = 1'000;
  int spawn_repeats = 5;  // each spawn figure is the median of this many rounds (raw and cocluster in turns)
  bool spawn_only = false;  // --spawn-only: the fork-to-online figures alone
};
constexpr std::size_t k_message_size = 64;
constexpr int k_spawn_sizes[] = {1, 8, 32};

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// Nearest-rank percentile.
double percentile(std::vector<double> v, double p) {
  std::sort(v.begin(), v.end());
  auto rank = static_cast<std::size_t>(std::ceil(p * static_cast<double>(v.size())));
  return v[std::clamp<std::size_t>(rank, 1, v.size()) - 1];
}

std::string spawn_key(int size) { return fmt::format("spawn_ms_{}", size); }

void record_rtts(const std::vector<double>& us, Figures& out) {
  out["rtt_p50_us"] = percentile(us, 0.50);
  out["rtt_p99_us"] = percentile(us, 0.99);
}

// A hung run ends with a message instead of hanging (the asio timer below covers cocluster;
// this covers the blocking raw baseline and node).
const char* watchdog_phase = "";
void watchdog(unsigned seconds, const char* phase) {
  watchdog_phase = phase;
  std::signal(SIGALRM, [](int) {
    (void)!::write(2, "ipc_bench: timed out in ", 24);
    (void)!::write(2, watchdog_phase, std::strlen(watchdog_phase));
    (void)!::write(2, "\n", 1);
    ::_exit(2);
  });
  ::alarm(seconds);
}

// ---- cocluster ----

// The worker side: BENCH_MODE says which work, BENCH_COUNT how much.
awaitable<void> worker_main() {
  const std::string mode = std::getenv("BENCH_MODE") ? std::getenv("BENCH_MODE") : "";
  const long count = std::atol(std::getenv("BENCH_COUNT") ? std::getenv("BENCH_COUNT") : "0");
  try {
    if (mode == "oneway") {
      for (long i = 0; i < count; ++i) co_await this_worker.receive();
      co_await this_worker.send("done");
    } else if (mode == "echo") {
      for (;;) {
        cocluster::Message m = co_await this_worker.receive();
        co_await this_worker.send(std::move(m));
      }
    } else if (mode == "fd") {
      long sockets = 0;
      for (long i = 0; i < count; ++i) {
        cocluster::Message m = co_await this_worker.receive();
        sockets += m.handle.is<asio::local::stream_protocol::socket>();
      }  // each handle is dropped here unadopted: a close(2), no epoll_ctl, no getsockopt
      co_await this_worker.send(std::to_string(sockets));
    }  // "spawn": being online is the work
  } catch (const std::system_error& e) {
    if (e.code() != cocluster::error::worker_not_connected) throw;  // "echo" ends at the disconnect
  }
}

cocluster::Env mode_env(const char* mode, long count) {
  return {{"BENCH_MODE", mode}, {"BENCH_COUNT", std::to_string(count)}};
}

awaitable<std::shared_ptr<cocluster::Worker>> fork_online(cocluster::Master<>& master, const char* mode, long count) {
  auto w = co_await master.fork(mode_env(mode, count));
  co_await w->online();
  co_return w;
}

awaitable<void> finish(std::shared_ptr<cocluster::Worker> w) {
  w->disconnect();
  co_await w->exited();
}

awaitable<void> cocluster_oneway(cocluster::Master<>& master, const Counts& n, Figures& out) {
  auto w = co_await fork_online(master, "oneway", n.oneway);
  const std::string payload(k_message_size, 'x');
  const auto t0 = Clock::now();
  for (long i = 0; i < n.oneway; ++i) co_await w->send(payload);
  cocluster::Message done = co_await w->receive();
  out["oneway_msgs_per_s"] = static_cast<double>(n.oneway) / seconds_since(t0);
  co_await finish(w);
}

awaitable<void> cocluster_rtt(cocluster::Master<>& master, const Counts& n, Figures& out) {
  auto w = co_await fork_online(master, "echo", 0);
  const std::string payload(k_message_size, 'p');
  std::vector<double> us;
  for (long i = 0; i < n.warmup + n.rtt; ++i) {
    const auto t0 = Clock::now();
    co_await w->send(payload);
    cocluster::Message reply = co_await w->receive();
    if (i >= n.warmup) us.push_back(seconds_since(t0) * 1e6);
  }
  record_rtts(us, out);
  co_await finish(w);
}

// Each hand-off sends a fresh dup of one connected unix socket; the worker drops what it gets.
// fd_pass_per_s wraps each dup in an Asio socket first (registered with epoll on construction,
// deregistered when the Handle takes its fd), as a master sending the sockets it works with
// does; fd_pass_fd_per_s sends the dup as Handle(kind, fd), which is what raw does.
awaitable<void> cocluster_fd(cocluster::Master<>& master, const Counts& n, Figures& out, bool as_asio_socket) {
  auto w = co_await fork_online(master, "fd", n.fd);
  const auto& ex = master.get_executor();
  asio::local::stream_protocol::socket a(ex), b(ex);
  asio::local::connect_pair(a, b);
  const auto t0 = Clock::now();
  for (long i = 0; i < n.fd; ++i) {
    cocluster::detail::unique_fd copy(::fcntl(a.native_handle(), F_DUPFD_CLOEXEC, 0));
    if (as_asio_socket) {
      asio::local::stream_protocol::socket s(ex, asio::local::stream_protocol(), copy.release());
      co_await w->send(cocluster::Message("fd", std::move(s)));
    } else {
      co_await w->send(cocluster::Message("fd", cocluster::Handle(cocluster::handle_kind::unix_socket, std::move(copy))));
    }
  }
  cocluster::Message got = co_await w->receive();
  out[as_asio_socket ? "fd_pass_per_s" : "fd_pass_fd_per_s"] = static_cast<double>(n.fd) / seconds_since(t0);
  if (got.data != std::to_string(n.fd)) throw std::runtime_error("worker received sockets: " + got.data);
  co_await finish(w);
}

awaitable<double> cocluster_spawn(cocluster::Master<>& master, int size) {
  std::vector<std::shared_ptr<cocluster::Worker>> workers;
  const auto t0 = Clock::now();
  for (int i = 0; i < size; ++i) workers.push_back(co_await master.fork(mode_env("spawn", 0)));
  for (auto& w : workers) co_await w->online();
  const double ms = seconds_since(t0) * 1e3;
  co_await master.disconnect();
  for (auto& w : workers) co_await w->exited();
  co_return ms;
}

void run_cocluster(const Counts& n, Figures& out) {
  asio::io_context io;
  cocluster::Master<> master(io.get_executor());
  auto all = [&]() -> awaitable<void> {
    co_await cocluster_oneway(master, n, out);
    co_await cocluster_rtt(master, n, out);
    co_await cocluster_fd(master, n, out, true);
    co_await cocluster_fd(master, n, out, false);
  };
  asio::co_spawn(
      io,
      [&]() -> awaitable<void> {
        using namespace asio::experimental::awaitable_operators;
        asio::steady_timer deadline(io, 90s);
        auto first = co_await (all() || deadline.async_wait(use_awaitable));
        if (first.index() == 1) throw std::runtime_error("timed out in the cocluster benchmarks");
      },
      [](std::exception_ptr e) {
        if (e) std::rethrow_exception(e);
      });
  io.run();
}

// ---- raw baseline: blocking calls on a socketpair, no framework ----

[[noreturn]] void fail(const char* what) { throw std::system_error(errno, std::system_category(), what); }

// A child process and our end of its socketpair; closing our end is its signal to leave.
class RawPeer {
 public:
  RawPeer(int fd, pid_t pid) : fd_(fd), pid_(pid) {}
  RawPeer(RawPeer&& o) noexcept : fd_(std::exchange(o.fd_, -1)), pid_(std::exchange(o.pid_, -1)) {}
  ~RawPeer() {
    if (fd_ >= 0) ::close(fd_);
    if (pid_ > 0) ::waitpid(pid_, nullptr, 0);
  }
  int fd() const { return fd_; }

 private:
  int fd_;
  pid_t pid_;
};

std::pair<int, int> raw_socketpair(int type) {
  int sv[2];
  if (::socketpair(AF_UNIX, type | SOCK_CLOEXEC, 0, sv) != 0) fail("socketpair");
  return {sv[0], sv[1]};
}

// fork() without exec: the child runs `body` on its end.
template <class Body>
RawPeer raw_fork(Body body) {
  auto [ours, theirs] = raw_socketpair(SOCK_SEQPACKET);
  const pid_t pid = ::fork();
  if (pid < 0) fail("fork");
  if (pid == 0) {
    ::close(ours);
    body(theirs);
    ::_exit(0);
  }
  ::close(theirs);
  return {ours, pid};
}

void send_all(int fd, const void* data, std::size_t size) {
  if (::send(fd, data, size, 0) != static_cast<ssize_t>(size)) fail("send");
}

void raw_oneway(const Counts& n, Figures& out) {
  RawPeer peer = raw_fork([count = n.oneway](int fd) {
    char buf[256];
    for (long i = 0; i < count; ++i)
      if (::recv(fd, buf, sizeof buf, 0) <= 0) return;
    (void)!::send(fd, "done", 4, 0);
  });
  char message[k_message_size], done[8];
  std::memset(message, 'x', sizeof message);
  const auto t0 = Clock::now();
  for (long i = 0; i < n.oneway; ++i) send_all(peer.fd(), message, sizeof message);
  if (::recv(peer.fd(), done, sizeof done, 0) != 4) fail("recv");
  out["oneway_msgs_per_s"] = static_cast<double>(n.oneway) / seconds_since(t0);
}

void raw_rtt(const Counts& n, Figures& out) {
  RawPeer peer = raw_fork([](int fd) {
    char buf[256];
    for (ssize_t got; (got = ::recv(fd, buf, sizeof buf, 0)) > 0;) (void)!::send(fd, buf, got, 0);
  });
  char message[k_message_size], reply[256];
  std::memset(message, 'p', sizeof message);
  std::vector<double> us;
  for (long i = 0; i < n.warmup + n.rtt; ++i) {
    const auto t0 = Clock::now();
    send_all(peer.fd(), message, sizeof message);
    if (::recv(peer.fd(), reply, sizeof reply, 0) != sizeof message) fail("recv");
    if (i >= n.warmup) us.push_back(seconds_since(t0) * 1e6);
  }
  record_rtts(us, out);
}

void raw_fd(const Counts& n, Figures& out) {
  RawPeer peer = raw_fork([count = n.fd](int fd) {
    long sockets = 0;
    for (long i = 0; i < count; ++i) {
      char buf[256];
      alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))];
      iovec iov{buf, sizeof buf};
      msghdr msg{};
      msg.msg_iov = &iov;
      msg.msg_iovlen = 1;
      msg.msg_control = control;
      msg.msg_controllen = sizeof control;
      if (::recvmsg(fd, &msg, MSG_CMSG_CLOEXEC) <= 0) return;
      if (cmsghdr* c = CMSG_FIRSTHDR(&msg); c && c->cmsg_type == SCM_RIGHTS) {
        int received;
        std::memcpy(&received, CMSG_DATA(c), sizeof received);
        ::close(received);
        ++sockets;
      }
    }
    const std::string reply = std::to_string(sockets);
    (void)!::send(fd, reply.data(), reply.size(), 0);
  });
  auto [a, b] = raw_socketpair(SOCK_STREAM);
  const auto t0 = Clock::now();
  for (long i = 0; i < n.fd; ++i) {
    const int copy = ::fcntl(a, F_DUPFD_CLOEXEC, 0);
    if (copy < 0) fail("dup");
    char tag[] = "fd";
    iovec iov{tag, 2};
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))];
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    std::memcpy(CMSG_DATA(c), &copy, sizeof copy);
    if (::sendmsg(peer.fd(), &msg, 0) != 2) fail("sendmsg");
    ::close(copy);
  }
  char reply[32] = {};
  if (::recv(peer.fd(), reply, sizeof reply - 1, 0) <= 0) fail("recv");
  out["fd_pass_per_s"] = static_cast<double>(n.fd) / seconds_since(t0);
  ::close(a);
  ::close(b);
  if (std::to_string(n.fd) != reply) throw std::runtime_error(std::string("raw child received sockets: ") + reply);
}

// The raw spawn child is this executable again (same loading cost as a cocluster worker):
// with BENCH_RAW_CHILD set, main() writes one byte on fd 3 and waits for EOF.
int raw_spawn_child() {
  char c = 'o';
  if (::write(3, &c, 1) != 1) return 1;
  while (::read(3, &c, 1) > 0) {
  }
  return 0;
}

double raw_spawn(int size) {
  std::vector<std::string> env_strings{"BENCH_RAW_CHILD=1"};
  for (char** e = environ; *e; ++e) env_strings.emplace_back(*e);
  std::vector<char*> envp;
  for (auto& s : env_strings) envp.push_back(s.data());
  envp.push_back(nullptr);
  char exe[] = "/proc/self/exe";
  char* argv[] = {exe, nullptr};

  std::vector<RawPeer> children;
  const auto t0 = Clock::now();
  for (int i = 0; i < size; ++i) {
    auto [ours, theirs] = raw_socketpair(SOCK_SEQPACKET);
    const pid_t pid = ::fork();
    if (pid < 0) fail("fork");
    if (pid == 0) {  // async-signal-safe calls only
      if (theirs == 3) ::fcntl(3, F_SETFD, 0);  // keep it across exec
      else ::dup2(theirs, 3);
      ::execve(exe, argv, envp.data());
      ::_exit(127);
    }
    ::close(theirs);
    children.emplace_back(ours, pid);
  }
  for (auto& child : children) {
    char online;
    if (::recv(child.fd(), &online, 1, 0) != 1) fail("recv (raw child online)");
  }
  return seconds_since(t0) * 1e3;
}  // ~RawPeer: close, then reap

void run_raw(const Counts& n, Figures& out) {
  raw_oneway(n, out);
  raw_rtt(n, out);
  raw_fd(n, out);
  out["fd_pass_fd_per_s"] = out["fd_pass_per_s"];  // raw has no Asio socket: one baseline for both
}

// ---- fork to online: raw and cocluster in turns ----

// Each round runs raw_spawn(size) and then cocluster_spawn(size), so that both meet the same
// machine (a load that comes and goes hits both alike); each figure is the median of its
// rounds. Run first, in a process that has done nothing else yet: raw's fork(2) copies this
// process's page tables, so it is as fast here as it gets.
void run_spawn(const Counts& n, bool raw_wanted, bool ours_wanted, Figures& raw, Figures& ours) {
  asio::io_context io;
  cocluster::Master<> master(io.get_executor());
  auto all = [&]() -> awaitable<void> {
    for (int size : k_spawn_sizes) {
      std::vector<double> raw_ms, ours_ms;
      for (int i = 0; i < n.spawn_repeats; ++i) {
        if (raw_wanted) raw_ms.push_back(raw_spawn(size));  // blocks the loop: nothing else runs meanwhile
        if (ours_wanted) ours_ms.push_back(co_await cocluster_spawn(master, size));
      }
      if (raw_wanted) raw[spawn_key(size)] = percentile(raw_ms, 0.5);
      if (ours_wanted) ours[spawn_key(size)] = percentile(ours_ms, 0.5);
    }
  };
  asio::co_spawn(
      io,
      [&]() -> awaitable<void> {
        using namespace asio::experimental::awaitable_operators;
        asio::steady_timer deadline(io, 60s);
        auto first = co_await (all() || deadline.async_wait(use_awaitable));
        if (first.index() == 1) throw std::runtime_error("timed out in the fork-to-online benchmark");
      },
      [](std::exception_ptr e) {
        if (e) std::rethrow_exception(e);
      });
  io.run();
}

// ---- node ----

bool on_path(const char* program) {
  const char* path = std::getenv("PATH");
  std::string dirs = path ? path : "";
  for (std::size_t pos = 0; pos <= dirs.size();) {
    std::size_t end = std::min(dirs.find(':', pos), dirs.size());
    if (::access((dirs.substr(pos, end - pos) + "/" + program).c_str(), X_OK) == 0) return true;
    pos = end + 1;
  }
  return false;
}

// Runs the script and reads the flat JSON object on its last line of output.
std::optional<Figures> run_node(const Counts& n, const std::string& script) {
  if (!on_path("node")) return std::nullopt;
  if (::access(script.c_str(), R_OK) != 0) {
    fmt::print(stderr, "ipc_bench: {} not found; skipping node (use --node-script=PATH)\n", script);
    return std::nullopt;
  }
  const auto command = fmt::format("node '{}' --oneway={} --rtt={} --fd={} --warmup={} --spawn-repeats={}", script,
                                   n.oneway, n.rtt, n.fd, n.warmup, n.spawn_repeats);
  FILE* pipe = ::popen(command.c_str(), "r");
  if (!pipe) return std::nullopt;
  std::string line, last;
  for (int ch; (ch = std::fgetc(pipe)) != EOF;) {
    if (ch != '\n') line += static_cast<char>(ch);
    else if (!line.empty()) last = std::exchange(line, {});
  }
  if (::pclose(pipe) != 0) {
    fmt::print(stderr, "ipc_bench: `{}` failed; no node figures\n", command);
    return std::nullopt;
  }
  Figures out;
  for (const char* key : {"oneway_msgs_per_s", "rtt_p50_us", "rtt_p99_us", "fd_pass_per_s", "spawn_ms_1",
                          "spawn_ms_8", "spawn_ms_32"}) {
    auto at = last.find(fmt::format("\"{}\":", key));
    if (at == std::string::npos) continue;
    const char* value = last.c_str() + at + std::strlen(key) + 3;
    char* end = nullptr;
    const double v = std::strtod(value, &end);
    if (end != value) out[key] = v;
  }
  return out;
}

// ---- report ----

struct Row {
  const char* key;
  const char* label;
  bool is_rate;  // higher is better; otherwise a time, lower is better
  const char* ratio_key;
};
constexpr Row k_rows[] = {
    {"oneway_msgs_per_s", "one-way 64 B messages/s", true, "oneway_ratio"},
    {"rtt_p50_us", "round trip p50 (us)", false, "rtt_p50_ratio"},
    {"rtt_p99_us", "round trip p99 (us)", false, "rtt_p99_ratio"},
    {"fd_pass_per_s", "fd hand-offs/s", true, "fd_pass_ratio"},
    {"fd_pass_fd_per_s", "  sent as Handle(kind, fd)", true, "fd_pass_fd_ratio"},
    {"spawn_ms_1", "fork to online, 1 (ms)", false, "spawn_1_ratio"},
    {"spawn_ms_8", "fork to online, 8 (ms)", false, "spawn_8_ratio"},
    {"spawn_ms_32", "fork to online, 32 (ms)", false, "spawn_32_ratio"},
};

std::optional<double> get(const Figures& f, const char* key) {
  auto it = f.find(key);
  return it == f.end() ? std::nullopt : std::optional<double>(it->second);
}

// Relative speed against raw: 1.00 is as fast as raw, higher is better, for rates and times alike.
std::optional<double> relative(const Row& row, const Figures& f, const Figures& raw) {
  auto v = get(f, row.key), r = get(raw, row.key);
  if (!v || !r || *v <= 0 || *r <= 0) return std::nullopt;
  return row.is_rate ? *v / *r : *r / *v;
}

std::string cell(std::optional<double> v, int precision) {
  return v ? fmt::format("{:.{}f}", *v, precision) : std::string("-");
}

std::string json_number(std::optional<double> v) { return v ? fmt::format("{:.3f}", *v) : "null"; }

void report(const Counts& n, const Figures& ours, const Figures& raw, const std::optional<Figures>& node) {
  const Figures none;
  const Figures& nd = node ? *node : none;
  fmt::print("ipc_bench: {} one-way messages, {} round trips, {} fd hand-offs, {}-byte messages; spawn: median of {}\n",
             n.oneway, n.rtt, n.fd, k_message_size, n.spawn_repeats);
  fmt::print("{:<26}{:>12}{:>12}{:>8}{:>12}{:>8}\n", "", "cocluster", "raw", "x raw", node ? "node" : "(no node)",
             "x raw");
  for (const Row& row : k_rows) {
    const int p = row.is_rate ? 0 : 2;
    fmt::print("{:<26}{:>12}{:>12}{:>8}{:>12}{:>8}\n", row.label, cell(get(ours, row.key), p),
               cell(get(raw, row.key), p), cell(relative(row, ours, raw), 2), cell(get(nd, row.key), p),
               cell(relative(row, nd, raw), 2));
  }
  fmt::print("x raw: relative speed (rate / raw rate, or raw time / time); 1.00 = as fast as raw, target >= 0.80\n");

  std::string json = "{";
  auto add = [&](const std::string& key, std::optional<double> v) {
    json += fmt::format("{}\"{}\":{}", json.size() > 1 ? "," : "", key, json_number(v));
  };
  for (const Row& row : k_rows) add(row.key, get(ours, row.key));
  for (const Row& row : k_rows) add(std::string("raw_") + row.key, get(raw, row.key));
  for (const Row& row : k_rows) add(row.ratio_key, relative(row, ours, raw));
  for (const Row& row : k_rows) add(std::string("node_") + row.key, get(nd, row.key));
  fmt::print("{}}}\n", json);
}

}  // namespace

int main(int argc, char** argv) {
  if (std::getenv("BENCH_RAW_CHILD")) return raw_spawn_child();
  if (cocluster::is_worker()) {
    asio::io_context io;
    this_worker.start(io.get_executor());
    asio::co_spawn(io, worker_main(), asio::detached);
    io.run();
    return 0;
  }

  Counts n;
  std::string only = "raw,cocluster,node";  // --only=cocluster for profiling one part
  std::string node_script = std::getenv("BENCH_NODE_SCRIPT") ? std::getenv("BENCH_NODE_SCRIPT") : BENCH_NODE_SCRIPT;
  for (int i = 1; i < argc; ++i) {
    std::string_view arg = argv[i];
    if (arg == "--quick") n = {n.oneway / 10, n.rtt / 10, n.fd / 10, n.warmup / 10, 1, n.spawn_only};
    else if (arg.starts_with("--only=")) only = arg.substr(7);
    else if (arg == "--spawn-only") n.spawn_only = true;
    else if (arg.starts_with("--node-script=")) node_script = arg.substr(14);
    else {
      fmt::print(stderr, "usage: {} [--quick] [--only=raw,cocluster,node] [--spawn-only] [--node-script=PATH]\n", argv[0]);
      return 64;
    }
  }
  try {
    auto wanted = [&](std::string_view part) { return only.find(part) != std::string::npos; };
    Figures raw, ours;
    std::optional<Figures> node;
    watchdog(90, "fork to online");  // a backstop: its own timer fires first
    if (wanted("raw") || wanted("cocluster")) run_spawn(n, wanted("raw"), wanted("cocluster"), raw, ours);
    watchdog(60, "the raw baseline");
    if (wanted("raw") && !n.spawn_only) run_raw(n, raw);
    watchdog(120, "the cocluster benchmarks");  // a backstop: their own timer fires first
    if (wanted("cocluster") && !n.spawn_only) run_cocluster(n, ours);
    watchdog(180, "node");
    if (wanted("node")) node = run_node(n, node_script);
    ::alarm(0);
    report(n, ours, raw, node);
  } catch (const std::exception& e) {
    fmt::print(stderr, "ipc_bench: {}\n", e.what());
    return 1;
  }
}
