// The shared-memory fast path of keymesh::Pool: leases granted and ended in
// the segment under its robust lock, with no system call and no socket.
//
//   LocalPool     leases, limits, status and the secrets table over the
//                 worker's view of the pool (shm::PoolUser); key changes are
//                 left to the subclass
//   EmbeddedPool  a LocalPool whose keys this process changes itself, in
//                 the segment (shm::PoolAdmin): the pool it created
//                 (Pool::CreateEmbedded) or a segment attached without a
//                 broker (Pool::AttachSegment)
//
// The attached pool (leases here, key changes through the broker) is
// AttachedPool in remote_pool.h.
#ifndef KEYMESH_CLIENT_LOCAL_POOL_H_
#define KEYMESH_CLIENT_LOCAL_POOL_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "client/pool_backend.h"
#include "keymesh/pool.h"
#include "shm/pool.h"
#include "shm/segment.h"

namespace keymesh::detail {

class LocalPool : public PoolBackend {
 public:
  const std::string& name() const noexcept final { return name_; }
  bool slow_path() const noexcept final { return false; }

  Result<Lease> Acquire(const Pool::AcquireOptions& options) final;
  Result<Lease> TryAcquire() final;
  Status End(const LeaseRef& lease, OutcomeKind kind, const Lease::EndOptions& options) final;
  Status ObserveLimits(std::string_view key_name, const LimitObservation& observation) final;
  void WakeWaiters() noexcept final { user_.WakeWaiters(); }

  Result<PoolStatus> GetStatus() final { return user_.Snapshot(); }
  uint32_t AvailableCount() final { return user_.AvailableCount(); }
  std::optional<std::string> NameOfSecret(std::string_view secret) final;
  std::optional<std::string> MaskedSecretOfSlot(uint32_t slot) final;
  void SetSelector(std::shared_ptr<const Selector> selector) final;
  Status SnapshotKeys(KeySnapshot* out, uint32_t capacity, KeysSnapshotInfo* info) final;
  Result<Lease> AcquireKey(const KeySnapshot& key, uint64_t tokens) final;
  Status WaitForChange(uint32_t wake_seq, double timeout, const CancelToken* cancel) final;
  // Asks `source_` (kUnknownKey when there is none) and learns the secrets.
  Status RefreshSecrets() final;

 protected:
  // `source` (may be empty) tells the secrets of keys this process has not
  // seen yet (added by another process, or rotated).
  LocalPool(std::unique_ptr<shm::Segment> segment, uint32_t pool_index, std::string name, Pool::SecretSource source);

  // Publishes the secrets of the keys of `secrets` that are in the segment
  // and new or changed here.
  void LearnSecrets(const Secrets& secrets);
  // The entry of `slot`, or null. Lock-free.
  const KeyEntry* EntryOf(uint32_t slot) const noexcept {
    return slot < entries_size_ ? entries_[slot].load(std::memory_order_acquire) : nullptr;
  }
  // Publishes a new entry for `slot`; the old one stays alive (leases may
  // point at it). Caller holds secrets_mutex_.
  void PublishLocked(uint32_t slot, std::string name, std::string secret, uint64_t fingerprint);

  shm::Segment& segment() const noexcept { return *segment_; }
  bool has_source() const noexcept { return static_cast<bool>(source_); }
  std::mutex& secrets_mutex() noexcept { return secrets_mutex_; }
  uint32_t entries_size() const noexcept { return entries_size_; }

 private:
  Result<Lease> Grant(const shm::LeaseHandle& handle);

  const std::unique_ptr<shm::Segment> segment_;
  shm::PoolUser user_;  // the worker's view: everything the fast path needs
  const std::string name_;
  const Pool::SecretSource source_;
  // Per slot, what this process knows of the key there. Readers load
  // without a lock; writers (under secrets_mutex_) publish a new entry and
  // keep the old one alive in entry_storage_ until the backend dies, so a
  // Lease's entry pointer never dangles.
  std::unique_ptr<std::atomic<const KeyEntry*>[]> entries_;
  uint32_t entries_size_ = 0;
  std::mutex secrets_mutex_;
  std::vector<std::unique_ptr<KeyEntry>> entry_storage_;    // guarded by secrets_mutex_
  std::vector<std::shared_ptr<const Selector>> selectors_;  // guarded by secrets_mutex_; every one ever set
  std::atomic<const Selector*> selector_{nullptr};          // the current one (null: the pool's strategy)
};

class EmbeddedPool final : public LocalPool, public KeyAdmin {
 public:
  // A fresh embedded pool holding `keys` (validated here: see
  // Pool::CreateEmbedded).
  static Result<std::unique_ptr<PoolBackend>> Create(const std::vector<KeySpec>& keys, const PoolOptions& options,
                                                     const EmbeddedOptions& embedded);
  // Pool::AttachSegment.
  static Result<std::unique_ptr<PoolBackend>> Attach(std::string_view segment_name, std::string_view pool_name,
                                                     Pool::SecretSource secrets);

  KeyAdmin& keys() noexcept override { return *this; }

  Status AddKey(const KeySpec& key) override;
  Status RemoveKey(std::string_view name) override;
  Status SetEnabled(std::string_view name, bool enabled) override { return admin_.SetEnabled(name, enabled); }
  Status ResetKey(std::string_view name) override { return admin_.ResetKey(name); }
  Result<uint32_t> ReclaimDead() override { return admin_.ReclaimDead(); }
  Status RestoreKey(std::string_view name, const KeyRestore& restore) override;

 private:
  EmbeddedPool(std::unique_ptr<shm::Segment> segment, uint32_t pool_index, std::string name, Pool::SecretSource source);

  shm::PoolAdmin admin_;        // the owner's view, for key changes
  const uint32_t creator_pid_;  // only this process knows secrets it adds
};

}  // namespace keymesh::detail

#endif  // KEYMESH_CLIENT_LOCAL_POOL_H_
