// ReusePort (nginx's `listen ... reuseport`; not in Node): one SO_REUSEPORT listening socket
// per worker, all on the same address and port, made and kept by the master; each worker
// accepts on its own, and the kernel spreads connections over the sockets with no work in the
// master per connection.
//   cocluster::Master<cocluster::ReusePort> master(ex);   // COCLUSTER_SCHED_POLICY=reuseport
// listen(0) still gives one port: the first socket is bound to port 0, the others to the port
// it got. A worker that dies or closes its server leaves its socket open in the master (closing
// it would reset the connections queued in its backlog, and the kernel keeps hashing new ones
// to it): while other workers hold the listener, the master accepts from that socket and hands
// its connections to them as RoundRobin does (the idle first), until a worker adopts it (the next one
// to listen does), and then leaves it to that worker. So neither what waited in a dead worker's
// backlog nor what arrives for its socket later is lost while any worker holds the listener;
// when the last one leaves, the listener closes with what it holds, as under every policy,
// unless the Master keeps it (Master::keep_listeners): then every socket stays, and the first
// worker back adopts one and is handed what waits in the others.
// Unix-path listeners, listen({fd}) and systemd's sockets (socket activation, even with
// ReusePort=yes) have no reuseport group of ours: they are shared as SharedSocket does.
#pragma once

#include "cocluster/detail/config.hpp"

#include <asio/steady_timer.hpp>

#include <chrono>
#include <cstddef>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <system_error>
#include <vector>

#include "cocluster/detail/log.hpp"
#include "cocluster/detail/master/sockets.hpp"
#include "cocluster/detail/rate_limited_log.hpp"
#include "cocluster/detail/syscalls.hpp"
#include "cocluster/policy/policy.hpp"
#include "cocluster/policy/round_robin.hpp"
#include "cocluster/policy/shared_socket.hpp"

namespace cocluster {

namespace detail {

class reuse_port_listener;

// The master accepting from a socket nobody holds and handing its connections to the workers
// that hold the listener's other sockets as RoundRobin does (at a window of 8: the idle first). Its
// hand-offs are numbered with the other drains' of the listener: they share its server id.
class reuse_port_drain final : public round_robin_listener {
 public:
  static constexpr std::size_t window = 8;
  reuse_port_drain(ListenerArgs args, reuse_port_listener& owner)
      : round_robin_listener(std::move(args), window), owner_(&owner) {}

  using HandoffListener::accept_from;
  using HandoffListener::accepting;
  using HandoffListener::stop_accepting;
  using HandoffListener::unacknowledged;
  void forget_owner() noexcept { owner_ = nullptr; }

 private:
  std::uint32_t next_seq() override;
  reuse_port_listener* owner_;  // null once the owner has closed
};

// The sockets of one key, one per worker slot: a slot's socket lives as long as the listener,
// whoever holds it.
class reuse_port_listener final : public Listener, public std::enable_shared_from_this<reuse_port_listener> {
 public:
  explicit reuse_port_listener(ListenerArgs args)
      : executor_(args.executor),
        id_(args.id),
        key_(args.key),
        address_(args.address),
        backlog_(args.backlog),
        retry_(executor_),
        drain_log_(executor_) {
    slots_.push_back(slot{std::move(args.socket), 0, nullptr});
  }
  ~reuse_port_listener() override { close(); }

  bool shares_socket() const noexcept override { return true; }

  // The socket of a slot nobody holds (a dead or departed worker's first: its backlog is
  // waiting), else a new one in the group. joined() gives the worker that slot; if the answer
  // cannot be sent, left() follows instead, and the slot is drained like any other nobody holds.
  unique_fd socket_copy(const WorkerLink& worker, std::error_code& ec) override {
    std::size_t i = 0;
    while (i < slots_.size() && slots_[i].owner != 0) ++i;
    if (i == slots_.size()) {
      unique_fd twin = reuse_port_twin(slots_.front().socket.get(), backlog_, ec);
      if (ec) return {};
      slots_.push_back(slot{std::move(twin), 0, nullptr});  // in the group: the kernel hashes to it
    }
    offered_ = offer{worker.id(), i};
    unique_fd copy = dup_cloexec(slots_[i].socket.get(), ec);
    if (ec) {
      offered_ = offer{};
      if (!holders_.empty()) drain(i);  // (else the table closes the listener)
    }
    return copy;
  }

  void joined(std::shared_ptr<WorkerLink> worker) override {
    if (offered_.worker == worker->id() && offered_.slot < slots_.size()) {
      slot& s = slots_[offered_.slot];
      s.owner = worker->id();
      if (s.drain) s.drain->stop_accepting();  // its own worker accepts on it again
      debug("listener {}: worker {} accepts on socket {} of {}", id_, worker->pid(), offered_.slot + 1, slots_.size());
    }
    offered_ = offer{};
    for (auto& s : slots_)
      if (s.drain) s.drain->joined(worker);  // one more to hand drained connections to
    holders_.insert_or_assign(worker->id(), std::move(worker));
    // A socket left while nobody held the listener (it was kept) has no drain yet: it drains
    // to the workers from now on, until one adopts it. (Else every such slot drains already.)
    for (std::size_t i = 0; i < slots_.size(); ++i)
      if (slots_[i].owner == 0) drain(i);
  }

  // Its socket stays open here, with whatever is queued in its backlog; while other workers
  // hold the listener, the master drains it to them until a worker adopts it.
  void left(WorkerLink& worker) override {
    if (offered_.worker == worker.id()) {  // its answer was not sent: it never held the slot
      const std::size_t i = offered_.slot;
      offered_ = offer{};
      if (i < slots_.size() && slots_[i].owner == 0 && !holders_.empty()) drain(i);
      return;
    }
    holders_.erase(worker.id());
    for (auto& s : slots_)
      if (s.drain) s.drain->left(worker);  // what it was handed and had not accepted: to the others
    for (std::size_t i = 0; i < slots_.size(); ++i) {
      if (slots_[i].owner != worker.id()) continue;
      slots_[i].owner = 0;
      if (!holders_.empty()) drain(i);  // else the master closes the listener, or keeps it for the next
    }
  }

  // Killed: no drain hands it anything more (nor does one made from now on). Its own socket
  // is drained once it has left: until then it may still accept on it.
  void leaving(WorkerLink& worker) override {
    holders_.erase(worker.id());
    for (auto& s : slots_)
      if (s.drain) s.drain->leaving(worker);
  }

  // Only drained connections are acknowledged: the drain that handed it counts it.
  void acknowledged(WorkerLink& worker, std::uint32_t seq, bool ok) override {
    for (auto& s : slots_)
      if (s.drain && s.drain->unacknowledged(seq)) return s.drain->acknowledged(worker, seq, ok);
  }
  void acknowledged_batch(WorkerLink& worker, std::span<const std::uint32_t> accepted,
                          std::span<const std::uint32_t> refused) override {
    for (auto& s : slots_)
      if (s.drain) s.drain->acknowledged_batch(worker, accepted, refused);  // each counts its own
  }

  void close() override {
    retry_.cancel();
    drain_log_.flush();
    for (auto& s : slots_)
      if (s.drain) {
        s.drain->forget_owner();
        s.drain->close();
      }
    slots_.clear();
    holders_.clear();
  }

  // The next hand-off number no drain of this listener has outstanding (never 0).
  std::uint32_t next_seq() {
    for (;;) {
      if (++last_seq_ == 0) continue;
      bool taken = false;
      for (auto& s : slots_) taken = taken || (s.drain && s.drain->unacknowledged(last_seq_));
      if (!taken) return last_seq_;
    }
  }

 private:
  struct slot {
    unique_fd socket;  // the master's; the worker accepts on a duplicate
    int owner = 0;     // the worker id holding it; 0: nobody
    std::shared_ptr<reuse_port_drain> drain;  // made the first time nobody holds it
  };
  struct offer {
    int worker = 0;
    std::size_t slot = 0;
  };

  // Nobody holds slot i, others hold the listener: the master accepts from its socket (a copy,
  // closed again when a worker adopts it, so the master's loop wakes for it only meanwhile).
  void drain(std::size_t i) {
    slot& s = slots_[i];
    if (s.drain && s.drain->accepting()) return;
    std::error_code ec;
    try {
      unique_fd copy = dup_cloexec(s.socket.get(), ec);
      if (!ec && s.drain) {
        s.drain->accept_from(std::move(copy));
      } else if (!ec) {
        s.drain = std::make_shared<reuse_port_drain>(
            ListenerArgs{executor_, id_, key_, address_, std::move(copy), backlog_}, *this);
        for (auto& [id, link] : holders_) s.drain->joined(link);  // the first starts accepting
      }
    } catch (const std::system_error& e) {  // the reactor could not take the copy
      ec = e.code();
    }
    if (ec) {  // no fd left for the copy (EMFILE), or the reactor's: tried again, not left for a worker to adopt
      drain_log_.error("listener {}: cannot accept from a socket no worker holds: {}; trying again every {} ms", key_,
                       ec.message(), drain_retry_delay.count());
      retry_drains();
      return;
    }
    debug("listener {}: socket {} of {} has no worker; the master hands its connections to the others", id_, i + 1,
          slots_.size());
  }

  // A socket nobody holds whose drain could not start (most often no fd left for the master's
  // copy) is tried again after this while others hold the listener, as the master's accepting
  // tries again after EMFILE: else what waits in it, and what the kernel keeps hashing to it,
  // would wait until a worker listens again, which without a replacement is never.
  static constexpr std::chrono::milliseconds drain_retry_delay{100};

  void retry_drains() {
    if (retrying_) return;
    retrying_ = true;
    retry_.expires_after(drain_retry_delay);
    retry_.async_wait([self = shared_from_this()](std::error_code ec) {
      self->retrying_ = false;
      if (ec || self->holders_.empty()) return;  // closed, or nobody to hand to (joined() drains then)
      for (std::size_t i = 0; i < self->slots_.size(); ++i)  // (one already draining returns at once)
        if (self->slots_[i].owner == 0 && !(self->offered_.worker != 0 && self->offered_.slot == i)) self->drain(i);
    });
  }

  asio::any_io_executor executor_;
  std::uint32_t id_;
  std::string key_;
  Address address_;
  int backlog_;
  std::vector<slot> slots_;
  std::map<int, std::shared_ptr<WorkerLink>> holders_;  // the workers holding a slot (none leaving), by id
  offer offered_;  // socket_copy's choice, taken by the joined() that follows it
  std::uint32_t last_seq_ = 0;
  asio::steady_timer retry_;  // drains that could not start, tried again (retry_drains)
  bool retrying_ = false;
  detail::rate_limited_log drain_log_;
};

inline std::uint32_t reuse_port_drain::next_seq() {
  return owner_ ? owner_->next_seq() : round_robin_listener::next_seq();
}

}  // namespace detail

struct ReusePort {
  bool reuse_port() const noexcept { return true; }

  std::shared_ptr<Listener> make_listener(ListenerArgs args) const {
    // A Unix path has no reuseport group; a socket the master did not bind has none of ours,
    // even with SO_REUSEPORT (systemd's ReusePort=yes: another owner's group, as a rule).
    const bool ip = args.address.type == AddressType::v4 || args.address.type == AddressType::v6;
    if (!ip || args.adopted) return SharedSocket{}.make_listener(std::move(args));
    return std::make_shared<detail::reuse_port_listener>(std::move(args));
  }
};

}  // namespace cocluster
