// What a policy is: the type that decides how the connections of one listening address reach
// the workers that listen on it (Node: cluster.schedulingPolicy, RoundRobinHandle and
// SharedHandle). Master<P> takes any type P that models cocluster::Policy:
//
//   struct P {
//     std::shared_ptr<Listener> make_listener(ListenerArgs args) const;
//     bool reuse_port() const noexcept;   // optional: true to have IP stream listeners bound
//   };                                     // with SO_REUSEPORT (ReusePort's per-worker sockets)
//
// The master calls make_listener when the first worker listens on a key (Node's key:
// address:port:type:fd:index) and keeps the Listener until no worker holds it, or, with
// Master::keep_listeners (a Supervisor's default), until no worker has held it for the linger:
// a Listener may then see its last worker leave and a new one join without close(). The Listener
// owns the listening socket and what happens on the events below. RoundRobin,
// SharedSocket, ReusePort, LeastConnections, Sticky and Dispatch<F> are written this way (policy/*.hpp);
// HandoffListener (policy/handoff_listener.hpp) does the hand-off bookkeeping for policies
// where the master accepts and chooses a worker per connection, so such a policy only says
// which worker takes the next one. UDP listeners are always shared, whatever the policy.
//   struct LowestId {   // every connection to the worker with the lowest id
//     std::shared_ptr<Listener> make_listener(ListenerArgs a) const;   // a HandoffListener
//   };
//   Master<LowestId> master(ex);
// Everything runs on the master's executor; no callback may block.
#pragma once

#include "cocluster/detail/config.hpp"

#include <asio/any_io_executor.hpp>

#include <concepts>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <system_error>

#include "cocluster/address.hpp"
#include "cocluster/detail/master/worker_link.hpp"
#include "cocluster/detail/unique_fd.hpp"

namespace cocluster {

// The master's end of one worker, as a listener holds it (id, pid, the channel).
using WorkerLink = detail::worker_link;

// What a policy is given to make a listener: it owns `socket` from then on.
struct ListenerArgs {
  asio::any_io_executor executor;  // the master's
  std::uint32_t id = 0;            // the master's id of this listener (the protocol's server id)
  std::string key;                 // Node's address:port:type:fd:index, for logs
  Address address;                 // where it listens (the real port after listen(0))
  detail::unique_fd socket;        // listening (stream) or bound (UDP), non-blocking, close-on-exec
  int backlog = 511;               // the listen() backlog `socket` was given
  bool adopted = false;            // `socket` is not one the master bound: listen({fd}), systemd's
};

// The master-side listener of one key.
class Listener {
 public:
  Listener() = default;
  Listener(const Listener&) = delete;
  Listener& operator=(const Listener&) = delete;
  virtual ~Listener() = default;

  // True if each worker accepts on its own copy of a socket (socket_copy() gives the one for
  // `worker`, sent with its listen() answer, and joined() follows at once, or left() if the
  // answer cannot be sent: the worker's channel is ending); false if the master accepts and
  // hands connections over.
  virtual bool shares_socket() const noexcept = 0;
  virtual detail::unique_fd socket_copy(const WorkerLink& worker, std::error_code& ec) = 0;

  // `worker` holds this listener from now on (its listen() answer is on its way, so a
  // connection sent now arrives after it).
  virtual void joined(std::shared_ptr<WorkerLink> worker) = 0;
  // `worker` no longer holds it: it closed its server, disconnected or died. What it was
  // handed and had not accepted goes to the others (nothing accepted is dropped).
  virtual void left(WorkerLink& worker) = 0;
  // `worker` is going (Worker::kill(), Worker::close_channel(), or it broke the protocol):
  // hand it nothing more, but what it was handed stays its own until it acknowledges it or
  // left() follows, when its channel ends. Until then it may still take (and serve) what waits in its socket, so giving
  // that to another worker now could serve a connection twice. By default nothing: a listener
  // that hands nothing over has nothing to hold back.
  virtual void leaving(WorkerLink& /*worker*/) {}
  // `worker` answered hand-off `seq`: ok, it took the connection (the master closes its
  // copy); not ok, it could not (another worker gets it).
  virtual void acknowledged(WorkerLink& worker, std::uint32_t seq, bool ok) = 0;
  // The acks `worker` sent together (one turn of its event loop): by default each in turn;
  // a listener that hands connections over counts them all, then hands more out once.
  virtual void acknowledged_batch(WorkerLink& worker, std::span<const std::uint32_t> accepted,
                                  std::span<const std::uint32_t> refused) {
    for (std::uint32_t seq : accepted) acknowledged(worker, seq, true);
    for (std::uint32_t seq : refused) acknowledged(worker, seq, false);
  }
  // No worker holds it (the last left; kept, no worker came back in time), or the master is
  // going: close the socket and whatever is held.
  virtual void close() = 0;
};

template <class P>
concept Policy = std::copy_constructible<P> && requires(const P& p, ListenerArgs args) {
  { p.make_listener(std::move(args)) } -> std::convertible_to<std::shared_ptr<Listener>>;
};

namespace detail {

// P::reuse_port() if P has it, else false.
template <class P>
bool policy_reuses_port(const P& p) noexcept {
  if constexpr (requires { { p.reuse_port() } -> std::convertible_to<bool>; })
    return p.reuse_port();
  else
    return false;
}

}  // namespace detail

}  // namespace cocluster
