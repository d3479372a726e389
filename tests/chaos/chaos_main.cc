// keymesh-chaos: the chaos soak run by scripts/chaos (CI runs a short one).
//
//   keymesh-chaos SECONDS [WORKERS [SEED]]
//
// SEED (default: random, printed) fixes every random choice the driver and
// its workers make (which worker dies when, when the broker dies, what each
// worker does next), so CI runs the same schedule each time; what still
// varies between runs is only where in its instruction stream a kill lands.
//
// Starts the real keymesh-broker on a private config (three pools, small
// cooldowns), forks a farm of workers that hammer acquire / release /
// mark_failed / mark_rate_limited / cancel through keymesh::Pool::Connect
// (the shm fast path) in hot loops, and meanwhile
//   - SIGKILLs a random worker every 10-50 ms and forks a new one (workers
//     run hot loops, so some die inside a critical section, many while
//     holding a lease),
//   - SIGKILLs the broker every 2-4 s and restarts it after 100-400 ms,
//   - rewrites the config and sends SIGHUP every ~1.5 s.
// Workers count what they completed in a shared anonymous mapping. At the
// end every worker is killed and the driver checks, on the broker's segment
// (name from its "event=ready ... segment=NAME" log line):
//   1. no lease leaked: once the broker reclaimed the dead, in-flight is 0
//      for every key (and the pool is consistent after repair);
//   2. per key: acquires == successes + failures + rate_limited + cancelled
//      + reclaimed + in_flight;
//   3. the segment's totals match the workers' own counts, up to the
//      operations a kill interrupted (at most one per killed worker);
//   4. a fresh client gets a key within 100 ms;
//   5. workers completed operations while the broker was down.
// Prints kills, broker restarts, reloads, operations and every violation;
// exits 1 on a violation, 2 on a set-up error. Everything (workers, broker,
// temp directory, segment) is removed on every exit path, Ctrl-C included.
#include <signal.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "keymesh/pool.h"
#include "shm/pool.h"
#include "shm/segment.h"
#include "support/broker_harness.h"

namespace {

using keymesh::testing::BrokerProcess;
using keymesh::testing::NowSeconds;

constexpr int kMaxWorkers = 64;
const char* const kPools[] = {"alpha", "beta", "gamma"};
constexpr int kPoolCount = 3;

// What one worker slot completed (summed over every process that used the
// slot). Lives in a MAP_SHARED|MAP_ANONYMOUS mapping made before any fork.
struct WorkerCounts {
  std::atomic<uint64_t> acquired;
  std::atomic<uint64_t> released;
  std::atomic<uint64_t> failed;
  std::atomic<uint64_t> rate_limited;
  std::atomic<uint64_t> cancelled;
  std::atomic<uint64_t> no_key;  // Acquire gave up (timeout)
  std::atomic<uint64_t> errors;  // an End that did not end the lease
  std::atomic<uint64_t> connects;
};

struct Shared {
  std::atomic<uint32_t> broker_down;     // 1 while the broker is killed/not ready
  std::atomic<uint64_t> ops_while_down;  // operations completed then
  WorkerCounts workers[kMaxWorkers];
};
static_assert(std::atomic<uint64_t>::is_always_lock_free, "counters are shared across processes");

volatile sig_atomic_t g_stop = 0;
void OnStopSignal(int) { g_stop = 1; }

std::string PoolsJson(int reload_round) {
  // Reloads flip a weight and a concurrency cap: same keys and secrets, new
  // configuration, so each reload really reconciles the segment.
  const int w = 1 + (reload_round % 3);
  const int cap = 2 + (reload_round % 2);
  std::string common = "\"default_cooldown\":0.01,\"max_cooldown\":0.05,\"max_failures\":50,\"acquire_timeout\":1,";
  std::string s = "{";
  s += "\"alpha\":{\"strategy\":\"least_busy\"," + common + "\"keys\":[";
  for (int i = 0; i < 4; ++i) {
    if (i) s += ",";
    s += "{\"name\":\"a" + std::to_string(i) + "\",\"secret\":\"sk-chaos-alpha-000000000" + std::to_string(i) + "\"}";
  }
  s += "]},\"beta\":{\"strategy\":\"round_robin\"," + common + "\"keys\":[";
  for (int i = 0; i < 3; ++i) {
    if (i) s += ",";
    s += "{\"name\":\"b" + std::to_string(i) + "\",\"secret\":\"sk-chaos-beta-0000000000" + std::to_string(i) +
         "\",\"max_concurrency\":" + std::to_string(cap) + "}";
  }
  s += "]},\"gamma\":{\"strategy\":\"weighted\"," + common + "\"keys\":[";
  for (int i = 0; i < 3; ++i) {
    if (i) s += ",";
    s += "{\"name\":\"g" + std::to_string(i) + "\",\"secret\":\"sk-chaos-gamma-000000000" + std::to_string(i) +
         "\",\"weight\":" + std::to_string(i == 0 ? w : 1) + "}";
  }
  s += "]}}";
  return s;
}

// The worker process: connects (retrying while the broker is down), then
// loops until killed. Counts only operations whose call returned.
[[noreturn]] void WorkerMain(const std::string& socket, Shared* shared, int index, uint32_t seed) {
  ::prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (::getppid() == 1) _exit(0);
  ::signal(SIGINT, SIG_IGN);  // Ctrl-C: the driver kills us
  WorkerCounts& c = shared->workers[index];
  std::mt19937 rng(seed);
  std::unique_ptr<keymesh::Pool> pools[kPoolCount];
  for (int p = 0; p < kPoolCount; ++p) {
    for (;;) {
      auto r = keymesh::Pool::Connect(socket, kPools[p]);
      if (r.ok() && !(*r)->slow_path()) {
        pools[p] = std::move(r).value();
        c.connects.fetch_add(1, std::memory_order_relaxed);
        break;
      }
      ::usleep(20000);
    }
  }
  for (;;) {
    keymesh::Pool& pool = *pools[rng() % kPoolCount];
    keymesh::Result<keymesh::Lease> lease = pool.Acquire(0.5);
    const bool down = shared->broker_down.load(std::memory_order_relaxed) != 0;
    if (!lease.ok()) {
      c.no_key.fetch_add(1, std::memory_order_relaxed);
      continue;
    }
    c.acquired.fetch_add(1, std::memory_order_relaxed);
    // A quarter of the leases are held for a while (a provider call), so
    // many kills land on a worker holding a lease; the rest run hot, so
    // kills also land inside the pool's critical sections.
    if (rng() % 4 == 0) ::usleep(rng() % 2000);
    const uint32_t r = rng() % 100;
    keymesh::Status st;
    std::atomic<uint64_t>* counter;
    if (r < 80) {
      st = lease->Release(0.001, 10);
      counter = &c.released;
    } else if (r < 88) {
      st = lease->MarkFailed();
      if (st.code() == keymesh::Code::kKeyExhausted) st = keymesh::Status::Ok();
      counter = &c.failed;
    } else if (r < 96) {
      st = lease->MarkRateLimited(0.005);
      counter = &c.rate_limited;
    } else {
      st = lease->Cancel();
      counter = &c.cancelled;
    }
    (st.ok() ? *counter : c.errors).fetch_add(1, std::memory_order_relaxed);
    if (down || shared->broker_down.load(std::memory_order_relaxed) != 0) {
      shared->ops_while_down.fetch_add(1, std::memory_order_relaxed);
    }
  }
}

class Chaos {
 public:
  Chaos(double seconds, int workers, uint32_t seed) : seconds_(seconds), nworkers_(workers), seed_(seed), rng_(seed) {}
  ~Chaos() {
    KillAllWorkers();
    if (shared_) ::munmap(shared_, sizeof(Shared));
  }

  int Run();

 private:
  bool StartBroker();
  void KillBroker();
  pid_t Spawn(int index);
  void KillWorker(int index);
  void KillAllWorkers();
  void Violation(const std::string& what) {
    std::printf("chaos: VIOLATION: %s\n", what.c_str());
    ++violations_;
  }
  int Check();

  double seconds_;
  int nworkers_;
  uint32_t seed_;
  std::mt19937 rng_;
  BrokerProcess broker_;
  std::string segment_;
  Shared* shared_ = nullptr;
  std::vector<pid_t> pids_;
  uint64_t worker_kills_ = 0, broker_restarts_ = 0, reloads_ = 0;
  int reload_round_ = 0;
  int violations_ = 0;
  double down_seconds_ = 0;
};

bool Chaos::StartBroker() {
  if (!broker_.Start({"--log-level", "info"}, 15)) {
    const std::optional<int> code = broker_.WaitExit(5);
    std::printf("chaos: broker did not start (exit %s):\n%s\n", code ? std::to_string(*code).c_str() : "?",
                broker_.Log().c_str());
    broker_.Kill();
    return false;
  }
  const std::string log = broker_.Log();
  const size_t ready = log.find("event=ready");
  const size_t at = ready == std::string::npos ? ready : log.find("segment=", ready);
  if (at == std::string::npos) {
    std::printf("chaos: no segment in the broker's ready line:\n%s\n", log.c_str());
    return false;
  }
  const size_t end = log.find_first_of(" \n", at);
  std::string name = log.substr(at + 8, end - at - 8);
  if (name.size() >= 2 && name.front() == '"') name = name.substr(1, name.size() - 2);
  if (!segment_.empty() && name != segment_) {
    Violation("broker came back on another segment: " + name + " (was " + segment_ + ")");
  }
  segment_ = name;
  return true;
}

void Chaos::KillBroker() { broker_.Kill(); }

pid_t Chaos::Spawn(int index) {
  // Each worker its own stream, drawn from the driver's: a respawned worker
  // does not repeat the one it replaces.
  const uint32_t seed = static_cast<uint32_t>(rng_());
  std::fflush(stdout);
  const pid_t pid = ::fork();
  if (pid == 0) WorkerMain(broker_.socket(), shared_, index, seed);
  return pid;
}

void Chaos::KillWorker(int index) {
  if (pids_[index] <= 0) return;
  ::kill(pids_[index], SIGKILL);
  int status = 0;
  ::waitpid(pids_[index], &status, 0);
  if (!WIFSIGNALED(status)) {
    Violation("worker " + std::to_string(pids_[index]) + " exited on its own (status " + std::to_string(status) + ")");
  }
  pids_[index] = -1;
  ++worker_kills_;
}

void Chaos::KillAllWorkers() {
  for (size_t i = 0; i < pids_.size(); ++i) KillWorker(static_cast<int>(i));
}

int Chaos::Run() {
  void* mem = ::mmap(nullptr, sizeof(Shared), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (mem == MAP_FAILED) return 2;
  shared_ = new (mem) Shared();
  broker_.WriteConfig(PoolsJson(0));
  if (!StartBroker()) return 2;
  std::printf("chaos: %.0f s, %d workers, seed %u, broker pid %d, segment %s\n", seconds_, nworkers_, seed_,
              broker_.pid(), segment_.c_str());
  pids_.assign(nworkers_, -1);
  for (int i = 0; i < nworkers_; ++i) pids_[i] = Spawn(i);

  const double start = NowSeconds();
  double next_broker_kill = start + 2 + (rng_() % 2000) / 1000.0;
  double next_reload = start + 1.5;
  double broker_back_at = 0;  // when down: restart time
  double down_since = 0;
  while (!g_stop && NowSeconds() - start < seconds_) {
    ::usleep(10000 + rng_() % 40000);
    KillWorker(static_cast<int>(rng_() % nworkers_));
    for (int i = 0; i < nworkers_; ++i) {
      if (pids_[i] <= 0) pids_[i] = Spawn(i);
    }
    const double now = NowSeconds();
    if (broker_.running() && now >= next_broker_kill) {
      shared_->broker_down.store(1);
      down_since = now;
      KillBroker();
      broker_back_at = now + 0.1 + (rng_() % 300) / 1000.0;
    } else if (!broker_.running() && now >= broker_back_at) {
      if (!StartBroker()) return 2;
      shared_->broker_down.store(0);
      down_seconds_ += NowSeconds() - down_since;
      ++broker_restarts_;
      next_broker_kill = NowSeconds() + 2 + (rng_() % 2000) / 1000.0;
    } else if (broker_.running() && now >= next_reload) {
      broker_.WriteConfig(PoolsJson(++reload_round_));
      broker_.Signal(SIGHUP);
      ++reloads_;
      next_reload = now + 1.5;
    }
  }
  if (!broker_.running()) {
    if (!StartBroker()) return 2;
    shared_->broker_down.store(0);
    down_seconds_ += NowSeconds() - down_since;
    ++broker_restarts_;
  }
  KillAllWorkers();
  return Check();
}

int Chaos::Check() {
  uint64_t w_acq = 0, w_end = 0, w_no_key = 0, w_err = 0, w_connects = 0;
  uint64_t w_kind[4] = {0, 0, 0, 0};
  for (int i = 0; i < nworkers_; ++i) {
    const WorkerCounts& c = shared_->workers[i];
    w_acq += c.acquired;
    w_kind[0] += c.released;
    w_kind[1] += c.failed;
    w_kind[2] += c.rate_limited;
    w_kind[3] += c.cancelled;
    w_no_key += c.no_key;
    w_err += c.errors;
    w_connects += c.connects;
  }
  for (uint64_t k : w_kind) w_end += k;

  auto seg = keymesh::shm::Segment::Open(segment_);
  if (!seg.ok()) {
    Violation("cannot open the broker's segment " + segment_ + ": " + seg.status().message());
    return 1;
  }
  // 1. Leases of the dead come back (connection EOF / pidfd), promptly.
  uint64_t in_flight = 0;
  const double deadline = NowSeconds() + 10;
  std::vector<keymesh::PoolStatus> snaps;
  do {
    snaps.clear();
    in_flight = 0;
    for (const char* name : kPools) {
      auto index = (*seg)->FindPool(name);
      if (!index) {
        Violation(std::string("pool ") + name + " missing from the segment");
        return 1;
      }
      keymesh::shm::PoolAdmin access(**seg, *index);
      keymesh::Status st = access.CheckConsistency();
      if (!st.ok()) Violation(std::string("pool ") + name + " inconsistent: " + st.message());
      auto snap = access.Snapshot();
      if (!snap.ok()) {
        Violation(std::string("pool ") + name + " snapshot: " + snap.status().message());
        return 1;
      }
      for (const auto& k : snap->keys) in_flight += k.in_flight;
      snaps.push_back(std::move(snap).value());
    }
    if (in_flight == 0) break;
    ::usleep(20000);
  } while (NowSeconds() < deadline);
  if (in_flight != 0)
    Violation("leaked leases: " + std::to_string(in_flight) + " still in flight 10 s after the workers died");

  // 2. Per-key accounting.
  uint64_t s_acq = 0, s_end = 0, s_reclaimed = 0;
  uint64_t s_kind[4] = {0, 0, 0, 0};
  for (const keymesh::PoolStatus& p : snaps) {
    for (const auto& k : p.keys) {
      const uint64_t ended = k.successes + k.failures + k.rate_limited + k.cancelled + k.reclaimed + k.in_flight;
      if (k.acquires != ended) {
        Violation("key " + p.name + "/" + k.name + ": acquires " + std::to_string(k.acquires) +
                  " != successes+failures+rate_limited+cancelled+reclaimed+in_flight " + std::to_string(ended));
      }
      s_acq += k.acquires;
      s_kind[0] += k.successes;
      s_kind[1] += k.failures;
      s_kind[2] += k.rate_limited;
      s_kind[3] += k.cancelled;
      s_reclaimed += k.reclaimed;
    }
  }
  for (uint64_t k : s_kind) s_end += k;

  // 3. The segment against the workers' own counts. A kill interrupts at
  // most one operation of the killed worker: an acquire granted in shm but
  // not yet counted, or an end done in shm but not yet counted.
  const uint64_t slack = worker_kills_;
  if (s_acq < w_acq || s_acq - w_acq > slack) {
    Violation("acquires: segment " + std::to_string(s_acq) + ", workers " + std::to_string(w_acq) +
              " (allowed: up to " + std::to_string(slack) + " more in the segment)");
  }
  if (s_end < w_end || s_end - w_end > slack) {
    Violation("ended leases: segment " + std::to_string(s_end) + ", workers " + std::to_string(w_end) +
              " (allowed: up to " + std::to_string(slack) + " more in the segment)");
  }
  const char* kinds[] = {"successes", "failures", "rate_limited", "cancelled"};
  for (int i = 0; i < 4; ++i) {
    if (s_kind[i] < w_kind[i]) {
      Violation(std::string(kinds[i]) + ": segment " + std::to_string(s_kind[i]) + " < workers " +
                std::to_string(w_kind[i]));
    }
  }
  if (s_reclaimed > slack) {
    Violation("reclaimed " + std::to_string(s_reclaimed) + " > worker kills " + std::to_string(slack));
  }
  if (w_err != 0) Violation(std::to_string(w_err) + " lease ends were refused (lease lost while held)");

  // 4. A fresh client is served within 100 ms.
  {
    auto pool = keymesh::Pool::Connect(broker_.socket(), "alpha");
    if (!pool.ok()) {
      Violation("final connect failed: " + pool.status().message());
    } else {
      const double t0 = NowSeconds();
      auto lease = (*pool)->Acquire(0.1);
      const double ms = (NowSeconds() - t0) * 1000;
      if (!lease.ok()) {
        Violation("final acquire failed: " + lease.status().message());
      } else if (ms > 100) {
        Violation("final acquire took " + std::to_string(ms) + " ms");
      } else {
        (void)lease->Release();
        std::printf("chaos: final acquire served in %.3f ms\n", ms);
      }
    }
  }

  // 5. The fast path kept serving while the broker was down.
  const uint64_t down_ops = shared_->ops_while_down.load();
  if (broker_restarts_ > 0 && down_ops == 0) Violation("no operation completed while the broker was down");

  std::printf("chaos: worker kills %" PRIu64 ", broker restarts %" PRIu64 " (down %.1f s), reloads %" PRIu64
              ", worker connects %" PRIu64 "\n",
              worker_kills_, broker_restarts_, down_seconds_, reloads_, w_connects);
  std::printf("chaos: operations %" PRIu64 " (acquires %" PRIu64 ", releases %" PRIu64 ", mark_failed %" PRIu64
              ", mark_rate_limited %" PRIu64 ", cancels %" PRIu64 "), no key in time %" PRIu64
              ", during broker downtime %" PRIu64 "\n",
              w_acq + w_end, w_acq, w_kind[0], w_kind[1], w_kind[2], w_kind[3], w_no_key, down_ops);
  std::printf("chaos: segment acquires %" PRIu64 ", ended %" PRIu64 ", reclaimed %" PRIu64 ", in flight %" PRIu64 "\n",
              s_acq, s_end, s_reclaimed, in_flight);
  if (w_acq == 0) Violation("the workers completed no operation");
  if (worker_kills_ > 100 && s_reclaimed == 0) {
    std::printf("chaos: warning: no kill hit a worker holding a lease (machine too slow?)\n");
  }
  std::printf("chaos: %s (%d violation%s)\n", violations_ ? "FAILED" : "OK", violations_, violations_ == 1 ? "" : "s");
  return violations_ ? 1 : 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || argc > 4) {
    std::fprintf(stderr, "usage: keymesh-chaos SECONDS [WORKERS [SEED]]\n");
    return 2;
  }
  const double seconds = std::atof(argv[1]);
  const int workers = argc > 2 ? std::atoi(argv[2]) : 8;
  const uint32_t seed = argc > 3 ? static_cast<uint32_t>(std::strtoul(argv[3], nullptr, 10)) : std::random_device{}();
  if (seconds <= 0 || workers < 1 || workers > kMaxWorkers) {
    std::fprintf(stderr, "keymesh-chaos: bad SECONDS or WORKERS (1..%d)\n", kMaxWorkers);
    return 2;
  }
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  struct sigaction sa {};
  sa.sa_handler = OnStopSignal;
  ::sigaction(SIGINT, &sa, nullptr);
  ::sigaction(SIGTERM, &sa, nullptr);
  int rc;
  {
    Chaos chaos(seconds, workers, seed);
    rc = chaos.Run();
  }  // workers killed, broker killed, segment and directory removed
  if (g_stop) {
    std::printf("chaos: interrupted\n");
    return rc == 0 ? 130 : rc;
  }
  return rc;
}
