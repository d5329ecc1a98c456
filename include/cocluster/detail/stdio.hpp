// A worker's fds 0, 1, 2, made in the master before fork from Settings::stdio (or silent):
//   auto fds = detail::open_stdio(detail::stdio_choice(settings));
//   spawn(request, channel_end, std::move(fds.child));   // fds.master: the master's pipe ends
#pragma once

#include "cocluster/detail/config.hpp"

#include <fcntl.h>

#include <array>
#include <string>
#include <system_error>

#include "cocluster/detail/syscalls.hpp"
#include "cocluster/detail/unique_fd.hpp"
#include "cocluster/settings.hpp"

namespace cocluster::detail {

// Node: stdio when given, else silent ? ['pipe', 'pipe', 'pipe'] : the master's own.
inline std::array<Stdio, 3> stdio_choice(const Settings& s) {
  if (s.stdio) return *s.stdio;
  if (s.silent) return {Stdio::pipe(), Stdio::pipe(), Stdio::pipe()};
  return {Stdio::inherit(), Stdio::inherit(), Stdio::inherit()};
}

struct stdio_fds {
  std::array<unique_fd, 3> child;   // becomes the worker's fd i; empty: it inherits the master's
  std::array<unique_fd, 3> master;  // the master's end of the pipe for slot i; empty: not piped
};

// Every fd is close-on-exec (spawn's dup2 in the child clears the flag on the copy only).
// Throws std::system_error naming what failed; what was opened before is closed.
inline stdio_fds open_stdio(const std::array<Stdio, 3>& choice) {
  stdio_fds out;
  for (int i = 0; i < 3; ++i) {
    switch (choice[i].kind()) {
      case Stdio::Kind::inherit: break;
      case Stdio::Kind::pipe: {
        auto [read_end, write_end] = make_pipe();
        // The worker reads its stdin and writes its stdout and stderr.
        out.child[i] = i == 0 ? std::move(read_end) : std::move(write_end);
        out.master[i] = i == 0 ? std::move(write_end) : std::move(read_end);
        break;
      }
      case Stdio::Kind::ignore: {
        const int fd = retry_on_eintr([] { return ::open("/dev/null", O_RDWR | O_CLOEXEC); });
        if (fd < 0) throw_last_error("open /dev/null");
        out.child[i] = unique_fd(fd);
        break;
      }
      case Stdio::Kind::fd: {
        std::error_code ec;
        out.child[i] = dup_cloexec(choice[i].descriptor(), ec);
        if (ec) throw std::system_error(ec, "stdio[" + std::to_string(i) + "]: dup of fd " +
                                                std::to_string(choice[i].descriptor()));
        break;
      }
    }
  }
  return out;
}

}  // namespace cocluster::detail
