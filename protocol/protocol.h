// The control protocol between keymesh-broker and its clients: pure parse,
// validate and serialize, no I/O (linked by the broker and the client).
//
// Framing: one JSON object per line ('\n'-terminated), at most kMaxFrame
// bytes without the newline. Requests:
//   {"v":1,"op":"<op>","id":<int>, ...op fields}
// Replies carry the request's id:
//   {"v":1,"id":N,"ok":true, ...result fields}
//   {"v":1,"id":N,"ok":false,"error":{"code":"<CodeName>","message":"..."}}
// Ops and their fields:
//   hello      pid, start_time?, pool?      -> segment, layout_version, generation, pools[], broker_pid, keys_per_pool
//   secrets    pool                          -> secrets: [{name, secret}]   (peer must be allowed)
//   acquire    pool, timeout? (s; 0 = once), tokens? -> key, slot, lease, seq, acquire_ns, fingerprint
//   release / mark_failed / mark_rate_limited / cancel
//              pool, slot, lease, seq, latency?, tokens?, cooldown?
//   status     pool?                         -> pools: [PoolStatus]
//   add_key    pool, name, secret, weight?, max_concurrency?, rpm?, tpm?
//   remove_key / enable / disable / reset    pool, name
//   metrics                                  -> text (Prometheus exposition)
//   reclaim    pid, start_time?              -> reclaimed
//   observe_limits pool, name, remaining_requests?, reset_requests?,
//              remaining_tokens?, reset_tokens?, retry_after?  (seconds)
#ifndef KEYMESH_PROTOCOL_PROTOCOL_H_
#define KEYMESH_PROTOCOL_PROTOCOL_H_

#include <cstddef>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>

#include <boost/json/object.hpp>
#include <boost/json/value.hpp>

#include "keymesh/status.h"
#include "keymesh/types.h"

namespace keymesh::protocol {

inline constexpr int64_t kVersion = 1;
inline constexpr size_t kMaxFrame = 64 * 1024;

struct Request {
  int64_t id = 0;
  std::string op;
  boost::json::object body;  // the whole message
};

// Parses one frame (without its newline). kProtocolError on malformed JSON,
// a missing/wrong version, op or id. *id receives the id whenever it could
// be read (0 otherwise) so the error reply can carry it.
Result<Request> ParseRequest(std::string_view frame, int64_t* id);

// Serialized frames, newline included.
std::string MakeRequest(std::string_view op, int64_t id, boost::json::object fields);
std::string OkReply(int64_t id, boost::json::object fields = {});
std::string ErrorReply(int64_t id, const Status& status);

struct Reply {
  int64_t id = 0;
  Status status;             // ok, or the error the peer sent
  boost::json::object body;  // the whole message
};
// Parses a reply frame; kProtocolError if it is not a well-formed reply.
Result<Reply> ParseReply(std::string_view frame);

// Inverse of CodeName(); kInternal for an unknown name.
Code CodeFromName(std::string_view name);

// Field readers: kProtocolError naming the field when missing or mistyped.
Result<std::string> GetString(const boost::json::object& o, std::string_view field);
Result<uint64_t> GetUint(const boost::json::object& o, std::string_view field);
Result<std::optional<uint64_t>> GetOptUint(const boost::json::object& o, std::string_view field);
// A finite number >= 0 (seconds, latency), or nullopt when absent/null.
Result<std::optional<double>> GetOptSeconds(const boost::json::object& o, std::string_view field);

// PoolStatus <-> JSON. `mask` gives the masked secret of a key name ("" if
// unknown); it is written as key_suffix. Field names keep the original's
// (active_requests, success_count, failure_count, latency_avg, ...).
boost::json::object PoolStatusToJson(const PoolStatus& status,
                                     const std::function<std::string(const std::string&)>& mask);
Result<PoolStatus> PoolStatusFromJson(const boost::json::value& v);

}  // namespace keymesh::protocol

#endif  // KEYMESH_PROTOCOL_PROTOCOL_H_
