// The state file: per pool and key name, what must survive a reboot
// (cooldown deadline as wall-clock time, failure and 429 streaks, last
// cooldown, enabled, exhausted, counters, EMA latency) plus the segment's
// fingerprint salt so fingerprints stay stable across a fresh segment.
//
// File format (one JSON object):
//   {"format":"keymesh-state","version":2,"written_at":<wall ns>,
//    "body":{"salt":[u64,u64],"pools":{"<pool>":{"<key>":{...}}},
//            "runtime_keys":{"<pool>":{"<key>":{"secret_env":"VAR" | "secret_file":"/abs/path",
//                                               "weight":..,"max_concurrency":..,"rpm":..,"tpm":..,
//                                               "burst":..,"rate_margin":..}}},
//            "tombstones":{"<pool>":{"<key>":<fingerprint u64>}}},
//    "checksum":"fnv1a64:<16 hex>"}
// runtime_keys are keys added with add_key whose secret the broker can
// read again (where it comes from, never the secret); tombstones are keys
// removed with remove_key, by the fingerprint of the secret they had, so a
// config that still names them does not bring them back (KM-14). Version 1
// (without these two) is still read.
// The checksum covers the compact serialization of "body". Writes are
// atomic: temp file, fsync, rename over the old file, fsync the directory,
// so a crash at any point leaves the old or the new file, never a mix.
#ifndef KEYMESH_BROKER_PERSISTENCE_H_
#define KEYMESH_BROKER_PERSISTENCE_H_

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "keymesh/status.h"
#include "keymesh/types.h"
#include "shm/pool.h"
#include "shm/segment.h"

namespace keymesh::broker {

inline constexpr int64_t kStateFormatVersion = 2;

struct PersistedKey {
  std::string name;
  uint64_t fingerprint = 0;
  // cooldown_deadline is unused here: see cooldown_until_wall_ns.
  shm::RestoredState state;
  uint64_t cooldown_until_wall_ns = 0;  // 0: none
};

// A key added at run time, as the state file records it: its limits and
// where its secret comes from (exactly one of the two), never the secret.
struct PersistedRuntimeKey {
  KeySpec limits;  // name and limits; secret empty
  std::string secret_env;
  std::string secret_file;
};

struct StateImage {
  uint64_t salt[2] = {0, 0};
  std::map<std::string, std::vector<PersistedKey>> pools;
  std::map<std::string, std::vector<PersistedRuntimeKey>> runtime_keys;  // by pool
  std::map<std::string, std::map<std::string, uint64_t>> tombstones;     // pool -> key -> fingerprint
};

// Reads the persistable state of every pool in `segment`. Monotonic
// deadlines become wall-clock by adding `wall_minus_mono` (ns): take it from
// WallMinusMono() at each capture.
// `lock_timeout_ns` (0: wait as long as the holder lives) bounds the wait
// for each pool's lock (KM-05): a busy pool keeps its entry of `previous`
// (if given) instead of losing its state, and its name is appended to
// *busy (if given).
StateImage CaptureState(const shm::Segment& segment, int64_t wall_minus_mono, uint64_t lock_timeout_ns = 0,
                        const StateImage* previous = nullptr, std::vector<std::string>* busy = nullptr);

// CLOCK_REALTIME minus CLOCK_MONOTONIC now, in whole seconds (ns), so a wall
// clock stepped during the run (NTP sync after boot) reaches the next
// capture. `previous` is the last value returned: kept while the offset
// moved less than 1 s, so unchanged state still captures to identical bytes
// (no rewrite per tick from measuring jitter or a slewing clock).
int64_t WallMinusMono(std::optional<int64_t> previous);

// File content for `image` (newline-terminated) and its parse; written at
// `written_at` (wall-clock ns; the first form: now).
std::string SerializeState(const StateImage& image);
std::string SerializeState(const StateImage& image, uint64_t written_at);
// kCorruptState with a message saying what is wrong.
Result<StateImage> ParseState(std::string_view text);

// nullopt when the file does not exist; kCorruptState or kIoError when it
// exists but cannot be used.
Result<std::optional<StateImage>> ReadStateFile(const std::string& path);

// Moves a bad state file aside to `<path>.corrupt-<unix time>` (with a
// "-N" suffix when that name is taken: never over an earlier one), returns
// the new name. Never deletes it.
Result<std::string> MoveAside(const std::string& path);

// Removes the temp files (`<path>.tmp.<pid>`, WriteFileAtomically's) that
// a writer which died before its rename left beside `path`; the caller
// holds the lock file, so no live writer of `path` owns them. Returns the
// names removed.
std::vector<std::string> RemoveStaleTempFiles(const std::string& path);

// Writes state files atomically, skipping a write when nothing changed.
// Not thread-safe; the broker calls it from its io thread only.
class StatePersister {
 public:
  explicit StatePersister(std::string path) : path_(std::move(path)) {}
  // Writes `image` unless it equals the last image written (force: always).
  Status Save(const StateImage& image, bool force = false);
  const std::string& path() const noexcept { return path_; }

 private:
  std::string path_;
  std::string last_body_;
};

}  // namespace keymesh::broker

#endif  // KEYMESH_BROKER_PERSISTENCE_H_
