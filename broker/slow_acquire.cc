#include "broker/slow_acquire.h"

#include <algorithm>
#include <chrono>

#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>

#include "shm/clock.h"

namespace keymesh::broker {

struct SlowAcquirer::Waiter {
  Waiter(boost::asio::io_context& io) : timer(io) {}
  uint64_t ticket = 0;
  shm::PoolAdmin* pool = nullptr;
  shm::ProcessId holder;
  uint32_t peer_uid = 0;
  uint64_t tokens = 0;
  uint64_t deadline = 0;
  Done done;
  std::atomic<bool> cancel{false};
  bool finished = false;    // io thread: done ran or was cancelled
  bool in_service = false;  // guarded by the lane mutex: the lane thread took it
  boost::asio::steady_timer timer;
};

// A pool's waiters: FIFO per peer uid, the uids served in turn (one grant
// each), so one uid's flood of waiters delays another uid's by at most one
// grant per waiting uid (KM-09). Everything but `thread` is guarded by mu.
struct SlowAcquirer::Lane {
  shm::PoolAdmin* pool = nullptr;
  std::mutex mu;
  std::condition_variable cv;
  std::map<uint32_t, std::deque<std::shared_ptr<Waiter>>> queues;  // by peer uid; none empty
  std::deque<uint32_t> turns;                                      // the uids of `queues`, next to serve first
  std::shared_ptr<Waiter> head;
  bool stop = false;
  std::thread thread;

  bool Empty() const { return turns.empty(); }
  void Push(const std::shared_ptr<Waiter>& w) {
    std::deque<std::shared_ptr<Waiter>>& q = queues[w->peer_uid];
    if (q.empty()) turns.push_back(w->peer_uid);
    q.push_back(w);
  }
  std::shared_ptr<Waiter> Pop() {
    const uint32_t uid = turns.front();
    turns.pop_front();
    auto it = queues.find(uid);
    std::shared_ptr<Waiter> w = std::move(it->second.front());
    it->second.pop_front();
    if (it->second.empty()) {
      queues.erase(it);
    } else {
      turns.push_back(uid);  // its next waiter after the other uids' next
    }
    return w;
  }
  // Takes `w` out if it still waits here.
  bool Remove(const std::shared_ptr<Waiter>& w) {
    auto it = queues.find(w->peer_uid);
    if (it == queues.end()) return false;
    std::deque<std::shared_ptr<Waiter>>& q = it->second;
    auto pos = std::find(q.begin(), q.end(), w);
    if (pos == q.end()) return false;
    q.erase(pos);
    if (q.empty()) {
      queues.erase(it);
      turns.erase(std::find(turns.begin(), turns.end(), w->peer_uid));
    }
    return true;
  }
  void Clear() {
    queues.clear();
    turns.clear();
  }
};

SlowAcquirer::SlowAcquirer(boost::asio::io_context& io) : io_(io) {}

SlowAcquirer::~SlowAcquirer() { Stop(); }

uint64_t SlowAcquirer::Enqueue(shm::PoolAdmin* pool, const shm::ProcessId& holder, uint32_t peer_uid,
                               uint64_t deadline_ns, uint64_t tokens, Done done) {
  auto w = std::make_shared<Waiter>(io_);
  w->ticket = next_ticket_++;
  w->pool = pool;
  w->holder = holder;
  w->peer_uid = peer_uid;
  w->tokens = tokens;
  w->deadline = deadline_ns;
  w->done = std::move(done);
  waiters_[w->ticket] = w;
  std::unique_ptr<Lane>& lane = lanes_[pool];
  if (!lane) {
    lane = std::make_unique<Lane>();
    lane->pool = pool;
    Lane* raw = lane.get();
    lane->thread = std::thread([this, raw] { RunLane(raw); });
  }
  {
    std::lock_guard<std::mutex> lock(lane->mu);
    lane->Push(w);
  }
  lane->cv.notify_one();
  // A waiter still queued behind the head at its deadline times out here.
  w->timer.expires_at(std::chrono::steady_clock::time_point(std::chrono::nanoseconds(deadline_ns)));
  Lane* raw = lane.get();
  w->timer.async_wait([this, w, raw](const boost::system::error_code& ec) {
    if (ec == boost::asio::error::operation_aborted || w->finished) return;
    bool removed = false;
    {
      std::lock_guard<std::mutex> lock(raw->mu);
      if (!w->in_service) removed = raw->Remove(w);
    }
    if (!removed) return;  // the lane thread has it; Acquire ends at the same deadline
    w->pool->header()->no_key.fetch_add(1, std::memory_order_relaxed);
    w->pool->header()->timeouts.fetch_add(1, std::memory_order_relaxed);
    Deliver(w, Status(Code::kNoAvailableKey,
                      "No API keys are currently available. All keys are either cooling down or exhausted."));
  });
  return w->ticket;
}

void SlowAcquirer::RunLane(Lane* lane) {
  for (;;) {
    std::shared_ptr<Waiter> w;
    {
      std::unique_lock<std::mutex> lock(lane->mu);
      lane->cv.wait(lock, [lane] { return lane->stop || !lane->Empty(); });
      if (lane->stop) return;
      w = lane->Pop();
      w->in_service = true;
      lane->head = w;
    }
    Result<shm::LeaseHandle> r = Status(Code::kClosed, "acquire cancelled");
    if (!w->cancel.load(std::memory_order_acquire)) {
      const uint64_t now = shm::MonotonicNowNanos();
      const uint64_t wait = w->deadline > now ? w->deadline - now : 0;
      r = lane->pool->Acquire(wait, nullptr, w->holder, &w->cancel, w->tokens);
    }
    {
      std::lock_guard<std::mutex> lock(lane->mu);
      lane->head.reset();
    }
    boost::asio::post(io_, [this, w, r = std::move(r)]() mutable { Deliver(w, std::move(r)); });
  }
}

void SlowAcquirer::Deliver(const std::shared_ptr<Waiter>& w, Result<shm::LeaseHandle> r) {
  if (w->finished) {
    // Cancelled while the lane thread waited: give the key back unused.
    if (r.ok()) {
      shm::Outcome outcome;
      outcome.kind = shm::OutcomeKind::kCancelled;
      (void)w->pool->Release(*r, outcome, w->holder);
    }
    waiters_.erase(w->ticket);
    return;
  }
  w->finished = true;
  w->timer.cancel();
  waiters_.erase(w->ticket);
  Done done = std::move(w->done);
  done(std::move(r));
}

void SlowAcquirer::Cancel(uint64_t ticket) {
  auto it = waiters_.find(ticket);
  if (it == waiters_.end()) return;
  std::shared_ptr<Waiter> w = it->second;
  if (w->finished) return;
  w->finished = true;
  w->done = nullptr;
  w->timer.cancel();
  w->cancel.store(true, std::memory_order_release);
  Lane* lane = lanes_[w->pool].get();
  bool queued = false;
  {
    std::lock_guard<std::mutex> lock(lane->mu);
    queued = lane->Remove(w);
  }
  if (queued) {
    waiters_.erase(ticket);
  } else {
    w->pool->WakeWaiters();  // the lane thread sees `cancel` and posts back
  }
}

bool SlowAcquirer::Idle(const shm::PoolAdmin* pool) const {
  auto it = lanes_.find(pool);
  if (it == lanes_.end()) return true;
  std::lock_guard<std::mutex> lock(it->second->mu);
  return it->second->Empty() && !it->second->head;
}

void SlowAcquirer::Stop() {
  for (auto& [pool, lane] : lanes_) {
    std::shared_ptr<Waiter> head;
    {
      std::lock_guard<std::mutex> lock(lane->mu);
      lane->stop = true;
      head = lane->head;
      lane->Clear();
    }
    if (head) {
      head->cancel.store(true, std::memory_order_release);
      lane->pool->WakeWaiters();
    }
    lane->cv.notify_all();
  }
  for (auto& [pool, lane] : lanes_) {
    if (lane->thread.joinable()) lane->thread.join();
  }
  lanes_.clear();
  for (auto& [ticket, w] : waiters_) w->timer.cancel();
  waiters_.clear();
}

}  // namespace keymesh::broker
