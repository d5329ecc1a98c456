// Sticky: the connections of one client address always reach the same live worker (sticky
// sessions, as long polling needs; Node #3142 asks for it). Rendezvous hashing over the live
// worker ids: each connection goes to the worker whose hash with the client's address is the
// highest, so a worker that leaves moves only its own clients, and one that joins takes only
// the clients it now wins. IPv4 and IPv6 alike; the port is not part of it.
//   cocluster::Master<cocluster::Sticky> master(ex);   // COCLUSTER_SCHED_POLICY=sticky
// A replacement worker has a new id: the dead worker's clients are spread over the live ones,
// and the replacement then takes about 1/N of every worker's clients. A stalled worker's
// clients wait for it, up to HandoffListener::max_waiting_per_worker; past that they go to
// their next worker in the ranking, and so do the clients of a worker that rests after it
// refused a connection for want of an fd (HandoffListener::refusal_rest, 100 ms). Peers of a
// Unix socket have no address: all share one worker (said in the log when the listener is
// made). The master accepts and hands off as RoundRobin does.
#pragma once

#include "cocluster/detail/config.hpp"

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string_view>

#include "cocluster/detail/log.hpp"
#include "cocluster/policy/handoff_listener.hpp"
#include "cocluster/policy/policy.hpp"
#include "cocluster/policy/remote.hpp"

namespace cocluster {

namespace detail {

// splitmix64's finalizer: every input bit moves every output bit.
constexpr std::uint64_t mix64(std::uint64_t x) noexcept {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// FNV-1a over the address bytes, then mixed.
inline std::uint64_t hash_address(std::string_view bytes) noexcept {
  std::uint64_t h = 0xcbf29ce484222325ULL;
  for (unsigned char c : bytes) h = (h ^ c) * 0x100000001b3ULL;
  return mix64(h);
}

// The rendezvous weight of worker `id` for a client whose address hashes to `client`.
constexpr std::uint64_t rendezvous_weight(std::uint64_t client, int id) noexcept {
  return mix64(client ^ mix64(static_cast<std::uint64_t>(static_cast<std::uint32_t>(id))));
}

class sticky_listener final : public HandoffListener {
 public:
  sticky_listener(ListenerArgs args, std::size_t window) : HandoffListener(std::move(args)), window_(window) {}

 private:
  // The client's worker (while it is full, its clients wait for it, in order). Once
  // max_waiting_per_worker wait for it (it has stalled), the next worker in the client's
  // ranking that has room takes the connection instead: the others keep being served.
  int choose_for(const Remote& remote) override {
    const std::uint64_t client = hash_address(remote.address_bytes());
    const Member* best = nullptr;
    const Member* open = nullptr;  // the best with room, among the workers not stalled
    std::uint64_t best_weight = 0, open_weight = 0;
    for (auto& [id, m] : members()) {
      const std::uint64_t w = rendezvous_weight(client, id);
      if (!best || w > best_weight) best = &m, best_weight = w;
      if (can_take(m) && waiting_for(id) < max_waiting_per_worker && (!open || w > open_weight)) open = &m, open_weight = w;
    }
    if (!best) return 0;
    if (waiting_for(best->id) < max_waiting_per_worker || !open) return best->id;
    return open->id;
  }
  bool can_take(const Member& m) const override { return m.in_flight < window_; }

  std::size_t window_;
};

}  // namespace detail

struct Sticky {
  // Connections a worker may have been handed and not yet accepted, as RoundRobin's.
  std::size_t window = 8;

  std::shared_ptr<Listener> make_listener(ListenerArgs args) const {
    if (args.address.type == AddressType::unix_path)  // works, but is likely not what was meant: said
      detail::log_error("listener for {}: Sticky on a Unix socket sends every connection to one worker (its peers "
                        "have no address to hash); the others take some only while {} wait for it",
                        args.key, HandoffListener::max_waiting_per_worker);
    return std::make_shared<detail::sticky_listener>(std::move(args), std::max<std::size_t>(window, 1));
  }
};

}  // namespace cocluster
