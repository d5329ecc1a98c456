// (Worker process.) A worker whose master stops it gracefully: with COCLUSTER_MASTER_SIGNALS
// set in its environment (a Supervisor that handles signals sets it), SIGTERM, SIGINT, SIGHUP,
// SIGTTIN and SIGTTOU (the signals the Supervisor acts on) sent by anyone but the master are
// ignored, so a signal to the whole process group (systemd's
// KillMode=control-group, Ctrl-C in a terminal, `kill -TERM -PGID`) reaches the master, which
// drains this worker with a disconnect, instead of ending the worker mid-request. The master's
// own signal (worker->kill(), its drain timer) still ends the worker as the signal's default
// action would, so Node's worker.kill() semantics are kept. The master's death is still seen:
// the channel's EOF, and the parent-death backstop (detail/parent_death.hpp).
//   detail::worker::master_signals::adopt();   // in this_worker.start(); unsets the variable
#pragma once

#include "cocluster/detail/config.hpp"

#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdlib>

#include "cocluster/detail/worker_identity.hpp"

namespace cocluster::detail::worker {

struct master_signals {
  // Reads and removes the variable (programs this worker runs are not our workers); installs
  // the handlers when it was "1". True if installed.
  static bool adopt() noexcept {
    const char* v = std::getenv(master_signals_variable);
    const bool wanted = v && v[0] == '1' && v[1] == '\0';
    ::unsetenv(master_signals_variable);
    if (!wanted) return false;
    master().store(::getppid());
    struct sigaction action {};
    action.sa_sigaction = &on_signal;
    action.sa_flags = SA_SIGINFO | SA_RESTART;
    ::sigemptyset(&action.sa_mask);
    // Every signal the Supervisor handles: a group SIGHUP (a terminal hang-up, `kill -HUP -PGID`)
    // must reload, not end every worker; SIGTTIN/SIGTTOU would stop them.
    for (int sig : {SIGTERM, SIGINT, SIGHUP, SIGTTIN, SIGTTOU})
      if (::sigaction(sig, &action, nullptr) != 0) return false;
    return true;
  }

 private:
  static std::atomic<pid_t>& master() noexcept {
    static std::atomic<pid_t> pid{0};
    return pid;
  }

  // Async-signal-safe: sigaction, raise, an atomic. From the master (si_pid): the default
  // action, so the exit status names the signal; from anyone else (another process, the
  // terminal's kernel-sent SIGINT): nothing, the master decides.
  static void on_signal(int sig, siginfo_t* info, void*) {
    const int saved_errno = errno;
    if (info && info->si_code == SI_USER && info->si_pid == master().load()) {
      struct sigaction fallback {};
      fallback.sa_handler = SIG_DFL;
      ::sigemptyset(&fallback.sa_mask);
      ::sigaction(sig, &fallback, nullptr);
      ::raise(sig);  // delivered when this handler returns (the signal is blocked inside it)
    }
    errno = saved_errno;
  }
};

}  // namespace cocluster::detail::worker
