#include "shm/eligibility_index.h"

#include <cstring>

namespace keymesh::shm {
namespace {

// (k1, k2, slot) in lexicographic order; (k1, k2) compared as one 128-bit
// number (keys rarely tie: k2 is the acquire sequence or the slot).
inline bool Less(const HeapEntry& a, const HeapEntry& b) noexcept {
  const unsigned __int128 ka = (static_cast<unsigned __int128>(a.k1) << 64) | a.k2;
  const unsigned __int128 kb = (static_cast<unsigned __int128>(b.k1) << 64) | b.k2;
  return ka < kb || (ka == kb && a.slot < b.slot);
}

}  // namespace

void EligibilityIndex::SiftUp(uint32_t pos) noexcept {
  HeapEntry e = heap_[pos];
  while (pos > 0) {
    const uint32_t parent = (pos - 1) / 2;
    if (!Less(e, heap_[parent])) break;
    heap_[pos] = heap_[parent];
    heap_pos_[heap_[pos].slot] = pos;
    pos = parent;
  }
  heap_[pos] = e;
  heap_pos_[e.slot] = pos;
}

void EligibilityIndex::SiftDown(uint32_t pos) noexcept {
  const uint32_t n = *heap_size_;
  HeapEntry e = heap_[pos];
  for (;;) {
    uint32_t child = 2 * pos + 1;
    if (child >= n) break;
    if (child + 1 < n && Less(heap_[child + 1], heap_[child])) ++child;
    if (!Less(heap_[child], e)) break;
    heap_[pos] = heap_[child];
    heap_pos_[heap_[pos].slot] = pos;
    pos = child;
  }
  heap_[pos] = e;
  heap_pos_[e.slot] = pos;
}

void EligibilityIndex::Add(uint32_t slot, bool heap, uint64_t k1, uint64_t k2) noexcept {
  bits_[slot >> 6] |= uint64_t{1} << (slot & 63);
  ++*eligible_count_;
  if (!heap) return;
  const uint32_t pos = (*heap_size_)++;
  heap_[pos] = HeapEntry{k1, k2, slot, 0};
  heap_pos_[slot] = pos;
  SiftUp(pos);
}

void EligibilityIndex::Remove(uint32_t slot, bool heap) noexcept {
  bits_[slot >> 6] &= ~(uint64_t{1} << (slot & 63));
  --*eligible_count_;
  if (!heap) return;
  const uint32_t pos = heap_pos_[slot];
  const uint32_t last = --*heap_size_;
  if (pos == last) return;
  const uint32_t moved = heap_[last].slot;
  heap_[pos] = heap_[last];
  heap_pos_[moved] = pos;
  SiftUp(pos);
  SiftDown(heap_pos_[moved]);
}

void EligibilityIndex::Update(uint32_t slot, uint64_t k1, uint64_t k2) noexcept {
  const uint32_t pos = heap_pos_[slot];
  const HeapEntry old = heap_[pos];
  heap_[pos].k1 = k1;
  heap_[pos].k2 = k2;
  if (Less(heap_[pos], old)) {
    SiftUp(pos);
  } else {
    SiftDown(pos);
  }
}

void EligibilityIndex::Clear() noexcept {
  std::memset(bits_, 0, (uint64_t{capacity_} + 63) / 64 * sizeof(uint64_t));
  *heap_size_ = 0;
  *eligible_count_ = 0;
}

std::optional<uint32_t> EligibilityIndex::NextFrom(uint32_t slot, uint32_t high_water) const noexcept {
  if (*eligible_count_ == 0 || high_water == 0) return std::nullopt;
  if (slot >= high_water) slot = 0;
  const uint32_t words = (high_water + 63) / 64;
  // From `slot` to the end, then from 0 (wrap).
  uint32_t w = slot / 64;
  uint64_t bits = bits_[w] & (~uint64_t{0} << (slot & 63));
  for (uint32_t n = 0; n <= words; ++n) {
    if (bits != 0) return w * 64 + static_cast<uint32_t>(__builtin_ctzll(bits));
    w = (w + 1 == words) ? 0 : w + 1;
    bits = bits_[w];
  }
  return std::nullopt;
}

bool EligibilityIndex::Valid(bool heap) const noexcept {
  uint32_t bits = 0;
  for (uint32_t w = 0; w < (capacity_ + 63) / 64; ++w) bits += static_cast<uint32_t>(__builtin_popcountll(bits_[w]));
  if (bits != *eligible_count_) return false;
  if (!heap) return true;
  if (*heap_size_ != *eligible_count_) return false;
  for (uint32_t pos = 0; pos < *heap_size_; ++pos) {
    const HeapEntry& e = heap_[pos];
    if (e.slot >= capacity_ || heap_pos_[e.slot] != pos || !Contains(e.slot)) return false;
    if (pos > 0 && Less(e, heap_[(pos - 1) / 2])) return false;
  }
  return true;
}

}  // namespace keymesh::shm
