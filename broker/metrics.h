// Prometheus text exposition of pool and key counters.
#ifndef KEYMESH_BROKER_METRICS_H_
#define KEYMESH_BROKER_METRICS_H_

#include <string>
#include <vector>

#include "keymesh/types.h"

namespace keymesh::broker {

// One family per counter/gauge, labelled by pool (and key for per-key
// series). Key names are printable ASCII without spaces (validated), so
// only '"' and '\' need escaping.
std::string RenderMetrics(const std::vector<PoolStatus>& pools);

}  // namespace keymesh::broker

#endif  // KEYMESH_BROKER_METRICS_H_
