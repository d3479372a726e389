// The inside of keymesh::Pool (include/keymesh/pool.h). The public Pool is
// a handle that forwards each call, through one virtual call, to a
// PoolBackend chosen by the factory that made it:
//
//   EmbeddedPool  (local_pool.h)   leases and key changes in the segment
//   AttachedPool  (remote_pool.h)  leases in the broker's segment, key
//                                  changes through the broker
//   RemotePool    (remote_pool.h)  every call over the broker socket
//
// EmbeddedPool and AttachedPool share LocalPool (the shm fast path). Who
// changes the keys is a KeyAdmin: the EmbeddedPool itself, or, for the two
// broker-backed ones, a BrokerAdmin (remote_pool.h). A backend makes the
// leases it grants and ends them: a Lease points at its backend, which the
// Pool owns, hence "the Pool must outlive its leases".
#ifndef KEYMESH_CLIENT_POOL_BACKEND_H_
#define KEYMESH_CLIENT_POOL_BACKEND_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "keymesh/pool.h"

namespace keymesh::detail {

// What a process knows of one key: immutable once published, and never
// freed before the backend that published it (leases point at it).
struct KeyEntry {
  std::string name;
  std::string secret;
  uint64_t fingerprint = 0;
};

// name -> secret of a pool's keys (Pool::SecretSource's result).
using Secrets = std::vector<std::pair<std::string, std::string>>;

// A CancelToken's flag. A std::atomic<bool> because the shm wait checks
// exactly that type at every wake-up (shm::PoolUser::Acquire).
struct CancelState {
  std::atomic<bool> flag{false};
};

// The identity of a granted lease, as the backend that granted it needs it
// back to end it.
struct LeaseRef {
  const KeyEntry* entry = nullptr;
  uint32_t slot = 0;
  uint32_t lease = 0;
  uint32_t seq = 0;
  uint64_t acquire_ns = 0;
};

// Who changes a pool's keys: the process itself, in the segment
// (EmbeddedPool), or the broker, which owns the keys and knows their
// secrets (BrokerAdmin). Thread safety as for PoolBackend.
class KeyAdmin {
 public:
  virtual ~KeyAdmin() = default;
  virtual Status AddKey(const KeySpec& key) = 0;
  virtual Status RemoveKey(std::string_view name) = 0;
  virtual Status SetEnabled(std::string_view name, bool enabled) = 0;
  virtual Status ResetKey(std::string_view name) = 0;
  // Frees the leases of holders that no longer run; returns how many.
  virtual Result<uint32_t> ReclaimDead() = 0;
  // Pool::RestoreKey (arguments checked). Only the segment's owner can:
  // broker-backed pools refuse it (the broker's state file is authoritative).
  virtual Status RestoreKey(std::string_view name, const KeyRestore& restore);
};

// Thread safety: every method may be called from any number of threads at
// once, except that the destructor must be the last call.
class PoolBackend {
 public:
  virtual ~PoolBackend() = default;
  PoolBackend(const PoolBackend&) = delete;
  PoolBackend& operator=(const PoolBackend&) = delete;

  virtual const std::string& name() const noexcept = 0;
  virtual bool slow_path() const noexcept = 0;

  virtual Result<Lease> Acquire(const Pool::AcquireOptions& options) = 0;
  virtual Result<Lease> TryAcquire() = 0;
  // Ends `lease` (already validated by Lease::End: kind in range, permanent
  // only with kFailure, a success's latency filled in).
  virtual Status End(const LeaseRef& lease, OutcomeKind kind, const Lease::EndOptions& options) = 0;
  virtual Status ObserveLimits(std::string_view key_name, const LimitObservation& observation) = 0;
  virtual void WakeWaiters() noexcept = 0;

  // Who changes the keys; lives as long as the backend.
  virtual KeyAdmin& keys() noexcept = 0;
  // Asks where the secrets come from (the SecretSource, the broker) again
  // and learns what changed.
  virtual Status RefreshSecrets() = 0;

  virtual Result<PoolStatus> GetStatus() = 0;
  virtual uint32_t AvailableCount() = 0;
  virtual std::optional<std::string> NameOfSecret(std::string_view secret) = 0;
  virtual std::optional<std::string> MaskedSecretOfSlot(uint32_t slot) = 0;
  virtual void SetSelector(std::shared_ptr<const Selector> selector) = 0;
  // Schedulers outside the lock (Pool::SnapshotKeys, AcquireKey,
  // WaitForChange): the segment's backends; the socket slow path has no
  // segment to read (kInvalidArgument).
  virtual Status SnapshotKeys(KeySnapshot* out, uint32_t capacity, KeysSnapshotInfo* info);
  virtual Result<Lease> AcquireKey(const KeySnapshot& key, uint64_t tokens);
  virtual Status WaitForChange(uint32_t wake_seq, double timeout, const CancelToken* cancel);

  // The lease and cancel-token internals, for the backends (friendship is
  // not inherited, so these are the one door).
  static LeaseRef RefOf(const Lease& lease) noexcept {
    return LeaseRef{lease.entry_, lease.slot_, lease.lease_, lease.seq_, lease.acquire_ns_};
  }
  static const std::atomic<bool>* FlagOf(const CancelToken* token) noexcept {
    return token != nullptr ? &token->state_->flag : nullptr;
  }

 protected:
  PoolBackend() = default;
  // A lease granted by this backend.
  Lease MakeLease(const LeaseRef& ref) noexcept {
    Lease lease;
    lease.backend_ = this;
    lease.entry_ = ref.entry;
    lease.slot_ = ref.slot;
    lease.lease_ = ref.lease;
    lease.seq_ = ref.seq;
    lease.acquire_ns_ = ref.acquire_ns;
    return lease;
  }
};

// The message of an acquire that found no key (also the shm layer's).
inline constexpr const char* kNoKeyMessage =
    "No API keys are currently available. All keys are either cooling down or exhausted.";

// A timeout argument: a finite number of seconds >= 0 (at most 1e9).
Status ValidateTimeout(double seconds);
// What a key spec must be before any backend takes it: a usable secret
// (ValidateSecret), burst at most kMaxBurst, rate_margin negative (the
// pool's) or in [0, 0.5). The message never repeats the secret.
inline constexpr uint32_t kMaxBurst = 1'000'000;
Status ValidateKeySpec(const KeySpec& key);

}  // namespace keymesh::detail

#endif  // KEYMESH_CLIENT_POOL_BACKEND_H_
