// A started child process as a value: its pid, its pidfd registered with Asio, and an
// awaitable exit. This object is the only thing that reaps the child (one reaper, no SIGCHLD).
//   detail::Process p(ex, detail::spawn(req, fd));  ExitStatus s = co_await p.async_wait(use_awaitable);
#pragma once

#include "cocluster/detail/config.hpp"

#include <poll.h>

#include <asio/posix/stream_descriptor.hpp>
#include <asio/steady_timer.hpp>

#include <algorithm>
#include <chrono>
#include <memory>

#include "cocluster/detail/async_latch.hpp"
#include "cocluster/detail/spawn.hpp"
#include "cocluster/exit_status.hpp"

namespace cocluster::detail {

class Process {
 public:
  // If watching the process fails (registering its pidfd with Asio), the process is killed
  // and reaped before the exception leaves: nothing is left behind.
  Process(asio::any_io_executor ex, spawned_process p) {
    const pid_t pid = p.pid;
    try {
      s_ = std::make_shared<state>(ex, pid, std::move(p.pidfd));
    } catch (...) {
      ::kill(pid, SIGKILL);
      retry_on_eintr([&] { return ::waitpid(pid, nullptr, 0); });
      throw;
    }
    s_->watch();
  }
  Process(Process&&) noexcept = default;
  Process& operator=(Process&&) noexcept = default;
  ~Process() = default;

  pid_t pid() const noexcept { return s_->pid; }

  // ESRCH once the process has been reaped: the pidfd never signals a recycled pid.
  std::error_code signal(int sig) const noexcept {
    if (!s_->pidfd.is_open()) return {ESRCH, std::system_category()};
    return pidfd_send_signal(s_->pidfd.native_handle(), sig);
  }

  // Completes once the process has ended and been reaped, with how it ended.
  template <class Token>
  auto async_wait(Token&& token) {
    return s_->exited.async_wait(std::forward<Token>(token));
  }

  // For teardown without an event loop: waits up to `grace` for the exit, then SIGKILLs,
  // then reaps. Blocks; the async waiters still see the status.
  void terminate_and_reap(std::chrono::milliseconds grace) {
    if (!s_ || !s_->pidfd.is_open()) return;  // moved from, or reaped already
    pollfd pfd{s_->pidfd.native_handle(), POLLIN, 0};
    if (retry_on_eintr([&] { return ::poll(&pfd, 1, static_cast<int>(grace.count())); }) <= 0)
      signal(SIGKILL);
    s_->try_reap(/*block=*/true);
  }

 private:
  struct state : std::enable_shared_from_this<state> {
    state(asio::any_io_executor ex, pid_t p, unique_fd fd) : pid(p), pidfd(ex), retry(ex), exited(ex) {
      pidfd.assign(fd.get());  // may throw: the fd stays owned until it succeeded
      (void)fd.release();
    }

    void watch() {
      pidfd.async_wait(asio::posix::descriptor_base::wait_read, [self = shared_from_this()](std::error_code ec) {
        if (ec || !self->pidfd.is_open()) return;
        if (!self->try_reap()) self->look_again(std::chrono::milliseconds(1));
      });
    }

    // The pidfd is readable (the process has ended) but waitid finds nothing to reap: a tracer
    // (ptrace) that is not us holds the exit until it has waited for it. The pidfd stays
    // readable meanwhile, so waiting on it again would spin: look again after a delay that
    // doubles up to 100 ms.
    void look_again(std::chrono::milliseconds delay) {
      retry.expires_after(delay);
      retry.async_wait([self = shared_from_this(), delay](std::error_code ec) {
        if (ec || !self->pidfd.is_open()) return;
        if (!self->try_reap()) self->look_again(std::min(delay * 2, std::chrono::milliseconds(100)));
      });
    }

    bool try_reap(bool block = false) {
      siginfo_t info;
      std::error_code ec;
      if (!pidfd_try_reap(pidfd.native_handle(), info, ec, block)) {
        if (!ec) return false;
        // ECHILD: somebody else reaped it (a waitpid(-1) in user code). Nothing more to learn.
        finish(ExitStatus{-1, 0});
        return true;
      }
      finish(info.si_code == CLD_EXITED ? ExitStatus{info.si_status, 0} : ExitStatus{0, info.si_status});
      return true;
    }

    void finish(ExitStatus status) {
      std::error_code ignored;
      pidfd.close(ignored);
      retry.cancel();
      exited.set(status);
    }

    pid_t pid;
    asio::posix::stream_descriptor pidfd;
    asio::steady_timer retry;  // look_again()
    async_latch<ExitStatus> exited;
  };

  std::shared_ptr<state> s_;
};

}  // namespace cocluster::detail
