#include "shm/segment.h"

#include <sys/random.h>

#include <cstring>
#include <new>

#include <boost/interprocess/anonymous_shared_memory.hpp>
#include <boost/interprocess/mapped_region.hpp>
#include <boost/interprocess/shared_memory_object.hpp>
#include <boost/uuid/detail/sha1.hpp>

#include "common/check.h"
#include "common/text.h"
#include "shm/clock.h"
#include "shm/eligibility_index.h"

namespace keymesh::shm {

namespace bip = boost::interprocess;

struct Segment::Mapping {
  bip::mapped_region region;
};

namespace {

constexpr uint64_t kPage = 4096;

uint64_t AlignUp(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

// Converts whatever Boost.Interprocess throws into our vocabulary.
Status FromInterprocess(const bip::interprocess_exception& e, std::string_view action, std::string_view name) {
  Code code = Code::kSegmentError;
  if (e.get_error_code() == bip::already_exists_error) code = Code::kAlreadyExists;
  if (e.get_error_code() == bip::security_error) code = Code::kPermissionDenied;
  std::string msg(action);
  msg += " shared-memory segment '";
  msg += name;
  msg += "': ";
  msg += e.what();
  return Status(code, std::move(msg));
}

Status CheckSegmentName(std::string_view name) {
  if (name.size() < 7 || name.substr(0, 7) != "keymesh" || name.size() > 200 ||
      name.find('/') != std::string_view::npos) {
    return Status(Code::kInvalidArgument,
                  "segment name must begin with 'keymesh', contain no '/', and be at most 200 bytes: " + Quoted(name));
  }
  return Status::Ok();
}

}  // namespace

LayoutPlan PlanLayout(const Capacities& caps) noexcept {
  LayoutPlan p{};
  const uint64_t keys = caps.keys_per_pool;
  const uint64_t leases = caps.leases_per_pool;
  p.pools_offset = kPage;
  p.pool_data_offset = AlignUp(p.pools_offset + uint64_t{caps.max_pools} * sizeof(PoolHeader), kPage);
  uint64_t off = 0;
  p.keys_offset = off;
  off = AlignUp(off + keys * sizeof(KeySlot), 64);
  p.leases_offset = off;
  off = AlignUp(off + leases * sizeof(LeaseRecord), 64);
  p.order_offset = off;
  off = AlignUp(off + keys * sizeof(SortKey), 64);
  p.tree_offset = off;
  off = AlignUp(off + uint64_t{EligibilityIndex::TreeNodes(caps.keys_per_pool)} * sizeof(uint32_t), 64);
  p.bits_offset = off;
  off = AlignUp(off + AlignUp(keys, 64) / 8, 64);
  p.free_offset = off;
  off = AlignUp(off + leases * sizeof(uint32_t), 64);
  p.pool_data_stride = AlignUp(off, kPage);
  p.segment_size = p.pool_data_offset + uint64_t{caps.max_pools} * p.pool_data_stride;
  return p;
}

Status ValidateCapacities(const Capacities& caps) {
  if (caps.max_pools < 1 || caps.max_pools > kMaxPoolsLimit) {
    return Status(Code::kInvalidArgument, "capacity max_pools must be 1.." + std::to_string(kMaxPoolsLimit));
  }
  if (caps.keys_per_pool < 1 || caps.keys_per_pool > kMaxKeysPerPoolLimit) {
    return Status(Code::kInvalidArgument, "capacity keys_per_pool must be 1.." + std::to_string(kMaxKeysPerPoolLimit));
  }
  if (caps.leases_per_pool < 1 || caps.leases_per_pool > kMaxLeasesPerPoolLimit) {
    return Status(Code::kInvalidArgument,
                  "capacity leases_per_pool must be 1.." + std::to_string(kMaxLeasesPerPoolLimit));
  }
  return Status::Ok();
}

Status ValidateName(std::string_view what, std::string_view name) {
  if (name.empty() || name.size() >= kNameCapacity) {
    return Status(Code::kInvalidArgument,
                  std::string(what) + " name must be 1.." + std::to_string(kNameCapacity - 1) + " bytes");
  }
  for (char c : name) {
    if (c <= ' ' || c > '~') {
      return Status(Code::kInvalidArgument,
                    std::string(what) + " name may hold only printable ASCII without spaces: " + Quoted(name));
    }
  }
  return Status::Ok();
}

Segment::Segment(std::unique_ptr<Mapping> mapping, std::string name)
    : mapping_(std::move(mapping)), name_(std::move(name)) {
  base_ = static_cast<uint8_t*>(mapping_->region.get_address());
  size_ = mapping_->region.get_size();
  header_ = reinterpret_cast<SegmentHeader*>(base_);
}

Segment::~Segment() = default;

const Segment::Layout& Segment::layout() const noexcept {
  std::call_once(layout_once_, [this] {
    // One read of each capacity; everything else is computed from them.
    Capacities caps;
    caps.max_pools = header_->max_pools;
    caps.keys_per_pool = header_->keys_per_pool;
    caps.leases_per_pool = header_->leases_per_pool;
    if (size_ < sizeof(SegmentHeader) || !ValidateCapacities(caps).ok()) return;
    const LayoutPlan plan = PlanLayout(caps);
    if (plan.segment_size > size_) return;
    layout_.caps = caps;
    layout_.plan = plan;
  });
  return layout_;
}

namespace {
// What an out-of-range pool index sees: a header that is not in use.
PoolHeader g_no_pool{};
}  // namespace

PoolHeader* Segment::pool_header(uint32_t index) const noexcept {
  const Layout& l = layout();
  if (index >= l.caps.max_pools) return &g_no_pool;
  return reinterpret_cast<PoolHeader*>(base_ + l.plan.pools_offset) + index;
}

uint8_t* Segment::pool_data(uint32_t index) const noexcept {
  const Layout& l = layout();
  if (index >= l.caps.max_pools) return nullptr;
  return base_ + l.plan.pool_data_offset + uint64_t{index} * l.plan.pool_data_stride;
}

Status Segment::LayOut(uint8_t* base, uint64_t size, const Capacities& caps) {
  const LayoutPlan plan = PlanLayout(caps);
  KM_CHECK_MSG(size >= plan.segment_size, "the segment was mapped smaller than its plan");
  // The mapping is fresh (zero-filled): construct the header in place.
  auto* h = new (base) SegmentHeader();
  h->magic = kMagic;
  h->layout_version = kLayoutVersion;
  h->header_size = sizeof(SegmentHeader);
  h->segment_size = plan.segment_size;
  h->max_pools = caps.max_pools;
  h->keys_per_pool = caps.keys_per_pool;
  h->leases_per_pool = caps.leases_per_pool;
  h->pool_header_size = sizeof(PoolHeader);
  h->pools_offset = plan.pools_offset;
  h->pool_data_offset = plan.pool_data_offset;
  h->pool_data_stride = plan.pool_data_stride;
  h->keys_offset = plan.keys_offset;
  h->leases_offset = plan.leases_offset;
  h->order_offset = plan.order_offset;
  h->tree_offset = plan.tree_offset;
  h->bits_offset = plan.bits_offset;
  h->free_offset = plan.free_offset;
  h->generation.store(1, std::memory_order_relaxed);
  h->created_wall = WallNowNanos();
  if (getrandom(h->fingerprint_salt, sizeof(h->fingerprint_salt), 0) !=
      static_cast<ssize_t>(sizeof(h->fingerprint_salt))) {
    h->fingerprint_salt[0] = WallNowNanos() ^ 0x9E3779B97F4A7C15ull;
    h->fingerprint_salt[1] = MonotonicNowNanos() * 0xBF58476D1CE4E5B9ull;
  }
  Status st = h->admin_mutex.Init();
  if (!st.ok()) return st;
  for (uint32_t p = 0; p < caps.max_pools; ++p) {
    auto* ph = new (base + plan.pools_offset + uint64_t{p} * sizeof(PoolHeader)) PoolHeader();
    st = ph->mutex.Init();
    if (!st.ok()) return st;
  }
  h->ready.store(1, std::memory_order_release);
  return Status::Ok();
}

Status Segment::Validate(const SegmentHeader* h, uint64_t mapped_size) {
  if (mapped_size < sizeof(SegmentHeader)) {
    return Status(Code::kLayoutMismatch, "segment is smaller than a KeyMesh header");
  }
  if (h->magic != kMagic) {
    return Status(Code::kLayoutMismatch, "segment is not a KeyMesh segment (bad magic)");
  }
  if (h->layout_version != kLayoutVersion) {
    return Status(Code::kLayoutMismatch, "segment has layout version " + std::to_string(h->layout_version) +
                                             ", this library reads version " + std::to_string(kLayoutVersion) +
                                             "; restart the broker with matching KeyMesh versions");
  }
  if (h->ready.load(std::memory_order_acquire) != 1) {
    return Status(Code::kSegmentError, "segment is still being laid out (or its creator died)");
  }
  if (h->header_size != sizeof(SegmentHeader) || h->pool_header_size != sizeof(PoolHeader)) {
    return Status(Code::kLayoutMismatch, "segment header or pool header size differs from this library's");
  }
  Capacities caps{h->max_pools, h->keys_per_pool, h->leases_per_pool};
  Status st = ValidateCapacities(caps);
  if (!st.ok()) return Status(Code::kLayoutMismatch, "segment header: " + st.message());
  const LayoutPlan p = PlanLayout(caps);
  if (p.segment_size != h->segment_size || p.pools_offset != h->pools_offset ||
      p.pool_data_offset != h->pool_data_offset || p.pool_data_stride != h->pool_data_stride ||
      p.keys_offset != h->keys_offset || p.leases_offset != h->leases_offset || p.order_offset != h->order_offset ||
      p.tree_offset != h->tree_offset || p.bits_offset != h->bits_offset || p.free_offset != h->free_offset) {
    return Status(Code::kLayoutMismatch, "segment offsets differ from this library's layout");
  }
  if (mapped_size < h->segment_size) {
    return Status(Code::kLayoutMismatch, "segment is smaller than its header says");
  }
  return Status::Ok();
}

Result<std::unique_ptr<Segment>> Segment::CreateNamed(std::string_view name, const Capacities& caps) {
  Status st = CheckSegmentName(name);
  if (!st.ok()) return st;
  st = ValidateCapacities(caps);
  if (!st.ok()) return st;
  const LayoutPlan plan = PlanLayout(caps);
  const std::string n(name);
  try {
    bip::permissions perm;
    perm.set_permissions(0660);
    bip::shared_memory_object shm(bip::create_only, n.c_str(), bip::read_write, perm);
    try {
      shm.truncate(static_cast<bip::offset_t>(plan.segment_size));
      auto mapping = std::make_unique<Mapping>();
      mapping->region = bip::mapped_region(shm, bip::read_write);
      std::unique_ptr<Segment> seg(new Segment(std::move(mapping), n));
      st = LayOut(seg->base_, seg->size_, caps);
      if (!st.ok()) {
        bip::shared_memory_object::remove(n.c_str());
        return st;
      }
      return seg;
    } catch (...) {
      bip::shared_memory_object::remove(n.c_str());
      throw;
    }
  } catch (const bip::interprocess_exception& e) {
    return FromInterprocess(e, "cannot create", name);
  } catch (const std::bad_alloc&) {
    return Status(Code::kSegmentError, "out of memory creating segment");
  }
}

Result<std::unique_ptr<Segment>> Segment::CreateAnonymous(const Capacities& caps) {
  Status st = ValidateCapacities(caps);
  if (!st.ok()) return st;
  const LayoutPlan plan = PlanLayout(caps);
  try {
    auto mapping = std::make_unique<Mapping>();
    mapping->region = bip::anonymous_shared_memory(plan.segment_size);
    std::unique_ptr<Segment> seg(new Segment(std::move(mapping), std::string()));
    st = LayOut(seg->base_, seg->size_, caps);
    if (!st.ok()) return st;
    return seg;
  } catch (const bip::interprocess_exception& e) {
    return FromInterprocess(e, "cannot create", "<anonymous>");
  }
}

Result<std::unique_ptr<Segment>> Segment::Open(std::string_view name) {
  Status st = CheckSegmentName(name);
  if (!st.ok()) return st;
  const std::string n(name);
  try {
    bip::shared_memory_object shm(bip::open_only, n.c_str(), bip::read_write);
    auto mapping = std::make_unique<Mapping>();
    mapping->region = bip::mapped_region(shm, bip::read_write);
    std::unique_ptr<Segment> seg(new Segment(std::move(mapping), n));
    st = Validate(seg->header_, seg->size_);
    if (!st.ok()) return Status(st.code(), "segment " + Quoted(n) + ": " + st.message());
    return seg;
  } catch (const bip::interprocess_exception& e) {
    return FromInterprocess(e, "cannot open", name);
  }
}

Status Segment::Remove(std::string_view name) {
  Status st = CheckSegmentName(name);
  if (!st.ok()) return st;
  bip::shared_memory_object::remove(std::string(name).c_str());
  return Status::Ok();
}

bool Segment::Exists(std::string_view name) {
  if (!CheckSegmentName(name).ok()) return false;
  try {
    bip::shared_memory_object shm(bip::open_only, std::string(name).c_str(), bip::read_only);
    return true;
  } catch (const bip::interprocess_exception&) {
    return false;
  }
}

std::optional<uint32_t> Segment::FindPool(std::string_view name) const noexcept {
  const uint32_t pools = capacities().max_pools;
  for (uint32_t p = 0; p < pools; ++p) {
    const PoolHeader* ph = pool_header(p);
    if (ph->use == PoolUse::kInUse && name == std::string_view(ph->name, strnlen(ph->name, kNameCapacity))) return p;
  }
  return std::nullopt;
}

Result<uint32_t> Segment::CreatePool(std::string_view name, uint32_t strategy, const PoolConfig& config) {
  Status st = ValidateName("pool", name);
  if (!st.ok()) return st;
  // kOwnerDied needs no repair: pool allocation writes `name` before `use`,
  // so a half-created pool is simply not in use.
  (void)header_->admin_mutex.Lock();
  struct Unlocker {
    RobustMutex& m;
    ~Unlocker() { m.Unlock(); }
  } unlock{header_->admin_mutex};
  if (FindPool(name)) return Status(Code::kAlreadyExists, "pool " + Quoted(name) + " already exists");
  const Layout& layout = this->layout();
  for (uint32_t p = 0; p < layout.caps.max_pools; ++p) {
    PoolHeader* ph = pool_header(p);
    if (ph->use != PoolUse::kFree) continue;
    uint8_t* data = pool_data(p);
    // The data region of a never-used pool is zero: slots free, leases free.
    // A pool is never deleted, so no reuse of a dirty region can happen.
    std::memset(ph->name, 0, sizeof(ph->name));
    std::memcpy(ph->name, name.data(), name.size());
    ph->config = config;
    ph->config.strategy = strategy;
    ph->index_strategy = strategy;
    ph->next_deadline = kNever;
    ph->created_mono = MonotonicNowNanos();
    ph->created_wall = WallNowNanos();
    auto* free_stack = reinterpret_cast<uint32_t*>(data + layout.plan.free_offset);
    const uint32_t leases = layout.caps.leases_per_pool;
    for (uint32_t i = 0; i < leases; ++i) free_stack[i] = leases - 1 - i;
    ph->free_top = leases;
    std::atomic_signal_fence(std::memory_order_seq_cst);
    ph->use = PoolUse::kInUse;
    return p;
  }
  return Status(Code::kCapacityExceeded, "segment holds at most " + std::to_string(layout.caps.max_pools) + " pools");
}

uint64_t Segment::Fingerprint(std::string_view secret) const noexcept {
  boost::uuids::detail::sha1 sha;
  sha.process_bytes(header_->fingerprint_salt, sizeof(header_->fingerprint_salt));
  sha.process_bytes(secret.data(), secret.size());
  boost::uuids::detail::sha1::digest_type digest;
  sha.get_digest(digest);
  return (uint64_t{digest[0]} << 32) | digest[1];
}

}  // namespace keymesh::shm
