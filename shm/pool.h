// PoolAccess: every operation that reads or changes one pool in the segment.
//
// This is the only code that mutates key slots and lease records. It keeps,
// under the pool's robust mutex:
//
//   I1  for every slot s: keys[s].in_flight == #{leases l : l.state == kHeld
//       and l.slot == s}                                  (lease accounting)
//   I2  a lease record is kHeld iff it is not on the free-lease stack
//   I3  slot s is in the eligibility index (bit set, heap entry for heap
//       strategies) iff it was eligible at the last update; keys whose
//       cooldown ended since are admitted by Sweep() before any selection
//   I4  next_deadline <= every cooldown deadline still in the future
//
// Crash safety: each mutation of state (slot, lease record, pool totals)
// first copies the bytes it will change into the pool's Journal and sets
// journal.active; it clears journal.active when done (the commit point).
// A process killed at any instruction therefore leaves either no journal
// (state exact) or an active journal whose images restore the state from
// before the interrupted operation. Everything else (free-lease stack,
// heap, bitset, in_flight recount, next_deadline) is derived, and Repair()
// rebuilds it from state. The next locker (EOWNERDEAD) runs Repair() and
// then pthread_mutex_consistent().
//
// A PoolAccess is a cheap view (pointers into a mapping); the Segment must
// outlive it. It is safe to use one PoolAccess from many threads and many
// processes at once: all shared state is behind the pool mutex.
#ifndef KEYMESH_SHM_POOL_H_
#define KEYMESH_SHM_POOL_H_

#include <atomic>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "keymesh/selector.h"
#include "keymesh/status.h"
#include "keymesh/types.h"
#include "shm/clock.h"
#include "shm/layout.h"
#include "shm/process_id.h"
#include "shm/segment.h"

namespace keymesh::shm {

// Identifies one granted lease. Stale handles (released, reclaimed) are
// refused with kNotHeld thanks to `seq`.
struct LeaseHandle {
  uint32_t slot = kNoSlot;
  uint32_t lease = 0;
  uint32_t seq = 0;
  uint64_t acquire_ns = 0;
  uint64_t fingerprint = 0;  // of the key when granted (read under the lock)
};

// kCancelled ends a lease without counting an outcome (the request never
// reached the provider, e.g. an asyncio task cancelled right after the grant).
enum class OutcomeKind : uint32_t { kSuccess = 0, kFailure = 1, kRateLimited = 2, kCancelled = 3 };

// How a lease ended.
struct Outcome {
  OutcomeKind kind = OutcomeKind::kSuccess;
  std::optional<double> latency;   // seconds; absent leaves the EMA unchanged
  uint64_t tokens = 0;             // tokens used by the request
  std::optional<double> cooldown;  // 429: seconds (Retry-After); absent: pool default
  bool permanent = false;          // kFailure: an authentication failure; revokes the key
};

// What a provider's headers said about a key's limits (seconds, counts).
struct LimitUpdate {
  std::optional<uint64_t> remaining_requests;
  std::optional<double> reset_requests;
  std::optional<uint64_t> remaining_tokens;
  std::optional<double> reset_tokens;
  std::optional<double> retry_after;
};

// A key's configuration as the segment stores it (no secret).
struct KeyDefinition {
  std::string_view name;
  uint64_t fingerprint = 0;
  uint32_t weight = 1;
  uint32_t max_concurrency = 0;
  uint32_t rpm = 0;
  uint64_t tpm = 0;
  uint32_t burst = 0;
  uint32_t margin_ppm = kPoolMargin;
};

struct AddKeyResult {
  uint32_t slot = kNoSlot;
  bool created = false;  // false: an existing key was re-admitted/updated
};

// Test-only: points inside critical sections where a crash test parks or
// kills the process. The hook runs with the pool mutex held.
enum class CrashPoint : uint32_t {
  kAcquireAfterJournal = 1,  // journal active, nothing changed yet
  kAcquireMidMutation = 2,   // lease written, slot counters half done
  kAcquireAfterCommit = 3,   // state done, derived index not yet updated
  kReleaseMidMutation = 4,   // lease freed, in_flight not yet decremented
  kAdminMidMutation = 5,     // admin op half done
};
using CrashHook = void (*)(CrashPoint);
void SetCrashHookForTesting(CrashHook hook) noexcept;

// The segment's form of pool options (strategy, durations in ns, margin in
// millionths), shared by every creator of pools (embedded pools, the broker).
PoolConfig ToPoolConfig(const PoolOptions& options) noexcept;
// True when two pool configs hold the same options (reserved fields aside).
bool SamePoolConfig(const PoolConfig& a, const PoolConfig& b) noexcept;
// A key's rate margin in millionths; negative means "the pool's" (kPoolMargin).
uint32_t KeyMarginPpm(double rate_margin) noexcept;

// Read-only scalars other code needs without a full snapshot.
struct PoolInfo {
  std::string name;
  Strategy strategy;
  uint64_t acquire_timeout_ns;
};

class PoolAccess {
 public:
  PoolAccess(const Segment& segment, uint32_t pool_index, const Clock& clock = SystemClock::Instance()) noexcept;

  uint32_t index() const noexcept { return index_; }
  PoolHeader* header() const noexcept { return ph_; }
  PoolInfo Info() const;

  // --- Fast path (workers) ------------------------------------------------
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

  // --- Admin (broker, embedded pool owner) -------------------------------
  Result<AddKeyResult> AddKey(const KeyDefinition& def);
  // Removes the key once its last lease ended; it leaves rotation at once.
  Status RemoveKey(std::string_view name);
  Status SetEnabled(std::string_view name, bool enabled);
  // Clears cooldown, failure and 429 streaks, and closes the circuit (also
  // a revoked one).
  Status ResetKey(std::string_view name);
  // Applies what a provider said about a key's remaining budget: a key the
  // provider says is out of requests/tokens waits for the reset, and the
  // buckets never allow more than the provider says remain. Never shortens a
  // cooldown.
  Status ObserveLimits(std::string_view name, const LimitUpdate& update);
  Status SetStrategy(Strategy strategy);
  Status SetOptions(const PoolOptions& options);
  // Overwrites persisted per-key state (restore after reboot). Deadline is
  // CLOCK_MONOTONIC ns (0: none). In-flight and leases are not touched.
  struct RestoredState {
    uint32_t fail_streak = 0;
    uint32_t rl_streak = 0;
    uint64_t cooldown_deadline = 0;
    uint64_t last_cooldown = 0;
    bool enabled = true;
    bool exhausted = false;      // circuit not closed (kept for older state files)
    uint32_t circuit = 0;        // shm::Circuit value
    uint64_t open_cooldown = 0;  // ns
    uint32_t circuit_opens = 0;
    uint64_t acquires = 0, successes = 0, failures = 0, rate_limited = 0, reclaimed = 0, tokens = 0;
    bool has_latency = false;
    double ema_latency = 0.0;
    // false: leave the counters and the latency EMA as they are. For an
    // in-place reconfigure (AddKey kept them): writing back a copy read
    // before AddKey would undo what workers counted in between.
    bool restore_counters = true;
  };
  Status RestoreKeyState(std::string_view name, const RestoredState& state);
  // The persistable state of every active key (removed keys excluded), read
  // under the lock; the inverse of RestoreKeyState (deadline in CLOCK_MONOTONIC ns).
  struct ExportedKey {
    std::string name;
    uint64_t fingerprint = 0;
    RestoredState state;
  };
  std::vector<ExportedKey> ExportKeyStates();

  // Frees every lease held by `holder`; returns how many.
  Result<uint32_t> ReclaimProcess(const ProcessId& holder);
  // Frees leases held longer than max_lease (by a live but hung process).
  Result<uint32_t> ReclaimExpired();
  // Frees the leases of holders that no longer run (checks /proc outside the
  // lock). Returns how many.
  Result<uint32_t> ReclaimDead();
  // Distinct holders of live leases (copied under the lock).
  std::vector<ProcessId> Holders();

  // --- Reading ------------------------------------------------------------
  Result<PoolStatus> Snapshot();
  uint32_t AvailableCount();
  // Earliest cooldown deadline in the future (kNever if none).
  uint64_t NextDeadline();
  // Slot of the active key whose fingerprint matches, or nullopt.
  std::optional<uint32_t> FindByFingerprint(uint64_t fingerprint);
  std::optional<uint32_t> FindByName(std::string_view name);
  // Wakes sleepers so they re-check (the broker's cooldown timer uses this).
  void WakeWaiters() noexcept;
  // Takes the lock, repairing if an owner died; for tests and the broker.
  Status CheckConsistency();

 private:
  class Guard;
  friend class PoolSelection;

  // `waited_ns`: how long the caller has waited so far (for the histogram).
  Result<LeaseHandle> TryAcquireLocked(const Selector* selector, uint64_t now, uint64_t* earliest, uint64_t tokens,
                                       uint64_t waited_ns, const ProcessId& holder);
  Status ReleaseLocked(const LeaseHandle& lease, const Outcome& outcome, const ProcessId& holder, bool* wake);
  void FreeLeaseLocked(uint32_t lease_index, uint64_t now, bool count_reclaim);
  bool Eligible(uint32_t slot, uint64_t now) const noexcept;
  // When the key's cooldown and rate-limit budgets allow a grant (ns).
  uint64_t ReadyAt(uint32_t slot) const noexcept;
  // GCRA parameters of a key: emission interval per request / per token (ns,
  // 0 = unlimited) and burst tolerance (ns).
  void RequestPacing(uint32_t slot, uint64_t* interval, uint64_t* tolerance) const noexcept;
  void TokenPacing(uint32_t slot, double* per_token, uint64_t* tolerance) const noexcept;
  void OpenCircuit(SlotState& st, uint64_t now) noexcept;
  void Sweep(uint64_t now) noexcept;
  void IndexUpdate(uint32_t slot, uint64_t now) noexcept;
  void IndexRebuild(uint64_t now) noexcept;
  void NoteDeadline(uint64_t deadline, uint64_t now) noexcept;
  void Repair() noexcept;
  void JournalBegin(uint32_t flags, uint32_t slot, uint32_t lease) noexcept;
  void JournalCommit() noexcept;
  void RetireSlotIfDone(uint32_t slot) noexcept;
  std::optional<uint32_t> FindByNameLocked(std::string_view name) const noexcept;
  // kUnknownKey naming `name` and this pool.
  Status NoSuchKey(std::string_view name) const;
  uint64_t Stride(uint32_t slot) const noexcept;

  // Heap over eligible slots (least_busy / weighted).
  bool HeapStrategy() const noexcept;
  void HeapKey(uint32_t slot, HeapEntry* e) const noexcept;
  void HeapInsert(uint32_t slot) noexcept;
  void HeapRemove(uint32_t slot) noexcept;
  void HeapFix(uint32_t slot) noexcept;
  void SiftUp(uint32_t pos) noexcept;
  void SiftDown(uint32_t pos) noexcept;
  bool BitTest(uint32_t slot) const noexcept { return (bits_[slot >> 6] >> (slot & 63)) & 1; }

  const Segment* segment_;
  uint32_t index_;
  PoolHeader* ph_;
  KeySlot* keys_;
  LeaseRecord* leases_;
  HeapEntry* heap_;
  uint32_t* heap_pos_;
  uint64_t* bits_;
  uint32_t* free_;
  uint32_t key_cap_;
  uint32_t lease_cap_;
  const Clock* clock_;
};

}  // namespace keymesh::shm

#endif  // KEYMESH_SHM_POOL_H_
