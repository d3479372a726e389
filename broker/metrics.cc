#include "broker/metrics.h"

#include <charconv>
#include <cmath>
#include <limits>
#include <utility>

#include "broker/atomic_file.h"
#include "broker/log.h"
#include "common/text.h"

namespace keymesh::broker {
namespace {

// Label values escape '\', '"' and newline (exposition format 0.0.4).
void AppendLabelValue(std::string* out, const std::string& v) {
  for (char c : v) {
    if (c == '\\' || c == '"') {
      out->push_back('\\');
      out->push_back(c);
    } else if (c == '\n') {
      out->append("\\n");
    } else {
      out->push_back(c);
    }
  }
}

// Shortest text that reads back as the same double ("0.0001", not
// "1e-04"); Prometheus spells the
// non-finite values +Inf, -Inf and NaN.
std::string Num(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  char buf[64];
  const std::to_chars_result r = std::to_chars(buf, buf + sizeof(buf), v, std::chars_format::general);
  return std::string(buf, r.ptr);
}

std::string Num(uint64_t v) { return std::to_string(v); }
std::string Num(int64_t v) { return std::to_string(v); }
std::string Num(uint32_t v) { return std::to_string(v); }

// Accumulates families: each Family() call opens one with its HELP and TYPE
// lines, emitted only if it gets at least one sample.
class Exposition {
 public:
  void Family(const char* name, const char* type, const char* help) {
    name_ = name;
    header_ = std::string("# HELP ") + name + " " + help + "\n# TYPE " + name + " " + type + "\n";
  }

  // labels: pairs of (name, value); `suffix` is appended to the family name
  // (histogram _bucket/_sum/_count).
  void Sample(std::initializer_list<std::pair<const char*, const std::string*>> labels, const std::string& value,
              const char* suffix = "", const char* le = nullptr) {
    if (!header_.empty()) {
      out_ += header_;
      header_.clear();
    }
    out_ += name_;
    out_ += suffix;
    bool first = true;
    auto open = [&] {
      out_.push_back(first ? '{' : ',');
      first = false;
    };
    for (const auto& [k, v] : labels) {
      open();
      out_ += k;
      out_ += "=\"";
      AppendLabelValue(&out_, *v);
      out_.push_back('"');
    }
    if (le != nullptr) {
      open();
      out_ += "le=\"";
      out_ += le;
      out_.push_back('"');
    }
    if (!first) out_.push_back('}');
    out_.push_back(' ');
    out_ += value;
    out_.push_back('\n');
  }

  std::string Take() { return std::move(out_); }

 private:
  std::string name_;
  std::string header_;
  std::string out_;
};

bool Eligible(const KeyStatus& k) { return k.state == KeyState::kAvailable || k.state == KeyState::kProbe; }

// The mesh's families (see metrics.h).
void RenderMesh(const mesh::MeshStatus& m, Exposition* e) {
  e->Family("keymesh_mesh_mode", "gauge",
            "1 for the mesh's current mode (leased, learning, share, closed, open), 0 for the others.");
  for (mesh::MeshMode mode : {mesh::MeshMode::kLeased, mesh::MeshMode::kLearning, mesh::MeshMode::kShare,
                              mesh::MeshMode::kClosed, mesh::MeshMode::kOpen}) {
    const std::string name = mesh::MeshModeName(mode);
    e->Sample({{"mode", &name}}, Num(static_cast<uint32_t>(m.mode == mode ? 1 : 0)));
  }
  e->Family("keymesh_mesh_redis_up", "gauge", "1 if the mesh's last call to Redis succeeded.");
  e->Sample({}, Num(static_cast<uint32_t>(m.redis_ok ? 1 : 0)));
  e->Family("keymesh_mesh_redis_rtt_seconds", "gauge", "Round trip of the mesh's last call to Redis.");
  if (m.rtt_seconds >= 0) e->Sample({}, Num(m.rtt_seconds));
  e->Family("keymesh_mesh_lease_age_seconds", "gauge",
            "Seconds since the last successful lease refresh (+Inf before the first).");
  e->Sample({}, Num(m.since_refresh >= 0 ? m.since_refresh : std::numeric_limits<double>::infinity()));
  e->Family("keymesh_mesh_lease_remaining_seconds", "gauge", "Seconds this host's lease stays valid.");
  e->Sample({}, Num(m.lease_remaining > 0 ? m.lease_remaining : 0.0));
  e->Family("keymesh_mesh_hosts", "gauge", "Live hosts of the mesh's namespace, this one included.");
  e->Sample({}, Num(m.hosts));
  e->Family("keymesh_mesh_refreshes_total", "counter", "Successful lease refreshes.");
  e->Sample({}, Num(m.refreshes));
  e->Family("keymesh_mesh_refresh_failures_total", "counter", "Lease refreshes that failed.");
  e->Sample({}, Num(m.refresh_failures));
  e->Family("keymesh_mesh_events_published_total", "counter",
            "Local cooldowns, circuit changes, revocations, disables and resets sent to the mesh.");
  e->Sample({}, Num(m.events_published));
  e->Family("keymesh_mesh_events_applied_total", "counter", "Other hosts' changes merged into this host's segment.");
  e->Sample({}, Num(m.events_applied));
  // Like the budgets, only for the dimensions a key limits.
  e->Family("keymesh_key_share_rpm", "gauge", "This host's share of the key's requests per minute.");
  for (const mesh::MeshKeyStatus& k : m.keys) {
    if (k.limit_rpm > 0) e->Sample({{"pool", &k.pool}, {"key", &k.key}}, Num(k.share_rpm));
  }
  e->Family("keymesh_key_share_tpm", "gauge", "This host's share of the key's tokens per minute.");
  for (const mesh::MeshKeyStatus& k : m.keys) {
    if (k.limit_tpm > 0) e->Sample({{"pool", &k.pool}, {"key", &k.key}}, Num(k.share_tpm));
  }
}

}  // namespace

std::string RenderMetrics(const std::vector<PoolStatus>& pools, const mesh::MeshStatus* mesh) {
  Exposition e;
  auto pool_family = [&](const char* name, const char* type, const char* help, auto get) {
    e.Family(name, type, help);
    for (const PoolStatus& p : pools) e.Sample({{"pool", &p.name}}, Num(get(p)));
  };
  // `when` selects the keys that have the series (budgets only exist for
  // limited keys, a latency only after a sample).
  auto key_family = [&](const char* name, const char* type, const char* help, auto get,
                        bool (*when)(const KeyStatus&) = nullptr) {
    e.Family(name, type, help);
    for (const PoolStatus& p : pools) {
      for (const KeyStatus& k : p.keys) {
        if (when != nullptr && !when(k)) continue;
        e.Sample({{"pool", &p.name}, {"key", &k.name}}, Num(get(k)));
      }
    }
  };

  pool_family("keymesh_pool_acquires_total", "counter", "Leases granted, all processes.",
              [](const PoolStatus& p) { return p.totals.acquires; });
  pool_family("keymesh_pool_releases_total", "counter", "Leases released as a success.",
              [](const PoolStatus& p) { return p.totals.releases; });
  pool_family("keymesh_pool_failures_total", "counter", "Leases ended as a failure.",
              [](const PoolStatus& p) { return p.totals.failures; });
  pool_family("keymesh_pool_rate_limited_total", "counter", "Leases ended by a rate limit (429).",
              [](const PoolStatus& p) { return p.totals.rate_limited; });
  pool_family("keymesh_pool_reclaimed_total", "counter",
              "Leases freed because the holder died or held them longer than max_lease_seconds.",
              [](const PoolStatus& p) { return p.totals.reclaimed; });
  pool_family("keymesh_pool_no_key_available_total", "counter", "Acquires that found no eligible key (once each).",
              [](const PoolStatus& p) { return p.totals.no_key_available; });
  pool_family("keymesh_pool_acquire_timeouts_total", "counter", "Acquires that waited and gave up.",
              [](const PoolStatus& p) { return p.totals.timeouts; });
  pool_family("keymesh_pool_in_flight", "gauge", "Leases held now, all keys.", [](const PoolStatus& p) {
    uint64_t n = 0;
    for (const KeyStatus& k : p.keys) n += k.in_flight;
    return n;
  });
  pool_family("keymesh_pool_keys", "gauge", "Keys in the pool.",
              [](const PoolStatus& p) { return static_cast<uint64_t>(p.keys.size()); });
  pool_family("keymesh_pool_eligible_keys", "gauge", "Keys eligible for the next acquire now.",
              [](const PoolStatus& p) {
                uint64_t n = 0;
                for (const KeyStatus& k : p.keys) n += Eligible(k) ? 1 : 0;
                return n;
              });
  pool_family("keymesh_pool_uptime_seconds", "gauge", "Seconds since the pool was created.",
              [](const PoolStatus& p) { return p.uptime; });

  // The segment keeps per-bucket counts; Prometheus wants cumulative ones.
  e.Family("keymesh_acquire_wait_seconds", "histogram",
           "Time from an acquire call to its grant, granted acquires of all processes.");
  for (const PoolStatus& p : pools) {
    uint64_t cumulative = 0;
    for (size_t i = 0; i + 1 < kWaitBuckets; ++i) {
      cumulative += p.acquire_wait.counts[i];
      const std::string le = Num(kWaitBucketBounds[i]);
      e.Sample({{"pool", &p.name}}, Num(cumulative), "_bucket", le.c_str());
    }
    cumulative += p.acquire_wait.counts[kWaitBuckets - 1];
    // _count is the sum of the buckets, so +Inf == _count even if a
    // concurrent grant was between updating count and its bucket.
    e.Sample({{"pool", &p.name}}, Num(cumulative), "_bucket", "+Inf");
    e.Sample({{"pool", &p.name}}, Num(p.acquire_wait.sum), "_sum");
    e.Sample({{"pool", &p.name}}, Num(cumulative), "_count");
  }

  key_family("keymesh_key_acquires_total", "counter", "Leases granted on this key.",
             [](const KeyStatus& k) { return k.acquires; });
  key_family("keymesh_key_successes_total", "counter", "Leases released as a success.",
             [](const KeyStatus& k) { return k.successes; });
  key_family("keymesh_key_failures_total", "counter", "Leases ended as a failure.",
             [](const KeyStatus& k) { return k.failures; });
  key_family("keymesh_key_rate_limited_total", "counter", "Leases ended by a rate limit (429).",
             [](const KeyStatus& k) { return k.rate_limited; });
  key_family("keymesh_key_reclaimed_total", "counter", "Leases reclaimed from dead or hung holders.",
             [](const KeyStatus& k) { return k.reclaimed; });
  key_family("keymesh_key_cancelled_total", "counter", "Leases ended without an outcome.",
             [](const KeyStatus& k) { return k.cancelled; });
  key_family("keymesh_key_tokens_total", "counter", "Tokens reported by releases.",
             [](const KeyStatus& k) { return k.tokens; });
  key_family("keymesh_key_circuit_opens_total", "counter", "Times the key's circuit opened.",
             [](const KeyStatus& k) { return k.circuit_opens; });
  key_family("keymesh_key_in_flight", "gauge", "Leases held now.", [](const KeyStatus& k) { return k.in_flight; });
  key_family("keymesh_key_max_concurrency", "gauge", "Concurrency cap (0: unlimited).",
             [](const KeyStatus& k) { return k.max_concurrency; });
  key_family("keymesh_key_eligible", "gauge", "1 if the key is eligible for the next acquire.",
             [](const KeyStatus& k) { return static_cast<uint32_t>(Eligible(k) ? 1 : 0); });
  key_family("keymesh_key_enabled", "gauge", "0 if an operator disabled the key.",
             [](const KeyStatus& k) { return static_cast<uint32_t>(k.enabled ? 1 : 0); });
  key_family("keymesh_key_cooldown_remaining_seconds", "gauge", "Seconds until the key's cooldown ends.",
             [](const KeyStatus& k) { return k.cooldown_remaining > 0 ? k.cooldown_remaining : 0.0; });
  key_family("keymesh_key_circuit_state", "gauge", "Circuit: 0 closed, 1 open, 2 half-open, 3 revoked.",
             [](const KeyStatus& k) { return static_cast<uint32_t>(k.circuit); });
  key_family(
      "keymesh_key_requests_available", "gauge", "Requests the key's rpm budget grants now.",
      [](const KeyStatus& k) { return k.requests_available; },
      [](const KeyStatus& k) { return k.rpm > 0 && k.requests_available >= 0; });
  key_family(
      "keymesh_key_tokens_available", "gauge", "Tokens left in the key's tpm budget now.",
      [](const KeyStatus& k) { return k.tokens_available; },
      [](const KeyStatus& k) { return k.tpm > 0 && k.tokens_available >= 0; });
  key_family(
      "keymesh_key_latency_ema_seconds", "gauge", "EMA of the key's request latency (alpha 0.2).",
      [](const KeyStatus& k) { return k.latency_avg; }, [](const KeyStatus& k) { return k.has_latency; });
  if (mesh != nullptr && mesh->enabled) RenderMesh(*mesh, &e);
  return e.Take();
}

MetricsFileWriter::MetricsFileWriter(boost::asio::io_context& io, std::string path, std::chrono::milliseconds interval,
                                     Snapshot snapshot, MeshSnapshot mesh)
    : path_(std::move(path)), interval_(interval), snapshot_(std::move(snapshot)), mesh_(std::move(mesh)), timer_(io) {}

void MetricsFileWriter::Start() {
  WriteNow();
  Arm();
}

void MetricsFileWriter::Stop() {
  if (stopped_) return;
  stopped_ = true;
  timer_.cancel();
  WriteNow();
}

void MetricsFileWriter::Arm() {
  timer_.expires_after(interval_);
  timer_.async_wait([this](const boost::system::error_code& ec) {
    if (ec || stopped_) return;
    WriteNow();
    Arm();
  });
}

void MetricsFileWriter::WriteNow() {
  Result<std::vector<PoolStatus>> pools = snapshot_();
  std::optional<mesh::MeshStatus> mesh;
  if (pools.ok() && mesh_) mesh = mesh_();
  Status st = pools.ok() ? WriteFileAtomically(path_, RenderMetrics(*pools, mesh ? &*mesh : nullptr), 0644,
                                               Durability::kAtomic, Directory::kShared)
                         : pools.status();
  if (!st.ok() && !failing_) {
    Log(LogLevel::kError, "metrics_file_failed", {{"file", path_}, {"error", st.message()}});
  } else if (st.ok() && failing_) {
    Log(LogLevel::kInfo, "metrics_file_recovered", {{"file", path_}});
  }
  failing_ = !st.ok();
}

}  // namespace keymesh::broker
