// Master::fork() does not wait for its worker to start up (so that forks in a row start in
// parallel): what can be checked before the fork fails fork() at once; what only the child
// meets arrives as the worker's error event, then its exit.
#include <poll.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fstream>
#include <set>
#include <string>
#include <string_view>

#include <asio/write.hpp>
#include <doctest/doctest.h>

#include "cocluster/cocluster.hpp"
#include "support.hpp"
#include "worker_scenario.hpp"

using namespace cocluster;
using namespace test;

namespace {

// A file at `path` with `text`, mode `mode`, removed at the end of the scope.
struct temp_file {
  temp_file(std::string p, const std::string& text, mode_t mode) : path(std::move(p)) {
    std::ofstream(path) << text;
    ::chmod(path.c_str(), mode);
  }
  ~temp_file() { ::unlink(path.c_str()); }
  std::string path;
};

std::string temp_path(const char* what) {
  return "/tmp/cocluster-test-" + std::string(what) + "-" + std::to_string(::getpid());
}

}  // namespace

TEST_CASE("fork(): an exec that fails in the child is the worker's error event, then its exit with 127") {
  // Executable, so the check before the fork passes; execve fails with ENOENT in the child.
  temp_file script(temp_path("no-interpreter"), "#!/nonexistent/interpreter\n", 0755);
  run_bounded([&](asio::io_context& io) -> awaitable<void> {
    Settings s;
    s.exec = script.path;
    s.args = std::vector<std::string>{};
    Master<> master(io.get_executor(), s);
    auto events = master.subscribe();
    const int fds_before = open_fd_count();
    auto w = co_await master.fork();  // forked: the exec is not waited for
    REQUIRE(w);
    auto [online] = co_await w->online(cocluster::as_tuple(use_awaitable));
    CHECK(online == error::worker_exited);
    CHECK(co_await w->exited() == ExitStatus{127, 0});
    bool error_seen = false, exit_seen = false;
    while (!exit_seen) {
      const Event e = co_await events.next();
      if (e.type == EventType::error) {
        error_seen = true;
        CHECK(e.worker == w);
        CHECK(e.error == std::errc::no_such_file_or_directory);
        CHECK(e.detail == "execve " + script.path + ": No such file or directory");
      }
      if (e.type == EventType::exit) {
        exit_seen = true;
        CHECK(error_seen);  // the error comes first
        CHECK(e.exit == ExitStatus{127, 0});
      }
    }
    CHECK(master.workers().empty());
    CHECK(open_fd_count() == fds_before);  // the report pipe, the channel: all closed
  });
}

// fork() with `s` fails at once with `code`, and what() is `what`.
awaitable<void> expect_fork_failure(Master<>& master, Settings s, std::errc code, std::string what) {
  master.setup(std::move(s));
  auto [ec, w] = co_await master.fork({}, cocluster::as_tuple(use_awaitable));
  CHECK(ec == code);
  CHECK_FALSE(w);
  std::string thrown = "nothing thrown";
  try {
    co_await master.fork();
  } catch (const std::system_error& e) {
    thrown = e.what();
  }
  CHECK(thrown == what);
}

TEST_CASE("fork(): what can be checked before forking fails at once: not executable, a directory, no cwd") {
  temp_file plain(temp_path("not-executable"), "data\n", 0644);
  run_bounded([&](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor());
    Settings not_executable;  // (named: GCC 12 miscompiles a braced list inside co_await)
    not_executable.exec = plain.path;
    co_await expect_fork_failure(master, not_executable, std::errc::permission_denied,
                                 "execve " + plain.path + ": Permission denied");  // no x bit: not even for root
    Settings directory;
    directory.exec = "/tmp";
    co_await expect_fork_failure(master, directory, std::errc::permission_denied, "execve /tmp: Permission denied");
    Settings no_cwd;
    no_cwd.cwd = "/nonexistent/dir";
    co_await expect_fork_failure(master, no_cwd, std::errc::no_such_file_or_directory,
                                 "chdir /nonexistent/dir for /proc/self/exe: No such file or directory");
    CHECK(master.workers().empty());
    master.setup(Settings{});  // and it forks again
    auto w = co_await master.fork();
    co_await w->online();
    w->disconnect();
    CHECK(co_await w->exited() == ExitStatus{0, 0});
  });
}

// Waits for a byte on stdin before it starts the runtime (so before `online`); gives up after
// 20 s, a failure bound, and exits with 42 without coming online.
// What the test below guards: fork() returns before its worker is online (it would time out
// if each fork awaited `online`). It cannot see a fork() that waits for each exec (vfork): no
// child can be held before its exec without timing; `ipc_bench --spawn-only` shows that one.
WORKER_SCENARIO(online_after_stdin) {
  pollfd p{0, POLLIN, 0};
  if (::poll(&p, 1, 20'000) != 1) return 42;
  char byte;
  if (::read(0, &byte, 1) != 1) return 43;
  return test::run_echo_worker();
}

TEST_CASE("fork(): 16 forks in a row each return before their worker starts up; all 16 exist before any is released") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Settings s;
    s.stdio = {Stdio::pipe(), Stdio::inherit(), Stdio::inherit()};
    Master<> master(io.get_executor(), s);
    std::vector<std::shared_ptr<Worker>> workers;
    // No worker can start up before the test writes to its stdin, below: a fork() that waited
    // for its worker to start (to come online, or to do anything else after its exec) would
    // not return until that worker gave up (exit 42, never online), and the checks fail.
    for (int i = 0; i < 16; ++i) workers.push_back(co_await master.fork(scenario_env("online_after_stdin")));
    std::set<pid_t> pids;
    for (auto& w : workers) {
      CHECK(w->state() == WorkerState::none);  // not online: none has been released
      CHECK_FALSE(w->is_dead());
      CHECK(::kill(w->pid(), 0) == 0);  // the process exists (it is ours: not reaped yet)
      pids.insert(w->pid());
    }
    CHECK(pids.size() == 16);
    for (auto& w : workers) {
      REQUIRE(w->stdin_pipe() != nullptr);
      co_await asio::async_write(*w->stdin_pipe(), asio::buffer(std::string_view("go")), use_awaitable);
    }
    for (auto& w : workers) co_await w->online();
    for (auto& w : workers) {
      co_await w->send({"ping " + std::to_string(w->id())});
      CHECK((co_await w->receive()).data == "ping " + std::to_string(w->id()));
    }
    co_await master.disconnect();
    for (auto& w : workers) CHECK(co_await w->exited() == ExitStatus{0, 0});
  });
}
