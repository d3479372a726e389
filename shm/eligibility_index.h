// The index of a pool's eligible keys: a bitset over slots (round robin,
// iteration) plus, for least_busy and weighted, a binary min-heap of the
// eligible slots ordered by (k1, k2, slot), with each slot's position in the
// heap so that a key whose sort key changed is fixed in O(log n).
//
// Plain code over arrays that live in the segment (PoolHeader::heap_size and
// eligible_count, the pool's heap, heap_pos and bits regions): derived data,
// guarded by the pool mutex, rebuilt from the slots by the repair after an
// owner died. No locking, no clock, no segment: unit-tested on its own.
#ifndef KEYMESH_SHM_ELIGIBILITY_INDEX_H_
#define KEYMESH_SHM_ELIGIBILITY_INDEX_H_

#include <cstdint>
#include <optional>

#include "shm/layout.h"

namespace keymesh::shm {

class EligibilityIndex {
 public:
  EligibilityIndex() = default;
  // The arrays hold `capacity` slots (bits: capacity/64 words rounded up).
  // They must outlive the index.
  EligibilityIndex(uint64_t* bits, HeapEntry* heap, uint32_t* heap_pos, uint32_t* heap_size, uint32_t* eligible_count,
                   uint32_t capacity) noexcept
      : bits_(bits),
        heap_(heap),
        heap_pos_(heap_pos),
        heap_size_(heap_size),
        eligible_count_(eligible_count),
        capacity_(capacity) {}

  uint32_t eligible_count() const noexcept { return *eligible_count_; }
  bool Contains(uint32_t slot) const noexcept { return (bits_[slot >> 6] >> (slot & 63)) & 1; }

  // Marks `slot` eligible; `heap`: it also enters the heap with key (k1, k2).
  void Add(uint32_t slot, bool heap, uint64_t k1, uint64_t k2) noexcept;
  void Remove(uint32_t slot, bool heap) noexcept;
  // The heap key of an eligible slot changed.
  void Update(uint32_t slot, uint64_t k1, uint64_t k2) noexcept;
  // The heap's minimum, if any.
  std::optional<uint32_t> Top() const noexcept {
    if (*heap_size_ == 0) return std::nullopt;
    return heap_[0].slot;
  }
  // Empties the index.
  void Clear() noexcept;

  // The first eligible slot at or after `slot` among slots < `high_water`,
  // wrapping around; nullopt if none.
  std::optional<uint32_t> NextFrom(uint32_t slot, uint32_t high_water) const noexcept;
  // Calls fn(slot) for each eligible slot < high_water in slot order until
  // it returns false.
  template <typename Fn>
  void ForEach(uint32_t high_water, Fn&& fn) const {
    const uint32_t words = (high_water + 63) / 64;
    for (uint32_t w = 0; w < words; ++w) {
      uint64_t bits = bits_[w];
      while (bits != 0) {
        const uint32_t slot = w * 64 + static_cast<uint32_t>(__builtin_ctzll(bits));
        bits &= bits - 1;
        if (!fn(slot)) return;
      }
    }
  }

  // For tests: the heap's invariant (every parent <= its children, positions
  // consistent, bit set exactly for heap members when `heap`).
  bool Valid(bool heap) const noexcept;

 private:
  void SiftUp(uint32_t pos) noexcept;
  void SiftDown(uint32_t pos) noexcept;

  uint64_t* bits_ = nullptr;
  HeapEntry* heap_ = nullptr;
  uint32_t* heap_pos_ = nullptr;
  uint32_t* heap_size_ = nullptr;
  uint32_t* eligible_count_ = nullptr;
  uint32_t capacity_ = 0;
};

}  // namespace keymesh::shm

#endif  // KEYMESH_SHM_ELIGIBILITY_INDEX_H_
