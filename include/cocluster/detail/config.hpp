// What cocluster needs from the compiler and the platform, checked before anything else:
// every header includes this one first, so a missing requirement is the first error a user
// reads, in a sentence, instead of a page of template errors.
#pragma once

#if __cplusplus < 202002L
#error "cocluster needs C++20 (coroutines): compile with -std=c++20 or later (meson: cpp_std=c++20; CMake: the cocluster::cocluster target adds it)"
#endif

#if !defined(__linux__)
#error "cocluster runs on Linux only (kernel 5.3 or later: it waits for workers through pidfd_open)"
#endif

// Asio before 1.24 enables co_await on clang only for the Coroutines TS (__cpp_coroutines),
// which clang 14 and later do not define in C++20 mode; they have C++20's <coroutine>, which
// is what Asio uses with GCC. Say so before Asio's config reads it. A program that includes
// Asio before cocluster with such a pair gets the #error below instead.
#if defined(__clang__) && !defined(ASIO_HAS_CO_AWAIT) && !defined(ASIO_DISABLE_CO_AWAIT) && \
    defined(__cpp_impl_coroutine) && __has_include(<coroutine>)
#define ASIO_HAS_CO_AWAIT 1
#endif

#include <asio/detail/config.hpp>
#include <asio/version.hpp>

#if !defined(ASIO_HAS_CO_AWAIT)
#error "cocluster needs Asio with co_await: with clang and Asio older than 1.24, include a cocluster header before any Asio header, or define ASIO_HAS_CO_AWAIT=1"
#endif
