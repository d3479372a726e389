// Blocking acquires of the socket slow path, without blocking the io thread
// and without polling.
//
// Each pool gets one waiter thread (started on first use) that serves that
// pool's blocked requests, FIFO per peer uid and the uids in turn (so one
// uid's flood cannot starve another's waiters): it sleeps in PoolAdmin::Acquire on
// the pool's futex, exactly like a fast-path worker, on behalf of the
// request's client process (the lease names the client as holder). The
// result is handed to the io thread with asio::post. Requests queued behind
// the head time out on io-thread timers; the head is bounded by Acquire's
// own timeout and is cancelled through its cancel flag plus WakeWaiters().
#ifndef KEYMESH_BROKER_SLOW_ACQUIRE_H_
#define KEYMESH_BROKER_SLOW_ACQUIRE_H_

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include <boost/asio/io_context.hpp>

#include "keymesh/status.h"
#include "shm/pool.h"
#include "shm/process_id.h"

namespace keymesh::broker {

class SlowAcquirer {
 public:
  // Runs on the io thread exactly once per Enqueue unless Cancel()led first.
  using Done = std::function<void(Result<shm::LeaseHandle>)>;

  // `io` must outlive the SlowAcquirer.
  explicit SlowAcquirer(boost::asio::io_context& io);
  ~SlowAcquirer();  // Stop()s
  SlowAcquirer(const SlowAcquirer&) = delete;
  SlowAcquirer& operator=(const SlowAcquirer&) = delete;

  // Queues a wait on `pool` (which must outlive the SlowAcquirer) until
  // `deadline_ns` (CLOCK_MONOTONIC) for `holder`, a process of `peer_uid`
  // (whose turn it waits for), reserving `tokens` of the
  // key's token budget at the grant. Returns a ticket for
  // Cancel. io thread only.
  uint64_t Enqueue(shm::PoolAdmin* pool, const shm::ProcessId& holder, uint32_t peer_uid, uint64_t deadline_ns,
                   uint64_t tokens, Done done);
  // Drops a waiter: `done` will not run; a key granted meanwhile is
  // released unused. io thread only.
  void Cancel(uint64_t ticket);
  // True when no request waits on `pool` (a new one may try at once
  // without overtaking anybody).
  bool Idle(const shm::PoolAdmin* pool) const;
  // Cancels everything and joins the threads.
  void Stop();

 private:
  struct Waiter;
  struct Lane;
  void RunLane(Lane* lane);
  void Deliver(const std::shared_ptr<Waiter>& w, Result<shm::LeaseHandle> r);

  boost::asio::io_context& io_;
  std::map<const shm::PoolAdmin*, std::unique_ptr<Lane>> lanes_;
  std::map<uint64_t, std::shared_ptr<Waiter>> waiters_;  // io thread only
  uint64_t next_ticket_ = 1;
};

}  // namespace keymesh::broker

#endif  // KEYMESH_BROKER_SLOW_ACQUIRE_H_
