#include "shm/selection.h"

#include <cstring>
#include <string_view>

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
  core_->index().ForEach(core_->HighWater(), [&](uint32_t slot) { return fn(View(slot)); });
}

std::optional<uint32_t> PoolSelection::NextEligibleFrom(uint32_t slot) const noexcept {
  return core_->index().NextFrom(slot, core_->HighWater());
}

template <typename KeyFn>
std::optional<uint32_t> PoolSelection::ScanMin(KeyFn key) const noexcept {
  std::optional<uint32_t> best;
  SortKey best_key{};
  core_->index().ForEach(core_->HighWater(), [&](uint32_t slot) {
    const SortKey k = key(core_->key(slot).state);
    const int64_t d = static_cast<int64_t>(k.k1 - best_key.k1);  // serial order, as the index's
    if (!best || d < 0 || (d == 0 && k.k2 < best_key.k2)) {
      best = slot;
      best_key = k;
    }
    return true;
  });
  return best;
}

std::optional<uint32_t> PoolSelection::LeastBusy() const noexcept {
  if (core_->header()->index_strategy == static_cast<uint32_t>(Strategy::kLeastBusy)) return core_->index().Min();
  return ScanMin([](const SlotState& s) { return SortKey{s.in_flight, s.last_used_seq}; });
}

std::optional<uint32_t> PoolSelection::LowestPass() const noexcept {
  if (core_->header()->index_strategy == static_cast<uint32_t>(Strategy::kWeighted)) return core_->index().Min();
  return ScanMin([](const SlotState& s) { return SortKey{s.pass, 0}; });
}

std::optional<uint32_t> SelectBuiltin(const PoolCore& core) noexcept {
  const PoolHeader* ph = core.header();
  if (ph->index_strategy == static_cast<uint32_t>(Strategy::kRoundRobin)) {
    return core.index().NextFrom(ph->rr_cursor, core.HighWater());
  }
  return core.index().Min();  // least_busy and weighted: the index's order is the strategy
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

// Constant-initialised (no guard on access): stateless objects with a vtable.
constinit const RoundRobin kRoundRobin;
constinit const LeastBusy kLeastBusy;
constinit const Weighted kWeighted;

}  // namespace

const Selector& BuiltinSelector(uint32_t strategy) noexcept {
  switch (static_cast<Strategy>(strategy)) {
    case Strategy::kRoundRobin: return kRoundRobin;
    case Strategy::kWeighted: return kWeighted;
    case Strategy::kLeastBusy: break;
  }
  return kLeastBusy;
}

}  // namespace keymesh::shm

namespace keymesh {

const Selector& RoundRobinSelector() noexcept { return shm::kRoundRobin; }
const Selector& LeastBusySelector() noexcept { return shm::kLeastBusy; }
const Selector& WeightedSelector() noexcept { return shm::kWeighted; }

}  // namespace keymesh
