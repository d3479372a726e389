// The C++ client API: a key pool whose state lives in a shared segment.
//
//   auto pool = keymesh::Pool::CreateEmbedded({{"a", "sk-..."}, {"b", "sk-..."}}, {});
//   {
//     keymesh::Result<keymesh::Lease> lease = (*pool)->Acquire();
//     if (!lease.ok()) { /* lease.status().message() */ }
//     CallProvider(lease->secret());
//   }  // released here with the measured latency
//
// Process and thread safety: a Pool may be used from any number of threads.
// An embedded pool is shared with every process forked after it was created
// (gunicorn --preload); an attached pool shares the broker's segment with
// every process on the host. The fast path (Acquire/Release) makes no system
// call unless it has to sleep.
#ifndef KEYMESH_POOL_H_
#define KEYMESH_POOL_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "keymesh/export.h"
#include "keymesh/rate_limit_headers.h"
#include "keymesh/selector.h"
#include "keymesh/status.h"
#include "keymesh/types.h"

namespace keymesh {

namespace shm {
class Segment;
class PoolAdmin;
class Clock;
}  // namespace shm

class Pool;

namespace detail {
// What a process knows of one key: immutable once published.
struct KeyEntry {
  std::string name;
  std::string secret;
  uint64_t fingerprint = 0;
};
class BrokerLink;  // the connection to keymesh-broker (client/broker_client.cc)
}  // namespace detail

// One acquired key. Move-only. Unless one of Release / MarkFailed /
// MarkRateLimited / Cancel was called, the destructor releases it as a
// success with the latency measured since the grant. The Pool must outlive
// its leases.
class KEYMESH_EXPORT Lease {
 public:
  Lease() noexcept = default;
  Lease(Lease&& other) noexcept;
  Lease& operator=(Lease&& other) noexcept;
  Lease(const Lease&) = delete;
  Lease& operator=(const Lease&) = delete;
  ~Lease();

  bool active() const noexcept { return pool_ != nullptr; }
  // The API key. Valid while the Pool lives.
  const std::string& secret() const noexcept { return entry_->secret; }
  const std::string& key_name() const noexcept { return entry_->name; }
  // Seconds since the grant.
  double elapsed() const noexcept;

  // Success. latency: seconds (default: measured since the grant); tokens:
  // tokens the request used.
  Status Release(std::optional<double> latency = std::nullopt, uint64_t tokens = 0);
  // A non-429 failure. Returns kKeyExhausted once, when this failure opened
  // the key's circuit (max_failures consecutive failures) — the lease is
  // ended either way. `permanent` (an authentication failure, e.g. HTTP 401)
  // revokes the key until reset or AddKey.
  Status MarkFailed(bool permanent = false);
  // A 429: cools the key for `cooldown` seconds (pool default when absent),
  // never shortening a deadline already set; consecutive 429s escalate.
  Status MarkRateLimited(std::optional<double> cooldown = std::nullopt);
  // Ends the lease without an outcome (the request was never sent).
  Status Cancel();
  // Feeds what the provider's response headers said about this key's limits
  // (ParseLimitHeaders) to the pool; the lease stays held.
  Status ObserveLimits(const LimitObservation& observation);

  // Opaque identity of the lease (for language bindings).
  uint32_t slot() const noexcept { return slot_; }

 private:
  friend class Pool;
  Status End(uint32_t kind, std::optional<double> latency, uint64_t tokens, std::optional<double> cooldown,
             bool permanent = false);

  Pool* pool_ = nullptr;
  const detail::KeyEntry* entry_ = nullptr;
  uint32_t slot_ = 0;
  uint32_t lease_ = 0;
  uint32_t seq_ = 0;
  uint64_t acquire_ns_ = 0;
};

struct EmbeddedOptions {
  uint32_t keys_capacity = 1024;    // keys the pool can ever hold
  uint32_t leases_capacity = 4096;  // leases held at once, all processes together
};

class KEYMESH_EXPORT Pool {
 public:
  ~Pool();
  Pool(const Pool&) = delete;
  Pool& operator=(const Pool&) = delete;

  // A pool without a broker, in an anonymous shared segment inherited by
  // children forked afterwards. Keys need unique non-empty names and
  // non-empty, unique secrets (kInvalidArgument otherwise).
  static Result<std::unique_ptr<Pool>> CreateEmbedded(const std::vector<KeySpec>& keys, const PoolOptions& options,
                                                      const EmbeddedOptions& embedded = {});

  // Called when the pool meets a key whose secret it does not know (a key
  // added elsewhere) or whose fingerprint changed: returns name -> secret of
  // the pool's keys, or an error. Used by the broker client.
  using SecretSource = std::function<Result<std::vector<std::pair<std::string, std::string>>>()>;

  // Opens the named segment (validating magic, layout version and shape)
  // and the pool in it. kLayoutMismatch on another layout version.
  static Result<std::unique_ptr<Pool>> AttachSegment(std::string_view segment_name, std::string_view pool_name,
                                                     SecretSource secrets);

  // Connects to the keymesh-broker at `socket_path` (empty: $KEYMESH_SOCKET,
  // else /run/keymesh/keymesh.sock): hello (registers this process for lease
  // ownership), secrets, then maps the broker's segment and attaches to the
  // pool. When the segment cannot be mapped, every call goes over the socket
  // (slow path). kBrokerUnavailable when nobody answers. Implemented in
  // client/broker_client.cc.
  static Result<std::unique_ptr<Pool>> Connect(std::string_view socket_path, std::string_view pool_name);

  // Waits up to `timeout` seconds (the pool's acquire_timeout when absent)
  // for an eligible key. kNoAvailableKey on timeout.
  Result<Lease> Acquire(std::optional<double> timeout = std::nullopt);
  // As Acquire(timeout), but another thread may end the wait early: it sets
  // *cancel to true and then calls access().WakeWaiters(); the call returns
  // kClosed. A wait ended this way is not counted as a failed acquire, so a
  // flag already set makes one uncounted attempt. *cancel must outlive the
  // call. (Used by the C ABI for asyncio cancellation and close.)
  Result<Lease> Acquire(std::optional<double> timeout, const std::atomic<bool>* cancel);
  // The general form: `tokens` is the expected token count of the request,
  // reserved up front from the key's TPM budget (the release's count
  // corrects it).
  struct AcquireOptions {
    std::optional<double> timeout;  // seconds; absent: the pool's acquire_timeout
    uint64_t tokens = 0;
    const std::atomic<bool>* cancel = nullptr;  // as for Acquire(timeout, cancel)
  };
  Result<Lease> Acquire(const AcquireOptions& options);
  // One attempt, never waits.
  Result<Lease> TryAcquire();
  // What the provider said about a key's limits (by key name).
  Status ObserveLimits(std::string_view key_name, const LimitObservation& observation);

  // Adds a key, or re-admits an existing one of the same name (clears its
  // failure streak and exhaustion, keeps its counters and leases). An empty
  // name means: the key whose secret matches, else a generated "key-N".
  // Embedded pools: after fork, only the creating process knows new secrets,
  // so other processes must call AddKey before forking (kInvalidArgument
  // otherwise).
  Status AddKey(const KeySpec& key);
  Status RemoveKey(std::string_view name);
  Status EnableKey(std::string_view name);
  Status DisableKey(std::string_view name);
  Status ResetKey(std::string_view name);

  Result<PoolStatus> GetStatus();
  uint32_t AvailableCount();
  const std::string& name() const noexcept { return name_; }
  // Name of the key holding `secret`, if any.
  std::optional<std::string> NameOfSecret(std::string_view secret);
  // MaskSecret() of the secret of the key in `slot`, if this process knows
  // it (for status output: the secret itself never leaves the Pool).
  std::optional<std::string> MaskedSecretOfSlot(uint32_t slot);

  // Replaces the pool's strategy for this process's acquires (nullptr: back
  // to the pool's strategy). The selector must outlive its use.
  void SetSelector(std::shared_ptr<const Selector> selector);

  // For bindings and tests: the underlying segment view. Only for pools
  // that map a segment (not slow_path()).
  shm::PoolAdmin& access() noexcept { return *access_; }
  shm::Segment& segment() noexcept { return *segment_; }
  // True when every call goes over the broker socket (Connect() could not
  // map the segment).
  bool slow_path() const noexcept { return access_ == nullptr; }

 private:
  friend class Lease;
  Pool(std::unique_ptr<shm::Segment> segment, uint32_t pool_index, std::string name, SecretSource source);
  Result<Lease> MakeLease(uint32_t slot, uint32_t lease, uint32_t seq, uint64_t acquire_ns, uint64_t fingerprint);
  Status RefreshSecrets();
  void Publish(uint32_t slot, std::string name, std::string secret, uint64_t fingerprint);

  std::unique_ptr<shm::Segment> segment_;
  std::unique_ptr<shm::PoolAdmin> access_;
  std::string name_;
  SecretSource source_;
  uint32_t creator_pid_ = 0;
  // Per slot, what this process knows of the key there. Readers load
  // without a lock; writers (under secrets_mutex_) publish a new entry and
  // keep the old one alive in entry_storage_ until ~Pool, so a Lease's
  // entry pointer never dangles.
  std::unique_ptr<std::atomic<const detail::KeyEntry*>[]> entries_;
  uint32_t entries_size_ = 0;
  std::mutex secrets_mutex_;
  std::vector<std::unique_ptr<detail::KeyEntry>> entry_storage_;
  std::vector<std::shared_ptr<const Selector>> selectors_;  // every selector ever set stays alive
  std::atomic<const Selector*> selector_raw_{nullptr};

  // Broker client (client/broker_client.cc). broker_ is set for pools made
  // by Connect(): admin calls go to the broker, which knows the secrets.
  // In slow-path mode (no segment) every call goes over it.
  Pool(std::shared_ptr<detail::BrokerLink> broker, std::string name);
  Result<Lease> RemoteAcquire(std::optional<double> timeout, uint64_t tokens = 0);
  Status RemoteEnd(const Lease& lease, uint32_t kind, std::optional<double> latency, uint64_t tokens,
                   std::optional<double> cooldown, bool permanent);
  Status RemoteObserve(std::string_view key_name, const LimitObservation& observation);
  Status RemoteKeyOp(std::string_view op, std::string_view name);
  Status RemoteAddKey(const KeySpec& key);
  Result<PoolStatus> RemoteStatus();
  std::optional<std::string> RemoteNameOfSecret(std::string_view secret);
  std::shared_ptr<detail::BrokerLink> broker_;
};

}  // namespace keymesh

#endif  // KEYMESH_POOL_H_
