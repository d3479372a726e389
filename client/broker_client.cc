// The broker client: Pool::Connect (hello, secrets, then the shared-memory
// fast path) and the socket slow path used when the segment cannot be
// mapped. The fast path itself lives in pool.cc and never touches the
// socket.
//
// BrokerLink keeps a small set of connections to the broker, each greeted
// with hello (this process's pid and start time, so leases granted over it
// belong to this process). A call borrows one connection, so threads never
// wait for each other's blocking acquires. After fork() the child drops the
// inherited connections and dials its own.
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>

#include <boost/json.hpp>

#include "common/text.h"
#include "keymesh/pool.h"
#include "protocol/protocol.h"
#include "shm/clock.h"
#include "shm/pool.h"
#include "shm/process_id.h"
#include "shm/segment.h"

namespace keymesh {
namespace detail {

namespace json = boost::json;

namespace {

constexpr const char* kDefaultSocket = "/run/keymesh/keymesh.sock";
constexpr double kCallTimeout = 10.0;            // seconds, for everything but acquire
constexpr uint64_t kMaxIdleNs = 20'000'000'000;  // the broker drops idle connections after 30 s

Status Unavailable(const std::string& path, const std::string& why) {
  return Status(Code::kBrokerUnavailable, "cannot reach keymesh-broker at " + Escaped(path) + ": " + why);
}

}  // namespace

class BrokerLink {
 public:
  BrokerLink(std::string path, std::string pool) : path_(std::move(path)), pool_(std::move(pool)) {}
  ~BrokerLink() {
    for (auto& c : idle_) ::close(c.fd);
  }

  const std::string& path() const noexcept { return path_; }
  const std::string& pool() const noexcept { return pool_; }
  const json::object& hello() const noexcept { return hello_; }

  // Sends `op` and waits up to `timeout` seconds for its reply; the reply's
  // error becomes the returned Status.
  Result<json::object> Call(std::string_view op, json::object fields, double timeout = kCallTimeout) {
    for (int attempt = 0;; ++attempt) {
      bool reused = false;
      Result<Conn> conn = Borrow(&reused);
      if (!conn.ok()) return conn.status();
      bool sent_nothing_answered = false;
      Result<json::object> r = Exchange(&*conn, op, fields, timeout, &sent_nothing_answered);
      if (r.ok() || r.status().code() != Code::kBrokerUnavailable) {
        Return(*conn);
        return r;
      }
      ::close(conn->fd);
      // A pooled connection the broker closed meanwhile (restart, idle):
      // nothing was processed, so one retry on a fresh connection is safe.
      if (!reused || !sent_nothing_answered || attempt > 0) return r;
    }
  }

  // Opens the first connection (hello) and keeps it pooled.
  Status Open() {
    bool reused = false;
    Result<Conn> conn = Borrow(&reused);
    if (!conn.ok()) return conn.status();
    Return(*conn);
    return Status::Ok();
  }

  Result<std::vector<std::pair<std::string, std::string>>> FetchSecrets() {
    json::object f;
    f["pool"] = pool_;
    Result<json::object> r = Call("secrets", std::move(f));
    if (!r.ok()) return r.status();
    std::vector<std::pair<std::string, std::string>> out;
    const json::value* list = r->if_contains("secrets");
    if (list == nullptr || !list->is_array()) return Status(Code::kProtocolError, "secrets reply without a list");
    std::lock_guard<std::mutex> lock(entries_mu_);
    for (const json::value& e : list->get_array()) {
      if (!e.is_object()) continue;
      const json::object& o = e.get_object();
      const json::value* name = o.if_contains("name");
      const json::value* secret = o.if_contains("secret");
      if (name == nullptr || secret == nullptr || !name->is_string() || !secret->is_string()) continue;
      std::string n(name->get_string());
      std::string s(secret->get_string());
      const KeyEntry* cur = entries_.count(n) != 0 ? entries_[n] : nullptr;
      if (cur == nullptr || cur->secret != s) {
        auto entry = std::make_unique<KeyEntry>();
        entry->name = n;
        entry->secret = s;
        entries_[n] = entry.get();
        storage_.push_back(std::move(entry));  // kept until the link dies: leases point at it
      }
      out.emplace_back(std::move(n), std::move(s));
    }
    return out;
  }

  // What this process knows of key `name` (slow path), refreshed once from
  // the broker when unknown. The pointer lives as long as the link.
  const KeyEntry* Entry(const std::string& name) {
    for (int attempt = 0; attempt < 2; ++attempt) {
      {
        std::lock_guard<std::mutex> lock(entries_mu_);
        auto it = entries_.find(name);
        if (it != entries_.end()) return it->second;
      }
      if (attempt == 0 && !FetchSecrets().ok()) break;
    }
    return nullptr;
  }

  std::optional<std::string> NameOfSecret(std::string_view secret) {
    for (int attempt = 0; attempt < 2; ++attempt) {
      {
        std::lock_guard<std::mutex> lock(entries_mu_);
        for (const auto& [name, e] : entries_) {
          if (e->secret == secret) return name;
        }
      }
      if (attempt == 0 && !FetchSecrets().ok()) break;
    }
    return std::nullopt;
  }

 private:
  struct Conn {
    int fd = -1;
    uint64_t last_used = 0;
  };

  Result<Conn> Borrow(bool* reused) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      const uint32_t pid = static_cast<uint32_t>(::getpid());
      if (pid != owner_pid_) {
        // Forked: the inherited sockets belong to the parent's hello.
        for (auto& c : idle_) ::close(c.fd);
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
    return Dial();
  }

  void Return(Conn c) {
    c.last_used = shm::MonotonicNowNanos();
    std::lock_guard<std::mutex> lock(mu_);
    if (static_cast<uint32_t>(::getpid()) != owner_pid_ || idle_.size() >= 8) {
      ::close(c.fd);
      return;
    }
    idle_.push_back(c);
  }

  Result<Conn> Dial() {
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
    json::object f;
    const shm::ProcessId& self = shm::Self();
    f["pid"] = self.pid;
    f["start_time"] = self.start_time;
    f["pool"] = pool_;
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

  // One request/reply on `c`. *nothing_answered: the failure happened before
  // any reply byte arrived.
  Result<json::object> Exchange(Conn* c, std::string_view op, const json::object& fields, double timeout,
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
      if (now >= deadline)
        return Status(Code::kBrokerUnavailable, "keymesh-broker did not answer " + Quoted(op) + " in time");
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

  const std::string path_;
  const std::string pool_;
  std::mutex mu_;
  std::vector<Conn> idle_;                                  // guarded by mu_
  uint32_t owner_pid_ = static_cast<uint32_t>(::getpid());  // guarded by mu_
  json::object hello_;                                      // guarded by mu_; written once
  std::atomic<int64_t> next_id_{1};
  std::mutex entries_mu_;
  std::map<std::string, const KeyEntry*> entries_;  // guarded by entries_mu_
  std::vector<std::unique_ptr<KeyEntry>> storage_;  // guarded by entries_mu_
};

}  // namespace detail

namespace json = boost::json;

Pool::Pool(std::shared_ptr<detail::BrokerLink> broker, std::string name)
    : name_(std::move(name)), creator_pid_(static_cast<uint32_t>(::getpid())), broker_(std::move(broker)) {}

Result<std::unique_ptr<Pool>> Pool::Connect(std::string_view socket_path, std::string_view pool_name) {
  std::string path(socket_path);
  if (path.empty()) {
    const char* env = std::getenv("KEYMESH_SOCKET");
    path = env != nullptr && *env != '\0' ? env : detail::kDefaultSocket;
  }
  auto link = std::make_shared<detail::BrokerLink>(path, std::string(pool_name));
  Status st = link->Open();
  if (!st.ok()) return st;
  // Secrets first: a peer the broker does not trust learns that here,
  // whichever path it would take.
  Result<std::vector<std::pair<std::string, std::string>>> secrets = link->FetchSecrets();
  if (!secrets.ok()) return secrets.status();
  const json::value* segment = link->hello().if_contains("segment");
  // KEYMESH_SLOW_PATH=1 forces the socket path (tests, diagnosis).
  const char* force_slow = std::getenv("KEYMESH_SLOW_PATH");
  const bool slow = force_slow != nullptr && *force_slow != '\0' && std::strcmp(force_slow, "0") != 0;
  if (!slow && segment != nullptr && segment->is_string()) {
    std::shared_ptr<detail::BrokerLink> source_link = link;
    Result<std::unique_ptr<Pool>> attached =
        AttachSegment(segment->get_string(), pool_name, [source_link] { return source_link->FetchSecrets(); });
    if (attached.ok()) {
      (*attached)->broker_ = std::move(link);
      return std::move(attached).value();
    }
    if (attached.status().code() == Code::kPermissionDenied &&
        attached.status().message().find("secret") != std::string::npos) {
      return attached.status();
    }
    // Cannot map the segment (permissions, another layout version): every
    // call goes over the socket instead.
  }
  return std::unique_ptr<Pool>(new Pool(std::move(link), std::string(pool_name)));
}

Result<Lease> Pool::RemoteAcquire(std::optional<double> timeout, uint64_t tokens) {
  json::object f;
  f["pool"] = name_;
  if (tokens != 0) f["tokens"] = tokens;
  double wait = 24 * 3600.0;  // the broker applies the pool's acquire_timeout
  if (timeout) {
    if (!(*timeout >= 0) || *timeout > 1e9) {
      return Status(Code::kInvalidArgument, "timeout must be a finite number of seconds >= 0");
    }
    f["timeout"] = *timeout;
    wait = *timeout;
  }
  Result<json::object> r = broker_->Call("acquire", std::move(f), wait + detail::kCallTimeout);
  if (!r.ok()) return r.status();
  Result<std::string> key = protocol::GetString(*r, "key");
  Result<uint64_t> slot = protocol::GetUint(*r, "slot");
  Result<uint64_t> lease_index = protocol::GetUint(*r, "lease");
  Result<uint64_t> seq = protocol::GetUint(*r, "seq");
  Result<uint64_t> acquire_ns = protocol::GetUint(*r, "acquire_ns");
  if (!key.ok() || !slot.ok() || !lease_index.ok() || !seq.ok() || !acquire_ns.ok()) {
    return Status(Code::kProtocolError, "malformed acquire reply");
  }
  Lease lease;
  lease.pool_ = this;
  lease.slot_ = static_cast<uint32_t>(*slot);
  lease.lease_ = static_cast<uint32_t>(*lease_index);
  lease.seq_ = static_cast<uint32_t>(*seq);
  lease.acquire_ns_ = *acquire_ns;
  lease.entry_ = broker_->Entry(*key);
  if (lease.entry_ == nullptr) {
    (void)lease.Cancel();
    return Status(Code::kUnknownKey, "the broker granted key " + Quoted(*key) + " but did not give its secret");
  }
  return lease;
}

Status Pool::RemoteEnd(const Lease& lease, uint32_t kind, std::optional<double> latency, uint64_t tokens,
                       std::optional<double> cooldown, bool permanent) {
  static constexpr const char* kOps[] = {"release", "mark_failed", "mark_rate_limited", "cancel"};
  if (kind > 3) return Status(Code::kInvalidArgument, "bad outcome");
  json::object f;
  f["pool"] = name_;
  f["slot"] = lease.slot_;
  f["lease"] = lease.lease_;
  f["seq"] = lease.seq_;
  f["acquire_ns"] = lease.acquire_ns_;
  if (latency && *latency >= 0 && *latency <= 1e9) f["latency"] = *latency;
  if (tokens != 0) f["tokens"] = tokens;
  if (cooldown) f["cooldown"] = *cooldown;
  if (permanent) f["permanent"] = true;
  Result<json::object> r = broker_->Call(kOps[kind], std::move(f));
  return r.ok() ? Status::Ok() : r.status();
}

Status Pool::RemoteObserve(std::string_view key_name, const LimitObservation& o) {
  json::object f;
  f["pool"] = name_;
  f["name"] = key_name;
  if (o.remaining_requests) f["remaining_requests"] = *o.remaining_requests;
  if (o.reset_requests) f["reset_requests"] = *o.reset_requests;
  if (o.remaining_tokens) f["remaining_tokens"] = *o.remaining_tokens;
  if (o.reset_tokens) f["reset_tokens"] = *o.reset_tokens;
  if (o.retry_after) f["retry_after"] = *o.retry_after;
  Result<json::object> r = broker_->Call("observe_limits", std::move(f));
  return r.ok() ? Status::Ok() : r.status();
}

Status Pool::RemoteKeyOp(std::string_view op, std::string_view name) {
  json::object f;
  f["pool"] = name_;
  f["name"] = name;
  Result<json::object> r = broker_->Call(op, std::move(f));
  return r.ok() ? Status::Ok() : r.status();
}

Status Pool::RemoteAddKey(const KeySpec& key) {
  if (key.secret.empty() || key.secret.find_first_not_of(" \t\r\n") == std::string::npos) {
    return Status(Code::kInvalidArgument, "key has an empty secret");
  }
  std::string name = key.name;
  if (name.empty()) {
    // The original identified keys by their secret: re-admit the key that
    // holds it, or name a new one.
    std::optional<std::string> known = broker_->NameOfSecret(key.secret);
    if (known) {
      name = *known;
    } else {
      Result<PoolStatus> st = RemoteStatus();
      if (!st.ok()) return st.status();
      for (size_t n = st->keys.size() + 1; name.empty(); ++n) {
        std::string candidate = "key-" + std::to_string(n);
        bool taken = false;
        for (const KeyStatus& k : st->keys) taken = taken || k.name == candidate;
        if (!taken) name = std::move(candidate);
      }
    }
  }
  json::object f;
  f["pool"] = name_;
  f["name"] = name;
  f["secret"] = key.secret;
  f["weight"] = key.weight;
  f["max_concurrency"] = key.max_concurrency;
  f["rpm"] = key.rpm;
  f["tpm"] = key.tpm;
  Result<json::object> r = broker_->Call("add_key", std::move(f));
  if (!r.ok()) return r.status();
  (void)broker_->FetchSecrets();
  return Status::Ok();
}

Result<PoolStatus> Pool::RemoteStatus() {
  json::object f;
  f["pool"] = name_;
  Result<json::object> r = broker_->Call("status", std::move(f));
  if (!r.ok()) return r.status();
  const json::value* pools = r->if_contains("pools");
  if (pools == nullptr || !pools->is_array() || pools->get_array().empty()) {
    return Status(Code::kProtocolError, "status reply without the pool");
  }
  return protocol::PoolStatusFromJson(pools->get_array()[0]);
}

std::optional<std::string> Pool::RemoteNameOfSecret(std::string_view secret) { return broker_->NameOfSecret(secret); }

}  // namespace keymesh
