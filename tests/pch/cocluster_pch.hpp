// Precompiled for tests, examples and benchmarks: the heavy, stable headers (cocluster's
// config first: it prepares Asio's configuration on clang with an older Asio).
#include "cocluster/detail/config.hpp"

#include <asio.hpp>
#include <asio/experimental/awaitable_operators.hpp>
#include <fmt/core.h>
