// The control protocol's messages: one struct per op with ToJson/FromJson.
// Pure code, no I/O; the envelope around them is framing.h's.
//
// Ops, in the order of the Op enum, with their request fields and, on the
// line below, their reply's ("?": optional; absent and null mean the same;
// "(none)": no fields). tests/protocol checks this table against the code.
//   hello              pid, start_time?, pool?
//                      -> segment, layout_version, generation, pools, keys_per_pool
//   secrets            pool
//                      -> secrets
//   acquire            pool, timeout?, tokens?
//                      -> key, slot, lease, seq, acquire_ns, fingerprint
//   release            pool, slot, lease, seq, acquire_ns?, latency?, tokens?, cooldown?, permanent?
//                      -> (none)
//   mark_failed        pool, slot, lease, seq, acquire_ns?, latency?, tokens?, cooldown?, permanent?
//                      -> (none)
//   mark_rate_limited  pool, slot, lease, seq, acquire_ns?, latency?, tokens?, cooldown?, permanent?
//                      -> (none)
//   cancel             pool, slot, lease, seq, acquire_ns?, latency?, tokens?, cooldown?, permanent?
//                      -> (none)
//   status             pool?
//                      -> pools
//   add_key            pool, name, secret, weight?, max_concurrency?, rpm?, tpm?, burst?, rate_margin?,
//                      secret_env?, secret_file?
//                      -> durable, note?
//   remove_key         pool, name
//                      -> (none)
//   enable             pool, name
//                      -> (none)
//   disable            pool, name
//                      -> (none)
//   reset              pool, name
//                      -> (none)
//   metrics            (none)
//                      -> text
//   reclaim            pid
//                      -> reclaimed
//   observe_limits     pool, name, remaining_requests?, reset_requests?, remaining_tokens?, reset_tokens?, retry_after?
//                      -> (none)
//   mesh               (none)
//                      -> mesh
// Durations (timeout, latency, cooldown, reset_*, retry_after) are seconds.
// The four ends of a lease read the same fields; cooldown counts only for
// mark_rate_limited, permanent only for mark_failed.
// Which peer may send which op is the broker's rule (broker/dispatch.cc).
//
// FromJson checks every field it reads (type, range, finiteness) and
// returns kProtocolError naming the first bad one ("field 'slot' must be
// between 0 and 4294967295"). Fields a message does not define are
// ignored, so a newer peer may add some. ToJson writes an optional field
// only when it is set (a number when it is not its default).
#ifndef KEYMESH_PROTOCOL_MESSAGES_H_
#define KEYMESH_PROTOCOL_MESSAGES_H_

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <boost/json/object.hpp>

#include "keymesh/status.h"
#include "keymesh/types.h"
#include "protocol/json_fields.h"
#include "protocol/status_json.h"

namespace keymesh::protocol {

enum class Op : uint8_t {
  kHello,
  kSecrets,
  kAcquire,
  kRelease,
  kMarkFailed,
  kMarkRateLimited,
  kCancel,
  kStatus,
  kAddKey,
  kRemoveKey,
  kEnable,
  kDisable,
  kReset,
  kMetrics,
  kReclaim,
  kObserveLimits,
  kMesh,
};
inline constexpr size_t kOpCount = static_cast<size_t>(Op::kMesh) + 1;

// The op's wire name ("mark_rate_limited"); ParseOp is its inverse.
std::string_view OpName(Op op) noexcept;
std::optional<Op> ParseOp(std::string_view name) noexcept;

// The four ops that end a lease and their outcomes: release <-> kSuccess,
// mark_failed <-> kFailure, mark_rate_limited <-> kRateLimited, cancel <->
// kCancelled.
Op EndOp(OutcomeKind outcome) noexcept;
std::optional<OutcomeKind> EndOutcome(Op op) noexcept;
// remove_key, enable, disable, reset.
bool IsKeyOp(Op op) noexcept;

// MakeRequest (framing.h) with the op's wire name.
std::string MakeRequest(Op op, int64_t id, boost::json::object fields);

// Largest pid Linux hands out (PID_MAX_LIMIT is 2^22; pid_t is int32).
inline constexpr uint64_t kMaxPid = INT32_MAX;

struct HelloRequest {
  uint32_t pid = 0;                    // 1..kMaxPid: the sender's own pid (the broker checks SO_PEERCRED)
  std::optional<uint64_t> start_time;  // its start time (/proc/PID/stat field 22); the broker checks it
  std::optional<std::string> pool;     // when given, the broker refuses an unknown pool

  Op op() const noexcept { return Op::kHello; }
  boost::json::object ToJson() const;
  static Result<HelloRequest> FromJson(const boost::json::object& o);
};

struct HelloReply {
  std::string segment;  // the shared-memory segment's name
  uint32_t layout_version = 0;
  uint64_t generation = 0;
  std::vector<std::string> pools;
  uint32_t keys_per_pool = 0;

  boost::json::object ToJson() const;
  static Result<HelloReply> FromJson(const boost::json::object& o);
};

struct SecretsRequest {
  std::string pool;

  Op op() const noexcept { return Op::kSecrets; }
  boost::json::object ToJson() const;
  static Result<SecretsRequest> FromJson(const boost::json::object& o);
};

struct SecretsReply {
  struct Secret {
    std::string name;
    std::string secret;
  };
  std::vector<Secret> secrets;  // on the wire: [{"name":..., "secret":...}]

  boost::json::object ToJson() const;
  static Result<SecretsReply> FromJson(const boost::json::object& o);
};

struct AcquireRequest {
  std::string pool;
  std::optional<double> timeout;  // seconds to wait (0: try once); absent: the pool's acquire_timeout
  uint64_t tokens = 0;            // expected tokens, reserved from the key's tpm budget

  Op op() const noexcept { return Op::kAcquire; }
  boost::json::object ToJson() const;
  static Result<AcquireRequest> FromJson(const boost::json::object& o);
};

// The reply to acquire: a lease on `key`, held by the process that said
// hello on the connection. (slot, lease, seq, acquire_ns) identify it in
// the EndRequest that ends it.
struct LeaseGrant {
  std::string key;  // the key's name (its secret comes from `secrets`)
  uint32_t slot = 0;
  uint32_t lease = 0;
  uint32_t seq = 0;
  uint64_t acquire_ns = 0;
  uint64_t fingerprint = 0;  // of the key's secret when granted

  boost::json::object ToJson() const;
  static Result<LeaseGrant> FromJson(const boost::json::object& o);
};

// release, mark_failed, mark_rate_limited or cancel, after `outcome`.
struct EndRequest {
  std::string pool;
  uint32_t slot = 0;
  uint32_t lease = 0;
  uint32_t seq = 0;
  uint64_t acquire_ns = 0;  // 0: not given
  OutcomeKind outcome = OutcomeKind::kSuccess;
  std::optional<double> latency;   // seconds; absent leaves the key's EMA as it is
  uint64_t tokens = 0;             // tokens the request used
  std::optional<double> cooldown;  // mark_rate_limited: seconds (Retry-After); absent: the pool's default
  bool permanent = false;          // mark_failed: an authentication failure, which revokes the key

  Op op() const noexcept { return EndOp(outcome); }
  boost::json::object ToJson() const;
  // `op` must be one of the four end ops (EndOutcome(op) has a value).
  static Result<EndRequest> FromJson(Op op, const boost::json::object& o);
};

struct StatusRequest {
  std::optional<std::string> pool;  // absent: every pool

  Op op() const noexcept { return Op::kStatus; }
  boost::json::object ToJson() const;
  static Result<StatusRequest> FromJson(const boost::json::object& o);
};

struct StatusReply {
  struct Pool {
    PoolStatus status;
    std::vector<std::string> key_suffix;  // the masked secret of status.keys[i]
  };
  std::vector<Pool> pools;  // on the wire: status_json.h objects
  // Pools left out because their lock is held by a stopped process (the
  // broker's kBusy messages, one line each); on the wire `busy`, absent
  // when empty.
  std::vector<std::string> busy;

  boost::json::object ToJson() const;
  // Lenient per pool (status_json.h); kProtocolError without a `pools` list
  // or with a `busy` that is not a list of strings.
  static Result<StatusReply> FromJson(const boost::json::object& o);
};

// add_key: a new key, or an update of the key called key.name (the same
// secret re-admits it: streaks cleared).
struct AddKeyRequest {
  std::string pool;
  KeySpec key;  // every field travels; rate_margin < 0: the pool's margin
  // Where the secret comes from, so the broker can read it again after a
  // restart (at most one; the broker checks it yields `key.secret`): a
  // variable of the broker's environment, or an absolute path the broker
  // can read. Without one the key lasts until the broker stops (the reply
  // says "durable": false).
  std::string secret_env = {};
  std::string secret_file = {};

  Op op() const noexcept { return Op::kAddKey; }
  boost::json::object ToJson() const;
  static Result<AddKeyRequest> FromJson(const boost::json::object& o);
};

// add_key's reply: whether the key survives a broker restart (its secret
// source was given and the broker read the same secret from it), and why
// not when it does not.
struct AddKeyReply {
  bool durable = false;
  std::optional<std::string> note;

  boost::json::object ToJson() const;
  static Result<AddKeyReply> FromJson(const boost::json::object& o);
};

// remove_key, enable, disable or reset.
struct KeyOpRequest {
  Op key_op = Op::kReset;
  std::string pool;
  std::string name;

  Op op() const noexcept { return key_op; }
  boost::json::object ToJson() const;
  // `op` must be a key op (IsKeyOp).
  static Result<KeyOpRequest> FromJson(Op op, const boost::json::object& o);
};

struct MetricsReply {
  std::string text;  // Prometheus text exposition, format 0.0.4

  boost::json::object ToJson() const;
  static Result<MetricsReply> FromJson(const boost::json::object& o);
};

// Frees the leases of process `pid` if it is dead.
struct ReclaimRequest {
  uint32_t pid = 0;  // 1..kMaxPid

  Op op() const noexcept { return Op::kReclaim; }
  boost::json::object ToJson() const;
  static Result<ReclaimRequest> FromJson(const boost::json::object& o);
};

struct ReclaimReply {
  uint32_t reclaimed = 0;

  boost::json::object ToJson() const;
  static Result<ReclaimReply> FromJson(const boost::json::object& o);
};

// What a provider's x-ratelimit-* and Retry-After headers said about a key.
struct ObserveLimitsRequest {
  std::string pool;
  std::string name;  // the key's name
  std::optional<uint64_t> remaining_requests;
  std::optional<double> reset_requests;  // seconds
  std::optional<uint64_t> remaining_tokens;
  std::optional<double> reset_tokens;  // seconds
  std::optional<double> retry_after;   // seconds

  Op op() const noexcept { return Op::kObserveLimits; }
  boost::json::object ToJson() const;
  static Result<ObserveLimitsRequest> FromJson(const boost::json::object& o);
};

// The reply to `mesh`: this broker's report of the mesh (status_json.h's
// MeshReport; {"enabled": false} without a mesh in its config).
struct MeshReply {
  MeshReport mesh;

  boost::json::object ToJson() const;
  // kProtocolError without a `mesh` object; lenient inside (status_json.h).
  static Result<MeshReply> FromJson(const boost::json::object& o);
};

// The numeric limits of a key (weight, max_concurrency, rpm, tpm, burst,
// rate_margin) read from `o` into *key; fields absent from `o` keep their
// value. One reader for add_key and the broker's config file, so both accept
// the same ranges: weight >= 1, burst <= kMaxBurst, 0 <= rate_margin < 0.5.
// A bad field is `style`'s error for `path_prefix` + its name.
inline constexpr uint64_t kMaxBurst = 1000000;
Status ReadKeyLimits(const boost::json::object& o, const FieldStyle& style, std::string_view path_prefix, KeySpec* key);
// A rate margin (a key's or a pool's): a number >= 0 and < 0.5.
Result<double> ReadRateMargin(const boost::json::value& v, std::string_view field, const FieldStyle& style);

}  // namespace keymesh::protocol

#endif  // KEYMESH_PROTOCOL_MESSAGES_H_
