#include "client/local_pool.h"

#include <unistd.h>

#include <algorithm>
#include <unordered_set>

#include "common/text.h"
#include "shm/clock.h"
#include "shm/pool_config.h"
#include "shm/process_id.h"

namespace keymesh::detail {
namespace {

constexpr const char* kEmbeddedPoolName = "embedded";

// Set for ever: a poll's wait ends after its one attempt, uncounted.
const std::atomic<bool> kPollCancel{true};

}  // namespace

// ---------------------------------------------------------------------------
// LocalPool

LocalPool::LocalPool(std::unique_ptr<shm::Segment> segment, uint32_t pool_index, std::string name,
                     Pool::SecretSource source)
    : segment_(std::move(segment)),
      user_(*segment_, pool_index),
      name_(std::move(name)),
      source_(std::move(source)),
      entries_size_(segment_->capacities().keys_per_pool) {
  entries_ = std::make_unique<std::atomic<const KeyEntry*>[]>(entries_size_);
}

void LocalPool::PublishLocked(uint32_t slot, std::string name, std::string secret, uint64_t fingerprint) {
  auto entry = std::make_unique<KeyEntry>();
  entry->name = std::move(name);
  entry->secret = std::move(secret);
  entry->fingerprint = fingerprint;
  entries_[slot].store(entry.get(), std::memory_order_release);
  entry_storage_.push_back(std::move(entry));
}

Status LocalPool::RefreshSecrets() {
  if (!source_) return Status(Code::kUnknownKey, "this process does not know the secret of that key");
  Result<Secrets> got = source_();
  if (!got.ok()) return got.status();
  LearnSecrets(*got);
  return Status::Ok();
}

void LocalPool::LearnSecrets(const Secrets& secrets) {
  std::lock_guard<std::mutex> lock(secrets_mutex_);
  for (const auto& [name, secret] : secrets) {
    std::optional<uint32_t> slot = user_.FindByName(name);
    if (!slot || *slot >= entries_size_) continue;
    const uint64_t fp = segment_->Fingerprint(secret);
    const KeyEntry* cur = EntryOf(*slot);
    if (cur != nullptr && cur->fingerprint == fp && cur->name == name) continue;
    PublishLocked(*slot, name, secret, fp);
  }
}

Result<Lease> LocalPool::Grant(const shm::LeaseHandle& h) {
  LeaseRef ref{EntryOf(h.slot), h.slot, h.lease, h.seq, h.acquire_ns};
  if (ref.entry == nullptr || ref.entry->fingerprint != h.fingerprint) [[unlikely]] {
    // A key added or rotated by another process: ask the broker.
    (void)RefreshSecrets();
    ref.entry = EntryOf(h.slot);
    if (ref.entry == nullptr || ref.entry->fingerprint != h.fingerprint) {
      shm::Outcome cancelled;
      cancelled.kind = OutcomeKind::kCancelled;
      (void)user_.Release(h, cancelled);
      return Status(Code::kUnknownKey, "this process does not know the secret of the key in slot " +
                                           std::to_string(h.slot) + " (added after fork without a broker?)");
    }
  }
  return MakeLease(ref);
}

Result<Lease> LocalPool::Acquire(const Pool::AcquireOptions& options) {
  uint64_t timeout_ns = user_.header()->config.acquire_timeout;
  const std::atomic<bool>* cancel = FlagOf(options.cancel);
  if (options.poll) {
    timeout_ns = 0;
    cancel = &kPollCancel;
  } else if (options.timeout) {
    Status st = ValidateTimeout(*options.timeout);
    if (!st.ok()) return st;
    timeout_ns = shm::SecondsToNanos(*options.timeout);
  }
  Result<shm::LeaseHandle> h =
      user_.Acquire(timeout_ns, selector_.load(std::memory_order_acquire), shm::Self(), cancel, options.tokens);
  if (!h.ok()) [[unlikely]] {
    if (options.poll && h.status().code() == Code::kClosed) return Status(Code::kNoAvailableKey, kNoKeyMessage);
    return h.status();
  }
  return Grant(*h);
}

Result<Lease> LocalPool::TryAcquire() {
  Result<shm::LeaseHandle> h = user_.TryAcquire(selector_.load(std::memory_order_acquire));
  if (!h.ok()) return h.status();
  return Grant(*h);
}

Status LocalPool::End(const LeaseRef& lease, OutcomeKind kind, const Lease::EndOptions& options) {
  shm::Outcome outcome;
  outcome.kind = kind;
  outcome.latency = options.latency;
  outcome.tokens = options.tokens;
  outcome.cooldown = options.cooldown;
  outcome.permanent = options.permanent;
  return user_.Release(shm::LeaseHandle{lease.slot, lease.lease, lease.seq, lease.acquire_ns, 0}, outcome);
}

Status LocalPool::ObserveLimits(std::string_view key_name, const LimitObservation& o) {
  shm::LimitUpdate u;
  u.remaining_requests = o.remaining_requests;
  u.reset_requests = o.reset_requests;
  u.remaining_tokens = o.remaining_tokens;
  u.reset_tokens = o.reset_tokens;
  u.retry_after = o.retry_after;
  return user_.ObserveLimits(key_name, u);
}

std::optional<std::string> LocalPool::NameOfSecret(std::string_view secret) {
  const uint64_t fp = segment_->Fingerprint(secret);
  for (uint32_t s = 0; s < entries_size_; ++s) {
    const KeyEntry* e = EntryOf(s);
    if (e != nullptr && e->fingerprint == fp && e->secret == secret) return e->name;
  }
  return std::nullopt;
}

std::optional<std::string> LocalPool::MaskedSecretOfSlot(uint32_t slot) {
  const KeyEntry* e = EntryOf(slot);
  if (e == nullptr) return std::nullopt;
  return MaskSecret(e->secret);
}

void LocalPool::SetSelector(std::shared_ptr<const Selector> selector) {
  std::lock_guard<std::mutex> lock(secrets_mutex_);
  selector_.store(selector.get(), std::memory_order_release);
  if (selector) selectors_.push_back(std::move(selector));
}

Status LocalPool::SnapshotKeys(KeySnapshot* out, uint32_t capacity, KeysSnapshotInfo* info) {
  Status st = user_.SnapshotKeys(out, capacity, info);
  if (!st.ok()) return st;
  for (uint32_t i = 0; i < std::min(capacity, info->count); ++i) {
    const KeyEntry* e = EntryOf(out[i].slot);
    out[i].secret = e != nullptr && e->fingerprint == out[i].fingerprint ? e->secret.c_str() : nullptr;
  }
  return st;
}

Result<Lease> LocalPool::AcquireKey(const KeySnapshot& key, uint64_t tokens) {
  Result<shm::LeaseHandle> h = user_.AcquireKey(key.slot, key.generation, key.fingerprint, tokens);
  if (!h.ok()) return h.status();
  return Grant(*h);
}

Status LocalPool::WaitForChange(uint32_t wake_seq, double timeout, const CancelToken* cancel) {
  Status st = ValidateTimeout(timeout);
  if (!st.ok()) return st;
  return user_.WaitForChange(wake_seq, shm::SecondsToNanos(timeout), FlagOf(cancel));
}

// ---------------------------------------------------------------------------
// EmbeddedPool

EmbeddedPool::EmbeddedPool(std::unique_ptr<shm::Segment> segment, uint32_t pool_index, std::string name,
                           Pool::SecretSource source)
    : LocalPool(std::move(segment), pool_index, std::move(name), std::move(source)),
      admin_(this->segment(), pool_index),
      creator_pid_(static_cast<uint32_t>(::getpid())) {}

Result<std::unique_ptr<PoolBackend>> EmbeddedPool::Create(const std::vector<KeySpec>& keys, const PoolOptions& options,
                                                          const EmbeddedOptions& embedded) {
  if (keys.empty()) return Status(Code::kInvalidArgument, "KeyPool requires at least one API key.");
  Status st = ValidatePoolOptions(options);
  if (!st.ok()) return st;
  if (keys.size() > embedded.keys_capacity) {
    return Status(Code::kCapacityExceeded,
                  std::to_string(keys.size()) + " keys exceed keys_capacity " + std::to_string(embedded.keys_capacity));
  }
  std::unordered_set<std::string_view> names;
  std::unordered_set<std::string_view> secrets;
  for (size_t i = 0; i < keys.size(); ++i) {
    const KeySpec& k = keys[i];
    const std::string which = "key #" + std::to_string(i + 1);
    st = ValidateKeySpec(k);
    if (!st.ok()) return Status(st.code(), which + ": " + st.message());
    if (!secrets.insert(k.secret).second) {
      return Status(Code::kInvalidArgument, which + " repeats the secret of an earlier key");
    }
    if (!k.name.empty() && !names.insert(k.name).second) {
      return Status(Code::kInvalidArgument, "duplicate key name " + Quoted(k.name));
    }
  }
  shm::Capacities caps;
  caps.max_pools = 1;
  caps.keys_per_pool = embedded.keys_capacity;
  caps.leases_per_pool = embedded.leases_capacity;
  Result<std::unique_ptr<shm::Segment>> seg = shm::Segment::CreateAnonymous(caps);
  if (!seg.ok()) return seg.status();
  Result<uint32_t> index =
      (*seg)->CreatePool(kEmbeddedPoolName, static_cast<uint32_t>(options.strategy), shm::ToPoolConfig(options));
  if (!index.ok()) return index.status();
  std::unique_ptr<EmbeddedPool> pool(new EmbeddedPool(std::move(seg).value(), *index, kEmbeddedPoolName, nullptr));
  for (const KeySpec& k : keys) {
    st = pool->AddKey(k);
    if (!st.ok()) return st;
  }
  return std::unique_ptr<PoolBackend>(std::move(pool));
}

Result<std::unique_ptr<PoolBackend>> EmbeddedPool::Attach(std::string_view segment_name, std::string_view pool_name,
                                                          Pool::SecretSource secrets) {
  Result<std::unique_ptr<shm::Segment>> seg = shm::Segment::Open(segment_name);
  if (!seg.ok()) return seg.status();
  std::optional<uint32_t> index = (*seg)->FindPool(pool_name);
  if (!index) {
    return Status(Code::kUnknownKey, "no pool " + Quoted(pool_name) + " in segment " + Quoted(segment_name));
  }
  std::unique_ptr<EmbeddedPool> pool(
      new EmbeddedPool(std::move(seg).value(), *index, std::string(pool_name), std::move(secrets)));
  if (pool->has_source()) {
    Status st = pool->RefreshSecrets();
    if (!st.ok()) return st;
  }
  return std::unique_ptr<PoolBackend>(std::move(pool));
}

Status EmbeddedPool::AddKey(const KeySpec& key) {
  Status st = ValidateKeySpec(key);
  if (!st.ok()) return st;
  std::lock_guard<std::mutex> lock(secrets_mutex());
  const uint64_t fp = segment().Fingerprint(key.secret);
  std::string name = key.name;
  if (name.empty()) {
    // The original identified keys by their secret: re-admit the key that
    // holds this secret, or name a new one.
    for (uint32_t s = 0; s < entries_size() && name.empty(); ++s) {
      const KeyEntry* e = EntryOf(s);
      if (e != nullptr && e->fingerprint == fp && admin_.FindByName(e->name) == s) name = e->name;
    }
    for (uint32_t n = admin_.header()->key_count + 1; name.empty(); ++n) {
      std::string candidate = "key-" + std::to_string(n);
      if (!admin_.FindByName(candidate)) name = std::move(candidate);
    }
  }
  const bool known_here = [&] {
    std::optional<uint32_t> s = admin_.FindByName(name);
    if (!s) return false;
    const KeyEntry* e = EntryOf(*s);
    return e != nullptr && e->fingerprint == fp;
  }();
  if (!has_source() && !known_here && static_cast<uint32_t>(::getpid()) != creator_pid_) {
    return Status(Code::kInvalidArgument,
                  "an embedded pool can learn new keys only in the process that created it, before fork "
                  "(other processes would not know the secret); run a broker to add keys at run time");
  }
  shm::KeyDefinition def;
  def.name = name;
  def.fingerprint = fp;
  def.weight = key.weight;
  def.max_concurrency = key.max_concurrency;
  def.rpm = key.rpm;
  def.tpm = key.tpm;
  def.burst = key.burst;
  def.margin_ppm = shm::KeyMarginPpm(key.rate_margin);
  Result<shm::AddKeyResult> r = admin_.AddKey(def);
  if (!r.ok()) return r.status();
  const KeyEntry* cur = EntryOf(r->slot);
  if (cur == nullptr || cur->fingerprint != fp || cur->name != name) PublishLocked(r->slot, name, key.secret, fp);
  segment().BumpGeneration();
  return Status::Ok();
}

Status EmbeddedPool::RemoveKey(std::string_view name) {
  Status st = admin_.RemoveKey(name);
  if (st.ok()) segment().BumpGeneration();
  return st;
}

Status EmbeddedPool::RestoreKey(std::string_view name, const KeyRestore& restore) {
  shm::KeyProgress p;
  p.successes = restore.successes;
  p.failures = restore.failures;
  p.rate_limited = restore.rate_limited;
  p.has_latency = restore.latency_avg.has_value();
  p.ema_latency = restore.latency_avg.value_or(0.0);
  p.cooldown_ns = static_cast<uint64_t>(restore.cooldown_remaining * 1e9);  // <= 1e18: checked by Pool
  return admin_.RestoreKeyProgress(name, p);
}

}  // namespace keymesh::detail
