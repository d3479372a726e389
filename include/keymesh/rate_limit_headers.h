// Parsing what providers say about rate limits, so callers can feed it to a
// pool (Pool::ObserveLimits) and KeyMesh tracks a key's true budget.
//
// Every parser is total: garbage input is an kInvalidArgument Status, never a
// crash, an exception or a silently wrong number.
#ifndef KEYMESH_RATE_LIMIT_HEADERS_H_
#define KEYMESH_RATE_LIMIT_HEADERS_H_

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "keymesh/export.h"
#include "keymesh/status.h"

namespace keymesh {

// The longest wait any parser here returns (one day): a longer Retry-After
// or reset (a buggy or tampered response, a date decades ahead) is capped to
// it, not refused, so the rest of the headers still count. A pool caps again
// at its own max_cooldown (600 s by default) when it applies them.
inline constexpr double kMaxHeaderDelaySeconds = 86400.0;

// Retry-After (RFC 9110 10.2.3): delay-seconds ("120", also "1.5") or an
// HTTP-date ("Wed, 21 Oct 2015 07:28:00 GMT", RFC 850 and asctime forms too),
// converted to seconds from `now_unix_seconds`; a date in the past is 0.
// Capped at kMaxHeaderDelaySeconds.
KEYMESH_EXPORT Result<double> ParseRetryAfter(std::string_view value, double now_unix_seconds);

// A Go-style duration as in x-ratelimit-reset-* ("1s", "6m0s", "250ms",
// "1h2m3.5s", "20us"); a bare number means seconds. Capped at
// kMaxHeaderDelaySeconds.
KEYMESH_EXPORT Result<double> ParseRateLimitDuration(std::string_view value);

// What one response's headers said. Absent fields were not in the headers.
struct LimitObservation {
  std::optional<uint64_t> limit_requests;      // x-ratelimit-limit-requests
  std::optional<uint64_t> limit_tokens;        // x-ratelimit-limit-tokens
  std::optional<uint64_t> remaining_requests;  // x-ratelimit-remaining-requests
  std::optional<uint64_t> remaining_tokens;    // x-ratelimit-remaining-tokens
  std::optional<double> reset_requests;        // seconds until the request budget is full again
  std::optional<double> reset_tokens;          // seconds until the token budget is full again
  std::optional<double> retry_after;           // seconds (Retry-After, retry-after-ms)
  bool empty() const noexcept {
    return !limit_requests && !limit_tokens && !remaining_requests && !remaining_tokens && !reset_requests &&
           !reset_tokens && !retry_after;
  }
};

// Header names are matched case-insensitively; unrelated headers are
// ignored. A recognised header with a malformed value fails the whole parse
// with a message naming the header (the value is not echoed: it could be
// anything).
KEYMESH_EXPORT Result<LimitObservation> ParseLimitHeaders(
    const std::vector<std::pair<std::string, std::string>>& headers, double now_unix_seconds);

}  // namespace keymesh

#endif  // KEYMESH_RATE_LIMIT_HEADERS_H_
