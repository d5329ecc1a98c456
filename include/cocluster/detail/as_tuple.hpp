// cocluster::as_tuple (and detail::as_tuple_t, its type): Asio's completion token adapter that
// hands an operation's error_code back as a value, under the name the Asio in use has. Asio 1.24 moved it out of
// `experimental` (whose header is hidden by ASIO_NO_DEPRECATED from then on and gone in 1.33).
//   auto [ec, n] = co_await socket.async_read_some(buffer, cocluster::as_tuple(asio::use_awaitable));
#pragma once

#include "cocluster/detail/config.hpp"

#if ASIO_VERSION >= 102400
#include <asio/as_tuple.hpp>
#else
#include <asio/experimental/as_tuple.hpp>
#endif

// A using-declaration, so `as_tuple` stays unambiguous in code that uses both namespaces.
#if ASIO_VERSION >= 102400
namespace cocluster {
using asio::as_tuple;
namespace detail {
using asio::as_tuple_t;
}
}  // namespace cocluster
#else
namespace cocluster {
using asio::experimental::as_tuple;
namespace detail {
using asio::experimental::as_tuple_t;
}
}  // namespace cocluster
#endif
