// keymeshctl's status table: one aligned text table per pool (pure: no I/O).
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
std::string RenderPool(const protocol::StatusReply::Pool& pool);

}  // namespace keymesh::ctl

#endif  // KEYMESH_CLIENT_KEYMESHCTL_TABLE_H_
