// What the mesh job reports (the `mesh` op, `keymeshctl mesh`, metrics):
// a copy taken under the job's lock, so any thread may read it.
#ifndef KEYMESH_BROKER_MESH_MESH_STATUS_H_
#define KEYMESH_BROKER_MESH_MESH_STATUS_H_

#include <cstdint>
#include <string>
#include <vector>

namespace keymesh::broker::mesh {

// The mesh modes (CONTRACT.md): leased (a valid lease from Redis; also
// while Redis is unreachable until the lease expires), learning (Redis
// lost its state: grants only echo what hosts held), share, closed, open
// (the outage modes, once the lease expired with Redis unreachable).
enum class MeshMode : uint8_t { kLeased = 0, kLearning = 1, kShare = 2, kClosed = 3, kOpen = 4 };
const char* MeshModeName(MeshMode mode) noexcept;

struct MeshKeyStatus {
  std::string pool;
  std::string key;
  double limit_rpm = 0;  // the key's provider limits (whole mesh); 0: unlimited
  double limit_tpm = 0;
  double share_rpm = 0;  // what this host may use now
  double share_tpm = 0;
  double burst = 0;      // requests back to back on this host
  double wants_rpm = 0;  // this host's demand as last reported
  double wants_tpm = 0;
  uint32_t holders = 0;   // hosts holding a lease of it
  bool mismatch = false;  // refused: another host has a different secret under this name
};

struct MeshStatus {
  bool enabled = false;  // false: no `mesh` in the config (everything else empty)
  std::string host;
  std::string ns;
  std::string redis;  // RedisEndpoint::Describe()
  MeshMode mode = MeshMode::kShare;
  bool redis_ok = false;       // the last call to Redis succeeded
  std::string last_error;      // the last Redis error ("" after a success)
  double rtt_seconds = -1;     // last Redis round trip; -1 before the first
  double since_refresh = -1;   // seconds since the last successful lease refresh; -1 never
  double lease_remaining = 0;  // seconds the current lease stays valid
  uint32_t hosts = 0;
  std::vector<std::string> members;
  std::string epoch;
  uint64_t refreshes = 0;  // successful lease refreshes
  uint64_t refresh_failures = 0;
  uint64_t events_published = 0;  // local changes sent to Redis
  uint64_t events_applied = 0;    // other hosts' changes merged into the segment
  uint64_t resyncs = 0;           // full state reads (after a reconnect or a trimmed stream)
  uint64_t rebalances = 0;        // another host was short of its fair part: refreshes asked for at once
  // Delay from a change on another host to its merge into this segment
  // (seconds; hosts on one machine share CLOCK_MONOTONIC, so this is exact
  // there), over the last 1024 events applied; -1 before the first.
  double propagation_p50 = -1;
  double propagation_p99 = -1;
  uint64_t propagation_samples = 0;
  std::vector<MeshKeyStatus> keys;
};

}  // namespace keymesh::broker::mesh

#endif  // KEYMESH_BROKER_MESH_MESH_STATUS_H_
