// Rate-limit-aware scheduling in the segment: GCRA request and token
// budgets, escalating 429 cooldowns, the circuit breaker's half-open probe,
// permanent revocation, and what status reports about them. Single-process
// cases run on a FakeClock (exact, no sleeps); cross-process cases use real
// forked processes.
#define BOOST_TEST_MODULE rate_limit_budgets
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <map>
#include <memory>
#include <new>
#include <string>
#include <vector>

#include <boost/test/unit_test.hpp>

#include "shm/clock.h"
#include "shm/pool.h"
#include "shm/segment.h"
#include "support/shm_fixtures.h"

namespace shm = keymesh::shm;
using keymesh::Code;
using keymesh::KeyState;
using keymesh::Status;

namespace {

constexpr uint64_t kSec = shm::kNanosPerSecond;
constexpr uint64_t kMs = kSec / 1000;

struct KeyOpts {
  uint32_t rpm = 0;
  uint64_t tpm = 0;
  uint32_t burst = 0;
  uint32_t max_concurrency = 0;
};

// An anonymous segment (shared with forked children) holding one pool.
struct Fixture {
  std::unique_ptr<shm::Segment> seg;
  uint32_t pool = 0;

  explicit Fixture(const std::vector<KeyOpts>& keys, double margin = 0.0, uint32_t max_failures = 3,
                   double default_cooldown = 1.0, double max_cooldown = 600.0,
                   keymesh::Strategy strategy = keymesh::Strategy::kLeastBusy) {
    auto s = shm::Segment::CreateAnonymous(shm::Capacities{1, 64, 1024});
    BOOST_REQUIRE(s.ok());
    seg = std::move(s).value();
    keymesh::PoolOptions options;
    options.strategy = strategy;
    options.max_failures = max_failures;
    options.default_cooldown = default_cooldown;
    options.acquire_timeout = 5.0;
    options.max_cooldown = max_cooldown;
    options.rate_margin = margin;
    const shm::PoolConfig cfg = shm::ToPoolConfig(options);
    auto p = seg->CreatePool("limits", cfg.strategy, cfg);
    BOOST_REQUIRE(p.ok());
    pool = *p;
    shm::PoolAdmin access(*seg, pool);
    for (size_t i = 0; i < keys.size(); ++i) {
      std::string name = "k" + std::to_string(i);
      shm::KeyDefinition def;
      def.name = name;
      def.fingerprint = i + 1;
      def.rpm = keys[i].rpm;
      def.tpm = keys[i].tpm;
      def.burst = keys[i].burst;
      def.max_concurrency = keys[i].max_concurrency;
      BOOST_REQUIRE(access.AddKey(def).ok());
    }
  }
};

// A FakeClock in shared memory, so forked children read the time the parent sets.
shm::FakeClock* SharedFakeClock(uint64_t start) {
  void* mem = mmap(nullptr, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  BOOST_REQUIRE(mem != MAP_FAILED);
  return new (mem) shm::FakeClock(start);
}

using keymesh::testing::ForkChild;
using keymesh::testing::WaitChild;
using shm::testing::Failure;
using shm::testing::RateLimited;
using shm::testing::Success;

keymesh::KeyStatus KeyStat(shm::PoolAdmin& p, uint32_t slot) {
  auto s = p.Snapshot();
  BOOST_REQUIRE(s.ok());
  for (const auto& k : s->keys) {
    if (k.slot == slot) return k;
  }
  BOOST_FAIL("no such slot");
  return {};
}

}  // namespace

BOOST_AUTO_TEST_CASE(request_budget_paces_smoothly) {
  shm::FakeClock clock;
  Fixture f({{600, 0, 0, 0}});  // 600 rpm, no margin: one request per 100 ms
  shm::PoolAdmin p(*f.seg, f.pool, clock);
  auto a = p.TryAcquire();
  BOOST_REQUIRE(a.ok());
  BOOST_REQUIRE(p.Release(*a, Success()).ok());
  uint64_t earliest = 0;
  auto b = p.TryAcquire(nullptr, &earliest);
  BOOST_TEST((b.status().code() == Code::kNoAvailableKey));
  BOOST_TEST(earliest == clock.NowNanos() + 100 * kMs);
  BOOST_TEST(KeyStat(p, 0).requests_available == 0);
  BOOST_TEST((KeyStat(p, 0).state == KeyState::kThrottled));
  BOOST_TEST(!KeyStat(p, 0).reason.empty());
  clock.Advance(99 * kMs);
  BOOST_TEST(!p.TryAcquire().ok());
  clock.Advance(1 * kMs);
  auto c = p.TryAcquire();
  BOOST_REQUIRE(c.ok());
  BOOST_REQUIRE(p.Release(*c, Success()).ok());
  // Idle time does not bank more than the burst (1): after 10 s one grant, then pacing.
  clock.Advance(10 * kSec);
  BOOST_TEST(KeyStat(p, 0).requests_available == 1);
  auto d = p.TryAcquire();
  BOOST_REQUIRE(d.ok());
  BOOST_TEST(!p.TryAcquire().ok());
  BOOST_REQUIRE(p.Release(*d, Success()).ok());
  BOOST_TEST(p.CheckConsistency().ok());
}

BOOST_AUTO_TEST_CASE(burst_and_margin) {
  shm::FakeClock clock;
  Fixture f({{600, 0, 5, 0}}, /*margin=*/0.2);  // paced at 480 rpm: 125 ms apart, bursts of 5
  shm::PoolAdmin p(*f.seg, f.pool, clock);
  std::vector<shm::LeaseHandle> held;
  for (int i = 0; i < 5; ++i) {
    auto h = p.TryAcquire();
    BOOST_REQUIRE(h.ok());
    held.push_back(*h);
  }
  uint64_t earliest = 0;
  BOOST_TEST(!p.TryAcquire(nullptr, &earliest).ok());
  BOOST_TEST(earliest == clock.NowNanos() + 125 * kMs);
  for (auto& h : held) BOOST_REQUIRE(p.Release(h, Success()).ok());
}

BOOST_AUTO_TEST_CASE(token_budget_reserves_and_debits) {
  shm::FakeClock clock;
  Fixture f({{0, 60000, 0, 0}});  // 1000 tokens/s, bucket of one second
  shm::PoolAdmin p(*f.seg, f.pool, clock);
  BOOST_TEST(KeyStat(p, 0).tokens_available == 1000);
  auto a = p.TryAcquire(nullptr, nullptr, shm::Self(), /*tokens=*/800);
  BOOST_REQUIRE(a.ok());
  BOOST_TEST(KeyStat(p, 0).tokens_available == 200);
  // The request used 300: 500 come back.
  shm::Outcome used = Success();
  used.tokens = 300;
  BOOST_REQUIRE(p.Release(*a, used).ok());
  BOOST_TEST(KeyStat(p, 0).tokens_available == 700);
  // A request that overspends puts the key in debt until the bucket refills.
  auto b = p.TryAcquire(nullptr, nullptr, shm::Self(), 100);
  BOOST_REQUIRE(b.ok());
  shm::Outcome big = Success();
  big.tokens = 2600;  // 1900 tokens more than the bucket held
  BOOST_REQUIRE(p.Release(*b, big).ok());
  uint64_t earliest = 0;
  BOOST_TEST(!p.TryAcquire(nullptr, &earliest).ok());
  BOOST_TEST(earliest == clock.NowNanos() + 1900 * kMs);
  clock.Advance(1900 * kMs);
  auto c = p.TryAcquire();
  BOOST_REQUIRE(c.ok());
  BOOST_REQUIRE(p.Release(*c, Success()).ok());
  BOOST_TEST(KeyStat(p, 0).tokens == 2900u);
}

BOOST_AUTO_TEST_CASE(escalation_on_consecutive_429s_and_reset_by_success) {
  shm::FakeClock clock;
  Fixture f(std::vector<KeyOpts>(1), 0.0, 3, 60.0, /*max_cooldown=*/2.0);
  shm::PoolAdmin p(*f.seg, f.pool, clock);
  auto cool = [&](std::optional<double> s) {
    auto h = p.TryAcquire();
    BOOST_REQUIRE(h.ok());
    BOOST_REQUIRE(p.Release(*h, RateLimited(s)).ok());
    return KeyStat(p, 0).cooldown_remaining;
  };
  BOOST_TEST(cool(0.3) == 0.3, boost::test_tools::tolerance(1e-9));  // first: exactly the Retry-After
  clock.AdvanceSeconds(0.3);
  BOOST_TEST(cool(0.3) == 0.6, boost::test_tools::tolerance(1e-9));  // second: 2x the previous
  clock.AdvanceSeconds(0.6);
  BOOST_TEST(cool(0.3) == 1.2, boost::test_tools::tolerance(1e-9));  // third: 4x the first
  BOOST_TEST(KeyStat(p, 0).escalation == 3u);
  clock.AdvanceSeconds(1.2);
  BOOST_TEST(cool(0.3) == 2.0, boost::test_tools::tolerance(1e-9));  // capped at max_cooldown
  clock.AdvanceSeconds(2.0);
  // A Retry-After beyond max_cooldown is capped too (review KM-11: one
  // tampered response must not bench a key for years).
  BOOST_TEST(cool(5.0) == 2.0, boost::test_tools::tolerance(1e-9));
  clock.AdvanceSeconds(2.0);
  auto h = p.TryAcquire();
  BOOST_REQUIRE(p.Release(*h, Success()).ok());  // a success resets the escalation
  BOOST_TEST(KeyStat(p, 0).escalation == 0u);
  BOOST_TEST(cool(0.3) == 0.3, boost::test_tools::tolerance(1e-9));
}

BOOST_AUTO_TEST_CASE(retry_after_never_shortens_a_deadline) {
  shm::FakeClock clock;
  Fixture f({{0, 0, 0, 3}}, 0.0, 3, 60.0, /*max_cooldown=*/10.0);
  shm::PoolAdmin p(*f.seg, f.pool, clock);
  auto a = p.TryAcquire();
  auto b = p.TryAcquire();
  auto z = p.TryAcquire();
  BOOST_REQUIRE(a.ok() && b.ok() && z.ok());
  BOOST_REQUIRE(p.Release(*a, RateLimited(10.0)).ok());
  BOOST_TEST(KeyStat(p, 0).cooldown_remaining == 10.0, boost::test_tools::tolerance(1e-9));
  // A success ends the escalation; the next 429 asks for 1 s: the 10 s
  // deadline stays.
  BOOST_REQUIRE(p.Release(*z, Success()).ok());
  BOOST_REQUIRE(p.Release(*b, RateLimited(1.0)).ok());
  BOOST_TEST(KeyStat(p, 0).cooldown_remaining == 10.0, boost::test_tools::tolerance(1e-9));
  // A 429 does not erase the failure history.
  clock.AdvanceSeconds(10);
  auto c = p.TryAcquire();
  BOOST_REQUIRE(p.Release(*c, Failure()).ok());
  auto d = p.TryAcquire();
  BOOST_REQUIRE(p.Release(*d, RateLimited(0.1)).ok());
  BOOST_TEST(KeyStat(p, 0).fail_streak == 1u);
}

BOOST_AUTO_TEST_CASE(circuit_opens_then_half_open_probe_closes_or_reopens_longer) {
  shm::FakeClock clock;
  Fixture f(std::vector<KeyOpts>(1), 0.0, /*max_failures=*/2, /*default_cooldown=*/1.0, /*max_cooldown=*/600.0);
  shm::PoolAdmin p(*f.seg, f.pool, clock);
  auto fail = [&]() {
    auto h = p.TryAcquire();
    BOOST_REQUIRE(h.ok());
    return p.Release(*h, Failure());
  };
  BOOST_TEST(fail().ok());
  Status st = fail();
  BOOST_TEST((st.code() == Code::kKeyExhausted));  // reported once, on opening
  BOOST_TEST(st.message().find("circuit is open") != std::string::npos);
  BOOST_TEST((KeyStat(p, 0).state == KeyState::kExhausted));
  BOOST_TEST(keymesh::CircuitStateName(KeyStat(p, 0).circuit) == "open");
  uint64_t earliest = 0;
  BOOST_TEST(!p.TryAcquire(nullptr, &earliest).ok());
  BOOST_TEST(earliest == clock.NowNanos() + kSec);  // acquire can wait for the half-open time
  clock.Advance(kSec);
  BOOST_TEST((KeyStat(p, 0).state == KeyState::kProbe));
  auto probe = p.TryAcquire();
  BOOST_REQUIRE(probe.ok());
  BOOST_TEST(keymesh::CircuitStateName(KeyStat(p, 0).circuit) == "half_open");
  BOOST_TEST(!p.TryAcquire().ok());               // exactly one probe
  BOOST_TEST(p.Release(*probe, Failure()).ok());  // the probe failed: not reported again
  BOOST_TEST(keymesh::CircuitStateName(KeyStat(p, 0).circuit) == "open");
  BOOST_TEST(KeyStat(p, 0).cooldown_remaining == 2.0, boost::test_tools::tolerance(1e-9));  // longer
  clock.Advance(2 * kSec);
  auto probe2 = p.TryAcquire();
  BOOST_REQUIRE(probe2.ok());
  BOOST_REQUIRE(p.Release(*probe2, Success()).ok());
  BOOST_TEST(keymesh::CircuitStateName(KeyStat(p, 0).circuit) == "closed");
  BOOST_TEST((KeyStat(p, 0).state == KeyState::kAvailable));
  // A cancelled probe lets the next caller probe at once.
  BOOST_TEST(fail().ok());
  BOOST_TEST((fail().code() == Code::kKeyExhausted));
  clock.Advance(kSec);
  auto probe3 = p.TryAcquire();
  shm::Outcome cancel;
  cancel.kind = shm::OutcomeKind::kCancelled;
  BOOST_REQUIRE(p.Release(*probe3, cancel).ok());
  BOOST_TEST(p.TryAcquire().ok());
}

BOOST_AUTO_TEST_CASE(permanent_failure_revokes_until_reset) {
  shm::FakeClock clock;
  Fixture f(std::vector<KeyOpts>(2));
  shm::PoolAdmin p(*f.seg, f.pool, clock);
  auto h = p.TryAcquire();
  BOOST_REQUIRE(h.ok());
  const uint32_t slot = h->slot;
  Status st = p.Release(*h, Failure(/*permanent=*/true));
  BOOST_TEST((st.code() == Code::kKeyExhausted));
  BOOST_TEST((KeyStat(p, slot).state == KeyState::kRevoked));
  clock.Advance(3600 * kSec);
  for (int i = 0; i < 10; ++i) {
    auto other = p.TryAcquire();
    BOOST_REQUIRE(other.ok());
    BOOST_TEST(other->slot != slot);
    BOOST_REQUIRE(p.Release(*other, Success()).ok());
  }
  BOOST_REQUIRE(p.ResetKey("k" + std::to_string(slot)).ok());
  BOOST_TEST((KeyStat(p, slot).state == KeyState::kAvailable));
}

BOOST_AUTO_TEST_CASE(observed_headers_limit_the_budget) {
  shm::FakeClock clock;
  Fixture f({{600, 60000, 10, 0}, {}});
  shm::PoolAdmin p(*f.seg, f.pool, clock);
  BOOST_TEST(KeyStat(p, 0).requests_available == 10);
  shm::LimitUpdate u;
  u.remaining_requests = 3;
  BOOST_REQUIRE(p.ObserveLimits("k0", u).ok());
  BOOST_TEST(KeyStat(p, 0).requests_available == 3);
  u.remaining_requests = 0;
  u.reset_requests = 2.5;
  BOOST_REQUIRE(p.ObserveLimits("k0", u).ok());
  BOOST_TEST(KeyStat(p, 0).requests_available == 0);
  BOOST_TEST((KeyStat(p, 0).state == KeyState::kThrottled));
  // A key without an rpm limit that the provider says is out cools until the reset.
  shm::LimitUpdate v;
  v.remaining_requests = 0;
  v.reset_requests = 1.5;
  BOOST_REQUIRE(p.ObserveLimits("k1", v).ok());
  BOOST_TEST(KeyStat(p, 1).cooldown_remaining == 1.5, boost::test_tools::tolerance(1e-9));
  shm::LimitUpdate t;
  t.remaining_tokens = 250;
  BOOST_REQUIRE(p.ObserveLimits("k0", t).ok());
  BOOST_TEST(KeyStat(p, 0).tokens_available == 250);
  shm::LimitUpdate bad;
  bad.reset_tokens = -1;
  BOOST_TEST((p.ObserveLimits("k0", bad).code() == Code::kInvalidArgument));
  BOOST_TEST((p.ObserveLimits("nope", t).code() == Code::kUnknownKey));
}

BOOST_AUTO_TEST_CASE(half_open_admits_exactly_one_probe_across_processes) {
  shm::FakeClock* clock = SharedFakeClock(1000 * kSec);
  Fixture f(std::vector<KeyOpts>(1), 0.0, 1, 1.0);
  {
    shm::PoolAdmin p(*f.seg, f.pool, *clock);
    auto h = p.TryAcquire();
    BOOST_REQUIRE((p.Release(*h, Failure()).code() == Code::kKeyExhausted));
  }
  clock->Advance(kSec);
  auto* wins =
      static_cast<std::atomic<int>*>(mmap(nullptr, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0));
  new (wins) std::atomic<int>(0);
  std::atomic<int>* go = wins + 1;
  new (go) std::atomic<int>(0);
  std::vector<pid_t> kids;
  for (int c = 0; c < 8; ++c) {
    kids.push_back(ForkChild([&]() -> int {
      shm::PoolAdmin p(*f.seg, f.pool, *clock);
      while (go->load() == 0) {
      }
      int mine = 0;
      for (int i = 0; i < 200; ++i) {
        if (p.TryAcquire().ok()) ++mine;  // held on purpose: the probe never ends
      }
      wins->fetch_add(mine);
      return 0;
    }));
  }
  go->store(1);
  for (pid_t k : kids) BOOST_TEST(WaitChild(k) == 0);
  BOOST_TEST(wins->load() == 1);
  munmap(wins, 4096);
  munmap(clock, 4096);
}

BOOST_AUTO_TEST_CASE(budgets_are_never_overspent_by_eight_processes) {
  // 4 keys at 1200 rpm (20 per second each, smooth), 8 processes taking every
  // grant they can for 1.5 s of real time: in every one-second window, no key
  // is granted more than 20 times.
  Fixture f({{1200, 0, 0, 0}, {1200, 0, 0, 0}, {1200, 0, 0, 0}, {1200, 0, 0, 0}}, /*margin=*/0.0);
  constexpr int kMaxGrants = 4096;
  struct Grant {
    uint32_t slot;
    uint64_t at;
  };
  struct Shared {
    std::atomic<int> count;
    Grant grants[kMaxGrants];
  };
  auto* shared =
      static_cast<Shared*>(mmap(nullptr, sizeof(Shared), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0));
  BOOST_REQUIRE(shared != MAP_FAILED);
  new (&shared->count) std::atomic<int>(0);
  const uint64_t until = shm::MonotonicNowNanos() + 1500 * kMs;
  std::vector<pid_t> kids;
  for (int c = 0; c < 8; ++c) {
    kids.push_back(ForkChild([&]() -> int {
      shm::PoolAdmin p(*f.seg, f.pool);
      while (shm::MonotonicNowNanos() < until) {
        auto h = p.Acquire(20 * kMs);  // sleeps until the next refill
        if (!h.ok()) continue;
        const int i = shared->count.fetch_add(1);
        if (i < kMaxGrants) shared->grants[i] = Grant{h->slot, h->acquire_ns};
        if (!p.Release(*h, Success()).ok()) return 2;
      }
      return 0;
    }));
  }
  for (pid_t k : kids) BOOST_TEST(WaitChild(k) == 0);
  const int n = std::min(shared->count.load(), kMaxGrants);
  BOOST_TEST_MESSAGE("grants: " << n);
  std::map<uint32_t, std::vector<uint64_t>> by_key;
  for (int i = 0; i < n; ++i) by_key[shared->grants[i].slot].push_back(shared->grants[i].at);
  BOOST_TEST(by_key.size() == 4u);
  for (auto& [slot, times] : by_key) {
    std::sort(times.begin(), times.end());
    size_t worst = 0;
    for (size_t a = 0, b = 0; b < times.size(); ++b) {
      while (times[b] - times[a] >= kSec) ++a;
      worst = std::max(worst, b - a + 1);
    }
    BOOST_TEST_INFO("key slot " << slot << " granted " << times.size() << " times");
    BOOST_TEST(worst <= 20u);
    BOOST_TEST(times.size() >= 25u);  // and the budget was actually used (~30 in 1.5 s)
  }
  shm::PoolAdmin p(*f.seg, f.pool);
  BOOST_TEST(p.CheckConsistency().ok());
  munmap(shared, sizeof(Shared));
}

BOOST_AUTO_TEST_CASE(waiters_wake_at_the_refill) {
  Fixture f({{600, 0, 0, 0}});  // one request per 100 ms
  shm::PoolAdmin p(*f.seg, f.pool);
  auto a = p.TryAcquire();
  BOOST_REQUIRE(a.ok());
  BOOST_REQUIRE(p.Release(*a, Success()).ok());
  const uint64_t t0 = shm::MonotonicNowNanos();
  auto b = p.Acquire(2 * kSec);  // nobody releases anything: only the refill can wake us
  const uint64_t waited = shm::MonotonicNowNanos() - t0;
  BOOST_REQUIRE(b.ok());
  BOOST_TEST(b->acquire_ns >= a->acquire_ns + 100 * kMs);
  BOOST_TEST(waited < 150 * kMs);  // woke at the refill (100 ms after the first grant), not at the timeout
  BOOST_REQUIRE(p.Release(*b, Success()).ok());
}

BOOST_AUTO_TEST_CASE(timeout_says_when_the_next_key_returns) {
  Fixture f(std::vector<KeyOpts>(1), 0.0, 1, /*default_cooldown=*/30.0);
  shm::PoolAdmin p(*f.seg, f.pool);
  auto h = p.TryAcquire();
  BOOST_REQUIRE((p.Release(*h, Failure()).code() == Code::kKeyExhausted));
  auto r = p.Acquire(10 * kMs);
  BOOST_TEST((r.status().code() == Code::kNoAvailableKey));
  BOOST_TEST(r.status().message().find("next key returns in") != std::string::npos);
}
