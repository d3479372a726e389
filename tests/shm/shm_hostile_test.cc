// The segment as untrusted input (security review KM-01, KM-05, KM-06):
// values a process that can write the segment plants in a laid-out pool
// (the review's PoC A, and more), then the library's own operations run in
// a forked child, which must end normally with a Status, never by a signal;
// and a lock holder that stops (SIGSTOP) inside its critical section, which
// a view with a lock timeout must answer with kBusy instead of blocking.
#define BOOST_TEST_MODULE shm_hostile_test
#include <signal.h>
#include <sys/wait.h>

#include <cstring>
#include <functional>
#include <string>

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
using testing::Success;
using testing::TestPool;
using testing::WaitChild;

// A pool of four keys, one lease held by this process on k1, and direct
// access to the arrays a hostile writer would rewrite.
struct Planted {
  TestPool t{4, testing::MakeConfig(Strategy::kLeastBusy, 60.0, 10, 600.0, /*max_lease=*/600.0),
             SystemClock::Instance(), Capacities{2, 16, 64}};
  LeaseHandle held;
  ProcessId owner = Self();  // the holder of `held` (this process, not the forked child)

  Planted() { held = Must(t.pool->TryAcquire(), "TryAcquire"); }
  PoolHeader* ph() { return t.pool->header(); }
  uint8_t* data() { return t.segment->pool_data(t.index); }
  uint32_t* free_stack() { return reinterpret_cast<uint32_t*>(data() + t.segment->layout().plan.free_offset); }
  LeaseRecord* leases() { return reinterpret_cast<LeaseRecord*>(data() + t.segment->layout().plan.leases_offset); }
  uint32_t* tree() { return reinterpret_cast<uint32_t*>(data() + t.segment->layout().plan.tree_offset); }
  uint64_t* bits() { return reinterpret_cast<uint64_t*>(data() + t.segment->layout().plan.bits_offset); }
  void ForgeLockWord(uint32_t word) { std::memcpy(static_cast<void*>(&ph()->mutex), &word, sizeof(word)); }
  // A free lease record made to look held by `pid` (a process that is gone).
  void PlantHeldLease(uint32_t slot, uint32_t pid, uint64_t acquire_ns) {
    const uint32_t l = free_stack()[ph()->free_top - 1];
    LeaseRecord& r = leases()[l];
    r.state = LeaseState::kHeld;
    r.slot = slot;
    r.pid = pid;
    r.start_time = 77;
    r.acquire_ns = acquire_ns;
  }
};

// Runs `plant` then `victim` in a forked child. The child must exit 0: the
// victim returned (a Status, ok or not) and its own checks passed. Returns
// the exit code (128 + signal when a signal ended it).
int InChild(Planted& p, const std::function<void(Planted&)>& plant, const std::function<int(Planted&)>& victim) {
  ChildGuard child(ForkChild([&]() -> int {
    plant(p);
    return victim(p);
  }));
  return child.Wait();
}

// The victim's common ending: the pool is consistent again and serves.
int ConsistentAndServes(Planted& p) {
  Status cons = p.t.pool->CheckConsistency();
  if (!cons.ok()) {
    std::fprintf(stderr, "not consistent: %s\n", cons.ToString().c_str());
    return 20;
  }
  Result<LeaseHandle> r = p.t.pool->TryAcquire();
  if (!r.ok()) {
    std::fprintf(stderr, "no acquire: %s\n", r.status().ToString().c_str());
    return 21;
  }
  return p.t.pool->Release(*r, Success()).ok() ? 0 : 22;
}

int ExpectOk(const Status& st, int code) {
  if (st.ok()) return 0;
  std::fprintf(stderr, "unexpected: %s\n", st.ToString().c_str());
  return code;
}

BOOST_AUTO_TEST_CASE(a_free_stack_entry_beyond_the_leases_then_try_acquire) {
  Planted p;
  const int rc = InChild(
      p, [](Planted& p) { p.free_stack()[p.ph()->free_top - 1] = 0x40000000; },
      [](Planted& p) {
        Result<LeaseHandle> r = p.t.pool->TryAcquire();  // repaired, then granted
        if (const int e = ExpectOk(r.status(), 10)) return e;
        if (r->lease >= 64) return 11;
        return ConsistentAndServes(p);
      });
  BOOST_CHECK_EQUAL(rc, 0);
}

BOOST_AUTO_TEST_CASE(a_free_stack_top_beyond_the_leases_then_try_acquire) {
  Planted p;
  const int rc = InChild(
      p, [](Planted& p) { p.ph()->free_top = 0x7fffffff; },
      [](Planted& p) {
        if (const int e = ExpectOk(p.t.pool->TryAcquire().status(), 10)) return e;
        return ConsistentAndServes(p);
      });
  BOOST_CHECK_EQUAL(rc, 0);
}

BOOST_AUTO_TEST_CASE(a_held_lease_naming_a_slot_beyond_the_keys_then_reclaim_process) {
  Planted p;
  const int rc = InChild(
      p, [](Planted& p) { p.PlantHeldLease(0x3fffffff, RobustMutex::kPidMask, 1); },
      [](Planted& p) {
        Result<uint32_t> r = p.t.pool->ReclaimProcess(ProcessId{RobustMutex::kPidMask, 77});
        if (const int e = ExpectOk(r.status(), 10)) return e;
        // The forged record is not a lease of any key: the repair freed it
        // (not counted as a reclaim); the real lease is untouched.
        if (*r != 0) return 11;
        if (!p.t.pool->Release(p.held, Success(), p.owner).ok()) return 12;
        return ConsistentAndServes(p);
      });
  BOOST_CHECK_EQUAL(rc, 0);
}

BOOST_AUTO_TEST_CASE(a_held_lease_naming_a_slot_beyond_the_keys_then_reclaim_expired) {
  Planted p;
  const int rc = InChild(
      p, [](Planted& p) { p.PlantHeldLease(0x3fffffff, RobustMutex::kPidMask, 1); },
      [](Planted& p) {
        Result<uint32_t> r = p.t.pool->ReclaimExpired();
        if (const int e = ExpectOk(r.status(), 10)) return e;
        if (*r != 0) return 11;
        if (!p.t.pool->Release(p.held, Success(), p.owner).ok()) return 12;
        return ConsistentAndServes(p);
      });
  BOOST_CHECK_EQUAL(rc, 0);
}

BOOST_AUTO_TEST_CASE(a_slot_high_water_beyond_the_keys_then_snapshot) {
  Planted p;
  const int rc = InChild(
      p, [](Planted& p) { p.ph()->slot_high_water = 0x00ffffff; },
      [](Planted& p) {
        Result<PoolStatus> s = p.t.pool->Snapshot();
        if (const int e = ExpectOk(s.status(), 10)) return e;
        if (s->keys.size() != 4) return 11;           // the capacity bounds the walk
        if (p.ph()->slot_high_water != 4) return 12;  // the repair recomputed it from the slots
        return ConsistentAndServes(p);
      });
  BOOST_CHECK_EQUAL(rc, 0);
}

BOOST_AUTO_TEST_CASE(a_slot_high_water_hiding_keys_is_recomputed) {
  Planted p;
  const int rc = InChild(
      p, [](Planted& p) { p.ph()->slot_high_water = 0x00ffffff; },
      [](Planted& p) {
        // Any walk that meets the bad value repairs: the keys are all found.
        std::optional<uint32_t> slot;
        if (const int e = ExpectOk(p.t.pool->FindByName("k3", &slot), 10)) return e;
        if (slot != 3u) return 11;
        return ConsistentAndServes(p);
      });
  BOOST_CHECK_EQUAL(rc, 0);
}

BOOST_AUTO_TEST_CASE(an_index_of_huge_size_and_bad_nodes_then_release) {
  Planted p;
  const int rc = InChild(
      p,
      [](Planted& p) {
        p.ph()->tree_leaves = 0x7fffffff;
        p.ph()->eligible_count = 0x7fffffff;
        p.ph()->scan_idle = 0xffffffff;
        p.bits()[0] = ~uint64_t{0};
        for (uint32_t n = 0; n < 16; ++n) p.tree()[n] = 0x40000000 + n;
      },
      [](Planted& p) {
        if (const int e = ExpectOk(p.t.pool->Release(p.held, Success(), p.owner), 10)) return e;
        return ConsistentAndServes(p);
      });
  BOOST_CHECK_EQUAL(rc, 0);
}

BOOST_AUTO_TEST_CASE(a_scan_index_with_bits_beyond_the_keys_then_try_acquire) {
  Planted p;
  const int rc = InChild(
      p,
      [](Planted& p) {
        p.ph()->scan_idle = 0xffff0000;  // idle bits of slots that hold no key
        p.bits()[0] |= 0xffffffff00000000ull;
      },
      [](Planted& p) {
        Result<LeaseHandle> r = p.t.pool->TryAcquire();
        if (const int e = ExpectOk(r.status(), 10)) return e;
        if (r->slot >= 4) return 11;
        return ConsistentAndServes(p);
      });
  BOOST_CHECK_EQUAL(rc, 0);
}

BOOST_AUTO_TEST_CASE(a_journal_left_open_under_a_free_lock_is_repaired_first) {
  Planted p;
  const int rc = InChild(
      p, [](Planted& p) { p.ph()->undo_count.store(1000); },
      [](Planted& p) {
        if (const int e = ExpectOk(p.t.pool->TryAcquire().status(), 10)) return e;
        if (p.ph()->undo_count.load() != 0) return 11;
        return ConsistentAndServes(p);
      });
  BOOST_CHECK_EQUAL(rc, 0);
}

BOOST_AUTO_TEST_CASE(garbage_lock_words_count_as_a_dead_holder) {
  // Pid 0 with a tag, kWaiters alone, a pid beyond PID_MAX_LIMIT's range of
  // live processes: each is taken over (kOwnerDied: repair), never a crash
  // and never a wait on nobody.
  for (const uint32_t word : {uint32_t{5} << RobustMutex::kPidBits, RobustMutex::kWaiters,
                              RobustMutex::kPidMask | RobustMutex::kWaiters, ~uint32_t{0}}) {
    BOOST_TEST_CONTEXT("lock word " << std::hex << word) {
      Planted p;
      const int rc = InChild(
          p, [word](Planted& p) { p.ForgeLockWord(word); },
          [](Planted& p) {
            if (const int e = ExpectOk(p.t.pool->TryAcquire().status(), 10)) return e;
            return ConsistentAndServes(p);
          });
      BOOST_CHECK_EQUAL(rc, 0);
    }
  }
}

BOOST_AUTO_TEST_CASE(a_lock_word_planted_with_a_live_foreign_pid_is_busy_with_a_timeout) {
  // As robust_mutex.h says: a live process's pid with its right tag stops
  // the pool's users until that process ends; a lock timeout bounds it.
  const std::optional<uint64_t> start = ReadStartTime(1);
  if (!start) {
    BOOST_TEST_MESSAGE("no readable pid 1 here: skipped");
    return;
  }
  Planted p;
  const uint32_t word = 1u | (static_cast<uint32_t>(*start & RobustMutex::kTagMask) << RobustMutex::kPidBits);
  p.ForgeLockWord(word);
  PoolAdmin view(*p.t.segment, p.t.index);
  view.set_lock_timeout(50'000'000);
  Result<PoolStatus> s = view.Snapshot();
  BOOST_REQUIRE(!s.ok());
  BOOST_CHECK(s.status().code() == Code::kBusy);
  BOOST_CHECK_MESSAGE(s.status().message().find("held by pid 1 ") != std::string::npos, s.status().message());
  p.ForgeLockWord(0);
  BOOST_CHECK(view.Snapshot().ok());
}

// A process rewrites the segment during every attempt (the crash hook runs
// inside the critical section): the repair cannot make the state hold, so
// the view gives up with kSegmentError, and stays given up, cheaply.
PoolHeader* g_rewritten = nullptr;
void RewriteFreeTop(CrashPoint point) {
  if (point == CrashPoint::kAcquireBegin && g_rewritten != nullptr) g_rewritten->free_top = 0x7fffffff;
}

BOOST_AUTO_TEST_CASE(a_state_that_stays_inconsistent_poisons_the_view) {
  Planted p;
  const int rc = InChild(
      p,
      [](Planted& p) {
        g_rewritten = p.ph();
        SetCrashHookForTesting(&RewriteFreeTop);
      },
      [](Planted& p) {
        Result<LeaseHandle> r = p.t.pool->TryAcquire();
        if (r.ok() || r.status().code() != Code::kSegmentError) return 10;
        if (r.status().message().find("stayed inconsistent") == std::string::npos) return 11;
        if (p.t.pool->poisoned() == nullptr) return 12;
        SetCrashHookForTesting(nullptr);
        Result<PoolStatus> s = p.t.pool->Snapshot();  // poisoned: refused without the lock
        if (s.ok() || s.status().code() != Code::kSegmentError) return 13;
        // Another view (another process, the broker) repairs and serves.
        PoolAdmin fresh(*p.t.segment, p.t.index);
        if (!fresh.CheckConsistency().ok()) return 14;
        return fresh.TryAcquire().ok() ? 0 : 15;
      });
  BOOST_CHECK_EQUAL(rc, 0);
}

BOOST_AUTO_TEST_CASE(a_view_of_a_pool_beyond_the_segment_refuses_every_call) {
  Planted p;
  PoolAdmin view(*p.t.segment, 2);  // the segment holds pools 0 and 1
  BOOST_CHECK(view.poisoned() != nullptr);
  BOOST_CHECK(view.TryAcquire().status().code() == Code::kSegmentError);
  BOOST_CHECK(view.Snapshot().status().code() == Code::kSegmentError);
  uint32_t n = 7;
  BOOST_CHECK(view.AvailableCount(&n).code() == Code::kSegmentError);
  BOOST_CHECK_EQUAL(view.AvailableCount(), 0u);
  BOOST_CHECK(view.header() != nullptr);
}

// --- KM-05: a stopped lock holder ---------------------------------------------

// How long a call took, and whether it said kBusy in time.
template <typename Fn>
void ExpectBusyInTime(const char* what, Fn&& call) {
  const uint64_t t0 = MonotonicNowNanos();
  const Status st = call();
  const uint64_t ms = (MonotonicNowNanos() - t0) / 1'000'000;
  BOOST_TEST_CONTEXT(what << " (" << ms << " ms): " << st.ToString()) {
    BOOST_CHECK(st.code() == Code::kBusy);
    BOOST_CHECK_GE(ms, 99u);
    BOOST_CHECK_LT(ms, 1000u);  // ~100 ms, with room for a loaded machine
    BOOST_CHECK(st.message().find("is busy: its lock is held by pid") != std::string::npos);
  }
}

BOOST_AUTO_TEST_CASE(a_stopped_lock_holder_makes_a_timed_view_busy_not_blocked) {
  Planted p;
  // The child takes the pool's lock, stops itself inside the "critical
  // section", and lets go once continued.
  Pipe locked;
  ChildGuard child(ForkChild([&]() -> int {
    locked.CloseRead();
    (void)p.ph()->mutex.Lock();
    if (!locked.Put('L')) return 10;
    ::raise(SIGSTOP);
    p.ph()->mutex.Unlock();
    return 0;
  }));
  locked.CloseWrite();
  char c = 0;
  BOOST_REQUIRE(locked.Get(&c));
  int wstatus = 0;
  BOOST_REQUIRE_EQUAL(::waitpid(child.pid, &wstatus, WUNTRACED), child.pid);
  BOOST_REQUIRE(WIFSTOPPED(wstatus));

  PoolAdmin view(*p.t.segment, p.t.index);
  view.set_lock_timeout(100'000'000);
  BOOST_CHECK_EQUAL(view.lock_timeout(), 100'000'000u);
  ExpectBusyInTime("Snapshot", [&] { return view.Snapshot().status(); });
  ExpectBusyInTime("AvailableCount", [&] {
    uint32_t n = 0;
    return view.AvailableCount(&n);
  });
  ExpectBusyInTime("NextDeadline", [&] {
    uint64_t d = 0;
    return view.NextDeadline(&d);
  });
  ExpectBusyInTime("TryAcquire", [&] { return view.TryAcquire().status(); });
  ExpectBusyInTime("Acquire", [&] { return view.Acquire(5'000'000'000).status(); });
  ExpectBusyInTime("Release", [&] { return view.Release(p.held, Success()); });
  ExpectBusyInTime("FindByName", [&] {
    std::optional<uint32_t> s;
    return view.FindByName("k0", &s);
  });
  ExpectBusyInTime("KeyName", [&] {
    std::string name;
    return view.KeyName(0, &name);
  });
  ExpectBusyInTime("Holders", [&] {
    std::vector<ProcessId> h;
    return view.Holders(&h);
  });
  ExpectBusyInTime("ReclaimExpired", [&] { return view.ReclaimExpired().status(); });
  ExpectBusyInTime("ReclaimProcess", [&] { return view.ReclaimProcess(Self()).status(); });
  ExpectBusyInTime("ReclaimDead", [&] { return view.ReclaimDead().status(); });
  ExpectBusyInTime("ExportKeyStates", [&] {
    std::vector<ExportedKey> e;
    return view.ExportKeyStates(&e);
  });
  ExpectBusyInTime("FindByFingerprint", [&] {
    std::optional<uint32_t> s;
    return view.FindByFingerprint(1000, &s);
  });
  ExpectBusyInTime("SweepAndWake", [&] { return view.SweepAndWake(); });
  ExpectBusyInTime("CheckConsistency", [&] { return view.CheckConsistency(); });
  ExpectBusyInTime("RemoveKey", [&] { return view.RemoveKey("k0"); });
  ExpectBusyInTime("ResetKey", [&] { return view.ResetKey("k0"); });
  ExpectBusyInTime("SetEnabled", [&] { return view.SetEnabled("k0", false); });
  ExpectBusyInTime("AddKey", [&] {
    KeyDefinition def;
    def.name = "k9";
    return view.AddKey(def).status();
  });
  // The plain readers give the empty answer instead of blocking.
  BOOST_CHECK_EQUAL(view.AvailableCount(), 0u);
  BOOST_CHECK_EQUAL(view.KeyName(0), "");
  BOOST_CHECK(view.Holders().empty());

  // The holder continues and lets go: everything works again, and the busy
  // calls changed nothing (the lease is still held, k0 still enabled).
  ::kill(child.pid, SIGCONT);
  BOOST_CHECK_EQUAL(child.Wait(), 0);
  uint32_t n = 0;
  BOOST_CHECK(view.AvailableCount(&n).ok());
  BOOST_CHECK_EQUAL(n, 4u);
  std::vector<ProcessId> holders;
  BOOST_CHECK(view.Holders(&holders).ok());
  BOOST_CHECK_EQUAL(holders.size(), 1u);
  BOOST_CHECK(view.Release(p.held, Success()).ok());
  Result<PoolStatus> s = view.Snapshot();
  BOOST_REQUIRE(s.ok());
  BOOST_CHECK_EQUAL(s->keys.size(), 4u);
  BOOST_CHECK(view.CheckConsistency().ok());
}

}  // namespace
}  // namespace keymesh::shm
