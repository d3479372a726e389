// The mesh job's insides, shared by the files it is built from and by
// nothing else:
//   mesh_job.cc      the job's life (start, stop, keys), its status, key fingerprints
//   mesh_refresh.cc  the refresh thread: leases, shares into the segment, outages
//   mesh_demand.cc   what this host asks of each key
//   mesh_events.cc   the watcher (local changes out, the shared probe) and the
//                    event reader (other hosts' changes in)
#ifndef KEYMESH_BROKER_MESH_MESH_JOB_IMPL_H_
#define KEYMESH_BROKER_MESH_MESH_JOB_IMPL_H_

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "broker/log.h"
#include "broker/mesh/mesh_demand.h"
#include "broker/mesh/mesh_job.h"
#include "shm/clock.h"
#include "shm/pool.h"

namespace keymesh::broker::mesh {

inline constexpr uint64_t kMsNs = 1'000'000;
inline constexpr uint64_t kSecNs = 1'000'000'000;

inline std::string KeyOf(const std::string& pool, const std::string& key) {
  std::string id = pool;
  id.push_back('\0');
  id += key;
  return id;
}

// Redis time (ms) and CLOCK_MONOTONIC (ns) differ by an offset the refresh
// thread measures at every round trip (to +-RTT/2); the other threads read it.
class ClockOffset {
 public:
  void Set(int64_t redis_ms, uint64_t mono_mid_ns) noexcept {
    offset_us_.store(redis_ms * 1000 - static_cast<int64_t>(mono_mid_ns / 1000), std::memory_order_relaxed);
    valid_.store(true, std::memory_order_release);
  }
  bool valid() const noexcept { return valid_.load(std::memory_order_acquire); }
  int64_t ToRedisMs(uint64_t mono_ns) const noexcept {
    return (static_cast<int64_t>(mono_ns / 1000) + offset_us_.load(std::memory_order_relaxed)) / 1000;
  }
  // 0 for a deadline already past on this host's clock (or nonsense).
  uint64_t ToMonoNs(int64_t redis_ms) const noexcept {
    if (redis_ms <= 0 || redis_ms > (INT64_MAX / 1000) - (int64_t{1} << 50)) return 0;
    const int64_t us = redis_ms * 1000 - offset_us_.load(std::memory_order_relaxed);
    if (us <= 0) return 0;
    return static_cast<uint64_t>(us) * 1000;
  }

 private:
  std::atomic<int64_t> offset_us_{0};
  std::atomic<bool> valid_{false};
};

// Exponential reconnect delays with +-25 % jitter, so brokers that lost
// Redis together do not come back as a herd.
class Backoff {
 public:
  Backoff(double min_s, double max_s) : min_(min_s), max_(max_s), next_(min_s), rng_(std::random_device{}()) {}
  void Reset() noexcept { next_ = min_; }
  std::chrono::nanoseconds Next() {
    const double base = next_;
    next_ = std::min(max_, next_ * 2);
    std::uniform_real_distribution<double> jitter(0.75, 1.25);
    return std::chrono::nanoseconds(static_cast<int64_t>(base * jitter(rng_) * 1e9));
  }

 private:
  double min_, max_, next_;
  std::mt19937_64 rng_;
};

// What this host last knew of a key's shared state (its own changes
// published, other hosts' changes merged), to tell a local change from an
// echo of a remote one.
struct Known {
  uint64_t cool = 0;  // cooldown deadline, mono ns
  uint32_t circuit = 0;
  bool enabled = true;
  bool seen = false;
  uint64_t version = 0;  // the key's reset generation last applied or published
};

// The refresh thread's view of one key.
struct KeyRuntime {
  MeshKey def;
  uint64_t acquires = 0;
  uint64_t tokens = 0;
  bool counted = false;
  double wants_req = 0;
  double wants_tok = 0;
  double has_req = 0;  // the current grant (per second)
  double has_tok = 0;
  double burst = 1;
  double pace_rpm = 0;  // what this host paces the key at now (ApplyShares), for the status
  double pace_tpm = 0;
  uint32_t holders = 0;
  bool mismatch = false;
  bool mismatch_logged = false;
};

// The key's burst for the whole mesh (B_g): its configured burst (0 or 1:
// smooth pacing). Each host's part is B_g x its share of the rate, at least
// one request: so a key paced smoothly stays smooth on every host (a
// provider counting per fixed second refuses what bursts add up to).
inline double Burst(const MeshKey& k) { return std::max(1.0, static_cast<double>(k.burst)); }

struct MeshJob::Impl {
  MeshConfig config;
  StoreFactory factory;

  // Guards keys, keys_gen, status, delays; cv wakes the threads on Stop().
  mutable std::mutex mu;
  std::condition_variable cv;
  bool refresh_now = false;  // under mu: another host asked for a rebalance
  std::vector<MeshKey> keys;
  std::map<std::string, shm::PoolAdmin*> admins;
  std::atomic<uint64_t> keys_gen{0};
  MeshStatus status;
  bool redis_state_logged = false;    // the first state (up or down) is logged too
  MeshStore* reader_store = nullptr;  // the reader's, while it runs (Interrupt() under mu)
  std::vector<double> delays;         // propagation delays of applied events (s), a ring
  size_t delay_next = 0;
  std::atomic<bool> stop{false};
  bool started = false;

  // Guards known: the watcher's diff and the reader's merges are one at a
  // time, so a remote change is never mistaken for a local one.
  std::mutex known_mu;
  std::map<std::string, Known> known;

  // Set by a merge of remote state: the watcher re-reads the pools (a
  // circuit another host opened takes part in the shared probe here too).
  std::atomic<bool> rediff{false};

  ClockOffset offset;
  std::atomic<uint64_t> last_refresh_ns{0};  // mono ns of the last successful refresh, 0 never
  std::atomic<uint64_t> lease_until_ns{0};   // mono ns the current grants end
  std::atomic<uint64_t> rtt_ns{0};

  std::thread refresh_thread;
  std::thread watch_thread;
  std::thread reader_thread;

  bool Sleep(std::chrono::nanoseconds d) {
    std::unique_lock lock(mu);
    return !cv.wait_for(lock, d, [&] { return stop.load(); });
  }
  // The refresh thread's wait for its next refresh: until `next`, or until
  // another host asked for a rebalance, but not before `earliest`. False
  // when the job stops.
  // *rebalance tells whether the wait ended for a rebalance.
  bool SleepUntilRefresh(std::chrono::steady_clock::time_point next, std::chrono::steady_clock::time_point earliest,
                         bool* rebalance) {
    std::unique_lock lock(mu);
    *rebalance = false;
    if (!cv.wait_until(lock, next, [&] { return stop.load() || refresh_now; })) return true;
    if (stop.load()) return false;
    const bool stopped = cv.wait_until(lock, earliest, [&] { return stop.load(); });
    refresh_now = false;
    *rebalance = true;
    return !stopped;
  }
  void RequestRefresh() {
    {
      std::lock_guard lock(mu);
      refresh_now = true;
      ++status.rebalances;
    }
    cv.notify_all();
  }
  shm::PoolAdmin* pools(const std::string& pool) {
    std::lock_guard lock(mu);
    auto it = admins.find(pool);
    return it == admins.end() ? nullptr : it->second;
  }
  // Every pool's shares are good until `until` (mono ns): a host whose
  // broker died stops granting them then (PoolHeader::share_until).
  void Vouch(uint64_t until) {
    std::lock_guard lock(mu);
    for (auto& [name, admin] : admins) admin->SetShareDeadline(until);
  }
  std::pair<std::vector<MeshKey>, uint64_t> Keys() {
    std::lock_guard lock(mu);
    return {keys, keys_gen.load()};
  }

  void NoteRedis(bool ok, const std::string& error) {
    bool changed = false;
    {
      std::lock_guard lock(mu);
      changed = status.redis_ok != ok || !redis_state_logged;
      // Redis answers again after an outage: the reader may still wait on
      // a connection that died with it (a blackhole sends no reset), so it
      // reconnects and resyncs now rather than at the end of its block.
      if (changed && ok && redis_state_logged && reader_store != nullptr) reader_store->Interrupt();
      redis_state_logged = true;
      status.redis_ok = ok;
      status.last_error = ok ? "" : error;
    }
    if (!changed) return;
    if (ok) {
      Log(LogLevel::kInfo, "mesh_redis", {{"state", "up"}, {"redis", config.redis.Describe()}});
    } else {
      Log(LogLevel::kWarn, "mesh_redis", {{"state", "down"}, {"redis", config.redis.Describe()}, {"error", error}});
    }
  }
  void SetMode(MeshMode mode) {
    MeshMode from;
    {
      std::lock_guard lock(mu);
      from = status.mode;
      status.mode = mode;
    }
    if (from != mode) Log(LogLevel::kInfo, "mesh_mode", {{"from", MeshModeName(from)}, {"to", MeshModeName(mode)}});
  }

  // --- refresh thread ------------------------------------------------------
  void RefreshLoop();
  void ApplyShares(std::map<std::string, KeyRuntime>& rt, const std::vector<std::string>& order, MeshMode mode,
                   uint32_t hosts);
  // After less than half a refresh period since the wants were last set (an
  // early refresh: a rebalance) they only grow, as a fraction of a period
  // shows a rise, not a fall; but a clear fall (PoolDemand::Rate), which
  // the last whole period shows, lowers them.
  // `wants` false: a sample between refreshes, which only adds an interval
  // (so a queue and a rise show at the refresh with the resolution of the
  // samples, not of a refresh period); `last_wants_ns` is the time of the
  // last measurement that set the wants.
  // A sample returns true when a pool's queue now calls for the whole key
  // of a key whose wants are less (the refresh should come at once).
  bool MeasureDemand(std::map<std::string, KeyRuntime>& rt, uint64_t now, uint64_t* last_ns, uint64_t* last_wants_ns,
                     std::map<std::string, PoolDemand>* demand, bool wants);
  void PublishKeyStatus(const std::map<std::string, KeyRuntime>& rt, const std::vector<std::string>& order);

  // --- watcher -------------------------------------------------------------
  void WatchLoop();
  // --- reader --------------------------------------------------------------
  void ReadLoop();
  void Apply(const KeyEvent& e, bool count);
};

}  // namespace keymesh::broker::mesh

#endif  // KEYMESH_BROKER_MESH_MESH_JOB_IMPL_H_
