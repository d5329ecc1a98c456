// Writes the seed corpus of the two fuzz targets from real encodings: each internal message
// as protocol::encode makes it (corpus/protocol), and runs of frames as the channel writes
// them, in frame_parser_fuzz's input format (corpus/frame_parser). Run from the repository
// root when the wire format changes; the output is committed:
//   g++ -std=c++20 -Iinclude tests/fuzz/make_corpus.cpp -o /tmp/make_corpus && /tmp/make_corpus
#include <cstdint>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "cocluster/ipc/frame.hpp"
#include "cocluster/ipc/protocol.hpp"

namespace {

using namespace cocluster::ipc;

void write(const std::string& path, const std::string& bytes) { std::ofstream(path, std::ios::binary) << bytes; }

std::string frame(std::uint8_t flags, std::uint32_t total, const std::string& payload, std::uint8_t handle = 0,
                  std::uint8_t extra_handles = 0) {
  frame_header h;
  h.flags = flags;
  h.handle_kind = handle;
  h.extra_handles = extra_handles;
  h.total_size = total;
  return std::string(reinterpret_cast<const char*>(&h), sizeof h) + payload;
}

// One packet of frame_parser_fuzz's input: control byte (fd count, MSG_CTRUNC, MSG_TRUNC,
// end of input), 2-byte length, the packet.
std::string packet(const std::string& p, std::uint8_t control = 0) {
  std::string out(1, static_cast<char>(control));
  out += static_cast<char>(p.size() & 0xff);
  out += static_cast<char>(p.size() >> 8);
  return out + p;
}

}  // namespace

int main() {
  namespace p = protocol;
  const std::string dir = "tests/fuzz/corpus/";
  p::QueryServer q;
  q.seq = 1;
  q.type = 1;
  q.address = "0.0.0.0";
  q.port = 8000;
  q.index = 0;
  q.backlog = 511;
  q.defer_accept = 60;
  p::QueryServer qu = q;
  qu.defer_accept = 0;
  qu.type = 3;
  qu.address = "/tmp/cocluster.sock";
  qu.port = 0;
  p::QueryReply r;
  r.seq = 1;
  r.server = 1;
  r.address = "0.0.0.0";
  r.port = 8000;
  p::QueryReply shared = r;
  shared.shared = true;
  p::QueryReply failed = r;
  failed.errno_value = 98;
  p::NewConn n;
  n.server = 1;
  n.seq = 5;
  n.remote = std::string("\x02\x00\x1f\x90\x7f\x00\x00\x01\0\0\0\0\0\0\0\0", 16);
  p::NewConnBatch batch;
  batch.server = 1;
  batch.seqs = {5, 6, 7};
  batch.remotes = {n.remote, n.remote, n.remote};
  const std::pair<const char*, p::InternalMessage> messages[] = {
      {"online", p::Online{}},      {"disconnect", p::Disconnect{}}, {"exited_after_disconnect", p::ExitedAfterDisconnect{}},
      {"query_server_tcp", q},      {"query_server_unix", qu},      {"query_reply", r},
      {"query_reply_shared", shared}, {"query_reply_errno", failed}, {"listening", p::Listening{1}},
      {"newconn", n},               {"accepted", p::Accepted{1, 5, true}}, {"refused", p::Accepted{1, 5, false}},
      {"close", p::Close{1}},       {"newconn_batch", batch},       {"accepted_batch", p::AcceptedBatch{1, {5, 7}, {6}}},
      {"count_connections", p::CountConnections{}}, {"open_connections", p::OpenConnections{3, 1ull << 40}},
      {"heartbeat_request", p::HeartbeatRequest{500}}, {"heartbeat", p::Heartbeat{}}, {"ready", p::Ready{}}};
  for (const auto& [name, m] : messages) write(dir + "protocol/" + name, p::encode(m));

  constexpr std::uint8_t whole = frame_header::first | frame_header::last;
  const std::string online = p::encode(p::Online{});
  const std::string conn = p::encode(n);
  write(dir + "frame_parser/user_message", packet(frame(whole, 5, "hello")));
  write(dir + "frame_parser/empty_message", packet(frame(whole, 0, "")));
  write(dir + "frame_parser/internal_online", packet(frame(whole | frame_header::internal, 1, online)));
  write(dir + "frame_parser/newconn_with_socket",
        packet(frame(whole | frame_header::internal, static_cast<std::uint32_t>(conn.size()), conn, 1), 1));
  const std::string conns = p::encode(batch);
  write(dir + "frame_parser/newconn_batch_with_sockets",
        packet(frame(whole | frame_header::internal, static_cast<std::uint32_t>(conns.size()), conns, 1, 2), 3));
  write(dir + "frame_parser/user_handle", packet(frame(whole, 4, "sock", 4), 1));
  write(dir + "frame_parser/three_frames", packet(frame(frame_header::first, 12, "abcd", 2), 1) +
                                               packet(frame(0, 12, "efgh")) + packet(frame(frame_header::last, 12, "ijkl")));
  write(dir + "frame_parser/two_messages", packet(frame(whole, 3, "one")) + packet(frame(whole, 3, "two")));
  write(dir + "frame_parser/eof_mid_message", packet(frame(frame_header::first, 8, "abcd")) + packet("", 16));
  write(dir + "frame_parser/truncated_fds", packet(frame(whole, 3, "abc", 1), 1 | 4));
  write(dir + "frame_parser/oversized", packet(frame(frame_header::first, 1u << 30, "x")));
  return 0;
}
