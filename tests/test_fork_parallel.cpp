// Master::fork() does not wait for the exec (so that forks in a row start in parallel): what
// can be checked before the fork fails fork() at once; what only the child meets arrives as
// the worker's error event, then its exit.
#include <sys/stat.h>
#include <unistd.h>

#include <fstream>
#include <string>

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

TEST_CASE("fork(): 16 forks in a row, not waiting for each exec, all come online and answer") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor());
    std::vector<std::shared_ptr<Worker>> workers;
    for (int i = 0; i < 16; ++i) workers.push_back(co_await master.fork());
    for (auto& w : workers) co_await w->online();
    for (auto& w : workers) {
      co_await w->send({"ping " + std::to_string(w->id())});
      CHECK((co_await w->receive()).data == "ping " + std::to_string(w->id()));
    }
    co_await master.disconnect();
    for (auto& w : workers) CHECK(co_await w->exited() == ExitStatus{0, 0});
  });
}
