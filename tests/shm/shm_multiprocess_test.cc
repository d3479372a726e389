// Multi-process tests: forked workers hammering one pool (concurrency caps,
// exact counters, no lease left behind) and blocking acquire across
// processes (woken by a release, a cooldown end, an enable; timeout) without
// spinning.
#define BOOST_TEST_MODULE shm_multiprocess_test
#include <fcntl.h>
#include <sched.h>

#include <array>
#include <atomic>
#include <cstring>
#include <thread>

#include <boost/test/unit_test.hpp>

#include "shm/process_id.h"
#include "support/shm_fixtures.h"

namespace keymesh::shm {
namespace {

using testing::ChildGuard;
using testing::ForkChild;
using testing::Must;
using testing::Pipe;
using testing::SharedArray;
using testing::TestPool;
using testing::WaitUntilAsleep;

constexpr uint32_t kProcs = 8;
constexpr uint32_t kKeys = 4;
constexpr uint32_t kMaxConcurrency = 2;  // 4 keys x 2 < 8 processes: waiters block
enum Kind { kSuccessK = 0, kFailureK, kRateLimitedK, kCancelledK, kKinds };

struct Violations {
  std::atomic<uint64_t> over_cap{0};
  std::atomic<uint64_t> errors{0};
  std::atomic<uint32_t> max_seen[kKeys];
};

// One worker: `iters` acquire/release pairs; reports per-slot outcome counts
// into counts[slot * kKinds + kind] (its own row, read by the parent after
// waitpid).
int Worker(PoolAdmin& pool, uint32_t iters, uint32_t seed, SharedArray<std::atomic<uint32_t>>& in_flight, Violations& v,
           uint64_t* counts) {
  uint32_t x = seed * 2654435761u + 1;
  for (uint32_t i = 0; i < iters; ++i) {
    Result<LeaseHandle> r = pool.Acquire(20 * kNanosPerSecond);
    if (!r.ok()) {
      std::fprintf(stderr, "worker %u: acquire: %s\n", seed, r.status().ToString().c_str());
      v.errors.fetch_add(1);
      return 2;
    }
    const uint32_t s = r->slot;
    if (s >= kKeys) return 3;
    const uint32_t now_in = in_flight[s].fetch_add(1, std::memory_order_acq_rel) + 1;
    if (now_in > kMaxConcurrency) v.over_cap.fetch_add(1);
    uint32_t seen = v.max_seen[s].load();
    while (now_in > seen && !v.max_seen[s].compare_exchange_weak(seen, now_in)) {
    }
    if ((i & 7) == 0) sched_yield();  // sometimes hold the lease across a switch
    in_flight[s].fetch_sub(1, std::memory_order_acq_rel);

    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    Outcome o;
    Kind kind;
    switch (x % 32) {
      case 0:
      case 1:
        kind = kFailureK;
        o.kind = OutcomeKind::kFailure;
        break;
      case 2:
        kind = kRateLimitedK;
        o.kind = OutcomeKind::kRateLimited;
        o.cooldown = 20e-6;  // 20 us
        break;
      case 3:
        kind = kCancelledK;
        o.kind = OutcomeKind::kCancelled;
        break;
      default:
        kind = kSuccessK;
        o.kind = OutcomeKind::kSuccess;
        o.latency = 0.001 * (x % 7);
        break;
    }
    Status st = pool.Release(*r, o);
    if (!st.ok()) {
      std::fprintf(stderr, "worker %u: release: %s\n", seed, st.ToString().c_str());
      v.errors.fetch_add(1);
      return 4;
    }
    ++counts[s * kKinds + kind];
  }
  return 0;
}

void Hammer(Strategy strategy, uint32_t pairs_per_proc) {
  // max_failures far above any streak the mix can produce: no exhaustion.
  TestPool t(kKeys, testing::MakeConfig(strategy, 60, 1000, /*max_cooldown=*/0.001), SystemClock::Instance(),
             Capacities{1, 16, 256}, kMaxConcurrency, {1, 2, 3, 4});
  SharedArray<std::atomic<uint32_t>> in_flight(kKeys);
  SharedArray<Violations> v(1);
  SharedArray<uint64_t> counts(kProcs * kKeys * kKinds);

  const uint64_t start = MonotonicNowNanos();
  std::vector<pid_t> pids;
  for (uint32_t p = 0; p < kProcs; ++p) {
    pids.push_back(ForkChild(
        [&, p] { return Worker(*t.pool, pairs_per_proc, p + 1, in_flight, v[0], &counts[p * kKeys * kKinds]); }));
  }
  for (pid_t pid : pids) BOOST_CHECK_EQUAL(testing::WaitChild(pid), 0);
  const double secs = NanosToSeconds(MonotonicNowNanos() - start);
  BOOST_TEST_MESSAGE(StrategyName(strategy) << ": " << kProcs * pairs_per_proc << " pairs in " << secs
                                            << " s; max in flight seen per key: " << v[0].max_seen[0] << " "
                                            << v[0].max_seen[1] << " " << v[0].max_seen[2] << " " << v[0].max_seen[3]);

  BOOST_CHECK_EQUAL(v[0].over_cap.load(), 0u);
  BOOST_CHECK_EQUAL(v[0].errors.load(), 0u);
  Status cons = t.pool->CheckConsistency();
  BOOST_CHECK_MESSAGE(cons.ok(), cons.ToString());
  BOOST_CHECK(t.pool->Holders().empty());

  PoolStatus s = t.Snap();
  BOOST_REQUIRE_EQUAL(s.keys.size(), kKeys);
  uint64_t total[kKinds] = {};
  uint64_t total_acquires = 0;
  for (uint32_t k = 0; k < kKeys; ++k) {
    uint64_t want[kKinds] = {};
    for (uint32_t p = 0; p < kProcs; ++p) {
      for (uint32_t kind = 0; kind < kKinds; ++kind) want[kind] += counts[(p * kKeys + k) * kKinds + kind];
    }
    const KeyStatus& ks = s.keys[k];
    BOOST_TEST_CONTEXT("key " << ks.name) {
      BOOST_CHECK_EQUAL(ks.in_flight, 0u);
      BOOST_CHECK_EQUAL(ks.successes, want[kSuccessK]);
      BOOST_CHECK_EQUAL(ks.failures, want[kFailureK]);
      BOOST_CHECK_EQUAL(ks.rate_limited, want[kRateLimitedK]);
      BOOST_CHECK_EQUAL(ks.cancelled, want[kCancelledK]);
      BOOST_CHECK_EQUAL(ks.acquires, want[kSuccessK] + want[kFailureK] + want[kRateLimitedK] + want[kCancelledK]);
      BOOST_CHECK_EQUAL(ks.acquires, ks.successes + ks.failures + ks.rate_limited + ks.cancelled);
      BOOST_CHECK_EQUAL(ks.reclaimed, 0u);
      BOOST_CHECK(ks.state != KeyState::kExhausted);
    }
    for (uint32_t kind = 0; kind < kKinds; ++kind) total[kind] += want[kind];
    total_acquires += ks.acquires;
  }
  BOOST_CHECK_EQUAL(total_acquires, uint64_t{kProcs} * pairs_per_proc);
  BOOST_CHECK_EQUAL(s.totals.acquires, uint64_t{kProcs} * pairs_per_proc);
  BOOST_CHECK_EQUAL(s.totals.releases, total[kSuccessK]);
  BOOST_CHECK_EQUAL(s.totals.failures, total[kFailureK]);
  BOOST_CHECK_EQUAL(s.totals.rate_limited, total[kRateLimitedK]);
  // Every kind of outcome happened.
  for (uint32_t kind = 0; kind < kKinds; ++kind) BOOST_CHECK_GT(total[kind], 0u);
}

struct WaitResult {
  int32_t code = -1;
  uint32_t slot = 0;
  uint64_t started = 0;   // CLOCK_MONOTONIC ns
  uint64_t returned = 0;  // CLOCK_MONOTONIC ns
  uint64_t cpu = 0;       // CPU ns the child spent in Acquire
};

// Forks a child that signals, then Acquire(timeout)s, then reports a
// WaitResult and releases what it got.
pid_t ForkWaiter(PoolAdmin& pool, Pipe& ready, Pipe& result, uint64_t timeout_ns) {
  return ForkChild([&] {
    ready.CloseRead();
    result.CloseRead();
    if (!ready.Put('r')) return 1;
    WaitResult w;
    const uint64_t cpu0 = testing::ProcessCpuNanos();
    w.started = MonotonicNowNanos();
    Result<LeaseHandle> r = pool.Acquire(timeout_ns);
    w.returned = MonotonicNowNanos();
    w.cpu = testing::ProcessCpuNanos() - cpu0;
    w.code = static_cast<int32_t>(r.ok() ? Code::kOk : r.status().code());
    if (r.ok()) w.slot = r->slot;
    if (!result.Put(w)) return 2;
    if (r.ok() && !pool.Release(*r, Outcome{}).ok()) return 3;
    return 0;
  });
}

// After ForkWaiter: the child signalled and now sleeps in its acquire.
void SeeAsleep(PoolAdmin& pool, pid_t pid, Pipe& ready, Pipe& result) {
  ready.CloseWrite();
  result.CloseWrite();
  char c = 0;
  BOOST_REQUIRE(ready.Get(&c));
  BOOST_REQUIRE_MESSAGE(WaitUntilAsleep(pool, pid), "the waiter never went to sleep");
}

// A scenario's own duration (a waiter left asleep): never a wait for
// something to settle.
void Hold(uint64_t ns) {
  const uint64_t until = MonotonicNowNanos() + ns;
  while (MonotonicNowNanos() < until) {
    timespec ts{0, 10'000'000};
    nanosleep(&ts, nullptr);
  }
}

// The waiter burned at most a small fraction of the time it waited.
void CheckNoSpin(const WaitResult& w) {
  const uint64_t wall = w.returned - w.started;
  BOOST_TEST_MESSAGE("waited " << NanosToSeconds(wall) << " s using " << NanosToSeconds(w.cpu) << " s CPU");
  BOOST_CHECK_LT(w.cpu, wall / 10);
}

}  // namespace

BOOST_AUTO_TEST_SUITE(hammer)

BOOST_AUTO_TEST_CASE(least_busy_100k_pairs) { Hammer(Strategy::kLeastBusy, 12'500); }
BOOST_AUTO_TEST_CASE(round_robin_40k_pairs) { Hammer(Strategy::kRoundRobin, 5'000); }
BOOST_AUTO_TEST_CASE(weighted_40k_pairs) { Hammer(Strategy::kWeighted, 5'000); }

// The same mix from threads of one process (several PoolAdmin views of
// one segment): what ThreadSanitizer can check, since it cannot see
// accesses made by other processes.
BOOST_AUTO_TEST_CASE(threads_of_one_process) {
  constexpr uint32_t kThreads = 4, kIters = 5'000;
  TestPool t(kKeys, testing::MakeConfig(Strategy::kLeastBusy, 60, 1000, 0.001), SystemClock::Instance(),
             Capacities{1, 16, 256}, kMaxConcurrency);
  SharedArray<std::atomic<uint32_t>> in_flight(kKeys);
  SharedArray<Violations> v(1);
  std::vector<uint64_t> counts(kThreads * kKeys * kKinds, 0);
  std::vector<std::thread> threads;
  std::vector<int> rc(kThreads, -1);
  for (uint32_t i = 0; i < kThreads; ++i) {
    threads.emplace_back([&, i] {
      PoolAdmin view(*t.segment, t.index);
      rc[i] = Worker(view, kIters, 100 + i, in_flight, v[0], &counts[i * kKeys * kKinds]);
    });
  }
  for (std::thread& th : threads) th.join();
  for (int r : rc) BOOST_CHECK_EQUAL(r, 0);
  BOOST_CHECK_EQUAL(v[0].over_cap.load(), 0u);
  BOOST_CHECK(t.pool->CheckConsistency().ok());
  PoolStatus s = t.Snap();
  uint64_t acquires = 0, ended = 0;
  for (const KeyStatus& k : s.keys) {
    BOOST_CHECK_EQUAL(k.in_flight, 0u);
    acquires += k.acquires;
    ended += k.successes + k.failures + k.rate_limited + k.cancelled;
  }
  BOOST_CHECK_EQUAL(acquires, uint64_t{kThreads} * kIters);
  BOOST_CHECK_EQUAL(ended, acquires);
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_AUTO_TEST_SUITE(blocking_acquire)

BOOST_AUTO_TEST_CASE(release_wakes_a_blocked_waiter_promptly) {
  TestPool t(1, testing::MakeConfig(Strategy::kLeastBusy), SystemClock::Instance(), Capacities{1, 8, 64},
             /*max_concurrency=*/1);
  Result<LeaseHandle> held = t.pool->TryAcquire();
  BOOST_REQUIRE(held.ok());
  Pipe ready, result;
  ChildGuard child(ForkWaiter(*t.pool, ready, result, 20 * kNanosPerSecond));
  SeeAsleep(*t.pool, child.pid, ready, result);
  Hold(200'000'000);  // asleep for a while: a spinning waiter would burn this time
  const uint64_t released = MonotonicNowNanos();
  BOOST_REQUIRE(t.pool->Release(*held, Outcome{}).ok());
  WaitResult w;
  BOOST_REQUIRE(result.Get(&w));
  BOOST_CHECK_EQUAL(w.code, 0);
  BOOST_CHECK_GE(w.returned, released);
  BOOST_CHECK_LT(w.returned - released, 100'000'000u);  // woken, not timed out or polled
  CheckNoSpin(w);
  BOOST_CHECK_EQUAL(child.Wait(), 0);
  BOOST_CHECK(t.pool->CheckConsistency().ok());
  BOOST_CHECK_EQUAL(t.Snap().keys[0].in_flight, 0u);
}

// A waiting acquire adds its time to the pool's wait clock as it goes (the
// mesh job's sign of workers queueing for a share), not only once it ends;
// a waiter SIGKILLed in its sleep adds nothing more; and one that waited
// to the end left all of its wait on the clock.
BOOST_AUTO_TEST_CASE(a_waiter_shows_on_the_wait_clock_while_it_waits) {
  TestPool t(1, testing::MakeConfig(Strategy::kLeastBusy), SystemClock::Instance(), Capacities{1, 8, 64},
             /*max_concurrency=*/1);
  Result<LeaseHandle> held = t.pool->TryAcquire();
  BOOST_REQUIRE(held.ok());
  const uint32_t before = t.Snap().totals.wait_clock_ms;
  Pipe ready, result;
  ChildGuard child(ForkWaiter(*t.pool, ready, result, 20 * kNanosPerSecond));
  SeeAsleep(*t.pool, child.pid, ready, result);
  auto clocked = [&] { return static_cast<uint32_t>(t.Snap().totals.wait_clock_ms - before); };
  const uint64_t give_up = MonotonicNowNanos() + 5 * kNanosPerSecond;
  while (clocked() < 300 && MonotonicNowNanos() < give_up) {
    timespec ts{0, 5'000'000};  // polling a condition, bounded by give_up
    nanosleep(&ts, nullptr);
  }
  BOOST_CHECK_GE(clocked(), 300u);
  BOOST_CHECK_EQUAL(t.Snap().keys[0].in_flight, 1u);  // still waiting: nothing granted
  BOOST_CHECK_EQUAL(child.KillAndWait(), 128 + SIGKILL);
  const uint32_t at_kill = clocked();
  Hold(3 * kWaitClockNs);  // time passes with nobody waiting
  BOOST_CHECK_EQUAL(clocked(), at_kill);
  // A waiter that times out leaves its whole wait on the clock.
  Pipe ready2, result2;
  ChildGuard timed(ForkWaiter(*t.pool, ready2, result2, 300'000'000));
  ready2.CloseWrite();
  result2.CloseWrite();
  WaitResult w;
  BOOST_REQUIRE(result2.Get(&w));
  BOOST_CHECK(static_cast<Code>(w.code) == Code::kNoAvailableKey);
  BOOST_CHECK_EQUAL(timed.Wait(), 0);
  BOOST_CHECK_GE(clocked() - at_kill, 299u);
  BOOST_CHECK_LE(clocked() - at_kill, (w.returned - w.started) / 1'000'000 + 1);
  CheckNoSpin(w);
  BOOST_REQUIRE(t.pool->Release(*held, Outcome{}).ok());
  BOOST_CHECK(t.pool->CheckConsistency().ok());
}

BOOST_AUTO_TEST_CASE(cooldown_end_wakes_a_waiter_without_any_release) {
  TestPool t(1, testing::MakeConfig(Strategy::kLeastBusy), SystemClock::Instance(), Capacities{1, 8, 64});
  Result<LeaseHandle> h = t.pool->TryAcquire();
  BOOST_REQUIRE(h.ok());
  Outcome o;
  o.kind = OutcomeKind::kRateLimited;
  o.cooldown = 0.3;
  BOOST_REQUIRE(t.pool->Release(*h, o).ok());
  const uint64_t deadline = t.pool->NextDeadline();
  BOOST_REQUIRE_NE(deadline, kNever);
  Pipe ready, result;
  ChildGuard child(ForkWaiter(*t.pool, ready, result, 20 * kNanosPerSecond));
  ready.CloseWrite();
  result.CloseWrite();
  WaitResult w;
  BOOST_REQUIRE(result.Get(&w));  // nobody touches the pool meanwhile
  BOOST_CHECK_EQUAL(w.code, 0);
  BOOST_CHECK_GE(w.returned, deadline);
  BOOST_CHECK_LT(w.returned - deadline, 100'000'000u);
  CheckNoSpin(w);
  BOOST_CHECK_EQUAL(child.Wait(), 0);
  BOOST_CHECK_EQUAL(t.Snap().keys[0].acquires, 2u);
  BOOST_CHECK(t.pool->CheckConsistency().ok());
}

BOOST_AUTO_TEST_CASE(enabling_a_key_wakes_a_waiter) {
  TestPool t(2, testing::MakeConfig(Strategy::kLeastBusy), SystemClock::Instance(), Capacities{1, 8, 64});
  BOOST_REQUIRE(t.pool->SetEnabled("k0", false).ok());
  BOOST_REQUIRE(t.pool->SetEnabled("k1", false).ok());
  Pipe ready, result;
  ChildGuard child(ForkWaiter(*t.pool, ready, result, 20 * kNanosPerSecond));
  SeeAsleep(*t.pool, child.pid, ready, result);
  const uint64_t enabled = MonotonicNowNanos();
  BOOST_REQUIRE(t.pool->SetEnabled("k1", true).ok());
  WaitResult w;
  BOOST_REQUIRE(result.Get(&w));
  BOOST_CHECK_EQUAL(w.code, 0);
  BOOST_CHECK_EQUAL(w.slot, 1u);
  BOOST_CHECK_LT(w.returned - enabled, 100'000'000u);
  BOOST_CHECK_EQUAL(child.Wait(), 0);
}

BOOST_AUTO_TEST_CASE(timeout_returns_no_available_key) {
  TestPool t(1, testing::MakeConfig(Strategy::kLeastBusy), SystemClock::Instance(), Capacities{1, 8, 64},
             /*max_concurrency=*/1);
  Result<LeaseHandle> held = t.pool->TryAcquire();
  BOOST_REQUIRE(held.ok());
  const uint64_t timeout = 300'000'000;
  Pipe ready, result;
  ChildGuard child(ForkWaiter(*t.pool, ready, result, timeout));
  ready.CloseWrite();
  result.CloseWrite();
  WaitResult w;
  BOOST_REQUIRE(result.Get(&w));
  BOOST_CHECK(static_cast<Code>(w.code) == Code::kNoAvailableKey);
  BOOST_CHECK_GE(w.returned - w.started, timeout);
  BOOST_CHECK_LT(w.returned - w.started, timeout + 150'000'000);
  CheckNoSpin(w);
  BOOST_CHECK_EQUAL(child.Wait(), 0);
  PoolStatus s = t.Snap();
  BOOST_CHECK_EQUAL(s.totals.timeouts, 1u);
  BOOST_CHECK_EQUAL(s.totals.no_key_available, 1u);
  BOOST_CHECK_EQUAL(s.keys[0].in_flight, 1u);
  BOOST_REQUIRE(t.pool->Release(*held, Outcome{}).ok());
  BOOST_CHECK(t.pool->CheckConsistency().ok());
}

BOOST_AUTO_TEST_SUITE_END()

}  // namespace keymesh::shm
