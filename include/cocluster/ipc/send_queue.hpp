// The sending half of the wire format, without a socket: messages waiting to be written, each
// cut into frames (next_frame), and the bound on how many wait (senders beyond it are parked
// until there is room: backpressure). The Channel does the sendmsg.
//   while (outgoing* o = q.front()) { auto f = next_frame(*o); sendmsg(f...); q.sent(f); }
#pragma once

#include <algorithm>
#include <cstdint>
#include <deque>
#include <list>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "cocluster/detail/pending_handler.hpp"
#include "cocluster/ipc/frame.hpp"
#include "cocluster/message.hpp"

namespace cocluster::ipc {

// One message to write. Its fds go with the first frame and are closed once that is written.
struct outgoing {
  std::string payload;
  std::uint8_t kind_flag = 0;  // frame_header::internal or 0
  handle_kind kind = handle_kind::none;
  detail::unique_fd fd;                                 // ours: closed once written
  std::shared_ptr<const detail::unique_fd> shared_fd;  // the caller's: kept open until written
  // Internal messages only: more of the caller's fds of the same kind, after the first
  // (frame_header::extra_handles); at most max_fds_per_packet - 1.
  std::vector<std::shared_ptr<const detail::unique_fd>> extra_fds;
  std::size_t offset = 0;                               // payload bytes already written

  int handle_fd() const noexcept { return fd ? fd.get() : shared_fd ? shared_fd->get() : -1; }
};

// The next frame of `o`: its header, its piece of the payload, and the fds it carries.
struct frame {
  frame_header header;
  std::span<const char> payload;
  int fds[max_fds_per_packet] = {};
  std::size_t fd_count = 0;
};

inline frame next_frame(const outgoing& o) {
  const std::size_t size = o.payload.size();
  const std::size_t chunk = std::min(max_fragment, size - o.offset);
  frame f;
  f.header.flags = static_cast<std::uint8_t>(o.kind_flag | (o.offset == 0 ? frame_header::first : 0) |
                                             (o.offset + chunk == size ? frame_header::last : 0));
  f.header.handle_kind = o.offset == 0 ? static_cast<std::uint8_t>(o.kind) : std::uint8_t{0};
  f.header.total_size = static_cast<std::uint32_t>(size);
  f.payload = {o.payload.data() + o.offset, chunk};
  if (f.header.handle_kind != 0) {
    f.fds[f.fd_count++] = o.handle_fd();
    for (auto& extra : o.extra_fds) f.fds[f.fd_count++] = extra->get();  // bounded by the sender
    f.header.extra_handles = static_cast<std::uint8_t>(o.extra_fds.size());
  }
  return f;
}

class send_queue {
 public:
  // At most `capacity` messages and `max_bytes` bytes queued (a single larger message is
  // queued when the queue is below the bound) before senders wait.
  explicit send_queue(std::size_t capacity, std::size_t max_bytes = SIZE_MAX)
      : capacity_(std::max<std::size_t>(capacity, 1)), max_bytes_(std::max<std::size_t>(max_bytes, 1)) {}

  std::size_t size() const noexcept { return queue_.size(); }
  // Messages queued since the start, and of those the ones written (or dropped by clear()):
  // a message queued when pushed() was N has been written once written() reaches N.
  std::uint64_t pushed() const noexcept { return pushed_; }
  std::uint64_t written() const noexcept { return written_; }
  // Payload bytes queued and not yet written.
  std::size_t bytes() const noexcept { return bytes_; }
  bool has_room() const noexcept { return queue_.size() < capacity_ && bytes_ < max_bytes_; }
  outgoing* front() noexcept { return queue_.empty() ? nullptr : &queue_.front(); }

  // Internal messages go in whatever the capacity (the protocol bounds how many there are).
  void push(outgoing o) {
    bytes_ += o.payload.size() - o.offset;
    queue_.push_back(std::move(o));
    ++pushed_;
  }

  // A sender beyond the capacity waits here; its cancellation removes it (and closes its fd).
  template <class Self>
  void park(detail::pending_handler<> h, outgoing item, std::weak_ptr<Self> owner) {
    auto slot = h.cancellation_slot();
    blocked_.push_back({std::move(h), std::move(item)});
    if (slot.is_connected()) {
      auto it = std::prev(blocked_.end());
      slot.assign([owner = std::move(owner), this, it](asio::cancellation_type) {
        if (!owner.lock()) return;  // `this` lives as long as the owner
        auto b = std::move(*it);
        blocked_.erase(it);
        b.handler.complete(asio::error::operation_aborted);
      });
    }
  }

  // The kernel took frame `f` of the front message.
  void sent(const frame& f) {
    outgoing& o = queue_.front();
    if (o.offset == 0) {  // the kernel holds its own reference to the fd now
      o.fd.reset();
      o.shared_fd.reset();
      o.extra_fds.clear();
    }
    o.offset += f.payload.size();
    bytes_ -= f.payload.size();
    if (o.offset < o.payload.size()) return;
    queue_.pop_front();
    ++written_;
    while (!blocked_.empty() && has_room()) {  // room for a parked sender
      auto b = std::move(blocked_.front());
      blocked_.pop_front();
      push(std::move(b.item));
      b.handler.complete({});
    }
  }

  // Drops every queued message (closing its fd) and fails every parked sender with `ec`.
  void clear(std::error_code ec) {
    queue_.clear();
    bytes_ = 0;
    written_ = pushed_;
    auto senders = std::move(blocked_);
    blocked_.clear();
    for (auto& b : senders) b.handler.complete(ec);
  }

 private:
  struct blocked_sender {
    detail::pending_handler<> handler;
    outgoing item;
  };

  std::size_t capacity_;
  std::size_t max_bytes_;
  std::size_t bytes_ = 0;
  std::uint64_t pushed_ = 0, written_ = 0;
  std::deque<outgoing> queue_;
  std::list<blocked_sender> blocked_;
};

}  // namespace cocluster::ipc
