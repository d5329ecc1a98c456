// Keeps a Master's workers running, as PM2, gunicorn or an Erlang/OTP supervisor does (Node
// leaves this to the user): replaces a worker that dies, with a backoff and a restart limit;
// reloads every worker without dropping a request; recycles a worker after its share of
// connections or above a memory limit, one at a time; stops gracefully; optionally on signals.
// Built from Master's own operations (fork, ready, disconnect, kill), not a second framework:
// the Master stays usable beside it (events(), workers(), send/receive).
//   cocluster::Master<> master(io.get_executor());
//   cocluster::Supervisor<> supervisor(master, {.workers = 4, .drain_timeout = 10s});
//   supervisor.handle_signals();   // SIGTERM/SIGINT stop, SIGHUP reload, SIGTTIN/SIGTTOU +1/-1
//   co_spawn(io, [&]() -> awaitable<void> { co_await supervisor.run(); }, detached);
// run() completes once every worker is gone: after stop() (or SIGTERM), or with
// error::restart_limit_reached after a crash loop (the workers left are stopped first).
// Under systemd (NOTIFY_SOCKET set; see docs/deploy.md) it speaks the notify protocol: READY=1
// once the first workers are ready and after each reload, RELOADING=1 before a reload,
// STOPPING=1, and WATCHDOG=1 while run() runs when WatchdogSec= asks for it.
// Everything runs on the Master's executor; the Supervisor must outlive its run(), and the
// Master the Supervisor.
#pragma once

#include "cocluster/detail/config.hpp"

#include <asio/bind_cancellation_slot.hpp>
#include <asio/cancellation_signal.hpp>
#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/experimental/awaitable_operators.hpp>
#include <asio/signal_set.hpp>
#include <asio/steady_timer.hpp>
#include <asio/use_awaitable.hpp>
#include <fmt/core.h>

#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

#include "cocluster/detail/as_tuple.hpp"
#include "cocluster/detail/async_latch.hpp"
#include "cocluster/detail/log.hpp"
#include "cocluster/detail/master/resident_memory.hpp"
#include "cocluster/detail/master/restart_budget.hpp"
#include "cocluster/detail/pending_handler.hpp"
#include "cocluster/detail/worker_identity.hpp"
#include "cocluster/error.hpp"
#include "cocluster/master.hpp"
#include "cocluster/systemd.hpp"

namespace cocluster {

// Which exits of a supervised worker are replaced (systemd's Restart=, OTP's restart type).
// An exit the supervisor caused (reload, stop, scale down, a rolled-back replacement) never is.
enum class Restart {
  always,      // every other exit, also a clean one or the worker's own disconnect (PM2 autorestart)
  on_failure,  // an exit without exited_after_disconnect, with a code other than 0 or a signal
  never,       // none: run() completes once the last worker is gone
};

struct SupervisorSettings {
  // Workers run() starts and keeps (gunicorn: workers; PM2: instances).
  std::size_t workers = 1;
  Restart restart = Restart::always;
  // Backoff between a crash and its replacement (PM2: exp_backoff_restart_delay): the first
  // wait, then `backoff_factor` times the previous up to `max_restart_delay`, from the first
  // again once a worker ran `backoff_reset_after` (PM2: x1.5, 15 s, 30 s).
  std::chrono::milliseconds restart_delay{100};
  double backoff_factor = 1.5;
  std::chrono::milliseconds max_restart_delay{15000};
  std::chrono::milliseconds backoff_reset_after{30000};
  // Restart intensity: more than `max_restarts` replacements within `restart_window` (every
  // crash counts, whatever its uptime) and run() stops the rest and fails with
  // error::restart_limit_reached (OTP: intensity/period; systemd: StartLimitBurst/IntervalSec).
  std::size_t max_restarts = 10;
  std::chrono::milliseconds restart_window{60000};
  // A listener whose last worker dies stays open for its replacement
  // (Master::keep_listeners): the connections waiting in the master and in the kernel's
  // backlog are served by the replacement instead of being reset, and the port is never
  // refused meanwhile (gunicorn's and nginx's masters keep their sockets; Node closes them).
  // Each restart gives the listeners kept its backoff plus boot_timeout (and a second) from
  // then. A worker that dies before it is ready (a failed boot) closes what is kept: while
  // workers fail to start, clients are refused rather than left waiting. A worker that
  // closes its servers before it exits (a graceful disconnect, a protocol error) closes them:
  // none is kept. From run() until stop(), the restart limit, the end of run() or the
  // Supervisor's destruction, which close what is still kept (the Master's own linger, if it
  // had one, applies again). Not with Restart::never.
  bool keep_listeners = true;
  // Timers, by name:
  // boot: fork to ready (Settings::ready_on); a worker not ready by then is killed and counts
  // as a crash (PM2: listen_timeout).
  std::chrono::milliseconds boot_timeout{30000};
  // heartbeat: how long a worker's event loop may stay blocked before it is killed and
  // replaced (gunicorn: timeout); 0: off (the Master's Settings::heartbeat_timeout stays).
  // The Master kills the hung worker, so its exit comes here as an ordinary crash;
  // Supervisor's constructor sets it as the Master's heartbeat_timeout (setup_merge).
  std::chrono::milliseconds heartbeat{0};
  // drain: disconnect to forced kill (SIGTERM) of a worker being retired (gunicorn:
  // graceful_timeout; PM2: kill_timeout).
  std::chrono::milliseconds drain_timeout{30000};
  // hard stop: that SIGTERM to SIGKILL, for a worker that handles or ignores SIGTERM.
  std::chrono::milliseconds hard_stop_timeout{5000};
  // Workers a reload replaces at a time (k).
  std::size_t reload_batch = 1;
  // Recycling: a ready worker is replaced as a reload replaces it (the replacement ready
  // first, then the old one retired) when
  // - it has taken its limit of connections (gunicorn: max_requests + max_requests_jitter;
  //   PM2 and Puma have none): `max_connections` (0: off) plus a random value in
  //   [0, max_connections_jitter] drawn for each worker when it is forked, so that workers
  //   started together do not reach their limits together (connection_limit() tells it). The
  //   worker counts every connection it takes (Worker::connections_served()); the limit starts
  //   the recycling, it is no cap: the worker serves on until its replacement is ready.
  // - its resident memory is above `max_memory` bytes (0: off; PM2: max_memory_restart). A
  //   replacement that holds more than that as soon as it is ready is never recycled for
  //   memory (the limit is below what a fresh worker needs: recycling would loop), and an
  //   error line says so.
  // Both are looked at every `recycle_check_interval`. Strictly one recycling at a time, for
  // either reason (when several workers are due, the oldest goes first; the next look is a
  // recycle_check_interval after the previous recycling ended), never during a reload or a
  // stop (a reload asked for meanwhile waits for it to end). A replacement not ready within
  // the boot timer is retired and the worker serves on, as a reload rolls back: it is no crash
  // (a healthy pool is never stopped for a replacement that cannot start, say a broken
  // deploy); the next look waits twice as long after each failure in a row (up to
  // max_recycle_delay), and a recycling that works starts from recycle_check_interval again.
  // UDP servers take no connections: a worker serving only UDP never reaches max_connections.
  std::uint64_t max_connections = 0;
  std::uint64_t max_connections_jitter = 0;
  std::size_t max_memory = 0;
  std::chrono::milliseconds recycle_check_interval{1000};
  std::chrono::milliseconds max_recycle_delay{300000};
  // Awaited before a worker is disconnected (reload, stop, scale down), within the drain
  // timer: Node's documented pattern of a 'shutdown' message that lets the worker end its
  // long-lived connections (and report) before worker.disconnect(). Exceptions are ignored;
  // a hook still running when the drain timer ends runs on, and the disconnect goes ahead.
  std::function<asio::awaitable<void>(std::shared_ptr<Worker>)> before_disconnect{};
};

template <Policy P = RoundRobin>
class Supervisor {
 public:
  using executor_type = asio::any_io_executor;
  using clock = std::chrono::steady_clock;

  explicit Supervisor(Master<P>& master, SupervisorSettings settings = {})
      : core_(std::make_shared<core>(master, std::move(settings))) {
    forward_heartbeat();
  }
  Supervisor(const Supervisor&) = delete;
  Supervisor& operator=(const Supervisor&) = delete;
  // Stops listening for signals and waiting on timers (a run() still waiting completes with
  // operation_aborted) and keeping listeners; the workers are the Master's to end. (The
  // Master must outlive it.)
  ~Supervisor() {
    core_->release_listeners();
    core_->close();
  }

  const executor_type& get_executor() const noexcept { return core_->ex; }
  const SupervisorSettings& settings() const noexcept { return core_->settings; }

  // Starts settings().workers workers and keeps them: a worker that exits is replaced by the
  // Restart rule, after the backoff. A fork that fails, or a worker not ready within the
  // boot timer, counts as a crash and is retried; it never ends the supervision by itself.
  // Completes once no supervised worker is left: after stop() (or SIGTERM/SIGINT with
  // handle_signals()), when Restart lets the last one go, or past the restart limit.
  // Signature: void(std::error_code). Errors: error::restart_limit_reached (the workers left
  // were stopped first), error::workers_killed (a stop had to kill workers that did not drain
  // in time), asio::error::already_started for a second run(). No cancellation: stop() ends it.
  template <class CompletionToken = asio::use_awaitable_t<>>
  auto run(CompletionToken&& token = {}) {
    return asio::async_initiate<CompletionToken, void(std::error_code)>(initiate_run{core_}, token);
  }

  // Rolling reload, `reload_batch` workers at a time: forks the replacements, awaits their
  // readiness (boot timer), then retires the old ones (disconnect, drain timer, SIGTERM, hard
  // stop timer, SIGKILL) and awaits their exits. A replacement not ready in time rolls the
  // batch back: the replacements are killed, the old workers stay, and the reload ends there
  // (batches before it stay replaced). Signature: void(std::error_code, std::size_t replaced).
  // A recycling in progress is awaited first. Errors: error::reload_rolled_back,
  // asio::error::already_started while another reload runs, error::supervisor_stopped once
  // stopping (or before run()). No cancellation.
  template <class CompletionToken = asio::use_awaitable_t<>>
  auto reload(CompletionToken&& token = {}) {
    return asio::async_initiate<CompletionToken, void(std::error_code, std::size_t)>(initiate_reload{core_}, token);
  }

  // Graceful stop: every supervised worker is retired (disconnect, drain timer, SIGTERM, hard
  // stop timer, SIGKILL) and none is replaced; run() completes when all have exited. Also
  // before run(): run() then starts nothing and completes at once.
  void stop() { core_->stop({}); }

  // One worker more (gunicorn: SIGTTIN) or fewer (SIGTTOU; never below one: the newest is
  // retired). Both are ignored while stopping.
  void add_worker() { core_->add_worker(); }
  void remove_worker() { core_->remove_worker(); }

  // Opt-in signal handling, before run(): SIGTERM or SIGINT stops gracefully (a second one
  // kills the workers at once), SIGHUP reloads (then `reloaded` is called with the reload's
  // result), SIGTTIN / SIGTTOU add or remove a worker. Workers forked from then on ignore
  // SIGTERM and SIGINT from anyone but their master (COCLUSTER_MASTER_SIGNALS), so a signal
  // sent to the whole process group drains them instead of ending them mid-request.
  void handle_signals(std::function<void(std::error_code, std::size_t)> reloaded = {}) {
    core_->handle_signals(std::move(reloaded));
  }

  // The supervised workers (not those being retired), by id.
  std::vector<std::shared_ptr<Worker>> workers() const { return core_->live(); }
  // Replacements of crashed workers started so far (a restart still in its backoff when the
  // supervisor stops is not one).
  std::size_t restarts() const noexcept { return core_->restarts; }
  // Workers recycled so far, for their connections (max_connections) or their memory
  // (max_memory); a recycling rolled back is not one.
  std::size_t recycles() const noexcept { return core_->recycles; }
  // The connections after which `w` is recycled: max_connections plus the jitter drawn when
  // it was forked; 0 when max_connections is off or `w` is not (or no longer) supervised.
  std::uint64_t connection_limit(const Worker& w) const noexcept {
    auto it = core_->managed.find(w.id());
    return it == core_->managed.end() || it->second.worker.get() != &w ? 0 : it->second.connection_limit;
  }

 private:
  // The one place SupervisorSettings::heartbeat reaches the Master: its heartbeat_timeout (the
  // interval stays the Master's: a quarter of it by default), for every worker forked from now
  // on. 0 leaves the Master's own setting alone.
  void forward_heartbeat() {
    if (core_->settings.heartbeat.count() > 0)
      core_->master->setup_merge(SettingsPatch{.heartbeat_timeout = core_->settings.heartbeat});
  }

  struct core : std::enable_shared_from_this<core> {
    struct entry {
      std::shared_ptr<Worker> worker;
      clock::time_point started;
      bool retiring = false;     // the supervisor ends it: its exit is not replaced
      bool boot_failed = false;  // not ready within the boot timer: killed, and a crash
      // In a reload (or recycling) batch: its exit is not replaced now; the reload's
      // replacement takes its place, or, if the batch rolls back, replace() restarts it.
      bool being_replaced = false;
      bool trial = false;  // a replacement not ready yet: the reload owns its fate, never a restart
      std::uint64_t connection_limit = 0;  // max_connections + this worker's jitter (0: off)
      // A replacement already above max_memory when it became ready: a fresh worker needs more
      // than the limit, so recycling it for memory would only start another as big, in a loop.
      bool above_memory_when_fresh = false;
    };

    core(Master<P>& m, SupervisorSettings s)
        : master(&m),
          ex(m.get_executor()),
          settings(std::move(s)),
          budget({settings.max_restarts, settings.restart_window, settings.restart_delay, settings.backoff_factor,
                  settings.max_restart_delay, settings.backoff_reset_after}),
          recycle_ended(ex, asio::steady_timer::time_point::max()) {}

    Master<P>* master;
    asio::any_io_executor ex;
    SupervisorSettings settings;
    detail::restart_budget budget;
    std::map<int, entry> managed;  // every supervised worker not yet exited, by id
    std::set<asio::steady_timer*> sleeping;  // backoff waits, cancelled by stop()
    std::set<std::shared_ptr<asio::cancellation_signal>> hooks;  // before_disconnect hooks running
    std::size_t pending_restarts = 0;        // replacements waiting out their backoff or forking
    std::size_t restarts = 0;
    std::size_t recycles = 0;
    std::size_t failed_recycles = 0;  // rolled back in a row (the next look backs off)
    bool reload_waiting = false;      // a reload() waits for a recycling to end
    // reloading: a reload or a recycling replaces workers (recycling: it is a recycling).
    bool started = false, stopping = false, closed = false, reloading = false, recycling = false, killed_any = false;
    bool done = false;  // run() completed: nothing is supervised any more
    bool keeping_listeners = false;  // keep_listeners() asked the Master to keep them
    std::chrono::milliseconds own_linger{0};  // the Master's linger before (restored after)
    // What a kept listener waits beyond a replacement's backoff and boot timer: its fork, and
    // the time from its predecessor's channel end to the exit that starts the backoff.
    static constexpr std::chrono::milliseconds keep_slack{1000};
    std::mt19937_64 random{std::random_device{}()};  // each worker's max_connections_jitter
    asio::steady_timer recycle_ended;  // never expires: cancelled to wake a reload waiting for a recycling
    asio::steady_timer* recycle_timer = nullptr;  // the recycle loop's, while it runs
    bool recycle_idle = false;                    // it waits for a plain look: a worker due may wake it
    std::error_code failure;
    detail::pending_handler<> run_handler;
    std::optional<asio::signal_set> signals;
    std::function<void(std::error_code, std::size_t)> on_reloaded;
    std::optional<systemd::Watchdog> watchdog;  // while run() runs: WATCHDOG=1 when systemd asks

    // systemd's notify protocol (does nothing unless NOTIFY_SOCKET is set): READY=1 once the
    // first workers are ready and after each reload, RELOADING=1 before it, STOPPING=1.
    static void tell_systemd(std::string_view state) {
      std::error_code ec;
      systemd::notify(state, ec);
      if (ec) detail::debug("Supervisor: sd_notify {}: {}", state.substr(0, state.find('\n')), ec.message());
    }

    void close() {
      closed = true;
      watchdog.reset();
      if (run_handler) run_handler.complete(asio::error::operation_aborted);
      if (signals) {  // back to their default actions now, not once the last worker's watch ends
        std::error_code ignored;
        signals->clear(ignored);
        signals->cancel(ignored);
      }
      for (auto* t : sleeping) t->cancel();
      recycle_ended.cancel();
      for (auto& hook : std::set(hooks)) hook->emit(asio::cancellation_type::terminal);
    }

    std::vector<std::shared_ptr<Worker>> live() const {
      std::vector<std::shared_ptr<Worker>> out;
      for (auto& [id, e] : managed)
        if (!e.retiring) out.push_back(e.worker);
      return out;
    }

    // Forks one worker and watches its exit; null if the fork failed (logged by the Master).
    asio::awaitable<std::shared_ptr<Worker>> start_worker(bool watch_boot) {
      auto self = this->shared_from_this();
      if (closed) co_return nullptr;
      Env env;
      if (signals) env[detail::master_signals_variable] = "1";
      auto [ec, w] = co_await master->fork(std::move(env), as_tuple(asio::use_awaitable));
      if (ec || closed) co_return nullptr;
      entry e;
      e.worker = w;
      e.started = clock::now();
      if (settings.max_connections > 0) {  // the worker reports what it takes from now on
        const std::uint64_t jitter = std::min(settings.max_connections_jitter, UINT64_MAX - settings.max_connections);
        e.connection_limit = settings.max_connections + std::uniform_int_distribution<std::uint64_t>(0, jitter)(random);
        w->count_connections();
        // A worker reaching its limit wakes the recycle loop, rather than waiting for its next look.
        detail::supervisor_access::on_connections_reported(*w, [weak = this->weak_from_this(), id = w->id()] {
          if (auto self = weak.lock()) self->connections_reported(id);
        });
      }
      managed.emplace(w->id(), std::move(e));
      asio::co_spawn(ex, watch_exit(self, w), asio::detached);
      if (watch_boot) asio::co_spawn(ex, watch_boot_timer(self, w), asio::detached);
      if (stopping) asio::co_spawn(ex, retire(self, w), asio::detached);  // stop() came during the fork
      co_return w;
    }

    enum class boot { ready, gone, timed_out };
    // Whether `w` became ready within the boot timer, left first (its channel ended), or neither.
    asio::awaitable<boot> ready_in_time(std::shared_ptr<Worker> w) {
      using namespace asio::experimental::awaitable_operators;
      asio::steady_timer timer(ex, settings.boot_timeout);
      auto wait_ready = w->ready(as_tuple(asio::use_awaitable));
      auto wait_timer = timer.async_wait(as_tuple(asio::use_awaitable));
      const auto which = co_await (std::move(wait_ready) || std::move(wait_timer));
      if (w->is_ready()) co_return boot::ready;
      co_return which.index() == 0 ? boot::gone : boot::timed_out;
    }

    static asio::awaitable<void> watch_boot_timer(std::shared_ptr<core> self, std::shared_ptr<Worker> w) {
      if (co_await self->ready_in_time(w) != boot::timed_out) co_return;  // a worker that left: its exit says
      auto it = self->managed.find(w->id());
      if (self->closed || it == self->managed.end() || it->second.retiring || w->is_dead()) co_return;
      detail::log_error("worker {} (pid {}) not ready within the boot timeout ({} ms); killing it", w->id(), w->pid(),
                        self->settings.boot_timeout.count());
      it->second.boot_failed = true;
      std::error_code ignored;
      w->kill(SIGKILL, ignored);
    }

    static asio::awaitable<void> watch_exit(std::shared_ptr<core> self, std::shared_ptr<Worker> w) {
      auto [ec, status] = co_await w->exited(as_tuple(asio::use_awaitable));
      if (ec || self->closed) co_return;  // the Master is gone
      self->on_exit(w, status);
    }

    void on_exit(const std::shared_ptr<Worker>& w, ExitStatus status) {
      auto it = managed.find(w->id());
      if (it == managed.end()) return;
      entry e = std::move(it->second);
      managed.erase(it);
      if (!e.retiring && !e.being_replaced && !e.trial && !stopping) {
        const bool on_purpose = w->exited_after_disconnect().value_or(false) && !e.boot_failed;
        const bool failed = e.boot_failed || (!on_purpose && (status.code != 0 || status.killed_by_signal()));
        const bool replace = settings.restart == Restart::always       ? true
                             : settings.restart == Restart::on_failure ? failed
                                                                       : false;
        const std::string how = status.killed_by_signal() ? status.signal_name() : "code " + std::to_string(status.code);
        if (!w->is_ready()) close_kept_listeners();
        if (replace) {
          detail::log_error("worker {} (pid {}) exited ({}{}); replacing it", w->id(), w->pid(), how,
                            e.boot_failed ? ", never ready" : "");
          schedule_restart(clock::now() - e.started);
        } else {
          detail::debug("Supervisor: worker {} exited ({}); not replaced", w->id(), how);
        }
      }
      check_done();
    }

    // A crash to replace: charged to the budget, then a fork after the backoff.
    void schedule_restart(clock::duration uptime) {
      if (stopping || closed) return;
      if (!budget.charge(clock::now())) {
        detail::log_error("more than {} worker restarts within {} ms; stopping", settings.max_restarts,
                          settings.restart_window.count());
        return stop(error::restart_limit_reached);
      }
      ++pending_restarts;
      asio::co_spawn(ex, restart_after(this->shared_from_this(), budget.next_delay(uptime)), asio::detached);
    }

    static asio::awaitable<void> restart_after(std::shared_ptr<core> self, clock::duration delay) {
      if (!self->stopping && !self->closed) {  // (a timer made after stop() would never be cancelled)
        self->keep_listeners(std::chrono::ceil<std::chrono::milliseconds>(delay));  // what was left waits for it
        asio::steady_timer timer(self->ex, delay);
        self->sleeping.insert(&timer);
        co_await timer.async_wait(as_tuple(asio::use_awaitable));
        self->sleeping.erase(&timer);
      }
      std::shared_ptr<Worker> w;
      if (!self->stopping && !self->closed) w = co_await self->start_worker(true);
      --self->pending_restarts;
      if (w) ++self->restarts;
      if (!w && !self->stopping && !self->closed) self->schedule_restart(clock::duration::zero());  // fork failed: a crash
      self->check_done();
    }

    // SupervisorSettings::keep_listeners: from run() on, the Master keeps a listener its last
    // worker left by dying until a replacement has had its backoff and its boot: `delay` is
    // the backoff ahead (at run(): the longest one), and each restart calls it again, so that
    // the listeners kept so far wait for that replacement too. Never shorter than the linger
    // the Master had before run() (restored at the end).
    void keep_listeners(std::chrono::milliseconds delay) {
      if (!settings.keep_listeners || settings.restart == Restart::never || stopping || closed || !run_handler) return;
      using ms = std::chrono::milliseconds;
      if (!keeping_listeners) own_linger = master->listener_linger();
      keeping_listeners = true;
      const ms boot = std::min(std::max(settings.boot_timeout, ms(0)), ms::max() - keep_slack) + keep_slack;
      const ms wait = std::max(delay, ms(0));
      master->keep_listeners(std::max(own_linger, wait > ms::max() - boot ? ms::max() : wait + boot));  // (capped there)
    }
    // A worker died before it was ready (a failed boot: its replacement would be no better):
    // what is kept closes, so that clients are refused while workers fail to start instead of
    // waiting in a backlog nobody serves (and a TCP health check sees the port down). The next
    // worker to listen binds again; a death after that is kept again.
    void close_kept_listeners() {
      if (!keeping_listeners) return;
      const std::chrono::milliseconds linger = master->listener_linger();
      master->keep_listeners(std::chrono::milliseconds(0));  // closes what is kept
      master->keep_listeners(linger);                        // deaths from now on are kept again
    }
    // Nothing will be replaced any more: what is kept is closed (unless the Master had a
    // linger of its own), and the Master's linger is what it was before run().
    void release_listeners() {
      if (!keeping_listeners) return;
      keeping_listeners = false;
      master->keep_listeners(own_linger);
    }

    // run(): the first workers; a fork that fails is retried as a crash.
    static asio::awaitable<void> start_all(std::shared_ptr<core> self) {
      self->pending_restarts += self->settings.workers;
      for (std::size_t i = 0; i < self->settings.workers; ++i) {
        std::shared_ptr<Worker> w;
        if (!self->stopping && !self->closed) w = co_await self->start_worker(true);
        --self->pending_restarts;
        if (!w && !self->stopping && !self->closed) self->schedule_restart(clock::duration::zero());
      }
      self->check_done();
      if (self->closed) co_return;  // the Supervisor is gone, and the Master may be too
      // READY=1 for systemd (Type=notify) once the workers started here are ready.
      auto [ec] = co_await self->master->ready(as_tuple(asio::use_awaitable));
      if (!ec && !self->stopping && !self->closed)
        tell_systemd(fmt::format("READY=1\nSTATUS={} workers ready", self->live().size()));
    }

    // Disconnect, drain timer, SIGTERM, hard stop timer, SIGKILL; completes at the exit.
    static asio::awaitable<void> retire(std::shared_ptr<core> self, std::shared_ptr<Worker> w) {
      using namespace asio::experimental::awaitable_operators;
      if (auto it = self->managed.find(w->id()); it != self->managed.end()) {
        if (it->second.retiring) {  // retired already (stop() during a reload): once is enough
          co_await w->exited(as_tuple(asio::use_awaitable));
          co_return;
        }
        it->second.retiring = true;
      }
      const auto drain_end = clock::now() + self->settings.drain_timeout;
      if (self->settings.before_disconnect) {
        // Run on its own, not as a branch of `||`: a parallel group waits for the branch it
        // cancels, and a hook that ignores cancellation would hold the drain past its end. At
        // the end it is cancelled (terminal), as is one still running when the Supervisor goes.
        auto hook_done = std::make_shared<detail::async_latch<>>(self->ex);
        auto cancel = std::make_shared<asio::cancellation_signal>();
        self->hooks.insert(cancel);
        auto hook = [](std::shared_ptr<core> self, std::shared_ptr<Worker> w) -> asio::awaitable<void> {
          co_await self->settings.before_disconnect(w);  // (what it throws, even on the call, ends here)
        };
        auto ended = [self, w, hook_done, cancel](std::exception_ptr e) {
          self->hooks.erase(cancel);
          if (e) {
            try {
              std::rethrow_exception(e);
            } catch (const std::exception& x) {
              detail::debug("Supervisor: before_disconnect of worker {}: {}", w->id(), x.what());
            } catch (...) {
              detail::debug("Supervisor: before_disconnect of worker {}: an exception", w->id());
            }
          }
          hook_done->set();
        };
        asio::co_spawn(self->ex, hook(self, w), asio::bind_cancellation_slot(cancel->slot(), std::move(ended)));
        asio::steady_timer timer(self->ex, drain_end);
        auto wait_hook = hook_done->async_wait(as_tuple(asio::use_awaitable));
        auto wait_timer = timer.async_wait(as_tuple(asio::use_awaitable));
        co_await (std::move(wait_hook) || std::move(wait_timer));
        if (!hook_done->is_set()) cancel->emit(asio::cancellation_type::terminal);  // told, not waited for
      }
      w->disconnect();
      auto exited_by = [&](clock::time_point deadline) -> asio::awaitable<bool> {
        asio::steady_timer timer(self->ex, deadline);
        auto wait_exit = w->exited(as_tuple(asio::use_awaitable));
        auto wait_timer = timer.async_wait(as_tuple(asio::use_awaitable));
        co_await (std::move(wait_exit) || std::move(wait_timer));
        co_return w->is_dead();
      };
      if (!co_await exited_by(drain_end)) {
        self->killed_any = true;
        detail::log_error("worker {} (pid {}) still running {} ms after its disconnect; SIGTERM", w->id(), w->pid(),
                          self->settings.drain_timeout.count());
        std::error_code ignored;
        w->kill(SIGTERM, ignored);
        if (!co_await exited_by(clock::now() + self->settings.hard_stop_timeout)) {
          detail::log_error("worker {} (pid {}) still running {} ms after SIGTERM; SIGKILL", w->id(), w->pid(),
                            self->settings.hard_stop_timeout.count());
          w->signal(SIGKILL, ignored);
        }
      }
      co_await w->exited(as_tuple(asio::use_awaitable));
    }

    void stop(std::error_code why) {
      if (why && !failure) failure = why;
      if (stopping) return;
      stopping = true;
      release_listeners();  // nothing is replaced from now on
      killed_any = false;  // what run() reports is about this stop, not an earlier reload's retire
      tell_systemd("STOPPING=1");
      for (auto* t : sleeping) t->cancel();
      recycle_ended.cancel();
      for (auto& [id, e] : managed)
        if (!e.retiring) asio::co_spawn(ex, retire(this->shared_from_this(), e.worker), asio::detached);
      check_done();
    }

    // run() completes once nothing is left to supervise.
    void check_done() {
      if (!run_handler || !managed.empty() || pending_restarts > 0 || reloading) return;
      if (!stopping) {
        if (settings.restart == Restart::always) return;  // (only when there is nothing to keep)
        detail::debug("Supervisor: no worker left to supervise");
      }
      release_listeners();
      if (signals) {  // the signals go back to their default actions once nothing is supervised
        std::error_code ignored;
        signals->clear(ignored);
        signals->cancel(ignored);
      }
      watchdog.reset();  // its timer would keep the io_context running, as the recycle loop's would
      done = true;
      if (recycle_timer) recycle_timer->cancel();
      std::error_code ec = failure ? failure : killed_any ? std::error_code(error::workers_killed) : std::error_code();
      run_handler.complete(ec);
    }

    void add_worker() {
      if (stopping || closed || !started) return;
      ++pending_restarts;
      asio::co_spawn(ex, [](std::shared_ptr<core> self) -> asio::awaitable<void> {
        auto w = co_await self->start_worker(true);
        --self->pending_restarts;
        if (!w && !self->stopping && !self->closed) self->schedule_restart(clock::duration::zero());
        self->check_done();
      }(this->shared_from_this()), asio::detached);
    }

    void remove_worker() {
      if (stopping || closed) return;
      if (reloading) {  // the newest may be a replacement the reload waits for
        detail::debug("Supervisor: one worker fewer ignored during a reload");
        return;
      }
      auto all = live();
      if (all.size() <= 1) return;
      asio::co_spawn(ex, retire(this->shared_from_this(), all.back()), asio::detached);
    }

    static asio::awaitable<std::pair<std::error_code, std::size_t>> reload(std::shared_ptr<core> self) {
      if (self->recycling && !self->stopping && !self->closed) {  // one recycling ends first
        self->reload_waiting = true;
        while (self->recycling && !self->stopping && !self->closed)
          co_await self->recycle_ended.async_wait(as_tuple(asio::use_awaitable));
        self->reload_waiting = false;
      }
      if (self->stopping || self->closed || !self->started)
        co_return std::pair{std::error_code(error::supervisor_stopped), std::size_t{0}};
      if (self->reloading) co_return std::pair{std::error_code(asio::error::already_started), std::size_t{0}};
      self->reloading = true;
      tell_systemd(systemd::notify_detail::reloading_state());
      auto result = co_await self->reload_batches();
      self->reloading = false;
      if (!self->stopping && !self->closed)
        tell_systemd(fmt::format("READY=1\nSTATUS={} workers ready{}", self->live().size(),
                                 result.first ? " (reload failed: " + result.first.message() + ")" : std::string()));
      self->check_done();
      co_return result;
    }

    asio::awaitable<std::pair<std::error_code, std::size_t>> reload_batches() {
      std::vector<int> old;
      for (auto& [id, e] : managed)
        if (!e.retiring) old.push_back(id);
      std::size_t replaced = 0;
      const std::size_t k = std::max<std::size_t>(settings.reload_batch, 1);
      for (std::size_t at = 0; at < old.size(); at += k) {
        std::vector<std::shared_ptr<Worker>> batch;
        for (std::size_t i = at; i < std::min(at + k, old.size()); ++i)
          if (auto it = managed.find(old[i]); it != managed.end() && !it->second.retiring) batch.push_back(it->second.worker);
        if (batch.empty()) continue;  // those workers left meanwhile (their replacements are new)
        const std::error_code ec = co_await replace(batch, "reload");
        if (ec) {
          if (ec == error::reload_rolled_back)
            detail::log_error("reload: rolled back after {} workers replaced", replaced);
          co_return std::pair{ec, replaced};
        }
        replaced += batch.size();
      }
      co_return std::pair{std::error_code(), replaced};
    }

    // Replaces `batch`: forks as many, awaits their readiness (boot timer), then retires the
    // old ones and awaits their exits. error::reload_rolled_back when a replacement was not
    // ready (the replacements are retired, `batch` stays), supervisor_stopped when stopping.
    asio::awaitable<std::error_code> replace(std::vector<std::shared_ptr<Worker>> batch, std::string what) {
      auto self = this->shared_from_this();
      std::vector<std::shared_ptr<Worker>> fresh;
      auto mark = [&](const std::shared_ptr<Worker>& w, bool entry::*flag, bool on) {
        if (auto it = managed.find(w->id()); it != managed.end()) it->second.*flag = on;
      };
      for (auto& w : batch) mark(w, &entry::being_replaced, true);
      bool ok = true;
      std::string why;
      for (std::size_t i = 0; i < batch.size() && ok; ++i) {
        auto w = co_await start_worker(false);
        if (w) {
          mark(w, &entry::trial, true);
          fresh.push_back(std::move(w));
        } else {
          ok = false;
          why = "a replacement could not be forked";
        }
      }
      for (auto& w : fresh) {
        if (!ok) break;
        switch (co_await ready_in_time(w)) {
          case boot::ready: break;
          case boot::gone: ok = false, why = "a replacement exited before it was ready"; break;
          case boot::timed_out:
            ok = false, why = fmt::format("a replacement was not ready within {} ms", settings.boot_timeout.count());
            break;
        }
      }
      // One that was ready and has exited since, while the others booted: on_exit() restarts
      // no trial worker, so committing now would leave the pool one short for good.
      // (Its channel ends before its exit is reaped: not connected is enough.)
      for (auto& w : fresh)
        if (ok && (!w->is_connected() || w->is_dead() || !managed.count(w->id())))
          ok = false, why = fmt::format("replacement worker {} left after it was ready", w->id());
      if (!ok || stopping || closed) {
        // Retired like any worker (it may serve a connection already): disconnect, drain, kill.
        for (auto& w : fresh)
          if (!w->is_dead()) asio::co_spawn(ex, retire(self, w), asio::detached);
        for (auto& w : batch) mark(w, &entry::being_replaced, false);
        // A worker of the batch that exited meanwhile has no replacement now: restart it.
        for (auto& w : batch)
          if (!managed.count(w->id()) && !stopping && !closed) schedule_restart(clock::duration::zero());
        for (auto& w : fresh) co_await w->exited(as_tuple(asio::use_awaitable));
        if (!stopping && !closed) detail::log_error("{}: {}; rolled back", what, why);
        co_return (stopping || closed) ? std::error_code(error::supervisor_stopped)
                                       : std::error_code(error::reload_rolled_back);
      }
      for (auto& w : fresh) mark(w, &entry::trial, false);
      if (settings.max_memory > 0) note_fresh_memory(fresh);
      for (auto& w : batch) asio::co_spawn(ex, retire(self, w), asio::detached);
      for (auto& w : batch) co_await w->exited(as_tuple(asio::use_awaitable));
      co_return std::error_code();
    }

    // Replacements just ready (a reload's or a recycling's) that already hold more than
    // max_memory are never recycled for memory: the limit is below what a fresh worker needs.
    // Said once per such worker, as an error: the setting does not do what it was set for.
    void note_fresh_memory(const std::vector<std::shared_ptr<Worker>>& fresh) {
      for (auto& w : fresh) {
        auto it = managed.find(w->id());
        auto rss = detail::resident_bytes(w->pid());
        if (it == managed.end() || !rss || *rss <= settings.max_memory) continue;
        it->second.above_memory_when_fresh = true;
        detail::log_error("worker {} (pid {}) holds {} MiB as soon as it is ready, above max_memory ({} MiB): a fresh "
                          "worker needs more than max_memory, so it is not recycled for memory (raise max_memory)",
                          w->id(), w->pid(), *rss >> 20, settings.max_memory >> 20);
      }
    }

    // Whether `e` has taken its connection limit and may be recycled now.
    static bool connections_due(const entry& e) {
      return e.connection_limit > 0 && !e.retiring && !e.being_replaced && !e.trial && e.worker->is_ready() &&
             e.worker->connections_served() >= e.connection_limit;
    }

    void connections_reported(int id) {
      if (!recycle_idle || !recycle_timer) return;
      if (auto it = managed.find(id); it != managed.end() && connections_due(it->second)) recycle_timer->cancel();
    }

    // A worker due for recycling, oldest first, and why; none if none is.
    std::pair<std::shared_ptr<Worker>, std::string> recycle_candidate() const {
      for (auto& [id, e] : managed) {
        const auto& w = e.worker;
        if (e.retiring || e.being_replaced || e.trial || !w->is_ready()) continue;
        if (connections_due(e))
          return {w, fmt::format("served {} connections, at or above max_connections {} (its limit with jitter: {})",
                                 w->connections_served(), settings.max_connections, e.connection_limit)};
        if (settings.max_memory == 0 || e.above_memory_when_fresh) continue;
        if (auto rss = detail::resident_bytes(w->pid()); rss && *rss > settings.max_memory)
          return {w, fmt::format("holds {} MiB, above max_memory ({} MiB)", *rss >> 20, settings.max_memory >> 20)};
      }
      return {nullptr, std::string()};
    }

    // Recycling (max_connections, max_memory): one look per interval, or as soon as a worker
    // reports it reached its connection limit; then at most one worker replaced, and the next
    // look a whole interval after it ended (no early wake then): two never recycle at once.
    static asio::awaitable<void> recycle_loop(std::shared_ptr<core> self) {
      asio::steady_timer timer(self->ex);
      self->sleeping.insert(&timer);
      self->recycle_timer = &timer;
      clock::duration wait = self->settings.recycle_check_interval;
      bool idle = true;  // the wait is a plain look's, not the gap after a recycling
      while (!self->stopping && !self->closed && !self->done) {
        timer.expires_after(wait);
        wait = self->settings.recycle_check_interval;
        self->recycle_idle = idle;
        co_await timer.async_wait(as_tuple(asio::use_awaitable));
        self->recycle_idle = false;
        idle = !self->reloading;  // (during a reload, a worker due would only wake it in vain)
        if (self->stopping || self->closed || self->done || self->reloading) continue;
        auto [w, why] = self->recycle_candidate();
        if (!w) continue;
        detail::log_error("worker {} (pid {}) {}; recycling it", w->id(), w->pid(), why);
        self->reloading = self->recycling = true;
        std::vector<std::shared_ptr<Worker>> one{w};
        const std::error_code ec = co_await self->replace(std::move(one), fmt::format("recycling worker {}", w->id()));
        self->reloading = self->recycling = false;
        self->recycle_ended.cancel();  // a reload waiting for it goes on
        idle = false;
        if (!ec) {
          ++self->recycles;
          self->failed_recycles = 0;
        } else if (ec == error::reload_rolled_back) {  // the worker stays, as after a reload's rollback
          ++self->failed_recycles;
          clock::duration next = self->settings.recycle_check_interval;
          for (std::size_t i = 0; i < self->failed_recycles && next < self->settings.max_recycle_delay; ++i) next *= 2;
          wait = std::min<clock::duration>(next, self->settings.max_recycle_delay);
          detail::log_error("recycling worker {}: its replacement did not take its place (above); worker {} "
                            "serves on; next look in {} ms ({} failed in a row)",
                            w->id(), w->id(), std::chrono::duration_cast<std::chrono::milliseconds>(wait).count(),
                            self->failed_recycles);
        }
        self->check_done();
      }
      self->sleeping.erase(&timer);
      self->recycle_timer = nullptr;
    }

    void handle_signals(std::function<void(std::error_code, std::size_t)> reloaded) {
      if (signals || closed) return;
      on_reloaded = std::move(reloaded);
      signals.emplace(ex, SIGTERM, SIGINT, SIGHUP);
      signals->add(SIGTTIN);
      signals->add(SIGTTOU);
      asio::co_spawn(ex, signal_loop(this->shared_from_this()), asio::detached);
    }

    static asio::awaitable<void> signal_loop(std::shared_ptr<core> self) {
      for (;;) {
        auto [ec, sig] = co_await self->signals->async_wait(as_tuple(asio::use_awaitable));
        if (ec || self->closed) co_return;
        if (sig == SIGTERM || sig == SIGINT) {
          if (!self->stopping) {
            detail::debug("Supervisor: {}: stopping gracefully", sig == SIGTERM ? "SIGTERM" : "SIGINT");
            self->stop({});
          } else {  // a second one: no more waiting
            detail::log_error("second {} while stopping: killing the workers", sig == SIGTERM ? "SIGTERM" : "SIGINT");
            self->killed_any = true;
            for (auto& [id, e] : self->managed) {
              std::error_code ignored;
              e.worker->signal(SIGKILL, ignored);
            }
          }
        } else if (sig == SIGHUP) {
          // A reload in progress, or one already waiting for a recycling: this one adds nothing.
          if ((self->reloading && !self->recycling) || self->reload_waiting || self->stopping) continue;
          asio::co_spawn(self->ex, [](std::shared_ptr<core> self) -> asio::awaitable<void> {
            auto [rec, n] = co_await reload(self);
            if (self->on_reloaded && !self->closed) self->on_reloaded(rec, n);
          }(self), asio::detached);
        } else if (sig == SIGTTIN) {
          self->add_worker();
        } else if (sig == SIGTTOU) {
          self->remove_worker();
        }
      }
    }
  };

  struct initiate_run {
    std::shared_ptr<core> c;
    template <class Handler>
    void operator()(Handler&& handler) const {
      detail::pending_handler<> h(std::forward<Handler>(handler), c->ex);
      if (c->started || c->closed) return h.complete(asio::error::already_started);
      c->started = true;
      c->run_handler = std::move(h);
      if (systemd::watchdog_timeout()) c->watchdog.emplace(c->ex);
      if (c->stopping) return c->check_done();
      c->keep_listeners(std::max(c->settings.restart_delay, c->settings.max_restart_delay));
      asio::co_spawn(c->ex, core::start_all(c), asio::detached);
      if (c->settings.max_memory > 0 || c->settings.max_connections > 0)
        asio::co_spawn(c->ex, core::recycle_loop(c), asio::detached);
    }
  };

  struct initiate_reload {
    std::shared_ptr<core> c;
    template <class Handler>
    void operator()(Handler&& handler) const {
      detail::pending_handler<std::size_t> h(std::forward<Handler>(handler), c->ex);
      asio::co_spawn(c->ex, core::reload(c),
                     [h = std::move(h)](std::exception_ptr e, std::pair<std::error_code, std::size_t> r) mutable {
                       if (e) r.first = asio::error::operation_aborted;  // the io_context is being destroyed
                       h.complete(r.first, r.second);
                     });
    }
  };

  std::shared_ptr<core> core_;
};

}  // namespace cocluster
