#include "shm/pool_config.h"

#include <cmath>

#include "shm/clock.h"

namespace keymesh::shm {

PoolConfig ToPoolConfig(const PoolOptions& o) noexcept {
  PoolConfig c{};
  c.strategy = static_cast<uint32_t>(o.strategy);
  c.max_failures = o.max_failures;
  c.default_cooldown = SecondsToNanos(o.default_cooldown);
  c.acquire_timeout = SecondsToNanos(o.acquire_timeout);
  c.max_lease = SecondsToNanos(o.max_lease_seconds);
  c.max_cooldown = SecondsToNanos(o.max_cooldown);
  c.margin_ppm = static_cast<uint32_t>(std::lround(o.rate_margin * 1e6));
  c.max_leases_per_process = o.max_leases_per_process;
  return c;
}

bool SamePoolConfig(const PoolConfig& a, const PoolConfig& b) noexcept {
  return a.strategy == b.strategy && a.max_failures == b.max_failures && a.default_cooldown == b.default_cooldown &&
         a.acquire_timeout == b.acquire_timeout && a.max_lease == b.max_lease && a.max_cooldown == b.max_cooldown &&
         a.margin_ppm == b.margin_ppm && a.max_leases_per_process == b.max_leases_per_process;
}

uint32_t KeyMarginPpm(double rate_margin) noexcept {
  return rate_margin < 0 ? kPoolMargin : static_cast<uint32_t>(std::lround(rate_margin * 1e6));
}

}  // namespace keymesh::shm
