// The undo journal and the repair after an owner died (the crash story is
// written beside struct Journal in layout.h).
#include <cstring>
#include <vector>

#include "shm/pool_core.h"

namespace keymesh::shm {

void PoolCore::LogSlotImage(uint32_t slot) noexcept {
  Journal& j = ph_->journal;
  const uint32_t n = journal_n_;  // as LogWord
  if (n >= kUndoCapacity) [[unlikely]] {
    (void)Fault("an operation journaled more words than the journal holds");
    return;
  }
  std::memcpy(&j.slot_image, &keys_[slot], sizeof(KeySlot));
  j.entries[n] = UndoEntry{kUndoSlotImage, slot};
  CompilerFence();
  ph_->undo_count.store(n + 1, std::memory_order_relaxed);
  journal_n_ = n + 1;
  CompilerFence();
}

void PoolCore::Repair() noexcept {
  Journal& j = ph_->journal;
  const uint32_t n = ph_->undo_count.load(std::memory_order_relaxed);
  if (n != 0) {
    // Undo the interrupted operation, newest entry first. Entries are input
    // like any other segment content: each must name an aligned word inside
    // this pool's header or data region (or this pool's slot image).
    const uintptr_t base = reinterpret_cast<uintptr_t>(base_);
    const uint64_t header_begin = reinterpret_cast<uintptr_t>(ph_) - base;
    const uint64_t header_end = header_begin + offsetof(PoolHeader, journal);  // never the journal itself
    const uint64_t data_begin = reinterpret_cast<uintptr_t>(data_) - base;
    const uint64_t data_end = data_begin + data_size_;
    for (uint32_t i = n > kUndoCapacity ? kUndoCapacity : n; i-- > 0;) {
      const UndoEntry e = j.entries[i];
      if (e.offset == kUndoSlotImage) {
        if (e.old < key_cap_) std::memcpy(&keys_[e.old], &j.slot_image, sizeof(KeySlot));
        continue;
      }
      // Compared without overflow: an offset near 2^64 must not wrap past
      // the region's end.
      const bool in_header = e.offset >= header_begin && e.offset <= header_end - 8;
      const bool in_data = e.offset >= data_begin && e.offset <= data_end - 8;
      if ((e.offset & 7) != 0 || !(in_header || in_data)) continue;
      // Never the lock word's line: the lock and the journal's count are not state.
      if (in_header && e.offset < header_begin + offsetof(PoolHeader, free_top)) continue;
      std::memcpy(base_ + e.offset, &e.old, sizeof(uint64_t));
    }
    CompilerFence();
    ph_->undo_count.store(0, std::memory_order_relaxed);
  }
  journal_n_ = 0;
  // Derived data, rebuilt from state. Every bound is this process's own
  // (key_cap_, lease_cap_) or a local copy checked against it: the segment
  // may be rewritten while this runs.
  fault_ = nullptr;
  damaged_ = false;
  index_view_.ClearDamage();
  // The high water: one past the last slot in use (the restored journal may
  // have moved it; a planted one may hide keys or reach past the slots).
  uint32_t hw = 0;
  for (uint32_t s = key_cap_; s-- > 0;) {
    if (keys_[s].state.use != SlotUse::kFree) {
      hw = s + 1;
      break;
    }
  }
  ph_->slot_high_water = hw;
  uint32_t count = 0;
  for (uint32_t s = 0; s < hw; ++s) {
    keys_[s].state.in_flight = 0;
    if (keys_[s].state.use != SlotUse::kFree) ++count;
  }
  ph_->key_count = count;
  uint32_t top = 0;
  for (uint32_t l = lease_cap_; l-- > 0;) {
    LeaseRecord& r = leases_[l];
    const uint32_t slot = r.slot;
    if (r.state == LeaseState::kHeld && slot < hw && keys_[slot].state.use != SlotUse::kFree) {
      ++keys_[slot].state.in_flight;
    } else {
      r.state = LeaseState::kFree;
      free_[top++] = l;
    }
  }
  ph_->free_top = top;
  for (uint32_t s = 0; s < hw; ++s) RetireSlotIfDone(s);
  IndexRebuild(clock_->NowNanos());
  // Commit what RetireSlotIfDone journaled; nothing derived is left wrong
  // unless the segment was rewritten during the repair.
  damaged_ = false;
  index_view_.ClearDamage();
}

Status PoolCore::CheckConsistencyLocked() const {
  const uint32_t hw = HighWater();
  if (hw != ph_->slot_high_water) return Status(Code::kSegmentError, "slot high water beyond the key capacity");
  std::vector<uint32_t> count(hw, 0);
  uint32_t held = 0;
  for (uint32_t l = 0; l < lease_cap_; ++l) {
    if (leases_[l].state == LeaseState::kHeld) {
      const uint32_t slot = leases_[l].slot;
      if (slot >= hw) return Status(Code::kSegmentError, "lease names a bad slot");
      ++count[slot];
      ++held;
    }
  }
  for (uint32_t s = 0; s < hw; ++s) {
    if (keys_[s].state.in_flight != count[s]) {
      return Status(Code::kSegmentError, "slot " + std::to_string(s) + " in_flight " +
                                             std::to_string(keys_[s].state.in_flight) + " != leases " +
                                             std::to_string(count[s]));
    }
  }
  const uint32_t top = ph_->free_top;
  if (top > lease_cap_ || held + top != lease_cap_) {
    return Status(Code::kSegmentError, "free-lease stack out of sync");
  }
  for (uint32_t i = 0; i < top; ++i) {
    const uint32_t l = free_[i];
    if (l >= lease_cap_ || leases_[l].state != LeaseState::kFree) {
      return Status(Code::kSegmentError, "free-lease stack names a bad or held lease");
    }
  }
  if (ph_->undo_count.load() != 0) return Status(Code::kSegmentError, "journal left active");
  if (!index_view_.Valid(Ordered(), Counts())) return Status(Code::kSegmentError, "eligibility index out of order");
  return Status::Ok();
}

}  // namespace keymesh::shm
