#include "broker/pool_registry.h"

#include <optional>
#include <utility>

#include "broker/hardening.h"
#include "broker/log.h"
#include "broker/recovery.h"
#include "common/text.h"
#include "shm/clock.h"

namespace keymesh::broker {

Status UnknownPool(std::string_view name) { return Status(Code::kUnknownKey, "no pool " + Quoted(name)); }

void PoolRegistry::Configure(std::vector<PoolConfigEntry> pools) {
  configured_ = std::move(pools);
  Rebuild();
}

Status PoolRegistry::Reconcile() {
  Status st = ReconcileSegment(segment_, DesiredPools());
  Rebuild();
  return st;
}

std::vector<PoolConfigEntry> PoolRegistry::DesiredPools() const {
  std::vector<PoolConfigEntry> pools = configured_;
  for (PoolConfigEntry& p : pools) {
    auto rk = runtime_keys_.find(p.name);
    if (rk == runtime_keys_.end()) continue;
    for (const auto& [name, spec] : rk->second) {
      bool in_config = false;
      for (const KeySpec& k : p.keys) in_config = in_config || k.name == name;
      if (!in_config) p.keys.push_back(spec);
    }
  }
  return pools;
}

PoolRegistry::~PoolRegistry() { WipeSecrets(); }

// Freed memory keeps its bytes: overwrite the secrets before they go (KM-16).
void PoolRegistry::WipeSecrets() noexcept {
  for (auto& [pool, table] : secrets_) {
    for (auto& [name, secret] : table) WipeSecret(secret);
  }
  secrets_.clear();
}

void PoolRegistry::Rebuild() {
  for (uint32_t i = 0; i < segment_.header()->max_pools; ++i) {
    if (segment_.pool_header(i)->use != shm::PoolUse::kInUse) continue;
    auto access = std::make_unique<shm::PoolAdmin>(segment_, i);
    access->set_lock_timeout(kBrokerLockTimeoutNs);
    std::string name = access->Info().name;
    if (pools_.find(name) == pools_.end()) pools_.emplace(std::move(name), std::move(access));
  }
  WipeSecrets();
  for (const PoolConfigEntry& p : DesiredPools()) {
    auto& table = secrets_[p.name];
    for (const KeySpec& k : p.keys) table[k.name] = k.secret;
  }
}

shm::PoolAdmin* PoolRegistry::Find(std::string_view name) const {
  auto it = pools_.find(name);
  return it == pools_.end() ? nullptr : it->second.get();
}

Result<shm::PoolAdmin*> PoolRegistry::Get(std::string_view name) const {
  shm::PoolAdmin* pool = Find(name);
  if (pool == nullptr) return UnknownPool(name);
  return pool;
}

std::vector<std::string> PoolRegistry::Names() const {
  std::vector<std::string> out;
  for (const PoolConfigEntry& p : configured_) out.push_back(p.name);
  return out;
}

std::vector<shm::PoolAdmin*> PoolRegistry::All() const {
  std::vector<shm::PoolAdmin*> out;
  for (const auto& [name, pool] : pools_) out.push_back(pool.get());
  return out;
}

const std::map<std::string, std::string>* PoolRegistry::Secrets(std::string_view pool) const {
  auto it = secrets_.find(pool);
  return it == secrets_.end() ? nullptr : &it->second;
}

std::string PoolRegistry::Masked(std::string_view pool, std::string_view key) const {
  const std::map<std::string, std::string>* s = Secrets(pool);
  if (s == nullptr) return "";
  auto it = s->find(std::string(key));
  return it == s->end() ? std::string() : MaskSecret(it->second);
}

size_t PoolRegistry::key_count() const {
  size_t keys = 0;
  for (const auto& [pool, s] : secrets_) keys += s.size();
  return keys;
}

Status PoolRegistry::AddKey(std::string_view pool, const KeySpec& key) {
  bool configured = false;
  for (const PoolConfigEntry& p : configured_) configured = configured || p.name == pool;
  if (!configured || Find(pool) == nullptr) return UnknownPool(pool);
  auto& runtime = runtime_keys_[std::string(pool)];
  const auto previous = runtime.find(key.name);
  std::optional<KeySpec> saved;
  if (previous != runtime.end()) saved = previous->second;
  runtime[key.name] = key;
  Status st = ReconcileSegment(segment_, DesiredPools());
  if (!st.ok()) {
    if (saved) {
      runtime[key.name] = *saved;
    } else {
      runtime.erase(key.name);
    }
    return st;
  }
  Rebuild();
  return Status::Ok();
}

Status PoolRegistry::RemoveKey(std::string_view pool, std::string_view name) {
  shm::PoolAdmin* access = Find(pool);
  if (access == nullptr) return UnknownPool(pool);
  Status st = access->RemoveKey(name);
  if (!st.ok()) return st;
  segment_.BumpGeneration();
  auto rk = runtime_keys_.find(pool);
  if (rk != runtime_keys_.end()) rk->second.erase(std::string(name));
  for (PoolConfigEntry& p : configured_) {
    if (p.name != pool) continue;
    std::erase_if(p.keys, [&](const KeySpec& k) { return k.name == name; });
  }
  Rebuild();
  Log(LogLevel::kInfo, "key_removed", {{"pool", std::string(pool)}, {"key", std::string(name)}});
  return Status::Ok();
}

Result<PoolStatus> PoolRegistry::Snapshot(std::string_view pool) const {
  Result<shm::PoolAdmin*> access = Get(pool);
  if (!access.ok()) return access.status();
  return (*access)->Snapshot();
}

void PoolRegistry::NoteBusy(std::string_view pool, const Status& status) const {
  constexpr uint64_t kEvery = 10 * shm::kNanosPerSecond;
  const uint64_t now = shm::MonotonicNowNanos();
  auto it = busy_logged_at_.find(pool);
  if (it != busy_logged_at_.end() && now - it->second < kEvery) return;
  busy_logged_at_[std::string(pool)] = now;
  Log(LogLevel::kWarn, "pool_busy", {{"pool", std::string(pool)}, {"error", status.message()}});
}

Result<std::vector<PoolStatus>> PoolRegistry::SnapshotAll(std::vector<Status>* busy) const {
  std::vector<PoolStatus> out;
  for (const std::string& name : Names()) {
    shm::PoolAdmin* access = Find(name);
    if (access == nullptr) continue;
    Result<PoolStatus> snap = access->Snapshot();
    if (!snap.ok() && snap.status().code() == Code::kBusy) {
      NoteBusy(name, snap.status());
      if (busy != nullptr) busy->push_back(snap.status());
      continue;
    }
    if (!snap.ok()) return snap.status();
    out.push_back(std::move(snap).value());
  }
  return out;
}

}  // namespace keymesh::broker
