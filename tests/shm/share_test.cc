// The segment side of the mesh: a host's share of a key's limits
// (PoolAdmin::SetShares / ClearShares) paces workers, a share of 0 keeps the
// key out and raising it wakes a waiter in another process; the change
// counter (PoolHeader::events_seq) moves on what other hosts must learn and
// on nothing else; other hosts' state merges in (MergeRemote) without ever
// shortening a deadline; a crash inside SetShares leaves a consistent pool.
#define BOOST_TEST_MODULE share_test
#include <signal.h>
#include <unistd.h>

#include <cmath>
#include <functional>
#include <list>
#include <string>
#include <utility>
#include <vector>

#include <boost/test/unit_test.hpp>

#include "support/shm_fixtures.h"

namespace keymesh::shm {
namespace {

using testing::ChildGuard;
using testing::Failure;
using testing::ForkChild;
using testing::MakeConfig;
using testing::Must;
using testing::Pipe;
using testing::RateLimited;
using testing::Success;
using testing::TestPool;
using testing::WaitUntilAsleep;

constexpr uint64_t kSec = kNanosPerSecond;
using Shares = std::vector<std::pair<std::string, KeyShare>>;

KeyShare Share(double rpm, double tpm = 0, uint32_t burst = 1) {
  KeyShare s;
  s.active = true;
  s.rpm = rpm;
  s.tpm = tpm;
  s.burst = burst;
  return s;
}

// A pool (without a rate margin unless given one) whose keys k0..k{n-1}
// have `rpm` (burst 1).
struct PacedPool {
  FakeClock clock;
  TestPool tp;
  explicit PacedPool(uint32_t keys, uint32_t rpm, const Clock* use = nullptr, double margin = 0)
      : tp(0, Config(margin), use != nullptr ? *use : static_cast<const Clock&>(clock)) {
    for (uint32_t i = 0; i < keys; ++i) Must(tp.pool->AddKey(Def("k" + std::to_string(i), rpm)), "AddKey");
  }
  static PoolConfig Config(double margin) {
    PoolOptions o;
    o.rate_margin = margin;
    o.max_failures = 1;
    o.default_cooldown = 60;
    o.max_cooldown = 600;
    return ToPoolConfig(o);
  }
  KeyDefinition Def(const std::string& name, uint32_t rpm) {
    names_.push_back(name);
    KeyDefinition d;
    d.name = names_.back();
    d.fingerprint = std::hash<std::string>()(name);
    d.rpm = rpm;
    d.burst = 1;
    return d;
  }
  KeyStatus Key(std::string_view name) {
    PoolStatus s = tp.Snap();
    return tp.Key(s, name);
  }
  // Grants over `seconds` of fake time, trying every 10 ms.
  uint32_t GrantsOver(double seconds) {
    uint32_t n = 0;
    const uint64_t steps = static_cast<uint64_t>(seconds * 100);
    for (uint64_t i = 0; i < steps; ++i) {
      Result<LeaseHandle> r = tp.pool->TryAcquire();
      if (r.ok()) {
        ++n;
        BOOST_REQUIRE(tp.pool->Release(*r, Success()).ok());
      }
      clock.Advance(kSec / 100);
    }
    return n;
  }

 private:
  std::list<std::string> names_;  // KeyDefinition holds a view
};

}  // namespace

BOOST_AUTO_TEST_SUITE(pacing)

BOOST_AUTO_TEST_CASE(half_the_configured_rpm_admits_half) {
  PacedPool p(1, 120);  // one request every 0.5 s
  p.clock.Set(1000 * kSec);
  const uint32_t full = p.GrantsOver(30);
  BOOST_CHECK_GE(full, 59u);
  BOOST_CHECK_LE(full, 61u);
  uint32_t unknown = 99;
  BOOST_REQUIRE(p.tp.pool->SetShares(Shares{{"k0", Share(60)}, {"nope", Share(1)}}, &unknown).ok());
  BOOST_CHECK_EQUAL(unknown, 1u);
  const KeyStatus k = p.Key("k0");
  BOOST_CHECK(k.share_active);
  BOOST_CHECK_EQUAL(k.share_rpm, 60.0);
  BOOST_CHECK_EQUAL(k.share_burst, 1u);
  const uint32_t half = p.GrantsOver(30);
  BOOST_CHECK_GE(half, 29u);
  BOOST_CHECK_LE(half, 31u);
  // A fractional share (thousandths of a request per minute): 6.5 rpm.
  BOOST_REQUIRE(p.tp.pool->SetShares(Shares{{"k0", Share(6.5)}}).ok());
  const uint32_t slow = p.GrantsOver(60);
  BOOST_CHECK_GE(slow, 5u);  // 9.2 s apart, after at most one interval owed from before
  BOOST_CHECK_LE(slow, 7u);
  BOOST_CHECK(p.tp.pool->CheckConsistency().ok());
}

// A share is paced with the pool's margin too: several hosts' smooth
// senders add up, against a provider that counts per second, to more than
// one sender at the same rate (paced as granted, 3 hosts had 1 % of their
// calls refused in scripts/demo --hosts 3).
BOOST_AUTO_TEST_CASE(a_share_is_paced_with_the_pools_margin) {
  PacedPool p(1, 120, nullptr, 0.25);  // configured: 120 rpm paced at 90 rpm
  p.clock.Set(1000 * kSec);
  const uint32_t configured = p.GrantsOver(60);
  BOOST_CHECK_GE(configured, 89u);
  BOOST_CHECK_LE(configured, 91u);
  BOOST_REQUIRE(p.tp.pool->SetShares(Shares{{"k0", Share(80)}}).ok());  // paced at 60 rpm
  const uint32_t shared = p.GrantsOver(60);
  BOOST_CHECK_GE(shared, 59u);
  BOOST_CHECK_LE(shared, 61u);
  BOOST_REQUIRE(p.tp.pool->ClearShares().ok());
  BOOST_CHECK_LE(p.GrantsOver(60), 91u);
}

BOOST_AUTO_TEST_CASE(share_burst_and_unlimited_dimensions) {
  PacedPool p(2, 60);
  p.clock.Set(1000 * kSec);
  // A burst of 5 under a share: five back to back, then paced.
  BOOST_REQUIRE(p.tp.pool->SetShares(Shares{{"k0", Share(60, 0, 5)}, {"k1", Share(0)}}).ok());
  uint32_t back_to_back = 0;
  while (true) {
    Result<LeaseHandle> r = p.tp.pool->TryAcquire();
    if (!r.ok()) break;
    BOOST_REQUIRE_EQUAL(r->slot, 0u);  // k1 has no share here
    BOOST_REQUIRE(p.tp.pool->Release(*r, Success()).ok());
    ++back_to_back;
    BOOST_REQUIRE_LT(back_to_back, 100u);
  }
  BOOST_CHECK_EQUAL(back_to_back, 5u);
  // A share of 0 tokens does not limit a key without a tpm: only its
  // limited dimensions follow the share.
  Must(p.tp.pool->AddKey(p.Def("free", 0)), "AddKey");
  BOOST_REQUIRE(p.tp.pool->SetShares(Shares{{"free", Share(0, 0)}}).ok());
  const KeyStatus f = p.Key("free");
  BOOST_CHECK(f.state == KeyState::kAvailable);
  BOOST_CHECK_EQUAL(f.requests_available, -1);
}

BOOST_AUTO_TEST_CASE(a_share_of_zero_blocks_and_clear_restores) {
  PacedPool p(1, 60);
  p.clock.Set(1000 * kSec);
  BOOST_REQUIRE(p.tp.pool->SetShares(Shares{{"k0", Share(0)}}).ok());
  KeyStatus k = p.Key("k0");
  BOOST_CHECK(k.state == KeyState::kThrottled);
  BOOST_CHECK_EQUAL(k.reason, "no mesh share on this host");
  BOOST_CHECK_EQUAL(k.requests_available, 0);
  uint64_t earliest = 0;
  Result<LeaseHandle> r = p.tp.pool->TryAcquire(nullptr, &earliest);
  BOOST_CHECK(!r.ok() && r.status().code() == Code::kNoAvailableKey);
  BOOST_CHECK_EQUAL(earliest, kNever);
  p.clock.AdvanceSeconds(3600);
  BOOST_CHECK(!p.tp.pool->TryAcquire().ok());  // never, however long
  BOOST_REQUIRE(p.tp.pool->ClearShares().ok());
  k = p.Key("k0");
  BOOST_CHECK(!k.share_active);
  BOOST_CHECK(k.state == KeyState::kAvailable);
  BOOST_CHECK_EQUAL(p.GrantsOver(10), 10u);  // its configured 60 rpm again
}

BOOST_AUTO_TEST_CASE(a_rising_share_does_not_inherit_a_tiny_shares_interval) {
  PacedPool p(1, 60);
  p.clock.Set(1000 * kSec);
  BOOST_REQUIRE(p.tp.pool->SetShares(Shares{{"k0", Share(0.1)}}).ok());  // one request per 10 min
  BOOST_REQUIRE_EQUAL(p.GrantsOver(1), 1u);
  BOOST_CHECK_GT(p.Key("k0").ready_in, 500.0);
  BOOST_REQUIRE(p.tp.pool->SetShares(Shares{{"k0", Share(60)}}).ok());
  BOOST_CHECK_LE(p.Key("k0").ready_in, 1.0);  // the one request owed, at the new rate
}

BOOST_AUTO_TEST_CASE(bad_shares_are_refused_and_change_nothing) {
  PacedPool p(2, 60);
  for (double bad : {-1.0, std::nan(""), 1e300, HUGE_VAL}) {
    Status st = p.tp.pool->SetShares(Shares{{"k0", Share(1)}, {"k1", Share(bad)}});
    BOOST_CHECK(st.code() == Code::kInvalidArgument);
    BOOST_CHECK(st.message().find("'k1'") != std::string::npos);
    st = p.tp.pool->SetShares(Shares{{"k0", Share(1, bad)}});
    BOOST_CHECK(st.code() == Code::kInvalidArgument);
  }
  BOOST_CHECK(!p.Key("k0").share_active);
}

BOOST_AUTO_TEST_CASE(reconfigure_keeps_shares_and_the_state_file_never_holds_them) {
  PacedPool p(1, 60);
  BOOST_REQUIRE(p.tp.pool->SetShares(Shares{{"k0", Share(12.5, 0, 3)}}).ok());
  KeyDefinition def = p.Def("k0", 90);
  def.weight = 4;
  BOOST_REQUIRE(p.tp.pool->Reconfigure(def).ok());
  KeyStatus k = p.Key("k0");
  BOOST_CHECK_EQUAL(k.rpm, 90u);
  BOOST_CHECK(k.share_active);
  BOOST_CHECK_EQUAL(k.share_rpm, 12.5);
  BOOST_CHECK_EQUAL(k.share_burst, 3u);
  // Re-admission (add_key of a known key) keeps them too.
  Must(p.tp.pool->AddKey(def), "AddKey");
  BOOST_CHECK(p.Key("k0").share_active);
  // Export and restore into a fresh pool (a restarted broker): no share.
  const std::vector<ExportedKey> exported = p.tp.pool->ExportKeyStates();
  BOOST_REQUIRE_EQUAL(exported.size(), 1u);
  PacedPool fresh(1, 60);
  BOOST_REQUIRE(fresh.tp.pool->RestoreKeyState("k0", exported[0].state).ok());
  BOOST_CHECK(!fresh.Key("k0").share_active);
  BOOST_CHECK_EQUAL(fresh.Key("k0").share_rpm, 0.0);
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_AUTO_TEST_SUITE(across_processes)

// A worker in another process waits for a key of `pool`; once it sleeps,
// `wake` makes the key grantable, and the worker must get it at once
// (woken, not timed out).
void ExpectWaiterWokenBy(PoolAdmin& pool, const std::function<void()>& wake) {
  Pipe result;
  ChildGuard child(ForkChild([&] {
    result.CloseRead();
    Result<LeaseHandle> r = pool.Acquire(20 * kSec);
    const uint64_t got = MonotonicNowNanos();
    if (!result.Put(got) || !r.ok()) return 1;
    return pool.Release(*r, Success()).ok() ? 0 : 2;
  }));
  result.CloseWrite();
  BOOST_REQUIRE_MESSAGE(WaitUntilAsleep(pool, child.pid), "the waiter never went to sleep");
  const uint64_t woken = MonotonicNowNanos();
  wake();
  uint64_t got = 0;
  BOOST_REQUIRE(result.Get(&got));
  BOOST_CHECK_EQUAL(child.Wait(), 0);
  BOOST_CHECK_GE(got, woken);
  BOOST_CHECK_LT(got - woken, 100'000'000u);
}

// A worker in another process waits for the only key, which has no share on
// this host; the share rises and the worker gets the key at once.
BOOST_AUTO_TEST_CASE(raising_a_share_from_zero_wakes_a_waiter_in_another_process) {
  PacedPool p(1, 600, &SystemClock::Instance());
  BOOST_REQUIRE(p.tp.pool->SetShares(Shares{{"k0", Share(0)}}).ok());
  ExpectWaiterWokenBy(*p.tp.pool, [&] { BOOST_REQUIRE(p.tp.pool->SetShares(Shares{{"k0", Share(300)}}).ok()); });
  BOOST_CHECK(p.tp.pool->CheckConsistency().ok());
}

BOOST_AUTO_TEST_CASE(shares_lapse_when_the_broker_stops_renewing_them) {
  // A host whose broker died: its lease at Redis ends, the others are
  // granted its share, so its workers must stop using theirs.
  PacedPool p(1, 600000, &SystemClock::Instance());
  BOOST_REQUIRE(p.tp.pool->SetShares(Shares{{"k0", Share(300000, 0, 1000)}}).ok());
  p.tp.pool->SetShareDeadline(MonotonicNowNanos() + 60 * kSec);
  Result<LeaseHandle> ok = p.tp.pool->TryAcquire();
  BOOST_REQUIRE(ok.ok());
  BOOST_REQUIRE(p.tp.pool->Release(*ok, Success()).ok());
  p.tp.pool->SetShareDeadline(MonotonicNowNanos() - 1);
  Result<LeaseHandle> lapsed = p.tp.pool->TryAcquire();
  BOOST_REQUIRE(!lapsed.ok());
  BOOST_CHECK(lapsed.status().code() == Code::kNoAvailableKey);
  BOOST_CHECK_MESSAGE(lapsed.status().message().find("has not renewed its shares") != std::string::npos,
                      lapsed.status().message());
  // A waiter in another process is woken when the broker vouches again.
  ExpectWaiterWokenBy(*p.tp.pool, [&] { p.tp.pool->SetShareDeadline(MonotonicNowNanos() + 60 * kSec); });
  // Without a share the deadline means nothing (a host alone). An acquire
  // that may wait: the waiter's grant just now leaves the key paced for up
  // to one interval (100 us at 600000 rpm), which a TryAcquire on a fast
  // machine met now and then; a lapsed deadline would keep it out for good.
  BOOST_REQUIRE(p.tp.pool->ClearShares().ok());
  p.tp.pool->SetShareDeadline(MonotonicNowNanos() - 1);
  Result<LeaseHandle> alone = p.tp.pool->Acquire(kSec);
  BOOST_CHECK_MESSAGE(alone.ok(), alone.status().ToString());
}

// Runs `fn` on the pool in a forked worker and waits for it.
void InWorker(PoolAdmin& pool, const std::function<bool(PoolAdmin&)>& fn) {
  ChildGuard child(ForkChild([&] { return fn(pool) ? 0 : 1; }));
  BOOST_REQUIRE_EQUAL(child.Wait(), 0);
}

BOOST_AUTO_TEST_CASE(events_seq_moves_on_what_other_hosts_must_learn) {
  TestPool t(2, MakeConfig(Strategy::kRoundRobin, 60, /*max_failures=*/1));
  PoolAdmin& pool = *t.pool;
  uint64_t seq = pool.EventsSeq();
  auto moved = [&] {
    const uint64_t now = pool.EventsSeq();
    const bool m = now != seq;
    seq = now;
    return m;
  };
  // A plain success in a worker: nothing to publish.
  InWorker(pool, [](PoolAdmin& w) {
    Result<LeaseHandle> r = w.TryAcquire();
    return r.ok() && w.Release(*r, Success(0.1)).ok();
  });
  BOOST_CHECK(!moved());
  // A 429 in a worker.
  InWorker(pool, [](PoolAdmin& w) {
    Result<LeaseHandle> r = w.TryAcquire();
    return r.ok() && w.Release(*r, RateLimited(5.0)).ok();
  });
  BOOST_CHECK(moved());
  // A failure that opens the circuit (max_failures 1).
  InWorker(pool, [](PoolAdmin& w) {
    Result<LeaseHandle> r = w.TryAcquire();
    return r.ok() && w.Release(*r, Failure()).code() == Code::kKeyExhausted;
  });
  BOOST_CHECK(moved());
  // Provider limits that move a cooldown later, and ones that do not.
  // (Round robin: k0 took the success and the failure, k1 the 429 of 5 s.)
  LimitUpdate later;
  later.retry_after = 30.0;
  BOOST_REQUIRE(pool.ObserveLimits("k1", later).ok());
  BOOST_CHECK(moved());
  later.retry_after = 1.0;
  BOOST_REQUIRE(pool.ObserveLimits("k1", later).ok());
  BOOST_CHECK(!moved());
  // The operator's disable (once: a second disable changes nothing), enable, reset.
  BOOST_REQUIRE(pool.SetEnabled("k1", false).ok());
  BOOST_CHECK(moved());
  BOOST_REQUIRE(pool.SetEnabled("k1", false).ok());
  BOOST_CHECK(!moved());
  BOOST_REQUIRE(pool.SetEnabled("k1", true).ok());
  BOOST_CHECK(moved());
  BOOST_REQUIRE(pool.ResetKey("k0").ok());
  BOOST_CHECK(moved());
  // Shares and remote state: the mesh job's own writes are not events.
  BOOST_REQUIRE(pool.SetShares(Shares{{"k0", Share(5)}}).ok());
  BOOST_REQUIRE(pool.ClearShares().ok());
  RemoteKeyState r;
  r.cool_until = MonotonicNowNanos() + 100 * kSec;
  r.open_until = MonotonicNowNanos() + 50 * kSec;
  r.enabled = false;
  BOOST_REQUIRE(pool.MergeRemote("k0", r).ok());
  RemoteKeyState again;
  again.reset = true;
  again.revoke = true;
  BOOST_REQUIRE(pool.MergeRemote("k1", again).ok());
  BOOST_CHECK(!moved());
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_AUTO_TEST_SUITE(merge_remote)

BOOST_AUTO_TEST_CASE(never_shortens_a_deadline) {
  FakeClock clock;
  clock.Set(1000 * kSec);
  TestPool t(1, MakeConfig(Strategy::kLeastBusy), clock);
  RemoteKeyState r;
  r.cool_until = 1100 * kSec;
  BOOST_REQUIRE(t.pool->MergeRemote("k0", r).ok());
  PoolStatus s = t.Snap();
  BOOST_CHECK(t.Key(s, "k0").state == KeyState::kCooling);
  BOOST_CHECK_CLOSE(t.Key(s, "k0").cooldown_remaining, 100.0, 1e-6);
  r.cool_until = 1050 * kSec;  // earlier: ignored
  BOOST_REQUIRE(t.pool->MergeRemote("k0", r).ok());
  r.cool_until = 0;
  BOOST_REQUIRE(t.pool->MergeRemote("k0", r).ok());
  s = t.Snap();
  BOOST_CHECK_CLOSE(t.Key(s, "k0").cooldown_remaining, 100.0, 1e-6);
  BOOST_CHECK_EQUAL(t.pool->NextDeadline(), 1100 * kSec);
  clock.Set(1100 * kSec);
  BOOST_CHECK(t.pool->TryAcquire().ok());
  BOOST_CHECK(t.pool->MergeRemote("nope", r).code() == Code::kUnknownKey);
  // A hostile deadline (years away) is honoured up to max_cooldown (600 s).
  r.cool_until = kNever;
  BOOST_REQUIRE(t.pool->MergeRemote("k0", r).ok());
  s = t.Snap();
  BOOST_CHECK_CLOSE(t.Key(s, "k0").cooldown_remaining, 600.0, 1e-6);
}

BOOST_AUTO_TEST_CASE(opens_extends_and_closes_circuits) {
  FakeClock clock;
  clock.Set(1000 * kSec);
  TestPool t(1, MakeConfig(Strategy::kLeastBusy), clock);
  RemoteKeyState open;
  open.open_until = 1010 * kSec;
  BOOST_REQUIRE(t.pool->MergeRemote("k0", open).ok());
  PoolStatus s = t.Snap();
  BOOST_CHECK(t.Key(s, "k0").circuit == CircuitState::kOpen);
  BOOST_CHECK(t.Key(s, "k0").state == KeyState::kExhausted);
  std::vector<ExportedKey> e = t.pool->ExportKeyStates();
  BOOST_REQUIRE_EQUAL(e.size(), 1u);
  BOOST_CHECK_EQUAL(e[0].open_until, 1010 * kSec);
  BOOST_CHECK(!e[0].revoked);
  // Extended by another host (no probe here before then), never shortened.
  open.open_until = 1020 * kSec;
  BOOST_REQUIRE(t.pool->MergeRemote("k0", open).ok());
  open.open_until = 1005 * kSec;
  BOOST_REQUIRE(t.pool->MergeRemote("k0", open).ok());
  clock.Set(1015 * kSec);
  BOOST_CHECK(!t.pool->TryAcquire().ok());
  BOOST_CHECK_EQUAL(t.pool->ExportKeyStates()[0].open_until, 1020 * kSec);
  // A probe elsewhere succeeded: closed, and back once the deadline passed.
  RemoteKeyState close;
  close.close_circuit = true;
  close.open_until = 1030 * kSec;  // ignored with close_circuit
  BOOST_REQUIRE(t.pool->MergeRemote("k0", close).ok());
  s = t.Snap();
  BOOST_CHECK(t.Key(s, "k0").circuit == CircuitState::kClosed);
  clock.Set(1020 * kSec);
  Result<LeaseHandle> h = t.pool->TryAcquire();
  BOOST_REQUIRE(h.ok());
  BOOST_CHECK(t.Snap().keys[0].circuit == CircuitState::kClosed);  // not a probe
  // A local probe in flight (half-open) is closed by a remote success too.
  BOOST_REQUIRE(t.pool->Release(*h, Success()).ok());
  open.open_until = 1021 * kSec;
  BOOST_REQUIRE(t.pool->MergeRemote("k0", open).ok());
  clock.Set(1022 * kSec);
  Result<LeaseHandle> probe = t.pool->TryAcquire();
  BOOST_REQUIRE(probe.ok());
  BOOST_CHECK(t.Snap().keys[0].circuit == CircuitState::kHalfOpen);
  BOOST_REQUIRE(t.pool->MergeRemote("k0", close).ok());
  BOOST_CHECK(t.Snap().keys[0].circuit == CircuitState::kClosed);
  BOOST_CHECK(t.pool->Release(*probe, Success()).ok());
  BOOST_CHECK(t.pool->CheckConsistency().ok());
}

BOOST_AUTO_TEST_CASE(revokes_enables_and_resets) {
  FakeClock clock;
  clock.Set(1000 * kSec);
  TestPool t(1, MakeConfig(Strategy::kLeastBusy), clock);
  RemoteKeyState r;
  r.revoke = true;
  BOOST_REQUIRE(t.pool->MergeRemote("k0", r).ok());
  BOOST_CHECK(t.Snap().keys[0].state == KeyState::kRevoked);
  BOOST_CHECK(t.pool->ExportKeyStates()[0].revoked);
  BOOST_CHECK(!t.pool->TryAcquire().ok());
  RemoteKeyState reset;
  reset.reset = true;
  reset.enabled = false;
  BOOST_REQUIRE(t.pool->MergeRemote("k0", reset).ok());
  BOOST_CHECK(t.Snap().keys[0].state == KeyState::kDisabled);
  BOOST_CHECK(t.Snap().keys[0].circuit == CircuitState::kClosed);
  RemoteKeyState enable;
  enable.enabled = true;
  BOOST_REQUIRE(t.pool->MergeRemote("k0", enable).ok());
  BOOST_CHECK(t.Snap().keys[0].state == KeyState::kAvailable);
  BOOST_CHECK(t.pool->TryAcquire().ok());
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_AUTO_TEST_SUITE(crash)

// SIGKILLed inside SetShares: the first key's share committed, the second
// key's half-written one undone by the next locker's repair.
int g_crash_fd = -1;
int g_crash_count = 0;
void ParkOnSecond(CrashPoint point) {
  if (point != CrashPoint::kAdminMidMutation || ++g_crash_count < 2) return;
  (void)!::write(g_crash_fd, "c", 1);
  for (;;) pause();  // the parent SIGKILLs us here, pool mutex held
}

BOOST_AUTO_TEST_CASE(sigkill_inside_set_shares_leaves_a_consistent_pool) {
  PacedPool p(3, 60, &SystemClock::Instance());
  BOOST_REQUIRE(p.tp.pool->SetShares(Shares{{"k0", Share(6)}, {"k1", Share(6)}, {"k2", Share(6)}}).ok());
  Pipe crashed;
  ChildGuard child(ForkChild([&] {
    crashed.CloseRead();
    g_crash_fd = crashed.write_fd();
    SetCrashHookForTesting(&ParkOnSecond);
    (void)p.tp.pool->SetShares(Shares{{"k0", Share(30, 0, 2)}, {"k1", Share(30, 0, 2)}, {"k2", Share(30, 0, 2)}});
    return 13;  // the hook was not reached
  }));
  crashed.CloseWrite();
  BOOST_REQUIRE_EQUAL(crashed.WaitByte(20), 'c');
  BOOST_CHECK_GT(p.tp.pool->header()->undo_count.load(), 0u);
  BOOST_CHECK_EQUAL(child.KillAndWait(), 128 + SIGKILL);
  Status cons = p.tp.pool->CheckConsistency();
  BOOST_REQUIRE_MESSAGE(cons.ok(), cons.ToString());
  BOOST_CHECK_EQUAL(p.tp.pool->header()->undo_count.load(), 0u);
  const KeyStatus k0 = p.Key("k0"), k1 = p.Key("k1"), k2 = p.Key("k2");
  BOOST_CHECK_EQUAL(k0.share_rpm, 30.0);  // committed before the kill
  BOOST_CHECK_EQUAL(k0.share_burst, 2u);
  BOOST_CHECK_EQUAL(k1.share_rpm, 6.0);  // undone whole: its old share
  BOOST_CHECK_EQUAL(k1.share_burst, 1u);
  BOOST_CHECK(k1.share_active);
  BOOST_CHECK_EQUAL(k2.share_rpm, 6.0);
  // The pool works: the next SetShares and acquires go through.
  BOOST_REQUIRE(p.tp.pool->SetShares(Shares{{"k1", Share(30, 0, 2)}, {"k2", Share(30, 0, 2)}}).ok());
  BOOST_CHECK_EQUAL(p.Key("k1").share_rpm, 30.0);
  Result<LeaseHandle> h = p.tp.pool->TryAcquire();
  BOOST_REQUIRE(h.ok());
  BOOST_CHECK(p.tp.pool->Release(*h, Success()).ok());
  BOOST_CHECK(p.tp.pool->CheckConsistency().ok());
}

BOOST_AUTO_TEST_SUITE_END()

}  // namespace keymesh::shm
