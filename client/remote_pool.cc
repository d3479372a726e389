#include "client/remote_pool.h"

#include <cstdlib>
#include <cstring>

#include <boost/json.hpp>

#include "common/text.h"
#include "protocol/protocol.h"

namespace keymesh::detail {

namespace json = boost::json;

namespace {

// An acquire without a timeout waits as long as the pool's acquire_timeout,
// which only the broker knows: wait for its answer up to a day.
constexpr double kUnboundedWait = 24 * 3600.0;

Status OkOr(const Result<json::object>& r) { return r.ok() ? Status::Ok() : r.status(); }

json::object PoolFields(const std::string& pool) {
  json::object f;
  f["pool"] = pool;
  return f;
}

}  // namespace

// ---------------------------------------------------------------------------
// Connect

Result<std::unique_ptr<PoolBackend>> ConnectBackend(std::string_view socket_path, std::string_view pool_name) {
  Result<std::shared_ptr<BrokerLink>> link =
      BrokerLink::Open(BrokerLink::ResolveSocketPath(socket_path), std::string(pool_name));
  if (!link.ok()) return link.status();
  // Secrets first: a peer the broker does not trust learns that here,
  // whichever path it would take.
  Result<Secrets> secrets = FetchSecrets(**link);
  if (!secrets.ok()) return secrets.status();
  const json::value* segment_name = (*link)->hello().if_contains("segment");
  // KEYMESH_SLOW_PATH=1 forces the socket path (tests, diagnosis).
  const char* force_slow = std::getenv("KEYMESH_SLOW_PATH");
  const bool slow = force_slow != nullptr && *force_slow != '\0' && std::strcmp(force_slow, "0") != 0;
  if (!slow && segment_name != nullptr && segment_name->is_string()) {
    Result<std::unique_ptr<shm::Segment>> seg = shm::Segment::Open(segment_name->get_string());
    std::optional<uint32_t> index = seg.ok() ? (*seg)->FindPool(pool_name) : std::nullopt;
    if (index) {
      return std::unique_ptr<PoolBackend>(
          std::make_unique<AttachedPool>(std::move(seg).value(), *index, std::move(link).value(), *secrets));
    }
    // Cannot map the segment (permissions, another layout version) or the
    // pool is not in it (yet): every call goes over the socket instead.
  }
  return std::unique_ptr<PoolBackend>(std::make_unique<RemotePool>(std::move(link).value(), *secrets));
}

// ---------------------------------------------------------------------------
// Reading the broker

Result<Secrets> FetchSecrets(BrokerLink& link) {
  Result<json::object> r = link.Call("secrets", PoolFields(link.pool()));
  if (!r.ok()) return r.status();
  const json::value* list = r->if_contains("secrets");
  if (list == nullptr || !list->is_array()) return Status(Code::kProtocolError, "secrets reply without a list");
  Secrets out;
  for (const json::value& e : list->get_array()) {
    if (!e.is_object()) continue;
    Result<std::string> name = protocol::GetString(e.get_object(), "name");
    Result<std::string> secret = protocol::GetString(e.get_object(), "secret");
    if (!name.ok() || !secret.ok()) continue;
    out.emplace_back(std::move(name).value(), std::move(secret).value());
  }
  return out;
}

Result<PoolStatus> FetchStatus(BrokerLink& link) {
  Result<json::object> r = link.Call("status", PoolFields(link.pool()));
  if (!r.ok()) return r.status();
  const json::value* pools = r->if_contains("pools");
  if (pools == nullptr || !pools->is_array() || pools->get_array().empty()) {
    return Status(Code::kProtocolError, "status reply without the pool");
  }
  return protocol::PoolStatusFromJson(pools->get_array()[0]);
}

// ---------------------------------------------------------------------------
// BrokerAdmin

Status BrokerAdmin::AddKey(const KeySpec& key) {
  Status st = ValidateKeySpec(key);
  if (!st.ok()) return st;
  std::string name = key.name;
  if (name.empty()) name = owner_.NameOfSecret(key.secret).value_or("");
  if (name.empty()) {
    Result<PoolStatus> status = FetchStatus(*link_);
    if (!status.ok()) return status.status();
    for (size_t n = status->keys.size() + 1; name.empty(); ++n) {
      std::string candidate = "key-" + std::to_string(n);
      bool taken = false;
      for (const KeyStatus& k : status->keys) taken = taken || k.name == candidate;
      if (!taken) name = std::move(candidate);
    }
  }
  json::object f = PoolFields(pool());
  f["name"] = name;
  f["secret"] = key.secret;
  f["weight"] = key.weight;
  f["max_concurrency"] = key.max_concurrency;
  f["rpm"] = key.rpm;
  f["tpm"] = key.tpm;
  // Sent only when set, so a broker that predates them sees the request it
  // knows.
  if (key.burst != 0) f["burst"] = key.burst;
  if (key.rate_margin >= 0) f["rate_margin"] = key.rate_margin;
  st = OkOr(link_->Call("add_key", std::move(f)));
  if (!st.ok()) return st;
  // Learn the new secret now rather than at the first grant of the key.
  (void)owner_.RefreshSecrets();
  return Status::Ok();
}

Status BrokerAdmin::KeyOp(std::string_view op, std::string_view name) {
  json::object f = PoolFields(pool());
  f["name"] = name;
  return OkOr(link_->Call(op, std::move(f)));
}

Result<uint32_t> BrokerAdmin::ReclaimDead() {
  return Status(Code::kInvalidArgument, "a pool attached to a broker: the broker reclaims the leases of dead holders");
}

// ---------------------------------------------------------------------------
// AttachedPool

AttachedPool::AttachedPool(std::unique_ptr<shm::Segment> segment, uint32_t pool_index, std::shared_ptr<BrokerLink> link,
                           const Secrets& secrets)
    : LocalPool(std::move(segment), pool_index, link->pool(), [link] { return FetchSecrets(*link); }),
      admin_(link, *this) {
  LearnSecrets(secrets);
}

// ---------------------------------------------------------------------------
// RemotePool

RemotePool::RemotePool(std::shared_ptr<BrokerLink> link, const Secrets& secrets) : admin_(std::move(link), *this) {
  LearnSecrets(secrets);
}

Status RemotePool::RefreshSecrets() {
  Result<Secrets> got = FetchSecrets(admin_.link());
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
  json::object f = PoolFields(admin_.pool());
  if (tokens != 0) f["tokens"] = tokens;
  double wait = kUnboundedWait;
  if (timeout) {
    Status st = ValidateTimeout(*timeout);
    if (!st.ok()) return st;
    f["timeout"] = *timeout;
    wait = *timeout;
  }
  Result<json::object> r = admin_.link().Call("acquire", std::move(f), wait + BrokerLink::kCallTimeout);
  if (!r.ok()) return r.status();
  Result<std::string> key = protocol::GetString(*r, "key");
  Result<uint64_t> slot = protocol::GetUint(*r, "slot");
  Result<uint64_t> lease_index = protocol::GetUint(*r, "lease");
  Result<uint64_t> seq = protocol::GetUint(*r, "seq");
  Result<uint64_t> acquire_ns = protocol::GetUint(*r, "acquire_ns");
  if (!key.ok() || !slot.ok() || !lease_index.ok() || !seq.ok() || !acquire_ns.ok() || *slot > UINT32_MAX ||
      *lease_index > UINT32_MAX || *seq > UINT32_MAX) {
    return Status(Code::kProtocolError, "malformed acquire reply");
  }
  LeaseRef ref{Entry(*key), static_cast<uint32_t>(*slot), static_cast<uint32_t>(*lease_index),
               static_cast<uint32_t>(*seq), *acquire_ns};
  if (ref.entry == nullptr) {
    (void)End(ref, OutcomeKind::kCancelled, Lease::EndOptions{});
    return Status(Code::kUnknownKey, "the broker granted key " + Quoted(*key) + " but did not give its secret");
  }
  return MakeLease(ref);
}

Status RemotePool::End(const LeaseRef& lease, OutcomeKind kind, const Lease::EndOptions& options) {
  static constexpr const char* kOps[] = {"release", "mark_failed", "mark_rate_limited", "cancel"};
  json::object f = PoolFields(admin_.pool());
  f["slot"] = lease.slot;
  f["lease"] = lease.lease;
  f["seq"] = lease.seq;
  f["acquire_ns"] = lease.acquire_ns;
  if (options.latency && *options.latency >= 0 && *options.latency <= 1e9) f["latency"] = *options.latency;
  if (options.tokens != 0) f["tokens"] = options.tokens;
  if (options.cooldown) f["cooldown"] = *options.cooldown;
  if (options.permanent) f["permanent"] = true;
  return OkOr(admin_.link().Call(kOps[static_cast<uint32_t>(kind)], std::move(f)));
}

Status RemotePool::ObserveLimits(std::string_view key_name, const LimitObservation& o) {
  json::object f = PoolFields(admin_.pool());
  f["name"] = key_name;
  if (o.remaining_requests) f["remaining_requests"] = *o.remaining_requests;
  if (o.reset_requests) f["reset_requests"] = *o.reset_requests;
  if (o.remaining_tokens) f["remaining_tokens"] = *o.remaining_tokens;
  if (o.reset_tokens) f["reset_tokens"] = *o.reset_tokens;
  if (o.retry_after) f["retry_after"] = *o.retry_after;
  return OkOr(admin_.link().Call("observe_limits", std::move(f)));
}

uint32_t RemotePool::AvailableCount() {
  Result<PoolStatus> st = FetchStatus(admin_.link());
  uint32_t n = 0;
  if (st.ok()) {
    for (const KeyStatus& k : st->keys) n += k.state == KeyState::kAvailable ? 1 : 0;
  }
  return n;
}

void RemotePool::SetSelector(std::shared_ptr<const Selector>) {}

}  // namespace keymesh::detail
