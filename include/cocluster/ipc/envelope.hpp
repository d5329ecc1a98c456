// What one channel message is (Envelope) and a channel's limits (ChannelOptions).
//   ipc::Envelope e{ipc::message_kind::user, {"hello", std::move(socket)}};
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "cocluster/ipc/frame.hpp"
#include "cocluster/message.hpp"

namespace cocluster::ipc {

struct ChannelOptions {
  // Largest message accepted either way; at most 4 GiB - 1 (the frame's size field).
  std::size_t max_message_size = std::size_t{64} << 20;
  // Messages queued for sending before async_send waits for room (backpressure).
  std::size_t send_queue_capacity = 256;
  // Bytes queued for sending before async_send waits for room: a peer that does not read
  // costs the sender at most this (plus the one message that crossed it) whatever the sizes.
  std::size_t send_queue_bytes = std::size_t{32} << 20;
};

struct Envelope {  // not an aggregate: see Message
  Envelope() = default;
  Envelope(message_kind k, Message m) : kind(k), message(std::move(m)) {}

  message_kind kind = message_kind::user;
  Message message;
  // A received internal message's handle is here, as its fd and declared kind (the wire byte),
  // not in message.handle: the protocol layer adopts it (detail::adopt_handle, which checks the
  // fd) on the executor it chooses (a handed-over connection's socket is made tracked).
  detail::handle_tag internal_tag = detail::no_handle;
  detail::unique_fd internal_fd;
  // The fds after the first of an internal message that carries several (a batch of
  // hand-offs), same kind, in order; empty otherwise.
  std::vector<detail::unique_fd> internal_extra_fds;
  // The fds of this internal message the kernel could not install for want of a free fd
  // (RLIMIT_NOFILE): the last ones it declares, after internal_fd and internal_extra_fds.
  std::size_t internal_fds_lost = 0;

  bool has_handle() const noexcept { return message.has_handle() || static_cast<bool>(internal_fd); }
};

}  // namespace cocluster::ipc
