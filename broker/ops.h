// The handlers of the control protocol's ops, one per op (dispatch.cc's
// table names them), each on its typed request. Private to the broker's
// handler layer. Called on the io thread after the dispatcher checked the
// peer's role; a handler returns its reply's fields or an error, except
// Acquire, which replies itself (at once, or when a key is granted or the
// wait ends).
#ifndef KEYMESH_BROKER_OPS_H_
#define KEYMESH_BROKER_OPS_H_

#include <boost/json/object.hpp>

#include "broker/dispatch.h"
#include "broker/mesh/mesh_status.h"
#include "keymesh/status.h"
#include "protocol/messages.h"

namespace keymesh::broker::ops {

using Fields = Result<boost::json::object>;

// ops_lease.cc: the worker's ops.
Fields Hello(const OpCall& call, const protocol::HelloRequest& request);
void Acquire(const OpCall& call, const protocol::AcquireRequest& request);
Fields End(const OpCall& call, const protocol::EndRequest& request);
// Applies x-ratelimit-* / Retry-After values a client observed for a key.
Fields ObserveLimits(const OpCall& call, const protocol::ObserveLimitsRequest& request);

// ops_admin.cc: a secret reader's op (Secrets) and an admin's.
Fields Secrets(const OpCall& call, const protocol::SecretsRequest& request);
Fields AddKey(const OpCall& call, const protocol::AddKeyRequest& request);
Fields KeyOp(const OpCall& call, const protocol::KeyOpRequest& request);
Fields Reclaim(const OpCall& call, const protocol::ReclaimRequest& request);

// ops_status.cc: a worker's read-only ops.
Fields PoolsStatus(const OpCall& call, const protocol::StatusRequest& request);
// With the mesh's families when the broker is in a mesh.
Fields Metrics(const OpCall& call);
// The mesh job's report ({"enabled": false} without a mesh). Reads the
// job's last status under its own lock: never waits on Redis.
Fields Mesh(const OpCall& call);
// The mesh job's status as the protocol reports it.
protocol::MeshReport MeshReportOf(const mesh::MeshStatus& status);

}  // namespace keymesh::broker::ops

#endif  // KEYMESH_BROKER_OPS_H_
