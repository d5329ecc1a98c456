// Settings and setup (Node: cluster.settings, cluster.setupMaster(), the 'setup' event): what a
// worker is started with (args, cwd, stdio, silent, uid, gid, env), when a change applies, and
// fork failures that leave the master running. Every worker is this executable, re-executed.
#include "cocluster/settings.hpp"

#include <grp.h>
#include <limits.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <functional>
#include <optional>
#include <thread>

#include <doctest/doctest.h>

#include "cocluster/cocluster.hpp"
#include "support.hpp"
#include "worker_scenario.hpp"

using namespace cocluster;
using namespace test;
using cocluster::as_tuple;

namespace {

// ---- the workers ----

// "uid=U gid=G groups=N cwd=C argv=a|b fd0=T fd1=T fd2=T node_unique_id=X id=I pdeathsig=S
// pdeathsig_at_exec=S nofile=SOFT/HARD", each value free of spaces (the test's paths are),
// read anew each time.
// RLIMIT_NOFILE as "SOFT/HARD".
std::string fd_limit() {
  rlimit l{};
  if (::getrlimit(RLIMIT_NOFILE, &l) != 0) return "?";
  return std::to_string(l.rlim_cur) + "/" + std::to_string(l.rlim_max);
}

std::string report_process(int argc, char** argv) {
  char cwd[PATH_MAX];
  std::string args;
  for (int i = 1; i < argc; ++i) args += (i > 1 ? "|" : "") + std::string(argv[i]);
  const char* node_id = std::getenv("NODE_UNIQUE_ID");
  return "uid=" + std::to_string(::getuid()) + " gid=" + std::to_string(::getgid()) +
         " groups=" + std::to_string(::getgroups(0, nullptr)) + " cwd=" + (::getcwd(cwd, sizeof cwd) ? cwd : "?") +
         " argv=" + args + " fd0=" + fd_target(0) + " fd1=" + fd_target(1) + " fd2=" + fd_target(2) +
         " node_unique_id=" + (node_id ? node_id : "unset") + " id=" + std::to_string(this_worker.id()) +
         " pdeathsig=" + std::to_string(parent_death_signal()) +
         " pdeathsig_at_exec=" + std::to_string(at_start().pdeathsig_at_exec) + " nofile=" + fd_limit();
}

}  // namespace

// Answers each message with report_process().
WORKER_SCENARIO(report) {
  asio::io_context io;
  this_worker.start(io.get_executor());
  asio::co_spawn(io, [argc, argv]() -> awaitable<void> {
    for (;;) {
      auto [ec, m] = co_await this_worker.receive(as_tuple(use_awaitable));
      if (ec) co_return;
      co_await this_worker.send({report_process(argc, argv)});
    }
  }, asio::detached);
  io.run();
  return 0;
}

// "out 1\nout 2\n" on stdout, "err 1\n" on stderr, then exits 0 (no runtime).
WORKER_SCENARIO(stdio_lines) {
  const bool written = ::write(1, "out 1\nout 2\n", 12) == 12 && ::write(2, "err 1\n", 6) == 6;
  return written ? 0 : 1;
}

// Reads a line from stdin, writes "echo: <line>\n" on stdout, exits 0 (no runtime).
WORKER_SCENARIO(echo_stdin) {
  std::string line = "echo: ";
  char c;
  while (::read(0, &c, 1) == 1 && c != '\n') line += c;
  line += '\n';
  return ::write(1, line.data(), line.size()) == static_cast<ssize_t>(line.size()) ? 0 : 1;
}

namespace {

// ---- the master side ----

// The value of `name=` in a worker's report (see report_process above).
std::string field(const std::string& report, std::string_view name) {
  const std::string key = " " + std::string(name) + "=";
  const std::string padded = " " + report;
  const auto at = padded.find(key);
  if (at == std::string::npos) return "<no " + std::string(name) + ">";
  const auto start = at + key.size();
  return padded.substr(start, padded.find(' ', start) - start);
}

// What the worker (the report scenario) says about itself now.
awaitable<std::string> ask(std::shared_ptr<Worker> w) {
  co_await w->send({"report"});
  Message m = co_await w->receive();
  co_return m.data;
}

awaitable<std::string> read_to_eof(asio::posix::stream_descriptor& in) {
  std::string all;
  char buf[4096];
  for (;;) {
    auto [ec, n] = co_await in.async_read_some(asio::buffer(buf), as_tuple(use_awaitable));
    all.append(buf, n);
    if (ec == asio::error::eof) co_return all;
    if (ec) throw std::system_error(ec, "read");
  }
}

awaitable<ExitStatus> disconnect_and_wait(std::shared_ptr<Worker> w) {
  w->disconnect();
  ExitStatus s = co_await w->exited();
  co_return s;
}

std::string joined(const std::vector<std::string>& v, std::string_view separator = "|") {
  std::string out;
  for (auto& s : v) out += (out.empty() ? "" : std::string(separator)) + s;
  return out;
}

// This process's arguments after argv[0]: Settings::args' default.
std::vector<std::string> own_args() {
  auto all = cocluster::detail::own_command_line();
  return {all.begin() + (all.empty() ? 0 : 1), all.end()};
}

constexpr uid_t nobody = 65534;

// Runs `body` in a forked child of this (single-threaded) test process, so that the child
// may drop privileges or lower its limits; returns "" when every check passed, else what the
// child found wrong (it writes that to a pipe and exits). The child is reaped within `limit`
// (SIGKILL on overrun; its workers follow through PR_SET_PDEATHSIG).
std::string run_in_child(const std::function<std::string()>& body, std::chrono::seconds limit = 60s) {
  auto [report_read, report_write] = cocluster::detail::make_pipe();
  const pid_t pid = ::fork();
  if (pid < 0) return "fork of the test process failed";
  if (pid == 0) {
    report_read.reset();
    std::string why;
    try {
      why = body();
    } catch (const std::exception& e) {
      why = std::string("exception: ") + e.what();
    } catch (...) {
      why = "unknown exception";
    }
    if (why.empty()) why = "ok";
    (void)!::write(report_write.get(), why.data(), why.size());
    ::_exit(why == "ok" ? 0 : 1);
  }
  report_write.reset();
  const auto deadline = std::chrono::steady_clock::now() + limit;
  int status = 0;
  bool overran = false;
  while (::waitpid(pid, &status, WNOHANG) != pid) {
    if (std::chrono::steady_clock::now() > deadline) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, &status, 0);
      overran = true;
      break;
    }
    std::this_thread::sleep_for(10ms);
  }
  std::string report;
  char buf[1024];
  for (ssize_t n; (n = ::read(report_read.get(), buf, sizeof buf)) > 0;) report.append(buf, static_cast<std::size_t>(n));
  if (overran) return "the child took longer than " + std::to_string(limit.count()) + " s: " + report;
  if (report == "ok" && WIFEXITED(status) && WEXITSTATUS(status) == 0) return "";
  return report.empty() ? "the child died without a report (status " + std::to_string(status) + ")" : report;
}

// In a child of the test process: become uid/gid 65534 when root (so that permission checks
// and RLIMIT_NPROC apply); "" on success.
std::string drop_root_in_child() {
  if (::geteuid() != 0) return "";
  if (::setgroups(0, nullptr) != 0 || ::setgid(nobody) != 0 || ::setuid(nobody) != 0)
    return "cannot become uid 65534: " + std::string(std::strerror(errno));
  ::prctl(PR_SET_DUMPABLE, 1);  // keep /proc/self readable as usual after the uid change
  return "";
}

// In a child of the test process: after a failed fork, `master` posted an error event with
// `code`, leaked no fd, and then starts a worker that comes online and exits with 0.
awaitable<std::string> check_recovery(Master<>& master, EventStream& events, std::error_code code, int fds_before) {
  if (const int now = open_fd_count(); now != fds_before)
    co_return "fds after the failed fork: " + std::to_string(now) + ", before: " + std::to_string(fds_before);
  bool error_event = false;
  while (events.pending()) {
    const Event e = co_await events.next();
    if (e.type == EventType::error) error_event = e.error == code && e.worker == nullptr;
  }
  if (!error_event) co_return "no error event with " + code.message();
  if (!master.workers().empty()) co_return "the failed worker is in workers()";
  auto w = co_await master.fork();
  co_await w->online();
  const ExitStatus s = co_await disconnect_and_wait(w);
  if (s != ExitStatus{0, 0}) co_return "the next worker exited with code " + std::to_string(s.code);
  co_return "";
}

// Sets environment variables for the scope of a test, then restores them.
class scoped_env {
 public:
  scoped_env(std::initializer_list<std::pair<const char*, const char*>> vars) {
    for (auto& [name, value] : vars) {
      const char* old = std::getenv(name);
      saved_.emplace_back(name, old ? std::optional<std::string>(old) : std::nullopt);
      ::setenv(name, value, 1);
    }
  }
  ~scoped_env() {
    for (auto& [name, value] : saved_) {
      if (value) ::setenv(name.c_str(), value->c_str(), 1);
      else ::unsetenv(name.c_str());
    }
  }

 private:
  std::vector<std::pair<std::string, std::optional<std::string>>> saved_;
};

}  // namespace

TEST_CASE("silent: the master reads the worker's stdout and stderr lines from pipes, then EOF") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Settings settings;
    settings.silent = true;
    Master<> master(io.get_executor(), settings);
    auto w = co_await master.fork(scenario_env("stdio_lines"));
    REQUIRE(w->stdin_pipe() != nullptr);
    REQUIRE(w->stdout_pipe() != nullptr);
    REQUIRE(w->stderr_pipe() != nullptr);
    CHECK(w->stdout_pipe()->get_executor() == asio::any_io_executor(io.get_executor()));
    std::string out;
    std::size_t n = co_await asio::async_read_until(*w->stdout_pipe(), asio::dynamic_buffer(out), '\n', use_awaitable);
    CHECK(out.substr(0, n) == "out 1\n");
    out.erase(0, n);
    n = co_await asio::async_read_until(*w->stdout_pipe(), asio::dynamic_buffer(out), '\n', use_awaitable);
    CHECK(out.substr(0, n) == "out 2\n");
    out.erase(0, n);
    CHECK(co_await read_to_eof(*w->stdout_pipe()) == out);  // nothing more, then EOF
    CHECK(out.empty());
    CHECK(co_await read_to_eof(*w->stderr_pipe()) == "err 1\n");
    CHECK((co_await w->exited()) == ExitStatus{0, 0});
  });
}

TEST_CASE("silent: the worker's stdin is a pipe the master writes") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Settings settings;
    settings.silent = true;
    Master<> master(io.get_executor(), settings);
    auto w = co_await master.fork(scenario_env("echo_stdin"));
    co_await asio::async_write(*w->stdin_pipe(), asio::buffer(std::string_view("hello\n")), use_awaitable);
    w->stdin_pipe()->close();
    CHECK(co_await read_to_eof(*w->stdout_pipe()) == "echo: hello\n");
    CHECK(co_await read_to_eof(*w->stderr_pipe()) == "");
    CHECK((co_await w->exited()) == ExitStatus{0, 0});
  });
}

TEST_CASE("without silent or stdio a worker inherits the master's stdin, stdout, stderr and has no pipes") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor());
    auto w = co_await master.fork(scenario_env("report"));
    CHECK(w->stdin_pipe() == nullptr);
    CHECK(w->stdout_pipe() == nullptr);
    CHECK(w->stderr_pipe() == nullptr);
    const std::string report = co_await ask(w);
    CHECK(field(report, "fd0") == fd_target(0));
    CHECK(field(report, "fd1") == fd_target(1));
    CHECK(field(report, "fd2") == fd_target(2));
    CHECK((co_await disconnect_and_wait(w)) == ExitStatus{0, 0});
  });
}

TEST_CASE("stdio: 'ignore' gives the worker /dev/null") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Settings settings;
    settings.stdio = {Stdio::ignore(), Stdio::ignore(), Stdio::ignore()};
    Master<> master(io.get_executor(), settings);
    auto w = co_await master.fork(scenario_env("report"));
    CHECK(w->stdin_pipe() == nullptr);
    CHECK(w->stdout_pipe() == nullptr);
    CHECK(w->stderr_pipe() == nullptr);
    const std::string report = co_await ask(w);
    CHECK(field(report, "fd0") == "/dev/null");
    CHECK(field(report, "fd1") == "/dev/null");
    CHECK(field(report, "fd2") == "/dev/null");
    CHECK((co_await disconnect_and_wait(w)) == ExitStatus{0, 0});
  });
}

TEST_CASE("stdio: an fd of the master becomes the worker's stdout; the master keeps its fd") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    auto [read_end, write_end] = cocluster::detail::make_pipe();
    Settings settings;
    settings.stdio = {Stdio::ignore(), Stdio::fd(write_end.get()), Stdio::ignore()};
    Master<> master(io.get_executor(), settings);
    auto w = co_await master.fork(scenario_env("stdio_lines"));
    CHECK(w->stdout_pipe() == nullptr);
    CHECK(::fcntl(write_end.get(), F_GETFD) != -1);  // still open in the master
    write_end.reset();  // the worker's copy is now the only writer
    asio::posix::stream_descriptor in(io, read_end.release());
    CHECK(co_await read_to_eof(in) == "out 1\nout 2\n");
    CHECK((co_await w->exited()) == ExitStatus{0, 0});
  });
}

TEST_CASE("stdio overrides silent") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Settings settings;
    settings.silent = true;
    std::array<Stdio, 3> choice;  // inherit, unless set
    choice[1] = Stdio::pipe();
    choice[2] = Stdio::ignore();
    CHECK(choice[0] == Stdio::inherit());
    settings.stdio = choice;
    Master<> master(io.get_executor(), settings);
    auto w = co_await master.fork(scenario_env("report"));
    CHECK(w->stdin_pipe() == nullptr);
    REQUIRE(w->stdout_pipe() != nullptr);
    CHECK(w->stderr_pipe() == nullptr);
    const std::string report = co_await ask(w);
    CHECK(field(report, "fd0") == fd_target(0));
    CHECK(field(report, "fd1") == fd_target(w->stdout_pipe()->native_handle()));  // the same pipe
    CHECK(field(report, "fd1").starts_with("pipe:"));
    CHECK(field(report, "fd2") == "/dev/null");
    CHECK((co_await disconnect_and_wait(w)) == ExitStatus{0, 0});
  });
}

TEST_CASE("stdio: a closed fd fails fork() with EBADF, posts an error event and leaks nothing") {
  const int before = open_fd_count();
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Settings settings;
    // The pipes are made first: the failure on the third fd must close them.
    settings.stdio = {Stdio::pipe(), Stdio::pipe(), Stdio::fd(1 << 20)};
    Master<> master(io.get_executor(), settings);
    auto& events = master.events();
    try {
      co_await master.fork();
      FAIL("fork() with a closed stdio fd succeeded");
    } catch (const std::system_error& e) {
      CHECK(e.code() == std::error_code(EBADF, std::system_category()));
      CHECK(std::string(e.what()).find("stdio[2]") != std::string::npos);
    }
    CHECK(master.workers().empty());
    Event e = co_await events.next();
    CHECK(e.type == EventType::setup);
    e = co_await events.next();
    CHECK(e.type == EventType::error);
    CHECK(e.error == std::errc::bad_file_descriptor);
  });
  CHECK(open_fd_count() == before);
}

TEST_CASE("setupMaster example: args and silent apply to later forks; each setup event carries its snapshot") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor());
    auto& events = master.events();
    Settings https;
    https.args = {"--use", "https"};
    https.silent = true;
    master.setup(https);
    auto w1 = co_await master.fork(scenario_env("report"));  // https worker
    CHECK(field(co_await ask(w1), "argv") == "--use|https");
    CHECK(w1->stdout_pipe() != nullptr);

    // Node merges the new options over the current settings; here, a copy of them.
    auto http = master.settings();
    http.args = {"--use", "http"};
    master.setup(http);
    auto w2 = co_await master.fork(scenario_env("report"));  // http worker
    CHECK(field(co_await ask(w2), "argv") == "--use|http");
    CHECK(w2->stdout_pipe() != nullptr);  // silent kept
    CHECK(field(co_await ask(w1), "argv") == "--use|https");  // the running worker is unaffected

    // setup(https), then fork's own setup; setup(http), then fork's own setup.
    std::vector<std::string> setups;
    std::vector<std::string> order;
    while (events.pending()) {
      const Event e = co_await events.next();
      if (e.type == EventType::setup) {
        REQUIRE(e.settings != nullptr);
        CHECK(e.worker == nullptr);
        CHECK(e.settings->silent);
        CHECK(e.settings->exec == "/proc/self/exe");
        setups.push_back(joined(e.settings->args.value_or(std::vector<std::string>{"<unset>"})));
      }
      if (e.type == EventType::setup || e.type == EventType::fork) order.emplace_back(to_string(e.type));
    }
    CHECK(joined(setups, ", ") == "--use|https, --use|https, --use|http, --use|http");
    CHECK(joined(order, " ") == "setup setup fork setup setup fork");
    CHECK((co_await disconnect_and_wait(w1)) == ExitStatus{0, 0});
    CHECK((co_await disconnect_and_wait(w2)) == ExitStatus{0, 0});
  });
}

TEST_CASE("settings holds the defaults after the first setup; the constructor's settings post no event") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Settings initial;
    initial.env = {{"TEST_SETTING", "x"}};
    Master<> master(io.get_executor(), initial);
    auto& events = master.events();
    CHECK(master.settings().exec.empty());  // Node: empty until the first setup
    CHECK_FALSE(master.settings().args.has_value());
    CHECK(events.pending() == 0);

    master.setup(master.settings());
    CHECK(master.settings().exec == "/proc/self/exe");
    REQUIRE(master.settings().args.has_value());
    CHECK(*master.settings().args == own_args());
    CHECK(master.settings().env == initial.env);
    REQUIRE(events.pending() == 1);
    const Event e = co_await events.next();
    CHECK(e.type == EventType::setup);
    REQUIRE(e.settings != nullptr);
    CHECK(e.settings->exec == "/proc/self/exe");
    CHECK(e.settings->args == own_args());

    // The defaults apply to what is unset only.
    Settings mine;
    mine.exec = "/bin/true";
    mine.args = std::vector<std::string>{};
    master.setup(mine);
    CHECK(master.settings().exec == "/bin/true");
    CHECK(master.settings().args == std::vector<std::string>{});
  });
}

TEST_CASE("fork() runs setup: a setup event with the current settings comes before each fork event") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor());
    auto& events = master.events();
    auto w = co_await master.fork(scenario_env("report"));
    CHECK(master.settings().exec == "/proc/self/exe");
    CHECK(master.settings().args == own_args());
    Event e = co_await events.next();
    CHECK(e.type == EventType::setup);
    REQUIRE(e.settings != nullptr);
    CHECK(e.settings->exec == "/proc/self/exe");
    CHECK(e.settings->args == own_args());
    e = co_await events.next();
    CHECK(e.type == EventType::fork);
    CHECK(e.worker == w);
    CHECK(field(co_await ask(w), "argv") == joined(own_args()));  // the master's own arguments
    CHECK((co_await disconnect_and_wait(w)) == ExitStatus{0, 0});
  });
}

TEST_CASE("cwd applies only to later forks") {
  char dir_template[] = "/tmp/cocluster-cwd-XXXXXX";
  REQUIRE(::mkdtemp(dir_template) != nullptr);
  const std::string dir = dir_template;
  char here[PATH_MAX];
  REQUIRE(::getcwd(here, sizeof here) != nullptr);
  const std::string master_cwd = here;
  run_bounded([&](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor());
    auto w1 = co_await master.fork(scenario_env("report"));
    CHECK(field(co_await ask(w1), "cwd") == master_cwd);
    auto s = master.settings();
    s.cwd = dir;
    master.setup(s);
    auto w2 = co_await master.fork(scenario_env("report"));
    CHECK(field(co_await ask(w2), "cwd") == dir);
    CHECK(field(co_await ask(w1), "cwd") == master_cwd);
    char now[PATH_MAX];
    CHECK(std::string(::getcwd(now, sizeof now)) == master_cwd);  // the master did not move
    CHECK((co_await disconnect_and_wait(w1)) == ExitStatus{0, 0});
    CHECK((co_await disconnect_and_wait(w2)) == ExitStatus{0, 0});
  });
  ::rmdir(dir.c_str());
}

TEST_CASE("uid and gid set the worker's user and group") {
  const bool root = ::geteuid() == 0;
  if (!root) MESSAGE("not root: checking uid/gid with the current ids only");
  const uid_t uid = root ? nobody : ::getuid();
  const gid_t gid = root ? nobody : ::getgid();
  run_bounded([&](asio::io_context& io) -> awaitable<void> {
    Settings settings;
    settings.uid = uid;
    settings.gid = gid;
    Master<> master(io.get_executor(), settings);
    auto w = co_await master.fork(scenario_env("report"));
    const std::string report = co_await ask(w);
    CHECK(field(report, "uid") == std::to_string(uid));
    CHECK(field(report, "gid") == std::to_string(gid));
    if (root) CHECK(field(report, "groups") == "0");  // root's supplementary groups are dropped
    // Changing ids clears the parent-death signal: spawn must set it after them. The runtime
    // then replaces it with its own backstop signal.
    CHECK(field(report, "pdeathsig_at_exec") == std::to_string(SIGTERM));
    CHECK(field(report, "pdeathsig") == std::to_string(cocluster::detail::parent_death::signal_number()));
    CHECK((co_await disconnect_and_wait(w)) == ExitStatus{0, 0});
  });
  CHECK(::getuid() == (root ? 0u : uid));  // the master's own ids are unchanged
}

// In a child of the test process: fork() with `s` fails with EPERM and `step` in what().
awaitable<std::string> expect_eperm(Master<>& master, Settings s, std::string step) {
  master.setup(std::move(s));
  try {
    co_await master.fork();
    co_return "fork() with " + step + " succeeded without permission";
  } catch (const std::system_error& e) {
    const std::string what = e.what();
    if (e.code() != std::error_code(EPERM, std::system_category()))
      co_return "fork() failed with " + e.code().message() + ", not EPERM: " + what;
    if (what.find(step) == std::string::npos) co_return "what() does not name " + step + ": " + what;
  }
  co_return "";
}

TEST_CASE("uid and gid without permission: fork() fails with EPERM naming the step, leaks nothing, the master forks again") {
  const std::string failure = run_in_child([]() -> std::string {
    if (auto why = drop_root_in_child(); !why.empty()) return why;
    std::string why;
    run_bounded([&](asio::io_context& io) -> awaitable<void> {
      Master<> master(io.get_executor());
      auto& events = master.events();
      const int fds_before = open_fd_count();
      Settings root_group;
      root_group.gid = 0;
      if (::getgid() != 0) why = co_await expect_eperm(master, root_group, "setgid(0)");
      if (!why.empty()) co_return;
      Settings root_user;
      root_user.uid = 0;
      why = co_await expect_eperm(master, root_user, "setuid(0)");
      if (!why.empty()) co_return;
      master.setup(Settings{});
      why = co_await check_recovery(master, events, std::error_code(EPERM, std::system_category()), fds_before);
    });
    return why;
  });
  CHECK_MESSAGE(failure.empty(), failure);
}

TEST_CASE("fork() failing with EAGAIN (RLIMIT_NPROC) leaks nothing and the master forks again") {
  const std::string failure = run_in_child([]() -> std::string {
    if (auto why = drop_root_in_child(); !why.empty()) return why;  // root ignores RLIMIT_NPROC
    rlimit original{};
    if (::getrlimit(RLIMIT_NPROC, &original) != 0) return "getrlimit failed";
    std::string why;
    run_bounded([&](asio::io_context& io) -> awaitable<void> {
      Master<> master(io.get_executor());
      auto& events = master.events();
      const int fds_before = open_fd_count();
      const rlimit one{1, original.rlim_max};  // this process alone uses it up
      if (::setrlimit(RLIMIT_NPROC, &one) != 0) {
        why = "setrlimit(RLIMIT_NPROC, 1) failed";
        co_return;
      }
      try {
        co_await master.fork();
        why = "fork() under RLIMIT_NPROC 1 succeeded";
      } catch (const std::system_error& e) {
        const std::string what = e.what();
        if (e.code() != std::error_code(EAGAIN, std::system_category()))
          why = "fork() failed with " + e.code().message() + ", not EAGAIN: " + what;
        else if (what.find("fork") == std::string::npos)
          why = "what() does not say fork: " + what;
      }
      if (::setrlimit(RLIMIT_NPROC, &original) != 0 && why.empty()) why = "cannot restore RLIMIT_NPROC";
      if (!why.empty()) co_return;
      why = co_await check_recovery(master, events, std::error_code(EAGAIN, std::system_category()), fds_before);
    });
    return why;
  });
  CHECK_MESSAGE(failure.empty(), failure);
}

TEST_CASE("raise_fd_limit: before a fork the master raises its soft RLIMIT_NOFILE to the hard one, and the worker inherits it (Node's)") {
  rlimit here{};
  REQUIRE(::getrlimit(RLIMIT_NOFILE, &here) == 0);
  if (here.rlim_max <= 256) {  // the machine's setting, not the library's: said, not failed
    MESSAGE("the hard RLIMIT_NOFILE is ", here.rlim_max, ": nothing to raise, not checked");
    return;
  }
  const std::string failure = run_in_child([]() -> std::string {
    rlimit original{};
    if (::getrlimit(RLIMIT_NOFILE, &original) != 0) return "getrlimit failed";
    if (original.rlim_max <= 256) return "the hard RLIMIT_NOFILE is 256 or less: nothing to raise";
    const rlimit low{256, original.rlim_max};  // Debian's default soft limit is 1024: lower still
    if (::setrlimit(RLIMIT_NOFILE, &low) != 0) return "setrlimit(RLIMIT_NOFILE, 256) failed";
    const std::string lowered = "256/" + std::to_string(original.rlim_max);
    const std::string raised = std::to_string(original.rlim_max) + "/" + std::to_string(original.rlim_max);
    std::string why;
    run_bounded([&](asio::io_context& io) -> awaitable<void> {
      Master<> master(io.get_executor(), Settings{.raise_fd_limit = false});
      const std::string kept = co_await ask(co_await master.fork(scenario_env("report")));
      if (field(kept, "nofile") != lowered) why = "raise_fd_limit = false: the worker has " + field(kept, "nofile");
      else if (fd_limit() != lowered) why = "raise_fd_limit = false: the master has " + fd_limit();
      master.setup_merge({.raise_fd_limit = true});  // the default
      const std::string up = co_await ask(co_await master.fork(scenario_env("report")));
      if (why.empty() && field(up, "nofile") != raised) why = "the worker has " + field(up, "nofile") + ", not " + raised;
      else if (why.empty() && fd_limit() != raised) why = "the master has " + fd_limit() + ", not " + raised;
      co_await master.disconnect();
    });
    return why;
  });
  CHECK_MESSAGE(failure.empty(), failure);
}

TEST_CASE("the worker-id variables of the master's own environment reach a worker only as its new id") {
  // A master that is itself a worker (of cocluster or of Node) has these set.
  scoped_env env{{"COCLUSTER_WORKER_ID", "99"}, {"NODE_UNIQUE_ID", "42"}};
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor());
    auto w = co_await master.fork(scenario_env("report"));
    const std::string report = co_await ask(w);
    CHECK(field(report, "id") == "1");
    CHECK(field(report, "node_unique_id") == "unset");
    CHECK((co_await disconnect_and_wait(w)) == ExitStatus{0, 0});
  });
}
