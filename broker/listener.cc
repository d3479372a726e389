#include "broker/listener.h"

#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <memory>

#include "broker/dispatch.h"
#include "broker/log.h"
#include "broker/session.h"
#include "common/text.h"

namespace keymesh::broker {

namespace asio = boost::asio;
using Local = asio::local::stream_protocol;

Listener::Listener(asio::io_context& io, Dispatcher& dispatcher)
    : io_(io), dispatcher_(dispatcher), acceptor_(io), retry_(io) {}

Status Listener::Open(const std::string& path) {
  path_ = path;
  if (::unlink(path.c_str()) == 0) Log(LogLevel::kInfo, "stale_socket_removed", {{"socket", path}});
  boost::system::error_code ec;
  acceptor_.open(Local(), ec);
  if (!ec) {
    // Bind under a umask that already yields 0660, so the socket is never
    // reachable with wider permissions.
    const mode_t old = ::umask(0117);
    acceptor_.bind(Local::endpoint(path), ec);
    ::umask(old);
  }
  if (!ec && ::chmod(path.c_str(), 0660) != 0) ec.assign(errno, boost::system::system_category());
  if (!ec) acceptor_.listen(SOMAXCONN, ec);
  if (ec) return Status(Code::kIoError, "cannot listen on " + Escaped(path) + ": " + ec.message());
  return Status::Ok();
}

void Listener::Start() { DoAccept(); }

void Listener::DoAccept() {
  if (stopped_) return;
  acceptor_.async_accept([this](const boost::system::error_code& ec, Local::socket socket) {
    if (stopped_ || ec == asio::error::operation_aborted) return;
    if (ec) {
      // EMFILE/ENFILE and friends: back off briefly instead of spinning.
      Log(LogLevel::kWarn, "accept_failed", {{"error", ec.message()}});
      retry_.expires_after(std::chrono::milliseconds(100));
      retry_.async_wait([this](const boost::system::error_code& e) {
        if (!e) DoAccept();
      });
      return;
    }
    PeerCred peer;
    ucred cred{};
    socklen_t len = sizeof(cred);
    if (::getsockopt(socket.native_handle(), SOL_SOCKET, SO_PEERCRED, &cred, &len) == 0) {
      peer.pid = cred.pid;
      peer.uid = cred.uid;
      peer.gid = cred.gid;
    } else {
      peer.uid = UINT32_MAX;  // unknown: never allowed
      peer.gid = UINT32_MAX;
    }
    std::make_shared<Session>(std::move(socket), peer, dispatcher_)->Start();
    DoAccept();
  });
}

void Listener::Stop() {
  if (stopped_) return;
  stopped_ = true;
  boost::system::error_code ec;
  acceptor_.close(ec);
  retry_.cancel();
  if (!path_.empty()) ::unlink(path_.c_str());
}

}  // namespace keymesh::broker
