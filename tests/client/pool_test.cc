// The C++ client API (include/keymesh/pool.h) through its public surface:
// embedded pools, pools on a named segment, pools attached to a real
// keymesh-broker (fast path and socket slow path), forked processes, and
// cancelling a wait with a CancelToken. Waits end on events (a token, a
// release, a pipe between processes), never on sleeps.
#define BOOST_TEST_MODULE pool_test
#include "keymesh/pool.h"

#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <boost/test/unit_test.hpp>

#include "keymesh/selector.h"
#include "shm/pool.h"
#include "shm/pool_config.h"
#include "support/broker_harness.h"
#include "support/shm_fixtures.h"

namespace keymesh {
namespace {

using shm::testing::Must;

std::vector<KeySpec> Keys(uint32_t n, uint32_t max_concurrency = 0) {
  std::vector<KeySpec> keys;
  for (uint32_t i = 0; i < n; ++i) {
    KeySpec k;
    k.name = "k" + std::to_string(i);
    k.secret = "sk-test-secret-" + std::to_string(i);
    k.max_concurrency = max_concurrency;
    keys.push_back(k);
  }
  return keys;
}

std::unique_ptr<Pool> MakeEmbedded(uint32_t n, Strategy strategy = Strategy::kRoundRobin,
                                   uint32_t max_concurrency = 0) {
  PoolOptions o;
  o.strategy = strategy;
  EmbeddedOptions e;
  e.keys_capacity = 16;
  e.leases_capacity = 64;
  return Must(Pool::CreateEmbedded(Keys(n, max_concurrency), o, e), "CreateEmbedded");
}

// A Pool on a named segment this test made (Pool::AttachSegment), beside
// the test's own view of the same pool, so the lease accounting can be
// checked after the Pool's calls.
struct ViewedPool {
  std::string name = shm::testing::UniqueSegmentName("pool");
  shm::testing::SegmentNameGuard guard{name};
  std::unique_ptr<shm::Segment> segment;
  std::unique_ptr<shm::PoolAdmin> view;
  std::unique_ptr<Pool> pool;

  explicit ViewedPool(uint32_t n, Strategy strategy = Strategy::kRoundRobin) {
    segment = Must(shm::Segment::CreateNamed(name, shm::Capacities{1, 16, 64}), "CreateNamed");
    PoolOptions o;
    o.strategy = strategy;
    const uint32_t index =
        Must(segment->CreatePool("p", static_cast<uint32_t>(strategy), shm::ToPoolConfig(o)), "CreatePool");
    view = std::make_unique<shm::PoolAdmin>(*segment, index);
    pool = Must(Pool::AttachSegment(name, "p", nullptr), "AttachSegment");
    for (const KeySpec& k : Keys(n)) BOOST_REQUIRE(pool->AddKey(k).ok());
  }
};

void RequireConsistent(shm::PoolAdmin& pool) {
  Status st = pool.CheckConsistency();
  BOOST_REQUIRE_MESSAGE(st.ok(), st.ToString());
}

const KeyStatus& Key(const PoolStatus& s, const std::string& name) {
  for (const KeyStatus& k : s.keys) {
    if (k.name == name) return k;
  }
  BOOST_FAIL("no key " + name);
  return s.keys.front();
}

class HighestSlot final : public Selector {
 public:
  std::optional<uint32_t> Select(const SelectionContext& ctx) const override {
    std::optional<uint32_t> best;
    ctx.ForEachEligible([&](const KeyView& k) {
      best = k.slot;
      return true;
    });
    return best;
  }
};

class Fixed final : public Selector {
 public:
  explicit Fixed(std::optional<uint32_t> slot) : slot_(slot) {}
  std::optional<uint32_t> Select(const SelectionContext&) const override { return slot_; }

 private:
  std::optional<uint32_t> slot_;
};

// Counts its live instances, so a test sees when the pool lets one go.
class Counted final : public Selector {
 public:
  explicit Counted(std::atomic<int>* live) : live_(live) { live_->fetch_add(1); }
  ~Counted() override { live_->fetch_sub(1); }
  std::optional<uint32_t> Select(const SelectionContext& ctx) const override {
    std::optional<uint32_t> first;
    ctx.ForEachEligible([&](const KeyView& k) {
      first = k.slot;
      return false;
    });
    return first;
  }

 private:
  std::atomic<int>* live_;
};

// Runs Acquire(options) on another thread; Wait() joins it.
class Waiter {
 public:
  Waiter(Pool& pool, Pool::AcquireOptions options)
      : thread_([this, &pool, options] {
          const auto t0 = std::chrono::steady_clock::now();
          Result<Lease> r = pool.Acquire(options);
          waited_ = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
          code_ = r.ok() ? Code::kOk : r.status().code();
        }) {}
  ~Waiter() {
    if (thread_.joinable()) thread_.join();
  }
  Code Wait() {
    thread_.join();
    return code_;
  }
  double waited() const { return waited_; }

 private:
  Code code_ = Code::kInternal;
  double waited_ = -1;
  std::thread thread_;
};

}  // namespace

// ===========================================================================
BOOST_AUTO_TEST_SUITE(custom_selector)

BOOST_AUTO_TEST_CASE(set_selector_is_used_and_removable) {
  ViewedPool t(3);
  Pool* pool = t.pool.get();
  pool->SetSelector(std::make_shared<HighestSlot>());
  for (int i = 0; i < 5; ++i) {
    Result<Lease> l = pool->TryAcquire();
    BOOST_REQUIRE(l.ok());
    BOOST_CHECK_EQUAL(l->key_name(), "k2");
    BOOST_CHECK_EQUAL(l->secret(), "sk-test-secret-2");
  }  // released by ~Lease
  BOOST_REQUIRE(pool->DisableKey("k2").ok());
  {
    Result<Lease> l = pool->TryAcquire();
    BOOST_REQUIRE(l.ok());
    BOOST_CHECK_EQUAL(l->key_name(), "k1");
  }
  pool->SetSelector(nullptr);  // back to round robin
  std::vector<std::string> names;
  for (int i = 0; i < 4; ++i) {
    Result<Lease> l = pool->TryAcquire();
    BOOST_REQUIRE(l.ok());
    names.push_back(l->key_name());
  }
  BOOST_CHECK_EQUAL(names[0] == names[1], false);
  PoolStatus s = Must(pool->GetStatus(), "GetStatus");
  BOOST_CHECK_EQUAL(s.keys[2].acquires, 5u);
  BOOST_CHECK_EQUAL(s.keys[2].successes, 5u);
  RequireConsistent(*t.view);
}

BOOST_AUTO_TEST_CASE(ineligible_choice_is_refused) {
  ViewedPool t(3);
  Pool* pool = t.pool.get();
  BOOST_REQUIRE(pool->DisableKey("k1").ok());
  for (std::optional<uint32_t> bad :
       {std::optional<uint32_t>(1), std::optional<uint32_t>(3), std::optional<uint32_t>(9999)}) {
    pool->SetSelector(std::make_shared<Fixed>(bad));
    Result<Lease> l = pool->TryAcquire();
    BOOST_REQUIRE(!l.ok());
    BOOST_CHECK(l.status().code() == Code::kInvalidArgument);
    BOOST_CHECK_MESSAGE(l.status().message().find("not eligible") != std::string::npos, l.status().message());
  }
  pool->SetSelector(std::make_shared<Fixed>(std::nullopt));  // declines
  Result<Lease> none = pool->TryAcquire();
  BOOST_CHECK(none.status().code() == Code::kNoAvailableKey);
  // Nothing was granted by the refused choices.
  PoolStatus s = Must(pool->GetStatus(), "GetStatus");
  for (const KeyStatus& k : s.keys) {
    BOOST_CHECK_EQUAL(k.acquires, 0u);
    BOOST_CHECK_EQUAL(k.in_flight, 0u);
  }
  RequireConsistent(*t.view);
}

BOOST_AUTO_TEST_CASE(the_pool_keeps_every_selector_until_it_dies) {
  std::atomic<int> live{0};
  {
    std::unique_ptr<Pool> pool = MakeEmbedded(3);
    pool->SetSelector(std::make_shared<Counted>(&live));
    pool->SetSelector(std::make_shared<Counted>(&live));  // replaces the first
    BOOST_CHECK_EQUAL(live.load(), 2);                    // the caller kept neither: the pool did
    Result<Lease> l = pool->TryAcquire();
    BOOST_REQUIRE(l.ok());
    BOOST_CHECK_EQUAL(l->key_name(), "k0");
    pool->SetSelector(nullptr);
    BOOST_CHECK_EQUAL(live.load(), 2);
  }
  BOOST_CHECK_EQUAL(live.load(), 0);
}

BOOST_AUTO_TEST_SUITE_END()

// ===========================================================================
BOOST_AUTO_TEST_SUITE(lease)

BOOST_AUTO_TEST_CASE(lease_object_release_twice) {
  std::vector<KeySpec> keys{{"a", "sk-aaaaaaaaaaaaaaaa", 1, 0, 0, 0}};
  std::unique_ptr<Pool> pool = Must(Pool::CreateEmbedded(keys, PoolOptions{}), "CreateEmbedded");
  Result<Lease> l = pool->TryAcquire();
  BOOST_REQUIRE(l.ok());
  BOOST_CHECK(l->Release(0.25).ok());
  BOOST_CHECK(!l->active());
  BOOST_CHECK(l->Release().code() == Code::kNotHeld);
  BOOST_CHECK(l->MarkFailed().code() == Code::kNotHeld);
  PoolStatus s = Must(pool->GetStatus(), "GetStatus");
  BOOST_CHECK_EQUAL(s.keys[0].successes, 1u);
  BOOST_CHECK_EQUAL(s.keys[0].failures, 0u);
  BOOST_CHECK_EQUAL(s.keys[0].latency_avg, 0.25);
}

BOOST_AUTO_TEST_CASE(end_reports_each_outcome) {
  PoolOptions o;
  o.max_failures = 2;
  std::unique_ptr<Pool> pool = Must(Pool::CreateEmbedded({{"a", "sk-aaaaaaaaaaaaaaaa", 1, 0, 0, 0}}, o), "Create");
  auto end = [&](OutcomeKind kind, const Lease::EndOptions& opts) {
    Result<Lease> l = pool->TryAcquire();
    BOOST_REQUIRE(l.ok());
    return l->End(kind, opts);
  };
  Lease::EndOptions success;
  success.latency = 0.5;
  success.tokens = 40;
  BOOST_CHECK(end(OutcomeKind::kSuccess, success).ok());
  Lease::EndOptions no_sample;
  no_sample.latency = std::nan("");
  BOOST_CHECK(end(OutcomeKind::kSuccess, no_sample).ok());
  Lease::EndOptions failed;
  failed.tokens = 2;
  BOOST_CHECK(end(OutcomeKind::kFailure, failed).ok());
  BOOST_CHECK(end(OutcomeKind::kCancelled, {}).ok());
  Lease::EndOptions limited;
  limited.cooldown = 0.0;
  BOOST_CHECK(end(OutcomeKind::kRateLimited, limited).ok());
  PoolStatus s = Must(pool->GetStatus(), "GetStatus");
  const KeyStatus& k = s.keys[0];
  BOOST_CHECK_EQUAL(k.successes, 2u);
  BOOST_CHECK_EQUAL(k.failures, 1u);
  BOOST_CHECK_EQUAL(k.cancelled, 1u);
  BOOST_CHECK_EQUAL(k.rate_limited, 1u);
  BOOST_CHECK_EQUAL(k.tokens, 42u);
  BOOST_CHECK_EQUAL(k.latency_avg, 0.5);  // the NaN was no sample
  // A permanent failure revokes the key, reported once.
  Lease::EndOptions revoke;
  revoke.permanent = true;
  BOOST_CHECK(end(OutcomeKind::kFailure, revoke).code() == Code::kKeyExhausted);
  s = Must(pool->GetStatus(), "GetStatus");
  BOOST_CHECK(s.keys[0].circuit == CircuitState::kRevoked);
  BOOST_CHECK(pool->TryAcquire().status().code() == Code::kNoAvailableKey);
}

BOOST_AUTO_TEST_CASE(bad_end_arguments) {
  std::unique_ptr<Pool> pool = MakeEmbedded(1);
  Result<Lease> l = pool->TryAcquire();
  BOOST_REQUIRE(l.ok());
  Lease::EndOptions permanent;
  permanent.permanent = true;
  BOOST_CHECK(l->End(OutcomeKind::kSuccess, permanent).code() == Code::kInvalidArgument);
  BOOST_CHECK(l->End(static_cast<OutcomeKind>(7), {}).code() == Code::kInvalidArgument);
  BOOST_CHECK(l->active());  // neither ended it
  // A bad cooldown still ends the lease (the request is over): as a 429
  // with the pool's cooldown.
  BOOST_CHECK(l->MarkRateLimited(-3.0).code() == Code::kInvalidArgument);
  BOOST_CHECK(!l->active());
  BOOST_CHECK_EQUAL(l->key_name(), "k0");  // still readable after the end
  PoolStatus s = Must(pool->GetStatus(), "GetStatus");
  BOOST_CHECK_EQUAL(s.keys[0].rate_limited, 1u);
  BOOST_CHECK_GT(s.keys[0].cooldown_remaining, 59.0);
  Lease none;
  BOOST_CHECK(!none.active());
  BOOST_CHECK_EQUAL(none.secret(), "");
  BOOST_CHECK(none.Cancel().code() == Code::kNotHeld);
}

BOOST_AUTO_TEST_SUITE_END()

// ===========================================================================
BOOST_AUTO_TEST_SUITE(embedded)

BOOST_AUTO_TEST_CASE(embedded_pool_capacity) {
  std::vector<KeySpec> keys;
  for (int i = 0; i < 3; ++i) keys.push_back({"k" + std::to_string(i), "sk-secret-" + std::to_string(i), 1, 0, 0, 0});
  EmbeddedOptions e;
  e.keys_capacity = 2;
  Result<std::unique_ptr<Pool>> p = Pool::CreateEmbedded(keys, PoolOptions{}, e);
  BOOST_CHECK(p.status().code() == Code::kCapacityExceeded);
  BOOST_CHECK(Pool::CreateEmbedded({}, PoolOptions{}).status().code() == Code::kInvalidArgument);
}

// Pool::RestoreKey (the Python package's storage=): counters and latency
// overwritten, a cooldown that only lengthens and is capped, the streaks
// kept, and a hostile value refused with nothing written.
BOOST_AUTO_TEST_CASE(restore_key_writes_progress_and_keeps_streaks) {
  PoolOptions o;
  o.max_failures = 3;
  o.default_cooldown = 60.0;
  o.max_cooldown = 120.0;
  std::unique_ptr<Pool> pool = Must(Pool::CreateEmbedded(Keys(2), o), "CreateEmbedded");
  {
    Result<Lease> l = pool->TryAcquire();
    BOOST_REQUIRE(l.ok());
    BOOST_REQUIRE_EQUAL(l->key_name(), "k0");
    BOOST_CHECK(l->MarkFailed().ok());  // streak 1
  }
  KeyRestore r;
  r.successes = 5;
  r.failures = 9;  // a lifetime count above max_failures: never exhausts the key
  r.rate_limited = 2;
  r.latency_avg = 0.4;
  r.cooldown_remaining = 30.0;
  BOOST_REQUIRE(pool->RestoreKey("k0", r).ok());
  PoolStatus s = Must(pool->GetStatus(), "GetStatus");
  const KeyStatus& k = s.keys[0];
  BOOST_CHECK_EQUAL(k.successes, 5u);
  BOOST_CHECK_EQUAL(k.failures, 9u);
  BOOST_CHECK_EQUAL(k.rate_limited, 2u);
  BOOST_CHECK(k.has_latency);
  BOOST_CHECK_CLOSE(k.latency_avg, 0.4, 1e-9);
  BOOST_CHECK_EQUAL(k.fail_streak, 1u);
  BOOST_CHECK(k.cooldown_remaining > 29.0 && k.cooldown_remaining <= 30.0);
  BOOST_CHECK(k.circuit == CircuitState::kClosed);
  BOOST_CHECK_EQUAL(pool->AvailableCount(), 1u);  // k0 cools
  // A shorter cooldown keeps the longer one; a longer one is capped at
  // max(max_cooldown, default_cooldown).
  KeyRestore shorter;
  shorter.cooldown_remaining = 1.0;
  BOOST_REQUIRE(pool->RestoreKey("k0", shorter).ok());
  s = Must(pool->GetStatus(), "GetStatus");
  BOOST_CHECK_GT(s.keys[0].cooldown_remaining, 29.0);
  BOOST_CHECK(!s.keys[0].has_latency);
  KeyRestore longer;
  longer.cooldown_remaining = 1e9;
  BOOST_REQUIRE(pool->RestoreKey("k1", longer).ok());
  s = Must(pool->GetStatus(), "GetStatus");
  BOOST_CHECK(s.keys[1].cooldown_remaining > 119.0 && s.keys[1].cooldown_remaining <= 120.0);
  // Hostile values: refused, nothing written.
  for (double bad : {std::nan(""), -1.0, 2e9, std::numeric_limits<double>::infinity()}) {
    KeyRestore h;
    h.successes = 77;
    h.latency_avg = bad;
    BOOST_CHECK(pool->RestoreKey("k1", h).code() == Code::kInvalidArgument);
    h.latency_avg.reset();
    h.cooldown_remaining = bad;
    BOOST_CHECK(pool->RestoreKey("k1", h).code() == Code::kInvalidArgument);
  }
  BOOST_CHECK_EQUAL(Must(pool->GetStatus(), "GetStatus").keys[1].successes, 0u);
  BOOST_CHECK(pool->RestoreKey("nope", r).code() == Code::kUnknownKey);
}

BOOST_AUTO_TEST_CASE(key_specs_are_checked_and_kept) {
  KeySpec k{"a", "sk-aaaaaaaaaaaaaaaa", 1, 0, 600, 0};
  k.burst = 5;
  k.rate_margin = 0.1;
  PoolOptions o;
  o.rate_margin = 0.05;
  std::unique_ptr<Pool> pool = Must(Pool::CreateEmbedded({k}, o), "CreateEmbedded");
  PoolStatus s = Must(pool->GetStatus(), "GetStatus");
  BOOST_CHECK_EQUAL(s.keys[0].burst, 5u);
  BOOST_CHECK_CLOSE(s.keys[0].rate_margin, 0.1, 1e-6);
  BOOST_CHECK_CLOSE(s.options.rate_margin, 0.05, 1e-6);
  for (double bad : {0.5, 0.7, std::nan("")}) {
    KeySpec b{"b", "sk-bbbbbbbbbbbbbbbb", 1, 0, 0, 0};
    b.rate_margin = bad;
    Status st = pool->AddKey(b);
    BOOST_CHECK(st.code() == Code::kInvalidArgument);
    BOOST_CHECK_MESSAGE(st.message().find("rate_margin") != std::string::npos, st.message());
  }
  KeySpec b{"b", "sk-bbbbbbbbbbbbbbbb", 1, 0, 0, 0};
  b.burst = 2'000'000;
  BOOST_CHECK(pool->AddKey(b).code() == Code::kInvalidArgument);
  for (const char* secret : {"", "  \t", "sk-with\nnewline-xx"}) {
    Result<std::unique_ptr<Pool>> bad = Pool::CreateEmbedded({{"c", secret, 1, 0, 0, 0}}, PoolOptions{});
    BOOST_CHECK(bad.status().code() == Code::kInvalidArgument);
    BOOST_CHECK_MESSAGE(bad.status().message().find("key #1") == 0, bad.status().message());
  }
  BOOST_CHECK(Pool::CreateEmbedded({k}, o).ok());
}

BOOST_AUTO_TEST_CASE(reclaim_dead_frees_a_killed_childs_leases) {
  std::unique_ptr<Pool> pool = MakeEmbedded(2);
  Result<Lease> mine = pool->TryAcquire();
  BOOST_REQUIRE(mine.ok());
  shm::testing::Pipe held;
  shm::testing::ChildGuard child(shm::testing::ForkChild([&] {
    // The child shares the embedded segment and holds its own lease.
    Result<Lease> l = pool->TryAcquire();
    if (!l.ok()) return 1;
    if (!held.Put<char>('1')) return 2;
    for (;;) ::pause();
  }));
  held.CloseWrite();  // so a child that died early is an EOF, not a hang
  char c = 0;
  BOOST_REQUIRE(held.Get(&c));
  PoolStatus s = Must(pool->GetStatus(), "GetStatus");
  BOOST_CHECK_EQUAL(s.keys[0].in_flight + s.keys[1].in_flight, 2u);
  BOOST_CHECK_EQUAL(child.KillAndWait(), 128 + SIGKILL);
  BOOST_CHECK_EQUAL(Must(pool->ReclaimDead(), "ReclaimDead"), 1u);
  BOOST_CHECK_EQUAL(Must(pool->ReclaimDead(), "ReclaimDead"), 0u);
  s = Must(pool->GetStatus(), "GetStatus");
  BOOST_CHECK_EQUAL(s.keys[0].in_flight + s.keys[1].in_flight, 1u);  // ours
  BOOST_CHECK(mine->Release(0.1).ok());
}

BOOST_AUTO_TEST_CASE(fork_child_uses_the_pool_and_keys_added_before_fork) {
  std::unique_ptr<Pool> pool = MakeEmbedded(1);
  BOOST_REQUIRE(pool->AddKey({"late", "sk-added-before-fork-1", 1, 0, 0, 0}).ok());
  shm::testing::ChildGuard child(shm::testing::ForkChild([&] {
    int bad = 0;
    for (int i = 0; i < 4; ++i) {
      Result<Lease> l = pool->Acquire(1.0);
      if (!l.ok()) return 10 + i;
      if (l->key_name() == "late" && l->secret() != "sk-added-before-fork-1") bad |= 1;
      if (!l->Release(0.01).ok()) bad |= 2;
    }
    // A new key in a child: only the creator knows secrets.
    if (pool->AddKey({"new", "sk-added-in-the-child", 1, 0, 0, 0}).code() != Code::kInvalidArgument) bad |= 4;
    return bad;
  }));
  BOOST_CHECK_EQUAL(child.Wait(), 0);
  PoolStatus s = Must(pool->GetStatus(), "GetStatus");
  BOOST_CHECK_EQUAL(s.totals.releases, 4u);
  BOOST_CHECK_EQUAL(s.keys.size(), 2u);
}

BOOST_AUTO_TEST_SUITE_END()

// ===========================================================================
BOOST_AUTO_TEST_SUITE(cancel)

BOOST_AUTO_TEST_CASE(cancel_ends_a_waiting_acquire) {
  std::unique_ptr<Pool> pool = MakeEmbedded(1, Strategy::kLeastBusy, /*max_concurrency=*/1);
  Result<Lease> busy = pool->TryAcquire();  // the only key is busy now
  BOOST_REQUIRE(busy.ok());
  CancelToken token;
  BOOST_CHECK(!token.cancelled());
  Pool::AcquireOptions o;
  o.timeout = 20.0;
  o.cancel = &token;
  Waiter w(*pool, o);
  // Set before or during the wait: either way it ends.
  pool->Cancel(token);
  BOOST_CHECK(token.cancelled());
  BOOST_CHECK(w.Wait() == Code::kClosed);
  BOOST_CHECK_LT(w.waited(), 5.0);
  // A wait cancelled is not a failed acquire.
  PoolStatus s = Must(pool->GetStatus(), "GetStatus");
  BOOST_CHECK_EQUAL(s.totals.no_key_available, 0u);
  BOOST_CHECK_EQUAL(s.totals.timeouts, 0u);
  // A set token stays set: the next wait with it makes one uncounted try.
  BOOST_CHECK(pool->Acquire(o).status().code() == Code::kClosed);
  BOOST_CHECK(busy->Release(0.1).ok());
  Result<Lease> got = pool->Acquire(o);  // a key is free: the one try gets it
  BOOST_CHECK(got.ok());
}

BOOST_AUTO_TEST_CASE(cancel_then_wake_waiters) {
  std::unique_ptr<Pool> pool = MakeEmbedded(1, Strategy::kLeastBusy, 1);
  Result<Lease> busy = pool->TryAcquire();
  BOOST_REQUIRE(busy.ok());
  CancelToken a, b;
  Pool::AcquireOptions oa;
  oa.timeout = 20.0;
  oa.cancel = &a;
  Pool::AcquireOptions ob = oa;
  ob.cancel = &b;
  Waiter wa(*pool, oa);
  Waiter wb(*pool, ob);
  // Both waits share the pool's futex; setting one token and waking ends
  // only the wait that uses it.
  a.Cancel();
  pool->WakeWaiters();
  BOOST_CHECK(wa.Wait() == Code::kClosed);
  BOOST_CHECK(busy->Release(0.1).ok());
  BOOST_CHECK(wb.Wait() == Code::kOk);  // got the key released
}

BOOST_AUTO_TEST_CASE(poll_is_one_uncounted_attempt) {
  std::unique_ptr<Pool> pool = MakeEmbedded(1, Strategy::kLeastBusy, 1);
  Pool::AcquireOptions poll;
  poll.poll = true;
  poll.timeout = 30.0;  // ignored
  Result<Lease> first = pool->Acquire(poll);
  BOOST_REQUIRE(first.ok());
  Result<Lease> second = pool->Acquire(poll);
  BOOST_CHECK(second.status().code() == Code::kNoAvailableKey);
  PoolStatus s = Must(pool->GetStatus(), "GetStatus");
  BOOST_CHECK_EQUAL(s.totals.no_key_available, 0u);
  BOOST_CHECK(pool->TryAcquire().status().code() == Code::kNoAvailableKey);  // counted
  s = Must(pool->GetStatus(), "GetStatus");
  BOOST_CHECK_EQUAL(s.totals.no_key_available, 1u);
}

BOOST_AUTO_TEST_SUITE_END()

// ===========================================================================
BOOST_AUTO_TEST_SUITE(attached)

namespace {

const std::string kPools =
    R"({"p":{"strategy":"round_robin","acquire_timeout":5,"keys":[)"
    R"({"name":"a","secret":"sk-test-aaaaaaaaaaaa1111","max_concurrency":1,"burst":3,"rate_margin":0.1},)"
    R"({"name":"b","secret":"sk-test-bbbbbbbbbbbb2222","max_concurrency":1}]}})";

std::unique_ptr<Pool> Connect(const testing::BrokerProcess& b) {
  Result<std::unique_ptr<Pool>> p = Pool::Connect(b.socket(), "p");
  BOOST_REQUIRE_MESSAGE(p.ok(), p.status().ToString());
  return std::move(p).value();
}

// KEYMESH_SLOW_PATH for the scope.
struct SlowPath {
  SlowPath() { ::setenv("KEYMESH_SLOW_PATH", "1", 1); }
  ~SlowPath() { ::unsetenv("KEYMESH_SLOW_PATH"); }
};

}  // namespace

BOOST_AUTO_TEST_CASE(attached_pool_leases_on_the_segment_and_changes_keys_through_the_broker) {
  testing::BrokerProcess b;
  b.WriteConfig(kPools);
  BOOST_REQUIRE(b.Start());
  std::unique_ptr<Pool> pool = Connect(b);
  BOOST_CHECK(!pool->slow_path());
  BOOST_CHECK_EQUAL(pool->name(), "p");
  {
    Result<Lease> l = pool->Acquire(1.0);
    BOOST_REQUIRE(l.ok());
    BOOST_CHECK_EQUAL(l->key_name(), "a");
    BOOST_CHECK_EQUAL(l->secret(), "sk-test-aaaaaaaaaaaa1111");
    BOOST_CHECK(l->Release(0.2).ok());
  }
  PoolStatus s = Must(pool->GetStatus(), "GetStatus");
  BOOST_CHECK_EQUAL(Key(s, "a").burst, 3u);
  BOOST_CHECK_CLOSE(Key(s, "a").rate_margin, 0.1, 1e-6);
  // Key changes go to the broker, which knows the secrets: a key added here
  // is served with its secret by the fast path.
  BOOST_REQUIRE(pool->AddKey({"c", "sk-test-cccccccccccc3333", 1, 1, 0, 0}).ok());
  BOOST_REQUIRE(pool->DisableKey("a").ok());
  BOOST_REQUIRE(pool->DisableKey("b").ok());
  {
    Result<Lease> l = pool->TryAcquire();
    BOOST_REQUIRE_MESSAGE(l.ok(), l.status().ToString());
    BOOST_CHECK_EQUAL(l->key_name(), "c");
    BOOST_CHECK_EQUAL(l->secret(), "sk-test-cccccccccccc3333");
  }
  BOOST_CHECK_EQUAL(pool->NameOfSecret("sk-test-cccccccccccc3333").value_or(""), "c");
  BOOST_CHECK_EQUAL(pool->MaskedSecretOfSlot(Key(Must(pool->GetStatus(), "GetStatus"), "c").slot).value_or(""),
                    "...3333");
  BOOST_REQUIRE(pool->EnableKey("a").ok());
  BOOST_REQUIRE(pool->RemoveKey("c").ok());
  BOOST_CHECK(pool->ResetKey("nope").code() == Code::kUnknownKey);
  BOOST_CHECK_EQUAL(pool->AvailableCount(), 1u);
  // Dead holders are the broker's to reclaim.
  BOOST_CHECK(pool->ReclaimDead().status().code() == Code::kInvalidArgument);
  // Its state file is the authority for the keys' state, too.
  BOOST_CHECK(pool->RestoreKey("a", KeyRestore{}).code() == Code::kInvalidArgument);
  // A second process's Pool sees the same keys.
  std::unique_ptr<Pool> other = Connect(b);
  BOOST_CHECK_EQUAL(Must(other->GetStatus(), "GetStatus").keys.size(), 2u);
}

BOOST_AUTO_TEST_CASE(cancel_ends_an_attached_wait) {
  testing::BrokerProcess b;
  b.WriteConfig(kPools);
  BOOST_REQUIRE(b.Start());
  std::unique_ptr<Pool> pool = Connect(b);
  Result<Lease> la = pool->TryAcquire();
  Result<Lease> lb = pool->TryAcquire();
  BOOST_REQUIRE(la.ok() && lb.ok());  // both keys busy (max_concurrency 1)
  CancelToken token;
  Pool::AcquireOptions o;
  o.timeout = 20.0;
  o.cancel = &token;
  Waiter w(*pool, o);
  pool->Cancel(token);
  BOOST_CHECK(w.Wait() == Code::kClosed);
  BOOST_CHECK_LT(w.waited(), 5.0);
}

BOOST_AUTO_TEST_CASE(fork_child_leases_through_an_inherited_attached_pool) {
  testing::BrokerProcess b;
  b.WriteConfig(kPools);
  BOOST_REQUIRE(b.Start());
  std::unique_ptr<Pool> pool = Connect(b);
  const pid_t child = testing::ForkChild([&] {
    // The child's leases are its own (its pid), its admin calls dial the
    // broker afresh.
    Result<Lease> l = pool->Acquire(2.0);
    if (!l.ok()) return 1;
    if (!l->Release(0.05).ok()) return 2;
    if (!pool->DisableKey("b").ok()) return 3;
    return 0;
  });
  BOOST_CHECK_EQUAL(testing::WaitChild(child), 0);
  PoolStatus s = Must(pool->GetStatus(), "GetStatus");
  BOOST_CHECK_EQUAL(s.totals.releases, 1u);
  BOOST_CHECK(!Key(s, "b").enabled);
  Result<Lease> l = pool->Acquire(1.0);
  BOOST_REQUIRE(l.ok());
  BOOST_CHECK_EQUAL(l->key_name(), "a");
}

BOOST_AUTO_TEST_CASE(slow_path_pool_goes_over_the_socket) {
  testing::BrokerProcess b;
  b.WriteConfig(kPools);
  BOOST_REQUIRE(b.Start());
  SlowPath slow;
  std::unique_ptr<Pool> pool = Connect(b);
  BOOST_CHECK(pool->slow_path());
  Result<Lease> la = pool->Acquire(1.0);
  BOOST_REQUIRE(la.ok());
  BOOST_CHECK_EQUAL(la->secret(), "sk-test-aaaaaaaaaaaa1111");
  Pool::AcquireOptions poll;
  poll.poll = true;
  Result<Lease> lb = pool->Acquire(poll);
  BOOST_REQUIRE(lb.ok());
  BOOST_CHECK_EQUAL(lb->key_name(), "b");
  BOOST_CHECK(pool->TryAcquire().status().code() == Code::kNoAvailableKey);
  // A token set before the call refuses it without a wait in the broker.
  CancelToken token;
  pool->Cancel(token);
  Pool::AcquireOptions o;
  o.timeout = 20.0;
  o.cancel = &token;
  const double t0 = testing::NowSeconds();
  BOOST_CHECK(pool->Acquire(o).status().code() == Code::kClosed);
  BOOST_CHECK_LT(testing::NowSeconds() - t0, 5.0);
  Lease::EndOptions failed;
  failed.permanent = true;
  BOOST_CHECK(lb->End(OutcomeKind::kFailure, failed).code() == Code::kKeyExhausted);
  BOOST_CHECK(la->Release(0.3, 7).ok());
  PoolStatus s = Must(pool->GetStatus(), "GetStatus");
  BOOST_CHECK(Key(s, "b").circuit == CircuitState::kRevoked);
  BOOST_CHECK_EQUAL(Key(s, "a").tokens, 7u);
  BOOST_CHECK_EQUAL(pool->NameOfSecret("sk-test-bbbbbbbbbbbb2222").value_or(""), "b");
  BOOST_CHECK(pool->ReclaimDead().status().code() == Code::kInvalidArgument);
  BOOST_CHECK(pool->RestoreKey("a", KeyRestore{}).code() == Code::kInvalidArgument);
  BOOST_REQUIRE(pool->ResetKey("b").ok());
  BOOST_CHECK_EQUAL(pool->AvailableCount(), 2u);
}

BOOST_AUTO_TEST_CASE(connect_to_nobody_is_broker_unavailable) {
  const std::string nowhere = "/nonexistent/keymesh-pool-test.sock";
  BOOST_CHECK(Pool::Connect(nowhere, "p").status().code() == Code::kBrokerUnavailable);
}

// ---- Schedulers outside the lock: SnapshotKeys, AcquireKey, WaitForChange --

namespace {

std::vector<KeySnapshot> SnapshotOf(Pool& pool, KeysSnapshotInfo* info) {
  std::vector<KeySnapshot> keys(16);
  BOOST_REQUIRE(pool.SnapshotKeys(keys.data(), static_cast<uint32_t>(keys.size()), info).ok());
  keys.resize(std::min<size_t>(info->count, keys.size()));
  return keys;
}

const KeySnapshot& Named(const std::vector<KeySnapshot>& keys, const std::string& name) {
  for (const KeySnapshot& k : keys) {
    if (name == k.name) return k;
  }
  BOOST_FAIL("no key " + name + " in the snapshot");
  return keys.front();
}

// Snapshot, acquire the key a stale or ineligible view names, on any Pool.
void CheckAcquireKey(Pool& pool) {
  KeysSnapshotInfo info;
  std::vector<KeySnapshot> keys = SnapshotOf(pool, &info);
  BOOST_REQUIRE_EQUAL(info.count, 2u);
  const KeySnapshot a = Named(keys, "a");
  const KeySnapshot b = Named(keys, "b");
  BOOST_CHECK(a.eligible && b.eligible);
  BOOST_REQUIRE(a.secret != nullptr);
  BOOST_CHECK_EQUAL(std::string(a.secret), "sk-test-aaaaaaaaaaaa1111");
  BOOST_CHECK_EQUAL(a.in_flight, 0u);
  BOOST_CHECK_EQUAL(a.max_concurrency, 1u);
  // The chosen key, not the strategy's first: b.
  Result<Lease> lb = pool.AcquireKey(b);
  BOOST_REQUIRE_MESSAGE(lb.ok(), lb.status().ToString());
  BOOST_CHECK_EQUAL(lb->key_name(), "b");
  keys = SnapshotOf(pool, &info);
  BOOST_CHECK_EQUAL(Named(keys, "b").in_flight, 1u);
  BOOST_CHECK(!Named(keys, "b").eligible);  // max_concurrency 1
  // Ineligible between the snapshot and the acquire: refused, not waited.
  Result<Lease> again = pool.AcquireKey(b);
  BOOST_CHECK(again.status().code() == Code::kNoAvailableKey);
  BOOST_REQUIRE(pool.DisableKey("a").ok());
  BOOST_CHECK(pool.AcquireKey(a).status().code() == Code::kNoAvailableKey);
  BOOST_REQUIRE(pool.EnableKey("a").ok());
  BOOST_REQUIRE(lb->Release(0.5).ok());
  keys = SnapshotOf(pool, &info);
  BOOST_CHECK(Named(keys, "b").has_latency);
  BOOST_CHECK_CLOSE(Named(keys, "b").latency_avg, 0.5, 1e-6);
  BOOST_CHECK_EQUAL(Named(keys, "b").successes, 1u);
  BOOST_CHECK_GE(Named(keys, "b").last_used_ago, 0.0);
  BOOST_CHECK_EQUAL(Named(keys, "a").last_used_ago, -1.0);
  // A stale identity: keys were removed and re-added since the snapshot.
  const KeySnapshot stale = Named(keys, "a");
  BOOST_REQUIRE(pool.RemoveKey("a").ok());
  BOOST_CHECK(pool.AcquireKey(stale).status().code() == Code::kUnknownKey);
  BOOST_REQUIRE(pool.AddKey({"a", "sk-test-aaaaaaaaaaaa1111", 1, 1, 0, 0}).ok());
  BOOST_CHECK(pool.AcquireKey(stale).status().code() == Code::kUnknownKey);
  keys = SnapshotOf(pool, &info);
  Result<Lease> fresh = pool.AcquireKey(Named(keys, "a"));
  BOOST_REQUIRE_MESSAGE(fresh.ok(), fresh.status().ToString());
  BOOST_CHECK_EQUAL(fresh->key_name(), "a");
}

// A wait after a snapshot ends at a release made after it, or at once when
// one happened in between; never before.
void CheckWaitForChange(Pool& pool) {
  Result<Lease> la = pool.TryAcquire();
  Result<Lease> lb = pool.TryAcquire();
  BOOST_REQUIRE(la.ok() && lb.ok());
  KeysSnapshotInfo info;
  std::vector<KeySnapshot> keys = SnapshotOf(pool, &info);
  BOOST_CHECK(!keys[0].eligible && !keys[1].eligible);
  // Nothing changes: the timeout ends it.
  auto t0 = std::chrono::steady_clock::now();
  BOOST_CHECK(pool.WaitForChange(info.wake_seq, 0.05).ok());
  BOOST_CHECK_GE(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 0.045);
  keys = SnapshotOf(pool, &info);
  // A release from another thread wakes it long before its timeout.
  // (Boost.Test's checks are not thread-safe: the thread only records.)
  std::atomic<bool> released{false};
  std::atomic<bool> release_ok{false};
  std::thread t([&] {
    while (!released.load()) std::this_thread::yield();
    release_ok = la->Release().ok();
  });
  t0 = std::chrono::steady_clock::now();
  released.store(true);
  BOOST_CHECK(pool.WaitForChange(info.wake_seq, 20.0).ok());
  BOOST_CHECK_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 5.0);
  t.join();
  BOOST_CHECK(release_ok.load());
  // A change between the snapshot and the wait: the wait returns at once.
  keys = SnapshotOf(pool, &info);
  BOOST_REQUIRE(lb->Release().ok());
  t0 = std::chrono::steady_clock::now();
  BOOST_CHECK(pool.WaitForChange(info.wake_seq, 20.0).ok());
  BOOST_CHECK_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 5.0);
  // A cancelled token ends it with kClosed.
  CancelToken token;
  token.Cancel();
  keys = SnapshotOf(pool, &info);
  BOOST_CHECK(pool.WaitForChange(info.wake_seq, 20.0, &token).code() == Code::kClosed);
  BOOST_CHECK(pool.WaitForChange(info.wake_seq, -1.0).code() == Code::kInvalidArgument);
}

std::unique_ptr<Pool> EmbeddedAB() {
  std::vector<KeySpec> keys = {{"a", "sk-test-aaaaaaaaaaaa1111", 1, 1, 0, 0},
                               {"b", "sk-test-bbbbbbbbbbbb2222", 1, 1, 0, 0}};
  PoolOptions o;
  o.strategy = Strategy::kRoundRobin;
  return Must(Pool::CreateEmbedded(keys, o), "CreateEmbedded");
}

}  // namespace

BOOST_AUTO_TEST_CASE(acquire_key_takes_the_chosen_key_or_refuses_a_stale_or_ineligible_one_embedded) {
  std::unique_ptr<Pool> pool = EmbeddedAB();
  CheckAcquireKey(*pool);
}

BOOST_AUTO_TEST_CASE(acquire_key_takes_the_chosen_key_or_refuses_a_stale_or_ineligible_one_attached) {
  testing::BrokerProcess b;
  b.WriteConfig(kPools);
  BOOST_REQUIRE(b.Start());
  std::unique_ptr<Pool> pool = Connect(b);
  CheckAcquireKey(*pool);
}

BOOST_AUTO_TEST_CASE(wait_for_change_ends_on_a_release_embedded) {
  std::unique_ptr<Pool> pool = EmbeddedAB();
  CheckWaitForChange(*pool);
}

BOOST_AUTO_TEST_CASE(wait_for_change_ends_on_a_release_attached) {
  testing::BrokerProcess b;
  b.WriteConfig(kPools);
  BOOST_REQUIRE(b.Start());
  std::unique_ptr<Pool> pool = Connect(b);
  CheckWaitForChange(*pool);
}

BOOST_AUTO_TEST_CASE(acquire_key_keeps_the_per_process_lease_cap_and_snapshot_reports_a_short_buffer) {
  std::vector<KeySpec> keys = {{"a", "sk-test-aaaaaaaaaaaa1111", 1, 0, 0, 0},
                               {"b", "sk-test-bbbbbbbbbbbb2222", 1, 0, 0, 0}};
  PoolOptions o;
  o.max_leases_per_process = 1;
  std::unique_ptr<Pool> pool = Must(Pool::CreateEmbedded(keys, o), "CreateEmbedded");
  KeysSnapshotInfo info;
  KeySnapshot one[1];
  BOOST_REQUIRE(pool->SnapshotKeys(one, 1, &info).ok());
  BOOST_CHECK_EQUAL(info.count, 2u);  // more than the buffer: the first written
  BOOST_CHECK_EQUAL(std::string(one[0].name), "a");
  BOOST_CHECK(pool->SnapshotKeys(nullptr, 1, &info).code() == Code::kInvalidArgument);
  Result<Lease> first = pool->AcquireKey(one[0]);
  BOOST_REQUIRE(first.ok());
  std::vector<KeySnapshot> all = SnapshotOf(*pool, &info);
  BOOST_CHECK(pool->AcquireKey(Named(all, "b")).status().code() == Code::kCapacityExceeded);
  // The refusals were not counted as failed acquires.
  BOOST_CHECK_EQUAL(Must(pool->GetStatus(), "GetStatus").totals.no_key_available, 0u);
}

BOOST_AUTO_TEST_CASE(slow_path_pool_has_no_snapshot) {
  testing::BrokerProcess b;
  b.WriteConfig(kPools);
  BOOST_REQUIRE(b.Start());
  SlowPath slow;
  std::unique_ptr<Pool> pool = Connect(b);
  BOOST_REQUIRE(pool->slow_path());
  KeysSnapshotInfo info;
  BOOST_CHECK(pool->SnapshotKeys(nullptr, 0, &info).code() == Code::kInvalidArgument);
  BOOST_CHECK(pool->AcquireKey(KeySnapshot{}).status().code() == Code::kInvalidArgument);
  BOOST_CHECK(pool->WaitForChange(0, 0.0).code() == Code::kInvalidArgument);
}

BOOST_AUTO_TEST_SUITE_END()

}  // namespace keymesh
