// Creating, opening and validating the shared segment.
//
// A Segment owns one mapping. Named segments (the broker's) live in
// /dev/shm under a name that begins with "keymesh"; anonymous segments (an
// embedded pool's) have no name and are shared with processes forked after
// creation. Either way every structure is laid out at creation and nothing
// is allocated afterwards.
#ifndef KEYMESH_SHM_SEGMENT_H_
#define KEYMESH_SHM_SEGMENT_H_

#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>

#include "keymesh/status.h"
#include "shm/capacities.h"
#include "shm/layout.h"

namespace keymesh::shm {

class Segment {
 public:
  ~Segment();
  Segment(const Segment&) = delete;
  Segment& operator=(const Segment&) = delete;

  // Creates a new named segment; fails with kAlreadyExists if one exists.
  // `name` must begin with "keymesh" and contain no '/'.
  static Result<std::unique_ptr<Segment>> CreateNamed(std::string_view name, const Capacities& caps);
  // Creates an anonymous segment shared with children forked afterwards.
  static Result<std::unique_ptr<Segment>> CreateAnonymous(const Capacities& caps);
  // Opens and validates an existing named segment. kLayoutMismatch when it is
  // another version or shape, kSegmentError when it does not exist.
  static Result<std::unique_ptr<Segment>> Open(std::string_view name);
  // Removes a named segment; existing mappings stay valid. Missing is OK.
  static Status Remove(std::string_view name);
  static bool Exists(std::string_view name);

  SegmentHeader* header() const noexcept { return header_; }
  const std::string& name() const noexcept { return name_; }
  uint8_t* base() const noexcept { return base_; }
  uint64_t size() const noexcept { return size_; }

  // The layout this process uses: capacities and offsets copied out of the
  // header into private memory once, on first use (after Open validated or
  // Create laid out the header), and never re-read from the segment, so a
  // process that rewrites the header later cannot move another process's
  // view. The offsets are recomputed from the capacities (PlanLayout), and
  // the copy is taken only when the capacities are within the hard limits
  // and the plan fits the mapping; otherwise it is empty (no pools), which
  // every accessor below treats as "no such pool".
  struct Layout {
    Capacities caps{0, 0, 0};
    LayoutPlan plan{};
  };
  const Layout& layout() const noexcept;
  Capacities capacities() const noexcept { return layout().caps; }

  // Pool `index` < capacities().max_pools. Out of range: pool_header() is a
  // private, zeroed header (not in use) and pool_data() is nullptr.
  PoolHeader* pool_header(uint32_t index) const noexcept;
  uint8_t* pool_data(uint32_t index) const noexcept;

  // Index of the in-use pool called `name`, or nullopt.
  std::optional<uint32_t> FindPool(std::string_view name) const noexcept;
  // Allocates and initialises a pool; kAlreadyExists, kCapacityExceeded.
  Result<uint32_t> CreatePool(std::string_view name, uint32_t strategy, const PoolConfig& config);

  uint64_t generation() const noexcept { return header_->generation.load(std::memory_order_acquire); }
  void BumpGeneration() noexcept { header_->generation.fetch_add(1, std::memory_order_acq_rel); }

  // Fingerprint of a secret under this segment's salt.
  uint64_t Fingerprint(std::string_view secret) const noexcept;

 private:
  struct Mapping;
  Segment(std::unique_ptr<Mapping> mapping, std::string name);
  static Status Validate(const SegmentHeader* h, uint64_t mapped_size);
  static Status LayOut(uint8_t* base, uint64_t size, const Capacities& caps);

  std::unique_ptr<Mapping> mapping_;
  std::string name_;
  uint8_t* base_ = nullptr;
  uint64_t size_ = 0;
  SegmentHeader* header_ = nullptr;
  mutable std::once_flag layout_once_;
  mutable Layout layout_;
};

// Validates capacities against the hard limits; the message names the field.
Status ValidateCapacities(const Capacities& caps);
// A name usable for a pool or key: 1..63 bytes, printable ASCII, no spaces.
Status ValidateName(std::string_view what, std::string_view name);

}  // namespace keymesh::shm

#endif  // KEYMESH_SHM_SEGMENT_H_
