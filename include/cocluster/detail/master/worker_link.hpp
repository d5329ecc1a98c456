// (Master process.) What the master's listeners hold of one worker: its id, its pid and the
// channel to it. The Worker owns the link and reads the channel; a listener only sends
// internal messages through it (a query_reply, a newconn). Data flows one way: listener ->
// link -> channel -> sendmsg; nothing here knows the Worker.
//   link->send(ipc::protocol::NewConn{server, seq, remote}, connection_tag(type), fd);
// A newconn's fd must be non-blocking (accept4 with SOCK_NONBLOCK, as accept_connection does):
// the worker tells Asio so without asking the kernel (worker/connection_socket.hpp), and a
// blocking one would stall the worker in its first read.
#pragma once

#include "cocluster/detail/config.hpp"

#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <utility>
#include <vector>

#include "cocluster/detail/unique_fd.hpp"
#include "cocluster/ipc/channel.hpp"
#include "cocluster/ipc/protocol.hpp"

namespace cocluster::detail {

class worker_link {
 public:
  worker_link(int id, pid_t pid, ipc::Channel channel) : id_(id), pid_(pid), channel_(std::move(channel)) {}
  worker_link(const worker_link&) = delete;
  worker_link& operator=(const worker_link&) = delete;

  int id() const noexcept { return id_; }
  pid_t pid() const noexcept { return pid_; }

  // The worker's open connections, and the connections it has taken since it started, as it
  // last reported them (0 until it does). The first call of count_connections() asks it to
  // report (CountConnections); later calls do nothing.
  void count_connections() {
    if (!counting_) counting_ = send(ipc::protocol::CountConnections{});
  }
  std::uint32_t open_connections() const noexcept { return open_connections_; }
  std::uint64_t connections_served() const noexcept { return connections_served_; }
  // The worker's load as a policy should see it: its last report, plus the hand-offs it has
  // acknowledged (on any listener) since that report. The worker writes each `accepted{ok}`
  // at once and its report at the end of that turn of its loop: a loop that then blocks, or
  // another message read first, leaves the master with an ack and no report of the
  // connection. A report read after an ack was written after it and counts that connection
  // (the worker counts it from its delivery, and counts it as taken before its next report),
  // so each report starts the tally again. Of the connections the master handed it, it never
  // counts fewer than the worker holds (an adopted acceptor's are never counted); it may
  // count one twice until the next report, which every ack brings (the total taken changed),
  // and the listener adds its unacknowledged hand-offs, which a report may count already.
  std::uint64_t open_connections_estimate() const noexcept { return open_connections_ + accepted_since_report_; }
  // A listener read the worker's `accepted{ok}` of one of its hand-offs.
  void handoff_accepted() noexcept { ++accepted_since_report_; }
  void reported_connections(const ipc::protocol::OpenConnections& m) {
    open_connections_ = m.count;
    connections_served_ = m.total;
    accepted_since_report_ = 0;
    if (on_reported_) on_reported_();
  }
  // Called after each report, on the master's executor (a Supervisor's max_connections watch).
  void on_reported(std::function<void()> f) { on_reported_ = std::move(f); }
  ipc::Channel& channel() noexcept { return channel_; }
  // False once the Worker has seen its channel end (or closed it).
  bool is_connected() const noexcept { return connected_ && channel_.is_open(); }
  void mark_disconnected() noexcept { connected_ = false; }

  // An internal message, with an fd as a handle of type `tag` (closed once written). False if
  // the channel can no longer send: the worker is going, and its channel's end will say so.
  bool send(const ipc::protocol::InternalMessage& m, handle_tag tag = no_handle, unique_fd fd = {}) {
    return connected_ && channel_.send_internal(ipc::protocol::encode(m), tag, std::move(fd));
  }
  // The same with an fd the caller keeps: the channel holds it open until the frame is written
  // (no dup(2) for a sender that needs its own copy, as a hand-off does until `accepted`).
  bool send(const ipc::protocol::InternalMessage& m, handle_tag tag, std::shared_ptr<const unique_fd> fd) {
    return connected_ && channel_.send_internal(ipc::protocol::encode(m), tag, std::move(fd));
  }
  // The same with several fds in one frame (a batch of hand-offs; at most
  // ipc::max_fds_per_packet).
  bool send(const ipc::protocol::InternalMessage& m, handle_tag tag, std::vector<std::shared_ptr<const unique_fd>> fds) {
    return connected_ && channel_.send_internal(ipc::protocol::encode(m), tag, std::move(fds));
  }

 private:
  int id_;
  pid_t pid_;
  ipc::Channel channel_;
  bool connected_ = true;
  bool counting_ = false;
  std::uint32_t open_connections_ = 0;
  std::uint64_t connections_served_ = 0;
  std::uint64_t accepted_since_report_ = 0;  // acks read since the last report (none asked: never read)
  std::function<void()> on_reported_;
};

}  // namespace cocluster::detail
