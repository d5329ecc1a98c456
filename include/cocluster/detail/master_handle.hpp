// One listener the master owns on behalf of its workers (Node: RoundRobinHandle and
// SharedHandle in lib/internal/cluster). The policies derive from it; detail::server_table
// keeps one per key and removes it once no worker holds it.
#pragma once

#include "cocluster/detail/config.hpp"

#include <unistd.h>

#include <cstdint>
#include <memory>
#include <string>
#include <utility>

#include "cocluster/address.hpp"
#include "cocluster/detail/log.hpp"
#include "cocluster/detail/unique_fd.hpp"
#include "cocluster/message.hpp"

namespace cocluster {
class Worker;
}

namespace cocluster::detail {

class master_handle {
 public:
  master_handle(std::uint32_t id, std::string key, Address address, std::string unix_path)
      : id_(id), key_(std::move(key)), address_(std::move(address)), unix_path_(std::move(unix_path)) {}
  master_handle(const master_handle&) = delete;
  master_handle& operator=(const master_handle&) = delete;
  virtual ~master_handle() = default;

  std::uint32_t id() const noexcept { return id_; }
  const std::string& key() const noexcept { return key_; }
  const Address& address() const noexcept { return address_; }

  // True if workers accept on a copy of the listener (then listener_copy() gives one).
  virtual bool shared() const noexcept = 0;
  virtual unique_fd listener_copy(std::error_code& ec) = 0;
  // The worker holds this listener from now on (its query_reply has been sent).
  virtual void add(const std::shared_ptr<Worker>& worker) = 0;
  // The worker closed its server or went away (the table counts who is left).
  virtual void remove(Worker& worker) = 0;
  virtual void accepted(Worker& worker, std::uint32_t seq, bool ok) = 0;

  // Closes the listener and everything it still holds, and removes a Unix socket's path
  // (Node removes it too, so the next listen on it succeeds).
  virtual void close() {
    if (!unix_path_.empty()) ::unlink(unix_path_.c_str());
    unix_path_.clear();
  }

 private:
  std::uint32_t id_;
  std::string key_;
  Address address_;
  std::string unix_path_;  // the path this master bound, if any
};

}  // namespace cocluster::detail
