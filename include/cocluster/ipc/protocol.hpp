// The internal messages between master and worker (Node: the NODE_CLUSTER messages), carried
// as message_kind::internal envelopes. One byte names the message; fields follow.
// The message flow is in docs/DESIGN.md, section "Protocol".
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <variant>

namespace cocluster::ipc::protocol {

struct Online {};                 // worker -> master: the worker runtime has started
struct Disconnect {};             // master -> worker: close your servers, then the channel
struct ExitedAfterDisconnect {};  // worker -> master: I am leaving on purpose (sent before my EOF)

using InternalMessage = std::variant<Online, Disconnect, ExitedAfterDisconnect>;

enum class tag : std::uint8_t { online = 1, disconnect = 2, exited_after_disconnect = 3 };

inline std::string encode(const InternalMessage& m) {
  return std::string(1, static_cast<char>(std::visit(
                            [](const auto& v) -> tag {
                              using T = std::decay_t<decltype(v)>;
                              if constexpr (std::is_same_v<T, Online>) return tag::online;
                              else if constexpr (std::is_same_v<T, Disconnect>) return tag::disconnect;
                              else return tag::exited_after_disconnect;
                            },
                            m)));
}

// nullopt for anything that is not one of our messages: the caller treats it as a protocol error.
inline std::optional<InternalMessage> decode(std::string_view bytes) {
  if (bytes.size() != 1) return std::nullopt;
  switch (static_cast<tag>(bytes[0])) {
    case tag::online: return Online{};
    case tag::disconnect: return Disconnect{};
    case tag::exited_after_disconnect: return ExitedAfterDisconnect{};
  }
  return std::nullopt;
}

}  // namespace cocluster::ipc::protocol
