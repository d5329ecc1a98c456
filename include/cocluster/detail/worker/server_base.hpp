// What the worker runtime knows of any of its servers, whatever the protocol: the master's id
// for it, Node's listen index, and the two things the runtime does to one (hand it a
// connection, close it). stream_server.hpp and datagram_server.hpp are the two kinds.
#pragma once

#include <cstdint>
#include <string>

#include "cocluster/detail/unique_fd.hpp"

namespace cocluster::detail::worker {

// What deliver() made of a round-robin connection.
enum class delivery {
  queued,     // the server took it: accept() will return it
  refused,    // the server is closed (or takes no connections): the master gives it to another worker
  malformed,  // not a connection of this server's kind: the master broke the protocol
};

class server_base {
 public:
  virtual ~server_base() = default;
  // A connection the master accepted for this server (newconn): its fd and declared type.
  virtual delivery deliver(unique_fd fd, std::uint8_t tag, std::uint32_t seq, const std::string& remote) = 0;
  // Node: server.close(). Tells the master (if the server came from it) and forgets it.
  virtual void close() = 0;

  std::uint32_t id = 0;     // the master's listener id; 0 for an adopted handle
  std::string index_key;    // Node's indexesKey: address:port:type:fd
  std::uint32_t index = 0;  // which of the worker's listens on index_key this is
};

}  // namespace cocluster::detail::worker
