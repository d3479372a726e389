#include "broker/listener.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <memory>
#include <optional>
#include <vector>

#include "broker/dispatch.h"
#include "broker/log.h"
#include "broker/session.h"
#include "common/text.h"
#include "protocol/framing.h"
#include "shm/process_id.h"

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
    // Bind under a umask that yields exactly 0660 (0777 & ~0117), so the
    // socket is never reachable with wider permissions; no chmod by path
    // afterwards, which another user could race with a link in a shared
    // directory (KM-21; the lock file already refused such a directory).
    const mode_t old = ::umask(0117);
    acceptor_.bind(Local::endpoint(path), ec);
    ::umask(old);
  }
  if (!ec) acceptor_.listen(SOMAXCONN, ec);
  if (ec) return Status(Code::kIoError, "cannot listen on " + Escaped(path) + ": " + ec.message());
  return Status::Ok();
}

void Listener::Start() {
  reserve_fd_ = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
  DoAccept();
}

namespace {

#ifndef SO_PEERPIDFD
#define SO_PEERPIDFD 77  // Linux 6.5; glibc 2.36's headers predate it
#endif

// SO_PEERGROUPS: the peer's supplementary groups as of connect(). False
// when the kernel lacks it (before 4.13) or it failed.
bool ReadPeerGroups(int fd, std::vector<uint32_t>* groups) {
  std::vector<gid_t> buf(64);
  for (int attempt = 0; attempt < 4; ++attempt) {
    socklen_t len = static_cast<socklen_t>(buf.size() * sizeof(gid_t));
    if (::getsockopt(fd, SOL_SOCKET, SO_PEERGROUPS, buf.data(), &len) == 0) {
      groups->assign(buf.begin(), buf.begin() + len / sizeof(gid_t));
      return true;
    }
    if (errno != ERANGE) return false;
    buf.resize(len / sizeof(gid_t) + 1);  // len now says how much it needs
  }
  return false;
}

// A pidfd of the connecting process: SO_PEERPIDFD names exactly the process
// that called connect() (Linux 6.5+); pidfd_open(pid) is the fallback, right
// after accept. -1 with errno on failure.
int PeerPidfd(int fd, pid_t pid) {
  int pidfd = -1;
  socklen_t len = sizeof(pidfd);
  if (::getsockopt(fd, SOL_SOCKET, SO_PEERPIDFD, &pidfd, &len) == 0 && pidfd >= 0) return pidfd;
  if (errno != ENOPROTOOPT && errno != EINVAL && errno != EOPNOTSUPP) return -1;
  return static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
}

}  // namespace

// Fills `peer` from the accepted socket. False (with a reason) when the
// connection must be refused: the broker is out of descriptors for the
// pidfd, or the peer is already gone.
bool Listener::ReadPeer(int fd, PeerCred* peer, std::string* why) {
  ucred cred{};
  socklen_t len = sizeof(cred);
  if (::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) {
    *why = std::string("SO_PEERCRED: ") + std::strerror(errno);
    return false;
  }
  peer->pid = cred.pid;
  peer->uid = cred.uid;
  peer->gid = cred.gid;
  if (!ReadPeerGroups(fd, &peer->groups) && !warned_groups_) {
    warned_groups_ = true;
    Log(LogLevel::kWarn, "peer_groups_unavailable",
        {{"error", std::strerror(errno)},
         {"effect", "only a peer's primary gid matches worker_gids, allow_gids and admin_gids"}});
  }
  if (cred.pid <= 0) return true;  // not in our pid namespace: hello will say so
  // Pin the process: read its start time while a pidfd holds it, then
  // check it has not exited meanwhile, so the start time is the peer's and
  // not that of a later process given the same pid.
  const int pidfd = PeerPidfd(fd, cred.pid);
  if (pidfd < 0) {
    if (errno == ESRCH) {
      *why = "the peer exited";
      return false;
    }
    *why = std::string("pidfd: ") + std::strerror(errno);
    return false;
  }
  std::optional<uint64_t> start = shm::ReadStartTime(cred.pid);
  pollfd p{pidfd, POLLIN, 0};
  const bool exited = ::poll(&p, 1, 0) > 0;
  ::close(pidfd);
  if (exited) {
    *why = "the peer exited";
    return false;
  }
  peer->start_time = start.value_or(0);
  return true;
}

void Listener::ShedOne() {
  // Out of descriptors: the reserve lets us take the oldest pending
  // connection and close it, so clients get an EOF rather than hanging in
  // the backlog, and the accept loop does not spin on EMFILE.
  if (reserve_fd_ < 0) return;
  ::close(reserve_fd_);
  reserve_fd_ = -1;
  const int fd = ::accept4(acceptor_.native_handle(), nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
  if (fd >= 0) {
    ::close(fd);
    ++shed_;
  }
  reserve_fd_ = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
}

void Listener::Refuse(Local::socket& socket, const Status& why) {
  const std::string frame = protocol::ErrorReply(0, why);
  // Best effort, never blocking: the socket buffer of a fresh connection
  // takes one short line.
  (void)::send(socket.native_handle(), frame.data(), frame.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
  boost::system::error_code ec;
  socket.close(ec);
}

void Listener::DoAccept() {
  if (stopped_) return;
  acceptor_.async_accept([this](const boost::system::error_code& ec, Local::socket socket) {
    if (stopped_ || ec == asio::error::operation_aborted) return;
    if (ec) {
      const bool no_fds = ec == asio::error::no_descriptors || ec.value() == ENFILE;
      if (no_fds) ShedOne();
      uint64_t suppressed = 0;
      if (accept_log_.Allow(&suppressed)) {
        Log(LogLevel::kWarn, "accept_failed",
            {{"error", ec.message()},
             {"shed_connections", std::to_string(shed_)},
             {"suppressed", std::to_string(suppressed)}});
      }
      // Back off briefly instead of spinning (after shedding, too: the
      // descriptors come back only as sessions close).
      retry_.expires_after(std::chrono::milliseconds(no_fds ? 10 : 100));
      retry_.async_wait([this](const boost::system::error_code& e) {
        if (!e) DoAccept();
      });
      return;
    }
    PeerCred peer;
    std::string why;
    if (!ReadPeer(socket.native_handle(), &peer, &why)) {
      uint64_t suppressed = 0;
      if (refuse_log_.Allow(&suppressed)) {
        Log(LogLevel::kWarn, "connection_refused",
            {{"peer_pid", std::to_string(peer.pid)}, {"reason", why}, {"suppressed", std::to_string(suppressed)}});
      }
      Refuse(socket, Status(Code::kIoError, "the broker cannot serve this connection now: " + why));
    } else if (Status st = dispatcher_.Admit(peer); !st.ok()) {
      Refuse(socket, st);
    } else {
      std::make_shared<Session>(std::move(socket), std::move(peer), dispatcher_)->Start();
    }
    DoAccept();
  });
}

void Listener::Stop() {
  if (stopped_) return;
  stopped_ = true;
  boost::system::error_code ec;
  acceptor_.close(ec);
  retry_.cancel();
  if (reserve_fd_ >= 0) ::close(reserve_fd_);
  reserve_fd_ = -1;
  if (!path_.empty()) ::unlink(path_.c_str());
}

}  // namespace keymesh::broker
