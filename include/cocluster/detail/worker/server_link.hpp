// What a worker's servers share with the runtime, owned by the runtime and handed to each
// server it makes: the channel (to tell the master a connection was taken or a server
// closed), the servers by the master's id, Node's listen indexes, and the count of
// connections still alive, which a disconnect waits on.
//   link.accepted(server.id, seq);   link.closed(server);   auto ex = link.connection_executor();
#pragma once

#include <asio/any_io_executor.hpp>
#include <asio/async_result.hpp>
#include <asio/post.hpp>
#include <asio/steady_timer.hpp>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <list>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "cocluster/detail/pending_handler.hpp"
#include "cocluster/detail/worker/tracked_executor.hpp"
#include "cocluster/detail/worker/server_base.hpp"
#include "cocluster/ipc/channel.hpp"
#include "cocluster/ipc/protocol.hpp"

namespace cocluster::detail::worker {

class server_link {
 public:
  // The shortest time between two OpenConnections reports (see count_changed()).
  static constexpr std::chrono::milliseconds report_interval{1};

  explicit server_link(ipc::Channel& channel) : channel_(channel), report_timer_(channel.get_executor()) {}
  server_link(const server_link&) = delete;
  server_link& operator=(const server_link&) = delete;

  const asio::any_io_executor& executor() const noexcept { return channel_.get_executor(); }

  // ---- what servers call ----

  // accept() took hand-off `seq`: the master may close its copy. Written now, with any
  // refusals still waiting, before accept() gives the socket to the user (Node's order: the
  // ack before onconnection): whatever the user does with it next (writes to the client,
  // sends us a message that makes the master kill us, blocks its loop), the master has already
  // let go of its copy, so no second worker is ever handed a connection this one has served.
  // Nothing can be sent once our side of the channel is closing or closed; so no hand-off is
  // taken then (can_acknowledge()): the master, which never learns it was, hands it to another
  // worker once it reads our end.
  // The master counts the connection in our load from this ack until our next report, which
  // took_connection() (called next, for the same connection) always brings once we report:
  // every report written after the ack counts it (live from its delivery, and taken).
  void accepted(std::uint32_t server, std::uint32_t seq) {
    if (acks_.empty()) {  // the usual case: one `accepted`, nothing to gather or post
      channel_.send_internal(ipc::protocol::encode(ipc::protocol::Accepted{server, seq, true}));
      return;
    }
    ack(server, seq, true);
    flush_acks();
  }
  // Whether accepted() reaches the master: the channel's writing is not shut (close_channel(),
  // a write that failed, the disconnect's last step). A hand-off is taken only while it is.
  bool can_acknowledge() const noexcept { return channel_.can_send(); }
  // Hand-off `seq` is refused (its server is gone, or its fd was not usable): the master gives
  // it to another worker. Coalesced: the refusals of one turn of the event loop go out together
  // at its end (one `accepted_batch` per server), or sooner with the next ack or any other
  // message of ours (flush_acks).
  void refused(std::uint32_t server, std::uint32_t seq) { ack(server, seq, false); }

  // Sends the acks waiting for the end of this turn now: called before every other message
  // the worker sends, so the master never reads a `close` (or the channel's end) before the
  // acks of connections this worker took.
  void flush_acks() {
    namespace p = ipc::protocol;
    auto acks = std::move(acks_);
    acks_.clear();
    for (auto& a : acks) {
      if (a.accepted.size() + a.refused.size() == 1) {
        const bool ok = !a.accepted.empty();
        channel_.send_internal(p::encode(p::Accepted{a.server, ok ? a.accepted.front() : a.refused.front(), ok}));
      } else {
        channel_.send_internal(p::encode(std::move(a)));
      }
    }
  }

  // The server is closed (by the user, its destructor, a disconnect or the channel's end).
  void closed(server_base& server) {
    if (server.id == 0) return;  // adopted: the master never knew it
    flush_acks();
    servers_.erase(server.id);
    release_index(server.index_key, server.index);
    channel_.send_internal(ipc::protocol::encode(ipc::protocol::Close{server.id}));
  }

  // The executor a connection's socket is made on: the runtime's, tracked, so that a
  // disconnect can wait until every connection is gone (Node: server.close() waits for them).
  asio::any_io_executor connection_executor() {
    // The token first: if it cannot be made (bad_alloc), nothing was counted; once it is, its
    // end uncounts the connection whatever throws after.
    auto token = std::make_shared<connection_token>(this);
    ++live_connections_;
    count_changed();
    return track(channel_.get_executor(), std::move(token));
  }

  // ---- what the runtime calls ----

  // Node's listen index: the Nth open listen of this worker on the same key.
  std::uint32_t take_index(const std::string& key) {
    auto& set = indexes_[key];
    const std::uint32_t index = set.next++;
    set.open.insert(index);
    return index;
  }
  void release_index(const std::string& key, std::uint32_t index) {
    auto it = indexes_.find(key);
    if (it == indexes_.end()) return;
    it->second.open.erase(index);
    if (it->second.open.empty()) indexes_.erase(it);  // the next listen on the key is index 0 again
  }

  void add(std::shared_ptr<server_base> server) { servers_.emplace(server->id, server); }
  std::shared_ptr<server_base> find(std::uint32_t id) const {
    auto it = servers_.find(id);
    return it == servers_.end() ? nullptr : it->second.lock();
  }

  // Closes every server (each tells the master, while the channel can still say it).
  void close_servers() {
    std::vector<std::shared_ptr<server_base>> open;
    for (auto& [id, weak] : servers_)
      if (auto s = weak.lock()) open.push_back(std::move(s));
    for (auto& s : open) s->close();  // each erases itself
    servers_.clear();
  }

  std::size_t live_connections() const noexcept { return live_connections_; }

  // A server gave the user a connection (a hand-off taken by accept(), or one accepted on a
  // shared socket): counted in the total the master reads (OpenConnections::total).
  void took_connection() {
    ++taken_;
    count_changed();
  }

  // The master asked for our count of open connections (CountConnections): from now on it
  // gets an OpenConnections after each turn of the event loop in which the count or the
  // total taken changed, at most one per report_interval.
  void report_connections() {
    reporting_ = true;
    count_changed();
  }

  // Completes once no connection is alive (at once if none is), or with
  // error::channel_closed once stop() was called.
  template <class Token>
  auto async_wait_no_connections(Token&& token) {
    return asio::async_initiate<Token, void(std::error_code)>(
        [this](auto handler) {
          pending_handler<> h(std::move(handler), channel_.get_executor());
          if (stopped_) return h.complete(error::channel_closed);
          if (live_connections_ == 0) return h.complete({});
          idle_waiters_.push_back(std::move(h));
        },
        token);
  }

  // The channel has ended: nobody waits for connections any more.
  void stop() {
    stopped_ = true;
    report_timer_.cancel();
    release_idle_waiters(error::channel_closed);
  }

 private:
  // Held by every copy of a connection socket's executor (worker::tracked_executor). The
  // last copy may go on any thread (with a strand over a thread pool, Asio drops an operation's
  // executor where the operation completed) or inside Asio's cleanup of an operation: the count
  // is only ever touched on the runtime's executor.
  struct connection_token {
    explicit connection_token(server_link* l) : link(l) {}
    ~connection_token() {
      try {
        asio::post(link->channel_.get_executor(), [l = link] { l->connection_ended(); });
      } catch (...) {  // out of memory: count it here rather than never
        link->connection_ended();
      }
    }
    server_link* link;  // owned by the runtime, which is never destroyed
  };

  struct index_set {  // Node: the indexes map of lib/internal/cluster/child.js
    std::uint32_t next = 0;
    std::set<std::uint32_t> open;
  };

  void connection_ended() {
    count_changed();
    if (--live_connections_ == 0) release_idle_waiters({});
  }

  // Coalesces the reports: one message only if the count or the total moved, sent at the end
  // of the turn in which it moved, or, when the last one went less than report_interval ago,
  // at that interval's end. Under load a worker's loop turns over about once per connection
  // and each connection moves the count twice (taken, closed): without the interval that was
  // 1.5-1.7 reports per connection, a message and a read in the master each. A quiet worker
  // reports a change within one turn, as before; a busy one at most 1,000 times a second.
  // (The master's LeastConnections counts the acks it reads after a report, so a report that
  // waits never makes a worker look lighter than it is.)
  void count_changed() {
    if (!reporting_ || report_posted_ || stopped_) return;
    report_posted_ = true;
    const auto due = last_report_ + report_interval;
    if (std::chrono::steady_clock::now() >= due) {
      asio::post(channel_.get_executor(), [this] { send_report(); });
      return;
    }
    report_timer_.expires_at(due);
    report_timer_.async_wait([this](std::error_code ec) {
      if (!ec) send_report();  // (cancelled: the channel has ended, nothing more is sent)
    });
  }

  void send_report() {
    report_posted_ = false;
    if (stopped_) return;  // posted before stop(): the channel has ended (it would refuse the send)
    const auto now = static_cast<std::uint32_t>(std::min<std::size_t>(live_connections_, UINT32_MAX));
    if (now == reported_ && taken_ == reported_taken_) return;
    reported_ = now;
    reported_taken_ = taken_;
    last_report_ = std::chrono::steady_clock::now();
    channel_.send_internal(ipc::protocol::encode(ipc::protocol::OpenConnections{now, taken_}));
  }

  void ack(std::uint32_t server, std::uint32_t seq, bool ok) {
    auto it = std::find_if(acks_.begin(), acks_.end(), [&](const auto& a) { return a.server == server; });
    if (it == acks_.end()) {
      acks_.push_back({server, {}, {}});
      it = std::prev(acks_.end());
    }
    (ok ? it->accepted : it->refused).push_back(seq);
    if (acks_posted_) return;
    acks_posted_ = true;
    asio::post(channel_.get_executor(), [this] {
      acks_posted_ = false;
      flush_acks();
    });
  }

  void release_idle_waiters(std::error_code ec) {
    auto waiters = std::move(idle_waiters_);
    idle_waiters_.clear();
    for (auto& w : waiters) w.complete(ec);
  }

  ipc::Channel& channel_;
  std::map<std::uint32_t, std::weak_ptr<server_base>> servers_;  // by the master's id
  std::map<std::string, index_set> indexes_;
  std::size_t live_connections_ = 0;
  bool reporting_ = false;      // the master asked for OpenConnections
  bool report_posted_ = false;  // a report is posted, or waits for report_timer_
  asio::steady_timer report_timer_;
  std::chrono::steady_clock::time_point last_report_{};  // when the last report was sent
  std::uint32_t reported_ = UINT32_MAX;  // what the master was told last (none yet: any count differs)
  std::uint64_t taken_ = 0;           // connections given to the user since the worker started
  std::uint64_t reported_taken_ = 0;
  std::list<pending_handler<>> idle_waiters_;
  bool stopped_ = false;
  std::vector<ipc::protocol::AcceptedBatch> acks_;  // this turn's, one entry per server (few)
  bool acks_posted_ = false;
};

}  // namespace cocluster::detail::worker
