// The ops of a secret reader (secrets) and an admin (the rest; dispatch.h
// says who holds which role, and the dispatcher checked it): the
// secrets of a pool, adding and changing keys, reclaiming a dead process's
// leases.
#include <cstdlib>
#include <string>

#include "broker/broker.h"
#include "broker/config.h"
#include "broker/log.h"
#include "broker/ops.h"
#include "broker/pool_registry.h"
#include "broker/session.h"
#include "common/text.h"
#include "shm/segment.h"

namespace keymesh::broker::ops {

namespace json = boost::json;

Fields Secrets(const OpCall& call, const protocol::SecretsRequest& request) {
  const std::map<std::string, std::string>* secrets = call.broker.pools().Secrets(request.pool);
  if (secrets == nullptr) return UnknownPool(request.pool);
  protocol::SecretsReply reply;
  for (const auto& [name, secret] : *secrets) reply.secrets.push_back({name, secret});
  const PeerCred& peer = call.session->peer();
  Log(LogLevel::kInfo, "secrets_sent",
      {{"pool", request.pool},
       {"peer_uid", std::to_string(peer.uid)},
       {"peer_pid", std::to_string(peer.pid)},
       {"keys", std::to_string(secrets->size())}});
  return reply.ToJson();
}

Fields AddKey(const OpCall& call, const protocol::AddKeyRequest& request) {
  const KeySpec& key = request.key;
  Status st = shm::ValidateName("key", key.name);
  if (!st.ok()) return st;
  st = ValidateSecret(key.secret);
  if (!st.ok()) return st;
  PoolRegistry& pools = call.broker.pools();
  // An existing name with the same secret is re-admitted (streak cleared).
  if (shm::PoolAdmin* pool = pools.Find(request.pool); pool != nullptr) {
    if (const std::map<std::string, std::string>* secrets = pools.Secrets(request.pool); secrets != nullptr) {
      auto it = secrets->find(key.name);
      if (it != secrets->end() && it->second == key.secret) {
        Status reset = pool->ResetKey(key.name);
        if (!reset.ok() && reset.code() != Code::kUnknownKey) return reset;
      }
    }
  }
  // Durable only when the broker itself can read the same secret again
  // at its next start (KM-14); the secret never reaches the state file.
  SecretSource source;
  std::string note;
  if (!request.secret_env.empty()) {
    const char* v = std::getenv(request.secret_env.c_str());
    if (v != nullptr && key.secret == v) {
      source.env = request.secret_env;
    } else {
      note = "the broker's environment variable " + Escaped(request.secret_env) +
             " does not hold this secret: the key lasts until the broker stops";
    }
  } else if (!request.secret_file.empty()) {
    Result<std::string> v = ReadSecretFile(request.secret_file, "secret_file");
    if (v.ok() && *v == key.secret) {
      source.file = request.secret_file;
    } else {
      note = "the broker cannot read this secret from " + Escaped(request.secret_file) +
             ": the key lasts until the broker stops";
    }
  } else {
    note = "secret sent inline: the key lasts until the broker stops";
  }
  st = pools.AddKey(request.pool, key, source);
  if (!st.ok()) return st;
  call.broker.SyncMeshKeys();
  protocol::AddKeyReply reply;
  reply.durable = source.durable();
  if (!note.empty()) reply.note = note;
  return reply.ToJson();
}

Fields KeyOp(const OpCall& call, const protocol::KeyOpRequest& request) {
  PoolRegistry& pools = call.broker.pools();
  Result<shm::PoolAdmin*> pool = pools.Get(request.pool);
  if (!pool.ok()) return pool.status();
  Status st;
  switch (request.op()) {
    case protocol::Op::kRemoveKey: st = pools.RemoveKey(request.pool, request.name); break;
    case protocol::Op::kEnable: st = (*pool)->SetEnabled(request.name, true); break;
    case protocol::Op::kDisable: st = (*pool)->SetEnabled(request.name, false); break;
    default: st = (*pool)->ResetKey(request.name); break;
  }
  if (!st.ok()) return st;
  if (request.op() == protocol::Op::kRemoveKey) call.broker.SyncMeshKeys();
  Log(LogLevel::kInfo, "key_" + std::string(protocol::OpName(request.op())),
      {{"pool", request.pool}, {"key", request.name}, {"peer_uid", std::to_string(call.session->peer().uid)}});
  call.broker.RearmCooldownTimer();  // a reset clears a cooldown, an enable re-admits a key
  return json::object();
}

Fields Reclaim(const OpCall& call, const protocol::ReclaimRequest& request) {
  return protocol::ReclaimReply{call.broker.ReclaimIfDead(request.pid)}.ToJson();
}

}  // namespace keymesh::broker::ops
