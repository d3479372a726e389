// The segment's form of a pool's and a key's options: strategy, durations in
// nanoseconds, margins in millionths. One conversion, shared by every creator
// of pools (embedded pools, the broker) and by its reconfiguration.
#ifndef KEYMESH_SHM_POOL_CONFIG_H_
#define KEYMESH_SHM_POOL_CONFIG_H_

#include <cstdint>

#include "keymesh/types.h"
#include "shm/layout.h"

namespace keymesh::shm {

// `options` must have passed ValidatePoolOptions().
PoolConfig ToPoolConfig(const PoolOptions& options) noexcept;
// True when two pool configs hold the same options (reserved fields aside).
bool SamePoolConfig(const PoolConfig& a, const PoolConfig& b) noexcept;
// A key's rate margin in millionths; negative means "the pool's" (kPoolMargin).
uint32_t KeyMarginPpm(double rate_margin) noexcept;
// The margin that applies to a key: its own, or the pool's.
inline uint32_t EffectiveMarginPpm(const KeyConfig& key, const PoolConfig& pool) noexcept {
  return key.margin_ppm == kPoolMargin ? pool.margin_ppm : key.margin_ppm;
}

}  // namespace keymesh::shm

#endif  // KEYMESH_SHM_POOL_CONFIG_H_
