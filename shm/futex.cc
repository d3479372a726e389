#include "shm/futex.h"

#include <linux/futex.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <climits>

namespace keymesh::shm {

static_assert(sizeof(std::atomic<uint32_t>) == sizeof(uint32_t) && std::atomic<uint32_t>::is_always_lock_free,
              "futex words must be plain lock-free 32-bit words");

void FutexWait(std::atomic<uint32_t>* word, uint32_t expected, uint64_t timeout_nanos) noexcept {
  timespec ts;
  timespec* tsp = nullptr;
  if (timeout_nanos != UINT64_MAX) {
    ts.tv_sec = static_cast<time_t>(timeout_nanos / 1'000'000'000ull);
    ts.tv_nsec = static_cast<long>(timeout_nanos % 1'000'000'000ull);
    tsp = &ts;
  }
  // Errors (EAGAIN: value changed, EINTR, ETIMEDOUT) all mean "re-check".
  ::syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAIT, expected, tsp, nullptr, 0);
}

void FutexWakeAll(std::atomic<uint32_t>* word) noexcept {
  ::syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAKE, INT_MAX, nullptr, nullptr, 0);
}

}  // namespace keymesh::shm
