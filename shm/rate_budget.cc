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

}  // namespace

RequestPacing RequestPacingOf(const KeyConfig& c, uint32_t margin_ppm) noexcept {
  if (c.rpm == 0) return {};
  const double rate = static_cast<double>(c.rpm) * RateFactor(margin_ppm);  // per minute, >= 0.5
  RequestPacing p;
  p.interval = static_cast<uint64_t>(60e9 / rate);       // <= 120 s
  const uint64_t extra = c.burst > 1 ? c.burst - 1 : 0;  // validated <= 1e6; saturate whatever the segment says
  p.tolerance = extra > kNever / p.interval ? kNever : extra * p.interval;
  return p;
}

TokenPacing TokenPacingOf(const KeyConfig& c, uint32_t margin_ppm) noexcept {
  if (c.tpm == 0) return {};
  const double rate = static_cast<double>(c.tpm) * RateFactor(margin_ppm);  // per minute, >= 0.5
  TokenPacing p;
  p.per_token = 60e9 / rate;
  p.tolerance = kNanosPerSecond;  // at most one second of token budget in a burst
  p.minute = c.tpm;
  p.minute_ns = static_cast<uint64_t>(60e9 / RateFactor(margin_ppm));  // 60 s / (1 - margin) <= 120 s
  return p;
}

uint64_t ReadyAt(const SlotState& st, const KeyConfig& c, uint32_t margin_ppm) noexcept {
  uint64_t ready = st.cooldown_deadline;
  if (c.rpm == 0 && c.tpm == 0) [[likely]]
    return ready;  // no budgets: only the cooldown
  const RequestPacing rp = RequestPacingOf(c, margin_ppm);
  if (rp.limited() && st.req_tat > rp.tolerance) ready = std::max(ready, st.req_tat - rp.tolerance);
  const TokenPacing tp = TokenPacingOf(c, margin_ppm);
  if (tp.limited() && st.tok_tat > tp.tolerance) ready = std::max(ready, st.tok_tat - tp.tolerance);
  return ready;
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
  const uint64_t tat = std::max(req_tat, now);
  const uint64_t limit = now + p.tolerance;
  return tat > limit ? 0 : static_cast<int64_t>((limit - tat) / p.interval + 1);
}

int64_t TokensAvailable(uint64_t tok_tat, const TokenPacing& p, uint64_t now) noexcept {
  if (!p.limited()) return -1;
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
        b.req_tat = std::max(b.req_tat, req_reset + rp.tolerance);
      } else {
        b.cooldown_deadline = std::max(b.cooldown_deadline, req_reset);
      }
    } else if (rp.limited()) {
      // At most n requests grantable now: tat >= now + tolerance - (n-1)*interval.
      const uint64_t allow = (n - 1) >= (kNever / rp.interval) ? kNever : (n - 1) * rp.interval;
      const uint64_t floor = now + rp.tolerance > allow ? now + rp.tolerance - allow : 0;
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
