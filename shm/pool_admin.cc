// The owner's and the broker's side of a pool (PoolAdmin): keys added,
// removed, enabled, reset and reconfigured; state restored and exported for
// persistence; leases of dead or hung holders reclaimed.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <unordered_map>

#include "common/text.h"
#include "shm/pool.h"

namespace keymesh::shm {
namespace {

// The definition's settings into a slot's config (AddKey, Reconfigure).
void ApplyDefinition(const KeyDefinition& def, KeyConfig& c) noexcept {
  c.fingerprint = def.fingerprint;
  c.weight = def.weight;
  c.max_concurrency = def.max_concurrency;
  c.rpm = def.rpm;
  c.tpm = def.tpm;
  c.burst = def.burst;
  c.margin_ppm = def.margin_ppm;
}

// A share as the segment stores it (KeyConfig's share fields).
struct ShareFields {
  uint32_t flags = 0;
  uint64_t rpm_milli = 0;
  uint64_t tpm = 0;
  uint32_t burst = 0;
  bool operator==(const ShareFields&) const = default;
};

constexpr double kMaxShareRpm = 1e15;  // x 1000 stays far below 2^64
constexpr double kMaxShareTpm = 1e18;

Status ToShareFields(const std::string& name, const KeyShare& share, ShareFields* out) {
  *out = ShareFields{};
  if (!share.active) return Status::Ok();
  if (!(std::isfinite(share.rpm) && share.rpm >= 0 && share.rpm <= kMaxShareRpm)) {
    return Status(Code::kInvalidArgument,
                  "the mesh share of key " + Quoted(name) + ": rpm must be a finite number >= 0 and <= 1e15");
  }
  if (!(std::isfinite(share.tpm) && share.tpm >= 0 && share.tpm <= kMaxShareTpm)) {
    return Status(Code::kInvalidArgument,
                  "the mesh share of key " + Quoted(name) + ": tpm must be a finite number >= 0 and <= 1e18");
  }
  out->flags = kShareActive;
  out->rpm_milli = static_cast<uint64_t>(std::floor(share.rpm * 1000.0));  // rounded down: never above the grant
  out->tpm = static_cast<uint64_t>(std::floor(share.tpm));
  out->burst = share.burst;
  return Status::Ok();
}

// Locked: writes slot s's share fields (one journaled operation, committed)
// and carries its budgets over to the new pacing. *wake when the key's ready
// time moved earlier (a waiter may now get it, or must re-time its sleep).
void ApplyShareLocked(PoolCore& core, uint32_t s, const ShareFields& f, uint64_t now, bool* wake) noexcept {
  KeySlot& k = core.key(s);
  KeyConfig& c = k.config;
  const ShareFields current{c.share_flags, c.share_rpm_milli, c.share_tpm, c.share_burst};
  if (current == f) return;
  const uint64_t ready_before = core.ReadyAt(s);
  const RequestPacing rp_before = core.RequestPacingOf(s);
  const TokenPacing tp_before = core.TokenPacingOf(s);
  core.Set(c.share_flags, f.flags);
  core.Set(c.share_rpm_milli, f.rpm_milli);
  CrashPointReached(CrashPoint::kAdminMidMutation);
  core.Set(c.share_tpm, f.tpm);
  core.Set(c.share_burst, f.burst);
  SlotState& st = k.state;
  core.Set(st.req_tat, RescaleRequestTat(st.req_tat, rp_before, core.RequestPacingOf(s), now));
  core.Set(st.tok_tat, RescaleTokenTat(st.tok_tat, tp_before, core.TokenPacingOf(s), now));
  core.Commit();
  const uint64_t ready = core.ReadyAt(s);
  core.NoteDeadline(ready, now);
  core.IndexUpdate(s, now);
  if (ready < ready_before) *wake = true;
}

}  // namespace

Result<AddKeyResult> PoolAdmin::AddKey(const KeyDefinition& def) {
  Status valid = ValidateName("key", def.name);
  if (!valid.ok()) return valid;
  if (def.weight < 1) return Status(Code::kInvalidArgument, "key weight must be >= 1");
  PoolCore::Guard g(&core_);
  if (!g.ok()) return g.status();
  PoolHeader* ph = core_.header();
  const uint64_t now = core_.Now();
  if (std::optional<uint32_t> existing = core_.FindByNameLocked(def.name)) {
    // Re-admission (the original's add_key of a known key): clears the
    // failure streak and exhaustion, keeps counters and in-flight leases.
    const uint32_t s = *existing;
    KeySlot& k = core_.key(s);
    core_.LogSlotImage(s);
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
    // Fresh budgets too: a bucket pushed far ahead (a hostile token count)
    // must not outlive the operator's re-admission.
    k.state.req_tat = 0;
    k.state.tok_tat = 0;
    ApplyDefinition(def, k.config);  // the share fields stay (the mesh job owns them)
    core_.Commit();
    core_.NoteEvent();  // the circuit closed and the key is enabled: other hosts learn it
    core_.IndexUpdate(s, now);
    g.RequestWake();
    return AddKeyResult{s, false};
  }
  uint32_t s = 0;
  while (s < core_.key_capacity() && core_.key(s).state.use != SlotUse::kFree) ++s;
  if (s == core_.key_capacity()) {
    return Status(Code::kCapacityExceeded, "pool " + Quoted(core_.PoolName()) + " holds at most " +
                                               std::to_string(core_.key_capacity()) + " keys");
  }
  KeySlot& k = core_.key(s);
  core_.LogSlotImage(s);
  core_.Set(ph->key_count, ph->key_count + 1);
  if (s >= ph->slot_high_water) core_.Set(ph->slot_high_water, s + 1);
  std::memset(&k, 0, sizeof(KeySlot));
  std::memcpy(k.name, def.name.data(), def.name.size());
  ApplyDefinition(def, k.config);
  k.state.enabled = 1;
  k.state.pass = ph->vtime;
  CrashPointReached(CrashPoint::kAdminMidMutation);
  k.state.use = SlotUse::kActive;
  core_.Commit();
  core_.IndexUpdate(s, now);
  g.RequestWake();
  return AddKeyResult{s, true};
}

Status PoolAdmin::Reconfigure(const KeyDefinition& def) {
  if (def.weight < 1) return Status(Code::kInvalidArgument, "key weight must be >= 1");
  PoolCore::Guard g(&core_);
  if (!g.ok()) return g.status();
  std::optional<uint32_t> found = core_.FindByNameLocked(def.name);
  if (!found || core_.key(*found).state.use != SlotUse::kActive) return core_.NoSuchKey(def.name);
  const uint32_t s = *found;
  KeySlot& k = core_.key(s);
  const bool rotated = k.config.fingerprint != def.fingerprint;
  const Circuit circuit_before = k.state.circuit;
  core_.LogSlotImage(s);
  CrashPointReached(CrashPoint::kAdminMidMutation);
  ApplyDefinition(def, k.config);
  if (rotated) {
    // A new secret is a new credential at the provider: the old one's
    // failure history and circuit (also a revocation) do not apply to it.
    // The operator's disable and the cooldown deadline stay: a deadline is
    // never shortened (a worker's 429 may have set it a moment ago).
    SlotState& st = k.state;
    st.fail_streak = 0;
    st.rl_streak = 0;
    st.circuit = Circuit::kClosed;
    st.open_cooldown = 0;
  }
  core_.Commit();
  if (k.state.circuit != circuit_before) core_.NoteEvent();
  core_.IndexUpdate(s, core_.Now());
  g.RequestWake();
  return Status::Ok();
}

Status PoolAdmin::RemoveKey(std::string_view name) {
  PoolCore::Guard g(&core_);
  if (!g.ok()) return g.status();
  std::optional<uint32_t> s = core_.FindByNameLocked(name);
  if (!s) return core_.NoSuchKey(name);
  if (core_.key(*s).state.use == SlotUse::kRemoving) return Status::Ok();
  core_.Set(core_.key(*s).state.use, SlotUse::kRemoving);
  core_.Commit();
  core_.IndexUpdate(*s, core_.Now());
  core_.RetireSlotIfDone(*s);
  return Status::Ok();
}

Status PoolAdmin::SetEnabled(std::string_view name, bool enabled) {
  PoolCore::Guard g(&core_);
  if (!g.ok()) return g.status();
  std::optional<uint32_t> s = core_.FindByNameLocked(name);
  if (!s) return core_.NoSuchKey(name);
  const uint8_t value = enabled ? uint8_t{1} : uint8_t{0};
  const bool changed = core_.key(*s).state.enabled != value;
  core_.Set(core_.key(*s).state.enabled, value);
  core_.Commit();
  if (changed) core_.NoteEvent();
  core_.IndexUpdate(*s, core_.Now());
  if (enabled) g.RequestWake();
  return Status::Ok();
}

Status PoolAdmin::ResetKey(std::string_view name) {
  PoolCore::Guard g(&core_);
  if (!g.ok()) return g.status();
  std::optional<uint32_t> s = core_.FindByNameLocked(name);
  if (!s) return core_.NoSuchKey(name);
  core_.ResetLocked(*s);
  core_.Commit();
  core_.NoteEvent();
  core_.IndexUpdate(*s, core_.Now());
  g.RequestWake();
  return Status::Ok();
}

Status PoolAdmin::SetStrategy(Strategy strategy) {
  PoolCore::Guard g(&core_);
  if (!g.ok()) return g.status();
  core_.header()->config.strategy = static_cast<uint32_t>(strategy);
  core_.IndexRebuild(core_.Now());
  return Status::Ok();
}

Status PoolAdmin::SetOptions(const PoolOptions& o) {
  Status st = ValidatePoolOptions(o);
  if (!st.ok()) return st;
  PoolCore::Guard g(&core_);
  if (!g.ok()) return g.status();
  core_.header()->config = ToPoolConfig(o);  // plain scalars: each write is atomic for a crash
  core_.IndexRebuild(core_.Now());
  g.RequestWake();
  return Status::Ok();
}

Status PoolAdmin::RestoreKeyState(std::string_view name, const RestoredState& r) {
  PoolCore::Guard g(&core_);
  if (!g.ok()) return g.status();
  std::optional<uint32_t> s = core_.FindByNameLocked(name);
  if (!s) return core_.NoSuchKey(name);
  SlotState& st = core_.key(*s).state;
  core_.LogSlotImage(*s);  // many fields: one image
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
  core_.Commit();
  core_.NoteEvent();  // a restored cooldown, circuit or disable: other hosts learn it
  const uint64_t now = core_.Now();
  core_.NoteDeadline(st.cooldown_deadline, now);
  core_.IndexUpdate(*s, now);
  return Status::Ok();
}

Status PoolAdmin::RestoreKeyProgress(std::string_view name, const KeyProgress& p) {
  PoolCore::Guard g(&core_);
  if (!g.ok()) return g.status();
  std::optional<uint32_t> s = core_.FindByNameLocked(name);
  if (!s) return core_.NoSuchKey(name);
  SlotState& st = core_.key(*s).state;
  const PoolConfig& config = core_.header()->config;
  const uint64_t now = core_.Now();
  const uint64_t left = std::min(p.cooldown_ns, std::max(config.max_cooldown, config.default_cooldown));
  core_.LogSlotImage(*s);  // many fields: one image
  st.successes = p.successes;
  st.failures = p.failures;
  st.rate_limited = p.rate_limited;
  st.has_latency = p.has_latency ? 1 : 0;
  st.ema_latency = p.has_latency ? p.ema_latency : 0.0;
  if (left > 0 && now + left > st.cooldown_deadline) st.cooldown_deadline = now + left;
  core_.Commit();
  core_.NoteEvent();  // a restored cooldown: other hosts learn it
  core_.NoteDeadline(st.cooldown_deadline, now);
  core_.IndexUpdate(*s, now);
  return Status::Ok();
}

std::vector<ExportedKey> PoolAdmin::ExportKeyStates() {
  std::vector<ExportedKey> out;
  if (!ExportKeyStates(&out).ok()) out.clear();
  return out;
}

Status PoolAdmin::ExportKeyStates(std::vector<ExportedKey>* exported) {
  std::vector<ExportedKey>& out = *exported;
  out.clear();
  PoolCore::Guard g(&core_);
  if (!g.ok()) return g.status();
  const uint32_t hw = core_.HighWater();
  for (uint32_t s = 0; s < hw; ++s) {
    const KeySlot& k = core_.key(s);
    const SlotState& st = k.state;
    if (st.use != SlotUse::kActive) continue;
    ExportedKey e;
    e.name = core_.KeyName(s);
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
    const bool open = st.circuit == Circuit::kOpen || st.circuit == Circuit::kHalfOpen;
    e.open_until = open ? st.cooldown_deadline : 0;
    e.revoked = st.circuit == Circuit::kRevoked;
    out.push_back(std::move(e));
  }
  return Status::Ok();
}

Status PoolAdmin::SetShares(const std::vector<std::pair<std::string, KeyShare>>& shares, uint32_t* unknown) {
  if (unknown != nullptr) *unknown = 0;
  // Checked and looked up by name before the lock (a name given twice: the
  // last one counts); then one scan of the slots under it.
  std::unordered_map<std::string_view, ShareFields> wanted;
  wanted.reserve(shares.size());
  for (const auto& [name, share] : shares) {
    ShareFields f;
    Status st = ToShareFields(name, share, &f);
    if (!st.ok()) return st;
    wanted[name] = f;
  }
  PoolCore::Guard g(&core_);
  if (!g.ok()) return g.status();
  const uint64_t now = core_.Now();
  bool wake = false;
  size_t found = 0;
  const uint32_t hw = core_.HighWater();
  for (uint32_t s = 0; s < hw && found < wanted.size(); ++s) {
    const KeySlot& k = core_.key(s);
    if (k.state.use == SlotUse::kFree) continue;
    auto it = wanted.find(std::string_view(k.name, strnlen(k.name, kNameCapacity)));
    if (it == wanted.end()) continue;
    ++found;
    ApplyShareLocked(core_, s, it->second, now, &wake);
  }
  if (unknown != nullptr) *unknown = static_cast<uint32_t>(wanted.size() - found);
  if (wake) g.RequestWake();
  return Status::Ok();
}

Status PoolAdmin::ClearShares() {
  PoolCore::Guard g(&core_);
  if (!g.ok()) return g.status();
  const uint64_t now = core_.Now();
  bool wake = false;
  const uint32_t hw = core_.HighWater();
  for (uint32_t s = 0; s < hw; ++s) {
    if (core_.key(s).state.use == SlotUse::kFree) continue;
    ApplyShareLocked(core_, s, ShareFields{}, now, &wake);
  }
  if (wake) g.RequestWake();
  return Status::Ok();
}

void PoolAdmin::SetShareDeadline(uint64_t until) noexcept {
  const uint64_t before = core_.header()->share_until.exchange(until, std::memory_order_release);
  if (before != 0 && (until == 0 || until > before) && before <= core_.Now()) WakeWaiters();
}

Status PoolAdmin::MergeRemote(std::string_view name, const RemoteKeyState& r) {
  PoolCore::Guard g(&core_);
  if (!g.ok()) return g.status();
  std::optional<uint32_t> found = core_.FindByNameLocked(name);
  if (!found) return core_.NoSuchKey(name);
  const uint32_t s = *found;
  const uint64_t now = core_.Now();
  SlotState& st = core_.key(s).state;
  const uint64_t ready_before = core_.ReadyAt(s);
  const bool eligible_before = core_.Eligible(s, now);
  // Another host's word arrives through Redis: honoured up to max_cooldown
  // from now, as a local 429's Retry-After is, so one planted value cannot
  // bench a key for years.
  const uint64_t cap =
      now > kNever - core_.header()->config.max_cooldown ? kNever : now + core_.header()->config.max_cooldown;
  const uint64_t cool_until = std::min(r.cool_until, cap);
  const uint64_t open_until = std::min(r.open_until, cap);
  if (r.reset) core_.ResetLocked(s);
  if (cool_until > st.cooldown_deadline) core_.Set(st.cooldown_deadline, cool_until);
  if (r.revoke) {
    core_.Set(st.circuit, Circuit::kRevoked);
  } else if (r.close_circuit) {
    if (st.circuit == Circuit::kOpen || st.circuit == Circuit::kHalfOpen) {
      // The probe that succeeded elsewhere speaks for this host too; a
      // local probe still in flight ends normally (its release sees a
      // closed circuit). The deadline stays: it is never shortened.
      core_.Set(st.circuit, Circuit::kClosed);
      core_.Set(st.open_cooldown, uint64_t{0});
      core_.Set(st.fail_streak, 0u);
    }
  } else if (open_until > now) {
    if (st.circuit == Circuit::kClosed) {
      core_.Set(st.circuit, Circuit::kOpen);
      core_.Set(st.open_cooldown, open_until - now);  // the base of a failed local probe's longer wait
    }
    if (st.circuit == Circuit::kOpen && open_until > st.cooldown_deadline) {
      core_.Set(st.cooldown_deadline, open_until);  // no probe here before then
    }
  }
  if (r.enabled) core_.Set(st.enabled, *r.enabled ? uint8_t{1} : uint8_t{0});
  core_.Commit();
  const uint64_t ready = core_.ReadyAt(s);
  core_.NoteDeadline(ready, now);
  core_.IndexUpdate(s, now);
  if ((!eligible_before && core_.Eligible(s, now)) || ready < ready_before) g.RequestWake();  // eligible now or sooner
  return Status::Ok();
}

Result<uint32_t> PoolAdmin::ReclaimProcess(const ProcessId& holder) {
  PoolCore::Guard g(&core_);
  if (!g.ok()) return g.status();
  const uint64_t now = core_.Now();
  uint32_t freed = 0;
  for (uint32_t l = 0; l < core_.lease_capacity(); ++l) {
    const LeaseRecord& r = core_.lease(l);
    if (r.state == LeaseState::kHeld && r.pid == holder.pid && r.start_time == holder.start_time) {
      if (core_.FreeLeaseLocked(l, now, true)) ++freed;  // else damage: the repair frees it
    }
  }
  if (freed > 0) g.RequestWake();
  return freed;
}

Result<uint32_t> PoolAdmin::ReclaimExpired() {
  PoolCore::Guard g(&core_);
  if (!g.ok()) return g.status();
  const uint64_t now = core_.Now();
  const uint64_t max_lease = core_.header()->config.max_lease;
  if (max_lease == 0) return 0u;
  uint32_t freed = 0;
  for (uint32_t l = 0; l < core_.lease_capacity(); ++l) {
    const LeaseRecord& r = core_.lease(l);
    if (r.state == LeaseState::kHeld && now > r.acquire_ns && now - r.acquire_ns > max_lease) {
      if (core_.FreeLeaseLocked(l, now, true)) ++freed;  // else damage: the repair frees it
    }
  }
  if (freed > 0) g.RequestWake();
  return freed;
}

std::vector<ProcessId> PoolAdmin::Holders() {
  std::vector<ProcessId> out;
  if (!Holders(&out).ok()) out.clear();
  return out;
}

Status PoolAdmin::Holders(std::vector<ProcessId>* holders) {
  std::vector<ProcessId>& out = *holders;
  out.clear();
  PoolCore::Guard g(&core_);
  if (!g.ok()) return g.status();
  for (uint32_t l = 0; l < core_.lease_capacity(); ++l) {
    const LeaseRecord& r = core_.lease(l);
    if (r.state != LeaseState::kHeld) continue;
    ProcessId id{r.pid, r.start_time};
    if (std::find(out.begin(), out.end(), id) == out.end()) out.push_back(id);
  }
  return Status::Ok();
}

Result<uint32_t> PoolAdmin::ReclaimDead() {
  uint32_t freed = 0;
  std::vector<ProcessId> holders;
  Status st = Holders(&holders);
  if (!st.ok()) return st;
  for (const ProcessId& id : holders) {
    if (IsAlive(id)) continue;
    Result<uint32_t> r = ReclaimProcess(id);
    if (!r.ok()) return r;
    freed += *r;
  }
  return freed;
}

std::optional<uint32_t> PoolAdmin::FindByFingerprint(uint64_t fingerprint) {
  std::optional<uint32_t> slot;
  return FindByFingerprint(fingerprint, &slot).ok() ? slot : std::nullopt;
}

Status PoolAdmin::FindByFingerprint(uint64_t fingerprint, std::optional<uint32_t>* slot) {
  *slot = std::nullopt;
  PoolCore::Guard g(&core_);
  if (!g.ok()) return g.status();
  const uint32_t hw = core_.HighWater();
  for (uint32_t s = 0; s < hw; ++s) {
    const KeySlot& k = core_.key(s);
    if (k.state.use != SlotUse::kFree && k.config.fingerprint == fingerprint) {
      *slot = s;
      break;
    }
  }
  return Status::Ok();
}

Status PoolAdmin::CheckConsistency() {
  PoolCore::Guard g(&core_);
  if (!g.ok()) return g.status();
  return core_.CheckConsistencyLocked();
}

}  // namespace keymesh::shm
