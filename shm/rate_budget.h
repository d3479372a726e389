// A key's rate-limit budgets: GCRA (the generic cell rate algorithm) over the
// two theoretical arrival times in its slot, req_tat for requests and
// tok_tat for tokens.
//
// A key with `rpm` requests per minute is paced at one request every
// `interval` = 60 s / (rpm x (1 - margin)) ns; a grant is allowed at `now`
// when tat - tolerance <= now, and it moves tat to max(tat, now) + interval.
// `tolerance` = (burst - 1) x interval lets `burst` requests through back to
// back. Tokens work the same way with a cost per token and one second of
// tolerance. The arrival times are plain numbers in the slot, so a broker can
// top them up or overwrite them from outside (another host's budget) without
// any other field.
//
// Pure functions over numbers: no segment, no lock, no clock. The pool calls
// them under its lock and journals what they return.
#ifndef KEYMESH_SHM_RATE_BUDGET_H_
#define KEYMESH_SHM_RATE_BUDGET_H_

#include <cstdint>
#include <optional>

#include "shm/layout.h"

namespace keymesh::shm {

// What a provider's headers said about a key's limits (seconds, counts).
struct LimitUpdate {
  std::optional<uint64_t> remaining_requests;
  std::optional<double> reset_requests;
  std::optional<uint64_t> remaining_tokens;
  std::optional<double> reset_tokens;
  std::optional<double> retry_after;
};

struct RequestPacing {
  uint64_t interval = 0;   // ns between requests; 0: no request limit
  uint64_t tolerance = 0;  // ns of burst
  // A mesh share of 0 requests: nothing is grantable on this host (the
  // interval is then the smallest share's, so arithmetic stays finite).
  bool blocked = false;
  bool limited() const noexcept { return interval != 0; }
};

struct TokenPacing {
  double per_token = 0;    // ns per token; 0: no token limit
  uint64_t tolerance = 0;  // ns of burst
  uint64_t minute = 0;     // the key's one-minute budget in tokens (its tpm)
  uint64_t minute_ns = 0;  // what `minute` tokens cost (ns): the most one debit moves tok_tat
  bool blocked = false;    // a mesh share of 0 tokens: nothing is grantable on this host
  bool limited() const noexcept { return per_token != 0; }
  // The ns `tokens` cost, saturating at minute_ns: the count is compared
  // with the minute's budget as an integer before any conversion, so no
  // uint64 input overflows the double -> integer cast.
  uint64_t CostOf(uint64_t tokens) const noexcept {
    if (tokens >= minute) return minute_ns;
    return static_cast<uint64_t>(static_cast<double>(tokens) * per_token);
  }
};

// The pacing of a key with config `c` under safety margin `margin_ppm`.
// Any input is safe (the config is read from the segment, which another
// process may have written): a margin beyond the documented < 0.5 is taken
// as 0.5, so every interval and cost of a configured limit stays below two
// minutes.
// With a mesh share (c.share_flags & kShareActive) a dimension the key
// limits is paced at the share (share_rpm_milli / 1000 per minute, share_tpm,
// share_burst) under the same margin; a dimension it does not limit stays
// unlimited. A share of 0 is `blocked`. A share may be far below 1 per
// minute: its interval is then long (at most 60e12 / 0.5 ns, about 33 h),
// and every sum over it saturates.
RequestPacing RequestPacingOf(const KeyConfig& c, uint32_t margin_ppm) noexcept;
TokenPacing TokenPacingOf(const KeyConfig& c, uint32_t margin_ppm) noexcept;

// The key has a limited dimension whose mesh share is 0 on this host.
bool ShareBlocked(const KeyConfig& c) noexcept;

// The earliest time (ns) at which the key's cooldown and both budgets allow
// a grant; kNever when a mesh share of 0 blocks it.
uint64_t ReadyAt(const SlotState& st, const KeyConfig& c, uint32_t margin_ppm) noexcept;

// An arrival time `tat` kept under pacing `from`, carried over to pacing
// `to` at `now` (a mesh share changed): the requests (tokens) it is ahead of
// now are owed at the new rate. So a key that was granted one request under
// a tiny share is not held for that share's long interval once the share
// rises. Unchanged when either side is unlimited or blocked (nothing is
// granted under a block; its debt is kept as time). Saturates.
uint64_t RescaleRequestTat(uint64_t tat, const RequestPacing& from, const RequestPacing& to, uint64_t now) noexcept;
uint64_t RescaleTokenTat(uint64_t tat, const TokenPacing& from, const TokenPacing& to, uint64_t now) noexcept;

// The request arrival time after one request granted at `now`.
inline uint64_t AfterRequest(uint64_t tat, const RequestPacing& p, uint64_t now) noexcept {
  const uint64_t from = tat > now ? tat : now;
  return from > kNever - p.interval ? kNever : from + p.interval;  // a share's interval may be long
}
// The token arrival time after `tokens` more were used at `now`. One call
// debits at most the key's one-minute budget (TokenPacing::CostOf), and the
// sum saturates: a hostile count cannot push the bucket years ahead.
uint64_t AfterTokens(uint64_t tat, const TokenPacing& p, uint64_t now, uint64_t tokens) noexcept;
// The token arrival time once a request that reserved `reserved` tokens
// reported `used`: the difference is debited or refunded (each capped at one
// minute's budget). A lease that ends without use (cancelled, reclaimed)
// passes used = 0: its whole reservation is refunded.
uint64_t CorrectTokens(uint64_t tat, const TokenPacing& p, uint64_t now, uint64_t reserved, uint64_t used) noexcept;

// Requests / tokens grantable at `now`; -1 when the key has no such limit.
int64_t RequestsAvailable(uint64_t req_tat, const RequestPacing& p, uint64_t now) noexcept;
int64_t TokensAvailable(uint64_t tok_tat, const TokenPacing& p, uint64_t now) noexcept;

// The budget fields after a provider's report `u` at `now`: a key the
// provider says is out of requests or tokens waits for the reset (a cooldown
// when it has no budget of that kind), and the budgets never allow more than
// the provider says remain. Never moves anything earlier. `u`'s durations
// must be finite and >= 0.
struct Budgets {
  uint64_t req_tat;
  uint64_t tok_tat;
  uint64_t cooldown_deadline;
};
Budgets ApplyLimitUpdate(Budgets current, const RequestPacing& rp, const TokenPacing& tp, const LimitUpdate& u,
                         uint64_t now) noexcept;

}  // namespace keymesh::shm

#endif  // KEYMESH_SHM_RATE_BUDGET_H_
