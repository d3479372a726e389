// A Redis-backed key pool, the usual alternative to KeyMesh, for the
// benchmark only: a Lua script picks the least-busy key and increments its
// in-flight count atomically, another decrements it. Speaks RESP over one
// loopback TCP connection (no client library needed).
#ifndef KEYMESH_TESTS_BENCH_REDIS_POOL_H_
#define KEYMESH_TESTS_BENCH_REDIS_POOL_H_

#include <memory>
#include <string>
#include <vector>

#include "keymesh/status.h"

namespace keymesh::bench {

class RedisPool {
 public:
  ~RedisPool();
  // Connects to 127.0.0.1:port, loads the scripts; `keys` are created with
  // in-flight 0 under the hash `hash` when `init` is true.
  static Result<std::unique_ptr<RedisPool>> Connect(int port, const std::string& hash,
                                                    const std::vector<std::string>& keys, bool init);
  // Returns the chosen key name.
  Result<std::string> Acquire();
  Status Release(const std::string& key);

 private:
  RedisPool() = default;
  Result<std::string> Command(const std::vector<std::string>& args);

  int fd_ = -1;
  std::string hash_;
  std::string acquire_sha_;
  std::string release_sha_;
  std::string buf_;
};

}  // namespace keymesh::bench

#endif  // KEYMESH_TESTS_BENCH_REDIS_POOL_H_
