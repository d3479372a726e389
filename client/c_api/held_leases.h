// The leases one process holds through the by-secret calls of the C ABI
// (km_pool_acquire_key and km_pool_*_key), the original Python API's model:
// acquire() hands out the key string and release(key) ends "a" lease of it.
// Each lease gets a ticket (never 0) so a binding can name the exact one;
// ticket 0 means the oldest held for that secret.
#ifndef KEYMESH_CLIENT_C_API_HELD_LEASES_H_
#define KEYMESH_CLIENT_C_API_HELD_LEASES_H_

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <optional>
#include <string_view>
#include <vector>

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
  // One lease, or a hole left by Take() until the next compaction.
  struct Entry {
    uint64_t ticket;
    Lease lease;  // inactive: a hole
  };
  // The entry of `ticket` (tickets only grow, so entries_ is sorted by
  // ticket, holes included), or entries_.end().
  std::vector<Entry>::iterator Find(uint64_t ticket);
  // Drops the holes once they outnumber the leases (amortised O(1) a Take).
  void Compact();

  // A vector rather than maps: a pair of calls allocates nothing once the
  // vector has grown, which matters on the Python binding's fast path
  // (acquire+release is ~100 ns in C++; two map nodes, a deque block and a
  // copy of the secret cost several times that).
  std::mutex mu_;
  uint64_t next_ticket_ = 1;    // guarded by mu_
  std::vector<Entry> entries_;  // guarded by mu_; oldest first
  std::size_t live_ = 0;        // guarded by mu_; entries_ that are leases
};

}  // namespace keymesh::c_api

#endif  // KEYMESH_CLIENT_C_API_HELD_LEASES_H_
