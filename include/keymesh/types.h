// Plain value types shared by the C++ API, the broker and the C ABI.
#ifndef KEYMESH_TYPES_H_
#define KEYMESH_TYPES_H_

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "keymesh/export.h"
#include "keymesh/status.h"

namespace keymesh {

enum class Strategy : uint32_t { kRoundRobin = 0, kLeastBusy = 1, kWeighted = 2 };

// "round_robin", "least_busy", "weighted".
KEYMESH_EXPORT std::string_view StrategyName(Strategy strategy) noexcept;
KEYMESH_EXPORT Result<Strategy> ParseStrategy(std::string_view name);

// Pool-wide options; defaults are the original KeyPool's.
struct PoolOptions {
  Strategy strategy = Strategy::kLeastBusy;
  double default_cooldown = 60.0;    // seconds a 429 cools a key when no Retry-After is given
  uint32_t max_failures = 10;        // consecutive failures that exhaust a key (>= 1)
  double acquire_timeout = 30.0;     // seconds Acquire() waits by default (0: try once)
  double max_lease_seconds = 600.0;  // a lease held longer is reclaimed by the broker
  double max_cooldown = 600.0;       // cap of escalating 429 and circuit cooldowns
  // Rate-limit safety margin: keys are paced at (1 - rate_margin) x their
  // rpm/tpm, because requests reach the provider a few ms after the grant,
  // with jitter. 0 <= rate_margin < 0.5.
  double rate_margin = 0.02;
  // Leases one process may hold at once in this pool, so one process (a
  // hoarder, a leak) cannot take the whole lease table from the others. 0:
  // half the pool's lease table (at least 1).
  uint32_t max_leases_per_process = 0;
};

// Checks ranges and finiteness; the message names the offending field.
KEYMESH_EXPORT Status ValidatePoolOptions(const PoolOptions& options);

// KeySpec::rate_margin meaning "the pool's" (any negative value does; the C
// ABI's KM_DEFAULT is this number).
inline constexpr double kPoolRateMargin = -1.0;

// One key as configured. `secret` never enters the shared segment.
struct KeySpec {
  std::string name;              // stable, unique in its pool, 1..63 bytes
  std::string secret;            // the API key itself
  uint32_t weight = 1;           // >= 1; used by the weighted strategy
  uint32_t max_concurrency = 0;  // 0: unlimited
  uint32_t rpm = 0;              // requests per minute, 0: unlimited
  uint64_t tpm = 0;              // tokens per minute, 0: unlimited
  // Requests that may be granted back to back (0 or 1: smooth pacing, the
  // default, right for providers that quantize limits per second).
  uint32_t burst = 0;
  // Per-key override of PoolOptions::rate_margin (0 <= m < 0.5); negative:
  // the pool's.
  double rate_margin = kPoolRateMargin;
};

// How a lease ended. kCancelled ends it without counting an outcome (the
// request never reached the provider, e.g. an asyncio task cancelled right
// after the grant). The numbers are part of the C ABI (KM_OUTCOME_*).
enum class OutcomeKind : uint32_t { kSuccess = 0, kFailure = 1, kRateLimited = 2, kCancelled = 3 };

// A key's circuit breaker (see KeyStatus::circuit).
//   kClosed   -> kOpen      max_failures consecutive failures
//   kOpen     -> kHalfOpen  the cooldown ended and one caller got the key as a probe
//   kHalfOpen -> kClosed    the probe succeeded
//   kHalfOpen -> kOpen      the probe failed (longer cooldown) or never finished
//   any       -> kRevoked   an authentication failure; only reset/add_key close it
// The numbers are the keymesh_key_circuit_state metric's values.
enum class CircuitState : uint32_t { kClosed = 0, kOpen = 1, kHalfOpen = 2, kRevoked = 3 };
// "closed", "open", "half_open", "revoked".
KEYMESH_EXPORT std::string_view CircuitStateName(CircuitState state) noexcept;
// The inverse of CircuitStateName; kInvalidArgument for anything else.
KEYMESH_EXPORT Result<CircuitState> ParseCircuitState(std::string_view name);

// Why a key is or is not eligible right now.
enum class KeyState : uint32_t {
  kAvailable = 0,  // eligible
  kBusy = 1,       // in-flight == max_concurrency
  kCooling = 2,    // cooldown deadline in the future
  kExhausted = 3,  // consecutive failures reached max_failures
  kDisabled = 4,   // disabled by an operator
  kRemoving = 5,   // removed; waits for its leases to end
  kHalfOpen = 6,   // circuit half-open: its one probe is in flight
  kRevoked = 7,    // an authentication failure: out until reset or add_key
  kThrottled = 8,  // out of request or token budget until it refills
  kProbe = 9,      // circuit open, cooldown over: the next caller gets it as a probe
};
KEYMESH_EXPORT std::string_view KeyStateName(KeyState state) noexcept;
// The inverse of KeyStateName; kInvalidArgument for anything else.
KEYMESH_EXPORT Result<KeyState> ParseKeyState(std::string_view name);

struct KeyStatus {
  uint32_t slot = 0;
  std::string name;
  uint64_t fingerprint = 0;  // salted hash of the secret, never the secret
  KeyState state = KeyState::kAvailable;
  bool enabled = true;
  uint32_t weight = 1;
  uint32_t max_concurrency = 0;
  uint32_t rpm = 0;
  uint64_t tpm = 0;
  uint32_t in_flight = 0;
  double cooldown_remaining = 0.0;  // seconds
  uint32_t fail_streak = 0;
  uint32_t rate_limit_streak = 0;
  uint64_t acquires = 0;
  uint64_t successes = 0;
  uint64_t failures = 0;
  uint64_t rate_limited = 0;
  uint64_t reclaimed = 0;
  uint64_t tokens = 0;
  uint64_t cancelled = 0;  // leases ended without an outcome
  CircuitState circuit = CircuitState::kClosed;
  uint32_t circuit_opens = 0;
  uint32_t escalation = 0;          // consecutive 429s (each doubles the cooldown)
  int64_t requests_available = -1;  // requests grantable now; -1: no rpm limit
  int64_t tokens_available = -1;    // tokens left in the bucket now; -1: no tpm limit
  uint32_t burst = 0;
  // The mesh (several hosts): when share_active, this host paces the key at
  // its share of the key's limits (share_rpm, share_tpm, share_burst)
  // instead of rpm, tpm and burst; a share of 0 for a limited dimension
  // keeps the key out of rotation on this host.
  bool share_active = false;
  double share_rpm = 0.0;
  double share_tpm = 0.0;
  uint32_t share_burst = 0;
  double rate_margin = -1.0;  // per-key override; -1: the pool's
  double ready_in = 0.0;      // seconds until cooldown and budgets allow a grant
  std::string reason;         // why the key is not eligible ("" when it is): DescribeKeyState()
  double latency_avg = 0.0;   // seconds, EMA alpha 0.2; 0 until the first sample
  bool has_latency = false;
  double last_used_ago = -1.0;  // seconds since the last acquire, -1 if never
  double health_score = 1.0;    // success rate x 1/(1+latency_avg), 0 when not eligible
};

// One line saying why `key` is in its state ("" for kAvailable), from the
// fields of `key` alone: "circuit open after 10 consecutive failures;
// half-open in 59.0s", "at max concurrency 8", ...
KEYMESH_EXPORT std::string DescribeKeyState(const KeyStatus& key);

struct PoolTotals {
  uint64_t acquires = 0;
  uint64_t releases = 0;  // successful releases
  uint64_t failures = 0;
  uint64_t rate_limited = 0;
  uint64_t reclaimed = 0;
  uint64_t no_key_available = 0;  // failed acquires, once each
  uint64_t timeouts = 0;          // acquires that gave up after waiting
  // Milliseconds all acquires have waited, those waiting now included (each
  // adds its part at least every 50 ms); wraps at 2^32: compare two
  // readings modulo 2^32.
  uint32_t wait_clock_ms = 0;
};

// Upper bounds (seconds) of the acquire wait-time histogram buckets; the
// last bucket is +Inf. Counts are per bucket (not cumulative).
inline constexpr double kWaitBucketBounds[] = {0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0};
inline constexpr size_t kWaitBuckets = sizeof(kWaitBucketBounds) / sizeof(kWaitBucketBounds[0]) + 1;

struct WaitHistogram {
  uint64_t counts[kWaitBuckets] = {};  // counts[i]: waits <= kWaitBucketBounds[i] (last: the rest)
  double sum = 0.0;                    // seconds waited in total by granted acquires
  uint64_t count = 0;                  // granted acquires
};

struct PoolStatus {
  std::string name;
  WaitHistogram acquire_wait;  // time from the acquire call to the grant, all processes
  Strategy strategy = Strategy::kLeastBusy;
  PoolOptions options;
  PoolTotals totals;
  double uptime = 0.0;  // seconds since the pool was created
  uint64_t generation = 0;
  std::vector<KeyStatus> keys;
};

// One key of a pool as a scheduler outside the pool's lock sees it
// (Pool::SnapshotKeys): plain data, written into the caller's buffer with
// no allocation. (slot, generation, fingerprint) identify the key for
// Pool::AcquireKey: a key removed and re-added, or any key added or removed
// since (the pool's generation moved), no longer matches.
struct KeySnapshot {
  uint32_t slot = 0;
  uint64_t generation = 0;   // the pool's key generation when the snapshot was taken
  uint64_t fingerprint = 0;  // the salted hash of the key's secret
  char name[64] = {};        // NUL-terminated
  // This process's copy of the secret (valid while the Pool lives), or
  // nullptr when this process does not know it yet.
  const char* secret = nullptr;
  bool eligible = false;  // every check an acquire makes passed at the snapshot
  bool has_latency = false;
  uint32_t in_flight = 0;
  uint32_t max_concurrency = 0;
  uint32_t weight = 1;
  uint32_t fail_streak = 0;
  uint64_t successes = 0;
  uint64_t failures = 0;
  double cooldown_remaining = 0.0;  // seconds until the key's cooldown ends (0: not cooling)
  double latency_avg = 0.0;         // seconds (meaningful when has_latency)
  double last_used_ago = -1.0;      // seconds since the last acquire, -1 if never
};

// What Pool::SnapshotKeys says of the pool as a whole.
struct KeysSnapshotInfo {
  uint32_t count = 0;         // keys in the pool (may exceed the buffer: then only the first were written)
  uint32_t wake_seq = 0;      // for Pool::WaitForChange
  uint64_t generation = 0;    // as in each KeySnapshot
  double next_change = -1.0;  // seconds until the earliest cooldown or budget deadline, -1 if none
  uint32_t max_failures = 0;  // the pool's
  Strategy strategy = Strategy::kLeastBusy;
};

// Masks a secret for display: "..." plus at most the last 4 characters, and
// only when the secret is at least 12 characters long ("***" otherwise).
KEYMESH_EXPORT std::string MaskSecret(std::string_view secret);

// A secret usable as an API key: not empty, not only white space, no control
// character (it travels in HTTP headers). kInvalidArgument otherwise; the
// message never repeats the secret.
KEYMESH_EXPORT Status ValidateSecret(std::string_view secret);

}  // namespace keymesh

#endif  // KEYMESH_TYPES_H_
