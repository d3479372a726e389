// The C ABI (include/keymesh/keymesh.h) over keymesh::Pool.
//
// Nothing throws across this boundary: every entry point catches
// everything and turns it into a status code plus a thread-local message.
//
// Per-process state. A km_pool keeps a ProcState: the Pool this process
// uses and the table of leases this process holds per secret. The state is
// tagged with the fork generation (bumped by a pthread_atfork child
// handler); a call that finds a state of an older generation is running in
// a fork child and builds a fresh one: empty lease table (the parent's
// leases are the parent's), and for an attached pool a new connection to
// the broker (which registers the child). The parent's state is leaked in
// the child on purpose: its mutex may have been held at fork, its leases
// must not be ended by the child, and destroying its broker connection
// could make the broker reap the parent.
//
// Closing. km_pool_close may run while other threads are inside the pool:
// it sets `closed` (so new calls fail with KM_CLOSED), sets `closing` and
// every cancel token of the pool and wakes the waits, waits until `users` drops to
// zero, and only then frees the Pool. The km_pool shell itself lives until
// km_pool_destroy.
#include <pthread.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <limits>
#include <memory>
#include <mutex>
#include <new>
#include <optional>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include <boost/json.hpp>

#include "common/text.h"
#include "keymesh/keymesh.h"
#include "keymesh/pool.h"
#include "keymesh/status.h"
#include "keymesh/types.h"
#include "protocol/protocol.h"

using keymesh::Code;
using keymesh::KeySpec;
using keymesh::Lease;
using keymesh::Pool;
using keymesh::PoolOptions;
using keymesh::Result;
using keymesh::Status;

namespace {

constexpr const char* kDefaultSocket = "/run/keymesh/keymesh.sock";

thread_local std::string t_last_error;

int Fail(Code code, std::string message) noexcept {
  try {
    t_last_error = std::move(message);
  } catch (...) {
    t_last_error.clear();
  }
  return static_cast<int>(code);
}

int Fail(const Status& st) noexcept { return Fail(st.code(), st.message()); }

// Runs `fn` (returning int) and turns any exception into a status.
template <typename Fn>
int Guarded(Fn&& fn) noexcept {
  try {
    return fn();
  } catch (const std::bad_alloc&) {
    return Fail(Code::kInternal, "out of memory");
  } catch (const std::exception& e) {
    return Fail(Code::kInternal, std::string("unexpected error: ") + e.what());
  } catch (...) {
    return Fail(Code::kInternal, "unexpected error");
  }
}

std::atomic<uint64_t> g_fork_generation{0};

// One lease this process holds, by secret.
struct Held {
  std::string secret;
  Lease lease;
};

// What one process knows of a km_pool. See the file comment.
struct ProcState {
  uint64_t generation = 0;
  std::unique_ptr<Pool> owned;  // attached pools: this generation's connection
  Pool* pool = nullptr;         // the Pool used (owned, or the embedded one)
  std::mutex mu;                // guards the fields below
  uint64_t next_ticket = 1;
  std::unordered_map<uint64_t, Held> by_ticket;
  std::unordered_map<std::string, std::deque<uint64_t>> by_secret;  // oldest first

  // Cancels every held lease; lock not needed (no other user).
  void CancelAll() {
    for (auto& [ticket, held] : by_ticket) (void)held.lease.Cancel();
    by_ticket.clear();
    by_secret.clear();
  }
};

}  // namespace

struct km_cancel {
  km_pool* pool = nullptr;
  keymesh::CancelToken token;
};

struct km_lease {
  Lease lease;
};

struct km_pool {
  bool attached = false;
  std::string socket_path;
  std::string pool_name;
  std::unique_ptr<Pool> embedded;  // embedded pools: shared by every generation
  std::atomic<ProcState*> state{nullptr};
  std::atomic<bool> closed{false};
  keymesh::CancelToken closing;  // set by close: the token of waits that have none of their own
  std::atomic<int64_t> users{0};
  std::mutex reconnect_mu;  // one (re)connection at a time
  std::mutex tokens_mu;     // guards tokens
  std::unordered_set<km_cancel*> tokens;
  bool freed = false;  // close finished (under close_mu)
  std::mutex close_mu;
};

namespace {

// Live km_pools, so the fork handlers can reset their per-process parts.
std::mutex g_registry_mu;
std::unordered_set<km_pool*>* g_registry = new std::unordered_set<km_pool*>();  // never freed

// Lock every mutex a fork child might otherwise inherit locked, so the child
// gets them unlocked and consistent.
void AtForkPrepare() {
  g_registry_mu.lock();
  for (km_pool* p : *g_registry) {
    p->reconnect_mu.lock();
    p->tokens_mu.lock();
  }
}

void AtForkParent() {
  for (km_pool* p : *g_registry) {
    p->tokens_mu.unlock();
    p->reconnect_mu.unlock();
  }
  g_registry_mu.unlock();
}

void AtForkChild() {
  g_fork_generation.fetch_add(1, std::memory_order_relaxed);
  for (km_pool* p : *g_registry) {
    // Only the forking thread exists in the child: nobody is inside the pool.
    p->users.store(0, std::memory_order_relaxed);
    p->tokens_mu.unlock();
    p->reconnect_mu.unlock();
  }
  g_registry_mu.unlock();
}

void Register(km_pool* p) {
  static const bool registered = [] {
    pthread_atfork(&AtForkPrepare, &AtForkParent, &AtForkChild);
    return true;
  }();
  (void)registered;
  std::lock_guard<std::mutex> lock(g_registry_mu);
  g_registry->insert(p);
}

void Unregister(km_pool* p) {
  std::lock_guard<std::mutex> lock(g_registry_mu);
  g_registry->erase(p);
}

// Counts a call in progress; refuses calls once the pool is closed.
class Use {
 public:
  explicit Use(km_pool* p) noexcept : p_(p) {
    p_->users.fetch_add(1, std::memory_order_seq_cst);
    ok_ = !p_->closed.load(std::memory_order_seq_cst);
  }
  ~Use() {
    if (p_->users.fetch_sub(1, std::memory_order_seq_cst) == 1 && p_->closed.load(std::memory_order_seq_cst)) {
      p_->users.notify_all();
    }
  }
  Use(const Use&) = delete;
  Use& operator=(const Use&) = delete;
  bool ok() const noexcept { return ok_; }

 private:
  km_pool* p_;
  bool ok_ = false;
};

int ClosedError() { return Fail(Code::kClosed, "the pool is closed"); }

// This process's state for `p`, built on first use in a new fork generation.
Result<ProcState*> CurrentState(km_pool* p) {
  const uint64_t gen = g_fork_generation.load(std::memory_order_relaxed);
  ProcState* s = p->state.load(std::memory_order_acquire);
  if (s != nullptr && s->generation == gen) [[likely]]
    return s;
  std::lock_guard<std::mutex> lock(p->reconnect_mu);
  s = p->state.load(std::memory_order_acquire);
  if (s != nullptr && s->generation == gen) return s;
  auto fresh = std::make_unique<ProcState>();
  fresh->generation = gen;
  if (p->attached) {
    Result<std::unique_ptr<Pool>> pool = Pool::Connect(p->socket_path, p->pool_name);
    if (!pool.ok()) return pool.status();
    fresh->owned = std::move(pool).value();
    fresh->pool = fresh->owned.get();
  } else {
    fresh->pool = p->embedded.get();
  }
  // The old state (another generation) is deliberately leaked: see the file
  // comment.
  ProcState* raw = fresh.release();
  p->state.store(raw, std::memory_order_release);
  return raw;
}

std::optional<double> TimeoutArg(double timeout) {
  if (timeout == KM_DEFAULT) return std::nullopt;
  return timeout;  // Pool validates the range
}

// KM_LATENCY_MEASURED -> nullopt (Lease measures); KM_LATENCY_NONE / NaN ->
// NaN, which the pool takes as "no sample".
Result<std::optional<double>> LatencyArg(double latency) {
  if (std::isnan(latency) || latency == KM_LATENCY_NONE) {
    return std::optional<double>(std::numeric_limits<double>::quiet_NaN());
  }
  if (latency == KM_LATENCY_MEASURED) return std::optional<double>();
  if (!(latency >= 0) || !std::isfinite(latency)) {
    return Status(Code::kInvalidArgument, "latency must be a finite number of seconds >= 0");
  }
  return std::optional<double>(latency);
}

Result<std::optional<double>> CooldownArg(double cooldown) {
  if (cooldown == KM_DEFAULT) return std::optional<double>();
  if (!(cooldown >= 0) || !std::isfinite(cooldown) || cooldown > 1e9) {
    return Status(Code::kInvalidArgument, "cooldown must be a finite number of seconds >= 0");
  }
  return std::optional<double>(cooldown);
}

Result<KeySpec> ToKeySpec(const km_key_spec& k) {
  if (k.secret == nullptr) return Status(Code::kInvalidArgument, "key secret is NULL");
  KeySpec spec;
  spec.name = k.name != nullptr ? k.name : "";
  spec.secret = k.secret;
  spec.weight = k.weight == 0 ? 1 : k.weight;
  spec.max_concurrency = k.max_concurrency;
  spec.rpm = k.rpm;
  spec.tpm = k.tpm;
  return spec;
}

Result<PoolOptions> ToOptions(const km_pool_options* o) {
  PoolOptions opts;
  if (o == nullptr) return opts;
  if (o->strategy < KM_ROUND_ROBIN || o->strategy > KM_WEIGHTED) {
    return Status(Code::kInvalidArgument, "strategy must be KM_ROUND_ROBIN, KM_LEAST_BUSY or KM_WEIGHTED");
  }
  opts.strategy = static_cast<keymesh::Strategy>(o->strategy);
  opts.default_cooldown = o->default_cooldown;
  opts.max_failures = o->max_failures;
  opts.acquire_timeout = o->acquire_timeout;
  opts.max_lease_seconds = o->max_lease_seconds;
  opts.max_cooldown = o->max_cooldown;
  return opts;
}

int FillHeld(ProcState* s, Lease lease, km_held* out) {
  const std::string& secret = lease.secret();
  out->secret = secret.c_str();
  out->name = lease.key_name().c_str();
  std::lock_guard<std::mutex> lock(s->mu);
  const uint64_t ticket = s->next_ticket++;
  s->by_secret[secret].push_back(ticket);
  s->by_ticket.emplace(ticket, Held{secret, std::move(lease)});
  out->ticket = ticket;
  return KM_OK;
}

int AcquireKey(km_pool* p, double timeout, const keymesh::CancelToken* cancel, bool poll, km_held* out,
               uint64_t tokens = 0) {
  if (p == nullptr || out == nullptr) return Fail(Code::kInvalidArgument, "pool and out must not be NULL");
  Use use(p);
  if (!use.ok()) return ClosedError();
  Result<ProcState*> s = CurrentState(p);
  if (!s.ok()) return Fail(s.status());
  Pool::AcquireOptions options;
  options.timeout = TimeoutArg(timeout);
  options.tokens = tokens;
  options.cancel = cancel;
  options.poll = poll;
  Result<Lease> lease = (*s)->pool->Acquire(options);
  if (!lease.ok()) return Fail(lease.status());
  return FillHeld(*s, std::move(lease).value(), out);
}

enum class EndKind { kRelease, kFailed, kFailedPermanent, kRateLimited, kCancel };

// Ends one lease of `secret` held by this process (by ticket, or the oldest).
int EndKey(km_pool* p, const char* secret, uint64_t ticket, EndKind kind, double latency, uint64_t tokens,
           double cooldown) {
  if (p == nullptr || secret == nullptr) return Fail(Code::kInvalidArgument, "pool and secret must not be NULL");
  Result<std::optional<double>> lat = LatencyArg(kind == EndKind::kRelease ? latency : KM_LATENCY_NONE);
  if (!lat.ok()) return Fail(lat.status());
  Result<std::optional<double>> cool = CooldownArg(kind == EndKind::kRateLimited ? cooldown : KM_DEFAULT);
  if (!cool.ok()) return Fail(cool.status());
  Use use(p);
  if (!use.ok()) return ClosedError();
  Result<ProcState*> s = CurrentState(p);
  if (!s.ok()) return Fail(s.status());
  ProcState* st = *s;
  std::optional<Lease> lease;
  {
    std::lock_guard<std::mutex> lock(st->mu);
    auto sit = st->by_secret.find(secret);
    if (sit != st->by_secret.end()) {
      std::deque<uint64_t>& q = sit->second;
      auto qit = q.begin();
      if (ticket != 0) {
        while (qit != q.end() && *qit != ticket) ++qit;
      }
      if (qit != q.end()) {
        auto hit = st->by_ticket.find(*qit);
        if (hit != st->by_ticket.end()) {
          lease.emplace(std::move(hit->second.lease));
          st->by_ticket.erase(hit);
        }
        q.erase(qit);
        if (q.empty()) st->by_secret.erase(sit);
      }
    }
  }
  if (!lease) {
    std::optional<std::string> name = st->pool->NameOfSecret(secret);
    if (!name) {
      return Fail(Code::kUnknownKey,
                  "Unknown key " + keymesh::Quoted(keymesh::MaskSecret(secret)) + " — was it added to this pool?");
    }
    return Fail(Code::kNotHeld, "key " + keymesh::Quoted(*name) + " is not held by this process" +
                                    (ticket != 0 ? std::string(" under that lease (already ended?)")
                                                 : std::string(" (already released, or acquired elsewhere)")));
  }
  Status result;
  switch (kind) {
    case EndKind::kRelease: result = lease->Release(*lat, tokens); break;
    case EndKind::kFailed: result = lease->MarkFailed(); break;
    case EndKind::kFailedPermanent: result = lease->MarkFailed(true); break;
    case EndKind::kRateLimited: result = lease->MarkRateLimited(*cool); break;
    case EndKind::kCancel: result = lease->Cancel(); break;
  }
  if (!result.ok()) return Fail(result);
  return KM_OK;
}

int LeaseEnd(km_lease* l, EndKind kind, double latency, uint64_t tokens, double cooldown) {
  if (l == nullptr) return Fail(Code::kInvalidArgument, "lease must not be NULL");
  if (!l->lease.active()) return Fail(Code::kNotHeld, "lease already ended");
  Status st;
  switch (kind) {
    case EndKind::kRelease: {
      Result<std::optional<double>> lat = LatencyArg(latency);
      if (!lat.ok()) return Fail(lat.status());
      st = l->lease.Release(*lat, tokens);
      break;
    }
    case EndKind::kFailed: st = l->lease.MarkFailed(); break;
    case EndKind::kFailedPermanent: st = l->lease.MarkFailed(true); break;
    case EndKind::kRateLimited: {
      Result<std::optional<double>> cool = CooldownArg(cooldown);
      if (!cool.ok()) return Fail(cool.status());
      st = l->lease.MarkRateLimited(*cool);
      break;
    }
    case EndKind::kCancel: st = l->lease.Cancel(); break;
  }
  if (!st.ok()) return Fail(st);
  return KM_OK;
}

int Admin(km_pool* p, const char* name, Status (Pool::*fn)(std::string_view)) {
  if (p == nullptr || name == nullptr) return Fail(Code::kInvalidArgument, "pool and name must not be NULL");
  Use use(p);
  if (!use.ok()) return ClosedError();
  Result<ProcState*> s = CurrentState(p);
  if (!s.ok()) return Fail(s.status());
  Status st = ((*s)->pool->*fn)(name);
  if (!st.ok()) return Fail(st);
  return KM_OK;
}

char* CopyOut(const std::string& s) {
  char* out = static_cast<char*>(std::malloc(s.size() + 1));
  if (out == nullptr) throw std::bad_alloc();
  std::memcpy(out, s.data(), s.size() + 1);
  return out;
}

// The protocol's status JSON (the broker's, so every status has one shape),
// masked through this process's secrets, plus the names the Python package's
// original-compatible status() reads.
std::string StatusJson(Pool& pool, const keymesh::PoolStatus& ps) {
  namespace json = boost::json;
  json::object root = keymesh::protocol::PoolStatusToJson(ps, [&](const std::string& name) -> std::string {
    for (const keymesh::KeyStatus& k : ps.keys) {
      if (k.name == name) {
        std::optional<std::string> masked = pool.MaskedSecretOfSlot(k.slot);
        return masked ? *masked : std::string("***");
      }
    }
    return "***";
  });
  root["scheduler"] = std::string(keymesh::StrategyName(ps.strategy));
  root["uptime"] = ps.uptime;
  json::object& m = root["pool_metrics"].as_object();
  m["total_timeouts"] = ps.totals.timeouts;
  for (json::value& kv : root["keys"].as_array()) {
    json::object& o = kv.as_object();
    o["acquire_count"] = o["acquires"];
    o["rate_limited_count"] = o["rate_limited"];
    o["reclaimed_count"] = o["reclaimed"];
    o["cancelled_count"] = o["cancelled"];
  }
  return json::serialize(root);
}

// Sends one request line to the broker and reads one reply line.
Result<std::string> BrokerRoundTrip(const char* socket_path, const std::string& request) {
  std::string path;
  if (socket_path != nullptr && socket_path[0] != '\0') {
    path = socket_path;
  } else if (const char* env = std::getenv("KEYMESH_SOCKET"); env != nullptr && env[0] != '\0') {
    path = env;
  } else {
    path = kDefaultSocket;
  }
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof(addr.sun_path)) return Status(Code::kInvalidArgument, "socket path too long");
  std::memcpy(addr.sun_path, path.data(), path.size());
  const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return Status(Code::kIoError, std::string("socket: ") + std::strerror(errno));
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{fd};
  timeval tv{};
  tv.tv_sec = 5;
  (void)::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  (void)::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
  if (::connect(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)) != 0) {
    return Status(Code::kBrokerUnavailable,
                  "cannot connect to the broker at " + keymesh::Escaped(path) + ": " + std::strerror(errno));
  }
  const std::string line = request + "\n";
  size_t sent = 0;
  while (sent < line.size()) {
    const ssize_t n = ::send(fd, line.data() + sent, line.size() - sent, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      return Status(Code::kBrokerUnavailable, std::string("send to the broker: ") + std::strerror(errno));
    }
    sent += static_cast<size_t>(n);
  }
  std::string reply;
  char buf[4096];
  while (reply.find('\n') == std::string::npos) {
    const ssize_t n = ::recv(fd, buf, sizeof(buf), 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      return Status(Code::kBrokerUnavailable, std::string("read from the broker: ") + std::strerror(errno));
    }
    if (n == 0) break;
    reply.append(buf, static_cast<size_t>(n));
    if (reply.size() > 65536) return Status(Code::kProtocolError, "broker reply too long");
  }
  if (const size_t nl = reply.find('\n'); nl != std::string::npos) reply.resize(nl);
  if (reply.empty()) return Status(Code::kProtocolError, "the broker closed the connection without a reply");
  return reply;
}

Code CodeFromName(std::string_view name) {
  for (int c = 0; c <= static_cast<int>(Code::kInternal); ++c) {
    if (name == keymesh::CodeName(static_cast<Code>(c))) return static_cast<Code>(c);
  }
  return Code::kProtocolError;
}

}  // namespace

extern "C" {

const char* km_last_error(void) { return t_last_error.c_str(); }

const char* km_code_name(int code) {
  if (code < 0 || code > static_cast<int>(Code::kInternal)) return "unknown";
  return keymesh::CodeName(static_cast<Code>(code));
}

int km_version(const char** out) {
  if (out == nullptr) return Fail(Code::kInvalidArgument, "out must not be NULL");
  *out = "0.1.0";
  return KM_OK;
}

int km_string_free(char* s) {
  std::free(s);
  return KM_OK;
}

int km_pool_options_init(km_pool_options* o) {
  if (o == nullptr) return Fail(Code::kInvalidArgument, "options must not be NULL");
  const PoolOptions d;
  o->strategy = static_cast<int32_t>(d.strategy);
  o->default_cooldown = d.default_cooldown;
  o->max_failures = d.max_failures;
  o->acquire_timeout = d.acquire_timeout;
  o->max_lease_seconds = d.max_lease_seconds;
  o->max_cooldown = d.max_cooldown;
  return KM_OK;
}

int km_pool_create(const km_key_spec* keys, size_t n, const km_pool_options* options, km_pool** out) {
  return Guarded([&] {
    if (out == nullptr || (keys == nullptr && n != 0)) {
      return Fail(Code::kInvalidArgument, "keys and out must not be NULL");
    }
    Result<PoolOptions> opts = ToOptions(options);
    if (!opts.ok()) return Fail(opts.status());
    std::vector<KeySpec> specs;
    specs.reserve(n);
    for (size_t i = 0; i < n; ++i) {
      Result<KeySpec> spec = ToKeySpec(keys[i]);
      if (!spec.ok()) return Fail(spec.status());
      specs.push_back(std::move(spec).value());
    }
    Result<std::unique_ptr<Pool>> pool = Pool::CreateEmbedded(specs, *opts);
    if (!pool.ok()) return Fail(pool.status());
    auto p = std::make_unique<km_pool>();
    p->embedded = std::move(pool).value();
    auto state = std::make_unique<ProcState>();
    state->generation = g_fork_generation.load(std::memory_order_relaxed);
    state->pool = p->embedded.get();
    p->state.store(state.release(), std::memory_order_release);
    Register(p.get());
    *out = p.release();
    return KM_OK;
  });
}

int km_pool_connect(const char* socket_path, const char* pool_name, km_pool** out) {
  return Guarded([&] {
    if (out == nullptr || pool_name == nullptr)
      return Fail(Code::kInvalidArgument, "pool_name and out must not be NULL");
    auto p = std::make_unique<km_pool>();
    p->attached = true;
    p->socket_path = socket_path != nullptr ? socket_path : "";
    p->pool_name = pool_name;
    Result<ProcState*> s = CurrentState(p.get());
    if (!s.ok()) {
      return Fail(s.status());
    }
    Register(p.get());
    *out = p.release();
    return KM_OK;
  });
}

int km_pool_close(km_pool* p) {
  return Guarded([&] {
    if (p == nullptr) return Fail(Code::kInvalidArgument, "pool must not be NULL");
    std::lock_guard<std::mutex> close_lock(p->close_mu);
    if (p->freed) return KM_OK;
    p->closed.store(true, std::memory_order_seq_cst);
    p->closing.Cancel();
    {
      std::lock_guard<std::mutex> lock(p->tokens_mu);
      for (km_cancel* t : p->tokens) t->token.Cancel();
    }
    const uint64_t gen = g_fork_generation.load(std::memory_order_relaxed);
    ProcState* s = p->state.load(std::memory_order_acquire);
    const bool ours = s != nullptr && s->generation == gen;
    if (ours) s->pool->WakeWaiters();
    for (int64_t u = p->users.load(); u != 0; u = p->users.load()) p->users.wait(u);
    if (ours) {
      s->CancelAll();
      p->state.store(nullptr, std::memory_order_release);
      delete s;  // attached: closes this process's connection
    }
    // Inherited embedded segment: unmapping it here touches only this process.
    p->embedded.reset();
    p->freed = true;
    return KM_OK;
  });
}

int km_pool_destroy(km_pool* p) {
  if (p == nullptr) return KM_OK;
  const int rc = km_pool_close(p);
  Unregister(p);
  delete p;
  return rc;
}

int km_pool_acquire(km_pool* p, double timeout, km_lease** out) {
  return Guarded([&] {
    if (p == nullptr || out == nullptr) return Fail(Code::kInvalidArgument, "pool and out must not be NULL");
    Use use(p);
    if (!use.ok()) return ClosedError();
    Result<ProcState*> s = CurrentState(p);
    if (!s.ok()) return Fail(s.status());
    Pool::AcquireOptions options;
    options.timeout = TimeoutArg(timeout);
    options.cancel = &p->closing;
    Result<Lease> lease = (*s)->pool->Acquire(options);
    if (!lease.ok()) return Fail(lease.status());
    *out = new km_lease{std::move(lease).value()};
    return KM_OK;
  });
}

int km_pool_try_acquire(km_pool* p, km_lease** out) {
  return Guarded([&] {
    if (p == nullptr || out == nullptr) return Fail(Code::kInvalidArgument, "pool and out must not be NULL");
    Use use(p);
    if (!use.ok()) return ClosedError();
    Result<ProcState*> s = CurrentState(p);
    if (!s.ok()) return Fail(s.status());
    Result<Lease> lease = (*s)->pool->TryAcquire();
    if (!lease.ok()) return Fail(lease.status());
    *out = new km_lease{std::move(lease).value()};
    return KM_OK;
  });
}

int km_lease_info(const km_lease* l, const char** secret, const char** name) {
  if (l == nullptr) return Fail(Code::kInvalidArgument, "lease must not be NULL");
  if (!l->lease.active()) return Fail(Code::kNotHeld, "lease already ended");
  if (secret != nullptr) *secret = l->lease.secret().c_str();
  if (name != nullptr) *name = l->lease.key_name().c_str();
  return KM_OK;
}

int km_lease_release(km_lease* l, double latency, uint64_t tokens) {
  return Guarded([&] { return LeaseEnd(l, EndKind::kRelease, latency, tokens, KM_DEFAULT); });
}

int km_lease_mark_failed(km_lease* l) {
  return Guarded([&] { return LeaseEnd(l, EndKind::kFailed, KM_LATENCY_NONE, 0, KM_DEFAULT); });
}

int km_lease_mark_rate_limited(km_lease* l, double cooldown) {
  return Guarded([&] { return LeaseEnd(l, EndKind::kRateLimited, KM_LATENCY_NONE, 0, cooldown); });
}

int km_lease_cancel(km_lease* l) {
  return Guarded([&] { return LeaseEnd(l, EndKind::kCancel, KM_LATENCY_NONE, 0, KM_DEFAULT); });
}

int km_lease_destroy(km_lease* l) {
  return Guarded([&] {
    if (l == nullptr) return KM_OK;
    if (l->lease.active()) (void)l->lease.Cancel();
    delete l;
    return KM_OK;
  });
}

int km_pool_acquire_key(km_pool* p, double timeout, km_cancel* cancel, km_held* out) {
  return Guarded([&] {
    if (cancel != nullptr && cancel->pool != p) {
      return Fail(Code::kInvalidArgument, "the cancel token belongs to another pool");
    }
    return AcquireKey(p, timeout, cancel != nullptr ? &cancel->token : (p != nullptr ? &p->closing : nullptr), false,
                      out);
  });
}

int km_pool_poll_key(km_pool* p, km_held* out) {
  return Guarded([&] { return AcquireKey(p, 0.0, nullptr, true, out); });
}

int km_pool_release_key(km_pool* p, const char* secret, uint64_t ticket, double latency, uint64_t tokens) {
  return Guarded([&] { return EndKey(p, secret, ticket, EndKind::kRelease, latency, tokens, KM_DEFAULT); });
}

int km_pool_mark_failed_key(km_pool* p, const char* secret, uint64_t ticket) {
  return Guarded([&] { return EndKey(p, secret, ticket, EndKind::kFailed, KM_LATENCY_NONE, 0, KM_DEFAULT); });
}

int km_pool_mark_rate_limited_key(km_pool* p, const char* secret, uint64_t ticket, double cooldown) {
  return Guarded([&] { return EndKey(p, secret, ticket, EndKind::kRateLimited, KM_LATENCY_NONE, 0, cooldown); });
}

int km_pool_acquire_key_tokens(km_pool* p, double timeout, uint64_t tokens, km_cancel* cancel, km_held* out) {
  return Guarded([&] {
    if (cancel != nullptr && cancel->pool != p) {
      return Fail(Code::kInvalidArgument, "the cancel token belongs to another pool");
    }
    return AcquireKey(p, timeout, cancel != nullptr ? &cancel->token : (p != nullptr ? &p->closing : nullptr), false,
                      out, tokens);
  });
}

int km_pool_poll_key_tokens(km_pool* p, uint64_t tokens, km_held* out) {
  return Guarded([&] { return AcquireKey(p, 0.0, nullptr, true, out, tokens); });
}

int km_pool_mark_failed_key_permanent(km_pool* p, const char* secret, uint64_t ticket) {
  return Guarded([&] { return EndKey(p, secret, ticket, EndKind::kFailedPermanent, KM_LATENCY_NONE, 0, KM_DEFAULT); });
}

int km_pool_observe_limits(km_pool* p, const char* secret, const char* const* names, const char* const* values,
                           size_t n) {
  return Guarded([&] {
    if (p == nullptr || secret == nullptr || (n > 0 && (names == nullptr || values == nullptr))) {
      return Fail(Code::kInvalidArgument, "pool, secret, names and values must not be NULL");
    }
    std::vector<std::pair<std::string, std::string>> headers;
    headers.reserve(n);
    for (size_t i = 0; i < n; ++i) {
      if (names[i] == nullptr || values[i] == nullptr) return Fail(Code::kInvalidArgument, "NULL header");
      headers.emplace_back(names[i], values[i]);
    }
    timeval tv{};
    gettimeofday(&tv, nullptr);
    Result<keymesh::LimitObservation> obs =
        keymesh::ParseLimitHeaders(headers, static_cast<double>(tv.tv_sec) + static_cast<double>(tv.tv_usec) / 1e6);
    if (!obs.ok()) return Fail(obs.status());
    if (obs->empty()) return KM_OK;
    Use use(p);
    if (!use.ok()) return ClosedError();
    Result<ProcState*> s = CurrentState(p);
    if (!s.ok()) return Fail(s.status());
    std::optional<std::string> name = (*s)->pool->NameOfSecret(secret);
    if (!name) {
      return Fail(Code::kUnknownKey,
                  "Unknown key " + keymesh::Quoted(keymesh::MaskSecret(secret)) + " — was it added to this pool?");
    }
    Status st = (*s)->pool->ObserveLimits(*name, *obs);
    if (!st.ok()) return Fail(st);
    return KM_OK;
  });
}

int km_parse_retry_after(const char* value, double* seconds) {
  return Guarded([&] {
    if (value == nullptr || seconds == nullptr)
      return Fail(Code::kInvalidArgument, "value and seconds must not be NULL");
    timeval tv{};
    gettimeofday(&tv, nullptr);
    Result<double> r =
        keymesh::ParseRetryAfter(value, static_cast<double>(tv.tv_sec) + static_cast<double>(tv.tv_usec) / 1e6);
    if (!r.ok()) return Fail(r.status());
    *seconds = *r;
    return KM_OK;
  });
}

int km_parse_duration(const char* value, double* seconds) {
  return Guarded([&] {
    if (value == nullptr || seconds == nullptr)
      return Fail(Code::kInvalidArgument, "value and seconds must not be NULL");
    Result<double> r = keymesh::ParseRateLimitDuration(value);
    if (!r.ok()) return Fail(r.status());
    *seconds = *r;
    return KM_OK;
  });
}

int km_pool_cancel_key(km_pool* p, const char* secret, uint64_t ticket) {
  return Guarded([&] { return EndKey(p, secret, ticket, EndKind::kCancel, KM_LATENCY_NONE, 0, KM_DEFAULT); });
}

int km_pool_held_count(km_pool* p, const char* secret, uint32_t* out) {
  return Guarded([&] {
    if (p == nullptr || out == nullptr) return Fail(Code::kInvalidArgument, "pool and out must not be NULL");
    Use use(p);
    if (!use.ok()) return ClosedError();
    Result<ProcState*> s = CurrentState(p);
    if (!s.ok()) return Fail(s.status());
    std::lock_guard<std::mutex> lock((*s)->mu);
    if (secret == nullptr) {
      *out = static_cast<uint32_t>((*s)->by_ticket.size());
    } else {
      auto it = (*s)->by_secret.find(secret);
      *out = it == (*s)->by_secret.end() ? 0 : static_cast<uint32_t>(it->second.size());
    }
    return KM_OK;
  });
}

int km_cancel_create(km_pool* p, km_cancel** out) {
  return Guarded([&] {
    if (p == nullptr || out == nullptr) return Fail(Code::kInvalidArgument, "pool and out must not be NULL");
    auto t = std::make_unique<km_cancel>();
    t->pool = p;
    {
      std::lock_guard<std::mutex> lock(p->tokens_mu);
      // A token made after close is born triggered.
      if (p->closed.load()) t->token.Cancel();
      p->tokens.insert(t.get());
    }
    *out = t.release();
    return KM_OK;
  });
}

int km_cancel_trigger(km_cancel* t) {
  return Guarded([&] {
    if (t == nullptr) return Fail(Code::kInvalidArgument, "token must not be NULL");
    t->token.Cancel();
    km_pool* p = t->pool;
    Use use(p);
    if (!use.ok()) return KM_OK;  // close already woke everyone
    ProcState* s = p->state.load(std::memory_order_acquire);
    // Slow-path pools wait in the broker, which cannot be interrupted: the
    // wait ends at its timeout.
    if (s != nullptr && s->pool != nullptr) s->pool->WakeWaiters();
    return KM_OK;
  });
}

int km_cancel_destroy(km_cancel* t) {
  return Guarded([&] {
    if (t == nullptr) return KM_OK;
    {
      std::lock_guard<std::mutex> lock(t->pool->tokens_mu);
      t->pool->tokens.erase(t);
    }
    delete t;
    return KM_OK;
  });
}

int km_pool_add_key(km_pool* p, const km_key_spec* key) {
  return Guarded([&] {
    if (p == nullptr || key == nullptr) return Fail(Code::kInvalidArgument, "pool and key must not be NULL");
    Result<KeySpec> spec = ToKeySpec(*key);
    if (!spec.ok()) return Fail(spec.status());
    Use use(p);
    if (!use.ok()) return ClosedError();
    Result<ProcState*> s = CurrentState(p);
    if (!s.ok()) return Fail(s.status());
    Status st = (*s)->pool->AddKey(*spec);
    if (!st.ok()) return Fail(st);
    return KM_OK;
  });
}

int km_pool_remove_key(km_pool* p, const char* name) {
  return Guarded([&] { return Admin(p, name, &Pool::RemoveKey); });
}

int km_pool_enable_key(km_pool* p, const char* name) {
  return Guarded([&] { return Admin(p, name, &Pool::EnableKey); });
}

int km_pool_disable_key(km_pool* p, const char* name) {
  return Guarded([&] { return Admin(p, name, &Pool::DisableKey); });
}

int km_pool_reset_key(km_pool* p, const char* name) {
  return Guarded([&] { return Admin(p, name, &Pool::ResetKey); });
}

int km_pool_key_name(km_pool* p, const char* secret, char** out) {
  return Guarded([&] {
    if (p == nullptr || secret == nullptr || out == nullptr) {
      return Fail(Code::kInvalidArgument, "pool, secret and out must not be NULL");
    }
    Use use(p);
    if (!use.ok()) return ClosedError();
    Result<ProcState*> s = CurrentState(p);
    if (!s.ok()) return Fail(s.status());
    std::optional<std::string> name = (*s)->pool->NameOfSecret(secret);
    if (!name) {
      return Fail(Code::kUnknownKey,
                  "Unknown key " + keymesh::Quoted(keymesh::MaskSecret(secret)) + " — was it added to this pool?");
    }
    *out = CopyOut(*name);
    return KM_OK;
  });
}

int km_pool_status_json(km_pool* p, char** out) {
  return Guarded([&] {
    if (p == nullptr || out == nullptr) return Fail(Code::kInvalidArgument, "pool and out must not be NULL");
    Use use(p);
    if (!use.ok()) return ClosedError();
    Result<ProcState*> s = CurrentState(p);
    if (!s.ok()) return Fail(s.status());
    Result<keymesh::PoolStatus> ps = (*s)->pool->GetStatus();
    if (!ps.ok()) return Fail(ps.status());
    *out = CopyOut(StatusJson(*(*s)->pool, *ps));
    return KM_OK;
  });
}

int km_pool_available_count(km_pool* p, uint32_t* out) {
  return Guarded([&] {
    if (p == nullptr || out == nullptr) return Fail(Code::kInvalidArgument, "pool and out must not be NULL");
    Use use(p);
    if (!use.ok()) return ClosedError();
    Result<ProcState*> s = CurrentState(p);
    if (!s.ok()) return Fail(s.status());
    *out = (*s)->pool->AvailableCount();
    return KM_OK;
  });
}

int km_pool_reclaim_dead(km_pool* p, uint32_t* reclaimed) {
  return Guarded([&] {
    if (p == nullptr) return Fail(Code::kInvalidArgument, "pool must not be NULL");
    Use use(p);
    if (!use.ok()) return ClosedError();
    Result<ProcState*> s = CurrentState(p);
    if (!s.ok()) return Fail(s.status());
    Result<uint32_t> n = (*s)->pool->ReclaimDead();
    if (!n.ok()) return Fail(n.status());
    if (reclaimed != nullptr) *reclaimed = *n;
    return KM_OK;
  });
}

int km_broker_reclaim(const char* socket_path, int32_t pid, uint32_t* reclaimed) {
  return Guarded([&] {
    if (pid <= 0) return Fail(Code::kInvalidArgument, "pid must be > 0");
    boost::json::object req;
    req["v"] = 1;
    req["op"] = "reclaim";
    req["id"] = 1;
    req["pid"] = pid;
    Result<std::string> reply = BrokerRoundTrip(socket_path, boost::json::serialize(req));
    if (!reply.ok()) return Fail(reply.status());
    boost::system::error_code ec;
    boost::json::value v = boost::json::parse(*reply, ec);
    if (ec || !v.is_object()) return Fail(Code::kProtocolError, "malformed reply from the broker");
    const boost::json::object& o = v.as_object();
    if (const boost::json::value* err = o.if_contains("error"); err != nullptr && !err->is_null()) {
      Code code = Code::kProtocolError;
      std::string message = "the broker refused the reclaim request";
      if (err->is_object()) {
        if (const auto* c = err->as_object().if_contains("code"); c != nullptr && c->is_string()) {
          code = CodeFromName(c->as_string());
        }
        if (const auto* m = err->as_object().if_contains("message"); m != nullptr && m->is_string()) {
          message = keymesh::OneLine(m->as_string());
        }
      } else if (err->is_string()) {
        message = keymesh::OneLine(err->as_string());
      }
      return Fail(code, message);
    }
    if (const boost::json::value* ok = o.if_contains("ok"); ok != nullptr && ok->is_bool() && !ok->as_bool()) {
      return Fail(Code::kProtocolError, "the broker refused the reclaim request");
    }
    if (reclaimed != nullptr) {
      *reclaimed = 0;
      const boost::json::value* n = o.if_contains("reclaimed");
      if (n == nullptr) {
        if (const auto* r = o.if_contains("result"); r != nullptr && r->is_object()) {
          n = r->as_object().if_contains("reclaimed");
        }
      }
      if (n != nullptr && n->is_int64() && n->as_int64() >= 0) *reclaimed = static_cast<uint32_t>(n->as_int64());
      if (n != nullptr && n->is_uint64()) *reclaimed = static_cast<uint32_t>(n->as_uint64());
    }
    return KM_OK;
  });
}

}  // extern "C"
