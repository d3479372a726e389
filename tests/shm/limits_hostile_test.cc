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

// Waits (without sleeping: on the child's pipe) for one byte.
char Expect(Pipe& p, double timeout = 10.0) { return p.WaitByte(timeout); }

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

// ---------------------------------------------------------------------------
// KM-10: one process cannot take the whole lease table

BOOST_AUTO_TEST_CASE(a_holder_hits_its_quota_while_another_is_still_served) {
  // 8 leases: the default quota is 4 per process.
  TestPool tp(2, MakeConfig(Strategy::kLeastBusy), shm::SystemClock::Instance(), shm::Capacities{1, 8, 8});
  Pipe report;
  Pipe done;
  ChildGuard a(ForkChild([&] {
    uint32_t granted = 0;
    Code refused = Code::kOk;
    for (int i = 0; i < 8; ++i) {
      Result<shm::LeaseHandle> r = tp.pool->TryAcquire();
      if (!r.ok()) {
        refused = r.status().code();
        break;
      }
      ++granted;
    }
    // A blocking acquire over its own quota waits for one of its leases;
    // none ends, so it times out with the quota's error.
    Result<shm::LeaseHandle> blocked = tp.pool->Acquire(kSec / 20);
    const bool waited_out = !blocked.ok() && blocked.status().code() == Code::kCapacityExceeded;
    (void)report.Put(granted);
    (void)report.Put(refused);
    (void)report.Put(waited_out);
    return done.WaitByte(30.0) == 'x' ? 0 : 1;  // holds its leases until told
  }));
  uint32_t granted = 0;
  Code refused = Code::kOk;
  bool waited_out = false;
  BOOST_REQUIRE(report.Get(&granted) && report.Get(&refused) && report.Get(&waited_out));
  BOOST_CHECK_EQUAL(granted, 4u);
  BOOST_CHECK(refused == Code::kCapacityExceeded);
  BOOST_CHECK(waited_out);
  // Holder B (this process) is still served, up to its own quota.
  std::vector<shm::LeaseHandle> mine;
  for (int i = 0; i < 4; ++i) mine.push_back(Must(tp.pool->TryAcquire(), "TryAcquire by B"));
  BOOST_CHECK(tp.pool->TryAcquire().status().code() == Code::kCapacityExceeded);
  (void)done.Put('x');
  BOOST_CHECK_EQUAL(a.Wait(), 0);
  BOOST_CHECK_EQUAL(Must(tp.pool->ReclaimDead(), "ReclaimDead"), 4u);
  for (const shm::LeaseHandle& h : mine) BOOST_CHECK(tp.pool->Release(h, Success()).ok());
  BOOST_CHECK(tp.pool->CheckConsistency().ok());
}

BOOST_AUTO_TEST_CASE(the_quota_is_a_pool_option) {
  keymesh::PoolOptions o;
  o.max_leases_per_process = 2;
  TestPool tp(1, shm::ToPoolConfig(o), shm::SystemClock::Instance(), shm::Capacities{1, 8, 64});
  BOOST_CHECK_EQUAL(tp.Snap().options.max_leases_per_process, 2u);
  shm::LeaseHandle a = Must(tp.pool->TryAcquire(), "first");
  shm::LeaseHandle b = Must(tp.pool->TryAcquire(), "second");
  Result<shm::LeaseHandle> c = tp.pool->TryAcquire();
  BOOST_REQUIRE(!c.ok());
  BOOST_CHECK(c.status().code() == Code::kCapacityExceeded);
  BOOST_CHECK_MESSAGE(c.status().message().find("max_leases_per_process") != std::string::npos, c.status().message());
  // Another holder (the broker acquiring for a client) is served; when its
  // own quota is full, a blocking acquire for it answers at once instead of
  // holding up the broker's queue.
  const shm::ProcessId other = Foreign(424242);
  shm::LeaseHandle d = Must(tp.pool->TryAcquire(nullptr, nullptr, other), "other");
  shm::LeaseHandle e = Must(tp.pool->TryAcquire(nullptr, nullptr, other), "other 2");
  const double t0 = keymesh::testing::NowSeconds();
  Result<shm::LeaseHandle> f = tp.pool->Acquire(30 * kSec, nullptr, other);
  BOOST_CHECK(!f.ok() && f.status().code() == Code::kCapacityExceeded);
  BOOST_CHECK_LT(keymesh::testing::NowSeconds() - t0, 10.0);
  for (const shm::LeaseHandle& h : {a, b, d, e}) {
    BOOST_CHECK(tp.pool->Release(h, Success(), h.lease == d.lease || h.lease == e.lease ? other : shm::Self()).ok());
  }
  BOOST_CHECK(tp.pool->CheckConsistency().ok());
}

BOOST_AUTO_TEST_CASE(a_blocking_acquire_on_a_full_table_waits_for_a_release) {
  // 4 leases, each held by another (live, foreign-named) holder of quota 1.
  keymesh::PoolOptions o;
  o.max_leases_per_process = 1;
  TestPool tp(1, shm::ToPoolConfig(o), shm::SystemClock::Instance(), shm::Capacities{1, 8, 4});
  std::vector<shm::LeaseHandle> held;
  for (uint32_t i = 0; i < 4; ++i) {
    held.push_back(Must(tp.pool->TryAcquire(nullptr, nullptr, Foreign(500000 + i)), "fill"));
  }
  BOOST_REQUIRE(tp.pool->TryAcquire().status().code() == Code::kCapacityExceeded);
  Pipe started;
  ChildGuard waiter(ForkChild([&] {
    (void)started.Put('s');
    Result<shm::LeaseHandle> r = tp.pool->Acquire(30 * kSec);
    if (!r.ok()) {
      std::fprintf(stderr, "waiter: %s\n", r.status().ToString().c_str());
      return 1;
    }
    return tp.pool->Release(*r, Success()).ok() ? 0 : 2;
  }));
  BOOST_REQUIRE_EQUAL(Expect(started), 's');
  // The waiter announces its sleep under the pool lock: wait for that (with a
  // deadline), then free one lease.
  const double deadline = keymesh::testing::NowSeconds() + 10.0;
  while (tp.pool->header()->sleepers.load() == 0 && keymesh::testing::NowSeconds() < deadline) {
    const timespec ms{0, 1'000'000};
    ::nanosleep(&ms, nullptr);
  }
  BOOST_REQUIRE_MESSAGE(tp.pool->header()->sleepers.load() != 0, "the waiter never slept");
  BOOST_CHECK(tp.pool->Release(held[0], Success(), Foreign(500000)).ok());
  BOOST_CHECK_EQUAL(waiter.Wait(), 0);
  for (uint32_t i = 1; i < 4; ++i) BOOST_CHECK(tp.pool->Release(held[i], Success(), Foreign(500000 + i)).ok());
  BOOST_CHECK(tp.pool->CheckConsistency().ok());
}

// A mesh share is read from the segment like the rest of a key's config: any
// value (the largest milli-rpm, a burst of 0 or 2^32 - 1, stray flag bits)
// paces with finite, saturating arithmetic and never reads as "no limit".
BOOST_AUTO_TEST_CASE(share_arithmetic_saturates_for_any_input) {
  const uint64_t now = 1000 * kSec;
  for (uint32_t margin : {0u, 499'999u, UINT32_MAX}) {
    for (uint64_t milli : {uint64_t{1}, uint64_t{999}, uint64_t{1} << 63, UINT64_MAX}) {
      for (uint32_t burst : {0u, 1u, UINT32_MAX}) {
        shm::KeyConfig c{};
        c.rpm = 60;
        c.tpm = 1000;
        c.share_flags = UINT32_MAX;  // the flag bit, and garbage beside it
        c.share_rpm_milli = milli;
        c.share_tpm = milli;
        c.share_burst = burst;
        const shm::RequestPacing rp = shm::RequestPacingOf(c, margin);
        BOOST_CHECK(rp.limited() && !rp.blocked);
        BOOST_CHECK_LE(rp.interval, 120'000 * kSec);  // a share of 0.001 per minute at most
        BOOST_CHECK_EQUAL(shm::AfterRequest(shm::kNever - 1, rp, now), shm::kNever);
        BOOST_CHECK_GE(shm::RequestsAvailable(0, rp, now), 1);
        BOOST_CHECK_GE(shm::RequestsAvailable(shm::kNever, rp, now), 0);
        const shm::TokenPacing tp = shm::TokenPacingOf(c, margin);
        BOOST_CHECK(tp.limited() && !tp.blocked);
        BOOST_CHECK_LE(tp.CostOf(UINT64_MAX), 120 * kSec);
        BOOST_CHECK_GE(shm::TokensAvailable(0, tp, now), 0);
        shm::SlotState st{};
        st.req_tat = shm::kNever;
        st.tok_tat = shm::kNever;
        (void)shm::ReadyAt(st, c, margin);
        shm::KeyConfig plain = c;
        plain.share_flags = 0;
        const shm::RequestPacing cfg = shm::RequestPacingOf(plain, margin);
        BOOST_CHECK_LE(shm::RescaleRequestTat(now + 120 * kSec, cfg, rp, now), shm::kNever);
        BOOST_CHECK_GE(shm::RescaleRequestTat(shm::kNever, rp, cfg, now), now);
        BOOST_CHECK_GE(shm::RescaleTokenTat(shm::kNever, shm::TokenPacingOf(plain, margin), tp, now), now);
      }
    }
  }
  // A share of 0 in a limited dimension blocks; in an unlimited one it is no limit.
  shm::KeyConfig z{};
  z.rpm = 60;
  z.share_flags = shm::kShareActive;
  BOOST_CHECK(shm::RequestPacingOf(z, 0).blocked);
  BOOST_CHECK_EQUAL(shm::RequestsAvailable(0, shm::RequestPacingOf(z, 0), now), 0);
  BOOST_CHECK(!shm::TokenPacingOf(z, 0).limited());
  shm::SlotState st{};
  BOOST_CHECK_EQUAL(shm::ReadyAt(st, z, 0), shm::kNever);
  z.rpm = 0;
  BOOST_CHECK_EQUAL(shm::ReadyAt(st, z, 0), 0u);
}

// The same values planted in a live pool's slot: acquires, releases and
// snapshots stay well defined, and the pool stays consistent.
BOOST_AUTO_TEST_CASE(planted_share_fields_in_the_segment) {
  TokenPool p;
  shm::KeySlot* keys =
      reinterpret_cast<shm::KeySlot*>(p.tp.segment->pool_data(p.tp.index) + p.tp.segment->layout().plan.keys_offset);
  shm::KeyConfig& c = keys[0].config;
  for (uint64_t v : {uint64_t{0}, uint64_t{1}, UINT64_MAX}) {
    for (uint32_t burst : {0u, UINT32_MAX}) {
      c.share_flags = UINT32_MAX;
      c.share_rpm_milli = v;
      c.share_tpm = v;
      c.share_burst = burst;
      for (int i = 0; i < 3; ++i) {
        Result<shm::LeaseHandle> h = p.tp.pool->TryAcquire(nullptr, nullptr, shm::Self(), 10);
        if (h.ok()) BOOST_CHECK(p.tp.pool->Release(*h, Success(std::nullopt, UINT64_MAX)).ok());
        // No share on this host: out once anything re-checked the key (a
        // planted value bypasses the index until then).
        if (v == 0 && i > 0) BOOST_CHECK(!h.ok());
        p.clock.AdvanceSeconds(1);
      }
      const keymesh::KeyStatus k = p.Key();
      BOOST_CHECK(k.share_active);
      BOOST_CHECK(k.tokens_available >= 0);
      BOOST_CHECK(p.tp.pool->CheckConsistency().ok());
    }
  }
  BOOST_CHECK(p.tp.pool->ClearShares().ok());
  BOOST_CHECK_EQUAL(c.share_flags, 0u);
}
