#include "shm/rate_budget.h"

#include <algorithm>

#include "shm/clock.h"

namespace keymesh::shm {
namespace {

// Margins are validated < 0.5 where they enter (ValidatePoolOptions,
// ValidateKeySpec); a segment may still hold anything.
constexpr uint32_t kMaxMarginPpm = 500'000;

double RateFactor(uint32_t margin_ppm) noexcept {
  return 1.0 - static_cast<double>(std::min(margin_ppm, kMaxMarginPpm)) / 1e6;
}

uint64_t SaturatingAdd(uint64_t a, uint64_t b) noexcept { return a > kNever - b ? kNever : a + b; }

// Only the flag bit counts: other bits of a hostile word are ignored.
bool ShareActive(const KeyConfig& c) noexcept { return (c.share_flags & kShareActive) != 0; }

}  // namespace

bool ShareBlocked(const KeyConfig& c) noexcept {
  return ShareActive(c) && ((c.rpm != 0 && c.share_rpm_milli == 0) || (c.tpm != 0 && c.share_tpm == 0));
}

RequestPacing RequestPacingOf(const KeyConfig& c, uint32_t margin_ppm) noexcept {
  if (c.rpm == 0) return {};
  RequestPacing p;
  double per_minute = static_cast<double>(c.rpm);
  uint32_t burst = c.burst;
  if (ShareActive(c)) {  // no hint: on a mesh host every key has a share
    uint64_t milli = c.share_rpm_milli;
    if (milli == 0) {
      p.blocked = true;
      milli = 1;  // the smallest share's pacing keeps every sum finite; nothing is granted
    }
    per_minute = static_cast<double>(milli) / 1000.0;
    burst = c.share_burst;
  }
  const double rate = per_minute * RateFactor(margin_ppm);  // per minute, >= 0.0005
  // <= 1.2e14 ns (a share of 0.001 per minute); a huge share still paces at
  // 1 ns, never 0 (which would read as "no limit").
  p.interval = std::max<uint64_t>(1, static_cast<uint64_t>(60e9 / rate));
  const uint64_t extra = burst > 1 ? burst - 1 : 0;  // validated <= 1e6; saturate whatever the segment says
  p.tolerance = extra > kNever / p.interval ? kNever : extra * p.interval;
  return p;
}

TokenPacing TokenPacingOf(const KeyConfig& c, uint32_t margin_ppm) noexcept {
  if (c.tpm == 0) return {};
  TokenPacing p;
  uint64_t minute = c.tpm;
  if (ShareActive(c)) {  // no hint: on a mesh host every key has a share
    minute = c.share_tpm;
    if (minute == 0) {
      p.blocked = true;
      minute = 1;
    }
  }
  const double rate = static_cast<double>(minute) * RateFactor(margin_ppm);  // per minute, >= 0.5
  p.per_token = 60e9 / rate;                                                 // > 3e-9 for any 64-bit count: never 0
  p.tolerance = kNanosPerSecond;  // at most one second of token budget in a burst
  p.minute = minute;
  p.minute_ns = static_cast<uint64_t>(60e9 / RateFactor(margin_ppm));  // 60 s / (1 - margin) <= 120 s
  return p;
}

uint64_t ReadyAt(const SlotState& st, const KeyConfig& c, uint32_t margin_ppm) noexcept {
  uint64_t ready = st.cooldown_deadline;
  if (c.rpm == 0 && c.tpm == 0) [[likely]]
    return ready;  // no budgets: only the cooldown (and no share can limit it)
  const RequestPacing rp = RequestPacingOf(c, margin_ppm);
  const TokenPacing tp = TokenPacingOf(c, margin_ppm);
  if (rp.blocked || tp.blocked) [[unlikely]]
    return kNever;
  if (rp.limited() && st.req_tat > rp.tolerance) ready = std::max(ready, st.req_tat - rp.tolerance);
  if (tp.limited() && st.tok_tat > tp.tolerance) ready = std::max(ready, st.tok_tat - tp.tolerance);
  return ready;
}

namespace {

// `tat`'s lead over now, scaled by to_unit / from_unit (both > 0).
uint64_t Rescale(uint64_t tat, double from_unit, double to_unit, uint64_t now) noexcept {
  if (tat <= now || from_unit == to_unit) return tat;
  const double ahead = static_cast<double>(tat - now) * (to_unit / from_unit);
  if (!(ahead < 9e18)) return kNever;  // centuries: saturate (NaN too)
  return SaturatingAdd(now, static_cast<uint64_t>(ahead));
}

}  // namespace

uint64_t RescaleRequestTat(uint64_t tat, const RequestPacing& from, const RequestPacing& to, uint64_t now) noexcept {
  if (!from.limited() || !to.limited() || from.blocked || to.blocked) return tat;
  return Rescale(tat, static_cast<double>(from.interval), static_cast<double>(to.interval), now);
}

uint64_t RescaleTokenTat(uint64_t tat, const TokenPacing& from, const TokenPacing& to, uint64_t now) noexcept {
  if (!from.limited() || !to.limited() || from.blocked || to.blocked) return tat;
  return Rescale(tat, from.per_token, to.per_token, now);
}

uint64_t AfterTokens(uint64_t tat, const TokenPacing& p, uint64_t now, uint64_t tokens) noexcept {
  return SaturatingAdd(std::max(tat, now), p.CostOf(tokens));
}

uint64_t CorrectTokens(uint64_t tat, const TokenPacing& p, uint64_t now, uint64_t reserved, uint64_t used) noexcept {
  if (used > reserved) return AfterTokens(tat, p, now, used - reserved);
  const uint64_t refund = p.CostOf(reserved - used);
  return tat > refund ? tat - refund : 0;
}

int64_t RequestsAvailable(uint64_t req_tat, const RequestPacing& p, uint64_t now) noexcept {
  if (!p.limited()) return -1;
  if (p.blocked) return 0;
  const uint64_t tat = std::max(req_tat, now);
  const uint64_t limit = SaturatingAdd(now, p.tolerance);
  if (tat > limit) return 0;
  const uint64_t n = (limit - tat) / p.interval;
  return n >= static_cast<uint64_t>(INT64_MAX) ? INT64_MAX : static_cast<int64_t>(n + 1);
}

int64_t TokensAvailable(uint64_t tok_tat, const TokenPacing& p, uint64_t now) noexcept {
  if (!p.limited()) return -1;
  if (p.blocked) return 0;
  const double room = static_cast<double>(now + p.tolerance) - static_cast<double>(std::max(tok_tat, now));
  return room > 0 ? static_cast<int64_t>(room / p.per_token) : 0;
}

Budgets ApplyLimitUpdate(Budgets b, const RequestPacing& rp, const TokenPacing& tp, const LimitUpdate& u,
                         uint64_t now) noexcept {
  // A reset in the headers is measured from now; without one, assume the
  // provider's usual one-second quantum.
  const uint64_t req_reset = now + (u.reset_requests ? SecondsToNanos(*u.reset_requests) : kNanosPerSecond);
  const uint64_t tok_reset = now + (u.reset_tokens ? SecondsToNanos(*u.reset_tokens) : kNanosPerSecond);
  if (u.remaining_requests) {
    const uint64_t n = *u.remaining_requests;
    if (n == 0) {
      if (rp.limited()) {
        b.req_tat = std::max(b.req_tat, SaturatingAdd(req_reset, rp.tolerance));
      } else {
        b.cooldown_deadline = std::max(b.cooldown_deadline, req_reset);
      }
    } else if (rp.limited()) {
      // At most n requests grantable now: tat >= now + tolerance - (n-1)*interval.
      const uint64_t allow = (n - 1) >= (kNever / rp.interval) ? kNever : (n - 1) * rp.interval;
      const uint64_t top = SaturatingAdd(now, rp.tolerance);
      const uint64_t floor = top > allow ? top - allow : 0;
      b.req_tat = std::max(b.req_tat, floor);
    }
  }
  if (u.remaining_tokens) {
    const uint64_t m = *u.remaining_tokens;
    if (m == 0) {
      if (tp.limited()) {
        b.tok_tat = std::max(b.tok_tat, tok_reset + tp.tolerance);
      } else {
        b.cooldown_deadline = std::max(b.cooldown_deadline, tok_reset);
      }
    } else if (tp.limited()) {
      const double allow = static_cast<double>(m) * tp.per_token;
      const double floor = static_cast<double>(now + tp.tolerance) - allow;
      if (floor > 0) b.tok_tat = std::max(b.tok_tat, static_cast<uint64_t>(floor));
    }
  }
  if (u.retry_after) b.cooldown_deadline = std::max(b.cooldown_deadline, now + SecondsToNanos(*u.retry_after));
  return b;
}

}  // namespace keymesh::shm
