// How the master starts workers. Node: cluster.settings / cluster.setupMaster().
//   cocluster::Settings s;  s.args = {"--serve"};  s.env["MODE"] = "fast";  master.setup(s);
#pragma once

#include <cstddef>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "cocluster/ipc/channel.hpp"

namespace cocluster {

// Variables added to a worker's environment (Node: the env of cluster.fork(env)).
using Env = std::map<std::string, std::string>;

struct Settings {
  // Executable each worker runs. Default: this executable (/proc/self/exe).
  std::string exec;
  // Arguments after argv[0]. Default: the master's own arguments (Node: process.argv.slice(2)).
  std::optional<std::vector<std::string>> args;
  // Added to the master's environment for every worker; fork(env) adds on top.
  Env env;
  // Working directory of workers. Default: the master's.
  std::string cwd;
  // Framing limits and send-queue size of every master-worker channel.
  ipc::ChannelOptions channel;
  // Unread user messages held per worker; beyond it the master stops reading that worker's
  // channel (its sends then wait) until worker.receive() catches up. Nothing is dropped.
  std::size_t max_unread_messages = 65536;
};

}  // namespace cocluster
