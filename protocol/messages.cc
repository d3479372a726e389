#include "protocol/messages.h"

#include <array>

#include <boost/json/array.hpp>

#include "common/check.h"
#include "common/text.h"
#include "protocol/framing.h"
#include "protocol/status_json.h"

namespace keymesh::protocol {
namespace {

namespace json = boost::json;

// The one op name table, in the order of the Op enum.
constexpr std::array<std::string_view, kOpCount> kOpNames = {
    "hello",  "secrets", "acquire", "release",        "mark_failed", "mark_rate_limited",
    "cancel", "status",  "add_key", "remove_key",     "enable",      "disable",
    "reset",  "metrics", "reclaim", "observe_limits", "mesh",
};

}  // namespace

std::string_view OpName(Op op) noexcept {
  const size_t i = static_cast<size_t>(op);
  return i < kOpCount ? kOpNames[i] : std::string_view("unknown");
}

std::optional<Op> ParseOp(std::string_view name) noexcept {
  for (size_t i = 0; i < kOpCount; ++i) {
    if (kOpNames[i] == name) return static_cast<Op>(i);
  }
  return std::nullopt;
}

Op EndOp(OutcomeKind outcome) noexcept {
  switch (outcome) {
    case OutcomeKind::kSuccess: return Op::kRelease;
    case OutcomeKind::kFailure: return Op::kMarkFailed;
    case OutcomeKind::kRateLimited: return Op::kMarkRateLimited;
    case OutcomeKind::kCancelled: return Op::kCancel;
  }
  return Op::kCancel;
}

std::optional<OutcomeKind> EndOutcome(Op op) noexcept {
  switch (op) {
    case Op::kRelease: return OutcomeKind::kSuccess;
    case Op::kMarkFailed: return OutcomeKind::kFailure;
    case Op::kMarkRateLimited: return OutcomeKind::kRateLimited;
    case Op::kCancel: return OutcomeKind::kCancelled;
    default: return std::nullopt;
  }
}

bool IsKeyOp(Op op) noexcept {
  return op == Op::kRemoveKey || op == Op::kEnable || op == Op::kDisable || op == Op::kReset;
}

std::string MakeRequest(Op op, int64_t id, json::object fields) {
  return MakeRequest(OpName(op), id, std::move(fields));
}

// --- hello -------------------------------------------------------------------

json::object HelloRequest::ToJson() const {
  json::object o{{"pid", pid}};
  if (start_time) o["start_time"] = *start_time;
  if (pool) o["pool"] = *pool;
  return o;
}

Result<HelloRequest> HelloRequest::FromJson(const json::object& o) {
  HelloRequest r;
  FieldReader in(o);
  in.Required("pid", &r.pid, 1, kMaxPid);
  in.Optional("start_time", &r.start_time);
  in.Optional("pool", &r.pool);
  return in.Finish(std::move(r));
}

json::object HelloReply::ToJson() const {
  json::array names;
  for (const std::string& p : pools) names.push_back(json::value(p));
  return {{"segment", segment},
          {"layout_version", layout_version},
          {"generation", generation},
          {"pools", std::move(names)},
          {"keys_per_pool", keys_per_pool}};
}

Result<HelloReply> HelloReply::FromJson(const json::object& o) {
  HelloReply r;
  FieldReader in(o);
  in.Required("segment", &r.segment);
  in.Required("layout_version", &r.layout_version);
  in.Required("generation", &r.generation);
  in.Required("keys_per_pool", &r.keys_per_pool);
  const json::value* pools = o.if_contains("pools");
  if (pools == nullptr || !pools->is_array()) {
    in.Fail(FieldError(kWireField, "pools", "must be a list of strings"));
  } else {
    for (const json::value& p : pools->get_array()) {
      if (!p.is_string()) {
        in.Fail(FieldError(kWireField, "pools", "must be a list of strings"));
        break;
      }
      r.pools.emplace_back(p.get_string());
    }
  }
  return in.Finish(std::move(r));
}

// --- secrets -----------------------------------------------------------------

json::object SecretsRequest::ToJson() const { return {{"pool", pool}}; }

Result<SecretsRequest> SecretsRequest::FromJson(const json::object& o) {
  SecretsRequest r;
  FieldReader in(o);
  in.Required("pool", &r.pool);
  return in.Finish(std::move(r));
}

json::object SecretsReply::ToJson() const {
  json::array list;
  for (const Secret& s : secrets) list.push_back(json::object{{"name", s.name}, {"secret", s.secret}});
  return {{"secrets", std::move(list)}};
}

Result<SecretsReply> SecretsReply::FromJson(const json::object& o) {
  const json::value* list = o.if_contains("secrets");
  if (list == nullptr || !list->is_array()) return FieldError(kWireField, "secrets", "must be a list");
  SecretsReply r;
  const json::array& a = list->get_array();
  for (size_t i = 0; i < a.size(); ++i) {
    const std::string where = "secrets[" + std::to_string(i) + "]";
    if (!a[i].is_object()) return FieldError(kWireField, where, "must be an object");
    Secret s;
    Result<std::string> name = GetString(a[i].get_object(), "name", kWireField);
    Result<std::string> secret = GetString(a[i].get_object(), "secret", kWireField);
    if (!name.ok()) return FieldError(kWireField, where + ".name", "must be a string");
    if (!secret.ok()) return FieldError(kWireField, where + ".secret", "must be a string");
    s.name = std::move(name).value();
    s.secret = std::move(secret).value();
    r.secrets.push_back(std::move(s));
  }
  return r;
}

// --- acquire -----------------------------------------------------------------

json::object AcquireRequest::ToJson() const {
  json::object o{{"pool", pool}};
  if (timeout) o["timeout"] = *timeout;
  if (tokens != 0) o["tokens"] = tokens;
  return o;
}

Result<AcquireRequest> AcquireRequest::FromJson(const json::object& o) {
  AcquireRequest r;
  FieldReader in(o);
  in.Required("pool", &r.pool);
  in.Seconds("timeout", &r.timeout);
  in.Optional("tokens", &r.tokens);
  return in.Finish(std::move(r));
}

json::object LeaseGrant::ToJson() const {
  return {{"key", key},
          {"slot", slot},
          {"lease", lease},
          {"seq", seq},
          {"acquire_ns", acquire_ns},
          {"fingerprint", fingerprint}};
}

Result<LeaseGrant> LeaseGrant::FromJson(const json::object& o) {
  LeaseGrant r;
  FieldReader in(o);
  in.Required("key", &r.key);
  in.Required("slot", &r.slot);
  in.Required("lease", &r.lease);
  in.Required("seq", &r.seq);
  in.Required("acquire_ns", &r.acquire_ns);
  in.Required("fingerprint", &r.fingerprint);
  return in.Finish(std::move(r));
}

// --- release, mark_failed, mark_rate_limited, cancel -------------------------

json::object EndRequest::ToJson() const {
  json::object o{{"pool", pool}, {"slot", slot}, {"lease", lease}, {"seq", seq}};
  if (acquire_ns != 0) o["acquire_ns"] = acquire_ns;
  if (latency) o["latency"] = *latency;
  if (tokens != 0) o["tokens"] = tokens;
  if (cooldown) o["cooldown"] = *cooldown;
  if (permanent) o["permanent"] = true;
  return o;
}

Result<EndRequest> EndRequest::FromJson(Op op, const json::object& o) {
  std::optional<OutcomeKind> outcome = EndOutcome(op);
  KM_CHECK_MSG(outcome.has_value(), "EndRequest::FromJson for an op that ends no lease");
  EndRequest r;
  r.outcome = *outcome;
  FieldReader in(o);
  in.Required("pool", &r.pool);
  in.Required("slot", &r.slot);
  in.Required("lease", &r.lease);
  in.Required("seq", &r.seq);
  in.Optional("acquire_ns", &r.acquire_ns);
  in.Seconds("latency", &r.latency);
  in.Optional("tokens", &r.tokens);
  in.Seconds("cooldown", &r.cooldown);
  in.Optional("permanent", &r.permanent);
  return in.Finish(std::move(r));
}

// --- status ------------------------------------------------------------------

json::object StatusRequest::ToJson() const {
  json::object o;
  if (pool) o["pool"] = *pool;
  return o;
}

Result<StatusRequest> StatusRequest::FromJson(const json::object& o) {
  StatusRequest r;
  FieldReader in(o);
  in.Optional("pool", &r.pool);
  return in.Finish(std::move(r));
}

json::object StatusReply::ToJson() const {
  json::array list;
  for (const Pool& p : pools) list.push_back(PoolStatusToJson(p.status, p.key_suffix));
  json::object o{{"pools", std::move(list)}};
  if (!busy.empty()) {
    json::array b;
    for (const std::string& m : busy) b.push_back(json::value(m));
    o["busy"] = std::move(b);
  }
  return o;
}

Result<StatusReply> StatusReply::FromJson(const json::object& o) {
  const json::value* list = o.if_contains("pools");
  if (list == nullptr || !list->is_array()) return FieldError(kWireField, "pools", "must be a list");
  StatusReply r;
  for (const json::value& v : list->get_array()) {
    Pool p;
    Result<PoolStatus> s = PoolStatusFromJson(v, &p.key_suffix);
    if (!s.ok()) return s.status();
    p.status = std::move(s).value();
    r.pools.push_back(std::move(p));
  }
  if (const json::value* busy = o.if_contains("busy")) {
    if (!busy->is_array()) return FieldError(kWireField, "busy", "must be a list");
    for (const json::value& m : busy->get_array()) {
      if (!m.is_string()) return FieldError(kWireField, "busy", "must be a list of strings");
      r.busy.push_back(OneLine(std::string(m.get_string())));
    }
  }
  return r;
}

// --- add_key and the key ops -------------------------------------------------

json::object AddKeyRequest::ToJson() const {
  json::object o{{"pool", pool}, {"name", key.name}, {"secret", key.secret}};
  if (key.weight != 1) o["weight"] = key.weight;
  if (key.max_concurrency != 0) o["max_concurrency"] = key.max_concurrency;
  if (key.rpm != 0) o["rpm"] = key.rpm;
  if (key.tpm != 0) o["tpm"] = key.tpm;
  if (key.burst != 0) o["burst"] = key.burst;
  if (key.rate_margin >= 0) o["rate_margin"] = key.rate_margin;
  if (!secret_env.empty()) o["secret_env"] = secret_env;
  if (!secret_file.empty()) o["secret_file"] = secret_file;
  return o;
}

Result<AddKeyRequest> AddKeyRequest::FromJson(const json::object& o) {
  AddKeyRequest r;
  FieldReader in(o);
  in.Required("pool", &r.pool);
  in.Required("name", &r.key.name);
  in.Required("secret", &r.key.secret);
  std::optional<std::string> env, file;
  in.Optional("secret_env", &env);
  in.Optional("secret_file", &file);
  r.secret_env = env.value_or("");
  r.secret_file = file.value_or("");
  Result<AddKeyRequest> done = in.Finish(std::move(r));
  if (!done.ok()) return done;

  Status st = ReadKeyLimits(o, kWireField, "", &done->key);
  if (!st.ok()) return st;
  if (!done->secret_env.empty() && !done->secret_file.empty()) {
    return Status(Code::kInvalidArgument, "add_key takes at most one of secret_env and secret_file");
  }
  if (!done->secret_file.empty() && done->secret_file[0] != '/') {
    return Status(Code::kInvalidArgument, "add_key secret_file must be an absolute path: " + Quoted(done->secret_file));
  }
  return done;
}

json::object AddKeyReply::ToJson() const {
  json::object o{{"durable", durable}};
  if (note) o["note"] = *note;
  return o;
}

Result<AddKeyReply> AddKeyReply::FromJson(const json::object& o) {
  AddKeyReply r;
  FieldReader in(o);
  in.Required("durable", &r.durable);
  in.Optional("note", &r.note);
  return in.Finish(std::move(r));
}

json::object KeyOpRequest::ToJson() const { return {{"pool", pool}, {"name", name}}; }

Result<KeyOpRequest> KeyOpRequest::FromJson(Op op, const json::object& o) {
  KM_CHECK_MSG(IsKeyOp(op), "KeyOpRequest::FromJson for an op that is not a key op");
  KeyOpRequest r;
  r.key_op = op;
  FieldReader in(o);
  in.Required("pool", &r.pool);
  in.Required("name", &r.name);
  return in.Finish(std::move(r));
}

Status ReadKeyLimits(const json::object& o, const FieldStyle& style, std::string_view path_prefix, KeySpec* key) {
  struct Limit {
    const char* name;
    uint64_t min;
    uint64_t max;
    uint32_t KeySpec::*u32;
    uint64_t KeySpec::*u64;
  };
  static constexpr Limit kLimits[] = {
      {"weight", 1, UINT32_MAX, &KeySpec::weight, nullptr},
      {"max_concurrency", 0, UINT32_MAX, &KeySpec::max_concurrency, nullptr},
      {"rpm", 0, UINT32_MAX, &KeySpec::rpm, nullptr},
      {"tpm", 0, UINT64_MAX, nullptr, &KeySpec::tpm},
      {"burst", 0, kMaxBurst, &KeySpec::burst, nullptr},
  };
  const std::string prefix(path_prefix);
  for (const Limit& l : kLimits) {
    const json::value* v = Present(o, l.name, style);
    if (v == nullptr) continue;
    Result<uint64_t> r = ReadUint(*v, prefix + l.name, l.min, l.max, style);
    if (!r.ok()) return r.status();
    if (l.u32 != nullptr) key->*l.u32 = static_cast<uint32_t>(*r);
    if (l.u64 != nullptr) key->*l.u64 = *r;
  }
  if (const json::value* v = Present(o, "rate_margin", style)) {
    Result<double> r = ReadRateMargin(*v, prefix + "rate_margin", style);
    if (!r.ok()) return r.status();
    key->rate_margin = *r;
  }
  return Status::Ok();
}

Result<double> ReadRateMargin(const json::value& v, std::string_view field, const FieldStyle& style) {
  // 0.5 and more would pace a key at half its limit or less: a typo rather
  // than a margin.
  Result<double> r = ReadNumber(v, field, 0.0, 0.5, style);
  if (!r.ok() || !(*r < 0.5)) return FieldError(style, field, "must be a number >= 0 and < 0.5");
  return r;
}

// --- metrics, mesh, reclaim, observe_limits ------------------------------------

json::object MetricsReply::ToJson() const { return {{"text", text}}; }

Result<MetricsReply> MetricsReply::FromJson(const json::object& o) {
  MetricsReply r;
  FieldReader in(o);
  in.Required("text", &r.text);
  return in.Finish(std::move(r));
}

json::object MeshReply::ToJson() const { return {{"mesh", MeshReportToJson(mesh)}}; }

Result<MeshReply> MeshReply::FromJson(const json::object& o) {
  const json::value* m = o.if_contains("mesh");
  if (m == nullptr || !m->is_object()) return FieldError(kWireField, "mesh", "must be an object");
  Result<MeshReport> report = MeshReportFromJson(*m);
  if (!report.ok()) return report.status();
  return MeshReply{std::move(report).value()};
}

json::object ReclaimRequest::ToJson() const { return {{"pid", pid}}; }

Result<ReclaimRequest> ReclaimRequest::FromJson(const json::object& o) {
  ReclaimRequest r;
  FieldReader in(o);
  in.Required("pid", &r.pid, 1, kMaxPid);
  return in.Finish(std::move(r));
}

json::object ReclaimReply::ToJson() const { return {{"reclaimed", reclaimed}}; }

Result<ReclaimReply> ReclaimReply::FromJson(const json::object& o) {
  ReclaimReply r;
  FieldReader in(o);
  in.Required("reclaimed", &r.reclaimed);
  return in.Finish(std::move(r));
}

json::object ObserveLimitsRequest::ToJson() const {
  json::object o{{"pool", pool}, {"name", name}};
  if (remaining_requests) o["remaining_requests"] = *remaining_requests;
  if (reset_requests) o["reset_requests"] = *reset_requests;
  if (remaining_tokens) o["remaining_tokens"] = *remaining_tokens;
  if (reset_tokens) o["reset_tokens"] = *reset_tokens;
  if (retry_after) o["retry_after"] = *retry_after;
  return o;
}

Result<ObserveLimitsRequest> ObserveLimitsRequest::FromJson(const json::object& o) {
  ObserveLimitsRequest r;
  FieldReader in(o);
  in.Required("pool", &r.pool);
  in.Required("name", &r.name);
  in.Optional("remaining_requests", &r.remaining_requests);
  in.Seconds("reset_requests", &r.reset_requests);
  in.Optional("remaining_tokens", &r.remaining_tokens);
  in.Seconds("reset_tokens", &r.reset_tokens);
  in.Seconds("retry_after", &r.retry_after);
  return in.Finish(std::move(r));
}

}  // namespace keymesh::protocol
