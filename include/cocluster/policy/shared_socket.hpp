// SharedSocket (Node: cluster.SCHED_NONE): the master creates each listener once and sends
// every worker a copy; workers accept directly and the kernel picks which one wakes.
//   cocluster::Master<cocluster::SharedSocket> master(ex);
// UDP sockets are shared this way under every policy.
#pragma once

#include "cocluster/detail/config.hpp"

#include <memory>

#include "cocluster/detail/syscalls.hpp"
#include "cocluster/policy/policy.hpp"

namespace cocluster {

namespace detail {

// Node: SharedHandle. The copies are the workers' own: nothing to track per worker, nothing
// handed off.
class shared_listener final : public Listener {
 public:
  explicit shared_listener(ListenerArgs args) : socket_(std::move(args.socket)) {}

  bool shares_socket() const noexcept override { return true; }
  unique_fd socket_copy(const WorkerLink&, std::error_code& ec) override { return dup_cloexec(socket_.get(), ec); }
  void joined(std::shared_ptr<WorkerLink>) override {}
  void left(WorkerLink&) override {}
  void acknowledged(WorkerLink&, std::uint32_t, bool) override {}
  void close() override { socket_.reset(); }

 private:
  unique_fd socket_;
};

}  // namespace detail

struct SharedSocket {
  std::shared_ptr<Listener> make_listener(ListenerArgs args) const {
    return std::make_shared<detail::shared_listener>(std::move(args));
  }
};

}  // namespace cocluster
