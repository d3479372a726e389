// keymesh-demo: an embedded pool of a few keys shared by forked workers.
// Each worker acquires keys, "calls the provider" (a short simulated request
// with occasional 429s and failures), reports the outcome, and exits; the
// parent prints the pool's status table. Secrets are shown masked.
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "keymesh/pool.h"

namespace {

int Worker(keymesh::Pool& pool, int id, int requests) {
  std::mt19937 rng(static_cast<unsigned>(id * 7919 + 17));
  std::uniform_int_distribution<int> latency_ms(2, 12);
  std::uniform_int_distribution<int> outcome(0, 99);
  int ok = 0;
  for (int i = 0; i < requests; ++i) {
    keymesh::Result<keymesh::Lease> lease = pool.Acquire(5.0);
    if (!lease.ok()) {
      std::fprintf(stderr, "worker %d: %s\n", id, lease.status().ToString().c_str());
      continue;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(latency_ms(rng)));  // the "API call"
    const int o = outcome(rng);
    if (o < 3) {
      (void)lease->MarkRateLimited(0.05);  // provider said 429, Retry-After 50 ms
    } else if (o < 5) {
      (void)lease->MarkFailed();
    } else {
      (void)lease->Release();  // measured latency
      ++ok;
    }
  }
  return ok;
}

}  // namespace

int main(int argc, char** argv) {
  const int workers = argc > 1 ? std::atoi(argv[1]) : 6;
  const int requests = argc > 2 ? std::atoi(argv[2]) : 200;
  std::vector<keymesh::KeySpec> keys = {
      {"team-a", "sk-demo-aaaaaaaaaaaa1111", 2, 4, 0, 0},
      {"team-b", "sk-demo-bbbbbbbbbbbb2222", 1, 4, 0, 0},
      {"team-c", "sk-demo-cccccccccccc3333", 1, 4, 0, 0},
      {"team-d", "sk-demo-dddddddddddd4444", 1, 4, 0, 0},
  };
  keymesh::PoolOptions options;
  options.default_cooldown = 0.2;
  options.max_failures = 10;
  auto pool = keymesh::Pool::CreateEmbedded(keys, options);
  if (!pool.ok()) {
    std::fprintf(stderr, "keymesh-demo: %s\n", pool.status().ToString().c_str());
    return 1;
  }
  std::printf("KeyMesh demo: %d forked workers x %d requests over %zu keys (embedded pool, least_busy)\n", workers,
              requests, keys.size());
  std::vector<pid_t> children;
  for (int w = 0; w < workers; ++w) {
    pid_t pid = fork();
    if (pid == 0) {
      Worker(**pool, w, requests);
      _exit(0);
    }
    if (pid < 0) {
      std::perror("fork");
      return 1;
    }
    children.push_back(pid);
  }
  for (pid_t pid : children) waitpid(pid, nullptr, 0);

  keymesh::Result<keymesh::PoolStatus> st = (*pool)->GetStatus();
  if (!st.ok()) return 1;
  std::printf("\n%-8s %-16s %-10s %8s %8s %8s %6s %10s\n", "key", "secret", "state", "acquires", "success", "failures",
              "429s", "ema_ms");
  for (const keymesh::KeyStatus& k : st->keys) {
    std::printf("%-8s %-16s %-10s %8llu %8llu %8llu %6llu %10.2f\n", k.name.c_str(),
                keymesh::MaskSecret(keys[k.slot].secret).c_str(), std::string(keymesh::KeyStateName(k.state)).c_str(),
                static_cast<unsigned long long>(k.acquires), static_cast<unsigned long long>(k.successes),
                static_cast<unsigned long long>(k.failures), static_cast<unsigned long long>(k.rate_limited),
                k.latency_avg * 1000.0);
  }
  const keymesh::PoolTotals& t = st->totals;
  std::printf("\ntotal: %llu acquires = %llu successes + %llu failures + %llu rate-limited; in flight now: %u\n",
              static_cast<unsigned long long>(t.acquires), static_cast<unsigned long long>(t.releases),
              static_cast<unsigned long long>(t.failures), static_cast<unsigned long long>(t.rate_limited), [&] {
                uint32_t n = 0;
                for (const auto& k : st->keys) n += k.in_flight;
                return n;
              }());
  const bool exact = t.acquires == t.releases + t.failures + t.rate_limited;
  std::printf("accounting %s\n", exact ? "exact" : "MISMATCH");
  return exact ? 0 : 1;
}
