// What a fuzz harness must not take from the machine it runs on. CI's
// fixed-seed run must reach the same inputs, and so the same verdict, on
// every run of a commit. scripts/fuzz --ci turns off compare-guided mutation
// (a pid or a clock reading in a traced comparison would steer it); this
// keeps the branches themselves from following the machine or the calendar
// (a restored cooldown read against today's clock, a random salt's
// fingerprints). So the harnesses run on fixed clocks and pin what a
// segment's creator writes from the machine.
#ifndef KEYMESH_TESTS_FUZZ_FUZZ_ENV_H_
#define KEYMESH_TESTS_FUZZ_FUZZ_ENV_H_

#include <cstdint>

#include "shm/segment.h"

namespace keymesh::fuzz {

// The fixed "now" of a harness: 100 s after the state seeds' written_at
// (wall clock), and a monotonic clock of 1000 s.
inline constexpr uint64_t kFuzzWallNs = 1'700'000'100'000'000'000;
inline constexpr uint64_t kFuzzMonoNs = 1'000'000'000'000;

// Overwrites the fingerprint salt (getrandom) and the creation times (the
// machine's clocks) of `segment` and of its pools in use, with fixed
// values. The salt before any key is added: fingerprints are made with it.
inline void PinSegment(shm::Segment& segment) {
  shm::SegmentHeader* h = segment.header();
  h->fingerprint_salt[0] = 0x6b65796d65736866ull;  // "keymeshf"
  h->fingerprint_salt[1] = 0x757a7a73616c7431ull;  // "uzzsalt1"
  h->created_wall = kFuzzWallNs;
  for (uint32_t i = 0; i < segment.capacities().max_pools; ++i) {
    shm::PoolHeader* ph = segment.pool_header(i);
    if (ph->use != shm::PoolUse::kInUse) continue;
    ph->created_mono = kFuzzMonoNs;
    ph->created_wall = kFuzzWallNs;
  }
}

}  // namespace keymesh::fuzz

#endif  // KEYMESH_TESTS_FUZZ_FUZZ_ENV_H_
