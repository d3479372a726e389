// Time sources. Everything stored in the segment is CLOCK_MONOTONIC
// nanoseconds: that clock is system-wide, so deadlines written by one process
// are meaningful to every other process on the host (the original Python
// package used each process's own time.monotonic() float, which another
// process cannot compare with its own).
// Persistence converts to wall-clock time (WallFromMonotonic).
//
// Tests inject a FakeClock so cooldown and expiry are exact without sleeping.
#ifndef KEYMESH_SHM_CLOCK_H_
#define KEYMESH_SHM_CLOCK_H_

#include <atomic>
#include <cstdint>

namespace keymesh::shm {

inline constexpr uint64_t kNanosPerSecond = 1'000'000'000ull;

// Seconds (may be fractional, must be finite and >= 0) to nanoseconds,
// saturating at ~292 years.
uint64_t SecondsToNanos(double seconds) noexcept;
inline double NanosToSeconds(uint64_t nanos) noexcept { return static_cast<double>(nanos) / 1e9; }

// Thread-safe; Now() must be monotonic non-decreasing and comparable across
// processes that share a segment.
class Clock {
 public:
  virtual ~Clock() = default;
  virtual uint64_t NowNanos() const noexcept = 0;
};

// CLOCK_MONOTONIC through the vDSO: no system call.
class SystemClock final : public Clock {
 public:
  uint64_t NowNanos() const noexcept override;
  static const SystemClock& Instance() noexcept;
};

// A clock that moves only when told. Safe to share between threads; not
// meaningful across processes unless placed in shm by the test.
class FakeClock final : public Clock {
 public:
  explicit FakeClock(uint64_t start_nanos = 1'000 * kNanosPerSecond) : now_(start_nanos) {}
  uint64_t NowNanos() const noexcept override { return now_.load(std::memory_order_acquire); }
  void Advance(uint64_t nanos) noexcept { now_.fetch_add(nanos, std::memory_order_acq_rel); }
  void AdvanceSeconds(double seconds) noexcept { Advance(SecondsToNanos(seconds)); }
  void Set(uint64_t nanos) noexcept { now_.store(nanos, std::memory_order_release); }

 private:
  std::atomic<uint64_t> now_;
};

uint64_t MonotonicNowNanos() noexcept;
// Wall-clock (CLOCK_REALTIME) nanoseconds since the Unix epoch.
uint64_t WallNowNanos() noexcept;

}  // namespace keymesh::shm

#endif  // KEYMESH_SHM_CLOCK_H_
