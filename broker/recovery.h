// Start-up and reload: finding or creating the segment and making it match
// the configuration.
//
// On start the broker (1) re-attaches to a live segment of the same layout
// version (a broker restart: workers never notice, nothing is lost), else
// (2) creates a fresh segment and restores key state from the state file
// (a reboot), else (3) starts fresh. In every case the segment is then
// reconciled with the config: missing pools and keys are added, changed keys
// are updated in place keeping their state, keys gone from the config are
// removed (they leave rotation at once and are freed when their last lease
// ends).
#ifndef KEYMESH_BROKER_RECOVERY_H_
#define KEYMESH_BROKER_RECOVERY_H_

#include <memory>
#include <string>
#include <vector>

#include "broker/config.h"
#include "broker/persistence.h"
#include "keymesh/status.h"
#include "shm/segment.h"

namespace keymesh::broker {

// The segment name of the broker serving `socket_path`: "keymesh-" plus a
// hash of the path, so a restarted broker finds its segment again and two
// brokers with different sockets never share one.
std::string SegmentNameFor(const std::string& socket_path);

enum class StartMode { kReattached, kRestored, kFresh };
const char* StartModeName(StartMode mode);

struct OpenedSegment {
  std::unique_ptr<shm::Segment> segment;
  StartMode mode = StartMode::kFresh;
  std::string moved_aside;  // where a corrupt state file went (--discard-state)
};

// Opens or creates the segment named `name` for `config`, restoring from
// the state file when creating. A corrupt or unreadable state file is
// kCorruptState/kIoError unless `discard_state`, which moves it aside.
// The segment is reconciled with `config` before returning.
Result<OpenedSegment> OpenSegment(const BrokerConfig& config, const std::string& name, bool discard_state);

// Makes the pools and keys of `segment` match `pools` (see file comment).
// Bumps the segment generation when anything changed.
Status ReconcileSegment(shm::Segment& segment, const std::vector<PoolConfigEntry>& pools);

// Overwrites per-key state from `image` for keys present in both. A key
// whose fingerprint differs (rotated secret) gets its counters back but
// not its streaks, cooldown or exhausted state.
void RestoreFromImage(shm::Segment& segment, const StateImage& image);

}  // namespace keymesh::broker

#endif  // KEYMESH_BROKER_RECOVERY_H_
