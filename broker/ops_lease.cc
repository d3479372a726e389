// The worker's ops: hello (who holds the leases granted on this
// connection), acquire (the socket slow path, waiting without blocking the
// io thread), the four ends of a lease, and observe_limits.
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <memory>
#include <optional>
#include <string>

#include "broker/broker.h"
#include "broker/ops.h"
#include "broker/pool_registry.h"
#include "broker/session.h"
#include "protocol/framing.h"
#include "shm/clock.h"

namespace keymesh::broker::ops {
namespace {

namespace json = boost::json;

// The reply to a granted lease. kBusy when the pool's lock was taken by a
// stopped process right after the grant: the lease is already in the
// session's list, so it ends when the connection does.
Fields Grant(shm::PoolAdmin& pool, const shm::LeaseHandle& h) {
  std::string name;
  if (Status st = pool.KeyName(h.slot, &name); !st.ok()) return st;
  return protocol::LeaseGrant{std::move(name), h.slot, h.lease, h.seq, h.acquire_ns, h.fingerprint}.ToJson();
}

shm::Outcome Cancelled() {
  shm::Outcome o;
  o.kind = shm::OutcomeKind::kCancelled;
  return o;
}

// The pool honours a requested cooldown only up to its max_cooldown; say so
// when a request (a Retry-After) asked for more. The key is named by `name`,
// or by `slot` when `name` is empty (looked up only then).
void NoteCapped(shm::PoolAdmin& pool, std::string_view pool_name, std::string_view name, uint32_t slot,
                const char* what, std::optional<double> seconds) {
  const double cap = shm::NanosToSeconds(pool.header()->config.max_cooldown);
  if (!seconds || !(*seconds > cap)) return;
  char requested[32];
  char max_cooldown[32];
  std::snprintf(requested, sizeof(requested), "%.6g", *seconds);
  std::snprintf(max_cooldown, sizeof(max_cooldown), "%.6g", cap);
  Log(LogLevel::kWarn, "retry_after_capped",
      {{"pool", std::string(pool_name)},
       {"key", name.empty() ? pool.KeyName(slot) : std::string(name)},
       {"field", what},
       {"requested", requested},
       {"max_cooldown", max_cooldown}});
}

}  // namespace

Fields Hello(const OpCall& call, const protocol::HelloRequest& request) {
  const PeerCred& peer = call.session->peer();
  if (peer.pid <= 0) {
    return Status(Code::kInvalidArgument,
                  "the broker cannot see this connection's process (another pid namespace?): run workers in the "
                  "broker's pid namespace or a child of it");
  }
  // The holder is the peer itself (SO_PEERCRED, pinned at accept): a
  // process says hello for itself only (KM-04).
  if (request.pid != static_cast<uint32_t>(peer.pid)) {
    return Status(Code::kInvalidArgument, "hello names pid " + std::to_string(request.pid) +
                                              ", but this connection's process is pid " + std::to_string(peer.pid) +
                                              " (a process says hello for itself; another pid namespace?)");
  }
  if (peer.start_time == 0) {
    return Status(Code::kPermissionDenied, "the broker cannot read /proc/" + std::to_string(peer.pid) +
                                               "/stat (is /proc mounted hidepid= without a gid= exemption "
                                               "for the broker?)");
  }
  if (request.start_time && *request.start_time != peer.start_time) {
    return Status(Code::kInvalidArgument,
                  "process " + std::to_string(peer.pid) + " has another start time (pid reused?)");
  }
  PoolRegistry& pools = call.broker.pools();
  if (request.pool && pools.Find(*request.pool) == nullptr) return UnknownPool(*request.pool);
  const shm::ProcessId id{static_cast<uint32_t>(peer.pid), peer.start_time};
  call.context.client = id;
  call.broker.reaper().Watch(id);
  const shm::Segment& segment = call.broker.segment();
  protocol::HelloReply reply;
  reply.segment = segment.name();
  reply.layout_version = segment.header()->layout_version;
  reply.generation = segment.generation();
  reply.pools = pools.Names();
  reply.keys_per_pool = segment.header()->keys_per_pool;
  return reply.ToJson();
}

void Acquire(const OpCall& call, const protocol::AcquireRequest& request) {
  Broker& broker = call.broker;
  Result<shm::PoolAdmin*> found = broker.pools().Get(request.pool);
  if (!found.ok()) return call.Reply(found.status());
  shm::PoolAdmin* pool = *found;
  const BrokerConfig& config = broker.config();
  ClientContext& context = call.context;
  if (context.slow_leases.size() >= config.max_slow_leases) {
    return call.Reply(Status(Code::kCapacityExceeded, "this connection holds " +
                                                          std::to_string(context.slow_leases.size()) +
                                                          " leases, the most max_slow_leases allows; end one first"));
  }
  const uint64_t pool_timeout = pool->header()->config.acquire_timeout;
  const uint64_t max_timeout = std::max(pool_timeout, shm::SecondsToNanos(kMaxAcquireTimeout));
  const uint64_t timeout_ns = request.timeout ? shm::SecondsToNanos(*request.timeout) : pool_timeout;
  if (timeout_ns > max_timeout) {
    char bound[32];
    std::snprintf(bound, sizeof(bound), "%g", static_cast<double>(max_timeout) / 1e9);
    return call.Reply(Status(Code::kInvalidArgument, std::string("timeout may be at most ") + bound +
                                                         " seconds (the larger of the pool's acquire_timeout and " +
                                                         std::to_string(static_cast<int>(kMaxAcquireTimeout)) + ")"));
  }
  const shm::ProcessId holder = *context.client;
  // Try at once unless others already wait (no overtaking) or nothing is
  // eligible (a doomed try would count a miss twice).
  if (timeout_ns == 0 || (broker.slow().Idle(pool) && pool->AvailableCount() > 0)) {
    Result<shm::LeaseHandle> h = pool->TryAcquire(nullptr, nullptr, holder, request.tokens);
    if (h.ok()) {
      context.slow_leases.push_back({pool, *h, holder});
      return call.Reply(Grant(*pool, *h));
    }
    // A full lease table is waited out like no key (the lane's Acquire
    // waits for a release); a client's own quota is not (Acquire answers it
    // at once for a holder other than the broker).
    const Code code = h.status().code();
    if ((code != Code::kNoAvailableKey && code != Code::kCapacityExceeded) || timeout_ns == 0) {
      return call.Reply(h.status());
    }
  }
  if (context.pending.size() >= config.max_pending_acquires) {
    // A client waits on one acquire per connection; this one floods (KM-09).
    call.broker.dispatcher().LogRefusal("session_dropped", call.session->peer(), "max_pending_acquires");
    call.session->SendAndClose(protocol::ErrorReply(
        call.id, Status(Code::kCapacityExceeded, "more than " + std::to_string(config.max_pending_acquires) +
                                                     " acquires wait on this connection (max_pending_acquires)")));
    return;
  }
  auto ticket = std::make_shared<uint64_t>(0);
  std::weak_ptr<Session> weak = call.session;
  const int64_t id = call.id;
  *ticket = broker.slow().Enqueue(pool, holder, call.session->peer().uid, shm::MonotonicNowNanos() + timeout_ns,
                                  request.tokens, [weak, ticket, id, pool, holder](Result<shm::LeaseHandle> h) {
                                    std::shared_ptr<Session> session = weak.lock();
                                    if (!session || session->closed()) {
                                      if (h.ok()) (void)pool->Release(*h, Cancelled(), holder);
                                      return;
                                    }
                                    ClientContext& context = session->context();
                                    context.pending.erase(*ticket);
                                    if (!h.ok()) return SendReply(*session, id, h.status());
                                    context.slow_leases.push_back({pool, *h, holder});
                                    SendReply(*session, id, Grant(*pool, *h));
                                  });
  context.pending.insert(*ticket);
  call.session->ArmTimer();
}

Fields End(const OpCall& call, const protocol::EndRequest& request) {
  Result<shm::PoolAdmin*> found = call.broker.pools().Get(request.pool);
  if (!found.ok()) return found.status();
  shm::PoolAdmin* pool = *found;
  const shm::LeaseHandle h{
      .slot = request.slot, .lease = request.lease, .seq = request.seq, .acquire_ns = request.acquire_ns};
  if (request.permanent && request.outcome == shm::OutcomeKind::kFailure &&
      (call.roles & (kRoleReader | kRoleAdmin)) == 0) {
    // A revocation lasts until an admin's reset: not a worker's call.
    return Status(Code::kPermissionDenied, "uid " + std::to_string(call.session->peer().uid) +
                                               " may not mark a key failed permanently (needs allow_uids/allow_gids "
                                               "or admin_uids/admin_gids); report the failure without permanent");
  }
  const shm::Outcome outcome{.kind = request.outcome,
                             .latency = request.latency,
                             .tokens = request.tokens,
                             .cooldown = request.cooldown,
                             .permanent = request.permanent && request.outcome == shm::OutcomeKind::kFailure};
  if (outcome.kind == shm::OutcomeKind::kRateLimited) {
    NoteCapped(*pool, request.pool, "", h.slot, "cooldown", outcome.cooldown);
  }
  Status st = pool->Release(h, outcome, *call.context.client);
  if (st.ok() || st.code() == Code::kKeyExhausted || st.code() == Code::kNotHeld) {
    const size_t before = call.context.slow_leases.size();
    std::erase_if(call.context.slow_leases, [&](const ClientContext::SlowLease& l) {
      return l.pool == pool && l.handle.lease == h.lease && l.handle.seq == h.seq;
    });
    // Granted over another of the process's connections (a client's pool).
    if (call.context.slow_leases.size() == before && st.code() != Code::kNotHeld) {
      call.broker.dispatcher().ForgetSlowLease(pool, h);
    }
  }
  if (outcome.kind == shm::OutcomeKind::kRateLimited) call.broker.RearmCooldownTimer();
  if (!st.ok()) return st;
  return json::object();
}

Fields ObserveLimits(const OpCall& call, const protocol::ObserveLimitsRequest& request) {
  Result<shm::PoolAdmin*> pool = call.broker.pools().Get(request.pool);
  if (!pool.ok()) return pool.status();
  NoteCapped(**pool, request.pool, request.name, 0, "retry_after", request.retry_after);
  NoteCapped(**pool, request.pool, request.name, 0, "reset_requests", request.reset_requests);
  NoteCapped(**pool, request.pool, request.name, 0, "reset_tokens", request.reset_tokens);
  Status st = (*pool)->ObserveLimits(request.name, {.remaining_requests = request.remaining_requests,
                                                    .reset_requests = request.reset_requests,
                                                    .remaining_tokens = request.remaining_tokens,
                                                    .reset_tokens = request.reset_tokens,
                                                    .retry_after = request.retry_after});
  if (!st.ok()) return st;
  call.broker.RearmCooldownTimer();  // a Retry-After may have set a cooldown
  return json::object();
}

}  // namespace keymesh::broker::ops
