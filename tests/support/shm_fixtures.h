// Fixtures shared by the shm test suites: segments and pools made per test,
// pool configs and lease outcomes spelled once, and a named-segment guard
// that removes the segment even when the test fails. Forked children, pipes
// and shared counters are support/process.h's (re-exported here).
#ifndef KEYMESH_TESTS_SUPPORT_SHM_FIXTURES_H_
#define KEYMESH_TESTS_SUPPORT_SHM_FIXTURES_H_

#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "keymesh/status.h"
#include "keymesh/types.h"
#include "shm/clock.h"
#include "shm/layout.h"
#include "shm/pool.h"
#include "shm/segment.h"
#include "support/process.h"

namespace keymesh::shm::testing {

// The process helpers, shared with every other suite.
using keymesh::testing::ChildGuard;
using keymesh::testing::ForkChild;
using keymesh::testing::Pipe;
using keymesh::testing::ProcessCpuNanos;
using keymesh::testing::SharedArray;
using keymesh::testing::WaitChild;

// Aborts the test (or the child) with a message when a Result failed.
template <typename T>
T Must(Result<T> r, const char* what) {
  if (!r.ok()) {
    std::fprintf(stderr, "%s failed: %s\n", what, r.status().ToString().c_str());
    std::abort();
  }
  return std::move(r).value();
}

// A pool's config in the segment's form, through the one conversion every
// creator of pools uses (shm::ToPoolConfig).
inline PoolConfig MakeConfig(Strategy strategy, double default_cooldown = 60.0, uint32_t max_failures = 10,
                             double max_cooldown = 600.0, double max_lease = 600.0) {
  PoolOptions o;
  o.strategy = strategy;
  o.default_cooldown = default_cooldown;
  o.max_failures = max_failures;
  o.max_cooldown = max_cooldown;
  o.max_lease_seconds = max_lease;
  return ToPoolConfig(o);
}

// How a lease ends, spelled once.
inline Outcome Success(std::optional<double> latency = std::nullopt, uint64_t tokens = 0) {
  Outcome o;
  o.kind = OutcomeKind::kSuccess;
  o.latency = latency;
  o.tokens = tokens;
  return o;
}
inline Outcome Failure(bool permanent = false) {
  Outcome o;
  o.kind = OutcomeKind::kFailure;
  o.permanent = permanent;
  return o;
}
inline Outcome RateLimited(std::optional<double> cooldown = std::nullopt) {
  Outcome o;
  o.kind = OutcomeKind::kRateLimited;
  o.cooldown = cooldown;
  return o;
}
inline Outcome Cancelled() {
  Outcome o;
  o.kind = OutcomeKind::kCancelled;
  return o;
}

// An anonymous segment with one pool ("p") and keys k0..k{n-1}; the
// PoolAdmin reads `clock`. Shared with children forked afterwards.
struct TestPool {
  std::unique_ptr<Segment> segment;
  uint32_t index = 0;
  std::unique_ptr<PoolAdmin> pool;

  TestPool(uint32_t keys, const PoolConfig& config, const Clock& clock = SystemClock::Instance(),
           Capacities caps = Capacities{1, 64, 256}, uint32_t max_concurrency = 0,
           const std::vector<uint32_t>& weights = {}) {
    segment = Must(Segment::CreateAnonymous(caps), "CreateAnonymous");
    index = Must(segment->CreatePool("p", config.strategy, config), "CreatePool");
    pool = std::make_unique<PoolAdmin>(*segment, index, clock);
    for (uint32_t i = 0; i < keys; ++i) {
      const std::string name = "k" + std::to_string(i);
      KeyDefinition def;
      def.name = name;
      def.fingerprint = 1000 + i;
      def.weight = i < weights.size() ? weights[i] : 1;
      def.max_concurrency = max_concurrency;
      Must(pool->AddKey(def), "AddKey");
    }
  }

  PoolStatus Snap() { return Must(pool->Snapshot(), "Snapshot"); }

  const KeyStatus& Key(const PoolStatus& s, std::string_view name) {
    for (const KeyStatus& k : s.keys) {
      if (k.name == name) return k;
    }
    std::fprintf(stderr, "no key %.*s in snapshot\n", static_cast<int>(name.size()), name.data());
    std::abort();
  }
};

inline std::string KeyName(uint32_t slot) { return "k" + std::to_string(slot); }

// A segment name unique to this process and call.
inline std::string UniqueSegmentName(std::string_view tag) {
  static std::atomic<uint32_t> counter{0};
  return "keymesh-test-" + std::string(tag) + "-" + std::to_string(::getpid()) + "-" +
         std::to_string(counter.fetch_add(1));
}

// Removes a named segment when the scope ends, pass or fail.
struct SegmentNameGuard {
  std::string name;
  explicit SegmentNameGuard(std::string n) : name(std::move(n)) {}
  ~SegmentNameGuard() { (void)Segment::Remove(name); }
};

// Waits (bounded) until `pid` sleeps with the pool's sleeper flag raised:
// then it is inside FutexWait (or about to enter it with a stale sequence,
// which returns at once), so a wake-up is what lets it continue.
inline bool WaitUntilAsleep(PoolAdmin& pool, pid_t pid) {
  const uint64_t give_up = MonotonicNowNanos() + 10 * kNanosPerSecond;
  char path[64];
  std::snprintf(path, sizeof(path), "/proc/%d/stat", static_cast<int>(pid));
  while (MonotonicNowNanos() < give_up) {
    if (pool.header()->sleepers.load() != 0) {
      char buf[512] = {};
      int fd = ::open(path, O_RDONLY);
      if (fd < 0) return false;
      ssize_t n = ::read(fd, buf, sizeof(buf) - 1);
      ::close(fd);
      const char* p = n > 0 ? std::strrchr(buf, ')') : nullptr;
      if (p != nullptr && p[1] == ' ' && p[2] == 'S') return true;
    }
    timespec ts{0, 200'000};  // polling a condition, bounded by give_up
    nanosleep(&ts, nullptr);
  }
  return false;
}

}  // namespace keymesh::shm::testing

#endif  // KEYMESH_TESTS_SUPPORT_SHM_FIXTURES_H_
