// One end of an AF_UNIX SOCK_SEQPACKET socketpair, as an Asio I/O object: framed messages of
// any size up to a limit, each with an optional handle, in order, with a bounded send queue.
//   ipc::Channel ch(ex, std::move(fd));
//   co_await ch.async_send({ipc::message_kind::user, {"hello", {}}}, asio::use_awaitable);
//   ipc::Envelope e = co_await ch.async_receive(asio::use_awaitable);
// A peer is not trusted: anything that is not our framing ends the channel with
// error::protocol_error (error_detail() says what), and every fd that came with it is closed;
// after read_past_bad_frames(), the frame is dropped instead and reading goes on.
// The rules live in ipc::frame_parser (receiving) and ipc::send_queue (sending); the state that
// ties them to the socket (detail/ipc/channel_state.hpp) makes the recvmsg and sendmsg calls.
#pragma once

#include "cocluster/detail/config.hpp"

#include <asio/posix/stream_descriptor.hpp>
#include <asio/use_awaitable.hpp>

#include <memory>
#include <string>
#include <vector>

#include "cocluster/detail/ipc/channel_state.hpp"
#include "cocluster/error.hpp"
#include "cocluster/ipc/envelope.hpp"
#include "cocluster/message.hpp"

namespace cocluster::ipc {

class Channel {
 public:
  Channel(asio::any_io_executor ex, detail::unique_fd fd, ChannelOptions options = {})
      : s_(std::make_shared<detail::channel_state>(std::move(ex), std::move(fd), options)) {}
  Channel(Channel&&) noexcept = default;
  Channel& operator=(Channel&&) noexcept = default;
  ~Channel() {
    if (s_) s_->close(error::channel_closed);
  }

  const asio::any_io_executor& get_executor() const noexcept { return s_->ex; }
  bool is_open() const noexcept { return s_->sock.is_open(); }
  // Whether a message sent now can still be written: open, and our side not shut (shutdown,
  // shut_writes(), or a write that failed).
  bool can_send() const noexcept { return s_->sock.is_open() && !s_->write_shut; }
  const ChannelOptions& options() const noexcept { return s_->options; }
  std::size_t queued() const noexcept { return s_->queue.size(); }
  // Bytes queued for sending and not yet written.
  std::size_t queued_bytes() const noexcept { return s_->queue.bytes(); }
  // Messages queued since the channel opened, and of those the ones written (or dropped): a
  // message queued when queued_total() was N has left once written_total() reaches N.
  std::uint64_t queued_total() const noexcept { return s_->queue.pushed(); }
  std::uint64_t written_total() const noexcept { return s_->queue.written(); }
  // Why the channel failed, for logs ("frame carries 10 fds", ...); empty while it has not.
  // (After read_past_bad_frames(): why the last bad frame was dropped.)
  const std::string& error_detail() const noexcept { return s_->failure_detail; }

  // From now on a frame that breaks the protocol is dropped, with every fd it carried, and
  // reported as error::protocol_error by the receive that read it; the next receive reads
  // the frames after it (a SOCK_SEQPACKET socket keeps each frame whole: none after a bad
  // one is misread; the continuations of a message whose first frame was bad are each bad
  // too). For a reader that must read on to what the peer sends last: the master reads the
  // acknowledgements of a worker that broke the protocol (docs/DESIGN.md, "Protocol errors").
  void read_past_bad_frames() noexcept { s_->read_past_bad_frames = true; }

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
  // handle of kind `tag` and is closed once written. False if the channel cannot send.
  bool send_internal(std::string payload, detail::handle_tag tag = detail::no_handle, detail::unique_fd fd = {}) {
    return s_->send_internal(std::move(payload), tag, std::move(fd));
  }
  // The same with an fd the caller keeps: the channel holds a reference until the frame is
  // written (no dup(2) for a sender that needs its own copy, as round robin does).
  bool send_internal(std::string payload, detail::handle_tag tag, std::shared_ptr<const detail::unique_fd> fd) {
    return s_->send_internal(std::move(payload), tag, {}, std::move(fd));
  }
  // The same with several fds of one kind in one frame (at most max_fds_per_packet): a batch
  // of hand-offs. The receiver finds the first in Envelope::internal_fd, the rest in
  // Envelope::internal_extra_fds, in order, and in Envelope::internal_fds_lost how many of the
  // last ones the kernel could not give it (its RLIMIT_NOFILE).
  bool send_internal(std::string payload, detail::handle_tag tag, std::vector<std::shared_ptr<const detail::unique_fd>> fds) {
    if (fds.empty() || fds.size() > max_fds_per_packet) return false;
    auto first = std::move(fds.front());
    fds.erase(fds.begin());
    return s_->send_internal(std::move(payload), tag, {}, std::move(first), std::move(fds));
  }

  // Reads one whole message if it is already there, without waiting: true with `e` filled.
  // False when nothing is ready, or after 64 frames of one message in small pieces (ec clear
  // either way: wait with async_wait_readable, which completes at once if more is there), or on an error
  // (eof, protocol_error, ...; a dropped bad frame after read_past_bad_frames()). Not while
  // an async_receive is pending.
  bool try_receive(Envelope& e, std::error_code& ec) { return s_->try_receive(e, ec); }

  // Completes when the socket is readable (or at once once the peer is known to be gone).
  // With try_receive, a reader that drains everything ready per wake-up.
  template <class Token>
  auto async_wait_readable(Token&& token) {
    return s_->sock.async_wait(asio::posix::descriptor_base::wait_read, std::forward<Token>(token));
  }

  // Completes when the socket is writable (or closed): for a reader that waits for the peer to
  // take what is queued for it before reading more from it.
  template <class Token>
  auto async_wait_writable(Token&& token) {
    return s_->sock.async_wait(asio::posix::descriptor_base::wait_write, std::forward<Token>(token));
  }

  // One receive at a time. Completes with asio::error::eof once the peer has closed (also in
  // the middle of a message: a peer that died), error::protocol_error on a malformed frame
  // (the channel's end, or a dropped frame after read_past_bad_frames()),
  // error::channel_closed after close().
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

  // Stops writing at once: queued messages are dropped (their handles closed), sends waiting
  // for room complete with error::channel_closed, and the peer reads EOF now. Receiving goes
  // on until the peer closes (what it sent before it knew is still read).
  void shut_writes() { s_->shut_writes(); }

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
  std::shared_ptr<detail::channel_state> s_;
};

}  // namespace cocluster::ipc
