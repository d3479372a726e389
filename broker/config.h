// The broker's configuration file (CONTRACT.md "Config"), parsed and
// validated completely before anything starts.
//
// Extensions beyond CONTRACT.md: per pool `max_lease_seconds` (default 600),
// `max_cooldown` (default 600; also the cap of every honoured Retry-After)
// and `max_leases_per_process` (default half of leases_per_pool); top-level optional
// `"capacity": {"max_pools", "keys_per_pool", "leases_per_pool"}`,
// `"log_level"` (debug|info|warn|error; --log-level wins), `"metrics_file"`
// (a path the broker rewrites atomically with the Prometheus exposition,
// for node_exporter's textfile collector) and `"metrics_interval"` (seconds
// between writes, default 10, at least 0.1). Access (dispatch.h's roles):
// `worker_uids`/`worker_gids` (may hello, acquire and end their own leases,
// read status and metrics; each defaults to its allow_* list),
// `admin_uids`/`admin_gids` (may change keys and reclaim; default empty);
// `allow_uids`/`allow_gids` keep meaning "may read secrets". Limits of the
// socket (KM-09): `max_sessions` (1024), `max_sessions_per_uid` (256),
// `max_pending_acquires` (waiting acquires per connection, 64),
// `max_slow_leases` (leases held over one connection, 256) and
// `frame_timeout` (seconds from a frame's first byte to its newline,
// default 5). `mesh` (CONTRACT.md "Across hosts"): `redis` (required),
// `redis_password_env`, `host`, `namespace`, `refresh` (0.05-60 s),
// `lease` (at least twice refresh, up to 3600 s), `outage` (share, closed,
// open), and two extensions: `headroom` (0-0.5, default 0.03: the share of
// every limit never granted) and `timeout` (Redis connect and command
// timeout, 0.005-5 s, at most half of refresh; default 0.1). The mesh
// changes only on restart. Unknown
// fields are errors. Every error is one line naming the field:
//   config: pools.openai.keys[1].secret_env: environment variable OPENAI_KEY_B is not set
// Secrets never appear in messages.
#ifndef KEYMESH_BROKER_CONFIG_H_
#define KEYMESH_BROKER_CONFIG_H_

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "broker/log.h"
#include "broker/mesh/mesh_config.h"
#include "keymesh/status.h"
#include "keymesh/types.h"
#include "shm/capacities.h"

namespace keymesh::broker {

// (The default socket is protocol::kDefaultSocket, the clients' default.)
inline constexpr const char* kDefaultStateFile = "/var/lib/keymesh/state.json";

struct PoolConfigEntry {
  std::string name;
  PoolOptions options;
  std::vector<KeySpec> keys;  // secrets resolved (inline, env or file)
};

struct BrokerConfig {
  std::string socket;                // absolute
  std::string state_file;            // absolute
  std::vector<uint32_t> allow_uids;  // secret readers
  std::vector<uint32_t> allow_gids;
  std::vector<uint32_t> worker_uids;  // absent in the file: allow_uids
  std::vector<uint32_t> worker_gids;  // absent in the file: allow_gids
  std::vector<uint32_t> admin_uids;
  std::vector<uint32_t> admin_gids;
  uint32_t max_sessions = 1024;
  uint32_t max_sessions_per_uid = 256;
  uint32_t max_pending_acquires = 64;
  uint32_t max_slow_leases = 256;
  double frame_timeout = 5.0;  // seconds
  shm::Capacities capacity;
  std::optional<LogLevel> log_level;     // absent: info (or --log-level)
  std::string metrics_file;              // absolute; empty: no metrics file
  double metrics_interval = 10.0;        // seconds
  std::vector<PoolConfigEntry> pools;    // in file order
  std::optional<mesh::MeshConfig> mesh;  // absent: this host alone (CONTRACT.md "Across hosts")

  const PoolConfigEntry* FindPool(std::string_view name) const;
};

// Returns the value of an environment variable, or nullopt if unset.
using EnvLookup = std::function<std::optional<std::string>(const std::string&)>;

// A secret_file's secret (trailing whitespace and newlines cut); the error
// names `field`. Used by the config and by the runtime keys the broker
// re-reads at start (key_ledger.h).
Result<std::string> ReadSecretFile(const std::string& path, const std::string& field);

// Parses config text. Relative paths (socket, state_file, secret_file) are
// taken relative to `base_dir`. kInvalidArgument with a one-line message.
Result<BrokerConfig> ParseConfig(std::string_view text, const std::string& base_dir, const EnvLookup& env);

// Reads and parses the file at `path` with the process environment.
Result<BrokerConfig> LoadConfig(const std::string& path);

}  // namespace keymesh::broker

#endif  // KEYMESH_BROKER_CONFIG_H_
