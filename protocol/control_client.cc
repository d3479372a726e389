#include "protocol/control_client.h"

#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <set>
#include <vector>

#include "common/text.h"
#include "protocol/framing.h"

namespace keymesh::protocol {
namespace {

namespace json = boost::json;
using Clock = std::chrono::steady_clock;

struct Conn {
  int fd = -1;
  Clock::time_point idle_since;
};

// How one exchange on a connection ended.
struct Exchanged {
  Result<json::object> reply = Status(Code::kInternal, "not run");
  bool reusable = false;           // the connection is in step: it may serve another call
  bool closed_unanswered = false;  // the broker closed it before any reply byte: a retry is safe
};

// Milliseconds left until `deadline` for poll(2), rounded up; 0 when past.
int MillisLeft(Clock::time_point deadline) {
  const auto left = deadline - Clock::now();
  if (left <= Clock::duration::zero()) return 0;
  const auto ms = std::chrono::ceil<std::chrono::milliseconds>(left).count();
  return ms > INT_MAX ? INT_MAX : static_cast<int>(ms);
}

// Waits until `fd` is ready for `events` or the deadline passes (a
// deadline already past still sees what is ready now). False when the
// deadline passed; *error receives errno for a failed poll.
bool WaitFor(int fd, short events, Clock::time_point deadline, int* error) {
  *error = 0;
  for (;;) {
    const int ms = MillisLeft(deadline);
    pollfd p{fd, events, 0};
    const int rc = ::poll(&p, 1, ms);
    if (rc > 0) return true;
    if (rc < 0 && errno != EINTR) {
      *error = errno;
      return true;
    }
    if (rc == 0 && ms == 0) return false;
  }
}

// The deadline `timeout` seconds from now (at most kMaxSeconds).
Result<Clock::time_point> DeadlineIn(double timeout) {
  if (!std::isfinite(timeout) || timeout < 0) {
    return Status(Code::kInvalidArgument, "timeout must be a finite number of seconds >= 0");
  }
  const std::chrono::duration<double> wait(timeout > kMaxSeconds ? kMaxSeconds : timeout);
  return Clock::now() + std::chrono::duration_cast<Clock::duration>(wait);
}

// True when an idle connection is unusable: the broker closed it (EOF is
// readable) or sent something unasked.
bool Stale(int fd) {
  pollfd p{fd, POLLIN | POLLRDHUP, 0};
  return ::poll(&p, 1, 0) != 0;
}

// pthread_atfork support: every live client's mutex is held across fork(),
// so a child never inherits one locked by a thread that does not exist in
// it. Never destroyed: a fork may happen while statics are torn down.
std::mutex& RegistryMutex() {
  static std::mutex* mu = new std::mutex;
  return *mu;
}

// KM-22: the server must be one this process trusts with its requests (and
// an add_key's secret, and the segment name it answers with): root, this
// process's own uid, or the owner of the socket's directory when no one
// else can create sockets there. A listener another user left at a stale
// or mistyped path (in /tmp, say) is refused before anything is sent.
Status CheckServer(int fd, const std::string& path) {
  ucred cred{};
  socklen_t len = sizeof(cred);
  if (::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) {
    return Status(Code::kBrokerUnavailable, "cannot reach keymesh-broker at " + Escaped(path) +
                                                ": cannot read the server's credentials: " + std::strerror(errno));
  }
  const uid_t me = ::geteuid();
  if (cred.uid == 0 || cred.uid == me) return Status::Ok();
  const size_t slash = path.rfind('/');
  const std::string dir = slash == std::string::npos ? "." : slash == 0 ? "/" : path.substr(0, slash);
  struct stat st {};
  if (::stat(dir.c_str(), &st) == 0 && st.st_uid == cred.uid && (st.st_mode & (S_IWGRP | S_IWOTH)) == 0) {
    return Status::Ok();
  }
  return Status(Code::kPermissionDenied, "refusing the server at " + Escaped(path) + ": it runs as uid " +
                                             std::to_string(cred.uid) +
                                             ", which is neither root, this process's uid nor the owner of "
                                             "a directory only it can write; not a trusted keymesh-broker");
}

}  // namespace

struct ControlClient::State {
  explicit State(ControlClientOptions o) : options(std::move(o)) {}

  Status Unreachable(const std::string& why) const {
    return Status(Code::kBrokerUnavailable,
                  "cannot reach keymesh-broker at " + Escaped(options.socket_path) + ": " + OneLine(why));
  }
  Status Malformed(const std::string& why) const {
    return Status(Code::kProtocolError,
                  "bad reply from keymesh-broker at " + Escaped(options.socket_path) + ": " + OneLine(why));
  }

  Result<Conn> Borrow(Clock::time_point deadline, bool* reused);
  void Return(Conn c);
  Result<Conn> Dial(Clock::time_point deadline);
  Exchanged Exchange(int fd, Op op, json::object fields, Clock::time_point deadline);
  Result<json::object> Call(Op op, json::object fields, double timeout);

  const ControlClientOptions options;
  std::atomic<int64_t> next_id{1};
  std::mutex mu;
  std::vector<Conn> idle;           // guarded by mu
  pid_t owner = ::getpid();         // guarded by mu: the process `idle` belongs to
  std::optional<HelloReply> hello;  // guarded by mu; set once
};

namespace {

// The mutex of every live client.
std::set<std::mutex*>& Clients() {  // guarded by RegistryMutex()
  static auto* clients = new std::set<std::mutex*>;
  return *clients;
}

void LockAllForFork() {
  RegistryMutex().lock();
  for (std::mutex* mu : Clients()) mu->lock();
}

void UnlockAllAfterFork() {
  for (std::mutex* mu : Clients()) mu->unlock();
  RegistryMutex().unlock();
}

void Register(std::mutex* mu) {
  static const bool registered = [] {
    ::pthread_atfork(&LockAllForFork, &UnlockAllAfterFork, &UnlockAllAfterFork);
    return true;
  }();
  (void)registered;
  std::lock_guard<std::mutex> lock(RegistryMutex());
  Clients().insert(mu);
}

void Unregister(std::mutex* mu) {
  std::lock_guard<std::mutex> lock(RegistryMutex());
  Clients().erase(mu);
}

}  // namespace

Result<Conn> ControlClient::State::Borrow(Clock::time_point deadline, bool* reused) {
  *reused = false;
  {
    std::lock_guard<std::mutex> lock(mu);
    if (const pid_t self = ::getpid(); self != owner) {
      // A fork child: the inherited sockets carry the parent's hello.
      for (const Conn& c : idle) ::close(c.fd);
      idle.clear();
      owner = self;
    }
    const auto max_age = std::chrono::duration<double>(options.max_idle_seconds);
    const Clock::time_point now = Clock::now();
    while (!idle.empty()) {
      const Conn c = idle.back();
      idle.pop_back();
      if (now - c.idle_since < max_age && !Stale(c.fd)) {
        *reused = true;
        return c;
      }
      ::close(c.fd);
    }
  }
  return Dial(deadline);
}

void ControlClient::State::Return(Conn c) {
  c.idle_since = Clock::now();
  std::lock_guard<std::mutex> lock(mu);
  if (owner != ::getpid() || idle.size() >= options.max_idle) {
    ::close(c.fd);
    return;
  }
  idle.push_back(c);
}

Result<Conn> ControlClient::State::Dial(Clock::time_point deadline) {
  const std::string& path = options.socket_path;
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.empty()) return Unreachable("no socket path");
  if (path.size() >= sizeof(addr.sun_path)) return Unreachable("socket path too long");
  std::memcpy(addr.sun_path, path.data(), path.size());
  const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return Unreachable(std::strerror(errno));
  // connect(2) on a Unix socket blocks while the broker's accept queue is
  // full; SO_SNDTIMEO bounds that wait by the deadline.
  const int ms = MillisLeft(deadline);
  timeval tv{};
  tv.tv_sec = ms / 1000;
  tv.tv_usec = (ms % 1000) * 1000 + (ms == 0 ? 1 : 0);
  (void)::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
  int rc;
  do {
    rc = ::connect(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof(addr));
  } while (rc != 0 && errno == EINTR && MillisLeft(deadline) > 0);
  if (rc != 0) {
    const int err = errno;
    ::close(fd);
    return Unreachable(err == EAGAIN ? "the broker accepts no connection (queue full)" : std::strerror(err));
  }
  if (Status trusted = CheckServer(fd, path); !trusted.ok()) {
    ::close(fd);
    return trusted;
  }
  const int flags = ::fcntl(fd, F_GETFL);
  if (flags < 0 || ::fcntl(fd, F_SETFL, flags | O_NONBLOCK) != 0) {
    const int err = errno;
    ::close(fd);
    return Unreachable(std::strerror(err));
  }
  Conn c{fd, Clock::now()};
  if (!options.hello) return c;
  Exchanged hi = Exchange(fd, Op::kHello, options.hello().ToJson(), deadline);
  if (!hi.reply.ok()) {
    ::close(fd);
    return hi.reply.status();
  }
  Result<HelloReply> reply = HelloReply::FromJson(*hi.reply);
  if (!reply.ok()) {
    ::close(fd);
    return Malformed("hello: " + reply.status().message());
  }
  std::lock_guard<std::mutex> lock(mu);
  if (!hello) hello = std::move(reply).value();
  return c;
}

namespace {
// The broker's word on a connection it closed at once (an id-0 error line,
// e.g. max_sessions), if it left one to read.
std::optional<Status> ConnectionRefusal(int fd) {
  char buf[4096];
  const ssize_t n = ::recv(fd, buf, sizeof(buf), MSG_DONTWAIT);
  if (n <= 0) return std::nullopt;
  const std::string_view got(buf, static_cast<size_t>(n));
  const size_t nl = got.find('\n');
  if (nl == std::string_view::npos) return std::nullopt;
  Result<Reply> reply = ParseReply(got.substr(0, nl));
  if (!reply.ok() || reply->id != 0 || reply->status.ok()) return std::nullopt;
  return reply->status;
}
}  // namespace

Exchanged ControlClient::State::Exchange(int fd, Op op, json::object fields, Clock::time_point deadline) {
  Exchanged out;
  const int64_t id = next_id.fetch_add(1, std::memory_order_relaxed);
  const std::string frame = MakeRequest(op, id, std::move(fields));
  if (frame.size() > kMaxFrame + 1) {
    out.reply =
        Status(Code::kInvalidArgument, "request '" + std::string(OpName(op)) + "' of " + std::to_string(frame.size()) +
                                           " bytes exceeds the protocol's " + std::to_string(kMaxFrame));
    return out;
  }
  auto late = [&] { return Unreachable("no reply to '" + std::string(OpName(op)) + "' in time"); };
  int error = 0;
  for (size_t off = 0; off < frame.size();) {
    const ssize_t n = ::send(fd, frame.data() + off, frame.size() - off, MSG_NOSIGNAL);
    if (n >= 0) {
      off += static_cast<size_t>(n);
      continue;
    }
    if (errno == EINTR) continue;
    if (errno == EAGAIN) {
      if (!WaitFor(fd, POLLOUT, deadline, &error)) {
        out.reply = late();
        return out;
      }
      if (error == 0) continue;
    } else {
      error = errno;
    }
    out.closed_unanswered = error == EPIPE || error == ECONNRESET;
    out.reply = Unreachable(std::string("send: ") + std::strerror(error));
    if (std::optional<Status> refused = ConnectionRefusal(fd)) {
      out.closed_unanswered = false;  // the broker said why: no retry
      out.reply = *refused;
    }
    return out;
  }
  std::string in;
  size_t scanned = 0;
  char buf[65536];
  for (;;) {
    const size_t nl = in.find('\n', scanned);
    if (nl != std::string::npos) {
      Result<Reply> reply = ParseReply(std::string_view(in.data(), nl));
      if (!reply.ok()) {
        out.reply = Malformed(reply.status().message());
        return out;
      }
      if (reply->id == 0 && !reply->status.ok()) {
        // The broker's word on the connection itself (refused at accept,
        // a frame too long), sent just before it closes it.
        out.reply = reply->status;
        return out;
      }
      if (reply->id != id) {
        out.reply =
            Malformed("the answer to request " + std::to_string(id) + " carries id " + std::to_string(reply->id));
        return out;
      }
      // Bytes beyond the one reply: the broker never sends unasked, so the
      // connection is out of step; answer, but do not reuse it.
      out.reusable = nl + 1 == in.size();
      out.reply =
          reply->status.ok() ? Result<json::object>(std::move(reply->body)) : Result<json::object>(reply->status);
      return out;
    }
    scanned = in.size();
    if (in.size() > kMaxReplyFrame) {
      out.reply = Malformed("a reply exceeds " + std::to_string(kMaxReplyFrame) + " bytes");
      return out;
    }
    if (!WaitFor(fd, POLLIN, deadline, &error)) {
      out.reply = late();
      return out;
    }
    if (error != 0) {
      out.reply = Unreachable(std::string("poll: ") + std::strerror(error));
      return out;
    }
    const ssize_t n = ::recv(fd, buf, sizeof(buf), 0);
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
    if (n <= 0) {
      const int err = n == 0 ? 0 : errno;
      out.closed_unanswered = in.empty() && (n == 0 || err == ECONNRESET);
      out.reply = Unreachable(n == 0 ? "the broker closed the connection" : std::string("recv: ") + std::strerror(err));
      return out;
    }
    in.append(buf, static_cast<size_t>(n));
  }
}

Result<json::object> ControlClient::State::Call(Op op, json::object fields, double timeout) {
  Result<Clock::time_point> deadline = DeadlineIn(timeout);
  if (!deadline.ok()) return deadline.status();
  for (int attempt = 0;; ++attempt) {
    bool reused = false;
    Result<Conn> conn = Borrow(*deadline, &reused);
    if (!conn.ok()) return conn.status();
    // The fields are kept for a retry.
    Exchanged x = Exchange(conn->fd, op, attempt == 0 ? fields : std::move(fields), *deadline);
    if (x.reusable) {
      Return(*conn);
    } else {
      ::close(conn->fd);
    }
    if (reused && x.closed_unanswered && attempt == 0) continue;
    return std::move(x.reply);
  }
}

ControlClient::ControlClient(ControlClientOptions options) : state_(std::make_unique<State>(std::move(options))) {
  Register(&state_->mu);
}

ControlClient::~ControlClient() {
  Unregister(&state_->mu);
  for (const Conn& c : state_->idle) ::close(c.fd);
}

const std::string& ControlClient::socket_path() const noexcept { return state_->options.socket_path; }

Status ControlClient::Connect(double timeout) {
  Result<Clock::time_point> deadline = DeadlineIn(timeout);
  if (!deadline.ok()) return deadline.status();
  bool reused = false;
  Result<Conn> conn = state_->Borrow(*deadline, &reused);
  if (!conn.ok()) return conn.status();
  state_->Return(*conn);
  return Status::Ok();
}

std::optional<HelloReply> ControlClient::hello_reply() const {
  std::lock_guard<std::mutex> lock(state_->mu);
  return state_->hello;
}

Result<json::object> ControlClient::Call(Op op, json::object fields, double timeout) {
  return state_->Call(op, std::move(fields), timeout);
}

namespace {

// A typed reply from `r`, or why not.
template <typename Reply>
Result<Reply> Typed(const ControlClient& c, Op op, Result<json::object> r) {
  if (!r.ok()) return r.status();
  Result<Reply> typed = Reply::FromJson(*r);
  if (!typed.ok()) {
    return Status(Code::kProtocolError, "bad '" + std::string(OpName(op)) + "' reply from keymesh-broker at " +
                                            Escaped(c.socket_path()) + ": " + typed.status().message());
  }
  return typed;
}

Status Done(const Result<json::object>& r) { return r.ok() ? Status::Ok() : r.status(); }

}  // namespace

Result<SecretsReply> ControlClient::Secrets(const SecretsRequest& request, double timeout) {
  return Typed<SecretsReply>(*this, request.op(), Call(request.op(), request.ToJson(), timeout));
}

Result<LeaseGrant> ControlClient::Acquire(const AcquireRequest& request, double timeout) {
  return Typed<LeaseGrant>(*this, request.op(), Call(request.op(), request.ToJson(), timeout));
}

Status ControlClient::End(const EndRequest& request, double timeout) {
  return Done(Call(request.op(), request.ToJson(), timeout));
}

Status ControlClient::ObserveLimits(const ObserveLimitsRequest& request, double timeout) {
  return Done(Call(request.op(), request.ToJson(), timeout));
}

Result<StatusReply> ControlClient::GetStatus(const StatusRequest& request, double timeout) {
  return Typed<StatusReply>(*this, request.op(), Call(request.op(), request.ToJson(), timeout));
}

Status ControlClient::AddKey(const AddKeyRequest& request, double timeout) {
  return Done(Call(request.op(), request.ToJson(), timeout));
}

Status ControlClient::KeyOp(const KeyOpRequest& request, double timeout) {
  return Done(Call(request.op(), request.ToJson(), timeout));
}

Result<MetricsReply> ControlClient::Metrics(double timeout) {
  return Typed<MetricsReply>(*this, Op::kMetrics, Call(Op::kMetrics, {}, timeout));
}

Result<ReclaimReply> ControlClient::Reclaim(const ReclaimRequest& request, double timeout) {
  return Typed<ReclaimReply>(*this, request.op(), Call(request.op(), request.ToJson(), timeout));
}

}  // namespace keymesh::protocol
