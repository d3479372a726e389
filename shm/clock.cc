#include "shm/clock.h"

#include <time.h>

#include <cmath>

namespace keymesh::shm {

uint64_t SecondsToNanos(double seconds) noexcept {
  if (!(seconds > 0.0)) return 0;  // also maps NaN to 0
  if (seconds >= 9.0e9) return UINT64_MAX / 2;
  return static_cast<uint64_t>(std::llround(seconds * 1e9));
}

uint64_t MonotonicNowNanos() noexcept {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * kNanosPerSecond + static_cast<uint64_t>(ts.tv_nsec);
}

uint64_t WallNowNanos() noexcept {
  timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * kNanosPerSecond + static_cast<uint64_t>(ts.tv_nsec);
}

uint64_t SystemClock::NowNanos() const noexcept { return MonotonicNowNanos(); }

const SystemClock& SystemClock::Instance() noexcept {
  static const SystemClock clock;
  return clock;
}

}  // namespace keymesh::shm
