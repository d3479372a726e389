// The journal and the repair after an owner died (the crash story is written
// beside struct Journal in layout.h).
#include <cstring>
#include <vector>

#include "shm/pool_core.h"

namespace keymesh::shm {

void PoolCore::JournalBegin(uint32_t flags, uint32_t slot, uint32_t lease) noexcept {
  Journal& j = ph_->journal;
  j.flags = flags;
  j.slot = slot;
  j.lease = lease;
  if (flags & kJournalSlotFull) {
    std::memcpy(&j.slot_image, &keys_[slot], sizeof(KeySlot));
  } else if (flags & kJournalSlotState) {
    std::memcpy(&j.slot_image.state, &keys_[slot].state, sizeof(SlotState));
  }
  if (flags & kJournalLease) std::memcpy(&j.lease_image, &leases_[lease], sizeof(LeaseRecord));
  if (flags & kJournalPool) {
    j.key_count = ph_->key_count;
    j.slot_high_water = ph_->slot_high_water;
    j.retired = ph_->retired;
  }
  CompilerFence();
  j.active.store(1, std::memory_order_relaxed);
  CompilerFence();
}

void PoolCore::JournalCommit() noexcept {
  CompilerFence();
  ph_->journal.active.store(0, std::memory_order_relaxed);
  CompilerFence();
}

void PoolCore::Repair() noexcept {
  Journal& j = ph_->journal;
  if (j.active.load(std::memory_order_relaxed) != 0) {
    // Undo the interrupted operation: its images are complete (they were
    // written before `active` was set).
    if (j.slot < key_cap_) {
      if (j.flags & kJournalSlotFull) {
        std::memcpy(&keys_[j.slot], &j.slot_image, sizeof(KeySlot));
      } else if (j.flags & kJournalSlotState) {
        std::memcpy(&keys_[j.slot].state, &j.slot_image.state, sizeof(SlotState));
      }
    }
    if ((j.flags & kJournalLease) && j.lease < lease_cap_) {
      std::memcpy(&leases_[j.lease], &j.lease_image, sizeof(LeaseRecord));
    }
    if (j.flags & kJournalPool) {
      ph_->key_count = j.key_count;
      ph_->slot_high_water = j.slot_high_water;
      ph_->retired = j.retired;
    }
    CompilerFence();
    j.active.store(0, std::memory_order_relaxed);
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
  if (ph_->journal.active.load() != 0) return Status(Code::kInternal, "journal left active");
  return Status::Ok();
}

}  // namespace keymesh::shm
