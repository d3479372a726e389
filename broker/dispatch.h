// The control protocol's server side above the transport: each frame a
// Session reads is parsed (framing.h), looked up in one op table (op ->
// who may send it, its handler; dispatch.cc), checked against the peer's
// role, parsed into its typed message (messages.h) and handed to the op's
// handler (ops_lease.cc, ops_admin.cc, ops_status.cc).
//
// Every request gets exactly one reply; a malformed one gets an error reply
// and the connection stays open. Roles: anyone may say hello and read status
// and metrics; a worker (a connection that said hello) acquires and ends
// leases and reports limits; a trusted peer (Broker::PeerAllowed: root, the
// broker's uid, allow_uids/allow_gids) reads secrets and changes keys.
// Slow-path leases belong to the process that said hello on the connection;
// leases still held when it closes are ended as cancelled.
//
// Everything here runs on the broker's io thread.
#ifndef KEYMESH_BROKER_DISPATCH_H_
#define KEYMESH_BROKER_DISPATCH_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <set>
#include <string_view>
#include <unordered_map>
#include <vector>

#include <boost/json/object.hpp>

#include "keymesh/status.h"
#include "protocol/messages.h"
#include "shm/pool.h"
#include "shm/process_id.h"

namespace keymesh::broker {

class Broker;
class Session;

// What one connection holds at the protocol level. Owned by its Session
// (which never looks inside: the transport knows nothing of leases), read
// and changed only by the dispatcher and the ops.
struct ClientContext {
  struct SlowLease {
    shm::PoolAdmin* pool;
    shm::LeaseHandle handle;
  };
  std::optional<shm::ProcessId> client;  // set by hello: who holds the leases granted here
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

 private:
  Broker& broker_;
  std::unordered_map<Session*, std::weak_ptr<Session>> sessions_;
};

}  // namespace keymesh::broker

#endif  // KEYMESH_BROKER_DISPATCH_H_
