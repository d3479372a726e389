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
//
// A Pool is a handle on one of three private implementations, chosen by the
// factory that made it: an embedded pool (the segment and its keys belong to
// this process), a pool attached to a broker's segment (leases on the
// segment, key changes through the broker, which knows the secrets), or a
// slow-path pool (every call over the broker socket, when the segment cannot
// be mapped). Nothing of them is part of this header's ABI.
#ifndef KEYMESH_POOL_H_
#define KEYMESH_POOL_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "keymesh/export.h"
#include "keymesh/rate_limit_headers.h"
#include "keymesh/selector.h"
#include "keymesh/status.h"
#include "keymesh/types.h"

namespace keymesh {

class Pool;

namespace detail {
struct KeyEntry;     // what this process knows of one key (client/pool_backend.h)
class PoolBackend;   // a Pool's implementation (client/pool_backend.h)
struct CancelState;  // a CancelToken's flag (client/pool_backend.h)
}  // namespace detail

// Lets another thread end an Acquire() wait early: pass it in
// Pool::AcquireOptions::cancel, then call Pool::Cancel(token) (or Cancel()
// followed by Pool::WakeWaiters()). The wait returns kClosed, unless it got
// a key first. A set token stays set; a wait started with a set token makes
// one attempt that is not counted as a failed acquire.
//
// Thread safety: any thread may call any method at any time. The token must
// outlive every wait that uses it. Pools on the socket slow path wait inside
// the broker, which cannot be interrupted: there a token set before the call
// refuses it at once, and one set during it takes effect at its timeout.
class KEYMESH_EXPORT CancelToken {
 public:
  CancelToken();
  ~CancelToken();
  CancelToken(const CancelToken&) = delete;
  CancelToken& operator=(const CancelToken&) = delete;

  // Sets the token (idempotent). A wait sleeping on a pool notices it when
  // that pool's waiters are woken: use Pool::Cancel to do both.
  void Cancel() noexcept;
  bool cancelled() const noexcept;

 private:
  friend class detail::PoolBackend;
  std::unique_ptr<detail::CancelState> state_;
};

// One acquired key. Move-only. Unless one of Release / MarkFailed /
// MarkRateLimited / Cancel / End was called, the destructor releases it as
// a success with the latency measured since the grant. The Pool must outlive
// its leases.
//
// Thread safety: a Lease is single-threaded: one thread at a time may use a
// given Lease (it has no lock); different leases may be used from different
// threads at once.
class KEYMESH_EXPORT Lease {
 public:
  // The general form of ending a lease (End()); the named calls below are
  // End() with one outcome.
  struct EndOptions {
    // Seconds the request took. kSuccess: absent means measured since the
    // grant; NaN means no sample (the latency average stays as it is).
    // Ignored for the other outcomes.
    std::optional<double> latency;
    uint64_t tokens = 0;             // tokens the request used (not for kCancelled)
    std::optional<double> cooldown;  // kRateLimited: seconds; absent: the pool's default_cooldown
    bool permanent = false;          // kFailure: an authentication failure; revokes the key
  };

  Lease() noexcept = default;
  Lease(Lease&& other) noexcept;
  Lease& operator=(Lease&& other) noexcept;
  Lease(const Lease&) = delete;
  Lease& operator=(const Lease&) = delete;
  ~Lease();

  bool active() const noexcept { return backend_ != nullptr; }
  // The API key and the key's name: valid while the Pool lives, also after
  // the lease ended ("" for a default-constructed Lease).
  const std::string& secret() const noexcept;
  const std::string& key_name() const noexcept;
  // Seconds since the grant.
  double elapsed() const noexcept;

  // Ends the lease with `kind`. kNotHeld when it already ended;
  // kInvalidArgument (the lease stays held) for `permanent` without
  // kFailure or an unknown kind. A cooldown that is not a finite number of
  // seconds >= 0 still ends the lease (the request is over) and returns
  // kInvalidArgument. kKeyExhausted (the lease ended) exactly once: on the
  // failure that opened the key's circuit (max_failures consecutive
  // failures) or on the permanent failure that revoked it.
  Status End(OutcomeKind kind, const EndOptions& options);
  // Success. latency: seconds (default: measured since the grant); tokens:
  // tokens the request used.
  Status Release(std::optional<double> latency = std::nullopt, uint64_t tokens = 0);
  // A non-429 failure. `permanent` (an authentication failure, e.g. HTTP
  // 401) revokes the key until reset or AddKey.
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
  friend class detail::PoolBackend;

  detail::PoolBackend* backend_ = nullptr;  // null once ended
  const detail::KeyEntry* entry_ = nullptr;
  uint32_t slot_ = 0;
  uint32_t lease_ = 0;
  uint32_t seq_ = 0;
  uint64_t acquire_ns_ = 0;
};

// A key's progress from an earlier run of an embedded pool, kept by the
// client's own storage (the Python package's storage=), for
// Pool::RestoreKey.
struct KeyRestore {
  uint64_t successes = 0;
  uint64_t failures = 0;
  uint64_t rate_limited = 0;
  std::optional<double> latency_avg;  // seconds; absent: no sample
  double cooldown_remaining = 0;      // seconds from now
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
  // non-empty, unique secrets (ValidateSecret; kInvalidArgument otherwise).
  static Result<std::unique_ptr<Pool>> CreateEmbedded(const std::vector<KeySpec>& keys, const PoolOptions& options,
                                                      const EmbeddedOptions& embedded = {});

  // Called when the pool meets a key whose secret it does not know (a key
  // added elsewhere) or whose fingerprint changed: returns name -> secret of
  // the pool's keys, or an error. Used by the broker client.
  using SecretSource = std::function<Result<std::vector<std::pair<std::string, std::string>>>()>;

  // Opens the named segment (validating magic, layout version and shape)
  // and the pool in it. kLayoutMismatch on another layout version. Key
  // changes are made in the segment by this process, as for an embedded
  // pool; `secrets` (may be empty) tells it the secrets of keys it meets.
  static Result<std::unique_ptr<Pool>> AttachSegment(std::string_view segment_name, std::string_view pool_name,
                                                     SecretSource secrets);

  // Connects to the keymesh-broker at `socket_path` (empty: $KEYMESH_SOCKET,
  // else /run/keymesh/keymesh.sock): hello (registers this process for lease
  // ownership), secrets, then maps the broker's segment and attaches to the
  // pool: leases on the segment, key changes through the broker. When the
  // segment cannot be mapped, every call goes over the socket (slow_path()).
  // kBrokerUnavailable when nobody answers.
  static Result<std::unique_ptr<Pool>> Connect(std::string_view socket_path, std::string_view pool_name);

  struct AcquireOptions {
    std::optional<double> timeout;  // seconds; absent: the pool's acquire_timeout
    // The request's expected token count, reserved up front from the key's
    // TPM budget (the release's count corrects it).
    uint64_t tokens = 0;
    // Ends the wait early with kClosed (see CancelToken). May be null; must
    // outlive the call.
    const CancelToken* cancel = nullptr;
    // One attempt that never waits and, when no key is eligible, returns
    // kNoAvailableKey without counting a failed acquire (for bindings that
    // then wait elsewhere and count the outcome of that wait). `timeout`
    // and `cancel` are ignored.
    bool poll = false;
  };
  // Waits up to `timeout` seconds (the pool's acquire_timeout when absent)
  // for an eligible key. kNoAvailableKey on timeout.
  Result<Lease> Acquire(std::optional<double> timeout = std::nullopt);
  // The general form.
  Result<Lease> Acquire(const AcquireOptions& options);
  // One attempt, never waits (a failure is counted).
  Result<Lease> TryAcquire();
  // Sets `token` and wakes this pool's waiters, so the waits using it end
  // with kClosed. Any thread; the token may be in use by any number of
  // waits of this pool.
  void Cancel(CancelToken& token) noexcept;
  // Wakes every wait of this pool (in every process) so that each re-checks
  // its CancelToken and the pool's state. No effect on slow_path() pools.
  void WakeWaiters() noexcept;
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
  // Frees the leases of processes that no longer run (a worker killed while
  // holding keys); returns how many. For pools whose keys this process
  // administers (CreateEmbedded, AttachSegment): a broker does this by
  // itself, so Connect()ed pools return kInvalidArgument.
  Result<uint32_t> ReclaimDead();

  // Overwrites key `name`'s success, failure and 429 counters and latency
  // average with `restore`'s, and cools it for restore.cooldown_remaining
  // seconds (capped at max(max_cooldown, default_cooldown)) unless it
  // already cools longer; streaks, circuit, enabled and leases stay.
  // kInvalidArgument when a number is out of range (latency or cooldown
  // not finite, negative or above 1e9 seconds) and for broker-backed pools
  // (Connect: the broker's state file is authoritative); kUnknownKey.
  Status RestoreKey(std::string_view name, const KeyRestore& restore);
  Result<PoolStatus> GetStatus();
  uint32_t AvailableCount();
  const std::string& name() const noexcept;
  // Name of the key holding `secret`, if any.
  std::optional<std::string> NameOfSecret(std::string_view secret);
  // MaskSecret() of the secret of the key in `slot`, if this process knows
  // it (for status output: the secret itself never leaves the Pool).
  std::optional<std::string> MaskedSecretOfSlot(uint32_t slot);

  // Replaces the pool's strategy for this process's acquires (nullptr: back
  // to the pool's strategy). The Pool shares ownership of every selector it
  // is given and keeps each alive until the Pool is destroyed, because an
  // acquire on another thread may still be running the one replaced. No
  // effect on slow_path() pools (the broker selects).
  void SetSelector(std::shared_ptr<const Selector> selector);

  // Schedulers that run outside the pool's lock (a Python BaseScheduler):
  // take a snapshot, choose, acquire exactly the chosen key, or wait for a
  // change and snapshot again. Pools on the segment only (embedded and
  // attached); slow_path() pools return kInvalidArgument.
  //
  // One pass over the pool's keys into out[0..capacity) with no allocation;
  // info->count says how many keys there are (more than `capacity`: only the
  // first were written). Each key's secret is this process's copy, or null
  // when this process does not know it (AcquireKey then asks for it).
  Status SnapshotKeys(KeySnapshot* out, uint32_t capacity, KeysSnapshotInfo* info);
  // Acquires exactly the key `key` (from SnapshotKeys) names if it is still
  // eligible: the checks, accounting, quota and lease ownership of Acquire,
  // never waiting. kUnknownKey: the identity is stale (the key was removed,
  // or keys were added or removed since the snapshot); kNoAvailableKey: the
  // key is no longer eligible (cooling, busy, disabled, out of budget...);
  // kCapacityExceeded as for Acquire. Neither refusal counts as a failed
  // acquire.
  Result<Lease> AcquireKey(const KeySnapshot& key, uint64_t tokens = 0);
  // Sleeps until a change after the snapshot whose info->wake_seq is
  // `wake_seq` (a release, a key added, enabled or reset, WakeWaiters), the
  // earliest cooldown or budget deadline, or `timeout` seconds; at once if
  // one already happened. kClosed when `cancel` (may be null) is set.
  Status WaitForChange(uint32_t wake_seq, double timeout, const CancelToken* cancel = nullptr);

  // True when every call goes over the broker socket (Connect() could not
  // map the segment).
  bool slow_path() const noexcept;

 private:
  explicit Pool(std::unique_ptr<detail::PoolBackend> backend) noexcept;
  static Result<std::unique_ptr<Pool>> Wrap(Result<std::unique_ptr<detail::PoolBackend>> backend);

  std::unique_ptr<detail::PoolBackend> backend_;
};

}  // namespace keymesh

#endif  // KEYMESH_POOL_H_
