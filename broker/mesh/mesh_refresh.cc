// The mesh job's refresh thread: one bulk lease per refresh, each key's
// share into the segment, the outage modes when Redis is away.
#include <cmath>
#include <set>
#include <string>
#include <vector>

#include "broker/mesh/mesh_job_impl.h"

namespace keymesh::broker::mesh {
namespace {

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

}  // namespace

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
    MeasureDemand(rt, shm::MonotonicNowNanos(), &last_demand_ns, &last_wants_ns, &demand, true);

    LeaseRequest req;
    req.host = config.host;
    req.seq = ++seq;
    req.lease_ms = lease_ms;
    req.headroom = config.headroom;
    req.learning_quiet_ms = static_cast<uint64_t>(3 * config.refresh * 1000);
    // This host gives up on the reply after its timeout (twice, for a script
    // Redis must load first): Redis refuses the request after that.
    if (offset.valid()) {
      req.deadline_ms =
          offset.ToRedisMs(shm::MonotonicNowNanos()) + static_cast<int64_t>(2 * config.timeout * 1000) + kStaleMarginMs;
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
    const uint64_t sent = shm::MonotonicNowNanos();
    Result<LeaseReply> reply = store->Lease(req);
    const uint64_t got = shm::MonotonicNowNanos();
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
          if (MeasureDemand(rt, shm::MonotonicNowNanos(), &last_demand_ns, &last_wants_ns, &demand, false)) return true;
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
    if (shm::MonotonicNowNanos() >= lease_until_ns.load(std::memory_order_relaxed)) {
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
      Vouch(shm::MonotonicNowNanos() + static_cast<uint64_t>(config.lease * 1e9));
      SetMode(outage_mode);
    }
    PublishKeyStatus(rt, order);
    on_rebalance = false;
    reporting = false;
    if (!Sleep(std::min<std::chrono::nanoseconds>(backoff.Next(), refresh))) break;
  }
}

}  // namespace keymesh::broker::mesh
