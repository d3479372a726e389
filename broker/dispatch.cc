#include "broker/dispatch.h"

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

// Who may send an op.
enum class Role {
  kAnyone,
  kWorker,   // a connection that said hello: its leases have a holder
  kTrusted,  // Broker::PeerAllowed: reads secrets, changes keys
};

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
  Role role;
  const char* refused;  // kTrusted: what an untrusted peer may not do
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

// The op table, indexed by Op.
constexpr OpEntry kOps[] = {
    {Op::kHello, Role::kAnyone, nullptr, &Typed<HelloRequest, &ops::Hello>},
    {Op::kSecrets, Role::kTrusted, "read secrets", &Typed<SecretsRequest, &ops::Secrets>},
    {Op::kAcquire, Role::kWorker, nullptr, &Typed<AcquireRequest, &ops::Acquire>},
    {Op::kRelease, Role::kWorker, nullptr, &Typed<EndRequest, &ops::End>},
    {Op::kMarkFailed, Role::kWorker, nullptr, &Typed<EndRequest, &ops::End>},
    {Op::kMarkRateLimited, Role::kWorker, nullptr, &Typed<EndRequest, &ops::End>},
    {Op::kCancel, Role::kWorker, nullptr, &Typed<EndRequest, &ops::End>},
    {Op::kStatus, Role::kAnyone, nullptr, &Typed<StatusRequest, &ops::PoolsStatus>},
    {Op::kAddKey, Role::kTrusted, "change keys", &Typed<AddKeyRequest, &ops::AddKey>},
    {Op::kRemoveKey, Role::kTrusted, "change keys", &Typed<KeyOpRequest, &ops::KeyOp>},
    {Op::kEnable, Role::kTrusted, "change keys", &Typed<KeyOpRequest, &ops::KeyOp>},
    {Op::kDisable, Role::kTrusted, "change keys", &Typed<KeyOpRequest, &ops::KeyOp>},
    {Op::kReset, Role::kTrusted, "change keys", &Typed<KeyOpRequest, &ops::KeyOp>},
    {Op::kMetrics, Role::kAnyone, nullptr, &Untyped<&ops::Metrics>},
    {Op::kReclaim, Role::kTrusted, "reclaim leases", &Typed<ReclaimRequest, &ops::Reclaim>},
    {Op::kObserveLimits, Role::kWorker, nullptr, &Typed<ObserveLimitsRequest, &ops::ObserveLimits>},
};
static_assert(std::size(kOps) == protocol::kOpCount, "one entry per op");
constexpr bool IndexedByOp() {
  for (size_t i = 0; i < std::size(kOps); ++i) {
    if (kOps[i].op != static_cast<Op>(i)) return false;
  }
  return true;
}
static_assert(IndexedByOp(), "kOps[i].op == Op(i)");

// Whether the connection's peer may send the op.
Status Admit(const OpEntry& entry, const OpCall& call) {
  switch (entry.role) {
    case Role::kAnyone: return Status::Ok();
    case Role::kWorker:
      if (call.context.client) return Status::Ok();
      return Status(Code::kProtocolError, "say hello (with your pid) before " + Quoted(protocol::OpName(entry.op)));
    case Role::kTrusted: {
      const PeerCred& peer = call.session->peer();
      if (call.broker.PeerAllowed(peer)) return Status::Ok();
      Log(LogLevel::kWarn, std::string(protocol::OpName(entry.op)) + "_refused",
          {{"peer_uid", std::to_string(peer.uid)}, {"peer_pid", std::to_string(peer.pid)}});
      return Status(Code::kPermissionDenied, "uid " + std::to_string(peer.uid) + " (gid " + std::to_string(peer.gid) +
                                                 ") may not " + entry.refused + "; see allow_uids/allow_gids");
    }
  }
  return Status(Code::kInternal, "unknown role");
}

}  // namespace

void SendReply(Session& session, int64_t id, Result<json::object> result) {
  session.Send(result.ok() ? protocol::OkReply(id, std::move(result).value())
                           : protocol::ErrorReply(id, result.status()));
}

void OpCall::Reply(Result<json::object> result) const { SendReply(*session, id, std::move(result)); }

void Dispatcher::OnOpen(const std::shared_ptr<Session>& session) { sessions_[session.get()] = session; }

void Dispatcher::Handle(const std::shared_ptr<Session>& session, std::string_view frame) {
  int64_t id = 0;
  Result<protocol::Request> request = protocol::ParseRequest(frame, &id);
  if (!request.ok()) return SendReply(*session, id, request.status());
  const std::optional<Op> op = protocol::ParseOp(request->op);
  if (!op) return SendReply(*session, id, Status(Code::kProtocolError, "unknown op " + Quoted(request->op)));
  const OpEntry& entry = kOps[static_cast<size_t>(*op)];
  const OpCall call{broker_, session, session->context(), *op, id, request->body};
  if (Status st = Admit(entry, call); !st.ok()) return call.Reply(std::move(st));
  entry.handle(call);
}

bool Dispatcher::Holds(const ClientContext& context) noexcept {
  return !context.slow_leases.empty() || !context.pending.empty();
}

void Dispatcher::OnClosed(const std::shared_ptr<Session>& session) {
  ClientContext& context = session->context();
  for (uint64_t ticket : context.pending) broker_.slow().Cancel(ticket);
  context.pending.clear();
  if (context.client) {
    shm::Outcome cancelled;
    cancelled.kind = shm::OutcomeKind::kCancelled;
    for (const ClientContext::SlowLease& l : context.slow_leases) {
      // kNotHeld when it ended over another connection or was reclaimed.
      (void)l.pool->Release(l.handle, cancelled, *context.client);
    }
  }
  context.slow_leases.clear();
  sessions_.erase(session.get());
}

void Dispatcher::CloseAll() {
  std::vector<std::shared_ptr<Session>> all;
  for (auto& [raw, weak] : sessions_) {
    if (auto s = weak.lock()) all.push_back(std::move(s));
  }
  for (auto& s : all) s->Close();
  sessions_.clear();
}

}  // namespace keymesh::broker
