// The channel alone, both ends in this process: framing, handles, backpressure, and what it
// does with a peer that does not speak the protocol.
#include "cocluster/ipc/channel.hpp"

#include <fcntl.h>

#include "cocluster/detail/as_tuple.hpp"
#include "cocluster/detail/read_channel.hpp"

#include <cstring>

#include <doctest/doctest.h>

#include "support.hpp"

using namespace cocluster;
using namespace test;
using namespace asio::experimental::awaitable_operators;
using ipc::Channel;
using ipc::Envelope;
using ipc::message_kind;

namespace {

const auto tuple = cocluster::as_tuple(use_awaitable);

// The tests name the two ends through references, not a structured binding: their lambdas
// capture them, which clang before 16 rejects for a binding.
std::pair<Channel, Channel> channel_pair(asio::io_context& io, ipc::ChannelOptions options = {}) {
  auto [a, b] = cocluster::detail::make_socketpair();
  return {Channel(io.get_executor(), std::move(a), options), Channel(io.get_executor(), std::move(b), options)};
}

// A channel and the raw fd of its peer, for writing what a broken or hostile peer would.
std::pair<Channel, cocluster::detail::unique_fd> channel_and_raw_peer(asio::io_context& io, ipc::ChannelOptions options = {}) {
  auto [a, b] = cocluster::detail::make_socketpair();
  return {Channel(io.get_executor(), std::move(a), options), std::move(b)};
}

void send_raw(int fd, const void* data, std::size_t size, const std::vector<int>& fds = {}) {
  iovec iov{const_cast<void*>(data), size};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  std::vector<char> control(CMSG_SPACE(sizeof(int) * fds.size()));
  if (!fds.empty()) {
    msg.msg_control = control.data();
    msg.msg_controllen = control.size();
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
    std::memcpy(CMSG_DATA(c), fds.data(), sizeof(int) * fds.size());
  }
  REQUIRE(::sendmsg(fd, &msg, MSG_NOSIGNAL) == static_cast<ssize_t>(size));
}

void send_raw_frame(int fd, ipc::frame_header h, std::string_view payload, const std::vector<int>& fds = {}) {
  std::string packet(reinterpret_cast<const char*>(&h), sizeof h);
  packet += payload;
  send_raw(fd, packet.data(), packet.size(), fds);
}

ipc::frame_header header(std::uint8_t flags, std::uint32_t total, std::uint8_t handle = 0) {
  ipc::frame_header h;
  h.flags = flags;
  h.total_size = total;
  h.handle_kind = handle;
  return h;
}

constexpr std::uint8_t whole = ipc::frame_header::first | ipc::frame_header::last;

std::string pattern(std::size_t size, unsigned seed) {
  std::string s(size, '\0');
  for (std::size_t i = 0; i < size; ++i) s[i] = static_cast<char>((i * 131 + seed * 7) & 0xff);
  return s;
}

// Receives on `ch` and expects a protocol error whose detail mentions `what`.
awaitable<void> expect_protocol_error(Channel& ch, std::string_view what) {
  auto [ec, e] = co_await ch.async_receive(tuple);
  CHECK(ec == error::protocol_error);
  CHECK_MESSAGE(ch.error_detail().find(what) != std::string::npos, "detail was: " << ch.error_detail());
  CHECK_FALSE(ch.is_open());
}

}  // namespace

TEST_CASE("small and large messages arrive intact and in order") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    auto channels = channel_pair(io);
    Channel& a = channels.first;
    Channel& b = channels.second;
    const std::string big = pattern(3 << 20, 1);
    asio::co_spawn(io, [&]() -> awaitable<void> {
      for (int i = 0; i < 500; ++i) co_await a.async_send({message_kind::user, {std::to_string(i)}}, use_awaitable);
      co_await a.async_send({message_kind::internal, {big}}, use_awaitable);
      co_await a.async_send({message_kind::user, {""}}, use_awaitable);
    }, asio::detached);
    for (int i = 0; i < 500; ++i) {
      Envelope e = co_await b.async_receive(use_awaitable);
      REQUIRE(e.message.data == std::to_string(i));
      CHECK(e.kind == message_kind::user);
    }
    Envelope large = co_await b.async_receive(use_awaitable);
    CHECK(large.kind == message_kind::internal);
    CHECK(large.message.data.size() == big.size());
    CHECK(large.message.data == big);
    Envelope empty = co_await b.async_receive(use_awaitable);
    CHECK(empty.message.data.empty());
  });
}

TEST_CASE("a message over the limit is refused on send with message_too_large") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    ipc::ChannelOptions small;
    small.max_message_size = 1024;
    auto channels = channel_pair(io, small);
    Channel& a = channels.first;
    Channel& b = channels.second;
    auto [ec] = co_await a.async_send({message_kind::user, {std::string(1025, 'x')}}, tuple);
    CHECK(ec == error::message_too_large);
    co_await a.async_send({message_kind::user, {std::string(1024, 'x')}}, use_awaitable);  // still usable
    CHECK((co_await b.async_receive(use_awaitable)).message.data.size() == 1024);
  });
}

TEST_CASE("a frame announcing a message over the receiver's limit is a protocol error") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    ipc::ChannelOptions small;
    small.max_message_size = 1 << 20;
    auto [ch, raw] = channel_and_raw_peer(io, small);
    send_raw_frame(raw.get(), header(ipc::frame_header::first, 1u << 30), "abc");
    co_await expect_protocol_error(ch, "exceeds the limit");
  });
}

TEST_CASE("a peer writing garbage gets a protocol error and EOF") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    auto [ch, raw] = channel_and_raw_peer(io);
    const char garbage[] = "GET / HTTP/1.1\r\n\r\n";
    send_raw(raw.get(), garbage, sizeof garbage);
    co_await expect_protocol_error(ch, "magic");
    char c;
    CHECK(::recv(raw.get(), &c, 1, 0) == 0);  // the peer sees the channel closed
  });
}

TEST_CASE("malformed framing is a protocol error") {
  struct bad {
    const char* name;
    ipc::frame_header h;
    std::string payload;
    const char* detail;
  };
  const bad cases[] = {
      {"short frame", {}, "", "short frame"},
      {"continuation without a first frame", header(ipc::frame_header::last, 3), "abc", "without a first frame"},
      {"size disagrees with payload", header(whole, 10), "abc", "does not match"},
      {"unknown handle type", header(whole, 3, 42), "abc", "unknown handle type"},
      {"handle declared, no fd sent", header(whole, 3, 1), "abc", "carries 0 fds"},
  };
  for (const auto& c : cases) {
    SUBCASE(c.name) {
      run_bounded([&](asio::io_context& io) -> awaitable<void> {
        auto [ch, raw] = channel_and_raw_peer(io);
        if (std::string_view(c.name) == "short frame") send_raw(raw.get(), "ab", 2);
        else send_raw_frame(raw.get(), c.h, c.payload);
        co_await expect_protocol_error(ch, c.detail);
      });
    }
  }
}

TEST_CASE("read_past_bad_frames: each bad frame is dropped with its fds and reported, and the frames after it are read") {
  const int before = open_fd_count();
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    auto pair = channel_and_raw_peer(io);
    Channel& ch = pair.first;  // (named: clang 14 lambdas cannot capture structured bindings)
    auto& raw = pair.second;
    ch.read_past_bad_frames();
    const int open_before = open_fd_count();
    std::vector<int> fds;
    for (int i = 0; i < 3; ++i) fds.push_back(::open("/dev/null", O_RDONLY | O_CLOEXEC));
    send_raw(raw.get(), "not a frame", 11);
    send_raw_frame(raw.get(), header(ipc::frame_header::first, 6), "abc");  // a message in two frames...
    send_raw_frame(raw.get(), header(whole, 3, 1), "abc", fds);             // ...broken by a whole one, 3 fds on 1
    send_raw_frame(raw.get(), header(ipc::frame_header::last, 6), "def");   // the rest of the broken one
    for (int fd : fds) ::close(fd);
    send_raw_frame(raw.get(), header(whole, 2), "ok");
    auto expect = [&](const char* what) -> awaitable<void> {
      const std::error_code ec = std::get<0>(co_await ch.async_receive(tuple));
      CHECK_MESSAGE(ec == error::protocol_error, what << ": " << ec.message());
      CHECK_MESSAGE(ch.error_detail().find(what) != std::string::npos, ch.error_detail());
      CHECK(ch.is_open());
    };
    co_await expect("magic");
    co_await expect("carries 3 fds");          // the whole frame inside the message: the message is dropped
    co_await expect("without a first frame");  // its last frame, alone
    Envelope ok = co_await ch.async_receive(use_awaitable);
    CHECK(ok.message.data == "ok");
    CHECK(open_fd_count() == open_before);  // the 3 fds went with their frame, the channel open
    ::close(raw.release());
    const std::error_code end = std::get<0>(co_await ch.async_receive(tuple));
    CHECK(end == asio::error::eof);
  });
  CHECK(open_fd_count() == before);
}

TEST_CASE("an empty packet is a protocol error, not the end of the channel; read past it, the frames after it are read") {
  // The peer still open as the empty packet is read, or already shut (its end queued behind
  // the frame).
  for (const bool shut_first : {false, true}) {
    CAPTURE(shut_first);
    run_bounded([shut_first](asio::io_context& io) -> awaitable<void> {
      auto pair = channel_and_raw_peer(io);
      Channel& ch = pair.first;
      auto& raw = pair.second;
      ch.read_past_bad_frames();
      send_raw(raw.get(), "", 0);
      send_raw_frame(raw.get(), header(whole, 2), "ok");
      if (shut_first) ::shutdown(raw.get(), SHUT_WR);
      const std::error_code ec = std::get<0>(co_await ch.async_receive(tuple));
      CHECK_MESSAGE(ec == error::protocol_error, ec.message());
      CHECK_MESSAGE(ch.error_detail().find("empty packet") != std::string::npos, ch.error_detail());
      Envelope ok = co_await ch.async_receive(use_awaitable);
      CHECK(ok.message.data == "ok");
      if (!shut_first) ::shutdown(raw.get(), SHUT_WR);
      const std::error_code end = std::get<0>(co_await ch.async_receive(tuple));
      CHECK(end == asio::error::eof);
    });
  }
}

TEST_CASE("a message in 1-byte frames does not keep try_receive reading: it yields every 64 frames, and the message arrives whole") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    auto pair = channel_and_raw_peer(io);
    Channel& ch = pair.first;
    auto& raw = pair.second;
    constexpr std::uint32_t size = 200;
    const std::string text = pattern(size, 3);
    for (std::uint32_t i = 0; i < size; ++i) {
      const std::uint8_t flags = (i == 0 ? ipc::frame_header::first : 0) | (i + 1 == size ? ipc::frame_header::last : 0);
      send_raw_frame(raw.get(), header(flags, size), text.substr(i, 1));
    }
    Envelope e;
    std::error_code ec;
    int calls = 1;
    while (!ch.try_receive(e, ec)) {
      REQUIRE_MESSAGE(!ec, ec.message());
      ++calls;
      REQUIRE(calls <= 10);
    }
    CHECK(calls == 4);  // 64 + 64 + 64 frames, then the last 8 and the message
    CHECK(e.message.data == text);
    co_return;
  });
}

// A peer sends one frame declaring one handle but carrying `count` fds: a protocol error whose
// detail mentions `what`, and every fd that arrived is closed.
static void check_frame_with_fds(int count, const char* what) {
  const int before = open_fd_count();
  run_bounded([&](asio::io_context& io) -> awaitable<void> {
    auto [ch, raw] = channel_and_raw_peer(io);
    std::vector<int> fds;
    for (int i = 0; i < count; ++i) fds.push_back(::open("/dev/null", O_RDONLY | O_CLOEXEC));
    send_raw_frame(raw.get(), header(whole, 3, 1), "abc", fds);
    for (int fd : fds) ::close(fd);
    co_await expect_protocol_error(ch, what);
  });
  CHECK(open_fd_count() == before);
}

TEST_CASE("a frame with 10 fds is a protocol error and every fd it carried is closed") {
  check_frame_with_fds(10, "carries 10 fds");
}

TEST_CASE("truncated ancillary data (more fds than we accept) is a protocol error and leaks nothing") {
  check_frame_with_fds(100, "more than 16 fds");
}

TEST_CASE("a handle declared as a TCP socket that is a pipe is refused and closed") {
  const int before = open_fd_count();
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    auto [ch, raw] = channel_and_raw_peer(io);
    auto [r, w] = cocluster::detail::make_pipe();
    send_raw_frame(raw.get(), header(whole, 3, 1), "abc", {r.get()});
    co_await expect_protocol_error(ch, "not such a socket");
  });
  CHECK(open_fd_count() == before);
}

TEST_CASE("each handle kind arrives as its fd and adopts into the matching, working Asio object") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    using asio::ip::tcp;
    using asio::ip::udp;
    using unix_stream = asio::local::stream_protocol;
    auto channels = channel_pair(io);
    Channel& a = channels.first;
    Channel& b = channels.second;

    tcp::acceptor listener(io, {asio::ip::address_v4::loopback(), 0});
    tcp::socket client(io);
    co_await client.async_connect(listener.local_endpoint(), use_awaitable);
    tcp::socket served = co_await listener.async_accept(use_awaitable);
    co_await a.async_send({message_kind::user, {"tcp", std::move(served)}}, use_awaitable);
    co_await a.async_send({message_kind::user, {"acceptor", std::move(listener)}}, use_awaitable);
    co_await a.async_send({message_kind::user, {"udp", udp::socket(io, {asio::ip::address_v6::loopback(), 0})}}, use_awaitable);
    unix_stream::socket u1(io), u2(io);
    asio::local::connect_pair(u1, u2);
    co_await a.async_send({message_kind::user, {"unix", std::move(u1)}}, use_awaitable);
    const std::string path = "/tmp/cocluster-test-" + std::to_string(::getpid()) + ".sock";
    ::unlink(path.c_str());
    co_await a.async_send({message_kind::user, {"unix acceptor", unix_stream::acceptor(io, unix_stream::endpoint(path))}}, use_awaitable);

    // Each arrives as its fd and declared kind; adopt() makes the Asio object on `io`.
    Envelope e = co_await b.async_receive(use_awaitable);
    CHECK(e.message.handle.kind() == handle_kind::tcp_socket);
    REQUIRE(e.message.handle.is<tcp::socket>());
    tcp::socket tcp_socket = e.message.handle.adopt<tcp::socket>(io);
    CHECK_FALSE(e.message.has_handle());  // adopted: the fd is the socket's now
    co_await asio::async_write(client, asio::buffer("ping", 4), use_awaitable);
    char buf[4];
    co_await asio::async_read(tcp_socket, asio::buffer(buf), use_awaitable);
    CHECK(std::string(buf, 4) == "ping");

    e = co_await b.async_receive(use_awaitable);
    REQUIRE(e.message.handle.kind() == handle_kind::tcp_acceptor);
    tcp::acceptor acceptor = e.message.handle.adopt<tcp::acceptor>(io.get_executor());
    tcp::socket client2(io);
    co_await client2.async_connect(acceptor.local_endpoint(), use_awaitable);
    tcp::socket accepted = co_await acceptor.async_accept(use_awaitable);
    CHECK(accepted.is_open());

    e = co_await b.async_receive(use_awaitable);
    REQUIRE(e.message.handle.kind() == handle_kind::udp_socket);
    udp::socket udp_socket = e.message.handle.adopt<udp::socket>(io);
    CHECK(udp_socket.local_endpoint().address().is_v6());

    e = co_await b.async_receive(use_awaitable);
    REQUIRE(e.message.handle.kind() == handle_kind::unix_socket);
    unix_stream::socket unix_socket = e.message.handle.adopt<unix_stream::socket>(io);
    co_await asio::async_write(u2, asio::buffer("pong", 4), use_awaitable);
    co_await asio::async_read(unix_socket, asio::buffer(buf), use_awaitable);
    CHECK(std::string(buf, 4) == "pong");

    e = co_await b.async_receive(use_awaitable);
    REQUIRE(e.message.handle.kind() == handle_kind::unix_acceptor);
    unix_stream::acceptor unix_acceptor = e.message.handle.adopt<unix_stream::acceptor>(io);
    CHECK(unix_acceptor.local_endpoint().path() == path);
    ::unlink(path.c_str());
  });
}

TEST_CASE("sending a handle that is not open fails with bad_descriptor") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    auto channels = channel_pair(io);
    Channel& a = channels.first;
    auto [ec] = co_await a.async_send({message_kind::user, {"x", asio::ip::tcp::socket(io)}}, tuple);
    CHECK(ec == asio::error::bad_descriptor);
  });
}

TEST_CASE("closing one end completes the peer's receive with EOF") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    auto channels = channel_pair(io);
    Channel& a = channels.first;
    Channel& b = channels.second;
    asio::co_spawn(io, [&]() -> awaitable<void> {
      co_await asio::post(io, use_awaitable);
      a.close();
    }, asio::detached);
    auto [ec, e] = co_await b.async_receive(tuple);
    CHECK(ec == asio::error::eof);
    auto [ec2] = co_await a.async_send({message_kind::user, {"late"}}, tuple);
    CHECK(ec2 == error::channel_closed);
  });
}

TEST_CASE("shutdown delivers every queued message before EOF") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    auto channels = channel_pair(io);
    Channel& a = channels.first;
    Channel& b = channels.second;
    // More than the socket holds (net.unix.max_dgram_qlen), so some wait in our queue.
    for (int i = 0; i < 100; ++i) co_await a.async_send({message_kind::user, {std::to_string(i)}}, use_awaitable);
    bool shut = false;
    a.async_shutdown([&](std::error_code ec) { shut = !ec; });
    for (int i = 0; i < 100; ++i) CHECK((co_await b.async_receive(use_awaitable)).message.data == std::to_string(i));
    auto [ec, e] = co_await b.async_receive(tuple);
    CHECK(ec == asio::error::eof);
    CHECK(shut);
  });
}

TEST_CASE("a full send queue makes async_send wait until the peer reads") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    ipc::ChannelOptions opts;
    opts.send_queue_capacity = 4;
    auto channels = channel_pair(io, opts);
    Channel& a = channels.first;
    Channel& b = channels.second;
    // Each message fills a whole packet, so the socket buffer (208 KiB) holds only a few.
    auto message = [](int i) { return std::to_string(i) + std::string(ipc::max_fragment - 8, 'x'); };
    constexpr int count = 40;
    int sent = 0;
    asio::co_spawn(io, [&]() -> awaitable<void> {
      for (int i = 0; i < count; ++i) {
        co_await a.async_send({message_kind::user, {message(i)}}, use_awaitable);
        ++sent;
      }
    }, asio::detached);
    for (int i = 0; i < 4 * count; ++i) co_await asio::post(io, use_awaitable);
    // Nobody reads: the socket holds a few packets, our queue 4 more, then the sender waits.
    CHECK(sent < count);
    CHECK(a.queued() == 4);
    for (int i = 0; i < count; ++i) REQUIRE((co_await b.async_receive(use_awaitable)).message.data == message(i));
    CHECK(sent == count);
  });
}

TEST_CASE("a receive honours cancellation and the next receive gets the message") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    auto channels = channel_pair(io);
    Channel& a = channels.first;
    Channel& b = channels.second;
    asio::steady_timer timer(io, 5ms);
    auto r = co_await (b.async_receive(use_awaitable) || timer.async_wait(use_awaitable));
    CHECK(r.index() == 1);
    co_await a.async_send({message_kind::user, {"after"}}, use_awaitable);
    CHECK((co_await b.async_receive(use_awaitable)).message.data == "after");
  });
}

TEST_CASE("a second concurrent receive is refused with already_started") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    auto channels = channel_pair(io);
    Channel& a = channels.first;
    Channel& b = channels.second;
    b.async_receive([](std::error_code, Envelope) {});
    auto [ec, e] = co_await b.async_receive(tuple);
    CHECK(ec == asio::error::already_started);
    a.close();
  });
}

TEST_CASE("a peer that dies in the middle of a multi-frame message is EOF, not a protocol error") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    auto [ch, raw] = channel_and_raw_peer(io);
    send_raw_frame(raw.get(), header(ipc::frame_header::first, 100), std::string(50, 'x'));
    raw.reset();  // the peer is gone with half of its message sent
    auto [ec, e] = co_await ch.async_receive(tuple);
    CHECK(ec == asio::error::eof);
    CHECK(ch.error_detail().empty());
  });
}

TEST_CASE("a handle whose fd is another kind of socket arrives, and adopting it is a protocol error") {
  const int before = open_fd_count();
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    auto [ch, raw] = channel_and_raw_peer(io);
    auto [u1, u2] = cocluster::detail::make_socketpair(SOCK_STREAM);
    send_raw_frame(raw.get(), header(whole, 3, 1), "abc", {u1.get()});  // declared TCP, is Unix
    Envelope e = co_await ch.async_receive(use_awaitable);
    REQUIRE(e.message.handle.kind() == handle_kind::tcp_socket);  // a claim, not yet checked
    std::error_code ec;
    auto s = e.message.handle.adopt<asio::ip::tcp::socket>(io, ec);
    CHECK(ec == error::protocol_error);
    CHECK_FALSE(s.is_open());
    CHECK(e.message.has_handle());  // still owned: dropping the message closes it
    CHECK_THROWS_WITH_AS(e.message.handle.adopt<asio::ip::tcp::socket>(io),
                         doctest::Contains("declared as TCP socket, adopted as TCP socket, is not such a socket"),
                         std::system_error);
  });
  CHECK(open_fd_count() == before);
}

TEST_CASE("adopting a handle as another kind than it declares fails with wrong_protocol_type and keeps it") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    using unix_stream = asio::local::stream_protocol;
    auto [a, b] = channel_pair(io);
    unix_stream::socket u1(io), u2(io);
    asio::local::connect_pair(u1, u2);
    co_await a.async_send({message_kind::user, {"unix", std::move(u1)}}, use_awaitable);
    Envelope e = co_await b.async_receive(use_awaitable);
    std::error_code ec;
    auto wrong = e.message.handle.adopt<asio::ip::tcp::socket>(io, ec);
    CHECK(ec == std::errc::wrong_protocol_type);
    CHECK_FALSE(wrong.is_open());
    CHECK_THROWS_WITH_AS(e.message.handle.adopt<asio::ip::tcp::acceptor>(io),
                         doctest::Contains("declared as Unix stream socket, adopted as TCP acceptor"), std::system_error);
    unix_stream::socket right = e.message.handle.adopt<unix_stream::socket>(io, ec);
    CHECK_FALSE(ec);
    co_await asio::async_write(u2, asio::buffer("ok", 2), use_awaitable);
    char buf[2];
    co_await asio::async_read(right, asio::buffer(buf), use_awaitable);
    CHECK(std::string(buf, 2) == "ok");
  });
}

TEST_CASE("a received handle passed on unadopted arrives at the next channel and works") {
  const int before = open_fd_count();
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    using unix_stream = asio::local::stream_protocol;
    auto [a, b] = channel_pair(io);
    auto [c, d] = channel_pair(io);
    unix_stream::socket u1(io), u2(io);
    asio::local::connect_pair(u1, u2);
    co_await a.async_send({message_kind::user, {"first hop", std::move(u1)}}, use_awaitable);
    Envelope e = co_await b.async_receive(use_awaitable);
    const int forwarded = e.message.handle.native_handle();
    co_await c.async_send({message_kind::user, {"second hop", std::move(e.message.handle)}}, use_awaitable);
    CHECK(::fcntl(forwarded, F_GETFD) == -1);  // the forwarder's copy is closed once written
    Envelope f = co_await d.async_receive(use_awaitable);
    REQUIRE(f.message.handle.kind() == handle_kind::unix_socket);
    auto s = f.message.handle.adopt<unix_stream::socket>(io);
    co_await asio::async_write(u2, asio::buffer("hop", 3), use_awaitable);
    char buf[3];
    co_await asio::async_read(s, asio::buffer(buf), use_awaitable);
    CHECK(std::string(buf, 3) == "hop");
  });
  CHECK(open_fd_count() == before);
}

TEST_CASE("a received handle dropped unadopted is closed") {
  const int before = open_fd_count();
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    auto [a, b] = channel_pair(io);
    for (int i = 0; i < 20; ++i) {
      asio::local::stream_protocol::socket u1(io), u2(io);
      asio::local::connect_pair(u1, u2);
      co_await a.async_send({message_kind::user, {"drop me", std::move(u1)}}, use_awaitable);
    }
    for (int i = 0; i < 20; ++i) CHECK((co_await b.async_receive(use_awaitable)).message.has_handle());
  });
  CHECK(open_fd_count() == before);
}

// Sending moves: a socket lvalue does not convert to a Handle, a moved one does.
static_assert(!std::is_convertible_v<asio::ip::tcp::socket&, Handle>);
static_assert(std::is_convertible_v<asio::ip::tcp::socket&&, Handle>);
static_assert(!std::is_convertible_v<asio::posix::stream_descriptor&&, Handle>);  // not a socket kind

TEST_CASE("a Handle takes the fd out of an Asio socket, and release() gives it up") {
  asio::io_context io;
  asio::local::stream_protocol::socket u1(io), u2(io);
  asio::local::connect_pair(u1, u2);
  const int fd = u1.native_handle();
  Handle h(std::move(u1));
  CHECK_FALSE(u1.is_open());
  CHECK(h.kind() == handle_kind::unix_socket);
  CHECK(h.is<asio::local::stream_protocol::socket>());
  CHECK_FALSE(h.is<asio::ip::tcp::socket>());
  CHECK(h.native_handle() == fd);
  cocluster::detail::unique_fd owned = h.release();
  CHECK(owned.get() == fd);
  CHECK_FALSE(h);
  CHECK(h.kind() == handle_kind::none);
  Handle closed{asio::ip::tcp::socket(io)};  // a closed socket: its kind, no fd
  CHECK(closed.kind() == handle_kind::tcp_socket);
  CHECK(closed.native_handle() == -1);
  std::error_code ec;
  auto none = closed.adopt<asio::ip::tcp::socket>(io, ec);
  CHECK(ec == asio::error::bad_descriptor);
}

TEST_CASE("read_channel stops reading a peer that floods requests and never reads the answers, and answers all once it does") {
  // The master answers each internal message of a worker (query_server -> query_reply) with
  // an internal message, which the send queue takes whatever its capacity. A worker that
  // never reads would grow that queue without end; read_channel stops reading it instead.
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    auto ends = channel_and_raw_peer(io);  // not a structured binding: the lambdas capture it
    Channel& reader = ends.first;
    cocluster::detail::unique_fd& peer = ends.second;
    ::fcntl(peer.get(), F_SETFL, O_NONBLOCK);
    cocluster::detail::async_queue<Message> inbox(io.get_executor());
    std::size_t answered = 0;
    bool ended = false;
    asio::co_spawn(io, [&]() -> awaitable<void> {
      co_await cocluster::detail::read_channel(
          reader, inbox, "the peer",
          [&](Envelope&) {
            ++answered;
            return reader.send_internal(std::string(100, 'a'));
          },
          [] {}, [](bool) {});
      ended = true;
    }, asio::detached);
    // Writes requests until the socket is full, lets the reader run, again, until a round in
    // which the reader took nothing: it has stopped reading.
    ipc::frame_header h = header(whole | ipc::frame_header::internal, 1);
    std::string request(reinterpret_cast<const char*>(&h), sizeof h);
    request += 'q';
    std::size_t sent = 0;
    for (int round = 0;; ++round) {
      REQUIRE(round < 10000);
      std::size_t this_round = 0;
      while (::send(peer.get(), request.data(), request.size(), MSG_NOSIGNAL) > 0) ++this_round;
      sent += this_round;
      for (int i = 0; i < 200; ++i) co_await asio::post(io, use_awaitable);
      if (this_round == 0 && round > 0) break;
    }
    const std::size_t bound = ipc::ChannelOptions{}.send_queue_capacity + cocluster::detail::max_internal_backlog;
    MESSAGE(sent, " requests sent, ", answered, " answered, ", reader.queued(), " answers queued when reading stopped");
    CHECK(reader.queued() >= bound);
    CHECK(reader.queued() < bound + 1000);  // one socket's worth of requests beyond it at most
    // The peer reads every answer: the reader takes the rest of the requests and answers them.
    std::size_t received = 0;
    char buffer[256];
    while (received < sent) {
      const ssize_t n = ::recv(peer.get(), buffer, sizeof buffer, 0);
      if (n > 0) {
        ++received;
        continue;
      }
      REQUIRE(errno == EAGAIN);
      co_await asio::post(io, use_awaitable);
    }
    CHECK(answered == sent);
    reader.close();
    while (!ended) co_await asio::post(io, use_awaitable);
  });
}
