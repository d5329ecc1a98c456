// The wire format of a channel: each SOCK_SEQPACKET packet is one frame, a fixed header and
// up to max_fragment payload bytes. A message larger than that is split into several frames;
// a handle (one fd in SCM_RIGHTS) travels with the first frame of its message. An internal
// message may carry several (a batch of hand-offs): extra_handles says how many beyond the first.
// ipc/frame_parser.hpp checks what arrives, ipc/frame_writer.hpp cuts what leaves.
#pragma once

#include "cocluster/detail/config.hpp"

#include <cstddef>
#include <cstdint>

namespace cocluster::ipc {

enum class message_kind : std::uint8_t { user = 0, internal = 1 };

struct frame_header {
  static constexpr std::uint8_t magic_value = 0xC1;
  static constexpr std::uint8_t first = 1;     // starts a message
  static constexpr std::uint8_t last = 2;      // ends it (a small message is first | last)
  static constexpr std::uint8_t internal = 4;  // a protocol message, not a user one

  std::uint8_t magic = magic_value;
  std::uint8_t flags = 0;
  std::uint8_t handle_kind = 0;  // the cocluster::handle_kind of the fd attached to this frame, 0 for none
  // Internal messages only: fds of the same kind beyond the first (up to max_fds_per_packet
  // in all); 0 on every user frame and on frames with no handle.
  std::uint8_t extra_handles = 0;
  std::uint32_t total_size = 0;  // payload size of the whole message, repeated in every frame
};
static_assert(sizeof(frame_header) == 8);

// 64 KiB packets fit the default unix socket send buffer (wmem_default, 208 KiB).
inline constexpr std::size_t max_packet = 64 * 1024;
inline constexpr std::size_t max_fragment = max_packet - sizeof(frame_header);
// More fds than this in one packet is a protocol error; the kernel closes any beyond it.
inline constexpr std::size_t max_fds_per_packet = 16;

}  // namespace cocluster::ipc
