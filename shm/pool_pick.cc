// Choosing outside the lock: the key snapshot a scheduler in another
// language chooses from, the acquire of exactly the key it chose, and the
// wait for a change when it chose none.
#include <algorithm>
#include <cstring>

#include "common/text.h"
#include "shm/futex.h"
#include "shm/pool.h"
#include "shm/selection.h"

namespace keymesh::shm {
namespace {

// Selects `slot` when it is eligible, nothing otherwise: the acquire of a
// chosen key runs the ordinary TryAcquireLocked with every check.
class PinnedSelector final : public Selector {
 public:
  explicit PinnedSelector(uint32_t slot) noexcept : slot_(slot) {}
  std::optional<uint32_t> Select(const SelectionContext& ctx) const override {
    std::optional<uint32_t> next = ctx.NextEligibleFrom(slot_);
    if (next && *next == slot_) return slot_;
    return std::nullopt;
  }

 private:
  uint32_t slot_;
};

}  // namespace

Status PoolUser::SnapshotKeys(KeySnapshot* out, uint32_t capacity, KeysSnapshotInfo* info) {
  PoolCore::Guard g(&core_);
  if (!g.ok()) return g.status();
  PoolHeader* ph = core_.header();
  return core_.Checked([&]() -> Status {
    const uint64_t now = core_.Now();
    if (now >= ph->next_deadline) core_.Sweep(now);
    if (ph->index_strategy != ph->config.strategy) core_.IndexRebuild(now);
    const uint64_t generation = core_.segment().generation();
    const uint64_t until = ph->share_until.load(std::memory_order_acquire);
    const bool shares_lapsed = until != 0 && now >= until;
    const uint32_t hw = core_.HighWater();
    uint32_t n = 0;
    for (uint32_t s = 0; s < hw; ++s) {
      const KeySlot& k = core_.key(s);
      if (k.state.use != SlotUse::kActive) continue;
      if (n < capacity) {
        const SlotState& st = k.state;
        KeySnapshot& v = out[n];
        v = KeySnapshot{};
        v.slot = s;
        v.generation = generation;
        v.fingerprint = k.config.fingerprint;
        std::memcpy(v.name, k.name, std::min<size_t>(sizeof(v.name) - 1, strnlen(k.name, kNameCapacity)));
        v.eligible = core_.index().Contains(s) && !(shares_lapsed && (k.config.share_flags & kShareActive) != 0);
        v.has_latency = st.has_latency != 0;
        v.in_flight = st.in_flight;
        v.max_concurrency = k.config.max_concurrency;
        v.weight = k.config.weight;
        v.fail_streak = st.fail_streak;
        v.successes = st.successes;
        v.failures = st.failures;
        v.cooldown_remaining = st.cooldown_deadline > now ? NanosToSeconds(st.cooldown_deadline - now) : 0.0;
        v.latency_avg = st.ema_latency;
        v.last_used_ago = st.last_used == 0 ? -1.0 : NanosToSeconds(now > st.last_used ? now - st.last_used : 0);
      }
      ++n;
    }
    if (core_.index().damaged()) return core_.Fault("the eligibility index names slots beyond the pool");
    info->count = n;
    info->generation = generation;
    info->next_change = ph->next_deadline == kNever ? -1.0
                        : ph->next_deadline > now   ? NanosToSeconds(ph->next_deadline - now)
                                                    : 0.0;
    info->max_failures = ph->config.max_failures;
    info->strategy = static_cast<Strategy>(ph->config.strategy);
    // Announced under the lock: every change after the unlock bumps
    // wake_seq, so WaitForChange(info->wake_seq) loses no wake-up.
    info->wake_seq = ph->wake_seq.load(std::memory_order_acquire);
    ph->sleepers.store(1, std::memory_order_release);
    return Status::Ok();
  });
}

Result<LeaseHandle> PoolUser::AcquireKey(uint32_t slot, uint64_t generation, uint64_t fingerprint, uint64_t tokens,
                                         const ProcessId& holder) {
  PoolCore::Guard g(&core_);
  if (!g.ok()) return g.status();
  return core_.Checked([&]() -> Result<LeaseHandle> {
    if (generation != core_.segment().generation() || slot >= core_.HighWater() ||
        core_.key(slot).state.use != SlotUse::kActive || core_.key(slot).config.fingerprint != fingerprint) {
      return Status(Code::kUnknownKey,
                    "the chosen key is no longer in pool " + Quoted(core_.PoolName()) +
                        " as it was in the snapshot (keys were added or removed since): take a fresh snapshot");
    }
    const PinnedSelector pinned(slot);
    Result<LeaseHandle> r = core_.TryAcquireLocked(&pinned, core_.Now(), nullptr, tokens, 0, holder);
    if (!r.ok() && r.status().code() == Code::kNoAvailableKey) {
      return Status(Code::kNoAvailableKey, "key " + Quoted(core_.KeyName(slot)) + " is no longer eligible");
    }
    return r;
  });
}

Status PoolUser::WaitForChange(uint32_t wake_seq, uint64_t timeout_ns, const std::atomic<bool>* cancel) {
  PoolHeader* ph = core_.header();
  uint64_t earliest = kNever;
  {
    PoolCore::Guard g(&core_);
    if (!g.ok()) return g.status();
    if (cancel != nullptr && cancel->load(std::memory_order_acquire)) return Status(Code::kClosed, "wait cancelled");
    if (ph->wake_seq.load(std::memory_order_acquire) != wake_seq) return Status::Ok();
    ph->sleepers.store(1, std::memory_order_release);
    const uint64_t now = core_.Now();
    const uint64_t d = ph->next_deadline;
    if (d != kNever) earliest = d > now ? d - now : 0;
  }
  uint64_t wait = std::min(timeout_ns, earliest == kNever ? kNever : earliest + 1);
  if (wait != 0) FutexWait(&ph->wake_seq, wake_seq, wait);
  if (cancel != nullptr && cancel->load(std::memory_order_acquire)) return Status(Code::kClosed, "wait cancelled");
  return Status::Ok();
}

}  // namespace keymesh::shm
