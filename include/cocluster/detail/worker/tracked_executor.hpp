// An executor that runs everything on another one and holds a token while any copy of it
// exists. A connection's socket is made on one: the socket keeps a copy, and so does every
// operation pending on it, so the token is released exactly when the socket and all its
// operations are gone. That is how a disconnecting worker knows its connections have ended
// (Node: server.close() waits for the 'close' of every connection) while handing the user an
// ordinary asio::ip::tcp::socket: any_io_executor carries this executor type-erased.
//   tcp::socket s(detail::worker::tracked_executor(ex, token));   // s.get_executor() is any_io_executor
#pragma once

#include "cocluster/detail/config.hpp"

#include <asio/any_io_executor.hpp>
#include <asio/prefer.hpp>
#include <asio/query.hpp>
#include <asio/require.hpp>

#include <memory>
#include <utility>

namespace cocluster::detail::worker {

class tracked_executor {
 public:
  tracked_executor(asio::any_io_executor inner, std::shared_ptr<const void> token) noexcept
      : inner_(std::move(inner)), token_(std::move(token)) {}

  template <class Function>
  void execute(Function&& f) const {
    inner_.execute(std::forward<Function>(f));
  }

  template <class Property>
  auto query(const Property& p) const noexcept(noexcept(asio::query(std::declval<const asio::any_io_executor&>(), p)))
      -> decltype(asio::query(std::declval<const asio::any_io_executor&>(), p)) {
    return asio::query(inner_, p);
  }

  // Requiring or preferring a property keeps the token: the result is still tracked. Whether
  // the inner executor takes the property is checked in a template parameter, not with an
  // expression of this class's type: the class is incomplete here, which clang rejects.
  template <class Property,
            class = decltype(asio::require(std::declval<const asio::any_io_executor&>(), std::declval<const Property&>()))>
  tracked_executor require(const Property& p) const {
    return tracked_executor(asio::any_io_executor(asio::require(inner_, p)), token_);
  }

  template <class Property,
            class = decltype(asio::prefer(std::declval<const asio::any_io_executor&>(), std::declval<const Property&>()))>
  tracked_executor prefer(const Property& p) const {
    return tracked_executor(asio::any_io_executor(asio::prefer(inner_, p)), token_);
  }

  friend bool operator==(const tracked_executor& a, const tracked_executor& b) noexcept {
    return a.inner_ == b.inner_ && a.token_ == b.token_;
  }
  friend bool operator!=(const tracked_executor& a, const tracked_executor& b) noexcept { return !(a == b); }

 private:
  asio::any_io_executor inner_;
  std::shared_ptr<const void> token_;
};

}  // namespace cocluster::detail::worker
