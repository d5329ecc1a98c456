// The receiving rules of the wire format (docs/DESIGN.md, "Wire format"), byte by byte, with no
// socket: each packet is handed to ipc::frame_parser as recvmsg would have returned it.
#include "cocluster/ipc/frame_parser.hpp"

#include <fcntl.h>

#include <asio/io_context.hpp>

#include <string>
#include <vector>

#include <doctest/doctest.h>

using namespace cocluster;
using ipc::frame_header;
using ipc::frame_parser;
using status = frame_parser::status;

namespace {

constexpr std::uint8_t first = frame_header::first;
constexpr std::uint8_t last = frame_header::last;
constexpr std::uint8_t whole = first | last;

std::string packet(std::uint8_t flags, std::uint32_t total, std::string_view payload, std::uint8_t kind = 0,
                   std::uint8_t extra_handles = 0) {
  frame_header h;
  h.flags = flags;
  h.total_size = total;
  h.handle_kind = kind;
  h.extra_handles = extra_handles;
  std::string p(reinterpret_cast<const char*>(&h), sizeof h);
  return p += payload;
}

// `n` open fds (of /dev/null: the parser never looks at what they are).
std::vector<detail::unique_fd> some_fds(int n) {
  std::vector<detail::unique_fd> fds;
  for (int i = 0; i < n; ++i) fds.emplace_back(::open("/dev/null", O_RDONLY | O_CLOEXEC));
  return fds;
}

bool is_open_fd(int fd) { return ::fcntl(fd, F_GETFD) != -1; }

// Feeds one packet and expects a protocol error whose detail is exactly `detail`.
void expect_error(frame_parser& p, const std::string& bytes, const std::string& detail,
                  std::vector<detail::unique_fd> fds = {}, int flags = 0) {
  auto r = p.feed(bytes, fds, flags);
  REQUIRE(r.what == status::failed);
  CHECK(r.error == error::protocol_error);
  CHECK(r.detail == detail);
  CHECK_FALSE(p.in_message());
}

std::string pattern(std::size_t size) {
  std::string s(size, '\0');
  for (std::size_t i = 0; i < size; ++i) s[i] = static_cast<char>(i * 131 & 0xff);
  return s;
}

}  // namespace

TEST_CASE("a first|last frame is a whole message of its kind") {
  frame_parser p(1024);
  auto r = p.feed(packet(whole, 5, "hello"));
  REQUIRE(r.what == status::message);
  CHECK(r.kind == ipc::message_kind::user);
  CHECK(r.data == "hello");
  CHECK_FALSE(r.handle);
  auto i = p.feed(packet(whole | frame_header::internal, 2, "hi"));
  REQUIRE(i.what == status::message);
  CHECK(i.kind == ipc::message_kind::internal);
  CHECK(i.data == "hi");
}

TEST_CASE("an empty message is one frame with no payload") {
  frame_parser p(1024);
  auto r = p.feed(packet(whole, 0, ""));
  REQUIRE(r.what == status::message);
  CHECK(r.data.empty());
}

TEST_CASE("a handle comes out as the fd that came with the frame and the kind it declares, unchecked") {
  frame_parser p(1024);
  auto fds = some_fds(1);
  const int fd = fds[0].get();
  auto r = p.feed(packet(whole, 3, "abc", 2), fds);
  REQUIRE(r.what == status::message);
  CHECK(r.handle.kind() == handle_kind::tcp_acceptor);  // /dev/null: adopting it would fail
  CHECK(r.handle.native_handle() == fd);
  CHECK_FALSE(fds[0]);  // taken by the parser
}

TEST_CASE("a message larger than one frame is reassembled from its frames, the handle from the first") {
  const std::string message = pattern(2 * ipc::max_fragment + 100);
  const auto total = static_cast<std::uint32_t>(message.size());
  frame_parser p(1 << 20);
  auto fds = some_fds(1);
  const int fd = fds[0].get();
  auto r = p.feed(packet(first, total, std::string_view(message).substr(0, ipc::max_fragment), 4), fds);
  CHECK(r.what == status::need_more);
  CHECK(p.in_message());
  // While a message is in progress the next payload goes straight into it, at most what is left.
  CHECK(p.payload_buffer().size() == ipc::max_fragment);
  r = p.feed(packet(0, total, std::string_view(message).substr(ipc::max_fragment, ipc::max_fragment)));
  CHECK(r.what == status::need_more);
  CHECK(p.payload_buffer().size() == 100);
  r = p.feed(packet(last, total, std::string_view(message).substr(2 * ipc::max_fragment)));
  REQUIRE(r.what == status::message);
  CHECK(r.data == message);
  CHECK(r.handle.kind() == handle_kind::unix_socket);
  CHECK(r.handle.native_handle() == fd);
  CHECK_FALSE(p.in_message());
}

TEST_CASE("rule: a packet shorter than the header is a protocol error") {
  frame_parser p(1024);
  expect_error(p, "ab", "short frame of 2 bytes");
}

TEST_CASE("rule: a bad magic byte is a protocol error") {
  frame_parser p(1024);
  std::string bytes = packet(whole, 3, "abc");
  bytes[0] = 'G';
  expect_error(p, bytes, "frame with a bad magic byte");
}

TEST_CASE("rule: an unknown handle type is a protocol error") {
  frame_parser p(1024);
  expect_error(p, packet(whole, 3, "abc", handle_kind_count), "frame with unknown handle type 6");
  expect_error(p, packet(whole, 3, "abc", 42), "frame with unknown handle type 42");
}

TEST_CASE("rule: a frame's fd count must be what its header declares") {
  frame_parser p(1024);
  expect_error(p, packet(whole, 3, "abc", 1), "frame carries 0 fds, declares 1");
  expect_error(p, packet(whole, 3, "abc"), "frame carries 1 fds, declares 0", some_fds(1));
  expect_error(p, packet(whole, 3, "abc", 1), "frame carries 10 fds, declares 1", some_fds(10));
}

TEST_CASE("an internal frame with N handles comes out as N fds of its kind, in order") {
  frame_parser p(1024);
  for (int n : {2, 5, static_cast<int>(ipc::max_fds_per_packet)}) {
    auto fds = some_fds(n);
    std::vector<int> numbers;
    for (auto& fd : fds) numbers.push_back(fd.get());
    auto r = p.feed(packet(whole | frame_header::internal, 3, "abc", 1, static_cast<std::uint8_t>(n - 1)), fds);
    REQUIRE(r.what == status::message);
    CHECK(r.kind == ipc::message_kind::internal);
    CHECK(r.handle.kind() == handle_kind::tcp_socket);
    CHECK(r.handle.native_handle() == numbers[0]);
    REQUIRE(r.extra_fds.size() == static_cast<std::size_t>(n - 1));
    for (int i = 1; i < n; ++i) CHECK(r.extra_fds[i - 1].get() == numbers[i]);
  }
  // And across frames: the fds come with the first, the message with the last.
  auto fds = some_fds(3);
  const int third = fds[2].get();
  CHECK(p.feed(packet(first | frame_header::internal, 6, "abc", 1, 2), fds).what == status::need_more);
  auto r = p.feed(packet(last | frame_header::internal, 6, "def"));
  REQUIRE(r.what == status::message);
  REQUIRE(r.extra_fds.size() == 2);
  CHECK(r.extra_fds[1].get() == third);
}

TEST_CASE("rule: a count of handles that does not match the fds is a protocol error, and every fd is closed") {
  frame_parser p(1024);
  const auto internal = static_cast<std::uint8_t>(whole | frame_header::internal);
  auto fds = some_fds(3);
  const int fd = fds[0].get();
  expect_error(p, packet(internal, 3, "abc", 1, 3), "frame carries 3 fds, declares 4", std::move(fds));
  CHECK_FALSE(is_open_fd(fd));
  expect_error(p, packet(internal, 3, "abc", 1, 1), "frame carries 3 fds, declares 2", some_fds(3));
  expect_error(p, packet(internal, 3, "abc", 1, 1), "frame carries 1 fds, declares 2", some_fds(1));
  expect_error(p, packet(internal, 3, "abc", 1, static_cast<std::uint8_t>(ipc::max_fds_per_packet)),
               "frame declares 17 handles, more than 16", some_fds(16));
  expect_error(p, packet(internal, 3, "abc", 0, 1), "frame declares extra handles but no handle type");
  // A user message has one handle at most.
  expect_error(p, packet(whole, 3, "abc", 1, 1), "user frame declares more than one handle", some_fds(2));
}

TEST_CASE("rule: a handle on a continuation frame is a protocol error") {
  frame_parser p(1024);
  CHECK(p.feed(packet(first, 6, "abc")).what == status::need_more);
  expect_error(p, packet(last, 6, "def", 1), "handle on a continuation frame", some_fds(1));
}

TEST_CASE("rule: a continuation frame with no message started is a protocol error") {
  frame_parser p(1024);
  expect_error(p, packet(last, 3, "abc"), "continuation frame without a first frame");
  expect_error(p, packet(0, 6, "abc"), "continuation frame without a first frame");
}

TEST_CASE("rule: a first frame inside a message in progress is a protocol error") {
  frame_parser p(1024);
  CHECK(p.feed(packet(first, 6, "abc")).what == status::need_more);
  expect_error(p, packet(whole, 3, "xyz"), "frame does not continue the message in progress");
}

TEST_CASE("rule: a continuation of another kind or another total size is a protocol error") {
  frame_parser p(1024);
  CHECK(p.feed(packet(first, 6, "abc")).what == status::need_more);
  expect_error(p, packet(last | frame_header::internal, 6, "def"), "frame does not continue the message in progress");
  CHECK(p.feed(packet(first, 6, "abc")).what == status::need_more);
  expect_error(p, packet(last, 7, "de"), "frame does not continue the message in progress");
}

TEST_CASE("rule: a message over max_message_size is a protocol error, one at the limit is not") {
  frame_parser p(1000);
  CHECK(p.feed(packet(whole, 1000, std::string(1000, 'x'))).what == status::message);
  expect_error(p, packet(first, 1u << 30, "abc"), "message of 1073741824 bytes exceeds the limit of 1000");
  expect_error(p, packet(whole, 1001, std::string(1001, 'x')), "message of 1001 bytes exceeds the limit of 1000");
}

TEST_CASE("rule: a first frame's size must agree with its message size") {
  frame_parser p(1024);
  expect_error(p, packet(whole, 10, "abc"), "frame size does not match its message size");   // last, short
  expect_error(p, packet(whole, 2, "abc"), "frame size does not match its message size");    // longer
  expect_error(p, packet(first, 2, "abc"), "frame size does not match its message size");    // more than all
  expect_error(p, packet(first, 10, ""), "frame size does not match its message size");      // empty, not last
}

TEST_CASE("rule: a continuation's size must agree with what is left of its message") {
  frame_parser p(1024);
  CHECK(p.feed(packet(first, 9, "abc")).what == status::need_more);
  expect_error(p, packet(last, 9, "def"), "frame size does not match its message size");  // last too early
  CHECK(p.feed(packet(first, 6, "abc")).what == status::need_more);
  expect_error(p, packet(0, 6, "def"), "frame size does not match its message size");  // complete, not last
  CHECK(p.feed(packet(first, 6, "abc")).what == status::need_more);
  expect_error(p, packet(0, 6, ""), "frame size does not match its message size");  // empty, not last
}

TEST_CASE("rule: a packet larger than what is left of the message is truncated, a protocol error") {
  frame_parser p(1024);
  CHECK(p.feed(packet(first, 6, "abc")).what == status::need_more);
  expect_error(p, packet(last, 6, "defghi"), "frame larger than expected");  // feed() flags MSG_TRUNC
  expect_error(p, packet(whole, 3, "abc"), "frame larger than expected", {}, MSG_TRUNC);
}

TEST_CASE("rule: truncated ancillary data (more than 16 fds) is a protocol error") {
  frame_parser p(1024);
  expect_error(p, packet(whole, 3, "abc", 1), "frame carries more than 16 fds", some_fds(16), MSG_CTRUNC);
}

TEST_CASE("rule: a user's message whose handle was lost to the fd limit is delivered, its handle saying so") {
  frame_parser p(1024);
  auto r = p.feed(packet(whole, 3, "abc", 1), {}, MSG_CTRUNC);
  REQUIRE(r.what == status::message);
  CHECK(r.kind == ipc::message_kind::user);
  CHECK(r.data == "abc");
  CHECK(r.handle.kind() == handle_kind::tcp_socket);  // what the sender sent
  CHECK(r.handle.lost());
  CHECK(r.handle.native_handle() == -1);
  // adopt() says why there is no socket.
  asio::io_context io;
  std::error_code ec;
  (void)r.handle.adopt<asio::ip::tcp::socket>(io, ec);
  CHECK(ec == std::errc::too_many_files_open);
  // On the first frame of a message in several frames too: the rest of it follows.
  r = p.feed(packet(first, 6, "abc", 4), {}, MSG_CTRUNC);
  REQUIRE(r.what == status::need_more);
  r = p.feed(packet(last, 6, "def"));
  REQUIRE(r.what == status::message);
  CHECK(r.data == "abcdef");
  CHECK(r.handle.kind() == handle_kind::unix_socket);
  CHECK(r.handle.lost());
  // The parser goes on.
  auto one = some_fds(1);
  r = p.feed(packet(whole, 3, "xyz", 1), one);
  REQUIRE(r.what == status::message);
  CHECK_FALSE(r.handle.lost());
  CHECK(r.handle.native_handle() >= 0);
  // A frame that breaks a rule is a protocol error, its handle lost or not: a handle on a
  // continuation frame, a first frame inside a message.
  r = p.feed(packet(last, 3, "abc", 1), {}, MSG_CTRUNC);
  REQUIRE(r.what == status::failed);
  CHECK(r.error == error::protocol_error);
  CHECK(r.detail == "handle on a continuation frame");
  CHECK(p.feed(packet(first, 6, "abc")).what == status::need_more);
  r = p.feed(packet(whole, 3, "abc", 1), {}, MSG_CTRUNC);
  REQUIRE(r.what == status::failed);
  CHECK(r.error == error::protocol_error);
  CHECK(r.detail == "frame does not continue the message in progress");
}

TEST_CASE("rule: a whole internal frame whose fds were lost to the fd limit is read, saying how many were lost") {
  frame_parser p(1024);
  const auto internal = static_cast<std::uint8_t>(whole | frame_header::internal);
  // One hand-off, its fd lost: the message, with no handle.
  auto r = p.feed(packet(internal, 3, "abc", 1), {}, MSG_CTRUNC);
  REQUIRE(r.what == status::message);
  CHECK(r.data == "abc");
  CHECK_FALSE(r.handle);
  CHECK(r.fds_lost == 1);
  // A batch of 4 of which the kernel installed the first 2.
  auto fds = some_fds(2);
  const int fd0 = fds[0].get(), fd1 = fds[1].get();
  r = p.feed(packet(internal, 3, "abc", 1, 3), fds, MSG_CTRUNC);
  REQUIRE(r.what == status::message);
  CHECK(r.handle.native_handle() == fd0);
  REQUIRE(r.extra_fds.size() == 1);
  CHECK(r.extra_fds[0].get() == fd1);
  CHECK(r.fds_lost == 2);
  // Not on a frame of a message in several frames (none carries a handle): EMFILE.
  r = p.feed(packet(first | frame_header::internal, 6, "abc", 1), {}, MSG_CTRUNC);
  CHECK(r.what == status::failed);
  CHECK(r.error == std::errc::too_many_files_open);
  // Nothing was lost from a frame received whole.
  auto one = some_fds(1);
  r = p.feed(packet(internal, 3, "abc", 1), one);
  REQUIRE(r.what == status::message);
  CHECK(r.fds_lost == 0);
}

TEST_CASE("rule: end of input is EOF, also in the middle of a message, whose handle is closed") {
  frame_parser p(1024);
  CHECK(p.feed("").what == status::end_of_input);
  auto fds = some_fds(1);
  const int fd = fds[0].get();
  CHECK(p.feed(packet(first, 6, "abc", 4), fds).what == status::need_more);
  CHECK(is_open_fd(fd));
  auto r = p.feed("");
  CHECK(r.what == status::end_of_input);
  CHECK_FALSE(r.error);
  CHECK_FALSE(is_open_fd(fd));
  CHECK_FALSE(p.in_message());
}

TEST_CASE("a protocol error drops the message in progress and closes its handle") {
  frame_parser p(1024);
  auto fds = some_fds(1);
  const int fd = fds[0].get();
  CHECK(p.feed(packet(first, 6, "abc", 1), fds).what == status::need_more);
  expect_error(p, packet(whole, 3, "xyz"), "frame does not continue the message in progress");
  CHECK_FALSE(is_open_fd(fd));
  // The parser is usable again (the channel closes on the first error; a fuzzer goes on).
  CHECK(p.feed(packet(whole, 3, "xyz")).what == status::message);
}

TEST_CASE("every fd of a refused frame is closed: the one the parser took, and the ones it left") {
  frame_parser p(1024);
  auto taken = some_fds(1);
  const int taken_fd = taken[0].get();
  expect_error(p, packet(whole, 6, "abc", 1), "frame size does not match its message size", std::move(taken));
  CHECK_FALSE(is_open_fd(taken_fd));
  auto left = some_fds(1);
  auto r = p.feed(packet(whole, 3, "abc"), left);  // declares none, carries one
  CHECK(r.what == status::failed);
  CHECK(left[0]);  // not taken: the caller's storage (the channel's) closes it
}

TEST_CASE("fuzz regression: feeding an empty packet whose data() is null is the end of input") {
  // tests/fuzz/frame_parser_fuzz.cpp found feed() copying from a null pointer (undefined
  // behaviour even for 0 bytes) when given std::string_view().
  frame_parser parser(1024);
  CHECK(parser.feed(std::string_view()).what == status::end_of_input);
  CHECK_FALSE(parser.in_message());
}

// The kernel installs the fds of a batch one by one and stops at RLIMIT_NOFILE, setting
// MSG_CTRUNC with the ones it did install: that is our limit, not more than 16 fds from the
// peer. A whole internal frame is read, the lost ones counted; a user's message is delivered,
// its handle lost (it has one at most).
TEST_CASE("a batch cut short by RLIMIT_NOFILE is reported as the fd limit, not as too many fds") {
  frame_parser p(1024);
  const auto internal = static_cast<std::uint8_t>(whole | frame_header::internal);
  auto fds = some_fds(10);  // 16 declared, 10 installed before EMFILE
  auto r = p.feed(packet(internal, 3, "abc", 1, 15), fds, MSG_CTRUNC);
  REQUIRE(r.what == status::message);
  CHECK(r.extra_fds.size() == 9);
  CHECK(r.fds_lost == 6);
  auto user_fds = some_fds(0);
  r = p.feed(packet(whole, 3, "abc", 1), user_fds, MSG_CTRUNC);
  REQUIRE(r.what == status::message);
  CHECK(r.handle.lost());
}
