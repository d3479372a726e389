#include "protocol/status_json.h"

#include <algorithm>
#include <type_traits>
#include <variant>

#include <boost/json/array.hpp>

#include "protocol/json_fields.h"

namespace keymesh::protocol {
namespace {

namespace json = boost::json;

// One list per struct of its JSON fields, read and written by the same
// loop, so a field is added in one place. kSpecial entries are written and
// read by the caller (enums, derived values, the masked secret), so the
// object keeps the order of the list.
enum class Special { kKeySuffix, kState, kIsAvailable, kCircuit, kMembers, kMeshKeys };

template <typename S>
struct Field {
  const char* name;
  std::variant<std::string S::*, uint32_t S::*, uint64_t S::*, int64_t S::*, double S::*, bool S::*, Special> member;
};

const Field<PoolOptions> kOptionFields[] = {
    {"default_cooldown", &PoolOptions::default_cooldown}, {"max_failures", &PoolOptions::max_failures},
    {"acquire_timeout", &PoolOptions::acquire_timeout},   {"max_lease_seconds", &PoolOptions::max_lease_seconds},
    {"max_cooldown", &PoolOptions::max_cooldown},         {"rate_margin", &PoolOptions::rate_margin},
};

// (pool_metrics also holds the pool's uptime, which is not a PoolTotals field.)
const Field<PoolTotals> kTotalFields[] = {
    {"total_acquires", &PoolTotals::acquires},   {"total_releases", &PoolTotals::releases},
    {"total_failures", &PoolTotals::failures},   {"total_rate_limited", &PoolTotals::rate_limited},
    {"total_reclaimed", &PoolTotals::reclaimed}, {"no_key_available_count", &PoolTotals::no_key_available},
    {"timeouts", &PoolTotals::timeouts},
};

const Field<KeyStatus> kKeyFields[] = {
    {"name", &KeyStatus::name},
    {"key_suffix", Special::kKeySuffix},
    {"slot", &KeyStatus::slot},
    {"fingerprint", &KeyStatus::fingerprint},
    {"state", Special::kState},
    {"enabled", &KeyStatus::enabled},
    {"weight", &KeyStatus::weight},
    {"max_concurrency", &KeyStatus::max_concurrency},
    {"rpm", &KeyStatus::rpm},
    {"tpm", &KeyStatus::tpm},
    {"active_requests", &KeyStatus::in_flight},
    {"cooldown_remaining", &KeyStatus::cooldown_remaining},
    {"fail_streak", &KeyStatus::fail_streak},
    {"rate_limit_streak", &KeyStatus::rate_limit_streak},
    {"acquires", &KeyStatus::acquires},
    {"success_count", &KeyStatus::successes},
    {"failure_count", &KeyStatus::failures},
    {"rate_limited", &KeyStatus::rate_limited},
    {"reclaimed", &KeyStatus::reclaimed},
    {"tokens", &KeyStatus::tokens},
    {"cancelled", &KeyStatus::cancelled},
    {"latency_avg", &KeyStatus::latency_avg},
    {"has_latency", &KeyStatus::has_latency},
    {"last_used_ago", &KeyStatus::last_used_ago},
    {"is_available", Special::kIsAvailable},
    {"health_score", &KeyStatus::health_score},
    {"circuit", Special::kCircuit},
    {"circuit_opens", &KeyStatus::circuit_opens},
    {"escalation", &KeyStatus::escalation},
    {"requests_available", &KeyStatus::requests_available},
    {"tokens_available", &KeyStatus::tokens_available},
    {"burst", &KeyStatus::burst},
    {"share_active", &KeyStatus::share_active},
    {"share_rpm", &KeyStatus::share_rpm},
    {"share_tpm", &KeyStatus::share_tpm},
    {"share_burst", &KeyStatus::share_burst},
    {"rate_margin", &KeyStatus::rate_margin},
    {"reason", &KeyStatus::reason},
};

// Lenient reads into a member: a missing or mistyped field keeps its value
// (the struct's default).
void ReadInto(const json::object& o, std::string_view f, std::string* v) {
  if (const json::value* x = o.if_contains(f); x != nullptr && x->is_string()) *v = std::string(x->get_string());
}
void ReadInto(const json::object& o, std::string_view f, uint32_t* v) {
  *v = static_cast<uint32_t>(LenientUint(o, f, UINT32_MAX, *v));
}
void ReadInto(const json::object& o, std::string_view f, uint64_t* v) { *v = LenientUint(o, f, UINT64_MAX, *v); }
void ReadInto(const json::object& o, std::string_view f, int64_t* v) { *v = LenientInt(o, f, *v); }
void ReadInto(const json::object& o, std::string_view f, double* v) { *v = LenientNumber(o, f, *v); }
void ReadInto(const json::object& o, std::string_view f, bool* v) { *v = LenientBool(o, f, *v); }

template <typename S, size_t N, typename OnSpecial>
void WriteFields(const S& s, const Field<S> (&fields)[N], json::object* o, OnSpecial special) {
  for (const Field<S>& f : fields) {
    std::visit(
        [&](auto m) {
          if constexpr (std::is_same_v<decltype(m), Special>) {
            (*o)[f.name] = special(m);
          } else {
            (*o)[f.name] = s.*m;
          }
        },
        f.member);
  }
}

template <typename S, size_t N>
void WriteFields(const S& s, const Field<S> (&fields)[N], json::object* o) {
  WriteFields(s, fields, o, [](Special) { return json::value(); });
}

template <typename S, size_t N>
void ReadFields(const json::object& o, const Field<S> (&fields)[N], S* s) {
  for (const Field<S>& f : fields) {
    std::visit(
        [&](auto m) {
          if constexpr (!std::is_same_v<decltype(m), Special>) ReadInto(o, f.name, &(s->*m));
        },
        f.member);
  }
}

json::object WaitToJson(const WaitHistogram& w) {
  json::array counts;
  for (uint64_t c : w.counts) counts.push_back(c);
  json::array bounds;
  for (double b : kWaitBucketBounds) bounds.push_back(b);
  return {{"counts", std::move(counts)}, {"bounds", std::move(bounds)}, {"sum", w.sum}, {"count", w.count}};
}

json::object KeyToJson(const KeyStatus& k, std::string key_suffix) {
  json::object j;
  WriteFields(k, kKeyFields, &j, [&](Special sp) -> json::value {
    switch (sp) {
      case Special::kKeySuffix: return json::value(std::move(key_suffix));
      case Special::kState: return json::value(KeyStateName(k.state));
      case Special::kIsAvailable: return json::value(k.state == KeyState::kAvailable);
      case Special::kCircuit: return json::value(CircuitStateName(k.circuit));
      default: break;
    }
    return json::value();
  });
  return j;
}

json::object PoolToJson(const PoolStatus& s, const std::function<std::string(size_t)>& suffix) {
  json::object o;
  o["name"] = s.name;
  o["strategy"] = StrategyName(s.strategy);
  json::object options;
  WriteFields(s.options, kOptionFields, &options);
  o["options"] = std::move(options);
  o["acquire_wait"] = WaitToJson(s.acquire_wait);
  json::object totals;
  WriteFields(s.totals, kTotalFields, &totals);
  totals["uptime"] = s.uptime;
  o["pool_metrics"] = std::move(totals);
  o["generation"] = s.generation;
  json::array keys;
  for (size_t i = 0; i < s.keys.size(); ++i) keys.push_back(KeyToJson(s.keys[i], suffix(i)));
  o["keys"] = std::move(keys);
  return o;
}

void WaitFromJson(const json::object& w, WaitHistogram* out) {
  if (const json::value* c = w.if_contains("counts"); c != nullptr && c->is_array()) {
    const json::array& a = c->get_array();
    for (size_t b = 0; b < kWaitBuckets && b < a.size(); ++b) {
      if (a[b].is_uint64()) {
        out->counts[b] = a[b].get_uint64();
      } else if (a[b].is_int64() && a[b].get_int64() >= 0) {
        out->counts[b] = static_cast<uint64_t>(a[b].get_int64());
      }
    }
  }
  out->sum = LenientNumber(w, "sum");
  out->count = LenientUint(w, "count");
}

KeyStatus KeyFromJson(const json::object& j) {
  KeyStatus k;
  ReadFields(j, kKeyFields, &k);
  if (Result<KeyState> ks = ParseKeyState(LenientString(j, "state")); ks.ok()) k.state = *ks;
  if (Result<CircuitState> c = ParseCircuitState(LenientString(j, "circuit")); c.ok()) k.circuit = *c;
  // A rate is never negative (a hostile or broken broker's -5 reads as 0).
  k.share_rpm = std::max(k.share_rpm, 0.0);
  k.share_tpm = std::max(k.share_tpm, 0.0);
  return k;
}

// The mesh report: `members` and `keys` are written by MeshReportToJson.
const Field<MeshReport> kMeshFields[] = {
    {"enabled", &MeshReport::enabled},
    {"host", &MeshReport::host},
    {"namespace", &MeshReport::ns},
    {"redis", &MeshReport::redis},
    {"mode", &MeshReport::mode},
    {"redis_ok", &MeshReport::redis_ok},
    {"last_error", &MeshReport::last_error},
    {"rtt_seconds", &MeshReport::rtt_seconds},
    {"since_refresh", &MeshReport::since_refresh},
    {"lease_remaining", &MeshReport::lease_remaining},
    {"hosts", &MeshReport::hosts},
    {"members", Special::kMembers},
    {"epoch", &MeshReport::epoch},
    {"refreshes", &MeshReport::refreshes},
    {"refresh_failures", &MeshReport::refresh_failures},
    {"events_published", &MeshReport::events_published},
    {"events_applied", &MeshReport::events_applied},
    {"resyncs", &MeshReport::resyncs},
    {"rebalances", &MeshReport::rebalances},
    {"propagation_p50", &MeshReport::propagation_p50},
    {"propagation_p99", &MeshReport::propagation_p99},
    {"propagation_samples", &MeshReport::propagation_samples},
    {"keys", Special::kMeshKeys},
};

const Field<MeshReport::Key> kMeshKeyFields[] = {
    {"pool", &MeshReport::Key::pool},           {"key", &MeshReport::Key::key},
    {"limit_rpm", &MeshReport::Key::limit_rpm}, {"limit_tpm", &MeshReport::Key::limit_tpm},
    {"share_rpm", &MeshReport::Key::share_rpm}, {"share_tpm", &MeshReport::Key::share_tpm},
    {"burst", &MeshReport::Key::burst},         {"wants_rpm", &MeshReport::Key::wants_rpm},
    {"wants_tpm", &MeshReport::Key::wants_tpm}, {"holders", &MeshReport::Key::holders},
    {"mismatch", &MeshReport::Key::mismatch},
};

// 0 for a negative amount; -1 ("none yet") for a negative "seconds since".
double NonNegative(double v) { return v < 0 ? 0.0 : v; }
double SecondsOrNone(double v) { return v < 0 ? -1.0 : v; }

}  // namespace

json::object PoolStatusToJson(const PoolStatus& s, const std::function<std::string(const std::string&)>& mask) {
  return PoolToJson(s, [&](size_t i) { return mask ? mask(s.keys[i].name) : std::string(); });
}

json::object PoolStatusToJson(const PoolStatus& s, const std::vector<std::string>& key_suffix) {
  return PoolToJson(s, [&](size_t i) { return i < key_suffix.size() ? key_suffix[i] : std::string(); });
}

Result<PoolStatus> PoolStatusFromJson(const json::value& v, std::vector<std::string>* key_suffix) {
  if (!v.is_object()) return Status(Code::kProtocolError, "pool status must be an object");
  const json::object& o = v.get_object();
  PoolStatus s;
  s.name = LenientString(o, "name");
  Result<Strategy> strategy = ParseStrategy(LenientString(o, "strategy"));
  s.strategy = strategy.ok() ? *strategy : Strategy::kLeastBusy;
  s.options.strategy = s.strategy;
  if (const json::object* p = LenientObject(o, "options")) ReadFields(*p, kOptionFields, &s.options);
  if (const json::object* w = LenientObject(o, "acquire_wait")) WaitFromJson(*w, &s.acquire_wait);
  if (const json::object* t = LenientObject(o, "pool_metrics")) {
    ReadFields(*t, kTotalFields, &s.totals);
    s.uptime = LenientNumber(*t, "uptime");
  }
  s.generation = LenientUint(o, "generation");
  const json::value* keys = o.if_contains("keys");
  if (keys == nullptr || !keys->is_array()) return Status(Code::kProtocolError, "pool status without 'keys'");
  if (key_suffix != nullptr) key_suffix->clear();
  for (const json::value& kv : keys->get_array()) {
    if (!kv.is_object()) return Status(Code::kProtocolError, "key status must be an object");
    s.keys.push_back(KeyFromJson(kv.get_object()));
    if (key_suffix != nullptr) key_suffix->push_back(LenientString(kv.get_object(), "key_suffix"));
  }
  return s;
}

json::object MeshReportToJson(const MeshReport& r) {
  json::object o;
  if (!r.enabled) {
    o["enabled"] = false;
    return o;
  }
  WriteFields(r, kMeshFields, &o, [&](Special sp) -> json::value {
    if (sp == Special::kMembers) {
      json::array members;
      for (const std::string& m : r.members) members.push_back(json::value(m));
      return members;
    }
    json::array keys;
    for (const MeshReport::Key& k : r.keys) {
      json::object j;
      WriteFields(k, kMeshKeyFields, &j);
      keys.push_back(std::move(j));
    }
    return keys;
  });
  return o;
}

Result<MeshReport> MeshReportFromJson(const json::value& v) {
  if (!v.is_object()) return Status(Code::kProtocolError, "mesh report must be an object");
  const json::object& o = v.get_object();
  MeshReport r;
  ReadFields(o, kMeshFields, &r);
  r.rtt_seconds = SecondsOrNone(r.rtt_seconds);
  r.since_refresh = SecondsOrNone(r.since_refresh);
  r.propagation_p50 = SecondsOrNone(r.propagation_p50);
  r.propagation_p99 = SecondsOrNone(r.propagation_p99);
  r.lease_remaining = NonNegative(r.lease_remaining);
  if (const json::value* m = o.if_contains("members"); m != nullptr) {
    if (!m->is_array()) return FieldError(kWireField, "members", "must be a list of strings");
    for (const json::value& name : m->get_array()) {
      if (!name.is_string()) return FieldError(kWireField, "members", "must be a list of strings");
      r.members.emplace_back(name.get_string());
    }
  }
  if (const json::value* keys = o.if_contains("keys"); keys != nullptr) {
    if (!keys->is_array()) return FieldError(kWireField, "keys", "must be a list of objects");
    for (const json::value& kv : keys->get_array()) {
      if (!kv.is_object()) return FieldError(kWireField, "keys", "must be a list of objects");
      MeshReport::Key k;
      ReadFields(kv.get_object(), kMeshKeyFields, &k);
      for (double* d : {&k.limit_rpm, &k.limit_tpm, &k.share_rpm, &k.share_tpm, &k.burst, &k.wants_rpm, &k.wants_tpm}) {
        *d = NonNegative(*d);
      }
      r.keys.push_back(std::move(k));
    }
  }
  return r;
}

}  // namespace keymesh::protocol
