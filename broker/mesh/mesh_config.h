// The `mesh` object of the broker's config (CONTRACT.md "Across hosts"):
// where Redis is, this host's name in the mesh, the refresh and lease
// cadence, and what a host does when its lease expired with Redis
// unreachable.
#ifndef KEYMESH_BROKER_MESH_MESH_CONFIG_H_
#define KEYMESH_BROKER_MESH_MESH_CONFIG_H_

#include <cstdint>
#include <string>
#include <string_view>

#include "keymesh/status.h"

namespace keymesh::broker::mesh {

// redis://HOST:PORT[/DB] or unix:///PATH[?db=N].
struct RedisEndpoint {
  std::string host;  // TCP host (name or address); empty for a Unix socket
  uint16_t port = 6379;
  std::string unix_path;  // absolute; empty for TCP
  uint32_t db = 0;
  // "127.0.0.1:6379" or "unix:/run/redis.sock", for messages (no password).
  std::string Describe() const;
};
// kInvalidArgument with a one-line message naming the problem.
Result<RedisEndpoint> ParseRedisUrl(std::string_view url);

enum class OutageMode : uint8_t {
  kShare = 0,   // 1/N of each key's rate, N the hosts last seen (default)
  kClosed = 1,  // grants nothing new
  kOpen = 2,    // the key's full configured rate (opt-in: may overspend)
};
const char* OutageModeName(OutageMode mode) noexcept;

struct MeshConfig {
  RedisEndpoint redis;
  std::string redis_url;           // as configured (no password in it)
  std::string redis_password_env;  // empty: no AUTH
  std::string password;            // resolved from redis_password_env; never logged
  std::string host;                // this broker's name in the mesh (default: the host name)
  std::string ns = "keymesh";      // prefix of every Redis key
  double refresh = 1.0;            // seconds between lease refreshes
  double lease = 30.0;             // seconds a grant stays valid without a refresh
  OutageMode outage = OutageMode::kShare;
  double headroom = 0.02;  // share of each limit never granted
  double timeout = 0.1;    // seconds: connect and command timeout
};

}  // namespace keymesh::broker::mesh

#endif  // KEYMESH_BROKER_MESH_MESH_CONFIG_H_
