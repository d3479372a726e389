#include "broker/cooldown_timer.h"

#include <chrono>

#include "shm/clock.h"

namespace keymesh::broker {

CooldownTimer::CooldownTimer(boost::asio::io_context& io, std::function<std::vector<shm::PoolAdmin*>()> pools)
    : timer_(io), pools_(std::move(pools)) {}

namespace {
// A pool whose lock is busy (kBusy) is asked again this much later.
constexpr uint64_t kBusyRetryNs = 100'000'000;

// The pool's next deadline; a busy pool's is a retry soon.
uint64_t DeadlineOf(shm::PoolAdmin* p) {
  uint64_t deadline = shm::kNever;
  if (!p->NextDeadline(&deadline).ok()) return shm::MonotonicNowNanos() + kBusyRetryNs;
  return deadline;
}
}  // namespace

void CooldownTimer::Rearm() {
  if (stopped_) return;
  uint64_t earliest = shm::kNever;
  for (shm::PoolAdmin* p : pools_()) earliest = std::min(earliest, DeadlineOf(p));
  if (earliest == armed_for_) return;
  armed_for_ = earliest;
  if (earliest == shm::kNever) {
    timer_.cancel();
    return;
  }
  // steady_clock is CLOCK_MONOTONIC, the segment's clock.
  timer_.expires_at(std::chrono::steady_clock::time_point(std::chrono::nanoseconds(earliest)));
  timer_.async_wait([this](const boost::system::error_code& ec) {
    if (ec == boost::asio::error::operation_aborted) return;
    Fire();
  });
}

void CooldownTimer::Fire() {
  armed_for_ = shm::kNever;
  const uint64_t now = shm::MonotonicNowNanos();
  for (shm::PoolAdmin* p : pools_()) {
    // Sweeps (cooled keys rejoin rotation) and wakes; a busy pool is woken
    // unswept and asked again by Rearm.
    if (DeadlineOf(p) <= now) (void)p->SweepAndWake();
  }
  Rearm();
}

void CooldownTimer::Stop() {
  stopped_ = true;
  timer_.cancel();
}

}  // namespace keymesh::broker
