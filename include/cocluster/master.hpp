// The master process's side of a cluster (Node: the `cluster` module in the primary).
//   asio::io_context io;
//   cocluster::Master<> master(io.get_executor());
//   asio::co_spawn(io, [&]() -> asio::awaitable<void> {
//     auto w = co_await master.fork();  co_await w->online();  w->disconnect();
//   }, asio::detached);
//   io.run();
// Policy decides how listen() in workers is served (Node: cluster.schedulingPolicy):
// RoundRobin (the default), SharedSocket, RuntimePolicy (from COCLUSTER_SCHED_POLICY), or any
// type that models cocluster::Policy (policy/policy.hpp).
#pragma once

#include "cocluster/detail/config.hpp"

#include <asio/co_spawn.hpp>
#include <asio/use_awaitable.hpp>

#include <chrono>
#include <fstream>
#include <iterator>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <system_error>
#include <vector>

#include "cocluster/detail/async_operation.hpp"
#include "cocluster/detail/log.hpp"
#include "cocluster/detail/master/listener_table.hpp"
#include "cocluster/detail/spawn.hpp"
#include "cocluster/detail/stdio.hpp"
#include "cocluster/detail/syscalls.hpp"
#include "cocluster/detail/worker_identity.hpp"
#include "cocluster/events.hpp"
#include "cocluster/policy/policy.hpp"
#include "cocluster/policy/round_robin.hpp"
#include "cocluster/policy/runtime.hpp"
#include "cocluster/policy/shared_socket.hpp"
#include "cocluster/settings.hpp"
#include "cocluster/systemd.hpp"
#include "cocluster/worker.hpp"

extern char** environ;

namespace cocluster {

namespace detail {

// This process's argv, as the kernel has it (for Settings::args' default).
inline std::vector<std::string> own_command_line() {
  std::ifstream in("/proc/self/cmdline", std::ios::binary);
  std::string all((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<std::string> args;
  for (std::size_t pos = 0; pos < all.size();) {
    std::size_t end = all.find('\0', pos);
    if (end == std::string::npos) end = all.size();
    args.push_back(all.substr(pos, end - pos));
    pos = end + 1;
  }
  return args;
}

// The master's environment, less any worker identity it had (NODE_UNIQUE_ID is dropped, so a
// Node program the worker runs is no cluster worker; COCLUSTER_WORKER_ID becomes the new id),
// plus `settings` then `extra`.
inline std::vector<std::string> worker_environment(const Env& settings, const Env& extra, int id) {
  Env merged;
  for (char** e = environ; e && *e; ++e) {
    std::string_view entry(*e);
    auto eq = entry.find('=');
    if (eq == std::string_view::npos) continue;
    merged.emplace(std::string(entry.substr(0, eq)), std::string(entry.substr(eq + 1)));
  }
  merged.erase("NODE_UNIQUE_ID");
  for (const char* v : systemd::master_only_variables) merged.erase(v);  // systemd speaks to the master only
  for (auto& [k, v] : settings) merged[k] = v;
  for (auto& [k, v] : extra) merged[k] = v;
  merged[worker_id_variable] = std::to_string(id);
  merged[channel_fd_variable] = std::to_string(worker_channel_fd);
  std::vector<std::string> out;
  out.reserve(merged.size());
  for (auto& [k, v] : merged) out.push_back(k + "=" + v);
  return out;
}

}  // namespace detail

template <Policy P = RoundRobin>
class Master {
 public:
  using policy_type = P;
  using executor_type = asio::any_io_executor;

  // (Default-constructing RuntimePolicy reads COCLUSTER_SCHED_POLICY and may throw
  // std::invalid_argument for an unknown value.)
  explicit Master(asio::any_io_executor ex, Settings settings = {}, P policy = {})
      : state_(std::make_shared<detail::master_state>(std::move(ex))),
        settings_(std::move(settings)),
        policy_(std::move(policy)),
        command_line_(detail::own_command_line()) {
    (void)detail::heartbeat_interval(settings_);  // throws std::invalid_argument for a bad pair
    (void)detail::activated_listeners();  // socket activation: take systemd's fds before anything else runs
    state_->listeners = std::make_unique<detail::listener_table>(
        state_->ex, [policy = policy_](ListenerArgs args) { return policy.make_listener(std::move(args)); },
        detail::policy_reuses_port(policy_));
  }
  Master(const Master&) = delete;
  Master& operator=(const Master&) = delete;

  // Leaves no process behind: closes every channel (workers exit on EOF), waits up to
  // `teardown_grace` in all for them, SIGKILLs the rest and reaps them. Blocks while it waits.
  ~Master() {
    state_->listeners->close_all();  // every listener and every connection not yet handed off
    state_->events.close_all();      // a subscriber waiting for the next event is told
    auto unreaped = std::move(state_->unreaped);
    state_->workers.clear();
    for (auto& [id, w] : unreaped) detail::master_access::close_channel(*w);
    const auto deadline = std::chrono::steady_clock::now() + teardown_grace;
    for (auto& [id, w] : unreaped) {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
      detail::master_access::process(*w).terminate_and_reap(std::max(left, std::chrono::milliseconds(0)));
    }
  }

  static constexpr std::chrono::milliseconds teardown_grace{2000};

  const executor_type& get_executor() const noexcept { return state_->ex; }

  // Node: cluster.fork([env]). Starts a worker with the current settings and `env` added to
  // its environment; completes with it once the process is forked, before its exec and before
  // it is online, so that forks in a row start their workers in parallel. It is in workers()
  // at once. Like Node's fork(), which runs setupMaster() first, it posts a `setup` event (the
  // settings, defaults filled in) and then a `fork` event.
  // Signature: void(std::error_code, std::shared_ptr<Worker>). Fails with the errno of the
  // step that failed, checked before forking (fork: EAGAIN; a uid/gid without permission:
  // EPERM; the executable: ENOENT, EACCES; cwd: ENOENT, ...) and posts an `error` event; the
  // master carries on. With use_awaitable the std::system_error's what() names the step (the
  // event's detail does for every token). A failure only the child can meet (execve of a
  // script whose interpreter is missing, ...) comes later as that worker's `error` event
  // (same errno and detail, logged) followed by its `exit` with code 127; its online() fails.
  // The process is started when the operation is initiated; no cancellation (it completes at
  // once).
  template <class CompletionToken = asio::use_awaitable_t<>>
  auto fork(Env env = {}, CompletionToken&& token = {}) {
    return fork_with(std::move(env), nullptr, std::forward<CompletionToken>(token));
  }
  // The same, with `args` as this worker's arguments instead of Settings::args (Node:
  // child_process.fork(modulePath, args); cluster.fork() has no such parameter):
  //   auto special = co_await master.fork({}, std::vector<std::string>{"special"});
  template <class CompletionToken = asio::use_awaitable_t<>>
  auto fork(Env env, std::vector<std::string> args, CompletionToken&& token = {}) {
    return fork_with(std::move(env), std::make_shared<const std::vector<std::string>>(std::move(args)),
                     std::forward<CompletionToken>(token));
  }

  // Node: cluster.workers. A worker leaves after both its disconnect and its exit (before
  // the later event is delivered), or at once on worker.disconnect()/kill(). A copy, so the
  // Node idiom `for (auto& [id, w] : master.workers()) w->kill();` is safe.
  std::map<int, std::shared_ptr<Worker>> workers() const { return state_->workers; }

  // Node: cluster.on(...). A new subscription to every event from now on, in order, owned by
  // the caller (destroying it unsubscribes); any number may be open, each sees every event.
  // At most `capacity` unread events are kept per subscription (see EventStream: a `lagged`
  // event counts what a subscriber that fell behind lost). next() takes any completion token.
  EventStream subscribe(std::size_t capacity = EventStream::default_capacity) {
    EventStream stream(state_->ex, capacity);
    state_->events.add(stream);
    return stream;
  }
  // The master's own subscription, made at the first call (events before it are not kept):
  // `auto& events = master.events();`. The same stream on every call.
  EventStream& events() {
    if (!state_->default_events) state_->default_events = std::make_unique<EventStream>(subscribe());
    return *state_->default_events;
  }

  // Replaces the settings for later forks (running workers keep theirs), fills in the
  // defaults and posts a `setup` event with a snapshot. Unlike Node's setupMaster(), fields
  // not given are reset to their defaults: setup_merge() is Node's.
  // Throws std::invalid_argument (settings unchanged) for a heartbeat_interval not below
  // heartbeat_timeout.
  void setup(Settings settings) {
    (void)detail::heartbeat_interval(settings);
    settings_ = std::move(settings);
    run_setup();
  }
  // Node: cluster.setupMaster(settings). Changes only the fields `patch` sets, for later
  // forks; then as setup(): defaults filled in, a `setup` event with a snapshot.
  void setup_merge(const SettingsPatch& patch) {
    Settings merged = settings_;
    patch.apply_to(merged);
    (void)detail::heartbeat_interval(merged);
    settings_ = std::move(merged);
    run_setup();
  }
  // Node: cluster.settings. What the Master was constructed with until the first setup() or
  // fork(); from then on with the defaults filled in (exec: /proc/self/exe; args: the
  // master's own arguments).
  const Settings& settings() const noexcept { return settings_; }
  const P& policy() const noexcept { return policy_; }

  // Node: cluster.disconnect(). Disconnects every worker in workers() when the operation is
  // initiated; completes when each of them has disconnected (their listeners are closed by
  // then, unless one is kept: keep_listeners), never inline. Signature: void(std::error_code),
  // no error today. Cancellation (per-operation, terminal) stops the waiting, not the
  // disconnects.
  template <class CompletionToken = asio::use_awaitable_t<>>
  auto disconnect(CompletionToken&& token = {}) {
    return asio::async_initiate<CompletionToken, void(std::error_code)>(initiate_disconnect{this}, token);
  }

  // Ours (Node has no readiness): completes when every worker in workers() is ready
  // (worker->ready(), by Settings::ready_on), looking again each time one settles, so a
  // worker forked meanwhile is waited for too and one that leaves workers() (it disconnected
  // or exited) is not. Completes at once, posted, when all are (or there are none).
  // Signature: void(std::error_code), no error today. Cancellation (per-operation, terminal):
  // stops the waiting.
  template <class CompletionToken = asio::use_awaitable_t<>>
  auto ready(CompletionToken&& token = {}) {
    return asio::async_initiate<CompletionToken, void(std::error_code)>(initiate_ready{state_}, token);
  }

  // Ours: Node closes a listener, with the connections waiting in it, when its last worker
  // leaves (and a Master does so until this is called). With `linger` > 0, a listener whose
  // last worker goes away *without closing its server* (it exits, crashes or is killed) is
  // kept for up to `linger`: the master accepts nothing on it, keeps the connections it had
  // accepted or handed to that worker, and the kernel's backlog holds new ones; the next
  // worker to listen on it (the same address, port and type, and the same listen(0) index: a
  // replacement running the same code) takes them all, on the same port. Past `linger` with no
  // worker on it, it is closed as Node's rule would close it, with an error line. A worker
  // that closes its server (also on its way out: a graceful disconnect closes every server
  // first) still closes it at once. Every call gives the listeners kept so far `linger` from
  // now; 0 closes them. It applies to every worker of this Master; a Supervisor calls it while
  // it replaces workers (SupervisorSettings::keep_listeners), a supervision loop of one's own
  // can too:
  //   master.keep_listeners(30s);   // a crash of the only worker loses no connection
  // A kept listener's timer is work for the io_context (run() returns after it), and
  // disconnect() leaves kept listeners to the next worker. Negative durations count as 0,
  // more than ten years as ten years.
  void keep_listeners(std::chrono::milliseconds linger) { state_->listeners->keep(linger); }
  // The linger keep_listeners() set (0: Node's rule).
  std::chrono::milliseconds listener_linger() const noexcept { return state_->listeners->linger(); }

 private:
  static constexpr const char* self_exe = "/proc/self/exe";

  template <class CompletionToken>
  auto fork_with(Env env, std::shared_ptr<const std::vector<std::string>> args, CompletionToken&& token) {
    auto shared_env = std::make_shared<Env>(std::move(env));
    return detail::async_operation<void(std::error_code, std::shared_ptr<Worker>)>(
        std::forward<CompletionToken>(token),
        [this, shared_env, args]() -> std::optional<detail::op_result<std::shared_ptr<Worker>>> {
          std::optional<std::system_error> failure;
          auto w = start_worker(*shared_env, args.get(), failure);
          if (failure) {
            // The step's description without the message that system_error appends again.
            std::string what = failure->what();
            const std::string message = ": " + failure->code().message();
            if (what.size() >= message.size() && what.compare(what.size() - message.size(), message.size(), message) == 0)
              what.resize(what.size() - message.size());
            return detail::op_result<std::shared_ptr<Worker>>{failure->code(), {nullptr}, std::move(what)};
          }
          return detail::op_result<std::shared_ptr<Worker>>{{}, {std::move(w)}, {}};
        },
        initiate_fork{this, shared_env, args});
  }

  struct initiate_fork {
    Master* self;
    std::shared_ptr<Env> env;
    std::shared_ptr<const std::vector<std::string>> args;  // null: Settings::args
    template <class Handler>
    void operator()(Handler&& handler) const {
      detail::pending_handler<std::shared_ptr<Worker>> h(std::forward<Handler>(handler), self->state_->ex);
      std::optional<std::system_error> failure;
      auto w = self->start_worker(*env, args.get(), failure);
      h.complete(failure ? failure->code() : std::error_code(), std::move(w));
    }
  };

  struct initiate_disconnect {
    Master* self;
    template <class Handler>
    void operator()(Handler&& handler) const {
      std::vector<std::shared_ptr<Worker>> leaving;
      for (auto& [id, w] : self->state_->workers) leaving.push_back(w);
      for (auto& w : leaving) w->disconnect();
      // One waiter for all of them: completes (posted) when the last has disconnected.
      struct countdown {
        detail::pending_handler<> handler;
        std::size_t left;
      };
      auto c = std::make_shared<countdown>(countdown{{std::forward<Handler>(handler), self->state_->ex}, leaving.size()});
      if (leaving.empty()) return c->handler.complete({});
      auto slot = c->handler.cancellation_slot();
      if (slot.is_connected())
        slot.assign([weak = std::weak_ptr<countdown>(c)](asio::cancellation_type) {
          if (auto c = weak.lock(); c && c->handler) c->handler.complete(asio::error::operation_aborted);
        });
      for (auto& w : leaving)
        w->disconnected([c](std::error_code) {
          if (--c->left == 0 && c->handler) c->handler.complete({});
        });
    }
  };

  struct initiate_ready {
    std::shared_ptr<detail::master_state> state;
    template <class Handler>
    void operator()(Handler&& handler) const {
      struct waiting {
        detail::pending_handler<> handler;
        std::weak_ptr<detail::master_state> master;
        std::set<int> watched;  // ids whose ready() we wait on
        void check(const std::shared_ptr<waiting>& self) {
          auto m = master.lock();
          if (!handler) return;
          if (!m) return handler.complete(asio::error::operation_aborted);
          bool all = true;
          for (auto& [id, w] : m->workers) {
            if (w->is_ready() || !w->is_connected()) continue;  // a worker going away is not waited for
            all = false;
            if (!watched.insert(id).second) continue;
            w->ready([self, worker_id = id](std::error_code) {
              self->watched.erase(worker_id);
              self->check(self);
            });
          }
          if (all) handler.complete({});
        }
      };
      auto c = std::make_shared<waiting>(waiting{{std::forward<Handler>(handler), state->ex}, state, {}});
      auto slot = c->handler.cancellation_slot();
      if (slot.is_connected())
        slot.assign([weak = std::weak_ptr<waiting>(c)](asio::cancellation_type) {
          if (auto c = weak.lock(); c && c->handler) c->handler.complete(asio::error::operation_aborted);
        });
      c->check(c);
    }
  };

  // Node's setupMaster(): the defaults fill what is unset, then a `setup` event with a
  // snapshot (made only when someone subscribed: every fork() comes through here).
  void run_setup() {
    if (settings_.exec.empty()) settings_.exec = self_exe;
    if (!settings_.args)
      settings_.args.emplace(command_line_.empty() ? command_line_.end() : command_line_.begin() + 1,
                             command_line_.end());
    if (state_->events.has_subscribers()) {
      Event e{EventType::setup, nullptr};
      e.settings = std::make_shared<const Settings>(settings_);
      state_->emit(std::move(e));
    }
  }

  std::shared_ptr<Worker> start_worker(const Env& env, const std::vector<std::string>* args,
                                       std::optional<std::system_error>& failure) {
    run_setup();
    const int id = ++last_id_;
    // First: the fork's own fds (channel, pipes) count against it too. The worker inherits it.
    if (settings_.raise_fd_limit) detail::raise_fd_limit();
    try {
      auto [ours, theirs] = detail::make_socketpair(SOCK_SEQPACKET);
      // The master's pipe ends become Asio objects before the fork: registering them can fail,
      // and should then fail before there is a process to clean up.
      auto stdio = detail::open_stdio(detail::stdio_choice(settings_));
      detail::stdio_pipes pipes;
      for (int i = 0; i < 3; ++i) {
        if (!stdio.master[i]) continue;
        pipes[i].emplace(state_->ex);
        pipes[i]->assign(stdio.master[i].get());  // may throw: the fd stays owned until it succeeded
        (void)stdio.master[i].release();
      }
      detail::spawn_request r;
      r.exec = settings_.exec;
      // This executable again: argv[0] is the master's own (what `ps` shows), as for a fork.
      r.argv.push_back(r.exec == self_exe && !command_line_.empty() ? command_line_.front() : r.exec);
      if (!args) args = &*settings_.args;
      r.argv.insert(r.argv.end(), args->begin(), args->end());
      r.env = detail::worker_environment(settings_.env, env, id);
      r.cwd = settings_.cwd;
      r.uid = settings_.uid;
      r.gid = settings_.gid;
      // What can be checked before the fork is (the executable, cwd, ids): fork() fails at
      // once for those. Then no wait for the exec, so that forks in a row run in parallel; a
      // failure the child meets later is the worker's `error` event, then its `exit` (127).
      detail::check_spawnable(r);
      auto started = detail::spawn_start(r, std::move(theirs), std::move(stdio.child));
      detail::Process process(state_->ex, std::move(started.process));
      std::shared_ptr<Worker> w;
      try {
        ipc::Channel channel(state_->ex, std::move(ours), settings_.channel);
        w = detail::master_access::make(id, std::move(process), std::move(channel), state_,
                                        settings_.max_unread_messages, settings_.max_unread_bytes,
                                        std::move(pipes), settings_.ready_on);
      } catch (...) {  // the process runs: end it, so that a failed fork leaves nothing behind
        process.terminate_and_reap(std::chrono::milliseconds(0));
        throw;
      }
      detail::spawn_request described;  // what a late failure's description needs, not argv and env
      described.exec = std::move(r.exec);
      described.cwd = std::move(r.cwd);
      described.uid = r.uid;
      described.gid = r.gid;
      detail::master_access::watch_exec(*w, std::move(started.exec_report), std::move(described),
                                        std::move(started.launch));
      if (const auto beat = detail::heartbeat_interval(settings_); beat.count() > 0)
        detail::master_access::watch_heartbeat(*w, beat, settings_.heartbeat_timeout);
      state_->workers.emplace(id, w);
      state_->unreaped.emplace(id, w);
      detail::debug("Worker {} fork (id {})", w->pid(), id);
      Event forked{EventType::fork, w};
      forked.snapshot = w->snapshot();
      state_->emit(std::move(forked));
      detail::master_access::start(*w);
      return w;
    } catch (const std::system_error& e) {
      failure.emplace(e);
      detail::log_error("cannot start worker {}: {}", id, e.what());
      Event failed{EventType::error, nullptr};
      failed.error = e.code();
      failed.detail = e.what();
      state_->emit(std::move(failed));
      return nullptr;
    }
  }

  std::shared_ptr<detail::master_state> state_;
  Settings settings_;
  P policy_;
  std::vector<std::string> command_line_;  // this process's argv: Settings' defaults
  int last_id_ = 0;  // ids start at 1 and are never reused
};

}  // namespace cocluster
