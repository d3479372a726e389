// One libFuzzer executable per entry point of fuzz_entries.h, chosen at
// compile time by KEYMESH_FUZZ_TARGET (protocol, config, state, segment or
// redis).
#include <cstddef>
#include <cstdint>

#include "fuzz_entries.h"

#define KEYMESH_FUZZ_CAT(a, b) a##b
#define KEYMESH_FUZZ_ENTRY(t) KEYMESH_FUZZ_CAT(t, _entry)

namespace {
[[maybe_unused]] void protocol_entry(const uint8_t* d, size_t n) { keymesh::fuzz::ProtocolInput(d, n); }
[[maybe_unused]] void config_entry(const uint8_t* d, size_t n) { keymesh::fuzz::ConfigInput(d, n); }
[[maybe_unused]] void state_entry(const uint8_t* d, size_t n) { keymesh::fuzz::StateInput(d, n); }
[[maybe_unused]] void segment_entry(const uint8_t* d, size_t n) { keymesh::fuzz::SegmentInput(d, n); }
[[maybe_unused]] void redis_entry(const uint8_t* d, size_t n) { keymesh::fuzz::RedisInput(d, n); }
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  KEYMESH_FUZZ_ENTRY(KEYMESH_FUZZ_TARGET)(data, size);
  return 0;
}
