// A FIFO of values with awaitable pop and, when given a capacity, awaitable push
// (backpressure). close(ec) lets the consumers drain what is queued, then fails them with ec.
// Besides its count, a queue can bound the total weight of what it holds (set_weight_limit:
// the bytes of unread messages): it is full once either bound is reached.
//   detail::async_queue<Message> q(ex, 64);  co_await q.async_push(m, use_awaitable);  auto m = co_await q.async_pop(use_awaitable);
// Both waits honour per-operation cancellation. Single-threaded: use from one executor.
// With inline_delivery, push()/try_push() hand a value to a waiting consumer by running it at
// once (asio::dispatch) instead of posting: for producers that run in completion handlers.
#pragma once

#include "cocluster/detail/config.hpp"

#include <asio/async_result.hpp>
#include <asio/error.hpp>
#include <asio/use_awaitable.hpp>

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
  // What one value weighs against the weight limit (a message: its bytes).
  using weigh_fn = std::size_t (*)(const T&) noexcept;

  explicit async_queue(asio::any_io_executor ex, std::size_t capacity = unbounded, bool inline_delivery = false)
      : ex_(std::move(ex)), capacity_(capacity), inline_delivery_(inline_delivery) {}
  async_queue(const async_queue&) = delete;
  async_queue& operator=(const async_queue&) = delete;
  ~async_queue() {
    fail_all(poppers_, asio::error::operation_aborted);
    fail_pushers(asio::error::operation_aborted);
  }

  std::size_t size() const noexcept { return items_.size(); }
  bool empty() const noexcept { return items_.empty(); }
  // The total weight of what is queued (0 without a weight limit).
  std::size_t weight() const noexcept { return weight_; }
  // Either bound reached: a push would wait. Never while a consumer waits (nothing is queued).
  bool full() const noexcept { return items_.size() >= capacity_ || weight_ >= weight_limit_; }

  // unbounded also lifts every async_wait_below limit (now and later).
  void set_capacity(std::size_t capacity) {
    capacity_ = capacity;
    admit_pushers();
  }

  // Full once what is queued weighs `limit` or more; a single value heavier than the limit
  // still goes in when the queue is below it. Call before anything is queued.
  void set_weight_limit(std::size_t limit, weigh_fn weigh) {
    weight_limit_ = limit;
    weigh_ = weigh;
    admit_pushers();
  }

  // Lifts every bound (count, weight, async_wait_below), now and later.
  void lift_bounds() {
    weight_limit_ = unbounded;
    set_capacity(unbounded);
  }

  // Adds at once if there is room (or a consumer waits); false when full or closed.
  bool try_push(T& value) {
    if (closed_ || (poppers_.empty() && full())) return false;
    deliver(std::move(value), inline_delivery_);
    return true;
  }

  // Adds regardless of capacity (for producers that must not wait); ignored once closed.
  void push(T value) {
    if (!closed_) deliver(std::move(value), inline_delivery_);
  }

  template <class Token>
  auto async_push(T value, Token&& token) {
    return asio::async_initiate<Token, void(std::error_code)>(
        [this](auto handler, T v) {
          pending_handler<> h(std::move(handler), ex_);
          if (closed_) return h.complete(*closed_);
          if (!poppers_.empty() || !full()) {
            deliver(std::move(v), false);  // inside an initiation: never run the consumer here
            return h.complete({});
          }
          park(pushers_, pusher{std::move(h), std::move(v)});
        },
        token, std::move(value));
  }

  // Completes once fewer than `limit` values are queued (at once if that is so already): for a
  // producer with a tighter bound for some values than the queue's capacity.
  template <class Token>
  auto async_wait_below(std::size_t limit, Token&& token) {
    return asio::async_initiate<Token, void(std::error_code)>(
        [this](auto handler, std::size_t n) {
          pending_handler<> h(std::move(handler), ex_);
          if (closed_) return h.complete(*closed_);
          if (items_.size() < n || capacity_ == unbounded) return h.complete({});
          park(room_waiters_, room_waiter{std::move(h), n, false});
        },
        token, limit);
  }

  // Completes once the queue is not full (at once if it is not): for a producer that must not
  // take the next value before there is room for it (a reader that stops reading its socket).
  template <class Token>
  auto async_wait_room(Token&& token) {
    return asio::async_initiate<Token, void(std::error_code)>(
        [this](auto handler) {
          pending_handler<> h(std::move(handler), ex_);
          if (closed_) return h.complete(*closed_);
          if (!full()) return h.complete({});
          park(room_waiters_, room_waiter{std::move(h), unbounded, true});
        },
        token);
  }

  std::optional<T> try_pop() {
    if (items_.empty()) return std::nullopt;
    T v = std::move(items_.front());
    items_.pop_front();
    if (weigh_) weight_ -= weigh_(v);
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
  struct room_waiter {
    pending_handler<> handler;
    std::size_t limit;  // fewer than this many queued
    bool until_room;    // and not full()
    asio::cancellation_slot cancellation_slot() const noexcept { return handler.cancellation_slot(); }
    void complete(std::error_code ec) { handler.complete(ec); }
  };

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
        if constexpr (std::is_same_v<W, pending_handler<T>>) parked.complete(asio::error::operation_aborted, T{});
        else parked.complete(asio::error::operation_aborted);
      });
    }
  }

  void deliver(T&& value, bool run_consumer_now) {
    if (!poppers_.empty()) {
      auto h = std::move(poppers_.front());
      poppers_.pop_front();
      if (run_consumer_now) h.complete_inline({}, std::move(value));
      else h.complete({}, std::move(value));
    } else {
      if (weigh_) weight_ += weigh_(value);
      items_.push_back(std::move(value));
    }
  }

  void admit_pushers() {
    while (!pushers_.empty() && (!full() || !poppers_.empty())) {
      auto p = std::move(pushers_.front());
      pushers_.pop_front();
      deliver(std::move(p.value), false);
      p.complete({});
    }
    for (auto it = room_waiters_.begin(); it != room_waiters_.end();) {
      const bool admitted = capacity_ == unbounded
                                ? !it->until_room || !full()
                                : items_.size() < it->limit && (!it->until_room || !full());
      if (!admitted) {
        ++it;
        continue;
      }
      auto w = std::move(*it);
      it = room_waiters_.erase(it);
      w.complete({});
    }
    if (closed_ && items_.empty()) fail_all(poppers_, *closed_);
  }

  void fail_pushers(std::error_code ec) {
    auto list = std::move(pushers_);
    pushers_.clear();
    for (auto& p : list) p.complete(ec);
    auto rooms = std::move(room_waiters_);
    room_waiters_.clear();
    for (auto& r : rooms) r.complete(ec);
  }

  static void fail_all(std::list<pending_handler<T>>& list, std::error_code ec) {
    auto moved = std::move(list);
    list.clear();
    for (auto& h : moved) h.complete(ec, T{});
  }

  asio::any_io_executor ex_;
  std::size_t capacity_;
  std::size_t weight_limit_ = unbounded;
  weigh_fn weigh_ = nullptr;
  std::size_t weight_ = 0;
  bool inline_delivery_;
  std::deque<T> items_;
  std::list<pending_handler<T>> poppers_;
  std::list<pusher> pushers_;
  std::list<room_waiter> room_waiters_;
  std::optional<std::error_code> closed_;
};

}  // namespace cocluster::detail
