#include "client/keymeshctl/table.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <sstream>
#include <vector>

#include "common/text.h"

namespace keymesh::ctl {
namespace {

constexpr size_t kFirstRightAligned = 6;  // OK, FAILED, 429, EMA

std::string Budget(const KeyStatus& k) {
  std::string budget;
  if (k.rpm > 0 && k.requests_available >= 0) budget = std::to_string(k.requests_available) + " req";
  if (k.tpm > 0 && k.tokens_available >= 0) {
    if (!budget.empty()) budget += ", ";
    budget += std::to_string(k.tokens_available) + " tok";
  }
  return budget.empty() ? "-" : budget;
}

std::string Ema(const KeyStatus& k) {
  if (!k.has_latency) return "-";
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.0fms", k.latency_avg * 1000);
  return buf;
}

}  // namespace

std::string FormatSeconds(double s) {
  char buf[32];
  if (!(s > 0)) return "-";
  if (s < 1) {
    std::snprintf(buf, sizeof(buf), "%.0fms", s * 1000);
  } else if (s < 120) {
    std::snprintf(buf, sizeof(buf), "%.1fs", s);
  } else {
    std::snprintf(buf, sizeof(buf), "%.0fm%02.0fs", std::floor(s / 60), std::fmod(s, 60));
  }
  return buf;
}

std::string RenderPool(const protocol::StatusReply::Pool& pool) {
  const PoolStatus& p = pool.status;
  std::vector<std::vector<std::string>> rows;
  rows.push_back({"KEY", "SECRET", "STATE", "IN-FLIGHT", "BUDGET", "COOLDOWN", "OK", "FAILED", "429", "EMA"});
  for (size_t i = 0; i < p.keys.size(); ++i) {
    const KeyStatus& k = p.keys[i];
    const std::string suffix = i < pool.key_suffix.size() ? pool.key_suffix[i] : "";
    // What the broker sent is shown escaped: nothing it says acts on the terminal.
    std::string state(KeyStateName(k.state));
    if (!k.reason.empty() && k.state != KeyState::kAvailable) state += " (" + Escaped(k.reason) + ")";
    const std::string inflight =
        std::to_string(k.in_flight) + "/" + (k.max_concurrency > 0 ? std::to_string(k.max_concurrency) : "-");
    rows.push_back({Escaped(k.name), suffix.empty() ? "***" : Escaped(suffix), state, inflight, Budget(k),
                    FormatSeconds(k.cooldown_remaining), std::to_string(k.successes), std::to_string(k.failures),
                    std::to_string(k.rate_limited), Ema(k)});
  }
  std::vector<size_t> width(rows[0].size(), 0);
  for (const auto& r : rows) {
    for (size_t c = 0; c < r.size(); ++c) width[c] = std::max(width[c], r[c].size());
  }
  std::ostringstream out;
  out << "pool " << Escaped(p.name) << " (" << StrategyName(p.strategy) << ")  acquires " << p.totals.acquires
      << ", releases " << p.totals.releases << ", failures " << p.totals.failures << ", 429s " << p.totals.rate_limited
      << ", reclaimed " << p.totals.reclaimed << ", no key " << p.totals.no_key_available << "\n";
  for (const auto& r : rows) {
    for (size_t c = 0; c < r.size(); ++c) {
      const std::string pad(width[c] - r[c].size(), ' ');
      out << (c ? "  " : "") << (c >= kFirstRightAligned ? pad + r[c] : r[c] + (c + 1 < r.size() ? pad : ""));
    }
    out << "\n";
  }
  return out.str();
}

}  // namespace keymesh::ctl
