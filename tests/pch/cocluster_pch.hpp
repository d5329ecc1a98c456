// Precompiled for the test executables, whose files are compiled in several groups: the heavy,
// stable headers (cocluster's config first: it prepares Asio's configuration on clang with an
// older Asio). The examples and benchmarks do without: a program of one file gains nothing from
// it and pays for making it (hello_cluster.cpp, g++ -O2: 45.7 s with it and 45.8 s without, and
// 7 s more to make it; chaos.cpp 32.4 s and 31.4 s; clang: 15.1 s and 16.8 s, and 2.8 s to make
// it; 2026-11-27, the 2-vCPU VM).
#include "cocluster/detail/config.hpp"

#include <asio.hpp>
#include <asio/experimental/awaitable_operators.hpp>
#include <fmt/core.h>
