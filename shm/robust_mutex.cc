#include "shm/robust_mutex.h"

#include <cerrno>
#include <cstring>

#include "common/check.h"

namespace keymesh::shm {

Status RobustMutex::Init() {
  pthread_mutexattr_t attr;
  int rc = pthread_mutexattr_init(&attr);
  if (rc == 0) rc = pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED);
  if (rc == 0) rc = pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST);
  if (rc == 0) rc = pthread_mutex_init(&mutex_, &attr);
  pthread_mutexattr_destroy(&attr);
  if (rc != 0) {
    return Status(Code::kSegmentError,
                  std::string("cannot initialise robust process-shared mutex: ") + std::strerror(rc));
  }
  return Status::Ok();
}

LockOutcome RobustMutex::Lock() noexcept {
  int rc = pthread_mutex_lock(&mutex_);
  if (rc == 0) return LockOutcome::kAcquired;
  if (rc == EOWNERDEAD) return LockOutcome::kOwnerDied;
  if (rc == ENOTRECOVERABLE) return LockOutcome::kUnrecoverable;
  KM_CHECK_MSG(false, "pthread_mutex_lock failed unexpectedly");
  return LockOutcome::kUnrecoverable;
}

bool RobustMutex::TryLock(LockOutcome* outcome) noexcept {
  int rc = pthread_mutex_trylock(&mutex_);
  if (rc == EBUSY) return false;
  if (rc == 0) {
    *outcome = LockOutcome::kAcquired;
  } else if (rc == EOWNERDEAD) {
    *outcome = LockOutcome::kOwnerDied;
  } else {
    *outcome = LockOutcome::kUnrecoverable;
  }
  return true;
}

void RobustMutex::MakeConsistent() noexcept {
  int rc = pthread_mutex_consistent(&mutex_);
  KM_CHECK_MSG(rc == 0, "pthread_mutex_consistent failed");
}

void RobustMutex::Unlock() noexcept {
  int rc = pthread_mutex_unlock(&mutex_);
  KM_CHECK_MSG(rc == 0, "pthread_mutex_unlock failed: not the owner");
}

}  // namespace keymesh::shm
