// PoolCore: one pool's region of the segment and the code every view of it
// shares. Private to shm/: the worker's view (PoolUser) and the owner's and
// broker's view (PoolAdmin) in pool.h are thin layers over it.
//
// Invariants kept under the pool's mutex (PoolHeader::mutex):
//
//   I1  for every slot s: keys[s].in_flight == #{leases l : l.state == kHeld
//       and l.slot == s}                                  (lease accounting)
//   I2  a lease record is kHeld iff it is not on the free-lease stack
//   I3  slot s is in the eligibility index (its bit set and, for ordered
//       strategies, its sort key current in the tree) iff it was eligible
//       at the last update; keys whose cooldown ended since are admitted by
//       Sweep() before any selection
//   I4  next_deadline <= every cooldown deadline still in the future
//
// Every mutation of state first journals what it will change (see struct
// Journal in layout.h for the crash story); everything else (free-lease
// stack, index, in_flight, next_deadline) is derived, and Repair() rebuilds
// it. The next locker after an owner died runs Repair() (Guard does).
//
// The segment is untrusted input (any process that maps it can write it):
//   - offsets and capacities come from the Segment's private layout copy
//     (Segment::layout()), taken once; the pool header's capacities are
//     never re-read;
//   - every index read from the segment (free-lease stack top and entries,
//     a lease's slot, slot_high_water, the index's tree leaves and nodes, a
//     selector's answer, the journal's count) is range-checked before use;
//   - a violation found before an operation took effect is a *fault*: the
//     operation stops, Repair() undoes what it journaled and rebuilds the
//     derived data, and the operation runs once more (Checked()); a second
//     fault poisons this view (every later call: kSegmentError, one load to
//     check). A violation found after the operation took effect (its state
//     committed, the derived data left wrong) is *damage*: Repair() runs at
//     the end, the result stands. Nothing aborts, nothing indexes out of
//     bounds, whatever the segment holds.
//
// A PoolCore is a view (pointers into a mapping, and the view's own lock
// timeout and poison flag); the Segment must outlive it. Methods marked
// "locked" need a Guard held on this pool.
#ifndef KEYMESH_SHM_POOL_CORE_H_
#define KEYMESH_SHM_POOL_CORE_H_

#include <atomic>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <string_view>

#include "keymesh/selector.h"
#include "keymesh/status.h"
#include "shm/clock.h"
#include "shm/eligibility_index.h"
#include "shm/layout.h"
#include "shm/pool_config.h"
#include "shm/pool_types.h"
#include "shm/process_id.h"
#include "shm/rate_budget.h"
#include "shm/segment.h"

namespace keymesh::shm {

// Orders the stores of a critical section against the journal's count as the
// program wrote them: a kill lands at an instruction boundary, so compiler
// ordering (x86 keeps store order) is what decides which state a crash
// leaves.
inline void CompilerFence() noexcept { std::atomic_signal_fence(std::memory_order_seq_cst); }

// A key's effective rate-limit margin as read from the segment, within the
// range the options allow (< 0.5): a margin planted there must not make a
// budget's rate zero or negative (the pacing arithmetic divides by it).
inline constexpr uint32_t kMaxSegmentMarginPpm = 499'999;
inline uint32_t SegmentMarginPpm(const KeyConfig& key, const PoolConfig& pool) noexcept {
  const uint32_t m = EffectiveMarginPpm(key, pool);
  return m <= kMaxSegmentMarginPpm ? m : kMaxSegmentMarginPpm;
}

class PoolCore {
 public:
  PoolCore(const Segment& segment, uint32_t pool_index, const Clock& clock) noexcept;

  // Holds the pool mutex; repairs after an owner died (or when it finds an
  // operation's journal left open under a free lock); wakes sleepers after
  // the unlock when asked to (RequestWake) or after a repair.
  // The lock may not be taken: ok() is false and status() says why:
  // kBusy when the view's lock timeout passed (a live holder that does not
  // let go: stopped, hung, or a pid planted in the lock word), kSegmentError
  // when this view is poisoned. Check ok() before anything else.
  class Guard {
   public:
    // The fast path inline (a pair takes two Guards): a view with no lock
    // timeout and no poison, a free lock word, no journal left open.
    explicit Guard(PoolCore* core) noexcept : core_(core) {
      if (std::atomic_ref<uint32_t>(core->slow_lock_).load(std::memory_order_relaxed) != 0) [[unlikely]] {
        LockSlow();
        return;
      }
      const LockOutcome outcome = core->ph_->mutex.Lock();
      if (outcome != LockOutcome::kAcquired || core->ph_->undo_count.load(std::memory_order_relaxed) != 0)
          [[unlikely]] {
        Locked(outcome);
      }
    }
    ~Guard() {
      if (failure_ != Failure::kNone) [[unlikely]]
        return;
      if (wake_ || core_->Troubled()) [[unlikely]] {
        UnlockSlow();
        return;
      }
      core_->ph_->mutex.Unlock();
    }
    Guard(const Guard&) = delete;
    Guard& operator=(const Guard&) = delete;
    bool ok() const noexcept { return failure_ == Failure::kNone; }
    // Why the lock was not taken (ok() is false).
    Status status() const;
    void RequestWake() noexcept { wake_ = true; }

   private:
    void LockSlow() noexcept;                   // a lock timeout or poison
    void Locked(LockOutcome outcome) noexcept;  // repairs after an owner died or an open journal
    void UnlockSlow() noexcept;                 // repairs damage, wakes sleepers

    enum class Failure : uint8_t { kNone, kBusy, kPoisoned };
    PoolCore* core_;
    bool wake_ = false;
    Failure failure_ = Failure::kNone;
    uint32_t holder_ = 0;  // kBusy: the lock word's pid when the wait ended
  };

  // The longest a Guard waits for this pool's lock, in ns of real
  // (CLOCK_MONOTONIC) time; 0 (the default) waits as long as it takes.
  // For callers that must not block indefinitely (the broker). Any thread
  // may set it at any time; it applies to the Guards made afterwards.
  void set_lock_timeout(uint64_t ns) noexcept {
    std::atomic_ref<uint64_t>(lock_timeout_ns_).store(ns, std::memory_order_relaxed);
    if (ns != 0) std::atomic_ref<uint32_t>(slow_lock_).store(1, std::memory_order_relaxed);
  }
  uint64_t lock_timeout() const noexcept {
    return std::atomic_ref<uint64_t>(const_cast<uint64_t&>(lock_timeout_ns_)).load(std::memory_order_relaxed);
  }
  // Non-null once this view gave up on the pool (see the top comment): why.
  const char* poisoned() const noexcept {
    return std::atomic_ref<const char*>(const_cast<const char*&>(poison_)).load(std::memory_order_relaxed);
  }

  // Runs `attempt` (a locked body returning Status or Result<T>) with the
  // fault handling described at the top: on a fault, Repair() and one more
  // attempt; on a second fault, poison and kSegmentError; on damage,
  // Repair() after it.
  template <typename Fn>
  auto Checked(Fn&& attempt) -> decltype(attempt());
  // Locked: the operation must stop, the segment held `what` (a static
  // string); returns the Status the attempt returns (Checked() replaces it).
  Status Fault(const char* what) noexcept;
  // Locked: derived data found wrong after the operation took effect.
  void Damaged() const noexcept { damaged_ = true; }

  // --- the region ---
  const Segment& segment() const noexcept { return *segment_; }
  uint32_t pool_index() const noexcept { return index_; }
  PoolHeader* header() const noexcept { return ph_; }
  KeySlot& key(uint32_t slot) const noexcept { return keys_[slot]; }
  LeaseRecord& lease(uint32_t l) const noexcept { return leases_[l]; }
  uint32_t key_capacity() const noexcept { return key_cap_; }
  uint32_t lease_capacity() const noexcept { return lease_cap_; }
  // Locked: slot_high_water, never above key_capacity() (a larger value is
  // damage, and reads as the capacity).
  uint32_t HighWater() const noexcept {
    const uint32_t hw = ph_->slot_high_water;
    if (hw <= key_cap_) [[likely]]
      return hw;
    damaged_ = true;
    return key_cap_;
  }
  uint64_t Now() const noexcept { return clock_->NowNanos(); }
  EligibilityIndex& index() noexcept { return index_view_; }
  const EligibilityIndex& index() const noexcept { return index_view_; }
  std::string PoolName() const;
  std::string KeyName(uint32_t slot) const;  // slot < key_capacity()
  PoolInfo Info() const;

  // --- keys (locked) ---
  uint32_t MarginPpm(uint32_t slot) const noexcept { return SegmentMarginPpm(keys_[slot].config, ph_->config); }
  RequestPacing RequestPacingOf(uint32_t slot) const noexcept {
    return shm::RequestPacingOf(keys_[slot].config, MarginPpm(slot));
  }
  TokenPacing TokenPacingOf(uint32_t slot) const noexcept {
    return shm::TokenPacingOf(keys_[slot].config, MarginPpm(slot));
  }
  // When the key's cooldown and rate-limit budgets allow a grant (ns).
  uint64_t ReadyAt(uint32_t slot) const noexcept {
    return shm::ReadyAt(keys_[slot].state, keys_[slot].config, MarginPpm(slot));
  }
  bool Eligible(uint32_t slot, uint64_t now) const noexcept;
  // A change other hosts must learn (PoolHeader::events_seq). Any thread,
  // lock held or not; only on the rare transitions, never a plain success.
  void NoteEvent() noexcept { ph_->events_seq.fetch_add(1, std::memory_order_release); }
  // Clears the key's cooldown, streaks, circuit and budgets (journaled; the
  // caller commits).
  void ResetLocked(uint32_t slot) noexcept;
  void OpenCircuit(SlotState& st, uint64_t now) noexcept;
  // Weighted strategy: the pass a grant adds (2^32 / (weight x health)).
  uint64_t Stride(uint32_t slot) const noexcept;
  std::optional<uint32_t> FindByNameLocked(std::string_view name) const noexcept;
  // Weighted passes only grow and wrap around 2^64 after long enough; every
  // eligible key's pass lies within one stride or so of vtime, so they are
  // compared as serial numbers (RFC 1982), which makes the wrap harmless.
  static bool PassBefore(uint64_t a, uint64_t b) noexcept { return static_cast<int64_t>(a - b) < 0; }
  // kUnknownKey naming `name` and this pool.
  Status NoSuchKey(std::string_view name) const;

  // --- the eligibility index (locked) ---
  // The index orders keys (least_busy, weighted) rather than only marking
  // them (round robin).
  bool Ordered() const noexcept { return ph_->index_strategy != static_cast<uint32_t>(Strategy::kRoundRobin); }
  // The index's k1 is a count (least_busy's in_flight).
  bool Counts() const noexcept { return ph_->index_strategy == static_cast<uint32_t>(Strategy::kLeastBusy); }
  // The index's sort key of `slot` for the strategy it is ordered for.
  SortKey SortKeyOf(uint32_t slot) const noexcept {
    const SlotState& st = keys_[slot].state;
    if (ph_->index_strategy == static_cast<uint32_t>(Strategy::kWeighted)) return SortKey{st.pass, 0};
    return SortKey{st.in_flight, st.last_used_seq};
  }
  void IndexUpdate(uint32_t slot, uint64_t now) noexcept;
  void IndexRebuild(uint64_t now) noexcept;
  // Admits keys whose cooldown ended; recomputes next_deadline.
  void Sweep(uint64_t now) noexcept;
  void NoteDeadline(uint64_t deadline, uint64_t now) noexcept;

  // --- leases (locked; pool_lease.cc) ---
  // `waited_ns`: how long the caller has waited so far (for the histogram).
  Result<LeaseHandle> TryAcquireLocked(const Selector* selector, uint64_t now, uint64_t* earliest, uint64_t tokens,
                                       uint64_t waited_ns, const ProcessId& holder);
  // *wake: sleepers must be woken (a key may have become eligible).
  Status ReleaseLocked(const LeaseHandle& lease, const Outcome& outcome, const ProcessId& holder, bool* wake);
  // Frees a held lease without an outcome (holder dead or hung, or a
  // removed key). False, changing nothing, when the record does not name a
  // key that has it in flight: damage (Repair frees such a record).
  bool FreeLeaseLocked(uint32_t lease, uint64_t now, bool count_reclaim) noexcept;
  // Pushes a freed lease on the free-lease stack (a full stack is damage).
  void PushFreeLease(uint32_t lease) noexcept;
  // A removed key's slot is freed once its last lease ended.
  void RetireSlotIfDone(uint32_t slot) noexcept;
  // Live leases held by `holder`, counted up to `limit` (a scan of the lease
  // records: only for a crowded table).
  uint32_t HeldBy(const ProcessId& holder, uint32_t limit) const noexcept;
  // The per-holder lease quota when the pool's config says 0: half the
  // lease table, at least 1.
  uint32_t default_quota() const noexcept { return default_quota_; }

  // --- journaled writes (locked; journal.cc; the crash story is beside
  // struct Journal in layout.h) ---
  // Sets `field`, which lies in this pool's header or data region, to
  // `value`, journaling the 8-byte word it lies in first. A no-op (nothing
  // journaled, nothing written) when the field already holds `value`.
  template <typename T>
  void Set(T& field, T value) noexcept {
    if (field == value) return;
    LogWord(&field);
    field = value;
  }
  // Journals the word that holds `field` before a write the caller makes.
  void LogWord(const void* field) noexcept;
  // Journals the whole slot before a rewrite of it (a key created or retired).
  void LogSlotImage(uint32_t slot) noexcept;
  // Ends the operation: what was journaled stays.
  void Commit() noexcept {
    CompilerFence();
    ph_->undo_count.store(0, std::memory_order_relaxed);
    journal_n_ = 0;
    CompilerFence();
  }
  // Undoes an interrupted operation and rebuilds everything derived.
  void Repair() noexcept;
  // Verifies I1 and I2 from scratch; kSegmentError names what is wrong.
  Status CheckConsistencyLocked() const;

 private:
  template <typename Fn>
  auto Recover(Fn& attempt, decltype(attempt()) first) -> decltype(attempt());
  bool Troubled() const noexcept { return fault_ != nullptr || damaged_ || index_view_.damaged(); }
  // Wakes every sleeper (after a repair: state may have changed under them).
  void WakeAllLocked() noexcept;
  Status PoisonedStatus() const;

  const Segment* segment_;
  uint32_t index_;
  uint8_t* base_;  // the segment's first byte: journal offsets count from it
  PoolHeader* ph_;
  uint8_t* data_;  // the pool's data region
  KeySlot* keys_;
  LeaseRecord* leases_;
  uint32_t* free_;
  uint32_t key_cap_;
  uint32_t lease_cap_;
  uint64_t data_size_;  // bytes of the pool's data region
  uint32_t default_quota_;
  const Clock* clock_;
  EligibilityIndex index_view_;
  // Read by any thread without the lock (std::atomic_ref: a view stays
  // copyable, as it was before it had them).
  uint64_t lock_timeout_ns_ = 0;
  const char* poison_ = nullptr;
  // Non-zero once the view has a lock timeout or is poisoned: the Guard's
  // one test before its fast path (never cleared: LockSlow re-reads both).
  uint32_t slow_lock_ = 0;
  // Written only under the pool lock (Checked() resets them).
  const char* fault_ = nullptr;
  mutable bool damaged_ = false;
  uint32_t journal_n_ = 0;  // entries the operation in progress journaled (Guard: 0 at the start)
};

template <typename Fn>
auto PoolCore::Checked(Fn&& attempt) -> decltype(attempt()) {
  // One named result returned on every path, so it is built in the caller's
  // slot (NRVO): the fast path moves no Status (a string) around.
  auto r = attempt();
  if (Troubled()) [[unlikely]]
    r = Recover(attempt, std::move(r));
  return r;
}

template <typename Fn>
auto PoolCore::Recover(Fn& attempt, decltype(attempt()) first) -> decltype(attempt()) {
  const bool fault = fault_ != nullptr;
  fault_ = nullptr;
  Repair();  // undoes a stopped attempt's journal, rebuilds derived data, clears the damage
  WakeAllLocked();
  if (!fault) return first;  // damage only: the operation took effect
  auto again = attempt();
  if (fault_ == nullptr) {
    if (Troubled()) {
      Repair();
      WakeAllLocked();
    }
    return again;
  }
  // The same operation faulted right after a repair: the state itself
  // cannot be trusted (or another process keeps rewriting it).
  std::atomic_ref<const char*>(poison_).store(fault_, std::memory_order_relaxed);
  std::atomic_ref<uint32_t>(slow_lock_).store(1, std::memory_order_relaxed);
  fault_ = nullptr;
  Repair();
  WakeAllLocked();
  return PoisonedStatus();
}

inline void PoolCore::LogWord(const void* field) noexcept {
  const uintptr_t word = reinterpret_cast<uintptr_t>(field) & ~uintptr_t{7};
  // The count is this view's own (journal_n_), not re-read from the
  // segment: a count rewritten during the operation cannot steer the write.
  const uint32_t n = journal_n_;
  if (n >= kUndoCapacity) [[unlikely]] {
    (void)Fault("an operation journaled more words than the journal holds");  // a bug: stop, never abort
    return;
  }
  UndoEntry& e = ph_->journal.entries[n];
  e.offset = word - reinterpret_cast<uintptr_t>(base_);
  std::memcpy(&e.old, reinterpret_cast<const void*>(word), sizeof(uint64_t));
  CompilerFence();
  ph_->undo_count.store(n + 1, std::memory_order_relaxed);
  journal_n_ = n + 1;
  CompilerFence();
}

// Test-only crash points (SetCrashHookForTesting): one relaxed load when no
// hook is set.
extern std::atomic<CrashHook> g_crash_hook;
inline void CrashPointReached(CrashPoint point) noexcept {
  CrashHook hook = g_crash_hook.load(std::memory_order_relaxed);
  if (hook != nullptr) [[unlikely]]
    hook(point);
}

}  // namespace keymesh::shm

#endif  // KEYMESH_SHM_POOL_CORE_H_
