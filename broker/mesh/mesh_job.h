// The broker's mesh job: the one piece of the broker that talks to Redis
// (through MeshStore), on threads of its own, so that no socket op, no
// periodic job and no worker ever waits on Redis.
//
//   refresh thread  every `refresh` s: one bulk Lease() for all keys; writes
//                   each key's share into the segment (PoolAdmin::SetShares);
//                   publishes local cooldowns, circuit changes, revocations,
//                   disables and resets it finds in the segment (polled
//                   lock-free through PoolHeader::events_seq); claims the
//                   mesh-wide half-open probe; follows `outage` once the
//                   lease expired with Redis unreachable.
//   event thread    XREAD BLOCK on the event stream; merges other hosts'
//                   changes into the segment (PoolAdmin::MergeRemote), never
//                   shortening a deadline; resyncs in full after a
//                   reconnect or a gap.
//
// The io thread hands it the keys (SetKeys, at start, reload and key
// changes) and reads Status(); both take the job's own mutex briefly.
#ifndef KEYMESH_BROKER_MESH_MESH_JOB_H_
#define KEYMESH_BROKER_MESH_MESH_JOB_H_

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "broker/mesh/mesh_config.h"
#include "broker/mesh/mesh_status.h"
#include "broker/mesh/store.h"

namespace keymesh::shm {
class PoolAdmin;
}

namespace keymesh::broker::mesh {

// A key as the mesh sees it: its provider limits (for the whole mesh) and
// the keyed hash of its secret.
struct MeshKey {
  std::string pool;
  std::string key;
  std::string fingerprint;  // MeshFingerprint(ns, secret)
  uint32_t rpm = 0;         // 0: unlimited
  uint64_t tpm = 0;
  uint32_t burst = 0;
};

// The keyed hash (HMAC-SHA-1, hex) the hosts of namespace `ns` compare a
// key's secret by; never reversible to the secret.
std::string MeshFingerprint(const std::string& ns, const std::string& secret);

using StoreFactory = std::function<std::unique_ptr<MeshStore>()>;

class MeshJob {
 public:
  // `store` makes one store per thread (RedisMeshStore in production, a
  // fake in tests).
  MeshJob(MeshConfig config, StoreFactory store);
  ~MeshJob();  // Stop()
  MeshJob(const MeshJob&) = delete;
  MeshJob& operator=(const MeshJob&) = delete;

  void Start();
  // Gives this host's shares back (Leave) when Redis answers within the
  // timeout, stops the threads and clears the shares from the segment.
  void Stop();
  // The keys to share (replaces the previous list), and the admin views of
  // their pools (the broker's registry: each pointer must stay valid for
  // the job's life; the registry never frees one).
  void SetKeys(std::vector<MeshKey> keys, std::map<std::string, shm::PoolAdmin*> pools);
  MeshStatus Status() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace keymesh::broker::mesh

#endif  // KEYMESH_BROKER_MESH_MESH_JOB_H_
