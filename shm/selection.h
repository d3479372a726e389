// Choosing a key: the SelectionContext a Selector sees (keymesh/selector.h),
// answered from the pool's eligibility index, and the three built-in
// selectors.
#ifndef KEYMESH_SHM_SELECTION_H_
#define KEYMESH_SHM_SELECTION_H_

#include <cstdint>
#include <functional>
#include <optional>

#include "keymesh/selector.h"
#include "shm/pool_core.h"

namespace keymesh::shm {

// Valid while the pool's Guard is held. Answers from the index when it is
// ordered for the question, by scanning eligible slots otherwise.
class PoolSelection final : public SelectionContext {
 public:
  explicit PoolSelection(const PoolCore* core) noexcept : core_(core) {}

  uint32_t eligible_count() const noexcept override { return core_->index().eligible_count(); }
  void ForEachEligible(const std::function<bool(const KeyView&)>& fn) const override;
  std::optional<uint32_t> NextEligibleFrom(uint32_t slot) const noexcept override;
  uint32_t round_robin_cursor() const noexcept override { return core_->header()->rr_cursor; }
  std::optional<uint32_t> LeastBusy() const noexcept override;
  std::optional<uint32_t> LowestPass() const noexcept override;

 private:
  KeyView View(uint32_t slot) const;
  template <typename KeyFn>
  std::optional<uint32_t> ScanMin(KeyFn key) const noexcept;

  const PoolCore* core_;
};

// The selector of a pool strategy (keymesh::Strategy as stored).
const Selector& BuiltinSelector(uint32_t strategy) noexcept;
// What BuiltinSelector(index_strategy) would choose, straight from the index
// (no virtual calls): the fast path when no custom selector is set.
std::optional<uint32_t> SelectBuiltin(const PoolCore& core) noexcept;

}  // namespace keymesh::shm

#endif  // KEYMESH_SHM_SELECTION_H_
