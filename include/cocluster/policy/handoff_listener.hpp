// The listener of every policy in which the master accepts each connection and hands it to a
// worker it chooses (Node: RoundRobinHandle). It does the bookkeeping; a policy derives from
// it and says which worker takes the next connection:
//   class lowest_id final : public HandoffListener {
//     using HandoffListener::HandoffListener;
//     int choose() override {                       // 0: nobody now; accepting waits
//       for (auto& [id, m] : members()) if (m.in_flight == 0) return id;
//       return 0;
//     }
//   };
// A policy that routes by the client's address also overrides choose_for(const Remote&),
// asked once the connection is accepted (Dispatch and Sticky do).
// The master accepts (accept4; raw fds, never read, never registered with Asio) only while
// choose() names a worker, so connections otherwise wait in the kernel's backlog. A connection
// whose chosen worker cannot take it yet waits in the master, in that worker's own line, at
// most max_waiting_per_worker per worker (and max_waiting in all), so that one stalled worker
// never stops the others. A worker's line is looked at again when that worker acknowledges or
// leaves (and all lines when a worker joins), never when another one does: waiting connections
// cost nothing per hand-off to the other workers. (The line of an id that is no member, which
// no event of its own will ever look at, is looked at again at the events of the others, at
// most every absent_recheck.) It
// keeps its copy of each connection until the worker's `accepted`: a connection handed to a
// worker that closes its server, disconnects or dies goes back to the front and to another
// worker, and so do the connections waiting for it (for a worker the master kills: once its
// channel has ended, since until then it may still take them). With no worker left the listener is
// closed with what it holds (Node does the same), unless the Master keeps it
// (Master::keep_listeners): then it accepts nothing and holds what waits until a worker joins.
// A worker that falls behind (an ack later than slow_ack after its hand-off, while another
// worker acknowledged one handed after it within slow_ack, once it has acknowledged one within
// slow_ack itself) has a window of 1 until it keeps pace again (Member::window, for the
// policies that choose by room).
// Hand-offs are batched: the connections chosen for one worker while the listener distributes
// (an accept burst, the room one `accepted_batch` makes) leave as one `newconn_batch` frame
// carrying up to ipc::max_fds_per_packet fds (one `newconn` when only one waits); the acks of
// one `accepted_batch` are all counted before the listener distributes again, once.
#pragma once

#include "cocluster/detail/config.hpp"

#include <asio/post.hpp>
#include <asio/posix/stream_descriptor.hpp>
#include <asio/steady_timer.hpp>

#include <algorithm>
#include <chrono>
#include <deque>
#include <functional>
#include <iterator>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "cocluster/detail/log.hpp"
#include "cocluster/detail/master/sockets.hpp"
#include "cocluster/detail/rate_limited_log.hpp"
#include "cocluster/policy/policy.hpp"
#include "cocluster/policy/remote.hpp"

namespace cocluster {

class HandoffListener : public Listener, public std::enable_shared_from_this<HandoffListener> {
 public:
  // How long accepting pauses after EMFILE, ENFILE, ENOBUFS or ENOMEM.
  static constexpr std::chrono::milliseconds accept_retry_delay{100};
  // Connections accepted in one turn of the master's loop at most (accept_now).
  static constexpr std::size_t accept_turn = 256;
  // How often, at most, connections waiting for workers that do not listen here are offered
  // to the policy again (place_absent).
  static constexpr std::chrono::milliseconds absent_recheck{50};
  // How long a worker that refused a connection (it had no fd left to take it: RLIMIT_NOFILE)
  // is left out of the members the policy chooses from; then it is asked again.
  static constexpr std::chrono::milliseconds refusal_rest{100};
  // Accepted connections the master holds for one worker that cannot take them yet (Dispatch,
  // Sticky: its window is full, or it is not there yet). One more for it, just accepted, is
  // closed (a log line says so), unless choose_for() names another worker: Sticky does,
  // Dispatch leaves it to F. Connections that waited already and are placed again (given back
  // by a worker that left, asked again at a join) are never closed: a line can hold more.
  static constexpr std::size_t max_waiting_per_worker = 256;
  // All connections the master holds; past it, accepting waits (the kernel's backlog holds the
  // rest), as when no worker has room. Connections waiting for a worker that does not listen
  // here (a routing function naming an id that is not there) are the exception: no event of
  // that worker will ever make room, so when the master is full, a worker that is here could
  // take a connection and one more comes, the oldest of them are closed, max_waiting / 16 at a
  // time (shed_absent).
  static constexpr std::size_t max_waiting = 4096;
  // What choose_for() returns to have the master close a connection it cannot place.
  static constexpr int refuse = -1;

  // A worker *falls behind* when the ack of one of its hand-offs comes later than slow_ack,
  // while another worker has acknowledged, within slow_ack, a connection handed after it: its
  // loop did not take the connection meanwhile (it blocked, or the server does not call
  // accept()), where a peer kept pace. (A worker that accepts takes a connection within
  // microseconds, a few milliseconds on a loaded machine; when the master is slow to read, every
  // ack is late, and none is evidence against another worker.) Only a worker that has kept pace
  // once (one of its own acks came within slow_ack) is judged: a worker just started takes its
  // first connections slowly (page faults, a sanitizer's start-up; over 10 ms under ASan on 2
  // CPUs), which says nothing of its loop, and a window of 1 for it would send LeastConnections'
  // bursts to a heavier peer. From then on its window is 1
  // (Member::window), and it grows back by one for every `regrow_acks` hand-offs it
  // acknowledges since; falling behind again makes it 1 again.
  static constexpr std::chrono::milliseconds slow_ack{10};
  static constexpr std::size_t regrow_acks = 16;

  // A worker holding this listener, as choose() sees it.
  struct Member {
    int id = 0;
    pid_t pid = 0;
    std::size_t in_flight = 0;  // handed to it and not yet acknowledged
    // Of a policy's window, how many hand-offs this worker may have unacknowledged now: all,
    // unless it fell behind (slow_ack): then one, and one more for every regrow_acks it
    // acknowledged since. A policy that chooses among workers by room (RoundRobin,
    // LeastConnections) asks it, so that a worker whose loop blocks again and again is handed
    // one connection to hold at each block, not a window of them.
    std::size_t window(std::size_t policy_window) const noexcept {
      return slowed ? std::min(policy_window, 1 + prompt_acks / regrow_acks) : policy_window;
    }
    // The listener's record of its acks (a policy reads them; only take_ack() writes them,
    // and each change reaches the policy through on_acknowledged(), or on_joined() after a rest).
    bool slowed = false;          // it fell behind once
    std::size_t prompt_acks = 0;  // its acks since it last fell behind
    // When the newest hand-off it acknowledged within slow_ack was handed.
    std::chrono::steady_clock::time_point newest_prompt_ack{};
  };
  using Members = std::map<int, Member>;  // by worker id

  explicit HandoffListener(ListenerArgs args)
      : id_(args.id),
        address_(std::move(args.address)),
        socket_(args.executor),
        retry_(args.executor),
        rest_timer_(args.executor),
        tag_(detail::connection_tag(address_.type)),
        absent_timer_(args.executor),
        closing_log_(args.executor),
        accept_log_(args.executor),
        full_log_(args.executor),
        absent_log_(args.executor),
        shed_log_(args.executor) {
    socket_.assign(args.socket.get());
    (void)args.socket.release();
  }

  bool shares_socket() const noexcept final { return false; }
  detail::unique_fd socket_copy(const WorkerLink&, std::error_code& ec) final {
    ec = std::make_error_code(std::errc::operation_not_supported);
    return {};
  }

  void joined(std::shared_ptr<WorkerLink> worker) final {
    const int id = worker->id();
    resting_.erase(id);
    auto [it, added] = members_.insert_or_assign(id, Member{id, worker->pid(), 0});
    links_.insert_or_assign(id, std::move(worker));
    on_joined(it->second);
    // Every waiting connection is asked again (a join is rare, not per connection): the policy
    // may now name the newcomer (Sticky: the clients it wins; Dispatch: a worker F waited for).
    place_again(0);
    for (int waited : waiting_ids()) place_again(waited, true);
    distribute();
  }

  void left(WorkerLink& worker) final {
    // It may have left members_ already (a hand-off to it failed, it rests, or it was
    // leaving); its hand-offs are still ours.
    if (members_.erase(worker.id()) != 0) on_left(worker.id());
    resting_.erase(worker.id());
    links_.erase(worker.id());
    // Everything handed to it and not acknowledged goes back to the front, in order, and then
    // what waited for it (the policy names their worker again: Sticky moves only its clients).
    std::deque<connection> back;
    for (auto it = unacked_.begin(); it != unacked_.end();) {
      if (it->second.worker != worker.id()) {
        ++it;
        continue;
      }
      back.push_back(std::move(it->second.conn));
      it = unacked_.erase(it);
    }
    if (!back.empty())
      detail::debug("Worker {}: {} connection(s) handed to it go to other workers", worker.pid(), back.size());
    if (auto line = lines_.find(worker.id()); line != lines_.end()) {
      if (line->second.count != 0)
        detail::debug("Worker {}: {} connection(s) waiting for it go to other workers", worker.pid(), line->second.count);
      held_ -= line->second.count;
      back.insert(back.end(), std::make_move_iterator(line->second.conns.begin()),
                  std::make_move_iterator(line->second.conns.end()));
      lines_.erase(line);
    }
    give_back(std::move(back));
    // With no member left the master closes us, and what waits with us, or keeps us until a
    // worker joins; unless the rest are resting (rest()), and the rest's end distributes.
    if (!members_.empty()) distribute();
  }

  // Killed, or broke the protocol: no member from now on (no hand-off, no rest's end makes it
  // one again). What it was handed waits for its acks until left(); so does its line (never
  // sent: it could go now, but behind what was handed, as left() gives both back), unless a
  // worker joins or a rest ends first, when every line is asked again.
  void leaving(WorkerLink& worker) final {
    if (members_.erase(worker.id()) != 0) on_left(worker.id());
    resting_.erase(worker.id());
  }

  void acknowledged(WorkerLink& worker, std::uint32_t seq, bool ok) final {
    if (auto c = take_ack(worker, seq, ok, std::chrono::steady_clock::now())) {  // refused: another worker gets it
      std::deque<connection> back;
      back.push_back(std::move(*c));
      give_back(std::move(back));
    }
    distribute(worker.id());  // ok: our copy of the fd closes here
  }

  // The acks of one turn of the worker's loop: counted first, then one distribution, so the
  // connections they make room for leave in batches.
  void acknowledged_batch(WorkerLink& worker, std::span<const std::uint32_t> accepted,
                          std::span<const std::uint32_t> refused) final {
    const auto now = std::chrono::steady_clock::now();
    for (std::uint32_t seq : accepted) (void)take_ack(worker, seq, true, now);
    std::deque<connection> back;  // the refused ones, given back together in the order refused
    for (std::uint32_t seq : refused)
      if (auto c = take_ack(worker, seq, false, now)) back.push_back(std::move(*c));
    if (accepted.empty() && back.empty()) return;  // nothing changed (an empty or stray batch)
    give_back(std::move(back));
    distribute(worker.id());
  }

  void close() override {
    std::error_code ignored;
    socket_.close(ignored);
    retry_.cancel();
    rest_timer_.cancel();
    absent_timer_.cancel();
    resting_.clear();
    closing_log_.flush();  // the connections closed since its last line, counted now
    accept_log_.flush();
    full_log_.flush();
    absent_log_.flush();
    shed_log_.flush();
    any_ = {};
    lines_.clear();
    held_ = 0;
    outbox_.clear();
    unacked_.clear();
    members_.clear();
    links_.clear();
  }

 protected:
  // The worker (a Member's id) that takes the next connection now, or 0 for nobody: then
  // accepting waits until a worker joins or acknowledges. Called before each accept and each
  // hand-off; it must not change what it would answer (the hooks below are for that).
  // By default: the first member that can_take() one (the gate of a policy that picks per
  // connection with choose_for(); RoundRobin and LeastConnections pick here).
  virtual int choose() {
    for (auto& [id, m] : members_)
      if (can_take(m)) return id;
    return 0;
  }
  // The worker that takes this accepted connection from `remote`: by default choose()'s
  // answer. A member that cannot take it now (can_take) keeps it waiting in that worker's
  // line, in order, until that worker acknowledges or leaves, or any worker joins (then it is
  // asked again); 0, or a worker that is no member (yet, or any more), keeps it waiting (in
  // line 0, or that id's line) until any worker acknowledges, leaves or joins, or another
  // connection comes; `refuse` closes it. Called per connection on the hand-off path: no
  // blocking, and better no allocation. Same rule as choose(): the hooks change the state.
  virtual int choose_for(const Remote& /*remote*/) { return choose(); }
  // Whether `m` takes a connection chosen for it now (a policy with a window says no when it
  // is full); choose() names only members that do.
  virtual bool can_take(const Member& /*m*/) const { return true; }
  // Connections waiting in the master for worker `id` (0: for the policy to name one; see
  // max_waiting_per_worker).
  std::size_t waiting_for(int id) const noexcept {
    if (id == 0) return any_.count;
    auto it = lines_.find(id);
    return it == lines_.end() ? 0 : it->second.count;
  }

  // After the bookkeeping of each event, for a policy's own state. A worker that refused a
  // connection rests (refusal_rest): on_left() as it starts, on_joined() as it ends, with its
  // in_flight then (not always 0: acks that came meanwhile are counted, without
  // on_acknowledged()).
  virtual void on_joined(const Member&) {}
  virtual void on_left(int /*id*/) {}
  virtual void on_handed(const Member&) {}        // in_flight counts the new hand-off
  virtual void on_acknowledged(const Member&) {}  // in_flight no longer counts it

  const Members& members() const noexcept { return members_; }
  // Asks member `id` to report its open connections (once per worker, whatever the listener);
  // open_connections(id) is then its last report (every connection it has open, on any server,
  // including the ones it was handed and has not accepted yet; 0 before its first report) plus
  // the hand-offs it has acknowledged since, on any listener (worker_link::open_connections_estimate).
  void count_connections(int id) {
    if (auto it = links_.find(id); it != links_.end()) it->second->count_connections();
  }
  std::uint64_t open_connections(int id) const noexcept {
    auto it = links_.find(id);
    return it == links_.end() ? 0 : it->second->open_connections_estimate();
  }
  const Address& address() const noexcept { return address_; }
  std::uint32_t id() const noexcept { return id_; }
  asio::any_io_executor executor() { return socket_.get_executor(); }

  // The number of the next hand-off (the worker acknowledges by it): by default the next one
  // that no unacknowledged hand-off of this listener still has (a worker that never accepts
  // keeps its number through a wrap of the 32 bits), never 0. A listener that shares its
  // server id with others (ReusePort's drains) numbers them together.
  virtual std::uint32_t next_seq() {
    do ++last_seq_;
    while (last_seq_ == 0 || unacknowledged(last_seq_));
    return last_seq_;
  }
  bool unacknowledged(std::uint32_t seq) const noexcept { return unacked_.count(seq) != 0; }

  // Accepting stops: the listening socket (this listener's copy) is closed, so the master's
  // loop no longer wakes for it; what was accepted is still handed off, acknowledged and given
  // back as before. accept_from() starts again on `socket` (another copy of it; throws
  // std::system_error if the reactor cannot take it). It accepts from construction on.
  void stop_accepting() {
    accepting_ = false;
    std::error_code ignored;
    socket_.close(ignored);
  }
  bool accepting() const noexcept { return accepting_; }
  void accept_from(detail::unique_fd socket) {
    socket_.assign(socket.get());
    (void)socket.release();
    accepting_ = true;
    distribute();
  }

 private:
  struct connection {
    std::shared_ptr<const detail::unique_fd> fd;  // shared with a channel while a newconn carrying it is queued
    std::string remote;                           // sockaddr from accept4
    bool given_back = false;                      // taken back from a worker: never closed for want of room
    std::uint64_t order = 0;                      // accepted as the listener's order-th connection
  };
  // The connections waiting for one worker (line 0: for the policy to name one), in order:
  // those given back ahead of the others, in the order they were given back.
  struct waiting_line {
    std::deque<connection> conns;
    std::size_t given_back = 0;  // how many at the front of conns were given back
    std::size_t count = 0;       // waiting_for(): conns, and the one of them being placed again
  };
  struct handed {
    int worker;
    connection conn;
    std::chrono::steady_clock::time_point at;  // when it was handed (slow_ack)
  };
  // Hand-offs chosen for one worker during this distribution, sent together at its end (one
  // entry per member, emptied after each distribution).
  struct outgoing_batch {
    int worker;
    std::vector<std::uint32_t> seqs;
    std::vector<std::string> remotes;
    std::vector<std::shared_ptr<const detail::unique_fd>> fds;
  };

  // Counts the ack of hand-off `seq`: the connection if it was refused (the caller gives it
  // back), else nothing (accepted: our copy closes here; or a stray ack).
  std::optional<connection> take_ack(WorkerLink& worker, std::uint32_t seq, bool ok,
                                     std::chrono::steady_clock::time_point now) {
    auto it = unacked_.find(seq);
    if (it == unacked_.end() || it->second.worker != worker.id()) return std::nullopt;  // Node ignores stray acks too
    connection conn = std::move(it->second.conn);
    const auto handed_at = it->second.at;
    unacked_.erase(it);
    if (ok) worker.handoff_accepted();  // counted in its load until its report (LeastConnections)
    const bool late = now - handed_at > slow_ack;
    auto count_ack = [&](Member& m) {
      --m.in_flight;
      // Judged only once it has kept pace: before its first prompt ack a worker is starting.
      const bool kept_pace = m.newest_prompt_ack != std::chrono::steady_clock::time_point{};
      const bool behind = late && kept_pace && acknowledged_since(handed_at, worker.id());
      if (!late) m.newest_prompt_ack = std::max(m.newest_prompt_ack, handed_at);
      if (behind) m.slowed = true, m.prompt_acks = 0;
      else if (m.slowed) ++m.prompt_acks;
    };
    if (auto m = members_.find(worker.id()); m != members_.end()) {
      count_ack(m->second);
      on_acknowledged(m->second);
    } else if (auto r = resting_.find(worker.id()); r != resting_.end()) {
      count_ack(r->second);  // the policy hears of it when the rest ends (on_joined)
    }
    if (ok) return std::nullopt;
    rest(worker.id());
    return conn;
  }

  // Whether a worker other than `id` has acknowledged, within slow_ack, a connection handed
  // after `t` (asked only for an ack later than slow_ack: rare).
  bool acknowledged_since(std::chrono::steady_clock::time_point t, int id) const {
    for (const Members* all : {&members_, &resting_})
      for (const auto& [other, m] : *all)
        if (other != id && m.newest_prompt_ack > t) return true;
    return false;
  }

  // A worker refused a connection: it had no fd left for it (RLIMIT_NOFILE), or its server
  // had just closed (its `close` follows, and left()). Either way the connection goes to
  // another worker, and the policy chooses without this one for refusal_rest: a policy that
  // would name it again at once (Sticky for its clients, LeastConnections for the idlest, a
  // Dispatch function) would otherwise hand the connection back and forth for as long as the
  // worker's fds stay in use. (Node has no such case: its worker's handle is made before the
  // ack.) While it rests it is no member: on_left() now, on_joined() when the rest ends, and
  // its own line waits for it.
  void rest(int id) {
    auto node = members_.extract(id);
    if (node.empty()) return;  // resting already, or gone
    on_left(id);
    resting_.insert(std::move(node));
    if (rest_timer_armed_) return;
    rest_timer_armed_ = true;
    rest_timer_.expires_after(refusal_rest);
    rest_timer_.async_wait([self = shared_from_this()](std::error_code ec) {
      self->rest_timer_armed_ = false;
      if (!ec) self->end_rests();
    });
  }

  // Every resting worker is a member again (one timer for all: a rest may end early), and
  // every waiting connection is asked again, as when a worker joins.
  void end_rests() {
    if (resting_.empty()) return;
    std::vector<int> back;
    while (!resting_.empty()) {
      auto node = resting_.extract(resting_.begin());
      back.push_back(node.key());
      members_.insert(std::move(node));
    }
    for (int id : back) on_joined(members_.at(id));
    place_again(0);
    for (int waited : waiting_ids()) place_again(waited, true);
    distribute();
  }

  int pick() {
    const int id = choose();
    return id != 0 && members_.count(id) ? id : 0;
  }
  // Places `c`: handed to the worker chosen for it, or closed (refused, or, `arriving` from
  // accept_now, past max_waiting_per_worker): nothing, and `c` is gone. Else the worker it is
  // to wait for (0: the policy named none), and the caller puts it in that line. A connection
  // that waited already is never closed for want of room: it took its place when it came, and
  // moving it (a worker left, joined, acknowledged) adds nothing to what the master holds.
  std::optional<int> place(connection& c, bool arriving = false) {
    const int id = choose_for(Remote(c.remote));
    if (auto m = members_.find(id); m != members_.end() && can_take(m->second)) {
      hand_off(id, c);
      return std::nullopt;
    }
    if (id < 0 && id != refuse) {  // no worker can ever have it: said, and closed
      closing_log_.error("listener {}:{}: closing a connection: the policy named worker {}, and worker ids are positive",
                         address_.address, address_.port, id);
      c = {};
      return std::nullopt;
    }
    if (id > 0 && !links_.count(id) && !lines_.count(id))  // the first to wait for a worker not listening here
      absent_log_.error("listener {}:{}: connections wait for worker {}, which does not listen on it (not there yet, "
                        "or gone): at most {}, then one more is closed",
                        address_.address, address_.port, id, max_waiting_per_worker);
    if (id == refuse || (arriving && waiting_for(id) >= max_waiting_per_worker)) {
      // (Formatted only when written: under overload most of these lines are left out.)
      if (id == refuse)
        closing_log_.error("listener {}:{}: closing a connection: the policy refused it", address_.address,
                           address_.port);
      else if (id == 0)
        closing_log_.error("listener {}:{}: closing a connection: {} already wait for the policy to name a worker",
                           address_.address, address_.port, max_waiting_per_worker);
      else
        closing_log_.error("listener {}:{}: closing a connection: {} already wait for worker {}", address_.address,
                           address_.port, max_waiting_per_worker, id);
      c = {};  // closes our copy
      return std::nullopt;
    }
    return id;
  }

  waiting_line& line(int id) { return id == 0 ? any_ : lines_[id]; }

  // `c` waits for worker `id`: at the back of its line, or, given back, behind the ones given
  // back before it.
  void wait_for(int id, connection&& c) {
    waiting_line& l = line(id);
    if (c.given_back)
      l.conns.insert(l.conns.begin() + static_cast<std::ptrdiff_t>(l.given_back++), std::move(c));
    else
      l.conns.push_back(std::move(c));
    ++l.count;
    ++held_;
  }

  // The ids of the workers connections wait for (a copy: placing them again adds lines).
  std::vector<int> waiting_ids() const {
    std::vector<int> ids;
    for (auto& [id, l] : lines_)
      if (!l.conns.empty()) ids.push_back(id);
    return ids;
  }

  // The connections waiting for `id` (0: for the policy), in order, each placed again while
  // some worker can take one and, for a member's line unless `all` (a worker joined: each one
  // is asked), while that member can. The policy is asked once per connection looked at; one
  // it names `id` again keeps its place, in front of the rest. No other line is looked at.
  void place_again(int id, bool all = false) {
    auto it = id == 0 ? lines_.end() : lines_.find(id);
    if (id != 0 && it == lines_.end()) return;
    waiting_line& l = id == 0 ? any_ : it->second;  // a map's nodes stay put while others are added
    // (Looked up each time: the policy, asked in place(), may have made the member leave.)
    auto room = [&] {
      if (pick() == 0) return false;
      if (all) return true;
      auto member = members_.find(id);
      return member == members_.end() || can_take(member->second);
    };
    std::vector<connection> again;  // (no allocation unless one keeps its place)
    std::size_t again_given_back = 0;
    while (!l.conns.empty() && room()) {
      connection c = std::move(l.conns.front());
      l.conns.pop_front();
      if (l.given_back != 0) --l.given_back;
      --l.count;  // as the policy is asked, it does not count against its own worker (Sticky looks)
      --held_;
      const std::optional<int> to = place(c);
      if (!to) continue;
      if (*to != id) {
        wait_for(*to, std::move(c));
        continue;
      }
      again_given_back += c.given_back;
      again.push_back(std::move(c));
      ++l.count;
      ++held_;
    }
    l.conns.insert(l.conns.begin(), std::make_move_iterator(again.begin()), std::make_move_iterator(again.end()));
    l.given_back += again_given_back;
    if (id != 0 && l.conns.empty() && !members_.count(id)) lines_.erase(it);  // a non-member keeps no empty line
  }

  // The connections waiting for the policy, and then those waiting for worker `w` (an event of
  // w's: it acknowledged, so it may have room), each to the worker chosen for it; then accept
  // more; then send what each worker was handed, one frame per worker (per max_fds_per_packet
  // connections). The lines of the other workers are not looked at: nothing changed for them.
  void distribute(int w = 0) {
    for (;;) {
      if (!any_.conns.empty()) place_again(0);
      if (w != 0 && !lines_.empty() && members_.count(w)) place_again(w);  // (else its left() follows)
      if (!lines_.empty()) place_absent();
      accept_now();
      if (send_handoffs()) return;  // else a worker's channel is ending: the others may take more
    }
  }

  // The lines of ids that no worker holding this listener has: no event of that id will come
  // (it left, or is not there yet), only the policy can name another worker (a Dispatch
  // function whose own table named a worker that has left), so they are asked again at the
  // events of the others, at most once every absent_recheck (a timer asks at the end of one
  // that an event found too soon), and all of them whenever a worker joins. (Asked at every
  // event, thousands of connections parked for absent ids made every hand-off ask the policy
  // thousands of times.) Only a routing function names such an id. (A worker whose hand-off
  // failed is no member but still linked: its left() follows and gives its line back, behind
  // what was handed to it, in order.)
  void place_absent() {
    absent_.clear();
    for (auto& [id, l] : lines_)
      if (!l.conns.empty() && !links_.count(id)) absent_.push_back(id);
    if (absent_.empty()) return;
    const auto now = std::chrono::steady_clock::now();
    if (now < next_absent_pass_) {
      if (!absent_timer_armed_) {
        absent_timer_armed_ = true;
        absent_timer_.expires_at(next_absent_pass_);
        absent_timer_.async_wait([self = shared_from_this()](std::error_code ec) {
          self->absent_timer_armed_ = false;
          if (!ec) self->distribute();
        });
      }
      return;
    }
    next_absent_pass_ = now + absent_recheck;
    for (int id : absent_) place_again(id);
  }

  // Everything taken back from a worker, to the front of the line of the connections waiting
  // for the policy (behind what was given back before), in order, until distribute() asks again.
  void give_back(std::deque<connection> back) {
    for (auto& c : back) {
      c.given_back = true;
      wait_for(0, std::move(c));
    }
  }

  // Hands `c` to `id`: counted now, sent with the others of this distribution (send_handoffs).
  void hand_off(int id, connection& c) {
    const std::uint32_t seq = next_seq();
    auto batch = std::find_if(outbox_.begin(), outbox_.end(), [&](const outgoing_batch& b) { return b.worker == id; });
    if (batch == outbox_.end()) batch = outbox_.insert(outbox_.end(), outgoing_batch{id, {}, {}, {}});
    batch->seqs.push_back(seq);
    batch->remotes.push_back(c.remote);
    batch->fds.push_back(c.fd);
    unacked_.emplace(seq, handed{id, std::move(c), std::chrono::steady_clock::now()});
    Member& m = members_.at(id);
    ++m.in_flight;
    on_handed(m);
  }

  // Sends every worker what it was handed: `newconn` for one connection, else `newconn_batch`
  // frames of up to max_fds_per_packet. The channels share our fds until the frames are
  // written; we keep them until `accepted`. False if a worker's channel is ending: it is no
  // member from now on, what could not be written to it is given back at once, and left()
  // follows and gives back the rest.
  bool send_handoffs() {
    bool all_sent = true;
    for (auto& b : outbox_) {  // sending never calls back into the listener
      if (b.seqs.empty()) continue;
      auto link = links_.find(b.worker);
      bool sent = link != links_.end();
      std::size_t at = 0;
      for (; sent && at < b.seqs.size(); at += ipc::max_fds_per_packet) {
        const std::size_t n = std::min(ipc::max_fds_per_packet, b.seqs.size() - at);
        if (n == 1) {
          sent = link->second->send(ipc::protocol::NewConn{id_, b.seqs[at], std::move(b.remotes[at])}, tag_, b.fds[at]);
          if (!sent) break;
          continue;
        }
        ipc::protocol::NewConnBatch m{id_, {b.seqs.begin() + at, b.seqs.begin() + at + n},
                                      {std::make_move_iterator(b.remotes.begin() + at), std::make_move_iterator(b.remotes.begin() + at + n)}};
        std::vector<std::shared_ptr<const detail::unique_fd>> fds(b.fds.begin() + at, b.fds.begin() + at + n);
        sent = link->second->send(m, tag_, std::move(fds));
        if (!sent) break;
      }
      if (!sent) {
        // The frames from `at` on were not queued (the channel writes nothing more): the
        // worker will never see them, so they go back now, not when its channel ends (a
        // worker that stopped reading would hold them until then).
        Member* m = nullptr;  // (a member, or resting: its in_flight counts them)
        for (Members* all : {&members_, &resting_})
          if (auto it = all->find(b.worker); it != all->end()) m = &it->second;
        std::deque<connection> back;
        for (std::size_t k = at; k < b.seqs.size(); ++k) {
          auto u = unacked_.find(b.seqs[k]);
          if (u == unacked_.end()) continue;
          back.push_back(std::move(u->second.conn));
          unacked_.erase(u);
          if (m && m->in_flight != 0) --m->in_flight;
        }
        if (!back.empty()) all_sent = false;  // distribute() places them again
        give_back(std::move(back));
      }
      if (!sent && members_.erase(b.worker) != 0) {
        on_left(b.worker);
        all_sent = false;
      }
      b.seqs.clear();  // kept, with their capacity, for the worker's next batch
      b.remotes.clear();
      b.fds.clear();
    }
    std::erase_if(outbox_, [&](const outgoing_batch& b) { return !links_.count(b.worker); });
    return all_sent;
  }

  // Accepts while a worker is chosen and fewer than max_waiting wait here (or more, while some
  // of them wait for absent workers: shed_absent makes room); waits for readiness only when
  // the kernel has nothing more.
  void accept_now() {
    if (!accepting_ || waiting_ || paused_ || !socket_.is_open() || turn_posted_) return;
    std::size_t taken = 0;
    while (pick() != 0 && (held_ < max_waiting || waiting_for_absent())) {
      // Connections that take no worker's room (closed, refused, shed, parked for absent
      // workers) could keep this loop going as long as clients connect: past accept_turn of
      // them the loop goes on in a later turn, after the master's other work.
      if (taken++ == accept_turn) return post_turn();
      std::string remote;
      std::error_code ec;
      detail::unique_fd fd = detail::accept_connection(socket_.native_handle(), remote, ec);
      if (fd) {
        connection c{std::make_shared<const detail::unique_fd>(std::move(fd)), std::move(remote), false, ++accepted_};
        const std::size_t held_before = held_;
        if (auto to = place(c, /*arriving=*/true)) wait_for(*to, std::move(c));
        // Full, and it had to wait: the oldest for absent workers make room. (Not for one
        // handed at once: given-back connections can hold the master above max_waiting.)
        if (held_ > max_waiting && held_ > held_before) shed_absent();
        continue;
      }
      if (!ec) return wait_readable();
      if (detail::is_connection_error(ec)) continue;
      accept_log_.error("accept on {}:{}: {}; retrying every {} ms", address_.address, address_.port, ec.message(),
                        accept_retry_delay.count());
      return pause_accepting();
    }
    // The kernel's backlog holds the rest until a worker acknowledges, leaves or joins. Not a
    // stalled worker's doing alone (its line stops at max_waiting_per_worker): many of them
    // (what waits for workers that are not there makes room: shed_absent). Said when it starts.
    const bool full = held_ >= max_waiting;
    if (full && !full_)
      full_log_.error("listener {}:{}: {} connections wait in the master for workers that cannot take them or "
                      "are not there; accepting waits",
                      address_.address, address_.port, held_);
    full_ = full;
  }

  // Whether some connection waits for a worker that does not listen here (asked only when the
  // master is full).
  bool waiting_for_absent() const {
    for (auto& [id, l] : lines_)
      if (l.conns.size() > l.given_back && !links_.count(id)) return true;
    return false;
  }

  // The master holds more than max_waiting, and some of it waits for workers that do not
  // listen here: the oldest of those (by accept order; not one given back), max_waiting / 16
  // of them, are closed, so that accepting goes on for the workers that are here. Without it, a
  // routing function naming absent workers for max_waiting connections stopped accepting for
  // good while the workers that are here sat idle.
  void shed_absent() {
    using head = std::pair<std::uint64_t, int>;  // (order of a line's oldest sheddable, its id)
    std::vector<head> heads;
    for (auto& [id, l] : lines_)
      if (l.conns.size() > l.given_back && !links_.count(id)) heads.emplace_back(l.conns[l.given_back].order, id);
    std::make_heap(heads.begin(), heads.end(), std::greater<>{});
    std::size_t closed = 0;
    while (!heads.empty() && closed < max_waiting / 16) {
      std::pop_heap(heads.begin(), heads.end(), std::greater<>{});
      const int id = heads.back().second;
      heads.pop_back();
      auto it = lines_.find(id);
      waiting_line& l = it->second;
      l.conns.erase(l.conns.begin() + static_cast<std::ptrdiff_t>(l.given_back));  // closes our copy
      --l.count;
      --held_;
      ++closed;
      if (l.conns.size() > l.given_back) {
        heads.emplace_back(l.conns[l.given_back].order, id);
        std::push_heap(heads.begin(), heads.end(), std::greater<>{});
      } else if (l.conns.empty()) {
        lines_.erase(it);
      }
    }
    if (closed != 0)
      shed_log_.error("listener {}:{}: closed the {} oldest connection(s) waiting for workers that do not listen on "
                      "it: the master holds {} at most, and a worker that is here can take more",
                      address_.address, address_.port, closed, max_waiting);
  }

  void post_turn() {
    turn_posted_ = true;
    asio::post(socket_.get_executor(), [self = shared_from_this()] {
      self->turn_posted_ = false;
      self->distribute();
    });
  }

  void wait_readable() {
    waiting_ = true;
    socket_.async_wait(asio::posix::descriptor_base::wait_read, [self = shared_from_this()](std::error_code ec) {
      self->waiting_ = false;
      // (Cancelled by stop_accepting(): an accept_from() since found us still waiting.)
      if (!ec || (ec == asio::error::operation_aborted && self->accepting_ && self->socket_.is_open()))
        self->distribute();  // accepts, then sends
    });
  }

  void pause_accepting() {
    if (paused_) return;
    paused_ = true;
    retry_.expires_after(accept_retry_delay);
    retry_.async_wait([self = shared_from_this()](std::error_code ec) {
      self->paused_ = false;
      if (!ec) self->distribute();
    });
  }

  std::uint32_t id_;
  Address address_;
  asio::posix::stream_descriptor socket_;
  asio::steady_timer retry_;
  asio::steady_timer rest_timer_;            // ends the rests of workers that refused a connection
  detail::handle_tag tag_;                   // what a connection travels as (TCP or Unix socket)
  Members members_;            // workers holding this listener, by id
  Members resting_;            // holders left out of members_ for a while: they refused a connection
  std::map<int, std::shared_ptr<WorkerLink>> links_;
  waiting_line any_;                         // accepted or given back, waiting for the policy to name a worker
  std::map<int, waiting_line> lines_;        // accepted, waiting for the worker chosen for them, by its id
  std::size_t held_ = 0;                     // waiting in all (any_ and lines_)
  std::vector<int> absent_;                  // place_absent()'s ids (kept for its capacity)
  asio::steady_timer absent_timer_;          // place_absent()'s next pass, when an event came too soon
  bool absent_timer_armed_ = false;
  bool turn_posted_ = false;                 // accept_now() goes on in a later turn (post_turn)
  std::chrono::steady_clock::time_point next_absent_pass_{};
  std::map<std::uint32_t, handed> unacked_;  // handed off, not yet acknowledged, by seq
  std::vector<outgoing_batch> outbox_;       // handed in this distribution, not yet sent, per worker
  std::uint32_t last_seq_ = 0;
  bool waiting_ = false;
  bool paused_ = false;
  bool rest_timer_armed_ = false;
  bool accepting_ = true;
  detail::rate_limited_log closing_log_;     // "closing a connection": once a second at most under overload
  detail::rate_limited_log accept_log_;      // accept errors: the same
  detail::rate_limited_log full_log_;        // accepting waits for room in the master: the same
  detail::rate_limited_log absent_log_;      // connections begin to wait for a worker not listening here
  detail::rate_limited_log shed_log_;        // connections for absent workers closed to make room (shed_absent)
  std::uint64_t accepted_ = 0;               // connections accepted so far (connection::order)
  bool full_ = false;                        // max_waiting connections held when accept_now() last looked
};

}  // namespace cocluster
