// What a host asks of each key (the mesh job's demand estimate, the local
// half of the allocator's max-min split): the constants it is tuned by and
// each pool's recent use, shares and waits (PoolDemand). The refresh
// thread's own (mesh_demand.cc: MeshJob::Impl::MeasureDemand); not for
// other code.
#ifndef KEYMESH_BROKER_MESH_MESH_DEMAND_H_
#define KEYMESH_BROKER_MESH_MESH_DEMAND_H_

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>

namespace keymesh::broker::mesh {

// Demand: the least a host asks of a key (a share of its limit every host
// keeps, so a host that turns busy is served at once from it); a pool is
// saturated when its workers queue for the shares: on average at least
// kSaturatedWaiting of them waited in acquire while it used kSaturatedUse
// of the shares it held or more (waits alone may be a cooldown or a
// concurrency cap; a high use alone is a steady host near its wants); the
// margin over the measured use of a pool that is not.
inline constexpr double kWantsFloor = 0.02;
inline constexpr double kSaturatedWaiting = 0.5;
inline constexpr double kSaturatedUse = 0.8;
inline constexpr double kWantsMargin = 1.04;
inline constexpr double kSaturatedGrowth = 1.5;
// Refresh periods over which a pool's use is measured (a fall shows within
// two refreshes), and over which its waits are (at least: one interval,
// however long).
inline constexpr double kDemandWindow = 2;
inline constexpr double kSaturatedSpan = 0.5;
// Demand samples per refresh period (the last one is the refresh's own).
inline constexpr int kDemandSamples = 4;
// A saturated pool whose workers queued this long (refresh periods) asks for
// the whole key: its queue outlasted what kSaturatedGrowth brought, so its
// demand is more than a squeeze of a moment, and the allocator's max-min
// split (an equal part of what the others leave) is reached within two
// refreshes.
inline constexpr double kSaturatedEscalation = 0.9;
// The span of the use that counts as a rise (a shorter one reads a few
// requests' chance as a rise).
inline constexpr double kRiseSpan = 1;
// A use over the last refresh period this many times the window's or more
// is a rise: a host whose workers just began measures a window that reaches
// back into the idle time before, so its use reads low. It keeps what it
// holds, up to kRiseGrowth x that use, rather than asking for the low use
// and being squeezed below its demand by a saturated host (its workers then
// queue, it asks for the whole key, and the saturated host loses what it
// takes beyond its demand while its queue drains: 2-4 s at the start of
// every bench-mesh run).
inline constexpr double kRising = 1.25;
inline constexpr double kRiseGrowth = 2;
// A use over the last refresh period below this part of the window's, and
// lower by this part of the pool's limits, is a fall that shows at once
// (PoolDemand::Rate).
inline constexpr double kClearFall = 0.5;
inline constexpr double kClearFallOfLimit = 0.1;

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
    const double wide = Use(tokens, kDemandWindow * refresh);
    const double narrow = Use(tokens, kRiseSpan * refresh);
    *fell = !queued && narrow < kClearFall * wide && wide - narrow >= kClearFallOfLimit * limits;
    return *fell ? narrow : std::max(wide, narrow);
  }
  // The use over about the last refresh period is kRising x the window's or
  // more (and not nothing).
  bool Rising(bool tokens, double refresh) const {
    const double narrow = Use(tokens, kRiseSpan * refresh);
    return narrow > 0 && narrow >= kRising * Use(tokens, kDemandWindow * refresh);
  }

 private:
  // The use per second (requests or tokens) of the newest intervals back
  // until they span `span` seconds.
  double Use(bool tokens, double span) const {
    const Interval s = Since(span);
    return s.dt > 0 ? (tokens ? s.used_tok : s.used_req) / s.dt : 0;
  }
};

// What a pool's demand shows besides its use (MeasureDemand).
struct DemandSignals {
  bool saturated = false;  // its workers queue while it uses its shares
  bool pressed = false;    // that queue lasted, or workers gave up
  bool rising = false;     // its use rises (PoolDemand::Rising)
};

// ProportionalShare's local half for one key and dimension (mesh_demand.cc).
double Wants(double rate, double held, double limit, const DemandSignals& signals);

}  // namespace keymesh::broker::mesh

#endif  // KEYMESH_BROKER_MESH_MESH_DEMAND_H_
