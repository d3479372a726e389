// The client's only socket code: a blocking client of the control protocol
// (protocol/protocol.h) to one keymesh-broker. RemotePool, AttachedPool and
// km_broker_reclaim use it through this small interface; it is meant to be
// replaced by protocol::ControlClient, which will do the same for the
// client and keymeshctl, so swapping it touches only this file pair.
//
// A BrokerLink keeps a small set of connections, each greeted with hello
// (this process's pid and start time, so leases granted over it belong to
// this process). A call borrows one connection, so threads never wait for
// each other's blocking acquires. After fork() the child drops the
// inherited connections and dials its own.
#ifndef KEYMESH_CLIENT_BROKER_LINK_H_
#define KEYMESH_CLIENT_BROKER_LINK_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include <boost/json/object.hpp>

#include "keymesh/status.h"

namespace keymesh::detail {

class BrokerLink {
 public:
  // Seconds a call other than a blocking acquire may take.
  static constexpr double kCallTimeout = 10.0;
  static constexpr const char* kDefaultSocket = "/run/keymesh/keymesh.sock";

  // `socket_path`, else $KEYMESH_SOCKET, else kDefaultSocket.
  static std::string ResolveSocketPath(std::string_view socket_path);

  // Dials the broker at `path` and says hello for pool `pool` (its reply is
  // hello()); the connection is kept for the next call.
  // kBrokerUnavailable when nobody answers.
  static Result<std::shared_ptr<BrokerLink>> Open(std::string path, std::string pool);

  // One request on a fresh connection without hello, closed afterwards: for
  // callers that are not workers of a pool (the gunicorn master asking the
  // broker to reclaim a dead worker's leases). `socket_path` as for
  // ResolveSocketPath.
  static Result<boost::json::object> CallOnce(std::string_view socket_path, std::string_view op,
                                              boost::json::object fields, double timeout = kCallTimeout);

  BrokerLink(std::string path, std::string pool);
  ~BrokerLink();
  BrokerLink(const BrokerLink&) = delete;
  BrokerLink& operator=(const BrokerLink&) = delete;

  const std::string& path() const noexcept { return path_; }
  const std::string& pool() const noexcept { return pool_; }
  // The first hello's reply (segment, layout_version, ...). Written once by
  // Open(), before the link is shared.
  const boost::json::object& hello() const noexcept { return hello_; }

  // Sends `op` and waits up to `timeout` seconds for its reply; the reply's
  // error becomes the returned Status. A pooled connection the broker
  // closed meanwhile is retried once on a fresh one (nothing was processed).
  // Any thread.
  Result<boost::json::object> Call(std::string_view op, boost::json::object fields, double timeout = kCallTimeout);

 private:
  struct Conn {
    int fd = -1;
    uint64_t last_used = 0;
  };

  Result<Conn> Borrow(bool* reused);
  void Return(Conn c);
  Result<Conn> Dial(bool hello);
  // One request/reply on `c`. *nothing_answered: the failure happened before
  // any reply byte arrived.
  Result<boost::json::object> Exchange(Conn* c, std::string_view op, const boost::json::object& fields, double timeout,
                                       bool* nothing_answered);

  const std::string path_;
  const std::string pool_;
  std::mutex mu_;
  std::vector<Conn> idle_;     // guarded by mu_
  uint32_t owner_pid_;         // guarded by mu_: the process idle_ belongs to
  boost::json::object hello_;  // guarded by mu_; written once
  std::atomic<int64_t> next_id_{1};
};

}  // namespace keymesh::detail

#endif  // KEYMESH_CLIENT_BROKER_LINK_H_
