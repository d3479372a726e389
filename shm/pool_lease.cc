// The lease fast path: acquire, release and the freeing of a lease. The
// worker's side of the pool (PoolUser) and the locked core it runs on.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>

#include "common/text.h"
#include "shm/futex.h"
#include "shm/pool.h"
#include "shm/selection.h"

namespace keymesh::shm {
namespace {

constexpr double kEmaAlpha = 0.2;
constexpr const char* kNoKeyMessage =
    "No API keys are currently available. All keys are either cooling down or exhausted.";

}  // namespace

Result<LeaseHandle> PoolCore::TryAcquireLocked(const Selector* selector, uint64_t now, uint64_t* earliest,
                                               uint64_t tokens, uint64_t waited_ns, const ProcessId& holder) {
  CrashPointReached(CrashPoint::kAcquireBegin);
  if (now >= ph_->next_deadline) [[unlikely]]
    Sweep(now);
  if (ph_->index_strategy != ph_->config.strategy) [[unlikely]]
    IndexRebuild(now);
  std::optional<uint32_t> choice;
  if (selector == nullptr) [[likely]] {
    choice = SelectBuiltin(*this);
  } else {
    PoolSelection ctx(this);
    choice = selector->Select(ctx);
  }
  if (index_view_.damaged()) [[unlikely]]
    return Fault("the eligibility index names slots beyond the pool");
  if (!choice) {
    if (earliest != nullptr) *earliest = ph_->next_deadline;
    return Status(Code::kNoAvailableKey, kNoKeyMessage);
  }
  const uint32_t s = *choice;
  if (s >= HighWater() || !index_view_.Contains(s)) [[unlikely]] {
    // The built-in selection answers from the index: then the index is
    // wrong (the segment was rewritten). Else the caller's selector is.
    if (selector == nullptr) return Fault("the eligibility index chose a slot that is not eligible");
    return Status(Code::kInvalidArgument,
                  "the pool's selector returned slot " + std::to_string(s) + ", which is not eligible");
  }
  const KeyConfig& cfg = keys_[s].config;
  if ((cfg.share_flags & kShareActive) != 0) {  // no hint: on a mesh host every key has a share
    const uint64_t until = ph_->share_until.load(std::memory_order_acquire);
    if (until != 0 && now >= until) [[unlikely]] {
      if (earliest != nullptr) *earliest = kNever;
      return Status(Code::kNoAvailableKey,
                    "no mesh share on this host: the broker has not renewed its shares (is keymesh-broker running?)");
    }
  }
  if (tokens != 0 && cfg.tpm != 0 && tokens > cfg.tpm) [[unlikely]] {
    // More than the key's whole minute: the provider refuses such a request,
    // and reserving it would take the key out of rotation for as long.
    return Status(Code::kInvalidArgument, "an acquire of " + std::to_string(tokens) + " tokens exceeds key " +
                                              Quoted(KeyName(s)) + "'s one-minute budget (tpm " +
                                              std::to_string(cfg.tpm) + ")");
  }
  const uint32_t top = ph_->free_top;
  if (top == 0) [[unlikely]] {
    return Status(Code::kCapacityExceeded,
                  "pool " + Quoted(PoolName()) + " holds at most " + std::to_string(lease_cap_) + " leases at once");
  }
  if (top > lease_cap_) [[unlikely]]
    return Fault("the free-lease stack is deeper than the lease capacity");
  // The holder's quota: it can only be over it when at least that many
  // leases are out, so an uncontended acquire pays this one compare and the
  // scan runs only on a crowded table.
  const uint32_t quota = ph_->config.max_leases_per_process != 0 ? ph_->config.max_leases_per_process : default_quota_;
  if (lease_cap_ - top >= quota) [[unlikely]] {
    if (HeldBy(holder, quota) >= quota) {
      return Status(Code::kCapacityExceeded, "process " + std::to_string(holder.pid) + " already holds " +
                                                 std::to_string(quota) + " leases of pool " + Quoted(PoolName()) +
                                                 " (its max_leases_per_process)");
    }
  }
  const uint32_t l = free_[top - 1];
  if (l >= lease_cap_ || leases_[l].state != LeaseState::kFree) [[unlikely]]
    return Fault("the free-lease stack names a lease beyond the capacity or one that is held");
  SlotState& st = keys_[s].state;
  LeaseRecord& lease = leases_[l];

  // The lease's state and seq are one journal word; its other fields mean
  // nothing while it is free, so they need no undo.
  LogWord(&lease.state);
  CrashPointReached(CrashPoint::kAcquireAfterJournal);
  lease.slot = s;
  lease.pid = holder.pid;
  lease.start_time = holder.start_time;
  lease.acquire_ns = now;
  lease.tokens = 0;
  lease.flags = 0;
  lease.seq += 1;
  lease.state = LeaseState::kHeld;
  CrashPointReached(CrashPoint::kAcquireMidMutation);
  st.in_flight += 1;
  Set(st.acquires, st.acquires + 1);
  Set(st.last_used, now);
  Set(st.last_used_seq, ++ph_->acquire_seq);
  if (ph_->index_strategy == static_cast<uint32_t>(Strategy::kWeighted)) {
    ph_->vtime = st.pass;
    Set(st.pass, st.pass + Stride(s));
  }
  bool paced = false;
  if (cfg.rpm != 0) [[unlikely]] {
    // GCRA: reserve this request's slot in the key's request budget.
    Set(st.req_tat, AfterRequest(st.req_tat, RequestPacingOf(s), now));
    paced = true;
  }
  if (cfg.tpm != 0 && tokens != 0) [[unlikely]] {
    Set(st.tok_tat, AfterTokens(st.tok_tat, TokenPacingOf(s), now, tokens));
    lease.tokens = tokens;
    paced = true;
  }
  if (st.circuit == Circuit::kOpen) [[unlikely]] {
    Set(st.circuit, Circuit::kHalfOpen);  // this caller is the one probe
    lease.flags = kLeaseProbe;
    NoteEvent();
  }
  Commit();
  CrashPointReached(CrashPoint::kAcquireAfterCommit);

  ph_->free_top = top - 1;
  ph_->rr_cursor = s + 1;
  size_t bucket = 0;
  if (waited_ns != 0) [[unlikely]] {
    const double w = NanosToSeconds(waited_ns);
    while (bucket + 1 < kWaitBuckets && w > kWaitBucketBounds[bucket]) ++bucket;
    ph_->wait_sum_ns += waited_ns;
  }
  ph_->wait_counts[bucket] += 1;
  if (paced) NoteDeadline(ReadyAt(s), now);
  // The key stays eligible unless this grant used up what made it so
  // (concurrency, budgets, the probe): then the full check.
  if (!paced && lease.flags == 0 && (cfg.max_concurrency == 0 || st.in_flight < cfg.max_concurrency)) [[likely]] {
    if (Ordered()) index_view_.Update(s, Counts(), SortKeyOf(s));
  } else {
    IndexUpdate(s, now);
  }
  return LeaseHandle{s, l, lease.seq, now, cfg.fingerprint};
}

Status PoolCore::ReleaseLocked(const LeaseHandle& h, const Outcome& outcome, const ProcessId& holder, bool* wake) {
  if (h.lease >= lease_cap_ || h.slot >= key_cap_) [[unlikely]] {
    return Status(Code::kNotHeld, "lease handle out of range");
  }
  LeaseRecord& lease = leases_[h.lease];
  if (lease.state != LeaseState::kHeld || lease.seq != h.seq || lease.slot != h.slot || lease.pid != holder.pid ||
      lease.start_time != holder.start_time) [[unlikely]] {
    return Status(Code::kNotHeld,
                  "key " + Quoted(KeyName(h.slot)) + " is not held by this lease (already released or reclaimed)");
  }
  const uint32_t s = h.slot;
  KeySlot& key = keys_[s];
  SlotState& st = key.state;
  if (st.in_flight == 0 || st.use == SlotUse::kFree) [[unlikely]]
    return Fault("a held lease names a key that has nothing in flight");
  bool exhausted_now = false;
  // The clock is read only when the answer depends on it: a key whose
  // cooldown and budgets allowed it before this lease was granted allows it
  // at any later time, so the grant time serves (saves a clock read per
  // success on keys without limits).
  const bool timed = outcome.kind != OutcomeKind::kSuccess || key.config.rpm != 0 || key.config.tpm != 0 ||
                     st.circuit != Circuit::kClosed || st.cooldown_deadline > lease.acquire_ns;
  const uint64_t now = timed ? clock_->NowNanos() : lease.acquire_ns;
  const bool probe = (lease.flags & kLeaseProbe) != 0 && st.circuit == Circuit::kHalfOpen;

  LogWord(&lease.state);
  lease.state = LeaseState::kFree;
  CrashPointReached(CrashPoint::kReleaseMidMutation);
  st.in_flight -= 1;
  if (key.config.tpm != 0) [[unlikely]] {
    // Debit what the request really used, correcting the reservation; a
    // cancelled request used nothing, so its whole reservation comes back.
    const bool cancelled = outcome.kind == OutcomeKind::kCancelled;
    const uint64_t used = cancelled ? 0 : outcome.tokens;
    if (cancelled ? lease.tokens != 0 : (used != 0 && used != lease.tokens)) {
      Set(st.tok_tat, CorrectTokens(st.tok_tat, TokenPacingOf(s), now, lease.tokens, used));
    }
  }
  if (outcome.tokens != 0 && outcome.kind != OutcomeKind::kCancelled) Set(st.tokens, st.tokens + outcome.tokens);
  switch (outcome.kind) {
    case OutcomeKind::kSuccess:
      Set(st.successes, st.successes + 1);
      Set(st.fail_streak, 0u);
      Set(st.rl_streak, 0u);
      Set(st.last_cooldown, uint64_t{0});
      if (st.circuit == Circuit::kOpen || st.circuit == Circuit::kHalfOpen) [[unlikely]] {
        Set(st.circuit, Circuit::kClosed);  // the key works again
        Set(st.open_cooldown, uint64_t{0});
        NoteEvent();
      }
      if (outcome.latency && std::isfinite(*outcome.latency) && *outcome.latency >= 0) {
        Set(st.ema_latency,
            st.has_latency ? kEmaAlpha * *outcome.latency + (1.0 - kEmaAlpha) * st.ema_latency : *outcome.latency);
        Set(st.has_latency, uint8_t{1});
      }
      break;
    case OutcomeKind::kFailure:
      Set(st.failures, st.failures + 1);
      Set(st.fail_streak, st.fail_streak + 1);
      if (outcome.permanent) {
        if (st.circuit != Circuit::kRevoked) {
          Set(st.circuit, Circuit::kRevoked);
          exhausted_now = true;
          NoteEvent();
        }
      } else if (probe) {
        OpenCircuit(st, now);  // the probe failed: open again, for longer
      } else if (st.fail_streak >= ph_->config.max_failures && st.circuit == Circuit::kClosed) {
        OpenCircuit(st, now);
        exhausted_now = true;
      }
      break;
    case OutcomeKind::kCancelled:
      Set(st.cancelled, st.cancelled + 1);
      if (probe) {
        Set(st.circuit, Circuit::kOpen);  // nothing learned: the next caller probes
        NoteEvent();
      }
      break;
    case OutcomeKind::kRateLimited: {
      Set(st.rate_limited, st.rate_limited + 1);
      // A Retry-After is the provider's (or a caller's) word: honoured up to
      // max_cooldown, so one tampered response cannot bench a key for years.
      const uint64_t requested = outcome.cooldown
                                     ? std::min(SecondsToNanos(*outcome.cooldown), ph_->config.max_cooldown)
                                     : ph_->config.default_cooldown;
      uint64_t cooldown = requested;
      if (st.rl_streak > 0) {
        // Consecutive 429s escalate: at least twice the previous, capped.
        const uint64_t doubled = st.last_cooldown > ph_->config.max_cooldown / 2
                                     ? ph_->config.max_cooldown
                                     : std::min(ph_->config.max_cooldown, st.last_cooldown * 2);
        cooldown = std::max(requested, doubled);
      }
      Set(st.rl_streak, st.rl_streak + 1);
      Set(st.last_cooldown, cooldown);
      const uint64_t until = now > kNever - cooldown ? kNever : now + cooldown;
      if (until > st.cooldown_deadline || probe) NoteEvent();              // other hosts must learn it
      if (until > st.cooldown_deadline) Set(st.cooldown_deadline, until);  // never shortens
      if (probe) Set(st.circuit, Circuit::kOpen);                          // probe again once the 429 cooldown ends
      break;
    }
  }
  Commit();

  PushFreeLease(h.lease);
  if (!timed && st.use == SlotUse::kActive && index_view_.Contains(s)) [[likely]] {
    // A success on a key that was eligible, with no limits, closed circuit
    // and no cooldown: it is still eligible, one fewer in flight.
    if (Ordered()) index_view_.Update(s, Counts(), SortKeyOf(s));
  } else {
    if (timed) NoteDeadline(ReadyAt(s), now);
    if (st.use == SlotUse::kRemoving) RetireSlotIfDone(s);
    if (st.use != SlotUse::kFree) IndexUpdate(s, now);
  }
  *wake = true;
  if (exhausted_now) [[unlikely]] {
    if (st.circuit == Circuit::kRevoked) {
      return Status(Code::kKeyExhausted, "Key " + Quoted(KeyName(s)) +
                                             " failed authentication and is out of rotation until reset or add_key.");
    }
    char detail[96];
    std::snprintf(detail, sizeof(detail), "; its circuit is open for %.1f s, then one caller probes it.",
                  NanosToSeconds(st.open_cooldown));
    return Status(Code::kKeyExhausted, "Key " + Quoted(KeyName(s)) + " has been exhausted (" +
                                           std::to_string(st.fail_streak) + " consecutive failures)" + detail);
  }
  return Status::Ok();
}

bool PoolCore::FreeLeaseLocked(uint32_t l, uint64_t now, bool count_reclaim) noexcept {
  LeaseRecord& lease = leases_[l];
  const uint32_t s = lease.slot;
  if (s >= HighWater() || keys_[s].state.use == SlotUse::kFree || keys_[s].state.in_flight == 0) [[unlikely]] {
    Damaged();
    return false;
  }
  SlotState& st = keys_[s].state;
  LogWord(&lease.state);
  lease.state = LeaseState::kFree;
  st.in_flight -= 1;
  if (count_reclaim) Set(st.reclaimed, st.reclaimed + 1);
  if (keys_[s].config.tpm != 0 && lease.tokens != 0) [[unlikely]] {
    // No outcome will correct the reservation: refund it, so a holder that
    // reserves a large count and dies does not keep the key throttled.
    Set(st.tok_tat, CorrectTokens(st.tok_tat, TokenPacingOf(s), now, lease.tokens, 0));
  }
  if ((lease.flags & kLeaseProbe) != 0 && st.circuit == Circuit::kHalfOpen) {
    Set(st.circuit, Circuit::kOpen);
    NoteEvent();
  }
  Commit();
  PushFreeLease(l);
  RetireSlotIfDone(s);
  if (keys_[s].state.use != SlotUse::kFree) IndexUpdate(s, now);
  return true;
}

void PoolCore::PushFreeLease(uint32_t l) noexcept {
  const uint32_t top = ph_->free_top;
  if (top < lease_cap_) [[likely]] {
    free_[top] = l;
    ph_->free_top = top + 1;
  } else {
    Damaged();  // the lease is free (committed); Repair rebuilds the stack from the records
  }
}

uint32_t PoolCore::HeldBy(const ProcessId& holder, uint32_t limit) const noexcept {
  uint32_t n = 0;
  for (uint32_t l = 0; l < lease_cap_ && n < limit; ++l) {
    const LeaseRecord& r = leases_[l];
    if (r.state == LeaseState::kHeld && r.pid == holder.pid && r.start_time == holder.start_time) ++n;
  }
  return n;
}

// A removed key's slot is freed when its last lease ends; its totals move to
// the pool's retired totals so pool-wide counters never go backwards.
void PoolCore::RetireSlotIfDone(uint32_t s) noexcept {
  KeySlot& k = keys_[s];
  if (k.state.use != SlotUse::kRemoving || k.state.in_flight != 0) return;
  if (index_view_.Contains(s)) index_view_.Remove(s, Ordered());
  LogSlotImage(s);
  RetiredTotals& r = ph_->retired;
  Set(r.acquires, r.acquires + k.state.acquires);
  Set(r.successes, r.successes + k.state.successes);
  Set(r.failures, r.failures + k.state.failures);
  Set(r.rate_limited, r.rate_limited + k.state.rate_limited);
  Set(r.reclaimed, r.reclaimed + k.state.reclaimed);
  Set(ph_->key_count, ph_->key_count - 1);
  std::memset(&k, 0, sizeof(KeySlot));
  Commit();
}

// ---------------------------------------------------------------------------
// PoolUser: the worker's lease calls

[[gnu::flatten]] Result<LeaseHandle> PoolUser::TryAcquire(const Selector* selector, uint64_t* earliest,
                                                          const ProcessId& holder, uint64_t tokens) {
  Result<LeaseHandle> r = [&]() -> Result<LeaseHandle> {
    PoolCore::Guard g(&core_);
    if (!g.ok()) [[unlikely]]
      return g.status();
    return core_.Checked([&] { return core_.TryAcquireLocked(selector, core_.Now(), earliest, tokens, 0, holder); });
  }();
  if (!r.ok() && r.status().code() == Code::kNoAvailableKey) {
    core_.header()->no_key.fetch_add(1, std::memory_order_relaxed);
  }
  return r;
}

Result<LeaseHandle> PoolUser::Acquire(uint64_t timeout_ns, const Selector* selector, const ProcessId& holder,
                                      const std::atomic<bool>* cancel, uint64_t tokens) {
  PoolHeader* ph = core_.header();
  // The wait's clock starts after a first attempt that found no key: a
  // grant at the first attempt (the common case) reads the clock once, for
  // the lease's grant time (a clock read costs tens of ns on a VM).
  uint64_t start = 0;
  uint64_t deadline = 0;
  uint64_t clocked_ms = 0;  // of this wait, added to the pool's wait clock
  // This wait until `mono`, on the pool's wait clock (lock-free).
  auto clock_wait = [&](uint64_t mono) {
    const uint64_t ms = mono > start ? (mono - start) / 1'000'000 : 0;
    if (ms > clocked_ms) {
      ph->wait_clock_ms.fetch_add(static_cast<uint32_t>(ms - clocked_ms), std::memory_order_relaxed);
      clocked_ms = ms;
    }
  };
  for (bool first = true;; first = false) {
    uint32_t seq = 0;
    uint64_t earliest = kNever;
    {
      PoolCore::Guard g(&core_);
      if (!g.ok()) [[unlikely]]
        return g.status();
      const uint64_t now = core_.Now();
      const uint64_t waited = first ? 0 : std::max<uint64_t>(MonotonicNowNanos() - start, 1);
      // This wait so far (whatever comes next: a grant, a timeout, a cancel
      // or more sleep).
      if (!first) clock_wait(start + waited);
      Result<LeaseHandle> r =
          core_.Checked([&] { return core_.TryAcquireLocked(selector, now, &earliest, tokens, waited, holder); });
      if (r.ok()) [[likely]]
        return r;
      // No key, and a full lease table, are waited out: a release ends both.
      // So is the holder's own quota when the holder is this process (its
      // other threads release); the broker, acquiring for a client, does not
      // hold up its queue for one client's quota.
      const Code code = r.status().code();
      if (code != Code::kNoAvailableKey &&
          (code != Code::kCapacityExceeded || (ph->free_top != 0 && !(holder == Self())))) {
        return r;
      }
      if (cancel != nullptr && cancel->load(std::memory_order_acquire)) {
        return Status(Code::kClosed, "acquire cancelled");
      }
      if (first) {
        start = MonotonicNowNanos();
        deadline = timeout_ns >= kNever - start ? kNever : start + timeout_ns;
      }
      if (MonotonicNowNanos() >= deadline) {
        if (code == Code::kNoAvailableKey) ph->no_key.fetch_add(1, std::memory_order_relaxed);
        if (timeout_ns > 0) ph->timeouts.fetch_add(1, std::memory_order_relaxed);
        if (code != Code::kNoAvailableKey) return r;
        if (earliest != kNever && earliest > now) {
          char when[64];
          std::snprintf(when, sizeof(when), " The next key returns in %.3f s.", NanosToSeconds(earliest - now));
          return Status(Code::kNoAvailableKey, r.status().message() + when);
        }
        return r;
      }
      // Announce the sleep while holding the lock: any change after the
      // unlock bumps wake_seq and sees `sleepers`, so no wake-up is lost.
      seq = ph->wake_seq.load(std::memory_order_acquire);
      ph->sleepers.store(1, std::memory_order_release);
      // earliest is in the pool clock's units; convert the remaining
      // cooldown to a real duration.
      if (earliest != kNever) earliest = earliest > now ? earliest - now : 0;
    }
    const uint64_t real_now = MonotonicNowNanos();
    uint64_t wait = deadline == kNever ? kNever : (deadline > real_now ? deadline - real_now : 0);
    if (earliest != kNever) wait = std::min(wait, earliest + 1);
    if (wait == 0) continue;
    // Asleep in slices of at most kWaitClockNs, to add each to the wait
    // clock; only a change (wake_seq moved) or the end of the whole wait
    // makes it look at the keys again.
    const uint64_t wake_at = wait >= kNever - real_now ? kNever : real_now + wait;
    for (uint64_t t = real_now;;) {
      FutexWait(&ph->wake_seq, seq, std::min(wake_at - t, kWaitClockNs));
      if (ph->wake_seq.load(std::memory_order_acquire) != seq) break;
      t = MonotonicNowNanos();
      clock_wait(t);
      if (t >= wake_at) break;
    }
  }
}

[[gnu::flatten]] Status PoolUser::Release(const LeaseHandle& lease, const Outcome& outcome, const ProcessId& holder) {
  PoolCore::Guard g(&core_);
  if (!g.ok()) [[unlikely]]
    return g.status();
  // Returned as built (one named Status per function: NRVO), so an ok
  // release moves no string.
  return core_.Checked([&] {
    bool wake = false;
    Status st = core_.ReleaseLocked(lease, outcome, holder, &wake);
    if (wake) g.RequestWake();
    return st;
  });
}

}  // namespace keymesh::shm
