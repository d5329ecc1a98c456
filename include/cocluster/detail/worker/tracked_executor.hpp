// An executor that runs everything on another one and holds a token while any copy of it
// exists. A connection's socket is made on one: the socket keeps a copy, and so does every
// operation pending on it, so the token is released exactly when the socket and all its
// operations are gone. That is how a disconnecting worker knows its connections have ended
// (Node: server.close() waits for the 'close' of every connection) while handing the user an
// ordinary asio::ip::tcp::socket: any_io_executor carries this executor type-erased.
//   tcp::socket s(detail::worker::track(ex, token));   // s.get_executor() is any_io_executor
// track() wraps the io_context's own executor when `ex` is one (the usual case): the result is
// small enough for any_io_executor to hold in place, where a wrapped any_io_executor is
// allocated once per connection and reached through a second indirection at every copy.
#pragma once

#include "cocluster/detail/config.hpp"

#include <asio/version.hpp>

#include <asio/any_io_executor.hpp>
#if ASIO_VERSION < 102500
#include <asio/execution/execute.hpp>
#endif
#include <asio/io_context.hpp>
#include <asio/prefer.hpp>
#include <asio/query.hpp>
#include <asio/require.hpp>

#include <memory>
#include <type_traits>
#include <typeinfo>
#include <utility>

namespace cocluster::detail::worker {

template <class Inner>
class tracked_executor {
 public:
  tracked_executor(Inner inner, std::shared_ptr<const void> token) noexcept
      : inner_(std::move(inner)), token_(std::move(token)) {}

  template <class Function>
  void execute(Function&& f) const {
#if ASIO_VERSION < 102500  // (io_context's executor takes it through the customisation point there)
    asio::execution::execute(inner_, std::forward<Function>(f));
#else
    inner_.execute(std::forward<Function>(f));
#endif
  }

  template <class Property>
  auto query(const Property& p) const noexcept(noexcept(asio::query(std::declval<const Inner&>(), p)))
      -> decltype(asio::query(std::declval<const Inner&>(), p)) {
    return asio::query(inner_, p);
  }

  // Requiring or preferring a property keeps the token: the result is still tracked. Whether
  // the inner executor takes the property is checked in a template parameter, not with an
  // expression of this class's type: the class is incomplete here, which clang rejects.
  template <class Property, class Required = std::decay_t<decltype(asio::require(std::declval<const Inner&>(),
                                                                               std::declval<const Property&>()))>>
  tracked_executor<Required> require(const Property& p) const {
    return tracked_executor<Required>(asio::require(inner_, p), token_);
  }

  template <class Property, class Preferred = std::decay_t<decltype(asio::prefer(std::declval<const Inner&>(),
                                                                                std::declval<const Property&>()))>>
  tracked_executor<Preferred> prefer(const Property& p) const {
    return tracked_executor<Preferred>(asio::prefer(inner_, p), token_);
  }

  friend bool operator==(const tracked_executor& a, const tracked_executor& b) noexcept {
    return a.inner_ == b.inner_ && a.token_ == b.token_;
  }
  friend bool operator!=(const tracked_executor& a, const tracked_executor& b) noexcept { return !(a == b); }

 private:
  Inner inner_;
  std::shared_ptr<const void> token_;
};

// `ex`, tracked by `token`. The type is compared first: Asio 1.22's target<T>() casts to T
// whatever the executor is (a strand, a thread pool's), where 1.38's checks.
inline asio::any_io_executor track(const asio::any_io_executor& ex, std::shared_ptr<const void> token) {
#if !defined(ASIO_NO_TYPEID)
  if (ex.target_type() == typeid(asio::io_context::executor_type))
    return tracked_executor<asio::io_context::executor_type>(*ex.target<asio::io_context::executor_type>(),
                                                             std::move(token));
#endif
  return tracked_executor<asio::any_io_executor>(ex, std::move(token));
}

}  // namespace cocluster::detail::worker
