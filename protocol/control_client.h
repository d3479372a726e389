// The one blocking client of the control protocol, shared by the client
// library (the socket slow path and Pool::Connect), the C ABI's
// km_broker_reclaim and keymeshctl.
//
// A call borrows a connection from a small pool of idle ones (or dials a new
// one), sends one request, waits for its reply under a deadline (poll(2), no
// signals, no timers), and gives the connection back. Each new connection
// first says hello when ControlClientOptions::hello is set, so leases
// granted over it belong to the process that dialed it.
//
// Errors: kBrokerUnavailable when the broker cannot be reached or does not
// answer in time, always naming the socket ("cannot reach keymesh-broker at
// PATH: why"); kProtocolError for a reply that is not a well-formed reply to
// this request (too large, another id, malformed); otherwise the broker's
// own error, as it sent it (code and one-line message). A connection that
// failed in any way is closed, never reused: a late reply can never be
// taken for the answer to a later request.
//
// Retry: a pooled connection may have been closed by the broker while idle
// (its idle timeout, a restart). One that is already closed is noticed
// before sending and replaced; one that closes after the request was sent
// but before any byte of the reply arrived is retried once on a new
// connection. (Closing a connection discards the requests it did not read,
// so that retry repeats nothing, unless the broker crashed between
// processing the request and replying; an end of a lease repeated then is
// refused as kNotHeld.) A deadline that expires is never retried.
//
// Thread safety: every method may be called from many threads at once;
// concurrent calls use different connections, so a blocking acquire never
// delays another thread's call.
//
// Fork: a child never uses a connection inherited from its parent (it would
// speak with the parent's hello, and replies would go to whichever process
// reads first). The first call in a new process (getpid() changed) closes
// the inherited idle connections and dials its own, with its own hello.
// Internal locks are taken around fork() (pthread_atfork), so forking while
// other threads call is safe. A call in flight in the parent at fork() time
// stays the parent's.
#ifndef KEYMESH_PROTOCOL_CONTROL_CLIENT_H_
#define KEYMESH_PROTOCOL_CONTROL_CLIENT_H_

#include <cstddef>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>

#include <boost/json/object.hpp>

#include "keymesh/status.h"
#include "protocol/messages.h"

namespace keymesh::protocol {

struct ControlClientOptions {
  explicit ControlClientOptions(std::string socket = "") : socket_path(std::move(socket)) {}

  // The broker's socket, already resolved (ResolveSocketPath()).
  std::string socket_path;
  // Called once per new connection, in the process and thread that dials
  // it (so in a fork child, in the child; possibly in several threads at
  // once): the hello to send first. Empty: no hello (enough for status,
  // metrics, admin ops and reclaim). The client library returns its
  // shm::Self() identity (pid and start time, recomputed after fork) and
  // its pool here.
  std::function<HelloRequest()> hello;
  // Idle connections kept for reuse, at most.
  size_t max_idle = 8;
  // An idle connection older than this is closed instead of reused (the
  // broker drops connections idle for 30 s).
  double max_idle_seconds = 20.0;
};

class ControlClient {
 public:
  // Seconds a call waits for its reply unless told otherwise.
  static constexpr double kDefaultTimeout = 10.0;

  explicit ControlClient(ControlClientOptions options);
  ~ControlClient();  // closes the idle connections
  ControlClient(const ControlClient&) = delete;
  ControlClient& operator=(const ControlClient&) = delete;

  const std::string& socket_path() const noexcept;

  // Dials one connection now (saying hello if configured) and keeps it for
  // the next call: checks the broker is there and accepts this process.
  Status Connect(double timeout = kDefaultTimeout);
  // The reply to the first hello this client got (in this process or, after
  // a fork, in its parent); nullopt before one, or without hello.
  std::optional<HelloReply> hello_reply() const;

  // Sends `op` with `fields` and waits up to `timeout` seconds (finite,
  // >= 0) for the reply; the reply's fields (envelope included), or the
  // broker's error.
  Result<boost::json::object> Call(Op op, boost::json::object fields, double timeout = kDefaultTimeout);

  // Typed calls: the request's op and fields, the reply checked by its
  // FromJson. `timeout` bounds the whole call.
  Result<SecretsReply> Secrets(const SecretsRequest& request, double timeout = kDefaultTimeout);
  // `timeout` should exceed request.timeout (the broker's wait) by the time
  // a reply takes to travel (ControlClient::kDefaultTimeout is plenty).
  Result<LeaseGrant> Acquire(const AcquireRequest& request, double timeout);
  Status End(const EndRequest& request, double timeout = kDefaultTimeout);
  Status ObserveLimits(const ObserveLimitsRequest& request, double timeout = kDefaultTimeout);
  Result<StatusReply> GetStatus(const StatusRequest& request, double timeout = kDefaultTimeout);
  Status AddKey(const AddKeyRequest& request, double timeout = kDefaultTimeout);
  Status KeyOp(const KeyOpRequest& request, double timeout = kDefaultTimeout);
  Result<MetricsReply> Metrics(double timeout = kDefaultTimeout);
  Result<ReclaimReply> Reclaim(const ReclaimRequest& request, double timeout = kDefaultTimeout);

 private:
  struct State;
  std::unique_ptr<State> state_;
};

}  // namespace keymesh::protocol

#endif  // KEYMESH_PROTOCOL_CONTROL_CLIENT_H_
