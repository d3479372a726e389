// What the broker remembers about keys beyond its config file, so that
// run-time key changes last (KM-14):
//
//   runtime keys  added with add_key. Kept across a SIGHUP reload; kept
//                 across a restart too when the broker can read the secret
//                 again by itself (from its own environment variable or a
//                 file: the state file records that source, never the
//                 secret). A key sent with its secret inline is ephemeral.
//   tombstones    keys removed with remove_key, by pool, name and the
//                 fingerprint of the secret they had. A config that still
//                 names such a key with the same secret does not bring it
//                 back (on reload or restart); a new secret, or an explicit
//                 add_key, ends the tombstone.
//
// Plain data plus the rules above; the PoolRegistry owns one and the state
// file persists it (StateImage::runtime_keys, ::tombstones). Not
// thread-safe: the broker's io thread only.
#ifndef KEYMESH_BROKER_KEY_LEDGER_H_
#define KEYMESH_BROKER_KEY_LEDGER_H_

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "broker/config.h"
#include "broker/persistence.h"
#include "keymesh/types.h"

namespace keymesh::broker {

// Where a runtime key's secret comes from (at most one; neither: inline,
// the key is ephemeral).
struct SecretSource {
  std::string env;   // an environment variable of the broker
  std::string file;  // an absolute path the broker can read
  bool durable() const noexcept { return !env.empty() || !file.empty(); }
};

class KeyLedger {
 public:
  using Fingerprinter = std::function<uint64_t(std::string_view secret)>;

  // Adds or replaces a runtime key of `pool` and ends a tombstone of its
  // name (the operator re-added it explicitly).
  void Add(const std::string& pool, const KeySpec& key, const SecretSource& source);
  // Undoes Add() of a key that did not exist before (a failed add).
  void Forget(const std::string& pool, const std::string& name);
  // Records the removal of `name` (whose secret had `fingerprint`): its
  // runtime entry goes, a tombstone stays.
  void Remove(const std::string& pool, const std::string& name, uint64_t fingerprint);

  // `configured` with tombstoned keys left out and the runtime keys added
  // (a config key wins over a runtime key of the same name). A config key
  // whose secret changed since it was removed ends its tombstone; the
  // names left out are appended to *dropped (pool/name) when given.
  std::vector<PoolConfigEntry> Apply(const std::vector<PoolConfigEntry>& configured, const Fingerprinter& fingerprint,
                                     std::vector<std::string>* dropped = nullptr);

  // Writes the durable runtime keys and the tombstones into `image`.
  void SaveTo(StateImage* image) const;
  // Reads them back: a runtime key whose secret cannot be read again (the
  // variable is unset, the file unreadable) is left out with a warning.
  void LoadFrom(const StateImage& image, const EnvLookup& env);

  bool Tombstoned(const std::string& pool, const std::string& name) const;

 private:
  struct RuntimeKey {
    KeySpec spec;
    SecretSource source;
  };
  std::map<std::string, std::map<std::string, RuntimeKey>, std::less<>> runtime_;
  std::map<std::string, std::map<std::string, uint64_t>, std::less<>> tombstones_;
};

}  // namespace keymesh::broker

#endif  // KEYMESH_BROKER_KEY_LEDGER_H_
