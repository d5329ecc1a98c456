// The receiving half of the wire format, without a socket: given what one recvmsg returned (a
// header, a payload written into payload_buffer(), the fds, msg_flags), it says whether a whole
// message is ready, more frames are needed, the peer has gone, or the peer broke a rule.
//   frame_header h;  iovec iov[2] = {{&h, sizeof h}, as_iovec(parser.payload_buffer())};
//   n = recvmsg(...);  auto r = parser.on_packet(h, n, received_fds, msg.msg_flags);
// The rules are the ones in docs/DESIGN.md, "Wire format"; each has a test in
// tests/test_frame_parser.cpp.
#pragma once

#include <sys/socket.h>

#include <algorithm>
#include <cstring>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

#include "cocluster/error.hpp"
#include "cocluster/ipc/frame.hpp"
#include "cocluster/message.hpp"

namespace cocluster::ipc {

class frame_parser {
 public:
  enum class status {
    message,       // a whole message: kind, data, handle
    need_more,     // a fragment of a larger message was taken in
    end_of_input,  // the peer closed (also in the middle of a message: it died, it did not lie)
    failed,        // the peer broke a rule: error and detail say which
  };
  struct result {
    status what = status::need_more;
    message_kind kind = message_kind::user;
    std::string data;
    Handle handle;  // the fd as received, with the kind the frame declares; not checked here
                    // (a user's whose fd the kernel could not install: lost(), no fd)
    // An internal message's fds beyond the first (frame_header::extra_handles), same kind, in order.
    std::vector<detail::unique_fd> extra_fds;
    // Of a whole internal frame, the fds the kernel could not install (RLIMIT_NOFILE): the last
    // ones it declares. handle and extra_fds hold those that came (none: no handle).
    std::size_t fds_lost = 0;
    std::error_code error;
    std::string detail;  // for Channel::error_detail()
  };

  explicit frame_parser(std::size_t max_message_size) : max_message_size_(max_message_size) {}

  // Where the payload of the next packet goes (after the header): the message's own buffer
  // while a multi-frame message is in progress, so continuation frames are not copied twice.
  // Its size is what the next frame may carry; a larger packet arrives as MSG_TRUNC.
  std::span<char> payload_buffer() {
    if (partial_) return {partial_.payload.data() + partial_.filled, std::min(max_fragment, partial_.payload.size() - partial_.filled)};
    if (scratch_.empty()) scratch_.resize(max_fragment);
    return {scratch_.data(), scratch_.size()};
  }

  bool in_message() const noexcept { return static_cast<bool>(partial_); }

  // One packet: `size` is what recvmsg returned (header and payload), `h` the header bytes it
  // wrote, `fds` every fd that came with it (the parser takes the one it keeps; the caller's
  // storage closes the rest), `msg_flags` recvmsg's msg.msg_flags.
  result on_packet(const frame_header& h, std::size_t size, std::span<detail::unique_fd> fds, int msg_flags) {
    if (size == 0) return end_of_input();
    std::size_t lost = 0;
    if (msg_flags & MSG_CTRUNC) {
      // The kernel drops fds it cannot install (RLIMIT_NOFILE) with the same flag as fds
      // beyond our buffer: fewer fds than a frame we would accept declares is the former (it
      // installs a batch's fds one by one and stops at the limit).
      const std::size_t declared = h.handle_kind == 0 ? 0 : 1u + h.extra_handles;
      if (!(size >= sizeof h && h.handle_kind != 0 && fds.size() < declared && declared <= max_fds_per_packet))
        return fail("frame carries more than " + std::to_string(max_fds_per_packet) + " fds");
      // The channel goes on. A whole internal frame (a hand-off, a listen's reply) is read
      // with the fds that came: the protocol layer refuses what lost its fd. A user's message
      // is delivered with a handle that says it was lost (Handle::lost()). The first frame of
      // an internal message in several frames (none carries a handle) ends the channel. A
      // frame that breaks a rule below is a protocol error, its fds lost or not.
      const std::uint8_t whole_frame = frame_header::first | frame_header::last;
      if ((h.flags & frame_header::internal) && (h.flags & whole_frame) == frame_header::first && !partial_)
        return fail(std::make_error_code(std::errc::too_many_files_open),
                    "a handle sent to this process was lost: no fd left (RLIMIT_NOFILE)");
      lost = declared - fds.size();
    }
    if (msg_flags & MSG_TRUNC) return fail("frame larger than expected");
    if (size < sizeof h) return fail("short frame of " + std::to_string(size) + " bytes");
    if (h.magic != frame_header::magic_value) return fail("frame with a bad magic byte");
    if (h.handle_kind >= handle_kind_count) return fail("frame with unknown handle type " + std::to_string(h.handle_kind));
    if (h.extra_handles != 0) {
      if (!(h.flags & frame_header::internal)) return fail("user frame declares more than one handle");
      if (h.handle_kind == 0) return fail("frame declares extra handles but no handle type");
      if (1u + h.extra_handles > max_fds_per_packet)
        return fail("frame declares " + std::to_string(1u + h.extra_handles) + " handles, more than " +
                    std::to_string(max_fds_per_packet));
    }
    const std::size_t expected_fds = h.handle_kind == 0 ? 0 : 1u + h.extra_handles;
    if (fds.size() + lost != expected_fds)
      return fail("frame carries " + std::to_string(fds.size()) + " fds, declares " + std::to_string(expected_fds));
    const bool first = h.flags & frame_header::first;
    if (h.handle_kind != 0 && !first) return fail("handle on a continuation frame");

    const std::size_t len = size - sizeof h;
    const bool last = h.flags & frame_header::last;
    const auto kind = (h.flags & frame_header::internal) ? message_kind::internal : message_kind::user;
    Handle handle;
    std::vector<detail::unique_fd> extra;
    if (h.handle_kind != 0 && !fds.empty()) {
      handle = Handle(static_cast<handle_kind>(h.handle_kind), std::move(fds.front()));
      for (auto& fd : fds.subspan(1)) extra.push_back(std::move(fd));
    } else if (lost != 0 && kind == message_kind::user) {
      handle = Handle(static_cast<handle_kind>(h.handle_kind), Handle::lost_fd_t{});
      lost = 0;  // said by the handle; fds_lost counts an internal message's
    }

    if (!partial_) {
      if (!first) return fail("continuation frame without a first frame");
      if (h.total_size > max_message_size_)
        return fail("message of " + std::to_string(h.total_size) + " bytes exceeds the limit of " +
                    std::to_string(max_message_size_));
      if (len > h.total_size || (last && len != h.total_size) || (!last && len == 0))
        return fail("frame size does not match its message size");
      if (last) {
        result r = whole(kind, std::string(scratch_.data(), len), std::move(handle), std::move(extra));
        r.fds_lost = lost;
        return r;
      }
      partial_.active = true;
      partial_.kind = kind;
      partial_.payload.resize(h.total_size);  // bounded by max_message_size above
      std::memcpy(partial_.payload.data(), scratch_.data(), len);
      partial_.filled = len;
      partial_.handle = std::move(handle);
      partial_.extra_fds = std::move(extra);
      return {};
    }
    if (first || kind != partial_.kind || h.total_size != partial_.payload.size())
      return fail("frame does not continue the message in progress");
    partial_.filled += len;  // the payload was written in place (payload_buffer)
    const bool complete = partial_.filled == partial_.payload.size();
    if (last != complete || (!last && len == 0)) return fail("frame size does not match its message size");
    if (!last) return {};
    auto done = std::exchange(partial_, {});
    return whole(done.kind, std::move(done.payload), std::move(done.handle), std::move(done.extra_fds));
  }

  // A packet as bytes, received as recvmsg would into payload_buffer(): a short packet fills
  // part of the header, a long one is cut and flagged MSG_TRUNC. For tests and fuzzing.
  result feed(std::string_view packet, std::span<detail::unique_fd> fds = {}, int msg_flags = 0) {
    frame_header h;
    if (!packet.empty()) std::memcpy(&h, packet.data(), std::min(packet.size(), sizeof h));  // data() may be null
    std::size_t size = std::min(packet.size(), sizeof h);
    if (packet.size() > sizeof h) {
      auto buffer = payload_buffer();
      const std::size_t payload = packet.size() - sizeof h;
      const std::size_t taken = std::min(payload, buffer.size());
      std::memcpy(buffer.data(), packet.data() + sizeof h, taken);
      size += taken;
      if (taken < payload) msg_flags |= MSG_TRUNC;
    }
    return on_packet(h, size, fds, msg_flags);
  }

  // Forgets a message in progress (its handle is closed).
  void reset() noexcept { partial_ = {}; }

 private:
  struct partial_message {
    message_kind kind = message_kind::user;
    std::string payload;  // sized to the whole message by its first frame
    std::size_t filled = 0;
    Handle handle;
    std::vector<detail::unique_fd> extra_fds;
    bool active = false;
    explicit operator bool() const noexcept { return active; }
  };

  static result whole(message_kind kind, std::string data, Handle handle, std::vector<detail::unique_fd> extra) {
    result r;
    r.extra_fds = std::move(extra);
    r.what = status::message;
    r.kind = kind;
    r.data = std::move(data);
    r.handle = std::move(handle);
    return r;
  }
  result end_of_input() {
    reset();
    result r;
    r.what = status::end_of_input;
    return r;
  }
  result fail(std::string detail) { return fail(error::protocol_error, std::move(detail)); }
  result fail(std::error_code ec, std::string detail) {
    reset();
    result r;
    r.what = status::failed;
    r.error = ec;
    r.detail = std::move(detail);
    return r;
  }

  std::size_t max_message_size_;
  std::vector<char> scratch_;  // a single-frame message's payload lands here
  partial_message partial_;
};

}  // namespace cocluster::ipc
