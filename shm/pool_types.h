// The values that cross the pool's interface: lease handles, outcomes, key
// definitions, persisted key state, test crash points.
#ifndef KEYMESH_SHM_POOL_TYPES_H_
#define KEYMESH_SHM_POOL_TYPES_H_

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "keymesh/types.h"
#include "shm/layout.h"

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

using OutcomeKind = keymesh::OutcomeKind;

// How a lease ended.
struct Outcome {
  OutcomeKind kind = OutcomeKind::kSuccess;
  std::optional<double> latency;   // seconds; absent leaves the EMA unchanged
  uint64_t tokens = 0;             // tokens used by the request
  std::optional<double> cooldown;  // 429: seconds (Retry-After); absent: pool default
  bool permanent = false;          // kFailure: an authentication failure; revokes the key
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

// Read-only scalars other code needs without a full snapshot.
struct PoolInfo {
  std::string name;
  Strategy strategy;
  uint64_t acquire_timeout_ns;
};

// A key's persistable state (the state file's), CLOCK_MONOTONIC deadlines.
struct RestoredState {
  uint32_t fail_streak = 0;
  uint32_t rl_streak = 0;
  uint64_t cooldown_deadline = 0;
  uint64_t last_cooldown = 0;
  bool enabled = true;
  bool exhausted = false;      // circuit not closed (the one circuit bit of the state file)
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

// What an embedded pool's client restores into a key from its own storage
// (PoolAdmin::RestoreKeyProgress): the counters and the latency EMA
// overwrite the key's; a cooldown of `cooldown_ns` from now (capped at
// max(max_cooldown, default_cooldown)) only ever lengthens the key's.
// Streaks, circuit, enabled and leases are not touched.
struct KeyProgress {
  uint64_t successes = 0, failures = 0, rate_limited = 0;
  bool has_latency = false;
  double ema_latency = 0.0;  // seconds, finite and >= 0 (checked by the caller)
  uint64_t cooldown_ns = 0;
};

// One active key's persistable state, read under the lock.
struct ExportedKey {
  std::string name;
  uint64_t fingerprint = 0;
  RestoredState state;
  // For the mesh job's publishing (not persisted): the open circuit's
  // deadline (CLOCK_MONOTONIC ns; the key's cooldown deadline while its
  // circuit is open or half-open, 0 while closed or revoked), and whether an
  // authentication failure revoked the key (state.circuit == kRevoked).
  uint64_t open_until = 0;
  bool revoked = false;
};

// This host's share of a key's rate limits in the mesh (PoolAdmin::SetShares).
// active false: the key's configured limits. rpm and tpm per minute,
// finite and >= 0 (rpm <= 1e15, tpm <= 1e18), rounded down; 0 in a
// dimension the key limits keeps the key out of rotation on this host.
// burst: requests granted back to back (0 or 1: smooth pacing).
struct KeyShare {
  bool active = false;
  double rpm = 0;
  double tpm = 0;
  uint32_t burst = 1;
};

// Another host's state of a key, merged by PoolAdmin::MergeRemote
// (CLOCK_MONOTONIC ns of this host; 0: nothing).
struct RemoteKeyState {
  uint64_t cool_until = 0;     // cooldown deadline: max-merged
  uint64_t open_until = 0;     // > now: the circuit is open elsewhere until then
  bool close_circuit = false;  // a probe elsewhere succeeded
  bool revoke = false;         // an authentication failure elsewhere
  std::optional<bool> enabled;
  bool reset = false;  // an operator's reset elsewhere (applied first)
};

// Test-only: points inside critical sections where a crash test parks or
// kills the process. The hook runs with the pool mutex held.
enum class CrashPoint : uint32_t {
  kAcquireAfterJournal = 1,  // journal active, nothing changed yet
  kAcquireMidMutation = 2,   // lease written, slot counters half done
  kAcquireAfterCommit = 3,   // state done, derived index not yet updated
  kReleaseMidMutation = 4,   // lease freed, in_flight not yet decremented
  kAdminMidMutation = 5,     // admin op half done
  kAcquireBegin = 6,         // an acquire attempt, before it reads the pool (each retry too)
};
using CrashHook = void (*)(CrashPoint);
void SetCrashHookForTesting(CrashHook hook) noexcept;

}  // namespace keymesh::shm

#endif  // KEYMESH_SHM_POOL_TYPES_H_
