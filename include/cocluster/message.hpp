// What travels between master and workers: bytes, plus at most one handle (a socket or a
// listener). A received handle is an fd and its declared kind; it becomes an Asio object only
// when asked for, on the executor the caller chooses:
//   co_await worker.send({"take this", std::move(tcp_socket)});
//   Message m = co_await this_worker.receive();
//   if (m.handle.is<asio::ip::tcp::socket>()) {
//     asio::ip::tcp::socket s = m.handle.adopt<asio::ip::tcp::socket>(ex);  // checked, registered
//   }
// (adopt() throws, or sets its error_code&, when the fd is not such a socket, or was lost on its
// way: this process had no fd free when the message came, m.handle.lost().)
// Sending moves the handle: the sender's copy is closed once it is on its way. Passing a received
// handle on (send it again) or dropping it costs a sendmsg or a close, nothing more.
#pragma once

#include "cocluster/detail/config.hpp"

#include <asio/ip/tcp.hpp>
#include <asio/ip/udp.hpp>
#include <asio/local/stream_protocol.hpp>

#include <cstdint>
#include <string>
#include <system_error>
#include <type_traits>

#include "cocluster/detail/unique_fd.hpp"
#include "cocluster/error.hpp"

namespace cocluster {

// What a handle declares itself to be. The value is the byte the wire carries (ipc/frame.hpp).
enum class handle_kind : std::uint8_t {
  none = 0,
  tcp_socket = 1,     // asio::ip::tcp::socket, connected
  tcp_acceptor = 2,   // asio::ip::tcp::acceptor, listening
  udp_socket = 3,     // asio::ip::udp::socket
  unix_socket = 4,    // asio::local::stream_protocol::socket, connected
  unix_acceptor = 5,  // asio::local::stream_protocol::acceptor, listening
};
inline constexpr std::uint8_t handle_kind_count = 6;  // wire bytes at or above it are invalid

constexpr const char* to_string(handle_kind k) noexcept {
  switch (k) {
    case handle_kind::none: return "no handle";
    case handle_kind::tcp_socket: return "TCP socket";
    case handle_kind::tcp_acceptor: return "TCP acceptor";
    case handle_kind::udp_socket: return "UDP socket";
    case handle_kind::unix_socket: return "Unix stream socket";
    case handle_kind::unix_acceptor: return "Unix stream acceptor";
  }
  return "unknown handle kind";
}

// The handle_kind of an Asio type (any executor), or none for a type a handle cannot be.
template <class T> inline constexpr handle_kind handle_kind_of = handle_kind::none;
template <class E> inline constexpr handle_kind handle_kind_of<asio::basic_stream_socket<asio::ip::tcp, E>> = handle_kind::tcp_socket;
template <class E> inline constexpr handle_kind handle_kind_of<asio::basic_socket_acceptor<asio::ip::tcp, E>> = handle_kind::tcp_acceptor;
template <class E> inline constexpr handle_kind handle_kind_of<asio::basic_datagram_socket<asio::ip::udp, E>> = handle_kind::udp_socket;
template <class E> inline constexpr handle_kind handle_kind_of<asio::basic_stream_socket<asio::local::stream_protocol, E>> = handle_kind::unix_socket;
template <class E> inline constexpr handle_kind handle_kind_of<asio::basic_socket_acceptor<asio::local::stream_protocol, E>> = handle_kind::unix_acceptor;

// An Asio socket or acceptor that can travel as a handle. An lvalue is not one: sending moves.
template <class T>
concept handle_object = handle_kind_of<T> != handle_kind::none;

// Node: the `sendHandle` of child.send(), the `handle` of the 'message' event. Owns one fd and
// its declared kind. Received from a peer, the kind is a claim: adopt() checks it.
class Handle {
 public:
  Handle() noexcept = default;
  // Takes the fd out of `object` (Asio's release(): its pending operations are cancelled). A
  // closed object gives a handle of its kind without an fd, which fails to send (bad_descriptor).
  template <handle_object Socket>
  Handle(Socket&& object) noexcept : kind_(handle_kind_of<Socket>) {
    std::error_code ignored;
    if (object.is_open()) fd_.reset(object.release(ignored));
  }
  // An fd whose kind the caller states (a received one, or one made without Asio).
  Handle(handle_kind kind, detail::unique_fd fd) noexcept : kind_(kind), fd_(std::move(fd)) {}
  // A handle of `kind` whose fd did not arrive (see lost()).
  struct lost_fd_t {
    explicit lost_fd_t() = default;
  };
  Handle(handle_kind kind, lost_fd_t) noexcept : kind_(kind), lost_(kind != handle_kind::none) {}

  Handle(Handle&& other) noexcept
      : kind_(std::exchange(other.kind_, handle_kind::none)), fd_(std::move(other.fd_)),
        lost_(std::exchange(other.lost_, false)) {}
  Handle& operator=(Handle&& other) noexcept {
    kind_ = std::exchange(other.kind_, handle_kind::none);
    fd_ = std::move(other.fd_);
    lost_ = std::exchange(other.lost_, false);
    return *this;
  }

  handle_kind kind() const noexcept { return kind_; }
  explicit operator bool() const noexcept { return kind_ != handle_kind::none; }
  // The sender sent a handle of kind() with this message, but its fd never reached this
  // process: the kernel had no fd free here to install it (RLIMIT_NOFILE), closed it, and
  // delivered the message without it (the channel goes on; the process logs it, at most once
  // a second). adopt() then fails with std::errc::too_many_files_open, and so does sending
  // the handle on. No Node equivalent (Node's channel has no such case).
  bool lost() const noexcept { return lost_; }
  // Whether adopt<Socket>() would be asked for the kind this handle declares.
  template <class Socket> bool is() const noexcept { return kind_ != handle_kind::none && kind_ == handle_kind_of<Socket>; }
  int native_handle() const noexcept { return fd_.get(); }

  // The handle as an open Asio object on `ex` (an executor or an execution context), registered
  // with its reactor from now on. Checks first that the fd really is that kind of socket (family,
  // type, listening state): a peer is not trusted. Errors, after which the handle still owns its
  // fd (dropping it closes it): bad_descriptor (no fd), std::errc::too_many_files_open (the
  // fd was lost on its way: lost()), std::errc::wrong_protocol_type (the
  // handle declares another kind: see kind()), error::protocol_error (the fd is not what the
  // sender declared), or a system error from registering it.
  template <handle_object Socket, class ExecutorOrContext>
  Socket adopt(ExecutorOrContext&& ex, std::error_code& ec);
  // The same, throwing std::system_error whose what() names both kinds.
  template <handle_object Socket, class ExecutorOrContext>
  Socket adopt(ExecutorOrContext&& ex);

  // Gives up the fd (the handle is left empty); the caller closes it.
  detail::unique_fd release() noexcept {
    kind_ = handle_kind::none;
    lost_ = false;
    return std::move(fd_);
  }
  void reset() noexcept { release().reset(); }

 private:
  handle_kind kind_ = handle_kind::none;
  detail::unique_fd fd_;
  bool lost_ = false;
};

// Not an aggregate on purpose: GCC 12 miscompiles aggregate temporaries passed to a
// co_await-ed call (`co_await w->send({"hi"})` freed a pointer into the coroutine frame).
struct Message {
  Message() = default;
  Message(std::string d) : data(std::move(d)) {}
  Message(const char* d) : data(d) {}
  Message(std::string d, Handle h) : data(std::move(d)), handle(std::move(h)) {}

  std::string data;
  Handle handle;

  bool has_handle() const noexcept { return static_cast<bool>(handle); }
};

}  // namespace cocluster

#include "cocluster/detail/ipc/handle_impl.hpp"
