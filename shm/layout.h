// The shared segment's binary layout.
//
// Every struct here is plain data placed in shared memory and read by several
// processes, possibly built from different compiles of this header. So each is
// standard-layout, trivially copyable, fixed-width, pointer-free (offsets and
// indices only) and checked by static_asserts on size and alignment: a field
// that silently moved would make two processes read each other's bytes as
// garbage. Any change of these structs must bump kLayoutVersion.
//
// Segment (offsets from the start of the mapping; capacities from the header):
//
//   offset                      | content
//   ----------------------------+---------------------------------------------
//   0                           | SegmentHeader (one page)
//   pools_offset                | PoolHeader[max_pools]
//   pool_data_offset + p*stride | pool p's data region:
//     + keys_offset             |   KeySlot[keys_per_pool]         (state)
//     + leases_offset           |   LeaseRecord[leases_per_pool]   (state)
//     + heap_offset             |   HeapEntry[keys_per_pool]       (derived)
//     + heap_pos_offset         |   uint32_t[keys_per_pool]        (derived)
//     + bits_offset             |   uint64_t[keys_per_pool/64]     (derived)
//     + free_offset             |   uint32_t[leases_per_pool]      (derived)
//
// "State" is the truth; "derived" is an index rebuilt from state by the repair
// after an owner died (see pool.h). Everything in a pool's header and data
// region is guarded by that pool's PoolHeader::mutex, except the fields
// declared std::atomic, which are read without it.
#ifndef KEYMESH_SHM_LAYOUT_H_
#define KEYMESH_SHM_LAYOUT_H_

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "shm/capacities.h"
#include "shm/robust_mutex.h"

namespace keymesh::shm {

inline constexpr uint64_t kMagic = 0x314853454D59454Bull;  // "KEYMESH1"
inline constexpr uint32_t kLayoutVersion = 2;
inline constexpr uint32_t kNoSlot = UINT32_MAX;
inline constexpr uint64_t kNever = UINT64_MAX;

enum class SlotUse : uint8_t { kFree = 0, kActive = 1, kRemoving = 2 };
// Circuit breaker of a key:
//   kClosed   -> kOpen      max_failures consecutive failures (reported once)
//   kOpen     -> kHalfOpen  the cooldown ended and one caller got the key as a probe
//   kHalfOpen -> kClosed    the probe succeeded
//   kHalfOpen -> kOpen      the probe failed (longer cooldown) or never finished
//   any       -> kRevoked   an authentication failure (permanent); only reset/add_key
enum class Circuit : uint8_t { kClosed = 0, kOpen = 1, kHalfOpen = 2, kRevoked = 3 };
enum class LeaseState : uint32_t { kFree = 0, kHeld = 1 };

// The mutable state of one key (192 bytes). Journaled before every change.
// The rate-limit buckets (req_tat, tok_tat) are plain GCRA theoretical
// arrival times, so a broker can top them up or overwrite them from outside
// (e.g. from another host's budget) without any other field.
struct SlotState {
  uint32_t in_flight;    // == live LeaseRecords naming this slot
  uint32_t fail_streak;  // consecutive failures; a success resets it
  SlotUse use;
  uint8_t enabled;  // 0: disabled by an operator
  Circuit circuit;
  uint8_t has_latency;         // ema_latency holds at least one real sample
  uint32_t rl_streak;          // consecutive 429s with no success between
  uint64_t cooldown_deadline;  // CLOCK_MONOTONIC ns; key cools while now < it
  uint64_t last_cooldown;      // ns of the last 429 cooldown (escalation base)
  uint64_t last_used;          // CLOCK_MONOTONIC ns of the last acquire, 0 never
  uint64_t last_used_seq;      // PoolHeader::acquire_seq at the last acquire
  uint64_t acquires;
  uint64_t successes;
  uint64_t failures;
  uint64_t rate_limited;
  uint64_t reclaimed;      // leases of this key freed because the holder died/hung
  double ema_latency;      // seconds
  uint64_t pass;           // weighted strategy: stride-scheduling pass
  uint64_t tokens;         // tokens reported by releases
  uint64_t cancelled;      // leases ended without an outcome (abandoned)
  uint64_t req_tat;        // GCRA: next request's theoretical arrival (ns), 0 = fresh
  uint64_t tok_tat;        // GCRA: token bucket's theoretical arrival (ns)
  uint64_t open_cooldown;  // ns the circuit stays open this time (doubles per failed probe)
  uint32_t circuit_opens;  // times the circuit opened
  uint32_t pad0;
  uint64_t reserved[5];
};
static_assert(sizeof(SlotState) == 192, "SlotState is journaled as 192 bytes");

// Configuration of one key, changed only by admin operations (64 bytes).
struct KeyConfig {
  uint64_t fingerprint;      // salted hash of the secret (rotation detection)
  uint32_t weight;           // >= 1
  uint32_t max_concurrency;  // 0: unlimited
  uint32_t rpm;              // 0: unlimited
  uint32_t burst;            // requests granted back to back (0 or 1: smooth pacing)
  uint64_t tpm;              // 0: unlimited
  uint32_t margin_ppm;       // safety margin in millionths; kPoolMargin: the pool's
  uint32_t pad0;
  uint64_t reserved[3];
};
inline constexpr uint32_t kPoolMargin = UINT32_MAX;
static_assert(sizeof(KeyConfig) == 64, "KeyConfig layout");

struct alignas(64) KeySlot {
  SlotState state;
  KeyConfig config;
  char name[kNameCapacity];  // NUL-terminated, unique among non-free slots
};
static_assert(sizeof(KeySlot) == 320 && alignof(KeySlot) == 64, "a KeySlot is 5 cache lines, the hot state first");
static_assert(offsetof(KeySlot, state) == 0 && offsetof(KeySlot, config) == 192 && offsetof(KeySlot, name) == 256,
              "KeySlot field offsets are part of the layout version");

// One acquired key. kHeld records are the truth for in_flight (invariant 4).
struct LeaseRecord {
  LeaseState state;
  uint32_t slot;        // KeySlot index in the same pool
  uint32_t pid;         // holder
  uint32_t seq;         // bumped at every allocation: stale handles are refused
  uint64_t start_time;  // holder's start time (/proc/PID/stat field 22)
  uint64_t acquire_ns;  // CLOCK_MONOTONIC ns when granted
  uint64_t tokens;      // tokens reserved at acquire (debited from the TPM bucket)
  uint32_t flags;       // kLeaseProbe
  uint32_t pad;
};
inline constexpr uint32_t kLeaseProbe = 1;  // the half-open circuit's single probe
static_assert(sizeof(LeaseRecord) == 48, "LeaseRecord layout");

// Priority-index entry; the sort key is stored inline so sifting stays in
// the index's cache lines.
struct HeapEntry {
  uint64_t k1;
  uint64_t k2;
  uint32_t slot;
  uint32_t pad;
};
static_assert(sizeof(HeapEntry) == 24, "HeapEntry layout");

struct PoolConfig {
  uint32_t strategy;          // keymesh::Strategy
  uint32_t max_failures;      // >= 1
  uint64_t default_cooldown;  // ns
  uint64_t acquire_timeout;   // ns
  uint64_t max_lease;         // ns
  uint64_t max_cooldown;      // ns: escalation cap
  uint32_t margin_ppm;        // rate-limit safety margin in millionths
  uint32_t pad0;
  uint64_t reserved[2];
};
static_assert(sizeof(PoolConfig) == 64, "PoolConfig layout");

// Totals of keys that were removed, so pool totals never go backwards.
struct RetiredTotals {
  uint64_t acquires;
  uint64_t successes;
  uint64_t failures;
  uint64_t rate_limited;
  uint64_t reclaimed;
  uint64_t reserved[3];
};
static_assert(sizeof(RetiredTotals) == 64, "RetiredTotals layout");

// The undo record of the one mutation in progress (see pool.cc). While
// `active` is 1 the images hold the pre-change bytes; repair copies them back.
struct Journal {
  std::atomic<uint32_t> active;
  uint32_t flags;  // kJournal* bits: what the images cover
  uint32_t slot;
  uint32_t lease;
  uint32_t key_count;  // pool image (kJournalPool)
  uint32_t slot_high_water;
  uint64_t reserved[5];
  RetiredTotals retired;    // pool image (kJournalPool)
  KeySlot slot_image;       // full slot (kJournalSlotFull) or state (kJournalSlotState)
  LeaseRecord lease_image;  // kJournalLease
  uint64_t reserved2[4];
};
inline constexpr uint32_t kJournalSlotState = 1;
inline constexpr uint32_t kJournalSlotFull = 2;
inline constexpr uint32_t kJournalLease = 4;
inline constexpr uint32_t kJournalPool = 8;
static_assert(sizeof(Journal) % 64 == 0, "Journal layout");

struct alignas(64) PoolHeader {
  RobustMutex mutex;               // guards this header and the pool's data region
  std::atomic<uint32_t> wake_seq;  // futex word: bumped when a key may have become eligible
  std::atomic<uint32_t> sleepers;  // 1 if someone may sleep on wake_seq (set under mutex)
  uint32_t use;                    // 0 free, 1 in use (guarded by SegmentHeader::admin_mutex too)
  uint32_t key_count;              // slots with use != kFree
  uint32_t slot_high_water;        // every non-free slot is < this
  uint32_t rr_cursor;              // round robin: next slot in rotation
  // --- derived (rebuilt by repair) ---
  uint32_t heap_size;
  uint32_t eligible_count;
  uint32_t free_top;        // entries in the free-lease stack
  uint32_t index_strategy;  // strategy the heap is ordered for
  uint64_t next_deadline;   // earliest cooldown deadline still in the future, kNever if none
  // --- state ---
  uint64_t acquire_seq;
  uint64_t vtime;                  // weighted: pass of the last pick
  uint64_t created_mono;           // CLOCK_MONOTONIC ns at creation
  uint64_t created_wall;           // wall-clock ns at creation
  std::atomic<uint64_t> no_key;    // failed acquires, once each (lock-free)
  std::atomic<uint64_t> timeouts;  // acquires that waited and gave up
  PoolConfig config;
  RetiredTotals retired;
  char name[kNameCapacity];
  // Acquire wait-time histogram (keymesh::kWaitBucketBounds), all processes.
  // Plain counters under the mutex; not journaled (a crash may lose one sample).
  uint64_t wait_counts[16];
  uint64_t wait_sum_ns;
  uint64_t wait_count;
  Journal journal;
};
static_assert(std::is_standard_layout_v<PoolHeader>, "PoolHeader is shared plain data");
static_assert(sizeof(PoolHeader) % 64 == 0 && alignof(PoolHeader) == 64, "pool headers sit on their own cache lines");
static_assert(offsetof(PoolHeader, mutex) == 0, "the mutex starts the pool header");

struct alignas(64) SegmentHeader {
  uint64_t magic;
  uint32_t layout_version;
  uint32_t header_size;  // sizeof(SegmentHeader)
  uint64_t segment_size;
  std::atomic<uint32_t> ready;  // 1 once fully laid out by the creator
  uint32_t max_pools;
  uint32_t keys_per_pool;
  uint32_t leases_per_pool;
  uint64_t pools_offset;
  uint64_t pool_data_offset;
  uint64_t pool_data_stride;
  uint64_t keys_offset;  // within a pool's data region
  uint64_t leases_offset;
  uint64_t heap_offset;
  uint64_t heap_pos_offset;
  uint64_t bits_offset;
  uint64_t free_offset;
  std::atomic<uint64_t> generation;  // bumped when keys are added/removed/reconfigured
  uint64_t created_wall;
  uint64_t fingerprint_salt[2];
  std::atomic<uint32_t> broker_pid;  // 0 when no broker owns the segment
  uint32_t reserved0;
  std::atomic<uint64_t> broker_start_time;
  uint64_t reserved[8];
  RobustMutex admin_mutex;  // guards pool allocation (PoolHeader::use, name)
};
static_assert(std::is_standard_layout_v<SegmentHeader>, "SegmentHeader is shared plain data");
static_assert(sizeof(SegmentHeader) <= 4096, "the header fits its page");
static_assert(offsetof(SegmentHeader, magic) == 0 && offsetof(SegmentHeader, layout_version) == 8,
              "magic and version must stay where any version of KeyMesh looks for them");

static_assert(std::is_trivially_copyable_v<KeySlot> && std::is_trivially_copyable_v<LeaseRecord> &&
                  std::is_trivially_copyable_v<HeapEntry>,
              "shm records are copied by memcpy into the journal");
static_assert(std::atomic<uint64_t>::is_always_lock_free && std::atomic<uint32_t>::is_always_lock_free,
              "atomics in shm must be lock-free (a lock-based atomic is per process)");

// Offsets and sizes computed from capacities: the creator writes them into
// the header, an attacher recomputes and compares.
struct LayoutPlan {
  uint64_t pools_offset;
  uint64_t pool_data_offset;
  uint64_t pool_data_stride;
  uint64_t keys_offset;
  uint64_t leases_offset;
  uint64_t heap_offset;
  uint64_t heap_pos_offset;
  uint64_t bits_offset;
  uint64_t free_offset;
  uint64_t segment_size;
};
LayoutPlan PlanLayout(const Capacities& caps) noexcept;

}  // namespace keymesh::shm

#endif  // KEYMESH_SHM_LAYOUT_H_
