// A FIFO of values with awaitable pop and, when given a capacity, awaitable push
// (backpressure). close(ec) lets the consumers drain what is queued, then fails them with ec.
//   detail::async_queue<Message> q(ex, 64);  co_await q.async_push(m, use_awaitable);  auto m = co_await q.async_pop(use_awaitable);
// Both waits honour per-operation cancellation. Single-threaded: use from one executor.
#pragma once

#include <asio/async_result.hpp>
#include <asio/error.hpp>

#include <cstddef>
#include <deque>
#include <limits>
#include <list>
#include <optional>

#include "cocluster/detail/pending_handler.hpp"

namespace cocluster::detail {

template <class T>
class async_queue {
 public:
  static constexpr std::size_t unbounded = std::numeric_limits<std::size_t>::max();

  explicit async_queue(asio::any_io_executor ex, std::size_t capacity = unbounded)
      : ex_(std::move(ex)), capacity_(capacity) {}
  async_queue(const async_queue&) = delete;
  async_queue& operator=(const async_queue&) = delete;
  ~async_queue() {
    fail_all(poppers_, asio::error::operation_aborted);
    fail_pushers(asio::error::operation_aborted);
  }

  std::size_t size() const noexcept { return items_.size(); }
  bool empty() const noexcept { return items_.empty(); }
  bool is_closed() const noexcept { return closed_.has_value(); }

  void set_capacity(std::size_t capacity) {
    capacity_ = capacity;
    admit_pushers();
  }

  // Adds at once if there is room (or a consumer waits); false when full or closed.
  bool try_push(T& value) {
    if (closed_ || (poppers_.empty() && items_.size() >= capacity_)) return false;
    deliver(std::move(value));
    return true;
  }

  // Adds regardless of capacity (for producers that must not wait); ignored once closed.
  void push(T value) {
    if (!closed_) deliver(std::move(value));
  }

  template <class Token>
  auto async_push(T value, Token&& token) {
    return asio::async_initiate<Token, void(std::error_code)>(
        [this](auto handler, T v) {
          pending_handler<> h(std::move(handler), ex_);
          if (closed_) return h.complete(*closed_);
          if (try_push(v)) return h.complete({});
          park(pushers_, pusher{std::move(h), std::move(v)});
        },
        token, std::move(value));
  }

  std::optional<T> try_pop() {
    if (items_.empty()) return std::nullopt;
    T v = std::move(items_.front());
    items_.pop_front();
    admit_pushers();
    return v;
  }

  template <class Token>
  auto async_pop(Token&& token) {
    return asio::async_initiate<Token, void(std::error_code, T)>(
        [this](auto handler) {
          pending_handler<T> h(std::move(handler), ex_);
          if (auto v = try_pop()) return h.complete({}, std::move(*v));
          if (closed_) return h.complete(*closed_, T{});
          park(poppers_, std::move(h));
        },
        token);
  }

  // Consumers get what is queued, then `ec`; producers fail with `ec` at once.
  void close(std::error_code ec) {
    if (closed_) return;
    closed_ = ec;
    fail_pushers(ec);
    if (items_.empty()) fail_all(poppers_, ec);
  }

 private:
  struct pusher {
    pending_handler<> handler;
    T value;
    asio::cancellation_slot cancellation_slot() const noexcept { return handler.cancellation_slot(); }
    void complete(std::error_code ec) { handler.complete(ec); }
  };

  template <class W>
  void park(std::list<W>& list, W w) {
    auto slot = w.cancellation_slot();
    list.push_back(std::move(w));
    if (slot.is_connected()) {
      auto it = std::prev(list.end());
      slot.assign([&list, it](asio::cancellation_type) {
        auto parked = std::move(*it);
        list.erase(it);
        if constexpr (std::is_same_v<W, pusher>) parked.complete(asio::error::operation_aborted);
        else parked.complete(asio::error::operation_aborted, T{});
      });
    }
  }

  void deliver(T&& value) {
    if (!poppers_.empty()) {
      auto h = std::move(poppers_.front());
      poppers_.pop_front();
      h.complete({}, std::move(value));
    } else {
      items_.push_back(std::move(value));
    }
  }

  void admit_pushers() {
    while (!pushers_.empty() && (items_.size() < capacity_ || !poppers_.empty())) {
      auto p = std::move(pushers_.front());
      pushers_.pop_front();
      deliver(std::move(p.value));
      p.complete({});
    }
    if (closed_ && items_.empty()) fail_all(poppers_, *closed_);
  }

  void fail_pushers(std::error_code ec) {
    auto list = std::move(pushers_);
    pushers_.clear();
    for (auto& p : list) p.complete(ec);
  }

  static void fail_all(std::list<pending_handler<T>>& list, std::error_code ec) {
    auto moved = std::move(list);
    list.clear();
    for (auto& h : moved) h.complete(ec, T{});
  }

  asio::any_io_executor ex_;
  std::size_t capacity_;
  std::deque<T> items_;
  std::list<pending_handler<T>> poppers_;
  std::list<pusher> pushers_;
  std::optional<std::error_code> closed_;
};

}  // namespace cocluster::detail
