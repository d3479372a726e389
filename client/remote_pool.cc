#include "client/remote_pool.h"

#include <cstdlib>
#include <cstring>

#include "common/text.h"
#include "protocol/socket_path.h"
#include "shm/process_id.h"

namespace keymesh::detail {

namespace {

// An acquire without a timeout waits as long as the pool's acquire_timeout,
// which only the broker knows: wait for its answer up to a day.
constexpr double kUnboundedWait = 24 * 3600.0;

}  // namespace

// ---------------------------------------------------------------------------
// Connect

Result<std::unique_ptr<PoolBackend>> ConnectBackend(std::string_view socket_path, std::string_view pool_name) {
  protocol::ControlClientOptions options(protocol::ResolveSocketPath(socket_path));
  std::string pool(pool_name);
  options.hello = [pool] {
    const shm::ProcessId& self = shm::Self();  // recomputed in a fork child
    protocol::HelloRequest hello;
    hello.pid = self.pid;
    hello.start_time = self.start_time;
    hello.pool = pool;
    return hello;
  };
  const BrokerChannel channel{std::make_shared<protocol::ControlClient>(std::move(options)), pool};
  Status st = channel.client->Connect();
  if (!st.ok()) return st;
  // Secrets first: a peer the broker does not trust learns that here,
  // whichever path it would take.
  Result<Secrets> secrets = FetchSecrets(channel);
  if (!secrets.ok()) return secrets.status();
  const std::optional<protocol::HelloReply> hello = channel.client->hello_reply();
  // KEYMESH_SLOW_PATH=1 forces the socket path (tests, diagnosis).
  const char* force_slow = std::getenv("KEYMESH_SLOW_PATH");
  const bool slow = force_slow != nullptr && *force_slow != '\0' && std::strcmp(force_slow, "0") != 0;
  if (!slow && hello && !hello->segment.empty()) {
    Result<std::unique_ptr<shm::Segment>> seg = shm::Segment::Open(hello->segment);
    std::optional<uint32_t> index = seg.ok() ? (*seg)->FindPool(pool_name) : std::nullopt;
    if (index) {
      return std::unique_ptr<PoolBackend>(
          std::make_unique<AttachedPool>(std::move(seg).value(), *index, channel, *secrets));
    }
    // Cannot map the segment (permissions, another layout version) or the
    // pool is not in it (yet): every call goes over the socket instead.
  }
  return std::unique_ptr<PoolBackend>(std::make_unique<RemotePool>(channel, *secrets));
}

// ---------------------------------------------------------------------------
// Reading the broker

Result<Secrets> FetchSecrets(const BrokerChannel& channel) {
  Result<protocol::SecretsReply> r = channel.client->Secrets(protocol::SecretsRequest{channel.pool});
  if (!r.ok()) return r.status();
  Secrets out;
  out.reserve(r->secrets.size());
  for (protocol::SecretsReply::Secret& e : r->secrets) out.emplace_back(std::move(e.name), std::move(e.secret));
  return out;
}

Result<PoolStatus> FetchStatus(const BrokerChannel& channel) {
  protocol::StatusRequest request;
  request.pool = channel.pool;
  Result<protocol::StatusReply> r = channel.client->GetStatus(request);
  if (!r.ok()) return r.status();
  if (r->pools.empty()) return Status(Code::kProtocolError, "status reply without the pool");
  return std::move(r->pools.front().status);
}

// ---------------------------------------------------------------------------
// BrokerAdmin

Status BrokerAdmin::AddKey(const KeySpec& key) {
  Status st = ValidateKeySpec(key);
  if (!st.ok()) return st;
  protocol::AddKeyRequest request;
  request.pool = pool();
  request.key = key;
  if (request.key.name.empty()) request.key.name = owner_.NameOfSecret(key.secret).value_or("");
  if (request.key.name.empty()) {
    Result<PoolStatus> status = FetchStatus(channel_);
    if (!status.ok()) return status.status();
    for (size_t n = status->keys.size() + 1; request.key.name.empty(); ++n) {
      std::string candidate = "key-" + std::to_string(n);
      bool taken = false;
      for (const KeyStatus& k : status->keys) taken = taken || k.name == candidate;
      if (!taken) request.key.name = std::move(candidate);
    }
  }
  st = client().AddKey(request);
  if (!st.ok()) return st;
  // Learn the new secret now rather than at the first grant of the key.
  (void)owner_.RefreshSecrets();
  return Status::Ok();
}

Status BrokerAdmin::KeyOp(protocol::Op op, std::string_view name) {
  return client().KeyOp(protocol::KeyOpRequest{op, pool(), std::string(name)});
}

Result<uint32_t> BrokerAdmin::ReclaimDead() {
  return Status(Code::kInvalidArgument, "a pool attached to a broker: the broker reclaims the leases of dead holders");
}

// ---------------------------------------------------------------------------
// AttachedPool

AttachedPool::AttachedPool(std::unique_ptr<shm::Segment> segment, uint32_t pool_index, const BrokerChannel& channel,
                           const Secrets& secrets)
    : LocalPool(std::move(segment), pool_index, channel.pool, [channel] { return FetchSecrets(channel); }),
      admin_(channel, *this) {
  LearnSecrets(secrets);
}

// ---------------------------------------------------------------------------
// RemotePool

RemotePool::RemotePool(const BrokerChannel& channel, const Secrets& secrets) : admin_(channel, *this) {
  LearnSecrets(secrets);
}

Status RemotePool::RefreshSecrets() {
  Result<Secrets> got = FetchSecrets(admin_.channel());
  if (!got.ok()) return got.status();
  LearnSecrets(*got);
  return Status::Ok();
}

void RemotePool::LearnSecrets(const Secrets& secrets) {
  std::lock_guard<std::mutex> lock(entries_mu_);
  for (const auto& [name, secret] : secrets) {
    auto it = entries_.find(name);
    if (it != entries_.end() && it->second->secret == secret) continue;
    auto entry = std::make_unique<KeyEntry>();
    entry->name = name;
    entry->secret = secret;
    entries_[name] = entry.get();
    storage_.push_back(std::move(entry));  // kept until the backend dies: leases point at it
  }
}

const KeyEntry* RemotePool::Entry(const std::string& name) {
  for (int attempt = 0; attempt < 2; ++attempt) {
    {
      std::lock_guard<std::mutex> lock(entries_mu_);
      auto it = entries_.find(name);
      if (it != entries_.end()) return it->second;
    }
    if (attempt == 0 && !RefreshSecrets().ok()) break;
  }
  return nullptr;
}

std::optional<std::string> RemotePool::NameOfSecret(std::string_view secret) {
  for (int attempt = 0; attempt < 2; ++attempt) {
    {
      std::lock_guard<std::mutex> lock(entries_mu_);
      for (const auto& [name, e] : entries_) {
        if (e->secret == secret) return name;
      }
    }
    if (attempt == 0 && !RefreshSecrets().ok()) break;
  }
  return std::nullopt;
}

Result<Lease> RemotePool::Acquire(const Pool::AcquireOptions& options) {
  if (options.poll) return AcquireOver(0.0, options.tokens);
  // The broker's wait cannot be interrupted; a token already set refuses
  // the call at once.
  const std::atomic<bool>* cancel = FlagOf(options.cancel);
  if (cancel != nullptr && cancel->load(std::memory_order_acquire)) return Status(Code::kClosed, "acquire cancelled");
  return AcquireOver(options.timeout, options.tokens);
}

Result<Lease> RemotePool::TryAcquire() { return AcquireOver(0.0, 0); }

Result<Lease> RemotePool::AcquireOver(std::optional<double> timeout, uint64_t tokens) {
  protocol::AcquireRequest request;
  request.pool = admin_.pool();
  request.tokens = tokens;
  double wait = kUnboundedWait;
  if (timeout) {
    Status st = ValidateTimeout(*timeout);
    if (!st.ok()) return st;
    request.timeout = *timeout;
    wait = *timeout;
  }
  Result<protocol::LeaseGrant> grant =
      admin_.client().Acquire(request, wait + protocol::ControlClient::kDefaultTimeout);
  if (!grant.ok()) return grant.status();
  LeaseRef ref{Entry(grant->key), grant->slot, grant->lease, grant->seq, grant->acquire_ns};
  if (ref.entry == nullptr) {
    (void)End(ref, OutcomeKind::kCancelled, Lease::EndOptions{});
    return Status(Code::kUnknownKey, "the broker granted key " + Quoted(grant->key) + " but did not give its secret");
  }
  return MakeLease(ref);
}

Status RemotePool::End(const LeaseRef& lease, OutcomeKind kind, const Lease::EndOptions& options) {
  protocol::EndRequest request;
  request.pool = admin_.pool();
  request.slot = lease.slot;
  request.lease = lease.lease;
  request.seq = lease.seq;
  request.acquire_ns = lease.acquire_ns;
  request.outcome = kind;
  if (options.latency && *options.latency >= 0 && *options.latency <= 1e9) request.latency = options.latency;
  request.tokens = options.tokens;
  request.cooldown = options.cooldown;
  request.permanent = options.permanent;
  return admin_.client().End(request);
}

Status RemotePool::ObserveLimits(std::string_view key_name, const LimitObservation& o) {
  protocol::ObserveLimitsRequest request;
  request.pool = admin_.pool();
  request.name = std::string(key_name);
  request.remaining_requests = o.remaining_requests;
  request.reset_requests = o.reset_requests;
  request.remaining_tokens = o.remaining_tokens;
  request.reset_tokens = o.reset_tokens;
  request.retry_after = o.retry_after;
  return admin_.client().ObserveLimits(request);
}

uint32_t RemotePool::AvailableCount() {
  Result<PoolStatus> st = FetchStatus(admin_.channel());
  uint32_t n = 0;
  if (st.ok()) {
    for (const KeyStatus& k : st->keys) n += k.state == KeyState::kAvailable ? 1 : 0;
  }
  return n;
}

void RemotePool::SetSelector(std::shared_ptr<const Selector>) {}

}  // namespace keymesh::detail
