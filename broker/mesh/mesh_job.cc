#include "broker/mesh/mesh_job.h"

#include <time.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <optional>
#include <random>
#include <set>
#include <utility>

#include <boost/uuid/detail/sha1.hpp>

#include "broker/log.h"
#include "shm/pool.h"

namespace keymesh::broker::mesh {
namespace {

constexpr uint64_t kMsNs = 1'000'000;
constexpr uint64_t kSecNs = 1'000'000'000;
// How often the watcher looks at the pools' change counters (one atomic
// load per pool): the first part of a cooldown's propagation delay.
constexpr auto kWatchInterval = std::chrono::milliseconds(1);
// A publish that failed is retried this often while Redis is away.
constexpr uint64_t kRetryNs = 100 * kMsNs;
// The blocking read of the event stream waits this long for an event: an
// idle reader costs Redis one XREAD per 30 s, next to the lease's one call
// per refresh. Stop() and a Redis that came back after an outage interrupt
// it (MeshStore::Interrupt); TCP keepalive finds a peer that vanished.
constexpr uint32_t kReadBlockMs = 30'000;
// A claimed half-open probe is claimed this long before the circuit's
// deadline, so losers extend their open circuit before they would probe.
constexpr uint64_t kProbeLeadNs = 200 * kMsNs;
// Demand: the least a host asks of a key (a share of its limit every host
// keeps, so a host that turns busy is served at once from it); a pool is
// saturated when its workers queue for the shares: on average at least
// kSaturatedWaiting of them waited in acquire while it used kSaturatedUse
// of the shares it held or more (waits alone may be a cooldown or a
// concurrency cap; a high use alone is a steady host near its wants); the
// margin over the measured use of a pool that is not.
constexpr double kWantsFloor = 0.02;
constexpr double kSaturatedWaiting = 0.5;
constexpr double kSaturatedUse = 0.8;
constexpr double kWantsMargin = 1.04;
constexpr double kSaturatedGrowth = 1.5;
// Refresh periods over which a pool's use is measured (a fall shows within
// two refreshes), and over which its waits are (at least: one interval,
// however long).
constexpr double kDemandWindow = 2;
constexpr double kSaturatedSpan = 0.5;
// Demand samples per refresh period (the last one is the refresh's own).
constexpr int kDemandSamples = 4;
// A saturated pool whose workers queued this long (refresh periods) asks for
// the whole key: its queue outlasted what kSaturatedGrowth brought, so its
// demand is more than a squeeze of a moment, and the allocator's max-min
// split (an equal part of what the others leave) is reached within two
// refreshes.
constexpr double kSaturatedEscalation = 0.9;
// The span of the use that counts as a rise (a shorter one reads a few
// requests' chance as a rise).
constexpr double kRiseSpan = 1;
// A use over the last refresh period below this part of the window's, and
// lower by this part of the pool's limits, is a fall that shows at once
// (PoolDemand::Rate).
constexpr double kClearFall = 0.5;
constexpr double kClearFallOfLimit = 0.1;
// A rebalance (another host is short of its fair part): this host refreshes
// at once, but not sooner than this after its last refresh; a host that was
// short refreshes again kShortRetry later, once the others gave back, or
// half a refresh period when that is less (but twice the gap at least: the
// others' rebalance and its report come first).
constexpr auto kRebalanceGap = std::chrono::milliseconds(50);
constexpr auto kShortRetry = std::chrono::milliseconds(150);
// A refresh that lowered a grant by more than this part of the key's limit
// (on a rebalance: kGiveBackOnRebalance) is followed at once by another:
// Redis counts a lowered grant as the old one until the host's next request
// reports it (the reply may be lost), and whoever wanted it (the short host
// retries kShortRetry later) gets it only then. A smaller give-back waits
// for the next refresh (a steady host's use wanders by a few per cent).
constexpr double kGiveBack = 0.05;
constexpr double kGiveBackOnRebalance = 0.01;
// Every share's lease ends this early on this host's clock: the round trip
// plus this, so that no host uses a share past Redis's view of its lease.
constexpr uint64_t kExpiryMarginNs = 50 * kMsNs;
// A lease request's deadline (LeaseRequest::deadline_ms) is this much past
// the host's timeout: room for the error of its idea of Redis time.
constexpr int64_t kStaleMarginMs = 100;

uint64_t MonoNs() noexcept {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * kSecNs + static_cast<uint64_t>(ts.tv_nsec);
}

std::string KeyOf(const std::string& pool, const std::string& key) {
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

// The refresh thread's view of one pool's demand on this host: its workers'
// give-ups and waits last seen, and the use, shares and waits of its keys
// over the last intervals (requests or tokens; summed over the pool's keys).
struct PoolDemand {
  uint64_t gave_up = 0;
  std::optional<uint32_t> wait_clock;  // the pool's wait clock (ms, wraps at 2^32) last seen
  // Since when the pool's workers queue (every measurement since saw them
  // queue); 0: they do not.
  uint64_t queued_since = 0;
  // A sample called the refresh for this queue already (once per queue: a
  // verdict that flips at the refresh does not make every sample one).
  bool escalated = false;
  // One refresh interval (dt seconds): what the pool's keys admitted
  // (requests, tokens), the shares they held over it (share x seconds) and
  // the seconds its workers waited in acquire.
  struct Interval {
    double dt = 0, used_req = 0, held_req = 0, used_tok = 0, held_tok = 0, waited = 0;
  };
  // The newest intervals (a rebalance makes some short).
  static constexpr size_t kSlots = 16;
  std::array<Interval, kSlots> last{};
  size_t n = 0;

  void Add(const Interval& in) {
    if (in.dt <= 0) return;  // the first measurement has no interval
    last[n % kSlots] = in;
    ++n;
  }
  // The newest intervals summed, back until they span `span` seconds (at
  // least the newest one).
  Interval Since(double span) const {
    Interval s;
    for (size_t i = 0; i < std::min(n, kSlots) && (i == 0 || s.dt < span); ++i) {
      const Interval& x = last[(n - 1 - i) % kSlots];
      s.dt += x.dt;
      s.used_req += x.used_req;
      s.held_req += x.held_req;
      s.used_tok += x.used_tok;
      s.held_tok += x.held_tok;
      s.waited += x.waited;
    }
    return s;
  }
  // Its workers queued in `s` (on average kSaturatedWaiting of them
  // waiting).
  static bool Queued(const Interval& s) { return s.dt > 0 && s.waited >= kSaturatedWaiting * s.dt; }
  // Saturated in `s` (the newest intervals over about half a refresh
  // period: a pool that turned busy counts at once, not once its idle
  // intervals left a window, and one whose queue the larger share emptied
  // asks for its use again at once): its workers queued while it used
  // kSaturatedUse of what it held.
  static bool Saturated(const Interval& s, bool tokens) {
    const double used = tokens ? s.used_tok : s.used_req;
    const double held = tokens ? s.held_tok : s.held_req;
    // Requests come whole: a share of less than a request or two over the
    // span is used up by one request more than was counted.
    const double grain = tokens ? 0.0 : 1.0;
    return Queued(s) && held > 0 && used + grain >= kSaturatedUse * held;
  }
  // The pool's use per second (requests or tokens): over the window, or
  // over about the last refresh period when that is more (a rise counts at
  // once) or, with no worker queueing, less than kClearFall of it and by
  // kClearFallOfLimit of the pool's `limits` (a host whose workers left
  // gives back a refresh sooner; a use that wanders, a few requests' chance,
  // or a use a cooldown or a squeeze holds down waits for the window).
  // *fell tells whether the rate is such a fall.
  double Rate(bool tokens, double refresh, bool queued, double limits, bool* fell) const {
    const auto rate = [tokens](const Interval& s) { return s.dt > 0 ? (tokens ? s.used_tok : s.used_req) / s.dt : 0; };
    const double wide = rate(Since(kDemandWindow * refresh));
    const double narrow = rate(Since(kRiseSpan * refresh));
    *fell = !queued && narrow < kClearFall * wide && wide - narrow >= kClearFallOfLimit * limits;
    return *fell ? narrow : std::max(wide, narrow);
  }
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
double Burst(const MeshKey& k) { return std::max(1.0, static_cast<double>(k.burst)); }

std::string Hex(const unsigned char* p, size_t n) {
  static const char* kDigits = "0123456789abcdef";
  std::string out;
  out.reserve(n * 2);
  for (size_t i = 0; i < n; ++i) {
    out.push_back(kDigits[p[i] >> 4]);
    out.push_back(kDigits[p[i] & 15]);
  }
  return out;
}

void Sha1(const std::string& a, const std::string& b, unsigned char out[20]) {
  boost::uuids::detail::sha1 h;
  h.process_bytes(a.data(), a.size());
  h.process_bytes(b.data(), b.size());
  boost::uuids::detail::sha1::digest_type d;
  h.get_digest(d);
  for (int i = 0; i < 5; ++i) {
    out[i * 4] = static_cast<unsigned char>(d[i] >> 24);
    out[i * 4 + 1] = static_cast<unsigned char>(d[i] >> 16);
    out[i * 4 + 2] = static_cast<unsigned char>(d[i] >> 8);
    out[i * 4 + 3] = static_cast<unsigned char>(d[i]);
  }
}

}  // namespace

std::string MeshFingerprint(const std::string& ns, const std::string& secret) {
  // HMAC-SHA-1 (RFC 2104) keyed by the namespace: equal secrets give equal
  // fingerprints on every host of the namespace, and the fingerprint does
  // not reveal the secret (API keys are long random strings).
  std::string key = "keymesh-mesh-v1:" + ns;
  unsigned char kd[20];
  if (key.size() > 64) {
    Sha1(key, "", kd);
    key.assign(reinterpret_cast<const char*>(kd), 20);
  }
  key.resize(64, '\0');
  std::string ipad(64, '\0'), opad(64, '\0');
  for (size_t i = 0; i < 64; ++i) {
    ipad[i] = static_cast<char>(key[i] ^ 0x36);
    opad[i] = static_cast<char>(key[i] ^ 0x5c);
  }
  unsigned char inner[20], outer[20];
  Sha1(ipad, secret, inner);
  Sha1(opad, std::string(reinterpret_cast<const char*>(inner), 20), outer);
  return Hex(outer, 20);
}

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

namespace {

// ProportionalShare's local half: what this host asks of a key, per
// dimension: `rate` its part of the pool's use, `held` of the pool's shares.
// A pool that is not saturated asks for its use and a margin. One that is
// (MeasureDemand judges it for the pool as a whole) has a demand it cannot
// show: it asks for kSaturatedGrowth x what it has (a host squeezed for a
// moment below its use asks for about its use again), and once it stayed
// saturated for a refresh period (`pressed`), or its workers gave up on an
// acquire, for the whole key; the allocator's max-min split gives it at most
// an equal part of what the hosts that are not saturated leave.
double Wants(double rate, double held, double limit, bool saturated, bool pressed) {
  if (limit <= 0) return 0.0;
  double w = std::max(rate * kWantsMargin, limit * kWantsFloor);
  if (pressed) w = limit;
  if (saturated) w = std::max(w, kSaturatedGrowth * std::max(rate, held));
  return std::min(w, limit);
}

}  // namespace

bool MeshJob::Impl::MeasureDemand(std::map<std::string, KeyRuntime>& rt, uint64_t now, uint64_t* last_ns,
                                  uint64_t* last_wants_ns, std::map<std::string, PoolDemand>* demand, bool wants) {
  bool escalate = false;
  const double dt = *last_ns == 0 ? 0 : static_cast<double>(now - *last_ns) / 1e9;
  const bool early =
      *last_wants_ns != 0 && static_cast<double>(now - *last_wants_ns) / 1e9 < kSaturatedSpan * config.refresh;
  *last_ns = now;
  if (wants) *last_wants_ns = now;
  std::set<std::string> pool_names;
  for (const auto& [id, k] : rt) pool_names.insert(k.def.pool);
  for (const std::string& pool : pool_names) {
    shm::PoolAdmin* admin = pools(pool);
    if (admin == nullptr) continue;
    Result<PoolStatus> snap = admin->Snapshot();
    if (!snap.ok()) continue;  // busy or poisoned: demand unchanged this round
    // Workers gave up on an acquire (none came in time): the pool wants
    // more than it has.
    const uint64_t gave_up = snap->totals.no_key_available + snap->totals.timeouts;
    PoolDemand& d = (*demand)[pool];
    const bool pressed = wants && d.gave_up != 0 && gave_up > d.gave_up;
    if (wants) d.gave_up = gave_up == 0 ? 1 : gave_up;
    // Saturation is the pool's, not each key's: a worker takes whichever
    // key is ready, so how its use splits between the keys follows the
    // shares (judged per key, the keys whose share just grew looked idle
    // and the hosts' shares swung between the keys every refresh). The use
    // of the last intervals is set against the shares held during them (a
    // smoothed rate lags behind a share that moved; one interval's count of
    // a few requests is too coarse), and it takes workers queueing for the
    // shares: pacing at any share makes an acquire wait for its slot now
    // and then, and a steady host uses nearly all of its wants.
    //
    // A host that is not saturated asks each key for its part of the pool's
    // use, split by the keys' limits: how a few requests a second fall on
    // each key changes from one interval to the next, and a key whose wants
    // dropped for a refresh lost its share to a saturated host.
    std::vector<std::pair<KeyRuntime*, bool>> keys;  // and whether it serves
    PoolDemand::Interval in;
    in.dt = dt;
    // The pool's wait clock counts the waits still going on too (each
    // waiter adds its time at least every 50 ms), so workers that queue for
    // a small share show before any of them is granted, or times out.
    const uint32_t clock = snap->totals.wait_clock_ms;
    in.waited = d.wait_clock ? static_cast<uint32_t>(clock - *d.wait_clock) / 1e3 : 0;
    d.wait_clock = clock;
    double limits_req = 0, limits_tok = 0, has_req = 0, has_tok = 0;
    for (const KeyStatus& ks : snap->keys) {
      auto it = rt.find(KeyOf(pool, ks.name));
      if (it == rt.end()) continue;
      KeyRuntime& k = it->second;
      // A key out of rotation until an operator acts (disabled, revoked,
      // being removed) takes no part of the pool's use: the keys that serve
      // split it (a revoked key's part would squeeze them below the use).
      const bool serves =
          ks.state != KeyState::kDisabled && ks.state != KeyState::kRevoked && ks.state != KeyState::kRemoving;
      const uint64_t d_acq = k.counted && ks.acquires >= k.acquires ? ks.acquires - k.acquires : 0;
      const uint64_t d_tok = k.counted && ks.tokens >= k.tokens ? ks.tokens - k.tokens : 0;
      // Its use counts (the pool's demand), whatever became of it since.
      if (k.def.rpm > 0) in.used_req += static_cast<double>(d_acq);
      if (k.def.tpm > 0) in.used_tok += static_cast<double>(d_tok);
      if (k.def.rpm > 0 && serves) {
        in.held_req += k.has_req * dt;
        has_req += k.has_req;
        limits_req += k.def.rpm / 60.0;
      }
      if (k.def.tpm > 0 && serves) {
        in.held_tok += k.has_tok * dt;
        has_tok += k.has_tok;
        limits_tok += static_cast<double>(k.def.tpm) / 60.0;
      }
      k.acquires = ks.acquires;
      k.tokens = ks.tokens;
      k.counted = true;
      keys.emplace_back(&k, serves);
    }
    d.Add(in);
    const PoolDemand::Interval recent = d.Since(kSaturatedSpan * config.refresh);
    // A queue that lasted a refresh period while the pool is saturated: the
    // whole key (each interval's use of a few requests may fall below the
    // saturation's mark now and then; the queue is what lasts).
    const bool queued = PoolDemand::Queued(recent);
    if (!queued) {
      d.queued_since = 0;
      d.escalated = false;
    }
    if (queued && d.queued_since == 0) d.queued_since = now;
    const bool sat_req = PoolDemand::Saturated(recent, false);
    const bool sat_tok = PoolDemand::Saturated(recent, true);
    const bool lasting =
        queued && static_cast<double>(now - d.queued_since) >= kSaturatedEscalation * config.refresh * 1e9;
    if (!wants) {
      // A queue that just outlasted the escalation's span: the refresh
      // that asks for the whole key comes now, not up to a period later.
      if (lasting && !d.escalated) {
        for (const auto& [k, serves] : keys) {
          if (serves && ((sat_req && k->def.rpm > 0 && k->wants_req < k->def.rpm / 60.0) ||
                         (sat_tok && k->def.tpm > 0 && k->wants_tok < static_cast<double>(k->def.tpm) / 60.0))) {
            d.escalated = true;
            escalate = true;
            break;
          }
        }
      }
      continue;
    }
    const bool pressed_req = pressed || (sat_req && lasting);
    const bool pressed_tok = pressed || (sat_tok && lasting);
    bool fell_req = false, fell_tok = false;
    const double rate_req = d.Rate(false, config.refresh, queued, limits_req, &fell_req);
    const double rate_tok = d.Rate(true, config.refresh, queued, limits_tok, &fell_tok);
    for (const auto& [k, serves] : keys) {
      const double limit_req = k->def.rpm / 60.0;
      const double limit_tok = static_cast<double>(k->def.tpm) / 60.0;
      const double part_req = serves && limits_req > 0 ? limit_req / limits_req : 0;
      const double part_tok = serves && limits_tok > 0 ? limit_tok / limits_tok : 0;
      const double w_req =
          Wants(rate_req * part_req, has_req * part_req, limit_req, serves && sat_req, serves && pressed_req);
      const double w_tok =
          Wants(rate_tok * part_tok, has_tok * part_tok, limit_tok, serves && sat_tok, serves && pressed_tok);
      k->wants_req = early && !fell_req ? std::max(k->wants_req, w_req) : w_req;
      k->wants_tok = early && !fell_tok ? std::max(k->wants_tok, w_tok) : w_tok;
    }
  }
  return escalate;
}

void MeshJob::Impl::ApplyShares(std::map<std::string, KeyRuntime>& rt, const std::vector<std::string>& order,
                                MeshMode mode, uint32_t hosts) {
  std::map<std::string, std::vector<std::pair<std::string, shm::KeyShare>>> by_pool;
  std::set<std::string> open_pools;
  const double n = std::max<uint32_t>(hosts, 1);
  const double keep = 1.0 - config.headroom;
  for (const std::string& id : order) {
    KeyRuntime& k = rt.at(id);
    shm::KeyShare share;
    share.active = true;
    const double limit_req = k.def.rpm / 60.0;
    const double limit_tok = static_cast<double>(k.def.tpm) / 60.0;
    switch (mode) {
      case MeshMode::kLeased:
      case MeshMode::kLearning:
        share.rpm = k.mismatch ? 0 : k.has_req * 60;
        share.tpm = k.mismatch ? 0 : k.has_tok * 60;
        share.burst = static_cast<uint32_t>(std::max(1.0, std::floor(k.burst)));
        break;
      case MeshMode::kShare:
        // 1/N of each limit, N the hosts Redis last reported (Doorman's
        // safe capacity): no overspend when every host is cut off alike.
        // What this host holds (and reports: after Redis restarted empty,
        // learning echoes it instead of granting nothing).
        k.has_req = limit_req * keep / n;
        k.has_tok = limit_tok * keep / n;
        share.rpm = limit_req * keep / n * 60;
        share.tpm = limit_tok * keep / n * 60;
        share.burst = static_cast<uint32_t>(std::max(1.0, std::floor(Burst(k.def) / n)));
        break;
      case MeshMode::kClosed:
        k.has_req = 0;
        k.has_tok = 0;
        share.rpm = 0;
        share.tpm = 0;
        share.burst = 1;
        break;
      case MeshMode::kOpen:
        k.has_req = 0;
        k.has_tok = 0;
        k.pace_rpm = k.def.rpm;
        k.pace_tpm = static_cast<double>(k.def.tpm);
        open_pools.insert(k.def.pool);
        continue;
    }
    k.pace_rpm = share.rpm;
    k.pace_tpm = share.tpm;
    by_pool[k.def.pool].emplace_back(k.def.key, share);
  }
  for (const std::string& pool : open_pools) {
    if (shm::PoolAdmin* admin = pools(pool)) (void)admin->ClearShares();
  }
  for (auto& [pool, shares] : by_pool) {
    if (shm::PoolAdmin* admin = pools(pool)) {
      keymesh::Status st = admin->SetShares(shares);
      if (!st.ok()) Log(LogLevel::kWarn, "mesh_share_failed", {{"pool", pool}, {"error", st.message()}});
    }
  }
}

void MeshJob::Impl::PublishKeyStatus(const std::map<std::string, KeyRuntime>& rt,
                                     const std::vector<std::string>& order) {
  std::vector<MeshKeyStatus> out;
  for (const std::string& id : order) {
    const KeyRuntime& k = rt.at(id);
    MeshKeyStatus s;
    s.pool = k.def.pool;
    s.key = k.def.key;
    s.limit_rpm = k.def.rpm;
    s.limit_tpm = static_cast<double>(k.def.tpm);
    s.wants_rpm = k.wants_req * 60;
    s.wants_tpm = k.wants_tok * 60;
    s.holders = k.holders;
    s.mismatch = k.mismatch;
    s.burst = k.burst;
    s.share_rpm = k.pace_rpm;
    s.share_tpm = k.pace_tpm;
    out.push_back(std::move(s));
  }
  std::lock_guard lock(mu);
  status.keys = std::move(out);
}

void MeshJob::Impl::RefreshLoop() {
  std::unique_ptr<MeshStore> store = factory();
  Backoff backoff(0.1, std::max(config.refresh, 0.2));
  std::map<std::string, KeyRuntime> rt;
  std::vector<std::string> order;
  uint64_t gen = UINT64_MAX;
  uint64_t seq = 0;
  uint64_t last_demand_ns = 0;
  uint64_t last_wants_ns = 0;
  std::map<std::string, PoolDemand> demand;
  uint32_t last_hosts = 1;
  MeshMode outage_mode = config.outage == OutageMode::kShare    ? MeshMode::kShare
                         : config.outage == OutageMode::kClosed ? MeshMode::kClosed
                                                                : MeshMode::kOpen;
  MeshMode applied = MeshMode::kLeased;
  bool applied_any = false;
  const auto refresh = std::chrono::nanoseconds(static_cast<int64_t>(config.refresh * 1e9));
  const std::chrono::nanoseconds short_retry =
      std::clamp<std::chrono::nanoseconds>(refresh / 2, 2 * kRebalanceGap, kShortRetry);
  const uint64_t lease_ms = static_cast<uint64_t>(config.lease * 1000);
  bool on_rebalance = false;  // this refresh is one another host asked for
  bool reporting = false;     // this refresh reports a give-back at once
  while (!stop.load()) {
    const auto t0 = std::chrono::steady_clock::now();
    auto [defs, g] = Keys();
    if (g != gen) {
      std::map<std::string, KeyRuntime> next;
      order.clear();
      for (MeshKey& d : defs) {
        const std::string id = KeyOf(d.pool, d.key);
        auto it = rt.find(id);
        KeyRuntime k = it != rt.end() ? it->second : KeyRuntime{};
        if (it == rt.end() || it->second.def.fingerprint != d.fingerprint) {
          k.mismatch = false;
          k.mismatch_logged = false;
        }
        k.def = d;
        next[id] = std::move(k);
        order.push_back(id);
      }
      rt = std::move(next);
      gen = g;
      // Until the first lease answers, new keys get nothing (a broker that
      // just joined must not burst at the full limit beside the others).
      if (!applied_any) ApplyShares(rt, order, MeshMode::kClosed, 1);
    }
    // An early refresh (a rebalance) hands back what this host holds
    // beyond its wants; it measures too, but its wants only grow (unless a
    // whole period without use shows a clear fall).
    MeasureDemand(rt, MonoNs(), &last_demand_ns, &last_wants_ns, &demand, true);

    LeaseRequest req;
    req.host = config.host;
    req.seq = ++seq;
    req.lease_ms = lease_ms;
    req.headroom = config.headroom;
    req.learning_quiet_ms = static_cast<uint64_t>(3 * config.refresh * 1000);
    // This host gives up on the reply after its timeout (twice, for a script
    // Redis must load first): Redis refuses the request after that.
    if (offset.valid()) {
      req.deadline_ms = offset.ToRedisMs(MonoNs()) + static_cast<int64_t>(2 * config.timeout * 1000) + kStaleMarginMs;
    }
    for (const std::string& id : order) {
      const KeyRuntime& k = rt.at(id);
      LeaseKey lk;
      lk.pool = k.def.pool;
      lk.key = k.def.key;
      lk.fingerprint = k.def.fingerprint;
      lk.burst = Burst(k.def);
      lk.req = Dimension{k.def.rpm / 60.0, k.wants_req, k.has_req, k.acquires};
      lk.tok = Dimension{static_cast<double>(k.def.tpm) / 60.0, k.wants_tok, k.has_tok, k.tokens};
      req.keys.push_back(std::move(lk));
    }
    const uint64_t sent = MonoNs();
    Result<LeaseReply> reply = store->Lease(req);
    const uint64_t got = MonoNs();
    if (reply.ok() && reply->stale) {
      // A refused request whose refusal came back in time: this host's idea
      // of Redis time is off (Redis's clock stepped). Resync, then retry.
      offset.Set(reply->now_ms, sent + (got - sent) / 2);
      reply = keymesh::Status(Code::kIoError, "mesh: Redis's clock moved against this host's; resynced");
    }
    if (reply.ok() && reply->keys.size() != req.keys.size()) {
      reply = keymesh::Status(Code::kProtocolError, "mesh: lease reply has " + std::to_string(reply->keys.size()) +
                                                        " keys for " + std::to_string(req.keys.size()));
    }
    if (reply.ok()) {
      const uint64_t rtt = got - sent;
      offset.Set(reply->now_ms, sent + rtt / 2);
      rtt_ns.store(rtt, std::memory_order_relaxed);
      const int64_t valid_ms = reply->expires_ms - reply->now_ms;
      const uint64_t until = valid_ms > 0 ? got + static_cast<uint64_t>(valid_ms) * kMsNs -
                                                std::min<uint64_t>(rtt, kSecNs) - kExpiryMarginNs
                                          : got;
      lease_until_ns.store(until, std::memory_order_relaxed);
      last_refresh_ns.store(got, std::memory_order_relaxed);
      last_hosts = std::max<uint32_t>(reply->hosts, 1);
      // The largest give-back of this reply, as a part of its key's limit.
      double gave_back = 0;
      for (size_t i = 0; i < order.size(); ++i) {
        KeyRuntime& k = rt.at(order[i]);
        const KeyGrant& kg = reply->keys[i];
        auto finite = [](double v) { return std::isfinite(v) && v > 0 ? v : 0.0; };
        const double limit_req = k.def.rpm / 60.0;
        const double limit_tok = static_cast<double>(k.def.tpm) / 60.0;
        const double req = std::min(finite(kg.req), limit_req);
        const double tok = std::min(finite(kg.tok), limit_tok);
        if (limit_req > 0) gave_back = std::max(gave_back, (k.has_req - req) / limit_req);
        if (limit_tok > 0) gave_back = std::max(gave_back, (k.has_tok - tok) / limit_tok);
        k.has_req = req;
        k.has_tok = tok;
        k.burst = std::clamp(finite(kg.burst), 1.0, Burst(k.def));
        k.holders = kg.holders;
        k.mismatch = kg.mismatch;
        if (kg.mismatch && !k.mismatch_logged) {
          k.mismatch_logged = true;
          Log(LogLevel::kError, "mesh_key_refused",
              {{"pool", k.def.pool},
               {"key", k.def.key},
               {"reason", "another host of namespace " + config.ns +
                              " uses a different secret under this pool and key name; this host leaves it out"}});
        }
        if (kg.cool_until_ms > reply->now_ms) {
          // Defense in depth: Redis says the key cools (an event this host
          // may have missed).
          KeyEvent e;
          e.pool = k.def.pool;
          e.key = k.def.key;
          e.kind = EventKind::kCooldown;
          e.until_ms = kg.cool_until_ms;
          Apply(e, false);
        }
      }
      const MeshMode mode = reply->learning ? MeshMode::kLearning : MeshMode::kLeased;
      ApplyShares(rt, order, mode, last_hosts);
      Vouch(until);
      applied = mode;
      applied_any = true;
      {
        std::lock_guard lock(mu);
        ++status.refreshes;
        status.hosts = reply->hosts;
        status.members = reply->members;
        status.epoch = reply->epoch;
      }
      NoteRedis(true, "");
      SetMode(mode);
      backoff.Reset();
      PublishKeyStatus(rt, order);
      auto next = t0 + refresh;
      const auto now = std::chrono::steady_clock::now();
      if (reply->short_of_share) next = std::min(next, now + short_retry);
      if (!reporting && gave_back > (on_rebalance ? kGiveBackOnRebalance : kGiveBack)) {
        // Tell Redis now that this host paces at what it gave back, so
        // that whoever wants it gets it at its next request (once: the
        // report itself is not followed by another).
        on_rebalance = false;
        reporting = true;
        continue;
      }
      reporting = false;
      // Until the next refresh (or a rebalance, or a sample that calls
      // it), a demand sample every kDemandSamples-th of a period (local:
      // the segment only); false when the job stops.
      auto sleep_sampling = [&] {
        for (;;) {
          const auto sample = std::chrono::steady_clock::now() + refresh / kDemandSamples;
          if (!SleepUntilRefresh(std::min(next, sample), t0 + kRebalanceGap, &on_rebalance)) return false;
          if (on_rebalance || std::chrono::steady_clock::now() >= next) return true;
          if (MeasureDemand(rt, MonoNs(), &last_demand_ns, &last_wants_ns, &demand, false)) return true;
        }
      };
      if (!sleep_sampling()) break;
      continue;
    }
    store->Disconnect();
    {
      std::lock_guard lock(mu);
      ++status.refresh_failures;
    }
    NoteRedis(false, reply.status().message());
    if (MonoNs() >= lease_until_ns.load(std::memory_order_relaxed)) {
      // The lease ran out with Redis away: the outage mode, with N as
      // Redis last said.
      if (!applied_any || applied != outage_mode) {
        {
          std::lock_guard lock(mu);
          status.hosts = last_hosts;
        }
        ApplyShares(rt, order, outage_mode, last_hosts);
        applied = outage_mode;
        applied_any = true;
      }
      // The outage shares hold while this broker runs to renew them.
      Vouch(MonoNs() + static_cast<uint64_t>(config.lease * 1e9));
      SetMode(outage_mode);
    }
    PublishKeyStatus(rt, order);
    on_rebalance = false;
    reporting = false;
    if (!Sleep(std::min<std::chrono::nanoseconds>(backoff.Next(), refresh))) break;
  }
}

// --- watcher: local changes out, the shared probe ----------------------------

void MeshJob::Impl::WatchLoop() {
  std::unique_ptr<MeshStore> store = factory();
  std::map<std::string, uint64_t> seen_seq;  // pool -> events_seq last diffed
  uint64_t retry_at = 0;                     // mono ns: re-diff everything (a publish failed)
  // key -> the open circuit deadline (mono) this host already settled the
  // probe for (won it, or extended its circuit past it).
  std::map<std::string, uint64_t> probe_done;
  struct Open {
    std::string pool, key;
    uint64_t deadline;
  };
  std::map<std::string, Open> open;  // keys whose circuit is open here, from the last diff
  Backoff backoff(0.05, 1.0);
  uint64_t next_attempt = 0;
  uint64_t watched_gen = UINT64_MAX;
  std::map<std::string, std::set<std::string>> mesh_keys;  // pool -> key names
  const uint64_t probe_ttl_ns = static_cast<uint64_t>(std::max(1.0, 2 * config.refresh) * 1e9);
  while (Sleep(kWatchInterval)) {
    const uint64_t now = MonoNs();
    if (now < next_attempt) continue;
    if (keys_gen.load(std::memory_order_acquire) != watched_gen) {
      auto [defs, g] = Keys();
      watched_gen = g;
      mesh_keys.clear();
      for (const MeshKey& k : defs) mesh_keys[k.pool].insert(k.key);
      seen_seq.clear();
    }
    const bool retry = (retry_at != 0 && now >= retry_at) || rediff.exchange(false);
    bool failed = false;
    for (const auto& entry : mesh_keys) {
      // (Named, not a structured binding: the diff's lambda captures it.)
      const std::string& pool = entry.first;
      const std::set<std::string>& names = entry.second;
      shm::PoolAdmin* admin = pools(pool);
      if (admin == nullptr) continue;
      const uint64_t seq = admin->EventsSeq();
      auto it = seen_seq.find(pool);
      if (it != seen_seq.end() && it->second == seq && !retry) continue;
      // Diff under known_mu: the reader's merges and this diff never interleave.
      std::vector<KeyEvent> events;
      {
        std::lock_guard lock(known_mu);
        std::vector<shm::ExportedKey> exported;
        if (!admin->ExportKeyStates(&exported).ok()) continue;  // busy: next round
        seen_seq[pool] = seq;
        const uint64_t t = MonoNs();
        for (const shm::ExportedKey& x : exported) {
          if (names.count(x.name) == 0) continue;
          const std::string id = KeyOf(pool, x.name);
          Known& k = known[id];
          const Known before = k;
          Known cur;
          cur.cool = x.state.cooldown_deadline;
          cur.circuit = x.state.circuit;
          cur.enabled = x.state.enabled;
          cur.seen = true;
          auto event = [&](EventKind kind, uint64_t until) {
            KeyEvent e;
            e.pool = pool;
            e.key = x.name;
            e.kind = kind;
            e.until_ms = until != 0 ? offset.ToRedisMs(until) : 0;
            e.origin = config.host;
            e.origin_mono_ns = t;
            events.push_back(std::move(e));
          };
          const uint32_t kRevoked = static_cast<uint32_t>(shm::Circuit::kRevoked);
          const uint32_t kClosed = static_cast<uint32_t>(shm::Circuit::kClosed);
          const uint32_t kOpenC = static_cast<uint32_t>(shm::Circuit::kOpen);
          bool reset = false;
          if (before.seen) {
            // Only a reset moves a running deadline earlier or ends a revocation.
            reset = (before.cool > t + kMsNs && cur.cool + kMsNs < before.cool) ||
                    (before.circuit == kRevoked && cur.circuit != kRevoked);
            if (reset) event(EventKind::kReset, 0);
          }
          if (cur.circuit == kRevoked && before.circuit != kRevoked) event(EventKind::kRevoked, 0);
          if (cur.cool > t && (reset || cur.cool > before.cool + kMsNs)) {
            event(cur.circuit == kOpenC ? EventKind::kCircuitOpen : EventKind::kCooldown, cur.cool);
          }
          if (before.seen && !reset && before.circuit != kClosed && before.circuit != kRevoked &&
              cur.circuit == kClosed) {
            event(EventKind::kCircuitClosed, 0);
          }
          if (before.seen ? before.enabled != cur.enabled : !cur.enabled) {
            event(cur.enabled ? EventKind::kEnabled : EventKind::kDisabled, 0);
          }
          if (cur.circuit == kOpenC && cur.cool > t) {
            open[id] = Open{pool, x.name, cur.cool};
          } else {
            open.erase(id);
          }
          // Optimistically known; a failed publish re-diffs from `before`.
          cur.version = before.version;
          k = cur;
          if (!events.empty() && !offset.valid()) k = before;
        }
      }
      if (!events.empty() && !offset.valid()) {
        Result<MeshStore::TimeSample> ts = store->Time();
        if (ts.ok()) {
          offset.Set(ts->redis_ms, MonoNs() - ts->rtt_ns / 2);
          retry_at = MonoNs();  // re-diff now with deadlines convertible
        } else {
          failed = true;
        }
        continue;
      }
      for (size_t i = 0; i < events.size(); ++i) {
        Result<KeyEvent> merged = store->Publish(events[i]);
        if (!merged.ok()) {
          failed = true;
          // Forget what this round learned of the keys not yet sent, so the
          // next diff sends their state again.
          std::lock_guard lock(known_mu);
          for (size_t j = i; j < events.size(); ++j) {
            Known& k = known[KeyOf(events[j].pool, events[j].key)];
            k = Known{.version = k.version};
          }
          break;
        }
        if (events[i].kind == EventKind::kReset) {
          std::lock_guard lock(known_mu);
          Known& k = known[KeyOf(events[i].pool, events[i].key)];
          k.version = std::max(k.version, merged->version);
        }
        std::lock_guard lock(mu);
        ++status.events_published;
      }
    }
    // The mesh-wide half-open probe: just before an open circuit's
    // deadline, one host claims the probe; the others extend their open
    // circuit by the claim's lifetime and learn the probe's outcome from
    // the winner's event (closed, or open again).
    for (auto it = open.begin(); it != open.end() && !failed;) {
      const Open& o = it->second;
      const uint64_t t = MonoNs();
      if (o.deadline <= t + kProbeLeadNs && probe_done[it->first] != o.deadline) {
        Result<bool> won = store->ClaimProbe(o.pool, o.key, config.host, probe_ttl_ns / kMsNs);
        if (!won.ok()) {
          failed = true;
          break;
        }
        uint64_t settled = o.deadline;
        if (!*won) {
          std::lock_guard lock(known_mu);
          shm::PoolAdmin* admin = pools(o.pool);
          shm::RemoteKeyState r;
          r.open_until = o.deadline + probe_ttl_ns;
          if (admin != nullptr && admin->MergeRemote(o.key, r).ok()) {
            Known& k = known[it->first];
            k.cool = std::max(k.cool, r.open_until);
            settled = r.open_until;
          }
        }
        probe_done[it->first] = settled;
        it->second.deadline = settled;
      }
      ++it;
    }
    if (failed) {
      store->Disconnect();
      retry_at = MonoNs() + kRetryNs;
      next_attempt = MonoNs() + static_cast<uint64_t>(backoff.Next().count());
    } else {
      if (retry) retry_at = 0;
      backoff.Reset();
    }
  }
}

// --- reader: other hosts' changes in ------------------------------------------

void MeshJob::Impl::Apply(const KeyEvent& e, bool count) {
  shm::PoolAdmin* admin = pools(e.pool);
  if (admin == nullptr) return;
  shm::RemoteKeyState r;
  const uint64_t t = MonoNs();
  switch (e.kind) {
    case EventKind::kCooldown:
      r.cool_until = offset.ToMonoNs(e.until_ms);
      if (r.cool_until <= t) return;
      break;
    case EventKind::kCircuitOpen:
      r.open_until = offset.ToMonoNs(e.until_ms);
      if (r.open_until <= t) return;
      break;
    case EventKind::kCircuitClosed: r.close_circuit = true; break;
    case EventKind::kRevoked: r.revoke = true; break;
    case EventKind::kDisabled: r.enabled = false; break;
    case EventKind::kEnabled: r.enabled = true; break;
    case EventKind::kReset: r.reset = true; break;
    case EventKind::kRebalance: return;  // no key's change (the reader refreshes on it)
  }
  {
    std::lock_guard lock(known_mu);
    if (e.kind == EventKind::kReset) {
      // The stream may deliver a reset twice and a snapshot repeats the
      // last one: only a newer generation resets.
      Known& k = known[KeyOf(e.pool, e.key)];
      if (e.version <= k.version) return;
      k.version = e.version;
    }
    if (!admin->MergeRemote(e.key, r).ok()) return;  // not a key of this host, or busy
    // What the segment now holds is known: the watcher must not echo it.
    std::vector<shm::ExportedKey> exported;
    if (admin->ExportKeyStates(&exported).ok()) {
      for (const shm::ExportedKey& x : exported) {
        if (x.name != e.key) continue;
        Known& k = known[KeyOf(e.pool, e.key)];
        k.version = std::max(k.version, e.version);
        k.cool = x.state.cooldown_deadline;
        k.circuit = x.state.circuit;
        k.enabled = x.state.enabled;
        k.seen = true;
      }
    }
  }
  rediff.store(true);
  if (!count) return;
  std::lock_guard lock(mu);
  ++status.events_applied;
  if (e.origin_mono_ns != 0 && e.origin_mono_ns <= t && t - e.origin_mono_ns < 3600 * kSecNs) {
    const double d = static_cast<double>(MonoNs() - e.origin_mono_ns) / 1e9;
    constexpr size_t kRing = 1024;
    if (delays.size() < kRing) {
      delays.push_back(d);
    } else {
      delays[delay_next] = d;
      delay_next = (delay_next + 1) % kRing;
    }
  }
}

void MeshJob::Impl::ReadLoop() {
  std::unique_ptr<MeshStore> store = factory();
  {
    std::lock_guard lock(mu);
    reader_store = store.get();
  }
  struct Unpublish {
    Impl* m;
    ~Unpublish() {
      std::lock_guard lock(m->mu);
      m->reader_store = nullptr;
    }
  } unpublish{this};
  Backoff backoff(0.1, 2.0);
  std::string last_id;
  bool need_sync = true;
  while (!stop.load()) {
    if (!offset.valid()) {
      Result<MeshStore::TimeSample> ts = store->Time();
      if (!ts.ok()) {
        store->Disconnect();
        if (!Sleep(backoff.Next())) break;
        continue;
      }
      offset.Set(ts->redis_ms, MonoNs() - ts->rtt_ns / 2);
    }
    if (need_sync) {
      Result<EventBatch> snap = store->Snapshot();
      if (!snap.ok()) {
        store->Disconnect();
        if (!Sleep(backoff.Next())) break;
        continue;
      }
      for (const KeyEvent& e : snap->events) Apply(e, false);
      last_id = snap->last_id;
      need_sync = false;
      std::lock_guard lock(mu);
      ++status.resyncs;
    }
    Result<EventBatch> batch = store->ReadEvents(last_id, kReadBlockMs);
    if (!batch.ok()) {
      store->Disconnect();
      need_sync = true;  // whatever was missed meanwhile comes with the snapshot
      if (!Sleep(backoff.Next())) break;
      continue;
    }
    backoff.Reset();
    if (batch->gap) {
      need_sync = true;
      continue;
    }
    for (const KeyEvent& e : batch->events) {
      if (e.origin == config.host) continue;
      if (e.kind == EventKind::kRebalance) {
        RequestRefresh();
        continue;
      }
      Apply(e, true);
    }
    if (!batch->last_id.empty()) last_id = batch->last_id;
  }
}

// --- the job -------------------------------------------------------------------

MeshJob::MeshJob(MeshConfig config, StoreFactory store) : impl_(std::make_unique<Impl>()) {
  impl_->config = std::move(config);
  impl_->factory = std::move(store);
  MeshStatus& s = impl_->status;
  s.enabled = true;
  s.host = impl_->config.host;
  s.ns = impl_->config.ns;
  s.redis = impl_->config.redis.Describe();
  s.mode = impl_->config.outage == OutageMode::kShare    ? MeshMode::kShare
           : impl_->config.outage == OutageMode::kClosed ? MeshMode::kClosed
                                                         : MeshMode::kOpen;
}

MeshJob::~MeshJob() { Stop(); }

void MeshJob::Start() {
  Impl& m = *impl_;
  if (m.started) return;
  m.started = true;
  m.stop = false;
  Log(LogLevel::kInfo, "mesh_start",
      {{"host", m.config.host},
       {"namespace", m.config.ns},
       {"redis", m.config.redis.Describe()},
       {"outage", OutageModeName(m.config.outage)}});
  m.refresh_thread = std::thread([&m] { m.RefreshLoop(); });
  m.watch_thread = std::thread([&m] { m.WatchLoop(); });
  m.reader_thread = std::thread([&m] { m.ReadLoop(); });
}

void MeshJob::Stop() {
  Impl& m = *impl_;
  if (!m.started) return;
  m.started = false;
  {
    std::lock_guard lock(m.mu);
    m.stop = true;
    if (m.reader_store != nullptr) m.reader_store->Interrupt();
  }
  m.cv.notify_all();
  for (std::thread* t : {&m.refresh_thread, &m.watch_thread, &m.reader_thread}) {
    if (t->joinable()) t->join();
  }
  // Give the shares back at once, and stop using them: a host that left
  // holds nothing (the others may be granted it at their next refresh).
  std::unique_ptr<MeshStore> store = m.factory();
  keymesh::Status left = store->Leave(m.config.host);
  auto [defs, g] = m.Keys();
  (void)g;
  std::map<std::string, std::vector<std::pair<std::string, shm::KeyShare>>> by_pool;
  for (const MeshKey& k : defs) {
    shm::KeyShare none;
    none.active = true;
    by_pool[k.pool].emplace_back(k.key, none);
  }
  for (auto& [pool, shares] : by_pool) {
    if (shm::PoolAdmin* admin = m.pools(pool)) (void)admin->SetShares(shares);
  }
  Log(left.ok() ? LogLevel::kInfo : LogLevel::kWarn, "mesh_stop",
      {{"host", m.config.host}, {"left", left.ok() ? "yes" : left.message()}});
}

void MeshJob::SetKeys(std::vector<MeshKey> keys, std::map<std::string, shm::PoolAdmin*> pools) {
  std::lock_guard lock(impl_->mu);
  impl_->keys = std::move(keys);
  impl_->admins = std::move(pools);
  ++impl_->keys_gen;
}

MeshStatus MeshJob::Status() const {
  const Impl& m = *impl_;
  const uint64_t now = MonoNs();
  std::lock_guard lock(m.mu);
  MeshStatus s = m.status;
  const uint64_t last = m.last_refresh_ns.load(std::memory_order_relaxed);
  s.since_refresh = last == 0 ? -1 : static_cast<double>(now - std::min(now, last)) / 1e9;
  const uint64_t until = m.lease_until_ns.load(std::memory_order_relaxed);
  s.lease_remaining = until > now ? static_cast<double>(until - now) / 1e9 : 0;
  const uint64_t rtt = m.rtt_ns.load(std::memory_order_relaxed);
  s.rtt_seconds = last == 0 ? -1 : static_cast<double>(rtt) / 1e9;
  if (!m.delays.empty()) {
    std::vector<double> d = m.delays;
    std::sort(d.begin(), d.end());
    s.propagation_p50 = d[d.size() / 2];
    s.propagation_p99 = d[std::min(d.size() - 1, d.size() * 99 / 100)];
    s.propagation_samples = d.size();
  }
  return s;
}

const char* MeshModeName(MeshMode mode) noexcept {
  switch (mode) {
    case MeshMode::kLeased: return "leased";
    case MeshMode::kLearning: return "learning";
    case MeshMode::kShare: return "share";
    case MeshMode::kClosed: return "closed";
    case MeshMode::kOpen: return "open";
  }
  return "?";
}

}  // namespace keymesh::broker::mesh
