// The undo journal and the repair after an owner died (the crash story is
// written beside struct Journal in layout.h).
#include <cstring>
#include <vector>

#include "shm/pool_core.h"

namespace keymesh::shm {

void PoolCore::LogSlotImage(uint32_t slot) noexcept {
  Journal& j = ph_->journal;
  std::memcpy(&j.slot_image, &keys_[slot], sizeof(KeySlot));
  const uint32_t n = ph_->undo_count.load(std::memory_order_relaxed);
  KM_CHECK_MSG(n < kUndoCapacity, "an operation journaled more words than the journal holds");
  j.entries[n] = UndoEntry{kUndoSlotImage, slot};
  CompilerFence();
  ph_->undo_count.store(n + 1, std::memory_order_relaxed);
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
    const uint64_t data_end = data_begin + segment_->header()->pool_data_stride;
    for (uint32_t i = n > kUndoCapacity ? kUndoCapacity : n; i-- > 0;) {
      const UndoEntry e = j.entries[i];
      if (e.offset == kUndoSlotImage) {
        if (e.old < key_cap_) std::memcpy(&keys_[e.old], &j.slot_image, sizeof(KeySlot));
        continue;
      }
      const bool in_header = e.offset >= header_begin && e.offset + 8 <= header_end;
      const bool in_data = e.offset >= data_begin && e.offset + 8 <= data_end;
      if ((e.offset & 7) != 0 || !(in_header || in_data)) continue;
      // Never the lock word's line: the lock and the journal's count are not state.
      if (in_header && e.offset < header_begin + offsetof(PoolHeader, free_top)) continue;
      std::memcpy(base_ + e.offset, &e.old, sizeof(uint64_t));
    }
    CompilerFence();
    ph_->undo_count.store(0, std::memory_order_relaxed);
  }
  // Derived data, rebuilt from state.
  if (ph_->slot_high_water > key_cap_) ph_->slot_high_water = key_cap_;
  uint32_t count = 0;
  for (uint32_t s = 0; s < ph_->slot_high_water; ++s) {
    keys_[s].state.in_flight = 0;
    if (keys_[s].state.use != SlotUse::kFree) ++count;
  }
  ph_->key_count = count;
  uint32_t top = 0;
  for (uint32_t l = lease_cap_; l-- > 0;) {
    LeaseRecord& r = leases_[l];
    if (r.state == LeaseState::kHeld && r.slot < ph_->slot_high_water && keys_[r.slot].state.use != SlotUse::kFree) {
      ++keys_[r.slot].state.in_flight;
    } else {
      r.state = LeaseState::kFree;
      free_[top++] = l;
    }
  }
  ph_->free_top = top;
  for (uint32_t s = 0; s < ph_->slot_high_water; ++s) RetireSlotIfDone(s);
  IndexRebuild(clock_->NowNanos());
}

Status PoolCore::CheckConsistencyLocked() const {
  std::vector<uint32_t> count(ph_->slot_high_water, 0);
  uint32_t held = 0;
  for (uint32_t l = 0; l < lease_cap_; ++l) {
    if (leases_[l].state == LeaseState::kHeld) {
      if (leases_[l].slot >= ph_->slot_high_water) return Status(Code::kInternal, "lease names a bad slot");
      ++count[leases_[l].slot];
      ++held;
    }
  }
  for (uint32_t s = 0; s < ph_->slot_high_water; ++s) {
    if (keys_[s].state.in_flight != count[s]) {
      return Status(Code::kInternal, "slot " + std::to_string(s) + " in_flight " +
                                         std::to_string(keys_[s].state.in_flight) + " != leases " +
                                         std::to_string(count[s]));
    }
  }
  if (held + ph_->free_top != lease_cap_) return Status(Code::kInternal, "free-lease stack out of sync");
  if (ph_->undo_count.load() != 0) return Status(Code::kInternal, "journal left active");
  if (!index_view_.Valid(Ordered(), Counts())) return Status(Code::kInternal, "eligibility index out of order");
  return Status::Ok();
}

}  // namespace keymesh::shm
