// SharedSocket (Node: cluster.SCHED_NONE): the master creates each listener once and sends
// every worker a copy; workers accept directly and the kernel picks which one wakes.
//   cocluster::Master<cocluster::SharedSocket> master(ex);
// UDP sockets are shared this way under every policy.
#pragma once

#include "cocluster/detail/config.hpp"

#include <memory>

#include "cocluster/detail/listen_service.hpp"
#include "cocluster/detail/master_handle.hpp"
#include "cocluster/detail/sockets.hpp"
#include "cocluster/worker.hpp"

namespace cocluster {

struct SharedSocket {
  detail::schedule scheduling() const { return {false, 0}; }
};

namespace detail {

// Node: SharedHandle.
class shared_handle final : public master_handle {
 public:
  shared_handle(std::uint32_t id, std::string key, Address address, std::string unix_path, unique_fd listener)
      : master_handle(id, std::move(key), std::move(address), std::move(unix_path)), listener_(std::move(listener)) {}

  bool shared() const noexcept override { return true; }
  unique_fd listener_copy(std::error_code& ec) override { return dup_cloexec(listener_.get(), ec); }
  // The copies are the workers' own: nothing to track per worker, nothing handed off.
  void add(const std::shared_ptr<Worker>&) override {}
  void remove(Worker&) override {}
  void accepted(Worker&, std::uint32_t, bool) override {}
  void close() override {
    listener_.reset();
    master_handle::close();
  }

 private:
  unique_fd listener_;
};

}  // namespace detail
}  // namespace cocluster
