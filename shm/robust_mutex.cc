#include "shm/robust_mutex.h"

#include <linux/futex.h>
#include <signal.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>

#include "shm/clock.h"
#include "shm/process_id.h"

namespace keymesh::shm {
namespace {

// Spins before the first sleep: each turn is a pause plus one load, about
// 10-40 ns, so the holder of a critical section of a few tens of
// nanoseconds is usually done before the budget is spent. A holder that was
// preempted is not: then the waiter sleeps.
constexpr int kSpins = 200;
constexpr uint64_t kFirstSleepNanos = 1'000'000;  // then doubling up to kMaxSleepNanos

inline void CpuRelax() noexcept {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield" ::: "memory");
#endif
}

// Sleeps while *word == expected, at most `nanos`. True when the sleep ended
// by the timeout.
bool FutexWaitFor(std::atomic<uint32_t>* word, uint32_t expected, uint64_t nanos) noexcept {
  timespec ts;
  ts.tv_sec = static_cast<time_t>(nanos / kNanosPerSecond);
  ts.tv_nsec = static_cast<long>(nanos % kNanosPerSecond);
  const long rc = ::syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAIT, expected, &ts, nullptr, 0);
  return rc != 0 && errno == ETIMEDOUT;
}

}  // namespace

Status RobustMutex::Init() noexcept {
  word_.store(0, std::memory_order_release);
  return Status::Ok();
}

bool RobustMutex::HolderAlive(uint32_t token) noexcept {
  const uint32_t pid = token & kPidMask;
  if (pid == 0) return false;
  if (::kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH) return false;  // ended and reaped
  const std::optional<ProcStat> st = ReadProcStat(static_cast<pid_t>(pid));
  if (!st) return true;          // it exists, but /proc hides it: assume it lives
  if (st->zombie) return false;  // ended, not yet reaped: it holds nothing any more
  return (st->start_time & kTagMask) == ((token >> kPidBits) & kTagMask);  // else the pid was reused
}

void RobustMutex::WakeOne() noexcept {
  ::syscall(SYS_futex, reinterpret_cast<uint32_t*>(&word_), FUTEX_WAKE, 1, nullptr, nullptr, 0);
}

bool RobustMutex::TryLock(LockOutcome* outcome) noexcept {
  const uint32_t me = SelfToken();
  uint32_t w = word_.load(std::memory_order_relaxed);
  for (;;) {
    if (w == 0) {
      if (word_.compare_exchange_weak(w, me, std::memory_order_acquire, std::memory_order_relaxed)) {
        *outcome = LockOutcome::kAcquired;
        return true;
      }
      continue;
    }
    if (HolderAlive(w & ~kWaiters)) return false;
    // The holder is gone: take the word over, keeping the waiters bit.
    if (word_.compare_exchange_strong(w, me | (w & kWaiters), std::memory_order_acquire, std::memory_order_relaxed)) {
      *outcome = LockOutcome::kOwnerDied;
      return true;
    }
  }
}

LockOutcome RobustMutex::LockUntil(uint64_t deadline_ns) noexcept {
  uint32_t expected = 0;
  if (word_.compare_exchange_strong(expected, SelfToken(), std::memory_order_acquire, std::memory_order_relaxed)) {
    return LockOutcome::kAcquired;
  }
  return LockSlow(deadline_ns);
}

LockOutcome RobustMutex::LockFor(uint64_t timeout_ns) noexcept {
  uint32_t expected = 0;
  if (word_.compare_exchange_strong(expected, SelfToken(), std::memory_order_acquire, std::memory_order_relaxed))
      [[likely]] {
    return LockOutcome::kAcquired;
  }
  const uint64_t now = MonotonicNowNanos();
  return LockSlow(timeout_ns >= kForever - now ? kForever - 1 : now + timeout_ns);
}

LockOutcome RobustMutex::LockSlow(uint64_t deadline_ns) noexcept {
  const uint32_t me = SelfToken();
  // Phase 1: spin while the holder most likely runs.
  for (int i = 0; i < kSpins; ++i) {
    CpuRelax();
    uint32_t w = word_.load(std::memory_order_relaxed);
    if (w == 0 && word_.compare_exchange_weak(w, me, std::memory_order_acquire, std::memory_order_relaxed)) {
      return LockOutcome::kAcquired;
    }
  }
  // Phase 2: sleep on the word, announced by kWaiters; check the holder's
  // liveness whenever a sleep times out. A waiter that gets the word sets
  // kWaiters itself, since others may still sleep (it costs a spare wake at
  // worst).
  uint64_t sleep = kFirstSleepNanos;
  for (;;) {
    uint32_t w = word_.load(std::memory_order_relaxed);
    if (w == 0) {
      if (word_.compare_exchange_weak(w, me | kWaiters, std::memory_order_acquire, std::memory_order_relaxed)) {
        return LockOutcome::kAcquired;
      }
      continue;
    }
    if ((w & kWaiters) == 0) {
      if (!word_.compare_exchange_weak(w, w | kWaiters, std::memory_order_relaxed, std::memory_order_relaxed)) {
        continue;
      }
      w |= kWaiters;
    }
    uint64_t nap = sleep;
    if (deadline_ns != kForever) {
      const uint64_t now = MonotonicNowNanos();
      if (now >= deadline_ns) return LockOutcome::kTimedOut;
      nap = std::min(nap, deadline_ns - now);
    }
    if (!FutexWaitFor(&word_, w, nap)) continue;  // woken, or the word changed: look again
    if (word_.load(std::memory_order_relaxed) != w) continue;
    if (!HolderAlive(w & ~kWaiters)) {
      // The holder died inside its critical section: take the word over.
      if (word_.compare_exchange_strong(w, me | kWaiters, std::memory_order_acquire, std::memory_order_relaxed)) {
        return LockOutcome::kOwnerDied;
      }
      continue;
    }
    sleep = std::min(sleep * 2, kMaxSleepNanos);
  }
}

}  // namespace keymesh::shm
