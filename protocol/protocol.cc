#include "protocol/protocol.h"

#include <cmath>

#include <boost/json.hpp>

#include "common/text.h"

namespace keymesh::protocol {
namespace {

namespace json = boost::json;

Status ProtocolError(std::string message) { return Status(Code::kProtocolError, std::move(message)); }

Result<json::object> ParseObject(std::string_view frame) {
  if (frame.size() > kMaxFrame) {
    return ProtocolError("frame of " + std::to_string(frame.size()) + " bytes exceeds " + std::to_string(kMaxFrame));
  }
  boost::system::error_code ec;
  json::value v;
  try {
    v = json::parse(frame, ec);
  } catch (const std::exception& e) {
    return ProtocolError(std::string("cannot parse frame: ") + e.what());
  }
  if (ec) return ProtocolError("malformed JSON: " + ec.message());
  if (!v.is_object()) return ProtocolError("a message must be a JSON object");
  return std::move(v.as_object());
}

std::optional<int64_t> AsInt(const json::value& v) {
  if (v.is_int64()) return v.get_int64();
  if (v.is_uint64() && v.get_uint64() <= static_cast<uint64_t>(INT64_MAX)) return static_cast<int64_t>(v.get_uint64());
  return std::nullopt;
}

std::optional<double> AsNumber(const json::value* v) {
  if (v == nullptr) return std::nullopt;
  if (v->is_double()) return v->get_double();
  if (v->is_int64()) return static_cast<double>(v->get_int64());
  if (v->is_uint64()) return static_cast<double>(v->get_uint64());
  return std::nullopt;
}

uint64_t U64(const json::object& o, std::string_view f) {
  const json::value* v = o.if_contains(f);
  if (v == nullptr) return 0;
  if (v->is_uint64()) return v->get_uint64();
  if (v->is_int64() && v->get_int64() >= 0) return static_cast<uint64_t>(v->get_int64());
  if (v->is_double() && v->get_double() >= 0) return static_cast<uint64_t>(v->get_double());
  return 0;
}

double F64(const json::object& o, std::string_view f) { return AsNumber(o.if_contains(f)).value_or(0.0); }

bool Bool(const json::object& o, std::string_view f) {
  const json::value* v = o.if_contains(f);
  return v != nullptr && v->is_bool() && v->get_bool();
}

std::string Str(const json::object& o, std::string_view f) {
  const json::value* v = o.if_contains(f);
  return v != nullptr && v->is_string() ? std::string(v->get_string()) : std::string();
}

}  // namespace

Result<Request> ParseRequest(std::string_view frame, int64_t* id) {
  *id = 0;
  Result<json::object> o = ParseObject(frame);
  if (!o.ok()) return o.status();
  Request r;
  if (const json::value* v = o->if_contains("id")) {
    std::optional<int64_t> n = AsInt(*v);
    if (!n) return ProtocolError("field 'id' must be an integer");
    *id = *n;
    r.id = *n;
  } else {
    return ProtocolError("field 'id' is required");
  }
  const json::value* ver = o->if_contains("v");
  if (ver == nullptr) return ProtocolError("field 'v' (protocol version) is required");
  std::optional<int64_t> vn = AsInt(*ver);
  if (!vn || *vn != kVersion) {
    return ProtocolError("unsupported protocol version (this broker speaks v" + std::to_string(kVersion) + ")");
  }
  const json::value* op = o->if_contains("op");
  if (op == nullptr || !op->is_string() || op->get_string().empty()) {
    return ProtocolError("field 'op' must be a non-empty string");
  }
  r.op = std::string(op->get_string());
  r.body = std::move(o).value();
  return r;
}

std::string MakeRequest(std::string_view op, int64_t id, json::object fields) {
  json::object o;
  o["v"] = kVersion;
  o["op"] = op;
  o["id"] = id;
  for (auto& kv : fields) o[kv.key()] = std::move(kv.value());
  std::string s = json::serialize(o);
  s.push_back('\n');
  return s;
}

std::string OkReply(int64_t id, json::object fields) {
  json::object o;
  o["v"] = kVersion;
  o["id"] = id;
  o["ok"] = true;
  for (auto& kv : fields) o[kv.key()] = std::move(kv.value());
  std::string s = json::serialize(o);
  s.push_back('\n');
  return s;
}

std::string ErrorReply(int64_t id, const Status& status) {
  json::object o;
  o["v"] = kVersion;
  o["id"] = id;
  o["ok"] = false;
  json::object err;
  err["code"] = CodeName(status.code());
  err["message"] = status.message();
  o["error"] = std::move(err);
  std::string s = json::serialize(o);
  s.push_back('\n');
  return s;
}

Result<Reply> ParseReply(std::string_view frame) {
  Result<json::object> o = ParseObject(frame);
  if (!o.ok()) return o.status();
  Reply r;
  const json::value* id = o->if_contains("id");
  std::optional<int64_t> n = id != nullptr ? AsInt(*id) : std::nullopt;
  if (!n) return ProtocolError("reply without an integer 'id'");
  r.id = *n;
  const json::value* ok = o->if_contains("ok");
  if (ok == nullptr || !ok->is_bool()) return ProtocolError("reply without a boolean 'ok'");
  if (!ok->get_bool()) {
    const json::value* err = o->if_contains("error");
    if (err == nullptr || !err->is_object()) return ProtocolError("error reply without an 'error' object");
    // The peer's message is input too: it stays one line here.
    r.status = Status(CodeFromName(Str(err->get_object(), "code")), OneLine(Str(err->get_object(), "message")));
  }
  r.body = std::move(o).value();
  return r;
}

Code CodeFromName(std::string_view name) {
  for (int32_t c = 0; c <= static_cast<int32_t>(Code::kInternal); ++c) {
    if (name == CodeName(static_cast<Code>(c))) return static_cast<Code>(c);
  }
  return Code::kInternal;
}

Result<std::string> GetString(const json::object& o, std::string_view field) {
  const json::value* v = o.if_contains(field);
  if (v == nullptr || !v->is_string()) return ProtocolError("field '" + std::string(field) + "' must be a string");
  return std::string(v->get_string());
}

Result<uint64_t> GetUint(const json::object& o, std::string_view field) {
  Result<std::optional<uint64_t>> r = GetOptUint(o, field);
  if (!r.ok()) return r.status();
  if (!*r) return ProtocolError("field '" + std::string(field) + "' is required");
  return **r;
}

Result<std::optional<uint64_t>> GetOptUint(const json::object& o, std::string_view field) {
  const json::value* v = o.if_contains(field);
  if (v == nullptr || v->is_null()) return std::optional<uint64_t>();
  if (v->is_uint64()) return std::optional<uint64_t>(v->get_uint64());
  if (v->is_int64() && v->get_int64() >= 0) return std::optional<uint64_t>(static_cast<uint64_t>(v->get_int64()));
  return ProtocolError("field '" + std::string(field) + "' must be a non-negative integer");
}

Result<std::optional<double>> GetOptSeconds(const json::object& o, std::string_view field) {
  const json::value* v = o.if_contains(field);
  if (v == nullptr || v->is_null()) return std::optional<double>();
  std::optional<double> d = AsNumber(v);
  if (!d || !std::isfinite(*d) || *d < 0 || *d > 1e9) {
    return ProtocolError("field '" + std::string(field) + "' must be a finite number >= 0");
  }
  return d;
}

json::object PoolStatusToJson(const PoolStatus& s, const std::function<std::string(const std::string&)>& mask) {
  json::object o;
  o["name"] = s.name;
  o["strategy"] = StrategyName(s.strategy);
  json::object opt;
  opt["default_cooldown"] = s.options.default_cooldown;
  opt["max_failures"] = s.options.max_failures;
  opt["acquire_timeout"] = s.options.acquire_timeout;
  opt["max_lease_seconds"] = s.options.max_lease_seconds;
  opt["max_cooldown"] = s.options.max_cooldown;
  opt["rate_margin"] = s.options.rate_margin;
  o["options"] = std::move(opt);
  json::object wait;
  json::array counts;
  for (uint64_t c : s.acquire_wait.counts) counts.push_back(c);
  wait["counts"] = std::move(counts);
  json::array bounds;
  for (double b : kWaitBucketBounds) bounds.push_back(b);
  wait["bounds"] = std::move(bounds);
  wait["sum"] = s.acquire_wait.sum;
  wait["count"] = s.acquire_wait.count;
  o["acquire_wait"] = std::move(wait);
  json::object t;
  t["total_acquires"] = s.totals.acquires;
  t["total_releases"] = s.totals.releases;
  t["total_failures"] = s.totals.failures;
  t["total_rate_limited"] = s.totals.rate_limited;
  t["total_reclaimed"] = s.totals.reclaimed;
  t["no_key_available_count"] = s.totals.no_key_available;
  t["timeouts"] = s.totals.timeouts;
  t["uptime"] = s.uptime;
  o["pool_metrics"] = std::move(t);
  o["generation"] = s.generation;
  json::array keys;
  for (const KeyStatus& k : s.keys) {
    json::object j;
    j["name"] = k.name;
    j["key_suffix"] = mask ? mask(k.name) : std::string();
    j["slot"] = k.slot;
    j["fingerprint"] = k.fingerprint;
    j["state"] = KeyStateName(k.state);
    j["enabled"] = k.enabled;
    j["weight"] = k.weight;
    j["max_concurrency"] = k.max_concurrency;
    j["rpm"] = k.rpm;
    j["tpm"] = k.tpm;
    j["active_requests"] = k.in_flight;
    j["cooldown_remaining"] = k.cooldown_remaining;
    j["fail_streak"] = k.fail_streak;
    j["rate_limit_streak"] = k.rate_limit_streak;
    j["acquires"] = k.acquires;
    j["success_count"] = k.successes;
    j["failure_count"] = k.failures;
    j["rate_limited"] = k.rate_limited;
    j["reclaimed"] = k.reclaimed;
    j["tokens"] = k.tokens;
    j["cancelled"] = k.cancelled;
    j["latency_avg"] = k.latency_avg;
    j["has_latency"] = k.has_latency;
    j["last_used_ago"] = k.last_used_ago;
    j["is_available"] = k.state == KeyState::kAvailable;
    j["health_score"] = k.health_score;
    j["circuit"] = CircuitStateName(k.circuit);
    j["circuit_opens"] = k.circuit_opens;
    j["escalation"] = k.escalation;
    j["requests_available"] = k.requests_available;
    j["tokens_available"] = k.tokens_available;
    j["burst"] = k.burst;
    j["rate_margin"] = k.rate_margin;
    j["reason"] = k.reason;
    keys.push_back(std::move(j));
  }
  o["keys"] = std::move(keys);
  return o;
}

Result<PoolStatus> PoolStatusFromJson(const json::value& v) {
  if (!v.is_object()) return ProtocolError("pool status must be an object");
  const json::object& o = v.get_object();
  PoolStatus s;
  s.name = Str(o, "name");
  Result<Strategy> strategy = ParseStrategy(Str(o, "strategy"));
  s.strategy = strategy.ok() ? *strategy : Strategy::kLeastBusy;
  s.options.strategy = s.strategy;
  if (const json::value* opt = o.if_contains("options"); opt != nullptr && opt->is_object()) {
    const json::object& p = opt->get_object();
    s.options.default_cooldown = F64(p, "default_cooldown");
    s.options.max_failures = static_cast<uint32_t>(U64(p, "max_failures"));
    s.options.acquire_timeout = F64(p, "acquire_timeout");
    s.options.max_lease_seconds = F64(p, "max_lease_seconds");
    s.options.max_cooldown = F64(p, "max_cooldown");
    if (p.if_contains("rate_margin")) s.options.rate_margin = F64(p, "rate_margin");
  }
  if (const json::value* wv = o.if_contains("acquire_wait"); wv != nullptr && wv->is_object()) {
    const json::object& w = wv->get_object();
    if (const json::value* c = w.if_contains("counts"); c != nullptr && c->is_array()) {
      const json::array& a = c->get_array();
      for (size_t b = 0; b < kWaitBuckets && b < a.size(); ++b) {
        if (a[b].is_uint64())
          s.acquire_wait.counts[b] = a[b].get_uint64();
        else if (a[b].is_int64() && a[b].get_int64() >= 0)
          s.acquire_wait.counts[b] = static_cast<uint64_t>(a[b].get_int64());
      }
    }
    s.acquire_wait.sum = F64(w, "sum");
    s.acquire_wait.count = U64(w, "count");
  }
  if (const json::value* tv = o.if_contains("pool_metrics"); tv != nullptr && tv->is_object()) {
    const json::object& t = tv->get_object();
    s.totals.acquires = U64(t, "total_acquires");
    s.totals.releases = U64(t, "total_releases");
    s.totals.failures = U64(t, "total_failures");
    s.totals.rate_limited = U64(t, "total_rate_limited");
    s.totals.reclaimed = U64(t, "total_reclaimed");
    s.totals.no_key_available = U64(t, "no_key_available_count");
    s.totals.timeouts = U64(t, "timeouts");
    s.uptime = F64(t, "uptime");
  }
  s.generation = U64(o, "generation");
  const json::value* keys = o.if_contains("keys");
  if (keys == nullptr || !keys->is_array()) return ProtocolError("pool status without 'keys'");
  for (const json::value& kv : keys->get_array()) {
    if (!kv.is_object()) return ProtocolError("key status must be an object");
    const json::object& j = kv.get_object();
    KeyStatus k;
    k.name = Str(j, "name");
    k.slot = static_cast<uint32_t>(U64(j, "slot"));
    k.fingerprint = U64(j, "fingerprint");
    const std::string state = Str(j, "state");
    if (Result<KeyState> ks = ParseKeyState(state); ks.ok()) k.state = *ks;
    k.enabled = Bool(j, "enabled");
    k.weight = static_cast<uint32_t>(U64(j, "weight"));
    k.max_concurrency = static_cast<uint32_t>(U64(j, "max_concurrency"));
    k.rpm = static_cast<uint32_t>(U64(j, "rpm"));
    k.tpm = U64(j, "tpm");
    k.in_flight = static_cast<uint32_t>(U64(j, "active_requests"));
    k.cooldown_remaining = F64(j, "cooldown_remaining");
    k.fail_streak = static_cast<uint32_t>(U64(j, "fail_streak"));
    k.rate_limit_streak = static_cast<uint32_t>(U64(j, "rate_limit_streak"));
    k.acquires = U64(j, "acquires");
    k.successes = U64(j, "success_count");
    k.failures = U64(j, "failure_count");
    k.rate_limited = U64(j, "rate_limited");
    k.reclaimed = U64(j, "reclaimed");
    k.tokens = U64(j, "tokens");
    k.cancelled = U64(j, "cancelled");
    k.latency_avg = F64(j, "latency_avg");
    k.has_latency = Bool(j, "has_latency");
    k.last_used_ago = F64(j, "last_used_ago");
    k.health_score = F64(j, "health_score");
    if (j.if_contains("circuit")) {
      Result<CircuitState> circuit = ParseCircuitState(Str(j, "circuit"));
      if (!circuit.ok()) return ProtocolError("key status: " + circuit.status().message());
      k.circuit = *circuit;
    }
    k.circuit_opens = static_cast<uint32_t>(U64(j, "circuit_opens"));
    k.escalation = static_cast<uint32_t>(U64(j, "escalation"));
    k.requests_available =
        j.if_contains("requests_available") ? static_cast<int64_t>(F64(j, "requests_available")) : -1;
    k.tokens_available = j.if_contains("tokens_available") ? static_cast<int64_t>(F64(j, "tokens_available")) : -1;
    k.burst = static_cast<uint32_t>(U64(j, "burst"));
    k.rate_margin = j.if_contains("rate_margin") ? F64(j, "rate_margin") : -1.0;
    k.reason = Str(j, "reason");
    s.keys.push_back(std::move(k));
  }
  return s;
}

}  // namespace keymesh::protocol
