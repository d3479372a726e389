#include "broker/metrics.h"

#include <cstdio>
#include <functional>

namespace keymesh::broker {
namespace {

std::string Label(const std::string& v) {
  std::string out;
  for (char c : v) {
    if (c == '"' || c == '\\') out.push_back('\\');
    out.push_back(c);
  }
  return out;
}

std::string Num(double v) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.17g", v);
  return buf;
}

}  // namespace

std::string RenderMetrics(const std::vector<PoolStatus>& pools) {
  std::string out;
  auto pool_family = [&](const char* name, const char* type, const char* help,
                         const std::function<double(const PoolStatus&)>& get) {
    out += std::string("# HELP ") + name + " " + help + "\n# TYPE " + name + " " + type + "\n";
    for (const PoolStatus& p : pools) out += std::string(name) + "{pool=\"" + Label(p.name) + "\"} " + Num(get(p)) + "\n";
  };
  auto key_family = [&](const char* name, const char* type, const char* help,
                        const std::function<double(const KeyStatus&)>& get) {
    out += std::string("# HELP ") + name + " " + help + "\n# TYPE " + name + " " + type + "\n";
    for (const PoolStatus& p : pools) {
      for (const KeyStatus& k : p.keys) {
        out += std::string(name) + "{pool=\"" + Label(p.name) + "\",key=\"" + Label(k.name) + "\"} " + Num(get(k)) + "\n";
      }
    }
  };
  pool_family("keymesh_pool_acquires_total", "counter", "Leases granted.",
              [](const PoolStatus& p) { return static_cast<double>(p.totals.acquires); });
  pool_family("keymesh_pool_releases_total", "counter", "Leases released as a success.",
              [](const PoolStatus& p) { return static_cast<double>(p.totals.releases); });
  pool_family("keymesh_pool_failures_total", "counter", "Leases ended as a failure.",
              [](const PoolStatus& p) { return static_cast<double>(p.totals.failures); });
  pool_family("keymesh_pool_rate_limited_total", "counter", "Leases ended by a 429.",
              [](const PoolStatus& p) { return static_cast<double>(p.totals.rate_limited); });
  pool_family("keymesh_pool_reclaimed_total", "counter", "Leases freed because the holder died or held too long.",
              [](const PoolStatus& p) { return static_cast<double>(p.totals.reclaimed); });
  pool_family("keymesh_pool_no_key_available_total", "counter", "Acquires that found no key.",
              [](const PoolStatus& p) { return static_cast<double>(p.totals.no_key_available); });
  pool_family("keymesh_pool_acquire_timeouts_total", "counter", "Acquires that waited and gave up.",
              [](const PoolStatus& p) { return static_cast<double>(p.totals.timeouts); });
  key_family("keymesh_key_in_flight", "gauge", "Leases held now.",
             [](const KeyStatus& k) { return static_cast<double>(k.in_flight); });
  key_family("keymesh_key_available", "gauge", "1 if the key is eligible now.",
             [](const KeyStatus& k) { return k.state == KeyState::kAvailable ? 1.0 : 0.0; });
  key_family("keymesh_key_cooldown_remaining_seconds", "gauge", "Seconds until the cooldown ends.",
             [](const KeyStatus& k) { return k.cooldown_remaining; });
  key_family("keymesh_key_acquires_total", "counter", "Leases granted.",
             [](const KeyStatus& k) { return static_cast<double>(k.acquires); });
  key_family("keymesh_key_successes_total", "counter", "Successful releases.",
             [](const KeyStatus& k) { return static_cast<double>(k.successes); });
  key_family("keymesh_key_failures_total", "counter", "Failures.",
             [](const KeyStatus& k) { return static_cast<double>(k.failures); });
  key_family("keymesh_key_rate_limited_total", "counter", "429s.",
             [](const KeyStatus& k) { return static_cast<double>(k.rate_limited); });
  key_family("keymesh_key_reclaimed_total", "counter", "Leases reclaimed from dead or hung holders.",
             [](const KeyStatus& k) { return static_cast<double>(k.reclaimed); });
  key_family("keymesh_key_tokens_total", "counter", "Tokens reported by releases.",
             [](const KeyStatus& k) { return static_cast<double>(k.tokens); });
  key_family("keymesh_key_latency_ema_seconds", "gauge", "EMA latency (alpha 0.2).",
             [](const KeyStatus& k) { return k.latency_avg; });
  return out;
}

}  // namespace keymesh::broker
