// Entry points shared by the libFuzzer targets (built with KEYMESH_FUZZ in
// build-asan/ by scripts/setup --asan, run by scripts/fuzz) and by fuzz_regression_test (the normal
// build), which replays tests/fuzz/regressions/<target>/* and the seed
// corpus through the same functions.
//
// Each function accepts any bytes. Returning normally is success; a crash,
// an abort (a broken invariant) or a sanitizer report is a bug.
#ifndef KEYMESH_TESTS_FUZZ_FUZZ_ENTRIES_H_
#define KEYMESH_TESTS_FUZZ_FUZZ_ENTRIES_H_

#include <cstddef>
#include <cstdint>

namespace keymesh::fuzz {

// Control protocol: splits the input into '\n'-terminated frames and feeds
// each through protocol::ParseRequest and the broker's dispatcher
// (Dispatcher::Handle) on a real segment, in-process and without a client
// socket; then closes the session (ending its slow-path leases). The broker
// is started once per process (StartForTesting) in a private directory.
void ProtocolInput(const uint8_t* data, size_t size);

// Config parser: broker::ParseConfig with a fixed environment and a private
// base directory holding one secret file.
void ConfigInput(const uint8_t* data, size_t size);

// State-file loader: broker::ParseState, and when it accepts the input,
// RestoreFromImage onto a small segment whose pool/key names match the
// seeds, then the pool's consistency check and a snapshot.
void StateInput(const uint8_t* data, size_t size);

// The segment as untrusted input (fuzz_segment.cc): overwrites of a laid-out
// segment's headers, lease records, index and free-lease stack, then every
// worker and broker operation on it, through the creator's mapping and an
// attached one.
void SegmentInput(const uint8_t* data, size_t size);

// Redis's replies as untrusted input (fuzz_redis.cc): the mesh's store
// against a "Redis" on a loopback socket that answers with the input's
// bytes, through a sequence of store calls the input chooses.
void RedisInput(const uint8_t* data, size_t size);

}  // namespace keymesh::fuzz

#endif  // KEYMESH_TESTS_FUZZ_FUZZ_ENTRIES_H_
