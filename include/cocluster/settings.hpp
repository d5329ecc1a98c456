// How the master starts workers. Node: cluster.settings / cluster.setupMaster().
//   cocluster::Settings s;  s.args = {"--serve"};  s.env["MODE"] = "fast";  s.silent = true;
//   master.setup(s);   // later forks only; then w->stdout_pipe() is the worker's stdout
//   master.setup_merge({.silent = false});   // Node's setupMaster(): only the fields given change
#pragma once

#include "cocluster/detail/config.hpp"

#include <sys/types.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <map>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "cocluster/ipc/channel.hpp"

namespace cocluster {

// The default bounds on what one process holds unread from the other end of a channel (in
// the master: per worker, Settings; in a worker: this_worker.start()).
inline constexpr std::size_t default_max_unread_messages = 65536;
inline constexpr std::size_t default_max_unread_bytes = std::size_t{32} << 20;

// Variables added to a worker's environment (Node: the env of cluster.fork(env)).
using Env = std::map<std::string, std::string>;

// What one of a worker's fds 0, 1, 2 is (Node: an entry of the `stdio` option).
class Stdio {
 public:
  enum class Kind { inherit, pipe, ignore, fd };

  // inherit, so that `std::array<Stdio, 3> io;  io[1] = Stdio::pipe();` pipes stdout only.
  constexpr Stdio() noexcept : Stdio(Kind::inherit, -1) {}

  // The master's own fd of that number (Node: 'inherit').
  static constexpr Stdio inherit() noexcept { return Stdio(Kind::inherit, -1); }
  // A pipe the master reads (or, for stdin, writes) through worker->stdout_pipe() etc.
  static constexpr Stdio pipe() noexcept { return Stdio(Kind::pipe, -1); }
  // /dev/null (Node: 'ignore').
  static constexpr Stdio ignore() noexcept { return Stdio(Kind::ignore, -1); }
  // A copy of the master's fd `fd` (Node: an integer). The master keeps its fd; it must be
  // open when fork() is called.
  static constexpr Stdio fd(int fd) noexcept { return Stdio(Kind::fd, fd); }

  constexpr Kind kind() const noexcept { return kind_; }
  // The master's fd for Kind::fd, else -1.
  constexpr int descriptor() const noexcept { return fd_; }
  friend constexpr bool operator==(const Stdio&, const Stdio&) = default;

 private:
  constexpr Stdio(Kind k, int fd) noexcept : kind_(k), fd_(fd) {}
  Kind kind_;
  int fd_;
};

// When a worker counts as ready (worker->ready(), master.ready(), the `ready` event), for a
// supervisor that waits for a replacement before retiring the worker it replaces. Ours: Node
// has no readiness (PM2: wait_ready / listen_timeout).
enum class ReadyOn {
  listening,       // its first server listens (the `listening` event), or it calls this_worker.ready()
  explicit_ready,  // only this_worker.ready(): for a worker that warms up after listen() (PM2: wait_ready)
  online,          // the worker runtime has started (the `online` event), or this_worker.ready()
};

struct Settings {
  // Executable each worker runs. Default: this executable (/proc/self/exe).
  std::string exec{};
  // Arguments after argv[0]. Default: the master's own arguments (Node: process.argv.slice(2)).
  std::optional<std::vector<std::string>> args{};
  // Added to the master's environment for every worker; fork(env) adds on top.
  Env env{};
  // Working directory of workers. Default: the master's.
  std::string cwd{};
  // Node: silent. True: the worker's stdin, stdout and stderr are pipes to the master
  // (worker->stdin_pipe(), stdout_pipe(), stderr_pipe()) instead of the master's own.
  bool silent = false;
  // Node: stdio. The worker's fds 0, 1, 2; overrides `silent` when set. Node's array also
  // needs an 'ipc' entry; ours has none: the channel is always fd 3 (COCLUSTER_CHANNEL_FD).
  std::optional<std::array<Stdio, 3>> stdio{};
  // Node: uid, gid. The worker's user and group (setuid(2)/setgid(2), after chdir, before
  // exec; its supplementary groups are cleared when the master runs as root). Without the
  // permission fork() fails with EPERM and the step in what().
  std::optional<uid_t> uid{};
  std::optional<gid_t> gid{};
  // (Every field has an initializer so that `Settings{.args = ...}` is clean under -Wextra.)
  // Framing limits and send-queue size of every master-worker channel.
  ipc::ChannelOptions channel{};
  // Unread user messages held per worker, by count and by bytes; once either is reached the
  // master stops reading that worker's channel (its sends then wait) until worker.receive()
  // catches up. Nothing is dropped. The byte bound is checked before each message is read, so
  // the master holds at most max_unread_bytes plus one message (a single message larger than
  // the bound is still delivered; ChannelOptions::max_message_size bounds that).
  std::size_t max_unread_messages = default_max_unread_messages;
  std::size_t max_unread_bytes = default_max_unread_bytes;
  // Hung workers (gunicorn: timeout; Node has none). Each worker's runtime sends the master a
  // small heartbeat every heartbeat_interval from a timer on its own event loop; a worker not
  // heard from for heartbeat_timeout (its loop blocked: a handler that never returns, a
  // deadlock) is killed with SIGKILL, logged, reported as an `error` event (std::errc::timed_out)
  // and then as its `exit`, and worker->unresponsive() becomes true (exited_after_disconnect
  // stays false: a supervisor replaces it). The clock starts at the worker's first heartbeat
  // (its event loop's first turns: setting up before io.run() is not a hang; a Supervisor's
  // boot timer covers a worker that never gets there); while the master itself has paused
  // reading that worker (unread messages), it does not run.
  // 0 (the default): off, as in Node. gunicorn's default is 30 s.
  std::chrono::milliseconds heartbeat_timeout{0};
  // How often a worker sends its heartbeat; 0 (the default): heartbeat_timeout / 4. Must be
  // below heartbeat_timeout (setup() throws std::invalid_argument otherwise).
  std::chrono::milliseconds heartbeat_interval{0};
  // When a worker forked with these settings is ready (see ReadyOn).
  ReadyOn ready_on = ReadyOn::listening;
  // Node (and Go, since 1.19) raise the process's soft RLIMIT_NOFILE to its hard limit once,
  // at start. Here the master raises its own before each fork made with this set (when it is
  // below the hard limit), and the worker inherits it: the usual soft limit, 1024, is below
  // what one server process holds (a master parks up to 4,096 connections; a worker serving
  // 2,000 clients holds 2,000 fds), and past it accept(2) fails with EMFILE. Programs a worker
  // starts inherit it too (Go gives those the original back; Node does not). false: the fork
  // leaves the limits as they are, for a master that lowers its own on purpose (a raise done
  // by an earlier fork stays).
  bool raise_fd_limit = true;
};

namespace detail {
// The interval a worker is asked to beat at, 0 when the heartbeat is off; throws
// std::invalid_argument for settings that cannot work.
inline std::chrono::milliseconds heartbeat_interval(const Settings& s) {
  using std::chrono::milliseconds;
  if (s.heartbeat_timeout < milliseconds(0) || s.heartbeat_interval < milliseconds(0))
    throw std::invalid_argument("cocluster: heartbeat_timeout and heartbeat_interval cannot be negative");
  if (s.heartbeat_timeout == milliseconds(0)) return milliseconds(0);
  // (Past this, the deadline's sum overflows the clock's nanoseconds: milliseconds::max(),
  // meant as "never", killed every worker at its first beat.)
  if (s.heartbeat_timeout > std::chrono::hours(24))
    throw std::invalid_argument("cocluster: heartbeat_timeout (" + std::to_string(s.heartbeat_timeout.count()) +
                                " ms) above a day; 0 turns the heartbeat off");
  if (s.heartbeat_interval == milliseconds(0)) return std::max(s.heartbeat_timeout / 4, milliseconds(1));
  if (s.heartbeat_interval >= s.heartbeat_timeout)
    throw std::invalid_argument("cocluster: heartbeat_interval (" + std::to_string(s.heartbeat_interval.count()) +
                                " ms) must be below heartbeat_timeout (" +
                                std::to_string(s.heartbeat_timeout.count()) + " ms)");
  if (s.heartbeat_interval > milliseconds(UINT32_MAX))
    throw std::invalid_argument("cocluster: heartbeat_interval too long");
  return s.heartbeat_interval;
}
}  // namespace detail

// Node: the object given to cluster.setupMaster(settings), which changes only the keys it
// has. Each field set here replaces that field of the Settings; the others stay.
//   master.setup_merge({.args = std::vector<std::string>{"--serve"}});   // exec, env, ... kept
// A field cannot be reset to "unset" this way (Node cannot either): use setup(Settings).
struct SettingsPatch {
  std::optional<std::string> exec{};
  std::optional<std::vector<std::string>> args{};
  std::optional<Env> env{};
  std::optional<std::string> cwd{};
  std::optional<bool> silent{};
  std::optional<std::array<Stdio, 3>> stdio{};
  std::optional<uid_t> uid{};
  std::optional<gid_t> gid{};
  std::optional<ipc::ChannelOptions> channel{};
  std::optional<std::size_t> max_unread_messages{};
  std::optional<std::size_t> max_unread_bytes{};
  std::optional<std::chrono::milliseconds> heartbeat_timeout{};
  std::optional<std::chrono::milliseconds> heartbeat_interval{};
  std::optional<ReadyOn> ready_on{};
  std::optional<bool> raise_fd_limit{};

  void apply_to(Settings& s) const {
    if (exec) s.exec = *exec;
    if (args) s.args = *args;
    if (env) s.env = *env;
    if (cwd) s.cwd = *cwd;
    if (silent) s.silent = *silent;
    if (stdio) s.stdio = *stdio;
    if (uid) s.uid = *uid;
    if (gid) s.gid = *gid;
    if (channel) s.channel = *channel;
    if (max_unread_messages) s.max_unread_messages = *max_unread_messages;
    if (max_unread_bytes) s.max_unread_bytes = *max_unread_bytes;
    if (heartbeat_timeout) s.heartbeat_timeout = *heartbeat_timeout;
    if (heartbeat_interval) s.heartbeat_interval = *heartbeat_interval;
    if (ready_on) s.ready_on = *ready_on;
    if (raise_fd_limit) s.raise_fd_limit = *raise_fd_limit;
  }
};

}  // namespace cocluster
