// A pool's status (keymesh::PoolStatus) as JSON: the `status` reply's pools,
// keymeshctl's --json, and the C ABI's status text. Field names keep the
// original Python package's (active_requests, success_count, failure_count,
// latency_avg, is_available, health_score, pool_metrics.total_*, ...).
//
// Pure and thread-safe.
#ifndef KEYMESH_PROTOCOL_STATUS_JSON_H_
#define KEYMESH_PROTOCOL_STATUS_JSON_H_

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

}  // namespace keymesh::protocol

#endif  // KEYMESH_PROTOCOL_STATUS_JSON_H_
