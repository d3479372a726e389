// A worker's read-only ops: the pools' status (secrets masked) and the
// Prometheus metrics.
#include <vector>

#include "broker/broker.h"
#include "broker/metrics.h"
#include "broker/ops.h"
#include "broker/pool_registry.h"

namespace keymesh::broker::ops {

Fields PoolsStatus(const OpCall& call, const protocol::StatusRequest& request) {
  const PoolRegistry& pools = call.broker.pools();
  Result<std::vector<PoolStatus>> snaps = std::vector<PoolStatus>();
  protocol::StatusReply reply;
  if (request.pool) {
    Result<PoolStatus> one = pools.Snapshot(*request.pool);
    if (!one.ok()) return one.status();
    snaps->push_back(std::move(one).value());
  } else {
    // A busy pool (KM-05) is named in the reply; the others are served.
    std::vector<Status> busy;
    snaps = pools.SnapshotAll(&busy);
    if (!snaps.ok()) return snaps.status();
    for (const Status& b : busy) reply.busy.push_back(b.message());
  }
  for (PoolStatus& s : *snaps) {
    protocol::StatusReply::Pool p;
    for (const KeyStatus& k : s.keys) p.key_suffix.push_back(pools.Masked(s.name, k.name));
    p.status = std::move(s);
    reply.pools.push_back(std::move(p));
  }
  return reply.ToJson();
}

Fields Metrics(const OpCall& call) {
  Result<std::vector<PoolStatus>> snaps = call.broker.pools().SnapshotAll();
  if (!snaps.ok()) return snaps.status();
  return protocol::MetricsReply{RenderMetrics(*snaps)}.ToJson();
}

}  // namespace keymesh::broker::ops
