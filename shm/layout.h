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
//     + order_offset            |   SortKey[keys_per_pool]         (derived)
//     + tree_offset             |   uint32_t[pow2 >= keys_per_pool] (derived)
//     + bits_offset             |   uint64_t[keys_per_pool/64]     (derived)
//     + free_offset             |   uint32_t[leases_per_pool]      (derived)
//
// "State" is the truth; "derived" is an index rebuilt from state by the repair
// after an owner died (PoolCore::Repair). Everything in a pool's header and
// data region is guarded by that pool's PoolHeader::mutex, except the fields
// declared std::atomic, which are read without it.
//
// Cache lines: a worker's acquire+release pair writes the pool header's first
// line (the lock word and the counters it always changes), one line of
// undo-journal entries, the key's first line (SlotState's hot half), one
// lease record, one free-stack entry, the key's sort key and the wait
// histogram's line. Everything a pair only reads (configs, deadlines) sits
// in other lines, so two processes on two cores move as few lines between
// them as the work allows.
#ifndef KEYMESH_SHM_LAYOUT_H_
#define KEYMESH_SHM_LAYOUT_H_

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "keymesh/types.h"
#include "shm/capacities.h"
#include "shm/robust_mutex.h"

namespace keymesh::shm {

inline constexpr uint64_t kMagic = 0x314853454D59454Bull;  // "KEYMESH1"
// 4: KeyConfig's mesh share fields, PoolHeader::events_seq and share_until. A worker
// built before them would pace a key at its whole configured rate while a
// mesh broker gave this host only a share of it: it must refuse the segment.
// 5: PoolHeader::wait_clock_ms (was padding): a worker built before it would
// queue for a mesh share without the mesh job seeing it wait.
inline constexpr uint32_t kLayoutVersion = 5;
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

// The mutable state of one key (192 bytes, three cache lines). Every change
// is undo-journaled (struct Journal) except in_flight, which the repair
// recounts from the lease records.
// The first line holds all that a successful acquire+release of a key
// without limits writes; the rest is written by failures, 429s, budgets and
// the weighted strategy, and read by eligibility checks.
// The rate-limit buckets (req_tat, tok_tat) are plain GCRA theoretical
// arrival times, so a broker can top them up or overwrite them from outside
// (e.g. from another host's budget) without any other field.
struct SlotState {
  // --- line 0: the fast path ---
  uint32_t in_flight;    // == live LeaseRecords naming this slot (derived: recounted by repair)
  uint32_t fail_streak;  // consecutive failures; a success resets it
  SlotUse use;
  uint8_t enabled;  // 0: disabled by an operator
  Circuit circuit;
  uint8_t has_latency;  // ema_latency holds at least one real sample
  uint32_t rl_streak;   // consecutive 429s with no success between
  uint64_t acquires;
  uint64_t successes;
  uint64_t last_used;      // CLOCK_MONOTONIC ns of the last acquire, 0 never
  uint64_t last_used_seq;  // PoolHeader::acquire_seq at the last acquire
  double ema_latency;      // seconds
  uint64_t tokens;         // tokens reported by releases
  // --- line 1 ---
  uint64_t cooldown_deadline;  // CLOCK_MONOTONIC ns; key cools while now < it
  uint64_t last_cooldown;      // ns of the last 429 cooldown (escalation base)
  uint64_t failures;
  uint64_t rate_limited;
  uint64_t reclaimed;  // leases of this key freed because the holder died/hung
  uint64_t cancelled;  // leases ended without an outcome (abandoned)
  uint64_t pass;       // weighted strategy: stride-scheduling pass
  uint64_t req_tat;    // GCRA: next request's theoretical arrival (ns), 0 = fresh
  // --- line 2 ---
  uint64_t tok_tat;        // GCRA: token bucket's theoretical arrival (ns)
  uint64_t open_cooldown;  // ns the circuit stays open this time (doubles per failed probe)
  uint32_t circuit_opens;  // times the circuit opened
  uint32_t pad0;
  uint64_t reserved[5];
};
static_assert(sizeof(SlotState) == 192, "SlotState is three cache lines");
static_assert(offsetof(SlotState, tokens) + sizeof(uint64_t) == 64 && offsetof(SlotState, cooldown_deadline) == 64,
              "everything a plain acquire+release writes is in the slot's first cache line");

// Configuration of one key, changed only by admin operations (64 bytes).
struct KeyConfig {
  uint64_t fingerprint;      // salted hash of the secret (rotation detection)
  uint32_t weight;           // >= 1
  uint32_t max_concurrency;  // 0: unlimited
  uint32_t rpm;              // 0: unlimited
  uint32_t burst;            // requests granted back to back (0 or 1: smooth pacing)
  uint64_t tpm;              // 0: unlimited
  uint32_t margin_ppm;       // safety margin in millionths; kPoolMargin: the pool's
  // The mesh (several hosts share the key's limits): written only by the
  // broker's mesh job (PoolAdmin::SetShares). While share_flags has
  // kShareActive, the key is paced at this host's share instead of rpm, tpm
  // and burst, in each dimension the key limits (rpm or tpm != 0); a share
  // of 0 in a limited dimension keeps the key out of rotation here. Any
  // value is read as hostile (rate_budget.cc saturates).
  uint32_t share_flags;      // kShareActive
  uint64_t share_rpm_milli;  // this host's requests per minute, in thousandths
  uint64_t share_tpm;        // this host's tokens per minute
  uint32_t share_burst;      // this host's burst (0 or 1: smooth pacing)
  uint32_t pad1;
};
inline constexpr uint32_t kPoolMargin = UINT32_MAX;
inline constexpr uint32_t kShareActive = 1;
static_assert(sizeof(KeyConfig) == 64 && offsetof(KeyConfig, share_flags) == 36 &&
                  offsetof(KeyConfig, share_rpm_milli) == 40 && offsetof(KeyConfig, share_tpm) == 48 &&
                  offsetof(KeyConfig, share_burst) == 56,
              "KeyConfig layout");

struct alignas(64) KeySlot {
  SlotState state;
  KeyConfig config;
  char name[kNameCapacity];  // NUL-terminated, unique among non-free slots
};
static_assert(sizeof(KeySlot) == 320 && alignof(KeySlot) == 64, "a KeySlot is 5 cache lines, the hot state first");
static_assert(offsetof(KeySlot, state) == 0 && offsetof(KeySlot, config) == 192 && offsetof(KeySlot, name) == 256,
              "KeySlot field offsets are part of the layout version");

// One acquired key. kHeld records are the truth for in_flight (invariant I1).
// A free record's fields other than `seq` mean nothing; `state` and `seq`
// share the first 8-byte word, which is all an acquire must journal.
struct alignas(64) LeaseRecord {
  LeaseState state;
  uint32_t seq;         // bumped at every allocation: stale handles are refused
  uint32_t slot;        // KeySlot index in the same pool
  uint32_t pid;         // holder
  uint64_t start_time;  // holder's start time (/proc/PID/stat field 22)
  uint64_t acquire_ns;  // CLOCK_MONOTONIC ns when granted
  uint64_t tokens;      // tokens reserved at acquire (debited from the TPM bucket)
  uint32_t flags;       // kLeaseProbe
  uint32_t pad;
  uint64_t reserved[2];
};
inline constexpr uint32_t kLeaseProbe = 1;  // the half-open circuit's single probe
static_assert(sizeof(LeaseRecord) == 64 && offsetof(LeaseRecord, seq) == 4,
              "a lease record is one cache line; state and seq are one journal word");

// The sort key of an eligible slot in the eligibility index: (in_flight,
// last_used_seq) for least_busy, (pass, 0) for weighted.
struct SortKey {
  uint64_t k1;
  uint64_t k2;
};
static_assert(sizeof(SortKey) == 16, "SortKey layout");

struct PoolConfig {
  uint32_t strategy;          // keymesh::Strategy
  uint32_t max_failures;      // >= 1
  uint64_t default_cooldown;  // ns
  uint64_t acquire_timeout;   // ns
  uint64_t max_lease;         // ns
  uint64_t max_cooldown;      // ns: escalation cap
  uint32_t margin_ppm;        // rate-limit safety margin in millionths
  uint32_t pad0;
  // Leases one holder process may have at once; 0: half the lease table
  // (PoolCore's default quota). Once a reserved word, and zero in segments
  // laid out before it had a name, so those get the default.
  uint32_t max_leases_per_process;
  uint32_t pad1;
  uint64_t reserved[1];
};
static_assert(sizeof(PoolConfig) == 64 && offsetof(PoolConfig, max_leases_per_process) == 48, "PoolConfig layout");

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

// The undo journal of the one mutation in progress on a pool.
//
// Crash story. A process may be killed at any instruction, also inside a
// critical section; the next locker then finds the lock's holder dead
// (robust_mutex.h) and runs PoolCore::Repair before anything else. So every
// change of state (KeySlot, LeaseRecord, the pool header's state fields) is
// made through PoolCore::Set and friends, which first append an undo entry
// {offset of the 8-byte word, its old value} here and then bump
// PoolHeader::undo_count, and only then write the word. Both stores are
// ordered by a compiler fence (x86 keeps store order; a kill lands between
// instructions, so what matters is the order the compiler emits). An entry
// not yet counted describes a word not yet written; a counted one holds the
// word's value from before the operation (or from before an earlier entry of
// it: repair restores in reverse order). The operation commits by storing
// undo_count = 0. Repair restores every counted entry, newest first, and
// then rebuilds everything derived (in_flight, free-lease stack, index,
// next_deadline) from the restored state: a crash leaves either the state
// from before the operation or the state after it, never a mixture.
// Fields that are deliberately not journaled: in_flight and the derived
// arrays (recomputed), acquire_seq and vtime (any larger value serves), the
// wait histogram (a crash may lose one sample), rr_cursor (any value is a
// valid rotation point).
// An admin operation that rewrites a whole slot (a key created or retired)
// first copies it into slot_image and appends the entry {kUndoSlotImage,
// slot}. Entries are only ever trusted after bounds checks: an offset must
// name an aligned word inside this pool's own header or data region.
struct UndoEntry {
  uint64_t offset;  // bytes from the segment's start to an 8-byte aligned word, or kUndoSlotImage
  uint64_t old;     // the word's value before the change (the slot index for kUndoSlotImage)
};
inline constexpr uint64_t kUndoSlotImage = UINT64_MAX;
inline constexpr uint32_t kUndoCapacity = 32;  // entries of one operation at most (a bug beyond)
struct alignas(64) Journal {
  UndoEntry entries[kUndoCapacity];  // the first PoolHeader::undo_count are in effect
  KeySlot slot_image;
};
static_assert(sizeof(Journal) % 64 == 0, "Journal layout");

// PoolHeader::use.
enum class PoolUse : uint32_t { kFree = 0, kInUse = 1 };

// A waiting acquire adds its time to PoolHeader::wait_clock_ms at least this
// often (it wakes only to count; a change or the end of its wait makes it
// look at the keys again).
inline constexpr uint64_t kWaitClockNs = 50'000'000;

struct alignas(64) PoolHeader {
  // --- line 0: the lock and what every acquire or release writes ---
  RobustMutex mutex;                 // guards this header and the pool's data region
  std::atomic<uint32_t> undo_count;  // Journal entries in effect; 0: no mutation in progress
  std::atomic<uint32_t> wake_seq;    // futex word: bumped when a key may have become eligible
  std::atomic<uint32_t> sleepers;    // 1 if someone may sleep on wake_seq (set under mutex)
  uint32_t free_top;                 // derived: entries in the free-lease stack
  uint32_t tree_leaves;              // derived: leaves of the index's tournament tree (0: unordered)
  uint32_t eligible_count;           // derived
  uint32_t rr_cursor;                // round robin: next slot in rotation
  uint32_t key_count;                // slots with use != kFree
  uint32_t slot_high_water;          // every non-free slot is < this
  uint32_t index_strategy;           // derived: strategy the index is ordered for
  uint32_t scan_idle;                // derived: the index's mask of idle eligible slots (scan mode)
  uint64_t acquire_seq;              // stamps acquires (least_busy's LRU order)
  uint64_t next_deadline;            // derived: earliest deadline still in the future, kNever if none
  // --- line 1 ---
  // Acquire wait-time histogram (keymesh::kWaitBucketBounds), all processes.
  // Plain counters under the mutex; not journaled (a crash may lose one sample).
  uint64_t wait_counts[kWaitBuckets];
  uint64_t wait_sum_ns;
  // --- cold ---
  PoolUse use;  // written once by CreatePool (under SegmentHeader::admin_mutex)
  // Milliseconds the pool's acquires have waited in all, those still
  // waiting included: each waiter adds its own time as it goes (at least
  // every kWaitClockNs), so a waiter that died adds nothing more. Lock-free;
  // wraps at 2^32 (49 days of waiting): read as the difference of two
  // readings. The mesh job's sign of workers queueing for a share, before
  // any of them is granted.
  std::atomic<uint32_t> wait_clock_ms;
  uint64_t vtime;                  // weighted: pass of the last pick
  uint64_t created_mono;           // CLOCK_MONOTONIC ns at creation (write-once)
  uint64_t created_wall;           // wall-clock ns at creation (write-once)
  std::atomic<uint64_t> no_key;    // failed acquires, once each (lock-free)
  std::atomic<uint64_t> timeouts;  // acquires that waited and gave up (lock-free)
  // Bumped (release) by whoever makes a change another host must learn: a
  // key's cooldown deadline moved later (a 429, Retry-After, provider
  // limits), a circuit state change, an enable/disable, a reset. The mesh
  // job polls it (PoolUser::EventsSeq) to publish without scanning on every
  // tick; a merge of remote state (MergeRemote) does not bump it. Not
  // journaled: a bump whose change a crash undid only costs one rescan.
  std::atomic<uint64_t> events_seq;
  // The mesh: CLOCK_MONOTONIC ns until which the broker vouches for the
  // keys' shares (0: no deadline). The broker's mesh job renews it at every
  // refresh; a host whose broker died stops granting shared keys once it
  // passes (its lease at Redis ends then and the others get its share).
  // Written lock-free by the broker, read by every acquire of a key with a
  // share.
  std::atomic<uint64_t> share_until;
  PoolConfig config;  // written field by field under the mutex, not journaled: each
                      // field is one aligned store, and a crash between two leaves
                      // a config that is valid field by field (the next SetOptions
                      // rewrites it whole)
  RetiredTotals retired;
  char name[kNameCapacity];  // write-once, before `use` (CreatePool)
  Journal journal;
};
static_assert(std::is_standard_layout_v<PoolHeader>, "PoolHeader is shared plain data");
static_assert(sizeof(PoolHeader) == 448 + sizeof(Journal) && alignof(PoolHeader) == 64,
              "PoolHeader's size is pinned: two builds must agree on every pool's offset");
static_assert(offsetof(PoolHeader, mutex) == 0 && offsetof(PoolHeader, next_deadline) + 8 == 64 &&
                  offsetof(PoolHeader, wait_counts) == 64 &&
                  offsetof(PoolHeader, events_seq) + 16 == offsetof(PoolHeader, config),
              "the lock shares its cache line with what the fast path always writes");

// The segment's first page. Written once by the creator before `ready` = 1
// and read-only afterwards, except where a field says who writes it.
// Attachers check magic, layout version, sizes and offsets before trusting
// any of it (Segment::Validate).
struct alignas(64) SegmentHeader {
  uint64_t magic;
  uint32_t layout_version;
  uint32_t header_size;  // sizeof(SegmentHeader)
  uint64_t segment_size;
  std::atomic<uint32_t> ready;  // 1 once fully laid out by the creator
  uint32_t max_pools;
  uint32_t keys_per_pool;
  uint32_t leases_per_pool;
  uint32_t pool_header_size;  // sizeof(PoolHeader): two builds must agree on it
  uint32_t pad0;
  uint64_t pools_offset;
  uint64_t pool_data_offset;
  uint64_t pool_data_stride;
  uint64_t keys_offset;  // within a pool's data region
  uint64_t leases_offset;
  uint64_t order_offset;
  uint64_t tree_offset;
  uint64_t bits_offset;
  uint64_t free_offset;
  std::atomic<uint64_t> generation;  // bumped (by the broker or an embedded pool's owner) when keys change
  uint64_t created_wall;
  // The salt of key fingerprints. Written by the creator, and rewritten by a
  // broker that restores a state file into a fresh segment, before any key
  // is added (recovery.cc), so fingerprints match the persisted ones.
  uint64_t fingerprint_salt[2];
  std::atomic<uint32_t> broker_pid;  // the broker that owns the segment (written at its start and stop), 0 none
  uint32_t reserved0;
  std::atomic<uint64_t> broker_start_time;  // with broker_pid
  uint64_t reserved[8];
  RobustMutex admin_mutex;  // guards pool allocation (PoolHeader::use, name)
};
static_assert(std::is_standard_layout_v<SegmentHeader>, "SegmentHeader is shared plain data");
static_assert(sizeof(SegmentHeader) <= 4096, "the header fits its page");
static_assert(offsetof(SegmentHeader, magic) == 0 && offsetof(SegmentHeader, layout_version) == 8,
              "magic and version must stay where any version of KeyMesh looks for them");

static_assert(std::is_trivially_copyable_v<KeySlot> && std::is_trivially_copyable_v<LeaseRecord> &&
                  std::is_trivially_copyable_v<SortKey>,
              "shm records are copied by memcpy (the journal's slot image, the repair)");
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
  uint64_t order_offset;
  uint64_t tree_offset;
  uint64_t bits_offset;
  uint64_t free_offset;
  uint64_t segment_size;
};
LayoutPlan PlanLayout(const Capacities& caps) noexcept;

}  // namespace keymesh::shm

#endif  // KEYMESH_SHM_LAYOUT_H_
