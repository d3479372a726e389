#include "shm/pool.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <unordered_set>

#include "common/check.h"
#include "common/text.h"
#include "shm/futex.h"

namespace keymesh::shm {
namespace {

std::atomic<CrashHook> g_crash_hook{nullptr};

inline void CrashPointReached(CrashPoint point) noexcept {
  CrashHook hook = g_crash_hook.load(std::memory_order_relaxed);
  if (hook != nullptr) [[unlikely]]
    hook(point);
}

// Orders the stores of a critical section against the journal flag as the
// program wrote them: a kill lands at an instruction boundary, so compiler
// ordering (x86 keeps store order) is what decides which state a crash
// leaves.
inline void CompilerFence() noexcept { std::atomic_signal_fence(std::memory_order_seq_cst); }

static_assert(kWaitBuckets <= 16, "PoolHeader::wait_counts holds the histogram");

constexpr double kEmaAlpha = 0.2;
constexpr double kStrideOne = 4294967296.0;  // 2^32
constexpr double kMinHealth = 0.05;          // keeps every weight > 0 key in rotation

double SuccessRate(const SlotState& st) noexcept {
  const uint64_t total = st.successes + st.failures;
  return total == 0 ? 1.0 : static_cast<double>(st.successes) / static_cast<double>(total);
}

std::string SlotName(const KeySlot& k) { return std::string(k.name, strnlen(k.name, kNameCapacity)); }
std::string PoolName(const PoolHeader& ph) { return std::string(ph.name, strnlen(ph.name, kNameCapacity)); }

}  // namespace

void SetCrashHookForTesting(CrashHook hook) noexcept { g_crash_hook.store(hook); }

PoolConfig ToPoolConfig(const PoolOptions& o) noexcept {
  PoolConfig c{};
  c.strategy = static_cast<uint32_t>(o.strategy);
  c.max_failures = o.max_failures;
  c.default_cooldown = SecondsToNanos(o.default_cooldown);
  c.acquire_timeout = SecondsToNanos(o.acquire_timeout);
  c.max_lease = SecondsToNanos(o.max_lease_seconds);
  c.max_cooldown = SecondsToNanos(o.max_cooldown);
  c.margin_ppm = static_cast<uint32_t>(std::lround(o.rate_margin * 1e6));
  return c;
}

bool SamePoolConfig(const PoolConfig& a, const PoolConfig& b) noexcept {
  return a.strategy == b.strategy && a.max_failures == b.max_failures && a.default_cooldown == b.default_cooldown &&
         a.acquire_timeout == b.acquire_timeout && a.max_lease == b.max_lease && a.max_cooldown == b.max_cooldown &&
         a.margin_ppm == b.margin_ppm;
}

uint32_t KeyMarginPpm(double rate_margin) noexcept {
  return rate_margin < 0 ? kPoolMargin : static_cast<uint32_t>(std::lround(rate_margin * 1e6));
}

// Holds the pool mutex; repairs on EOWNERDEAD; wakes sleepers after unlock
// when asked to.
class PoolAccess::Guard {
 public:
  explicit Guard(PoolAccess* pool) : pool_(pool) {
    LockOutcome outcome = pool_->ph_->mutex.Lock();
    if (outcome == LockOutcome::kOwnerDied) [[unlikely]] {
      pool_->Repair();
      pool_->ph_->mutex.MakeConsistent();
      wake_ = true;  // the dead owner may have been about to wake someone
    }
    KM_CHECK_MSG(outcome != LockOutcome::kUnrecoverable, "pool mutex unrecoverable");
  }
  ~Guard() {
    bool must_wake = false;
    // Sleepers announce themselves (sleepers = 1) under the lock before they
    // sleep, so when nobody is announced no wake-up is owed and the fast
    // path stays free of atomic read-modify-writes and system calls.
    if (wake_ && pool_->ph_->sleepers.load(std::memory_order_relaxed) != 0) {
      pool_->ph_->sleepers.store(0, std::memory_order_relaxed);
      pool_->ph_->wake_seq.fetch_add(1, std::memory_order_release);
      must_wake = true;
    }
    pool_->ph_->mutex.Unlock();
    if (must_wake) FutexWakeAll(&pool_->ph_->wake_seq);
  }
  Guard(const Guard&) = delete;
  Guard& operator=(const Guard&) = delete;
  void RequestWake() noexcept { wake_ = true; }

 private:
  PoolAccess* pool_;
  bool wake_ = false;
};

// The SelectionContext handed to selectors: answers from the index when it
// is ordered for the question, by scanning eligible slots otherwise.
class PoolSelection final : public SelectionContext {
 public:
  PoolSelection(const PoolAccess* pool) : p_(pool) {}

  uint32_t eligible_count() const noexcept override { return p_->ph_->eligible_count; }

  void ForEachEligible(const std::function<bool(const KeyView&)>& fn) const override {
    const uint32_t words = (p_->ph_->slot_high_water + 63) / 64;
    for (uint32_t w = 0; w < words; ++w) {
      uint64_t bits = p_->bits_[w];
      while (bits != 0) {
        const uint32_t slot = w * 64 + static_cast<uint32_t>(__builtin_ctzll(bits));
        bits &= bits - 1;
        if (!fn(View(slot))) return;
      }
    }
  }

  std::optional<uint32_t> NextEligibleFrom(uint32_t slot) const noexcept override {
    const uint32_t hw = p_->ph_->slot_high_water;
    if (p_->ph_->eligible_count == 0 || hw == 0) return std::nullopt;
    if (slot >= hw) slot = 0;
    const uint32_t words = (hw + 63) / 64;
    // From `slot` to the end, then from 0 (wrap).
    uint32_t w = slot / 64;
    uint64_t bits = p_->bits_[w] & (~uint64_t{0} << (slot & 63));
    for (uint32_t n = 0; n <= words; ++n) {
      if (bits != 0) return w * 64 + static_cast<uint32_t>(__builtin_ctzll(bits));
      w = (w + 1 == words) ? 0 : w + 1;
      bits = p_->bits_[w];
    }
    return std::nullopt;
  }

  uint32_t round_robin_cursor() const noexcept override { return p_->ph_->rr_cursor; }

  std::optional<uint32_t> LeastBusy() const noexcept override {
    if (p_->ph_->index_strategy == static_cast<uint32_t>(Strategy::kLeastBusy)) {
      if (p_->ph_->heap_size == 0) return std::nullopt;
      return p_->heap_[0].slot;
    }
    return ScanMin([](const SlotState& s) { return std::pair<uint64_t, uint64_t>(s.in_flight, s.last_used_seq); });
  }

  std::optional<uint32_t> LowestPass() const noexcept override {
    if (p_->ph_->index_strategy == static_cast<uint32_t>(Strategy::kWeighted)) {
      if (p_->ph_->heap_size == 0) return std::nullopt;
      return p_->heap_[0].slot;
    }
    return ScanMin([](const SlotState& s) { return std::pair<uint64_t, uint64_t>(s.pass, 0); });
  }

 private:
  KeyView View(uint32_t slot) const {
    const KeySlot& k = p_->keys_[slot];
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

  template <typename KeyFn>
  std::optional<uint32_t> ScanMin(KeyFn key) const noexcept {
    std::optional<uint32_t> best;
    std::pair<uint64_t, uint64_t> best_key{};
    const uint32_t words = (p_->ph_->slot_high_water + 63) / 64;
    for (uint32_t w = 0; w < words; ++w) {
      uint64_t bits = p_->bits_[w];
      while (bits != 0) {
        const uint32_t slot = w * 64 + static_cast<uint32_t>(__builtin_ctzll(bits));
        bits &= bits - 1;
        auto k = key(p_->keys_[slot].state);
        if (!best || k < best_key) {
          best = slot;
          best_key = k;
        }
      }
    }
    return best;
  }

  const PoolAccess* p_;
};

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

const Selector& BuiltinSelector(uint32_t strategy) noexcept {
  switch (static_cast<Strategy>(strategy)) {
    case Strategy::kRoundRobin: return RoundRobinSelector();
    case Strategy::kWeighted: return WeightedSelector();
    case Strategy::kLeastBusy: break;
  }
  return LeastBusySelector();
}

}  // namespace
}  // namespace keymesh::shm

namespace keymesh {
const Selector& RoundRobinSelector() noexcept {
  static const shm::RoundRobin s;
  return s;
}
const Selector& LeastBusySelector() noexcept {
  static const shm::LeastBusy s;
  return s;
}
const Selector& WeightedSelector() noexcept {
  static const shm::Weighted s;
  return s;
}
}  // namespace keymesh

namespace keymesh::shm {

PoolAccess::PoolAccess(const Segment& segment, uint32_t pool_index, const Clock& clock) noexcept
    : segment_(&segment), index_(pool_index), clock_(&clock) {
  const SegmentHeader* h = segment.header();
  ph_ = segment.pool_header(pool_index);
  uint8_t* data = segment.pool_data(pool_index);
  keys_ = reinterpret_cast<KeySlot*>(data + h->keys_offset);
  leases_ = reinterpret_cast<LeaseRecord*>(data + h->leases_offset);
  heap_ = reinterpret_cast<HeapEntry*>(data + h->heap_offset);
  heap_pos_ = reinterpret_cast<uint32_t*>(data + h->heap_pos_offset);
  bits_ = reinterpret_cast<uint64_t*>(data + h->bits_offset);
  free_ = reinterpret_cast<uint32_t*>(data + h->free_offset);
  key_cap_ = h->keys_per_pool;
  lease_cap_ = h->leases_per_pool;
}

PoolInfo PoolAccess::Info() const {
  return PoolInfo{std::string(ph_->name, strnlen(ph_->name, kNameCapacity)),
                  static_cast<Strategy>(ph_->config.strategy), ph_->config.acquire_timeout};
}

Status PoolAccess::NoSuchKey(std::string_view name) const {
  return Status(Code::kUnknownKey, "no key " + Quoted(name) + " in pool " + Quoted(PoolName(*ph_)));
}

// ---------------------------------------------------------------------------
// Journal and repair

void PoolAccess::JournalBegin(uint32_t flags, uint32_t slot, uint32_t lease) noexcept {
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

void PoolAccess::JournalCommit() noexcept {
  CompilerFence();
  ph_->journal.active.store(0, std::memory_order_relaxed);
  CompilerFence();
}

void PoolAccess::Repair() noexcept {
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

// ---------------------------------------------------------------------------
// Eligibility index

void PoolAccess::RequestPacing(uint32_t slot, uint64_t* interval, uint64_t* tolerance) const noexcept {
  const KeyConfig& c = keys_[slot].config;
  if (c.rpm == 0) {
    *interval = 0;
    *tolerance = 0;
    return;
  }
  const uint32_t ppm = c.margin_ppm == kPoolMargin ? ph_->config.margin_ppm : c.margin_ppm;
  const double rate = static_cast<double>(c.rpm) * (1.0 - static_cast<double>(ppm) / 1e6);  // per minute
  *interval = static_cast<uint64_t>(60e9 / std::max(rate, 1e-9));
  *tolerance = uint64_t{c.burst > 1 ? c.burst - 1 : 0} * *interval;
}

void PoolAccess::TokenPacing(uint32_t slot, double* per_token, uint64_t* tolerance) const noexcept {
  const KeyConfig& c = keys_[slot].config;
  if (c.tpm == 0) {
    *per_token = 0;
    *tolerance = 0;
    return;
  }
  const uint32_t ppm = c.margin_ppm == kPoolMargin ? ph_->config.margin_ppm : c.margin_ppm;
  const double rate = static_cast<double>(c.tpm) * (1.0 - static_cast<double>(ppm) / 1e6);
  *per_token = 60e9 / std::max(rate, 1e-9);
  *tolerance = kNanosPerSecond;  // at most one second of token budget in a burst
}

uint64_t PoolAccess::ReadyAt(uint32_t slot) const noexcept {
  const SlotState& st = keys_[slot].state;
  uint64_t ready = st.cooldown_deadline;
  const KeyConfig& c = keys_[slot].config;
  if (c.rpm == 0 && c.tpm == 0) [[likely]]
    return ready;  // no budgets: only the cooldown
  uint64_t interval, tolerance;
  RequestPacing(slot, &interval, &tolerance);
  if (interval != 0 && st.req_tat > tolerance) ready = std::max(ready, st.req_tat - tolerance);
  double per_token;
  TokenPacing(slot, &per_token, &tolerance);
  if (per_token != 0 && st.tok_tat > tolerance) ready = std::max(ready, st.tok_tat - tolerance);
  return ready;
}

bool PoolAccess::Eligible(uint32_t slot, uint64_t now) const noexcept {
  const KeySlot& k = keys_[slot];
  const SlotState& st = k.state;
  if (st.use != SlotUse::kActive || st.enabled == 0) return false;
  switch (st.circuit) {
    case Circuit::kClosed:
      if (k.config.max_concurrency != 0 && st.in_flight >= k.config.max_concurrency) return false;
      break;
    case Circuit::kOpen:
      if (st.in_flight != 0) return false;  // exactly one probe, after the others ended
      break;
    case Circuit::kHalfOpen:
    case Circuit::kRevoked: return false;
  }
  return ReadyAt(slot) <= now;
}

void PoolAccess::OpenCircuit(SlotState& st, uint64_t now) noexcept {
  const uint64_t base = ph_->config.default_cooldown > 0 ? ph_->config.default_cooldown : kNanosPerSecond;
  if (st.circuit == Circuit::kHalfOpen && st.open_cooldown > 0) {
    // A failed probe: stay out longer each time, up to the cap.
    st.open_cooldown = std::max(base, std::min(ph_->config.max_cooldown, st.open_cooldown * 2));
  } else {
    st.open_cooldown = base;
  }
  st.circuit = Circuit::kOpen;
  st.circuit_opens += 1;
  const uint64_t until = now + st.open_cooldown;
  if (until > st.cooldown_deadline) st.cooldown_deadline = until;
}

bool PoolAccess::HeapStrategy() const noexcept {
  return ph_->index_strategy != static_cast<uint32_t>(Strategy::kRoundRobin);
}

void PoolAccess::HeapKey(uint32_t slot, HeapEntry* e) const noexcept {
  const SlotState& st = keys_[slot].state;
  e->slot = slot;
  if (ph_->index_strategy == static_cast<uint32_t>(Strategy::kWeighted)) {
    e->k1 = st.pass;
    e->k2 = 0;
  } else {
    e->k1 = st.in_flight;
    e->k2 = st.last_used_seq;
  }
}

namespace {
// (k1, k2, slot) in lexicographic order; (k1, k2) compared as one 128-bit
// number (keys rarely tie: k2 is the acquire sequence or the slot).
inline bool Less(const HeapEntry& a, const HeapEntry& b) noexcept {
  const unsigned __int128 ka = (static_cast<unsigned __int128>(a.k1) << 64) | a.k2;
  const unsigned __int128 kb = (static_cast<unsigned __int128>(b.k1) << 64) | b.k2;
  return ka < kb || (ka == kb && a.slot < b.slot);
}
}  // namespace

void PoolAccess::SiftUp(uint32_t pos) noexcept {
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

void PoolAccess::SiftDown(uint32_t pos) noexcept {
  const uint32_t n = ph_->heap_size;
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

void PoolAccess::HeapInsert(uint32_t slot) noexcept {
  const uint32_t pos = ph_->heap_size++;
  HeapKey(slot, &heap_[pos]);
  heap_pos_[slot] = pos;
  SiftUp(pos);
}

void PoolAccess::HeapRemove(uint32_t slot) noexcept {
  const uint32_t pos = heap_pos_[slot];
  const uint32_t last = --ph_->heap_size;
  if (pos == last) return;
  const uint32_t moved = heap_[last].slot;
  heap_[pos] = heap_[last];
  heap_pos_[moved] = pos;
  SiftUp(pos);
  SiftDown(heap_pos_[moved]);
}

void PoolAccess::HeapFix(uint32_t slot) noexcept {
  const uint32_t pos = heap_pos_[slot];
  const HeapEntry old = heap_[pos];
  HeapKey(slot, &heap_[pos]);
  if (Less(heap_[pos], old)) {
    SiftUp(pos);
  } else {
    SiftDown(pos);
  }
}

void PoolAccess::IndexUpdate(uint32_t slot, uint64_t now) noexcept {
  const bool want = Eligible(slot, now);
  const bool have = BitTest(slot);
  if (want && !have) {
    if (ph_->index_strategy == static_cast<uint32_t>(Strategy::kWeighted)) {
      // A key (re)entering rotation starts at the current virtual time, so
      // it neither monopolises the pool nor waits for its old pass.
      SlotState& st = keys_[slot].state;
      if (st.pass < ph_->vtime) st.pass = ph_->vtime;
    }
    bits_[slot >> 6] |= uint64_t{1} << (slot & 63);
    ++ph_->eligible_count;
    if (HeapStrategy()) HeapInsert(slot);
  } else if (want && have) {
    if (HeapStrategy()) HeapFix(slot);
  } else if (!want && have) {
    bits_[slot >> 6] &= ~(uint64_t{1} << (slot & 63));
    --ph_->eligible_count;
    if (HeapStrategy()) HeapRemove(slot);
  }
}

void PoolAccess::IndexRebuild(uint64_t now) noexcept {
  std::memset(bits_, 0, (uint64_t{key_cap_} + 63) / 64 * sizeof(uint64_t));
  ph_->heap_size = 0;
  ph_->eligible_count = 0;
  ph_->index_strategy = ph_->config.strategy;
  ph_->next_deadline = kNever;
  for (uint32_t s = 0; s < ph_->slot_high_water; ++s) {
    if (keys_[s].state.use == SlotUse::kFree) continue;
    NoteDeadline(ReadyAt(s), now);
    IndexUpdate(s, now);
  }
}

void PoolAccess::NoteDeadline(uint64_t deadline, uint64_t now) noexcept {
  if (deadline > now && deadline < ph_->next_deadline) ph_->next_deadline = deadline;
}

void PoolAccess::Sweep(uint64_t now) noexcept {
  uint64_t next = kNever;
  for (uint32_t s = 0; s < ph_->slot_high_water; ++s) {
    const SlotState& st = keys_[s].state;
    // Removing keys count for next_deadline too (I4): AddKey may re-admit
    // one while it cools, and it must come back when its deadline passes.
    if (st.use == SlotUse::kFree) continue;
    const uint64_t ready = ReadyAt(s);
    if (ready > now) {
      next = std::min(next, ready);
    } else if (ready != 0 && !BitTest(s)) {
      IndexUpdate(s, now);
    }
  }
  ph_->next_deadline = next;
}

uint64_t PoolAccess::Stride(uint32_t slot) const noexcept {
  const KeySlot& k = keys_[slot];
  double health = SuccessRate(k.state) / (1.0 + k.state.ema_latency);
  if (!(health >= kMinHealth)) health = kMinHealth;
  const double w = static_cast<double>(std::max<uint32_t>(k.config.weight, 1)) * health;
  const double stride = kStrideOne / w;
  return stride < 1.0 ? 1 : static_cast<uint64_t>(stride);
}

// ---------------------------------------------------------------------------
// Fast path

Result<LeaseHandle> PoolAccess::TryAcquireLocked(const Selector* selector, uint64_t now, uint64_t* earliest,
                                                 uint64_t tokens, uint64_t waited_ns, const ProcessId& holder) {
  if (now >= ph_->next_deadline) [[unlikely]]
    Sweep(now);
  if (ph_->index_strategy != ph_->config.strategy) [[unlikely]]
    IndexRebuild(now);
  const Selector& sel = selector != nullptr ? *selector : BuiltinSelector(ph_->config.strategy);
  PoolSelection ctx(this);
  const std::optional<uint32_t> choice = sel.Select(ctx);
  if (!choice) {
    if (earliest != nullptr) *earliest = ph_->next_deadline;
    return Status(Code::kNoAvailableKey,
                  "No API keys are currently available. All keys are either cooling down or exhausted.");
  }
  const uint32_t s = *choice;
  if (s >= ph_->slot_high_water || !BitTest(s)) {
    return Status(Code::kInternal, "selector returned slot " + std::to_string(s) + ", which is not eligible");
  }
  if (ph_->free_top == 0) {
    return Status(Code::kCapacityExceeded, "pool " + Quoted(PoolName(*ph_)) + " holds at most " +
                                               std::to_string(lease_cap_) + " leases at once");
  }
  const uint32_t l = free_[ph_->free_top - 1];
  const ProcessId& self = holder;
  SlotState& st = keys_[s].state;
  LeaseRecord& lease = leases_[l];

  JournalBegin(kJournalSlotState | kJournalLease, s, l);
  CrashPointReached(CrashPoint::kAcquireAfterJournal);
  lease.slot = s;
  lease.pid = self.pid;
  lease.start_time = self.start_time;
  lease.acquire_ns = now;
  lease.seq += 1;
  lease.tokens = 0;
  lease.flags = 0;
  lease.state = LeaseState::kHeld;
  CrashPointReached(CrashPoint::kAcquireMidMutation);
  st.in_flight += 1;
  st.acquires += 1;
  st.last_used = now;
  st.last_used_seq = ++ph_->acquire_seq;
  if (ph_->index_strategy == static_cast<uint32_t>(Strategy::kWeighted)) {
    ph_->vtime = st.pass;
    st.pass += Stride(s);
  }
  const KeyConfig& cfg = keys_[s].config;
  bool paced = false;
  if (cfg.rpm != 0) [[unlikely]] {
    // GCRA: reserve this request's slot in the key's request budget.
    uint64_t interval, tolerance;
    RequestPacing(s, &interval, &tolerance);
    st.req_tat = std::max(st.req_tat, now) + interval;
    paced = true;
  }
  if (cfg.tpm != 0 && tokens != 0) [[unlikely]] {
    double per_token;
    uint64_t tolerance;
    TokenPacing(s, &per_token, &tolerance);
    st.tok_tat = std::max(st.tok_tat, now) + static_cast<uint64_t>(static_cast<double>(tokens) * per_token);
    lease.tokens = tokens;
    paced = true;
  }
  if (st.circuit == Circuit::kOpen) [[unlikely]] {
    st.circuit = Circuit::kHalfOpen;  // this caller is the one probe
    lease.flags = kLeaseProbe;
  }
  JournalCommit();
  CrashPointReached(CrashPoint::kAcquireAfterCommit);

  --ph_->free_top;
  ph_->rr_cursor = s + 1;
  size_t bucket = 0;
  if (waited_ns != 0) [[unlikely]] {
    const double w = NanosToSeconds(waited_ns);
    while (bucket + 1 < kWaitBuckets && w > kWaitBucketBounds[bucket]) ++bucket;
    ph_->wait_sum_ns += waited_ns;
  }
  ph_->wait_counts[bucket] += 1;
  ph_->wait_count += 1;
  if (paced) NoteDeadline(ReadyAt(s), now);
  IndexUpdate(s, now);
  return LeaseHandle{s, l, lease.seq, now, keys_[s].config.fingerprint};
}

Result<LeaseHandle> PoolAccess::TryAcquire(const Selector* selector, uint64_t* earliest, const ProcessId& holder,
                                           uint64_t tokens) {
  Result<LeaseHandle> r = [&] {
    Guard g(this);
    return TryAcquireLocked(selector, clock_->NowNanos(), earliest, tokens, 0, holder);
  }();
  if (!r.ok() && r.status().code() == Code::kNoAvailableKey) {
    ph_->no_key.fetch_add(1, std::memory_order_relaxed);
  }
  return r;
}

Result<LeaseHandle> PoolAccess::Acquire(uint64_t timeout_ns, const Selector* selector, const ProcessId& holder,
                                        const std::atomic<bool>* cancel, uint64_t tokens) {
  const uint64_t start = MonotonicNowNanos();
  const uint64_t deadline = timeout_ns >= kNever - start ? kNever : start + timeout_ns;
  for (bool first = true;; first = false) {
    uint32_t seq = 0;
    uint64_t earliest = kNever;
    {
      Guard g(this);
      const uint64_t now = clock_->NowNanos();
      const uint64_t waited = first ? 0 : std::max<uint64_t>(MonotonicNowNanos() - start, 1);
      Result<LeaseHandle> r = TryAcquireLocked(selector, now, &earliest, tokens, waited, holder);
      if (r.ok() || r.status().code() != Code::kNoAvailableKey) return r;
      if (cancel != nullptr && cancel->load(std::memory_order_acquire)) {
        return Status(Code::kClosed, "acquire cancelled");
      }
      if (MonotonicNowNanos() >= deadline) {
        ph_->no_key.fetch_add(1, std::memory_order_relaxed);
        if (timeout_ns > 0) ph_->timeouts.fetch_add(1, std::memory_order_relaxed);
        if (earliest != kNever && earliest > now) {
          char when[64];
          std::snprintf(when, sizeof(when), " The next key returns in %.3f s.", NanosToSeconds(earliest - now));
          return Status(Code::kNoAvailableKey, r.status().message() + when);
        }
        return r;
      }
      // Announce the sleep while holding the lock: any change after the
      // unlock bumps wake_seq and sees `sleepers`, so no wake-up is lost.
      seq = ph_->wake_seq.load(std::memory_order_acquire);
      ph_->sleepers.store(1, std::memory_order_release);
      // earliest is in the pool clock's units; convert the remaining
      // cooldown to a real duration.
      if (earliest != kNever) earliest = earliest > now ? earliest - now : 0;
    }
    const uint64_t real_now = MonotonicNowNanos();
    uint64_t wait = deadline == kNever ? kNever : (deadline > real_now ? deadline - real_now : 0);
    if (earliest != kNever) wait = std::min(wait, earliest + 1);
    if (wait == 0) continue;
    FutexWait(&ph_->wake_seq, seq, wait);
  }
}

Status PoolAccess::ReleaseLocked(const LeaseHandle& h, const Outcome& outcome, const ProcessId& holder, bool* wake) {
  if (h.lease >= lease_cap_ || h.slot >= key_cap_) {
    return Status(Code::kNotHeld, "lease handle out of range");
  }
  LeaseRecord& lease = leases_[h.lease];
  if (lease.state != LeaseState::kHeld || lease.seq != h.seq || lease.slot != h.slot || lease.pid != holder.pid ||
      lease.start_time != holder.start_time) {
    return Status(Code::kNotHeld, "key " + Quoted(SlotName(keys_[h.slot])) +
                                      " is not held by this lease (already released or reclaimed)");
  }
  const uint32_t s = h.slot;
  KeySlot& key = keys_[s];
  SlotState& st = key.state;
  bool exhausted_now = false;
  // The clock is read only when the answer depends on it: a key whose
  // cooldown and budgets allowed it before this lease was granted allows it
  // at any later time, so the grant time serves (saves a clock read per
  // success on keys without limits).
  const bool timed = outcome.kind != OutcomeKind::kSuccess || key.config.rpm != 0 || key.config.tpm != 0 ||
                     st.circuit != Circuit::kClosed || st.cooldown_deadline > lease.acquire_ns;
  const uint64_t now = timed ? clock_->NowNanos() : lease.acquire_ns;
  const bool probe = (lease.flags & kLeaseProbe) != 0 && st.circuit == Circuit::kHalfOpen;

  JournalBegin(kJournalSlotState | kJournalLease, s, h.lease);
  lease.state = LeaseState::kFree;
  CrashPointReached(CrashPoint::kReleaseMidMutation);
  st.in_flight -= 1;
  if (key.config.tpm != 0 && outcome.tokens != 0 && outcome.tokens != lease.tokens) [[unlikely]] {
    // Debit what the request really used, correcting the reservation.
    double per_token;
    uint64_t tolerance;
    TokenPacing(s, &per_token, &tolerance);
    if (outcome.tokens > lease.tokens) {
      st.tok_tat = std::max(st.tok_tat, now) +
                   static_cast<uint64_t>(static_cast<double>(outcome.tokens - lease.tokens) * per_token);
    } else {
      const uint64_t refund = static_cast<uint64_t>(static_cast<double>(lease.tokens - outcome.tokens) * per_token);
      st.tok_tat = st.tok_tat > refund ? st.tok_tat - refund : 0;
    }
  }
  switch (outcome.kind) {
    case OutcomeKind::kSuccess:
      st.successes += 1;
      st.fail_streak = 0;
      st.rl_streak = 0;
      st.last_cooldown = 0;
      if (st.circuit == Circuit::kOpen || st.circuit == Circuit::kHalfOpen) {
        st.circuit = Circuit::kClosed;  // the key works again
        st.open_cooldown = 0;
      }
      st.tokens += outcome.tokens;
      if (outcome.latency && std::isfinite(*outcome.latency) && *outcome.latency >= 0) {
        if (st.has_latency) {
          st.ema_latency = kEmaAlpha * *outcome.latency + (1.0 - kEmaAlpha) * st.ema_latency;
        } else {
          st.ema_latency = *outcome.latency;
          st.has_latency = 1;
        }
      }
      break;
    case OutcomeKind::kFailure:
      st.failures += 1;
      st.fail_streak += 1;
      st.tokens += outcome.tokens;
      if (outcome.permanent) {
        if (st.circuit != Circuit::kRevoked) {
          st.circuit = Circuit::kRevoked;
          exhausted_now = true;
        }
      } else if (probe) {
        OpenCircuit(st, now);  // the probe failed: open again, for longer
      } else if (st.fail_streak >= ph_->config.max_failures && st.circuit == Circuit::kClosed) {
        OpenCircuit(st, now);
        exhausted_now = true;
      }
      break;
    case OutcomeKind::kCancelled:
      st.cancelled += 1;
      if (probe) st.circuit = Circuit::kOpen;  // nothing learned: the next caller probes
      break;
    case OutcomeKind::kRateLimited: {
      st.rate_limited += 1;
      st.tokens += outcome.tokens;
      const uint64_t requested = outcome.cooldown ? SecondsToNanos(*outcome.cooldown) : ph_->config.default_cooldown;
      uint64_t cooldown = requested;
      if (st.rl_streak > 0) {
        // Consecutive 429s escalate: at least twice the previous, capped.
        const uint64_t doubled = st.last_cooldown > ph_->config.max_cooldown / 2
                                     ? ph_->config.max_cooldown
                                     : std::min(ph_->config.max_cooldown, st.last_cooldown * 2);
        cooldown = std::max(requested, doubled);
      }
      st.rl_streak += 1;
      st.last_cooldown = cooldown;
      const uint64_t until = now + cooldown;
      if (until > st.cooldown_deadline) st.cooldown_deadline = until;  // never shortens
      if (probe) st.circuit = Circuit::kOpen;                          // probe again once the 429 cooldown ends
      break;
    }
  }
  JournalCommit();

  free_[ph_->free_top++] = h.lease;
  if (timed) NoteDeadline(ReadyAt(s), now);
  RetireSlotIfDone(s);
  if (st.use != SlotUse::kFree) IndexUpdate(s, now);
  *wake = true;
  if (exhausted_now) {
    if (st.circuit == Circuit::kRevoked) {
      return Status(Code::kKeyExhausted, "Key " + Quoted(SlotName(key)) +
                                             " failed authentication and is out of rotation until reset or add_key.");
    }
    char detail[96];
    std::snprintf(detail, sizeof(detail), "; its circuit is open for %.1f s, then one caller probes it.",
                  NanosToSeconds(st.open_cooldown));
    return Status(Code::kKeyExhausted, "Key " + Quoted(SlotName(key)) + " has been exhausted (" +
                                           std::to_string(st.fail_streak) + " consecutive failures)" + detail);
  }
  return Status::Ok();
}

Status PoolAccess::Release(const LeaseHandle& lease, const Outcome& outcome, const ProcessId& holder) {
  Guard g(this);
  bool wake = false;
  Status st = ReleaseLocked(lease, outcome, holder, &wake);
  if (wake) g.RequestWake();
  return st;
}

// Frees a lease as "reclaimed" (holder dead or hung). Lock held.
void PoolAccess::FreeLeaseLocked(uint32_t l, uint64_t now, bool count_reclaim) {
  LeaseRecord& lease = leases_[l];
  const uint32_t s = lease.slot;
  SlotState& st = keys_[s].state;
  JournalBegin(kJournalSlotState | kJournalLease, s, l);
  lease.state = LeaseState::kFree;
  st.in_flight -= 1;
  if (count_reclaim) st.reclaimed += 1;
  if ((lease.flags & kLeaseProbe) != 0 && st.circuit == Circuit::kHalfOpen) st.circuit = Circuit::kOpen;
  JournalCommit();
  free_[ph_->free_top++] = l;
  RetireSlotIfDone(s);
  if (keys_[s].state.use != SlotUse::kFree) IndexUpdate(s, now);
}

// A removed key's slot is freed when its last lease ends; its totals move to
// the pool's retired totals so pool-wide counters never go backwards.
void PoolAccess::RetireSlotIfDone(uint32_t s) noexcept {
  KeySlot& k = keys_[s];
  if (k.state.use != SlotUse::kRemoving || k.state.in_flight != 0) return;
  if (BitTest(s)) {
    bits_[s >> 6] &= ~(uint64_t{1} << (s & 63));
    --ph_->eligible_count;
    if (HeapStrategy()) HeapRemove(s);
  }
  JournalBegin(kJournalSlotFull | kJournalPool, s, 0);
  ph_->retired.acquires += k.state.acquires;
  ph_->retired.successes += k.state.successes;
  ph_->retired.failures += k.state.failures;
  ph_->retired.rate_limited += k.state.rate_limited;
  ph_->retired.reclaimed += k.state.reclaimed;
  std::memset(&k, 0, sizeof(KeySlot));
  ph_->key_count -= 1;
  JournalCommit();
}

// ---------------------------------------------------------------------------
// Admin

std::optional<uint32_t> PoolAccess::FindByNameLocked(std::string_view name) const noexcept {
  for (uint32_t s = 0; s < ph_->slot_high_water; ++s) {
    const KeySlot& k = keys_[s];
    if (k.state.use != SlotUse::kFree && name == std::string_view(k.name, strnlen(k.name, kNameCapacity))) {
      return s;
    }
  }
  return std::nullopt;
}

Result<AddKeyResult> PoolAccess::AddKey(const KeyDefinition& def) {
  Status valid = ValidateName("key", def.name);
  if (!valid.ok()) return valid;
  if (def.weight < 1) return Status(Code::kInvalidArgument, "key weight must be >= 1");
  Guard g(this);
  const uint64_t now = clock_->NowNanos();
  if (std::optional<uint32_t> existing = FindByNameLocked(def.name)) {
    // Re-admission (the original's add_key of a known key): clears the
    // failure streak and exhaustion, keeps counters and in-flight leases.
    const uint32_t s = *existing;
    KeySlot& k = keys_[s];
    JournalBegin(kJournalSlotFull, s, 0);
    CrashPointReached(CrashPoint::kAdminMidMutation);
    if (k.state.use == SlotUse::kRemoving) k.state.use = SlotUse::kActive;
    k.state.fail_streak = 0;
    if (k.state.circuit != Circuit::kClosed) {
      // The open circuit's cooldown ends with the exhaustion: a re-admitted
      // key is back in rotation at once (as in the original's add_key).
      k.state.cooldown_deadline = 0;
      k.state.open_cooldown = 0;
    }
    k.state.circuit = Circuit::kClosed;
    k.state.enabled = 1;
    k.config.fingerprint = def.fingerprint;
    k.config.weight = def.weight;
    k.config.max_concurrency = def.max_concurrency;
    k.config.rpm = def.rpm;
    k.config.tpm = def.tpm;
    k.config.burst = def.burst;
    k.config.margin_ppm = def.margin_ppm;
    JournalCommit();
    IndexUpdate(s, now);
    g.RequestWake();
    return AddKeyResult{s, false};
  }
  uint32_t s = 0;
  while (s < key_cap_ && keys_[s].state.use != SlotUse::kFree) ++s;
  if (s == key_cap_) {
    return Status(Code::kCapacityExceeded,
                  "pool " + Quoted(PoolName(*ph_)) + " holds at most " + std::to_string(key_cap_) + " keys");
  }
  KeySlot& k = keys_[s];
  JournalBegin(kJournalSlotFull | kJournalPool, s, 0);
  std::memset(&k, 0, sizeof(KeySlot));
  std::memcpy(k.name, def.name.data(), def.name.size());
  k.config.fingerprint = def.fingerprint;
  k.config.weight = def.weight;
  k.config.max_concurrency = def.max_concurrency;
  k.config.rpm = def.rpm;
  k.config.tpm = def.tpm;
  k.config.burst = def.burst;
  k.config.margin_ppm = def.margin_ppm;
  k.state.enabled = 1;
  k.state.pass = ph_->vtime;
  CrashPointReached(CrashPoint::kAdminMidMutation);
  k.state.use = SlotUse::kActive;
  ph_->key_count += 1;
  if (s >= ph_->slot_high_water) ph_->slot_high_water = s + 1;
  JournalCommit();
  IndexUpdate(s, now);
  g.RequestWake();
  return AddKeyResult{s, true};
}

Status PoolAccess::RemoveKey(std::string_view name) {
  Guard g(this);
  std::optional<uint32_t> s = FindByNameLocked(name);
  if (!s) return NoSuchKey(name);
  if (keys_[*s].state.use == SlotUse::kRemoving) return Status::Ok();
  JournalBegin(kJournalSlotState, *s, 0);
  keys_[*s].state.use = SlotUse::kRemoving;
  JournalCommit();
  IndexUpdate(*s, clock_->NowNanos());
  RetireSlotIfDone(*s);
  return Status::Ok();
}

Status PoolAccess::SetEnabled(std::string_view name, bool enabled) {
  Guard g(this);
  std::optional<uint32_t> s = FindByNameLocked(name);
  if (!s) return NoSuchKey(name);
  JournalBegin(kJournalSlotState, *s, 0);
  keys_[*s].state.enabled = enabled ? 1 : 0;
  JournalCommit();
  IndexUpdate(*s, clock_->NowNanos());
  if (enabled) g.RequestWake();
  return Status::Ok();
}

Status PoolAccess::ResetKey(std::string_view name) {
  Guard g(this);
  std::optional<uint32_t> s = FindByNameLocked(name);
  if (!s) return NoSuchKey(name);
  SlotState& st = keys_[*s].state;
  JournalBegin(kJournalSlotState, *s, 0);
  st.cooldown_deadline = 0;
  st.last_cooldown = 0;
  st.fail_streak = 0;
  st.rl_streak = 0;
  st.circuit = Circuit::kClosed;
  st.open_cooldown = 0;
  JournalCommit();
  IndexUpdate(*s, clock_->NowNanos());
  g.RequestWake();
  return Status::Ok();
}

Status PoolAccess::ObserveLimits(std::string_view name, const LimitUpdate& u) {
  for (const std::optional<double>& d : {u.reset_requests, u.reset_tokens, u.retry_after}) {
    if (d && !(*d >= 0 && *d <= 1e9))
      return Status(Code::kInvalidArgument, "limit durations must be finite seconds >= 0");
  }
  Guard g(this);
  std::optional<uint32_t> s = FindByNameLocked(name);
  if (!s) return NoSuchKey(name);
  const uint64_t now = clock_->NowNanos();
  SlotState& st = keys_[*s].state;
  uint64_t interval, req_tol, tok_tol;
  double per_token;
  RequestPacing(*s, &interval, &req_tol);
  TokenPacing(*s, &per_token, &tok_tol);
  // A reset in the headers is measured from now; without one, assume the
  // provider's usual one-second quantum.
  const uint64_t req_reset = now + (u.reset_requests ? SecondsToNanos(*u.reset_requests) : kNanosPerSecond);
  const uint64_t tok_reset = now + (u.reset_tokens ? SecondsToNanos(*u.reset_tokens) : kNanosPerSecond);
  JournalBegin(kJournalSlotState, *s, 0);
  if (u.remaining_requests) {
    const uint64_t n = *u.remaining_requests;
    if (n == 0) {
      if (interval != 0) {
        st.req_tat = std::max(st.req_tat, req_reset + req_tol);
      } else {
        st.cooldown_deadline = std::max(st.cooldown_deadline, req_reset);
      }
    } else if (interval != 0) {
      // At most n requests grantable now: tat >= now + tolerance - (n-1)*interval.
      const uint64_t allow = (n - 1) >= (kNever / interval) ? kNever : (n - 1) * interval;
      const uint64_t floor = now + req_tol > allow ? now + req_tol - allow : 0;
      st.req_tat = std::max(st.req_tat, floor);
    }
  }
  if (u.remaining_tokens) {
    const uint64_t m = *u.remaining_tokens;
    if (m == 0) {
      if (per_token != 0) {
        st.tok_tat = std::max(st.tok_tat, tok_reset + tok_tol);
      } else {
        st.cooldown_deadline = std::max(st.cooldown_deadline, tok_reset);
      }
    } else if (per_token != 0) {
      const double allow = static_cast<double>(m) * per_token;
      const double floor = static_cast<double>(now + tok_tol) - allow;
      if (floor > 0) st.tok_tat = std::max(st.tok_tat, static_cast<uint64_t>(floor));
    }
  }
  if (u.retry_after) st.cooldown_deadline = std::max(st.cooldown_deadline, now + SecondsToNanos(*u.retry_after));
  JournalCommit();
  NoteDeadline(ReadyAt(*s), now);
  IndexUpdate(*s, now);
  return Status::Ok();
}

Status PoolAccess::SetStrategy(Strategy strategy) {
  Guard g(this);
  ph_->config.strategy = static_cast<uint32_t>(strategy);
  IndexRebuild(clock_->NowNanos());
  return Status::Ok();
}

Status PoolAccess::SetOptions(const PoolOptions& o) {
  Status st = ValidatePoolOptions(o);
  if (!st.ok()) return st;
  Guard g(this);
  ph_->config = ToPoolConfig(o);  // plain scalars: each write is atomic for a crash
  IndexRebuild(clock_->NowNanos());
  g.RequestWake();
  return Status::Ok();
}

Status PoolAccess::RestoreKeyState(std::string_view name, const RestoredState& r) {
  Guard g(this);
  std::optional<uint32_t> s = FindByNameLocked(name);
  if (!s) return NoSuchKey(name);
  SlotState& st = keys_[*s].state;
  JournalBegin(kJournalSlotState, *s, 0);
  st.fail_streak = r.fail_streak;
  st.rl_streak = r.rl_streak;
  st.cooldown_deadline = r.cooldown_deadline;
  st.last_cooldown = r.last_cooldown;
  st.enabled = r.enabled ? 1 : 0;
  Circuit circuit =
      r.circuit <= static_cast<uint32_t>(Circuit::kRevoked) ? static_cast<Circuit>(r.circuit) : Circuit::kOpen;
  if (circuit == Circuit::kClosed && r.exhausted) circuit = Circuit::kOpen;
  if (circuit == Circuit::kHalfOpen) circuit = Circuit::kOpen;  // its probe did not survive
  st.circuit = circuit;
  st.open_cooldown = r.open_cooldown;
  st.circuit_opens = r.circuit_opens;
  if (r.restore_counters) {
    st.acquires = r.acquires;
    st.successes = r.successes;
    st.failures = r.failures;
    st.rate_limited = r.rate_limited;
    st.reclaimed = r.reclaimed;
    st.tokens = r.tokens;
    st.has_latency = r.has_latency ? 1 : 0;
    st.ema_latency = r.ema_latency;
  }
  JournalCommit();
  const uint64_t now = clock_->NowNanos();
  NoteDeadline(st.cooldown_deadline, now);
  IndexUpdate(*s, now);
  return Status::Ok();
}

std::vector<PoolAccess::ExportedKey> PoolAccess::ExportKeyStates() {
  std::vector<ExportedKey> out;
  Guard g(this);
  for (uint32_t s = 0; s < ph_->slot_high_water; ++s) {
    const KeySlot& k = keys_[s];
    const SlotState& st = k.state;
    if (st.use != SlotUse::kActive) continue;
    ExportedKey e;
    e.name = SlotName(k);
    e.fingerprint = k.config.fingerprint;
    RestoredState& r = e.state;
    r.fail_streak = st.fail_streak;
    r.rl_streak = st.rl_streak;
    r.cooldown_deadline = st.cooldown_deadline;
    r.last_cooldown = st.last_cooldown;
    r.enabled = st.enabled != 0;
    r.exhausted = st.circuit != Circuit::kClosed;
    r.circuit = static_cast<uint32_t>(st.circuit);
    r.open_cooldown = st.open_cooldown;
    r.circuit_opens = st.circuit_opens;
    r.acquires = st.acquires;
    r.successes = st.successes;
    r.failures = st.failures;
    r.rate_limited = st.rate_limited;
    r.reclaimed = st.reclaimed;
    r.tokens = st.tokens;
    r.has_latency = st.has_latency != 0;
    r.ema_latency = st.ema_latency;
    out.push_back(std::move(e));
  }
  return out;
}

Result<uint32_t> PoolAccess::ReclaimProcess(const ProcessId& holder) {
  Guard g(this);
  const uint64_t now = clock_->NowNanos();
  uint32_t freed = 0;
  for (uint32_t l = 0; l < lease_cap_; ++l) {
    const LeaseRecord& r = leases_[l];
    if (r.state == LeaseState::kHeld && r.pid == holder.pid && r.start_time == holder.start_time) {
      FreeLeaseLocked(l, now, true);
      ++freed;
    }
  }
  if (freed > 0) g.RequestWake();
  return freed;
}

Result<uint32_t> PoolAccess::ReclaimExpired() {
  Guard g(this);
  const uint64_t now = clock_->NowNanos();
  const uint64_t max_lease = ph_->config.max_lease;
  if (max_lease == 0) return 0u;
  uint32_t freed = 0;
  for (uint32_t l = 0; l < lease_cap_; ++l) {
    const LeaseRecord& r = leases_[l];
    if (r.state == LeaseState::kHeld && now > r.acquire_ns && now - r.acquire_ns > max_lease) {
      FreeLeaseLocked(l, now, true);
      ++freed;
    }
  }
  if (freed > 0) g.RequestWake();
  return freed;
}

std::vector<ProcessId> PoolAccess::Holders() {
  std::vector<ProcessId> out;
  Guard g(this);
  for (uint32_t l = 0; l < lease_cap_; ++l) {
    const LeaseRecord& r = leases_[l];
    if (r.state != LeaseState::kHeld) continue;
    ProcessId id{r.pid, r.start_time};
    if (std::find(out.begin(), out.end(), id) == out.end()) out.push_back(id);
  }
  return out;
}

Result<uint32_t> PoolAccess::ReclaimDead() {
  uint32_t freed = 0;
  for (const ProcessId& id : Holders()) {
    if (IsAlive(id)) continue;
    Result<uint32_t> r = ReclaimProcess(id);
    if (!r.ok()) return r;
    freed += *r;
  }
  return freed;
}

// ---------------------------------------------------------------------------
// Reading

Result<PoolStatus> PoolAccess::Snapshot() {
  PoolStatus out;
  Guard g(this);
  const uint64_t now = clock_->NowNanos();
  if (now >= ph_->next_deadline) Sweep(now);
  out.name = std::string(ph_->name, strnlen(ph_->name, kNameCapacity));
  out.strategy = static_cast<Strategy>(ph_->config.strategy);
  out.options.strategy = out.strategy;
  out.options.max_failures = ph_->config.max_failures;
  out.options.default_cooldown = NanosToSeconds(ph_->config.default_cooldown);
  out.options.acquire_timeout = NanosToSeconds(ph_->config.acquire_timeout);
  out.options.max_lease_seconds = NanosToSeconds(ph_->config.max_lease);
  out.options.max_cooldown = NanosToSeconds(ph_->config.max_cooldown);
  out.options.rate_margin = static_cast<double>(ph_->config.margin_ppm) / 1e6;
  out.uptime = NanosToSeconds(MonotonicNowNanos() - ph_->created_mono);
  out.generation = segment_->generation();
  PoolTotals& t = out.totals;
  t.acquires = ph_->retired.acquires;
  t.releases = ph_->retired.successes;
  t.failures = ph_->retired.failures;
  t.rate_limited = ph_->retired.rate_limited;
  t.reclaimed = ph_->retired.reclaimed;
  t.no_key_available = ph_->no_key.load(std::memory_order_relaxed);
  for (size_t b = 0; b < kWaitBuckets; ++b) out.acquire_wait.counts[b] = ph_->wait_counts[b];
  out.acquire_wait.sum = NanosToSeconds(ph_->wait_sum_ns);
  out.acquire_wait.count = ph_->wait_count;
  t.timeouts = ph_->timeouts.load(std::memory_order_relaxed);
  for (uint32_t s = 0; s < ph_->slot_high_water; ++s) {
    const KeySlot& k = keys_[s];
    const SlotState& st = k.state;
    if (st.use == SlotUse::kFree) continue;
    KeyStatus ks;
    ks.slot = s;
    ks.name = SlotName(k);
    ks.fingerprint = k.config.fingerprint;
    ks.enabled = st.enabled != 0;
    ks.weight = k.config.weight;
    ks.max_concurrency = k.config.max_concurrency;
    ks.rpm = k.config.rpm;
    ks.tpm = k.config.tpm;
    ks.in_flight = st.in_flight;
    ks.cooldown_remaining = st.cooldown_deadline > now ? NanosToSeconds(st.cooldown_deadline - now) : 0.0;
    ks.fail_streak = st.fail_streak;
    ks.rate_limit_streak = st.rl_streak;
    ks.acquires = st.acquires;
    ks.successes = st.successes;
    ks.failures = st.failures;
    ks.rate_limited = st.rate_limited;
    ks.reclaimed = st.reclaimed;
    ks.tokens = st.tokens;
    ks.cancelled = st.cancelled;
    ks.latency_avg = st.ema_latency;
    ks.has_latency = st.has_latency != 0;
    ks.last_used_ago = st.last_used == 0 ? -1.0 : NanosToSeconds(now > st.last_used ? now - st.last_used : 0);
    ks.burst = k.config.burst;
    ks.rate_margin = k.config.margin_ppm == kPoolMargin ? -1.0 : static_cast<double>(k.config.margin_ppm) / 1e6;
    ks.escalation = st.rl_streak;
    ks.circuit_opens = st.circuit_opens;
    static constexpr const char* kCircuitNames[] = {"closed", "open", "half_open", "revoked"};
    ks.circuit = kCircuitNames[static_cast<uint32_t>(st.circuit) & 3];
    uint64_t interval, req_tol, tok_tol;
    double per_token;
    RequestPacing(s, &interval, &req_tol);
    TokenPacing(s, &per_token, &tok_tol);
    if (interval != 0) {
      const uint64_t tat = std::max(st.req_tat, now);
      const uint64_t limit = now + req_tol;
      ks.requests_available = tat > limit ? 0 : static_cast<int64_t>((limit - tat) / interval + 1);
    }
    if (per_token != 0) {
      const double room = static_cast<double>(now + tok_tol) - static_cast<double>(std::max(st.tok_tat, now));
      ks.tokens_available = room > 0 ? static_cast<int64_t>(room / per_token) : 0;
    }
    const uint64_t ready = ReadyAt(s);
    char why[160] = "";
    auto secs = [&](uint64_t at) { return at > now ? NanosToSeconds(at - now) : 0.0; };
    if (st.use == SlotUse::kRemoving) {
      ks.state = keymesh::KeyState::kRemoving;
      std::snprintf(why, sizeof(why), "removed; waits for %u lease(s) to end", st.in_flight);
    } else if (!st.enabled) {
      ks.state = keymesh::KeyState::kDisabled;
      std::snprintf(why, sizeof(why), "disabled by an operator");
    } else if (st.circuit == Circuit::kRevoked) {
      ks.state = keymesh::KeyState::kRevoked;
      std::snprintf(why, sizeof(why), "authentication failed; out until reset or add_key");
    } else if (st.circuit == Circuit::kHalfOpen) {
      ks.state = keymesh::KeyState::kHalfOpen;
      std::snprintf(why, sizeof(why), "circuit half-open: its probe is in flight");
    } else if (st.circuit == Circuit::kOpen && st.cooldown_deadline > now) {
      ks.state = keymesh::KeyState::kExhausted;
      std::snprintf(why, sizeof(why), "circuit open after %u consecutive failures; half-open in %.1fs", st.fail_streak,
                    secs(st.cooldown_deadline));
    } else if (st.circuit == Circuit::kOpen) {
      ks.state = keymesh::KeyState::kProbe;
      std::snprintf(why, sizeof(why), "circuit half-open: the next caller probes it");
    } else if (st.cooldown_deadline > now) {
      ks.state = keymesh::KeyState::kCooling;
      std::snprintf(why, sizeof(why), "rate limited (429 #%u in a row); cooling %.1fs", st.rl_streak,
                    secs(st.cooldown_deadline));
    } else if (ready > now) {
      ks.state = keymesh::KeyState::kThrottled;
      std::snprintf(why, sizeof(why), "request/token budget spent; refills in %.3fs", secs(ready));
    } else if (k.config.max_concurrency != 0 && st.in_flight >= k.config.max_concurrency) {
      ks.state = keymesh::KeyState::kBusy;
      std::snprintf(why, sizeof(why), "at max concurrency %u", k.config.max_concurrency);
    } else {
      ks.state = keymesh::KeyState::kAvailable;
    }
    ks.reason = why;
    const bool available = ks.state == keymesh::KeyState::kAvailable || ks.state == keymesh::KeyState::kBusy ||
                           ks.state == keymesh::KeyState::kThrottled || ks.state == keymesh::KeyState::kProbe;
    ks.health_score = available ? SuccessRate(st) / (1.0 + st.ema_latency) : 0.0;
    t.acquires += st.acquires;
    t.releases += st.successes;
    t.failures += st.failures;
    t.rate_limited += st.rate_limited;
    t.reclaimed += st.reclaimed;
    out.keys.push_back(std::move(ks));
  }
  return out;
}

uint32_t PoolAccess::AvailableCount() {
  Guard g(this);
  const uint64_t now = clock_->NowNanos();
  if (now >= ph_->next_deadline) Sweep(now);
  return ph_->eligible_count;
}

uint64_t PoolAccess::NextDeadline() {
  Guard g(this);
  return ph_->next_deadline;
}

std::optional<uint32_t> PoolAccess::FindByFingerprint(uint64_t fingerprint) {
  Guard g(this);
  for (uint32_t s = 0; s < ph_->slot_high_water; ++s) {
    if (keys_[s].state.use != SlotUse::kFree && keys_[s].config.fingerprint == fingerprint) return s;
  }
  return std::nullopt;
}

std::optional<uint32_t> PoolAccess::FindByName(std::string_view name) {
  Guard g(this);
  return FindByNameLocked(name);
}

void PoolAccess::WakeWaiters() noexcept {
  Guard g(this);
  const uint64_t now = clock_->NowNanos();
  if (now >= ph_->next_deadline) Sweep(now);
  g.RequestWake();
}

Status PoolAccess::CheckConsistency() {
  Guard g(this);
  // Verify I1 and I2 from scratch; a mismatch is a bug.
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
