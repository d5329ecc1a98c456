// Precompiled for tests, examples and benchmarks: the heavy, stable headers.
#include <asio.hpp>
#include <asio/experimental/awaitable_operators.hpp>
#include <fmt/core.h>
