// The master's listeners, one per key, created on a worker's first query_server for the key
// and closed when the last worker holding it closes its server or goes away (Node: the
// `handles` map of lib/internal/cluster/primary.js). The policy's schedule decides whether a
// new listener is round robin or shared; UDP is always shared.
#pragma once

#include "cocluster/detail/config.hpp"

#include <fmt/core.h>

#include <map>
#include <memory>
#include <set>
#include <string>

#include "cocluster/detail/listen_service.hpp"
#include "cocluster/detail/log.hpp"
#include "cocluster/detail/sockets.hpp"
#include "cocluster/policy/round_robin.hpp"
#include "cocluster/policy/shared_socket.hpp"
#include "cocluster/worker.hpp"

namespace cocluster::detail {

class server_table final : public listen_service {
 public:
  // Listeners one worker may hold: a worker asking for more (a leak, or a broken worker) gets
  // EMFILE from listen() instead of using up the master's fds.
  static constexpr std::size_t max_servers_per_worker = 1024;

  server_table(asio::any_io_executor ex, schedule s) : ex_(std::move(ex)), schedule_(s) {}
  ~server_table() override { close_all(); }

  void query(const std::shared_ptr<Worker>& worker, const ipc::protocol::QueryServer& q) override {
    namespace p = ipc::protocol;
    p::QueryReply reply;
    reply.seq = q.seq;
    if (q.type > static_cast<std::uint8_t>(AddressType::udp6)) {
      reply.errno_value = EINVAL;
      master_access::send_internal(*worker, reply);
      return;
    }
    const auto type = static_cast<AddressType>(q.type);
    const std::string key = fmt::format("{}:{}:{}:{}:{}", q.address, q.port, to_string(type), q.fd, q.index);
    auto& held = held_[worker->id()];
    if (held.size() >= max_servers_per_worker) {
      reply.errno_value = EMFILE;
      master_access::send_internal(*worker, reply);
      return;
    }
    std::shared_ptr<master_handle> handle;
    if (auto it = by_key_.find(key); it != by_key_.end()) {
      handle = it->second;
      if (held.count(handle->id())) {  // the worker's own index rule makes this impossible
        reply.errno_value = EADDRINUSE;
        master_access::send_internal(*worker, reply);
        return;
      }
    } else {
      std::error_code ec;
      handle = create(key, type, q, ec);
      if (!handle) {
        debug("Worker {} cannot listen on {}: {}", worker->pid(), key, ec.message());
        reply.errno_value = ec.value();
        master_access::send_internal(*worker, reply);
        return;
      }
    }
    reply.server = handle->id();
    reply.shared = handle->shared();
    reply.address = handle->address().address;
    reply.port = handle->address().port;
    unique_fd copy;
    if (handle->shared()) {
      std::error_code ec;
      copy = handle->listener_copy(ec);
      if (ec) {
        reply = {q.seq, ec.value(), 0, false, {}, 0};
        master_access::send_internal(*worker, reply);
        if (members_of(*handle) == 0) discard(handle);
        return;
      }
    }
    // The reply goes first: a newconn must not reach the worker before it knows the server.
    if (!master_access::send_internal(*worker, reply, handle->shared() ? listener_tag(type) : no_handle,
                                      std::move(copy))) {
      if (members_of(*handle) == 0) discard(handle);
      return;
    }
    held.emplace(handle->id(), false);
    handle->add(worker);
  }

  bool listening(Worker& worker, std::uint32_t server) override {
    auto w = held_.find(worker.id());
    if (w == held_.end()) return false;
    auto s = w->second.find(server);
    if (s == w->second.end()) return false;
    if (!s->second) {  // once per server per worker
      s->second = true;
      master_access::announce_listening(worker, by_id_.at(server)->address());
    }
    return true;
  }

  void accepted(Worker& worker, const ipc::protocol::Accepted& a) override {
    auto w = held_.find(worker.id());
    if (w == held_.end() || !w->second.count(a.server)) return;  // closed already: re-dispatched
    by_id_.at(a.server)->accepted(worker, a.seq, a.ok);
  }

  void close(Worker& worker, std::uint32_t server) override {
    auto w = held_.find(worker.id());
    if (w == held_.end() || w->second.erase(server) == 0) return;
    leave(worker, by_id_.at(server));
  }

  void worker_gone(Worker& worker) override {
    auto w = held_.find(worker.id());
    if (w == held_.end()) return;
    auto servers = std::move(w->second);
    held_.erase(w);
    for (auto& [id, announced] : servers) leave(worker, by_id_.at(id));
  }

  void close_all() override {
    auto handles = std::move(by_id_);
    by_id_.clear();
    by_key_.clear();
    held_.clear();
    for (auto& [id, h] : handles) h->close();
  }

 private:
  std::shared_ptr<master_handle> create(const std::string& key, AddressType type,
                                        const ipc::protocol::QueryServer& q, std::error_code& ec) {
    listen_request r;
    r.type = type;
    r.address = q.address;
    r.port = q.port;
    r.fd = q.fd;
    if (q.backlog > 0) r.backlog = static_cast<int>(std::min<std::uint32_t>(q.backlog, INT32_MAX));
    std::string bound_path;
    unique_fd fd = open_listener(r, bound_path, ec);
    if (ec) return nullptr;
    Address address = socket_address(fd.get(), type);
    if (type == AddressType::unix_path && q.fd < 0) address.address = q.address;  // as the worker named it
    const std::uint32_t id = ++last_id_;
    std::shared_ptr<master_handle> h;
    if (schedule_.round_robin && !is_datagram(type))
      h = std::make_shared<round_robin_handle>(ex_, id, key, std::move(address), std::move(bound_path), std::move(fd),
                                               schedule_.window);
    else
      h = std::make_shared<shared_handle>(id, key, std::move(address), std::move(bound_path), std::move(fd));
    debug("listener {} for {} ({})", id, key, h->shared() ? "shared" : "round robin");
    by_key_.emplace(key, h);
    by_id_.emplace(id, h);
    return h;
  }

  // The worker no longer holds `h` (its entry in held_ is gone already).
  void leave(Worker& worker, std::shared_ptr<master_handle> h) {  // a copy: discard() erases the map's
    h->remove(worker);
    if (members_of(*h) == 0) discard(std::move(h));
  }

  std::size_t members_of(const master_handle& h) const {
    std::size_t n = 0;
    for (auto& [w, servers] : held_) n += servers.count(h.id());
    return n;
  }

  // No worker holds it any more: the port is free again (Node: handle.close(), then delete).
  void discard(std::shared_ptr<master_handle> h) {  // a copy: it erases the map's
    debug("listener {} for {} closed: no worker holds it", h->id(), h->key());
    by_key_.erase(h->key());
    by_id_.erase(h->id());
    h->close();
  }

  asio::any_io_executor ex_;
  schedule schedule_;
  std::map<std::string, std::shared_ptr<master_handle>> by_key_;
  std::map<std::uint32_t, std::shared_ptr<master_handle>> by_id_;
  std::map<int, std::map<std::uint32_t, bool>> held_;  // worker id -> servers it holds -> announced?
  std::uint32_t last_id_ = 0;
};

}  // namespace cocluster::detail
