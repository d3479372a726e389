// The mesh on one machine (issue 12): several real keymesh-broker processes,
// each its own host (socket, segment, host name), sharing keys through one
// real redis-server; forked worker processes use the C++ client against
// their host's broker and call a MockProvider that enforces each key's
// global limit (the ground truth). Faults: SIGSTOP/SIGKILL of redis-server,
// SIGKILL and SIGTERM of a broker, and a FaultProxy between one broker and
// Redis.
//
// Time is compressed (refresh 0.2 s, lease 2 s, keys of 3000 rpm with one
// second of burst, as the provider quantizes). Waits are on conditions
// (log lines, status polls with deadlines); the sleeps are the scenarios'
// own durations (run the load for N s, freeze Redis for N s).
//
// Overspend is measured on what the pools *sent* (MockProvider::Overspend):
// the provider refuses anything beyond B + r·W, so refusals and overspend
// are two views of one thing.
#define BOOST_TEST_MODULE mesh_integration_test
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <boost/json.hpp>
#include <boost/test/unit_test.hpp>

#include "keymesh/pool.h"
#include "support/broker_harness.h"
#include "support/fault_proxy.h"
#include "support/mock_provider.h"
#include "support/process.h"
#include "support/redis_server.h"

namespace km = keymesh;
namespace json = boost::json;
using km::testing::BrokerProcess;
using km::testing::ChildGuard;
using km::testing::FaultProxy;
using km::testing::ForkChild;
using km::testing::MockKeyLimit;
using km::testing::MockProvider;
using km::testing::MonoNanos;
using km::testing::NowSeconds;
using km::testing::RawClient;
using km::testing::RedisServer;
using km::testing::SharedArray;

namespace {

constexpr double kRefresh = 0.2;
constexpr double kLease = 2.0;
constexpr double kHeadroom = 0.02;  // MeshConfig's default
constexpr uint32_t kRpm = 3000;     // per key: 50 requests a second
constexpr size_t kMaxWorkers = 32;
constexpr size_t kMaxHosts = 8;

struct KeyDef {
  std::string name;
  std::string secret;
  uint32_t rpm = kRpm;
};

std::vector<KeyDef> TwoKeys() { return {{"k0", "sk-test-mesh-aaaaaaaa0000"}, {"k1", "sk-test-mesh-bbbbbbbb1111"}}; }

double Seconds(uint64_t ns) { return static_cast<double>(ns) / 1e9; }

// Polls `fn` every `interval` seconds until it holds or `timeout` passes.
bool Eventually(const std::function<bool()>& fn, double timeout, double interval = 0.02) {
  const double deadline = NowSeconds() + timeout;
  while (NowSeconds() < deadline) {
    if (fn()) return true;
    ::usleep(static_cast<useconds_t>(interval * 1e6));
  }
  return fn();
}

// A scenario's own duration (run the load, keep Redis frozen): never a
// wait for something to settle.
void Hold(double seconds) {
  const uint64_t until = MonoNanos() + static_cast<uint64_t>(seconds * 1e9);
  const timespec at{static_cast<time_t>(until / 1'000'000'000ull), static_cast<long>(until % 1'000'000'000ull)};
  while (::clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &at, nullptr) == EINTR) {
  }
}

size_t Count(const std::string& haystack, const std::string& needle) {
  size_t n = 0;
  for (size_t pos = haystack.find(needle); pos != std::string::npos; pos = haystack.find(needle, pos + 1)) ++n;
  return n;
}

// What each worker reports, in memory shared with it.
struct WorkerCounters {
  std::atomic<int> state{0};  // 0 starting, 1 connected, 2 done, -1 could not connect
  std::atomic<uint64_t> calls{0};
  std::atomic<uint64_t> ok{0};
  std::atomic<uint64_t> refused{0};
  std::atomic<uint64_t> timeouts{0};  // acquires that found no key in time
  std::atomic<uint64_t> errors{0};    // any other failed acquire or release
};

// One host of the mesh: its broker, optionally behind its own FaultProxy.
struct Host {
  std::string name;
  uint8_t index = 0;
  std::unique_ptr<FaultProxy> proxy;
  std::unique_ptr<BrokerProcess> broker;
  std::unique_ptr<km::Pool> view;  // attached to the broker, for the segment's view (ShareRpm); ends first
  bool in_mesh = true;             // false: no `mesh` object (an isolated broker with each key's full limit)
  std::string outage = "share";
  double lease = kLease;
  double refresh = kRefresh;
  std::vector<KeyDef> keys;
};

class Mesh {
 public:
  explicit Mesh(std::vector<KeyDef> keys = TwoKeys())
      : keys_(std::move(keys)), provider_(Limits(keys_)), counters_(kMaxWorkers), stop_(kMaxHosts) {
    BOOST_REQUIRE_MESSAGE(redis_.Start(), "redis-server did not start");
    ns_ = "kmtest-" + std::to_string(::getpid()) + "-" + std::to_string(next_ns_++);
  }
  ~Mesh() {
    // Workers first (they hold leases on the brokers' segments), then the
    // brokers and proxies (their destructors remove segments and files),
    // then Redis.
    for (size_t i = 0; i < kMaxHosts; ++i) stop_[i].store(1);
    workers_.clear();
    hosts_.clear();
  }

  MockProvider& provider() { return provider_; }
  RedisServer& redis() { return redis_; }
  const std::vector<KeyDef>& keys() const { return keys_; }
  const std::string& ns() const { return ns_; }

  // A host named h<index>; `proxied`: reaches Redis through its own FaultProxy.
  Host& AddHost(bool proxied = false) {
    auto h = std::make_unique<Host>();
    h->index = static_cast<uint8_t>(hosts_.size());
    h->name = "h" + std::to_string(h->index);
    h->keys = keys_;
    if (proxied) {
      h->proxy = std::make_unique<FaultProxy>(redis_.port());
      BOOST_REQUIRE(h->proxy->Start());
    }
    h->broker = std::make_unique<BrokerProcess>();
    hosts_.push_back(std::move(h));
    return *hosts_.back();
  }

  // Each key's burst is one second of its rate (what the provider allows);
  // rate_margin 0, because the mesh's headroom already keeps the shares
  // under the limit.
  void WriteConfig(Host& h) {
    std::ostringstream pools;
    pools << R"({"p":{"strategy":"least_busy","default_cooldown":1,"max_failures":1000,"acquire_timeout":1,)"
          << R"("rate_margin":0,"keys":[)";
    for (size_t i = 0; i < h.keys.size(); ++i) {
      const KeyDef& k = h.keys[i];
      pools << (i ? "," : "") << R"({"name":")" << k.name << R"(","secret":")" << k.secret << R"(","rpm":)" << k.rpm
            << R"(,"burst":)" << std::max<uint32_t>(1, k.rpm / 60) << "}";
    }
    pools << "]}}";
    const std::string url = h.proxy ? h.proxy->url() : redis_.url();
    std::ostringstream mesh;
    mesh << R"(,"mesh":{"redis":")" << url << R"(","host":")" << h.name << R"(","namespace":")" << ns_
         << R"(","refresh":)" << h.refresh << R"(,"lease":)" << h.lease << R"(,"outage":")" << h.outage << R"("})";
    h.broker->WriteConfig(pools.str(), h.in_mesh ? mesh.str() : "");
  }

  // Writes the config and starts the broker (ready: it serves its socket).
  bool Start(Host& h, double timeout = 10) {
    WriteConfig(h);
    return h.broker->Start({}, timeout);
  }

  // Forks `n` workers on host `h`, each offering `rps` requests a second
  // (0: as fast as it is served), each acquire waiting up to `acquire_s`.
  void Spawn(Host& h, int n, double rps, double acquire_s = 0.25) {
    for (int i = 0; i < n; ++i) {
      BOOST_REQUIRE_LT(next_worker_, kMaxWorkers);
      const size_t w = next_worker_++;
      const std::string socket = h.broker->socket();
      const uint8_t origin = h.index;
      WorkerCounters* c = &counters_[w];
      std::atomic<int>* stop = &stop_[h.index];
      MockProvider* provider = &provider_;
      workers_.push_back({h.index, std::make_unique<ChildGuard>(ForkChild([=] {
                            return WorkerMain(socket, origin, rps, acquire_s, provider, c, stop);
                          })),
                          w});
    }
  }
  // True once every worker forked so far has connected.
  bool WaitWorkersConnected(double timeout = 10) {
    return Eventually(
        [&] {
          for (const Worker& w : workers_) {
            if (counters_[w.counters].state.load() != 1 && counters_[w.counters].state.load() != 2) return false;
          }
          return true;
        },
        timeout);
  }
  // Stops host `index`'s workers cleanly and reaps them (exit code 0 each).
  void StopWorkers(uint8_t index) {
    stop_[index].store(1);
    for (Worker& w : workers_) {
      if (w.host == index && w.guard->pid > 0) BOOST_CHECK_EQUAL(w.guard->Wait(), 0);
    }
  }
  void StopAllWorkers() {
    for (uint8_t i = 0; i < kMaxHosts; ++i) stop_[i].store(1);
    for (Worker& w : workers_) {
      if (w.guard->pid > 0) BOOST_CHECK_EQUAL(w.guard->Wait(), 0);
    }
  }
  // SIGKILLs host `index`'s workers (the host died with them).
  void KillWorkers(uint8_t index) {
    for (Worker& w : workers_) {
      if (w.host == index && w.guard->pid > 0) (void)w.guard->KillAndWait();
    }
  }
  struct Totals {
    uint64_t calls = 0, ok = 0, refused = 0, timeouts = 0, errors = 0;
  };
  Totals WorkerTotals() {
    Totals t;
    for (const Worker& w : workers_) {
      const WorkerCounters& c = counters_[w.counters];
      t.calls += c.calls.load();
      t.ok += c.ok.load();
      t.refused += c.refused.load();
      t.timeouts += c.timeouts.load();
      t.errors += c.errors.load();
    }
    return t;
  }

  // The whole mesh's capacity in requests a second (the keys' limits).
  double Capacity() const {
    double r = 0;
    for (const KeyDef& k : keys_) r += k.rpm / 60.0;
    return r;
  }
  uint64_t AdmittedBetween(uint64_t from, uint64_t to, int origin = -1) const {
    uint64_t n = 0;
    for (const KeyDef& k : keys_) n += provider_.AdmittedBetween(k.name, from, to, origin);
    return n;
  }
  double WorstOverspend(uint64_t from = 0, uint64_t to = UINT64_MAX) const {
    double worst = 0;
    for (const KeyDef& k : keys_) worst = std::max(worst, provider_.WorstOverspend(k.name, from, to));
    return worst;
  }
  double RefusedShare() const {
    const uint64_t a = provider_.total_admitted();
    const uint64_t r = provider_.total_refused();
    return a + r == 0 ? 0 : static_cast<double>(r) / static_cast<double>(a + r);
  }

 private:
  struct Worker {
    uint8_t host;
    std::unique_ptr<ChildGuard> guard;
    size_t counters;
  };

  static std::vector<MockKeyLimit> Limits(const std::vector<KeyDef>& keys) {
    std::vector<MockKeyLimit> out;
    for (const KeyDef& k : keys) out.push_back({k.name, k.rpm, 0});
    return out;
  }

  // A worker as a real one behaves: acquire, call the provider, release
  // with the outcome; on a 429 report it with the provider's Retry-After.
  static int WorkerMain(const std::string& socket, uint8_t origin, double rps, double acquire_s, MockProvider* provider,
                        WorkerCounters* c, std::atomic<int>* stop) {
    km::Result<std::unique_ptr<km::Pool>> pool = km::Pool::Connect(socket, "p");
    if (!pool.ok()) {
      c->state.store(-1);
      return 2;
    }
    c->state.store(1);
    const uint64_t gap = rps > 0 ? static_cast<uint64_t>(1e9 / rps) : 0;
    uint64_t next = MonoNanos();
    while (stop->load() == 0) {
      if (gap != 0) {
        // The worker's own offered rate (a deliberate pace): never builds
        // a backlog of more than a second.
        const uint64_t now = MonoNanos();
        if (next > now) {
          const timespec at{static_cast<time_t>(next / 1'000'000'000ull), static_cast<long>(next % 1'000'000'000ull)};
          ::clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &at, nullptr);
        } else if (now - next > 1'000'000'000ull) {
          next = now;
        }
        next += gap;
      }
      km::Result<km::Lease> lease = (*pool)->Acquire(acquire_s);
      if (!lease.ok()) {
        (lease.status().code() == km::Code::kNoAvailableKey ? c->timeouts : c->errors).fetch_add(1);
        continue;
      }
      const MockProvider::Reply r = provider->Call(lease->key_name(), origin);
      c->calls.fetch_add(1);
      km::Status st;
      if (r.status == 200) {
        c->ok.fetch_add(1);
        st = lease->Release();
      } else {
        c->refused.fetch_add(1);
        st = lease->MarkRateLimited(static_cast<double>(r.retry_after));
      }
      if (!st.ok() && st.code() != km::Code::kKeyExhausted) c->errors.fetch_add(1);
    }
    c->state.store(2);
    return 0;
  }

  static inline int next_ns_ = 0;
  std::vector<KeyDef> keys_;
  RedisServer redis_;
  MockProvider provider_;
  std::string ns_;
  SharedArray<WorkerCounters> counters_;
  SharedArray<std::atomic<int>> stop_;
  size_t next_worker_ = 0;
  std::vector<Worker> workers_;  // destroyed (killed if still running) before the hosts
  std::vector<std::unique_ptr<Host>> hosts_;
};

// A minimal RESP client on 127.0.0.1:port: one command at a time, every
// read bounded by a 1 s timeout, replies of bulk strings, integers and one
// level of array. No fork (redis-cli would be: a child forked from another
// thread meanwhile would inherit its pipe and keep it open).
class Resp {
 public:
  explicit Resp(uint16_t port) {
    fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    timeval tv{1, 0};
    ::setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    ::setsockopt(fd_, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = htons(port);
    if (::connect(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) Close();
  }
  ~Resp() { Close(); }
  Resp(const Resp&) = delete;
  Resp& operator=(const Resp&) = delete;

  // The reply's items (one for a scalar), or nullopt on an error reply or
  // a broken connection (which then stays closed).
  std::optional<std::vector<std::string>> Call(const std::vector<std::string>& args) {
    if (fd_ < 0) return std::nullopt;
    std::string out = "*" + std::to_string(args.size()) + "\r\n";
    for (const std::string& a : args) out += "$" + std::to_string(a.size()) + "\r\n" + a + "\r\n";
    if (::send(fd_, out.data(), out.size(), MSG_NOSIGNAL) != static_cast<ssize_t>(out.size())) return Fail();
    std::optional<std::string> head = Line();
    if (!head || head->empty()) return Fail();
    std::vector<std::string> items;
    if ((*head)[0] == '*') {
      const long n = std::stol(head->substr(1));
      for (long i = 0; i < n; ++i) {
        std::optional<std::string> item = Item();
        if (!item) return Fail();
        items.push_back(*item);
      }
      return items;
    }
    in_.insert(0, *head + "\r\n");
    std::optional<std::string> item = Item();
    if (!item) return Fail();
    items.push_back(*item);
    return items;
  }

 private:
  std::optional<std::vector<std::string>> Fail() {
    Close();
    return std::nullopt;
  }
  void Close() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }
  std::optional<std::string> Line() {
    for (;;) {
      const size_t eol = in_.find("\r\n");
      if (eol != std::string::npos) {
        std::string line = in_.substr(0, eol);
        in_.erase(0, eol + 2);
        return line;
      }
      char buf[65536];
      const ssize_t n = ::recv(fd_, buf, sizeof(buf), 0);
      if (n <= 0) return std::nullopt;
      in_.append(buf, static_cast<size_t>(n));
    }
  }
  std::optional<std::string> Item() {
    std::optional<std::string> head = Line();
    if (!head || head->empty()) return std::nullopt;
    if ((*head)[0] == ':' || (*head)[0] == '+') return head->substr(1);
    if ((*head)[0] != '$') return std::nullopt;
    const long len = std::stol(head->substr(1));
    if (len < 0) return std::string();
    while (in_.size() < static_cast<size_t>(len) + 2) {
      char buf[65536];
      const ssize_t n = ::recv(fd_, buf, sizeof(buf), 0);
      if (n <= 0) return std::nullopt;
      in_.append(buf, static_cast<size_t>(n));
    }
    std::string v = in_.substr(0, static_cast<size_t>(len));
    in_.erase(0, static_cast<size_t>(len) + 2);
    return v;
  }

  int fd_ = -1;
  std::string in_;
};

// What a host's mesh job reports. The `mesh` op's reply's "mesh" object
// (broker/mesh/mesh_status.h, names in snake_case) when the broker has the
// op; until it does, the same facts from what exists: the mode from the
// job's last mesh_mode log line, the shares from the segment (KeyStatus's
// share fields, through a client attached to the host's broker), the live
// hosts from Redis (its `hosts` zset, lua_scripts.h), a refused key from
// its mesh_key_refused line.
std::optional<json::object> MeshOp(Host& h) {
  if (!h.broker->running()) return std::nullopt;
  RawClient c(h.broker->socket());
  if (!c.connected()) return std::nullopt;
  std::optional<json::object> r = c.Call("mesh", {}, 2);
  if (!r || !r->contains("ok") || !r->at("ok").is_bool() || !r->at("ok").as_bool() || !r->contains("mesh") ||
      !r->at("mesh").is_object()) {
    return std::nullopt;
  }
  return r->at("mesh").as_object();
}

double Number(const json::object& o, const char* field) {
  const json::value* v = o.if_contains(field);
  if (v == nullptr) return -1;
  if (v->is_double()) return v->as_double();
  if (v->is_int64()) return static_cast<double>(v->as_int64());
  if (v->is_uint64()) return static_cast<double>(v->as_uint64());
  return -1;
}

std::optional<json::object> MeshKey(const json::object& mesh, const std::string& key) {
  const json::value* keys = mesh.if_contains("keys");
  if (keys == nullptr || !keys->is_array()) return std::nullopt;
  for (const json::value& k : keys->as_array()) {
    if (k.is_object() && k.as_object().contains("key") && k.as_object().at("key").is_string() &&
        k.as_object().at("key").as_string() == key) {
      return k.as_object();
    }
  }
  return std::nullopt;
}

std::string Mode(Host& h) {
  if (std::optional<json::object> m = MeshOp(h); m && m->contains("mode") && m->at("mode").is_string()) {
    return std::string(m->at("mode").as_string());
  }
  const std::string log = h.broker->Log();
  const size_t at = log.rfind("event=mesh_mode ");
  if (at == std::string::npos) return "share";  // the job starts in share (MeshStatus's default)
  const size_t to = log.find(" to=", at);
  const size_t eol = log.find('\n', at);
  if (to == std::string::npos || (eol != std::string::npos && to > eol)) return "";
  const size_t end = log.find_first_of(" \n", to + 4);
  return log.substr(to + 4, end == std::string::npos ? std::string::npos : end - (to + 4));
}

// Live hosts of the namespace.
double Hosts(Host& h, Mesh& mesh) {
  if (std::optional<json::object> m = MeshOp(h)) return Number(*m, "hosts");
  static const std::string kScript =
      "local t = redis.call('TIME') "
      "return redis.call('ZCOUNT', KEYS[1], '(' .. (t[1] * 1000 + math.floor(t[2] / 1000)), '+inf')";
  Resp redis(mesh.redis().port());
  std::optional<std::vector<std::string>> out = redis.Call({"EVAL", kScript, "1", mesh.ns() + ":hosts"});
  return out && out->size() == 1 ? std::stod(out->front()) : -1;
}

// This host's share of `key` (requests per minute), -1 when not known.
double ShareRpm(Host& h, const std::string& key) {
  if (std::optional<json::object> m = MeshOp(h)) {
    std::optional<json::object> k = MeshKey(*m, key);
    return k ? Number(*k, "share_rpm") : -1;
  }
  if (!h.broker->running()) return -1;
  if (!h.view) {
    km::Result<std::unique_ptr<km::Pool>> p = km::Pool::Connect(h.broker->socket(), "p");
    if (!p.ok()) return -1;
    h.view = std::move(p).value();
  }
  km::Result<km::PoolStatus> st = h.view->GetStatus();
  if (!st.ok()) return -1;
  for (const km::KeyStatus& k : st->keys) {
    if (k.name == key) return k.share_active ? k.share_rpm : -1;
  }
  return -1;
}
double TotalShareRpm(Host& h, const std::vector<KeyDef>& keys) {
  double total = 0;
  for (const KeyDef& k : keys) {
    const double s = ShareRpm(h, k.name);
    if (s < 0) return -1;
    total += s;
  }
  return total;
}

bool Mismatch(Host& h, const std::string& key) {
  if (std::optional<json::object> m = MeshOp(h)) {
    std::optional<json::object> k = MeshKey(*m, key);
    return k && k->contains("mismatch") && k->at("mismatch").is_bool() && k->at("mismatch").as_bool();
  }
  return h.broker->Log().find("event=mesh_key_refused pool=p key=" + key + " ") != std::string::npos;
}

// Other hosts' changes merged into this host's segment; -1 when not reported.
double EventsApplied(Host& h) {
  std::optional<json::object> m = MeshOp(h);
  return m ? Number(*m, "events_applied") : -1;
}

// Every host leased and seeing `hosts` members.
bool WaitLeased(Mesh& mesh, std::vector<Host*> hosts, double timeout = 10) {
  return Eventually(
      [&] {
        for (Host* h : hosts) {
          if (Mode(*h) != "leased" || Hosts(*h, mesh) != static_cast<double>(hosts.size())) return false;
        }
        return true;
      },
      timeout);
}

// The key's state on a host as the segment shows it (the `status` op).
double CooldownRemaining(Host& h, const std::string& key) {
  RawClient c(h.broker->socket());
  if (!c.connected()) return -1;
  std::optional<json::object> r = c.Call("status", {{"pool", "p"}}, 2);
  if (!r || !r->at("ok").as_bool()) return -1;
  for (const json::value& k : r->at("pools").as_array()[0].as_object().at("keys").as_array()) {
    if (k.as_object().at("name").as_string() == key) return Number(k.as_object(), "cooldown_remaining");
  }
  return -1;
}

// Nothing of any secret in Redis: dump it uncompressed and search the bytes.
void CheckNoSecretInRedis(Mesh& mesh) {
  bool ok = false;
  (void)mesh.redis().Cli({"CONFIG", "SET", "rdbcompression", "no"}, &ok);
  BOOST_REQUIRE(ok);
  (void)mesh.redis().Cli({"SAVE"}, &ok);
  BOOST_REQUIRE(ok);
  std::ifstream in(mesh.redis().dir() + "/dump.rdb", std::ios::binary);
  const std::string dump((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  BOOST_REQUIRE(!dump.empty());
  BOOST_CHECK_NE(dump.find(mesh.ns()), std::string::npos);  // the mesh did write its state
  for (const KeyDef& k : mesh.keys()) BOOST_CHECK_EQUAL(dump.find(k.secret), std::string::npos);
}

// Samples the leases in Redis (the data model of broker/mesh/lua_scripts.h:
// P lease:ID, host -> "has_r has_t wants_r wants_t expiry ...") every
// `period` s on a thread of its own, each key atomically with Redis's clock
// (one EVAL), and keeps the worst of (sum of the live leases' request
// rates) / (limit x (1 - headroom)): the pre-accounting invariant, <= 1 at
// every instant.
class LeaseAudit {
 public:
  LeaseAudit(const RedisServer& redis, const std::string& ns, const std::vector<KeyDef>& keys, double period = 0.1)
      : port_(redis.port()) {
    for (const KeyDef& k : keys) lease_keys_.push_back({ns + ":lease:p/" + k.name, k.rpm / 60.0});
    thread_ = std::thread([this, period] {
      while (!stop_.load()) {
        Sample();
        ::usleep(static_cast<useconds_t>(period * 1e6));  // the sampling period, not a settle
      }
    });
  }
  ~LeaseAudit() { Stop(); }
  void Stop() {
    stop_.store(true);
    if (thread_.joinable()) thread_.join();
  }
  double worst() const { return worst_.load(); }
  uint64_t samples() const { return samples_.load(); }  // key samples that held at least one live lease

 private:
  void Sample() {
    static const std::string kScript =
        "local t = redis.call('TIME') local h = redis.call('HGETALL', KEYS[1]) "
        "local out = {t[1], t[2]} for _, v in ipairs(h) do out[#out + 1] = v end return out";
    if (!conn_) conn_ = std::make_unique<Resp>(port_);
    for (const auto& [key, rate] : lease_keys_) {
      std::optional<std::vector<std::string>> lines = conn_->Call({"EVAL", kScript, "1", key});
      if (!lines) {
        conn_.reset();
        return;
      }
      if (lines->size() < 2) continue;
      const double now_ms = std::stod((*lines)[0]) * 1000 + std::stod((*lines)[1]) / 1000;
      double sum = 0;
      bool any = false;
      for (size_t i = 2; i + 1 < lines->size(); i += 2) {
        if ((*lines)[i] == " fp") continue;
        std::istringstream f((*lines)[i + 1]);
        double has_r = 0, has_t = 0, wants_r = 0, wants_t = 0, expiry = 0;
        if (!(f >> has_r >> has_t >> wants_r >> wants_t >> expiry)) continue;
        if (expiry <= now_ms) continue;
        sum += has_r;
        any = true;
      }
      if (!any) continue;
      samples_.fetch_add(1);
      const double ratio = sum / (rate * (1 - kHeadroom));
      double w = worst_.load();
      while (ratio > w && !worst_.compare_exchange_weak(w, ratio)) {
      }
    }
  }

  uint16_t port_;
  std::unique_ptr<Resp> conn_;                              // the sampling thread's
  std::vector<std::pair<std::string, double>> lease_keys_;  // Redis key, the key's rate per second
  std::atomic<bool> stop_{false};
  std::atomic<double> worst_{0};
  std::atomic<uint64_t> samples_{0};
  std::thread thread_;
};

void CheckNoSecretInLog(Host& h) {
  const std::string log = h.broker->Log();
  for (const KeyDef& k : h.keys) BOOST_CHECK_EQUAL(log.find(k.secret), std::string::npos);
}

}  // namespace

// The problem the mesh solves, and proof that the ground truth sees it:
// three isolated brokers, each pacing the keys at their full limit, send
// far beyond it, and the provider refuses a large part.
BOOST_AUTO_TEST_CASE(isolated_brokers_overspend_without_the_mesh) {
  Mesh mesh;
  std::vector<Host*> hosts;
  for (int i = 0; i < 3; ++i) {
    Host& h = mesh.AddHost();
    h.in_mesh = false;
    BOOST_REQUIRE(mesh.Start(h));
    hosts.push_back(&h);
  }
  mesh.Spawn(*hosts[0], 4, 25);
  mesh.Spawn(*hosts[1], 2, 25);
  mesh.Spawn(*hosts[2], 1, 25);
  BOOST_REQUIRE(mesh.WaitWorkersConnected());
  Hold(3.0);
  mesh.StopAllWorkers();
  BOOST_TEST_MESSAGE("isolated: admitted " << mesh.provider().total_admitted() << ", refused "
                                           << mesh.provider().total_refused() << " (" << mesh.RefusedShare() * 100
                                           << " %); overspend " << mesh.WorstOverspend() << "; acquire timeouts "
                                           << mesh.WorkerTotals().timeouts);
  BOOST_CHECK_GT(mesh.RefusedShare(), 0.005);  // beyond what the mesh must achieve
  BOOST_CHECK_GT(mesh.WorstOverspend(), 1);
  BOOST_CHECK_EQUAL(mesh.WorkerTotals().errors, 0u);
}

// Uneven demand from three hosts (4, 2 and 1 workers): the provider refuses
// almost nothing, the mesh serves nearly all of the keys' capacity, nothing
// is sent beyond the limit, and the busy host holds the larger share.
BOOST_AUTO_TEST_CASE(steady_load_from_uneven_hosts) {
  Mesh mesh;
  Host& busy = mesh.AddHost();
  Host& mid = mesh.AddHost();
  Host& idle = mesh.AddHost();
  for (Host* h : {&busy, &mid, &idle}) BOOST_REQUIRE(mesh.Start(*h));
  BOOST_REQUIRE(WaitLeased(mesh, {&busy, &mid, &idle}));
  LeaseAudit audit(mesh.redis(), mesh.ns(), mesh.keys());
  // 20 requests a second per worker: 140 offered against 100 of capacity;
  // the idle host wants less than a third, the others more.
  mesh.Spawn(busy, 4, 20);
  mesh.Spawn(mid, 2, 20);
  mesh.Spawn(idle, 1, 20);
  BOOST_REQUIRE(mesh.WaitWorkersConnected());
  Hold(2.0);  // demand reaches Redis and the shares follow it (2 refreshes, and the demand's average)
  const uint64_t from = MonoNanos();
  Hold(5.0);
  const uint64_t to = MonoNanos();
  // The shares while the load runs.
  for (const KeyDef& k : mesh.keys()) {
    const double b = ShareRpm(busy, k.name), m = ShareRpm(mid, k.name), i = ShareRpm(idle, k.name);
    BOOST_TEST_MESSAGE("share of " << k.name << " rpm: busy " << b << ", mid " << m << ", idle " << i);
    BOOST_CHECK_GT(b, i);
    BOOST_CHECK_GE(i, 0);
    BOOST_CHECK_LE(b + m + i, k.rpm * (1 - kHeadroom) * 1.01);  // pre-accounted (1 %: reads not at one instant)
  }
  mesh.StopAllWorkers();
  audit.Stop();
  BOOST_TEST_MESSAGE("lease audit: " << audit.samples() << " samples, worst sum of leases " << audit.worst()
                                     << " of limit x (1 - headroom)");
  BOOST_CHECK_GT(audit.samples(), 20u);
  BOOST_CHECK_LE(audit.worst(), 1 + 1e-9);

  const double served = static_cast<double>(mesh.AdmittedBetween(from, to)) / (Seconds(to - from) * mesh.Capacity());
  const Mesh::Totals t = mesh.WorkerTotals();
  BOOST_TEST_MESSAGE("served " << served << " of capacity; refused " << mesh.RefusedShare() * 100 << " %; overspend "
                               << mesh.WorstOverspend() << "; acquire timeouts " << t.timeouts);
  BOOST_CHECK_GE(served, 0.9);
  BOOST_CHECK_LE(mesh.RefusedShare(), 0.005);
  BOOST_CHECK_LE(mesh.WorstOverspend(), 1.0);
  BOOST_CHECK_EQUAL(t.errors, 0u);
  BOOST_CHECK_GT(mesh.AdmittedBetween(from, to, busy.index), mesh.AdmittedBetween(from, to, idle.index));
  CheckNoSecretInRedis(mesh);
  for (Host* h : {&busy, &mid, &idle}) CheckNoSecretInLog(*h);
}

// A host's share follows its demand: when the busy host goes idle and the
// idle one turns busy, the share moves within two refreshes, not at the end
// of a lease. From the floor (2 % of the key) the new host's workers queue
// (long acquires, as with a real farm's timeout: their waits show on the
// pool's wait clock while they last), it asks 1.5x, and the whole key once a
// demand sample sees the queue last 0.9 of a period; the idle host gives
// its loan back on the rebalance that follows, as a period without use is a
// fall even on an early refresh. Measured: 1.8-1.9 refreshes at 0.2 s,
// about 1.5 at 1 s (docs/MESH.md, "Demand"). `bound`: in refresh periods;
// at 0.2 s the fixed delays (round trips, the 100 ms retry) weigh more, and
// the sanitizer builds are slower.
namespace {
void CheckShareFollowsADemandShift(double refresh, double bound) {
  Mesh mesh({TwoKeys().front()});
  const std::string key = mesh.keys().front().name;
  Host& a = mesh.AddHost();
  Host& b = mesh.AddHost();
  for (Host* h : {&a, &b}) {
    h->refresh = refresh;
    h->lease = std::max(kLease, 10 * refresh);
  }
  for (Host* h : {&a, &b}) BOOST_REQUIRE(mesh.Start(*h));
  BOOST_REQUIRE(WaitLeased(mesh, {&a, &b}, 10 + 5 * refresh));
  const double cap = kRpm * (1 - kHeadroom);
  mesh.Spawn(a, 2, 0);
  BOOST_REQUIRE(mesh.WaitWorkersConnected());
  BOOST_REQUIRE(Eventually([&] { return ShareRpm(a, key) > 0.9 * cap; }, 5 + 5 * refresh));
  mesh.StopWorkers(a.index);
  const uint64_t shifted = MonoNanos();
  mesh.Spawn(b, 2, 0, /*acquire_s=*/5);
  BOOST_REQUIRE(Eventually([&] { return ShareRpm(b, key) > 0.9 * cap; }, 20 * refresh));
  const double took = Seconds(MonoNanos() - shifted);
  BOOST_TEST_MESSAGE("the share moved " << took << " s after the shift: " << took / refresh << " refreshes of "
                                        << refresh << " s");
  BOOST_CHECK_LE(took, bound * refresh);
  mesh.StopAllWorkers();
}
}  // namespace

// Well before a lease (kLease) would have freed it.
BOOST_AUTO_TEST_CASE(the_share_follows_a_demand_shift) { CheckShareFollowsADemandShift(kRefresh, 8); }

// Within two refreshes and a quarter (a sample): 2.96 before the samples.
BOOST_AUTO_TEST_CASE(the_share_follows_a_demand_shift_at_the_default_refresh) {
  CheckShareFollowsADemandShift(1.0, 2.25);
}

// A 429 with Retry-After on one host cools the key on the other host too,
// within milliseconds; the other host sends nothing on it until it ends.
BOOST_AUTO_TEST_CASE(cooldown_on_one_host_reaches_the_other) {
  Mesh mesh;
  Host& a = mesh.AddHost();
  Host& b = mesh.AddHost();
  BOOST_REQUIRE(mesh.Start(a));
  BOOST_REQUIRE(mesh.Start(b));
  BOOST_REQUIRE(WaitLeased(mesh, {&a, &b}));
  mesh.Spawn(a, 1, 20);
  mesh.Spawn(b, 1, 20);
  BOOST_REQUIRE(mesh.WaitWorkersConnected());
  MockProvider& provider = mesh.provider();
  BOOST_REQUIRE(Eventually([&] { return provider.admitted("k0") > 10; }, 5));

  constexpr uint32_t kRetryAfter = 3;
  BOOST_REQUIRE(provider.InjectRefusals("k0", 1, kRetryAfter));
  BOOST_REQUIRE(Eventually([&] { return provider.refusal_injected_ns("k0") != 0; }, 5));
  const uint64_t injected = provider.refusal_injected_ns("k0");
  int origin = -1;
  for (const MockProvider::CallRecord& c : provider.Calls("k0")) {
    if (c.mono_ns == injected && !c.admitted) origin = c.origin;
  }
  BOOST_REQUIRE(origin == a.index || origin == b.index);
  Host& other = origin == a.index ? b : a;
  BOOST_REQUIRE(Eventually([&] { return CooldownRemaining(other, "k0") > 0; }, 2, 0.001));
  const uint64_t seen = MonoNanos();
  const double delay = Seconds(seen - injected);
  BOOST_TEST_MESSAGE("cooldown propagation from h" << origin << " to " << other.name << ": " << delay * 1000
                                                   << " ms (upper bound: includes the status poll)");
  BOOST_CHECK_LT(delay, 0.5);
  BOOST_CHECK_GT(CooldownRemaining(other, "k0"), kRetryAfter - 1.0);
  // While it cools, nobody sends on k0 (a call in flight when the cooldown
  // arrived may still land just after), and k1 keeps serving.
  const uint64_t quiet_from = seen + 50'000'000ull;
  const uint64_t quiet_to = injected + static_cast<uint64_t>((kRetryAfter - 0.3) * 1e9);
  if (quiet_to > MonoNanos()) Hold(Seconds(quiet_to - MonoNanos()));
  BOOST_CHECK_EQUAL(provider.SentBetween("k0", quiet_from, quiet_to), 0u);
  BOOST_CHECK_GT(provider.AdmittedBetween("k1", quiet_from, quiet_to, other.index), 0u);
  // Afterwards both hosts use k0 again.
  BOOST_CHECK(Eventually(
      [&] {
        return provider.AdmittedBetween("k0", injected + kRetryAfter * 1'000'000'000ull, UINT64_MAX, other.index) > 0;
      },
      3));
  if (EventsApplied(other) >= 0) BOOST_CHECK_GE(EventsApplied(other), 1);
  mesh.StopAllWorkers();
  BOOST_CHECK_LE(mesh.WorstOverspend(), 1.0);
}

// The frozen-Redis scenarios' start: three hosts leased, with 2, 1 and 1
// workers offering 30 requests/s each, served for 1.5 s.
void StartLoaded(Mesh& mesh, Host& h0, Host& h1, Host& h2) {
  for (Host* h : {&h0, &h1, &h2}) BOOST_REQUIRE(mesh.Start(*h));
  BOOST_REQUIRE(WaitLeased(mesh, {&h0, &h1, &h2}));
  mesh.Spawn(h0, 2, 30);
  mesh.Spawn(h1, 1, 30);
  mesh.Spawn(h2, 1, 30);
  BOOST_REQUIRE(mesh.WaitWorkersConnected());
  Hold(1.5);
}

// Redis frozen for less than the lease: every host keeps its lease, nothing
// is sent beyond the limit and the workers keep being served.
BOOST_AUTO_TEST_CASE(redis_frozen_shorter_than_the_lease) {
  Mesh mesh;
  Host& h0 = mesh.AddHost();
  Host& h1 = mesh.AddHost();
  Host& h2 = mesh.AddHost();
  StartLoaded(mesh, h0, h1, h2);
  std::vector<size_t> ups;
  for (Host* h : {&h0, &h1, &h2}) ups.push_back(Count(h->broker->Log(), "event=mesh_redis state=up"));
  const uint64_t frozen = MonoNanos();
  mesh.redis().Pause();
  Hold(kLease * 0.6);
  mesh.redis().Resume();
  const uint64_t thawed = MonoNanos();
  // The hosts noticed (one line each) and come back.
  for (size_t i = 0; Host * h : {&h0, &h1, &h2}) {
    BOOST_CHECK(h->broker->WaitLog("event=mesh_redis state=down", 2));
    BOOST_CHECK(h->broker->WaitLog("event=mesh_redis state=up", 5, static_cast<int>(ups[i++] + 1)));
  }
  BOOST_CHECK(WaitLeased(mesh, {&h0, &h1, &h2}, 3));
  Hold(1.0);
  mesh.StopAllWorkers();
  const double served =
      static_cast<double>(mesh.AdmittedBetween(frozen, thawed)) / (Seconds(thawed - frozen) * mesh.Capacity());
  BOOST_TEST_MESSAGE("served while frozen " << served << " of capacity; overspend " << mesh.WorstOverspend()
                                            << "; refused " << mesh.RefusedShare() * 100 << " %");
  BOOST_CHECK_GE(served, 0.8);
  BOOST_CHECK_LE(mesh.WorstOverspend(), 1.0);
  BOOST_CHECK_LE(mesh.RefusedShare(), 0.005);
  for (Host* h : {&h0, &h1, &h2}) {
    const std::string log = h->broker->Log();
    BOOST_CHECK_EQUAL(Count(log, "event=mesh_mode from=leased to=share"), 0u);
    BOOST_CHECK_EQUAL(Count(log, "event=mesh_redis state=down"), 1u);  // one line per change, not per attempt
  }
}

// Redis frozen for longer than the lease: every host falls back to `share`
// (1/N of each key's rate), keeps serving, overspends at most what hosts
// leaving their leases at slightly different times can add (one refresh of
// the rate), and is back to leased once Redis answers.
BOOST_AUTO_TEST_CASE(redis_frozen_longer_than_the_lease) {
  Mesh mesh;
  Host& h0 = mesh.AddHost();
  Host& h1 = mesh.AddHost();
  Host& h2 = mesh.AddHost();
  StartLoaded(mesh, h0, h1, h2);
  const uint64_t frozen = MonoNanos();
  mesh.redis().Pause();
  for (Host* h : {&h0, &h1, &h2}) BOOST_CHECK(h->broker->WaitLog("to=share", kLease + 2));
  const uint64_t shared = MonoNanos();
  Hold(1.5);
  for (Host* h : {&h0, &h1, &h2}) {
    // 1/N of every key's rate, N the hosts last seen.
    for (const KeyDef& k : mesh.keys()) BOOST_CHECK_CLOSE(ShareRpm(*h, k.name), k.rpm * (1 - kHeadroom) / 3, 5);
  }
  mesh.redis().Resume();
  const uint64_t thawed = MonoNanos();
  BOOST_CHECK(WaitLeased(mesh, {&h0, &h1, &h2}, 5));
  Hold(0.5);
  mesh.StopAllWorkers();
  const double served =
      static_cast<double>(mesh.AdmittedBetween(shared, thawed)) / (Seconds(thawed - shared) * mesh.Capacity());
  double bound = 2;
  for (const KeyDef& k : mesh.keys()) bound = std::max(bound, k.rpm / 60.0 * (1 - kHeadroom) * kRefresh + 2);
  BOOST_TEST_MESSAGE("outage " << Seconds(thawed - frozen) << " s; served in share mode " << served
                               << " of capacity; overspend " << mesh.WorstOverspend() << " (bound " << bound << ")");
  BOOST_CHECK_GE(served, 0.7);
  BOOST_CHECK_LE(mesh.WorstOverspend(), bound);
}

// Redis killed and restarted empty: the hosts notice the lost state and
// learn for one lease (grants only echo what they held; a newcomer gets 0),
// so no share is granted twice, then lease as before.
BOOST_AUTO_TEST_CASE(redis_restarted_empty_learns_before_granting) {
  Mesh mesh;
  Host& h0 = mesh.AddHost();
  Host& h1 = mesh.AddHost();
  BOOST_REQUIRE(mesh.Start(h0));
  BOOST_REQUIRE(mesh.Start(h1));
  BOOST_REQUIRE(WaitLeased(mesh, {&h0, &h1}));
  mesh.Spawn(h0, 2, 40);
  mesh.Spawn(h1, 1, 40);
  BOOST_REQUIRE(mesh.WaitWorkersConnected());
  Hold(1.5);
  const double h0_before = TotalShareRpm(h0, mesh.keys());
  const double h1_before = TotalShareRpm(h1, mesh.keys());
  BOOST_REQUIRE(mesh.redis().Restart(/*wipe=*/true));
  const uint64_t restarted = MonoNanos();
  for (Host* h : {&h0, &h1}) BOOST_CHECK(h->broker->WaitLog("to=learning", 3));
  // A newcomer while the mesh learns gets nothing.
  Host& late = mesh.AddHost();
  BOOST_REQUIRE(mesh.Start(late));
  mesh.Spawn(late, 1, 40);
  BOOST_REQUIRE(mesh.WaitWorkersConnected());
  const double learning_left = kLease - Seconds(MonoNanos() - restarted);
  if (learning_left > 0.5 && Mode(h0) == "learning") {
    BOOST_CHECK_EQUAL(TotalShareRpm(late, mesh.keys()), 0);
    BOOST_CHECK_LE(TotalShareRpm(h0, mesh.keys()), h0_before * 1.01);
    BOOST_CHECK_LE(TotalShareRpm(h1, mesh.keys()), h1_before * 1.01);
  }
  BOOST_CHECK(WaitLeased(mesh, {&h0, &h1, &late}, kLease + 3));
  BOOST_CHECK(Eventually([&] { return TotalShareRpm(late, mesh.keys()) > 0; }, 2));
  Hold(1.0);
  mesh.StopAllWorkers();
  BOOST_TEST_MESSAGE("overspend " << mesh.WorstOverspend() << "; refused " << mesh.RefusedShare() * 100 << " %");
  BOOST_CHECK_LE(mesh.WorstOverspend(), 1.0);
  BOOST_CHECK_LE(mesh.RefusedShare(), 0.005);
}

// A host SIGKILLed with its workers: its share stays reserved until its
// lease runs out (no double grant), then goes to the host still there.
BOOST_AUTO_TEST_CASE(killed_broker_share_returns_after_the_lease) {
  Mesh mesh;
  Host& dies = mesh.AddHost();
  Host& stays = mesh.AddHost();
  BOOST_REQUIRE(mesh.Start(dies));
  BOOST_REQUIRE(mesh.Start(stays));
  BOOST_REQUIRE(WaitLeased(mesh, {&dies, &stays}));
  LeaseAudit audit(mesh.redis(), mesh.ns(), mesh.keys());
  mesh.Spawn(dies, 2, 40);
  mesh.Spawn(stays, 2, 60);  // more than the whole capacity on its own
  BOOST_REQUIRE(mesh.WaitWorkersConnected());
  Hold(1.5);
  const double full = mesh.Capacity() * 60 * (1 - kHeadroom);
  const double before = TotalShareRpm(stays, mesh.keys());
  BOOST_REQUIRE_GT(before, 0);
  BOOST_REQUIRE_LT(before, 0.8 * full);
  mesh.KillWorkers(dies.index);
  dies.broker->Kill();
  const uint64_t killed = MonoNanos();
  BOOST_REQUIRE(Eventually([&] { return TotalShareRpm(stays, mesh.keys()) > 0.9 * full; }, kLease + 4));
  const double returned = Seconds(MonoNanos() - killed);
  BOOST_TEST_MESSAGE("share back " << returned << " s after the kill (lease " << kLease << " s)");
  BOOST_CHECK_GE(returned, kLease - kRefresh - 0.1);
  BOOST_CHECK_LE(returned, kLease + 4 * kRefresh + 0.5);
  Hold(1.0);
  mesh.StopAllWorkers();
  audit.Stop();
  BOOST_CHECK_LE(audit.worst(), 1 + 1e-9);  // the dead host's lease counted until it expired
  BOOST_CHECK_LE(mesh.WorstOverspend(), 1.0);
}

// A host that stops cleanly gives its share back at once (not after the lease).
BOOST_AUTO_TEST_CASE(clean_stop_returns_the_share_at_once) {
  Mesh mesh;
  Host& leaves = mesh.AddHost();
  Host& stays = mesh.AddHost();
  // A longer lease, so that "at once" and "after the lease" are far apart
  // (a fresh Redis learns for one lease before its first grants).
  constexpr double kLongLease = 5.0;
  leaves.lease = stays.lease = kLongLease;
  BOOST_REQUIRE(mesh.Start(leaves));
  BOOST_REQUIRE(mesh.Start(stays));
  BOOST_REQUIRE(WaitLeased(mesh, {&leaves, &stays}, kLongLease + 5));
  mesh.Spawn(leaves, 2, 40);
  mesh.Spawn(stays, 2, 60);
  BOOST_REQUIRE(mesh.WaitWorkersConnected());
  Hold(1.5);
  const double full = mesh.Capacity() * 60 * (1 - kHeadroom);
  BOOST_REQUIRE_LT(TotalShareRpm(stays, mesh.keys()), 0.8 * full);
  mesh.StopWorkers(leaves.index);
  BOOST_CHECK_EQUAL(leaves.broker->Stop(), 0);
  const uint64_t stopped = MonoNanos();
  BOOST_REQUIRE(Eventually([&] { return TotalShareRpm(stays, mesh.keys()) > 0.9 * full; }, 3));
  const double returned = Seconds(MonoNanos() - stopped);
  BOOST_TEST_MESSAGE("share back " << returned << " s after the clean stop (lease " << kLongLease << " s)");
  BOOST_CHECK_LE(returned, 3 * kRefresh + 0.5);
  BOOST_CHECK_EQUAL(Hosts(stays, mesh), 1);
  mesh.StopAllWorkers();
  // The handover's bound: in any window each host's smooth pacing sends at
  // most its rate's worth plus one request, so the two hosts together may
  // be one request over the provider's burst at the moment the share moves
  // (measured 1.16 once in 5 runs; below 1 otherwise).
  BOOST_CHECK_LE(mesh.WorstOverspend(), 2.0);
}

// One host cut off from Redis (its FaultProxy blackholes) while the others
// are not: it keeps its lease, then falls back to `share`; the others stay
// leased and take over its share once its lease expired. Overspend stays
// within the asymmetric-partition bound m·f·(D − L).
BOOST_AUTO_TEST_CASE(one_host_cut_off_while_the_others_are_not) {
  Mesh mesh;
  Host& h0 = mesh.AddHost();
  Host& h1 = mesh.AddHost();
  Host& cut = mesh.AddHost(/*proxied=*/true);
  for (Host* h : {&h0, &h1, &cut}) BOOST_REQUIRE(mesh.Start(*h));
  BOOST_REQUIRE(WaitLeased(mesh, {&h0, &h1, &cut}));
  for (Host* h : {&h0, &h1, &cut}) mesh.Spawn(*h, 1, 40);
  BOOST_REQUIRE(mesh.WaitWorkersConnected());
  Hold(1.5);
  const size_t shares_before = Count(h0.broker->Log(), "to=share") + Count(h1.broker->Log(), "to=share");
  constexpr double kOutage = 2 * kLease;
  const uint64_t cut_at = MonoNanos();
  BOOST_REQUIRE(cut.proxy->Blackhole());
  BOOST_CHECK(cut.broker->WaitLog("to=share", kLease + 2));
  // The connected hosts see it gone once its lease expired.
  BOOST_CHECK(Eventually([&] { return Hosts(h0, mesh) == 2; }, kLease + 2));
  Hold(std::max(0.0, kOutage - Seconds(MonoNanos() - cut_at)));
  const uint64_t healed = MonoNanos();
  BOOST_REQUIRE(cut.proxy->Pass());
  BOOST_CHECK(WaitLeased(mesh, {&h0, &h1, &cut}, 5));
  Hold(0.5);
  mesh.StopAllWorkers();
  BOOST_CHECK_GT(mesh.AdmittedBetween(cut_at, healed, cut.index), 0u);  // the cut-off host kept serving
  BOOST_CHECK_EQUAL(Count(h0.broker->Log(), "to=share") + Count(h1.broker->Log(), "to=share"), shares_before);
  double bound = 2;
  const double outage = Seconds(healed - cut_at);
  for (const KeyDef& k : mesh.keys()) {
    const double f = k.rpm / 60.0 * (1 - kHeadroom) / 3;
    bound = std::max(bound, 1 * f * std::max(0.0, outage - kLease) + k.rpm / 60.0 * (1 - kHeadroom) * kRefresh + 2);
  }
  BOOST_TEST_MESSAGE("partition " << outage << " s; overspend " << mesh.WorstOverspend() << " (bound " << bound << ")");
  BOOST_CHECK_LE(mesh.WorstOverspend(), bound);
}

// A host whose answers from Redis are lost (its requests reach Redis and
// are acted on; the replies never come back, as with a timeout or a reset
// after the script ran): it keeps pacing at its whole lease, and Redis goes
// on counting what it paces at, so a host that turns busy meanwhile is
// granted only what is left. Had Redis recorded the smaller grant of a
// reply that was lost, both hosts would pace the same share.
BOOST_AUTO_TEST_CASE(lost_replies_grant_nothing_twice) {
  Mesh mesh({TwoKeys().front()});
  const std::string key = mesh.keys().front().name;
  Host& lossy = mesh.AddHost(/*proxied=*/true);
  Host& other = mesh.AddHost();
  for (Host* h : {&lossy, &other}) BOOST_REQUIRE(mesh.Start(*h));
  BOOST_REQUIRE(WaitLeased(mesh, {&lossy, &other}));
  const double cap = kRpm * (1 - kHeadroom);
  mesh.Spawn(lossy, 2, 0);  // busy, the other host idle: it holds most of the key
  BOOST_REQUIRE(mesh.WaitWorkersConnected());
  BOOST_REQUIRE(Eventually([&] { return ShareRpm(lossy, key) > 0.8 * cap; }, 5));
  auto failures = [&] {
    std::optional<json::object> m = MeshOp(lossy);
    return m ? Number(*m, "refresh_failures") : -1;
  };
  const double failed_before = failures();
  BOOST_REQUIRE_GE(failed_before, 0);
  BOOST_REQUIRE(lossy.proxy->DropReplies());
  // One request acted on and unanswered: from here lossy's share is frozen.
  BOOST_REQUIRE(Eventually([&] { return failures() > failed_before; }, 3));
  const double held = ShareRpm(lossy, key);
  BOOST_REQUIRE_GT(held, 0.8 * cap);
  const uint64_t busy = MonoNanos();
  mesh.Spawn(other, 2, 0);  // its fair part is now half the key; lossy still paces at `held`
  BOOST_REQUIRE(mesh.WaitWorkersConnected());
  // Sampled until lossy's lease ends on its side (then it follows `outage`).
  double worst = 0;
  size_t samples = 0;
  while (Mode(lossy) == "leased" && Seconds(MonoNanos() - busy) < kLease + 2) {
    const double a = ShareRpm(lossy, key);
    const double b = ShareRpm(other, key);
    if (a >= 0 && b >= 0) {
      BOOST_CHECK_EQUAL(a, held);  // the whole lease, kept
      worst = std::max(worst, a + b);
      ++samples;
    }
    ::usleep(50'000);  // the sampling period, not a settle
  }
  const uint64_t lease_ended = MonoNanos();
  BOOST_TEST_MESSAGE("lossy held " << held << " rpm for " << Seconds(lease_ended - busy) << " s; worst sum " << worst
                                   << " of " << cap << " over " << samples << " samples; "
                                   << lossy.proxy->bytes_dropped() << " bytes of replies dropped");
  BOOST_CHECK_GE(samples, 5u);
  BOOST_CHECK_LE(worst, cap * (1 + 1e-9));
  BOOST_CHECK_GT(lossy.proxy->bytes_dropped(), 0u);
  // The ground truth: the provider saw nothing beyond the key's limit.
  BOOST_CHECK_LE(mesh.WorstOverspend(busy, lease_ended), 1.0);
  // Healed: lossy's next answered request reports what it paces at, and
  // the share moves to the other host within a few refreshes.
  BOOST_REQUIRE(lossy.proxy->Pass());
  BOOST_CHECK(Eventually([&] { return ShareRpm(other, key) > 0.4 * cap; }, 10 * kRefresh + 2));
  mesh.StopAllWorkers();
  BOOST_CHECK_LE(mesh.WorstOverspend(), 1.0);
}

// A broker whose Redis is not there starts, serves its own host in the
// outage mode, and joins the mesh when Redis appears.
BOOST_AUTO_TEST_CASE(broker_starts_and_serves_with_redis_absent) {
  Mesh mesh;
  Host& h = mesh.AddHost(/*proxied=*/true);
  BOOST_REQUIRE(h.proxy->Reset());  // connection refused, as with no redis-server
  const double t0 = NowSeconds();
  BOOST_REQUIRE(mesh.Start(h));
  BOOST_CHECK_LT(NowSeconds() - t0, 3.0);
  BOOST_CHECK(h.broker->WaitLog("event=mesh_redis state=down", 3));
  BOOST_CHECK_EQUAL(Mode(h), "share");
  mesh.Spawn(h, 1, 20);
  BOOST_REQUIRE(mesh.WaitWorkersConnected());
  BOOST_CHECK(Eventually([&] { return mesh.provider().total_admitted() >= 10; }, 5));
  BOOST_REQUIRE(h.proxy->Pass());
  BOOST_CHECK(h.broker->WaitLog("event=mesh_redis state=up", 5));
  BOOST_CHECK(WaitLeased(mesh, {&h}, 5));
  mesh.StopAllWorkers();
  BOOST_CHECK_EQUAL(mesh.WorkerTotals().errors, 0u);
}

// The same pool/key name with another secret on a second host is refused
// on that host with a clear error, never by printing either secret; the
// key with the same secret is shared as usual.
BOOST_AUTO_TEST_CASE(key_with_a_different_secret_is_refused) {
  Mesh mesh;
  Host& h0 = mesh.AddHost();
  Host& h1 = mesh.AddHost();
  h1.keys[0].secret = "sk-test-mesh-cccccccc2222";
  BOOST_REQUIRE(mesh.Start(h0));
  BOOST_REQUIRE(WaitLeased(mesh, {&h0}));
  BOOST_REQUIRE(mesh.Start(h1));
  BOOST_CHECK(h1.broker->WaitLog("event=mesh_key_refused pool=p key=k0", 5));
  BOOST_CHECK(WaitLeased(mesh, {&h0, &h1}));
  BOOST_CHECK(Mismatch(h1, "k0"));
  BOOST_CHECK(!Mismatch(h1, "k1"));
  BOOST_CHECK(!Mismatch(h0, "k0"));
  BOOST_CHECK_EQUAL(ShareRpm(h1, "k0"), 0);
  // h1's workers get only the shared key.
  mesh.Spawn(h1, 1, 20);
  BOOST_REQUIRE(mesh.WaitWorkersConnected());
  BOOST_CHECK(Eventually([&] { return ShareRpm(h1, "k1") > 0; }, 3));
  BOOST_CHECK(Eventually([&] { return mesh.provider().AdmittedBetween("k1", 0, UINT64_MAX, h1.index) >= 10; }, 5));
  mesh.StopAllWorkers();
  BOOST_CHECK_EQUAL(mesh.provider().SentBetween("k0", 0, UINT64_MAX, h1.index), 0u);
  CheckNoSecretInLog(h0);
  CheckNoSecretInLog(h1);
}
