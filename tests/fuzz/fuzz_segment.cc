// The segment as untrusted input (security review KM-01): a real segment is
// laid out once per process (two pools, a few keys, some leases held, one
// of them by a holder that is gone), and every input starts from a copy of
// that image. The input then overwrites parts of it, as any process that
// maps the segment could: the SegmentHeader (offsets, counts, capacities),
// a PoolHeader (all but its lock word), the lease records, the index
// (order, tree, bits), the free-lease stack and the slots. Then the
// workers' and the broker's operations run on it, through the creator's
// mapping and through a second one attached by name (Open: the validation
// path). Any operation may fail with a Status; a crash, an abort or a
// sanitizer report is a bug.
//
// Input: a sequence of records
//   [region] [offset lo] [offset hi] [length] [length bytes]
// where region (mod 6) is 0 the SegmentHeader, 1/2 pool p's/q's header,
// 3/4 pool p's/q's data region, 5 run the operations now; the offset is
// taken modulo the region's size. The operations run once more at the end.
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "fuzz_entries.h"
#include "fuzz_env.h"
#include "shm/clock.h"
#include "shm/pool.h"
#include "shm/segment.h"

namespace keymesh::fuzz {
namespace {

constexpr shm::Capacities kCaps{2, 8, 16};
// A holder that is gone (no process has this pid) and one that is this
// process.
constexpr shm::ProcessId kGone{shm::RobustMutex::kPidMask - 1, 7};

struct SegmentEnv {
  std::string name;
  std::unique_ptr<shm::Segment> segment;
  uint32_t pools[2] = {0, 0};
  std::vector<uint8_t> image;  // the laid-out segment, restored before every input
  shm::LeaseHandle mine[2];    // a lease this process holds in each pool
  uint64_t start_ns = 0;       // the fake clock's start

  SegmentEnv() {
    const char* dir = std::getenv("KEYMESH_FUZZ_DIR");
    // Under scripts/fuzz the name holds no pid (same length every run), and
    // scripts/fuzz removes the segment named in kmfuzz/segment-name if the
    // process dies.
    name = dir != nullptr && *dir ? "keymesh-fuzz-segment" : "keymesh-fuzz-segment-" + std::to_string(::getpid());
    if (dir != nullptr && *dir) {
      const std::string d = std::string(dir) + "/kmfuzz";
      std::filesystem::create_directories(d);
      std::ofstream(d + "/segment-name") << name << "\n";
    }
    (void)shm::Segment::Remove(name);
    Result<std::unique_ptr<shm::Segment>> seg = shm::Segment::CreateNamed(name, kCaps);
    if (!seg.ok()) {
      std::fprintf(stderr, "fuzz_segment: %s\n", seg.status().ToString().c_str());
      std::abort();
    }
    segment = std::move(seg).value();
    shm::FakeClock clock;
    start_ns = clock.NowNanos();
    PoolOptions p;
    p.strategy = Strategy::kLeastBusy;
    p.max_failures = 2;
    p.max_lease_seconds = 5;
    PoolOptions q = p;
    q.strategy = Strategy::kWeighted;
    pools[0] = Must(segment->CreatePool("p", static_cast<uint32_t>(p.strategy), shm::ToPoolConfig(p)));
    pools[1] = Must(segment->CreatePool("q", static_cast<uint32_t>(q.strategy), shm::ToPoolConfig(q)));
    PinSegment(*segment);  // before the keys: their fingerprints use the salt
    shm::PoolAdmin a(*segment, pools[0], clock), b(*segment, pools[1], clock);
    AddKey(a, "a", 1, 0, 0);
    AddKey(a, "b", 2, 2, 600);
    AddKey(a, "c", 1, 0, 0);
    AddKey(a, "d", 3, 1, 0);
    AddKey(b, "e", 3, 1, 0);
    AddKey(b, "f", 1, 0, 60);
    if (!a.RemoveKey("c").ok()) std::abort();
    mine[0] = Must(a.TryAcquire());
    (void)Must(a.TryAcquire(nullptr, nullptr, kGone));
    (void)Must(a.TryAcquire(nullptr, nullptr, kGone));
    clock.AdvanceSeconds(10);  // these leases outlive max_lease by the time the input runs
    mine[1] = Must(b.TryAcquire());
    (void)Must(b.TryAcquire(nullptr, nullptr, kGone));
    (void)a.Release(Must(a.TryAcquire()), shm::Outcome{OutcomeKind::kRateLimited, std::nullopt, 0, 30.0, false});
    image.assign(segment->base(), segment->base() + segment->size());
  }
  ~SegmentEnv() {
    segment.reset();
    (void)shm::Segment::Remove(name);
  }

  template <typename T>
  static T Must(Result<T> r) {
    if (!r.ok()) {
      std::fprintf(stderr, "fuzz_segment set-up: %s\n", r.status().ToString().c_str());
      std::abort();
    }
    return std::move(r).value();
  }
  static void AddKey(shm::PoolAdmin& pool, const char* name, uint32_t weight, uint32_t cap, uint32_t rpm) {
    shm::KeyDefinition def;
    def.name = name;
    def.fingerprint = 1000 + static_cast<uint64_t>(name[0]);
    def.weight = weight;
    def.max_concurrency = cap;
    def.rpm = rpm;
    (void)Must(pool.AddKey(def));
  }
};

SegmentEnv& Env() {
  static SegmentEnv env;
  return env;
}

// The byte ranges an input may overwrite.
struct Region {
  uint8_t* begin;
  size_t size;
  size_t skip;  // leading bytes left alone (a lock word)
};

Region RegionOf(SegmentEnv& env, uint8_t which) {
  shm::Segment& seg = *env.segment;
  const shm::LayoutPlan& plan = seg.layout().plan;
  switch (which) {
    case 0: {
      // All of the header but its admin lock word (a planted live pid there
      // blocks pool creation by design; the pool locks are fuzzed below).
      return Region{seg.base(), offsetof(shm::SegmentHeader, admin_mutex), 0};
    }
    case 1:
    case 2:
      return Region{reinterpret_cast<uint8_t*>(seg.pool_header(env.pools[which - 1])), sizeof(shm::PoolHeader),
                    sizeof(shm::RobustMutex)};
    default: return Region{seg.pool_data(env.pools[which - 3]), plan.pool_data_stride, 0};
  }
}

// Every operation of a worker and of the broker, on each pool of `seg`.
void RunOperations(SegmentEnv& env, const shm::Segment& seg, shm::FakeClock& clock, bool creator) {
  for (int p = 0; p < 2; ++p) {
    std::optional<uint32_t> index = seg.FindPool(p == 0 ? "p" : "q");
    if (!index) continue;
    shm::PoolAdmin pool(seg, *index, clock);
    (void)pool.CheckConsistency();
    Result<shm::LeaseHandle> h = pool.TryAcquire(nullptr, nullptr, shm::Self(), 10);
    if (creator && *index == env.pools[p]) (void)pool.Release(env.mine[p], shm::Outcome{});
    if (h.ok()) (void)pool.Release(*h, shm::Outcome{OutcomeKind::kFailure, 0.5, 3, std::nullopt, false});
    (void)pool.ReclaimProcess(kGone);
    (void)pool.ReclaimExpired();
    std::vector<shm::ProcessId> holders;
    (void)pool.Holders(&holders);
    (void)pool.Snapshot();
    std::vector<shm::ExportedKey> exported;
    (void)pool.ExportKeyStates(&exported);
    std::optional<uint32_t> slot;
    (void)pool.FindByName("b", &slot);
    std::string name;
    if (slot) (void)pool.KeyName(*slot, &name);
    (void)pool.KeyName(5, &name);
    uint32_t n = 0;
    (void)pool.AvailableCount(&n);
    uint64_t deadline = 0;
    (void)pool.NextDeadline(&deadline);
    (void)pool.SweepAndWake();
    shm::KeyDefinition def;
    def.name = "n";
    def.fingerprint = 77;
    (void)pool.AddKey(def);
    (void)pool.RemoveKey("a");
    (void)pool.SetEnabled("b", false);
    (void)pool.ResetKey("d");
    (void)pool.RemoveKey("n");
    // The mesh job's calls: shares (planted share fields meet these too),
    // remote state merged, the change counter.
    shm::KeyShare share;
    share.active = true;
    share.rpm = 0.5;
    share.tpm = 100;
    share.burst = UINT32_MAX;
    uint32_t unknown = 0;
    (void)pool.SetShares({{"a", share}, {"b", shm::KeyShare{true, 0, 0, 0}}, {"zz", share}}, &unknown);
    shm::RemoteKeyState remote;
    remote.cool_until = clock.NowNanos() + 5'000'000'000;
    remote.open_until = shm::kNever;
    remote.enabled = true;
    (void)pool.MergeRemote("c", remote);
    remote.close_circuit = true;
    remote.reset = true;
    (void)pool.MergeRemote("d", remote);
    (void)pool.EventsSeq();
    std::optional<uint32_t> by_fp;
    (void)pool.FindByFingerprint(77, &by_fp);
    clock.AdvanceSeconds(1);
    Result<shm::LeaseHandle> again = pool.TryAcquire();
    if (again.ok())
      (void)pool.Release(*again, shm::Outcome{OutcomeKind::kCancelled, std::nullopt, 0, std::nullopt, false});
    (void)pool.ClearShares();
    (void)pool.CheckConsistency();
  }
}

// The attach path: a second mapping of the same segment, validated by Open.
void AttachAndRun(SegmentEnv& env, shm::FakeClock& clock) {
  Result<std::unique_ptr<shm::Segment>> other = shm::Segment::Open(env.name);
  if (!other.ok()) return;  // refused: a clear error
  RunOperations(env, **other, clock, false);
}

}  // namespace

void SegmentInput(const uint8_t* data, size_t size) {
  SegmentEnv& env = Env();
  std::memcpy(env.segment->base(), env.image.data(), env.image.size());
  shm::FakeClock clock(env.start_ns + 10 * shm::kNanosPerSecond);
  size_t i = 0;
  int runs = 0;
  while (i < size && runs < 3) {
    const uint8_t which = data[i] % 6;
    if (which == 5) {
      RunOperations(env, *env.segment, clock, true);
      ++runs;
      ++i;
      continue;
    }
    if (i + 4 > size) break;
    const Region r = RegionOf(env, which);
    const size_t offset = (data[i + 1] | size_t{data[i + 2]} << 8) % r.size;
    size_t len = data[i + 3];
    i += 4;
    len = std::min({len, size - i, r.size - offset});
    for (size_t k = 0; k < len; ++k) {
      if (offset + k >= r.skip) r.begin[offset + k] = data[i + k];
    }
    i += len;
  }
  RunOperations(env, *env.segment, clock, true);
  AttachAndRun(env, clock);
}

}  // namespace keymesh::fuzz
