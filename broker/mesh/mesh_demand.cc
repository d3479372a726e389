// What this host asks of each key: MeshJob::Impl::MeasureDemand and Wants
// (mesh_demand.h).
#include <set>
#include <string>
#include <vector>

#include "broker/mesh/mesh_job_impl.h"

namespace keymesh::broker::mesh {

// ProportionalShare's local half: what this host asks of a key, per
// dimension: `rate` its part of the pool's use, `held` of the pool's shares.
// A pool that is not saturated asks for its use and a margin, or while its
// use rises for what it holds, up to kRiseGrowth x its use. One that is
// (MeasureDemand judges it for the pool as a whole) has a demand it cannot
// show: it asks for kSaturatedGrowth x what it has (a host squeezed for a
// moment below its use asks for about its use again), and once it stayed
// saturated for a refresh period (`pressed`), or its workers gave up on an
// acquire, for the whole key; the allocator's max-min split gives it at most
// an equal part of what the hosts that are not saturated leave.
double Wants(double rate, double held, double limit, const DemandSignals& signals) {
  if (limit <= 0) return 0.0;
  double w = std::max(rate * kWantsMargin, limit * kWantsFloor);
  if (signals.rising) w = std::max(w, std::min(held, kRiseGrowth * rate));
  if (signals.pressed) w = limit;
  if (signals.saturated) w = std::max(w, kSaturatedGrowth * std::max(rate, held));
  return std::min(w, limit);
}

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
    const DemandSignals signals_req{sat_req, pressed_req, d.Rising(false, config.refresh)};
    const DemandSignals signals_tok{sat_tok, pressed_tok, d.Rising(true, config.refresh)};
    for (const auto& [k, serves] : keys) {
      const double limit_req = k->def.rpm / 60.0;
      const double limit_tok = static_cast<double>(k->def.tpm) / 60.0;
      const double part_req = serves && limits_req > 0 ? limit_req / limits_req : 0;
      const double part_tok = serves && limits_tok > 0 ? limit_tok / limits_tok : 0;
      // A key out of rotation asks for the floor only.
      const DemandSignals none;
      const double w_req = Wants(rate_req * part_req, has_req * part_req, limit_req, serves ? signals_req : none);
      const double w_tok = Wants(rate_tok * part_tok, has_tok * part_tok, limit_tok, serves ? signals_tok : none);
      k->wants_req = early && !fell_req ? std::max(k->wants_req, w_req) : w_req;
      k->wants_tok = early && !fell_tok ? std::max(k->wants_tok, w_tok) : w_tok;
    }
  }
  return escalate;
}

}  // namespace keymesh::broker::mesh
