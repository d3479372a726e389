// The accept loop on the broker's Unix-domain socket.
//
// The socket is created only when the broker is ready to serve, with mode
// 0660. The caller must hold the broker's lock file: Open() replaces
// whatever sits at the path (a stale socket of a dead broker).
//
// At accept it reads the peer's credentials (SO_PEERCRED, SO_PEERGROUPS)
// and pins the peer's start time with a pidfd (session.h's PeerCred), then
// asks the Dispatcher whether the session caps admit it; a refused
// connection gets one error line and is closed. When the broker runs out
// of descriptors (EMFILE, ENFILE) it closes a reserve descriptor, accepts
// the oldest pending connection, closes it and reopens the reserve, so the
// backlog drains instead of hanging; accept failures and refusals are
// logged at most once per 10 s with a count (KM-25).
#ifndef KEYMESH_BROKER_LISTENER_H_
#define KEYMESH_BROKER_LISTENER_H_

#include <cstdint>
#include <string>

#include <boost/asio/io_context.hpp>
#include <boost/asio/local/stream_protocol.hpp>
#include <boost/asio/steady_timer.hpp>

#include "broker/log_limit.h"
#include "keymesh/status.h"

namespace keymesh::broker {

class Dispatcher;
struct PeerCred;

class Listener {
 public:
  // `io` and `dispatcher` must outlive the listener. io thread only.
  Listener(boost::asio::io_context& io, Dispatcher& dispatcher);

  // Binds and listens at `path`.
  Status Open(const std::string& path);
  void Start();
  // Stops accepting and removes the socket file.
  void Stop();

 private:
  void DoAccept();
  bool ReadPeer(int fd, PeerCred* peer, std::string* why);
  void ShedOne();
  void Refuse(boost::asio::local::stream_protocol::socket& socket, const Status& why);

  boost::asio::io_context& io_;
  Dispatcher& dispatcher_;
  boost::asio::local::stream_protocol::acceptor acceptor_;
  boost::asio::steady_timer retry_;
  std::string path_;
  bool stopped_ = false;
  int reserve_fd_ = -1;  // kept open to accept-and-close at EMFILE
  uint64_t shed_ = 0;    // connections accepted and closed for want of descriptors
  bool warned_groups_ = false;
  LogLimiter accept_log_;
  LogLimiter refuse_log_;
};

}  // namespace keymesh::broker

#endif  // KEYMESH_BROKER_LISTENER_H_
