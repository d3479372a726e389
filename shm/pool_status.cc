// Reading a pool: its status snapshot and the small readers.
#include <algorithm>
#include <cstring>

#include "shm/pool.h"

namespace keymesh::shm {
namespace {

double SuccessRate(const SlotState& st) noexcept {
  const uint64_t total = st.successes + st.failures;
  return total == 0 ? 1.0 : static_cast<double>(st.successes) / static_cast<double>(total);
}

}  // namespace

KeyStatus DescribeSlot(const KeySlot& k, uint32_t slot, const PoolConfig& pool, uint64_t now) {
  const SlotState& st = k.state;
  const uint32_t margin = SegmentMarginPpm(k.config, pool);
  KeyStatus ks;
  ks.slot = slot;
  ks.name = std::string(k.name, strnlen(k.name, kNameCapacity));
  ks.fingerprint = k.config.fingerprint;
  ks.enabled = st.enabled != 0;
  ks.weight = k.config.weight;
  ks.max_concurrency = k.config.max_concurrency;
  ks.rpm = k.config.rpm;
  ks.tpm = k.config.tpm;
  ks.in_flight = st.in_flight;
  ks.cooldown_remaining = st.cooldown_deadline > now ? NanosToSeconds(st.cooldown_deadline - now) : 0.0;
  ks.fail_streak = st.fail_streak;
  ks.rate_limit_streak = st.rl_streak;
  ks.acquires = st.acquires;
  ks.successes = st.successes;
  ks.failures = st.failures;
  ks.rate_limited = st.rate_limited;
  ks.reclaimed = st.reclaimed;
  ks.tokens = st.tokens;
  ks.cancelled = st.cancelled;
  ks.latency_avg = st.ema_latency;
  ks.has_latency = st.has_latency != 0;
  ks.last_used_ago = st.last_used == 0 ? -1.0 : NanosToSeconds(now > st.last_used ? now - st.last_used : 0);
  ks.burst = k.config.burst;
  ks.share_active = (k.config.share_flags & kShareActive) != 0;
  if (ks.share_active) {
    ks.share_rpm = static_cast<double>(k.config.share_rpm_milli) / 1000.0;
    ks.share_tpm = static_cast<double>(k.config.share_tpm);
    ks.share_burst = k.config.share_burst;
  }
  ks.rate_margin = k.config.margin_ppm == kPoolMargin ? -1.0 : static_cast<double>(k.config.margin_ppm) / 1e6;
  ks.escalation = st.rl_streak;
  ks.circuit_opens = st.circuit_opens;
  ks.circuit = static_cast<CircuitState>(static_cast<uint32_t>(st.circuit) & 3);
  ks.requests_available = RequestsAvailable(st.req_tat, RequestPacingOf(k.config, margin), now);
  ks.tokens_available = TokensAvailable(st.tok_tat, TokenPacingOf(k.config, margin), now);
  const uint64_t ready = ReadyAt(st, k.config, margin);
  ks.ready_in = ready > now ? NanosToSeconds(ready - now) : 0.0;
  if (st.use == SlotUse::kRemoving) {
    ks.state = KeyState::kRemoving;
  } else if (!st.enabled) {
    ks.state = KeyState::kDisabled;
  } else if (st.circuit == Circuit::kRevoked) {
    ks.state = KeyState::kRevoked;
  } else if (st.circuit == Circuit::kHalfOpen) {
    ks.state = KeyState::kHalfOpen;
  } else if (st.circuit == Circuit::kOpen && st.cooldown_deadline > now) {
    ks.state = KeyState::kExhausted;
  } else if (st.circuit == Circuit::kOpen) {
    ks.state = KeyState::kProbe;
  } else if (st.cooldown_deadline > now) {
    ks.state = KeyState::kCooling;
  } else if (ready > now) {
    ks.state = KeyState::kThrottled;
  } else if (k.config.max_concurrency != 0 && st.in_flight >= k.config.max_concurrency) {
    ks.state = KeyState::kBusy;
  } else {
    ks.state = KeyState::kAvailable;
  }
  ks.reason = DescribeKeyState(ks);
  const bool available = ks.state == KeyState::kAvailable || ks.state == KeyState::kBusy ||
                         ks.state == KeyState::kThrottled || ks.state == KeyState::kProbe;
  ks.health_score = available ? SuccessRate(st) / (1.0 + st.ema_latency) : 0.0;
  return ks;
}

Result<PoolStatus> PoolUser::Snapshot() {
  PoolStatus out;
  PoolCore::Guard g(&core_);
  if (!g.ok()) return g.status();
  const PoolHeader* ph = core_.header();
  const uint64_t now = core_.Now();
  if (now >= ph->next_deadline) core_.Sweep(now);
  out.name = core_.PoolName();
  out.strategy = static_cast<Strategy>(ph->config.strategy);
  out.options.strategy = out.strategy;
  out.options.max_failures = ph->config.max_failures;
  out.options.default_cooldown = NanosToSeconds(ph->config.default_cooldown);
  out.options.acquire_timeout = NanosToSeconds(ph->config.acquire_timeout);
  out.options.max_lease_seconds = NanosToSeconds(ph->config.max_lease);
  out.options.max_cooldown = NanosToSeconds(ph->config.max_cooldown);
  out.options.rate_margin = static_cast<double>(ph->config.margin_ppm) / 1e6;
  out.options.max_leases_per_process = ph->config.max_leases_per_process;
  out.uptime = NanosToSeconds(MonotonicNowNanos() - ph->created_mono);
  out.generation = core_.segment().generation();
  PoolTotals& t = out.totals;
  t.acquires = ph->retired.acquires;
  t.releases = ph->retired.successes;
  t.failures = ph->retired.failures;
  t.rate_limited = ph->retired.rate_limited;
  t.reclaimed = ph->retired.reclaimed;
  t.no_key_available = ph->no_key.load(std::memory_order_relaxed);
  out.acquire_wait.count = 0;
  for (size_t b = 0; b < kWaitBuckets; ++b) {
    out.acquire_wait.counts[b] = ph->wait_counts[b];
    out.acquire_wait.count += ph->wait_counts[b];
  }
  out.acquire_wait.sum = NanosToSeconds(ph->wait_sum_ns);
  t.timeouts = ph->timeouts.load(std::memory_order_relaxed);
  t.wait_clock_ms = ph->wait_clock_ms.load(std::memory_order_relaxed);
  const uint32_t hw = core_.HighWater();
  for (uint32_t s = 0; s < hw; ++s) {
    const KeySlot& k = core_.key(s);
    if (k.state.use == SlotUse::kFree) continue;
    out.keys.push_back(DescribeSlot(k, s, ph->config, now));
    t.acquires += k.state.acquires;
    t.releases += k.state.successes;
    t.failures += k.state.failures;
    t.rate_limited += k.state.rate_limited;
    t.reclaimed += k.state.reclaimed;
  }
  return out;
}

uint32_t PoolUser::AvailableCount() {
  uint32_t n = 0;
  return AvailableCount(&n).ok() ? n : 0;
}

Status PoolUser::AvailableCount(uint32_t* count) {
  PoolCore::Guard g(&core_);
  if (!g.ok()) return g.status();
  const uint64_t now = core_.Now();
  if (now >= core_.header()->next_deadline) core_.Sweep(now);
  *count = core_.index().eligible_count();
  return Status::Ok();
}

uint64_t PoolUser::NextDeadline() {
  uint64_t d = kNever;
  return NextDeadline(&d).ok() ? d : kNever;
}

Status PoolUser::NextDeadline(uint64_t* deadline) {
  PoolCore::Guard g(&core_);
  if (!g.ok()) return g.status();
  *deadline = core_.header()->next_deadline;
  return Status::Ok();
}

std::optional<uint32_t> PoolUser::FindByName(std::string_view name) {
  std::optional<uint32_t> slot;
  return FindByName(name, &slot).ok() ? slot : std::nullopt;
}

Status PoolUser::FindByName(std::string_view name, std::optional<uint32_t>* slot) {
  PoolCore::Guard g(&core_);
  if (!g.ok()) return g.status();
  *slot = core_.FindByNameLocked(name);
  return Status::Ok();
}

std::string PoolUser::KeyName(uint32_t slot) {
  std::string name;
  return KeyName(slot, &name).ok() ? name : std::string();
}

Status PoolUser::KeyName(uint32_t slot, std::string* name) {
  if (slot >= core_.key_capacity()) {
    name->clear();
    return Status::Ok();
  }
  PoolCore::Guard g(&core_);
  if (!g.ok()) return g.status();
  *name = core_.KeyName(slot);
  return Status::Ok();
}

}  // namespace keymesh::shm
