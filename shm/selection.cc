#include "shm/selection.h"

#include <cstring>
#include <string_view>
#include <utility>

namespace keymesh::shm {

KeyView PoolSelection::View(uint32_t slot) const {
  const KeySlot& k = core_->key(slot);
  return KeyView{slot,
                 std::string_view(k.name, strnlen(k.name, kNameCapacity)),
                 k.state.in_flight,
                 k.config.max_concurrency,
                 k.config.weight,
                 k.state.last_used_seq,
                 k.state.successes,
                 k.state.failures,
                 k.state.ema_latency};
}

void PoolSelection::ForEachEligible(const std::function<bool(const KeyView&)>& fn) const {
  core_->index().ForEach(core_->header()->slot_high_water, [&](uint32_t slot) { return fn(View(slot)); });
}

std::optional<uint32_t> PoolSelection::NextEligibleFrom(uint32_t slot) const noexcept {
  return core_->index().NextFrom(slot, core_->header()->slot_high_water);
}

template <typename KeyFn>
std::optional<uint32_t> PoolSelection::ScanMin(KeyFn key) const noexcept {
  std::optional<uint32_t> best;
  std::pair<uint64_t, uint64_t> best_key{};
  core_->index().ForEach(core_->header()->slot_high_water, [&](uint32_t slot) {
    auto k = key(core_->key(slot).state);
    if (!best || k < best_key) {
      best = slot;
      best_key = k;
    }
    return true;
  });
  return best;
}

std::optional<uint32_t> PoolSelection::LeastBusy() const noexcept {
  if (core_->header()->index_strategy == static_cast<uint32_t>(Strategy::kLeastBusy)) return core_->index().Top();
  return ScanMin([](const SlotState& s) { return std::pair<uint64_t, uint64_t>(s.in_flight, s.last_used_seq); });
}

std::optional<uint32_t> PoolSelection::LowestPass() const noexcept {
  if (core_->header()->index_strategy == static_cast<uint32_t>(Strategy::kWeighted)) return core_->index().Top();
  return ScanMin([](const SlotState& s) { return std::pair<uint64_t, uint64_t>(s.pass, 0); });
}

namespace {

class RoundRobin final : public Selector {
 public:
  std::optional<uint32_t> Select(const SelectionContext& ctx) const override {
    return ctx.NextEligibleFrom(ctx.round_robin_cursor());
  }
};
class LeastBusy final : public Selector {
 public:
  std::optional<uint32_t> Select(const SelectionContext& ctx) const override { return ctx.LeastBusy(); }
};
class Weighted final : public Selector {
 public:
  std::optional<uint32_t> Select(const SelectionContext& ctx) const override { return ctx.LowestPass(); }
};

}  // namespace

const Selector& BuiltinSelector(uint32_t strategy) noexcept {
  switch (static_cast<Strategy>(strategy)) {
    case Strategy::kRoundRobin: return RoundRobinSelector();
    case Strategy::kWeighted: return WeightedSelector();
    case Strategy::kLeastBusy: break;
  }
  return LeastBusySelector();
}

}  // namespace keymesh::shm

namespace keymesh {

const Selector& RoundRobinSelector() noexcept {
  static const shm::RoundRobin s;
  return s;
}
const Selector& LeastBusySelector() noexcept {
  static const shm::LeastBusy s;
  return s;
}
const Selector& WeightedSelector() noexcept {
  static const shm::Weighted s;
  return s;
}

}  // namespace keymesh
