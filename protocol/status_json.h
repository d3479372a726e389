// A pool's status (keymesh::PoolStatus) as JSON: the `status` reply's pools,
// keymeshctl's --json, and the C ABI's status text. Field names keep the
// original Python package's (active_requests, success_count, failure_count,
// latency_avg, is_available, health_score, pool_metrics.total_*, ...).
// And the mesh's report (MeshReport): the `mesh` reply's object.
//
// Pure and thread-safe.
#ifndef KEYMESH_PROTOCOL_STATUS_JSON_H_
#define KEYMESH_PROTOCOL_STATUS_JSON_H_

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include <boost/json/object.hpp>
#include <boost/json/value.hpp>

#include "keymesh/status.h"
#include "keymesh/types.h"

namespace keymesh::protocol {

// `mask(name)` gives the masked secret of the key called `name` ("" when
// unknown); it is written as the key's key_suffix. `mask` may be empty.
boost::json::object PoolStatusToJson(const PoolStatus& status,
                                     const std::function<std::string(const std::string&)>& mask);
// The same with the key_suffix of status.keys[i] given as key_suffix[i]
// ("" past the end).
boost::json::object PoolStatusToJson(const PoolStatus& status, const std::vector<std::string>& key_suffix);

// Lenient (json_fields.h): a field missing or of another type reads as its
// default, so a client shows what an older or newer broker sends; numbers
// are clamped to their field's range. kProtocolError only when `v` is not an
// object or its `keys` is not a list of objects. *key_suffix (if not null)
// receives each key's key_suffix, parallel to the result's keys.
Result<PoolStatus> PoolStatusFromJson(const boost::json::value& v, std::vector<std::string>* key_suffix = nullptr);

// What a broker reports of the mesh (several hosts sharing keys through
// Redis; the broker's mesh::MeshStatus, which the protocol does not link):
// the `mesh` reply's object, its fields named as here (`ns` is
// "namespace"). Without a mesh only `enabled` (false) is written.
struct MeshReport {
  struct Key {
    std::string pool;
    std::string key;
    double limit_rpm = 0;  // the key's provider limits, whole mesh; 0: unlimited
    double limit_tpm = 0;
    double share_rpm = 0;  // what this host may use now
    double share_tpm = 0;
    double burst = 0;      // requests back to back on this host
    double wants_rpm = 0;  // this host's demand as last reported
    double wants_tpm = 0;
    uint32_t holders = 0;   // hosts holding a lease of the key
    bool mismatch = false;  // refused: another host has another secret under this name
  };
  bool enabled = false;
  std::string host;
  std::string ns;
  std::string redis;  // host:port or unix:PATH (never a password)
  std::string mode;   // leased, learning, share, closed, open
  bool redis_ok = false;
  std::string last_error;
  double rtt_seconds = -1;    // -1: no round trip yet
  double since_refresh = -1;  // seconds since the last successful lease refresh; -1: never
  double lease_remaining = 0;
  uint32_t hosts = 0;
  std::vector<std::string> members;
  std::string epoch;
  uint64_t refreshes = 0;
  uint64_t refresh_failures = 0;
  uint64_t events_published = 0;
  uint64_t events_applied = 0;
  uint64_t resyncs = 0;
  uint64_t rebalances = 0;  // refreshes made at once because another host was short of its fair part
  // Delay from a change on another host to its merge here (seconds), over
  // the last events applied; -1 before the first.
  double propagation_p50 = -1;
  double propagation_p99 = -1;
  uint64_t propagation_samples = 0;
  std::vector<Key> keys;
};

boost::json::object MeshReportToJson(const MeshReport& report);
// Lenient like PoolStatusFromJson (an older or newer broker: a missing or
// mistyped field reads as its default; rates, bursts and durations below
// their range read as 0, or -1 for "none yet"); kProtocolError when `v` is
// not an object, `members` is not a list of strings, or `keys` not a list
// of objects. Strings are kept as sent: escape them before display.
Result<MeshReport> MeshReportFromJson(const boost::json::value& v);

}  // namespace keymesh::protocol

#endif  // KEYMESH_PROTOCOL_STATUS_JSON_H_
