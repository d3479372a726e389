// keymesh-bench: fast-path micro and multi-process benchmarks (not a test).
//
// Prints one table per section. Every figure is the median of several runs;
// the floors are measured in the same run so ratios stay meaningful on noisy
// machines:
//   - a bare robust-mutex lock+unlock (the pthread mutex in shm the pool uses)
//   - an uncontended linear scan of the same key slots (what a naive
//     "min over all keys" would cost)
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "keymesh/pool.h"
#include "shm/clock.h"
#include "shm/pool.h"
#include "shm/robust_mutex.h"
#include "shm/segment.h"

namespace {

using keymesh::shm::MonotonicNowNanos;

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

template <typename Fn>
double NanosPerOp(Fn&& fn, uint64_t iterations, int runs = 7) {
  std::vector<double> results;
  for (int r = 0; r < runs; ++r) {
    const uint64_t t0 = MonotonicNowNanos();
    for (uint64_t i = 0; i < iterations; ++i) fn();
    const uint64_t t1 = MonotonicNowNanos();
    results.push_back(static_cast<double>(t1 - t0) / static_cast<double>(iterations));
  }
  return Median(results);
}

std::unique_ptr<keymesh::shm::Segment> MakeSegment(uint32_t keys) {
  keymesh::shm::Capacities caps{1, std::max<uint32_t>(keys, 8), 4096};
  auto seg = keymesh::shm::Segment::CreateAnonymous(caps);
  if (!seg.ok()) {
    std::fprintf(stderr, "bench: %s\n", seg.status().ToString().c_str());
    std::exit(1);
  }
  return std::move(seg).value();
}

keymesh::shm::PoolAccess MakePool(keymesh::shm::Segment& seg, uint32_t keys, keymesh::Strategy strategy) {
  keymesh::shm::PoolConfig cfg{};
  cfg.strategy = static_cast<uint32_t>(strategy);
  cfg.max_failures = 10;
  cfg.default_cooldown = 60 * keymesh::shm::kNanosPerSecond;
  cfg.max_cooldown = 600 * keymesh::shm::kNanosPerSecond;
  auto idx = seg.CreatePool("bench", cfg.strategy, cfg);
  keymesh::shm::PoolAccess pool(seg, *idx);
  for (uint32_t k = 0; k < keys; ++k) {
    std::string name = "key-" + std::to_string(k);
    keymesh::shm::KeyDefinition def;
    def.name = name;
    def.fingerprint = k + 1;
    (void)pool.AddKey(def);
  }
  return pool;
}

// Floor 1: the robust mutex alone, in shared memory.
double LockUnlockNs() {
  void* mem = mmap(nullptr, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  auto* m = new (mem) keymesh::shm::RobustMutex();
  (void)m->Init();
  const double ns = NanosPerOp([&] {
    m->Lock();
    m->Unlock();
  }, 2'000'000);
  munmap(mem, 4096);
  return ns;
}

// Floor 2: an uncontended scan of `keys` slots choosing the least in-flight
// key (what a linear selector would do on every acquire).
double ScanNs(keymesh::shm::Segment& seg, uint32_t keys) {
  const auto* slots = reinterpret_cast<const keymesh::shm::KeySlot*>(seg.pool_data(0) + seg.header()->keys_offset);
  volatile uint32_t sink = 0;
  const uint64_t iters = keys >= 1000 ? 200'000 : 2'000'000;
  return NanosPerOp([&] {
    uint32_t best = 0;
    uint32_t best_in = UINT32_MAX;
    for (uint32_t s = 0; s < keys; ++s) {
      const auto& st = slots[s].state;
      const bool eligible = st.enabled && st.cooldown_deadline == 0;
      if (eligible && st.in_flight < best_in) {
        best_in = st.in_flight;
        best = s;
      }
    }
    sink = best;
  }, iters);
}

double PairNs(keymesh::shm::PoolAccess& pool) {
  keymesh::shm::Outcome ok;
  return NanosPerOp([&] {
    auto h = pool.TryAcquire();
    (void)pool.Release(*h, ok);
  }, 1'000'000);
}

double PoolApiPairNs(uint32_t keys) {
  std::vector<keymesh::KeySpec> specs;
  for (uint32_t k = 0; k < keys; ++k) {
    specs.push_back({"key-" + std::to_string(k), "sk-bench-secret-" + std::to_string(k), 1, 0, 0, 0});
  }
  keymesh::EmbeddedOptions emb;
  emb.keys_capacity = std::max<uint32_t>(keys, 8);
  auto pool = keymesh::Pool::CreateEmbedded(specs, {}, emb);
  return NanosPerOp([&] {
    auto lease = (*pool)->TryAcquire();
    (void)lease->Release(0.1);
  }, 1'000'000);
}

// Aggregate pairs/s with `procs` forked processes on one pool.
double Throughput(keymesh::shm::Segment& seg, uint32_t procs, double seconds) {
  auto* counters = static_cast<std::atomic<uint64_t>*>(
      mmap(nullptr, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0));
  auto* go = counters + 64;
  new (go) std::atomic<uint64_t>(0);
  std::vector<pid_t> kids;
  for (uint32_t p = 0; p < procs; ++p) {
    pid_t pid = fork();
    if (pid == 0) {
      keymesh::shm::PoolAccess pool(seg, 0);
      keymesh::shm::Outcome ok;
      while (go->load(std::memory_order_acquire) == 0) {
      }
      uint64_t n = 0;
      while (go->load(std::memory_order_relaxed) == 1) {
        for (int i = 0; i < 256; ++i) {
          auto h = pool.TryAcquire();
          if (h.ok()) {
            (void)pool.Release(*h, ok);
            ++n;
          }
        }
      }
      counters[p].store(n);
      _exit(0);
    }
    kids.push_back(pid);
  }
  const uint64_t t0 = MonotonicNowNanos();
  go->store(1, std::memory_order_release);
  usleep(static_cast<useconds_t>(seconds * 1e6));
  go->store(2, std::memory_order_release);
  const uint64_t t1 = MonotonicNowNanos();
  uint64_t total = 0;
  for (pid_t k : kids) waitpid(k, nullptr, 0);
  for (uint32_t p = 0; p < procs; ++p) total += counters[p].load();
  munmap(counters, 4096);
  return static_cast<double>(total) / (static_cast<double>(t1 - t0) / 1e9);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1 && std::strcmp(argv[1], "--pair-only") == 0) {
    // For profilers: 8 keys, least_busy, pairs only.
    auto seg = MakeSegment(8);
    auto pool = MakePool(*seg, 8, keymesh::Strategy::kLeastBusy);
    std::printf("pair ns: %.1f\n", PairNs(pool));
    return 0;
  }
  const double seconds = argc > 1 ? std::atof(argv[1]) : 1.0;
  const double lock_ns = LockUnlockNs();
  std::printf("\n== Fast path: one acquire+release pair, one process (median of 7 runs) ==\n");
  std::printf("bare robust-mutex lock+unlock: %.1f ns\n\n", lock_ns);
  std::printf("%-6s %-11s %10s %10s %11s %12s %12s %14s\n", "keys", "strategy", "pair ns", "scan ns",
              "floor ns", "pair/floor", "pair/2locks", "Pool API ns");
  for (uint32_t keys : {8u, 64u, 1000u}) {
    for (keymesh::Strategy strategy :
         {keymesh::Strategy::kLeastBusy, keymesh::Strategy::kRoundRobin, keymesh::Strategy::kWeighted}) {
      auto seg = MakeSegment(keys);
      auto pool = MakePool(*seg, keys, strategy);
      const double scan = ScanNs(*seg, keys);
      const double pair = PairNs(pool);
      const double floor = lock_ns + scan;
      const double api = strategy == keymesh::Strategy::kLeastBusy ? PoolApiPairNs(keys) : 0.0;
      char api_text[32] = "-";
      if (api > 0) std::snprintf(api_text, sizeof(api_text), "%.1f", api);
      std::printf("%-6u %-11s %10.1f %10.1f %11.1f %12.2f %12.2f %14s\n", keys,
                  std::string(keymesh::StrategyName(strategy)).c_str(), pair, scan, floor, pair / floor,
                  pair / (2 * lock_ns), api_text);
    }
  }
  std::printf("\nfloor = lock+unlock + scan of the same slots; pair/2locks compares with the two lock\n"
              "round trips a pair needs at least. Pool API = keymesh::Pool TryAcquire + Lease::Release.\n");

  std::printf("\n== Aggregate throughput: processes hammering one 64-key least_busy pool (%.1f s each) ==\n",
              seconds);
  std::printf("%-10s %16s %14s\n", "processes", "pairs/s", "vs 1 process");
  double one = 0;
  for (uint32_t procs : {1u, 2u, 8u}) {
    auto seg = MakeSegment(64);
    (void)MakePool(*seg, 64, keymesh::Strategy::kLeastBusy);
    const double rate = Throughput(*seg, procs, seconds);
    if (procs == 1) one = rate;
    std::printf("%-10u %16.0f %13.2fx\n", procs, rate, rate / one);
  }
  return 0;
}
