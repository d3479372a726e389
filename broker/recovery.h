// Start-up and reload: finding or creating the segment and making it match
// the configuration.
//
// On start the broker (1) re-attaches to the segment whose name it recorded
// beside its lock file, when that segment is its own (owner, mode, size),
// has this layout version and every pool in it is usable (a broker restart:
// workers never notice, nothing is lost), else (2) creates a fresh segment
// under a new random name and restores key state from the state file (a
// reboot, or a segment that was foreign, corrupt or poisoned), else (3)
// starts fresh. A segment it refuses never stops the start: the broker logs
// why and serves from a new one. In every case the segment is then
// reconciled with the config: missing pools and keys are added, changed keys
// are updated in place keeping their state, keys gone from the config are
// removed (they leave rotation at once and are freed when their last lease
// ends).
#ifndef KEYMESH_BROKER_RECOVERY_H_
#define KEYMESH_BROKER_RECOVERY_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "broker/config.h"
#include "broker/persistence.h"
#include "keymesh/status.h"
#include "shm/segment.h"

namespace keymesh::broker {

// A new segment name: "keymesh-" plus 32 hex digits (128 bits) from
// getrandom(), so no other local user can guess it and squat it in the
// world-writable /dev/shm before the broker creates it.
Result<std::string> NewSegmentName();
// Whether `name` has NewSegmentName()'s format.
bool IsSegmentName(std::string_view name);

// The file that records the segment name of the broker serving
// `socket_path` (beside its lock file): `socket_path` + ".segment".
std::string SegmentNameFileFor(const std::string& socket_path);
// The recorded name, or nullopt when there is none or the file cannot be
// trusted (not a regular file, a symlink, not owned by this euid, writable
// by others, not one well-formed name); the reason is logged.
std::optional<std::string> ReadSegmentName(const std::string& file);
// Records `name` in `file` atomically (temp file, fsync, rename), mode 0640.
Status RecordSegmentName(const std::string& file, const std::string& name);

// How long the start waits for a live process holding a pool lock in a
// segment it would re-attach to before it gives that segment up.
inline constexpr uint64_t kPoolProbeNanos = 500'000'000;
// Whether every pool in `segment` can be used: its lock is free or freed
// within kPoolProbeNanos (a dead holder is taken over and repaired) and
// its lease accounting is consistent. The message names the pool.
Status CheckPools(shm::Segment& segment);

enum class StartMode { kReattached, kRestored, kFresh };
const char* StartModeName(StartMode mode);

struct OpenedSegment {
  std::unique_ptr<shm::Segment> segment;
  StartMode mode = StartMode::kFresh;
};

// The state file as a start needs it: nullopt when there is none. A corrupt
// or unreadable file is kCorruptState/kIoError unless `discard_state`,
// which moves it aside (*moved_aside names where) and starts without it.
// Read on every start, also before a re-attach: its runtime keys and
// tombstones are not in the segment.
Result<std::optional<StateImage>> LoadStateForStart(const std::string& path, bool discard_state,
                                                    std::string* moved_aside);

// The pools a segment must hold: the config's, amended by the runtime keys
// and tombstones (fingerprints need the segment's salt, hence the segment).
using DesiredPools = std::function<std::vector<PoolConfigEntry>(const shm::Segment& segment)>;

// Opens the segment recorded in SegmentNameFileFor(config.socket) or
// creates one under a new name (recording it), restoring from `image` when
// creating. The segment is reconciled with desired(segment) before
// returning. The caller holds the lock file.
Result<OpenedSegment> OpenSegment(const BrokerConfig& config, const std::optional<StateImage>& image,
                                  const DesiredPools& desired);

// Makes the pools and keys of `segment` match `pools` (see file comment).
// Bumps the segment generation when anything changed.
Status ReconcileSegment(shm::Segment& segment, const std::vector<PoolConfigEntry>& pools);

// Test-only: called by ReconcileSegment for every key it is about to add or
// change, after it read the pool's keys and before it changes anything.
using ReconcileHook = void (*)(std::string_view pool, std::string_view key);
void SetReconcileHookForTesting(ReconcileHook hook) noexcept;

// Overwrites per-key state from `image` for keys present in both. A key
// whose fingerprint differs (rotated secret) gets its counters back but
// not its streaks, cooldown or exhausted state. A restored cooldown is what
// was left of it by the wall clock, capped at the longest cooldown the pool
// could have set (max(max_cooldown, default_cooldown, the key's last
// cooldown)): a wall clock that went back (RTC reset, old VM snapshot) never
// benches a key for longer than that.
void RestoreFromImage(shm::Segment& segment, const StateImage& image);
// The same at the given clock readings (ns), for tests.
void RestoreFromImage(shm::Segment& segment, const StateImage& image, uint64_t wall_now, uint64_t mono_now);

}  // namespace keymesh::broker

#endif  // KEYMESH_BROKER_RECOVERY_H_
