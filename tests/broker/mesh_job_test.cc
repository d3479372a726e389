// The broker's mesh job against a fake store (no Redis): shares reach the
// segment, the outage modes follow an expired lease, local changes made by
// another process are published, other hosts' changes are merged, the
// half-open probe is shared, and a clean stop gives everything back. Also
// the `mesh` config object and the secret's fingerprint.
#define BOOST_TEST_MODULE mesh_job_test
#include "broker/mesh/mesh_job.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <ostream>
#include <thread>
#include <utility>

#include <boost/test/unit_test.hpp>

#include "broker/config.h"
#include "support/shm_fixtures.h"

namespace keymesh::broker::mesh {

std::ostream& operator<<(std::ostream& os, MeshMode m) { return os << MeshModeName(m); }
std::ostream& operator<<(std::ostream& os, OutageMode m) { return os << OutageModeName(m); }

}  // namespace keymesh::broker::mesh

namespace keymesh {
inline std::ostream& operator<<(std::ostream& os, KeyState s) { return os << KeyStateName(s); }
inline std::ostream& operator<<(std::ostream& os, CircuitState s) { return os << static_cast<int>(s); }
}  // namespace keymesh

namespace keymesh::broker::mesh {

namespace {

using keymesh::shm::testing::ChildGuard;
using keymesh::shm::testing::ForkChild;
using keymesh::shm::testing::MakeConfig;
using keymesh::shm::testing::Must;
using keymesh::shm::testing::RateLimited;
using keymesh::shm::testing::TestPool;

int64_t NowMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now().time_since_epoch())
             .count() +
         1'000'000'000;  // "Redis time": another clock than this host's
}

// What all fake stores of a test share: the "Redis".
struct World {
  std::mutex mu;
  std::condition_variable cv;
  bool down = false;
  bool learning = false;
  uint32_t hosts = 2;
  double grant_fraction = 0.5;   // of each limit
  std::vector<KeyEvent> stream;  // ids "1", "2", ...
  std::vector<KeyEvent> published;
  std::vector<LeaseRequest> leases;
  std::function<void(size_t)> on_lease;  // called in each Lease (under mu) with the count so far
  std::map<std::string, std::string> probe_holder;
  std::vector<std::string> left;
  int64_t cool_until_ms = 0;    // every key's cool_until in lease replies
  bool short_of_share = false;  // every lease reply says this host is short
  bool lose_replies = false;    // Lease runs, then fails as if its reply was lost
  int reads = 0;                // ReadEvents calls
  int interrupts = 0;           // Interrupt() calls

  std::string Append(KeyEvent e) {
    e.stream_id = std::to_string(stream.size() + 1);
    stream.push_back(e);
    cv.notify_all();
    return e.stream_id;
  }
};

class FakeStore : public MeshStore {
 public:
  explicit FakeStore(World& w) : w_(w) {}
  Status Connect() override { return Down() ? Status(Code::kIoError, "mesh: fake redis down") : Status::Ok(); }
  bool connected() const override { return true; }
  void Disconnect() override {}
  Result<LeaseReply> Lease(const LeaseRequest& r) override {
    std::lock_guard lock(w_.mu);
    if (w_.down) return Status(Code::kIoError, "mesh: fake redis down");
    w_.leases.push_back(r);
    if (w_.on_lease) w_.on_lease(w_.leases.size());
    if (w_.lose_replies) return Status(Code::kIoError, "mesh: fake redis: timed out");
    LeaseReply reply;
    reply.now_ms = NowMs();
    reply.expires_ms = reply.now_ms + static_cast<int64_t>(r.lease_ms);
    reply.learning = w_.learning;
    reply.epoch = "e1";
    reply.hosts = w_.hosts;
    reply.members = {"h1", "h2"};
    reply.short_of_share = w_.short_of_share;
    for (const LeaseKey& k : r.keys) {
      KeyGrant g;
      g.req = k.req.limit * w_.grant_fraction;
      g.tok = k.tok.limit * w_.grant_fraction;
      g.burst = 1;
      g.holders = w_.hosts;
      g.cool_until_ms = w_.cool_until_ms;
      reply.keys.push_back(g);
    }
    return reply;
  }
  Status Leave(const std::string& host) override {
    std::lock_guard lock(w_.mu);
    if (w_.down) return Status(Code::kIoError, "mesh: fake redis down");
    w_.left.push_back(host);
    return Status::Ok();
  }
  Result<KeyEvent> Publish(const KeyEvent& e) override {
    std::lock_guard lock(w_.mu);
    if (w_.down) return Status(Code::kIoError, "mesh: fake redis down");
    w_.published.push_back(e);
    KeyEvent merged = e;
    merged.stream_id = w_.Append(e);
    return merged;
  }
  Result<EventBatch> ReadEvents(const std::string& after, uint32_t block_ms) override {
    std::unique_lock lock(w_.mu);
    if (w_.down) return Status(Code::kIoError, "mesh: fake redis down");
    const size_t from = after.empty() ? 0 : std::stoul(after);
    ++w_.reads;
    w_.cv.wait_for(lock, std::chrono::milliseconds(block_ms),
                   [&] { return w_.stream.size() > from || w_.down || interrupted_; });
    if (std::exchange(interrupted_, false)) return Status(Code::kIoError, "mesh: fake redis: interrupted");
    EventBatch b;
    for (size_t i = from; i < w_.stream.size(); ++i) b.events.push_back(w_.stream[i]);
    b.last_id = std::to_string(w_.stream.size());
    return b;
  }
  Result<EventBatch> Snapshot() override {
    std::lock_guard lock(w_.mu);
    if (w_.down) return Status(Code::kIoError, "mesh: fake redis down");
    EventBatch b;
    b.last_id = std::to_string(w_.stream.size());
    return b;
  }
  Result<bool> ClaimProbe(const std::string& pool, const std::string& key, const std::string& host, uint64_t) override {
    std::lock_guard lock(w_.mu);
    if (w_.down) return Status(Code::kIoError, "mesh: fake redis down");
    auto [it, fresh] = w_.probe_holder.emplace(pool + "/" + key, host);
    return fresh || it->second == host;
  }
  Result<TimeSample> Time() override {
    if (Down()) return Status(Code::kIoError, "mesh: fake redis down");
    return TimeSample{NowMs(), 1000};
  }
  void Interrupt() override {
    {
      std::lock_guard lock(w_.mu);
      interrupted_ = true;
      ++w_.interrupts;
    }
    w_.cv.notify_all();
  }

 private:
  bool interrupted_ = false;  // under w_.mu
  bool Down() {
    std::lock_guard lock(w_.mu);
    return w_.down;
  }
  World& w_;
};

// A change another host (h2) made to key `key` of pool p.
KeyEvent FromH2(const std::string& key, EventKind kind, int64_t until_ms = 0) {
  KeyEvent e;
  e.pool = "p";
  e.key = key;
  e.kind = kind;
  e.until_ms = until_ms;
  e.origin = "h2";
  return e;
}

// Waits up to `seconds` for `cond` (polled every millisecond).
bool WaitFor(const std::function<bool()>& cond, double seconds = 5) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
  while (std::chrono::steady_clock::now() < deadline) {
    if (cond()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return cond();
}

struct Fixture {
  World world;
  TestPool tp{0, MakeConfig(Strategy::kLeastBusy, 60.0, 3)};
  std::unique_ptr<MeshJob> job;

  explicit Fixture(OutageMode outage = OutageMode::kShare, double refresh = 0.05) {
    for (const char* name : {"a", "b"}) {
      shm::KeyDefinition def;
      def.name = name;
      def.fingerprint = name[0];
      def.rpm = 600;
      def.tpm = 60000;
      Must(tp.pool->AddKey(def), "AddKey");
    }
    tp.pool->set_lock_timeout(50'000'000);
    MeshConfig c;
    c.host = "h1";
    c.refresh = refresh;
    c.lease = std::max(0.5, 4 * refresh);
    c.timeout = 0.02;
    c.outage = outage;
    job = std::make_unique<MeshJob>(c, [this] { return std::make_unique<FakeStore>(world); });
    std::vector<MeshKey> keys;
    for (const char* name : {"a", "b"}) {
      MeshKey k;
      k.pool = "p";
      k.key = name;
      k.fingerprint = MeshFingerprint("keymesh", std::string("secret-") + name);
      k.rpm = 600;
      k.tpm = 60000;
      keys.push_back(k);
    }
    job->SetKeys(keys, {{"p", tp.pool.get()}});
  }
  KeyStatus Key(const std::string& name) { return tp.Key(tp.Snap(), name); }
};

BOOST_AUTO_TEST_CASE(grants_become_the_segments_shares) {
  Fixture f;
  f.job->Start();
  BOOST_REQUIRE(WaitFor([&] { return f.Key("a").share_active && f.Key("a").share_rpm > 0; }));
  KeyStatus a = f.Key("a");
  BOOST_TEST(a.share_rpm == 300.0, boost::test_tools::tolerance(0.01));
  BOOST_TEST(a.share_tpm == 30000.0, boost::test_tools::tolerance(0.01));
  // (The mode is reported just after the shares are written.)
  BOOST_TEST(WaitFor([&] { return f.job->Status().mode == MeshMode::kLeased && f.job->Status().redis_ok; }));
  // Demand and use go out with every refresh, one bulk request for all keys.
  {
    std::lock_guard lock(f.world.mu);
    BOOST_REQUIRE(!f.world.leases.empty());
    BOOST_TEST(f.world.leases.back().keys.size() == 2u);
    BOOST_TEST(f.world.leases.back().keys[0].req.limit == 10.0, boost::test_tools::tolerance(1e-9));
    BOOST_TEST(f.world.leases.back().keys[0].fingerprint.size() == 40u);
  }
  // A new grant replaces the old one.
  {
    std::lock_guard lock(f.world.mu);
    f.world.grant_fraction = 0.25;
  }
  BOOST_REQUIRE(WaitFor([&] { return std::abs(f.Key("a").share_rpm - 150.0) < 0.5; }));
  MeshStatus st = f.job->Status();
  BOOST_TEST(st.redis_ok);
  BOOST_TEST(st.refreshes > 0u);
  BOOST_TEST(st.hosts == 2u);
  BOOST_TEST(st.keys.size() == 2u);
  BOOST_TEST(st.lease_remaining > 0.0);
}

// The wants of the last lease request for key `i` (requests per second).
double LastWants(Fixture& f, size_t i) {
  std::lock_guard lock(f.world.mu);
  if (f.world.leases.empty() || f.world.leases.back().keys.size() <= i) return -1;
  return f.world.leases.back().keys[i].req.wants;
}

// A worker takes whichever key is ready, so demand is judged for the pool:
// a host that is not saturated asks each key that serves for its part of
// the pool's use (split by the keys' limits, whichever key served it), a
// key out of rotation (disabled, revoked) for the floor only, and a host
// that uses all it holds and queues for more asks for the whole of every key.
BOOST_AUTO_TEST_CASE(demand_is_the_pools_and_split_by_the_keys_limits) {
  Fixture f;
  f.job->Start();
  BOOST_REQUIRE(WaitFor([&] { return f.Key("b").share_active && f.Key("b").share_rpm > 0; }));
  // About 4 a second of the 10 a second held in all (a refresh of 50 ms
  // sees 0 or 1 of them: the wants are coarse, but the same for both keys).
  std::atomic<bool> stop{false};
  std::atomic<double> interval{0.25};
  std::thread worker([&] {
    while (!stop.load()) {
      Result<shm::LeaseHandle> r = f.tp.pool->TryAcquire();
      if (r.ok()) (void)f.tp.pool->Release(*r, shm::testing::Success());
      std::this_thread::sleep_for(std::chrono::duration<double>(interval.load()));  // the worker's own demand
    }
  });
  const double floor = 10 * 0.02;
  BOOST_TEST(WaitFor([&] {
    const double a = LastWants(f, 0), b = LastWants(f, 1);
    return a > floor && std::abs(a - b) < 1e-9;
  }));
  // "b" out of rotation: "a" asks for the whole use, "b" for the floor.
  BOOST_REQUIRE(f.tp.pool->SetEnabled("b", false).ok());
  BOOST_TEST(WaitFor([&] { return LastWants(f, 0) > floor && LastWants(f, 1) == floor; }));
  // Saturated: the worker takes every request the shares allow.
  BOOST_REQUIRE(f.tp.pool->SetEnabled("b", true).ok());
  interval = 0.0005;
  BOOST_TEST(WaitFor([&] { return LastWants(f, 0) == 10.0 && LastWants(f, 1) == 10.0; }));
  stop = true;
  worker.join();
}

size_t Leases(Fixture& f) {
  std::lock_guard lock(f.world.mu);
  return f.world.leases.size();
}

// Another host short of its fair part (a rebalance event) makes this host
// refresh at once, not at its next refresh 5 s on; a host told it is short
// refreshes again soon, once the others gave back.
BOOST_AUTO_TEST_CASE(a_rebalance_or_a_short_grant_refreshes_at_once) {
  Fixture f(OutageMode::kShare, 5.0);
  f.job->Start();
  // Leased, and the reader has read the stream's position (an event
  // appended before would be behind it).
  BOOST_REQUIRE(WaitFor([&] { return f.job->Status().mode == MeshMode::kLeased && f.job->Status().resyncs > 0; }));
  auto rebalance = [&](bool short_of_share) {
    std::lock_guard lock(f.world.mu);
    f.world.short_of_share = short_of_share;
    KeyEvent e;
    e.kind = EventKind::kRebalance;
    e.origin = "h2";
    f.world.Append(e);
    return f.world.leases.size();
  };
  size_t before = rebalance(false);
  BOOST_TEST(WaitFor([&] { return Leases(f) > before; }, 2));
  BOOST_TEST(f.job->Status().rebalances == 1u);
  BOOST_TEST(f.Key("a").share_rpm == 300.0);  // the rebalance changed no key's state
  // The refresh a rebalance brings is told it is short: one more soon after.
  before = rebalance(true);
  BOOST_TEST(WaitFor([&] { return Leases(f) >= before + 2; }, 2));
}

// A refresh that gives back more than 5 % of a key's limit (on a rebalance:
// 1 %) is followed at once by one that tells Redis what the host holds now
// (Redis counts the old share until then: the reply might have been lost).
BOOST_AUTO_TEST_CASE(a_give_back_is_reported_at_once) {
  Fixture f(OutageMode::kShare, 5.0);
  f.job->Start();
  BOOST_REQUIRE(WaitFor([&] { return f.job->Status().mode == MeshMode::kLeased && f.job->Status().resyncs > 0; }));
  // Without a rebalance: 0.5 -> 0.4 of each limit (10 %), at a refresh of
  // its own (the fake answers what the test sets; the next comes at once).
  size_t before = 0;
  {
    std::lock_guard lock(f.world.mu);
    f.world.grant_fraction = 0.4;
    before = f.world.leases.size();
  }
  BOOST_REQUIRE(WaitFor([&] { return Leases(f) >= before + 2; }, 12));
  {
    std::lock_guard lock(f.world.mu);
    const size_t at = f.world.leases.size() - 1;
    BOOST_TEST(f.world.leases[at - 1].keys[0].req.has == 5.0);  // held when it was given back
    BOOST_TEST(f.world.leases[at].keys[0].req.has == 4.0);      // reported at once
    // On a rebalance: 0.4 -> 0.38 (2 %).
    f.world.grant_fraction = 0.38;
    KeyEvent e;
    e.kind = EventKind::kRebalance;
    e.origin = "h2";
    f.world.Append(e);
    before = f.world.leases.size();
  }
  BOOST_REQUIRE(WaitFor([&] { return Leases(f) >= before + 2; }, 2));
  std::lock_guard lock(f.world.mu);
  BOOST_TEST(f.world.leases[before].keys[0].req.has == 4.0);
  BOOST_TEST(f.world.leases[before + 1].keys[0].req.has == 3.8, boost::test_tools::tolerance(1e-9));
  BOOST_TEST(f.world.leases[before + 1].keys[1].tok.has == 380.0, boost::test_tools::tolerance(1e-9));
}

// Cuts the fake Redis off once the job is leased, `how`: down (nothing
// reaches it), or every reply lost (Redis counts what the host reported
// holding until its next request says otherwise). Either way the lease
// (0.5 s) still holds, and so does the share; then the outage mode.
void CutUntilShareMode(Fixture& f, bool World::*how) {
  f.job->Start();
  BOOST_REQUIRE(WaitFor([&] { return f.job->Status().mode == MeshMode::kLeased; }));
  const auto cut = std::chrono::steady_clock::now();
  {
    std::lock_guard lock(f.world.mu);
    f.world.*how = true;
  }
  BOOST_REQUIRE(WaitFor([&] { return !f.job->Status().redis_ok; }));
  if (std::chrono::steady_clock::now() - cut < std::chrono::milliseconds(300)) {
    BOOST_TEST(f.job->Status().mode == MeshMode::kLeased);
    BOOST_TEST(f.Key("a").share_rpm == 300.0, boost::test_tools::tolerance(0.01));
  }
  BOOST_REQUIRE(WaitFor([&] { return f.job->Status().mode == MeshMode::kShare; }));
  BOOST_TEST((std::chrono::steady_clock::now() - cut >= std::chrono::milliseconds(400)));
}

BOOST_AUTO_TEST_CASE(a_lost_reply_keeps_the_share_until_the_lease_ends) {
  Fixture f;  // refresh 50 ms, lease 0.5 s
  CutUntilShareMode(f, &World::lose_replies);
}

// Workers queueing for the shares (blocking acquires, none given up): the
// pool is saturated and asks each key for 1.5 x what it holds or uses (5 a
// second of each key held; the use, over half a refresh, may read a little
// more), not yet for the whole key; idle again, it asks for its use (the
// 2 % floor).
BOOST_AUTO_TEST_CASE(queued_workers_ask_for_more_than_they_hold) {
  Fixture f(OutageMode::kShare, 0.5);
  f.job->Start();
  BOOST_REQUIRE(WaitFor([&] { return f.Key("a").share_rpm == 300.0 && f.Key("b").share_rpm == 300.0; }));
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> gave_up{0};
  std::thread worker([&] {
    while (!stop.load()) {
      Result<shm::LeaseHandle> r = f.tp.pool->Acquire(2'000'000'000);
      if (r.ok()) {
        (void)f.tp.pool->Release(*r, shm::testing::Success());
      } else {
        ++gave_up;
      }
    }
  });
  // First 1.5x what it holds (5 a second of each key)...
  const bool asked = WaitFor([&] {
    const double a = LastWants(f, 0), b = LastWants(f, 1);
    return a >= 7.5 - 1e-9 && a < 10 && b >= 7.5 - 1e-9 && b < 10;
  });
  // ... then, still queued a refresh later, the whole key.
  const bool whole = WaitFor([&] { return LastWants(f, 0) == 10 && LastWants(f, 1) == 10; });
  stop = true;
  worker.join();
  BOOST_TEST(asked);
  BOOST_TEST(whole);
  BOOST_TEST(gave_up.load() == 0u);
  BOOST_TEST(WaitFor([&] { return LastWants(f, 0) == 10 * 0.02 && LastWants(f, 1) == 10 * 0.02; }, 10));
}

// A host whose workers left gives its share back at the first refresh that
// sees a whole period without them (its use over the last period is less
// than half the window's, and lower by a tenth of the limits), not once the
// whole two-period window has passed.
BOOST_AUTO_TEST_CASE(a_clear_fall_shows_at_the_next_refresh) {
  Fixture f(OutageMode::kShare, 0.5);
  // The worker stops at a lease (under the world's lock, just after the job
  // measured the pool for it), so the next period holds none of its use.
  std::atomic<size_t> stop_at{SIZE_MAX};
  std::atomic<bool> stop{false};
  f.world.on_lease = [&](size_t count) {
    if (count == stop_at.load()) stop = true;
  };
  f.job->Start();
  BOOST_REQUIRE(WaitFor([&] { return f.Key("a").share_rpm == 300.0 && f.Key("b").share_rpm == 300.0; }));
  // About 6 a second of the 10 held: the pool is not queued.
  std::thread worker([&] {
    while (!stop.load()) {
      Result<shm::LeaseHandle> r = f.tp.pool->TryAcquire();
      if (r.ok()) (void)f.tp.pool->Release(*r, shm::testing::Success());
      std::this_thread::sleep_for(std::chrono::milliseconds(166));  // the worker's own demand
    }
  });
  const double floor = 10 * 0.02;
  BOOST_REQUIRE(WaitFor([&] { return LastWants(f, 0) > 2 && LastWants(f, 1) > 2; }));
  // One more period of use, then the stop.
  const size_t m = Leases(f);
  stop_at = m + 2;
  worker.join();
  BOOST_REQUIRE(WaitFor([&] { return Leases(f) >= m + 3; }));
  std::lock_guard lock(f.world.mu);
  // The lease that ended the last busy period asked for the use...
  BOOST_TEST(f.world.leases[m + 1].keys[0].req.wants > 2);
  // ... the next, after one period without it, for the floor (the window of
  // two periods still holds half the use).
  BOOST_TEST(f.world.leases[m + 2].keys[0].req.wants == floor);
  BOOST_TEST(f.world.leases[m + 2].keys[1].req.wants == floor);
}

BOOST_AUTO_TEST_CASE(learning_is_reported) {
  Fixture f;
  f.world.learning = true;
  f.job->Start();
  BOOST_TEST(WaitFor([&] { return f.job->Status().mode == MeshMode::kLearning; }));
}

BOOST_AUTO_TEST_CASE(share_mode_after_the_lease_expired) {
  Fixture f;
  CutUntilShareMode(f, &World::down);
  // 1/N of the limit less the headroom, N = 2 as Redis last said.
  BOOST_TEST(f.Key("a").share_rpm == 600 * (1 - MeshConfig{}.headroom) / 2, boost::test_tools::tolerance(0.01));
  // Redis back: leased again.
  {
    std::lock_guard lock(f.world.mu);
    f.world.down = false;
  }
  BOOST_TEST(WaitFor([&] { return f.job->Status().mode == MeshMode::kLeased; }));
  BOOST_TEST(WaitFor([&] { return std::abs(f.Key("a").share_rpm - 300.0) < 0.5; }));
  // The event reader, blocked for up to 30 s on a connection that may have
  // died with the outage, was woken to reconnect and resync.
  BOOST_TEST(WaitFor([&] {
    std::lock_guard lock(f.world.mu);
    return f.world.interrupts >= 1;
  }));
}

BOOST_AUTO_TEST_CASE(closed_mode_grants_nothing_and_open_mode_the_configured_limit) {
  {
    Fixture f(OutageMode::kClosed);
    f.world.down = true;
    f.job->Start();
    // Closed from the first failed refresh on (there was never a lease).
    BOOST_REQUIRE(WaitFor([&] { return f.job->Status().refresh_failures >= 2; }));
    BOOST_TEST(f.job->Status().mode == MeshMode::kClosed);
    BOOST_TEST(!f.job->Status().redis_ok);
    BOOST_TEST(f.Key("a").share_active);
    BOOST_TEST(f.Key("a").share_rpm == 0.0);
    BOOST_TEST(f.Key("a").state == KeyState::kThrottled);
    BOOST_TEST(!f.tp.pool->TryAcquire().ok());
  }
  {
    Fixture f(OutageMode::kOpen);
    f.world.down = true;
    f.job->Start();
    BOOST_REQUIRE(WaitFor([&] { return f.job->Status().refresh_failures >= 2; }));
    BOOST_TEST(f.job->Status().mode == MeshMode::kOpen);
    BOOST_TEST(!f.Key("a").share_active);
  }
}

BOOST_AUTO_TEST_CASE(a_workers_429_in_another_process_is_published) {
  Fixture f;
  f.job->Start();
  BOOST_REQUIRE(WaitFor([&] { return f.Key("a").share_rpm > 0 && f.Key("b").share_rpm > 0; }));
  const uint64_t before = f.tp.pool->EventsSeq();
  ChildGuard child(ForkChild([&] {
    shm::PoolUser user(*f.tp.segment, f.tp.index);
    for (;;) {
      Result<shm::LeaseHandle> lease = user.TryAcquire();
      if (!lease.ok()) return 2;
      std::string name = user.KeyName(lease->slot);
      if (name != "a") {
        (void)user.Release(*lease, keymesh::shm::testing::Success());
        continue;
      }
      return user.Release(*lease, RateLimited(5.0)).ok() ? 0 : 3;
    }
  }));
  BOOST_REQUIRE(child.Wait() == 0);
  BOOST_TEST(f.tp.pool->EventsSeq() > before);
  BOOST_REQUIRE(WaitFor([&] {
    std::lock_guard lock(f.world.mu);
    for (const KeyEvent& e : f.world.published) {
      if (e.key == "a" && e.kind == EventKind::kCooldown) return true;
    }
    return false;
  }));
  std::lock_guard lock(f.world.mu);
  for (const KeyEvent& e : f.world.published) {
    if (e.key != "a" || e.kind != EventKind::kCooldown) continue;
    BOOST_TEST(e.origin == "h1");
    BOOST_TEST(e.pool == "p");
    // The deadline in Redis time: about 5 s from now.
    BOOST_TEST(std::abs(e.until_ms - (NowMs() + 5000)) < 500);
  }
}

BOOST_AUTO_TEST_CASE(another_hosts_changes_are_merged_and_not_echoed) {
  Fixture f;
  f.job->Start();
  BOOST_REQUIRE(WaitFor([&] { return f.Key("a").share_rpm > 0 && f.job->Status().resyncs > 0; }));
  {
    std::lock_guard lock(f.world.mu);
    f.world.Append(FromH2("b", EventKind::kCooldown, NowMs() + 3000));
    f.world.Append(FromH2("a", EventKind::kDisabled));
  }
  BOOST_REQUIRE(WaitFor([&] { return f.Key("b").cooldown_remaining > 2.0 && !f.Key("a").enabled; }));
  BOOST_TEST(WaitFor([&] { return f.job->Status().events_applied == 2u; }));
  // A shorter remote cooldown never shortens the local one.
  {
    std::lock_guard lock(f.world.mu);
    f.world.Append(FromH2("b", EventKind::kCooldown, NowMs() + 1000));
  }
  BOOST_REQUIRE(WaitFor([&] { return f.job->Status().events_applied == 3u; }));
  BOOST_TEST(f.Key("b").cooldown_remaining > 1.5);
  // A local change after the merges: only it is published, not the merged ones.
  BOOST_REQUIRE(f.tp.pool->SetEnabled("a", true).ok());
  BOOST_REQUIRE(WaitFor([&] {
    std::lock_guard lock(f.world.mu);
    return !f.world.published.empty();
  }));
  std::lock_guard lock(f.world.mu);
  BOOST_TEST(f.world.published.size() == 1u);
  BOOST_TEST(f.world.published[0].key == "a");
  BOOST_TEST(static_cast<int>(f.world.published[0].kind) == static_cast<int>(EventKind::kEnabled));
}

BOOST_AUTO_TEST_CASE(the_loser_of_the_probe_keeps_its_circuit_open) {
  Fixture f;
  {
    std::lock_guard lock(f.world.mu);
    f.world.probe_holder["p/a"] = "h2";  // another host won
  }
  f.job->Start();
  BOOST_REQUIRE(WaitFor([&] { return f.Key("a").share_rpm > 0 && f.job->Status().resyncs > 0; }));
  {
    std::lock_guard lock(f.world.mu);
    f.world.Append(FromH2("a", EventKind::kCircuitOpen, NowMs() + 400));
  }
  BOOST_REQUIRE(WaitFor([&] { return f.Key("a").circuit == CircuitState::kOpen; }));
  // Past the original deadline the circuit is still open here: the probe is h2's.
  std::this_thread::sleep_for(std::chrono::milliseconds(600));  // the deadline under test, not a settle
  BOOST_TEST(f.Key("a").circuit == CircuitState::kOpen);
  BOOST_TEST(f.Key("a").state != KeyState::kProbe);
  // h2's probe succeeded: closed here too.
  {
    std::lock_guard lock(f.world.mu);
    f.world.Append(FromH2("a", EventKind::kCircuitClosed));
  }
  BOOST_TEST(WaitFor([&] { return f.Key("a").circuit == CircuitState::kClosed; }));
}

BOOST_AUTO_TEST_CASE(a_clean_stop_leaves_and_stops_using_the_shares) {
  Fixture f;
  f.job->Start();
  BOOST_REQUIRE(WaitFor([&] { return f.Key("a").share_rpm > 0; }));
  BOOST_REQUIRE(WaitFor([&] {
    std::lock_guard lock(f.world.mu);
    return f.world.reads >= 1;
  }));
  f.job->Stop();
  {
    std::lock_guard lock(f.world.mu);
    BOOST_REQUIRE(f.world.left.size() == 1u);
    BOOST_TEST(f.world.left[0] == "h1");
    // The reader's blocking read (30 s) was interrupted, not waited out.
    BOOST_TEST(f.world.interrupts == 1);
  }
  BOOST_TEST(f.Key("a").share_active);
  BOOST_TEST(f.Key("a").share_rpm == 0.0);
  BOOST_TEST(!f.tp.pool->TryAcquire().ok());
}

BOOST_AUTO_TEST_CASE(redis_cooling_a_key_in_a_lease_reply_cools_it_here) {
  Fixture f;
  f.world.cool_until_ms = NowMs() + 4000;
  f.job->Start();
  BOOST_TEST(WaitFor([&] { return f.Key("a").cooldown_remaining > 3.0; }));
}

BOOST_AUTO_TEST_CASE(fingerprints_are_keyed_and_reveal_nothing) {
  const std::string a = MeshFingerprint("keymesh", "sk-secret-value-1");
  BOOST_TEST(a.size() == 40u);
  BOOST_TEST(a == MeshFingerprint("keymesh", "sk-secret-value-1"));
  BOOST_TEST(a != MeshFingerprint("keymesh", "sk-secret-value-2"));
  BOOST_TEST(a != MeshFingerprint("other", "sk-secret-value-1"));
  BOOST_TEST(a.find("secret") == std::string::npos);
  // HMAC-SHA-1 keyed by "keymesh-mesh-v1:" + namespace, pinned against
  // Python's hmac module: every host and version must compute the same.
  BOOST_TEST(a == "d55f79575c500f24e1ecc8b40463861be0b61082");
}

Result<BrokerConfig> Parse(const std::string& mesh, std::map<std::string, std::string> env = {}) {
  const std::string text =
      R"({"pools":{"p":{"keys":[{"name":"a","secret":"sk-aaaaaaaaaaaaaaaa"}]}},"mesh":)" + mesh + "}";
  return ParseConfig(text, "/tmp", [env](const std::string& var) -> std::optional<std::string> {
    auto it = env.find(var);
    if (it == env.end()) return std::nullopt;
    return it->second;
  });
}

BOOST_AUTO_TEST_CASE(the_mesh_config_object) {
  Result<BrokerConfig> c = Parse(R"({"redis":"redis://10.0.0.5:6380/2","host":"web-1","namespace":"prod",
      "refresh":0.5,"lease":10,"outage":"closed","redis_password_env":"PW"})",
                                 {{"PW", "hunter2"}});
  BOOST_REQUIRE_MESSAGE(c.ok(), c.status().message());
  BOOST_REQUIRE(c->mesh.has_value());
  BOOST_TEST(c->mesh->redis.host == "10.0.0.5");
  BOOST_TEST(c->mesh->redis.port == 6380);
  BOOST_TEST(c->mesh->redis.db == 2u);
  BOOST_TEST(c->mesh->host == "web-1");
  BOOST_TEST(c->mesh->ns == "prod");
  BOOST_TEST(c->mesh->refresh == 0.5);
  BOOST_TEST(c->mesh->lease == 10.0);
  BOOST_TEST(c->mesh->outage == OutageMode::kClosed);
  BOOST_TEST(c->mesh->password == "hunter2");
  Result<BrokerConfig> d = Parse(R"({"redis":"unix:///run/redis.sock"})");
  BOOST_REQUIRE(d.ok());
  BOOST_TEST(d->mesh->redis.unix_path == "/run/redis.sock");
  BOOST_TEST(d->mesh->refresh == 1.0);
  BOOST_TEST(d->mesh->lease == 30.0);
  BOOST_TEST(d->mesh->outage == OutageMode::kShare);
  BOOST_TEST(!d->mesh->host.empty());  // the host name
  Result<BrokerConfig> none =
      ParseConfig(R"({"pools":{}})", "/tmp", [](const std::string&) { return std::optional<std::string>(); });
  BOOST_REQUIRE(none.ok());
  BOOST_TEST(!none->mesh.has_value());

  struct Bad {
    const char* mesh;
    const char* message;
  };
  for (Bad b :
       {Bad{R"({})", "config: mesh.redis: is required"},
        Bad{R"({"redis":"http://x"})", "config: mesh.redis: redis URL 'http://x': expected"},
        Bad{R"({"redis":"redis://:pw@h:1"})", "a password does not belong in the URL"},
        Bad{R"({"redis":"redis://h:99999"})", "the port must be 1-65535"},
        Bad{R"({"redis":"redis://h","bogus":1})", "config: mesh.bogus: unknown field"},
        Bad{R"({"redis":"redis://h","lease":1,"refresh":1})", "config: mesh.lease: must be at least twice"},
        Bad{R"({"redis":"redis://h","outage":"maybe"})", "config: mesh.outage: must be one of share, closed, open"},
        Bad{R"({"redis":"redis://h","redis_password_env":"NOPE"})", "environment variable NOPE is not set"},
        Bad{R"({"redis":"redis://h","host":"a b"})", "config: mesh.host:"},
        Bad{R"({"redis":"redis://h\u0001x"})", "\\x01"}}) {
    Result<BrokerConfig> r = Parse(b.mesh);
    BOOST_REQUIRE_MESSAGE(!r.ok(), b.mesh);
    BOOST_TEST_INFO(b.mesh << " -> " << r.status().message());
    BOOST_TEST(r.status().message().find(b.message) != std::string::npos);
    BOOST_TEST(r.status().message().find('\n') == std::string::npos);
  }
}

}  // namespace
}  // namespace keymesh::broker::mesh
