// cocluster: Node.js's cluster module for C++20 coroutines over standalone Asio.
// Includes the public headers, nothing else.
#pragma once

#include "cocluster/detail/config.hpp"

#include "cocluster/address.hpp"
#include "cocluster/error.hpp"
#include "cocluster/events.hpp"
#include "cocluster/exit_status.hpp"
#include "cocluster/ipc/channel.hpp"
#include "cocluster/log.hpp"
#include "cocluster/master.hpp"
#include "cocluster/message.hpp"
#include "cocluster/policy/dispatch.hpp"
#include "cocluster/policy/handoff_listener.hpp"
#include "cocluster/policy/least_connections.hpp"
#include "cocluster/policy/policy.hpp"
#include "cocluster/policy/remote.hpp"
#include "cocluster/policy/reuse_port.hpp"
#include "cocluster/policy/round_robin.hpp"
#include "cocluster/policy/runtime.hpp"
#include "cocluster/policy/shared_socket.hpp"
#include "cocluster/policy/sticky.hpp"
#include "cocluster/server.hpp"
#include "cocluster/settings.hpp"
#include "cocluster/this_worker.hpp"
#include "cocluster/worker.hpp"
#include "cocluster/worker_state.hpp"
