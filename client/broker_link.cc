#include "client/broker_link.h"

#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstdlib>
#include <cstring>

#include <boost/json.hpp>

#include "common/text.h"
#include "protocol/protocol.h"
#include "shm/clock.h"
#include "shm/process_id.h"

namespace keymesh::detail {

namespace json = boost::json;

namespace {

constexpr uint64_t kMaxIdleNs = 20'000'000'000;  // the broker drops idle connections after 30 s
constexpr size_t kMaxIdleConnections = 8;

Status Unavailable(const std::string& path, const std::string& why) {
  return Status(Code::kBrokerUnavailable, "cannot reach keymesh-broker at " + Escaped(path) + ": " + why);
}

uint32_t CurrentPid() { return static_cast<uint32_t>(::getpid()); }

}  // namespace

std::string BrokerLink::ResolveSocketPath(std::string_view socket_path) {
  if (!socket_path.empty()) return std::string(socket_path);
  const char* env = std::getenv("KEYMESH_SOCKET");
  return env != nullptr && *env != '\0' ? env : kDefaultSocket;
}

BrokerLink::BrokerLink(std::string path, std::string pool)
    : path_(std::move(path)), pool_(std::move(pool)), owner_pid_(CurrentPid()) {}

BrokerLink::~BrokerLink() {
  for (Conn& c : idle_) ::close(c.fd);
}

Result<std::shared_ptr<BrokerLink>> BrokerLink::Open(std::string path, std::string pool) {
  auto link = std::make_shared<BrokerLink>(std::move(path), std::move(pool));
  bool reused = false;
  Result<Conn> conn = link->Borrow(&reused);
  if (!conn.ok()) return conn.status();
  link->Return(*conn);
  return link;
}

Result<json::object> BrokerLink::CallOnce(std::string_view socket_path, std::string_view op, json::object fields,
                                          double timeout) {
  BrokerLink link(ResolveSocketPath(socket_path), "");
  Result<Conn> conn = link.Dial(/*hello=*/false);
  if (!conn.ok()) return conn.status();
  bool unused = false;
  Result<json::object> r = link.Exchange(&*conn, op, fields, timeout, &unused);
  ::close(conn->fd);
  return r;
}

Result<json::object> BrokerLink::Call(std::string_view op, json::object fields, double timeout) {
  for (int attempt = 0;; ++attempt) {
    bool reused = false;
    Result<Conn> conn = Borrow(&reused);
    if (!conn.ok()) return conn.status();
    bool nothing_answered = false;
    Result<json::object> r = Exchange(&*conn, op, fields, timeout, &nothing_answered);
    if (r.ok() || r.status().code() != Code::kBrokerUnavailable) {
      Return(*conn);
      return r;
    }
    ::close(conn->fd);
    if (!reused || !nothing_answered || attempt > 0) return r;
  }
}

Result<BrokerLink::Conn> BrokerLink::Borrow(bool* reused) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    const uint32_t pid = CurrentPid();
    if (pid != owner_pid_) {
      // Forked: the inherited sockets belong to the parent's hello.
      for (Conn& c : idle_) ::close(c.fd);
      idle_.clear();
      owner_pid_ = pid;
    }
    const uint64_t now = shm::MonotonicNowNanos();
    while (!idle_.empty()) {
      Conn c = idle_.back();
      idle_.pop_back();
      if (now - c.last_used < kMaxIdleNs) {
        *reused = true;
        return c;
      }
      ::close(c.fd);
    }
  }
  return Dial(/*hello=*/true);
}

void BrokerLink::Return(Conn c) {
  c.last_used = shm::MonotonicNowNanos();
  std::lock_guard<std::mutex> lock(mu_);
  if (CurrentPid() != owner_pid_ || idle_.size() >= kMaxIdleConnections) {
    ::close(c.fd);
    return;
  }
  idle_.push_back(c);
}

Result<BrokerLink::Conn> BrokerLink::Dial(bool hello) {
  const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return Unavailable(path_, std::strerror(errno));
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path_.size() >= sizeof(addr.sun_path)) {
    ::close(fd);
    return Unavailable(path_, "socket path too long");
  }
  std::memcpy(addr.sun_path, path_.data(), path_.size());
  if (::connect(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)) != 0) {
    const int err = errno;
    ::close(fd);
    return Unavailable(path_, std::strerror(err));
  }
  Conn c{fd, 0};
  if (!hello) return c;
  json::object f;
  const shm::ProcessId& self = shm::Self();
  f["pid"] = self.pid;
  f["start_time"] = self.start_time;
  if (!pool_.empty()) f["pool"] = pool_;
  bool unused = false;
  Result<json::object> r = Exchange(&c, "hello", std::move(f), kCallTimeout, &unused);
  if (!r.ok()) {
    ::close(fd);
    return r.status();
  }
  std::lock_guard<std::mutex> lock(mu_);
  if (hello_.empty()) hello_ = *r;
  return c;
}

Result<json::object> BrokerLink::Exchange(Conn* c, std::string_view op, const json::object& fields, double timeout,
                                          bool* nothing_answered) {
  *nothing_answered = true;
  const int64_t id = next_id_.fetch_add(1, std::memory_order_relaxed);
  const std::string frame = protocol::MakeRequest(op, id, fields);
  const uint64_t deadline = shm::MonotonicNowNanos() + shm::SecondsToNanos(timeout);
  size_t off = 0;
  while (off < frame.size()) {
    const ssize_t n = ::send(c->fd, frame.data() + off, frame.size() - off, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      return Unavailable(path_, std::string("send: ") + std::strerror(errno));
    }
    off += static_cast<size_t>(n);
  }
  std::string in;
  char buf[4096];
  for (;;) {
    const size_t nl = in.find('\n');
    if (nl != std::string::npos) {
      Result<protocol::Reply> reply = protocol::ParseReply(std::string_view(in.data(), nl));
      if (!reply.ok()) return reply.status();
      if (reply->id != id) {  // a stale reply (never expected): skip it
        in.erase(0, nl + 1);
        continue;
      }
      if (!reply->status.ok()) return reply->status;
      return std::move(reply->body);
    }
    const uint64_t now = shm::MonotonicNowNanos();
    if (now >= deadline) {
      return Status(Code::kBrokerUnavailable, "keymesh-broker did not answer " + Quoted(op) + " in time");
    }
    pollfd p{c->fd, POLLIN, 0};
    const uint64_t left_ms = (deadline - now) / 1'000'000 + 1;
    const int rc = ::poll(&p, 1, left_ms > INT32_MAX ? INT32_MAX : static_cast<int>(left_ms));
    if (rc < 0 && errno != EINTR) return Unavailable(path_, std::string("poll: ") + std::strerror(errno));
    if (rc <= 0) continue;
    const ssize_t n = ::recv(c->fd, buf, sizeof(buf), 0);
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
    if (n <= 0) return Unavailable(path_, n == 0 ? "connection closed by the broker" : std::strerror(errno));
    *nothing_answered = false;
    in.append(buf, static_cast<size_t>(n));
    if (in.size() > protocol::kMaxFrame + 1 && in.find('\n') == std::string::npos) {
      return Status(Code::kProtocolError, "reply frame too large");
    }
  }
}

}  // namespace keymesh::detail
