// RoundRobin (Node: cluster.SCHED_RR, the default): the master accepts every connection and
// hands it to the next free worker, which acknowledges it.
//   cocluster::Master<cocluster::RoundRobin> master(ex, {}, cocluster::RoundRobin{.window = 4});
// The master keeps its copy of a connection until the worker's `accepted`, so a connection
// handed to a worker that dies or closes its server first goes to another worker.
#pragma once

#include "cocluster/detail/config.hpp"

#include <asio/posix/stream_descriptor.hpp>
#include <asio/steady_timer.hpp>

#include <algorithm>
#include <chrono>
#include <deque>
#include <map>
#include <memory>

#include "cocluster/detail/listen_service.hpp"
#include "cocluster/detail/master_handle.hpp"
#include "cocluster/detail/sockets.hpp"
#include "cocluster/worker.hpp"

namespace cocluster {

struct RoundRobin {
  // Connections a worker may have been handed and not yet accepted (Node: 1). A larger window
  // keeps a worker busy while its acknowledgements travel, at the price of connections waiting
  // on a worker that is busy when another one is idle.
  std::size_t window = 1;

  detail::schedule scheduling() const { return {true, std::max<std::size_t>(window, 1)}; }
};

namespace detail {

// Node: RoundRobinHandle.
class round_robin_handle final : public master_handle,
                                 public std::enable_shared_from_this<round_robin_handle> {
 public:
  static constexpr std::chrono::milliseconds accept_retry_delay{100};

  round_robin_handle(asio::any_io_executor ex, std::uint32_t id, std::string key, Address address,
                     std::string unix_path, unique_fd listener, std::size_t window)
      : master_handle(id, std::move(key), std::move(address), std::move(unix_path)),
        listener_(ex),
        retry_(ex),
        window_(window),
        tag_(this->address().type == AddressType::unix_path ? handle_tag{4} : handle_tag{1}) {
    listener_.assign(listener.get());
    (void)listener.release();
  }

  bool shared() const noexcept override { return false; }
  unique_fd listener_copy(std::error_code& ec) override {
    ec = std::make_error_code(std::errc::operation_not_supported);
    return {};
  }

  void add(const std::shared_ptr<Worker>& worker) override {
    members_.insert_or_assign(worker->id(), member{worker, 0});
    free_.push_back(worker->id());
    distribute();
  }

  void remove(Worker& worker) override {
    if (members_.erase(worker.id()) == 0) return;
    free_.erase(std::remove(free_.begin(), free_.end(), worker.id()), free_.end());
    // Everything handed to it and not acknowledged goes back to the front, in order.
    std::deque<connection> back;
    for (auto it = unacked_.begin(); it != unacked_.end();) {
      if (it->second.worker != worker.id()) {
        ++it;
        continue;
      }
      back.push_back(std::move(it->second.conn));
      it = unacked_.erase(it);
    }
    if (!back.empty())
      debug("Worker {}: {} connection(s) handed to it go to other workers", worker.pid(), back.size());
    backlog_.insert(backlog_.begin(), std::make_move_iterator(back.begin()), std::make_move_iterator(back.end()));
    if (!members_.empty()) distribute();  // else the table closes us, and what waits with us
  }

  void accepted(Worker& worker, std::uint32_t seq, bool ok) override {
    auto it = unacked_.find(seq);
    if (it == unacked_.end() || it->second.worker != worker.id()) return;  // Node ignores stray acks too
    connection conn = std::move(it->second.conn);
    unacked_.erase(it);
    if (auto m = members_.find(worker.id()); m != members_.end() && m->second.in_flight-- == window_)
      free_.push_back(worker.id());
    if (!ok) backlog_.push_front(std::move(conn));  // refused: another worker gets it
    distribute();  // ok: our copy of the fd closes here
  }

  void close() override {
    std::error_code ignored;
    listener_.close(ignored);
    retry_.cancel();
    backlog_.clear();
    unacked_.clear();
    members_.clear();
    free_.clear();
    master_handle::close();
  }

  std::size_t held_connections() const noexcept { return backlog_.size() + unacked_.size(); }

 private:
  struct connection {
    std::shared_ptr<const unique_fd> fd;  // shared with a channel while a newconn carrying it is queued
    std::string remote;                   // sockaddr from accept4
  };
  struct member {
    std::shared_ptr<Worker> worker;
    std::size_t in_flight = 0;
  };
  struct handed {
    int worker;
    connection conn;
  };

  // Waiting connections first, to free workers in turn; then accept more while a worker is free.
  void distribute() {
    while (!backlog_.empty() && !free_.empty()) {
      connection c = std::move(backlog_.front());
      backlog_.pop_front();
      hand_off(std::move(c));
    }
    if (backlog_.empty() && !free_.empty()) accept_now();
  }

  void hand_off(connection c) {
    const int id = free_.front();
    free_.pop_front();
    member& m = members_.at(id);
    const std::uint32_t seq = ++last_seq_;
    // The channel shares our fd until the frame is written; we keep it until `accepted`.
    if (!master_access::send_internal(*m.worker, ipc::protocol::NewConn{this->id(), seq, c.remote}, tag_, c.fd)) {
      backlog_.push_front(std::move(c));  // its channel is ending: worker_gone() removes it
      return;
    }
    unacked_.emplace(seq, handed{id, std::move(c)});
    if (++m.in_flight < window_) free_.push_back(id);
  }

  // Accepts while a worker is free; waits for readiness only when nothing is pending.
  void accept_now() {
    if (waiting_ || paused_ || !listener_.is_open()) return;
    while (!free_.empty() && backlog_.empty()) {
      std::string remote;
      std::error_code ec;
      unique_fd fd = accept_connection(listener_.native_handle(), remote, ec);
      if (fd) {
        hand_off({std::make_shared<const unique_fd>(std::move(fd)), std::move(remote)});
        continue;
      }
      if (!ec) return wait_readable();
      if (is_connection_error(ec)) continue;
      log_error("accept on {}:{}: {}; retrying in {} ms", address().address, address().port, ec.message(),
                accept_retry_delay.count());
      return pause_accepting();
    }
  }

  void wait_readable() {
    waiting_ = true;
    listener_.async_wait(asio::posix::descriptor_base::wait_read,
                         [self = shared_from_this()](std::error_code ec) {
                           self->waiting_ = false;
                           if (!ec) self->accept_now();
                         });
  }

  void pause_accepting() {
    if (paused_) return;
    paused_ = true;
    retry_.expires_after(accept_retry_delay);
    retry_.async_wait([self = shared_from_this()](std::error_code ec) {
      self->paused_ = false;
      if (!ec) self->distribute();
    });
  }

  asio::posix::stream_descriptor listener_;
  asio::steady_timer retry_;
  std::size_t window_;
  handle_tag tag_;                        // what a connection travels as (TCP or Unix socket)
  std::map<int, member> members_;         // workers holding this listener, by id
  std::deque<int> free_;                  // workers with room in their window, in turn order
  std::deque<connection> backlog_;        // accepted, waiting for a free worker
  std::map<std::uint32_t, handed> unacked_;  // handed off, not yet acknowledged, by seq
  std::uint32_t last_seq_ = 0;
  bool waiting_ = false;
  bool paused_ = false;
};

}  // namespace detail
}  // namespace cocluster
