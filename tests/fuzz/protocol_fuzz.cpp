// A libFuzzer entry point for ipc::protocol::decode: every input is the payload of an internal
// message as a hostile peer could send it. decode() must never crash, and what it accepts must
// be exactly one of our messages: encoding the result gives back the input, byte for byte (so
// no field is read leniently, and nothing is left over). scripts/test builds and runs it:
//   clang++ -std=c++20 -g -O1 -fsanitize=fuzzer,address,undefined -Iinclude \
//     tests/fuzz/protocol_fuzz.cpp -o protocol_fuzz && ./protocol_fuzz -max_total_time=60 tests/fuzz/corpus/protocol
// Without -fsanitize=fuzzer there is no main() to link with: that is on purpose.
#include "cocluster/ipc/protocol.hpp"

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  namespace p = cocluster::ipc::protocol;
  const std::string_view bytes(reinterpret_cast<const char*>(data), size);
  if (auto m = p::decode(bytes)) {
    if (p::encode(*m) != bytes) std::abort();  // accepted something that is not our encoding
  }
  return 0;
}
