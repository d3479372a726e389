// A process-shared, robust mutex that lives inside the shared segment.
//
// Why not boost::interprocess::interprocess_mutex: in Boost 1.81 a lock that
// finds its owner dead (EOWNERDEAD) unlocks and throws, after which the mutex
// is permanently unusable and the whole pool with it. This wrapper reports the
// owner's death to the new owner, who repairs the guarded state and then calls
// MakeConsistent() before Unlock().
//
// The object is plain data: it must be placed in shared memory and Init()ed
// exactly once (by the segment creator) before any process locks it. It is
// never copied or moved after Init().
#ifndef KEYMESH_SHM_ROBUST_MUTEX_H_
#define KEYMESH_SHM_ROBUST_MUTEX_H_

#include <pthread.h>

#include "keymesh/status.h"

namespace keymesh::shm {

enum class LockOutcome {
  kAcquired,      // normal acquisition
  kOwnerDied,     // acquired; the previous owner died inside its critical
                  // section: repair, then MakeConsistent(), then Unlock()
  kUnrecoverable  // not acquired: an owner died and nobody repaired (a bug)
};

class RobustMutex {
 public:
  // Initialises the mutex in place (PTHREAD_PROCESS_SHARED + ROBUST).
  Status Init();

  LockOutcome Lock() noexcept;
  // Like Lock() but fails with kAcquired never returned when busy: returns
  // false if another thread holds it. *outcome is set when true.
  bool TryLock(LockOutcome* outcome) noexcept;
  void MakeConsistent() noexcept;
  void Unlock() noexcept;

 private:
  pthread_mutex_t mutex_;
};

static_assert(sizeof(RobustMutex) == sizeof(pthread_mutex_t),
              "RobustMutex is placed in shm: it must be exactly the pthread mutex");

}  // namespace keymesh::shm

#endif  // KEYMESH_SHM_ROBUST_MUTEX_H_
