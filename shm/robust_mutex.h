// A process-shared, robust lock that lives inside the shared segment: one
// 32-bit word, no pointers.
//
// Why not boost::interprocess::interprocess_mutex: in Boost 1.81 a lock that
// finds its owner dead (EOWNERDEAD) unlocks and throws, after which the mutex
// is permanently unusable and the whole pool with it. Why not glibc's robust
// pthread mutex (which KeyMesh used up to layout version 2): it keeps its
// holder's robust-list pointers inside the mutex, in the segment, and both
// pthread_mutex_unlock and the kernel at thread exit write through them, so
// any process that can write the segment could make a lock holder (the
// broker, a worker holding secrets) write a chosen value to a chosen address.
// It also costs two list updates per lock and sleeps in the kernel as soon
// as the word is taken, although the pool's critical sections last tens of
// nanoseconds.
//
// The word:   0                              free
//             pid | tag << 22 [| kWaiters]    held by process `pid`
// `tag` is the low 9 bits of the holder's start time (/proc/PID/stat field
// 22), so a recycled pid rarely passes for the holder; kWaiters (bit 31) says
// someone may sleep on the word. Linux pids are < 2^22 (PID_MAX_LIMIT).
//
// Lock: one compare-and-swap when free; when taken, spin briefly (the holder
// is usually running and done within nanoseconds), then sleep on the word
// (futex) with a timeout. At each timeout the waiter checks that the holder
// still runs (kill(pid, 0), then /proc: a zombie or another start time is
// dead); if it does not, the waiter takes the word over and gets kOwnerDied:
// it must repair the guarded state before Unlock(). Unlock: one exchange,
// and a futex wake only when kWaiters was set.
//
// Owner death is therefore seen by the next locker within the sleep timeout
// (1 ms at first, growing to kMaxSleepNanos while the holder lives), not by
// the kernel at exit as with glibc's robust lists. The holder is a process,
// not a thread: the pool's critical sections never end a thread, and
// SIGKILL ends every thread of a process at once.
//
// Residual risks (a process that can write the segment is trusted as a
// worker anyway, see docs/SECURITY.md): it can write a live pid into the word
// and so stop every user of this lock until that process ends (LockUntil
// bounds how long a caller waits); a holder in another pid namespace is not
// recognised (KeyMesh assumes one pid namespace, as its lease records do).
//
// Plain data: place it in shared memory and Init() it once (the segment
// creator) before any process locks it. Never copied or moved after Init().
#ifndef KEYMESH_SHM_ROBUST_MUTEX_H_
#define KEYMESH_SHM_ROBUST_MUTEX_H_

#include <atomic>
#include <cstdint>

#include "keymesh/status.h"
#include "shm/process_id.h"

namespace keymesh::shm {

enum class LockOutcome {
  kAcquired,   // normal acquisition
  kOwnerDied,  // acquired; the previous holder died inside its critical
               // section: repair the guarded state, then Unlock()
  kTimedOut,   // not acquired: LockUntil's deadline passed (a live holder)
};

class RobustMutex {
 public:
  // Initialises the word in place (free).
  Status Init() noexcept;

  // Blocks until acquired (never kTimedOut).
  LockOutcome Lock() noexcept {
    uint32_t expected = 0;
    if (word_.compare_exchange_strong(expected, SelfToken(), std::memory_order_acquire, std::memory_order_relaxed))
        [[likely]] {
      return LockOutcome::kAcquired;
    }
    return LockSlow(kForever);
  }
  // As Lock(), but gives up at `deadline_ns` (CLOCK_MONOTONIC) with
  // kTimedOut: for callers that must never block indefinitely on a lock a
  // stopped process may hold (the broker).
  LockOutcome LockUntil(uint64_t deadline_ns) noexcept;
  // As LockUntil(now + timeout_ns), reading the clock only when the word is
  // taken (an uncontended lock costs what Lock() costs).
  LockOutcome LockFor(uint64_t timeout_ns) noexcept;
  // One attempt: true with *outcome set when acquired (kOwnerDied when the
  // word named a process that no longer runs), false when a live process
  // holds it.
  bool TryLock(LockOutcome* outcome) noexcept;
  void Unlock() noexcept {
    const uint32_t old = word_.exchange(0, std::memory_order_release);
    if (old & kWaiters) [[unlikely]]
      WakeOne();
  }

  // For tests and status: the pid of the holder, 0 when free. The word is
  // segment content: any value may be planted there, and every value is
  // handled. Pid 0 (with a tag or kWaiters alone), a pid beyond
  // PID_MAX_LIMIT or one that does not exist, a zombie, and a tag that is
  // not the named process's start time all count as a dead holder (taken
  // over, kOwnerDied: the caller repairs); a live process (pid 1, say) with
  // its right tag counts as the holder until it ends (LockUntil/LockFor
  // bound the wait).
  uint32_t HolderPid() const noexcept { return word_.load(std::memory_order_relaxed) & kPidMask; }

  // This process's lock token (pid and start-time tag), from the cached
  // process identity (recomputed in a fork child).
  static uint32_t SelfToken() noexcept {
    const ProcessId& self = Self();
    return (self.pid & kPidMask) | (static_cast<uint32_t>(self.start_time & kTagMask) << kPidBits);
  }
  // Whether the process named by `token` still runs (the liveness check
  // described above). Made public for tests.
  static bool HolderAlive(uint32_t token) noexcept;

  static constexpr uint32_t kPidBits = 22;
  static constexpr uint32_t kPidMask = (1u << kPidBits) - 1;
  static constexpr uint32_t kTagMask = 0x1FF;
  static constexpr uint32_t kWaiters = 1u << 31;
  static constexpr uint64_t kMaxSleepNanos = 50'000'000;  // 50 ms between liveness checks at most

 private:
  static constexpr uint64_t kForever = UINT64_MAX;
  LockOutcome LockSlow(uint64_t deadline_ns) noexcept;
  void WakeOne() noexcept;

  std::atomic<uint32_t> word_;
};

static_assert(sizeof(RobustMutex) == 4 && std::atomic<uint32_t>::is_always_lock_free,
              "RobustMutex is one lock-free futex word in shm, holding no pointer");

}  // namespace keymesh::shm

#endif  // KEYMESH_SHM_ROBUST_MUTEX_H_
