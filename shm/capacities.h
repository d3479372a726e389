// Every fixed capacity of the shared segment, in one place.
//
// The segment is laid out once, at creation, from a Capacities value; workers
// never allocate in it afterwards (a worker killed inside an allocator would
// leave it unusable; see ARCHITECTURE.md invariant 3). Exceeding a capacity is
// a clear kCapacityExceeded error, never a silent overwrite.
#ifndef KEYMESH_SHM_CAPACITIES_H_
#define KEYMESH_SHM_CAPACITIES_H_

#include <cstdint>

namespace keymesh::shm {

// Bytes of a pool or key name including the terminating NUL.
inline constexpr uint32_t kNameCapacity = 64;

// Hard upper bounds: they keep every index inside 32 bits and the segment
// within a size tmpfs can hold.
inline constexpr uint32_t kMaxPoolsLimit = 4096;
inline constexpr uint32_t kMaxKeysPerPoolLimit = 65536;
inline constexpr uint32_t kMaxLeasesPerPoolLimit = 1u << 20;

struct Capacities {
  uint32_t max_pools = 64;
  uint32_t keys_per_pool = 1024;
  uint32_t leases_per_pool = 4096;
};

}  // namespace keymesh::shm

#endif  // KEYMESH_SHM_CAPACITIES_H_
