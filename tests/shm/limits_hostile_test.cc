// Bad values are refused or capped, never stored (security review KM-08,
// KM-10, KM-11): token counts beyond a key's minute, reservations that
// outlive their lease, cooldowns and provider waits of decades, one process
// taking the whole lease table. Single-process cases run on a FakeClock;
// holders that must be other processes are real forked children.
#define BOOST_TEST_MODULE limits_hostile_test
#include <time.h>
#include <unistd.h>

#include <cstdint>
#include <string>
#include <vector>

#include <boost/test/unit_test.hpp>

#include "keymesh/rate_limit_headers.h"
#include "shm/pool.h"
#include "shm/rate_budget.h"
#include "support/shm_fixtures.h"

namespace shm = keymesh::shm;
using keymesh::Code;
using keymesh::KeyState;
using keymesh::Result;
using keymesh::Strategy;
using shm::testing::Cancelled;
using shm::testing::ChildGuard;
using shm::testing::ForkChild;
using shm::testing::MakeConfig;
using shm::testing::Must;
using shm::testing::Pipe;
using shm::testing::RateLimited;
using shm::testing::Success;
using shm::testing::TestPool;

namespace {

constexpr uint64_t kSec = shm::kNanosPerSecond;
constexpr uint64_t kTpm = 60000;  // 1000 tokens a second

// A pool of one key "t" with `tpm` (no margin, so budgets are round numbers).
struct TokenPool {
  shm::FakeClock clock;
  TestPool tp;
  explicit TokenPool(uint64_t tpm = kTpm) : tp(0, Config(), clock) {
    shm::KeyDefinition def;
    def.name = "t";
    def.fingerprint = 7;
    def.tpm = tpm;
    def.margin_ppm = 0;
    Must(tp.pool->AddKey(def), "AddKey");
  }
  static shm::PoolConfig Config() {
    shm::PoolConfig c = MakeConfig(Strategy::kLeastBusy);
    c.margin_ppm = 0;
    return c;
  }
  const keymesh::KeyStatus Key() { return tp.Key(tp.Snap(), "t"); }
};

shm::ProcessId Foreign(uint32_t pid) { return shm::ProcessId{pid, 12345}; }

}  // namespace

// ---------------------------------------------------------------------------
// KM-08: token budgets

BOOST_AUTO_TEST_CASE(an_acquire_of_more_tokens_than_the_minute_is_refused_and_changes_nothing) {
  TokenPool p;
  const int64_t before = p.Key().tokens_available;
  Result<shm::LeaseHandle> r = p.tp.pool->TryAcquire(nullptr, nullptr, shm::Self(), UINT64_MAX);
  BOOST_REQUIRE(!r.ok());
  BOOST_CHECK(r.status().code() == Code::kInvalidArgument);
  BOOST_CHECK_MESSAGE(r.status().message().find("tpm 60000") != std::string::npos, r.status().message());
  r = p.tp.pool->TryAcquire(nullptr, nullptr, shm::Self(), kTpm + 1);
  BOOST_CHECK(!r.ok() && r.status().code() == Code::kInvalidArgument);
  const keymesh::KeyStatus k = p.Key();
  BOOST_CHECK(k.state == KeyState::kAvailable);
  BOOST_CHECK_EQUAL(k.in_flight, 0u);
  BOOST_CHECK_EQUAL(k.tokens_available, before);
  BOOST_CHECK(p.tp.pool->CheckConsistency().ok());
  // The whole minute is allowed, and a blocking acquire refuses the same way.
  BOOST_CHECK(!p.tp.pool->Acquire(kSec, nullptr, shm::Self(), nullptr, UINT64_MAX).ok());
  shm::LeaseHandle h = Must(p.tp.pool->TryAcquire(nullptr, nullptr, shm::Self(), kTpm), "TryAcquire");
  BOOST_CHECK(p.tp.pool->Release(h, Success()).ok());
}

BOOST_AUTO_TEST_CASE(a_huge_reported_count_throttles_a_key_for_at_most_a_minute) {
  TokenPool p;
  shm::LeaseHandle h = Must(p.tp.pool->TryAcquire(nullptr, nullptr, shm::Self(), 10), "TryAcquire");
  BOOST_CHECK(p.tp.pool->Release(h, Success(std::nullopt, UINT64_MAX)).ok());
  const keymesh::KeyStatus k = p.Key();
  BOOST_CHECK(k.state == KeyState::kThrottled);
  BOOST_CHECK_GT(k.ready_in, 0.0);
  BOOST_CHECK_LE(k.ready_in, 60.0);  // one minute's budget, less the second of tolerance
  p.clock.AdvanceSeconds(60.0);
  BOOST_CHECK(p.Key().state == KeyState::kAvailable);
}

BOOST_AUTO_TEST_CASE(token_arithmetic_saturates_for_any_input) {
  shm::KeyConfig c{};
  c.tpm = kTpm;
  const shm::TokenPacing tp = shm::TokenPacingOf(c, 0);
  const uint64_t now = 1000 * kSec;
  BOOST_CHECK_EQUAL(shm::AfterTokens(0, tp, now, UINT64_MAX), now + 60 * kSec);
  BOOST_CHECK_EQUAL(shm::AfterTokens(shm::kNever - 5, tp, now, UINT64_MAX), shm::kNever);
  BOOST_CHECK_EQUAL(shm::CorrectTokens(now, tp, now, UINT64_MAX, 0), now - 60 * kSec);
  BOOST_CHECK_EQUAL(shm::CorrectTokens(now, tp, now, 0, UINT64_MAX), now + 60 * kSec);
  // A config another process wrote into the segment: margins far beyond
  // 0.5, a burst of 2^32 - 1, the largest tpm.
  shm::KeyConfig hostile{};
  hostile.rpm = UINT32_MAX;
  hostile.tpm = UINT64_MAX;
  hostile.burst = UINT32_MAX;
  const shm::RequestPacing rp = shm::RequestPacingOf(hostile, UINT32_MAX);
  BOOST_CHECK_GT(rp.interval, 0u);
  const shm::TokenPacing htp = shm::TokenPacingOf(hostile, UINT32_MAX);
  BOOST_CHECK_LE(htp.minute_ns, 120 * kSec);
  BOOST_CHECK_LE(shm::AfterTokens(0, htp, now, UINT64_MAX), now + 120 * kSec);
  shm::KeyConfig slow{};
  slow.rpm = 1;
  slow.tpm = 1;
  BOOST_CHECK_LE(shm::RequestPacingOf(slow, UINT32_MAX).interval, 120 * kSec);
  BOOST_CHECK_LE(shm::TokenPacingOf(slow, UINT32_MAX).CostOf(UINT64_MAX), 120 * kSec);
}

BOOST_AUTO_TEST_CASE(cancel_refunds_the_reservation) {
  TokenPool p;
  const int64_t full = p.Key().tokens_available;
  shm::LeaseHandle h = Must(p.tp.pool->TryAcquire(nullptr, nullptr, shm::Self(), kTpm), "TryAcquire");
  BOOST_CHECK(p.Key().state == KeyState::kThrottled);
  BOOST_CHECK(p.tp.pool->Release(h, Cancelled()).ok());
  const keymesh::KeyStatus k = p.Key();
  BOOST_CHECK(k.state == KeyState::kAvailable);
  BOOST_CHECK_EQUAL(k.tokens_available, full);
}

BOOST_AUTO_TEST_CASE(reclaim_refunds_the_reservation) {
  TokenPool p;
  const int64_t full = p.Key().tokens_available;
  const shm::ProcessId dead = Foreign(999999);
  (void)Must(p.tp.pool->TryAcquire(nullptr, nullptr, dead, kTpm), "TryAcquire");
  BOOST_CHECK(p.Key().state == KeyState::kThrottled);
  BOOST_CHECK_EQUAL(Must(p.tp.pool->ReclaimProcess(dead), "ReclaimProcess"), 1u);
  const keymesh::KeyStatus k = p.Key();
  BOOST_CHECK(k.state == KeyState::kAvailable);
  BOOST_CHECK_EQUAL(k.tokens_available, full);
  BOOST_CHECK(p.tp.pool->CheckConsistency().ok());
}

BOOST_AUTO_TEST_CASE(reset_and_readmission_restore_a_throttled_key) {
  TokenPool p;
  for (int round = 0; round < 2; ++round) {
    shm::LeaseHandle h = Must(p.tp.pool->TryAcquire(nullptr, nullptr, shm::Self(), 10), "TryAcquire");
    BOOST_CHECK(p.tp.pool->Release(h, Success(std::nullopt, kTpm)).ok());
    BOOST_CHECK(p.Key().state == KeyState::kThrottled);
    if (round == 0) {
      BOOST_CHECK(p.tp.pool->ResetKey("t").ok());
    } else {
      shm::KeyDefinition def;
      def.name = "t";
      def.fingerprint = 7;
      def.tpm = kTpm;
      def.margin_ppm = 0;
      BOOST_CHECK(!Must(p.tp.pool->AddKey(def), "AddKey").created);
    }
    const keymesh::KeyStatus k = p.Key();
    BOOST_CHECK_MESSAGE(k.state == KeyState::kAvailable, "round " << round << ": " << k.reason);
    BOOST_CHECK_EQUAL(k.ready_in, 0.0);
  }
}

// ---------------------------------------------------------------------------
// KM-11: cooldowns and provider waits are capped at max_cooldown

BOOST_AUTO_TEST_CASE(a_rate_limit_of_1e9_seconds_cools_for_at_most_max_cooldown) {
  TokenPool p;
  shm::LeaseHandle h = Must(p.tp.pool->TryAcquire(), "TryAcquire");
  BOOST_CHECK(p.tp.pool->Release(h, RateLimited(1e9)).ok());
  const keymesh::KeyStatus k = p.Key();
  BOOST_CHECK(k.state == KeyState::kCooling);
  BOOST_CHECK_GT(k.cooldown_remaining, 0.0);
  BOOST_CHECK_LE(k.cooldown_remaining, 600.0);
  // A second 429 escalates, still within the cap.
  p.clock.AdvanceSeconds(600.0);
  h = Must(p.tp.pool->TryAcquire(), "TryAcquire");
  BOOST_CHECK(p.tp.pool->Release(h, RateLimited(1e9)).ok());
  BOOST_CHECK_LE(p.Key().cooldown_remaining, 600.0);
}

BOOST_AUTO_TEST_CASE(observed_waits_are_capped_at_max_cooldown) {
  TokenPool p;
  shm::LimitUpdate u;
  u.retry_after = 1e9;
  BOOST_CHECK(p.tp.pool->ObserveLimits("t", u).ok());
  BOOST_CHECK_LE(p.Key().cooldown_remaining, 600.0);
  BOOST_CHECK_GT(p.Key().cooldown_remaining, 599.0);
  // Out of tokens until a reset decades ahead: back within max_cooldown.
  BOOST_CHECK(p.tp.pool->ResetKey("t").ok());
  shm::LimitUpdate tokens;
  tokens.remaining_tokens = 0;
  tokens.reset_tokens = 1e12;
  BOOST_CHECK(p.tp.pool->ObserveLimits("t", tokens).ok());
  BOOST_CHECK_GT(p.Key().ready_in, 0.0);
  BOOST_CHECK_LE(p.Key().ready_in, 600.0);
  shm::LimitUpdate bad;
  bad.retry_after = -1.0;
  BOOST_CHECK(p.tp.pool->ObserveLimits("t", bad).code() == Code::kInvalidArgument);
}

BOOST_AUTO_TEST_CASE(an_http_date_in_2049_is_capped) {
  const double now = 1'780'000'000.0;  // 2026
  Result<double> d = keymesh::ParseRetryAfter("Fri, 01 Jan 2049 00:00:00 GMT", now);
  BOOST_REQUIRE(d.ok());
  BOOST_CHECK_EQUAL(*d, keymesh::kMaxHeaderDelaySeconds);
  // And through a pool: the key cools for its max_cooldown, not 23 years.
  Result<keymesh::LimitObservation> obs =
      keymesh::ParseLimitHeaders({{"Retry-After", "Fri, 01 Jan 2049 00:00:00 GMT"}}, now);
  BOOST_REQUIRE(obs.ok());
  TokenPool p;
  shm::LimitUpdate u;
  u.retry_after = obs->retry_after;
  BOOST_CHECK(p.tp.pool->ObserveLimits("t", u).ok());
  BOOST_CHECK_LE(p.Key().cooldown_remaining, 600.0);
}
