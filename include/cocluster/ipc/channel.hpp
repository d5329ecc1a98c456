// One end of an AF_UNIX SOCK_SEQPACKET socketpair, as an Asio I/O object: framed messages of
// any size up to a limit, each with an optional handle, in order, with a bounded send queue.
//   ipc::Channel ch(ex, std::move(fd));
//   co_await ch.async_send({ipc::message_kind::user, {"hello", {}}}, asio::use_awaitable);
//   ipc::Envelope e = co_await ch.async_receive(asio::use_awaitable);
// A peer is not trusted: anything that is not our framing ends the channel with
// error::protocol_error (error_detail() says what), and every fd that came with it is closed.
#pragma once

#include "cocluster/detail/config.hpp"

#include <sys/socket.h>
#include <sys/uio.h>

#include <asio/posix/stream_descriptor.hpp>
#include <asio/use_awaitable.hpp>

#include <algorithm>
#include <cstring>
#include <deque>
#include <list>
#include <memory>
#include <string>
#include <vector>

#include "cocluster/detail/pending_handler.hpp"
#include "cocluster/detail/syscalls.hpp"
#include "cocluster/error.hpp"
#include "cocluster/ipc/frame.hpp"
#include "cocluster/message.hpp"

namespace cocluster::ipc {

struct ChannelOptions {
  // Largest message accepted either way; at most 4 GiB - 1 (the frame's size field).
  std::size_t max_message_size = std::size_t{64} << 20;
  // Messages queued for sending before async_send waits for room (backpressure).
  std::size_t send_queue_capacity = 256;
};

struct Envelope {  // not an aggregate: see Message
  Envelope() = default;
  Envelope(message_kind k, Message m) : kind(k), message(std::move(m)) {}

  message_kind kind = message_kind::user;
  Message message;
  // A received internal message's handle is left as its fd and declared type, not made into
  // an Asio object: the protocol layer does that (detail::adopt_handle, which checks the fd),
  // on the executor it chooses (a handed-over connection's socket is made tracked).
  detail::handle_tag internal_tag = detail::no_handle;
  detail::unique_fd internal_fd;

  bool has_handle() const noexcept { return message.has_handle() || static_cast<bool>(internal_fd); }
};

class Channel {
 public:
  Channel(asio::any_io_executor ex, detail::unique_fd fd, ChannelOptions options = {})
      : s_(std::make_shared<state>(std::move(ex), std::move(fd), options)) {}
  Channel(Channel&&) noexcept = default;
  Channel& operator=(Channel&&) noexcept = default;
  ~Channel() {
    if (s_) s_->close(error::channel_closed);
  }

  const asio::any_io_executor& get_executor() const noexcept { return s_->ex; }
  bool is_open() const noexcept { return s_->sock.is_open(); }
  std::size_t queued() const noexcept { return s_->queue.size(); }
  // Why the channel failed, for logs ("frame carries 10 fds", ...); empty while it has not.
  const std::string& error_detail() const noexcept { return s_->failure_detail; }
  const ChannelOptions& options() const noexcept { return s_->options; }

  // Completes once the message is queued (at once while the queue has room). The first
  // attempt to write happens before this returns. Errors: message_too_large,
  // channel_closed, a system error from sendmsg; the handle is closed on every error.
  template <class Token>
  auto async_send(Envelope envelope, Token&& token) {
    return asio::async_initiate<Token, void(std::error_code)>(
        [s = s_](auto handler, Envelope e) { s->send(std::move(handler), std::move(e)); }, token,
        std::move(envelope));
  }

  // Queues (and starts writing) `e` at once if the send queue has room: true, with `ec` set
  // if the send failed. False when the queue is full; `e` is untouched, use async_send.
  bool try_send(Envelope& e, std::error_code& ec) { return s_->try_send(e, ec); }

  // Queues an internal message whatever the send queue's capacity (the protocol bounds how
  // many there are) and writes it at once if the socket has room. `fd`, if any, travels as a
  // handle of type `tag` and is closed once written. False if the channel cannot send.
  bool post_internal(std::string payload, detail::handle_tag tag = detail::no_handle, detail::unique_fd fd = {}) {
    return s_->post_internal(std::move(payload), tag, std::move(fd));
  }
  // The same with an fd the caller keeps: the channel holds a reference until the frame is
  // written (no dup(2) for a sender that needs its own copy, as round robin does).
  bool post_internal(std::string payload, detail::handle_tag tag, std::shared_ptr<const detail::unique_fd> fd) {
    return s_->post_internal(std::move(payload), tag, {}, std::move(fd));
  }

  // Reads one whole message if it is already there, without waiting: true with `e` filled.
  // False when nothing is ready (ec clear: wait with async_wait_readable) or on an error
  // (eof, protocol_error, ...). Not while an async_receive is pending.
  bool try_receive(Envelope& e, std::error_code& ec) { return s_->try_receive(e, ec); }

  // Completes when the socket is readable (or at once once the peer is known to be gone).
  // With try_receive, a reader that drains everything ready per wake-up.
  template <class Token>
  auto async_wait_readable(Token&& token) {
    return s_->sock.async_wait(asio::posix::descriptor_base::wait_read, std::forward<Token>(token));
  }

  // One receive at a time. Completes with asio::error::eof once the peer has closed,
  // error::protocol_error on a malformed frame, error::channel_closed after close().
  template <class Token>
  auto async_receive(Token&& token) {
    return asio::async_initiate<Token, void(std::error_code, Envelope)>(
        [s = s_](auto handler) { s->receive(std::move(handler)); }, token);
  }

  // Orderly close of our direction: completes when every queued message has been written,
  // then the peer reads EOF after them. Receiving goes on until the peer closes too.
  template <class Token>
  auto async_shutdown(Token&& token) {
    return asio::async_initiate<Token, void(std::error_code)>(
        [s = s_](auto handler) { s->shutdown(std::move(handler)); }, token);
  }

  // Closes at once: queued messages are dropped (their handles closed), pending operations
  // complete with error::channel_closed.
  void close() { s_->close(error::channel_closed); }

  // The peer process is known to be dead: once what it sent has been read, report EOF instead
  // of waiting (a process that inherited the peer's end must not keep the channel open).
  void mark_peer_gone() {
    s_->peer_gone = true;
    std::error_code ignored;
    s_->sock.cancel(ignored);  // pending waits complete, and their owners read again
  }

 private:
  struct outgoing {
    std::string payload;
    std::uint8_t kind_flag = 0;
    detail::handle_tag tag = detail::no_handle;
    detail::unique_fd fd;                                  // ours: closed once written
    std::shared_ptr<const detail::unique_fd> shared_fd;   // the caller's: kept open until written
    std::size_t offset = 0;

    int handle_fd() const noexcept { return fd ? fd.get() : shared_fd ? shared_fd->get() : -1; }
  };

  struct blocked_sender {
    detail::pending_handler<> handler;
    outgoing item;
  };

  struct state : std::enable_shared_from_this<state> {
    state(asio::any_io_executor e, detail::unique_fd fd, ChannelOptions o)
        : ex(std::move(e)), sock(ex), options(o) {
      options.max_message_size = std::min<std::size_t>(options.max_message_size, UINT32_MAX);
      options.send_queue_capacity = std::max<std::size_t>(options.send_queue_capacity, 1);
      sock.assign(fd.get());
      (void)fd.release();
    }

    // ---- sending ----

    template <class Handler>
    void send(Handler&& handler, Envelope e) {
      detail::pending_handler<> h(std::move(handler), ex);
      std::error_code ec;
      if (try_send(e, ec)) return h.complete(ec);
      outgoing item = make_outgoing(e, ec);
      if (ec) return h.complete(ec);
      park_sender(std::move(h), std::move(item));
    }

    bool try_send(Envelope& e, std::error_code& ec) {
      ec.clear();
      if (!sock.is_open() || write_shut) ec = write_error ? write_error : make_error_code(error::channel_closed);
      else if (e.message.data.size() > options.max_message_size) ec = error::message_too_large;
      if (ec) return true;
      if (queue.size() >= options.send_queue_capacity) return false;
      outgoing item = make_outgoing(e, ec);
      if (ec) return true;
      queue.push_back(std::move(item));
      if (!waiting_write) flush();
      ec = write_error;  // the write just attempted failed: say so, do not report success
      return true;
    }

    bool post_internal(std::string payload, detail::handle_tag tag, detail::unique_fd fd,
                       std::shared_ptr<const detail::unique_fd> shared_fd = {}) {
      if (!sock.is_open() || write_shut) return false;
      const bool has_fd = fd || (shared_fd && *shared_fd);
      queue.push_back({std::move(payload), frame_header::internal, has_fd ? tag : detail::no_handle, std::move(fd),
                       std::move(shared_fd)});
      if (!waiting_write) flush();
      return !write_error;
    }

    static outgoing make_outgoing(Envelope& e, std::error_code& ec) {
      auto [tag, fd] = detail::release_handle(e.message.handle, ec);
      if (ec) return {};
      return {std::move(e.message.data), e.kind == message_kind::internal ? frame_header::internal : std::uint8_t{0},
              tag, std::move(fd), {}};
    }

    void park_sender(detail::pending_handler<> h, outgoing item) {
      auto slot = h.cancellation_slot();
      blocked.push_back({std::move(h), std::move(item)});
      if (slot.is_connected()) {
        auto it = std::prev(blocked.end());
        slot.assign([weak = this->weak_from_this(), it](asio::cancellation_type) {
          auto self = weak.lock();
          if (!self) return;
          auto b = std::move(*it);
          self->blocked.erase(it);
          b.handler.complete(asio::error::operation_aborted);
        });
      }
    }

    void admit_blocked() {
      while (!blocked.empty() && queue.size() < options.send_queue_capacity) {
        auto b = std::move(blocked.front());
        blocked.pop_front();
        queue.push_back(std::move(b.item));
        b.handler.complete({});
      }
    }

    // Writes queued frames until the socket would block; then waits for it to drain.
    void flush() {
      while (!queue.empty()) {
        outgoing& o = queue.front();
        const std::size_t size = o.payload.size();
        const std::size_t chunk = std::min(max_fragment, size - o.offset);
        frame_header h;
        h.flags = static_cast<std::uint8_t>(o.kind_flag | (o.offset == 0 ? frame_header::first : 0) |
                                            (o.offset + chunk == size ? frame_header::last : 0));
        h.handle = o.offset == 0 ? o.tag : detail::no_handle;
        h.total_size = static_cast<std::uint32_t>(size);
        iovec iov[2] = {{&h, sizeof h}, {o.payload.data() + o.offset, chunk}};
        msghdr msg{};
        msg.msg_iov = iov;
        msg.msg_iovlen = 2;
        alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))];
        if (h.handle != detail::no_handle) {
          msg.msg_control = control;
          msg.msg_controllen = sizeof control;
          cmsghdr* c = CMSG_FIRSTHDR(&msg);
          c->cmsg_level = SOL_SOCKET;
          c->cmsg_type = SCM_RIGHTS;
          c->cmsg_len = CMSG_LEN(sizeof(int));
          const int fd = o.handle_fd();
          std::memcpy(CMSG_DATA(c), &fd, sizeof fd);
        }
        const ssize_t n = detail::retry_on_eintr(
            [&] { return ::sendmsg(sock.native_handle(), &msg, MSG_DONTWAIT | MSG_NOSIGNAL); });
        if (n < 0) {
          if (errno == EAGAIN || errno == EWOULDBLOCK) return wait_writable();
          return fail_writes(detail::last_error());
        }
        if (o.offset == 0) {  // the kernel holds its own reference now
          o.fd.reset();
          o.shared_fd.reset();
        }
        o.offset += chunk;
        if (o.offset == size) {
          queue.pop_front();
          admit_blocked();
        }
      }
      if (shutdown_waiter) {
        ::shutdown(sock.native_handle(), SHUT_WR);
        std::exchange(shutdown_waiter, {}).complete({});
      }
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
      detail::pending_handler<> h(std::move(handler), ex);
      if (!sock.is_open() || write_shut || shutdown_waiter) return h.complete(error::channel_closed);
      write_shut = true;
      shutdown_waiter = std::move(h);
      if (!waiting_write) flush();
    }

    // ---- receiving ----

    template <class Handler>
    void receive(Handler&& handler) {
      detail::pending_handler<Envelope> h(std::move(handler), ex);
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

    bool try_receive(Envelope& e, std::error_code& ec) {
      ec.clear();
      if (receiver) {
        ec = asio::error::already_started;
        return false;
      }
      if (!sock.is_open() || rx_error) {
        ec = rx_error ? rx_error : make_error_code(error::channel_closed);
        return false;
      }
      for (;;) {
        switch (read_frame(e)) {
          case progress::message: return true;
          case progress::fragment: continue;
          case progress::would_block: return false;
          case progress::failed: ec = rx_error; return false;
        }
      }
    }

    enum class progress { message, fragment, would_block, failed };

    // Reads frames while a receiver waits; a whole message completes it.
    void read() {
      while (receiver) {
        Envelope e;
        switch (read_frame(e)) {
          case progress::message: std::exchange(receiver, {}).complete({}, std::move(e)); return;
          case progress::fragment: continue;
          case progress::would_block: return wait_readable();
          case progress::failed:  // close() may have completed the receiver already
            if (receiver) std::exchange(receiver, {}).complete(rx_error, {});
            return;
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

    progress read_frame(Envelope& e) {
      frame_header h;
      iovec iov[2];
      iov[0] = {&h, sizeof h};
      if (partial.active) {
        const std::size_t room = std::min(max_fragment, partial.payload.size() - partial.filled);
        iov[1] = {partial.payload.data() + partial.filled, room};
      } else {
        if (scratch.empty()) scratch.resize(max_fragment);
        iov[1] = {scratch.data(), scratch.size()};
      }
      alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * max_fds_per_packet)];
      msghdr msg{};
      msg.msg_iov = iov;
      msg.msg_iovlen = 2;
      msg.msg_control = control;
      msg.msg_controllen = sizeof control;
      const ssize_t n = detail::retry_on_eintr(
          [&] { return ::recvmsg(sock.native_handle(), &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC); });
      if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK) return peer_gone ? end_of_input() : progress::would_block;
        if (errno == ECONNRESET) return end_of_input();
        return fail(detail::last_error(), "");
      }
      // Own every received fd first, so each error path below closes them.
      std::vector<detail::unique_fd> fds;
      for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
        const std::size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (std::size_t i = 0; i < count; ++i) {
          int fd;
          std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
          fds.emplace_back(fd);
        }
      }
      if (n == 0) {
        if (partial.active) return fail(error::protocol_error, "channel closed in the middle of a message");
        return end_of_input();
      }
      if (msg.msg_flags & MSG_CTRUNC) {
        if (static_cast<std::size_t>(n) >= sizeof h && fds.empty() && h.handle != detail::no_handle)
          return fail(std::make_error_code(std::errc::too_many_files_open),
                      "a handle sent to this process was lost: no fd left (RLIMIT_NOFILE)");
        return fail(error::protocol_error, "frame carries more than " + std::to_string(max_fds_per_packet) + " fds");
      }
      if (msg.msg_flags & MSG_TRUNC) return fail(error::protocol_error, "frame larger than expected");
      if (static_cast<std::size_t>(n) < sizeof h)
        return fail(error::protocol_error, "short frame of " + std::to_string(n) + " bytes");
      if (h.magic != frame_header::magic_value) return fail(error::protocol_error, "frame with a bad magic byte");
      const std::size_t len = static_cast<std::size_t>(n) - sizeof h;
      const bool first = h.flags & frame_header::first;
      const bool last = h.flags & frame_header::last;
      const auto kind = (h.flags & frame_header::internal) ? message_kind::internal : message_kind::user;
      if (h.handle >= detail::handle_tag_count)
        return fail(error::protocol_error, "frame with unknown handle type " + std::to_string(h.handle));
      const std::size_t expected_fds = h.handle == detail::no_handle ? 0 : 1;
      if (fds.size() != expected_fds)
        return fail(error::protocol_error, "frame carries " + std::to_string(fds.size()) + " fds, declares " +
                                               std::to_string(expected_fds));
      if (h.handle != detail::no_handle && !first) return fail(error::protocol_error, "handle on a continuation frame");

      if (!partial.active) {
        if (!first) return fail(error::protocol_error, "continuation frame without a first frame");
        if (h.total_size > options.max_message_size)
          return fail(error::protocol_error, "message of " + std::to_string(h.total_size) +
                                                 " bytes exceeds the limit of " +
                                                 std::to_string(options.max_message_size));
        if (len > h.total_size || (last && len != h.total_size) || (!last && len == 0))
          return fail(error::protocol_error, "frame size does not match its message size");
        if (last) {
          e.kind = kind;
          e.message.data.assign(scratch.data(), len);
          return adopt(e, h.handle, fds.empty() ? detail::unique_fd() : std::move(fds.front()));
        }
        partial.active = true;
        partial.kind = kind;
        partial.payload.resize(h.total_size);
        std::memcpy(partial.payload.data(), scratch.data(), len);
        partial.filled = len;
        partial.tag = h.handle;
        if (!fds.empty()) partial.fd = std::move(fds.front());
        return progress::fragment;
      }
      if (first || kind != partial.kind || h.total_size != partial.payload.size())
        return fail(error::protocol_error, "frame does not continue the message in progress");
      partial.filled += len;
      const bool complete = partial.filled == partial.payload.size();
      if (last != complete || (!last && len == 0))
        return fail(error::protocol_error, "frame size does not match its message size");
      if (!last) return progress::fragment;
      e.kind = partial.kind;
      e.message.data = std::move(partial.payload);
      auto tag = partial.tag;
      auto fd = std::move(partial.fd);
      partial = {};
      return adopt(e, tag, std::move(fd));
    }

    progress adopt(Envelope& e, detail::handle_tag tag, detail::unique_fd fd) {
      if (e.kind == message_kind::internal) {
        e.internal_tag = fd ? tag : detail::no_handle;
        e.internal_fd = std::move(fd);
        return progress::message;
      }
      std::error_code ec;
      e.message.handle = detail::adopt_handle(ex, tag, std::move(fd), ec);
      if (ec)
        return fail(error::protocol_error,
                    "handle declared as type " + std::to_string(tag) + " is not such a socket (" + ec.message() + ")");
      return progress::message;
    }

    progress end_of_input() {
      rx_error = asio::error::eof;
      return progress::failed;
    }

    progress fail(std::error_code ec, std::string why) {
      close(ec, std::move(why));
      return progress::failed;
    }

    // The peer stopped reading (EPIPE: it exited or closed): drop what is queued and fail the
    // writers, but keep reading, so what the peer sent before it went is not lost.
    void fail_writes(std::error_code ec) {
      write_error = ec;
      write_shut = true;
      queue.clear();
      auto senders = std::move(blocked);
      blocked.clear();
      for (auto& b : senders) b.handler.complete(ec);
      if (shutdown_waiter) std::exchange(shutdown_waiter, {}).complete(ec);
    }

    // ---- closing ----

    void close(std::error_code ec, std::string why = {}) {
      if (!rx_error || rx_error == asio::error::eof) rx_error = ec;
      if (failure_detail.empty()) failure_detail = why.empty() ? ec.message() : std::move(why);
      std::error_code ignored;
      sock.close(ignored);
      queue.clear();
      partial = {};
      auto senders = std::move(blocked);
      blocked.clear();
      for (auto& b : senders) b.handler.complete(error::channel_closed);
      if (shutdown_waiter) std::exchange(shutdown_waiter, {}).complete(error::channel_closed);
      if (receiver) std::exchange(receiver, {}).complete(rx_error, {});
    }

    asio::any_io_executor ex;
    asio::posix::stream_descriptor sock;
    ChannelOptions options;

    std::deque<outgoing> queue;
    std::list<blocked_sender> blocked;
    bool waiting_write = false;
    bool write_shut = false;
    std::error_code write_error;  // why writing stopped (EPIPE, ...), if it did by itself
    detail::pending_handler<> shutdown_waiter;

    detail::pending_handler<Envelope> receiver;
    bool waiting_read = false;
    bool peer_gone = false;
    std::error_code rx_error;  // eof, protocol_error, channel_closed or a system error
    std::string failure_detail;
    std::vector<char> scratch;
    struct {
      bool active = false;
      message_kind kind = message_kind::user;
      std::string payload;
      std::size_t filled = 0;
      detail::handle_tag tag = detail::no_handle;
      detail::unique_fd fd;
    } partial;
  };

  std::shared_ptr<state> s_;
};

}  // namespace cocluster::ipc

namespace cocluster::detail {

inline asio::awaitable<void> send_now_or_wait(ipc::Channel& channel, ipc::Envelope e) {
  std::error_code ec;
  if (!channel.try_send(e, ec)) {
    co_await channel.async_send(std::move(e), asio::use_awaitable);  // the queue is full: wait
    co_return;
  }
  if (ec) throw std::system_error(ec);
}

}  // namespace cocluster::detail
