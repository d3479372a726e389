#include "broker/cooldown_timer.h"

#include <chrono>

#include "shm/clock.h"

namespace keymesh::broker {

CooldownTimer::CooldownTimer(boost::asio::io_context& io, std::function<std::vector<shm::PoolAdmin*>()> pools)
    : timer_(io), pools_(std::move(pools)) {}

void CooldownTimer::Rearm() {
  if (stopped_) return;
  uint64_t earliest = shm::kNever;
  for (shm::PoolAdmin* p : pools_()) earliest = std::min(earliest, p->NextDeadline());
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
    if (p->NextDeadline() <= now) p->WakeWaiters();  // sweeps: cooled keys rejoin rotation
  }
  Rearm();
}

void CooldownTimer::Stop() {
  stopped_ = true;
  timer_.cancel();
}

}  // namespace keymesh::broker
