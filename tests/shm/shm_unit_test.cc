// Unit tests of the shm layer in one process: schedulers, cooldown and
// exhaustion on a FakeClock (never sleeps), EMA latency, capacities, header
// validation, admin operations and reclaiming. The C++ Pool on top is
// tests/client/pool_test.cc.
#define BOOST_TEST_MODULE shm_unit_test
#include <algorithm>
#include <cmath>
#include <map>
#include <numeric>

#include <boost/test/unit_test.hpp>

#include "keymesh/pool.h"
#include "shm/process_id.h"
#include "support/shm_fixtures.h"

namespace keymesh::shm {
namespace {

using testing::KeyName;
using testing::Must;
using testing::TestPool;

constexpr uint64_t kSec = kNanosPerSecond;

using testing::Cancelled;
using testing::Failure;
using testing::RateLimited;
using testing::Success;

LeaseHandle Take(PoolAdmin& pool) {
  Result<LeaseHandle> r = pool.TryAcquire();
  BOOST_REQUIRE_MESSAGE(r.ok(), "TryAcquire: " << r.status().ToString());
  return *r;
}

void Give(PoolAdmin& pool, const LeaseHandle& h, const Outcome& o = Success()) {
  Status st = pool.Release(h, o);
  BOOST_REQUIRE_MESSAGE(st.ok(), "Release: " << st.ToString());
}

// Acquires and immediately releases (as `o`) n times; returns the slots picked.
std::vector<uint32_t> Picks(PoolAdmin& pool, int n, const Outcome& o = Success()) {
  std::vector<uint32_t> out;
  for (int i = 0; i < n; ++i) {
    LeaseHandle h = Take(pool);
    out.push_back(h.slot);
    Give(pool, h, o);
  }
  return out;
}

std::vector<uint32_t> V(std::initializer_list<uint32_t> l) { return std::vector<uint32_t>(l); }

void RequireConsistent(PoolAdmin& pool) {
  Status st = pool.CheckConsistency();
  BOOST_REQUIRE_MESSAGE(st.ok(), st.ToString());
}

}  // namespace

// ===========================================================================
BOOST_AUTO_TEST_SUITE(round_robin)

BOOST_AUTO_TEST_CASE(rotates_in_slot_order_and_is_fair) {
  FakeClock clock;
  TestPool t(5, testing::MakeConfig(Strategy::kRoundRobin), clock);
  std::vector<uint32_t> picks = Picks(*t.pool, 1000);
  for (size_t i = 0; i < picks.size(); ++i) BOOST_REQUIRE_EQUAL(picks[i], i % 5);
  PoolStatus s = t.Snap();
  for (const KeyStatus& k : s.keys) BOOST_CHECK_EQUAL(k.acquires, 200u);
}

BOOST_AUTO_TEST_CASE(skips_a_cooling_key_without_drift) {
  FakeClock clock;
  TestPool t(3, testing::MakeConfig(Strategy::kRoundRobin), clock);
  // Hold all three, end k1's lease with a 429: the cursor wraps to k0.
  LeaseHandle a = Take(*t.pool), b = Take(*t.pool), c = Take(*t.pool);
  BOOST_REQUIRE_EQUAL(a.slot, 0u);
  BOOST_REQUIRE_EQUAL(b.slot, 1u);
  BOOST_REQUIRE_EQUAL(c.slot, 2u);
  Give(*t.pool, a);
  Give(*t.pool, b, RateLimited(10.0));
  Give(*t.pool, c);
  BOOST_CHECK(Picks(*t.pool, 4) == V({0, 2, 0, 2}));
  // k1's cooldown ends: rotation continues in slot order from the cursor.
  clock.Advance(10 * kSec);
  BOOST_CHECK(Picks(*t.pool, 6) == V({0, 1, 2, 0, 1, 2}));
}

BOOST_AUTO_TEST_CASE(returning_key_resumes_at_its_place) {
  FakeClock clock;
  TestPool t(4, testing::MakeConfig(Strategy::kRoundRobin), clock);
  BOOST_CHECK(Picks(*t.pool, 2) == V({0, 1}));
  BOOST_REQUIRE(t.pool->SetEnabled("k2", false).ok());
  BOOST_CHECK(Picks(*t.pool, 5) == V({3, 0, 1, 3, 0}));
  BOOST_REQUIRE(t.pool->SetEnabled("k2", true).ok());
  // The cursor sits after k0: k1, then k2 again in its slot-order place.
  BOOST_CHECK(Picks(*t.pool, 5) == V({1, 2, 3, 0, 1}));
}

BOOST_AUTO_TEST_CASE(skips_a_key_at_its_concurrency_cap) {
  FakeClock clock;
  TestPool t(3, testing::MakeConfig(Strategy::kRoundRobin), clock, Capacities{1, 8, 64}, /*max_concurrency=*/1);
  LeaseHandle held = Take(*t.pool);  // k0, now at its cap
  BOOST_REQUIRE_EQUAL(held.slot, 0u);
  BOOST_CHECK(Picks(*t.pool, 4) == V({1, 2, 1, 2}));
  Give(*t.pool, held);
  BOOST_CHECK(Picks(*t.pool, 3) == V({0, 1, 2}));
}

BOOST_AUTO_TEST_SUITE_END()

// ===========================================================================
BOOST_AUTO_TEST_SUITE(least_busy)

BOOST_AUTO_TEST_CASE(fewest_in_flight_then_lru_then_slot) {
  FakeClock clock;
  TestPool t(3, testing::MakeConfig(Strategy::kLeastBusy), clock);
  // Nothing used yet: slot order.
  LeaseHandle a = Take(*t.pool), b = Take(*t.pool), c = Take(*t.pool);
  BOOST_CHECK_EQUAL(a.slot, 0u);
  BOOST_CHECK_EQUAL(b.slot, 1u);
  BOOST_CHECK_EQUAL(c.slot, 2u);
  // k1 has fewest in flight.
  Give(*t.pool, b);
  LeaseHandle b2 = Take(*t.pool);
  BOOST_CHECK_EQUAL(b2.slot, 1u);
  Give(*t.pool, a);
  Give(*t.pool, b2);
  Give(*t.pool, c);
  // All idle; last acquires were k0 (oldest), k2, k1 (newest): LRU order,
  // which here differs from slot order.
  BOOST_CHECK(Picks(*t.pool, 6) == V({0, 2, 1, 0, 2, 1}));
}

BOOST_AUTO_TEST_CASE(in_flight_dominates_recency) {
  FakeClock clock;
  TestPool t(2, testing::MakeConfig(Strategy::kLeastBusy), clock);
  std::vector<LeaseHandle> held;
  for (int i = 0; i < 4; ++i) held.push_back(Take(*t.pool));
  BOOST_CHECK(held[0].slot == 0 && held[1].slot == 1 && held[2].slot == 0 && held[3].slot == 1);
  Give(*t.pool, held[0]);
  Give(*t.pool, held[2]);
  // k0: 0 in flight (most recently used), k1: 2.
  LeaseHandle x = Take(*t.pool), y = Take(*t.pool), z = Take(*t.pool);
  BOOST_CHECK_EQUAL(x.slot, 0u);
  BOOST_CHECK_EQUAL(y.slot, 0u);
  BOOST_CHECK_EQUAL(z.slot, 1u);  // both at 2 now; k1 used less recently
  for (const LeaseHandle& h : {held[1], held[3], x, y, z}) Give(*t.pool, h);
  RequireConsistent(*t.pool);
}

BOOST_AUTO_TEST_CASE(fair_over_many_picks) {
  FakeClock clock;
  TestPool t(5, testing::MakeConfig(Strategy::kLeastBusy), clock);
  std::vector<uint32_t> picks = Picks(*t.pool, 1000);
  std::vector<int> count(5, 0);
  for (uint32_t s : picks) ++count[s];
  for (int c : count) BOOST_CHECK_EQUAL(c, 200);
  // Interleaved holds: every key keeps within one lease of the others.
  std::vector<LeaseHandle> held;
  for (int round = 0; round < 200; ++round) {
    held.push_back(Take(*t.pool));
    if (held.size() > 7) {
      Give(*t.pool, held.front());
      held.erase(held.begin());
    }
    PoolStatus s = t.Snap();
    uint32_t lo = UINT32_MAX, hi = 0;
    for (const KeyStatus& k : s.keys) {
      lo = std::min(lo, k.in_flight);
      hi = std::max(hi, k.in_flight);
    }
    BOOST_REQUIRE_LE(hi - lo, 1u);
  }
  for (const LeaseHandle& h : held) Give(*t.pool, h);
  RequireConsistent(*t.pool);
}

BOOST_AUTO_TEST_SUITE_END()

// ===========================================================================
BOOST_AUTO_TEST_SUITE(weighted)

// Checks counts proportional to `share` (within 1 pick per key) and that no
// key waits much longer between picks than its share implies.
void CheckProportional(const std::vector<uint32_t>& picks, const std::vector<double>& share) {
  const double total = std::accumulate(share.begin(), share.end(), 0.0);
  std::vector<int64_t> count(share.size(), 0);
  std::vector<int64_t> last(share.size(), -1), max_gap(share.size(), 0);
  for (size_t i = 0; i < picks.size(); ++i) {
    const uint32_t s = picks[i];
    BOOST_REQUIRE_LT(s, share.size());
    ++count[s];
    max_gap[s] = std::max<int64_t>(max_gap[s], static_cast<int64_t>(i) - last[s]);
    last[s] = static_cast<int64_t>(i);
  }
  for (size_t s = 0; s < share.size(); ++s) {
    const double expected = static_cast<double>(picks.size()) * share[s] / total;
    BOOST_TEST_MESSAGE("key " << s << " picked " << count[s] << " expected " << expected << " max gap " << max_gap[s]);
    BOOST_CHECK_LE(std::abs(static_cast<double>(count[s]) - expected), 1.5);
    // Smooth: the gap between two picks of a key stays near total/share.
    BOOST_CHECK_LE(static_cast<double>(max_gap[s]), std::ceil(total / share[s]) + 1.0);
  }
}

BOOST_AUTO_TEST_CASE(proportional_to_weight_and_smooth) {
  FakeClock clock;
  TestPool t(3, testing::MakeConfig(Strategy::kWeighted), clock, Capacities{1, 8, 64}, 0, {1, 2, 3});
  // Cancelled releases leave the success rate (health) untouched.
  std::vector<uint32_t> picks = Picks(*t.pool, 6000, Cancelled());
  CheckProportional(picks, {1, 2, 3});
  // Deterministic: a second pool makes the same choices.
  TestPool t2(3, testing::MakeConfig(Strategy::kWeighted), clock, Capacities{1, 8, 64}, 0, {1, 2, 3});
  BOOST_CHECK(Picks(*t2.pool, 6000, Cancelled()) == picks);
}

// Gives k0 and k1 of a round-robin pool the outcomes given, then switches
// the pool to weighted (passes start equal).
void Prepare(TestPool& t, const std::vector<Outcome>& k0, const std::vector<Outcome>& k1) {
  for (size_t i = 0; i < std::max(k0.size(), k1.size()); ++i) {
    LeaseHandle a = Take(*t.pool), b = Take(*t.pool);
    BOOST_REQUIRE(a.slot == 0 && b.slot == 1);
    Give(*t.pool, a, i < k0.size() ? k0[i] : Cancelled());
    Give(*t.pool, b, i < k1.size() ? k1[i] : Cancelled());
  }
  BOOST_REQUIRE(t.pool->SetStrategy(Strategy::kWeighted).ok());
}

BOOST_AUTO_TEST_CASE(health_scales_weight) {
  // k1: one success, one failure -> success rate 0.5, health 0.5.
  FakeClock clock;
  TestPool t(2, testing::MakeConfig(Strategy::kRoundRobin, 60, 1000), clock, Capacities{1, 8, 64});
  Prepare(t, {Success(0.0), Success(0.0)}, {Success(0.0), Failure()});
  CheckProportional(Picks(*t.pool, 3000, Cancelled()), {1.0, 0.5});

  // Latency: health = rate / (1 + ema). k1 at 1 s (rate 1) -> 0.5.
  TestPool u(2, testing::MakeConfig(Strategy::kRoundRobin), clock, Capacities{1, 8, 64});
  Prepare(u, {Success(0.0)}, {Success(1.0)});
  CheckProportional(Picks(*u.pool, 3000, Cancelled()), {1.0, 0.5});
}

BOOST_AUTO_TEST_CASE(no_starvation) {
  FakeClock clock;
  TestPool t(2, testing::MakeConfig(Strategy::kWeighted), clock, Capacities{1, 8, 64}, 0, {1000, 1});
  CheckProportional(Picks(*t.pool, 10010, Cancelled()), {1000, 1});

  // A key whose every request failed keeps a minimal share (health floor
  // 0.05) instead of starving.
  TestPool u(2, testing::MakeConfig(Strategy::kRoundRobin, 60, 1000000), clock, Capacities{1, 8, 64});
  Prepare(u, {Success(0.0)}, {Failure()});
  CheckProportional(Picks(*u.pool, 2100, Cancelled()), {1.0, 0.05});
}

BOOST_AUTO_TEST_CASE(key_returning_from_cooldown_does_not_monopolise) {
  FakeClock clock;
  TestPool t(2, testing::MakeConfig(Strategy::kWeighted), clock, Capacities{1, 8, 64});
  LeaseHandle a = Take(*t.pool), b = Take(*t.pool);
  Give(*t.pool, a, Cancelled());
  Give(*t.pool, b, RateLimited(5.0));  // k1 cools
  std::vector<uint32_t> p1 = Picks(*t.pool, 50, Cancelled());
  BOOST_CHECK(std::all_of(p1.begin(), p1.end(), [](uint32_t s) { return s == 0; }));
  clock.Advance(5 * kSec);
  // k1 re-enters at the current virtual time: alternation, not 50 k1 in a row.
  std::vector<uint32_t> p2 = Picks(*t.pool, 10, Cancelled());
  BOOST_CHECK_EQUAL(std::count(p2.begin(), p2.end(), 1u), 5);
}

BOOST_AUTO_TEST_SUITE_END()

// ===========================================================================
BOOST_AUTO_TEST_SUITE(cooldown_and_exhaustion)

BOOST_AUTO_TEST_CASE(rate_limit_cools_until_exact_deadline) {
  FakeClock clock;
  TestPool t(1, testing::MakeConfig(Strategy::kLeastBusy, /*default_cooldown=*/60), clock);
  const uint64_t t0 = clock.NowNanos();
  Give(*t.pool, Take(*t.pool), RateLimited(10.0));
  PoolStatus s = t.Snap();
  BOOST_CHECK(s.keys[0].state == KeyState::kCooling);
  BOOST_CHECK_EQUAL(s.keys[0].cooldown_remaining, 10.0);
  uint64_t earliest = 0;
  Result<LeaseHandle> r = t.pool->TryAcquire(nullptr, &earliest);
  BOOST_CHECK(r.status().code() == Code::kNoAvailableKey);
  BOOST_CHECK_EQUAL(earliest, t0 + 10 * kSec);
  BOOST_CHECK_EQUAL(t.pool->AvailableCount(), 0u);
  clock.Advance(10 * kSec - 1);
  BOOST_CHECK(t.pool->TryAcquire().status().code() == Code::kNoAvailableKey);
  clock.Advance(1);
  BOOST_CHECK_EQUAL(t.pool->AvailableCount(), 1u);
  LeaseHandle h = Take(*t.pool);
  // Default cooldown when none is given.
  Give(*t.pool, h, Success());
  Give(*t.pool, Take(*t.pool), RateLimited());
  BOOST_CHECK_EQUAL(t.Snap().keys[0].cooldown_remaining, 60.0);
  BOOST_CHECK(t.pool->TryAcquire().status().code() == Code::kNoAvailableKey);
  PoolStatus s2 = t.Snap();
  BOOST_CHECK_EQUAL(s2.totals.no_key_available, 3u);
  BOOST_CHECK_EQUAL(s2.keys[0].rate_limited, 2u);
}

BOOST_AUTO_TEST_CASE(deadline_never_shortens) {
  FakeClock clock;
  TestPool t(1, testing::MakeConfig(Strategy::kLeastBusy), clock);
  LeaseHandle a = Take(*t.pool), b = Take(*t.pool), c = Take(*t.pool);
  Give(*t.pool, a, RateLimited(100.0));
  Give(*t.pool, b, Success());         // ends the 429 streak: no escalation next
  Give(*t.pool, c, RateLimited(5.0));  // would end earlier: ignored
  PoolStatus s = t.Snap();
  BOOST_CHECK_EQUAL(s.keys[0].cooldown_remaining, 100.0);
  BOOST_CHECK_EQUAL(s.keys[0].rate_limited, 2u);
  clock.Advance(99 * kSec);
  BOOST_CHECK(t.pool->TryAcquire().status().code() == Code::kNoAvailableKey);
  clock.Advance(1 * kSec);
  Give(*t.pool, Take(*t.pool));
}

BOOST_AUTO_TEST_CASE(consecutive_429s_escalate_capped_and_reset_by_success) {
  FakeClock clock;
  TestPool t(1, testing::MakeConfig(Strategy::kLeastBusy, 60, 10, /*max_cooldown=*/60), clock);
  auto rate_limit = [&](double s) {
    Give(*t.pool, Take(*t.pool), RateLimited(s));
    const double remaining = t.Snap().keys[0].cooldown_remaining;
    clock.Advance(SecondsToNanos(remaining));
    return remaining;
  };
  BOOST_CHECK_EQUAL(rate_limit(10), 10.0);
  BOOST_CHECK_EQUAL(rate_limit(10), 20.0);  // max(S, 2 x prev)
  BOOST_CHECK_EQUAL(rate_limit(10), 40.0);
  BOOST_CHECK_EQUAL(rate_limit(10), 60.0);  // capped by max_cooldown
  BOOST_CHECK_EQUAL(rate_limit(10), 60.0);
  BOOST_CHECK_EQUAL(t.Snap().keys[0].rate_limit_streak, 5u);
  Give(*t.pool, Take(*t.pool), Success());  // a success ends the streak
  BOOST_CHECK_EQUAL(t.Snap().keys[0].rate_limit_streak, 0u);
  BOOST_CHECK_EQUAL(rate_limit(10), 10.0);
  BOOST_CHECK_EQUAL(rate_limit(15), 20.0);
  BOOST_CHECK_EQUAL(rate_limit(50), 50.0);  // S larger than 2 x prev wins
  // A failure is not a success: the streak goes on.
  Give(*t.pool, Take(*t.pool), Failure());
  BOOST_CHECK_EQUAL(rate_limit(1), 60.0);
}

BOOST_AUTO_TEST_CASE(rate_limit_keeps_failure_history) {
  FakeClock clock;
  TestPool t(1, testing::MakeConfig(Strategy::kLeastBusy, 60, /*max_failures=*/3), clock);
  Give(*t.pool, Take(*t.pool), Failure());
  Give(*t.pool, Take(*t.pool), Failure());
  Give(*t.pool, Take(*t.pool), RateLimited(1.0));
  PoolStatus s = t.Snap();
  BOOST_CHECK_EQUAL(s.keys[0].fail_streak, 2u);
  BOOST_CHECK_EQUAL(s.keys[0].failures, 2u);
  clock.Advance(1 * kSec);
  Status st = t.pool->Release(Take(*t.pool), Failure());
  BOOST_CHECK(st.code() == Code::kKeyExhausted);  // the third consecutive failure
}

BOOST_AUTO_TEST_CASE(failure_streak_reset_by_success_and_exhaustion_reported_once) {
  FakeClock clock;
  TestPool t(2, testing::MakeConfig(Strategy::kRoundRobin, 60, /*max_failures=*/3), clock, Capacities{1, 8, 64});
  auto on_k0 = [&](const Outcome& o) {
    LeaseHandle h = Take(*t.pool);
    BOOST_REQUIRE_EQUAL(h.slot, 0u);
    Status st = t.pool->Release(h, o);
    Give(*t.pool, Take(*t.pool));  // k1, keeps the rotation on k0 next
    return st;
  };
  BOOST_CHECK(on_k0(Failure()).ok());
  BOOST_CHECK(on_k0(Failure()).ok());
  BOOST_CHECK(on_k0(Success()).ok());  // resets the streak
  BOOST_CHECK_EQUAL(t.Snap().keys[0].fail_streak, 0u);
  BOOST_CHECK(on_k0(Failure()).ok());
  BOOST_CHECK(on_k0(Failure()).ok());
  BOOST_CHECK_EQUAL(t.Snap().keys[0].failures, 4u);
  // Two leases on k0 before the streak reaches 3.
  LeaseHandle x = Take(*t.pool);
  LeaseHandle y1 = Take(*t.pool);
  LeaseHandle y = Take(*t.pool);
  BOOST_REQUIRE_EQUAL(x.slot, 0u);
  BOOST_REQUIRE_EQUAL(y1.slot, 1u);
  BOOST_REQUIRE_EQUAL(y.slot, 0u);
  Status first = t.pool->Release(x, Failure());
  BOOST_CHECK(first.code() == Code::kKeyExhausted);
  BOOST_CHECK_MESSAGE(first.message().find("k0") != std::string::npos, first.message());
  Status second = t.pool->Release(y, Failure());  // still exhausted: not reported again
  BOOST_CHECK(second.ok());
  Give(*t.pool, y1);
  PoolStatus s = t.Snap();
  BOOST_CHECK(s.keys[0].state == KeyState::kExhausted);
  BOOST_CHECK_EQUAL(s.keys[0].fail_streak, 4u);
  BOOST_CHECK_EQUAL(s.keys[0].in_flight, 0u);
  // Out of rotation until reset.
  BOOST_CHECK(Picks(*t.pool, 3) == V({1, 1, 1}));
  BOOST_REQUIRE(t.pool->ResetKey("k0").ok());
  s = t.Snap();
  BOOST_CHECK(s.keys[0].state == KeyState::kAvailable);
  BOOST_CHECK_EQUAL(s.keys[0].fail_streak, 0u);
  BOOST_CHECK_EQUAL(s.keys[0].failures, 6u);  // history kept
  BOOST_CHECK(Picks(*t.pool, 2) == V({0, 1}));
}

BOOST_AUTO_TEST_CASE(release_not_held_is_an_error) {
  FakeClock clock;
  TestPool t(2, testing::MakeConfig(Strategy::kLeastBusy), clock);
  LeaseHandle h = Take(*t.pool);
  BOOST_REQUIRE(t.pool->Release(h, Success()).ok());
  Status twice = t.pool->Release(h, Success());
  BOOST_CHECK(twice.code() == Code::kNotHeld);
  // A handle to a lease record reused by someone else (seq differs).
  LeaseHandle again = Take(*t.pool);
  BOOST_CHECK_EQUAL(again.lease, h.lease);
  BOOST_CHECK(t.pool->Release(h, Failure()).code() == Code::kNotHeld);
  // Another process's identity.
  ProcessId other = Self();
  other.start_time += 1;
  BOOST_CHECK(t.pool->Release(again, Success(), other).code() == Code::kNotHeld);
  // Out of range and never-issued handles.
  LeaseHandle bogus;
  BOOST_CHECK(t.pool->Release(bogus, Success()).code() == Code::kNotHeld);
  LeaseHandle never{1, 7, 0, 0, 0};
  BOOST_CHECK(t.pool->Release(never, Success()).code() == Code::kNotHeld);
  // None of that touched the counters or the held lease.
  PoolStatus s = t.Snap();
  BOOST_CHECK_EQUAL(s.totals.releases, 1u);
  BOOST_CHECK_EQUAL(s.totals.failures, 0u);
  BOOST_CHECK_EQUAL(t.Key(s, KeyName(again.slot)).in_flight, 1u);
  Give(*t.pool, again);
  RequireConsistent(*t.pool);
}

BOOST_AUTO_TEST_SUITE_END()

// ===========================================================================
BOOST_AUTO_TEST_SUITE(ema)

BOOST_AUTO_TEST_CASE(first_sample_seeds_then_alpha_0_2) {
  FakeClock clock;
  TestPool t(1, testing::MakeConfig(Strategy::kLeastBusy), clock);
  Give(*t.pool, Take(*t.pool), Success());  // no latency: unchanged
  PoolStatus s = t.Snap();
  BOOST_CHECK(!s.keys[0].has_latency);
  BOOST_CHECK_EQUAL(s.keys[0].latency_avg, 0.0);
  Give(*t.pool, Take(*t.pool), Success(0.5));  // seeds
  s = t.Snap();
  BOOST_CHECK(s.keys[0].has_latency);
  BOOST_CHECK_CLOSE(s.keys[0].latency_avg, 0.5, 1e-9);
  Give(*t.pool, Take(*t.pool), Success());  // unchanged
  BOOST_CHECK_CLOSE(t.Snap().keys[0].latency_avg, 0.5, 1e-9);
  Give(*t.pool, Take(*t.pool), Success(1.0));
  BOOST_CHECK_CLOSE(t.Snap().keys[0].latency_avg, 0.6, 1e-9);
  Give(*t.pool, Take(*t.pool), Success(0.1));  // 0.2*0.1 + 0.8*0.6
  BOOST_CHECK_CLOSE(t.Snap().keys[0].latency_avg, 0.5, 1e-9);
  // Failures, 429s and cancellations carry no latency sample.
  Give(*t.pool, Take(*t.pool), Failure());
  Give(*t.pool, Take(*t.pool), Cancelled());
  BOOST_CHECK_CLOSE(t.Snap().keys[0].latency_avg, 0.5, 1e-9);
  // Invalid samples are ignored.
  Give(*t.pool, Take(*t.pool), Success(-1.0));
  Give(*t.pool, Take(*t.pool), Success(std::nan("")));
  BOOST_CHECK_CLOSE(t.Snap().keys[0].latency_avg, 0.5, 1e-9);
}

BOOST_AUTO_TEST_SUITE_END()

// ===========================================================================
BOOST_AUTO_TEST_SUITE(capacity)

BOOST_AUTO_TEST_CASE(keys_leases_pools) {
  FakeClock clock;
  PoolConfig config = testing::MakeConfig(Strategy::kLeastBusy);
  config.max_leases_per_process = 3;  // the table, not the per-process quota, is what runs out here
  TestPool t(2, config, clock, Capacities{2, 2, 3});
  KeyDefinition def;
  def.name = "k2";
  Result<AddKeyResult> r = t.pool->AddKey(def);
  BOOST_REQUIRE(!r.ok());
  BOOST_CHECK(r.status().code() == Code::kCapacityExceeded);
  BOOST_CHECK_MESSAGE(r.status().message().find("at most 2 keys") != std::string::npos, r.status().message());

  std::vector<LeaseHandle> held;
  for (int i = 0; i < 3; ++i) held.push_back(Take(*t.pool));
  Result<LeaseHandle> l = t.pool->TryAcquire();
  BOOST_CHECK(l.status().code() == Code::kCapacityExceeded);
  BOOST_CHECK_MESSAGE(l.status().message().find("at most 3 leases") != std::string::npos, l.status().message());
  // A blocking acquire waits for a release like for a key, and gives up
  // with the capacity error (the waits themselves: limits_hostile_test).
  BOOST_CHECK(t.pool->Acquire(kSec / 50).status().code() == Code::kCapacityExceeded);
  for (const LeaseHandle& h : held) Give(*t.pool, h);

  BOOST_REQUIRE(t.segment->CreatePool("q", 0, testing::MakeConfig(Strategy::kRoundRobin)).ok());
  Result<uint32_t> p = t.segment->CreatePool("r", 0, testing::MakeConfig(Strategy::kRoundRobin));
  BOOST_CHECK(p.status().code() == Code::kCapacityExceeded);
  BOOST_CHECK_MESSAGE(p.status().message().find("at most 2 pools") != std::string::npos, p.status().message());
  BOOST_CHECK(t.segment->CreatePool("q", 0, testing::MakeConfig(Strategy::kRoundRobin)).status().code() ==
              Code::kAlreadyExists);
  RequireConsistent(*t.pool);
}

BOOST_AUTO_TEST_CASE(invalid_capacities_and_names) {
  for (Capacities caps :
       {Capacities{0, 8, 8}, Capacities{1, 0, 8}, Capacities{1, 8, 0}, Capacities{kMaxPoolsLimit + 1, 8, 8},
        Capacities{1, kMaxKeysPerPoolLimit + 1, 8}, Capacities{1, 8, kMaxLeasesPerPoolLimit + 1}}) {
    Result<std::unique_ptr<Segment>> s = Segment::CreateAnonymous(caps);
    BOOST_REQUIRE(!s.ok());
    BOOST_CHECK(s.status().code() == Code::kInvalidArgument);
    BOOST_CHECK_MESSAGE(s.status().message().find("capacity") != std::string::npos, s.status().message());
  }
  FakeClock clock;
  TestPool t(1, testing::MakeConfig(Strategy::kLeastBusy), clock);
  KeyDefinition def;
  def.name = "has space";
  BOOST_CHECK(t.pool->AddKey(def).status().code() == Code::kInvalidArgument);
  def.name = "";
  BOOST_CHECK(t.pool->AddKey(def).status().code() == Code::kInvalidArgument);
  std::string longname(kNameCapacity, 'x');
  def.name = longname;
  BOOST_CHECK(t.pool->AddKey(def).status().code() == Code::kInvalidArgument);
  def.name = "ok";
  def.weight = 0;
  BOOST_CHECK(t.pool->AddKey(def).status().code() == Code::kInvalidArgument);
}

BOOST_AUTO_TEST_SUITE_END()

// ===========================================================================
BOOST_AUTO_TEST_SUITE(header)

BOOST_AUTO_TEST_CASE(open_validates_magic_and_version) {
  const std::string name = testing::UniqueSegmentName("hdr");
  testing::SegmentNameGuard guard(name);
  std::unique_ptr<Segment> seg = Must(Segment::CreateNamed(name, Capacities{2, 8, 16}), "CreateNamed");
  BOOST_REQUIRE(seg->CreatePool("p", 0, testing::MakeConfig(Strategy::kRoundRobin)).ok());
  BOOST_CHECK(Segment::Exists(name));
  BOOST_CHECK(Segment::CreateNamed(name, Capacities{2, 8, 16}).status().code() == Code::kAlreadyExists);
  {
    Result<std::unique_ptr<Segment>> ok = Segment::Open(name);
    BOOST_REQUIRE_MESSAGE(ok.ok(), ok.status().ToString());
    BOOST_CHECK((*ok)->FindPool("p").has_value());
    BOOST_CHECK_EQUAL((*ok)->capacities().keys_per_pool, 8u);
  }
  SegmentHeader* h = seg->header();
  h->magic ^= 1;
  Result<std::unique_ptr<Segment>> bad = Segment::Open(name);
  BOOST_REQUIRE(!bad.ok());
  BOOST_CHECK(bad.status().code() == Code::kLayoutMismatch);
  BOOST_CHECK_MESSAGE(bad.status().message().find("magic") != std::string::npos, bad.status().message());
  h->magic ^= 1;

  h->layout_version = kLayoutVersion + 1;
  bad = Segment::Open(name);
  BOOST_REQUIRE(!bad.ok());
  BOOST_CHECK(bad.status().code() == Code::kLayoutMismatch);
  const std::string want = "layout version " + std::to_string(kLayoutVersion + 1);
  BOOST_CHECK_MESSAGE(bad.status().message().find(want) != std::string::npos, bad.status().message());
  // The client's attach path refuses it the same way.
  Result<std::unique_ptr<Pool>> attached = Pool::AttachSegment(name, "p", nullptr);
  BOOST_CHECK(attached.status().code() == Code::kLayoutMismatch);
  h->layout_version = kLayoutVersion;

  h->keys_offset += 64;  // a shape this library would not lay out
  BOOST_CHECK(Segment::Open(name).status().code() == Code::kLayoutMismatch);
  h->keys_offset -= 64;

  Result<std::unique_ptr<Pool>> good = Pool::AttachSegment(name, "p", nullptr);
  BOOST_CHECK_MESSAGE(good.ok(), good.status().ToString());
  BOOST_CHECK(Pool::AttachSegment(name, "nope", nullptr).status().code() == Code::kUnknownKey);
}

BOOST_AUTO_TEST_CASE(open_missing_and_bad_names) {
  const std::string name = testing::UniqueSegmentName("missing");
  BOOST_CHECK(!Segment::Exists(name));
  Result<std::unique_ptr<Segment>> r = Segment::Open(name);
  BOOST_REQUIRE(!r.ok());
  BOOST_CHECK(r.status().code() == Code::kSegmentError);
  BOOST_CHECK_MESSAGE(r.status().message().find(name) != std::string::npos, r.status().message());
  BOOST_CHECK(Segment::Open("notkeymesh").status().code() == Code::kInvalidArgument);
  BOOST_CHECK(Segment::CreateNamed("keymesh/x", Capacities{}).status().code() == Code::kInvalidArgument);
}

BOOST_AUTO_TEST_SUITE_END()

// ===========================================================================
BOOST_AUTO_TEST_SUITE(admin)

BOOST_AUTO_TEST_CASE(remove_key_while_leased) {
  FakeClock clock;
  TestPool t(3, testing::MakeConfig(Strategy::kRoundRobin), clock, Capacities{1, 8, 64});
  Give(*t.pool, Take(*t.pool), Success(0.1));  // k0: one success
  LeaseHandle h = Take(*t.pool);               // k1
  LeaseHandle h0 = Take(*t.pool);              // k2
  Give(*t.pool, h0);
  BOOST_REQUIRE_EQUAL(h.slot, 1u);
  LeaseHandle k0 = Take(*t.pool);
  BOOST_REQUIRE_EQUAL(k0.slot, 0u);
  BOOST_REQUIRE(t.pool->RemoveKey("k0").ok());
  BOOST_REQUIRE(t.pool->RemoveKey("k0").ok());  // idempotent while removing
  PoolStatus s = t.Snap();
  BOOST_CHECK(t.Key(s, "k0").state == KeyState::kRemoving);
  BOOST_CHECK_EQUAL(t.Key(s, "k0").in_flight, 1u);
  // Left rotation at once.
  std::vector<uint32_t> picks = Picks(*t.pool, 6);
  BOOST_CHECK(std::find(picks.begin(), picks.end(), 0u) == picks.end());
  BOOST_CHECK(t.pool->FindByName("k0").has_value());
  // Last lease ends: the slot is freed, totals retained.
  Give(*t.pool, k0, Success());
  BOOST_CHECK(!t.pool->FindByName("k0").has_value());
  s = t.Snap();
  BOOST_CHECK_EQUAL(s.keys.size(), 2u);
  BOOST_CHECK_EQUAL(s.totals.acquires, 10u);
  BOOST_CHECK_EQUAL(s.totals.releases, 9u);
  BOOST_CHECK_EQUAL(t.pool->header()->key_count, 2u);
  Give(*t.pool, h);
  // The free slot is reused by a new key, which starts from zero.
  KeyDefinition def;
  def.name = "k9";
  Result<AddKeyResult> added = t.pool->AddKey(def);
  BOOST_REQUIRE(added.ok());
  BOOST_CHECK(added->created);
  BOOST_CHECK_EQUAL(added->slot, 0u);
  s = t.Snap();
  BOOST_CHECK_EQUAL(t.Key(s, "k9").acquires, 0u);
  BOOST_CHECK_EQUAL(s.totals.acquires, 10u);
  BOOST_CHECK(t.pool->RemoveKey("nope").code() == Code::kUnknownKey);
  RequireConsistent(*t.pool);
}

BOOST_AUTO_TEST_CASE(remove_idle_key_frees_at_once) {
  FakeClock clock;
  TestPool t(2, testing::MakeConfig(Strategy::kLeastBusy), clock);
  Give(*t.pool, Take(*t.pool));
  BOOST_REQUIRE(t.pool->RemoveKey("k0").ok());
  PoolStatus s = t.Snap();
  BOOST_CHECK_EQUAL(s.keys.size(), 1u);
  BOOST_CHECK_EQUAL(s.totals.acquires, 1u);
  BOOST_CHECK(Picks(*t.pool, 3) == V({1, 1, 1}));
}

BOOST_AUTO_TEST_CASE(add_key_readmits_and_keeps_counters) {
  FakeClock clock;
  TestPool t(1, testing::MakeConfig(Strategy::kLeastBusy, 60, /*max_failures=*/2), clock);
  Give(*t.pool, Take(*t.pool), Success(0.3));
  Give(*t.pool, Take(*t.pool), Failure());
  BOOST_CHECK(t.pool->Release(Take(*t.pool), Failure()).code() == Code::kKeyExhausted);
  BOOST_CHECK(t.pool->TryAcquire().status().code() == Code::kNoAvailableKey);
  KeyDefinition def;
  def.name = "k0";
  def.fingerprint = 77;
  def.weight = 3;
  Result<AddKeyResult> r = t.pool->AddKey(def);
  BOOST_REQUIRE(r.ok());
  BOOST_CHECK(!r->created);
  BOOST_CHECK_EQUAL(r->slot, 0u);
  PoolStatus s = t.Snap();
  const KeyStatus& k = s.keys[0];
  BOOST_CHECK(k.state == KeyState::kAvailable);
  BOOST_CHECK_EQUAL(k.fail_streak, 0u);
  BOOST_CHECK_EQUAL(k.acquires, 3u);
  BOOST_CHECK_EQUAL(k.successes, 1u);
  BOOST_CHECK_EQUAL(k.failures, 2u);
  BOOST_CHECK_CLOSE(k.latency_avg, 0.3, 1e-9);
  BOOST_CHECK_EQUAL(k.fingerprint, 77u);
  BOOST_CHECK_EQUAL(k.weight, 3u);
  // Re-admitting a key being removed keeps its lease and counters.
  LeaseHandle h = Take(*t.pool);
  BOOST_REQUIRE(t.pool->RemoveKey("k0").ok());
  BOOST_CHECK(t.pool->AddKey(def).ok());
  s = t.Snap();
  BOOST_CHECK(s.keys[0].state == KeyState::kAvailable);
  BOOST_CHECK_EQUAL(s.keys[0].in_flight, 1u);
  Give(*t.pool, h);
  BOOST_CHECK(t.pool->FindByName("k0").has_value());  // not retired
  BOOST_CHECK_EQUAL(t.Snap().keys[0].acquires, 4u);
  RequireConsistent(*t.pool);
}

// I4: a key re-admitted while it cools must come back when its cooldown
// ends, even if a sweep ran while it was being removed.
BOOST_AUTO_TEST_CASE(readmitted_cooling_key_returns_at_its_deadline) {
  FakeClock clock;
  TestPool t(2, testing::MakeConfig(Strategy::kRoundRobin), clock);
  const uint64_t t0 = clock.NowNanos();
  LeaseHandle held = Take(*t.pool);  // k0, held through the removal
  BOOST_REQUIRE_EQUAL(held.slot, 0u);
  LeaseHandle k1 = Take(*t.pool);
  BOOST_REQUIRE_EQUAL(k1.slot, 1u);
  Give(*t.pool, k1, RateLimited(5.0));  // k1 cools until t0+5
  LeaseHandle k0 = Take(*t.pool);
  BOOST_REQUIRE_EQUAL(k0.slot, 0u);
  Give(*t.pool, k0, RateLimited(10.0));  // k0 cools until t0+10
  BOOST_REQUIRE(t.pool->RemoveKey("k0").ok());
  clock.Advance(6 * kSec);  // k1's cooldown ends: the next acquire sweeps
  Give(*t.pool, Take(*t.pool));
  KeyDefinition def;
  def.name = "k0";
  BOOST_REQUIRE(t.pool->AddKey(def).ok());  // re-admitted, still cooling
  BOOST_CHECK(t.Snap().keys[0].state == KeyState::kCooling);
  BOOST_CHECK_EQUAL(t.pool->NextDeadline(), t0 + 10 * kSec);
  clock.Advance(4 * kSec);
  BOOST_CHECK_EQUAL(t.pool->AvailableCount(), 2u);
  std::vector<uint32_t> picks = Picks(*t.pool, 4);
  BOOST_CHECK_EQUAL(std::count(picks.begin(), picks.end(), 0u), 2);
  Give(*t.pool, held);
  RequireConsistent(*t.pool);
}

BOOST_AUTO_TEST_CASE(enable_disable_reset) {
  FakeClock clock;
  TestPool t(2, testing::MakeConfig(Strategy::kRoundRobin), clock);
  BOOST_REQUIRE(t.pool->SetEnabled("k1", false).ok());
  BOOST_CHECK(t.Snap().keys[1].state == KeyState::kDisabled);
  BOOST_CHECK(Picks(*t.pool, 3) == V({0, 0, 0}));
  BOOST_CHECK_EQUAL(t.pool->AvailableCount(), 1u);
  BOOST_REQUIRE(t.pool->SetEnabled("k0", false).ok());
  BOOST_CHECK(t.pool->TryAcquire().status().code() == Code::kNoAvailableKey);
  BOOST_REQUIRE(t.pool->SetEnabled("k1", true).ok());
  BOOST_REQUIRE(t.pool->SetEnabled("k0", true).ok());
  BOOST_CHECK_EQUAL(t.pool->AvailableCount(), 2u);
  // Reset clears a cooldown and the streaks.
  LeaseHandle h = Take(*t.pool);
  Give(*t.pool, h, RateLimited(30.0));
  BOOST_CHECK(t.Snap().keys[h.slot].state == KeyState::kCooling);
  BOOST_REQUIRE(t.pool->ResetKey(KeyName(h.slot)).ok());
  PoolStatus s = t.Snap();
  BOOST_CHECK(s.keys[h.slot].state == KeyState::kAvailable);
  BOOST_CHECK_EQUAL(s.keys[h.slot].cooldown_remaining, 0.0);
  BOOST_CHECK_EQUAL(s.keys[h.slot].rate_limit_streak, 0u);
  BOOST_CHECK_EQUAL(s.keys[h.slot].rate_limited, 1u);
  // The next 429 on that key is not escalated: the reset ended its streak.
  LeaseHandle other = Take(*t.pool);
  LeaseHandle again = Take(*t.pool);
  BOOST_REQUIRE_NE(other.slot, h.slot);
  BOOST_REQUIRE_EQUAL(again.slot, h.slot);
  Give(*t.pool, other);
  Give(*t.pool, again, RateLimited(5.0));
  BOOST_CHECK_EQUAL(t.Snap().keys[h.slot].cooldown_remaining, 5.0);
  for (auto op : {0, 1, 2}) {
    Status st = op == 0 ? t.pool->SetEnabled("zz", true) : op == 1 ? t.pool->ResetKey("zz") : t.pool->RemoveKey("zz");
    BOOST_CHECK(st.code() == Code::kUnknownKey);
  }
}

BOOST_AUTO_TEST_CASE(set_strategy_rebuilds_the_index) {
  FakeClock clock;
  TestPool t(3, testing::MakeConfig(Strategy::kRoundRobin), clock, Capacities{1, 8, 64}, 0, {1, 1, 4});
  LeaseHandle held = Take(*t.pool);  // k0 held across the switches
  BOOST_REQUIRE(t.pool->SetStrategy(Strategy::kLeastBusy).ok());
  BOOST_CHECK(Picks(*t.pool, 4) == V({1, 2, 1, 2}));
  BOOST_REQUIRE(t.pool->SetStrategy(Strategy::kWeighted).ok());
  std::vector<uint32_t> p = Picks(*t.pool, 600, Cancelled());
  BOOST_CHECK_GT(std::count(p.begin(), p.end(), 2u), 300);
  Give(*t.pool, held);
  RequireConsistent(*t.pool);
}

BOOST_AUTO_TEST_SUITE_END()

// ===========================================================================
BOOST_AUTO_TEST_SUITE(reclaim)

BOOST_AUTO_TEST_CASE(reclaim_process_frees_only_that_holder) {
  FakeClock clock;
  TestPool t(2, testing::MakeConfig(Strategy::kLeastBusy), clock);
  std::vector<LeaseHandle> held;
  for (int i = 0; i < 5; ++i) held.push_back(Take(*t.pool));
  ProcessId nobody{1, 12345};
  BOOST_CHECK_EQUAL(Must(t.pool->ReclaimProcess(nobody), "ReclaimProcess"), 0u);
  ProcessId same_pid_other_start = Self();
  same_pid_other_start.start_time += 1;  // a recycled pid is someone else
  BOOST_CHECK_EQUAL(Must(t.pool->ReclaimProcess(same_pid_other_start), "ReclaimProcess"), 0u);
  BOOST_CHECK_EQUAL(t.Snap().keys[0].in_flight + t.Snap().keys[1].in_flight, 5u);
  BOOST_CHECK_EQUAL(Must(t.pool->ReclaimProcess(Self()), "ReclaimProcess"), 5u);
  PoolStatus s = t.Snap();
  BOOST_CHECK_EQUAL(s.keys[0].in_flight + s.keys[1].in_flight, 0u);
  BOOST_CHECK_EQUAL(s.keys[0].reclaimed, 3u);
  BOOST_CHECK_EQUAL(s.keys[1].reclaimed, 2u);
  BOOST_CHECK_EQUAL(s.totals.reclaimed, 5u);
  BOOST_CHECK_EQUAL(s.totals.releases, 0u);
  for (const LeaseHandle& h : held) BOOST_CHECK(t.pool->Release(h, Success()).code() == Code::kNotHeld);
  // ReclaimDead keeps the leases of a live process (this one).
  LeaseHandle mine = Take(*t.pool);
  BOOST_CHECK_EQUAL(Must(t.pool->ReclaimDead(), "ReclaimDead"), 0u);
  Give(*t.pool, mine);
  RequireConsistent(*t.pool);
}

BOOST_AUTO_TEST_CASE(reclaim_expired_on_fake_clock) {
  FakeClock clock;
  TestPool t(2, testing::MakeConfig(Strategy::kLeastBusy, 60, 10, 600, /*max_lease=*/10), clock);
  LeaseHandle old_lease = Take(*t.pool);
  clock.Advance(6 * kSec);
  LeaseHandle young = Take(*t.pool);
  clock.Advance(4 * kSec);  // old: exactly max_lease, not beyond
  BOOST_CHECK_EQUAL(Must(t.pool->ReclaimExpired(), "ReclaimExpired"), 0u);
  clock.Advance(1);
  BOOST_CHECK_EQUAL(Must(t.pool->ReclaimExpired(), "ReclaimExpired"), 1u);
  BOOST_CHECK(t.pool->Release(old_lease, Success()).code() == Code::kNotHeld);
  PoolStatus s = t.Snap();
  BOOST_CHECK_EQUAL(s.keys[old_lease.slot].reclaimed, 1u);
  BOOST_CHECK_EQUAL(s.keys[old_lease.slot].in_flight, 0u);
  BOOST_CHECK_EQUAL(s.keys[young.slot].in_flight, 1u);
  Give(*t.pool, young);
  // max_lease 0 disables it.
  FakeClock clock2;
  TestPool u(1, testing::MakeConfig(Strategy::kLeastBusy, 60, 10, 600, /*max_lease=*/0), clock2);
  LeaseHandle h = Take(*u.pool);
  clock2.Advance(1000000 * kSec);
  BOOST_CHECK_EQUAL(Must(u.pool->ReclaimExpired(), "ReclaimExpired"), 0u);
  Give(*u.pool, h);
  RequireConsistent(*t.pool);
}

BOOST_AUTO_TEST_SUITE_END()

}  // namespace keymesh::shm
