#include "protocol/status_json.h"

#include <boost/json/array.hpp>

#include "protocol/json_fields.h"

namespace keymesh::protocol {
namespace {

namespace json = boost::json;

json::object OptionsToJson(const PoolOptions& p) {
  return {{"default_cooldown", p.default_cooldown}, {"max_failures", p.max_failures},
          {"acquire_timeout", p.acquire_timeout},   {"max_lease_seconds", p.max_lease_seconds},
          {"max_cooldown", p.max_cooldown},         {"rate_margin", p.rate_margin}};
}

json::object WaitToJson(const WaitHistogram& w) {
  json::array counts;
  for (uint64_t c : w.counts) counts.push_back(c);
  json::array bounds;
  for (double b : kWaitBucketBounds) bounds.push_back(b);
  return {{"counts", std::move(counts)}, {"bounds", std::move(bounds)}, {"sum", w.sum}, {"count", w.count}};
}

json::object TotalsToJson(const PoolStatus& s) {
  const PoolTotals& t = s.totals;
  return {{"total_acquires", t.acquires},   {"total_releases", t.releases},
          {"total_failures", t.failures},   {"total_rate_limited", t.rate_limited},
          {"total_reclaimed", t.reclaimed}, {"no_key_available_count", t.no_key_available},
          {"timeouts", t.timeouts},         {"uptime", s.uptime}};
}

json::object KeyToJson(const KeyStatus& k, std::string key_suffix) {
  json::object j;
  j["name"] = k.name;
  j["key_suffix"] = std::move(key_suffix);
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
  return j;
}

json::object PoolToJson(const PoolStatus& s, const std::function<std::string(size_t)>& suffix) {
  json::object o;
  o["name"] = s.name;
  o["strategy"] = StrategyName(s.strategy);
  o["options"] = OptionsToJson(s.options);
  o["acquire_wait"] = WaitToJson(s.acquire_wait);
  o["pool_metrics"] = TotalsToJson(s);
  o["generation"] = s.generation;
  json::array keys;
  for (size_t i = 0; i < s.keys.size(); ++i) keys.push_back(KeyToJson(s.keys[i], suffix(i)));
  o["keys"] = std::move(keys);
  return o;
}

uint32_t U32(const json::object& o, std::string_view f) { return static_cast<uint32_t>(LenientUint(o, f, UINT32_MAX)); }

void OptionsFromJson(const json::object& p, PoolOptions* out) {
  out->default_cooldown = LenientNumber(p, "default_cooldown");
  out->max_failures = U32(p, "max_failures");
  out->acquire_timeout = LenientNumber(p, "acquire_timeout");
  out->max_lease_seconds = LenientNumber(p, "max_lease_seconds");
  out->max_cooldown = LenientNumber(p, "max_cooldown");
  out->rate_margin = LenientNumber(p, "rate_margin", out->rate_margin);
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

void TotalsFromJson(const json::object& t, PoolStatus* s) {
  s->totals.acquires = LenientUint(t, "total_acquires");
  s->totals.releases = LenientUint(t, "total_releases");
  s->totals.failures = LenientUint(t, "total_failures");
  s->totals.rate_limited = LenientUint(t, "total_rate_limited");
  s->totals.reclaimed = LenientUint(t, "total_reclaimed");
  s->totals.no_key_available = LenientUint(t, "no_key_available_count");
  s->totals.timeouts = LenientUint(t, "timeouts");
  s->uptime = LenientNumber(t, "uptime");
}

KeyStatus KeyFromJson(const json::object& j) {
  KeyStatus k;
  k.name = LenientString(j, "name");
  k.slot = U32(j, "slot");
  k.fingerprint = LenientUint(j, "fingerprint");
  if (Result<KeyState> ks = ParseKeyState(LenientString(j, "state")); ks.ok()) k.state = *ks;
  k.enabled = LenientBool(j, "enabled");
  k.weight = U32(j, "weight");
  k.max_concurrency = U32(j, "max_concurrency");
  k.rpm = U32(j, "rpm");
  k.tpm = LenientUint(j, "tpm");
  k.in_flight = U32(j, "active_requests");
  k.cooldown_remaining = LenientNumber(j, "cooldown_remaining");
  k.fail_streak = U32(j, "fail_streak");
  k.rate_limit_streak = U32(j, "rate_limit_streak");
  k.acquires = LenientUint(j, "acquires");
  k.successes = LenientUint(j, "success_count");
  k.failures = LenientUint(j, "failure_count");
  k.rate_limited = LenientUint(j, "rate_limited");
  k.reclaimed = LenientUint(j, "reclaimed");
  k.tokens = LenientUint(j, "tokens");
  k.cancelled = LenientUint(j, "cancelled");
  k.latency_avg = LenientNumber(j, "latency_avg");
  k.has_latency = LenientBool(j, "has_latency");
  k.last_used_ago = LenientNumber(j, "last_used_ago");
  k.health_score = LenientNumber(j, "health_score");
  if (Result<CircuitState> c = ParseCircuitState(LenientString(j, "circuit")); c.ok()) k.circuit = *c;
  k.circuit_opens = U32(j, "circuit_opens");
  k.escalation = U32(j, "escalation");
  k.requests_available = LenientInt(j, "requests_available", -1);
  k.tokens_available = LenientInt(j, "tokens_available", -1);
  k.burst = U32(j, "burst");
  k.rate_margin = LenientNumber(j, "rate_margin", -1.0);
  k.reason = LenientString(j, "reason");
  return k;
}

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
  if (const json::object* p = LenientObject(o, "options")) OptionsFromJson(*p, &s.options);
  if (const json::object* w = LenientObject(o, "acquire_wait")) WaitFromJson(*w, &s.acquire_wait);
  if (const json::object* t = LenientObject(o, "pool_metrics")) TotalsFromJson(*t, &s);
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

}  // namespace keymesh::protocol
