// The internal messages' encoding (ipc/protocol.hpp): every message survives a round trip,
// and decode() accepts exactly our encoding and nothing else. Cases found by
// tests/fuzz/protocol_fuzz.cpp are kept here.
#include "cocluster/ipc/protocol.hpp"

#include <cstring>
#include <string>

#include <doctest/doctest.h>

using namespace cocluster::ipc;

TEST_CASE("every internal message decodes to what was encoded") {
  protocol::QueryServer q;
  q.seq = 7;
  q.type = 1;
  q.address = "/tmp/a socket";
  q.port = 8080;
  q.fd = -1;
  q.index = 2;
  q.backlog = 511;
  q.unix_mode = 0660;
  q.defer_accept = 60;
  protocol::QueryReply r;
  r.seq = 7;
  r.errno_value = 98;
  r.server = 3;
  r.shared = true;
  r.address = "127.0.0.1";
  r.port = 8080;
  protocol::NewConn n;
  n.server = 3;
  n.seq = 9;
  n.remote = std::string("\x02\x00\x1f\x90\x7f\x00\x00\x01", 8);
  protocol::NewConnBatch batch;
  batch.server = 3;
  batch.seqs = {10, 12, 14};
  batch.remotes = {n.remote, std::string("\x02\x00\x1f\x91\x7f\x00\x00\x02", 8), ""};
  protocol::AcceptedBatch acks;
  acks.server = 3;
  acks.accepted = {10, 14};
  acks.refused = {12};
  const protocol::InternalMessage all[] = {protocol::Online{}, protocol::Disconnect{}, protocol::ExitedAfterDisconnect{},
                                           q, r, protocol::Listening{3}, n, protocol::Accepted{3, 9, true},
                                           protocol::Close{3}, batch, acks, protocol::AcceptedBatch{}};
  for (const auto& m : all) {
    const std::string bytes = protocol::encode(m);
    auto back = protocol::decode(bytes);
    REQUIRE(back);
    CHECK(back->index() == m.index());
    CHECK(protocol::encode(*back) == bytes);
  }
  auto back = protocol::decode(protocol::encode(batch));
  REQUIRE(back);
  const auto& b = std::get<protocol::NewConnBatch>(*back);
  CHECK(b.seqs == batch.seqs);
  CHECK(b.remotes == batch.remotes);
}

TEST_CASE("a list whose count claims more elements than its bytes hold is refused, without allocating for the count") {
  std::string bytes = protocol::encode(protocol::AcceptedBatch{3, {1, 2}, {}});
  CHECK(protocol::decode(bytes));
  // The accepted list's count (after the tag and the server) says 4 billion: the decoder stops at
  // the first element missing.
  const std::uint32_t huge = 0xFFFFFFFF;
  std::memcpy(bytes.data() + 1 + 4, &huge, sizeof huge);
  CHECK_FALSE(protocol::decode(bytes));
  CHECK_FALSE(protocol::decode(bytes.substr(0, bytes.size() - 1)));
}

TEST_CASE("a message with bytes missing or left over is refused") {
  const std::string bytes = protocol::encode(protocol::Accepted{1, 2, true});
  CHECK_FALSE(protocol::decode(bytes.substr(0, bytes.size() - 1)));
  CHECK_FALSE(protocol::decode(bytes + "x"));
  CHECK_FALSE(protocol::decode(""));
  CHECK_FALSE(protocol::decode(std::string(1, '\0')));   // tag 0
  CHECK_FALSE(protocol::decode(std::string(1, '\x7f')));  // no such tag
}

TEST_CASE("fuzz regression: a bool field that is neither 0 nor 1 is refused") {
  // tests/fuzz/protocol_fuzz.cpp found Accepted{ok = 7} decoded as ok = false: accepted, but not
  // our encoding of anything. Input 08 07 07 07 07 07 07 07 07 07.
  CHECK_FALSE(protocol::decode("\x08\x07\x07\x07\x07\x07\x07\x07\x07\x07"));
  std::string reply = protocol::encode(protocol::Accepted{1, 2, false});
  reply.back() = 2;
  CHECK_FALSE(protocol::decode(reply));
  reply.back() = 1;
  CHECK(protocol::decode(reply));
}

TEST_CASE("sent_by_worker: true for exactly the messages a worker sends, false for the master's and for no message") {
  namespace p = protocol;
  for (const p::InternalMessage& m :
       {p::InternalMessage{p::Online{}}, p::InternalMessage{p::ExitedAfterDisconnect{}}, p::InternalMessage{p::QueryServer{}},
        p::InternalMessage{p::Listening{}}, p::InternalMessage{p::Accepted{}}, p::InternalMessage{p::Close{}},
        p::InternalMessage{p::OpenConnections{}}, p::InternalMessage{p::Heartbeat{}}, p::InternalMessage{p::Ready{}},
        p::InternalMessage{p::AcceptedBatch{}}})
    CHECK_MESSAGE(p::sent_by_worker(p::encode(m)), "tag ", int(p::encode(m)[0]));
  for (const p::InternalMessage& m :
       {p::InternalMessage{p::Disconnect{}}, p::InternalMessage{p::QueryReply{}}, p::InternalMessage{p::NewConn{}},
        p::InternalMessage{p::CountConnections{}}, p::InternalMessage{p::HeartbeatRequest{}},
        p::InternalMessage{p::NewConnBatch{}}})
    CHECK_MESSAGE(!p::sent_by_worker(p::encode(m)), "tag ", int(p::encode(m)[0]));
  CHECK(!p::sent_by_worker(""));
  CHECK(!p::sent_by_worker(std::string(1, '\0')));
  CHECK(!p::sent_by_worker(std::string(1, '\x7f')));
  CHECK(std::variant_size_v<p::InternalMessage> == 16);  // a new message: say above which way it goes
}
