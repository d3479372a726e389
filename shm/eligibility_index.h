// The index of a pool's eligible keys: a bitset over slots (round robin,
// iteration) and, for least_busy and weighted, a tournament tree over each
// eligible slot's sort key (SortKey: (in_flight, last_used_seq) or (pass,
// 0)), ordered by (k1, k2, slot).
//
// The tree has `leaves` = the power of two at or above the pool's slot high
// water (so a pool of 100 keys has a tree of height 7, whatever its
// capacity); internal node n (1 <= n < leaves) holds the winning slot of its
// two children (2n, 2n+1; a child >= leaves is the slot child - leaves,
// present when eligible). The minimum is tree[1], found in O(1); a changed
// key is fixed on its path to the root in O(log n), stopping as soon as a
// node's winner is unchanged and is not the changed key. A pool of at most
// kScanLeaves slots (the common handful of keys) keeps no tree: its minimum
// is a scan of the sort keys of its set bits, and a changed key is one
// store, which costs fewer instructions and cache lines than any tree. For
// least_busy the scan keeps one more mask, of the eligible keys with nothing
// in flight: when any exists the minimum is among them, and only their LRU
// stamps (k2) need comparing.
//
// Plain code over arrays that live in the segment (PoolHeader::eligible_count
// and tree_leaves; the pool's order, tree and bits regions): derived data,
// guarded by the pool mutex, rebuilt from the slots by the repair after an
// owner died. No locking, no clock, no segment: unit-tested on its own.
//
// What it reads from those arrays is untrusted (another process may have
// written them): a tree size beyond the arrays, a node naming a slot beyond
// the capacity, set bits beyond it, a scan-mode update of a slot the scan
// does not cover are never used to index; the index notes them as damage()
// (its owner rebuilds it) and answers as if the bad entry were absent.
// Slots passed in are the caller's and must be < capacity.
#ifndef KEYMESH_SHM_ELIGIBILITY_INDEX_H_
#define KEYMESH_SHM_ELIGIBILITY_INDEX_H_

#include <cstdint>
#include <optional>

#include "shm/layout.h"

namespace keymesh::shm {

class EligibilityIndex {
 public:
  // Pools whose slots all lie below this are scanned, not treed.
  static constexpr uint32_t kScanLeaves = 16;

  struct Arrays {
    uint64_t* bits;            // capacity/64 words, rounded up
    SortKey* order;            // capacity
    uint32_t* tree;            // TreeNodes(capacity) (the root is tree[1])
    uint32_t* eligible_count;  // one counter
    uint32_t* tree_leaves;     // one counter: 0 when not ordered
    uint32_t* idle;            // scan mode, least_busy: eligible slots whose k1 (in flight) is 0
  };

  // Tree nodes the arrays must hold for `capacity` slots.
  static uint32_t TreeNodes(uint32_t capacity) noexcept;

  EligibilityIndex() = default;
  // The arrays hold `capacity` slots and must outlive the index.
  EligibilityIndex(const Arrays& arrays, uint32_t capacity) noexcept
      : a_(arrays),
        capacity_(capacity),
        tree_cap_(TreeNodes(capacity)),
        scan_mask_(capacity >= 64 ? ~uint64_t{0} : (uint64_t{1} << capacity) - 1) {}

  // Something read from the arrays was out of range since the last
  // ClearDamage() (or Clear()).
  bool damaged() const noexcept { return damaged_; }
  void ClearDamage() noexcept { damaged_ = false; }

  uint32_t eligible_count() const noexcept { return *a_.eligible_count; }
  bool Contains(uint32_t slot) const noexcept { return (a_.bits[slot >> 6] >> (slot & 63)) & 1; }

  // Empties the index. `ordered`: the strategy orders keys (least_busy,
  // weighted); `high_water`: every slot that will be added is below it
  // (sizes the tree until the next Clear).
  // The calls below take `ordered` as Clear was given it, and `counts`: k1
  // is a count (least_busy's in_flight), so k1 == 0 is the smallest there is.
  void Clear(bool ordered, uint32_t high_water) noexcept;
  // True when a slot below `high_water` would not fit the tree: Clear again.
  bool NeedsRegrow(bool ordered, uint32_t high_water) const noexcept {
    return ordered && (high_water > *a_.tree_leaves || *a_.tree_leaves > tree_cap_);
  }

  // Marks `slot` eligible; `ordered`: with sort key `key`.
  void Add(uint32_t slot, bool ordered, bool counts, SortKey key) noexcept {
    a_.bits[slot >> 6] |= uint64_t{1} << (slot & 63);
    ++*a_.eligible_count;
    if (ordered) Update(slot, counts, key);
  }
  void Remove(uint32_t slot, bool ordered) noexcept {
    a_.bits[slot >> 6] &= ~(uint64_t{1} << (slot & 63));
    --*a_.eligible_count;
    if (!ordered) return;
    if (*a_.tree_leaves > kScanLeaves) {
      Fix(slot);
    } else if (slot < kScanLeaves) [[likely]] {
      *a_.idle &= ~(1u << slot);
    } else {
      damaged_ = true;  // a slot the scan does not cover: the tree size was rewritten
    }
  }
  // The sort key of an eligible slot changed.
  void Update(uint32_t slot, bool counts, SortKey key) noexcept {
    a_.order[slot] = key;
    if (*a_.tree_leaves > kScanLeaves) {
      Fix(slot);
    } else if (slot >= kScanLeaves) [[unlikely]] {
      damaged_ = true;  // as in Remove
    } else if (counts) {
      *a_.idle = key.k1 == 0 ? *a_.idle | (1u << slot) : *a_.idle & ~(1u << slot);
    }
  }
  // The eligible slot with the smallest sort key, if any (ordered only).
  // May name a slot that is not eligible when the arrays were rewritten:
  // callers check Contains().
  std::optional<uint32_t> Min() const noexcept {
    const uint32_t leaves = *a_.tree_leaves;
    if (leaves <= kScanLeaves) return ScanMin();
    const uint32_t w = a_.tree[1];
    if (w == kNone) return std::nullopt;
    if (w >= capacity_ || leaves > tree_cap_) [[unlikely]] {
      damaged_ = true;
      return std::nullopt;
    }
    return w;
  }

  // The first eligible slot at or after `slot` among slots < `high_water`,
  // wrapping around; nullopt if none.
  std::optional<uint32_t> NextFrom(uint32_t slot, uint32_t high_water) const noexcept;
  // Calls fn(slot) for each eligible slot < high_water in slot order until
  // it returns false.
  template <typename Fn>
  void ForEach(uint32_t high_water, Fn&& fn) const {
    if (high_water > capacity_) high_water = capacity_;
    const uint32_t words = (high_water + 63) / 64;
    for (uint32_t w = 0; w < words; ++w) {
      uint64_t bits = a_.bits[w];
      while (bits != 0) {
        const uint32_t slot = w * 64 + static_cast<uint32_t>(__builtin_ctzll(bits));
        bits &= bits - 1;
        if (slot >= high_water) return;  // bits above the high water: none should be set
        if (!fn(slot)) return;
      }
    }
  }

  // For tests: the index agrees with itself (bit count, every tree node the
  // winner of its children).
  bool Valid(bool ordered, bool counts) const noexcept;

  static constexpr uint32_t kNone = UINT32_MAX;

 private:
  // The winner of tree node `n` (a leaf when n >= leaves).
  uint32_t Winner(uint32_t n, uint32_t leaves) const noexcept {
    if (n < leaves) {
      const uint32_t w = a_.tree[n];
      if (w < capacity_ || w == kNone) [[likely]]
        return w;
      damaged_ = true;
      return kNone;
    }
    const uint32_t slot = n - leaves;
    return slot < capacity_ && Contains(slot) ? slot : kNone;
  }
  // The better of two winners; `a` covers lower slots than `b`, so a tie
  // goes to `a` (the lowest slot).
  uint32_t Better(uint32_t a, uint32_t b) const noexcept;
  void Fix(uint32_t slot) noexcept;
  std::optional<uint32_t> ScanMin() const noexcept;

  Arrays a_{};
  uint32_t capacity_ = 0;
  uint32_t tree_cap_ = 0;   // tree nodes the arrays hold (TreeNodes(capacity_))
  uint64_t scan_mask_ = 0;  // the slots of bits[0] below capacity_
  mutable bool damaged_ = false;
};

}  // namespace keymesh::shm

#endif  // KEYMESH_SHM_ELIGIBILITY_INDEX_H_
