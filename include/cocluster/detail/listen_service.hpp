// The master's side of listening through the master, as the Worker's read loop sees it: the
// internal messages about servers go here (implemented by detail::server_table, which the
// policies plug into). Declared apart so worker.hpp does not depend on the policies.
#pragma once

#include "cocluster/detail/config.hpp"

#include <cstddef>
#include <cstdint>
#include <memory>

#include "cocluster/ipc/protocol.hpp"

namespace cocluster {
class Worker;
}

namespace cocluster::detail {

// How listeners are shared: the policy's answer, frozen when the Master is made (Node freezes
// cluster.schedulingPolicy at the first setup or fork).
struct schedule {
  bool round_robin = true;  // false: every worker gets a copy of the listener (Node: SCHED_NONE)
  std::size_t window = 1;   // round robin: unacknowledged hand-offs per worker (Node: 1)
};

class listen_service {
 public:
  virtual ~listen_service() = default;
  virtual void query(const std::shared_ptr<Worker>& worker, const ipc::protocol::QueryServer& q) = 0;
  // False if `server` is not one the worker holds (a protocol error).
  virtual bool listening(Worker& worker, std::uint32_t server) = 0;
  virtual void accepted(Worker& worker, const ipc::protocol::Accepted& a) = 0;
  virtual void close(Worker& worker, std::uint32_t server) = 0;
  // The worker's channel has ended: it leaves every listener; its hand-offs go elsewhere.
  virtual void worker_gone(Worker& worker) = 0;
  // The master is going away: every listener and every connection it holds is closed.
  virtual void close_all() = 0;
};

}  // namespace cocluster::detail
