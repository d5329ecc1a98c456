// A connection's fd as the Asio socket accept() gives the user: one this worker accepted on its
// own listening socket (SharedSocket, ReusePort, an adopted listener), or one the master handed
// over (newconn). Both came from accept4(SOCK_NONBLOCK | SOCK_CLOEXEC).
//
// Asio's assign() (which its own accept uses too) must take any fd for a blocking one that may
// have a dup open elsewhere. For that it spends two system calls per connection: an
// ioctl(FIONBIO) at the socket's first operation, and an epoll_ctl(EPOLL_CTL_DEL) before the
// close (closing one of two dups would leave the socket in the epoll set). We tell Asio what we
// know, in its socket's state, as its own open() does for a socket it made:
// - non-blocking: every one of these (accept4 set O_NONBLOCK; a handed fd shares the master's
//   open file, flags included);
// - no dup open elsewhere: only a connection accepted here. A handed one has a dup in the
//   master, which closes it only when it reads our acknowledgement.
// The state bits are Asio's implementation (the same in 1.22 and 1.38, both of which the build
// checks); with another backend (io_uring, IOCP) the socket is assigned as usual.
//   auto socket = worker::adopt_connection<tcp::socket>(ex, tcp::v4(), std::move(fd), connection_origin::accepted_here, ec);
#pragma once

#include <asio/any_io_executor.hpp>
#include <asio/detail/socket_ops.hpp>

#include <optional>
#include <system_error>

#include "cocluster/detail/unique_fd.hpp"

namespace cocluster::detail::worker {

enum class connection_origin {
  accepted_here,     // accept4 on this worker's own listening socket: the only fd of it
  handed_by_master,  // newconn: the master keeps its copy until our acknowledgement
};

#if !defined(ASIO_HAS_IOCP) && !defined(ASIO_WINDOWS_RUNTIME) && !defined(ASIO_HAS_IO_URING_AS_DEFAULT)
// The state bits of a reactive Asio socket: basic_socket keeps its implementation in a
// protected member, so a pointer to it is formed in a class derived from the socket, as the
// language allows, and applied to the socket itself.
template <class Socket>
struct asio_socket_state : Socket {
  static asio::detail::socket_ops::state_type& of(Socket& socket) noexcept {
    constexpr auto impl = &asio_socket_state::impl_;
    return (socket.*impl).get_implementation().state_;
  }
};
#endif

// `fd` (non-blocking, close-on-exec) as a Socket of `protocol` on `ex`; a system error if the
// reactor cannot register it. `fd` is closed on failure.
template <class Socket, class Protocol>
std::optional<Socket> adopt_connection(const asio::any_io_executor& ex, const Protocol& protocol, unique_fd fd,
                                       connection_origin origin, std::error_code& ec) {
  Socket socket(ex);
  socket.assign(protocol, fd.get(), ec);
  if (ec) return std::nullopt;
  (void)fd.release();
#if !defined(ASIO_HAS_IOCP) && !defined(ASIO_WINDOWS_RUNTIME) && !defined(ASIO_HAS_IO_URING_AS_DEFAULT)
  namespace ops = asio::detail::socket_ops;
  auto& state = asio_socket_state<Socket>::of(socket);
  state = static_cast<ops::state_type>(state | ops::internal_non_blocking);
  if (origin == connection_origin::accepted_here) state = static_cast<ops::state_type>(state & ~ops::possible_dup);
#else
  (void)origin;
#endif
  return socket;
}

}  // namespace cocluster::detail::worker
