// The accept loop on the broker's Unix-domain socket.
//
// The socket is created only when the broker is ready to serve, with mode
// 0660. The caller must hold the broker's lock file: Open() replaces
// whatever sits at the path (a stale socket of a dead broker).
#ifndef KEYMESH_BROKER_LISTENER_H_
#define KEYMESH_BROKER_LISTENER_H_

#include <string>

#include <boost/asio/io_context.hpp>
#include <boost/asio/local/stream_protocol.hpp>
#include <boost/asio/steady_timer.hpp>

#include "keymesh/status.h"

namespace keymesh::broker {

class Dispatcher;

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

  boost::asio::io_context& io_;
  Dispatcher& dispatcher_;
  boost::asio::local::stream_protocol::acceptor acceptor_;
  boost::asio::steady_timer retry_;
  std::string path_;
  bool stopped_ = false;
};

}  // namespace keymesh::broker

#endif  // KEYMESH_BROKER_LISTENER_H_
