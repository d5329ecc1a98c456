// (Master process.) The master's listeners, one per key, created through the policy on a
// worker's first query_server for the key and closed when the last worker holding it closes
// its server or goes away (Node: the `handles` map of lib/internal/cluster/primary.js), unless
// keep() asks to keep one whose last worker went away for the next to listen on it. The
// Worker's read loop hands it the listening messages of its worker; it answers through the
// worker's link. UDP listeners are shared under every policy.
#pragma once

#include "cocluster/detail/config.hpp"

#include <asio/ip/address.hpp>
#include <asio/steady_timer.hpp>
#include <fmt/core.h>

#include <algorithm>
#include <chrono>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <system_error>
#include <vector>

#include "cocluster/detail/log.hpp"
#include "cocluster/detail/master/sockets.hpp"
#include "cocluster/detail/master/worker_link.hpp"
#include "cocluster/ipc/protocol.hpp"
#include "cocluster/policy/policy.hpp"
#include "cocluster/policy/shared_socket.hpp"

namespace cocluster::detail {

class listener_table {
 public:
  using factory = std::function<std::shared_ptr<Listener>(ListenerArgs)>;

  // keep()'s longest linger: a timer's duration in nanoseconds must not overflow.
  static constexpr std::chrono::milliseconds max_keep = std::chrono::hours(24 * 365 * 10);

  // Listeners one worker may hold: a worker asking for more (a leak, or a broken worker) gets
  // EMFILE from listen() instead of using up the master's fds.
  static constexpr std::size_t max_servers_per_worker = 1024;
  // The longest address a worker may ask for (PATH_MAX).
  static constexpr std::size_t max_address_size = 4096;

  // reuse_port: the policy wants IP stream listeners bound with SO_REUSEPORT (ReusePort).
  listener_table(asio::any_io_executor ex, factory make, bool reuse_port = false)
      : ex_(std::move(ex)), make_(std::move(make)), reuse_port_(reuse_port) {}
  listener_table(const listener_table&) = delete;
  listener_table& operator=(const listener_table&) = delete;
  ~listener_table() { close_all(); }

  // query_server: find or create the listener and answer; on success the worker holds it.
  void query(const std::shared_ptr<worker_link>& worker, const ipc::protocol::QueryServer& q) {
    namespace p = ipc::protocol;
    auto refuse = [&](int errno_value) {
      p::QueryReply reply;
      reply.seq = q.seq;
      reply.errno_value = errno_value;
      worker->send(reply);
    };
    if (q.type > static_cast<std::uint8_t>(AddressType::udp6)) return refuse(EINVAL);
    // No address a socket can have is longer (a Unix path: PATH_MAX; an IP address's text is
    // far shorter), and the master keeps the text in its table, twice: a broken worker's
    // megabytes would stay with every listener it makes.
    if (q.address.size() > max_address_size) {
      log_error("Worker {} asks to listen on an address of {} bytes (at most {}); listen() fails with EINVAL",
                worker->pid(), q.address.size(), max_address_size);
      return refuse(EINVAL);
    }
    const auto type = static_cast<AddressType>(q.type);
    const std::string key = fmt::format("{}:{}:{}:{}:{}", q.address, q.port, to_string(type), q.fd, q.index);
    auto& held = held_[worker->id()];
    if (held.size() >= max_servers_per_worker) {
      if (told_full_.insert(worker->id()).second)  // once per worker
        log_error("Worker {} holds {} listeners, the most one worker may (listener_table::max_servers_per_worker); "
                  "its listen() fails with EMFILE until it closes one",
                  worker->pid(), held.size());
      return refuse(EMFILE);
    }
    entry* e = nullptr;
    if (auto it = by_key_.find(key); it != by_key_.end()) {
      e = &by_id_.at(it->second);
      if (held.count(e->id)) return refuse(EADDRINUSE);  // the worker's own index rule makes this impossible
      // As backlog, defer_accept is the first worker's: the socket is made once. A later worker
      // asking otherwise still listens (as in Node, where a second listen() with another
      // backlog changes nothing), but is told in the log.
      if (const int asked = defer_seconds(q); e->adopted && asked > 0)
        log_defer_not_set(key);
      else if (!e->adopted && asked != e->defer_accept)
        log_error("listener for {}: worker {} asks for defer_accept {} s, but the listener was made with {} s (the "
                  "first worker's); it keeps {} s",
                  key, worker->pid(), asked, e->defer_accept, e->defer_accept);
      // (A kept listener stays kept until this worker holds it: a failure below leaves it so.)
    } else {
      std::error_code ec;
      e = create(key, type, q, ec);
      if (!e) {
        debug("Worker {} cannot listen on {}: {}", worker->pid(), key, ec.message());
        return refuse(ec.value());
      }
    }
    p::QueryReply reply;
    reply.seq = q.seq;
    reply.server = e->id;
    reply.shared = e->listener->shares_socket();
    reply.address = e->address.address;
    reply.port = e->address.port;
    unique_fd copy;
    if (reply.shared) {
      std::error_code ec;
      copy = e->listener->socket_copy(*worker, ec);
      if (ec) {
        refuse(ec.value());
        if (members_of(e->id) == 0 && !e->kept) discard(e->id);
        return;
      }
    }
    // The reply goes first: a newconn must not reach the worker before it knows the server.
    if (!worker->send(reply, reply.shared ? listener_tag(type) : no_handle, std::move(copy))) {
      if (reply.shared) e->listener->left(*worker);  // instead of joined(): what socket_copy() set aside is free
      if (members_of(e->id) == 0 && !e->kept) discard(e->id);
      return;
    }
    held.emplace(e->id, false);
    if (e->kept) {
      debug("listener {} for {}: worker {} listens on it again; it takes what waited", e->id, e->key, worker->pid());
      e->kept.reset();  // cancels its timer
    }
    e->listener->joined(worker);
  }

  // Master::keep_listeners(). `linger` > 0: a listener whose last worker goes away without
  // closing its server (its channel ends) is kept, accepting nothing, with what it holds and
  // its backlog, for up to `linger`, for the next worker to listen on its key; then it is
  // closed. The listeners kept already get `linger` from now. 0 (Node's rule, the default):
  // closed at once, and so is every listener kept so far.
  void keep(std::chrono::milliseconds linger) {
    keep_for_ = std::clamp(linger, std::chrono::milliseconds(0), max_keep);
    std::vector<std::uint32_t> kept;
    for (auto& [id, e] : by_id_)
      if (e.kept) kept.push_back(id);
    for (std::uint32_t id : kept) {
      if (keep_for_.count() > 0)
        arm(by_id_.at(id));
      else
        discard(id);
    }
  }
  std::chrono::milliseconds linger() const noexcept { return keep_for_; }

  // listening: the address to announce the first time (nullopt after that); false if the
  // worker does not hold `server` (a protocol error).
  bool listening(const worker_link& worker, std::uint32_t server, std::optional<Address>& announce) {
    announce.reset();
    auto w = held_.find(worker.id());
    if (w == held_.end()) return false;
    auto s = w->second.find(server);
    if (s == w->second.end()) return false;
    if (!s->second) {  // once per server per worker
      s->second = true;
      announce = by_id_.at(server).address;
    }
    return true;
  }

  void accepted(worker_link& worker, const ipc::protocol::Accepted& a) {
    auto w = held_.find(worker.id());
    if (w == held_.end() || !w->second.count(a.server)) return;  // closed already: re-dispatched
    by_id_.at(a.server).listener->acknowledged(worker, a.seq, a.ok);
  }
  void accepted(worker_link& worker, const ipc::protocol::AcceptedBatch& a) {
    auto w = held_.find(worker.id());
    if (w == held_.end() || !w->second.count(a.server)) return;  // closed already: re-dispatched
    by_id_.at(a.server).listener->acknowledged_batch(worker, a.accepted, a.refused);
  }

  void close(worker_link& worker, std::uint32_t server) {
    auto w = held_.find(worker.id());
    if (w == held_.end() || w->second.erase(server) == 0) return;
    leave(worker, server);
  }

  // The master killed the worker or closed its channel, or it broke the protocol: no listener
  // hands it anything more. It still holds them (its acks are counted) until worker_gone().
  void worker_leaving(worker_link& worker) {
    auto w = held_.find(worker.id());
    if (w == held_.end()) return;
    for (auto& [id, announced] : w->second) by_id_.at(id).listener->leaving(worker);
  }

  // The worker's channel has ended: it leaves every listener; its hand-offs go elsewhere.
  void worker_gone(worker_link& worker) {
    auto w = held_.find(worker.id());
    if (w == held_.end()) return;
    auto servers = std::move(w->second);
    held_.erase(w);
    told_full_.erase(worker.id());
    for (auto& [id, announced] : servers) leave(worker, id, true);
  }

  // The master is going away: every listener and every connection it holds is closed.
  void close_all() {
    auto entries = std::move(by_id_);
    by_id_.clear();
    by_key_.clear();
    held_.clear();
    told_full_.clear();
    for (auto& [id, e] : entries) close_entry(e);
  }

 private:
  struct entry {
    std::uint32_t id = 0;
    std::string key;
    Address address;
    std::string unix_path;  // the path this master bound, if any: removed on close
    std::shared_ptr<Listener> listener;
    // While kept (no worker holds it; see keep()): the timer that closes it; destroying it
    // cancels the wait.
    std::unique_ptr<asio::steady_timer> kept;
    std::uint64_t keeping = 0;  // which keeping the timer is for
    bool adopted = false;       // a socket this master did not bind (listen({fd}), systemd's)
    int defer_accept = 0;       // what the worker that made it asked for (ListenOptions::defer_accept)
  };

  static int defer_seconds(const ipc::protocol::QueryServer& q) {
    return static_cast<int>(std::min<std::uint32_t>(q.defer_accept, INT32_MAX));
  }
  // A worker asked for defer_accept on a socket the master adopted: it keeps its own setting.
  static void log_defer_not_set(const std::string& key) {
    log_error("listener for {}: defer_accept is not set on a socket this master did not bind (systemd's: "
              "DeferAcceptSec= in its .socket unit)", key);
  }

  entry* create(const std::string& key, AddressType type, const ipc::protocol::QueryServer& q, std::error_code& ec) {
    listen_request r;
    r.type = type;
    r.address = q.address;
    r.port = q.port;
    r.fd = q.fd;
    if (q.backlog > 0) r.backlog = static_cast<int>(std::min<std::uint32_t>(q.backlog, INT32_MAX));
    r.unix_mode = q.unix_mode;
    r.defer_accept = defer_seconds(q);
    r.reuse_port = reuse_port_ && (type == AddressType::v4 || type == AddressType::v6);
    std::string bound_path;
    bool adopted = false;
    unique_fd fd = open_listener(r, bound_path, ec, &adopted);
    // The port is held by a listener kept for the next worker, under another key (another
    // spelling of the address, another index): that worker is this one; the kept one goes.
    if (ec == std::errc::address_in_use && discard_kept_in_the_way(r)) {
      ec.clear();
      fd = open_listener(r, bound_path, ec, &adopted);
    }
    if (ec) return nullptr;
    if (adopted && r.defer_accept > 0) log_defer_not_set(key);  // (systemd's: an address it passed)
    Address address = socket_address(fd.get(), type);
    if (type == AddressType::unix_path && q.fd < 0) address.address = q.address;  // as the worker named it
    // (After 2^32 listeners the count wraps: an id still in use, or 0, "no server" to a worker,
    // is skipped.)
    do ++last_id_;
    while (last_id_ == 0 || by_id_.count(last_id_) != 0);
    const std::uint32_t id = last_id_;
    ListenerArgs args{ex_, id, key, address, std::move(fd), r.backlog, adopted};
    std::shared_ptr<Listener> listener;
    // A policy that cannot serve this address (a user's, for a protocol it does not support)
    // throws or makes none: the worker's listen() fails (the master carries on), and the log
    // says why.
    try {
      listener = is_datagram(type) ? SharedSocket{}.make_listener(std::move(args)) : make_(std::move(args));
      if (!listener) log_error("listener for {}: the policy made none; listen() fails with ENOTSUP", key);
    } catch (const std::system_error& e) {  // e.g. registering the socket with the reactor
      ec = e.code();
      debug("listener for {}: {}", key, e.what());
    } catch (const std::exception& e) {
      log_error("listener for {}: the policy threw: {}; listen() fails with ENOTSUP", key, e.what());
    } catch (...) {
      log_error("listener for {}: the policy threw an exception that is no std::exception; listen() fails with ENOTSUP",
                key);
    }
    if (!listener) {
      if (!ec) ec = std::make_error_code(std::errc::operation_not_supported);
      if (!bound_path.empty()) ::unlink(bound_path.c_str());
      return nullptr;
    }
    debug("listener {} for {} ({})", id, key, listener->shares_socket() ? "shared" : "handed off");
    by_key_.emplace(key, id);
    entry e{id, key, std::move(address), std::move(bound_path), std::move(listener), {}, 0, adopted, r.defer_accept};
    return &by_id_.emplace(id, std::move(e)).first->second;
  }

  // The worker no longer holds `server` (its entry in held_ is gone already); `gone`: it went
  // away (its channel ended) rather than closing its server.
  void leave(worker_link& worker, std::uint32_t server, bool gone = false) {
    auto listener = by_id_.at(server).listener;  // a copy: discard() erases the entry
    listener->left(worker);
    if (members_of(server) != 0) return;
    if (gone && keep_for_.count() > 0) return keep_entry(by_id_.at(server));
    discard(server);
  }

  // Its last worker went away: kept for keep_for_, then closed unless a worker holds it again.
  void keep_entry(entry& e) {
    debug("listener {} for {}: its last worker went away; kept {} ms for the next to listen on it", e.id, e.key,
          keep_for_.count());
    arm(e);
  }

  // (Re)starts a kept listener's timer: keep_for_ from now (a timer armed before is cancelled).
  void arm(entry& e) {
    e.kept = std::make_unique<asio::steady_timer>(ex_, keep_for_);
    e.keeping = ++last_keeping_;
    e.kept->async_wait(
        [this, alive = std::weak_ptr<const char>(alive_), id = e.id, keeping = e.keeping,
         linger = keep_for_.count()](std::error_code ec) {
          if (ec || alive.expired()) return;  // cancelled: held again, closed, or the table is gone
          auto it = by_id_.find(id);
          if (it == by_id_.end() || !it->second.kept || it->second.keeping != keeping) return;
          log_error("listener for {}: no worker listened on it within {} ms; closing it with the connections "
                    "waiting in it",
                    it->second.key, linger);
          discard(id);
        });
  }

  std::size_t members_of(std::uint32_t server) const {
    std::size_t n = 0;
    for (auto& [w, servers] : held_) n += servers.count(server);
    return n;
  }

  // The kept listeners that hold what request `r` would bind (a TCP or UDP port under another
  // key: the same address, or either one the wildcard), closed; whether there were any. Not a
  // socket the master did not bind: closing its copy frees nothing.
  bool discard_kept_in_the_way(const listen_request& r) {
    if (r.port == 0 || r.type == AddressType::unix_path) return false;
    std::error_code ec;
    const asio::ip::address wanted = asio::ip::make_address(r.address, ec);
    if (ec) return false;
    std::vector<std::uint32_t> ids;
    for (auto& [id, e] : by_id_) {
      if (!e.kept || e.adopted || e.address.port != r.port || is_datagram(e.address.type) != is_datagram(r.type) ||
          e.address.type == AddressType::unix_path)
        continue;
      const asio::ip::address held = asio::ip::make_address(e.address.address, ec);
      if (!ec && (held == wanted || held.is_unspecified() || wanted.is_unspecified())) ids.push_back(id);
    }
    for (std::uint32_t id : ids) {
      log_error("listener for {}: kept for the next worker, closed: a worker listens on {}:{} under another "
                "address or index",
                by_id_.at(id).key, r.address, r.port);
      discard(id);
    }
    return !ids.empty();
  }

  // No worker holds it any more (nor will: not kept, or no longer): the port is free again
  // (Node: handle.close(), then delete).
  void discard(std::uint32_t server) {
    auto it = by_id_.find(server);
    entry e = std::move(it->second);
    by_id_.erase(it);
    by_key_.erase(e.key);
    debug("listener {} for {} closed: no worker holds it", e.id, e.key);
    close_entry(e);
  }

  // Closes the listener and everything it still holds, and removes a Unix socket's path
  // (Node removes it too, so the next listen on it succeeds).
  static void close_entry(entry& e) {
    e.listener->close();
    if (!e.unix_path.empty()) ::unlink(e.unix_path.c_str());
  }

  asio::any_io_executor ex_;
  factory make_;
  bool reuse_port_ = false;
  std::map<std::string, std::uint32_t> by_key_;
  std::map<std::uint32_t, entry> by_id_;
  std::map<int, std::map<std::uint32_t, bool>> held_;  // worker id -> servers it holds -> announced?
  std::uint32_t last_id_ = 0;
  std::set<int> told_full_;  // workers told they hold max_servers_per_worker (said once each)
  std::chrono::milliseconds keep_for_{0};  // keep(): 0, Node's rule
  std::uint64_t last_keeping_ = 0;
  // Expires with the table: a keeping timer's handler already queued when the table goes
  // (the Master's destructor) must not touch it.
  std::shared_ptr<const char> alive_ = std::make_shared<const char>();
};

}  // namespace cocluster::detail
