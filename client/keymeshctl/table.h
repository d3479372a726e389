// keymeshctl's tables: one aligned text table per pool, and the mesh's
// report (pure: no I/O). Everything the broker sent is shown escaped, so
// nothing it says acts on the terminal.
#ifndef KEYMESH_CLIENT_KEYMESHCTL_TABLE_H_
#define KEYMESH_CLIENT_KEYMESHCTL_TABLE_H_

#include <string>

#include "protocol/messages.h"

namespace keymesh::ctl {

// "-" for none, "850ms", "12.5s", "3m05s".
std::string FormatSeconds(double seconds);

// A header line with the pool's counters, then a row per key: name, masked
// secret ("***" when the broker sent none), state (with its reason),
// in-flight/max, budget left, cooldown, successes, failures, 429s, EMA
// latency. Columns are sized to their content; counters right-aligned.
// When a key of the pool paces at a mesh share (share_active), a SHARE
// column after BUDGET gives each such key's share beside its limits
// ("300/600 rpm, 40000/100000 tpm"; "-" for the others).
std::string RenderPool(const protocol::StatusReply::Pool& pool);

// The mesh: header lines (host, namespace, redis, mode, round trip, since
// the last refresh, lease left, the hosts by name, the counters, the
// propagation delay of other hosts' changes, the last error) and a
// row per key: pool, key, limits, this host's share, burst, wants, holders,
// refused. Without a mesh one line says so.
std::string RenderMesh(const protocol::MeshReport& mesh);

}  // namespace keymesh::ctl

#endif  // KEYMESH_CLIENT_KEYMESHCTL_TABLE_H_
