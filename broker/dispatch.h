// The control protocol's server side above the transport: each frame a
// Session reads is parsed (framing.h), looked up in one op table (op ->
// who may send it, its handler; dispatch.cc), checked against the peer's
// role, parsed into its typed message (messages.h) and handed to the op's
// handler (ops_lease.cc, ops_admin.cc, ops_status.cc).
//
// Every request gets exactly one reply; a malformed one gets an error reply
// and the connection stays open.
//
// Roles (KM-03), from the peer's SO_PEERCRED uid, primary gid and
// SO_PEERGROUPS supplementary groups against the config's lists, checked
// for every op from one table (dispatch.cc's kOps):
//   worker  worker_uids/worker_gids (default: allow_uids/allow_gids):
//           hello, acquire, the ends of its own leases, observe_limits,
//           status, metrics, mesh;
//   reader  allow_uids/allow_gids: secrets;
//   admin   admin_uids/admin_gids: add/remove/enable/disable/reset keys,
//           reclaim.
// root and the broker's own uid hold all three; a reader or an admin is a
// worker too. A failure marked `permanent` (a revocation that lasts until
// an admin's reset) needs a reader or an admin: it is an admin-grade
// effect, and a reader holds the secret, so it saw the provider refuse it.
//
// Leases (KM-04): hello must name the connection's own pid (SO_PEERCRED)
// and, if it gives one, its start time; the holder of the leases granted
// on the connection is that process, pinned at accept. Every slow-path
// lease records its holder, and those still held when the connection closes
// are ended as cancelled.
//
// Limits (KM-09): at most max_sessions connections, max_sessions_per_uid
// per uid (root and the broker's uid are not counted per uid),
// max_pending_acquires waiting acquires per connection (one more closes
// it), max_slow_leases leases held over one connection, and an acquire's
// timeout at most max(the pool's acquire_timeout, kMaxAcquireTimeout).
//
#ifndef KEYMESH_BROKER_DISPATCH_H_
#define KEYMESH_BROKER_DISPATCH_H_

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <set>
#include <string_view>
#include <unordered_map>
#include <vector>

#include <boost/json/object.hpp>

#include "broker/log_limit.h"
#include "keymesh/status.h"
#include "protocol/messages.h"
#include "shm/pool.h"
#include "shm/process_id.h"

namespace keymesh::broker {

class Broker;
class Session;
struct BrokerConfig;
struct PeerCred;

// Role bits (see above).
enum RoleBits : uint8_t { kRoleWorker = 1, kRoleReader = 2, kRoleAdmin = 4 };
// The roles `peer` holds under `config`; `self_uid` is the broker's uid.
uint8_t RolesOf(const PeerCred& peer, const BrokerConfig& config, uint32_t self_uid);

// An acquire may wait at most max(the pool's acquire_timeout, this).
inline constexpr double kMaxAcquireTimeout = 300.0;

// What one connection holds at the protocol level. Owned by its Session
// (which never looks inside: the transport knows nothing of leases), read
// and changed only by the dispatcher and the ops.
struct ClientContext {
  struct SlowLease {
    shm::PoolAdmin* pool;
    shm::LeaseHandle handle;
    shm::ProcessId holder;
  };
  std::optional<shm::ProcessId> client;  // set by hello: the peer, who holds the leases granted here
  std::vector<SlowLease> slow_leases;    // granted over this connection, not yet ended
  std::set<uint64_t> pending;            // SlowAcquirer tickets of waiting acquires
};

// One request in the hands of its op: the broker, the connection, the
// request's id and body. `session` stays alive for the call; an op that
// answers later (acquire) keeps a weak_ptr, not the OpCall.
struct OpCall {
  Broker& broker;
  const std::shared_ptr<Session>& session;
  ClientContext& context;
  protocol::Op op;
  int64_t id;
  const boost::json::object& body;
  uint8_t roles;  // RoleBits of the peer

  // Sends the reply: `result`'s fields, or its error.
  void Reply(Result<boost::json::object> result) const;
};

// Sends the reply to request `id` on `session`: `result`'s fields, or its
// error. (For an op that answers after its OpCall is gone.)
void SendReply(Session& session, int64_t id, Result<boost::json::object> result);

class Dispatcher {
 public:
  // `broker` must outlive the dispatcher.
  explicit Dispatcher(Broker& broker) : broker_(broker) {}

  // Whether a new connection from `peer` may open (the session caps);
  // counts it when so. Listener calls it before making the Session.
  Status Admit(const PeerCred& peer);
  void OnOpen(const std::shared_ptr<Session>& session);
  // Handles one complete frame (newline stripped).
  void Handle(const std::shared_ptr<Session>& session, std::string_view frame);
  // Ends what the connection held: cancels its waits, ends its leases.
  void OnClosed(const std::shared_ptr<Session>& session);
  // True while the connection holds leases or waits for one: its idle
  // timeout must not close it.
  static bool Holds(const ClientContext& context) noexcept;
  void CloseAll();
  size_t sessions() const noexcept { return sessions_.size(); }
  // A slow lease ended over another connection of the same process (a
  // client's connection pool): forgets it where it was granted.
  void ForgetSlowLease(const shm::PoolAdmin* pool, const shm::LeaseHandle& handle);
  // The config's frame_timeout.
  std::chrono::steady_clock::duration frame_timeout() const;
  // A refusal a peer can cause at will: logged at most once per interval.
  void LogRefusal(std::string_view event, const PeerCred& peer, std::string_view why);

 private:
  Broker& broker_;
  std::unordered_map<Session*, std::weak_ptr<Session>> sessions_;
  std::unordered_map<uint32_t, uint32_t> per_uid_;  // admitted, not yet closed, by uid
  LogLimiter refusals_log_;
};

}  // namespace keymesh::broker

#endif  // KEYMESH_BROKER_DISPATCH_H_
