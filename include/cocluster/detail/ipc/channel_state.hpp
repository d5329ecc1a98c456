// The state behind an ipc::Channel, shared with the handlers it has pending on its socket. Two
// halves that share only the socket and close(): sending (ipc::send_queue, written with
// sendmsg) and receiving (recvmsg, checked by ipc::frame_parser).
#pragma once

#include <linux/sockios.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include <asio/posix/stream_descriptor.hpp>
#include <asio/steady_timer.hpp>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <memory>
#include <optional>
#include <string>

#include "cocluster/detail/ipc/handle_impl.hpp"
#include "cocluster/detail/log.hpp"
#include "cocluster/detail/pending_handler.hpp"
#include "cocluster/detail/rate_limited_log.hpp"
#include "cocluster/detail/syscalls.hpp"
#include "cocluster/error.hpp"
#include "cocluster/ipc/envelope.hpp"
#include "cocluster/ipc/frame.hpp"
#include "cocluster/ipc/frame_parser.hpp"
#include "cocluster/ipc/send_queue.hpp"

namespace cocluster::detail {

struct channel_state : std::enable_shared_from_this<channel_state> {
  channel_state(asio::any_io_executor e, unique_fd fd, ipc::ChannelOptions o)
      : ex(std::move(e)), sock(ex), options(clamped(o)), queue(options.send_queue_capacity, options.send_queue_bytes),
        parser(options.max_message_size) {
    sock.assign(fd.get());
    (void)fd.release();
  }

  static ipc::ChannelOptions clamped(ipc::ChannelOptions o) {
    o.max_message_size = std::min<std::size_t>(o.max_message_size, UINT32_MAX);
    o.send_queue_capacity = std::max<std::size_t>(o.send_queue_capacity, 1);
    return o;
  }

  // ---- sending: the send queue, written with sendmsg ----

  template <class Handler>
  void send(Handler&& handler, ipc::Envelope e) {
    pending_handler<> h(std::move(handler), ex);
    std::error_code ec;
    if (try_send(e, ec)) return h.complete(ec);
    ipc::outgoing item = make_outgoing(e, ec);
    if (ec) return h.complete(ec);
    queue.park(std::move(h), std::move(item), this->weak_from_this());
  }

  bool try_send(ipc::Envelope& e, std::error_code& ec) {
    ec.clear();
    if (!sock.is_open() || write_shut) ec = write_error ? write_error : make_error_code(error::channel_closed);
    else if (e.message.data.size() > options.max_message_size) ec = error::message_too_large;
    if (ec) return true;
    if (!queue.has_room()) return false;
    ipc::outgoing item = make_outgoing(e, ec);
    if (ec) return true;
    queue.push(std::move(item));
    if (!waiting_write) flush();
    ec = write_error;  // the write just attempted failed: say so, do not report success
    return true;
  }

  bool send_internal(std::string payload, handle_tag tag, unique_fd fd,
                     std::shared_ptr<const unique_fd> shared_fd = {},
                     std::vector<std::shared_ptr<const unique_fd>> extra_fds = {}) {
    if (!sock.is_open() || write_shut) return false;
    const bool has_fd = fd || (shared_fd && *shared_fd);
    queue.push({std::move(payload), ipc::frame_header::internal, has_fd ? handle_kind{tag} : handle_kind::none,
                std::move(fd), std::move(shared_fd), has_fd ? std::move(extra_fds) : decltype(extra_fds){}});
    if (!waiting_write) flush();
    return !write_error;
  }

  // The envelope's handle is sent as it is: an fd and its kind, adopted or not.
  static ipc::outgoing make_outgoing(ipc::Envelope& e, std::error_code& ec) {
    const handle_kind kind = e.message.handle.kind();
    const bool lost = e.message.handle.lost();
    unique_fd fd = e.message.handle.release();
    if (kind != handle_kind::none && !fd) {  // made from a closed socket, or received without its fd
      ec = lost ? std::make_error_code(std::errc::too_many_files_open) : asio::error::bad_descriptor;
      return {};
    }
    return {std::move(e.message.data), e.kind == ipc::message_kind::internal ? ipc::frame_header::internal : std::uint8_t{0},
            kind, std::move(fd), {}, {}};
  }

  // How long a frame the kernel refused for now (ENOBUFS, ENOMEM, ETOOMANYREFS) waits before
  // it is tried again: the first wait, then twice the last, up to the longest.
  static constexpr std::chrono::milliseconds first_write_retry{1};
  static constexpr std::chrono::milliseconds longest_write_retry{100};

  // Writes queued frames until the socket would block; then waits for it to drain. A frame
  // the kernel cannot take *now* stays at the front and is tried again after a pause: ENOBUFS
  // and ENOMEM (memory), ETOOMANYREFS (more fds in flight from this user than its
  // RLIMIT_NOFILE, without CAP_SYS_RESOURCE: they land as the peer reads). The peer gone
  // (EPIPE, ECONNRESET) ends writing, and reading goes on to the end of what it sent. Any other
  // error ends writing too, and tells the peer (shutdown(SHUT_WR): its reads end): a channel
  // that cannot carry frames would leave the peer waiting for them for good (a worker handed
  // connections it never gets, and never told to disconnect); instead a worker exits, and its
  // connections go to the others. Reading goes on to the peer's end, so what it sent first
  // (a worker's acks of connections it took) is not lost.
  void flush() {
    while (ipc::outgoing* o = queue.front()) {
      ipc::frame f = ipc::next_frame(*o);
      iovec iov[2] = {{&f.header, sizeof f.header}, {const_cast<char*>(f.payload.data()), f.payload.size()}};
      msghdr msg{};
      msg.msg_iov = iov;
      msg.msg_iovlen = 2;
      alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * ipc::max_fds_per_packet)];
      if (f.fd_count > 0) {
        msg.msg_control = control;
        msg.msg_controllen = CMSG_SPACE(sizeof(int) * f.fd_count);
        cmsghdr* c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int) * f.fd_count);
        std::memcpy(CMSG_DATA(c), f.fds, sizeof(int) * f.fd_count);
      }
      const ssize_t n = retry_on_eintr(
          [&] { return ::sendmsg(sock.native_handle(), &msg, MSG_DONTWAIT | MSG_NOSIGNAL); });
      if (n < 0) {
        const int err = errno;
        const std::error_code ec(err, std::system_category());
        if (err == EAGAIN || err == EWOULDBLOCK) return wait_writable();
        if (err == ENOBUFS || err == ENOMEM || err == ETOOMANYREFS) return retry_write(ec);
        if (err == EPIPE || err == ECONNRESET) return fail_writes(ec);
        write_log.error("channel: sendmsg: {}; no more is written to it, and the other side is told", ec.message());
        fail_writes(ec);
        ::shutdown(sock.native_handle(), SHUT_WR);
        return;
      }
      write_retry_delay = {};
      queue.sent(f);
    }
    if (shutdown_waiter) {
      // ENOTCONN when the peer is gone already: there is nobody left to tell, which is what
      // the shutdown was for; anything else is reported to the waiter.
      std::error_code ec;
      if (::shutdown(sock.native_handle(), SHUT_WR) != 0 && errno != ENOTCONN) ec = last_error();
      std::exchange(shutdown_waiter, {}).complete(ec);
    }
  }

  // The kernel refused the front frame for now: tried again after write_retry_delay (said
  // once per episode: an episode ends with a frame sent).
  void retry_write(std::error_code ec) {
    if (write_retry_delay == std::chrono::milliseconds::zero())
      write_log.error("channel: sendmsg: {}; the frame waits and is sent again from {} ms on", ec.message(),
                      first_write_retry.count());
    write_retry_delay = std::clamp(write_retry_delay * 2, first_write_retry, longest_write_retry);
    if (!write_retry) write_retry.emplace(ex);
    waiting_write = true;
    write_retry->expires_after(write_retry_delay);
    write_retry->async_wait([self = this->shared_from_this()](std::error_code ec) {
      self->waiting_write = false;
      if (!ec && self->sock.is_open()) self->flush();
    });
  }

  void wait_writable() {
    waiting_write = true;
    sock.async_wait(asio::posix::descriptor_base::wait_write, [self = this->shared_from_this()](std::error_code) {
      self->waiting_write = false;
      if (self->sock.is_open()) self->flush();  // after an error too: sendmsg reports it
    });
  }

  template <class Handler>
  void shutdown(Handler&& handler) {
    pending_handler<> h(std::move(handler), ex);
    if (!sock.is_open() || write_shut || shutdown_waiter) return h.complete(error::channel_closed);
    write_shut = true;
    shutdown_waiter = std::move(h);
    if (!waiting_write) flush();
  }

  // Channel::shut_writes(): we stop writing at once (what is queued is dropped, the writers
  // fail); reading goes on.
  void shut_writes() {
    if (!sock.is_open()) return;
    write_shut = true;
    queue.clear(error::channel_closed);
    if (shutdown_waiter) std::exchange(shutdown_waiter, {}).complete(error::channel_closed);
    ::shutdown(sock.native_handle(), SHUT_WR);  // (ENOTCONN: the peer is gone already)
  }

  // The peer stopped reading (EPIPE: it exited or closed): drop what is queued and fail the
  // writers, but keep reading, so what the peer sent before it went is not lost.
  void fail_writes(std::error_code ec) {
    write_error = ec;
    write_shut = true;
    queue.clear(ec);
    if (shutdown_waiter) std::exchange(shutdown_waiter, {}).complete(ec);
  }

  // ---- receiving: recvmsg, checked by the frame parser ----

  template <class Handler>
  void receive(Handler&& handler) {
    pending_handler<ipc::Envelope> h(std::move(handler), ex);
    if (receiver) return h.complete(asio::error::already_started, {});
    if (!sock.is_open()) return h.complete(rx_error ? rx_error : error::channel_closed, {});
    if (rx_error) return h.complete(rx_error, {});
    auto slot = h.cancellation_slot();
    receiver = std::move(h);
    if (slot.is_connected()) {
      slot.assign([weak = this->weak_from_this()](asio::cancellation_type) {
        if (auto self = weak.lock(); self && self->receiver)
          std::exchange(self->receiver, {}).complete(asio::error::operation_aborted, {});
      });
    }
    if (!waiting_read) read();
  }

  bool try_receive(ipc::Envelope& e, std::error_code& ec) {
    ec.clear();
    if (receiver) {
      ec = asio::error::already_started;
      return false;
    }
    if (!sock.is_open() || rx_error) {
      ec = rx_error ? rx_error : make_error_code(error::channel_closed);
      return false;
    }
    for (int frames = 0;; ++frames) {
      // A message in many small frames yields, as a wait that completes at once: its reader
      // (read_channel) counts messages, not frames.
      if (frames == max_frames_per_read) return false;
      switch (read_frame(e)) {
        case progress::message: return true;
        case progress::fragment: continue;
        case progress::would_block: return false;
        case progress::failed: ec = rx_error; return false;
        case progress::dropped: ec = error::protocol_error; return false;
      }
    }
  }

  // dropped: a bad frame, read past (read_past_bad_frames).
  enum class progress { message, fragment, would_block, failed, dropped };

  // Frames read in one call before the reader lets the loop's other work run. Only a peer's
  // continuations of 1 byte make many: ours are 64 KiB each.
  static constexpr int max_frames_per_read = 64;

  // Reads frames while a receiver waits; a whole message completes it.
  void read() {
    for (int frames = 0; receiver; ++frames) {
      if (frames == max_frames_per_read) return wait_readable();  // (as try_receive does)
      ipc::Envelope e;
      switch (read_frame(e)) {
        case progress::message: std::exchange(receiver, {}).complete({}, std::move(e)); return;
        case progress::fragment: continue;
        case progress::would_block: return wait_readable();
        case progress::failed:  // close() may have completed the receiver already
          if (receiver) std::exchange(receiver, {}).complete(rx_error, {});
          return;
        case progress::dropped: std::exchange(receiver, {}).complete(error::protocol_error, {}); return;
      }
    }
  }

  void wait_readable() {
    waiting_read = true;
    sock.async_wait(asio::posix::descriptor_base::wait_read, [self = this->shared_from_this()](std::error_code) {
      self->waiting_read = false;
      if (self->sock.is_open()) self->read();  // after an error too: recvmsg reports it
    });
  }

  progress read_frame(ipc::Envelope& e) {
    ipc::frame_header h;
    const std::span<char> payload = parser.payload_buffer();
    iovec iov[2] = {{&h, sizeof h}, {payload.data(), payload.size()}};
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * ipc::max_fds_per_packet)];
    msghdr msg{};
    msg.msg_iov = iov;
    msg.msg_iovlen = 2;
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    const ssize_t n = retry_on_eintr(
        [&] { return ::recvmsg(sock.native_handle(), &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC); });
    if (n < 0) {
      if (errno == EAGAIN || errno == EWOULDBLOCK) return peer_gone ? end_of_input() : progress::would_block;
      // The peer's end closed with what we sent it unread (the kernel reports that once,
      // before the packets still queued for us): it is gone, and what it sent before it
      // went is read to the end (the acks of a killed worker).
      if (errno == ECONNRESET) {
        peer_gone = true;
        return progress::fragment;
      }
      return fail(last_error(), "");
    }
    // Own every received fd first, so every path below closes the ones not kept.
    unique_fd fds[ipc::max_fds_per_packet];
    std::size_t count = 0;
    for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
      if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
      const std::size_t in_header = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      for (std::size_t i = 0; i < in_header && count < ipc::max_fds_per_packet; ++i) {
        int fd;
        std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
        fds[count++].reset(fd);
      }
    }
    // recvmsg's 0 is the end only once the peer has shut its side: a SOCK_SEQPACKET socket
    // also carries empty packets, which are no frames (taken for the end, the master would
    // give the connections a live worker may still take to others).
    if (n == 0 && (count != 0 || !peer_shut_down()))
      return fail(error::protocol_error, "an empty packet (not a frame)");
    auto r = parser.on_packet(h, static_cast<std::size_t>(n), {fds, count}, msg.msg_flags);
    switch (r.what) {
      case ipc::frame_parser::status::need_more: return progress::fragment;
      case ipc::frame_parser::status::end_of_input: return end_of_input();
      case ipc::frame_parser::status::failed: return fail(r.error, std::move(r.detail));
      case ipc::frame_parser::status::message: break;
    }
    // One fstat, not the full check: an fd that is no socket at all (a pipe, a file) can never
    // be a handle, so it ends the channel here; whether it is the socket its kind says is
    // checked by whoever adopts it (Handle::adopt, detail::adopt_handle).
    if (r.handle && !r.handle.lost() && !is_socket(r.handle.native_handle()))
      return fail(error::protocol_error, "handle declared as type " + std::to_string(static_cast<int>(r.handle.kind())) +
                                             " is not such a socket (not a socket at all)");
    for (auto& fd : r.extra_fds)
      if (!is_socket(fd.get()))
        return fail(error::protocol_error, "handle declared as type " + std::to_string(static_cast<int>(r.handle.kind())) +
                                               " is not such a socket (not a socket at all)");
    e.kind = r.kind;
    e.message.data = std::move(r.data);
    if (r.kind == ipc::message_kind::internal) {
      e.internal_tag = static_cast<handle_tag>(r.handle.kind());
      e.internal_fd = r.handle.release();
      e.internal_extra_fds = std::move(r.extra_fds);
      e.internal_fds_lost = r.fds_lost;
    } else {
      e.message.handle = std::move(r.handle);
    }
    return progress::message;
  }

  // Whether the peer has shut its writing (or closed its end) and nothing more is queued, for
  // a recvmsg that read 0 bytes: an empty packet may have come just before the peer's end,
  // with frames behind it (SIOCINQ counts the bytes of every queued packet of a
  // SOCK_SEQPACKET socket). Bytes, not packets: empty packets alone before the end read as
  // the end (nothing of the peer's is lost; their fds close with the channel).
  bool peer_shut_down() {
    pollfd p{sock.native_handle(), POLLRDHUP, 0};
    if (retry_on_eintr([&] { return ::poll(&p, 1, 0); }) != 1 || (p.revents & (POLLRDHUP | POLLHUP)) == 0) return false;
    int queued = 0;
    return ::ioctl(sock.native_handle(), SIOCINQ, &queued) == 0 && queued == 0;
  }

  progress end_of_input() {
    parser.reset();
    rx_error = asio::error::eof;
    return progress::failed;
  }

  // A broken rule ends the channel, or only drops the frame (its fds close with it) when the
  // owner reads past bad frames; the parser has forgotten any message in progress either way.
  progress fail(std::error_code ec, std::string why) {
    if (read_past_bad_frames && ec == error::protocol_error) {
      failure_detail = std::move(why);
      detail_of_dropped_frame = true;  // a failure that ends the channel says its own
      return progress::dropped;
    }
    close(ec, std::move(why));
    return progress::failed;
  }

  // ---- closing ----

  void close(std::error_code ec, std::string why = {}) {
    if (!rx_error || rx_error == asio::error::eof) rx_error = ec;
    if (failure_detail.empty() || std::exchange(detail_of_dropped_frame, false))
      failure_detail = why.empty() ? ec.message() : std::move(why);
    std::error_code ignored;
    sock.close(ignored);
    if (write_retry) write_retry->cancel();
    parser.reset();
    queue.clear(error::channel_closed);
    if (shutdown_waiter) std::exchange(shutdown_waiter, {}).complete(error::channel_closed);
    if (receiver) std::exchange(receiver, {}).complete(rx_error, {});
  }

  asio::any_io_executor ex;
  asio::posix::stream_descriptor sock;
  ipc::ChannelOptions options;

  ipc::send_queue queue;
  bool waiting_write = false;  // for the socket to drain, or for write_retry
  std::optional<asio::steady_timer> write_retry;          // made at the first refusal (retry_write)
  std::chrono::milliseconds write_retry_delay{0};        // 0: the last frame was sent
  rate_limited_log write_log{ex};  // retry_write()'s and the write errors' lines: once a second at most
  bool write_shut = false;
  std::error_code write_error;  // why writing stopped (EPIPE, ...), if it did by itself
  pending_handler<> shutdown_waiter;

  ipc::frame_parser parser;
  pending_handler<ipc::Envelope> receiver;
  bool waiting_read = false;
  bool peer_gone = false;
  bool read_past_bad_frames = false;    // Channel::read_past_bad_frames()
  bool detail_of_dropped_frame = false;  // failure_detail is a dropped frame's
  std::error_code rx_error;  // eof, protocol_error, channel_closed or a system error
  std::string failure_detail;
};

}  // namespace cocluster::detail
