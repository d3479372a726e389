#include "broker/recovery.h"

#include <cinttypes>
#include <cmath>
#include <cstdio>

#include "broker/hash.h"
#include "broker/log.h"
#include "common/text.h"
#include "shm/clock.h"
#include "shm/pool.h"

namespace keymesh::broker {
namespace {

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
  if (!shm::SamePoolConfig(access.header()->config, shm::ToPoolConfig(p.options))) {
    Status st = access.SetOptions(p.options);
    if (!st.ok()) return st;
    Log(LogLevel::kInfo, "pool_options_changed",
        {{"pool", p.name}, {"strategy", std::string(StrategyName(p.options.strategy))}});
  }
  Result<PoolStatus> snap = access.Snapshot();
  if (!snap.ok()) return snap.status();
  std::vector<shm::ExportedKey> exported;  // read lazily, only when a key changes
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
    if (cur != nullptr && cur->state != KeyState::kRemoving && cur->fingerprint == fp && cur->weight == k.weight &&
        cur->max_concurrency == k.max_concurrency && cur->rpm == k.rpm && cur->tpm == k.tpm && cur->burst == k.burst &&
        cur->rate_margin == k.rate_margin) {
      continue;  // unchanged: not touched at all
    }
    if (cur != nullptr && exported.empty()) exported = access.ExportKeyStates();
    const shm::ExportedKey* old = cur != nullptr ? FindExported(exported, k.name) : nullptr;
    Result<shm::AddKeyResult> added = access.AddKey(def);
    if (!added.ok()) {
      return Status(added.status().code(),
                    "pool " + Quoted(p.name) + " key " + Quoted(k.name) + ": " + added.status().message());
    }
    if (old != nullptr) {
      // AddKey kept the counters; workers may have moved them since the
      // export, so only streaks, cooldown and circuit are carried over.
      shm::RestoredState carried = Carried(old->state, old->fingerprint == fp);
      carried.restore_counters = false;
      Status st = access.RestoreKeyState(k.name, carried);
      if (!st.ok()) return st;
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

std::string SegmentNameFor(const std::string& socket_path) {
  char buf[40];
  std::snprintf(buf, sizeof(buf), "keymesh-%016" PRIx64, Fnv1a64(socket_path));
  return buf;
}

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
  for (uint32_t i = 0; i < segment.header()->max_pools; ++i) {
    if (segment.pool_header(i)->use != shm::PoolUse::kInUse) continue;
    shm::PoolAdmin access(segment, i);
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
  const uint64_t mono_now = shm::MonotonicNowNanos();
  const uint64_t wall_now = shm::WallNowNanos();
  for (const auto& [pool, keys] : image.pools) {
    std::optional<uint32_t> index = segment.FindPool(pool);
    if (!index) continue;
    shm::PoolAdmin access(segment, *index);
    const std::vector<shm::ExportedKey> current = access.ExportKeyStates();
    for (const PersistedKey& k : keys) {
      const shm::ExportedKey* cur = FindExported(current, k.name);
      if (cur == nullptr) continue;
      shm::RestoredState r = Carried(k.state, cur->fingerprint == k.fingerprint);
      r.cooldown_deadline = 0;
      if (cur->fingerprint == k.fingerprint && k.cooldown_until_wall_ns > wall_now) {
        r.cooldown_deadline = mono_now + (k.cooldown_until_wall_ns - wall_now);
      }
      Status st = access.RestoreKeyState(k.name, r);
      if (!st.ok()) Log(LogLevel::kWarn, "restore_failed", {{"pool", pool}, {"key", k.name}, {"error", st.message()}});
    }
  }
}

Result<OpenedSegment> OpenSegment(const BrokerConfig& config, const std::string& name, bool discard_state) {
  OpenedSegment out;
  if (shm::Segment::Exists(name)) {
    Result<std::unique_ptr<shm::Segment>> seg = shm::Segment::Open(name);
    if (seg.ok()) {
      out.segment = std::move(seg).value();
      out.mode = StartMode::kReattached;
    } else {
      // Another layout version, or a creator that died half way: the old
      // segment cannot be trusted. Workers still mapping it keep their
      // mapping; new ones get the new segment.
      Log(LogLevel::kWarn, "segment_replaced", {{"segment", name}, {"reason", seg.status().message()}});
      Status st = shm::Segment::Remove(name);
      if (!st.ok()) return st;
    }
  }
  if (!out.segment) {
    Result<std::optional<StateImage>> image = ReadStateFile(config.state_file);
    if (!image.ok()) {
      if (!discard_state) {
        return Status(image.status().code(),
                      image.status().message() + "; fix or remove it, or start with --discard-state to move it aside");
      }
      Result<std::string> aside = MoveAside(config.state_file);
      if (!aside.ok()) return aside.status();
      out.moved_aside = *aside;
      Log(LogLevel::kWarn, "state_discarded",
          {{"file", config.state_file}, {"moved_to", *aside}, {"reason", image.status().message()}});
      image = std::optional<StateImage>();
    }
    Result<std::unique_ptr<shm::Segment>> seg = shm::Segment::CreateNamed(name, config.capacity);
    if (!seg.ok()) return seg.status();
    out.segment = std::move(seg).value();
    out.mode = StartMode::kFresh;
    if (image->has_value()) {
      // Restore the salt before any key is added so fingerprints match the
      // file's.
      out.segment->header()->fingerprint_salt[0] = (*image)->salt[0];
      out.segment->header()->fingerprint_salt[1] = (*image)->salt[1];
      out.mode = StartMode::kRestored;
    }
    Status st = ReconcileSegment(*out.segment, config.pools);
    if (!st.ok()) {
      (void)shm::Segment::Remove(name);
      return st;
    }
    if (image->has_value()) RestoreFromImage(*out.segment, **image);
    return out;
  }
  Status st = ReconcileSegment(*out.segment, config.pools);
  if (!st.ok()) return st;
  return out;
}

}  // namespace keymesh::broker
