// A worker's read-only ops: the pools' status (secrets masked), the
// Prometheus metrics and the mesh's report.
#include <optional>
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
  std::optional<mesh::MeshStatus> mesh;
  if (const mesh::MeshJob* job = call.broker.mesh()) mesh = job->Status();
  return protocol::MetricsReply{RenderMetrics(*snaps, mesh ? &*mesh : nullptr)}.ToJson();
}

protocol::MeshReport MeshReportOf(const mesh::MeshStatus& s) {
  protocol::MeshReport r;
  r.enabled = s.enabled;
  if (!s.enabled) return r;
  r.host = s.host;
  r.ns = s.ns;
  r.redis = s.redis;
  r.mode = mesh::MeshModeName(s.mode);
  r.redis_ok = s.redis_ok;
  r.last_error = s.last_error;
  r.rtt_seconds = s.rtt_seconds;
  r.since_refresh = s.since_refresh;
  r.lease_remaining = s.lease_remaining;
  r.hosts = s.hosts;
  r.members = s.members;
  r.epoch = s.epoch;
  r.refreshes = s.refreshes;
  r.refresh_failures = s.refresh_failures;
  r.events_published = s.events_published;
  r.events_applied = s.events_applied;
  r.resyncs = s.resyncs;
  r.rebalances = s.rebalances;
  r.propagation_p50 = s.propagation_p50;
  r.propagation_p99 = s.propagation_p99;
  r.propagation_samples = s.propagation_samples;
  r.keys.reserve(s.keys.size());
  for (const mesh::MeshKeyStatus& k : s.keys) {
    r.keys.push_back({k.pool, k.key, k.limit_rpm, k.limit_tpm, k.share_rpm, k.share_tpm, k.burst, k.wants_rpm,
                      k.wants_tpm, k.holders, k.mismatch});
  }
  return r;
}

Fields Mesh(const OpCall& call) {
  const mesh::MeshJob* job = call.broker.mesh();
  if (job == nullptr) return protocol::MeshReply{}.ToJson();
  return protocol::MeshReply{MeshReportOf(job->Status())}.ToJson();
}

}  // namespace keymesh::broker::ops
