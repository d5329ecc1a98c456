// A worker that writes what is not our protocol is disconnected with a logged error; the
// master, its fds and the other workers are unaffected.
#include "cocluster/master.hpp"

#include <cstdio>
#include <fstream>
#include <sstream>

#include <doctest/doctest.h>

#include "cocluster/cocluster.hpp"
#include "scenarios.hpp"
#include "support.hpp"

using namespace cocluster;
using namespace test;

namespace {
// Captures what this process writes to stderr while alive.
class stderr_capture {
 public:
  stderr_capture() : file_(std::tmpfile()), saved_(::dup(2)) {
    std::fflush(stderr);
    ::dup2(::fileno(file_), 2);
  }
  ~stderr_capture() { restore(); }
  std::string text() {
    restore();
    std::rewind(file_);
    std::string out;
    char buf[4096];
    while (std::size_t n = std::fread(buf, 1, sizeof buf, file_)) out.append(buf, n);
    return out;
  }

 private:
  void restore() {
    if (saved_ < 0) return;
    std::fflush(stderr);
    ::dup2(saved_, 2);
    ::close(saved_);
    saved_ = -1;
  }
  std::FILE* file_;
  int saved_;
};
}  // namespace

TEST_CASE("a worker writing garbage, an oversized frame or a frame with 10 fds is disconnected; the rest carry on") {
  for (auto bad : {scenario::garbage, scenario::oversized, scenario::ten_fds}) {
    SUBCASE(std::string(bad).c_str()) {
      stderr_capture captured;
      run_bounded([bad](asio::io_context& io) -> awaitable<void> {
        Master<> master(io.get_executor());
        auto& events = master.events();
        auto good1 = co_await master.fork();
        auto good2 = co_await master.fork();
        co_await good1->online();
        co_await good2->online();
        const int fds_before = open_fd_count();

        auto bad_worker = co_await master.fork(scenario_env(bad));
        co_await bad_worker->disconnected();
        CHECK(bad_worker->exited_after_disconnect() == false);
        CHECK((co_await bad_worker->exited()) == ExitStatus{0, 0});  // it left on the EOF we gave it
        bool saw_error = false;
        while (events.pending()) {
          const Event e = co_await events.next();
          if (e.type == EventType::error && e.worker == bad_worker) {
            saw_error = true;
            CHECK(e.error == error::protocol_error);
          }
        }
        CHECK(saw_error);

        for (auto& w : {good1, good2}) {
          co_await w->send({"still here"});
          CHECK((co_await w->receive()).data == "still here");
        }
        CHECK(open_fd_count() == fds_before);
        co_await master.disconnect();
      });
      const std::string log = captured.text();
      CHECK_MESSAGE(log.find("protocol error") != std::string::npos, "stderr was: " << log);
    }
  }
}
