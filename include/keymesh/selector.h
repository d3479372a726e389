// Pluggable key selection.
//
// A Selector is a stateless function over a read-only view of the eligible
// keys of one pool. It is called with the pool's process-shared lock held, so
// it must be quick, must not block, must not throw and must not call back into
// the pool. It returns the slot of one eligible key, or nullopt to decline.
// The pool then does every mutation (in-flight, cursor, pass, LRU order).
//
// The three built-ins (RoundRobinSelector, LeastBusySelector,
// WeightedSelector) use the pool's sub-linear index through this same
// interface; a custom selector may iterate the eligible keys:
//
//   class FewestFailures final : public keymesh::Selector {
//    public:
//     std::optional<uint32_t> Select(const keymesh::SelectionContext& ctx) const override {
//       std::optional<uint32_t> best;
//       uint64_t best_failures = UINT64_MAX;
//       ctx.ForEachEligible([&](const keymesh::KeyView& k) {
//         if (k.failures < best_failures) { best = k.slot; best_failures = k.failures; }
//         return true;  // keep going
//       });
//       return best;
//     }
//   };
//   pool->SetSelector(std::make_shared<FewestFailures>());
//
// A custom selector is per process: every process that uses the pool should
// install the same one.
#ifndef KEYMESH_SELECTOR_H_
#define KEYMESH_SELECTOR_H_

#include <cstdint>
#include <functional>
#include <optional>
#include <string_view>

#include "keymesh/export.h"

namespace keymesh {

// A read-only view of one eligible key, valid only during Select().
struct KeyView {
  uint32_t slot;
  std::string_view name;
  uint32_t in_flight;
  uint32_t max_concurrency;  // 0: unlimited
  uint32_t weight;
  uint64_t last_used_seq;  // higher = acquired more recently; 0 = never
  uint64_t successes;
  uint64_t failures;
  double latency_avg;  // seconds
};

class SelectionContext {
 public:
  virtual ~SelectionContext() = default;
  virtual uint32_t eligible_count() const noexcept = 0;
  // Calls fn for each eligible key in slot order until fn returns false.
  virtual void ForEachEligible(const std::function<bool(const KeyView&)>& fn) const = 0;
  // The first eligible slot at or after `slot`, wrapping around; nullopt if none.
  virtual std::optional<uint32_t> NextEligibleFrom(uint32_t slot) const noexcept = 0;
  // The pool's round-robin cursor (next slot in rotation).
  virtual uint32_t round_robin_cursor() const noexcept = 0;
  // Fewest in-flight, then least recently used, then lowest slot. O(1) when
  // the pool's strategy is least_busy, a scan otherwise.
  virtual std::optional<uint32_t> LeastBusy() const noexcept = 0;
  // Smallest stride-scheduling pass (weight x health), then lowest slot. O(1)
  // when the pool's strategy is weighted, a scan otherwise.
  virtual std::optional<uint32_t> LowestPass() const noexcept = 0;
};

class Selector {
 public:
  virtual ~Selector() = default;
  virtual std::optional<uint32_t> Select(const SelectionContext& ctx) const = 0;
};

// Singletons, stateless, usable from any thread.
KEYMESH_EXPORT const Selector& RoundRobinSelector() noexcept;
KEYMESH_EXPORT const Selector& LeastBusySelector() noexcept;
KEYMESH_EXPORT const Selector& WeightedSelector() noexcept;

}  // namespace keymesh

#endif  // KEYMESH_SELECTOR_H_
