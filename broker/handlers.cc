#include "broker/handlers.h"

#include <vector>

#include <boost/json.hpp>

#include "broker/broker.h"
#include "broker/log.h"
#include "broker/metrics.h"
#include "broker/session.h"
#include "common/text.h"
#include "protocol/protocol.h"
#include "shm/clock.h"

namespace keymesh::broker {
namespace {

namespace json = boost::json;

Status NeedHello() { return Status(Code::kProtocolError, "say hello (with your pid) before acquiring"); }

Status NotAllowed(const PeerCred& peer, const char* what) {
  return Status(Code::kPermissionDenied, "uid " + std::to_string(peer.uid) + " (gid " + std::to_string(peer.gid) +
                                             ") may not " + what + "; see allow_uids/allow_gids");
}

Status UnknownPool(const std::string& pool) { return Status(Code::kUnknownKey, "no pool " + Quoted(pool)); }

json::object GrantFields(const std::string& key, const shm::LeaseHandle& h) {
  json::object o;
  o["key"] = key;
  o["slot"] = h.slot;
  o["lease"] = h.lease;
  o["seq"] = h.seq;
  o["acquire_ns"] = h.acquire_ns;
  o["fingerprint"] = h.fingerprint;
  return o;
}

}  // namespace

void Handlers::OnOpen(const std::shared_ptr<Session>& session) { sessions_[session.get()] = session; }

void Handlers::CloseAll() {
  std::vector<std::shared_ptr<Session>> all;
  for (auto& [raw, weak] : sessions_) {
    if (auto s = weak.lock()) all.push_back(std::move(s));
  }
  for (auto& s : all) s->Close();
  sessions_.clear();
}

void Handlers::OnClosed(const std::shared_ptr<Session>& session) {
  for (uint64_t ticket : session->pending) broker_.slow().Cancel(ticket);
  session->pending.clear();
  if (session->client) {
    shm::Outcome cancelled;
    cancelled.kind = shm::OutcomeKind::kCancelled;
    for (const Session::SlowLease& l : session->slow_leases) {
      // kNotHeld when it ended over another connection or was reclaimed.
      (void)l.pool->Release(l.handle, cancelled, *session->client);
    }
  }
  session->slow_leases.clear();
  sessions_.erase(session.get());
}

void Handlers::Handle(const std::shared_ptr<Session>& session, std::string_view frame) {
  int64_t id = 0;
  Result<protocol::Request> req = protocol::ParseRequest(frame, &id);
  if (!req.ok()) {
    session->Send(protocol::ErrorReply(id, req.status()));
    return;
  }
  const std::string& op = req->op;
  const json::object& body = req->body;
  Result<json::object> r = Status(Code::kProtocolError, "unknown op " + Quoted(op));
  if (op == "acquire") {
    Acquire(session, id, body);
    return;
  } else if (op == "hello") {
    r = Hello(*session, body);
  } else if (op == "secrets") {
    r = Secrets(*session, body);
  } else if (op == "release" || op == "mark_failed" || op == "mark_rate_limited" || op == "cancel") {
    r = End(*session, op, body);
  } else if (op == "status") {
    r = StatusOp(body);
  } else if (op == "add_key") {
    r = AddKey(*session, body);
  } else if (op == "remove_key" || op == "enable" || op == "disable" || op == "reset") {
    r = KeyOp(*session, op, body);
  } else if (op == "metrics") {
    r = Metrics();
  } else if (op == "reclaim") {
    r = Reclaim(*session, body);
  } else if (op == "observe_limits") {
    r = ObserveLimits(*session, body);
  }
  session->Send(r.ok() ? protocol::OkReply(id, std::move(r).value()) : protocol::ErrorReply(id, r.status()));
}

Result<json::object> Handlers::Hello(Session& s, const json::object& req) {
  Result<uint64_t> pid = protocol::GetUint(req, "pid");
  if (!pid.ok()) return pid.status();
  Result<std::optional<uint64_t>> start = protocol::GetOptUint(req, "start_time");
  if (!start.ok()) return start.status();
  if (*pid == 0 || *pid > INT32_MAX) return Status(Code::kInvalidArgument, "bad pid");
  std::optional<uint64_t> actual = shm::ReadStartTime(static_cast<pid_t>(*pid));
  if (!actual) return Status(Code::kInvalidArgument, "no process " + std::to_string(*pid));
  if (*start && **start != *actual) {
    return Status(Code::kInvalidArgument, "process " + std::to_string(*pid) + " has another start time (pid reused?)");
  }
  if (const json::value* pool = req.if_contains("pool")) {
    if (!pool->is_string()) return Status(Code::kProtocolError, "field 'pool' must be a string");
    if (broker_.FindPool(pool->get_string()) == nullptr) return UnknownPool(std::string(pool->get_string()));
  }
  const shm::ProcessId id{static_cast<uint32_t>(*pid), *actual};
  s.client = id;
  broker_.reaper().Watch(id);
  const shm::SegmentHeader* h = broker_.segment().header();
  json::object o;
  o["segment"] = broker_.segment().name();
  o["layout_version"] = h->layout_version;
  o["generation"] = broker_.segment().generation();
  json::array pools;
  for (const std::string& p : broker_.PoolNames()) pools.push_back(json::value(p));
  o["pools"] = std::move(pools);
  o["broker_pid"] = static_cast<uint64_t>(::getpid());
  o["keys_per_pool"] = h->keys_per_pool;
  return o;
}

Result<json::object> Handlers::Secrets(Session& s, const json::object& req) {
  if (!broker_.PeerAllowed(s.peer())) {
    Log(LogLevel::kWarn, "secrets_refused",
        {{"peer_uid", std::to_string(s.peer().uid)}, {"peer_pid", std::to_string(s.peer().pid)}});
    return NotAllowed(s.peer(), "read secrets");
  }
  Result<std::string> pool = protocol::GetString(req, "pool");
  if (!pool.ok()) return pool.status();
  const std::map<std::string, std::string>* secrets = broker_.Secrets(*pool);
  if (secrets == nullptr) return UnknownPool(*pool);
  json::array list;
  for (const auto& [name, secret] : *secrets) {
    json::object e;
    e["name"] = name;
    e["secret"] = secret;
    list.push_back(std::move(e));
  }
  Log(LogLevel::kInfo, "secrets_sent",
      {{"pool", *pool},
       {"peer_uid", std::to_string(s.peer().uid)},
       {"peer_pid", std::to_string(s.peer().pid)},
       {"keys", std::to_string(secrets->size())}});
  json::object o;
  o["secrets"] = std::move(list);
  return o;
}

void Handlers::Acquire(const std::shared_ptr<Session>& s, int64_t id, const json::object& req) {
  auto fail = [&](const Status& st) { s->Send(protocol::ErrorReply(id, st)); };
  if (!s->client) return fail(NeedHello());
  Result<std::string> pool_name = protocol::GetString(req, "pool");
  if (!pool_name.ok()) return fail(pool_name.status());
  shm::PoolAdmin* pool = broker_.FindPool(*pool_name);
  if (pool == nullptr) return fail(UnknownPool(*pool_name));
  Result<std::optional<double>> timeout = protocol::GetOptSeconds(req, "timeout");
  if (!timeout.ok()) return fail(timeout.status());
  const uint64_t timeout_ns = *timeout ? shm::SecondsToNanos(**timeout) : pool->header()->config.acquire_timeout;
  Result<std::optional<uint64_t>> tokens_field = protocol::GetOptUint(req, "tokens");
  if (!tokens_field.ok()) return fail(tokens_field.status());
  const uint64_t tokens = tokens_field->value_or(0);
  const shm::ProcessId holder = *s->client;
  // Try at once unless others already wait (no overtaking) or nothing is
  // eligible (a doomed try would count a miss twice).
  if (timeout_ns == 0 || (broker_.slow().Idle(pool) && pool->AvailableCount() > 0)) {
    Result<shm::LeaseHandle> h = pool->TryAcquire(nullptr, nullptr, holder, tokens);
    if (h.ok()) {
      s->slow_leases.push_back({pool, *h});
      s->Send(protocol::OkReply(id, GrantFields(pool->KeyName(h->slot), *h)));
      return;
    }
    if (h.status().code() != Code::kNoAvailableKey || timeout_ns == 0) return fail(h.status());
  }
  auto ticket = std::make_shared<uint64_t>(0);
  std::weak_ptr<Session> weak = s;
  *ticket = broker_.slow().Enqueue(pool, holder, shm::MonotonicNowNanos() + timeout_ns, tokens,
                                   [weak, ticket, id, pool, holder](Result<shm::LeaseHandle> h) {
                                     std::shared_ptr<Session> session = weak.lock();
                                     if (!session || session->closed()) {
                                       if (h.ok()) {
                                         shm::Outcome cancelled;
                                         cancelled.kind = shm::OutcomeKind::kCancelled;
                                         (void)pool->Release(*h, cancelled, holder);
                                       }
                                       return;
                                     }
                                     session->pending.erase(*ticket);
                                     if (!h.ok()) {
                                       session->Send(protocol::ErrorReply(id, h.status()));
                                       return;
                                     }
                                     session->slow_leases.push_back({pool, *h});
                                     session->Send(protocol::OkReply(id, GrantFields(pool->KeyName(h->slot), *h)));
                                   });
  s->pending.insert(*ticket);
  s->ArmTimer();
}

Result<json::object> Handlers::End(Session& s, const std::string& op, const json::object& req) {
  if (!s.client) return NeedHello();
  Result<std::string> pool_name = protocol::GetString(req, "pool");
  if (!pool_name.ok()) return pool_name.status();
  shm::PoolAdmin* pool = broker_.FindPool(*pool_name);
  if (pool == nullptr) return UnknownPool(*pool_name);
  Result<uint64_t> slot = protocol::GetUint(req, "slot");
  if (!slot.ok()) return slot.status();
  Result<uint64_t> lease = protocol::GetUint(req, "lease");
  if (!lease.ok()) return lease.status();
  Result<uint64_t> seq = protocol::GetUint(req, "seq");
  if (!seq.ok()) return seq.status();
  Result<std::optional<uint64_t>> acquire_ns = protocol::GetOptUint(req, "acquire_ns");
  if (!acquire_ns.ok()) return acquire_ns.status();
  Result<std::optional<double>> latency = protocol::GetOptSeconds(req, "latency");
  if (!latency.ok()) return latency.status();
  Result<std::optional<uint64_t>> tokens = protocol::GetOptUint(req, "tokens");
  if (!tokens.ok()) return tokens.status();
  Result<std::optional<double>> cooldown = protocol::GetOptSeconds(req, "cooldown");
  if (!cooldown.ok()) return cooldown.status();
  bool permanent = false;
  if (const json::value* p = req.if_contains("permanent"); p != nullptr && !p->is_null()) {
    if (!p->is_bool()) return Status(Code::kProtocolError, "field 'permanent' must be a boolean");
    permanent = p->get_bool();
  }
  if (*slot > UINT32_MAX || *lease > UINT32_MAX || *seq > UINT32_MAX) {
    return Status(Code::kNotHeld, "lease handle out of range");
  }
  shm::LeaseHandle h;
  h.slot = static_cast<uint32_t>(*slot);
  h.lease = static_cast<uint32_t>(*lease);
  h.seq = static_cast<uint32_t>(*seq);
  h.acquire_ns = acquire_ns->value_or(0);
  shm::Outcome outcome;
  outcome.kind = op == "release"       ? shm::OutcomeKind::kSuccess
                 : op == "mark_failed" ? shm::OutcomeKind::kFailure
                 : op == "cancel"      ? shm::OutcomeKind::kCancelled
                                       : shm::OutcomeKind::kRateLimited;
  outcome.latency = *latency;
  outcome.tokens = tokens->value_or(0);
  outcome.cooldown = *cooldown;
  outcome.permanent = permanent && outcome.kind == shm::OutcomeKind::kFailure;
  Status st = pool->Release(h, outcome, *s.client);
  if (st.ok() || st.code() == Code::kKeyExhausted || st.code() == Code::kNotHeld) {
    std::erase_if(s.slow_leases, [&](const Session::SlowLease& l) {
      return l.pool == pool && l.handle.lease == h.lease && l.handle.seq == h.seq;
    });
  }
  if (outcome.kind == shm::OutcomeKind::kRateLimited) broker_.NoteChange();
  if (!st.ok()) return st;
  return json::object();
}

Result<json::object> Handlers::ObserveLimits(Session& s, const json::object& req) {
  if (!s.client) return NeedHello();
  Result<std::string> pool_name = protocol::GetString(req, "pool");
  if (!pool_name.ok()) return pool_name.status();
  shm::PoolAdmin* pool = broker_.FindPool(*pool_name);
  if (pool == nullptr) return UnknownPool(*pool_name);
  Result<std::string> name = protocol::GetString(req, "name");
  if (!name.ok()) return name.status();
  shm::LimitUpdate u;
  Result<std::optional<uint64_t>> rr = protocol::GetOptUint(req, "remaining_requests");
  Result<std::optional<uint64_t>> rt = protocol::GetOptUint(req, "remaining_tokens");
  Result<std::optional<double>> sr = protocol::GetOptSeconds(req, "reset_requests");
  Result<std::optional<double>> st = protocol::GetOptSeconds(req, "reset_tokens");
  Result<std::optional<double>> ra = protocol::GetOptSeconds(req, "retry_after");
  for (const Status* e : {&rr.status(), &rt.status(), &sr.status(), &st.status(), &ra.status()}) {
    if (!e->ok()) return *e;
  }
  u.remaining_requests = *rr;
  u.remaining_tokens = *rt;
  u.reset_requests = *sr;
  u.reset_tokens = *st;
  u.retry_after = *ra;
  Status done = pool->ObserveLimits(*name, u);
  if (!done.ok()) return done;
  broker_.NoteChange();
  return json::object();
}

Result<json::object> Handlers::StatusOp(const json::object& req) {
  std::vector<std::string> names;
  if (const json::value* p = req.if_contains("pool"); p != nullptr && !p->is_null()) {
    if (!p->is_string()) return Status(Code::kProtocolError, "field 'pool' must be a string");
    if (broker_.FindPool(p->get_string()) == nullptr) return UnknownPool(std::string(p->get_string()));
    names.emplace_back(p->get_string());
  } else {
    names = broker_.PoolNames();
  }
  json::array pools;
  for (const std::string& name : names) {
    shm::PoolAdmin* pool = broker_.FindPool(name);
    if (pool == nullptr) continue;
    Result<PoolStatus> snap = pool->Snapshot();
    if (!snap.ok()) return snap.status();
    pools.push_back(
        protocol::PoolStatusToJson(*snap, [&](const std::string& key) { return broker_.Masked(name, key); }));
  }
  json::object o;
  o["pools"] = std::move(pools);
  return o;
}

Result<json::object> Handlers::AddKey(Session& s, const json::object& req) {
  if (!broker_.PeerAllowed(s.peer())) return NotAllowed(s.peer(), "change keys");
  Result<std::string> pool = protocol::GetString(req, "pool");
  if (!pool.ok()) return pool.status();
  Result<std::string> name = protocol::GetString(req, "name");
  if (!name.ok()) return name.status();
  Result<std::string> secret = protocol::GetString(req, "secret");
  if (!secret.ok()) return secret.status();
  Status st = shm::ValidateName("key", *name);
  if (!st.ok()) return st;
  if (secret->empty() || secret->find_first_not_of(" \t\r\n") == std::string::npos) {
    return Status(Code::kInvalidArgument, "the secret is empty");
  }
  KeySpec k;
  k.name = *name;
  k.secret = *secret;
  struct Field {
    const char* name;
    uint64_t max;
    uint64_t* out;
  };
  uint64_t weight = 1, max_concurrency = 0, rpm = 0, tpm = 0;
  for (Field f : {Field{"weight", UINT32_MAX, &weight}, Field{"max_concurrency", UINT32_MAX, &max_concurrency},
                  Field{"rpm", UINT32_MAX, &rpm}, Field{"tpm", UINT64_MAX, &tpm}}) {
    Result<std::optional<uint64_t>> v = protocol::GetOptUint(req, f.name);
    if (!v.ok()) return v.status();
    if (*v) {
      if (**v > f.max) return Status(Code::kInvalidArgument, std::string(f.name) + " is too large");
      *f.out = **v;
    }
  }
  if (weight < 1) return Status(Code::kInvalidArgument, "weight must be >= 1");
  k.weight = static_cast<uint32_t>(weight);
  k.max_concurrency = static_cast<uint32_t>(max_concurrency);
  k.rpm = static_cast<uint32_t>(rpm);
  k.tpm = tpm;
  // An existing name with the same secret is re-admitted (streak cleared).
  if (shm::PoolAdmin* access = broker_.FindPool(*pool); access != nullptr) {
    const std::map<std::string, std::string>* secrets = broker_.Secrets(*pool);
    if (secrets != nullptr) {
      auto it = secrets->find(*name);
      if (it != secrets->end() && it->second == *secret) {
        Status reset = access->ResetKey(*name);
        if (!reset.ok() && reset.code() != Code::kUnknownKey) return reset;
      }
    }
  }
  st = broker_.AddKey(*pool, k);
  if (!st.ok()) return st;
  return json::object();
}

Result<json::object> Handlers::KeyOp(Session& s, const std::string& op, const json::object& req) {
  if (!broker_.PeerAllowed(s.peer())) return NotAllowed(s.peer(), "change keys");
  Result<std::string> pool_name = protocol::GetString(req, "pool");
  if (!pool_name.ok()) return pool_name.status();
  Result<std::string> name = protocol::GetString(req, "name");
  if (!name.ok()) return name.status();
  shm::PoolAdmin* pool = broker_.FindPool(*pool_name);
  if (pool == nullptr) return UnknownPool(*pool_name);
  Status st;
  if (op == "remove_key") {
    st = broker_.RemoveKey(*pool_name, *name);
  } else if (op == "enable" || op == "disable") {
    st = pool->SetEnabled(*name, op == "enable");
  } else {
    st = pool->ResetKey(*name);
  }
  if (!st.ok()) return st;
  Log(LogLevel::kInfo, "key_" + op, {{"pool", *pool_name}, {"key", *name}, {"peer_uid", std::to_string(s.peer().uid)}});
  broker_.NoteChange();
  return json::object();
}

Result<json::object> Handlers::Metrics() {
  std::vector<PoolStatus> pools;
  for (const std::string& name : broker_.PoolNames()) {
    shm::PoolAdmin* pool = broker_.FindPool(name);
    if (pool == nullptr) continue;
    Result<PoolStatus> snap = pool->Snapshot();
    if (!snap.ok()) return snap.status();
    pools.push_back(std::move(snap).value());
  }
  json::object o;
  o["text"] = RenderMetrics(pools);
  return o;
}

Result<json::object> Handlers::Reclaim(Session& s, const json::object& req) {
  if (!broker_.PeerAllowed(s.peer())) return NotAllowed(s.peer(), "reclaim leases");
  Result<uint64_t> pid = protocol::GetUint(req, "pid");
  if (!pid.ok()) return pid.status();
  if (*pid == 0 || *pid > INT32_MAX) return Status(Code::kInvalidArgument, "bad pid");
  json::object o;
  o["reclaimed"] = broker_.ReclaimIfDead(static_cast<uint32_t>(*pid));
  return o;
}

}  // namespace keymesh::broker
