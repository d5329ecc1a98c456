// The read loop both ends of a channel run (the master's Worker and the worker runtime): it
// drains every message that is ready per wake-up, without suspending in between, and hands
// user messages to an inbox whose waiting consumer runs at once.
#pragma once

#include "cocluster/detail/config.hpp"

#include <asio/post.hpp>
#include <asio/use_awaitable.hpp>

#include <algorithm>
#include <exception>
#include <string>

#include "cocluster/detail/as_tuple.hpp"
#include "cocluster/detail/async_queue.hpp"
#include "cocluster/detail/log.hpp"
#include "cocluster/detail/rate_limited_log.hpp"
#include "cocluster/ipc/channel.hpp"

namespace cocluster::detail {

// Messages read per wake-up before the loop yields to other handlers (a peer that keeps the
// socket full must not starve the consumers of what was read).
inline constexpr int read_budget = 64;
// Unread messages that carry a handle: beyond it reading pauses, so a flood of passed sockets
// stays in the kernel's queue instead of using up this process's fds.
inline constexpr std::size_t max_unread_handles = 128;
// Internal messages (answers to the peer's queries, hand-offs, acknowledgements) are queued
// for sending whatever the send queue's capacity. Past this many beyond it the peer is not
// reading what it asks for, and it is not read from until it has taken some: a peer that
// floods requests and never reads the answers costs this process a bounded queue.
inline constexpr std::size_t max_internal_backlog = 1024;

// An exception from code this loop runs inline (a consumer resumed by the inbox, a handler of
// an internal message) must not end the loop silently: it leaves io_context::run() instead,
// as it would have in plain Asio, and the loop reads on.
inline void rethrow_from_run(const asio::any_io_executor& ex, std::exception_ptr e) {
  asio::post(ex, [e] { std::rethrow_exception(e); });
}

// What an unread message weighs against the inbox's byte bound: its bytes.
inline std::size_t message_bytes(const Message& m) noexcept { return m.data.size(); }

// The bounds on what a process holds unread from its peer (Settings::max_unread_messages and
// max_unread_bytes in the master, this_worker.start()'s in a worker).
inline void bound_inbox(async_queue<Message>& inbox, std::size_t max_messages, std::size_t max_bytes) {
  inbox.set_capacity(std::max<std::size_t>(max_messages, 1));
  inbox.set_weight_limit(std::max<std::size_t>(max_bytes, 1), &message_bytes);
}

// Runs until the channel ends; returns why (eof, protocol_error, ...). `peer` names the other
// end in log lines ("worker 3 (pid 1234)", "the master").
//   on_internal(ipc::Envelope&) -> bool: false returns protocol_error (it may take the
//   envelope's handle); so does a frame the channel dropped (read_past_bad_frames()). The
//   channel is then still open: the master reads a worker's on (Worker::read_loop()).
//   on_user(): a user message was queued.  on_pause(true): the inbox is full (this process
//   does not receive), reading waits; on_pause(false): there is room again, reading goes on
//   (whether or not the peer sends anything more). Not called when reading waits because the
//   peer does not read what this process must send it (the backlog below): that pause is the peer's doing,
//   and a peer that stops reading is no less unresponsive for it (the master's heartbeat and
//   protocol-error clocks keep running).
// The inbox's bounds are checked before each message is read: once it is full (its message
// count or its bytes) nothing more is taken from the socket, so the peer's sends wait in the
// kernel and this process holds at most the bound plus the one message that crossed it.
template <class OnInternal, class OnUser, class OnPause>
asio::awaitable<std::error_code> read_channel(ipc::Channel& channel, async_queue<Message>& inbox, std::string peer,
                                              OnInternal on_internal, OnUser on_user, OnPause on_pause) {
  const auto tuple = cocluster::as_tuple(asio::use_awaitable);
  int budget = read_budget;
  rate_limited_log lost_log(channel.get_executor());  // user messages whose handle was lost
  for (;;) {
    if (budget == 0) {
      co_await asio::post(channel.get_executor(), asio::use_awaitable);
      budget = read_budget;
    }
    if (const std::size_t cap = channel.options().send_queue_capacity;
        channel.queued() > cap && channel.queued() - cap >= max_internal_backlog) {
      debug("{} messages queued for {}, which does not read them; reading from it paused", channel.queued(), peer);
      co_await channel.async_wait_writable(tuple);  // the channel's own writer drains it meanwhile
      continue;
    }
    if (inbox.full()) {
      on_pause(true);
      auto [closed] = co_await inbox.async_wait_room(tuple);
      if (closed) co_return closed;
      on_pause(false);
      continue;
    }
    ipc::Envelope envelope;
    std::error_code end;
    if (!channel.try_receive(envelope, end)) {
      if (end) co_return end;
      co_await channel.async_wait_readable(tuple);  // a wait error: try_receive reports it
      budget = read_budget;
      continue;
    }
    --budget;
    if (envelope.kind == ipc::message_kind::internal) {
      bool valid = true;
      try {
        valid = on_internal(envelope);
      } catch (...) {
        rethrow_from_run(channel.get_executor(), std::current_exception());
      }
      if (!valid) co_return error::protocol_error;
      continue;
    }
    if (envelope.message.handle.lost())
      lost_log.error("a message from {} came without its {}: no fd was free in this process to receive it "
                     "(RLIMIT_NOFILE); delivered with Handle::lost() set",
                     peer, to_string(envelope.message.handle.kind()));
    if (envelope.message.has_handle() && inbox.size() >= max_unread_handles) {
      on_pause(true);
      auto [closed] = co_await inbox.async_wait_below(max_unread_handles, tuple);
      if (closed) co_return closed;
      on_pause(false);
    }
    try {
      inbox.push(std::move(envelope.message));  // room was checked before reading it
    } catch (...) {  // from the consumer it ran: the message was delivered
      rethrow_from_run(channel.get_executor(), std::current_exception());
    }
    on_user();
  }
}

}  // namespace cocluster::detail
