// The leases one process holds through the by-secret calls of the C ABI
// (km_pool_acquire_key and km_pool_*_key), the original Python API's model:
// acquire() hands out the key string and release(key) ends "a" lease of it.
// Each lease gets a ticket (never 0) so a binding can name the exact one;
// ticket 0 means the oldest held for that secret.
#ifndef KEYMESH_CLIENT_C_API_HELD_LEASES_H_
#define KEYMESH_CLIENT_C_API_HELD_LEASES_H_

#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>

#include "keymesh/pool.h"

namespace keymesh::c_api {

// Thread safety: every method may be called from any number of threads.
class HeldLeases {
 public:
  HeldLeases() = default;
  HeldLeases(const HeldLeases&) = delete;
  HeldLeases& operator=(const HeldLeases&) = delete;

  // Keeps `lease` (active) and returns its ticket.
  uint64_t Add(Lease lease);
  // Removes and returns the lease of `secret` with `ticket` (0: the oldest
  // held for `secret`), or nullopt when none is held.
  std::optional<Lease> Take(std::string_view secret, uint64_t ticket);
  // Leases held for `secret`, or in all when `secret` is null.
  uint32_t Count(const char* secret);
  // Cancels every held lease (no outcome counted).
  void CancelAll();

 private:
  // Lets by_secret_ be searched with a string_view (no copy of the secret).
  struct SecretHash {
    using is_transparent = void;
    size_t operator()(std::string_view s) const noexcept { return std::hash<std::string_view>{}(s); }
  };

  std::mutex mu_;
  uint64_t next_ticket_ = 1;                       // guarded by mu_
  std::unordered_map<uint64_t, Lease> by_ticket_;  // guarded by mu_
  std::unordered_map<std::string, std::deque<uint64_t>, SecretHash, std::equal_to<>>
      by_secret_;  // guarded by mu_; tickets oldest first
};

}  // namespace keymesh::c_api

#endif  // KEYMESH_CLIENT_C_API_HELD_LEASES_H_
