// Crash tests: a forked child parked inside a critical section (test hook,
// pool mutex held) is SIGKILLed; the next locker must find the owner dead,
// undo the interrupted operation from the journal, rebuild the derived index
// and leave the pool exact. And: a child killed while holding leases (outside
// any critical section) is reclaimed exactly, nobody else's leases touched.
#define BOOST_TEST_MODULE shm_crash_test
#include <signal.h>

#include <map>

#include <boost/test/unit_test.hpp>

#include "keymesh/selector.h"
#include "shm/process_id.h"
#include "support/shm_fixtures.h"

namespace keymesh::shm {
namespace {

using testing::ChildGuard;
using testing::ForkChild;
using testing::Must;
using testing::Pipe;
using testing::TestPool;

// --- the hook (child side) ---------------------------------------------------
int g_crash_fd = -1;
CrashPoint g_target = CrashPoint::kAcquireAfterJournal;

void ParkHook(CrashPoint point) {
  if (point != g_target) return;
  const char b = static_cast<char>(point);
  (void)!::write(g_crash_fd, &b, 1);
  for (;;) pause();  // the parent SIGKILLs us here, pool mutex held
}

// Picks a fixed slot (deterministic set-up, independent of the strategy).
class Fixed final : public Selector {
 public:
  explicit Fixed(uint32_t slot) : slot_(slot) {}
  std::optional<uint32_t> Select(const SelectionContext&) const override { return slot_; }

 private:
  uint32_t slot_;
};

using testing::Failure;
using testing::Success;

LeaseHandle TakeSlot(PoolAdmin& pool, uint32_t slot) {
  Fixed sel(slot);
  Result<LeaseHandle> r = pool.TryAcquire(&sel);
  BOOST_REQUIRE_MESSAGE(r.ok(), r.status().ToString());
  return *r;
}

// The observable state of a pool that an interrupted operation must not
// change (time-dependent fields left out).
struct KeyFacts {
  uint32_t in_flight, fail_streak, rl_streak, weight, max_concurrency;
  uint64_t acquires, successes, failures, rate_limited, cancelled, reclaimed, fingerprint;
  double latency;
  bool has_latency, enabled;
  KeyState state;
  bool operator==(const KeyFacts&) const = default;
};
using Facts = std::map<std::string, KeyFacts>;

Facts FactsOf(const PoolStatus& s) {
  Facts f;
  for (const KeyStatus& k : s.keys) {
    f[k.name] =
        KeyFacts{k.in_flight,   k.fail_streak, k.rate_limit_streak, k.weight,    k.max_concurrency, k.acquires,
                 k.successes,   k.failures,    k.rate_limited,      k.cancelled, k.reclaimed,       k.fingerprint,
                 k.latency_avg, k.has_latency, k.enabled,           k.state};
  }
  return f;
}

void CheckFactsEqual(const Facts& got, const Facts& want) {
  BOOST_CHECK_EQUAL(got.size(), want.size());
  for (const auto& [name, w] : want) {
    auto it = got.find(name);
    BOOST_REQUIRE_MESSAGE(it != got.end(), "key " << name << " vanished");
    const KeyFacts& g = it->second;
    BOOST_TEST_CONTEXT("key " << name) {
      BOOST_CHECK_EQUAL(g.in_flight, w.in_flight);
      BOOST_CHECK_EQUAL(g.acquires, w.acquires);
      BOOST_CHECK_EQUAL(g.successes, w.successes);
      BOOST_CHECK_EQUAL(g.failures, w.failures);
      BOOST_CHECK_EQUAL(g.rate_limited, w.rate_limited);
      BOOST_CHECK_EQUAL(g.cancelled, w.cancelled);
      BOOST_CHECK_EQUAL(g.reclaimed, w.reclaimed);
      BOOST_CHECK_EQUAL(g.fail_streak, w.fail_streak);
      BOOST_CHECK(g == w);
    }
  }
}

enum class Op { kAcquire, kRelease, kAddNewKey, kReadmitKey, kRemoveKey };

struct Scenario {
  CrashPoint point;
  Op op;
  const char* what;
};

// Checks the pool is fully usable: exactly the free capacity can be
// acquired (the rebuilt index agrees with the state), then released.
void CheckUsable(TestPool& t) {
  PoolStatus s = t.Snap();
  uint32_t free_capacity = 0;
  for (const KeyStatus& k : s.keys) {
    if (k.state == KeyState::kAvailable) free_capacity += k.max_concurrency - k.in_flight;
  }
  std::vector<LeaseHandle> got;
  for (;;) {
    Result<LeaseHandle> r = t.pool->TryAcquire();
    if (!r.ok()) {
      BOOST_CHECK(r.status().code() == Code::kNoAvailableKey);
      break;
    }
    got.push_back(*r);
    BOOST_REQUIRE_LE(got.size(), 100u);
  }
  BOOST_CHECK_EQUAL(got.size(), free_capacity);
  for (const LeaseHandle& h : got) BOOST_CHECK(t.pool->Release(h, Outcome{}).ok());
}

void RunCrashScenario(Strategy strategy, const Scenario& sc) {
  BOOST_TEST_MESSAGE("strategy " << StrategyName(strategy) << ", " << sc.what);
  constexpr uint32_t kCap = 3;
  TestPool t(3, testing::MakeConfig(strategy, 60, /*max_failures=*/2), SystemClock::Instance(), Capacities{1, 8, 64},
             kCap, {1, 2, 3});
  // History, so that an undo to zero would show.
  for (uint32_t s = 0; s < 3; ++s) {
    BOOST_REQUIRE(t.pool->Release(TakeSlot(*t.pool, s), Success(0.1 * (s + 1))).ok());
    BOOST_REQUIRE(t.pool->Release(TakeSlot(*t.pool, s), Failure()).ok());
  }
  // k2 exhausted (for re-admission), k1 being removed with one lease held.
  BOOST_REQUIRE(t.pool->Release(TakeSlot(*t.pool, 2), Failure()).code() == Code::kKeyExhausted);
  // The parent's own leases: they must survive the child's crash.
  LeaseHandle mine0 = TakeSlot(*t.pool, 0);
  LeaseHandle mine1 = TakeSlot(*t.pool, 1);
  if (sc.op == Op::kRemoveKey) BOOST_REQUIRE(t.pool->RemoveKey("k1").ok());

  Pipe prepared, go, crashed;
  ChildGuard child(ForkChild([&] {
    prepared.CloseRead();
    go.CloseWrite();
    crashed.CloseRead();
    std::optional<LeaseHandle> mine;
    if (sc.op == Op::kRelease) {
      Result<LeaseHandle> r = t.pool->TryAcquire(nullptr);
      if (!r.ok()) return 10;
      mine = *r;
    }
    if (!prepared.Put('p')) return 11;
    char c = 0;
    if (!go.Get(&c)) return 12;
    g_crash_fd = crashed.write_fd();
    g_target = sc.point;
    SetCrashHookForTesting(&ParkHook);
    KeyDefinition def;
    switch (sc.op) {
      case Op::kAcquire: (void)t.pool->TryAcquire(nullptr); break;
      case Op::kRelease: (void)t.pool->Release(*mine, Success(5.0)); break;
      case Op::kAddNewKey:
        def.name = "k9";
        def.fingerprint = 9;
        def.max_concurrency = kCap;
        (void)t.pool->AddKey(def);
        break;
      case Op::kReadmitKey:
      case Op::kRemoveKey:  // re-admits the key being removed
        def.name = sc.op == Op::kReadmitKey ? "k2" : "k1";
        def.fingerprint = 77;
        def.weight = 5;
        def.max_concurrency = kCap;
        (void)t.pool->AddKey(def);
        break;
    }
    return 13;  // the hook was not reached
  }));
  prepared.CloseWrite();
  go.CloseRead();
  crashed.CloseWrite();

  char c = 0;
  BOOST_REQUIRE_MESSAGE(prepared.Get(&c), "child failed to prepare");
  const std::optional<uint64_t> start = ReadStartTime(child.pid);
  BOOST_REQUIRE(start.has_value());
  const ProcessId child_id{static_cast<uint32_t>(child.pid), *start};
  const PoolStatus before_status = t.Snap();
  const Facts before = FactsOf(before_status);
  BOOST_REQUIRE(go.Put('g'));
  BOOST_REQUIRE_MESSAGE(crashed.Get(&c), "child never reached the crash point");
  BOOST_REQUIRE_EQUAL(static_cast<uint32_t>(c), static_cast<uint32_t>(sc.point));
  // The child is parked with the mutex held; nobody else writes the pool.
  const uint32_t journal_active = t.pool->header()->undo_count.load();  // entries in effect
  BOOST_CHECK_EQUAL(child.KillAndWait(), 128 + SIGKILL);

  // The next locker repairs (EOWNERDEAD), then everything is exact.
  Status cons = t.pool->CheckConsistency();
  BOOST_REQUIRE_MESSAGE(cons.ok(), cons.ToString());
  BOOST_CHECK_EQUAL(t.pool->header()->undo_count.load(), 0u);
  const PoolStatus after_status = t.Snap();
  Facts after = FactsOf(after_status);

  if (sc.point == CrashPoint::kAcquireAfterCommit) {
    // Committed before the kill: the child's lease exists, held by a dead
    // process; only the derived index had to be rebuilt.
    BOOST_CHECK_EQUAL(journal_active, 0u);
    std::string granted;
    for (auto& [name, f] : after) {
      const KeyFacts& b = before.at(name);
      if (f.acquires == b.acquires + 1) {
        BOOST_CHECK(granted.empty());
        granted = name;
        BOOST_CHECK_EQUAL(f.in_flight, b.in_flight + 1);
        f.acquires -= 1;  // the rest must be unchanged
        f.in_flight -= 1;
        f.state = b.state;
      }
    }
    BOOST_CHECK(!granted.empty());
    CheckFactsEqual(after, before);
    BOOST_CHECK_EQUAL(Must(t.pool->ReclaimProcess(child_id), "ReclaimProcess"), 1u);
    const Facts reclaimed = FactsOf(t.Snap());
    BOOST_CHECK_EQUAL(reclaimed.at(granted).reclaimed, before.at(granted).reclaimed + 1);
    BOOST_CHECK_EQUAL(reclaimed.at(granted).in_flight, before.at(granted).in_flight);
  } else {
    // Interrupted: undone completely.
    BOOST_CHECK_GE(journal_active, 1u);  // undo entries in effect
    CheckFactsEqual(after, before);
    BOOST_CHECK_EQUAL(after_status.totals.acquires, before_status.totals.acquires);
    BOOST_CHECK_EQUAL(after_status.totals.releases, before_status.totals.releases);
    BOOST_CHECK_EQUAL(t.pool->header()->key_count, before_status.keys.size());
    if (sc.op == Op::kAddNewKey) BOOST_CHECK(!t.pool->FindByName("k9").has_value());
    // A lease the dead child held before the interrupted release is still
    // its, and is reclaimed like any dead holder's.
    const uint32_t expect = sc.op == Op::kRelease ? 1u : 0u;
    BOOST_CHECK_EQUAL(Must(t.pool->ReclaimDead(), "ReclaimDead"), expect);
  }
  BOOST_CHECK(t.pool->CheckConsistency().ok());

  // The pool is fully usable, the parent's leases still valid.
  CheckUsable(t);
  BOOST_CHECK(t.pool->Release(mine0, Outcome{}).ok());
  BOOST_CHECK(t.pool->Release(mine1, Outcome{}).ok());
  KeyDefinition def;
  def.name = "k9";
  def.max_concurrency = kCap;
  BOOST_CHECK(t.pool->AddKey(def).ok());
  BOOST_CHECK(t.pool->CheckConsistency().ok());
  for (const KeyStatus& k : t.Snap().keys) BOOST_CHECK_EQUAL(k.in_flight, 0u);
  BOOST_CHECK(t.pool->Holders().empty());
}

const Scenario kScenarios[] = {
    {CrashPoint::kAcquireAfterJournal, Op::kAcquire, "acquire after journal"},
    {CrashPoint::kAcquireMidMutation, Op::kAcquire, "acquire mid mutation"},
    {CrashPoint::kAcquireAfterCommit, Op::kAcquire, "acquire after commit"},
    {CrashPoint::kReleaseMidMutation, Op::kRelease, "release mid mutation"},
    {CrashPoint::kAdminMidMutation, Op::kAddNewKey, "add new key mid mutation"},
    {CrashPoint::kAdminMidMutation, Op::kReadmitKey, "re-admit exhausted key mid mutation"},
    {CrashPoint::kAdminMidMutation, Op::kRemoveKey, "re-admit a key being removed mid mutation"},
};

}  // namespace

BOOST_AUTO_TEST_SUITE(killed_inside_critical_section)

BOOST_AUTO_TEST_CASE(round_robin) {
  for (const Scenario& sc : kScenarios) RunCrashScenario(Strategy::kRoundRobin, sc);
}
BOOST_AUTO_TEST_CASE(least_busy) {
  for (const Scenario& sc : kScenarios) RunCrashScenario(Strategy::kLeastBusy, sc);
}
BOOST_AUTO_TEST_CASE(weighted) {
  for (const Scenario& sc : kScenarios) RunCrashScenario(Strategy::kWeighted, sc);
}

BOOST_AUTO_TEST_SUITE_END()

// ===========================================================================
BOOST_AUTO_TEST_SUITE(killed_holding_leases)

// A child takes `n` leases, reports their slots, then parks (no lock held).
pid_t ForkHolder(PoolAdmin& pool, uint32_t n, Pipe& report, Pipe* release_cmd) {
  return ForkChild([&pool, n, &report, release_cmd] {
    report.CloseRead();
    if (release_cmd != nullptr) release_cmd->CloseWrite();
    std::vector<LeaseHandle> held;
    for (uint32_t i = 0; i < n; ++i) {
      Result<LeaseHandle> r = pool.TryAcquire();
      if (!r.ok()) return 20;
      held.push_back(*r);
      if (!report.Put(r->slot)) return 21;
    }
    if (release_cmd == nullptr) {
      for (;;) pause();
    }
    char c = 0;
    if (!release_cmd->Get(&c)) return 22;
    for (const LeaseHandle& h : held) {
      if (!pool.Release(h, Outcome{}).ok()) return 23;
    }
    return 0;
  });
}

void RunDeadHolder(bool use_reclaim_dead) {
  TestPool t(3, testing::MakeConfig(Strategy::kRoundRobin), SystemClock::Instance(), Capacities{1, 8, 64});
  std::vector<LeaseHandle> mine;
  for (int i = 0; i < 2; ++i) mine.push_back(*t.pool->TryAcquire());

  // A live worker with 2 leases and a victim with 4.
  Pipe live_report, live_cmd, victim_report;
  ChildGuard live(ForkHolder(*t.pool, 2, live_report, &live_cmd));
  live_report.CloseWrite();
  live_cmd.CloseRead();
  for (int i = 0; i < 2; ++i) {
    uint32_t s = 0;
    BOOST_REQUIRE(live_report.Get(&s));
  }
  ChildGuard victim(ForkHolder(*t.pool, 4, victim_report, nullptr));
  victim_report.CloseWrite();
  std::map<uint32_t, uint32_t> victim_slots;
  for (int i = 0; i < 4; ++i) {
    uint32_t s = 0;
    BOOST_REQUIRE(victim_report.Get(&s));
    ++victim_slots[s];
  }
  const ProcessId victim_id{static_cast<uint32_t>(victim.pid), *ReadStartTime(victim.pid)};
  const PoolStatus before = t.Snap();
  uint32_t in_flight_before = 0;
  for (const KeyStatus& k : before.keys) in_flight_before += k.in_flight;
  BOOST_REQUIRE_EQUAL(in_flight_before, 8u);

  BOOST_CHECK_EQUAL(victim.KillAndWait(), 128 + SIGKILL);
  BOOST_CHECK(t.pool->CheckConsistency().ok());  // no critical section was interrupted
  BOOST_CHECK_EQUAL(t.pool->Holders().size(), 3u);

  const uint32_t freed = use_reclaim_dead ? Must(t.pool->ReclaimDead(), "ReclaimDead")
                                          : Must(t.pool->ReclaimProcess(victim_id), "ReclaimProcess");
  BOOST_CHECK_EQUAL(freed, 4u);
  const PoolStatus after = t.Snap();
  for (size_t i = 0; i < after.keys.size(); ++i) {
    const KeyStatus& a = after.keys[i];
    const KeyStatus& b = before.keys[i];
    const uint32_t v = victim_slots.count(a.slot) ? victim_slots[a.slot] : 0;
    BOOST_TEST_CONTEXT("key " << a.name) {
      BOOST_CHECK_EQUAL(a.in_flight, b.in_flight - v);
      BOOST_CHECK_EQUAL(a.reclaimed, b.reclaimed + v);
      BOOST_CHECK_EQUAL(a.acquires, b.acquires);
      BOOST_CHECK_EQUAL(a.successes, b.successes);
      BOOST_CHECK_EQUAL(a.failures, b.failures);
    }
  }
  BOOST_CHECK_EQUAL(after.totals.reclaimed, 4u);
  BOOST_CHECK_EQUAL(t.pool->Holders().size(), 2u);
  // Nothing more to reclaim.
  BOOST_CHECK_EQUAL(Must(t.pool->ReclaimDead(), "ReclaimDead"), 0u);
  BOOST_CHECK_EQUAL(Must(t.pool->ReclaimProcess(victim_id), "ReclaimProcess"), 0u);

  // The live worker's and our leases are intact and end normally.
  BOOST_REQUIRE(live_cmd.Put('x'));
  BOOST_CHECK_EQUAL(live.Wait(), 0);
  for (const LeaseHandle& h : mine) BOOST_CHECK(t.pool->Release(h, Outcome{}).ok());
  const PoolStatus end = t.Snap();
  for (const KeyStatus& k : end.keys) BOOST_CHECK_EQUAL(k.in_flight, 0u);
  BOOST_CHECK_EQUAL(end.totals.releases, 4u);
  BOOST_CHECK_EQUAL(end.totals.reclaimed, 4u);
  BOOST_CHECK(t.pool->CheckConsistency().ok());
}

BOOST_AUTO_TEST_CASE(reclaim_process_frees_exactly_the_dead_holders_leases) { RunDeadHolder(false); }
BOOST_AUTO_TEST_CASE(reclaim_dead_frees_exactly_the_dead_holders_leases) { RunDeadHolder(true); }

BOOST_AUTO_TEST_SUITE_END()

}  // namespace keymesh::shm

namespace keymesh::shm {
namespace {

// A process that can write the segment forged the journal: entries naming
// words outside this pool's region, misaligned, inside the lock's line, and
// a slot image of a slot that does not exist; then it "died" holding the
// lock. The repair must ignore every such entry (no write outside the pool,
// no crash) and leave the pool exact.
BOOST_AUTO_TEST_CASE(repair_ignores_forged_journal_entries) {
  TestPool t(4, testing::MakeConfig(Strategy::kLeastBusy));
  LeaseHandle held = TakeSlot(*t.pool, 1);
  const PoolStatus before = t.Snap();
  PoolHeader* ph = t.pool->header();
  const uint64_t pool_header_at = reinterpret_cast<uint8_t*>(ph) - t.segment->base();
  uint64_t canary = 0x1234;  // process memory, not the segment
  const uint64_t outside_at = reinterpret_cast<uint8_t*>(&canary) - t.segment->base();
  const UndoEntry forged[] = {
      {0, 0xdead},                                                     // the segment header's magic
      {outside_at, 0xdead},                                            // beyond the mapping
      {pool_header_at + offsetof(PoolHeader, key_count) + 1, 0xdead},  // misaligned
      {pool_header_at, 0xdead},                                        // the lock word's line
      {pool_header_at + offsetof(PoolHeader, journal), 0},             // the journal itself
      {kUndoSlotImage, 1u << 30},                                      // no such slot
  };
  std::memcpy(ph->journal.entries, forged, sizeof(forged));
  ph->undo_count.store(kUndoCapacity + 7);      // more than the journal holds
  const uint32_t dead = RobustMutex::kPidMask;  // a pid no process has
  std::memcpy(static_cast<void*>(&ph->mutex), &dead, sizeof(dead));
  const uint64_t magic = t.segment->header()->magic;

  Status cons = t.pool->CheckConsistency();  // takes the lock: owner dead, repair
  BOOST_REQUIRE_MESSAGE(cons.ok(), cons.ToString());
  BOOST_CHECK_EQUAL(canary, 0x1234u);
  BOOST_CHECK_EQUAL(t.segment->header()->magic, magic);
  BOOST_CHECK_EQUAL(ph->undo_count.load(), 0u);
  const PoolStatus after = t.Snap();
  BOOST_REQUIRE_EQUAL(after.keys.size(), before.keys.size());
  for (size_t i = 0; i < after.keys.size(); ++i) {
    BOOST_CHECK_EQUAL(after.keys[i].name, before.keys[i].name);
    BOOST_CHECK_EQUAL(after.keys[i].in_flight, before.keys[i].in_flight);
    BOOST_CHECK_EQUAL(after.keys[i].acquires, before.keys[i].acquires);
  }
  BOOST_CHECK(t.pool->Release(held, Success()).ok());
  BOOST_CHECK(t.pool->CheckConsistency().ok());
}

}  // namespace
}  // namespace keymesh::shm
