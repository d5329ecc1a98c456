// ReusePort (nginx's `listen ... reuseport`; not in Node): one SO_REUSEPORT listening socket
// per worker, all on the same address and port, made and kept by the master; each worker
// accepts on its own, and the kernel spreads connections over the sockets with no work in the
// master per connection.
//   cocluster::Master<cocluster::ReusePort> master(ex);   // COCLUSTER_SCHED_POLICY=reuseport
// listen(0) still gives one port: the first socket is bound to port 0, the others to the port
// it got. A worker that dies or closes its server leaves its socket open in the master (closing
// it would reset the connections queued in its backlog), and the next worker to listen adopts
// it, so those connections are served by the replacement. Until one does, they wait: the
// kernel keeps sending that socket its share of new connections. Unix-path listeners and
// listen({fd}) have no reuseport group: they are shared as SharedSocket does.
#pragma once

#include "cocluster/detail/config.hpp"

#include <cstddef>
#include <memory>
#include <vector>

#include "cocluster/detail/log.hpp"
#include "cocluster/detail/master/sockets.hpp"
#include "cocluster/detail/syscalls.hpp"
#include "cocluster/policy/policy.hpp"
#include "cocluster/policy/shared_socket.hpp"

namespace cocluster {

namespace detail {

// The sockets of one key, one per worker slot: a slot's socket lives as long as the listener,
// whoever holds it.
class reuse_port_listener final : public Listener {
 public:
  explicit reuse_port_listener(ListenerArgs args) : id_(args.id), backlog_(args.backlog) {
    slots_.push_back(slot{std::move(args.socket), 0});
  }

  bool shares_socket() const noexcept override { return true; }

  // The socket of a slot nobody holds (a dead or departed worker's first: its backlog is
  // waiting), else a new one in the group. joined() gives the worker that slot.
  unique_fd socket_copy(const WorkerLink& worker, std::error_code& ec) override {
    std::size_t i = 0;
    while (i < slots_.size() && slots_[i].owner != 0) ++i;
    if (i == slots_.size()) {
      unique_fd twin = reuse_port_twin(slots_.front().socket.get(), backlog_, ec);
      if (ec) return {};
      slots_.push_back(slot{std::move(twin), 0});
    }
    offered_ = offer{worker.id(), i};
    return dup_cloexec(slots_[i].socket.get(), ec);
  }

  void joined(std::shared_ptr<WorkerLink> worker) override {
    if (offered_.worker == worker->id() && offered_.slot < slots_.size()) {
      slots_[offered_.slot].owner = worker->id();
      debug("listener {}: worker {} accepts on socket {} of {}", id_, worker->pid(), offered_.slot + 1, slots_.size());
    }
    offered_ = offer{};
  }

  // Its socket stays open here, with whatever is queued in its backlog, for the next worker.
  void left(WorkerLink& worker) override {
    for (auto& s : slots_)
      if (s.owner == worker.id()) s.owner = 0;
  }

  void acknowledged(WorkerLink&, std::uint32_t, bool) override {}
  void close() override { slots_.clear(); }

 private:
  struct slot {
    unique_fd socket;  // the master's; the worker accepts on a duplicate
    int owner = 0;     // the worker id holding it; 0: nobody
  };
  struct offer {
    int worker = 0;
    std::size_t slot = 0;
  };

  std::uint32_t id_;
  int backlog_;
  std::vector<slot> slots_;
  offer offered_;  // socket_copy's choice, taken by the joined() that follows it
};

}  // namespace detail

struct ReusePort {
  bool reuse_port() const noexcept { return true; }

  std::shared_ptr<Listener> make_listener(ListenerArgs args) const {
    const bool ip = args.address.type == AddressType::v4 || args.address.type == AddressType::v6;
    if (!ip || detail::socket_option(args.socket.get(), SO_REUSEPORT) != 1)  // a Unix path, or listen({fd})
      return SharedSocket{}.make_listener(std::move(args));
    return std::make_shared<detail::reuse_port_listener>(std::move(args));
  }
};

}  // namespace cocluster
