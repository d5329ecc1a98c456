// The internal messages between master and worker (Node: the NODE_CLUSTER messages), carried
// as message_kind::internal envelopes. One byte names the message; its fields follow in host
// byte order (both ends run on one machine). The message flow is in docs/DESIGN.md, "Protocol".
//   std::string bytes = protocol::encode(protocol::Accepted{seq, true});
//   if (auto m = protocol::decode(bytes)) std::visit(handler, *m);
#pragma once

#include "cocluster/detail/config.hpp"

#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <variant>
#include <vector>

namespace cocluster::ipc::protocol {

struct Online {};                 // worker -> master: the worker runtime has started
struct Disconnect {};             // master -> worker: close your servers, then the channel
struct ExitedAfterDisconnect {};  // worker -> master: I am leaving on purpose (sent before my EOF)

// worker -> master (Node: queryServer): find or create the listener for this key.
struct QueryServer {
  std::uint32_t seq = 0;
  std::uint8_t type = 0;  // AddressType
  std::string address;    // an IP address as text, or an absolute Unix path
  std::uint16_t port = 0;
  std::int32_t fd = -1;   // listen({fd}): an fd of the master's, or -1
  std::uint32_t index = 0;
  std::uint32_t backlog = 0;
  std::int32_t unix_mode = -1;  // a Unix path's permission bits, or -1 (ListenOptions::unix_mode)
  std::uint32_t defer_accept = 0;  // seconds of TCP_DEFER_ACCEPT, 0: off (ListenOptions::defer_accept)
};

// master -> worker: the answer to QueryServer `seq`. A shared listener comes as the handle.
struct QueryReply {
  std::uint32_t seq = 0;
  std::int32_t errno_value = 0;  // 0: success
  std::uint32_t server = 0;      // the master's id of the listener
  bool shared = false;           // true: accept on the attached handle; false: newconn arrives
  std::string address;           // where the listener is (the real port for listen(0))
  std::uint16_t port = 0;
};

struct Listening {  // worker -> master: my server `server` is listening
  std::uint32_t server = 0;
};

// master -> worker: a connection accepted on `server` (the handle), hand-off `seq`.
struct NewConn {
  std::uint32_t server = 0;
  std::uint32_t seq = 0;
  std::string remote;  // the peer's sockaddr as accept4 returned it
};

struct Accepted {  // worker -> master (Node: the ack of newconn)
  std::uint32_t server = 0;
  std::uint32_t seq = 0;
  bool ok = false;
};

// master -> worker (no Node equivalent): several connections accepted on `server` for this
// worker at once, as one frame with one fd per connection (frame_header::extra_handles), in
// the order of `seqs` and `remotes`; sent when more than one waits for the same worker.
struct NewConnBatch {
  std::uint32_t server = 0;
  std::vector<std::uint32_t> seqs;
  std::vector<std::string> remotes;
};

// worker -> master (no Node equivalent): the acks for `server` not yet sent, each an
// `accepted` (`accepted`: ok, `refused`: not ok); sent instead of `accepted` when there are
// several (refusals wait for the end of the worker's loop turn; an ok ack goes out at once,
// taking them along).
struct AcceptedBatch {
  std::uint32_t server = 0;
  std::vector<std::uint32_t> accepted;
  std::vector<std::uint32_t> refused;
};

struct Close {  // worker -> master: my server `server` is closed
  std::uint32_t server = 0;
};

// master -> worker: report how many connections you have open (LeastConnections asks once).
struct CountConnections {};

// worker -> master: my open connections, and every connection I have taken since I started
// (handed over by the master or accepted on a shared socket), after CountConnections.
// Coalesced: at most one per turn of the worker's event loop, and only when either changed
// since the last one.
struct OpenConnections {
  std::uint32_t count = 0;
  std::uint64_t total = 0;
};

// master -> worker (no Node equivalent): send a Heartbeat every `interval_ms` from your event
// loop. Sent once, before `online`, when Settings::heartbeat_timeout is set.
struct HeartbeatRequest {
  std::uint32_t interval_ms = 0;
};

// worker -> master: my event loop turns (one per interval, from a timer on that loop). The
// worker starts the beat, not the master: a ping would sit unread behind user messages while
// the worker's reading is paused on a full inbox, and a worker that is fine would be killed.
struct Heartbeat {};

// worker -> master: this_worker.ready() was called: the worker has warmed up and serves
// (Settings::ready_on decides whether the master also counts a first `listening` as ready).
struct Ready {};

using InternalMessage = std::variant<Online, Disconnect, ExitedAfterDisconnect, QueryServer, QueryReply, Listening,
                                     NewConn, Accepted, Close, CountConnections, OpenConnections, HeartbeatRequest,
                                     Heartbeat, Ready, NewConnBatch, AcceptedBatch>;

// The tag of each message is its index in InternalMessage plus one.
template <class T>
constexpr std::uint8_t tag_of() {
  return []<std::size_t... I>(std::index_sequence<I...>) {
    std::uint8_t tag = 0;
    ((std::is_same_v<T, std::variant_alternative_t<I, InternalMessage>> ? (tag = I + 1) : 0), ...);
    return tag;
  }(std::make_index_sequence<std::variant_size_v<InternalMessage>>{});
}

// Whether `bytes` is tagged as a message a worker sends (Online, ExitedAfterDisconnect,
// QueryServer, Listening, Accepted, Close, OpenConnections, Heartbeat, Ready, AcceptedBatch).
// The master decodes no other: a decoded list costs more than its bytes (a NewConnBatch of
// 16 million empty remotes, 64 MiB on the wire, would take 512 MiB of strings), and only the
// master sends those.
inline bool sent_by_worker(std::string_view bytes) noexcept {
  if (bytes.empty()) return false;
  const auto tag = static_cast<std::uint8_t>(bytes[0]);
  for (std::uint8_t t : {tag_of<Online>(), tag_of<ExitedAfterDisconnect>(), tag_of<QueryServer>(), tag_of<Listening>(),
                         tag_of<Accepted>(), tag_of<Close>(), tag_of<OpenConnections>(), tag_of<Heartbeat>(),
                         tag_of<Ready>(), tag_of<AcceptedBatch>()})
    if (t == tag) return true;
  return false;
}

namespace detail {

class writer {
 public:
  explicit writer(std::uint8_t tag) { out_.push_back(static_cast<char>(tag)); }
  template <class Int>
    requires std::is_integral_v<Int>
  writer& operator<<(Int v) {
    char bytes[sizeof v];
    std::memcpy(bytes, &v, sizeof v);
    out_.append(bytes, sizeof v);
    return *this;
  }
  writer& operator<<(std::string_view s) {
    *this << static_cast<std::uint32_t>(s.size());
    out_.append(s);
    return *this;
  }
  std::string take() { return std::move(out_); }

 private:
  std::string out_;
};

// Reads fields in order; any read past the end makes ok() false (and later reads no-ops).
class reader {
 public:
  explicit reader(std::string_view in) : in_(in) {}
  template <class Int>
    requires std::is_integral_v<Int>
  reader& operator>>(Int& v) {
    if (!ok_ || in_.size() < sizeof v) {
      ok_ = false;
      return *this;
    }
    std::memcpy(&v, in_.data(), sizeof v);
    in_.remove_prefix(sizeof v);
    return *this;
  }
  reader& operator>>(std::string& s) {
    std::uint32_t n = 0;
    *this >> n;
    if (!ok_ || in_.size() < n) {
      ok_ = false;
      return *this;
    }
    s.assign(in_.data(), n);
    in_.remove_prefix(n);
    return *this;
  }
  bool ok() const noexcept { return ok_; }
  // Every field read and nothing left over.
  bool complete() const noexcept { return ok_ && in_.empty(); }
  // A field read whole but not valid (a bool that is neither 0 nor 1).
  void fail() noexcept { ok_ = false; }

 private:
  std::string_view in_;
  bool ok_ = true;
};

// The fields of each message, in wire order, for both directions.
template <class Stream> void fields(Stream&, Online&) {}
template <class Stream> void fields(Stream&, Disconnect&) {}
template <class Stream> void fields(Stream&, ExitedAfterDisconnect&) {}
template <class Stream> void fields(Stream& s, QueryServer& m) {
  s& m.seq& m.type& m.address& m.port& m.fd& m.index& m.backlog& m.unix_mode& m.defer_accept;
}
template <class Stream> void fields(Stream& s, QueryReply& m) {
  s& m.seq& m.errno_value& m.server& m.shared& m.address& m.port;
}
template <class Stream> void fields(Stream& s, Listening& m) { s& m.server; }
template <class Stream> void fields(Stream& s, NewConn& m) { s& m.server& m.seq& m.remote; }
template <class Stream> void fields(Stream& s, Accepted& m) { s& m.server& m.seq& m.ok; }
template <class Stream> void fields(Stream& s, Close& m) { s& m.server; }
template <class Stream> void fields(Stream&, CountConnections&) {}
template <class Stream> void fields(Stream& s, OpenConnections& m) { s& m.count& m.total; }
template <class Stream> void fields(Stream& s, HeartbeatRequest& m) { s& m.interval_ms; }
template <class Stream> void fields(Stream&, Heartbeat&) {}
template <class Stream> void fields(Stream&, Ready&) {}
template <class Stream> void fields(Stream& s, NewConnBatch& m) { s& m.server& m.seqs& m.remotes; }
template <class Stream> void fields(Stream& s, AcceptedBatch& m) { s& m.server& m.accepted& m.refused; }

template <class T> struct is_vector : std::false_type {};
template <class T> struct is_vector<std::vector<T>> : std::true_type {};

// `s & field` writes or reads, so one list of fields serves both.
struct encoding {
  writer& w;
  template <class T> encoding& operator&(T& v) {
    if constexpr (std::is_same_v<T, bool>) w << static_cast<std::uint8_t>(v);
    else if constexpr (std::is_same_v<T, std::string>) w << std::string_view(v);
    else if constexpr (is_vector<T>::value) {  // a u32 count, then the elements
      w << static_cast<std::uint32_t>(v.size());
      for (auto& e : v) *this & e;
    } else w << v;
    return *this;
  }
};
struct decoding {
  reader& r;
  template <class T> decoding& operator&(T& v) {
    if constexpr (std::is_same_v<T, bool>) {
      std::uint8_t b = 2;
      r >> b;
      if (b > 1) r.fail();  // only our encoding is accepted (found by tests/fuzz/protocol_fuzz.cpp)
      v = b == 1;
    } else if constexpr (is_vector<T>::value) {
      // No reserve from the count: a peer's count costs only what its bytes carry, and the
      // loop ends at the first element missing.
      std::uint32_t n = 0;
      r >> n;
      for (std::uint32_t i = 0; i < n && r.ok(); ++i) *this & v.emplace_back();
    } else {
      r >> v;
    }
    return *this;
  }
};

}  // namespace detail

inline std::string encode(InternalMessage m) {
  return std::visit(
      [](auto& v) {
        detail::writer w(tag_of<std::decay_t<decltype(v)>>());
        detail::encoding e{w};
        detail::fields(e, v);
        return w.take();
      },
      m);
}

// nullopt for anything that is not exactly one of our messages: the caller treats it as a
// protocol error.
inline std::optional<InternalMessage> decode(std::string_view bytes) {
  if (bytes.empty()) return std::nullopt;
  const auto tag = static_cast<std::uint8_t>(bytes[0]);
  if (tag == 0 || tag > std::variant_size_v<InternalMessage>) return std::nullopt;
  std::optional<InternalMessage> out;
  [&]<std::size_t... I>(std::index_sequence<I...>) {
    ((tag == I + 1 ? (void)out.emplace(std::in_place_index<I>) : void()), ...);
  }(std::make_index_sequence<std::variant_size_v<InternalMessage>>{});
  detail::reader r(bytes.substr(1));
  detail::decoding d{r};
  std::visit([&](auto& v) { detail::fields(d, v); }, *out);
  if (!r.complete()) return std::nullopt;
  return out;
}

}  // namespace cocluster::ipc::protocol
