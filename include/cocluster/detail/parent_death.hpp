// A worker's backstop for its master's death. The orderly path is the channel's EOF, which the
// runtime's read loop turns into on_disconnect() (by default exit(0)). The kernel's
// parent-death signal (PR_SET_PDEATHSIG) arrives at the same moment, so it must not end the
// process itself: spawn sets SIGTERM (a worker that never starts the runtime still dies with
// its master), and the runtime's start() replaces it with a signal handled here, which only
// arms a timer. If the read loop has not reached the EOF when the timer fires (a loop blocked
// in user code), and the master is really gone, the worker is ended with SIGKILL.
//   detail::parent_death::arm();         // in this_worker.start()
//   detail::parent_death::stand_down();  // the read loop has seen the channel end
#pragma once

#include "cocluster/detail/config.hpp"

#include <signal.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>

namespace cocluster::detail {

struct parent_death {
  // How long a worker whose master died may take to reach the channel's EOF by itself.
  static constexpr std::chrono::milliseconds grace{2000};

  // The signal the runtime asks the kernel for. A real-time signal, so that no signal a
  // program commonly uses (SIGTERM, SIGHUP, SIGUSR1, ...) changes meaning in a worker.
  static int signal_number() noexcept { return SIGRTMIN + 4; }

  // Installs the handler and the timer, then asks for the signal. Returns false (and leaves
  // spawn's SIGTERM in place) if any step fails.
  static bool arm() noexcept {
    auto& s = state();
    s.master.store(::getppid());
    struct sigaction action {};
    action.sa_sigaction = &on_signal;
    action.sa_flags = SA_SIGINFO | SA_RESTART;
    ::sigemptyset(&action.sa_mask);
    if (::sigaction(signal_number(), &action, nullptr) != 0) return false;
    sigevent when{};
    when.sigev_notify = SIGEV_SIGNAL;
    when.sigev_signo = signal_number();
    if (::timer_create(CLOCK_MONOTONIC, &when, &s.timer) != 0) return false;
    s.timer_made.store(true);
    return ::prctl(PR_SET_PDEATHSIG, signal_number()) == 0;
  }

  // The read loop has reached the channel's end: whatever follows is the orderly path.
  static void stand_down() noexcept { state().stood_down.store(true); }

 private:
  struct shared {
    std::atomic<bool> stood_down{false};
    std::atomic<bool> timer_made{false};
    std::atomic<pid_t> master{0};
    timer_t timer{};
  };
  static shared& state() noexcept {
    static shared s;
    return s;
  }

  // Async-signal-safe throughout: atomics, getppid, timer_settime, kill.
  static void on_signal(int, siginfo_t* info, void*) {
    const int saved_errno = errno;  // the interrupted code may be about to read it
    struct restore {
      int value;
      ~restore() { errno = value; }
    } keep{saved_errno};
    auto& s = state();
    if (s.stood_down.load() || !s.timer_made.load()) return;
    if (info->si_code != SI_TIMER) {  // the kernel's parent-death signal (or a stray kill)
      itimerspec once{};
      once.it_value.tv_sec = grace.count() / 1000;
      once.it_value.tv_nsec = (grace.count() % 1000) * 1000000;
      ::timer_settime(s.timer, 0, &once, nullptr);
      return;
    }
    // The parent-death signal follows the death of the thread that forked us; a master whose
    // forking thread ended is alive and still our parent.
    if (::getppid() == s.master.load()) return;
    ::kill(::getpid(), SIGKILL);
  }
};

}  // namespace cocluster::detail
