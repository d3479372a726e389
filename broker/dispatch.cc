#include "broker/dispatch.h"

#include <unistd.h>

#include <algorithm>
#include <iterator>
#include <string>
#include <type_traits>
#include <utility>

#include "broker/broker.h"
#include "broker/log.h"
#include "broker/ops.h"
#include "broker/session.h"
#include "common/text.h"
#include "protocol/framing.h"

namespace keymesh::broker {
namespace {

namespace json = boost::json;
using protocol::Op;

bool Listed(const std::vector<uint32_t>& ids, uint32_t id) {
  return std::find(ids.begin(), ids.end(), id) != ids.end();
}

// Whether the peer's primary gid or one of its supplementary groups is in
// `gids`.
bool InGroups(const std::vector<uint32_t>& gids, const PeerCred& peer) {
  if (gids.empty()) return false;
  if (Listed(gids, peer.gid)) return true;
  for (uint32_t g : peer.groups) {
    if (Listed(gids, g)) return true;
  }
  return false;
}

// Parses the body into its typed request and runs `Handler` on it.
template <typename Request, auto Handler>
void Typed(const OpCall& call) {
  Result<Request> request = [&] {
    if constexpr (requires { Request::FromJson(call.op, call.body); }) {
      return Request::FromJson(call.op, call.body);
    } else {
      return Request::FromJson(call.body);
    }
  }();
  if (!request.ok()) return call.Reply(request.status());
  if constexpr (std::is_void_v<decltype(Handler(call, *request))>) {
    Handler(call, *request);
  } else {
    call.Reply(Handler(call, *request));
  }
}

template <auto Handler>
void Untyped(const OpCall& call) {
  call.Reply(Handler(call));
}

struct OpEntry {
  Op op;
  RoleBits role;        // the role the peer needs
  bool needs_hello;     // the op acts on leases: the connection must have a holder
  const char* refused;  // what a peer without the role may not do
  void (*handle)(const OpCall&);
};

using protocol::AcquireRequest;
using protocol::AddKeyRequest;
using protocol::EndRequest;
using protocol::HelloRequest;
using protocol::KeyOpRequest;
using protocol::ObserveLimitsRequest;
using protocol::ReclaimRequest;
using protocol::SecretsRequest;
using protocol::StatusRequest;

// The op table, indexed by Op: who may send each op.
constexpr OpEntry kOps[] = {
    {Op::kHello, kRoleWorker, false, "act as a worker", &Typed<HelloRequest, &ops::Hello>},
    {Op::kSecrets, kRoleReader, false, "read secrets", &Typed<SecretsRequest, &ops::Secrets>},
    {Op::kAcquire, kRoleWorker, true, "act as a worker", &Typed<AcquireRequest, &ops::Acquire>},
    {Op::kRelease, kRoleWorker, true, "act as a worker", &Typed<EndRequest, &ops::End>},
    {Op::kMarkFailed, kRoleWorker, true, "act as a worker", &Typed<EndRequest, &ops::End>},
    {Op::kMarkRateLimited, kRoleWorker, true, "act as a worker", &Typed<EndRequest, &ops::End>},
    {Op::kCancel, kRoleWorker, true, "act as a worker", &Typed<EndRequest, &ops::End>},
    {Op::kStatus, kRoleWorker, false, "read status", &Typed<StatusRequest, &ops::PoolsStatus>},
    {Op::kAddKey, kRoleAdmin, false, "change keys", &Typed<AddKeyRequest, &ops::AddKey>},
    {Op::kRemoveKey, kRoleAdmin, false, "change keys", &Typed<KeyOpRequest, &ops::KeyOp>},
    {Op::kEnable, kRoleAdmin, false, "change keys", &Typed<KeyOpRequest, &ops::KeyOp>},
    {Op::kDisable, kRoleAdmin, false, "change keys", &Typed<KeyOpRequest, &ops::KeyOp>},
    {Op::kReset, kRoleAdmin, false, "change keys", &Typed<KeyOpRequest, &ops::KeyOp>},
    {Op::kMetrics, kRoleWorker, false, "read metrics", &Untyped<&ops::Metrics>},
    {Op::kReclaim, kRoleAdmin, false, "reclaim leases", &Typed<ReclaimRequest, &ops::Reclaim>},
    {Op::kObserveLimits, kRoleWorker, true, "act as a worker", &Typed<ObserveLimitsRequest, &ops::ObserveLimits>},
    {Op::kMesh, kRoleWorker, false, "read status", &Untyped<&ops::Mesh>},
};
static_assert(std::size(kOps) == protocol::kOpCount, "one entry per op");
constexpr bool IndexedByOp() {
  for (size_t i = 0; i < std::size(kOps); ++i) {
    if (kOps[i].op != static_cast<Op>(i)) return false;
  }
  return true;
}
static_assert(IndexedByOp(), "kOps[i].op == Op(i)");

const char* RoleLists(RoleBits role) {
  switch (role) {
    case kRoleWorker: return "worker_uids/worker_gids";
    case kRoleReader: return "allow_uids/allow_gids";
    case kRoleAdmin: return "admin_uids/admin_gids";
  }
  return "";
}

// Whether the connection's peer may send the op.
Status Admit(Dispatcher& dispatcher, const OpEntry& entry, const PeerCred& peer, uint8_t roles,
             const ClientContext& context) {
  if ((roles & entry.role) == 0) {
    dispatcher.LogRefusal(std::string(protocol::OpName(entry.op)) + "_refused", peer, entry.refused);
    return Status(Code::kPermissionDenied, "uid " + std::to_string(peer.uid) + " (gid " + std::to_string(peer.gid) +
                                               ") may not " + entry.refused + "; see " + RoleLists(entry.role));
  }
  if (entry.needs_hello && !context.client) {
    return Status(Code::kProtocolError, "say hello (with your pid) before " + Quoted(protocol::OpName(entry.op)));
  }
  return Status::Ok();
}

}  // namespace

uint8_t RolesOf(const PeerCred& peer, const BrokerConfig& config, uint32_t self_uid) {
  if (peer.uid == 0 || peer.uid == self_uid) return kRoleWorker | kRoleReader | kRoleAdmin;
  uint8_t roles = 0;
  if (Listed(config.allow_uids, peer.uid) || InGroups(config.allow_gids, peer)) roles |= kRoleReader;
  if (Listed(config.admin_uids, peer.uid) || InGroups(config.admin_gids, peer)) roles |= kRoleAdmin;
  if (roles != 0 || Listed(config.worker_uids, peer.uid) || InGroups(config.worker_gids, peer)) roles |= kRoleWorker;
  return roles;
}

void SendReply(Session& session, int64_t id, Result<json::object> result) {
  session.Send(result.ok() ? protocol::OkReply(id, std::move(result).value())
                           : protocol::ErrorReply(id, result.status()));
}

void OpCall::Reply(Result<json::object> result) const { SendReply(*session, id, std::move(result)); }

namespace {
bool CountedPerUid(const PeerCred& peer) { return peer.uid != 0 && peer.uid != ::geteuid(); }
}  // namespace

Status Dispatcher::Admit(const PeerCred& peer) {
  const BrokerConfig& config = broker_.config();
  if (sessions_.size() >= config.max_sessions) {
    LogRefusal("session_refused", peer, "max_sessions");
    return Status(Code::kCapacityExceeded,
                  "the broker serves at most " + std::to_string(config.max_sessions) + " connections (max_sessions)");
  }
  if (CountedPerUid(peer)) {
    auto it = per_uid_.find(peer.uid);
    if (it != per_uid_.end() && it->second >= config.max_sessions_per_uid) {
      LogRefusal("session_refused", peer, "max_sessions_per_uid");
      return Status(Code::kCapacityExceeded, "uid " + std::to_string(peer.uid) + " has " + std::to_string(it->second) +
                                                 " connections open, the most max_sessions_per_uid allows");
    }
  }
  return Status::Ok();
}

void Dispatcher::OnOpen(const std::shared_ptr<Session>& session) {
  if (!sessions_.emplace(session.get(), session).second) return;
  if (CountedPerUid(session->peer())) ++per_uid_[session->peer().uid];
}

std::chrono::steady_clock::duration Dispatcher::frame_timeout() const {
  return std::chrono::duration_cast<std::chrono::steady_clock::duration>(
      std::chrono::duration<double>(broker_.config().frame_timeout));
}

void Dispatcher::LogRefusal(std::string_view event, const PeerCred& peer, std::string_view why) {
  uint64_t suppressed = 0;
  if (!refusals_log_.Allow(&suppressed)) return;
  Log(LogLevel::kWarn, event,
      {{"peer_uid", std::to_string(peer.uid)},
       {"peer_pid", std::to_string(peer.pid)},
       {"refused", std::string(why)},
       {"suppressed", std::to_string(suppressed)}});
}

void Dispatcher::ForgetSlowLease(const shm::PoolAdmin* pool, const shm::LeaseHandle& handle) {
  for (auto& [raw, weak] : sessions_) {
    std::shared_ptr<Session> s = weak.lock();
    if (!s) continue;
    std::vector<ClientContext::SlowLease>& leases = s->context().slow_leases;
    const size_t before = leases.size();
    std::erase_if(leases, [&](const ClientContext::SlowLease& l) {
      return l.pool == pool && l.handle.lease == handle.lease && l.handle.seq == handle.seq;
    });
    if (leases.size() != before) {
      s->ArmTimer();  // it may hold nothing now: its idle timeout applies again
      return;
    }
  }
}

void Dispatcher::Handle(const std::shared_ptr<Session>& session, std::string_view frame) {
  int64_t id = 0;
  Result<protocol::Request> request = protocol::ParseRequest(frame, &id);
  if (!request.ok()) return SendReply(*session, id, request.status());
  const std::optional<Op> op = protocol::ParseOp(request->op);
  if (!op) return SendReply(*session, id, Status(Code::kProtocolError, "unknown op " + Quoted(request->op)));
  const OpEntry& entry = kOps[static_cast<size_t>(*op)];
  const uint8_t roles = RolesOf(session->peer(), broker_.config(), static_cast<uint32_t>(::geteuid()));
  if (Status st = broker::Admit(*this, entry, session->peer(), roles, session->context()); !st.ok()) {
    return SendReply(*session, id, std::move(st));
  }
  const OpCall call{broker_, session, session->context(), *op, id, request->body, roles};
  entry.handle(call);
}

bool Dispatcher::Holds(const ClientContext& context) noexcept {
  return !context.slow_leases.empty() || !context.pending.empty();
}

void Dispatcher::OnClosed(const std::shared_ptr<Session>& session) {
  ClientContext& context = session->context();
  for (uint64_t ticket : context.pending) broker_.slow().Cancel(ticket);
  context.pending.clear();
  shm::Outcome cancelled;
  cancelled.kind = shm::OutcomeKind::kCancelled;
  for (const ClientContext::SlowLease& l : context.slow_leases) {
    // kNotHeld when it was reclaimed meanwhile.
    (void)l.pool->Release(l.handle, cancelled, l.holder);
  }
  context.slow_leases.clear();
  if (sessions_.erase(session.get()) != 0 && CountedPerUid(session->peer())) {
    auto it = per_uid_.find(session->peer().uid);
    if (it != per_uid_.end() && --it->second == 0) per_uid_.erase(it);
  }
}

void Dispatcher::CloseAll() {
  std::vector<std::shared_ptr<Session>> all;
  for (auto& [raw, weak] : sessions_) {
    if (auto s = weak.lock()) all.push_back(std::move(s));
  }
  for (auto& s : all) s->Close();
  sessions_.clear();
  per_uid_.clear();
}

}  // namespace keymesh::broker
