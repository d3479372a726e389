// Operability tests: keymeshctl against the real keymesh-broker binary, with
// forked worker processes (keymesh::Pool::Connect) that must see each
// command's effect; the metrics exposition (strictly parsed) and the metrics
// file; log levels; and a scan of every log and output for the secrets.
//
// Every test runs its broker in a private directory (BrokerProcess), which
// removes the directory and the broker's segment even when a check fails.
#define BOOST_TEST_MODULE ops_keymeshctl_test
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include <boost/json.hpp>
#include <boost/test/unit_test.hpp>

#include "broker/metrics.h"
#include "client/keymeshctl/table.h"
#include "keymesh/pool.h"
#include "ops/exposition_check.h"
#include "shm/segment.h"
#include "support/broker_harness.h"
#include "support/redis_server.h"

namespace {

namespace json = boost::json;
using keymesh::testing::BrokerProcess;
using keymesh::testing::Exposition;
using keymesh::testing::NowSeconds;
using keymesh::testing::ParseExposition;
using keymesh::testing::SpawnProgram;
using keymesh::testing::WaitChild;

// Distinctive secrets: none of them may appear in any log or output beyond
// its last 4 characters.
const std::string kSecretA = "sk-opsA-inline-Q7vX2mZ9pL4kT8wR";
const std::string kSecretB = "sk-opsB-envvar-H3nJ6yB1cF5dS0gE";
const std::string kSecretC = "sk-opsC-file-U2oI9aK4qW7eY1tZ";
const std::string kSecretD = "sk-opsD-added-M8bN3vC6xZ1lK5jH";
const std::string kSecretE = "sk-opsE-added-P0oI4uY7tR2eW9qA";

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void WriteFile(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
}

struct CtlResult {
  int code = -1;
  std::string out;
  std::string err;
};

// Everything keymeshctl printed, for the secret scan.
std::string g_all_output;

// Runs keymeshctl (stdout and stderr to files in `dir`) and waits for it.
CtlResult Ctl(const std::string& dir, const std::vector<std::string>& args) {
  static int counter = 0;
  const std::string base = dir + "/ctl-" + std::to_string(++counter);
  std::vector<std::string> all = {KEYMESHCTL_BIN};
  all.insert(all.end(), args.begin(), args.end());
  const int out = ::open((base + ".out").c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  const int err = ::open((base + ".err").c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  const pid_t pid = SpawnProgram(all, out, err);
  ::close(out);
  ::close(err);
  CtlResult r;
  r.code = pid > 0 ? WaitChild(pid) : -1;
  r.out = ReadFile(base + ".out");
  r.err = ReadFile(base + ".err");
  g_all_output += r.out + r.err;
  return r;
}

CtlResult Ctl(const BrokerProcess& b, std::vector<std::string> args) {
  args.insert(args.begin(), {"--socket", b.socket()});
  return Ctl(b.dir(), args);
}

// Runs `fn` in a forked worker process attached with Pool::Connect and
// returns what it wrote (or "connect: <error>").
std::string InWorker(const std::string& socket, const std::string& pool_name,
                     const std::function<std::string(keymesh::Pool&)>& fn) {
  int fds[2];
  BOOST_REQUIRE(::pipe(fds) == 0);
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::close(fds[0]);
    std::string out;
    keymesh::Result<std::unique_ptr<keymesh::Pool>> pool = keymesh::Pool::Connect(socket, pool_name);
    if (!pool.ok()) {
      out = "connect: " + pool.status().message();
    } else {
      out = fn(**pool);
    }
    if (pool.ok()) pool->reset();  // close the pool before reporting
    (void)!::write(fds[1], out.data(), out.size());
    _exit(0);
  }
  ::close(fds[1]);
  std::string out;
  const double deadline = NowSeconds() + 30;
  char buf[4096];
  for (;;) {
    pollfd p{fds[0], POLLIN, 0};
    const int left = static_cast<int>((deadline - NowSeconds()) * 1000);
    if (left <= 0 || ::poll(&p, 1, left) <= 0) {
      ::kill(pid, SIGKILL);
      break;
    }
    const ssize_t n = ::read(fds[0], buf, sizeof(buf));
    if (n <= 0) break;
    out.append(buf, static_cast<size_t>(n));
  }
  ::close(fds[0]);
  BOOST_CHECK_EQUAL(WaitChild(pid), 0);
  return out;
}

// The set of key names a worker gets over `n` acquire/release rounds
// ("none" when an attempt finds no key).
// (Acquire waits: keys with an rpm limit are paced, so back-to-back tries
// may find the budget empty for a moment.)
std::string KeysSeen(const BrokerProcess& b, const std::string& pool, int n = 12) {
  return InWorker(b.socket(), pool, [n](keymesh::Pool& p) {
    std::set<std::string> seen;
    for (int i = 0; i < n; ++i) {
      keymesh::Result<keymesh::Lease> lease = p.Acquire(5.0);
      if (!lease.ok()) {
        seen.insert("none");
        continue;
      }
      seen.insert(lease->key_name());
      (void)lease->Release(0.001);
    }
    std::string out;
    for (const std::string& s : seen) out += (out.empty() ? "" : ",") + s;
    return out;
  });
}

json::array StatusJson(const BrokerProcess& b) {
  CtlResult r = Ctl(b, {"status", "--json"});
  BOOST_REQUIRE_MESSAGE(r.code == 0, r.err);
  boost::system::error_code ec;
  json::value v = json::parse(r.out, ec);
  BOOST_REQUIRE_MESSAGE(!ec, "status --json is not JSON: " + r.out);
  BOOST_REQUIRE(v.is_array());
  return v.get_array();
}

const json::object* FindKey(const json::array& pools, const std::string& pool, const std::string& key) {
  for (const json::value& p : pools) {
    if (p.at("name").as_string() != pool) continue;
    for (const json::value& k : p.at("keys").as_array()) {
      if (k.at("name").as_string() == key) return &k.as_object();
    }
  }
  return nullptr;
}

std::string KeyState(const BrokerProcess& b, const std::string& pool, const std::string& key) {
  json::array pools = StatusJson(b);
  const json::object* k = FindKey(pools, pool, key);
  return k == nullptr ? "absent" : std::string(k->at("state").as_string());
}

Exposition ScrapeMetrics(const BrokerProcess& b) {
  CtlResult r = Ctl(b, {"metrics"});
  BOOST_REQUIRE_MESSAGE(r.code == 0, r.err);
  Exposition e;
  std::string error;
  BOOST_REQUIRE_MESSAGE(ParseExposition(r.out, &e, &error), error + "\n" + r.out);
  return e;
}

// Fails the test if `text` holds more of a secret than its last 4 chars.
void CheckNoSecret(const std::string& what, const std::string& text) {
  for (const std::string& s : {kSecretA, kSecretB, kSecretC, kSecretD, kSecretE}) {
    BOOST_CHECK_MESSAGE(text.find(s.substr(s.size() - 8)) == std::string::npos,
                        what + " leaks the tail of " + s.substr(0, 7));
    BOOST_CHECK_MESSAGE(text.find(s.substr(0, 12)) == std::string::npos, what + " leaks the head of " + s.substr(0, 7));
  }
}

struct Env {
  Env() {
    ::setenv("KM_OPS_SECRET_B", kSecretB.c_str(), 1);
    ::setenv("KM_OPS_SECRET_D", kSecretD.c_str(), 1);
    ::unsetenv("KEYMESH_SOCKET");
  }
};
BOOST_GLOBAL_FIXTURE(Env);

}  // namespace

BOOST_AUTO_TEST_CASE(exposition_checker_rejects_malformed_text) {
  Exposition e;
  std::string err;
  const std::string ok =
      "# HELP a_total A.\n# TYPE a_total counter\na_total{pool=\"p\\\"q\\\\r\\n\"} 3\n"
      "# TYPE h histogram\nh_bucket{le=\"0.5\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 0.7\nh_count 2\n";
  BOOST_CHECK_MESSAGE(ParseExposition(ok, &e, &err), err);
  BOOST_CHECK_EQUAL(e.Get("a_total", {{"pool", "p\"q\\r\n"}}), 3);
  for (const std::string& bad : {
           std::string("a_total 1\n"),                                                       // no TYPE
           std::string("# TYPE a_total counter\na_total 1"),                                 // no final newline
           std::string("# TYPE a counter\na 1\n"),                                           // counter without _total
           std::string("# TYPE a_total counter\na_total{p=\"x\\t\"} 1\n"),                   // bad escape
           std::string("# TYPE a_total counter\na_total{1p=\"x\"} 1\n"),                     // bad label name
           std::string("# TYPE a_total counter\na_total{p=\"x\"} 1\na_total{p=\"x\"} 2\n"),  // duplicate
           std::string("# TYPE a_total counter\na_total one\n"),                             // value
           std::string("# TYPE g gauge\n# TYPE a_total counter\ng 1\na_total 1\ng{x=\"1\"} 2\n"),  // interleaved
           std::string("# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"0.5\"} 2\nh_bucket{le=\"+Inf\"} "
                       "2\nh_sum 1\nh_count 2\n"),
           std::string("# TYPE h histogram\nh_bucket{le=\"0.5\"} 3\nh_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 2\n"),
           std::string("# TYPE h histogram\nh_bucket{le=\"0.5\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 3\n"),
           std::string("# TYPE h histogram\nh_bucket{le=\"0.5\"} 1\nh_sum 1\nh_count 1\n"),
       }) {
    BOOST_CHECK_MESSAGE(!ParseExposition(bad, &e, &err), "accepted: " + bad);
  }
}

BOOST_AUTO_TEST_CASE(render_metrics_escapes_and_accumulates_the_histogram) {
  keymesh::PoolStatus p;
  p.name = "we\"ird\\pool";
  p.acquire_wait.counts[0] = 2;
  p.acquire_wait.counts[3] = 1;
  p.acquire_wait.counts[keymesh::kWaitBuckets - 1] = 4;
  p.acquire_wait.count = 7;
  p.acquire_wait.sum = 123.5;
  keymesh::KeyStatus k;
  k.name = "k1";
  k.rpm = 60;
  k.requests_available = 1;
  k.circuit = keymesh::CircuitState::kRevoked;
  p.keys.push_back(k);
  const std::string text = keymesh::broker::RenderMetrics({p});
  Exposition e;
  std::string err;
  BOOST_REQUIRE_MESSAGE(ParseExposition(text, &e, &err), err + "\n" + text);
  BOOST_CHECK_EQUAL(e.Get("keymesh_acquire_wait_seconds_count", {{"pool", p.name}}), 7);
  BOOST_CHECK_EQUAL(e.Get("keymesh_acquire_wait_seconds_bucket", {{"pool", p.name}, {"le", "0.0001"}}), 2);
  BOOST_CHECK_EQUAL(e.Get("keymesh_acquire_wait_seconds_bucket", {{"pool", p.name}, {"le", "0.005"}}), 3);
  BOOST_CHECK_EQUAL(e.Get("keymesh_acquire_wait_seconds_bucket", {{"pool", p.name}, {"le", "+Inf"}}), 7);
  BOOST_CHECK_EQUAL(e.Get("keymesh_key_circuit_state", {{"pool", p.name}, {"key", "k1"}}), 3);
  BOOST_CHECK_EQUAL(e.Count("keymesh_key_requests_available"), 1u);
  BOOST_CHECK_EQUAL(e.Count("keymesh_key_tokens_available"), 0u);     // no tpm limit
  BOOST_CHECK_EQUAL(e.Count("keymesh_key_latency_ema_seconds"), 0u);  // no sample yet
}

// The mesh's families: every mode with 1 for the current one, Redis up and
// round trip, lease age and remaining, hosts, the counters, each key's
// share; none of them without a mesh.
BOOST_AUTO_TEST_CASE(render_metrics_of_a_mesh) {
  namespace mesh = keymesh::broker::mesh;
  keymesh::PoolStatus p;
  p.name = "p";
  mesh::MeshStatus m;
  m.enabled = true;
  m.mode = mesh::MeshMode::kLeased;
  m.redis_ok = true;
  m.rtt_seconds = 0.00025;
  m.since_refresh = 0.5;
  m.lease_remaining = 29.5;
  m.hosts = 3;
  m.refreshes = 40;
  m.refresh_failures = 2;
  m.events_published = 5;
  m.events_applied = 7;
  m.keys.push_back({"p", "a\"x", 600, 100000, 190, 31666.5, 2, 200, 30000, 3, false});
  m.keys.push_back({"p", "rpm-only", 60, 0, 19, 0, 1, 20, 0, 3, false});
  Exposition e;
  std::string err;
  std::string text = keymesh::broker::RenderMetrics({p}, &m);
  BOOST_REQUIRE_MESSAGE(ParseExposition(text, &e, &err), err + "\n" + text);
  for (const char* mode : {"leased", "learning", "share", "closed", "open"}) {
    BOOST_CHECK_EQUAL(e.Get("keymesh_mesh_mode", {{"mode", mode}}), std::string(mode) == "leased" ? 1 : 0);
  }
  BOOST_CHECK_EQUAL(e.Count("keymesh_mesh_mode"), 5u);
  BOOST_CHECK_EQUAL(e.Get("keymesh_mesh_redis_up", {}), 1);
  BOOST_CHECK_EQUAL(e.Get("keymesh_mesh_redis_rtt_seconds", {}), 0.00025);
  BOOST_CHECK_EQUAL(e.Get("keymesh_mesh_lease_age_seconds", {}), 0.5);
  BOOST_CHECK_EQUAL(e.Get("keymesh_mesh_lease_remaining_seconds", {}), 29.5);
  BOOST_CHECK_EQUAL(e.Get("keymesh_mesh_hosts", {}), 3);
  BOOST_CHECK_EQUAL(e.Get("keymesh_mesh_refreshes_total", {}), 40);
  BOOST_CHECK_EQUAL(e.Get("keymesh_mesh_refresh_failures_total", {}), 2);
  BOOST_CHECK_EQUAL(e.Get("keymesh_mesh_events_published_total", {}), 5);
  BOOST_CHECK_EQUAL(e.Get("keymesh_mesh_events_applied_total", {}), 7);
  BOOST_CHECK_EQUAL(e.Get("keymesh_key_share_rpm", {{"pool", "p"}, {"key", "a\"x"}}), 190);
  BOOST_CHECK_EQUAL(e.Get("keymesh_key_share_tpm", {{"pool", "p"}, {"key", "a\"x"}}), 31666.5);
  BOOST_CHECK_EQUAL(e.Get("keymesh_key_share_rpm", {{"pool", "p"}, {"key", "rpm-only"}}), 19);
  BOOST_CHECK_EQUAL(e.Count("keymesh_key_share_rpm"), 2u);
  BOOST_CHECK_EQUAL(e.Count("keymesh_key_share_tpm"), 1u);  // only the key with a tpm limit

  // Redis gone before the first refresh: down, no round trip yet, the lease
  // age infinite (an alert on it fires), the outage mode.
  m = mesh::MeshStatus();
  m.enabled = true;
  m.mode = mesh::MeshMode::kShare;
  text = keymesh::broker::RenderMetrics({p}, &m);
  BOOST_REQUIRE_MESSAGE(ParseExposition(text, &e, &err), err + "\n" + text);
  BOOST_CHECK_EQUAL(e.Get("keymesh_mesh_mode", {{"mode", "share"}}), 1);
  BOOST_CHECK_EQUAL(e.Get("keymesh_mesh_mode", {{"mode", "leased"}}), 0);
  BOOST_CHECK_EQUAL(e.Get("keymesh_mesh_redis_up", {}), 0);
  BOOST_CHECK_EQUAL(e.Count("keymesh_mesh_redis_rtt_seconds"), 0u);
  BOOST_CHECK(std::isinf(e.Get("keymesh_mesh_lease_age_seconds", {})));
  BOOST_CHECK_EQUAL(e.Get("keymesh_mesh_lease_remaining_seconds", {}), 0);
  BOOST_CHECK_EQUAL(e.Count("keymesh_key_share_rpm"), 0u);

  // No mesh (or one not enabled): none of its families.
  m.enabled = false;
  for (const mesh::MeshStatus* none :
       {static_cast<const mesh::MeshStatus*>(nullptr), static_cast<const mesh::MeshStatus*>(&m)}) {
    text = keymesh::broker::RenderMetrics({p}, none);
    BOOST_CHECK(text.find("keymesh_mesh_") == std::string::npos);
    BOOST_CHECK(text.find("keymesh_key_share_") == std::string::npos);
  }
}

// keymeshctl's tables of the mesh: every header field, a row per key, what
// the broker sent escaped; the status table's SHARE column only when a key
// paces at a share.
BOOST_AUTO_TEST_CASE(mesh_and_share_tables) {
  keymesh::protocol::MeshReport m;
  BOOST_CHECK(keymesh::ctl::RenderMesh(m).find("not configured") != std::string::npos);
  m.enabled = true;
  m.host = "web-1";
  m.ns = "team\x1b[2J";
  m.redis = "127.0.0.1:6379";
  m.mode = "leased";
  m.redis_ok = true;
  m.rtt_seconds = 0.00042;
  m.since_refresh = 0.25;
  m.lease_remaining = 29.75;
  m.hosts = 2;
  m.members = {"web-1", "web-2"};
  m.epoch = "e1";
  m.refreshes = 12;
  m.refresh_failures = 1;
  m.last_error = "mesh: redis 127.0.0.1:6379: timeout";
  m.propagation_p50 = 0.0012;
  m.propagation_p99 = 0.015;
  m.propagation_samples = 40;
  m.keys.push_back({"openai", "a", 600, 100000, 285, 47500, 4.75, 300, 60000, 2, false});
  m.keys.push_back({"openai", "b", 600, 0, 0, 0, 0, 12.5, 0, 1, true});
  const std::string t = keymesh::ctl::RenderMesh(m);
  BOOST_TEST_MESSAGE(t);
  for (const char* want : {"host web-1",
                           "namespace team\\x1b[2J",
                           "redis 127.0.0.1:6379",
                           "mode leased",
                           "redis ok",
                           "round trip 0.42ms",
                           "since refresh 250ms",
                           "lease left 29.8s",
                           "hosts 2: web-1, web-2",
                           "epoch e1",
                           "refreshes 12 (1 failed)",
                           "p50 1.20ms, p99 15ms (last 40 events)",
                           "last error: mesh: redis 127.0.0.1:6379: timeout",
                           "POOL",
                           "KEY",
                           "LIMIT",
                           "SHARE",
                           "BURST",
                           "WANTS",
                           "HOLDERS",
                           "REFUSED",
                           "600 rpm, 100000 tpm",
                           "285 rpm, 47500 tpm",
                           "4.8",
                           "300 rpm, 60000 tpm",
                           "12.5 rpm",
                           "secret differs"}) {
    BOOST_CHECK_MESSAGE(t.find(want) != std::string::npos, std::string("no '") + want + "' in\n" + t);
  }
  BOOST_CHECK(t.find('\x1b') == std::string::npos);
  m.redis_ok = false;
  m.since_refresh = -1;
  m.rtt_seconds = -1;
  m.members.clear();
  m.keys.clear();
  const std::string down = keymesh::ctl::RenderMesh(m);
  for (const char* want : {"redis unreachable", "since refresh never", "round trip -", "no keys shared"}) {
    BOOST_CHECK_MESSAGE(down.find(want) != std::string::npos, std::string("no '") + want + "' in\n" + down);
  }

  keymesh::protocol::StatusReply::Pool pool;
  pool.status.name = "openai";
  keymesh::KeyStatus k;
  k.name = "a";
  k.rpm = 600;
  k.tpm = 100000;
  pool.status.keys.push_back(k);
  BOOST_CHECK(keymesh::ctl::RenderPool(pool).find("SHARE") == std::string::npos);
  k.name = "b";
  k.share_active = true;
  k.share_rpm = 300;
  k.share_tpm = 40000.5;
  pool.status.keys.push_back(k);
  const std::string st = keymesh::ctl::RenderPool(pool);
  BOOST_CHECK_MESSAGE(st.find("SHARE") != std::string::npos, st);
  BOOST_CHECK_MESSAGE(st.find("300/600 rpm, 40000.5/100000 tpm") != std::string::npos, st);
}

BOOST_AUTO_TEST_CASE(commands_take_effect_for_workers_and_secrets_never_show) {
  BrokerProcess b;
  WriteFile(b.dir() + "/c.key", kSecretC + "\n");
  WriteFile(b.dir() + "/e.key", kSecretE + "\n");
  b.WriteConfig(
      "{\"p\":{\"strategy\":\"least_busy\",\"max_failures\":2,\"default_cooldown\":1,\"keys\":["
      "{\"name\":\"a\",\"secret\":\"" +
      kSecretA +
      "\"},"
      "{\"name\":\"b\",\"secret_env\":\"KM_OPS_SECRET_B\",\"rpm\":6000,\"tpm\":100000},"
      "{\"name\":\"c\",\"secret_file\":\"c.key\",\"max_concurrency\":4}]}}");
  BOOST_REQUIRE_MESSAGE(b.Start(), b.Log());

  // status: a table with every key, masked secrets, and JSON that parses.
  CtlResult st = Ctl(b, {"status"});
  BOOST_REQUIRE_MESSAGE(st.code == 0, st.err);
  BOOST_CHECK(st.out.find("pool p") != std::string::npos);
  for (const char* col : {"KEY", "SECRET", "STATE", "IN-FLIGHT", "BUDGET", "COOLDOWN", "OK", "FAILED", "429", "EMA"}) {
    BOOST_CHECK_MESSAGE(st.out.find(col) != std::string::npos, std::string("no column ") + col + "\n" + st.out);
  }
  BOOST_CHECK(st.out.find(keymesh::MaskSecret(kSecretA)) != std::string::npos);
  BOOST_CHECK(st.out.find("/4") != std::string::npos);      // c's in-flight/max
  BOOST_CHECK(st.out.find(" req, ") != std::string::npos);  // b's budget
  json::array pools = StatusJson(b);
  BOOST_REQUIRE(FindKey(pools, "p", "a") != nullptr);
  BOOST_CHECK_EQUAL(FindKey(pools, "p", "a")->at("key_suffix").as_string(), keymesh::MaskSecret(kSecretA));
  BOOST_CHECK(Ctl(b, {"status", "p", "--json"}).code == 0);

  BOOST_CHECK_EQUAL(KeysSeen(b, "p"), "a,b,c");

  // disable / enable
  BOOST_CHECK_EQUAL(Ctl(b, {"disable", "p", "a"}).code, 0);
  BOOST_CHECK_EQUAL(Ctl(b, {"disable", "p", "c"}).code, 0);
  BOOST_CHECK_EQUAL(KeysSeen(b, "p"), "b");
  st = Ctl(b, {"status", "p"});
  BOOST_CHECK_MESSAGE(st.out.find("disabled") != std::string::npos, st.out);

  // add-key from an environment variable: a worker gets the new secret.
  CtlResult add = Ctl(b, {"add-key", "p", "d", "--secret-env", "KM_OPS_SECRET_D"});
  BOOST_CHECK_MESSAGE(add.code == 0, add.err);
  BOOST_CHECK_EQUAL(Ctl(b, {"disable", "p", "b"}).code, 0);
  BOOST_CHECK_EQUAL(InWorker(b.socket(), "p",
                             [](keymesh::Pool& p) -> std::string {
                               keymesh::Result<keymesh::Lease> l = p.TryAcquire();
                               if (!l.ok()) return "none: " + l.status().message();
                               const bool same = l->secret() == kSecretD;
                               return l->key_name() + (same ? ":secret-ok" : ":secret-differs");
                             }),
                    "d:secret-ok");

  // add-key from a file, with limits.
  add = Ctl(b, {"add-key", "p", "e", "--secret-file", b.dir() + "/e.key", "--rpm", "600", "--max-concurrency", "3",
                "--burst", "2", "--rate-margin", "0.05"});
  BOOST_CHECK_MESSAGE(add.code == 0, add.err);
  pools = StatusJson(b);
  BOOST_REQUIRE(FindKey(pools, "p", "e") != nullptr);
  BOOST_CHECK_EQUAL(FindKey(pools, "p", "e")->at("rpm").to_number<int64_t>(), 600);
  BOOST_CHECK_EQUAL(FindKey(pools, "p", "e")->at("max_concurrency").to_number<int64_t>(), 3);
  BOOST_CHECK_EQUAL(FindKey(pools, "p", "e")->at("burst").to_number<int64_t>(), 2);
  BOOST_CHECK_EQUAL(FindKey(pools, "p", "e")->at("rate_margin").to_number<double>(), 0.05);
  // Limits out of range are refused before anything is sent; a bad flag
  // value is a usage error.
  BOOST_CHECK_EQUAL(Ctl(b, {"add-key", "p", "f", "--secret-env", "KM_OPS_SECRET_D", "--rpm", "4294967296"}).code, 1);
  BOOST_CHECK_EQUAL(Ctl(b, {"add-key", "p", "f", "--secret-env", "KM_OPS_SECRET_D", "--rate-margin", "0.5"}).code, 2);
  BOOST_CHECK_EQUAL(Ctl(b, {"add-key", "p", "f", "--secret-env", "KM_OPS_SECRET_D", "--burst", "x"}).code, 2);
  BOOST_CHECK(FindKey(StatusJson(b), "p", "f") == nullptr);

  // remove-key: no worker gets it any more.
  BOOST_CHECK_EQUAL(Ctl(b, {"remove-key", "p", "d"}).code, 0);
  BOOST_CHECK_EQUAL(KeysSeen(b, "p"), "e");
  const std::string d_state = KeyState(b, "p", "d");
  BOOST_CHECK_MESSAGE(d_state == "absent" || d_state == "removing", d_state);

  // reset: a key exhausted by failures comes back.
  BOOST_CHECK_EQUAL(Ctl(b, {"disable", "p", "e"}).code, 0);
  BOOST_CHECK_EQUAL(Ctl(b, {"enable", "p", "a"}).code, 0);
  BOOST_CHECK_EQUAL(InWorker(b.socket(), "p",
                             [](keymesh::Pool& p) -> std::string {
                               std::string out;
                               for (int i = 0; i < 2; ++i) {
                                 keymesh::Result<keymesh::Lease> l = p.TryAcquire();
                                 if (!l.ok()) return "none";
                                 out += l->key_name();
                                 (void)l->MarkFailed();
                               }
                               out += p.TryAcquire().ok() ? ",still-eligible" : ",out";
                               return out;
                             }),
                    "aa,out");
  BOOST_CHECK_EQUAL(KeyState(b, "p", "a"), "exhausted");
  st = Ctl(b, {"status"});
  BOOST_CHECK_MESSAGE(st.out.find("exhausted") != std::string::npos, st.out);
  BOOST_CHECK_EQUAL(Ctl(b, {"reset", "p", "a"}).code, 0);
  BOOST_CHECK_EQUAL(KeysSeen(b, "p"), "a");

  // Errors: one line, non-zero.
  CtlResult bad = Ctl(b, {"enable", "p", "nosuch"});
  BOOST_CHECK_EQUAL(bad.code, 1);
  BOOST_CHECK_EQUAL(std::count(bad.err.begin(), bad.err.end(), '\n'), 1);
  BOOST_CHECK_EQUAL(Ctl(b, {"disable", "nosuchpool", "a"}).code, 1);
  BOOST_CHECK_EQUAL(Ctl(b, {"enable", "p"}).code, 2);
  BOOST_CHECK_EQUAL(Ctl(b, {"frobnicate"}).code, 2);
  bad = Ctl(b, {"add-key", "p", "f", "--secret-env", "KM_OPS_UNSET_VARIABLE"});
  BOOST_CHECK_NE(bad.code, 0);
  BOOST_CHECK_EQUAL(std::count(bad.err.begin(), bad.err.end(), '\n'), 1);

  // metrics: strict format; the per-key series sum to the pool's counters,
  // except for the removed key d (one acquire, one success), whose series
  // left with it while the pool's totals keep its work.
  Exposition e = ScrapeMetrics(b);
  for (const char* c : {"acquires", "failures", "releases"}) {
    const std::string pool_name = std::string("keymesh_pool_") + c + "_total";
    std::string key_name = std::string("keymesh_key_") + (std::string(c) == "releases" ? "successes" : c) + "_total";
    const double removed = std::string(c) == "failures" ? 0 : 1;
    BOOST_CHECK_EQUAL(e.Get(pool_name, {{"pool", "p"}}), e.Sum(key_name, {{"pool", "p"}}) + removed);
  }
  BOOST_CHECK(std::isnan(e.Get("keymesh_key_acquires_total", {{"pool", "p"}, {"key", "d"}})));
  BOOST_CHECK_EQUAL(e.Get("keymesh_pool_failures_total", {{"pool", "p"}}), 2);
  BOOST_CHECK_EQUAL(e.Get("keymesh_key_enabled", {{"pool", "p"}, {"key", "b"}}), 0);
  BOOST_CHECK_EQUAL(e.Get("keymesh_pool_eligible_keys", {{"pool", "p"}}), 1);
  BOOST_CHECK_EQUAL(e.Get("keymesh_pool_acquires_total", {{"pool", "p"}}),
                    e.Get("keymesh_acquire_wait_seconds_count", {{"pool", "p"}}));

  // watch: refreshes until interrupted, then exits 0.
  const std::string watch_out = b.dir() + "/watch.out";
  const int watch_fd = ::open(watch_out.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  const pid_t watch = SpawnProgram({KEYMESHCTL_BIN, "--socket", b.socket(), "watch", "p"}, watch_fd);
  ::close(watch_fd);
  BOOST_REQUIRE(watch > 0);
  const double deadline = NowSeconds() + 10;
  while (ReadFile(watch_out).find("pool p") == std::string::npos && NowSeconds() < deadline) ::usleep(10'000);
  BOOST_CHECK(ReadFile(watch_out).find("pool p") != std::string::npos);
  ::kill(watch, SIGINT);
  BOOST_CHECK_EQUAL(WaitChild(watch), 0);
  g_all_output += ReadFile(watch_out);

  // Persisted: after a restart from the state file alone (segment gone),
  // the disabled keys are still disabled.
  BOOST_CHECK_EQUAL(b.Stop(), 0);
  const std::string first_log = b.Log();  // Start() clears it
  (void)keymesh::shm::Segment::Remove(b.segment());
  BOOST_REQUIRE_MESSAGE(b.Start(), b.Log());
  BOOST_CHECK_EQUAL(KeyState(b, "p", "b"), "disabled");
  BOOST_CHECK_EQUAL(KeyState(b, "p", "c"), "disabled");
  BOOST_CHECK_EQUAL(KeyState(b, "p", "a"), "available");
  BOOST_CHECK_EQUAL(b.Stop(), 0);
  const std::string second_log = b.Log();

  // Nothing printed a secret: the broker's stderr over both runs (every
  // command was used) and everything keymeshctl printed.
  CheckNoSecret("broker log", first_log + second_log);
  CheckNoSecret("keymeshctl output", g_all_output);
  for (const char* event :
       {"event=key_disable", "event=key_enable", "event=key_reset", "event=key_removed", "event=key_added"}) {
    BOOST_CHECK_MESSAGE(first_log.find(event) != std::string::npos, std::string("no ") + event + " logged");
  }
}

// keymeshctl mesh against a broker without a mesh: it says so (exit 0), its
// JSON is {"enabled": false}, status shows no SHARE column, metrics no mesh
// family; a bad argument is a usage error.
BOOST_AUTO_TEST_CASE(mesh_command_without_a_mesh) {
  BrokerProcess b;
  b.WriteConfig("{\"p\":{\"keys\":[{\"name\":\"a\",\"secret\":\"" + kSecretA + "\",\"rpm\":600}]}}");
  BOOST_REQUIRE_MESSAGE(b.Start(), b.Log());
  CtlResult r = Ctl(b, {"mesh"});
  BOOST_CHECK_EQUAL(r.code, 0);
  BOOST_CHECK_MESSAGE(r.out.find("mesh: not configured") != std::string::npos, r.out);
  r = Ctl(b, {"mesh", "--json"});
  BOOST_CHECK_EQUAL(r.code, 0);
  BOOST_CHECK_EQUAL(r.out, "{\"enabled\":false}\n");
  r = Ctl(b, {"mesh", "--frobnicate"});
  BOOST_CHECK_EQUAL(r.code, 2);
  BOOST_CHECK_EQUAL(std::count(r.err.begin(), r.err.end(), '\n'), 1);
  r = Ctl(b, {"status"});
  BOOST_CHECK_EQUAL(r.code, 0);
  BOOST_CHECK_MESSAGE(r.out.find("SHARE") == std::string::npos, r.out);
  const json::array pools = StatusJson(b);
  const json::object* a = FindKey(pools, "p", "a");
  BOOST_REQUIRE(a != nullptr);
  BOOST_CHECK(!a->at("share_active").as_bool());
  Exposition e = ScrapeMetrics(b);
  for (const keymesh::testing::Sample& s : e.samples) {
    BOOST_CHECK_MESSAGE(s.name.rfind("keymesh_mesh_", 0) != 0 && s.name.rfind("keymesh_key_share_", 0) != 0, s.name);
  }
  BOOST_CHECK_EQUAL(b.Stop(), 0);
  CheckNoSecret("keymeshctl output", g_all_output);
}

json::object MeshJson(const BrokerProcess& b) {
  CtlResult r = Ctl(b, {"mesh", "--json"});
  BOOST_REQUIRE_MESSAGE(r.code == 0, r.err);
  boost::system::error_code ec;
  json::value v = json::parse(r.out, ec);
  BOOST_REQUIRE_MESSAGE(!ec && v.is_object(), "mesh --json is not a JSON object: " + r.out);
  return v.get_object();
}

std::string MeshConfig(const std::string& url) {
  return ",\"mesh\":{\"redis\":\"" + url + "\",\"host\":\"ops-1\",\"namespace\":\"ops-" + std::to_string(::getpid()) +
         "\",\"refresh\":0.2,\"lease\":2,\"outage\":\"share\"}";
}

// keymeshctl mesh against a broker in a mesh. With Redis absent the broker
// starts and serves, and mesh answers at once: Redis unreachable, the
// outage mode. With a real redis-server: the broker leases its share of the
// key, shown by mesh, status (the SHARE column) and metrics.
BOOST_AUTO_TEST_CASE(mesh_command_with_a_mesh) {
  const std::string pools = "{\"p\":{\"keys\":[{\"name\":\"a\",\"secret\":\"" + kSecretA + "\",\"rpm\":600}]}}";
  BrokerProcess b;
  b.WriteConfig(pools, MeshConfig("redis://127.0.0.1:" + std::to_string(keymesh::testing::RedisServer::FreePort())));
  BOOST_REQUIRE_MESSAGE(b.Start(), b.Log());
  const double asked = NowSeconds();
  json::object m = MeshJson(b);
  BOOST_CHECK_LT(NowSeconds() - asked, 2.0);  // keymeshctl's own start included: no wait on Redis
  BOOST_CHECK(m.at("enabled").as_bool());
  BOOST_CHECK(!m.at("redis_ok").as_bool());
  BOOST_CHECK_EQUAL(m.at("mode").as_string(), "share");
  BOOST_CHECK_EQUAL(m.at("host").as_string(), "ops-1");
  CtlResult r = Ctl(b, {"mesh"});
  BOOST_CHECK_EQUAL(r.code, 0);
  for (const char* want : {"host ops-1", "mode share", "redis unreachable", "since refresh never"}) {
    BOOST_CHECK_MESSAGE(r.out.find(want) != std::string::npos, std::string("no '") + want + "' in\n" + r.out);
  }
  Exposition e = ScrapeMetrics(b);
  BOOST_CHECK_EQUAL(e.Get("keymesh_mesh_mode", {{"mode", "share"}}), 1);
  BOOST_CHECK_EQUAL(e.Get("keymesh_mesh_mode", {{"mode", "leased"}}), 0);
  BOOST_CHECK_EQUAL(e.Get("keymesh_mesh_redis_up", {}), 0);
  BOOST_CHECK(std::isinf(e.Get("keymesh_mesh_lease_age_seconds", {})));
  BOOST_CHECK_EQUAL(b.Stop(), 0);

  keymesh::testing::RedisServer redis;
  BOOST_REQUIRE(redis.Start());
  b.WriteConfig(pools, MeshConfig(redis.url()));
  BOOST_REQUIRE_MESSAGE(b.Start(), b.Log());
  const double deadline = NowSeconds() + 15;
  for (m = MeshJson(b); m.at("mode").as_string() != "leased" && NowSeconds() < deadline; m = MeshJson(b)) {
    ::usleep(50'000);
  }
  BOOST_REQUIRE_MESSAGE(m.at("mode").as_string() == "leased", json::serialize(m) + "\n" + b.Log());
  BOOST_CHECK(m.at("redis_ok").as_bool());
  BOOST_CHECK_EQUAL(m.at("hosts").to_number<int64_t>(), 1);
  BOOST_CHECK_EQUAL(json::serialize(m.at("members")), "[\"ops-1\"]");
  BOOST_CHECK_GE(m.at("rtt_seconds").to_number<double>(), 0.0);
  BOOST_CHECK_GE(m.at("since_refresh").to_number<double>(), 0.0);
  BOOST_CHECK_GT(m.at("lease_remaining").to_number<double>(), 0.0);
  BOOST_CHECK_GE(m.at("refreshes").to_number<int64_t>(), 1);
  BOOST_REQUIRE_EQUAL(m.at("keys").as_array().size(), 1u);
  const json::object& k = m.at("keys").as_array()[0].as_object();
  BOOST_CHECK_EQUAL(k.at("pool").as_string(), "p");
  BOOST_CHECK_EQUAL(k.at("key").as_string(), "a");
  BOOST_CHECK_EQUAL(k.at("limit_rpm").to_number<double>(), 600.0);
  BOOST_CHECK(!k.at("mismatch").as_bool());
  // Alone in the mesh, the host is lent what nobody asked for: the limit
  // less the headroom (the default, 2 %).
  const double share = k.at("share_rpm").to_number<double>();
  BOOST_CHECK_CLOSE(share, 600 * 0.98, 1e-6);
  r = Ctl(b, {"mesh"});
  BOOST_CHECK_EQUAL(r.code, 0);
  for (const char* want : {"mode leased", "redis ok", "hosts 1: ops-1", "600 rpm"}) {
    BOOST_CHECK_MESSAGE(r.out.find(want) != std::string::npos, std::string("no '") + want + "' in\n" + r.out);
  }
  // The segment paces the key at its share: status shows it beside the limit.
  json::array status = StatusJson(b);
  const json::object* a = FindKey(status, "p", "a");
  BOOST_REQUIRE(a != nullptr);
  BOOST_CHECK(a->at("share_active").as_bool());
  r = Ctl(b, {"status"});
  BOOST_CHECK_MESSAGE(r.out.find("SHARE") != std::string::npos && r.out.find("/600 rpm") != std::string::npos, r.out);
  e = ScrapeMetrics(b);
  BOOST_CHECK_EQUAL(e.Get("keymesh_mesh_mode", {{"mode", "leased"}}), 1);
  BOOST_CHECK_EQUAL(e.Get("keymesh_mesh_redis_up", {}), 1);
  BOOST_CHECK_EQUAL(e.Get("keymesh_mesh_hosts", {}), 1);
  BOOST_CHECK_GE(e.Get("keymesh_mesh_refreshes_total", {}), 1);
  BOOST_CHECK(!std::isnan(e.Get("keymesh_key_share_rpm", {{"pool", "p"}, {"key", "a"}})));
  BOOST_CHECK_EQUAL(b.Stop(), 0);
  CheckNoSecret("broker log", b.Log());
  CheckNoSecret("keymeshctl output", g_all_output);
}

BOOST_AUTO_TEST_CASE(broker_down_is_one_clear_line) {
  const std::string dir = "/tmp/kmops-" + std::to_string(::getpid());
  std::filesystem::create_directories(dir);
  const std::string sock = dir + "/nobody.sock";
  for (const std::vector<std::string>& args :
       {std::vector<std::string>{"--socket", sock, "status"}, std::vector<std::string>{"--socket", sock, "metrics"},
        std::vector<std::string>{"--socket", sock, "disable", "p", "a"},
        std::vector<std::string>{"--socket", sock, "mesh"}}) {
    CtlResult r = Ctl(dir, args);
    BOOST_CHECK_EQUAL(r.code, 3);
    BOOST_CHECK_EQUAL(std::count(r.err.begin(), r.err.end(), '\n'), 1);
    BOOST_CHECK_MESSAGE(r.err.find(sock) != std::string::npos, r.err);
    BOOST_CHECK_MESSAGE(r.err.find("keymesh-broker --config") != std::string::npos, r.err);
    BOOST_CHECK(r.out.empty());
  }
  ::setenv("KEYMESH_SOCKET", sock.c_str(), 1);
  CtlResult r = Ctl(dir, {"status"});
  ::unsetenv("KEYMESH_SOCKET");
  BOOST_CHECK_EQUAL(r.code, 3);
  BOOST_CHECK_MESSAGE(r.err.find(sock) != std::string::npos, r.err);
  std::filesystem::remove_all(dir);
}

BOOST_AUTO_TEST_CASE(metrics_count_the_work_of_every_process_and_reach_the_file) {
  BrokerProcess b;
  const std::string file = b.dir() + "/keymesh.prom";
  b.WriteConfig(
      "{\"m\":{\"max_failures\":100,\"default_cooldown\":0.01,\"keys\":["
      "{\"name\":\"x\",\"secret\":\"" +
          kSecretA +
          "\",\"rpm\":60000},"
          "{\"name\":\"y\",\"secret\":\"" +
          kSecretB +
          "\",\"tpm\":10000000},"
          "{\"name\":\"z\",\"secret\":\"" +
          kSecretC + "\"}]}}",
      ",\"metrics_file\":\"" + file + "\",\"metrics_interval\":0.1");
  BOOST_REQUIRE_MESSAGE(b.Start(), b.Log());

  // Two worker processes: 10 successes (5 tokens each), 3 failures, 2 429s.
  std::vector<pid_t> workers;
  for (int w = 0; w < 2; ++w) {
    workers.push_back(keymesh::testing::ForkChild([&]() -> int {
      keymesh::Result<std::unique_ptr<keymesh::Pool>> pool = keymesh::Pool::Connect(b.socket(), "m");
      if (!pool.ok()) return 10;
      for (int i = 0; i < 15; ++i) {
        keymesh::Result<keymesh::Lease> l = (*pool)->Acquire(10.0);
        if (!l.ok()) return 11;
        keymesh::Status st = i < 10 ? l->Release(0.01, 5) : i < 13 ? l->MarkFailed() : l->MarkRateLimited(0.001);
        if (!st.ok()) return 12;
      }
      return 0;
    }));
  }
  for (pid_t w : workers) BOOST_CHECK_EQUAL(WaitChild(w), 0);

  // With every key disabled: one failed try, one acquire that times out.
  for (const char* k : {"x", "y", "z"}) BOOST_CHECK_EQUAL(Ctl(b, {"disable", "m", k}).code, 0);
  BOOST_CHECK_EQUAL(InWorker(b.socket(), "m",
                             [](keymesh::Pool& p) -> std::string {
                               const bool tried = p.TryAcquire().ok();
                               const bool waited = p.Acquire(0.05).ok();
                               return std::string(tried ? "got" : "none") + "," + (waited ? "got" : "none");
                             }),
                    "none,none");

  auto check = [](const Exposition& e) {
    const std::map<std::string, std::string> m = {{"pool", "m"}};
    BOOST_CHECK_EQUAL(e.Get("keymesh_pool_acquires_total", m), 30);
    BOOST_CHECK_EQUAL(e.Get("keymesh_pool_releases_total", m), 20);
    BOOST_CHECK_EQUAL(e.Get("keymesh_pool_failures_total", m), 6);
    BOOST_CHECK_EQUAL(e.Get("keymesh_pool_rate_limited_total", m), 4);
    BOOST_CHECK_EQUAL(e.Get("keymesh_pool_reclaimed_total", m), 0);
    BOOST_CHECK_GE(e.Get("keymesh_pool_no_key_available_total", m), 1);
    BOOST_CHECK_GE(e.Get("keymesh_pool_acquire_timeouts_total", m), 1);
    BOOST_CHECK_EQUAL(e.Get("keymesh_pool_in_flight", m), 0);
    BOOST_CHECK_EQUAL(e.Get("keymesh_pool_keys", m), 3);
    BOOST_CHECK_EQUAL(e.Get("keymesh_pool_eligible_keys", m), 0);
    BOOST_CHECK_EQUAL(e.Get("keymesh_acquire_wait_seconds_count", m), 30);
    BOOST_CHECK_EQUAL(e.Sum("keymesh_key_acquires_total", m), 30);
    BOOST_CHECK_EQUAL(e.Sum("keymesh_key_successes_total", m), 20);
    BOOST_CHECK_EQUAL(e.Sum("keymesh_key_failures_total", m), 6);
    BOOST_CHECK_EQUAL(e.Sum("keymesh_key_rate_limited_total", m), 4);
    BOOST_CHECK_EQUAL(e.Sum("keymesh_key_tokens_total", m), 100);
    BOOST_CHECK_EQUAL(e.Sum("keymesh_key_in_flight", m), 0);
    BOOST_CHECK_EQUAL(e.Sum("keymesh_key_enabled", m), 0);
    BOOST_CHECK_EQUAL(e.Count("keymesh_key_requests_available"), 1u);  // only x has an rpm
    BOOST_CHECK_EQUAL(e.Count("keymesh_key_tokens_available"), 1u);    // only y has a tpm
    BOOST_CHECK(!std::isnan(e.Get("keymesh_key_requests_available", {{"pool", "m"}, {"key", "x"}})));
    BOOST_CHECK(!std::isnan(e.Get("keymesh_key_tokens_available", {{"pool", "m"}, {"key", "y"}})));
    BOOST_CHECK_EQUAL(e.Count("keymesh_key_circuit_state"), 3u);
    BOOST_CHECK_EQUAL(e.Sum("keymesh_key_circuit_state", m), 0);
    BOOST_CHECK_GE(e.Count("keymesh_key_latency_ema_seconds"), 1u);
    for (const keymesh::testing::Sample& s : e.samples) {
      BOOST_CHECK_MESSAGE(s.name.rfind("keymesh_", 0) == 0, s.name);
      BOOST_CHECK_MESSAGE(s.labels.count("pool") == 1, s.name);
    }
  };
  check(ScrapeMetrics(b));

  // The metrics file catches up within a few intervals.
  Exposition from_file;
  std::string error = "no file";
  const double deadline = NowSeconds() + 10;
  while (NowSeconds() < deadline) {
    const std::string text = ReadFile(file);
    if (!text.empty() && ParseExposition(text, &from_file, &error) &&
        from_file.Get("keymesh_pool_eligible_keys", {{"pool", "m"}}) == 0 &&
        from_file.Get("keymesh_pool_no_key_available_total", {{"pool", "m"}}) >= 1 &&
        from_file.Get("keymesh_pool_acquire_timeouts_total", {{"pool", "m"}}) >= 1) {  // the last change made
      break;
    }
    ::usleep(20'000);
  }
  BOOST_REQUIRE_MESSAGE(ParseExposition(ReadFile(file), &from_file, &error), error);
  check(from_file);
  BOOST_CHECK_EQUAL(b.Stop(), 0);
  // The last write at shutdown left a complete file and no temp file.
  BOOST_CHECK(ParseExposition(ReadFile(file), &from_file, &error));
  for (const auto& entry : std::filesystem::directory_iterator(b.dir())) {
    BOOST_CHECK_MESSAGE(entry.path().filename().string().find(".tmp") == std::string::npos, entry.path());
  }
  CheckNoSecret("metrics", ReadFile(file));
  CheckNoSecret("broker log", b.Log());
}

BOOST_AUTO_TEST_CASE(log_level_from_config_and_command_line) {
  BrokerProcess b;
  b.WriteConfig("{\"p\":{\"keys\":[{\"name\":\"a\",\"secret\":\"" + kSecretA + "\"}]}}", ",\"log_level\":\"warn\"");
  // The command line wins over the config.
  BOOST_REQUIRE_MESSAGE(b.Start({"--log-level", "info"}), b.Log());
  BOOST_CHECK_EQUAL(b.Stop(), 0);
  // The config's level alone: no info line (the broker is ready once
  // keymeshctl gets an answer).
  BOOST_REQUIRE(!b.Start({}, 0));
  const double deadline = NowSeconds() + 10;
  while (Ctl(b, {"status"}).code != 0 && NowSeconds() < deadline) ::usleep(10'000);
  BOOST_REQUIRE_EQUAL(Ctl(b, {"disable", "p", "a"}).code, 0);
  BOOST_CHECK_EQUAL(b.Stop(), 0);
  BOOST_CHECK_MESSAGE(b.Log().find("level=info") == std::string::npos, b.Log());

  // Bad values are refused by --check, naming the field.
  for (const std::string& extra : {std::string(",\"log_level\":\"loud\""), std::string(",\"metrics_interval\":0"),
                                   std::string(",\"metrics_file\":\"\"")}) {
    b.WriteConfig("{\"p\":{\"keys\":[{\"name\":\"a\",\"secret\":\"x\"}]}}", extra);
    BOOST_CHECK_NE(std::system((std::string(KEYMESH_BROKER_BIN) + " --check --config " + b.config_file() + " 2>" +
                                b.dir() + "/check.err")
                                   .c_str()),
                   0);
    const std::string err = ReadFile(b.dir() + "/check.err");
    const std::string field = extra.substr(2, extra.find('"', 2) - 2);
    BOOST_CHECK_MESSAGE(err.find("config: " + field) != std::string::npos, err);
  }
}

// KM-12: replies beyond the 64 KiB request limit. A pool of 1024 keys (the
// default keys_per_pool) makes status and metrics replies of several
// hundred KiB; keymeshctl (protocol::ControlClient, like every client)
// reads replies up to protocol::kMaxReplyFrame.
BOOST_AUTO_TEST_CASE(status_and_metrics_of_a_1024_key_pool) {
  std::string keys;
  for (int i = 0; i < 1024; ++i) {
    keys += std::string(i == 0 ? "" : ",") + R"({"name":"k)" + std::to_string(i) + R"(","secret":"sk-big-)" +
            std::to_string(100000 + i) + R"(-padding"})";
  }
  BrokerProcess b;
  b.WriteConfig(R"({"big":{"keys":[)" + keys + "]}}");
  BOOST_REQUIRE(b.Start({}, 30));
  CtlResult st = Ctl(b, {"status", "--json"});
  BOOST_CHECK_EQUAL(st.code, 0);
  BOOST_CHECK_GT(st.out.size(), 64u * 1024);
  boost::system::error_code ec;
  json::value v = json::parse(st.out, ec);
  BOOST_CHECK(!ec);
  CtlResult m = Ctl(b, {"metrics"});
  BOOST_CHECK_EQUAL(m.code, 0);
  BOOST_CHECK_GT(m.out.size(), 64u * 1024);
  BOOST_CHECK(m.err.empty());
}
