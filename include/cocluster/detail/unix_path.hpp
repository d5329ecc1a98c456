// The one rule for Unix socket paths longer than sun_path (Node's too): a path that does not
// fit is used by its shorter form relative to this process's cwd. The master binds that form;
// the worker names its server's endpoint with it.
//   std::string p = detail::short_unix_path(path);   // empty: no form fits
#pragma once

#include "cocluster/detail/config.hpp"

#include <sys/un.h>

#include <cstddef>
#include <filesystem>
#include <string>
#include <system_error>

namespace cocluster::detail {

// `path` itself if it fits sun_path, else its equivalent relative to the cwd if that fits,
// else empty. Never throws.
inline std::string short_unix_path(const std::string& path) {
  constexpr std::size_t limit = sizeof(sockaddr_un{}.sun_path);
  if (path.size() < limit) return path;
  std::error_code ec;
  auto relative = std::filesystem::path(path).lexically_relative(std::filesystem::current_path(ec)).string();
  if (!ec && !relative.empty() && relative.size() < limit) return relative;
  return {};
}

}  // namespace cocluster::detail
