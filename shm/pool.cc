// The views of a pool (pool.h): construction and the calls that are neither
// leases nor administration.
#include "shm/pool.h"

#include <cmath>

#include "shm/futex.h"

namespace keymesh::shm {

PoolUser::PoolUser(const Segment& segment, uint32_t pool_index, const Clock& clock) noexcept
    : core_(segment, pool_index, clock) {}

void PoolUser::WakeWaiters() noexcept {
  try {
    (void)SweepAndWake();
  } catch (...) {  // only the message of a refusal can fail (memory): the wake-up happened
  }
}

Status PoolUser::SweepAndWake() {
  {
    PoolCore::Guard g(&core_);
    if (g.ok()) [[likely]] {
      const uint64_t now = core_.Now();
      if (now >= core_.header()->next_deadline) core_.Sweep(now);
      g.RequestWake();
      return Status::Ok();
    }
    // Not locked: wake every sleeper anyway, so a cancelled waiter sees its
    // flag (a waiter re-checks under the lock by itself).
    PoolHeader* ph = core_.header();
    ph->wake_seq.fetch_add(1, std::memory_order_release);
    FutexWakeAll(&ph->wake_seq);
    return g.status();
  }
}

Status PoolUser::ObserveLimits(std::string_view name, const LimitUpdate& u) {
  for (const std::optional<double>& d : {u.reset_requests, u.reset_tokens, u.retry_after}) {
    if (d && !(*d >= 0 && std::isfinite(*d))) {
      return Status(Code::kInvalidArgument, "limit durations must be finite seconds >= 0");
    }
  }
  PoolCore::Guard g(&core_);
  if (!g.ok()) return g.status();
  std::optional<uint32_t> s = core_.FindByNameLocked(name);
  if (!s) return core_.NoSuchKey(name);
  const uint64_t now = core_.Now();
  SlotState& st = core_.key(*s).state;
  // Headers are the provider's word, or a tamperer's: every wait they ask
  // for is honoured up to the pool's max_cooldown, as a 429's Retry-After is.
  LimitUpdate capped = u;
  const double cap = NanosToSeconds(core_.header()->config.max_cooldown);
  for (std::optional<double>* d : {&capped.reset_requests, &capped.reset_tokens, &capped.retry_after}) {
    if (*d && **d > cap) *d = cap;
  }
  const Budgets after = ApplyLimitUpdate(Budgets{st.req_tat, st.tok_tat, st.cooldown_deadline},
                                         core_.RequestPacingOf(*s), core_.TokenPacingOf(*s), capped, now);
  core_.Set(st.req_tat, after.req_tat);
  core_.Set(st.tok_tat, after.tok_tat);
  const bool later = after.cooldown_deadline > st.cooldown_deadline;
  core_.Set(st.cooldown_deadline, after.cooldown_deadline);
  core_.Commit();
  if (later) core_.NoteEvent();
  core_.NoteDeadline(core_.ReadyAt(*s), now);
  core_.IndexUpdate(*s, now);
  return Status::Ok();
}

}  // namespace keymesh::shm
