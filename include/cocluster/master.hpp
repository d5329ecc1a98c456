// The master process's side of a cluster (Node: the `cluster` module in the primary).
//   asio::io_context io;
//   cocluster::Master<> master(io.get_executor());
//   asio::co_spawn(io, [&]() -> asio::awaitable<void> {
//     auto w = co_await master.fork();  co_await w->online();  w->disconnect();
//   }, asio::detached);
//   io.run();
// Policy decides how listen() in workers is served (Node: cluster.schedulingPolicy):
// RoundRobin (the default), SharedSocket, or RuntimePolicy (from COCLUSTER_SCHED_POLICY).
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
#include <string>
#include <system_error>
#include <vector>

#include "cocluster/detail/log.hpp"
#include "cocluster/detail/server_table.hpp"
#include "cocluster/detail/spawn.hpp"
#include "cocluster/detail/stdio.hpp"
#include "cocluster/events.hpp"
#include "cocluster/policy/round_robin.hpp"
#include "cocluster/policy/runtime.hpp"
#include "cocluster/policy/shared_socket.hpp"
#include "cocluster/settings.hpp"
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
  for (auto& [k, v] : settings) merged[k] = v;
  for (auto& [k, v] : extra) merged[k] = v;
  merged["COCLUSTER_WORKER_ID"] = std::to_string(id);
  merged["COCLUSTER_CHANNEL_FD"] = std::to_string(worker_channel_fd);
  std::vector<std::string> out;
  out.reserve(merged.size());
  for (auto& [k, v] : merged) out.push_back(k + "=" + v);
  return out;
}

}  // namespace detail

template <class Policy = RoundRobin>
class Master {
 public:
  // The policy's choice is read here, once (RuntimePolicy may throw std::invalid_argument
  // for an unknown COCLUSTER_SCHED_POLICY).
  explicit Master(asio::any_io_executor ex, Settings settings = {}, Policy policy = {})
      : state_(std::make_shared<detail::master_state>(std::move(ex))),
        settings_(std::move(settings)),
        policy_(std::move(policy)),
        command_line_(detail::own_command_line()) {
    state_->servers = std::make_unique<detail::server_table>(state_->ex, policy_.scheduling());
  }
  Master(const Master&) = delete;
  Master& operator=(const Master&) = delete;

  // Leaves no process behind: closes every channel (workers exit on EOF), waits up to
  // `teardown_grace` in all for them, SIGKILLs the rest and reaps them. Blocks while it waits.
  ~Master() {
    state_->servers->close_all();  // every listener and every connection not yet handed off
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

  const asio::any_io_executor& get_executor() const noexcept { return state_->ex; }

  // Node: cluster.fork([env]). Starts a worker with the current settings and `env` added to
  // its environment; completes with it once the process runs (exec succeeded), before it is
  // online. It is in workers() at once. Like Node's fork(), which runs setupMaster() first,
  // it posts a `setup` event (the settings, defaults filled in) and then a `fork` event.
  // Fails with the errno of the step that failed (fork: EAGAIN; setuid: EPERM; execve:
  // ENOENT, EACCES, ...) and posts an `error` event; the master carries on. With the default
  // token the std::system_error's what() names the step (the event's detail does for all).
  template <class CompletionToken = asio::use_awaitable_t<>>
  auto fork(Env env = {}, CompletionToken&& token = {}) {
    if constexpr (detail::is_use_awaitable<CompletionToken>) {
      return fork_or_throw(std::move(env));
    } else {
      return asio::async_initiate<CompletionToken, void(std::error_code, std::shared_ptr<Worker>)>(
          [this](auto handler, Env e) {
            detail::pending_handler<std::shared_ptr<Worker>> h(std::move(handler), state_->ex);
            std::optional<std::system_error> failure;
            auto w = start_worker(e, failure);
            h.complete(failure ? failure->code() : std::error_code(), std::move(w));
          },
          token, std::move(env));
    }
  }

  // Node: cluster.workers. A worker leaves after both its disconnect and its exit (before
  // the later event is delivered), or at once on worker.disconnect()/kill(). A copy, so the
  // Node idiom `for (auto& [id, w] : master.workers()) w->kill();` is safe.
  std::map<int, std::shared_ptr<Worker>> workers() const { return state_->workers; }

  // The master-wide event stream. The first call subscribes: events before it are not kept.
  EventStream& events() {
    if (!state_->events) state_->events = std::make_unique<EventStream>(state_->ex);
    return *state_->events;
  }

  // Node: cluster.setupMaster(settings). Replaces the settings for later forks (running
  // workers keep theirs), fills in the defaults and posts a `setup` event with a snapshot.
  // To change one field, as Node merges: `auto s = master.settings(); s.args = {...}; master.setup(s);`
  void setup(Settings settings) {
    settings_ = std::move(settings);
    run_setup();
  }
  // Node: cluster.settings. What the Master was constructed with until the first setup() or
  // fork(); from then on with the defaults filled in (exec: /proc/self/exe; args: the
  // master's own arguments).
  const Settings& settings() const noexcept { return settings_; }
  const Policy& policy() const noexcept { return policy_; }

  // Node: cluster.disconnect(). Disconnects every worker in workers(); completes when each
  // of them has disconnected.
  template <class CompletionToken = asio::use_awaitable_t<>>
  auto disconnect(CompletionToken&& token = {}) {
    std::vector<std::shared_ptr<Worker>> leaving;
    for (auto& [id, w] : state_->workers) leaving.push_back(w);
    for (auto& w : leaving) w->disconnect();
    return asio::co_spawn(
        state_->ex,
        [leaving = std::move(leaving)]() -> asio::awaitable<void> {
          for (auto& w : leaving) co_await w->disconnected();
        },
        std::forward<CompletionToken>(token));
  }

 private:
  static constexpr const char* self_exe = "/proc/self/exe";

  // Node's setupMaster(): the defaults fill what is unset, then a `setup` event with a
  // snapshot (made only when someone subscribed: every fork() comes through here).
  void run_setup() {
    if (settings_.exec.empty()) settings_.exec = self_exe;
    if (!settings_.args)
      settings_.args.emplace(command_line_.empty() ? command_line_.end() : command_line_.begin() + 1,
                             command_line_.end());
    if (state_->events)
      state_->emit(Event{EventType::setup, nullptr, {}, {}, {}, {}, std::make_shared<const Settings>(settings_)});
  }

  asio::awaitable<std::shared_ptr<Worker>> fork_or_throw(Env env) {
    std::optional<std::system_error> failure;
    auto w = start_worker(env, failure);
    if (failure) throw *failure;
    co_return w;
  }

  std::shared_ptr<Worker> start_worker(const Env& env, std::optional<std::system_error>& failure) {
    run_setup();
    const int id = ++last_id_;
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
      r.argv.insert(r.argv.end(), settings_.args->begin(), settings_.args->end());
      r.env = detail::worker_environment(settings_.env, env, id);
      r.cwd = settings_.cwd;
      r.uid = settings_.uid;
      r.gid = settings_.gid;
      detail::Process process(state_->ex, detail::spawn(r, std::move(theirs), std::move(stdio.child)));
      std::shared_ptr<Worker> w;
      try {
        ipc::Channel channel(state_->ex, std::move(ours), settings_.channel);
        w = detail::master_access::make(id, std::move(process), std::move(channel), state_,
                                        settings_.max_unread_messages, std::move(pipes));
      } catch (...) {  // the process runs: end it, so that a failed fork leaves nothing behind
        process.terminate_and_reap(std::chrono::milliseconds(0));
        throw;
      }
      state_->workers.emplace(id, w);
      state_->unreaped.emplace(id, w);
      detail::debug("Worker {} fork (id {})", w->pid(), id);
      state_->emit(Event{EventType::fork, w, {}, {}, {}, {}});
      detail::master_access::start(*w);
      return w;
    } catch (const std::system_error& e) {
      failure.emplace(e);
      detail::log_error("cannot start worker {}: {}", id, e.what());
      state_->emit(Event{EventType::error, nullptr, {}, e.code(), e.what(), {}});
      return nullptr;
    }
  }

  std::shared_ptr<detail::master_state> state_;
  Settings settings_;
  Policy policy_;
  std::vector<std::string> command_line_;  // this process's argv: Settings' defaults
  int last_id_ = 0;  // ids start at 1 and are never reused
};

}  // namespace cocluster
