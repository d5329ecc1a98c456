// A libFuzzer entry point for ipc::frame_parser: every input is a run of packets as a hostile
// peer could send them. Not part of the meson build: scripts/test builds it with clang and runs
// it for 60 s from the seed corpus (tests/fuzz/corpus/frame_parser, made by make_corpus.cpp):
//   clang++ -std=c++20 -g -O1 -fsanitize=fuzzer,address,undefined -Iinclude \
//     tests/fuzz/frame_parser_fuzz.cpp -o frame_parser_fuzz && ./frame_parser_fuzz -max_total_time=60 new/ tests/fuzz/corpus/frame_parser
// Input: repeated [control byte][length, 2 bytes little-endian][length bytes of packet], where
// the control byte's bits 0-1 are how many fds come with the packet (0-3), bit 2 sets
// MSG_CTRUNC, bit 3 sets MSG_TRUNC and bit 4 makes the packet an end of input (recvmsg's 0).
// Without -fsanitize=fuzzer there is no main() to link with: that is on purpose.
#include <fcntl.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <vector>

#include "cocluster/ipc/frame_parser.hpp"

namespace {

// A small limit, so the fuzzer reaches "exceeds the limit" and multi-frame messages cheaply.
constexpr std::size_t k_max_message = 3 * cocluster::ipc::max_fragment;

// The fds below 256 (an input holds a few at a time and a leaked one takes the lowest free
// number, so a leak shows there; scanning 1,024 cost a third of each run).
int open_fds() {
  int n = 0;
  for (int fd = 0; fd < 256; ++fd) n += ::fcntl(fd, F_GETFD) != -1;
  return n;
}

void require(bool ok) {
  if (!ok) std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using cocluster::ipc::frame_parser;
  const int fds_before = open_fds();
  {
    frame_parser parser(k_max_message);
    std::size_t at = 0;
    while (at + 3 <= size) {
      const std::uint8_t control = data[at];
      const std::size_t length = std::min<std::size_t>(data[at + 1] | data[at + 2] << 8, size - at - 3);
      std::string_view packet(reinterpret_cast<const char*>(data) + at + 3, length);
      at += 3 + length;
      std::vector<cocluster::detail::unique_fd> fds;
      for (int i = 0; i < (control & 3); ++i) fds.emplace_back(::open("/dev/null", O_RDONLY | O_CLOEXEC));
      const int flags = (control & 4 ? MSG_CTRUNC : 0) | (control & 8 ? MSG_TRUNC : 0);
      auto r = parser.feed(control & 16 ? std::string_view() : packet, fds, flags);
      switch (r.what) {
        case frame_parser::status::message:
          require(r.data.size() <= k_max_message);
          // A handle has its fd, or (a user's, alone) says it was lost to the fd limit.
          require(!r.handle || r.handle.native_handle() >= 0 || r.handle.lost());
          require(!r.handle.lost() || (r.kind == cocluster::ipc::message_kind::user && r.handle.native_handle() < 0 &&
                                       r.extra_fds.empty() && r.fds_lost == 0));
          require(static_cast<unsigned>(r.handle.kind()) < cocluster::handle_kind_count);
          // fds are counted lost only when the kernel said so, and never past the packet's 16
          require(r.fds_lost == 0 || (flags & MSG_CTRUNC));
          require((r.handle ? 1u : 0u) + r.extra_fds.size() + r.fds_lost <= cocluster::ipc::max_fds_per_packet);
          break;
        case frame_parser::status::failed: require(r.error && !r.detail.empty()); break;
        case frame_parser::status::end_of_input: require(!parser.in_message()); break;
        case frame_parser::status::need_more: require(parser.in_message()); break;
      }
    }
  }
  require(open_fds() == fds_before);  // every fd, taken or refused, is closed
  return 0;
}
