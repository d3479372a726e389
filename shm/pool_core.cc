// PoolCore: the lock guard, names, and the upkeep of the eligibility index.
#include "shm/pool_core.h"

#include <algorithm>
#include <cstring>

#include "common/text.h"
#include "shm/futex.h"

namespace keymesh::shm {

std::atomic<CrashHook> g_crash_hook{nullptr};

void SetCrashHookForTesting(CrashHook hook) noexcept { g_crash_hook.store(hook); }

namespace {

constexpr double kStrideOne = 4294967296.0;  // 2^32
constexpr double kMinHealth = 0.05;          // keeps every weight > 0 key in rotation

double SuccessRate(const SlotState& st) noexcept {
  const uint64_t total = st.successes + st.failures;
  return total == 0 ? 1.0 : static_cast<double>(st.successes) / static_cast<double>(total);
}

}  // namespace

PoolCore::PoolCore(const Segment& segment, uint32_t pool_index, const Clock& clock) noexcept
    : segment_(&segment), index_(pool_index), base_(segment.base()), clock_(&clock) {
  // Every offset and capacity from the segment's private layout copy: none
  // is read from the shared header again (pool_core.h).
  const Segment::Layout& layout = segment.layout();
  const LayoutPlan& plan = layout.plan;
  ph_ = segment.pool_header(pool_index);
  data_ = segment.pool_data(pool_index);
  if (data_ == nullptr) {
    // No such pool in this segment: a view that refuses every call, over
    // the private header pool_header() gave (header() stays dereferenceable).
    std::atomic_ref<const char*>(poison_).store("the pool index is beyond the segment's pools",
                                                std::memory_order_relaxed);
    slow_lock_ = 1;
    static uint8_t no_data[64];
    data_ = no_data;
    key_cap_ = lease_cap_ = 0;
    default_quota_ = 1;
    data_size_ = 0;
    keys_ = nullptr;
    leases_ = nullptr;
    free_ = nullptr;
    return;
  }
  keys_ = reinterpret_cast<KeySlot*>(data_ + plan.keys_offset);
  leases_ = reinterpret_cast<LeaseRecord*>(data_ + plan.leases_offset);
  free_ = reinterpret_cast<uint32_t*>(data_ + plan.free_offset);
  key_cap_ = layout.caps.keys_per_pool;
  lease_cap_ = layout.caps.leases_per_pool;
  data_size_ = plan.pool_data_stride;
  default_quota_ = lease_cap_ / 2 > 0 ? lease_cap_ / 2 : 1;
  EligibilityIndex::Arrays arrays;
  arrays.bits = reinterpret_cast<uint64_t*>(data_ + plan.bits_offset);
  arrays.order = reinterpret_cast<SortKey*>(data_ + plan.order_offset);
  arrays.tree = reinterpret_cast<uint32_t*>(data_ + plan.tree_offset);
  arrays.eligible_count = &ph_->eligible_count;
  arrays.tree_leaves = &ph_->tree_leaves;
  arrays.idle = &ph_->scan_idle;
  index_view_ = EligibilityIndex(arrays, key_cap_);
}

void PoolCore::Guard::LockSlow() noexcept {
  if (core_->poisoned() != nullptr) {
    failure_ = Failure::kPoisoned;
    return;
  }
  PoolHeader* ph = core_->ph_;
  const uint64_t timeout = core_->lock_timeout();
  LockOutcome outcome;
  if (timeout == 0) {
    outcome = ph->mutex.Lock();
  } else {
    outcome = ph->mutex.LockFor(timeout);
    if (outcome == LockOutcome::kTimedOut) {
      failure_ = Failure::kBusy;
      holder_ = ph->mutex.HolderPid();
      return;
    }
  }
  Locked(outcome);
}

void PoolCore::Guard::Locked(LockOutcome outcome) noexcept {
  // A journal left open under a lock that was free means another process
  // wrote the segment (a holder that died is seen as kOwnerDied): repair
  // before trusting any of it.
  if (outcome == LockOutcome::kOwnerDied || core_->ph_->undo_count.load(std::memory_order_relaxed) != 0) {
    core_->Repair();
    wake_ = true;  // the dead owner may have been about to wake someone
  }
}

void PoolCore::Guard::UnlockSlow() noexcept {
  if (core_->Troubled()) {
    // Damage (or a fault of an operation without a retry) seen under this
    // lock: rebuild the derived data before anyone else reads it.
    core_->Repair();
    wake_ = true;
  }
  // Sleepers announce themselves (sleepers = 1) under the lock before they
  // sleep, so when nobody is announced no wake-up is owed.
  bool must_wake = false;
  PoolHeader* ph = core_->ph_;
  if (wake_ && ph->sleepers.load(std::memory_order_relaxed) != 0) {
    ph->sleepers.store(0, std::memory_order_relaxed);
    ph->wake_seq.fetch_add(1, std::memory_order_release);
    must_wake = true;
  }
  ph->mutex.Unlock();
  if (must_wake) FutexWakeAll(&ph->wake_seq);
}

Status PoolCore::Guard::status() const {
  switch (failure_) {
    case Failure::kNone: return Status::Ok();
    case Failure::kPoisoned: return core_->PoisonedStatus();
    case Failure::kBusy: break;
  }
  const uint64_t ms = core_->lock_timeout() / 1'000'000;
  return Status(Code::kBusy, "pool " + Quoted(core_->PoolName()) + " is busy: its lock is held by pid " +
                                 std::to_string(holder_) + " for " + std::to_string(ms) + " ms or more");
}

Status PoolCore::Fault(const char* what) noexcept {
  if (fault_ == nullptr) fault_ = what;
  return Status(Code::kSegmentError, std::string());  // Checked() answers instead
}

void PoolCore::WakeAllLocked() noexcept {
  ph_->sleepers.store(0, std::memory_order_relaxed);
  ph_->wake_seq.fetch_add(1, std::memory_order_release);
  FutexWakeAll(&ph_->wake_seq);
}

Status PoolCore::PoisonedStatus() const {
  const char* why = poisoned();
  return Status(Code::kSegmentError, "pool " + Quoted(PoolName()) +
                                         " is unusable: its shared state stayed inconsistent after a repair (" +
                                         (why != nullptr ? why : "unknown") + "); the segment must be rebuilt");
}

std::string PoolCore::PoolName() const { return std::string(ph_->name, strnlen(ph_->name, kNameCapacity)); }

std::string PoolCore::KeyName(uint32_t slot) const {
  const KeySlot& k = keys_[slot];
  return std::string(k.name, strnlen(k.name, kNameCapacity));
}

PoolInfo PoolCore::Info() const {
  return PoolInfo{PoolName(), static_cast<Strategy>(ph_->config.strategy), ph_->config.acquire_timeout};
}

Status PoolCore::NoSuchKey(std::string_view name) const {
  return Status(Code::kUnknownKey, "no key " + Quoted(name) + " in pool " + Quoted(PoolName()));
}

std::optional<uint32_t> PoolCore::FindByNameLocked(std::string_view name) const noexcept {
  const uint32_t hw = HighWater();
  for (uint32_t s = 0; s < hw; ++s) {
    const KeySlot& k = keys_[s];
    if (k.state.use != SlotUse::kFree && name == std::string_view(k.name, strnlen(k.name, kNameCapacity))) {
      return s;
    }
  }
  return std::nullopt;
}

bool PoolCore::Eligible(uint32_t slot, uint64_t now) const noexcept {
  const KeySlot& k = keys_[slot];
  const SlotState& st = k.state;
  if (st.use != SlotUse::kActive || st.enabled == 0) return false;
  switch (st.circuit) {
    case Circuit::kClosed:
      if (k.config.max_concurrency != 0 && st.in_flight >= k.config.max_concurrency) return false;
      break;
    case Circuit::kOpen:
      if (st.in_flight != 0) return false;  // exactly one probe, after the others ended
      break;
    case Circuit::kHalfOpen:
    case Circuit::kRevoked: return false;
  }
  return ReadyAt(slot) <= now;
}

void PoolCore::OpenCircuit(SlotState& st, uint64_t now) noexcept {
  const uint64_t base = ph_->config.default_cooldown > 0 ? ph_->config.default_cooldown : kNanosPerSecond;
  if (st.circuit == Circuit::kHalfOpen && st.open_cooldown > 0) {
    // A failed probe: stay out longer each time, up to the cap.
    Set(st.open_cooldown, std::max(base, std::min(ph_->config.max_cooldown, st.open_cooldown * 2)));
  } else {
    Set(st.open_cooldown, base);
  }
  Set(st.circuit, Circuit::kOpen);
  Set(st.circuit_opens, st.circuit_opens + 1);
  const uint64_t until = now + st.open_cooldown;
  if (until > st.cooldown_deadline) Set(st.cooldown_deadline, until);
  NoteEvent();
}

void PoolCore::ResetLocked(uint32_t slot) noexcept {
  SlotState& st = keys_[slot].state;
  Set(st.cooldown_deadline, uint64_t{0});
  Set(st.last_cooldown, uint64_t{0});
  Set(st.fail_streak, 0u);
  Set(st.rl_streak, 0u);
  Set(st.circuit, Circuit::kClosed);
  Set(st.open_cooldown, uint64_t{0});
  Set(st.req_tat, uint64_t{0});  // and the rate-limit buckets: full again
  Set(st.tok_tat, uint64_t{0});
}

uint64_t PoolCore::Stride(uint32_t slot) const noexcept {
  const KeySlot& k = keys_[slot];
  double health = SuccessRate(k.state) / (1.0 + k.state.ema_latency);
  if (!(health >= kMinHealth)) health = kMinHealth;
  const double w = static_cast<double>(std::max<uint32_t>(k.config.weight, 1)) * health;
  const double stride = kStrideOne / w;
  return stride < 1.0 ? 1 : static_cast<uint64_t>(stride);
}

void PoolCore::IndexUpdate(uint32_t slot, uint64_t now) noexcept {
  const bool want = Eligible(slot, now);
  const bool have = index_view_.Contains(slot);
  if (want && !have) {
    if (ph_->index_strategy == static_cast<uint32_t>(Strategy::kWeighted)) {
      // A key (re)entering rotation starts at the current virtual time, so
      // it neither monopolises the pool nor waits for its old pass. Not
      // journaled: any pass at or after vtime is a valid place in rotation.
      SlotState& st = keys_[slot].state;
      if (PassBefore(st.pass, ph_->vtime)) st.pass = ph_->vtime;
    }
    if (index_view_.NeedsRegrow(Ordered(), HighWater())) {
      IndexRebuild(now);  // the pool outgrew the tree; the rebuild adds `slot` too
      return;
    }
    index_view_.Add(slot, Ordered(), Counts(), SortKeyOf(slot));
  } else if (want && have) {
    if (Ordered()) index_view_.Update(slot, Counts(), SortKeyOf(slot));
  } else if (!want && have) {
    index_view_.Remove(slot, Ordered());
  }
}

void PoolCore::IndexRebuild(uint64_t now) noexcept {
  ph_->index_strategy = ph_->config.strategy;
  const uint32_t hw = HighWater();
  const bool ordered = Ordered();
  index_view_.Clear(ordered, hw);
  ph_->next_deadline = kNever;
  for (uint32_t s = 0; s < hw; ++s) {
    if (keys_[s].state.use == SlotUse::kFree) continue;
    NoteDeadline(ReadyAt(s), now);
    // The index is empty and sized for hw: IndexUpdate's Add, without its
    // regrow check (a high water rewritten meanwhile cannot recurse here).
    if (!Eligible(s, now)) continue;
    if (ph_->index_strategy == static_cast<uint32_t>(Strategy::kWeighted)) {
      SlotState& st = keys_[s].state;
      if (PassBefore(st.pass, ph_->vtime)) st.pass = ph_->vtime;
    }
    index_view_.Add(s, ordered, Counts(), SortKeyOf(s));
  }
}

void PoolCore::NoteDeadline(uint64_t deadline, uint64_t now) noexcept {
  if (deadline > now && deadline < ph_->next_deadline) ph_->next_deadline = deadline;
}

void PoolCore::Sweep(uint64_t now) noexcept {
  uint64_t next = kNever;
  const uint32_t hw = HighWater();
  for (uint32_t s = 0; s < hw; ++s) {
    const SlotState& st = keys_[s].state;
    // Removing keys count for next_deadline too (I4): AddKey may re-admit
    // one while it cools, and it must come back when its deadline passes.
    if (st.use == SlotUse::kFree) continue;
    const uint64_t ready = ReadyAt(s);
    if (ready > now) {
      next = std::min(next, ready);
    } else if (ready != 0 && !index_view_.Contains(s)) {
      IndexUpdate(s, now);
    }
  }
  ph_->next_deadline = next;
}

}  // namespace keymesh::shm
