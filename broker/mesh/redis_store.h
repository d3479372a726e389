// MeshStore over one Redis (store.h has the contract; lua_scripts.h the
// data model). Each call is one round trip, bounded by the config's timeout
// (ReadEvents: plus its block), a failure drops the connection and the next
// call reconnects. ReadEvents is one XREAD when it reads on from where the
// store's last read or snapshot ended (it tells a gap by the entries'
// sequence numbers), else one more round trip first to place `after_id`.
// Replies are parsed defensively: a wrong shape is kProtocolError, never
// trusted.
//
// Threading: as MeshStore, one store per thread.
#ifndef KEYMESH_BROKER_MESH_REDIS_STORE_H_
#define KEYMESH_BROKER_MESH_REDIS_STORE_H_

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "broker/mesh/mesh_config.h"
#include "broker/mesh/redis_connection.h"
#include "broker/mesh/store.h"

namespace keymesh::broker::mesh {

// A pool, key or namespace name as it appears inside a Redis key: bytes
// other than [A-Za-z0-9._-] as %XX (uppercase hex), so ':' '/' '{' and
// '%' never collide. DecodeName is the strict inverse (nullopt otherwise).
std::string EncodeName(std::string_view name);
std::optional<std::string> DecodeName(std::string_view encoded);

class RedisMeshStore final : public MeshStore {
 public:
  // Entries the event stream keeps (XADD MAXLEN ~).
  static constexpr uint32_t kStreamMaxLen = 10000;
  // Events one ReadEvents returns at most.
  static constexpr uint32_t kReadCount = 1000;
  // Keys one Lease may carry.
  static constexpr size_t kMaxLeaseKeys = 10000;

  // Keeps the endpoint, password, namespace and timeout of `config`.
  explicit RedisMeshStore(const MeshConfig& config);

  Status Connect() override;
  bool connected() const override;
  void Disconnect() override;
  Result<LeaseReply> Lease(const LeaseRequest& request) override;
  Status Leave(const std::string& host) override;
  Result<KeyEvent> Publish(const KeyEvent& event) override;
  Result<EventBatch> ReadEvents(const std::string& after_id, uint32_t block_ms) override;
  Result<EventBatch> Snapshot() override;
  Result<bool> ClaimProbe(const std::string& pool, const std::string& key, const std::string& host,
                          uint64_t ttl_ms) override;
  Result<TimeSample> Time() override;
  void Interrupt() override;

  // "ns:" encoded, the prefix of every Redis key of this mesh (tests).
  const std::string& key_prefix() const noexcept { return prefix_; }

 private:
  Status Bad(const std::string& what);  // kProtocolError, drops the connection
  // Records the epoch seen; true when it differs from the one seen before.
  bool NoteEpoch(const std::string& epoch);

  RedisConnection conn_;
  std::string prefix_;
  std::string epoch_;
  bool epoch_known_ = false;
  // Where the last read or snapshot ended: the stream id and the sequence
  // number of its entry (0: before the first); unset after a failure.
  struct Cursor {
    std::string id;
    uint64_t seq = 0;
  };
  std::optional<Cursor> cursor_;
};

}  // namespace keymesh::broker::mesh

#endif  // KEYMESH_BROKER_MESH_REDIS_STORE_H_
