// Messages and handles between the master and real worker processes, and what happens to a
// worker that writes what is not our protocol: it is disconnected with a logged error; the
// master, its fds and the other workers are unaffected. (One file: each test file costs a
// minute of compilation in CI, most of it the library's templates again.)
#include "cocluster/worker.hpp"

#include <linux/capability.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>

#include <doctest/doctest.h>

#include "cocluster/cocluster.hpp"
#include "support.hpp"
#include "worker_scenario.hpp"

using namespace cocluster;
using namespace test;

// ---- the workers ----

namespace {

// Writes one raw packet into the channel as a broken worker would, then waits for the master
// to close the channel.
int misbehave(std::string_view how) {
  const int fd = std::stoi(std::getenv("COCLUSTER_CHANNEL_FD"));
  ipc::frame_header h;
  h.flags = ipc::frame_header::first | ipc::frame_header::last;
  std::string packet;
  std::vector<int> fds;
  if (how == "garbage") {
    packet = "this is not a cocluster frame";
  } else if (how == "oversized") {
    h.flags = ipc::frame_header::first;
    h.total_size = 1u << 30;  // 1 GiB, over the 64 MiB default
    packet.assign(reinterpret_cast<char*>(&h), sizeof h);
    packet += std::string(1000, 'x');
  } else {  // ten_fds
    h.handle_kind = 1;
    h.total_size = 3;
    packet.assign(reinterpret_cast<char*>(&h), sizeof h);
    packet += "abc";
    for (int i = 0; i < 10; ++i) fds.push_back(::open("/dev/null", O_RDONLY));
  }
  iovec iov{packet.data(), packet.size()};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  std::vector<char> control(CMSG_SPACE(sizeof(int) * 10));
  if (!fds.empty()) {
    msg.msg_control = control.data();
    msg.msg_controllen = CMSG_SPACE(sizeof(int) * fds.size());
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
    std::memcpy(CMSG_DATA(c), fds.data(), sizeof(int) * fds.size());
  }
  if (::sendmsg(fd, &msg, MSG_NOSIGNAL) < 0) return 2;
  char c;
  while (::recv(fd, &c, 1, 0) > 0) {
  }
  return 0;
}

}  // namespace

WORKER_SCENARIO(garbage) { return misbehave("garbage"); }       // writes a non-frame
WORKER_SCENARIO(oversized) { return misbehave("oversized"); }   // announces a 1 GiB message
WORKER_SCENARIO(ten_fds) { return misbehave("ten_fds"); }       // a frame carrying 10 fds

// Sends "hello" right at online, then echoes.
WORKER_SCENARIO(hello_first) {
  return run_echo_worker([](asio::io_context&) { this_worker.send({"hello"}, [](std::error_code) {}); });
}

// RLIMIT_NOFILE 300, then slowly counts 3000 messages and the sockets among them: without a
// bound on unread handles the reader would run ahead of it and use up the 300 fds.
WORKER_SCENARIO(count_sockets) {
  const rlimit few{300, 300};
  ::setrlimit(RLIMIT_NOFILE, &few);
  asio::io_context io;
  this_worker.start(io.get_executor());
  asio::co_spawn(io, []() -> awaitable<void> {
    int sockets = 0;
    for (int i = 0; i < 3000; ++i) {
      sockets += (co_await this_worker.receive()).has_handle();
      for (int yield = 0; yield < 8; ++yield) co_await asio::post(asio::use_awaitable);
    }
    co_await this_worker.send({std::to_string(sockets)});
  }, asio::detached);
  io.run();
  return 0;
}

// Counts the messages that carry a handle until "done", then reports the count.
WORKER_SCENARIO(count_handles) {
  asio::io_context io;
  this_worker.start(io.get_executor());
  asio::co_spawn(io, []() -> awaitable<void> {
    int handles = 0;
    for (;;) {
      Message m = co_await this_worker.receive();
      if (m.data == "done") break;
      handles += m.has_handle();
    }
    co_await this_worker.send({std::to_string(handles)});
  }, asio::detached);
  io.run();
  return 0;
}

// 200 messages, one socket, then _Exit(5): everything is in the master's socket, and the
// master has read little of it.
WORKER_SCENARIO(flood_then_socket) {
  asio::io_context io;
  this_worker.start(io.get_executor());
  asio::co_spawn(io, []() -> awaitable<void> {
    for (int i = 0; i < 200; ++i) co_await this_worker.send({std::to_string(i)});
    asio::local::stream_protocol::socket a(co_await asio::this_coro::executor), b(a.get_executor());
    asio::local::connect_pair(a, b);
    co_await this_worker.send({"socket", std::move(a)});
    std::_Exit(5);
  }, asio::detached);
  io.run();
  return 0;
}

// Leaves itself no fd free (RLIMIT_NOFILE down to its lowest free fd), says "exhausted",
// reports what the next message brought (its handle's kind, lost(), adopt()'s error, the
// error of sending that handle on), takes its fds back, then adopts the next message's socket
// and writes "hi" through it.
WORKER_SCENARIO(handle_at_fd_limit) {
  asio::io_context io;
  this_worker.start(io.get_executor());
  asio::co_spawn(io, []() -> awaitable<void> {
    using asio::local::stream_protocol;
    const auto ex = co_await asio::this_coro::executor;
    const rlimit saved = leave_no_fd_free();
    co_await this_worker.send({"exhausted"});
    Message first = co_await this_worker.receive();
    std::error_code ec;
    (void)first.handle.adopt<stream_protocol::socket>(ex, ec);
    std::string said = first.data + " kind=" + std::to_string(static_cast<int>(first.handle.kind())) +
                       " lost=" + std::to_string(first.handle.lost()) + " adopt=" + ec.message();
    // (Each message named first: GCC 12 miscompiles temporaries in a co_await-ed call.)
    Message again("again", std::move(first.handle));  // sent on, lost as it is
    auto [resent] = co_await this_worker.send(std::move(again), cocluster::as_tuple(asio::use_awaitable));
    said += " send=" + resent.message();
    ::setrlimit(RLIMIT_NOFILE, &saved);
    Message report(std::move(said));
    co_await this_worker.send(std::move(report));
    Message second = co_await this_worker.receive();
    stream_protocol::socket socket = second.handle.adopt<stream_protocol::socket>(ex, ec);
    report = Message(second.data + " lost=" + std::to_string(second.handle.lost()) + " adopt=" + (ec ? ec.message() : "ok"));
    co_await this_worker.send(std::move(report));
    const std::string hi = "hi";
    if (!ec) co_await asio::async_write(socket, asio::buffer(hi), asio::use_awaitable);
  }, asio::detached);
  io.run();
  return 0;
}

// ---- the master side ----

namespace {
std::string pattern(std::size_t size) {
  std::string s(size, '\0');
  for (std::size_t i = 0; i < size; ++i) s[i] = static_cast<char>((i * 2654435761u) >> 13);
  return s;
}
}  // namespace

TEST_CASE("a 32 MiB message and 1,000 small messages interleaved with 200 passed sockets arrive intact and in order") {
  const int fds_before = open_fd_count();
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    using asio::ip::tcp;
    Master<> master(io.get_executor());
    auto w = co_await master.fork();
    co_await w->online();
    const std::string big = pattern(32u << 20);
    tcp::acceptor listener(io, {asio::ip::address_v4::loopback(), 0});

    // What the worker must answer, in order: small messages echoed, a socket message echoed
    // with the 8 bytes the worker read from the socket, the big one echoed whole.
    std::vector<std::string> expected;
    std::vector<tcp::socket> clients;  // our ends; the worker reads what we wrote into them
    bool sent_all = false;
    asio::co_spawn(io, [&]() -> awaitable<void> {
      for (int i = 0; i < 1000; ++i) {
        if (i == 500) {
          co_await w->send({big});
          expected.push_back(big);
        }
        co_await w->send({"small " + std::to_string(i)});
        expected.push_back("small " + std::to_string(i));
        if (i % 5 == 0) {
          tcp::socket client(io);
          co_await client.async_connect(listener.local_endpoint(), use_awaitable);
          tcp::socket served = co_await listener.async_accept(use_awaitable);
          char token[16];
          std::snprintf(token, sizeof token, "sock%04d", i / 5);
          co_await asio::async_write(client, asio::buffer(token, 8), use_awaitable);
          clients.push_back(std::move(client));
          co_await w->send({"socket " + std::to_string(i / 5), std::move(served)});
          expected.push_back("socket " + std::to_string(i / 5) + "|" + token);
        }
      }
      sent_all = true;
    }, asio::detached);

    std::size_t received = 0;
    while (!sent_all || received < expected.size()) {
      const Message m = co_await w->receive();
      REQUIRE(received < expected.size());
      if (m.data.size() > 1000) {
        CHECK(m.data.size() == big.size());
        CHECK(m.data == big);
      } else {
        REQUIRE(m.data == expected[received]);
      }
      ++received;
    }
    CHECK(received == 1200 + 1);
    w->disconnect();
    co_await w->exited();
  });
  // Every socket the master passed was closed on its side once it was on its way.
  CHECK(open_fd_count() == fds_before);
}

TEST_CASE("a message the worker sends right at online is not lost") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor());
    auto w = co_await master.fork(scenario_env("hello_first"));
    co_await w->online();
    CHECK((co_await w->receive()).data == "hello");
    w->disconnect();
    co_await w->exited();
  });
}

TEST_CASE("the event stream announces each message; receive() takes it") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor());
    auto& events = master.events();
    auto w = co_await master.fork();
    co_await w->send({"one"});
    for (;;) {
      const Event e = co_await events.next();
      if (e.type != EventType::message) continue;
      CHECK(e.worker == w);
      CHECK((co_await e.worker->receive()).data == "one");
      break;
    }
    w->disconnect();
    co_await w->exited();
  });
}

TEST_CASE("send() to a disconnected worker fails with worker_not_connected") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor());
    auto w = co_await master.fork();
    co_await w->online();
    w->kill(SIGKILL);
    auto [right_after_kill] = co_await w->send({"too late"}, cocluster::as_tuple(use_awaitable));
    CHECK(right_after_kill == error::worker_not_connected);
    co_await w->disconnected();
    try {
      co_await w->send({"too late"});
      FAIL("send to a disconnected worker succeeded");
    } catch (const std::system_error& e) {
      CHECK(e.code() == error::worker_not_connected);
    }
    auto [ec, m] = co_await w->receive(cocluster::as_tuple(use_awaitable));
    CHECK(ec == error::worker_not_connected);
    co_await w->exited();
  });
}

TEST_CASE("a worker with few fds receives 3,000 sockets: unread handles stay in the kernel, none is lost") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor());
    auto w = co_await master.fork(scenario_env("count_sockets"));  // RLIMIT_NOFILE 300
    co_await w->online();
    asio::local::stream_protocol::socket a(io), b(io);
    asio::local::connect_pair(a, b);
    for (int i = 0; i < 3000; ++i) {
      asio::local::stream_protocol::socket copy(io);
      copy.assign(asio::local::stream_protocol(), ::dup(b.native_handle()));
      co_await w->send({"socket", std::move(copy)});
    }
    CHECK((co_await w->receive()).data == "3000");
    w->disconnect();
    CHECK((co_await w->exited()) == ExitStatus{0, 0});
  });
}

namespace {

// While it lives, this thread has RLIMIT_NOFILE `limit` (its open fds stay open) and neither
// CAP_SYS_RESOURCE nor CAP_SYS_ADMIN in its effective set (they stay permitted): what a
// master not run as root has, for which the kernel counts the fds in flight from its user
// against that limit (ETOOMANYREFS). Restores both.
struct unprivileged_fd_limit {
  rlimit saved{};
  __user_cap_header_struct header{_LINUX_CAPABILITY_VERSION_3, 0};
  __user_cap_data_struct caps[2]{};
  explicit unprivileged_fd_limit(rlim_t limit) {
    REQUIRE(::getrlimit(RLIMIT_NOFILE, &saved) == 0);
    REQUIRE(::syscall(SYS_capget, &header, caps) == 0);
    __user_cap_data_struct fewer[2] = {caps[0], caps[1]};
    for (int cap : {CAP_SYS_RESOURCE, CAP_SYS_ADMIN}) fewer[cap / 32].effective &= ~(1u << (cap % 32));
    REQUIRE(::syscall(SYS_capset, &header, fewer) == 0);
    rlimit low = saved;
    low.rlim_cur = limit;
    if (::setrlimit(RLIMIT_NOFILE, &low) != 0) {
      ::syscall(SYS_capset, &header, caps);  // (the destructor does not run for a constructor that throws)
      FAIL("setrlimit: ", std::strerror(errno));
    }
  }
  ~unprivileged_fd_limit() {
    ::setrlimit(RLIMIT_NOFILE, &saved);
    ::syscall(SYS_capset, &header, caps);
  }
};

}  // namespace

TEST_CASE("a handle the kernel will not pass yet (ETOOMANYREFS: too many fds in flight) waits and is sent, not dropped") {
  captured_log log;
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor());
    auto w = co_await master.fork(scenario_env("count_handles"));
    co_await w->online();
    w->signal(SIGSTOP);  // what is sent to it stays in flight, in its socket
    asio::local::stream_protocol::socket a(io), b(io);
    asio::local::connect_pair(a, b);
    auto copy_of_b = [&] {
      asio::local::stream_protocol::socket copy(io);
      copy.assign(asio::local::stream_protocol(), ::dup(b.native_handle()));
      return copy;
    };
    constexpr int in_flight = 64;
    for (int i = 0; i < in_flight; ++i) co_await w->send({"socket", copy_of_b()});
    auto last = copy_of_b();
    {
      unprivileged_fd_limit limited(16);  // 64 in flight > 16: the kernel refuses the next
      const std::error_code ec =
          std::get<0>(co_await w->send({"socket", std::move(last)}, cocluster::as_tuple(asio::use_awaitable)));
      CHECK_MESSAGE(!ec, ec.message());  // queued, not failed
    }
    w->signal(SIGCONT);
    co_await w->send({"done"});
    CHECK((co_await w->receive()).data == std::to_string(in_flight + 1));
    w->disconnect();
    CHECK((co_await w->exited()) == ExitStatus{0, 0});
  });
  CHECK_MESSAGE(log.has("Too many references"), "the log was: " << log.text);
}

TEST_CASE("a worker that exits while the master's reading is paused reports disconnect and exit, losing nothing") {
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    Master<> master(io.get_executor());
    // 200 messages nobody receives, then one with a handle (reading pauses before it: more
    // than 128 are unread), then the worker exits.
    auto w = co_await master.fork(scenario_env("flood_then_socket"));
    CHECK((co_await w->exited()) == ExitStatus{5, 0});
    CHECK_FALSE(w->is_connected());
    CHECK(w->exited_after_disconnect() == false);
    for (int i = 0; i < 200; ++i) REQUIRE((co_await w->receive()).data == std::to_string(i));
    const Message last = co_await w->receive();
    CHECK(last.data == "socket");
    CHECK(last.has_handle());
  });
}

// ---- protocol errors ----

namespace {
// Captures what this process writes to stderr while alive.
class stderr_capture {
 public:
  stderr_capture() : file_(std::tmpfile()), saved_(::dup(2)) {
    std::fflush(stderr);
    ::dup2(::fileno(file_), 2);
  }
  ~stderr_capture() { restore(); }
  std::string text() {
    restore();
    std::rewind(file_);
    std::string out;
    char buf[4096];
    while (std::size_t n = std::fread(buf, 1, sizeof buf, file_)) out.append(buf, n);
    return out;
  }

 private:
  void restore() {
    if (saved_ < 0) return;
    std::fflush(stderr);
    ::dup2(saved_, 2);
    ::close(saved_);
    saved_ = -1;
  }
  std::FILE* file_;
  int saved_;
};
}  // namespace

// The kernel closes a passed fd that the receiver has no room for (MSG_CTRUNC). The message
// still arrives, its handle saying what happened, and the channel goes on: a worker at its fd
// limit used to lose its channel (and exit) to the first socket the master sent it.
TEST_CASE("a message whose socket reaches a worker with no fd free arrives without it, saying so; the channel goes on") {
  stderr_capture captured;  // the worker's stderr too (it inherits ours)
  run_bounded([](asio::io_context& io) -> awaitable<void> {
    using asio::local::stream_protocol;
    Master<> master(io.get_executor());
    auto w = co_await master.fork(scenario_env("handle_at_fd_limit"));
    const Message exhausted = co_await w->receive();
    CHECK(exhausted.data == "exhausted");
    const int fds_before = open_fd_count();
    stream_protocol::socket a(io), b(io);
    asio::local::connect_pair(a, b);
    co_await w->send({"first", std::move(a)});
    const Message first = co_await w->receive();
    const std::string emfile = std::make_error_code(std::errc::too_many_files_open).message();
    CHECK(first.data == "first kind=4 lost=1 adopt=" + emfile + " send=" + emfile);
    // The worker never held it: our peer reads the end of the socket.
    char c;
    auto [eof, n] = co_await b.async_read_some(asio::buffer(&c, 1), cocluster::as_tuple(use_awaitable));
    CHECK(eof == asio::error::eof);

    stream_protocol::socket x(io), y(io);
    asio::local::connect_pair(x, y);
    co_await w->send({"second", std::move(x)});
    const Message second = co_await w->receive();
    CHECK(second.data == "second lost=0 adopt=ok");
    CHECK(open_fd_count() == fds_before + 2);  // b and y: a and x went with their messages
    std::string hi;
    co_await asio::async_read(y, asio::dynamic_buffer(hi), cocluster::as_tuple(use_awaitable));  // to EOF
    CHECK(hi == "hi");
    CHECK(w->is_connected());
    w->disconnect();
    CHECK((co_await w->exited()) == ExitStatus{0, 0});
  });
  const std::string log = captured.text();
  CHECK_MESSAGE(log.find("a message from the master came without its Unix stream socket: no fd was free in this process") != std::string::npos,
                "stderr was: " << log);
  CHECK_MESSAGE(log.find("disconnected") == std::string::npos, "stderr was: " << log);
}

TEST_CASE("a worker writing garbage, an oversized frame or a frame with 10 fds is disconnected; the rest carry on") {
  for (auto bad : {"garbage", "oversized", "ten_fds"}) {
    SUBCASE(std::string(bad).c_str()) {
      stderr_capture captured;
      run_bounded([bad](asio::io_context& io) -> awaitable<void> {
        Master<> master(io.get_executor());
        auto& events = master.events();
        auto good1 = co_await master.fork();
        auto good2 = co_await master.fork();
        co_await good1->online();
        co_await good2->online();
        const int fds_before = open_fd_count();

        auto bad_worker = co_await master.fork(scenario_env(bad));
        co_await bad_worker->disconnected();
        CHECK(bad_worker->exited_after_disconnect() == false);
        CHECK((co_await bad_worker->exited()) == ExitStatus{0, 0});  // it left on the EOF we gave it
        bool saw_error = false;
        while (events.pending()) {
          const Event e = co_await events.next();
          if (e.type == EventType::error && e.worker == bad_worker) {
            saw_error = true;
            CHECK(e.error == error::protocol_error);
          }
        }
        CHECK(saw_error);

        for (auto& w : {good1, good2}) {
          co_await w->send({"still here"});
          CHECK((co_await w->receive()).data == "still here");
        }
        CHECK(open_fd_count() == fds_before);
        co_await master.disconnect();
      });
      const std::string log = captured.text();
      CHECK_MESSAGE(log.find("protocol error") != std::string::npos, "stderr was: " << log);
    }
  }
}
