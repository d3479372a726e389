// Cooldown expiry: one timer for the earliest cooldown deadline of all
// pools. When it fires, every pool whose deadline passed re-admits its keys
// and wakes its blocked waiters (fast-path futex sleepers and the broker's
// slow-path waiters alike), so nobody waits for an unrelated release.
//
// Cooldowns set by workers through the segment do not notify the broker;
// the broker re-arms after each socket op and on its 1 s tick, and waiters
// bound their own sleep by the deadline they saw, so the timer is a prompt
// wake-up rather than the only one.
#ifndef KEYMESH_BROKER_COOLDOWN_TIMER_H_
#define KEYMESH_BROKER_COOLDOWN_TIMER_H_

#include <cstdint>
#include <functional>
#include <vector>

#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>

#include "shm/pool.h"

namespace keymesh::broker {

class CooldownTimer {
 public:
  // `pools` lists the pools to watch at the moment of the call; it and `io`
  // must outlive the timer. io thread only.
  CooldownTimer(boost::asio::io_context& io, std::function<std::vector<shm::PoolAdmin*>()> pools);

  // Arms the timer for the earliest deadline (cancels it when there is none).
  void Rearm();
  void Stop();

 private:
  void Fire();

  boost::asio::steady_timer timer_;
  std::function<std::vector<shm::PoolAdmin*>()> pools_;
  uint64_t armed_for_ = shm::kNever;
  bool stopped_ = false;
};

}  // namespace keymesh::broker

#endif  // KEYMESH_BROKER_COOLDOWN_TIMER_H_
