// The control protocol's operations (see protocol.h for the messages).
//
// Every request gets exactly one reply; malformed requests get an error
// reply and the connection stays open. Secrets and admin operations require
// an allowed peer (Broker::PeerAllowed). Slow-path leases are owned by the
// process that said hello on the connection; leases still held when the
// connection closes are ended as cancelled.
#ifndef KEYMESH_BROKER_HANDLERS_H_
#define KEYMESH_BROKER_HANDLERS_H_

#include <memory>
#include <string_view>
#include <unordered_map>

#include <boost/json/object.hpp>

#include "keymesh/status.h"

namespace keymesh::broker {

class Broker;
class Session;

class Handlers {
 public:
  // `broker` must outlive the Handlers. io thread only.
  explicit Handlers(Broker& broker) : broker_(broker) {}

  void OnOpen(const std::shared_ptr<Session>& session);
  // Handles one complete frame (newline stripped).
  void Handle(const std::shared_ptr<Session>& session, std::string_view frame);
  void OnClosed(const std::shared_ptr<Session>& session);
  void CloseAll();
  size_t sessions() const noexcept { return sessions_.size(); }

 private:
  using Object = boost::json::object;
  Result<Object> Hello(Session& s, const Object& req);
  Result<Object> Secrets(Session& s, const Object& req);
  // Replies itself, at once or when a key is granted or the wait ends.
  void Acquire(const std::shared_ptr<Session>& s, int64_t id, const Object& req);
  Result<Object> End(Session& s, const std::string& op, const Object& req);
  Result<Object> StatusOp(const Object& req);
  Result<Object> AddKey(Session& s, const Object& req);
  Result<Object> KeyOp(Session& s, const std::string& op, const Object& req);
  Result<Object> Metrics();
  Result<Object> Reclaim(Session& s, const Object& req);
  // Applies x-ratelimit-* / Retry-After values a client observed for a key.
  Result<Object> ObserveLimits(Session& s, const Object& req);

  Broker& broker_;
  std::unordered_map<Session*, std::weak_ptr<Session>> sessions_;
};

}  // namespace keymesh::broker

#endif  // KEYMESH_BROKER_HANDLERS_H_
