// The demand estimate's rules on their own (mesh_demand.h): when a pool
// counts as saturated, how its use is measured (a rise at once, a clear fall
// at once, a wander not at all), when it rises, and what a host then asks of
// a key. The mesh job's tests drive them through a fake store; these pin
// each rule.
#define BOOST_TEST_MODULE mesh_demand_test
#include "broker/mesh/mesh_demand.h"

#include <boost/test/unit_test.hpp>

namespace keymesh::broker::mesh {
namespace {

using Interval = PoolDemand::Interval;

Interval Requests(double dt, double used, double held, double waited) {
  Interval in;
  in.dt = dt;
  in.used_req = used;
  in.held_req = held * dt;
  in.waited = waited;
  return in;
}

// `n` intervals of `dt` s, `per_s` requests a second each, no waiting.
void AddSteady(PoolDemand& d, int n, double dt, double per_s) {
  for (int i = 0; i < n; ++i) d.Add(Requests(dt, per_s * dt, 10, 0));
}

}  // namespace

BOOST_AUTO_TEST_CASE(saturation_takes_a_queue_and_a_used_share) {
  // Half a worker waiting on average while 90 % of the share was used.
  BOOST_TEST(PoolDemand::Saturated(Requests(1, 9, 10, 0.6), false));
  // Waits alone (a cooldown, a concurrency cap) are not saturation.
  BOOST_TEST(!PoolDemand::Saturated(Requests(1, 5, 10, 0.6), false));
  // Nor is a high use without a queue (a steady host near its wants).
  BOOST_TEST(!PoolDemand::Saturated(Requests(1, 10, 10, 0.3), false));
  BOOST_TEST(PoolDemand::Queued(Requests(1, 0, 10, kSaturatedWaiting)));
  BOOST_TEST(!PoolDemand::Queued(Requests(0, 0, 10, 5)));  // no time measured
  // A share below a request over the span is used up by the next request:
  // requests count one more; tokens do not.
  BOOST_TEST(PoolDemand::Saturated(Requests(1, 0, 1, 0.6), false));
  Interval tok;
  tok.dt = 1;
  tok.held_tok = 1;
  tok.waited = 0.6;
  BOOST_TEST(!PoolDemand::Saturated(tok, true));
  // Nothing held: nothing to saturate (a share of 0 is a block, not a queue).
  BOOST_TEST(!PoolDemand::Saturated(Requests(1, 3, 0, 0.9), false));
}

BOOST_AUTO_TEST_CASE(since_sums_the_newest_intervals_back_to_the_span) {
  PoolDemand d;
  d.Add(Requests(0, 100, 10, 0));  // the first measurement has no interval: ignored
  BOOST_TEST(d.n == 0u);
  for (int i = 0; i < 20; ++i) d.Add(Requests(0.25, i, 10, 0));
  const Interval one = d.Since(1.0);
  BOOST_TEST(one.dt == 1.0);
  BOOST_TEST(one.used_req == 19 + 18 + 17 + 16);
  // The ring holds the newest 16.
  const Interval all = d.Since(100);
  BOOST_TEST(all.dt == 4.0);
  BOOST_TEST(all.used_req == (4 + 19) * 16 / 2);
  // At least the newest one, however short the span.
  BOOST_TEST(d.Since(0).dt == 0.25);
}

BOOST_AUTO_TEST_CASE(a_rise_counts_at_once_a_clear_fall_too_a_wander_not) {
  const double refresh = 1;
  bool fell = true;
  // Two seconds at 4 a second, then one at 12: the last period's rate.
  PoolDemand rise;
  AddSteady(rise, 4, 0.25, 4);
  AddSteady(rise, 4, 0.25, 12);
  BOOST_TEST(rise.Rate(false, refresh, false, 10, &fell) == 12.0);
  BOOST_TEST(!fell);
  // One second at 10, then one at 1: a fall by more than half, and by more
  // than a tenth of the limits, shows at once.
  PoolDemand fall;
  AddSteady(fall, 4, 0.25, 10);
  AddSteady(fall, 4, 0.25, 1);
  BOOST_TEST(fall.Rate(false, refresh, false, 10, &fell) == 1.0);
  BOOST_TEST(fell);
  // ... but not while workers queue (a squeeze holds the use down).
  BOOST_TEST(fall.Rate(false, refresh, true, 10, &fell) == 5.5);
  BOOST_TEST(!fell);
  // ... and not when it is small against the limits (a few requests' chance).
  BOOST_TEST(fall.Rate(false, refresh, false, 100, &fell) == 5.5);
  BOOST_TEST(!fell);
  // A use that wanders a little waits for the window.
  PoolDemand wander;
  AddSteady(wander, 4, 0.25, 6);
  AddSteady(wander, 4, 0.25, 4);
  BOOST_TEST(wander.Rate(false, refresh, false, 10, &fell) == 5.0);
  BOOST_TEST(!fell);
  // Rising: the last period's use kRising x the window's or more.
  BOOST_TEST(rise.Rising(false, refresh));
  BOOST_TEST(!wander.Rising(false, refresh));  // 6/s over the window's 5/s
  BOOST_TEST(!fall.Rising(false, refresh));
  // Workers that began half a period ago, after an idle second and a half:
  // the window reads 1.5/s of their 6/s, the last period 3/s; a rise.
  PoolDemand began;
  AddSteady(began, 6, 0.25, 0);
  AddSteady(began, 2, 0.25, 6);
  BOOST_TEST(began.Rising(false, refresh));
  BOOST_TEST(began.Rate(false, refresh, false, 10, &fell) == 3.0);
  // A steady use, or none, is no rise.
  PoolDemand steady;
  AddSteady(steady, 8, 0.25, 6);
  BOOST_TEST(!steady.Rising(false, refresh));
  PoolDemand idle;
  AddSteady(idle, 8, 0.25, 0);
  BOOST_TEST(!idle.Rising(false, refresh));
}

BOOST_AUTO_TEST_CASE(what_a_host_asks_of_a_key) {
  const double limit = 10;
  // Its use and a margin, at least the floor every host keeps.
  const DemandSignals steady;
  const DemandSignals saturated{true, false, false};
  const DemandSignals pressed{false, true, false};
  const DemandSignals rising{false, false, true};
  BOOST_TEST(Wants(5, 6, limit, steady) == 5 * kWantsMargin);
  BOOST_TEST(Wants(0, 6, limit, steady) == limit * kWantsFloor);
  // Rising: what it holds, up to kRiseGrowth x its use, and at least its
  // use and margin.
  BOOST_TEST(Wants(2, 6, limit, rising) == kRiseGrowth * 2);
  BOOST_TEST(Wants(2, 3, limit, rising) == 3.0);
  BOOST_TEST(Wants(5, 3, limit, rising) == 5 * kWantsMargin);
  // Saturated: more than it has (or uses), so a squeeze is undone.
  BOOST_TEST(Wants(3, 4, limit, saturated) == kSaturatedGrowth * 4);
  BOOST_TEST(Wants(4, 3, limit, saturated) == kSaturatedGrowth * 4);
  // Pressed (a queue that lasted, or workers that gave up): the whole key.
  BOOST_TEST(Wants(3, 4, limit, pressed) == limit);
  // Never more than the key, and nothing of an unlimited dimension.
  BOOST_TEST(Wants(9, 9, limit, saturated) == limit);
  BOOST_TEST(Wants(9, 9, 0, DemandSignals{true, true, true}) == 0.0);
}

}  // namespace keymesh::broker::mesh
