// What a re-executed test worker does, chosen by COCLUSTER_TEST_SCENARIO (see cluster_main.cpp).
#pragma once

#include <string_view>

namespace scenario {
inline constexpr std::string_view echo = "echo";                        // echoes messages (default)
inline constexpr std::string_view report = "report";  // answers each message with report_process() (test_settings.cpp)
inline constexpr std::string_view stdio_lines = "stdio_lines";  // "out 1\nout 2\n" on stdout, "err 1\n" on stderr, exits 0
inline constexpr std::string_view echo_stdin = "echo_stdin";    // reads a line from stdin, writes "echo: <line>\n", exits 0
inline constexpr std::string_view exit3 = "exit3";                      // exits with 3 after online
inline constexpr std::string_view busy = "busy";                        // spins after online, never reads
inline constexpr std::string_view never_online = "never_online";        // never starts the runtime
inline constexpr std::string_view self_disconnect = "self_disconnect";  // this_worker.disconnect() at once
inline constexpr std::string_view report_env = "report_env";            // sends its id, env and open fds
inline constexpr std::string_view exit7_on_disconnect = "exit7_on_disconnect";  // on_disconnect handler exits 7
inline constexpr std::string_view count_sockets = "count_sockets";  // RLIMIT_NOFILE 300, slowly counts 3000 sockets
inline constexpr std::string_view flood_then_socket = "flood_then_socket";  // 200 messages, one socket, then _Exit(5)
inline constexpr std::string_view hello_first = "hello_first";          // sends "hello" right at online
inline constexpr std::string_view garbage = "garbage";                  // writes a non-frame
inline constexpr std::string_view oversized = "oversized";              // announces a 1 GiB message
inline constexpr std::string_view ten_fds = "ten_fds";                  // a frame carrying 10 fds
inline constexpr std::string_view serve = "serve";  // listens on TEST_LISTEN, answers "worker <id>" (test_listen.cpp)
inline constexpr std::string_view stall = "stall";  // listens on TEST_LISTEN, never accepts
inline constexpr std::string_view node = "node";    // a line server driven by messages (test_node_cluster.cpp)
inline constexpr std::string_view tokens = "tokens";  // every worker operation with every token (test_tokens_worker.cpp)
}  // namespace scenario

// The worker side of the serve and stall scenarios (test_listen.cpp).
int run_listen_worker(std::string_view scenario_name);
// The worker side of the node scenario (test_node_cluster.cpp).
int run_node_worker();
// The worker side of the tokens scenario (test_tokens_worker.cpp); its exit code is a count.
int run_tokens_worker();

#include "cocluster/settings.hpp"

inline cocluster::Env scenario_env(std::string_view s) { return {{"COCLUSTER_TEST_SCENARIO", std::string(s)}}; }
