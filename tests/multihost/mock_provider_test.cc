// MockProvider (tests/support/mock_provider.h): the GCRA it enforces, its
// Retry-After, injected refusals, counts shared by forked processes, and
// the overspend measure the mesh scenarios assert on.
#define BOOST_TEST_MODULE mock_provider_test
#include "support/mock_provider.h"

#include <time.h>
#include <unistd.h>

#include <atomic>
#include <memory>
#include <string>
#include <vector>

#include <boost/test/unit_test.hpp>

#include "support/process.h"

namespace {

using keymesh::testing::ChildGuard;
using keymesh::testing::ForkChild;
using keymesh::testing::MockKeyLimit;
using keymesh::testing::MockProvider;
using keymesh::testing::MonoNanos;

BOOST_AUTO_TEST_CASE(AdmitsTheBurstThenRefusesWithRetryAfterInWholeSeconds) {
  // 60 rpm: one request a second, burst 3.
  MockProvider provider({{"k", 60, 3}});
  for (int i = 0; i < 3; ++i) BOOST_CHECK_EQUAL(provider.Call("k").status, 200);
  const MockProvider::Reply r = provider.Call("k");
  BOOST_CHECK_EQUAL(r.status, 429);
  BOOST_CHECK_EQUAL(r.retry_after, 1u);  // about 1 s away, rounded up
  BOOST_CHECK_GT(r.retry_after_exact, 0.9);
  BOOST_CHECK_LE(r.retry_after_exact, 1.0);
  BOOST_CHECK_EQUAL(provider.admitted("k"), 3u);
  BOOST_CHECK_EQUAL(provider.refused("k"), 1u);
  BOOST_CHECK_EQUAL(provider.Call("nope").status, 404);
}

BOOST_AUTO_TEST_CASE(DefaultBurstIsOneSecondOfTheRate) {
  MockProvider provider({{"k", 6000}});
  BOOST_CHECK_EQUAL(provider.burst("k"), 100u);
  int admitted = 0;
  for (int i = 0; i < 150; ++i) admitted += provider.Call("k").status == 200;
  // 100 back to back, plus the few that the rate (100/s) refilled meanwhile.
  BOOST_CHECK_GE(admitted, 100);
  BOOST_CHECK_LE(admitted, 102);
}

BOOST_AUTO_TEST_CASE(InjectedRefusalsComeFirstAndAreTimed) {
  MockProvider provider({{"k", 6000}});
  const uint64_t before = MonoNanos();
  BOOST_REQUIRE(provider.InjectRefusals("k", 2, 7));
  BOOST_CHECK(!provider.InjectRefusals("nope", 1, 1));
  for (int i = 0; i < 2; ++i) {
    const MockProvider::Reply r = provider.Call("k");
    BOOST_CHECK_EQUAL(r.status, 429);
    BOOST_CHECK_EQUAL(r.retry_after, 7u);
  }
  BOOST_CHECK_EQUAL(provider.Call("k").status, 200);
  BOOST_CHECK_GE(provider.refusal_injected_ns("k"), before);
  BOOST_CHECK_LE(provider.refusal_injected_ns("k"), MonoNanos());
}

BOOST_AUTO_TEST_CASE(ForkedProcessesShareOneBudgetAndOneLog) {
  // 600 rpm, burst 10: four processes hammering it for 0.5 s get the burst
  // plus the rate, together, and every call is logged with its origin.
  MockProvider provider({{"k", 600, 10}, {"other", 600, 10}});
  std::vector<std::unique_ptr<ChildGuard>> children;
  const uint64_t start = MonoNanos();
  for (uint8_t origin = 0; origin < 4; ++origin) {
    children.push_back(std::make_unique<ChildGuard>(ForkChild([&provider, origin, start] {
      while (MonoNanos() < start + 500'000'000ull) {
        (void)provider.Call("k", origin);
        ::usleep(1000);  // a deliberate pace (1 call per ms), not a settle
      }
      return 0;
    })));
  }
  for (auto& c : children) BOOST_CHECK_EQUAL(c->Wait(), 0);
  const double elapsed = static_cast<double>(MonoNanos() - start) / 1e9;
  BOOST_CHECK_GE(provider.admitted("k"), 10u + 4u);
  BOOST_CHECK_LE(static_cast<double>(provider.admitted("k")), 10 + 10 * elapsed + 1);
  BOOST_CHECK_GT(provider.refused("k"), 100u);
  BOOST_CHECK_EQUAL(provider.admitted("other"), 0u);
  const std::vector<MockProvider::CallRecord> calls = provider.Calls("k");
  BOOST_CHECK_EQUAL(calls.size(), provider.admitted("k") + provider.refused("k"));
  uint64_t per_origin[4] = {};
  for (size_t i = 0; i < calls.size(); ++i) {
    if (i > 0) BOOST_CHECK_LE(calls[i - 1].mono_ns, calls[i].mono_ns);
    BOOST_REQUIRE_LT(calls[i].origin, 4);
    ++per_origin[calls[i].origin];
  }
  for (uint64_t n : per_origin) BOOST_CHECK_GT(n, 50u);
  BOOST_CHECK_EQUAL(provider.SentBetween("k", 0, UINT64_MAX, 2), per_origin[2]);
  BOOST_CHECK_EQUAL(provider.AdmittedBetween("k", 0, UINT64_MAX), provider.admitted("k"));
  // What was sent is far beyond B + r·W: overspend measures it.
  BOOST_CHECK_GT(provider.Overspend("k", 0.25), 100);
  BOOST_CHECK_GE(provider.WorstOverspend("k"), provider.Overspend("k", 0.25));
}

BOOST_AUTO_TEST_CASE(WorstOverspendFindsShortWindows) {
  // 60 rpm, burst 2: three calls at once are one over (B + r·0 = 2), a
  // window no fixed length of a second or more would show.
  MockProvider provider({{"k", 60, 2}});
  for (int i = 0; i < 3; ++i) (void)provider.Call("k");
  BOOST_CHECK_EQUAL(provider.refused("k"), 1u);
  BOOST_CHECK_GT(provider.WorstOverspend("k"), 0.9);
  BOOST_CHECK_LE(provider.WorstOverspend("k"), 1.0);
  BOOST_CHECK_EQUAL(provider.WorstOverspend("k", 0, 0), 0);
}

BOOST_AUTO_TEST_CASE(OverspendIsZeroForSendsWithinTheLimit) {
  // 6000 rpm (100/s, burst 100): 100 at once, then one every 10 ms, is
  // exactly at the limit.
  MockProvider provider({{"k", 6000}});
  for (int i = 0; i < 100; ++i) BOOST_REQUIRE_EQUAL(provider.Call("k").status, 200);
  uint64_t next = MonoNanos() + 10'000'000ull;
  for (int i = 0; i < 50; ++i) {
    const timespec at{static_cast<time_t>(next / 1'000'000'000ull), static_cast<long>(next % 1'000'000'000ull)};
    ::clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &at, nullptr);  // a deliberate pace
    next += 10'000'000ull;
    (void)provider.Call("k");
  }
  BOOST_CHECK_LE(provider.WorstOverspend("k"), 1.0);
  BOOST_CHECK_LE(provider.refused("k"), 1u);
}

}  // namespace
