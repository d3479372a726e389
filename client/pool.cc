// keymesh::Pool, Lease and CancelToken (include/keymesh/pool.h): the
// facade. Each call checks its arguments where the contract says so and
// forwards to the backend (client/pool_backend.h) the factory chose.
#include "keymesh/pool.h"

#include <cmath>

#include "client/local_pool.h"
#include "client/pool_backend.h"
#include "client/remote_pool.h"
#include "shm/clock.h"

namespace keymesh {

namespace detail {

Status ValidateTimeout(double seconds) {
  if (!(seconds >= 0) || seconds > 1e9) {
    return Status(Code::kInvalidArgument, "timeout must be a finite number of seconds >= 0");
  }
  return Status::Ok();
}

Status ValidateKeySpec(const KeySpec& key) {
  Status st = ValidateSecret(key.secret);
  if (!st.ok()) return st;
  if (key.burst > kMaxBurst) {
    return Status(Code::kInvalidArgument, "burst must be at most " + std::to_string(kMaxBurst));
  }
  if (!(key.rate_margin < 0) && !(key.rate_margin >= 0 && key.rate_margin < 0.5)) {
    return Status(Code::kInvalidArgument, "rate_margin must be >= 0 and < 0.5 (negative: the pool's)");
  }
  return Status::Ok();
}

namespace {
Status NoSegment() {
  return Status(Code::kInvalidArgument,
                "this pool goes over the broker socket (its segment could not be mapped): no key snapshot, so "
                "no scheduler outside the pool can choose for it");
}
}  // namespace

Status PoolBackend::SnapshotKeys(KeySnapshot*, uint32_t, KeysSnapshotInfo*) { return NoSegment(); }
Result<Lease> PoolBackend::AcquireKey(const KeySnapshot&, uint64_t) { return NoSegment(); }
Status PoolBackend::WaitForChange(uint32_t, double, const CancelToken*) { return NoSegment(); }

Status KeyAdmin::RestoreKey(std::string_view, const KeyRestore&) {
  return Status(
      Code::kInvalidArgument,
      "restoring key state is for embedded pools: keymesh-broker restores attached pools from its state file");
}

}  // namespace detail

namespace {

bool ValidCooldown(const std::optional<double>& cooldown) { return !cooldown || (*cooldown >= 0 && *cooldown <= 1e9); }

const std::string kEmpty;

}  // namespace

// ---------------------------------------------------------------------------
// CancelToken

CancelToken::CancelToken() : state_(std::make_unique<detail::CancelState>()) {}
CancelToken::~CancelToken() = default;

void CancelToken::Cancel() noexcept { state_->flag.store(true, std::memory_order_release); }
bool CancelToken::cancelled() const noexcept { return state_->flag.load(std::memory_order_acquire); }

// ---------------------------------------------------------------------------
// Lease

Lease::Lease(Lease&& o) noexcept { *this = std::move(o); }

Lease& Lease::operator=(Lease&& o) noexcept {
  if (this != &o) {
    if (backend_ != nullptr) (void)Release();
    backend_ = o.backend_;
    entry_ = o.entry_;
    slot_ = o.slot_;
    lease_ = o.lease_;
    seq_ = o.seq_;
    acquire_ns_ = o.acquire_ns_;
    o.backend_ = nullptr;
  }
  return *this;
}

Lease::~Lease() {
  if (backend_ != nullptr) (void)Release();
}

const std::string& Lease::secret() const noexcept { return entry_ != nullptr ? entry_->secret : kEmpty; }
const std::string& Lease::key_name() const noexcept { return entry_ != nullptr ? entry_->name : kEmpty; }

double Lease::elapsed() const noexcept {
  const uint64_t now = shm::MonotonicNowNanos();
  return now > acquire_ns_ ? shm::NanosToSeconds(now - acquire_ns_) : 0.0;
}

Status Lease::End(OutcomeKind kind, const EndOptions& options) {
  if (backend_ == nullptr) return Status(Code::kNotHeld, "lease already ended");
  if (static_cast<uint32_t>(kind) > static_cast<uint32_t>(OutcomeKind::kCancelled)) {
    return Status(Code::kInvalidArgument, "unknown outcome " + std::to_string(static_cast<uint32_t>(kind)));
  }
  if (options.permanent && kind != OutcomeKind::kFailure) {
    return Status(Code::kInvalidArgument, "only a failure can be permanent");
  }
  detail::PoolBackend* backend = backend_;
  backend_ = nullptr;
  const detail::LeaseRef ref = detail::PoolBackend::RefOf(*this);
  if (kind == OutcomeKind::kSuccess && !options.latency) [[likely]] {
    EndOptions measured = options;
    measured.latency = elapsed();
    return backend->End(ref, kind, measured);
  }
  if (kind == OutcomeKind::kRateLimited && !ValidCooldown(options.cooldown)) {
    // Still end the lease: the request is over whatever the caller passed.
    EndOptions fallback = options;
    fallback.cooldown.reset();
    (void)backend->End(ref, kind, fallback);
    return Status(Code::kInvalidArgument, "cooldown must be a finite number of seconds >= 0");
  }
  if (kind != OutcomeKind::kSuccess && options.latency) {
    EndOptions without = options;  // only a success samples the latency
    without.latency.reset();
    return backend->End(ref, kind, without);
  }
  return backend->End(ref, kind, options);
}

Status Lease::Release(std::optional<double> latency, uint64_t tokens) {
  EndOptions o;
  o.latency = latency;
  o.tokens = tokens;
  return End(OutcomeKind::kSuccess, o);
}

Status Lease::MarkFailed(bool permanent) {
  EndOptions o;
  o.permanent = permanent;
  return End(OutcomeKind::kFailure, o);
}

Status Lease::MarkRateLimited(std::optional<double> cooldown) {
  EndOptions o;
  o.cooldown = cooldown;
  return End(OutcomeKind::kRateLimited, o);
}

Status Lease::Cancel() { return End(OutcomeKind::kCancelled, EndOptions{}); }

Status Lease::ObserveLimits(const LimitObservation& observation) {
  if (backend_ == nullptr) return Status(Code::kNotHeld, "lease already ended");
  return backend_->ObserveLimits(entry_->name, observation);
}

// ---------------------------------------------------------------------------
// Pool

Pool::Pool(std::unique_ptr<detail::PoolBackend> backend) noexcept : backend_(std::move(backend)) {}
Pool::~Pool() = default;

Result<std::unique_ptr<Pool>> Pool::Wrap(Result<std::unique_ptr<detail::PoolBackend>> backend) {
  if (!backend.ok()) return backend.status();
  return std::unique_ptr<Pool>(new Pool(std::move(backend).value()));
}

Result<std::unique_ptr<Pool>> Pool::CreateEmbedded(const std::vector<KeySpec>& keys, const PoolOptions& options,
                                                   const EmbeddedOptions& embedded) {
  return Wrap(detail::EmbeddedPool::Create(keys, options, embedded));
}

Result<std::unique_ptr<Pool>> Pool::AttachSegment(std::string_view segment_name, std::string_view pool_name,
                                                  SecretSource secrets) {
  return Wrap(detail::EmbeddedPool::Attach(segment_name, pool_name, std::move(secrets)));
}

Result<std::unique_ptr<Pool>> Pool::Connect(std::string_view socket_path, std::string_view pool_name) {
  return Wrap(detail::ConnectBackend(socket_path, pool_name));
}

Result<Lease> Pool::Acquire(std::optional<double> timeout) {
  AcquireOptions o;
  o.timeout = timeout;
  return backend_->Acquire(o);
}

Result<Lease> Pool::Acquire(const AcquireOptions& options) { return backend_->Acquire(options); }
Result<Lease> Pool::TryAcquire() { return backend_->TryAcquire(); }

void Pool::Cancel(CancelToken& token) noexcept {
  token.Cancel();
  backend_->WakeWaiters();
}

void Pool::WakeWaiters() noexcept { backend_->WakeWaiters(); }

Status Pool::ObserveLimits(std::string_view key_name, const LimitObservation& observation) {
  return backend_->ObserveLimits(key_name, observation);
}

Status Pool::AddKey(const KeySpec& key) { return backend_->keys().AddKey(key); }
Status Pool::RemoveKey(std::string_view name) { return backend_->keys().RemoveKey(name); }
Status Pool::EnableKey(std::string_view name) { return backend_->keys().SetEnabled(name, true); }
Status Pool::DisableKey(std::string_view name) { return backend_->keys().SetEnabled(name, false); }
Status Pool::ResetKey(std::string_view name) { return backend_->keys().ResetKey(name); }
Result<uint32_t> Pool::ReclaimDead() { return backend_->keys().ReclaimDead(); }

Status Pool::RestoreKey(std::string_view name, const KeyRestore& restore) {
  // A hostile storage file reaches this through the bindings: every number
  // is checked before anything is written.
  if (restore.latency_avg && !(*restore.latency_avg >= 0 && *restore.latency_avg <= 1e9)) {
    return Status(Code::kInvalidArgument, "latency_avg must be a finite number of seconds >= 0 and <= 1e9");
  }
  if (!(restore.cooldown_remaining >= 0 && restore.cooldown_remaining <= 1e9)) {
    return Status(Code::kInvalidArgument, "cooldown_remaining must be a finite number of seconds >= 0 and <= 1e9");
  }
  return backend_->keys().RestoreKey(name, restore);
}
Result<PoolStatus> Pool::GetStatus() { return backend_->GetStatus(); }
uint32_t Pool::AvailableCount() { return backend_->AvailableCount(); }
const std::string& Pool::name() const noexcept { return backend_->name(); }
std::optional<std::string> Pool::NameOfSecret(std::string_view secret) { return backend_->NameOfSecret(secret); }
std::optional<std::string> Pool::MaskedSecretOfSlot(uint32_t slot) { return backend_->MaskedSecretOfSlot(slot); }
void Pool::SetSelector(std::shared_ptr<const Selector> selector) { backend_->SetSelector(std::move(selector)); }
Status Pool::SnapshotKeys(KeySnapshot* out, uint32_t capacity, KeysSnapshotInfo* info) {
  if ((out == nullptr && capacity != 0) || info == nullptr) {
    return Status(Code::kInvalidArgument, "SnapshotKeys needs a buffer for `capacity` keys and an info");
  }
  return backend_->SnapshotKeys(out, capacity, info);
}
Result<Lease> Pool::AcquireKey(const KeySnapshot& key, uint64_t tokens) { return backend_->AcquireKey(key, tokens); }
Status Pool::WaitForChange(uint32_t wake_seq, double timeout, const CancelToken* cancel) {
  return backend_->WaitForChange(wake_seq, timeout, cancel);
}
bool Pool::slow_path() const noexcept { return backend_->slow_path(); }

}  // namespace keymesh
