// The pool lock (shm/robust_mutex.h) across real processes: mutual
// exclusion, a holder killed with SIGKILL (reaped, or left a zombie), a
// stopped holder and LockUntil, a word naming a process that is not its
// holder (a recycled pid), and sleeping instead of spinning.
#define BOOST_TEST_MODULE robust_mutex_test
#include "shm/robust_mutex.h"

#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <new>

#include <boost/test/unit_test.hpp>

#include "shm/clock.h"
#include "shm/process_id.h"
#include "support/shm_test_util.h"

namespace {

using keymesh::shm::LockOutcome;
using keymesh::shm::MonotonicNowNanos;
using keymesh::shm::RobustMutex;
using keymesh::shm::testing::ChildGuard;
using keymesh::shm::testing::ForkChild;
using keymesh::shm::testing::Pipe;
using keymesh::shm::testing::ProcessCpuNanos;

// A lock and a counter in memory shared with forked children.
struct Shared {
  RobustMutex mutex;
  uint64_t counter;  // guarded by mutex
};

struct SharedLock {
  Shared* s;
  SharedLock() {
    void* p = ::mmap(nullptr, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    BOOST_REQUIRE(p != MAP_FAILED);
    s = new (p) Shared();
    BOOST_REQUIRE(s->mutex.Init().ok());
    s->counter = 0;
  }
  ~SharedLock() { ::munmap(s, 4096); }
  // Writes the lock word directly, as any process that can write the
  // segment could.
  void ForgeWord(uint32_t word) { std::memcpy(static_cast<void*>(&s->mutex), &word, sizeof(word)); }
};

// A child that takes the lock, reports it, and waits to be killed.
pid_t HoldUntilKilled(Shared* s, Pipe& locked) {
  return ForkChild([&]() -> int {
    locked.CloseRead();
    if (s->mutex.Lock() != LockOutcome::kAcquired) return 10;
    s->counter += 1;  // a critical section left half done
    if (!locked.Put('L')) return 11;
    for (;;) ::pause();
  });
}

}  // namespace

BOOST_AUTO_TEST_CASE(excludes_across_processes) {
  SharedLock lock;
  constexpr int kProcs = 4;
  constexpr int kRounds = 20000;
  std::vector<pid_t> kids;
  for (int p = 0; p < kProcs; ++p) {
    kids.push_back(ForkChild([&]() -> int {
      for (int i = 0; i < kRounds; ++i) {
        if (lock.s->mutex.Lock() != LockOutcome::kAcquired) return 10;
        const uint64_t v = lock.s->counter;  // a non-atomic read-modify-write
        lock.s->counter = v + 1;
        lock.s->mutex.Unlock();
      }
      return 0;
    }));
  }
  for (pid_t k : kids) BOOST_CHECK_EQUAL(keymesh::shm::testing::WaitChild(k), 0);
  BOOST_CHECK_EQUAL(lock.s->counter, uint64_t{kProcs} * kRounds);
  BOOST_CHECK_EQUAL(lock.s->mutex.HolderPid(), 0u);
}

BOOST_AUTO_TEST_CASE(a_killed_holder_is_taken_over_with_owner_died) {
  SharedLock lock;
  Pipe locked;
  ChildGuard child(HoldUntilKilled(lock.s, locked));
  locked.CloseWrite();
  char c = 0;
  BOOST_REQUIRE(locked.Get(&c));
  BOOST_CHECK_EQUAL(lock.s->mutex.HolderPid(), static_cast<uint32_t>(child.pid));
  LockOutcome outcome;
  BOOST_CHECK(!lock.s->mutex.TryLock(&outcome));  // a live holder
  BOOST_CHECK_EQUAL(child.KillAndWait(), 128 + SIGKILL);
  BOOST_CHECK(lock.s->mutex.Lock() == LockOutcome::kOwnerDied);
  BOOST_CHECK_EQUAL(lock.s->mutex.HolderPid(), static_cast<uint32_t>(::getpid()));
  lock.s->mutex.Unlock();
  BOOST_CHECK(lock.s->mutex.Lock() == LockOutcome::kAcquired);
  lock.s->mutex.Unlock();
}

BOOST_AUTO_TEST_CASE(a_waiter_sleeping_on_the_lock_sees_the_holder_die) {
  SharedLock lock;
  Pipe locked;
  ChildGuard child(HoldUntilKilled(lock.s, locked));
  locked.CloseWrite();
  char c = 0;
  BOOST_REQUIRE(locked.Get(&c));
  // A second child waits in Lock() (spins, then sleeps on the futex); the
  // holder dies meanwhile; the waiter must come out with kOwnerDied.
  Pipe waiting, result;
  ChildGuard waiter(ForkChild([&]() -> int {
    waiting.CloseRead();
    result.CloseRead();
    if (!waiting.Put('W')) return 10;
    const LockOutcome o = lock.s->mutex.Lock();
    const char r = o == LockOutcome::kOwnerDied ? 'D' : 'A';
    lock.s->mutex.Unlock();
    return result.Put(r) ? 0 : 11;
  }));
  waiting.CloseWrite();
  result.CloseWrite();
  BOOST_REQUIRE(waiting.Get(&c));
  // Let the waiter reach its sleep: its kWaiters bit shows up in the word.
  const uint64_t until = MonotonicNowNanos() + 10 * keymesh::shm::kNanosPerSecond;
  uint32_t word = 0;
  for (;;) {
    std::memcpy(&word, static_cast<const void*>(&lock.s->mutex), sizeof(word));
    if ((word & RobustMutex::kWaiters) != 0 || MonotonicNowNanos() >= until) break;
    sched_yield();
  }
  BOOST_REQUIRE_MESSAGE(word & RobustMutex::kWaiters, "the waiter never slept on the lock");
  BOOST_CHECK_EQUAL(child.KillAndWait(), 128 + SIGKILL);
  BOOST_REQUIRE(result.Get(&c));
  BOOST_CHECK_EQUAL(c, 'D');
  BOOST_CHECK_EQUAL(waiter.Wait(), 0);
}

BOOST_AUTO_TEST_CASE(a_zombie_holder_counts_as_dead) {
  SharedLock lock;
  Pipe locked;
  const pid_t pid = HoldUntilKilled(lock.s, locked);
  locked.CloseWrite();
  char c = 0;
  BOOST_REQUIRE(locked.Get(&c));
  ::kill(pid, SIGKILL);
  // Not reaped yet: wait until /proc says it is a zombie, then lock.
  const uint64_t until = MonotonicNowNanos() + 10 * keymesh::shm::kNanosPerSecond;
  std::optional<keymesh::shm::ProcStat> st;
  while ((st = keymesh::shm::ReadProcStat(pid)) && !st->zombie && MonotonicNowNanos() < until) sched_yield();
  BOOST_REQUIRE(st.has_value() && st->zombie);
  BOOST_CHECK(lock.s->mutex.Lock() == LockOutcome::kOwnerDied);
  lock.s->mutex.Unlock();
  BOOST_CHECK_EQUAL(keymesh::shm::testing::WaitChild(pid), 128 + SIGKILL);
}

BOOST_AUTO_TEST_CASE(a_stopped_holder_bounds_lock_until) {
  SharedLock lock;
  Pipe locked;
  ChildGuard child(HoldUntilKilled(lock.s, locked));
  locked.CloseWrite();
  char c = 0;
  BOOST_REQUIRE(locked.Get(&c));
  ::kill(child.pid, SIGSTOP);
  const uint64_t t0 = MonotonicNowNanos();
  BOOST_CHECK(lock.s->mutex.LockUntil(t0 + 200'000'000) == LockOutcome::kTimedOut);
  const uint64_t waited = MonotonicNowNanos() - t0;
  BOOST_CHECK_GE(waited, 200'000'000u);
  BOOST_CHECK_LT(waited, 2'000'000'000u);  // it gave up, it did not wait for the holder
  BOOST_CHECK_EQUAL(lock.s->mutex.HolderPid(), static_cast<uint32_t>(child.pid));
  ::kill(child.pid, SIGCONT);
  BOOST_CHECK_EQUAL(child.KillAndWait(), 128 + SIGKILL);
  BOOST_CHECK(lock.s->mutex.LockUntil(MonotonicNowNanos() + 10 * keymesh::shm::kNanosPerSecond) ==
              LockOutcome::kOwnerDied);
  lock.s->mutex.Unlock();
}

BOOST_AUTO_TEST_CASE(a_word_naming_a_live_process_with_another_start_time_is_dead) {
  // A recycled pid: the word names a process that runs, but whose start time
  // is not the holder's. Our own pid with a wrong tag stands for it.
  SharedLock lock;
  const uint32_t me = RobustMutex::SelfToken();
  const uint32_t wrong_tag = (me & RobustMutex::kPidMask) |
                             ((((me >> RobustMutex::kPidBits) + 1) & RobustMutex::kTagMask) << RobustMutex::kPidBits);
  BOOST_CHECK(RobustMutex::HolderAlive(me));
  BOOST_CHECK(!RobustMutex::HolderAlive(wrong_tag));
  lock.ForgeWord(wrong_tag);
  LockOutcome outcome = LockOutcome::kAcquired;
  BOOST_REQUIRE(lock.s->mutex.TryLock(&outcome));
  BOOST_CHECK(outcome == LockOutcome::kOwnerDied);
  lock.s->mutex.Unlock();
  // A pid that does not exist at all (beyond this machine's pid_max).
  lock.ForgeWord(RobustMutex::kPidMask);
  BOOST_CHECK(lock.s->mutex.Lock() == LockOutcome::kOwnerDied);
  lock.s->mutex.Unlock();
}

BOOST_AUTO_TEST_CASE(a_long_wait_sleeps_instead_of_spinning) {
  SharedLock lock;
  Pipe locked;
  ChildGuard child(HoldUntilKilled(lock.s, locked));
  locked.CloseWrite();
  char c = 0;
  BOOST_REQUIRE(locked.Get(&c));
  // Waiting 300 ms for a live holder costs a few ms of CPU at most (a short
  // spin, then futex sleeps with liveness checks between them).
  const uint64_t cpu0 = ProcessCpuNanos();
  BOOST_CHECK(lock.s->mutex.LockUntil(MonotonicNowNanos() + 300'000'000) == LockOutcome::kTimedOut);
  const uint64_t cpu = ProcessCpuNanos() - cpu0;
  BOOST_TEST_MESSAGE("cpu while waiting 300 ms: " << cpu / 1000 << " us");
  BOOST_CHECK_LT(cpu, 30'000'000u);
  BOOST_CHECK_EQUAL(child.KillAndWait(), 128 + SIGKILL);
}
