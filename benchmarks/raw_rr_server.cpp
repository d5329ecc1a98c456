// raw_rr_server: policy_bench's physical limit, an HTTP hello-world cluster with no framework.
//   raw_rr_server --workers N --port P [--policy rr|none] [--defer-accept S]
// rr (the default): a blocking master accept4()s every connection and passes its fd round-robin
// to forked workers (SCM_RIGHTS over a SOCK_SEQPACKET socketpair each), closing its own copy.
// none: the workers inherit the listening socket and accept from it themselves.
// --defer-accept: TCP_DEFER_ACCEPT on the listener (nginx's `deferred`), for comparing with
// hello_cluster --defer-accept.
// Workers serve HTTP/1.1 from a plain epoll loop (GET / -> 200, keep-alive unless
// `Connection: close`). Prints `listening on 127.0.0.1:PORT` once the workers are forked; on
// SIGTERM, prints {"workers":[{"id":1,"connections":N},...]} (connections each worker served)
// and exits 0. Plain POSIX calls only, no Asio: this is what the frameworks are measured against.
// Control messages on each socketpair, master -> worker: "c" + an fd (a connection), "q" (report
// and leave); worker -> master: "<connections>". EOF on it also makes a worker leave.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

namespace {

[[noreturn]] void die(const char* what) {
  std::fprintf(stderr, "raw_rr_server: %s: %s\n", what, std::strerror(errno));
  std::exit(1);
}

// ---- worker: one epoll loop over the channel, the listening socket (policy none) and connections ----

struct Conn {
  std::string in, out;
  bool close_after = false;  // close once `out` is written
  bool want_out = false;     // EPOLLOUT registered
};

bool iequals_prefix(std::string_view s, std::string_view prefix) {
  if (s.size() < prefix.size()) return false;
  for (std::size_t i = 0; i < prefix.size(); ++i)
    if (std::tolower(static_cast<unsigned char>(s[i])) != prefix[i]) return false;
  return true;
}

bool icontains(std::string_view s, std::string_view word) {
  for (std::size_t i = 0; i + word.size() <= s.size(); ++i)
    if (iequals_prefix(s.substr(i), word)) return true;
  return false;
}

class Worker {
 public:
  Worker(int id, int channel, int listener) : id_(id), channel_(channel), listener_(listener) {}

  [[noreturn]] void run() {
    epoll_ = ::epoll_create1(EPOLL_CLOEXEC);
    if (epoll_ < 0) die("epoll_create1");
    watch(channel_, EPOLLIN, EPOLL_CTL_ADD);
    if (listener_ >= 0) watch(listener_, EPOLLIN, EPOLL_CTL_ADD);
    epoll_event events[256];
    for (;;) {
      const int n = ::epoll_wait(epoll_, events, 256, -1);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) die("epoll_wait");
      for (int i = 0; i < n; ++i) {
        const int fd = events[i].data.fd;
        if (fd == channel_) on_channel();
        else if (fd == listener_) on_listener();
        else if (fd < static_cast<int>(conns_.size()) && conns_[fd]) on_conn(fd, events[i].events);
      }
    }
  }

 private:
  void watch(int fd, unsigned events, int op) {
    epoll_event ev{};
    ev.events = events;
    ev.data.fd = fd;
    if (::epoll_ctl(epoll_, op, fd, &ev) != 0) die("epoll_ctl");
  }

  void add_conn(int fd) {  // fd is already non-blocking
    ++connections_;
    if (fd >= static_cast<int>(conns_.size())) conns_.resize(fd + 1024);
    conns_[fd] = new Conn;
    watch(fd, EPOLLIN, EPOLL_CTL_ADD);
  }

  void close_conn(int fd) {
    delete conns_[fd];
    conns_[fd] = nullptr;
    ::close(fd);  // also removes it from the epoll set
  }

  // Drains the channel: connections (policy rr), or "q": report the count and leave.
  void on_channel() {
    for (;;) {
      char data[16];
      alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))];
      iovec iov{data, sizeof data};
      msghdr msg{};
      msg.msg_iov = &iov;
      msg.msg_iovlen = 1;
      msg.msg_control = control;
      msg.msg_controllen = sizeof control;
      const ssize_t got = ::recvmsg(channel_, &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
      if (got < 0 && (errno == EAGAIN || errno == EINTR)) return;
      if (got <= 0) ::_exit(0);  // the master is gone
      if (cmsghdr* c = CMSG_FIRSTHDR(&msg); c && c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
        int fd;
        std::memcpy(&fd, CMSG_DATA(c), sizeof fd);
        add_conn(fd);
      } else if (data[0] == 'q') {
        const std::string reply = std::to_string(connections_);
        (void)!::send(channel_, reply.data(), reply.size(), MSG_NOSIGNAL);
        ::_exit(0);
      }
    }
  }

  void on_listener() {  // policy none: every worker accepts from the shared socket
    for (;;) {
      const int fd = ::accept4(listener_, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
      if (fd >= 0) {
        add_conn(fd);
        continue;
      }
      if (errno == EINTR || errno == ECONNABORTED) continue;
      if (errno != EAGAIN) {  // EMFILE or a shut-down socket: stop watching it
        std::fprintf(stderr, "raw_rr_server: worker %d: accept4: %s\n", id_, std::strerror(errno));
        ::epoll_ctl(epoll_, EPOLL_CTL_DEL, listener_, nullptr);
      }
      return;
    }
  }

  void on_conn(int fd, unsigned events) {
    Conn& c = *conns_[fd];
    if (events & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
      char buf[16384];
      for (;;) {
        const ssize_t got = ::recv(fd, buf, sizeof buf, 0);
        if (got > 0) {
          c.in.append(buf, got);
          if (got < static_cast<ssize_t>(sizeof buf)) break;
          continue;
        }
        if (got < 0 && errno == EINTR) continue;
        if (got < 0 && errno == EAGAIN) break;
        return close_conn(fd);  // EOF or error
      }
      if (!parse(c)) return close_conn(fd);
    }
    flush(fd, c);
  }

  // Answers every complete request in `in`; false on a request we refuse to read.
  bool parse(Conn& c) {
    std::size_t pos = 0;
    while (!c.close_after) {
      const std::size_t end = c.in.find("\r\n\r\n", pos);
      if (end == std::string::npos) break;
      std::string_view head(c.in.data() + pos, end - pos);
      const std::size_t line_end = head.find("\r\n");
      std::string_view line = head.substr(0, line_end);
      bool keep_alive = line.ends_with("HTTP/1.1");
      std::size_t body = 0;
      for (std::size_t at = line_end; at != std::string_view::npos && at < head.size();) {
        const std::size_t next = head.find("\r\n", at + 2);
        std::string_view header = head.substr(at + 2, next == std::string_view::npos ? next : next - at - 2);
        if (iequals_prefix(header, "connection:")) {
          if (icontains(header, "close")) keep_alive = false;
          else if (icontains(header, "keep-alive")) keep_alive = true;
        } else if (iequals_prefix(header, "content-length:")) {
          body = std::strtoul(std::string(header.substr(15)).c_str(), nullptr, 10);
        }
        at = next;
      }
      if (end + 4 + body > c.in.size()) break;  // the body is still coming
      respond(c, line.starts_with("GET / ") || line.starts_with("HEAD / "), keep_alive, line.starts_with("HEAD "));
      pos = end + 4 + body;
    }
    c.in.erase(0, pos);
    return c.in.size() <= 65536;
  }

  void respond(Conn& c, bool found, bool keep_alive, bool head) {
    char body[64];
    const int body_size = found ? std::snprintf(body, sizeof body, "hello from worker %d\n", id_)
                                : std::snprintf(body, sizeof body, "not found\n");
    char header[256];
    const int header_size =
        std::snprintf(header, sizeof header, "HTTP/1.1 %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n%s\r\n",
                      found ? "200 OK" : "404 Not Found", body_size,
                      keep_alive ? "" : "Connection: close\r\n");
    c.out.append(header, header_size);
    if (!head) c.out.append(body, body_size);
    c.close_after = !keep_alive;
  }

  void flush(int fd, Conn& c) {
    while (!c.out.empty()) {
      const ssize_t sent = ::send(fd, c.out.data(), c.out.size(), MSG_NOSIGNAL);
      if (sent < 0 && errno == EINTR) continue;
      if (sent < 0 && errno == EAGAIN) break;
      if (sent < 0) return close_conn(fd);
      c.out.erase(0, sent);
    }
    if (c.out.empty() && c.close_after) return close_conn(fd);
    if (c.out.empty() == c.want_out) {  // wait for EPOLLOUT only while something is unsent
      c.want_out = !c.out.empty();
      watch(fd, c.want_out ? EPOLLIN | EPOLLOUT : EPOLLIN, EPOLL_CTL_MOD);
    }
  }

  int id_, channel_, listener_, epoll_ = -1;
  long connections_ = 0;
  std::vector<Conn*> conns_;
};

// ---- master ----

volatile sig_atomic_t g_stop = 0;
int g_listener_to_shut = -1;  // policy rr: SIGTERM shuts the listening socket down, ending a blocked accept4

void on_sigterm(int) {
  g_stop = 1;
  if (g_listener_to_shut >= 0) ::shutdown(g_listener_to_shut, SHUT_RDWR);
}

void send_fd(int channel, int fd) {
  char tag = 'c';
  iovec iov{&tag, 1};
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))];
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control;
  msg.msg_controllen = sizeof control;
  cmsghdr* c = CMSG_FIRSTHDR(&msg);
  c->cmsg_level = SOL_SOCKET;
  c->cmsg_type = SCM_RIGHTS;
  c->cmsg_len = CMSG_LEN(sizeof(int));
  std::memcpy(CMSG_DATA(c), &fd, sizeof fd);
  while (::sendmsg(channel, &msg, MSG_NOSIGNAL) < 0)
    if (errno != EINTR) die("sendmsg");
}

int usage() {
  std::fprintf(stderr, "usage: raw_rr_server --workers N --port P [--policy rr|none] [--defer-accept S]\n");
  return 64;
}

}  // namespace

int main(int argc, char** argv) {
  int workers = 2, port = 0, defer_accept = 0;
  bool round_robin = true;
  for (int i = 1; i < argc; ++i) {
    std::string_view arg = argv[i];
    const char* value = i + 1 < argc ? argv[i + 1] : nullptr;
    if (arg == "--workers" && value) workers = std::atoi(argv[++i]);
    else if (arg == "--port" && value) port = std::atoi(argv[++i]);
    else if (arg == "--policy" && value && (std::string_view(value) == "rr" || std::string_view(value) == "none"))
      round_robin = std::string_view(argv[++i]) == "rr";
    else if (arg == "--defer-accept" && value) defer_accept = std::atoi(argv[++i]);
    else return usage();
  }
  if (workers < 1 || port < 0 || port > 65535) return usage();

  const int listener = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | (round_robin ? 0 : SOCK_NONBLOCK), 0);
  if (listener < 0) die("socket");
  const int one = 1;
  ::setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::bind(listener, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) die("bind");
  if (defer_accept > 0 &&
      ::setsockopt(listener, IPPROTO_TCP, TCP_DEFER_ACCEPT, &defer_accept, sizeof defer_accept) != 0)
    die("setsockopt TCP_DEFER_ACCEPT");
  if (::listen(listener, 4096) != 0) die("listen");
  socklen_t addr_size = sizeof addr;
  ::getsockname(listener, reinterpret_cast<sockaddr*>(&addr), &addr_size);

  std::vector<int> channels;
  std::vector<pid_t> pids;
  for (int id = 1; id <= workers; ++id) {
    int sv[2];
    if (::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) != 0) die("socketpair");
    const pid_t pid = ::fork();
    if (pid < 0) die("fork");
    if (pid == 0) {
      ::signal(SIGTERM, SIG_IGN);  // the master decides when we leave
      for (int ours : channels) ::close(ours);
      ::close(sv[0]);
      if (round_robin) ::close(listener);
      Worker(id, sv[1], round_robin ? -1 : listener).run();
    }
    ::close(sv[1]);
    channels.push_back(sv[0]);
    pids.push_back(pid);
  }

  struct sigaction sa{};
  sa.sa_handler = on_sigterm;  // no SA_RESTART: a blocked accept4 returns EINTR
  ::sigaction(SIGTERM, &sa, nullptr);
  ::signal(SIGPIPE, SIG_IGN);
  std::printf("listening on 127.0.0.1:%d\n", ntohs(addr.sin_port));
  std::fflush(stdout);

  if (round_robin) {
    g_listener_to_shut = listener;
    if (g_stop) ::shutdown(listener, SHUT_RDWR);  // SIGTERM came before the handler knew the socket
    std::size_t next = 0;
    while (!g_stop) {
      const int fd = ::accept4(listener, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
      if (fd < 0) {
        if (errno == EINTR || errno == ECONNABORTED || g_stop) continue;
        if (errno == EMFILE || errno == ENFILE) {
          ::usleep(1000);
          continue;
        }
        die("accept4");
      }
      send_fd(channels[next], fd);
      next = (next + 1) % channels.size();
      ::close(fd);
    }
  } else {
    sigset_t term, old;
    sigemptyset(&term);
    sigaddset(&term, SIGTERM);
    ::sigprocmask(SIG_BLOCK, &term, &old);
    while (!g_stop) ::sigsuspend(&old);
  }

  // Ask each worker for its count; each answers after the connections sent before "q".
  std::string json = "{\"workers\":[";
  for (std::size_t i = 0; i < channels.size(); ++i) {
    const timeval timeout{5, 0};
    ::setsockopt(channels[i], SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
    char reply[32] = {};
    ssize_t got = -1;
    if (::send(channels[i], "q", 1, MSG_NOSIGNAL) == 1)
      while ((got = ::recv(channels[i], reply, sizeof reply - 1, 0)) < 0 && errno == EINTR) {
      }
    json += (i ? ",{\"id\":" : "{\"id\":") + std::to_string(i + 1) + ",\"connections\":" +
            (got > 0 ? std::string(reply, got) : std::string("null")) + "}";
    ::close(channels[i]);
  }
  std::printf("%s]}\n", json.c_str());
  std::fflush(stdout);
  for (pid_t pid : pids) ::waitpid(pid, nullptr, 0);
  return 0;
}
