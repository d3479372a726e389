// The two views of one pool in the segment, on the model of iceoryx's
// user-side and daemon-side port classes over one plain-data struct:
//
//   PoolUser   the worker's view: acquire and release leases, feed provider
//              limits, read the status. Every process that maps the segment.
//   PoolAdmin  the owner's view (the broker, or the process that created an
//              embedded pool): everything PoolUser does, plus adding,
//              removing, enabling, resetting and reconfiguring keys, restoring
//              and exporting persisted state, and reclaiming the leases of
//              dead or hung holders.
//
// Both are thin layers over PoolCore (pool_core.h), which keeps the
// invariants and the crash safety. A view is a cheap object (pointers into a
// mapping); the Segment must outlive it. One view may be used from many
// threads and many processes at once: all shared state is behind the pool's
// process-shared mutex.
//
// The segment is untrusted input (pool_core.h): any call may fail with
// kSegmentError when the pool's shared state is inconsistent beyond what a
// repair restores (the view is then poisoned: every later call fails the
// same way, at the cost of one load), never with a crash.
//
// Lock timeout. By default a call waits for the pool's lock as long as the
// holder lives (workers: the holder's critical section lasts nanoseconds).
// A caller that must never block indefinitely (the broker: one stopped
// process must not freeze it) sets set_lock_timeout(ns) on its view; then
// every call that would wait longer fails with kBusy ("pool 'a' is busy: its
// lock is held by pid N for X ms or more") and changes nothing. The calls
// that return plain values have a Status-returning overload (an out
// parameter) that tells busy from empty; the plain ones return the empty
// value (0, kNever, nullopt, "", {}) when the lock was not taken.
#ifndef KEYMESH_SHM_POOL_H_
#define KEYMESH_SHM_POOL_H_

#include <atomic>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "keymesh/selector.h"
#include "keymesh/status.h"
#include "keymesh/types.h"
#include "shm/clock.h"
#include "shm/pool_core.h"
#include "shm/pool_types.h"
#include "shm/process_id.h"
#include "shm/rate_budget.h"
#include "shm/segment.h"

namespace keymesh::shm {

class PoolUser {
 public:
  PoolUser(const Segment& segment, uint32_t pool_index, const Clock& clock = SystemClock::Instance()) noexcept;

  uint32_t index() const noexcept { return core_.pool_index(); }
  PoolHeader* header() const noexcept { return core_.header(); }
  PoolInfo Info() const { return core_.Info(); }

  // The longest any call of this view waits for the pool's lock (ns of real
  // time); 0, the default, waits as long as the holder lives. See the top
  // comment. Thread-safe; applies to calls that start afterwards.
  void set_lock_timeout(uint64_t ns) noexcept { core_.set_lock_timeout(ns); }
  uint64_t lock_timeout() const noexcept { return core_.lock_timeout(); }
  // Non-null once this view gave up on the pool (kSegmentError): why.
  const char* poisoned() const noexcept { return core_.poisoned(); }

  // One attempt. kNoAvailableKey when no key is eligible now; then
  // *earliest (if given) receives the earliest cooldown deadline (kNever if
  // none). `selector` null: the pool's strategy.
  // `holder` names the process the lease belongs to (the broker's socket
  // slow path grants leases on behalf of its clients).
  // `tokens` is the expected token count, reserved from the key's TPM budget
  // up front and corrected by the release's actual count.
  Result<LeaseHandle> TryAcquire(const Selector* selector = nullptr, uint64_t* earliest = nullptr,
                                 const ProcessId& holder = Self(), uint64_t tokens = 0);
  // Waits up to timeout_ns (real CLOCK_MONOTONIC time) for an eligible key,
  // sleeping on the pool's futex until a release, a cooldown end, a key
  // added, or the timeout. Never spins.
  // `holder` as for TryAcquire. `cancel` (may be null) is checked at every
  // wake-up: set it, then call WakeWaiters(), to end the wait early with
  // kClosed. It must outlive the call.
  // On timeout the message says when the next key returns, if one will.
  Result<LeaseHandle> Acquire(uint64_t timeout_ns, const Selector* selector = nullptr, const ProcessId& holder = Self(),
                              const std::atomic<bool>* cancel = nullptr, uint64_t tokens = 0);
  // Ends a lease held by `holder`. kNotHeld if it is not held by holder.
  // Returns kKeyExhausted (the lease ended normally) exactly once: on the
  // failure that opened the key's circuit (max_failures consecutive
  // failures), or on a permanent failure that revoked it.
  Status Release(const LeaseHandle& lease, const Outcome& outcome, const ProcessId& holder = Self());
  // Applies what a provider said about a key's remaining budget
  // (ApplyLimitUpdate in rate_budget.h). Never shortens a cooldown.
  Status ObserveLimits(std::string_view name, const LimitUpdate& update);
  // Wakes sleepers so they re-check (cancellation, the broker's cooldown
  // timer), after admitting keys whose cooldown ended.
  void WakeWaiters() noexcept;
  // The same; kBusy/kSegmentError when the lock was not taken (nothing
  // swept; sleepers are woken all the same, to re-check on their own).
  Status SweepAndWake();

  // PoolHeader::events_seq (layout.h): changes when a key's cooldown moved
  // later, a circuit changed state, a key was enabled, disabled or reset
  // (not on a merge of remote state). Lock-free (one acquire load), so the
  // mesh job can poll it every tick.
  uint64_t EventsSeq() const noexcept { return core_.header()->events_seq.load(std::memory_order_acquire); }

  // Schedulers outside the lock (a Python BaseScheduler): one pass over the
  // pool's keys into out[0..capacity) (KeySnapshot in keymesh/types.h; the
  // secret is left null: only the client knows it), *info about the pool.
  // Announces a sleeper, so that any change after it wakes WaitForChange
  // with info->wake_seq (a release from then on makes one futex wake).
  Status SnapshotKeys(KeySnapshot* out, uint32_t capacity, KeysSnapshotInfo* info);
  // Acquires exactly the key of (slot, generation, fingerprint) if it is
  // still eligible, with every check, accounting and quota of TryAcquire;
  // never waits, and a refusal is not counted as a failed acquire.
  // kUnknownKey when the identity is stale (the key is gone, or keys were
  // added or removed since the snapshot); kNoAvailableKey when the key is
  // there but not eligible now.
  Result<LeaseHandle> AcquireKey(uint32_t slot, uint64_t generation, uint64_t fingerprint, uint64_t tokens = 0,
                                 const ProcessId& holder = Self());
  // Sleeps on the pool's futex until a change after the snapshot that
  // returned `wake_seq` (a release, a key added, enabled or reset, a wake),
  // the earliest cooldown or budget deadline, or timeout_ns (real time).
  // Returns at once when a change already happened. kClosed when `cancel`
  // (may be null) is set before or after the sleep. Never spins.
  Status WaitForChange(uint32_t wake_seq, uint64_t timeout_ns, const std::atomic<bool>* cancel = nullptr);

  Result<PoolStatus> Snapshot();
  uint32_t AvailableCount();
  Status AvailableCount(uint32_t* count);
  // Earliest cooldown deadline in the future (kNever if none).
  uint64_t NextDeadline();
  Status NextDeadline(uint64_t* deadline);
  // Slot of the non-free key called `name`, or nullopt.
  std::optional<uint32_t> FindByName(std::string_view name);
  Status FindByName(std::string_view name, std::optional<uint32_t>* slot);
  // Name of the key in `slot` ("" for a slot out of range), read under the
  // lock.
  std::string KeyName(uint32_t slot);
  Status KeyName(uint32_t slot, std::string* name);

 protected:
  PoolCore core_;
};

class PoolAdmin : public PoolUser {
 public:
  using PoolUser::PoolUser;

  Result<AddKeyResult> AddKey(const KeyDefinition& def);
  // Changes the KeyConfig of the active key `def.name` in place, in one
  // critical section, keeping its state: what workers set meanwhile (a 429
  // deadline, a revocation, a disable, streaks, counters) stays, and the
  // key is never eligible on the way. When the fingerprint changed (a
  // rotated secret) the same section also clears the failure and 429
  // streaks and closes the circuit (also a revoked one); the cooldown
  // deadline and a disable stay. kUnknownKey when there is
  // no active key of that name.
  Status Reconfigure(const KeyDefinition& def);
  // Removes the key once its last lease ended; it leaves rotation at once.
  Status RemoveKey(std::string_view name);
  Status SetEnabled(std::string_view name, bool enabled);
  // Clears cooldown, failure and 429 streaks, and closes the circuit (also
  // a revoked one).
  Status ResetKey(std::string_view name);
  Status SetStrategy(Strategy strategy);
  Status SetOptions(const PoolOptions& options);
  // Overwrites persisted per-key state (restore after reboot). Deadline is
  // CLOCK_MONOTONIC ns (0: none). In-flight and leases are not touched.
  Status RestoreKeyState(std::string_view name, const RestoredState& state);
  // Restores a key's counters, latency EMA and remaining cooldown from a
  // client's storage (KeyProgress), in one critical section. kUnknownKey.
  Status RestoreKeyProgress(std::string_view name, const KeyProgress& progress);
  // The persistable state of every active key (removed keys excluded), read
  // under the lock; the inverse of RestoreKeyState.
  std::vector<ExportedKey> ExportKeyStates();
  Status ExportKeyStates(std::vector<ExportedKey>* out);

  // The mesh. Sets this host's share of each named key's limits (KeyShare
  // in pool_types.h), all in one critical section (journaled key by key: a
  // crash leaves every key with its old share or its new one). Names not in
  // the pool are skipped and counted in *unknown. The keys' budgets carry
  // over (the requests and tokens they are ahead are owed at the new rate),
  // and waiters are woken when a key may have become eligible. A bad share
  // (not finite, negative, too large) is kInvalidArgument and changes
  // nothing. Reconfigure keeps the shares; the state file never holds them.
  Status SetShares(const std::vector<std::pair<std::string, KeyShare>>& shares, uint32_t* unknown = nullptr);
  // Every key back to its configured limits (the mesh left or lost its lease).
  Status ClearShares();
  // The mesh: shared keys are granted only until `until` (CLOCK_MONOTONIC
  // ns; 0: no deadline). Lock-free; wakes sleepers when it moves later.
  void SetShareDeadline(uint64_t until) noexcept;
  // Merges another host's state of key `name` (RemoteKeyState in
  // pool_types.h), in one critical section: reset first (as ResetKey); the
  // cooldown deadline becomes max(local, cool_until); close_circuit closes
  // an open or half-open circuit (and then open_until is ignored); else
  // open_until > now opens a closed circuit, or extends an open one, until
  // then (the deadline never shortens; a half-open circuit's probe is in
  // flight here and decides); revoke revokes; enabled sets. Never bumps
  // events_seq (the job must not publish it back); wakes waiters when the
  // key may have become eligible. Deadlines beyond now + the pool's
  // max_cooldown are taken as that (remote state is input, like a 429's
  // Retry-After). kUnknownKey for an unknown name.
  Status MergeRemote(std::string_view name, const RemoteKeyState& remote);

  // Frees every lease held by `holder`; returns how many.
  Result<uint32_t> ReclaimProcess(const ProcessId& holder);
  // Frees leases held longer than max_lease (by a live but hung process).
  Result<uint32_t> ReclaimExpired();
  // Frees the leases of holders that no longer run (checks /proc outside the
  // lock). Returns how many.
  Result<uint32_t> ReclaimDead();
  // Distinct holders of live leases (copied under the lock).
  std::vector<ProcessId> Holders();
  Status Holders(std::vector<ProcessId>* out);
  // Slot of the active key whose fingerprint matches, or nullopt.
  std::optional<uint32_t> FindByFingerprint(uint64_t fingerprint);
  Status FindByFingerprint(uint64_t fingerprint, std::optional<uint32_t>* slot);
  // Takes the lock (repairing if an owner died) and verifies the lease
  // accounting; for tests and the broker.
  Status CheckConsistency();
};

// The status of the key in `slot` at `now`, from its slot alone.
KeyStatus DescribeSlot(const KeySlot& key, uint32_t slot, const PoolConfig& pool, uint64_t now);

}  // namespace keymesh::shm

#endif  // KEYMESH_SHM_POOL_H_
