// The mesh job's life (start, stop, keys) and status, and the keys'
// fingerprints. The threads' work is in mesh_refresh.cc, mesh_demand.cc and
// mesh_events.cc (mesh_job_impl.h).
#include "broker/mesh/mesh_job.h"

#include <cstdio>
#include <string>

#include <boost/uuid/detail/sha1.hpp>

#include "broker/mesh/mesh_job_impl.h"
#include "common/text.h"

namespace keymesh::broker::mesh {
namespace {

void Sha1(const std::string& a, const std::string& b, unsigned char out[20]) {
  boost::uuids::detail::sha1 h;
  h.process_bytes(a.data(), a.size());
  h.process_bytes(b.data(), b.size());
  boost::uuids::detail::sha1::digest_type d;
  h.get_digest(d);
  for (int i = 0; i < 5; ++i) {
    out[i * 4] = static_cast<unsigned char>(d[i] >> 24);
    out[i * 4 + 1] = static_cast<unsigned char>(d[i] >> 16);
    out[i * 4 + 2] = static_cast<unsigned char>(d[i] >> 8);
    out[i * 4 + 3] = static_cast<unsigned char>(d[i]);
  }
}

}  // namespace

std::string MeshFingerprint(const std::string& ns, const std::string& secret) {
  // HMAC-SHA-1 (RFC 2104) keyed by the namespace: equal secrets give equal
  // fingerprints on every host of the namespace, and the fingerprint does
  // not reveal the secret (API keys are long random strings).
  std::string key = "keymesh-mesh-v1:" + ns;
  unsigned char kd[20];
  if (key.size() > 64) {
    Sha1(key, "", kd);
    key.assign(reinterpret_cast<const char*>(kd), 20);
  }
  key.resize(64, '\0');
  std::string ipad(64, '\0'), opad(64, '\0');
  for (size_t i = 0; i < 64; ++i) {
    ipad[i] = static_cast<char>(key[i] ^ 0x36);
    opad[i] = static_cast<char>(key[i] ^ 0x5c);
  }
  unsigned char inner[20], outer[20];
  Sha1(ipad, secret, inner);
  Sha1(opad, std::string(reinterpret_cast<const char*>(inner), 20), outer);
  return Hex(std::string_view(reinterpret_cast<const char*>(outer), 20));
}

// --- the job -------------------------------------------------------------------

MeshJob::MeshJob(MeshConfig config, StoreFactory store) : impl_(std::make_unique<Impl>()) {
  impl_->config = std::move(config);
  impl_->factory = std::move(store);
  MeshStatus& s = impl_->status;
  s.enabled = true;
  s.host = impl_->config.host;
  s.ns = impl_->config.ns;
  s.redis = impl_->config.redis.Describe();
  s.mode = impl_->config.outage == OutageMode::kShare    ? MeshMode::kShare
           : impl_->config.outage == OutageMode::kClosed ? MeshMode::kClosed
                                                         : MeshMode::kOpen;
}

MeshJob::~MeshJob() { Stop(); }

void MeshJob::Start() {
  Impl& m = *impl_;
  if (m.started) return;
  m.started = true;
  m.stop = false;
  Log(LogLevel::kInfo, "mesh_start",
      {{"host", m.config.host},
       {"namespace", m.config.ns},
       {"redis", m.config.redis.Describe()},
       {"outage", OutageModeName(m.config.outage)}});
  m.refresh_thread = std::thread([&m] { m.RefreshLoop(); });
  m.watch_thread = std::thread([&m] { m.WatchLoop(); });
  m.reader_thread = std::thread([&m] { m.ReadLoop(); });
}

void MeshJob::Stop() {
  Impl& m = *impl_;
  if (!m.started) return;
  m.started = false;
  {
    std::lock_guard lock(m.mu);
    m.stop = true;
    if (m.reader_store != nullptr) m.reader_store->Interrupt();
  }
  m.cv.notify_all();
  for (std::thread* t : {&m.refresh_thread, &m.watch_thread, &m.reader_thread}) {
    if (t->joinable()) t->join();
  }
  // Give the shares back at once, and stop using them: a host that left
  // holds nothing (the others may be granted it at their next refresh).
  std::unique_ptr<MeshStore> store = m.factory();
  keymesh::Status left = store->Leave(m.config.host);
  auto [defs, g] = m.Keys();
  (void)g;
  std::map<std::string, std::vector<std::pair<std::string, shm::KeyShare>>> by_pool;
  for (const MeshKey& k : defs) {
    shm::KeyShare none;
    none.active = true;
    by_pool[k.pool].emplace_back(k.key, none);
  }
  for (auto& [pool, shares] : by_pool) {
    if (shm::PoolAdmin* admin = m.pools(pool)) (void)admin->SetShares(shares);
  }
  Log(left.ok() ? LogLevel::kInfo : LogLevel::kWarn, "mesh_stop",
      {{"host", m.config.host}, {"left", left.ok() ? "yes" : left.message()}});
}

void MeshJob::SetKeys(std::vector<MeshKey> keys, std::map<std::string, shm::PoolAdmin*> pools) {
  std::lock_guard lock(impl_->mu);
  impl_->keys = std::move(keys);
  impl_->admins = std::move(pools);
  ++impl_->keys_gen;
}

MeshStatus MeshJob::Status() const {
  const Impl& m = *impl_;
  const uint64_t now = shm::MonotonicNowNanos();
  std::lock_guard lock(m.mu);
  MeshStatus s = m.status;
  const uint64_t last = m.last_refresh_ns.load(std::memory_order_relaxed);
  s.since_refresh = last == 0 ? -1 : static_cast<double>(now - std::min(now, last)) / 1e9;
  const uint64_t until = m.lease_until_ns.load(std::memory_order_relaxed);
  s.lease_remaining = until > now ? static_cast<double>(until - now) / 1e9 : 0;
  const uint64_t rtt = m.rtt_ns.load(std::memory_order_relaxed);
  s.rtt_seconds = last == 0 ? -1 : static_cast<double>(rtt) / 1e9;
  if (!m.delays.empty()) {
    std::vector<double> d = m.delays;
    std::sort(d.begin(), d.end());
    s.propagation_p50 = d[d.size() / 2];
    s.propagation_p99 = d[std::min(d.size() - 1, d.size() * 99 / 100)];
    s.propagation_samples = d.size();
  }
  return s;
}

const char* MeshModeName(MeshMode mode) noexcept {
  switch (mode) {
    case MeshMode::kLeased: return "leased";
    case MeshMode::kLearning: return "learning";
    case MeshMode::kShare: return "share";
    case MeshMode::kClosed: return "closed";
    case MeshMode::kOpen: return "open";
  }
  return "?";
}

}  // namespace keymesh::broker::mesh
