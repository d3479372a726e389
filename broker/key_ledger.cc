#include "broker/key_ledger.h"

#include "broker/log.h"
#include "common/text.h"

namespace keymesh::broker {

void KeyLedger::Add(const std::string& pool, const KeySpec& key, const SecretSource& source) {
  runtime_[pool][key.name] = RuntimeKey{key, source};
  if (auto t = tombstones_.find(pool); t != tombstones_.end()) {
    t->second.erase(key.name);
    if (t->second.empty()) tombstones_.erase(t);
  }
}

void KeyLedger::Forget(const std::string& pool, const std::string& name) {
  if (auto r = runtime_.find(pool); r != runtime_.end()) r->second.erase(name);
}

void KeyLedger::Remove(const std::string& pool, const std::string& name, uint64_t fingerprint) {
  Forget(pool, name);
  tombstones_[pool][name] = fingerprint;
}

bool KeyLedger::Tombstoned(const std::string& pool, const std::string& name) const {
  auto t = tombstones_.find(pool);
  return t != tombstones_.end() && t->second.count(name) != 0;
}

std::vector<PoolConfigEntry> KeyLedger::Apply(const std::vector<PoolConfigEntry>& configured,
                                              const Fingerprinter& fingerprint, std::vector<std::string>* dropped) {
  std::vector<PoolConfigEntry> pools = configured;
  for (PoolConfigEntry& p : pools) {
    if (auto t = tombstones_.find(p.name); t != tombstones_.end()) {
      std::erase_if(p.keys, [&](const KeySpec& k) {
        auto dead = t->second.find(k.name);
        if (dead == t->second.end()) return false;
        if (dead->second != fingerprint(k.secret)) {
          t->second.erase(dead);  // a new secret under the old name: a new key
          return false;
        }
        if (dropped != nullptr) dropped->push_back(p.name + "/" + k.name);
        return true;
      });
      if (t->second.empty()) tombstones_.erase(t);
    }
    auto r = runtime_.find(p.name);
    if (r == runtime_.end()) continue;
    for (const auto& [name, key] : r->second) {
      bool in_config = false;
      for (const KeySpec& k : p.keys) in_config = in_config || k.name == name;
      if (!in_config) p.keys.push_back(key.spec);
    }
  }
  return pools;
}

void KeyLedger::SaveTo(StateImage* image) const {
  for (const auto& [pool, keys] : runtime_) {
    for (const auto& [name, key] : keys) {
      if (!key.source.durable()) continue;
      PersistedRuntimeKey k;
      k.limits = key.spec;
      k.limits.secret.clear();
      k.secret_env = key.source.env;
      k.secret_file = key.source.file;
      image->runtime_keys[pool].push_back(std::move(k));
    }
  }
  for (const auto& [pool, keys] : tombstones_) {
    for (const auto& [name, fingerprint] : keys) image->tombstones[pool][name] = fingerprint;
  }
}

void KeyLedger::LoadFrom(const StateImage& image, const EnvLookup& env) {
  for (const auto& [pool, keys] : image.tombstones) {
    for (const auto& [name, fingerprint] : keys) tombstones_[pool][name] = fingerprint;
  }
  for (const auto& [pool, keys] : image.runtime_keys) {
    for (const PersistedRuntimeKey& k : keys) {
      RuntimeKey key{k.limits, SecretSource{k.secret_env, k.secret_file}};
      Status st;
      if (!k.secret_env.empty()) {
        std::optional<std::string> value = env(k.secret_env);
        if (value) {
          key.spec.secret = *value;
        } else {
          st = Status(Code::kInvalidArgument, "environment variable " + Escaped(k.secret_env) + " is not set");
        }
      } else {
        Result<std::string> value = ReadSecretFile(k.secret_file, "secret_file");
        if (value.ok()) {
          key.spec.secret = *value;
        } else {
          st = value.status();
        }
      }
      if (st.ok()) st = ValidateSecret(key.spec.secret);
      if (!st.ok()) {
        Log(LogLevel::kWarn, "runtime_key_not_restored",
            {{"pool", pool}, {"key", k.limits.name}, {"error", st.message()}});
        continue;
      }
      runtime_[pool][k.limits.name] = std::move(key);
    }
  }
}

}  // namespace keymesh::broker
