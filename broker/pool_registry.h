// The broker's pools and their secrets: a PoolAdmin view of every pool in
// the segment, the configured pools as amended at run time (keys added or
// removed over the socket), and the key name -> secret table the `secrets`
// op and the masked status read.
//
// Invariant 1 (ARCHITECTURE.md): key state lives only in the segment; what
// is kept here is configuration and secrets, never counters or cooldowns.
// Every method runs on the broker's io thread; the PoolAdmin pointers it
// hands out stay valid for the registry's life (pools are never removed
// from a segment) and are themselves thread- and process-safe.
#ifndef KEYMESH_BROKER_POOL_REGISTRY_H_
#define KEYMESH_BROKER_POOL_REGISTRY_H_

#include <cstddef>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "broker/config.h"
#include "keymesh/status.h"
#include "keymesh/types.h"
#include "shm/pool.h"
#include "shm/segment.h"

namespace keymesh::broker {

// The longest the broker waits for a pool's lock (KM-05): a process that
// stops inside a critical section (SIGSTOP, a debugger, a frozen cgroup) or
// a planted lock word makes that pool answer kBusy, never the whole broker
// wait. Critical sections last nanoseconds, so 50 ms is never reached by a
// holder that runs.
inline constexpr uint64_t kBrokerLockTimeoutNs = 50'000'000;

class PoolRegistry {
 public:
  using Pools = std::map<std::string, std::unique_ptr<shm::PoolAdmin>, std::less<>>;

  // `segment` must outlive the registry.
  explicit PoolRegistry(shm::Segment& segment) : segment_(segment) {}
  ~PoolRegistry();  // overwrites the secrets it holds
  PoolRegistry(const PoolRegistry&) = delete;
  PoolRegistry& operator=(const PoolRegistry&) = delete;

  // Takes the config's pools (at start and on reload) and rebuilds the
  // tables. Keys added over the socket stay; keys removed over the socket
  // come back if the new config names them.
  void Configure(std::vector<PoolConfigEntry> pools);
  // Makes the segment match the desired pools (ReconcileSegment), then
  // rebuilds the tables, also after a failure: whatever was applied stays.
  Status Reconcile();

  // nullptr when there is no such pool in the segment.
  shm::PoolAdmin* Find(std::string_view name) const;
  // The same, or UnknownPool(name).
  Result<shm::PoolAdmin*> Get(std::string_view name) const;
  // The configured pools' names, in config order.
  std::vector<std::string> Names() const;
  // Every pool in the segment, by name (also pools gone from the config,
  // which keep their slot but no keys).
  const Pools& pools() const noexcept { return pools_; }
  std::vector<shm::PoolAdmin*> All() const;

  // name -> secret of a pool's keys; nullptr for an unknown pool.
  const std::map<std::string, std::string>* Secrets(std::string_view pool) const;
  // The masked secret of a key ("" when unknown).
  std::string Masked(std::string_view pool, std::string_view key) const;
  // Keys with a secret, over all pools.
  size_t key_count() const;

  // Adds or updates a key of a configured pool (kUnknownKey for another
  // pool); on failure nothing of it is kept.
  Status AddKey(std::string_view pool, const KeySpec& key);
  // Removes a key; it stays removed until a reload re-reads a config that
  // names it.
  Status RemoveKey(std::string_view pool, std::string_view name);

  // Snapshot of one pool (kUnknownKey if none), or of every configured pool.
  // A busy pool (kBusy: its lock held past kBrokerLockTimeoutNs) fails
  // Snapshot; SnapshotAll leaves it out, appends its error to *busy (if
  // given) and logs it (at most every 10 s per pool), so one stuck pool
  // never hides the others.
  Result<PoolStatus> Snapshot(std::string_view pool) const;
  Result<std::vector<PoolStatus>> SnapshotAll(std::vector<Status>* busy = nullptr) const;
  // Logs pool_busy for `status` (kBusy of pool `pool`), at most every 10 s
  // per pool.
  void NoteBusy(std::string_view pool, const Status& status) const;

 private:
  // The config's pools plus the keys added at run time.
  std::vector<PoolConfigEntry> DesiredPools() const;
  void WipeSecrets() noexcept;
  // Refreshes pools_ from the segment and secrets_ from DesiredPools().
  void Rebuild();

  shm::Segment& segment_;
  std::vector<PoolConfigEntry> configured_;  // the config's pools, minus keys removed at run time
  std::map<std::string, std::map<std::string, KeySpec>, std::less<>> runtime_keys_;  // added over the socket
  Pools pools_;
  std::map<std::string, std::map<std::string, std::string>, std::less<>> secrets_;
  mutable std::map<std::string, uint64_t, std::less<>> busy_logged_at_;  // pool -> monotonic ns
};

// "no pool 'NAME'": the one message for a pool that does not exist.
Status UnknownPool(std::string_view name);

}  // namespace keymesh::broker

#endif  // KEYMESH_BROKER_POOL_REGISTRY_H_
