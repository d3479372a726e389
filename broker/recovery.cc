#include "broker/recovery.h"

#include <fcntl.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstring>

#include "broker/atomic_file.h"
#include "broker/log.h"
#include "broker/pool_registry.h"
#include "common/text.h"
#include "shm/clock.h"
#include "shm/pool.h"
#include "shm/process_id.h"

namespace keymesh::broker {
namespace {

ReconcileHook g_reconcile_hook = nullptr;

const shm::ExportedKey* FindExported(const std::vector<shm::ExportedKey>& keys, std::string_view name) {
  for (const auto& k : keys) {
    if (k.name == name) return &k;
  }
  return nullptr;
}

// State to put back after re-admitting a changed key: everything when the
// secret is the same, counters only (and the operator's disable) when it
// was rotated.
shm::RestoredState Carried(const shm::RestoredState& old, bool same_secret) {
  if (same_secret) return old;
  shm::RestoredState r;
  r.enabled = old.enabled;
  r.acquires = old.acquires;
  r.successes = old.successes;
  r.failures = old.failures;
  r.rate_limited = old.rate_limited;
  r.reclaimed = old.reclaimed;
  r.tokens = old.tokens;
  r.has_latency = old.has_latency;
  r.ema_latency = old.ema_latency;
  return r;
}

Status ReconcilePool(shm::Segment& segment, const PoolConfigEntry& p, bool* changed) {
  std::optional<uint32_t> index = segment.FindPool(p.name);
  if (!index) {
    Result<uint32_t> created =
        segment.CreatePool(p.name, static_cast<uint32_t>(p.options.strategy), shm::ToPoolConfig(p.options));
    if (!created.ok()) return created.status();
    index = *created;
    Log(LogLevel::kInfo, "pool_created", {{"pool", p.name}});
  }
  shm::PoolAdmin access(segment, *index);
  access.set_lock_timeout(kBrokerLockTimeoutNs);  // a stuck pool fails the reload, never blocks it (KM-05)
  if (!shm::SamePoolConfig(access.header()->config, shm::ToPoolConfig(p.options))) {
    Status st = access.SetOptions(p.options);
    if (!st.ok()) return st;
    Log(LogLevel::kInfo, "pool_options_changed",
        {{"pool", p.name}, {"strategy", std::string(StrategyName(p.options.strategy))}});
  }
  Result<PoolStatus> snap = access.Snapshot();
  if (!snap.ok()) return snap.status();
  for (const KeySpec& k : p.keys) {
    const uint64_t fp = segment.Fingerprint(k.secret);
    const KeyStatus* cur = nullptr;
    for (const KeyStatus& ks : snap->keys) {
      if (ks.name == k.name) cur = &ks;
    }
    shm::KeyDefinition def;
    def.name = k.name;
    def.fingerprint = fp;
    def.weight = k.weight;
    def.max_concurrency = k.max_concurrency;
    def.rpm = k.rpm;
    def.tpm = k.tpm;
    def.burst = k.burst;
    def.margin_ppm = shm::KeyMarginPpm(k.rate_margin);
    const bool active = cur != nullptr && cur->state != KeyState::kRemoving;
    if (active && cur->fingerprint == fp && cur->weight == k.weight && cur->max_concurrency == k.max_concurrency &&
        cur->rpm == k.rpm && cur->tpm == k.tpm && cur->burst == k.burst &&
        shm::KeyMarginPpm(cur->rate_margin) == def.margin_ppm) {
      continue;  // unchanged: not touched at all
    }
    if (g_reconcile_hook != nullptr) g_reconcile_hook(p.name, k.name);
    if (active) {
      // In place, one critical section: whatever workers set since the
      // snapshot (a 429, a revocation, a disable) stays.
      Status st = access.Reconfigure(def);
      if (!st.ok()) {
        return Status(st.code(), "pool " + Quoted(p.name) + " key " + Quoted(k.name) + ": " + st.message());
      }
    } else {
      Result<shm::AddKeyResult> added = access.AddKey(def);
      if (!added.ok()) {
        return Status(added.status().code(),
                      "pool " + Quoted(p.name) + " key " + Quoted(k.name) + ": " + added.status().message());
      }
    }
    *changed = true;
    Log(LogLevel::kInfo, cur == nullptr ? "key_added" : "key_updated",
        {{"pool", p.name}, {"key", k.name}, {"secret", MaskSecret(k.secret)}});
  }
  for (const KeyStatus& ks : snap->keys) {
    if (ks.state == KeyState::kRemoving) continue;
    bool wanted = false;
    for (const KeySpec& k : p.keys) wanted = wanted || k.name == ks.name;
    if (wanted) continue;
    Status st = access.RemoveKey(ks.name);
    if (!st.ok() && st.code() != Code::kUnknownKey) return st;
    *changed = true;
    Log(LogLevel::kInfo, "key_removed",
        {{"pool", p.name}, {"key", ks.name}, {"in_flight", std::to_string(ks.in_flight)}});
  }
  return Status::Ok();
}

}  // namespace

namespace {
constexpr std::string_view kSegmentPrefix = "keymesh-";
constexpr size_t kSegmentHexDigits = 32;
}  // namespace

Result<std::string> NewSegmentName() {
  uint8_t bytes[kSegmentHexDigits / 2];
  size_t got = 0;
  while (got < sizeof(bytes)) {
    const ssize_t n = ::getrandom(bytes + got, sizeof(bytes) - got, 0);
    if (n < 0 && errno == EINTR) continue;
    // Never fall back to a predictable name: that would reopen KM-02.
    if (n <= 0) {
      return Status(Code::kSegmentError,
                    std::string("cannot draw a random segment name: getrandom: ") + std::strerror(n < 0 ? errno : EIO));
    }
    got += static_cast<size_t>(n);
  }
  return std::string(kSegmentPrefix) + Hex(std::string_view(reinterpret_cast<const char*>(bytes), sizeof(bytes)));
}

bool IsSegmentName(std::string_view name) {
  if (name.size() != kSegmentPrefix.size() + kSegmentHexDigits ||
      name.substr(0, kSegmentPrefix.size()) != kSegmentPrefix)
    return false;
  for (char c : name.substr(kSegmentPrefix.size())) {
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
  }
  return true;
}

std::string SegmentNameFileFor(const std::string& socket_path) { return socket_path + ".segment"; }

std::optional<std::string> ReadSegmentName(const std::string& file) {
  const int fd = ::open(file.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) {
    if (errno != ENOENT) {
      Log(LogLevel::kWarn, "segment_name_ignored", {{"file", file}, {"reason", std::strerror(errno)}});
    }
    return std::nullopt;
  }
  struct stat st {};
  std::string reason;
  char buf[128];
  ssize_t n = -1;
  if (::fstat(fd, &st) != 0) {
    reason = std::strerror(errno);
  } else if (!S_ISREG(st.st_mode)) {
    reason = "not a regular file";
  } else if (st.st_uid != ::geteuid()) {
    reason =
        "owned by uid " + std::to_string(st.st_uid) + ", not by this broker (uid " + std::to_string(::geteuid()) + ")";
  } else if ((st.st_mode & 0022) != 0) {
    reason = "writable by other users";
  } else {
    n = ::read(fd, buf, sizeof(buf));
    if (n < 0) reason = std::strerror(errno);
  }
  ::close(fd);
  if (reason.empty()) {
    std::string_view text(buf, static_cast<size_t>(n));
    if (!text.empty() && text.back() == '\n') text.remove_suffix(1);
    if (IsSegmentName(text)) return std::string(text);
    reason = "does not hold a segment name: " + Quoted(text);
  }
  Log(LogLevel::kWarn, "segment_name_ignored", {{"file", file}, {"reason", reason}});
  return std::nullopt;
}

Status RecordSegmentName(const std::string& file, const std::string& name) {
  return WriteFileAtomically(file, name + "\n", 0640, Durability::kDurable);
}

Status CheckPools(shm::Segment& segment) {
  const uint64_t deadline = shm::MonotonicNowNanos() + kPoolProbeNanos;
  for (uint32_t i = 0; i < segment.capacities().max_pools; ++i) {
    shm::PoolHeader* ph = segment.pool_header(i);
    if (ph->use != shm::PoolUse::kInUse) continue;
    shm::PoolAdmin access(segment, i);
    const std::string name = std::string(ph->name, strnlen(ph->name, sizeof(ph->name)));
    // A dead holder (also a zombie) is taken over, and the pool repaired,
    // by the lock in CheckConsistency. A live one gets until the deadline:
    // a worker is done in nanoseconds, a stopped or hostile one never is,
    // and CheckConsistency's lock would wait for it for ever.
    const uint32_t holder = ph->mutex.HolderPid();
    const std::optional<uint64_t> start = holder != 0 ? shm::ReadStartTime(static_cast<pid_t>(holder)) : std::nullopt;
    if (start && shm::IsAlive(shm::ProcessId{holder, *start})) {
      const shm::LockOutcome o = ph->mutex.LockUntil(deadline);
      if (o == shm::LockOutcome::kTimedOut) {
        return Status(Code::kSegmentError, "pool " + Quoted(name) + ": its lock has been held by pid " +
                                               std::to_string(holder) + " for more than " +
                                               std::to_string(kPoolProbeNanos / 1000000) + " ms");
      }
      // kOwnerDied: the holder died while we waited, and only the lock's
      // own repair (in PoolCore) may be trusted to undo its half-done
      // operation; this process now holds the lock unrepaired. Give the
      // segment up rather than guess (rare: a death inside this window).
      ph->mutex.Unlock();
      if (o == shm::LockOutcome::kOwnerDied) {
        return Status(Code::kSegmentError, "pool " + Quoted(name) + ": its lock holder (pid " + std::to_string(holder) +
                                               ") died during the check");
      }
    }
    Status st = access.CheckConsistency();
    if (!st.ok()) return Status(st.code(), "pool " + Quoted(name) + ": " + st.message());
  }
  return Status::Ok();
}

void SetReconcileHookForTesting(ReconcileHook hook) noexcept { g_reconcile_hook = hook; }

const char* StartModeName(StartMode mode) {
  switch (mode) {
    case StartMode::kReattached: return "reattached";
    case StartMode::kRestored: return "restored";
    case StartMode::kFresh: return "fresh";
  }
  return "fresh";
}

Status ReconcileSegment(shm::Segment& segment, const std::vector<PoolConfigEntry>& pools) {
  bool changed = false;
  for (const PoolConfigEntry& p : pools) {
    Status st = ReconcilePool(segment, p, &changed);
    if (!st.ok()) {
      if (changed) segment.BumpGeneration();
      return st;
    }
  }
  // Pools cannot be deleted from a segment: a pool gone from the config
  // keeps its slot but loses its keys.
  for (uint32_t i = 0; i < segment.capacities().max_pools; ++i) {
    if (segment.pool_header(i)->use != shm::PoolUse::kInUse) continue;
    shm::PoolAdmin access(segment, i);
    access.set_lock_timeout(kBrokerLockTimeoutNs);
    const std::string name = access.Info().name;
    bool wanted = false;
    for (const PoolConfigEntry& p : pools) wanted = wanted || p.name == name;
    if (wanted) continue;
    PoolConfigEntry empty;
    empty.name = name;
    Result<PoolStatus> snap = access.Snapshot();
    if (!snap.ok()) return snap.status();
    empty.options = snap->options;
    Status st = ReconcilePool(segment, empty, &changed);
    if (!st.ok()) return st;
  }
  if (changed) segment.BumpGeneration();
  return Status::Ok();
}

void RestoreFromImage(shm::Segment& segment, const StateImage& image) {
  RestoreFromImage(segment, image, shm::WallNowNanos(), shm::MonotonicNowNanos());
}

void RestoreFromImage(shm::Segment& segment, const StateImage& image, uint64_t wall_now, uint64_t mono_now) {
  for (const auto& [pool, keys] : image.pools) {
    std::optional<uint32_t> index = segment.FindPool(pool);
    if (!index) continue;
    shm::PoolAdmin access(segment, *index);
    const shm::PoolConfig& config = access.header()->config;
    const uint64_t pool_cap = std::max(config.max_cooldown, config.default_cooldown);
    const std::vector<shm::ExportedKey> current = access.ExportKeyStates();
    for (const PersistedKey& k : keys) {
      const shm::ExportedKey* cur = FindExported(current, k.name);
      if (cur == nullptr) continue;
      shm::RestoredState r = Carried(k.state, cur->fingerprint == k.fingerprint);
      r.cooldown_deadline = 0;
      if (cur->fingerprint == k.fingerprint && k.cooldown_until_wall_ns > wall_now) {
        // An open circuit's cooldown is at most max(default, max_cooldown)
        // too (OpenCircuit), so one cap covers both.
        const uint64_t cap = std::max(pool_cap, k.state.last_cooldown);
        const uint64_t left = std::min(k.cooldown_until_wall_ns - wall_now, cap);
        r.cooldown_deadline = mono_now + left;
        if (left < k.cooldown_until_wall_ns - wall_now) {
          Log(LogLevel::kWarn, "cooldown_capped",
              {{"pool", pool}, {"key", k.name}, {"seconds", std::to_string(left / 1000000000ull)}});
        }
      }
      Status st = access.RestoreKeyState(k.name, r);
      if (!st.ok()) Log(LogLevel::kWarn, "restore_failed", {{"pool", pool}, {"key", k.name}, {"error", st.message()}});
    }
  }
}

namespace {

// Gives up the segment `name`: never adopted, removed when it is ours.
void GiveUp(const std::string& name, const Status& why) {
  Log(LogLevel::kWarn, why.code() == Code::kPermissionDenied ? "segment_refused" : "segment_replaced",
      {{"segment", name}, {"reason", why.message()}});
  if (why.code() == Code::kPermissionDenied) return;  // not ours: leave it, use another name
  // Workers still mapping it keep their mapping; new ones get the new one.
  Status st = shm::Segment::Remove(name);
  if (!st.ok()) Log(LogLevel::kWarn, "segment_remove_failed", {{"segment", name}, {"error", st.message()}});
}

// The recorded segment, if it is ours and usable as it is.
std::unique_ptr<shm::Segment> Reattach(const std::string& name) {
  if (!shm::Segment::Exists(name)) return nullptr;
  Result<std::unique_ptr<shm::Segment>> seg = shm::Segment::Open(name, ::geteuid());
  if (!seg.ok()) {
    GiveUp(name, seg.status());
    return nullptr;
  }
  Status st = CheckPools(**seg);
  if (!st.ok()) {
    GiveUp(name, st);
    return nullptr;
  }
  return std::move(seg).value();
}

// A new segment under a fresh random name (another on the rare collision).
Result<std::unique_ptr<shm::Segment>> CreateFresh(const shm::Capacities& caps) {
  constexpr int kAttempts = 8;
  Status last;
  for (int i = 0; i < kAttempts; ++i) {
    Result<std::string> name = NewSegmentName();
    if (!name.ok()) return name.status();
    Result<std::unique_ptr<shm::Segment>> seg = shm::Segment::CreateNamed(*name, caps);
    if (seg.ok() || seg.status().code() != Code::kAlreadyExists) return seg;
    last = seg.status();
    Log(LogLevel::kWarn, "segment_name_taken", {{"segment", *name}});
  }
  return last;
}

}  // namespace

Result<std::optional<StateImage>> LoadStateForStart(const std::string& path, bool discard_state,
                                                    std::string* moved_aside) {
  Result<std::optional<StateImage>> image = ReadStateFile(path);
  if (image.ok()) return image;
  if (!discard_state) {
    return Status(image.status().code(),
                  image.status().message() + "; fix or remove it, or start with --discard-state to move it aside");
  }
  Result<std::string> aside = MoveAside(path);
  if (!aside.ok()) return aside.status();
  if (moved_aside != nullptr) *moved_aside = *aside;
  Log(LogLevel::kWarn, "state_discarded", {{"file", path}, {"moved_to", *aside}, {"reason", image.status().message()}});
  return std::optional<StateImage>();
}

Result<OpenedSegment> OpenSegment(const BrokerConfig& config, const std::optional<StateImage>& image,
                                  const DesiredPools& desired) {
  OpenedSegment out;
  const std::string name_file = SegmentNameFileFor(config.socket);
  if (std::optional<std::string> recorded = ReadSegmentName(name_file)) {
    out.segment = Reattach(*recorded);
    if (out.segment) out.mode = StartMode::kReattached;
  }
  if (!out.segment) {
    Result<std::unique_ptr<shm::Segment>> seg = CreateFresh(config.capacity);
    if (!seg.ok()) return seg.status();
    out.segment = std::move(seg).value();
    out.mode = StartMode::kFresh;
    const std::string name = out.segment->name();
    if (image) {
      // Restore the salt before any key is added so fingerprints match the
      // file's.
      out.segment->header()->fingerprint_salt[0] = image->salt[0];
      out.segment->header()->fingerprint_salt[1] = image->salt[1];
      out.mode = StartMode::kRestored;
    }
    Status st = ReconcileSegment(*out.segment, desired(*out.segment));
    if (st.ok()) st = RecordSegmentName(name_file, name);
    if (!st.ok()) {
      (void)shm::Segment::Remove(name);
      return st;
    }
    if (image) RestoreFromImage(*out.segment, *image);
    return out;
  }
  Status st = ReconcileSegment(*out.segment, desired(*out.segment));
  if (!st.ok()) return st;
  return out;
}

}  // namespace keymesh::broker
