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
  if (request.pool) {
    Result<PoolStatus> one = pools.Snapshot(*request.pool);
    if (!one.ok()) return one.status();
    snaps->push_back(std::move(one).value());
  } else {
    snaps = pools.SnapshotAll();
    if (!snaps.ok()) return snaps.status();
  }
  protocol::StatusReply reply;
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
