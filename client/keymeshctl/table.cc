#include "client/keymeshctl/table.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <sstream>
#include <vector>

#include "common/text.h"

namespace keymesh::ctl {
namespace {

constexpr size_t kFirstRightAligned = 6;  // OK, FAILED, 429, EMA
constexpr size_t kShareColumn = 5;        // after BUDGET, when shown

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

// A rate or count for display: whole numbers as such, else one decimal;
// huge values (a broken broker's) in exponent form.
std::string Amount(double v) {
  char buf[48];
  if (!(v < 1e15)) {
    std::snprintf(buf, sizeof(buf), "%.3g", v);
  } else if (v == std::floor(v)) {
    std::snprintf(buf, sizeof(buf), "%.0f", v);
  } else {
    std::snprintf(buf, sizeof(buf), "%.1f", v);
  }
  return buf;
}

// "600 rpm, 100000 tpm" for the dimensions `rpm` / `tpm` that are limited;
// `none` when neither is.
std::string PerMinute(double r, double t, bool rpm, bool tpm, const char* none) {
  std::string out;
  if (rpm) out = Amount(r) + " rpm";
  if (tpm) out += (out.empty() ? "" : ", ") + Amount(t) + " tpm";
  return out.empty() ? none : out;
}

// A key's mesh share beside its limits: "300/600 rpm, 40000/100000 tpm".
std::string Share(const KeyStatus& k) {
  if (!k.share_active) return "-";
  std::string out;
  if (k.rpm > 0) out = Amount(k.share_rpm) + "/" + std::to_string(k.rpm) + " rpm";
  if (k.tpm > 0) out += (out.empty() ? "" : ", ") + Amount(k.share_tpm) + "/" + std::to_string(k.tpm) + " tpm";
  return out.empty() ? "-" : out;
}

// Aligned columns, two spaces apart; columns [first_right, end_right) are
// right-aligned (counters), the others left-aligned.
std::string Rows(const std::vector<std::vector<std::string>>& rows, size_t first_right, size_t end_right = SIZE_MAX) {
  std::vector<size_t> width(rows[0].size(), 0);
  for (const auto& r : rows) {
    for (size_t c = 0; c < r.size(); ++c) width[c] = std::max(width[c], r[c].size());
  }
  std::string out;
  for (const auto& r : rows) {
    for (size_t c = 0; c < r.size(); ++c) {
      const std::string pad(width[c] - r[c].size(), ' ');
      const bool right = c >= first_right && c < end_right;
      out += (c ? "  " : "") + (right ? pad + r[c] : r[c] + (c + 1 < r.size() ? pad : ""));
    }
    out += "\n";
  }
  return out;
}

// A short delay (a Redis round trip, a propagation): "0.42ms", "12ms",
// "1.5s"; "-" for none (negative).
std::string RoundTrip(double s) {
  if (s < 0) return "-";
  if (s < 0.01) {
    char buf[32];
    std::snprintf(buf, sizeof(buf), "%.2fms", s * 1000);
    return buf;
  }
  return FormatSeconds(s);
}

// Seconds since something; "0ms" rather than FormatSeconds' "-" for 0.
std::string Elapsed(double s) { return s > 0 ? FormatSeconds(s) : "0ms"; }

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
  const bool shares = std::any_of(p.keys.begin(), p.keys.end(), [](const KeyStatus& k) { return k.share_active; });
  std::vector<std::vector<std::string>> rows;
  rows.push_back({"KEY", "SECRET", "STATE", "IN-FLIGHT", "BUDGET", "COOLDOWN", "OK", "FAILED", "429", "EMA"});
  if (shares) rows[0].insert(rows[0].begin() + kShareColumn, "SHARE");
  for (size_t i = 0; i < p.keys.size(); ++i) {
    const KeyStatus& k = p.keys[i];
    const std::string suffix = i < pool.key_suffix.size() ? pool.key_suffix[i] : "";
    std::string state(KeyStateName(k.state));
    if (!k.reason.empty() && k.state != KeyState::kAvailable) state += " (" + Escaped(k.reason) + ")";
    const std::string inflight =
        std::to_string(k.in_flight) + "/" + (k.max_concurrency > 0 ? std::to_string(k.max_concurrency) : "-");
    rows.push_back({Escaped(k.name), suffix.empty() ? "***" : Escaped(suffix), state, inflight, Budget(k),
                    FormatSeconds(k.cooldown_remaining), std::to_string(k.successes), std::to_string(k.failures),
                    std::to_string(k.rate_limited), Ema(k)});
    if (shares) rows.back().insert(rows.back().begin() + kShareColumn, Share(k));
  }
  std::ostringstream out;
  out << "pool " << Escaped(p.name) << " (" << StrategyName(p.strategy) << ")  acquires " << p.totals.acquires
      << ", releases " << p.totals.releases << ", failures " << p.totals.failures << ", 429s " << p.totals.rate_limited
      << ", reclaimed " << p.totals.reclaimed << ", no key " << p.totals.no_key_available << "\n";
  out << Rows(rows, kFirstRightAligned + (shares ? 1 : 0));
  return out.str();
}

std::string RenderMesh(const protocol::MeshReport& m) {
  if (!m.enabled) return "mesh: not configured (this broker's config has no \"mesh\": it serves this host alone)\n";
  std::ostringstream out;
  out << "mesh: host " << Escaped(m.host) << ", namespace " << Escaped(m.ns) << ", redis " << Escaped(m.redis) << "\n";
  out << "mode " << Escaped(m.mode) << ", redis " << (m.redis_ok ? "ok" : "unreachable") << ", round trip "
      << RoundTrip(m.rtt_seconds) << ", since refresh " << (m.since_refresh < 0 ? "never" : Elapsed(m.since_refresh))
      << ", lease left " << FormatSeconds(m.lease_remaining) << "\n";
  out << "hosts " << m.hosts << ":";
  constexpr size_t kMaxMembers = 32;
  for (size_t i = 0; i < m.members.size() && i < kMaxMembers; ++i) out << (i ? ", " : " ") << Escaped(m.members[i]);
  if (m.members.size() > kMaxMembers) out << ", ... (" << m.members.size() - kMaxMembers << " more)";
  if (m.members.empty()) out << " -";
  out << "\n";
  out << "epoch " << (m.epoch.empty() ? std::string("-") : Escaped(m.epoch)) << ", refreshes " << m.refreshes << " ("
      << m.refresh_failures << " failed), events " << m.events_published << " published / " << m.events_applied
      << " applied, resyncs " << m.resyncs << ", rebalances " << m.rebalances << "\n";
  if (m.propagation_samples > 0) {
    out << "propagation from other hosts: p50 " << RoundTrip(m.propagation_p50) << ", p99 "
        << RoundTrip(m.propagation_p99) << " (last " << m.propagation_samples << " events)\n";
  }
  if (!m.last_error.empty()) out << "last error: " << Escaped(m.last_error) << "\n";
  std::vector<std::vector<std::string>> rows;
  rows.push_back({"POOL", "KEY", "LIMIT", "SHARE", "WANTS", "BURST", "HOLDERS", "REFUSED"});
  for (const protocol::MeshReport::Key& k : m.keys) {
    const bool rpm = k.limit_rpm > 0;
    const bool tpm = k.limit_tpm > 0;
    rows.push_back({Escaped(k.pool), Escaped(k.key), PerMinute(k.limit_rpm, k.limit_tpm, rpm, tpm, "unlimited"),
                    PerMinute(k.share_rpm, k.share_tpm, rpm, tpm, "-"),
                    PerMinute(k.wants_rpm, k.wants_tpm, rpm, tpm, "-"), Amount(k.burst), std::to_string(k.holders),
                    k.mismatch ? "secret differs from another host's" : "-"});
  }
  if (m.keys.empty()) {
    out << "no keys shared\n";
  } else {
    out << Rows(rows, 5, 7);  // BURST, HOLDERS right-aligned
  }
  return out.str();
}

}  // namespace keymesh::ctl
