#include "shm/eligibility_index.h"

#include <cstring>

namespace keymesh::shm {
namespace {

// (k1, k2) in lexicographic order; k1 as a serial number (its difference
// decides), so a weighted pass that wrapped around 2^64 still sorts after
// the passes it grew from (in_flight counts are small: for them it is the
// plain order).
inline bool KeyLess(const SortKey& a, const SortKey& b) noexcept {
  const int64_t d = static_cast<int64_t>(a.k1 - b.k1);
  return d < 0 || (d == 0 && a.k2 < b.k2);
}

uint32_t LeavesFor(uint32_t high_water) noexcept {
  uint32_t leaves = 1;
  while (leaves < high_water) leaves <<= 1;
  return leaves;
}

}  // namespace

uint32_t EligibilityIndex::TreeNodes(uint32_t capacity) noexcept { return LeavesFor(capacity); }

uint32_t EligibilityIndex::Better(uint32_t a, uint32_t b) const noexcept {
  if (a == kNone) return b;
  if (b == kNone) return a;
  return KeyLess(a_.order[b], a_.order[a]) ? b : a;
}

std::optional<uint32_t> EligibilityIndex::ScanMin() const noexcept {
  // Every eligible slot is in the first word. Ascending slot order and a
  // strict compare break ties by the lowest slot.
  const SortKey* order = a_.order;
  // Only slots below the capacity (the arrays' size) are ever read; bits
  // beyond it, or idle bits of slots not in the index, are damage.
  const uint64_t raw = a_.bits[0];
  const uint64_t eligible = raw & scan_mask_;
  uint64_t idle = *a_.idle;
  if (raw != eligible || (idle & ~eligible) != 0) [[unlikely]] {
    damaged_ = true;
    idle &= eligible;
  }
  if (idle != 0) {
    uint32_t best = static_cast<uint32_t>(__builtin_ctzll(idle));
    uint64_t best_k2 = order[best].k2;
    for (idle &= idle - 1; idle != 0; idle &= idle - 1) {
      const uint32_t slot = static_cast<uint32_t>(__builtin_ctzll(idle));
      const uint64_t k2 = order[slot].k2;
      if (k2 < best_k2) {
        best = slot;
        best_k2 = k2;
      }
    }
    return best;
  }
  uint64_t bits = eligible;
  if (bits == 0) return std::nullopt;
  uint32_t best = static_cast<uint32_t>(__builtin_ctzll(bits));
  SortKey best_key = order[best];
  for (bits &= bits - 1; bits != 0; bits &= bits - 1) {
    const uint32_t slot = static_cast<uint32_t>(__builtin_ctzll(bits));
    const SortKey k = order[slot];
    if (KeyLess(k, best_key)) {
      best = slot;
      best_key = k;
    }
  }
  return best;
}

void EligibilityIndex::Fix(uint32_t slot) noexcept {
  const uint32_t leaves = *a_.tree_leaves;
  if (leaves > tree_cap_ || slot >= leaves) [[unlikely]] {
    damaged_ = true;  // the tree size was rewritten: it does not fit the arrays, or misses the slot
    return;
  }
  for (uint32_t n = (slot + leaves) >> 1; n >= 1; n >>= 1) {
    const uint32_t w = Better(Winner(2 * n, leaves), Winner(2 * n + 1, leaves));
    // Unchanged, and not the key that changed: nothing above can change.
    if (a_.tree[n] == w && w != slot) return;
    a_.tree[n] = w;
  }
}

void EligibilityIndex::Clear(bool ordered, uint32_t high_water) noexcept {
  std::memset(a_.bits, 0, (uint64_t{capacity_} + 63) / 64 * sizeof(uint64_t));
  *a_.eligible_count = 0;
  *a_.idle = 0;
  if (high_water > capacity_) high_water = capacity_;
  const uint32_t leaves = ordered ? LeavesFor(high_water) : 0;
  *a_.tree_leaves = leaves;
  for (uint32_t n = 0; n < leaves; ++n) a_.tree[n] = kNone;
}

std::optional<uint32_t> EligibilityIndex::NextFrom(uint32_t slot, uint32_t high_water) const noexcept {
  if (high_water > capacity_) high_water = capacity_;
  if (*a_.eligible_count == 0 || high_water == 0) return std::nullopt;
  if (slot >= high_water) slot = 0;
  const uint32_t words = (high_water + 63) / 64;
  // From `slot` to the end, then from 0 (wrap).
  uint32_t w = slot / 64;
  uint64_t bits = a_.bits[w] & (~uint64_t{0} << (slot & 63));
  for (uint32_t n = 0; n <= words; ++n) {
    if (bits != 0) return w * 64 + static_cast<uint32_t>(__builtin_ctzll(bits));
    w = (w + 1 == words) ? 0 : w + 1;
    bits = a_.bits[w];
  }
  return std::nullopt;
}

bool EligibilityIndex::Valid(bool ordered, bool counts) const noexcept {
  uint32_t bits = 0;
  for (uint32_t w = 0; w < (capacity_ + 63) / 64; ++w) bits += static_cast<uint32_t>(__builtin_popcountll(a_.bits[w]));
  if (bits != *a_.eligible_count) return false;
  const uint32_t leaves = *a_.tree_leaves;
  if (!ordered) return leaves == 0;
  if (leaves == 0 || leaves > TreeNodes(capacity_)) return false;
  bool inside = true;
  ForEach(capacity_, [&](uint32_t slot) { return inside = slot < leaves; });  // no eligible slot outside the tree
  if (!inside) return false;
  if (leaves <= kScanLeaves) {
    uint32_t idle = 0;
    if (counts)
      ForEach(leaves, [&](uint32_t slot) { return (idle |= a_.order[slot].k1 == 0 ? 1u << slot : 0u), true; });
    return idle == *a_.idle;
  }
  for (uint32_t n = leaves - 1; n >= 1; --n) {
    if (a_.tree[n] != Better(Winner(2 * n, leaves), Winner(2 * n + 1, leaves))) return false;
  }
  return true;
}

}  // namespace keymesh::shm
