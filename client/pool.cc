// The C++ client's shared-memory fast path: Pool and Lease over
// shm::PoolAdmin. The socket slow path lives in broker_client.cc.
#include "keymesh/pool.h"

#include <unistd.h>

#include <cmath>
#include <unordered_set>

#include "common/text.h"
#include "shm/clock.h"
#include "shm/pool.h"
#include "shm/segment.h"

namespace keymesh {
namespace {

constexpr const char* kEmbeddedPoolName = "embedded";

Status ValidateTimeout(double t) {
  if (!(t >= 0) || t > 1e9) return Status(Code::kInvalidArgument, "timeout must be a finite number of seconds >= 0");
  return Status::Ok();
}

}  // namespace

// ---------------------------------------------------------------------------
// Lease

Lease::Lease(Lease&& o) noexcept { *this = std::move(o); }

Lease& Lease::operator=(Lease&& o) noexcept {
  if (this != &o) {
    if (pool_ != nullptr) (void)Release();
    pool_ = o.pool_;
    entry_ = o.entry_;
    slot_ = o.slot_;
    lease_ = o.lease_;
    seq_ = o.seq_;
    acquire_ns_ = o.acquire_ns_;
    o.pool_ = nullptr;
  }
  return *this;
}

Lease::~Lease() {
  if (pool_ != nullptr) (void)Release();
}

double Lease::elapsed() const noexcept {
  const uint64_t now = shm::MonotonicNowNanos();
  return now > acquire_ns_ ? shm::NanosToSeconds(now - acquire_ns_) : 0.0;
}

Status Lease::End(uint32_t kind, std::optional<double> latency, uint64_t tokens, std::optional<double> cooldown,
                  bool permanent) {
  if (pool_ == nullptr) return Status(Code::kNotHeld, "lease already ended");
  shm::Outcome outcome;
  outcome.kind = static_cast<shm::OutcomeKind>(kind);
  outcome.latency = latency;
  outcome.tokens = tokens;
  outcome.cooldown = cooldown;
  outcome.permanent = permanent;
  shm::LeaseHandle h{slot_, lease_, seq_, acquire_ns_, 0};
  Pool* pool = pool_;
  if (!pool->access_) {
    Status st = pool->RemoteEnd(*this, kind, latency, tokens, cooldown, permanent);
    pool_ = nullptr;
    return st;
  }
  pool_ = nullptr;
  return pool->access_->Release(h, outcome);
}

Status Lease::Release(std::optional<double> latency, uint64_t tokens) {
  if (!latency && pool_ != nullptr) latency = elapsed();
  return End(static_cast<uint32_t>(shm::OutcomeKind::kSuccess), latency, tokens, std::nullopt);
}

Status Lease::MarkFailed(bool permanent) {
  return End(static_cast<uint32_t>(shm::OutcomeKind::kFailure), std::nullopt, 0, std::nullopt, permanent);
}

Status Lease::ObserveLimits(const LimitObservation& observation) {
  if (pool_ == nullptr) return Status(Code::kNotHeld, "lease already ended");
  return pool_->ObserveLimits(entry_->name, observation);
}

Status Lease::MarkRateLimited(std::optional<double> cooldown) {
  if (cooldown && (!(*cooldown >= 0) || *cooldown > 1e9)) {
    // Still end the lease: the request is over whatever the caller passed.
    Status st = End(static_cast<uint32_t>(shm::OutcomeKind::kRateLimited), std::nullopt, 0, std::nullopt);
    (void)st;
    return Status(Code::kInvalidArgument, "cooldown must be a finite number of seconds >= 0");
  }
  return End(static_cast<uint32_t>(shm::OutcomeKind::kRateLimited), std::nullopt, 0, cooldown);
}

Status Lease::Cancel() {
  return End(static_cast<uint32_t>(shm::OutcomeKind::kCancelled), std::nullopt, 0, std::nullopt);
}

// ---------------------------------------------------------------------------
// Pool

Pool::Pool(std::unique_ptr<shm::Segment> segment, uint32_t pool_index, std::string name, SecretSource source)
    : segment_(std::move(segment)),
      access_(std::make_unique<shm::PoolAdmin>(*segment_, pool_index)),
      name_(std::move(name)),
      source_(std::move(source)),
      creator_pid_(static_cast<uint32_t>(::getpid())) {
  entries_size_ = segment_->header()->keys_per_pool;
  entries_ = std::make_unique<std::atomic<const detail::KeyEntry*>[]>(entries_size_);
}

Pool::~Pool() = default;

void Pool::Publish(uint32_t slot, std::string name, std::string secret, uint64_t fingerprint) {
  auto entry = std::make_unique<detail::KeyEntry>();
  entry->name = std::move(name);
  entry->secret = std::move(secret);
  entry->fingerprint = fingerprint;
  entries_[slot].store(entry.get(), std::memory_order_release);
  entry_storage_.push_back(std::move(entry));
}

Result<std::unique_ptr<Pool>> Pool::CreateEmbedded(const std::vector<KeySpec>& keys, const PoolOptions& options,
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
    if (k.secret.empty() || k.secret.find_first_not_of(" \t\r\n") == std::string::npos) {
      return Status(Code::kInvalidArgument, "key #" + std::to_string(i + 1) + " has an empty secret");
    }
    if (!secrets.insert(k.secret).second) {
      return Status(Code::kInvalidArgument, "key #" + std::to_string(i + 1) + " repeats the secret of an earlier key");
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
  std::unique_ptr<Pool> pool(new Pool(std::move(seg).value(), *index, kEmbeddedPoolName, nullptr));
  for (const KeySpec& k : keys) {
    st = pool->AddKey(k);
    if (!st.ok()) return st;
  }
  return pool;
}

Result<std::unique_ptr<Pool>> Pool::AttachSegment(std::string_view segment_name, std::string_view pool_name,
                                                  SecretSource secrets) {
  Result<std::unique_ptr<shm::Segment>> seg = shm::Segment::Open(segment_name);
  if (!seg.ok()) return seg.status();
  std::optional<uint32_t> index = (*seg)->FindPool(pool_name);
  if (!index) {
    return Status(Code::kUnknownKey, "no pool " + Quoted(pool_name) + " in segment " + Quoted(segment_name));
  }
  std::unique_ptr<Pool> pool(new Pool(std::move(seg).value(), *index, std::string(pool_name), std::move(secrets)));
  if (pool->source_) {
    Status st = pool->RefreshSecrets();
    if (!st.ok()) return st;
  }
  return pool;
}

Status Pool::RefreshSecrets() {
  if (!source_) return Status(Code::kUnknownKey, "this process does not know the secret of that key");
  Result<std::vector<std::pair<std::string, std::string>>> got = source_();
  if (!got.ok()) return got.status();
  std::lock_guard<std::mutex> lock(secrets_mutex_);
  for (auto& [name, secret] : *got) {
    std::optional<uint32_t> slot = access_->FindByName(name);
    if (!slot || *slot >= entries_size_) continue;
    const uint64_t fp = segment_->Fingerprint(secret);
    const detail::KeyEntry* cur = entries_[*slot].load(std::memory_order_acquire);
    if (cur != nullptr && cur->fingerprint == fp && cur->name == name) continue;
    Publish(*slot, name, secret, fp);
  }
  return Status::Ok();
}

Result<Lease> Pool::MakeLease(uint32_t slot, uint32_t lease_index, uint32_t seq, uint64_t acquire_ns,
                              uint64_t fingerprint) {
  Lease lease;
  lease.pool_ = this;
  lease.slot_ = slot;
  lease.lease_ = lease_index;
  lease.seq_ = seq;
  lease.acquire_ns_ = acquire_ns;
  const detail::KeyEntry* e = entries_[slot].load(std::memory_order_acquire);
  if (e == nullptr || e->fingerprint != fingerprint) [[unlikely]] {
    // A key added or rotated by another process: ask the broker.
    (void)RefreshSecrets();
    e = entries_[slot].load(std::memory_order_acquire);
    if (e == nullptr || e->fingerprint != fingerprint) {
      lease.entry_ = nullptr;
      (void)lease.Cancel();
      return Status(Code::kUnknownKey, "this process does not know the secret of the key in slot " +
                                           std::to_string(slot) + " (added after fork without a broker?)");
    }
  }
  lease.entry_ = e;
  return lease;
}

Result<Lease> Pool::Acquire(std::optional<double> timeout) { return Acquire(AcquireOptions{timeout, 0, nullptr}); }

Result<Lease> Pool::Acquire(std::optional<double> timeout, const std::atomic<bool>* cancel) {
  return Acquire(AcquireOptions{timeout, 0, cancel});
}

Result<Lease> Pool::Acquire(const AcquireOptions& options) {
  // Slow path: `cancel` is not supported over the socket.
  if (!access_) return RemoteAcquire(options.timeout, options.tokens);
  uint64_t timeout_ns = access_->header()->config.acquire_timeout;
  if (options.timeout) {
    Status st = ValidateTimeout(*options.timeout);
    if (!st.ok()) return st;
    timeout_ns = shm::SecondsToNanos(*options.timeout);
  }
  Result<shm::LeaseHandle> h = access_->Acquire(timeout_ns, selector_raw_.load(std::memory_order_acquire), shm::Self(),
                                                options.cancel, options.tokens);
  if (!h.ok()) return h.status();
  return MakeLease(h->slot, h->lease, h->seq, h->acquire_ns, h->fingerprint);
}

Status Pool::ObserveLimits(std::string_view key_name, const LimitObservation& o) {
  if (!access_) return RemoteObserve(key_name, o);
  shm::LimitUpdate u;
  u.remaining_requests = o.remaining_requests;
  u.reset_requests = o.reset_requests;
  u.remaining_tokens = o.remaining_tokens;
  u.reset_tokens = o.reset_tokens;
  u.retry_after = o.retry_after;
  return access_->ObserveLimits(key_name, u);
}

Result<Lease> Pool::TryAcquire() {
  if (!access_) return RemoteAcquire(0.0);
  Result<shm::LeaseHandle> h = access_->TryAcquire(selector_raw_.load(std::memory_order_acquire));
  if (!h.ok()) return h.status();
  return MakeLease(h->slot, h->lease, h->seq, h->acquire_ns, h->fingerprint);
}

Status Pool::AddKey(const KeySpec& key) {
  if (broker_) return RemoteAddKey(key);
  if (key.secret.empty() || key.secret.find_first_not_of(" \t\r\n") == std::string::npos) {
    return Status(Code::kInvalidArgument, "key has an empty secret");
  }
  std::lock_guard<std::mutex> lock(secrets_mutex_);
  const uint64_t fp = segment_->Fingerprint(key.secret);
  std::string name = key.name;
  if (name.empty()) {
    // The original identified keys by their secret: re-admit the key that
    // holds this secret, or name a new one.
    for (uint32_t s = 0; s < entries_size_ && name.empty(); ++s) {
      const detail::KeyEntry* e = entries_[s].load(std::memory_order_acquire);
      if (e != nullptr && e->fingerprint == fp && access_->FindByName(e->name) == s) name = e->name;
    }
    for (uint32_t n = access_->header()->key_count + 1; name.empty(); ++n) {
      std::string candidate = "key-" + std::to_string(n);
      if (!access_->FindByName(candidate)) name = std::move(candidate);
    }
  }
  const bool known_here = [&] {
    std::optional<uint32_t> s = access_->FindByName(name);
    if (!s) return false;
    const detail::KeyEntry* e = entries_[*s].load(std::memory_order_acquire);
    return e != nullptr && e->fingerprint == fp;
  }();
  if (!source_ && !known_here && static_cast<uint32_t>(::getpid()) != creator_pid_) {
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
  Result<shm::AddKeyResult> r = access_->AddKey(def);
  if (!r.ok()) return r.status();
  const detail::KeyEntry* cur = entries_[r->slot].load(std::memory_order_acquire);
  if (cur == nullptr || cur->fingerprint != fp || cur->name != name) Publish(r->slot, name, key.secret, fp);
  segment_->BumpGeneration();
  return Status::Ok();
}

Status Pool::RemoveKey(std::string_view name) {
  if (broker_) return RemoteKeyOp("remove_key", name);
  Status st = access_->RemoveKey(name);
  if (st.ok()) segment_->BumpGeneration();
  return st;
}

Status Pool::EnableKey(std::string_view name) {
  if (broker_) return RemoteKeyOp("enable", name);
  return access_->SetEnabled(name, true);
}
Status Pool::DisableKey(std::string_view name) {
  if (broker_) return RemoteKeyOp("disable", name);
  return access_->SetEnabled(name, false);
}
Status Pool::ResetKey(std::string_view name) {
  if (broker_) return RemoteKeyOp("reset", name);
  return access_->ResetKey(name);
}

Result<PoolStatus> Pool::GetStatus() {
  if (!access_) return RemoteStatus();
  return access_->Snapshot();
}

uint32_t Pool::AvailableCount() {
  if (!access_) {
    Result<PoolStatus> st = RemoteStatus();
    uint32_t n = 0;
    if (st.ok()) {
      for (const KeyStatus& k : st->keys) n += k.state == KeyState::kAvailable ? 1 : 0;
    }
    return n;
  }
  return access_->AvailableCount();
}

std::optional<std::string> Pool::NameOfSecret(std::string_view secret) {
  if (!access_) return RemoteNameOfSecret(secret);
  const uint64_t fp = segment_->Fingerprint(secret);
  for (uint32_t s = 0; s < entries_size_; ++s) {
    const detail::KeyEntry* e = entries_[s].load(std::memory_order_acquire);
    if (e != nullptr && e->fingerprint == fp && e->secret == secret) return e->name;
  }
  return std::nullopt;
}

std::optional<std::string> Pool::MaskedSecretOfSlot(uint32_t slot) {
  if (slot >= entries_size_) return std::nullopt;
  const detail::KeyEntry* e = entries_[slot].load(std::memory_order_acquire);
  if (e == nullptr) return std::nullopt;
  return MaskSecret(e->secret);
}

void Pool::SetSelector(std::shared_ptr<const Selector> selector) {
  std::lock_guard<std::mutex> lock(secrets_mutex_);
  selector_raw_.store(selector.get(), std::memory_order_release);
  if (selector) selectors_.push_back(std::move(selector));
}

}  // namespace keymesh
