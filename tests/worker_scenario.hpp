// A worker's behaviour for a test, written beside the TEST_CASE that uses it:
//   WORKER_SCENARIO(exit3) {                      // the worker process's main
//     asio::io_context io;  this_worker.start(io.get_executor());  return 3;
//   }
//   TEST_CASE("...") { ... co_await master.fork(scenario_env("exit3")) ... }
// test_cluster re-executes itself as each worker; cluster_main runs the scenario named by
// COCLUSTER_TEST_SCENARIO ("echo" when unset), and an unknown name ends the worker with 99
// and a line on stderr. Scenarios register themselves: the name lives in one place.
#pragma once

#include <asio/awaitable.hpp>
#include <asio/io_context.hpp>

#include <functional>
#include <map>
#include <string>
#include <string_view>

#include "cocluster/settings.hpp"

namespace test {

using scenario_body = int (*)(int argc, char** argv);

inline std::map<std::string, scenario_body, std::less<>>& scenario_registry() {
  static std::map<std::string, scenario_body, std::less<>> registry;
  return registry;
}

struct scenario_registration {
  scenario_registration(const char* name, scenario_body body) { scenario_registry().emplace(name, body); }
};

// What the worker process was given, recorded by cluster_main before any scenario runs.
struct worker_start {
  std::string inherited_fds;  // "0,1,2,3": the fds open at exec
  int pdeathsig_at_exec = -1;  // spawn's parent-death signal, before this_worker.start() replaces it
};
inline worker_start& at_start() {
  static worker_start s;
  return s;
}

// The default worker (cluster_main.cpp): starts the runtime, runs `before` (after start()),
// then echoes every message back; a message with a socket handle is answered with its data,
// "|", and the 8 bytes its peer wrote on that socket before the hand-off.
int run_echo_worker(const std::function<void(asio::io_context&)>& before = {});
// Its loop: answers each message as above until the channel ends (for a worker that does
// something else first).
asio::awaitable<void> echo_messages();

}  // namespace test

inline cocluster::Env scenario_env(std::string_view s) { return {{"COCLUSTER_TEST_SCENARIO", std::string(s)}}; }

#define WORKER_SCENARIO(name)                                                                             \
  static int worker_scenario_##name(int argc, char** argv);                                               \
  static const ::test::scenario_registration worker_scenario_registration_##name(#name,                    \
                                                                                  &worker_scenario_##name); \
  static int worker_scenario_##name([[maybe_unused]] int argc, [[maybe_unused]] char** argv)
