// Unit tests of the broker's pure parts: config validation messages, the
// state file format. (The protocol's framing and messages are tested in
// tests/protocol.)
#define BOOST_TEST_MODULE broker_unit
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>

#include <boost/asio/io_context.hpp>
#include <boost/json.hpp>
#include <boost/test/unit_test.hpp>

#include "broker/atomic_file.h"
#include "broker/config.h"
#include "broker/dispatch.h"
#include "broker/hash.h"
#include "broker/mesh/mesh_job.h"
#include "broker/mesh/store.h"
#include "broker/ops.h"
#include "broker/persistence.h"
#include "broker/recovery.h"
#include "broker/session.h"
#include "broker/slow_acquire.h"
#include "shm/process_id.h"
#include "support/shm_fixtures.h"

namespace km = keymesh;
namespace kb = keymesh::broker;

namespace {

km::Result<kb::BrokerConfig> Parse(const std::string& text, std::map<std::string, std::string> env = {}) {
  return kb::ParseConfig(text, "/tmp", [env](const std::string& v) -> std::optional<std::string> {
    auto it = env.find(v);
    if (it == env.end()) return std::nullopt;
    return it->second;
  });
}

std::string ConfigError(const std::string& text, std::map<std::string, std::string> env = {}) {
  km::Result<kb::BrokerConfig> c = Parse(text, env);
  BOOST_REQUIRE(!c.ok());
  BOOST_CHECK(c.status().message().find('\n') == std::string::npos);
  return c.status().message();
}

}  // namespace

BOOST_AUTO_TEST_CASE(config_valid_and_defaults) {
  km::Result<kb::BrokerConfig> c = Parse(R"({"socket":"s.sock","state_file":"/var/x.json","allow_uids":[1000],
    "capacity":{"keys_per_pool":16},
    "pools":{"p":{"strategy":"weighted","max_lease_seconds":5,"keys":[{"name":"a","secret":"sk-1","weight":3},
                                                                        {"name":"b","secret_env":"B"}]}}})",
                                         {{"B", "sk-2"}});
  BOOST_REQUIRE_MESSAGE(c.ok(), c.status().message());
  BOOST_CHECK_EQUAL(c->socket, "/tmp/s.sock");
  BOOST_CHECK_EQUAL(c->capacity.keys_per_pool, 16u);
  BOOST_REQUIRE_EQUAL(c->pools.size(), 1u);
  BOOST_CHECK(c->pools[0].options.strategy == km::Strategy::kWeighted);
  BOOST_CHECK_EQUAL(c->pools[0].options.default_cooldown, 60.0);
  BOOST_CHECK_EQUAL(c->pools[0].options.max_failures, 10u);
  BOOST_CHECK_EQUAL(c->pools[0].options.max_lease_seconds, 5.0);
  BOOST_CHECK_EQUAL(c->pools[0].keys[0].weight, 3u);
  BOOST_CHECK_EQUAL(c->pools[0].keys[1].secret, "sk-2");
}

BOOST_AUTO_TEST_CASE(config_errors_name_the_field) {
  BOOST_CHECK_EQUAL(ConfigError(R"({"pools":{},"bogus":1})"), "config: bogus: unknown field");
  BOOST_CHECK_EQUAL(
      ConfigError(R"({"pools":{"p":{"keys":[{"name":"a","secret":"x"},{"name":"b","secret_env":"OPENAI_KEY_B"}]}}})"),
      "config: pools.p.keys[1].secret_env: environment variable OPENAI_KEY_B is not set");
  BOOST_CHECK(ConfigError(R"({"pools":{"p":{"keys":[{"name":"a","secret":"x"},{"name":"a","secret":"y"}]}}})")
                  .find("pools.p.keys[1].name: duplicate key name 'a'") != std::string::npos);
  BOOST_CHECK(ConfigError(R"({"pools":{"p":{"default_cooldown":"x","keys":[]}}})").find("pools.p.default_cooldown") !=
              std::string::npos);
  BOOST_CHECK(ConfigError(R"({"pools":{"p":{"keys":[{"name":"a","secret_file":"/nonexistent/k"}]}}})")
                  .find("pools.p.keys[0].secret_file: cannot read /nonexistent/k") != std::string::npos);
  BOOST_CHECK(
      ConfigError(R"({"pools":{"p":{"keys":[{"name":"a","secret":"x","secret_env":"Y"}]}}})").find("exactly one of") !=
      std::string::npos);
  BOOST_CHECK(ConfigError(R"({"pools":{"p":{"keys":[{"name":"a","secret":"x","weight":0}]}}})")
                  .find("pools.p.keys[0].weight") != std::string::npos);
  BOOST_CHECK(ConfigError(R"({"pools":{"p":{"strategy":"fastest","keys":[]}}})").find("pools.p.strategy") !=
              std::string::npos);
  BOOST_CHECK(ConfigError(R"({"pools":{"p":{"keys":[],"extra":true}}})") == "config: pools.p.extra: unknown field");
  BOOST_CHECK(ConfigError("{oops").find("not valid JSON") != std::string::npos);
  // A secret never appears in a message.
  std::string msg = ConfigError(
      R"({"pools":{"p":{"keys":[{"name":"a","secret":"sk-supersecret-1"},{"name":"b","secret":"sk-supersecret-1"}]}}})");
  BOOST_CHECK(msg.find("supersecret") == std::string::npos);
}

// A message that quotes input stays one line, with the input's control
// characters escaped (ConfigError also checks for a newline).
BOOST_AUTO_TEST_CASE(config_errors_escape_control_characters) {
  BOOST_CHECK_EQUAL(
      ConfigError(R"({"pools":{"p":{"keys":[{"name":"a","secret":"sk-0123456789ab","max_concurr\ncy":1}]}}})"),
      "config: pools.p.keys[0].max_concurr\\ncy: unknown field");
  BOOST_CHECK_EQUAL(ConfigError(R"({"pools":{"p\u001b[2J":{"keys":[]}}})"),
                    "config: pools.p\\x1b[2J: pool name may hold only printable ASCII without spaces: 'p\\x1b[2J'");
  BOOST_CHECK_EQUAL(ConfigError(R"({"pools":{"p":{"strategy":"fast\test","keys":[]}}})"),
                    "config: pools.p.strategy: strategy must be round_robin, least_busy or weighted, not 'fast\\test'");
  BOOST_CHECK_EQUAL(ConfigError(R"({"pools":{"p":{"keys":[{"name":"a","secret_env":"A\rB"}]}}})"),
                    "config: pools.p.keys[0].secret_env: environment variable A\\rB is not set");
}

BOOST_AUTO_TEST_CASE(state_file_round_trip_and_corruption) {
  kb::StateImage image;
  image.salt[0] = 0xDEADBEEFCAFEF00Dull;
  image.salt[1] = 42;
  kb::PersistedKey k;
  k.name = "a";
  k.fingerprint = 0x8000000000000001ull;
  k.state.fail_streak = 3;
  k.state.exhausted = true;
  k.state.enabled = false;
  k.state.successes = 99;
  k.state.has_latency = true;
  k.state.ema_latency = 0.123456789;
  k.cooldown_until_wall_ns = 1'900'000'000'000'000'000ull;
  image.pools["p"].push_back(k);
  const std::string text = kb::SerializeState(image);
  km::Result<kb::StateImage> back = kb::ParseState(text);
  BOOST_REQUIRE_MESSAGE(back.ok(), back.status().message());
  BOOST_CHECK_EQUAL(back->salt[0], image.salt[0]);
  const kb::PersistedKey& b = back->pools.at("p").at(0);
  BOOST_CHECK_EQUAL(b.fingerprint, k.fingerprint);
  BOOST_CHECK_EQUAL(b.state.fail_streak, 3u);
  BOOST_CHECK(b.state.exhausted);
  BOOST_CHECK(!b.state.enabled);
  BOOST_CHECK_EQUAL(b.state.successes, 99u);
  BOOST_CHECK_EQUAL(b.state.ema_latency, 0.123456789);
  BOOST_CHECK_EQUAL(b.cooldown_until_wall_ns, k.cooldown_until_wall_ns);
  // Written at a given time (the fuzz harness's fixed clock).
  const std::string at = kb::SerializeState(image, 42);
  BOOST_CHECK(boost::json::parse(at).as_object().at("written_at") == 42);
  BOOST_CHECK(kb::ParseState(at).ok());

  std::string tampered = text;
  tampered.replace(tampered.find("\"successes\":99"), 14, "\"successes\":98");
  BOOST_CHECK(kb::ParseState(tampered).status().code() == km::Code::kCorruptState);
  BOOST_CHECK(kb::ParseState(text.substr(0, text.size() / 2)).status().code() == km::Code::kCorruptState);
  BOOST_CHECK(kb::ParseState("{}").status().code() == km::Code::kCorruptState);
}

BOOST_AUTO_TEST_CASE(state_persister_writes_atomically_and_skips_unchanged) {
  const std::string dir = "/tmp/km-unit-" + std::to_string(::getpid());
  BOOST_REQUIRE(::mkdir(dir.c_str(), 0700) == 0);
  const std::string path = dir + "/state.json";
  kb::StatePersister p(path);
  kb::StateImage image;
  image.pools["p"];
  BOOST_CHECK(p.Save(image).ok());
  struct stat st1 {};
  BOOST_REQUIRE(::stat(path.c_str(), &st1) == 0);
  BOOST_CHECK(p.Save(image).ok());  // unchanged: no write
  struct stat st2 {};
  BOOST_REQUIRE(::stat(path.c_str(), &st2) == 0);
  BOOST_CHECK_EQUAL(st1.st_ino, st2.st_ino);
  km::Result<std::optional<kb::StateImage>> read = kb::ReadStateFile(path);
  BOOST_REQUIRE(read.ok());
  BOOST_CHECK(read->has_value());
  BOOST_CHECK(!kb::ReadStateFile(dir + "/missing.json")->has_value());
  ::unlink(path.c_str());
  ::rmdir(dir.c_str());
}

// The state file's checksum is persisted between builds, so its function
// must never change: FNV-1a's published vectors. The segment name is no
// longer derived from anything (KM-02: a name another user can predict can
// be squatted in /dev/shm): "keymesh-" and 32 lowercase hex digits, drawn
// afresh each time.
BOOST_AUTO_TEST_CASE(segment_names_are_random_and_well_formed) {
  BOOST_CHECK_EQUAL(kb::Fnv1a64(""), 0xcbf29ce484222325ull);
  BOOST_CHECK_EQUAL(kb::Fnv1a64("a"), 0xaf63dc4c8601ec8cull);
  BOOST_CHECK_EQUAL(kb::Fnv1a64("foobar"), 0x85944171f73967e8ull);
  km::Result<std::string> a = kb::NewSegmentName();
  km::Result<std::string> b = kb::NewSegmentName();
  BOOST_REQUIRE(a.ok() && b.ok());
  BOOST_CHECK_EQUAL(a->size(), 8u + 32u);
  BOOST_CHECK_EQUAL(a->substr(0, 8), "keymesh-");
  BOOST_CHECK(a->find_first_not_of("0123456789abcdef", 8) == std::string::npos);
  BOOST_CHECK(kb::IsSegmentName(*a));
  BOOST_CHECK(*a != *b);
  // The old derived name (FNV-1a of the default socket) is not accepted.
  BOOST_CHECK(!kb::IsSegmentName("keymesh-b149a849de3f0a43"));
  BOOST_CHECK(!kb::IsSegmentName("keymesh-" + std::string(32, 'G')));
  BOOST_CHECK(!kb::IsSegmentName("keymesh-" + std::string(31, 'a') + "/"));
  BOOST_CHECK_EQUAL(kb::SegmentNameFileFor("/run/keymesh/keymesh.sock"), "/run/keymesh/keymesh.sock.segment");
}

// A fresh directory /tmp/<prefix><pid>, removed at scope end (also when a
// check fails).
struct ScratchDir {
  explicit ScratchDir(const std::string& prefix) : path("/tmp/" + prefix + std::to_string(::getpid())) {
    std::filesystem::remove_all(path);
    std::filesystem::create_directories(path);
  }
  ~ScratchDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  std::string path;
};

// The recorded name is read only from a file this uid owns, not writable by
// others, not through a symlink, holding one well-formed name.
BOOST_AUTO_TEST_CASE(segment_name_file_is_trusted_only_when_ours) {
  const ScratchDir scratch("kmu-name-");
  const std::string& dir = scratch.path;
  const std::string file = dir + "/km.sock.segment";
  BOOST_CHECK(!kb::ReadSegmentName(file));  // none yet
  km::Result<std::string> name = kb::NewSegmentName();
  BOOST_REQUIRE(name.ok());
  BOOST_REQUIRE(kb::RecordSegmentName(file, *name).ok());
  BOOST_CHECK_EQUAL(kb::ReadSegmentName(file).value_or(""), *name);
  struct stat st {};
  BOOST_REQUIRE_EQUAL(::stat(file.c_str(), &st), 0);
  BOOST_CHECK_EQUAL(st.st_mode & 07777, 0640u);

  BOOST_REQUIRE_EQUAL(::chmod(file.c_str(), 0666), 0);
  BOOST_CHECK(!kb::ReadSegmentName(file));  // others could have written it
  BOOST_REQUIRE_EQUAL(::chmod(file.c_str(), 0640), 0);
  if (::geteuid() == 0) {
    BOOST_REQUIRE_EQUAL(::chown(file.c_str(), 65534, 65534), 0);
    BOOST_CHECK(!kb::ReadSegmentName(file));  // another uid's
    BOOST_REQUIRE_EQUAL(::chown(file.c_str(), 0, 0), 0);
  }
  const std::string link = dir + "/link.segment";
  std::filesystem::create_symlink(file, link);
  BOOST_CHECK(!kb::ReadSegmentName(link));
  std::ofstream(file) << "keymesh-b149a849de3f0a43\n";
  BOOST_CHECK(!kb::ReadSegmentName(file));  // not a name of ours
}

// The config's key limits are the same reader as add_key's (and so the same
// ranges); a null is a mistyped value in a config, and a secret that could
// not travel in an HTTP header is refused.
BOOST_AUTO_TEST_CASE(config_key_limits_and_secrets) {
  km::Result<kb::BrokerConfig> c = Parse(
      R"({"pools":{"p":{"keys":[{"name":"a","secret":"sk-1","burst":4,"rate_margin":0.25,"tpm":18446744073709551615}]}}})");
  BOOST_REQUIRE_MESSAGE(c.ok(), c.status().message());
  BOOST_CHECK_EQUAL(c->pools[0].keys[0].burst, 4u);
  BOOST_CHECK_EQUAL(c->pools[0].keys[0].rate_margin, 0.25);
  BOOST_CHECK_EQUAL(c->pools[0].keys[0].tpm, UINT64_MAX);
  BOOST_CHECK_EQUAL(c->pools[0].keys[0].weight, 1u);
  BOOST_CHECK_EQUAL(ConfigError(R"({"pools":{"p":{"keys":[{"name":"a","secret":"sk-1","burst":1000001}]}}})"),
                    "config: pools.p.keys[0].burst: must be between 0 and 1000000");
  BOOST_CHECK_EQUAL(ConfigError(R"({"pools":{"p":{"keys":[{"name":"a","secret":"sk-1","rate_margin":0.5}]}}})"),
                    "config: pools.p.keys[0].rate_margin: must be a number >= 0 and < 0.5");
  BOOST_CHECK_EQUAL(ConfigError(R"({"pools":{"p":{"keys":[{"name":"a","secret":"sk-1","rpm":null}]}}})"),
                    "config: pools.p.keys[0].rpm: must be a non-negative integer");
  BOOST_CHECK_EQUAL(ConfigError(R"({"pools":{"p":{"keys":[{"name":"a","secret":"   "}]}}})"),
                    "config: pools.p.keys[0]: the secret is only white space");
  BOOST_CHECK_EQUAL(ConfigError(R"({"pools":{"p":{"keys":[{"name":"a","secret":"sk-\u0007x"}]}}})"),
                    "config: pools.p.keys[0]: the secret holds a control character");
  BOOST_CHECK_EQUAL(ConfigError(R"({"pools":{"p":{"rate_margin":"x","keys":[]}}})"),
                    "config: pools.p.rate_margin: must be a number >= 0 and < 0.5");
}

// A state file that passes its checksum but holds a mistyped field is
// refused naming the key and the field.
BOOST_AUTO_TEST_CASE(state_file_names_the_bad_field) {
  kb::StateImage image;
  kb::PersistedKey k;
  k.name = "a";
  image.pools["p"].push_back(k);
  boost::json::object file = boost::json::parse(kb::SerializeState(image)).as_object();
  boost::json::object& body = file["body"].as_object();
  body["pools"].as_object()["p"].as_object()["a"].as_object()["fail_streak"] = 4294967296ull;
  char sum[40];
  std::snprintf(sum, sizeof(sum), "fnv1a64:%016" PRIx64, kb::Fnv1a64(boost::json::serialize(body)));
  file["checksum"] = sum;
  km::Result<kb::StateImage> r = kb::ParseState(boost::json::serialize(file));
  BOOST_CHECK(r.status().code() == km::Code::kCorruptState);
  BOOST_CHECK_EQUAL(r.status().message(), "key 'p/a': field 'fail_streak' must be between 0 and 4294967295");
}

// One writer for the state file (durable) and the metrics file (atomic):
// the mode is the one asked whatever the umask, the old file is replaced
// whole, and a failed write leaves the old file and no temp file behind.
BOOST_AUTO_TEST_CASE(atomic_file_replaces_whole_or_not_at_all) {
  const std::string dir = "/tmp/km-atomic-" + std::to_string(::getpid());
  std::filesystem::create_directories(dir);
  const std::string path = dir + "/f.txt";
  auto read = [](const std::string& p) {
    std::ifstream in(p);
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
  };
  const mode_t old_umask = ::umask(077);
  BOOST_CHECK(kb::WriteFileAtomically(path, "one", 0644, kb::Durability::kAtomic).ok());
  ::umask(old_umask);
  BOOST_CHECK_EQUAL(read(path), "one");
  struct stat st {};
  BOOST_REQUIRE(::stat(path.c_str(), &st) == 0);
  BOOST_CHECK_EQUAL(st.st_mode & 0777, 0644u);
  BOOST_CHECK(kb::WriteFileAtomically(path, "two, longer", 0600, kb::Durability::kDurable).ok());
  BOOST_CHECK_EQUAL(read(path), "two, longer");
  BOOST_REQUIRE(::stat(path.c_str(), &st) == 0);
  BOOST_CHECK_EQUAL(st.st_mode & 0777, 0600u);
  // The target is a directory: the rename fails, nothing is left behind.
  const std::string sub = dir + "/sub";
  std::filesystem::create_directories(sub + "/x");
  km::Status bad = kb::WriteFileAtomically(sub, "three", 0600, kb::Durability::kDurable);
  BOOST_CHECK(bad.code() == km::Code::kIoError);
  BOOST_CHECK_MESSAGE(bad.message().find("cannot rename") == 0, bad.message());
  // A directory that does not exist: refused before any temp file.
  bad = kb::WriteFileAtomically(dir + "/none/f", "x", 0600, kb::Durability::kAtomic);
  BOOST_CHECK(bad.code() == km::Code::kIoError);
  BOOST_CHECK_MESSAGE(bad.message().find("cannot stat directory " + dir + "/none") == 0, bad.message());
  size_t files = 0;
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    BOOST_CHECK_MESSAGE(e.path().filename().string().find(".tmp.") == std::string::npos, e.path());
    ++files;
  }
  BOOST_CHECK_EQUAL(files, 2u);  // f.txt and sub
  BOOST_CHECK_EQUAL(read(path), "two, longer");
  std::filesystem::remove_all(dir);
}

BOOST_AUTO_TEST_CASE(config_roles_and_socket_limits) {
  const std::string pools = R"("pools":{"p":{"keys":[{"name":"a","secret":"sk-1"}]}})";
  // Defaults: workers are the secret readers, no admins, the KM-09 caps.
  km::Result<kb::BrokerConfig> c = Parse(R"({"allow_uids":[1000],"allow_gids":[33],)" + pools + "}");
  BOOST_REQUIRE_MESSAGE(c.ok(), c.status().message());
  BOOST_CHECK(c->worker_uids == std::vector<uint32_t>{1000});
  BOOST_CHECK(c->worker_gids == std::vector<uint32_t>{33});
  BOOST_CHECK(c->admin_uids.empty() && c->admin_gids.empty());
  BOOST_CHECK_EQUAL(c->max_sessions, 1024u);
  BOOST_CHECK_EQUAL(c->max_sessions_per_uid, 256u);
  BOOST_CHECK_EQUAL(c->max_pending_acquires, 64u);
  BOOST_CHECK_EQUAL(c->max_slow_leases, 256u);
  BOOST_CHECK_EQUAL(c->frame_timeout, 5.0);
  c = Parse(R"({"allow_uids":[1000],"worker_uids":[],"worker_gids":[7],"admin_uids":[5],"admin_gids":[6],)"
            R"("max_sessions":10,"max_sessions_per_uid":2,"max_pending_acquires":3,"max_slow_leases":4,)"
            R"("frame_timeout":0.5,)" +
            pools + "}");
  BOOST_REQUIRE_MESSAGE(c.ok(), c.status().message());
  BOOST_CHECK(c->worker_uids.empty());
  BOOST_CHECK(c->worker_gids == std::vector<uint32_t>{7});
  BOOST_CHECK_EQUAL(c->max_sessions, 10u);
  BOOST_CHECK_EQUAL(c->frame_timeout, 0.5);
  BOOST_CHECK_EQUAL(ConfigError(R"({"admin_uids":[-1],)" + pools + "}").rfind("config: admin_uids[0]", 0), 0u);
  BOOST_CHECK_EQUAL(ConfigError(R"({"max_sessions":0,)" + pools + "}").rfind("config: max_sessions", 0), 0u);
  BOOST_CHECK_EQUAL(ConfigError(R"({"frame_timeout":0,)" + pools + "}").rfind("config: frame_timeout", 0), 0u);

  // Roles: root and the broker's uid hold all; readers and admins are workers.
  kb::PeerCred peer;
  const uint32_t self = 4000;
  auto roles = [&](uint32_t uid, uint32_t gid, std::vector<uint32_t> groups = {}) {
    peer.uid = uid;
    peer.gid = gid;
    peer.groups = std::move(groups);
    return kb::RolesOf(peer, *c, self);
  };
  const uint8_t all = kb::kRoleWorker | kb::kRoleReader | kb::kRoleAdmin;
  BOOST_CHECK_EQUAL(roles(0, 0), all);
  BOOST_CHECK_EQUAL(roles(self, 1), all);
  BOOST_CHECK_EQUAL(roles(1000, 1), kb::kRoleWorker | kb::kRoleReader);
  BOOST_CHECK_EQUAL(roles(5, 1), kb::kRoleWorker | kb::kRoleAdmin);
  BOOST_CHECK_EQUAL(roles(9, 7), kb::kRoleWorker);
  BOOST_CHECK_EQUAL(roles(9, 1, {3, 7}), kb::kRoleWorker);  // a supplementary group counts
  BOOST_CHECK_EQUAL(roles(9, 1, {6}), kb::kRoleWorker | kb::kRoleAdmin);
  BOOST_CHECK_EQUAL(roles(9, 1, {3}), 0);
}

// KM-07 / KM-15: only the kernel's word is death.
BOOST_AUTO_TEST_CASE(liveness_is_dead_only_when_the_kernel_says_so) {
  using km::shm::Liveness;
  using km::shm::LivenessProbe;
  LivenessProbe p;
  p.stat = km::shm::ProcStat{42, false};
  BOOST_CHECK(km::shm::ClassifyLiveness(p, 42) == Liveness::kAlive);
  BOOST_CHECK(km::shm::ClassifyLiveness(p, 41) == Liveness::kDead);  // the pid was reused
  p.stat->zombie = true;
  BOOST_CHECK(km::shm::ClassifyLiveness(p, 42) == Liveness::kDead);
  for (int err : {EACCES, EMFILE, ENFILE, ENOMEM, ENOENT}) {
    LivenessProbe q;
    q.stat_errno = err;
    q.kill_errno = EPERM;  // exists (another user's, hidden by hidepid=2 when ENOENT)
    BOOST_CHECK(km::shm::ClassifyLiveness(q, 42) == Liveness::kUnknown);
    q.kill_errno = 0;
    BOOST_CHECK(km::shm::ClassifyLiveness(q, 42) == Liveness::kUnknown);
    q.kill_errno = ESRCH;
    BOOST_CHECK(km::shm::ClassifyLiveness(q, 42) == Liveness::kDead);
  }
  // The real thing: ourselves, and a child that exited and was reaped.
  BOOST_CHECK(km::shm::CheckLiveness(km::shm::Self()) == Liveness::kAlive);
  const pid_t child = ::fork();
  if (child == 0) _exit(0);
  const std::optional<uint64_t> start = km::shm::ReadStartTime(child);
  int status = 0;
  BOOST_REQUIRE(::waitpid(child, &status, 0) == child);
  if (start) {
    BOOST_CHECK(km::shm::CheckLiveness({static_cast<uint32_t>(child), *start}) == Liveness::kDead);
    BOOST_CHECK(!km::shm::IsAlive({static_cast<uint32_t>(child), *start}));
  }
}

// KM-09: the slow path's waiters are served FIFO per peer uid, the uids in
// turn: a uid with many waiters delays another uid's one by a grant, not by
// all of its own.
BOOST_AUTO_TEST_CASE(slow_acquirer_serves_peer_uids_in_turn) {
  namespace st = km::shm::testing;
  st::TestPool t(1, st::MakeConfig(km::Strategy::kLeastBusy), km::shm::SystemClock::Instance(),
                 km::shm::Capacities{1, 64, 256}, /*max_concurrency=*/1);
  boost::asio::io_context io;
  kb::SlowAcquirer slow(io);
  km::Result<km::shm::LeaseHandle> held = t.pool->TryAcquire();
  BOOST_REQUIRE(held.ok());
  std::vector<std::string> order;
  const uint64_t deadline = km::shm::MonotonicNowNanos() + 10'000'000'000ull;
  auto enqueue = [&](uint32_t uid, const std::string& tag) {
    slow.Enqueue(t.pool.get(), km::shm::Self(), uid, deadline, 0, [&, tag](km::Result<km::shm::LeaseHandle> h) {
      BOOST_REQUIRE_MESSAGE(h.ok(), h.status().ToString());
      order.push_back(tag);
      BOOST_CHECK(t.pool->Release(*h, st::Success()).ok());  // the next waiter's turn
    });
  };
  for (int i = 0; i < 5; ++i) enqueue(1000, "a" + std::to_string(i));
  enqueue(2000, "b0");
  BOOST_REQUIRE(t.pool->Release(*held, st::Success()).ok());
  while (order.size() < 6 && km::shm::MonotonicNowNanos() < deadline) io.run_one_for(std::chrono::milliseconds(100));
  BOOST_REQUIRE_EQUAL(order.size(), 6u);
  const size_t b = static_cast<size_t>(std::find(order.begin(), order.end(), "b0") - order.begin());
  BOOST_TEST_MESSAGE("b0 served as grant " << b + 1 << " of 6");
  BOOST_CHECK_LE(b, 2u);  // a0 (perhaps already waiting in the pool), a1, then b0; FIFO would make it last
}

// KM-17: a restored cooldown is what the wall clock says is left, capped at
// the longest cooldown the pool could have set: a wall clock 10 years
// behind (RTC reset, old VM snapshot) does not bench a key for 10 years.
BOOST_AUTO_TEST_CASE(restored_cooldowns_are_capped_when_the_wall_clock_went_back) {
  km::Result<kb::BrokerConfig> c =
      Parse(R"({"socket":"s.sock","state_file":"/var/x.json","pools":{"p":{"default_cooldown":30,"max_cooldown":300,
      "keys":[{"name":"a","secret":"sk-aaaa1111"},{"name":"b","secret":"sk-bbbb2222"}]}}})");
  BOOST_REQUIRE_MESSAGE(c.ok(), c.status().message());
  km::Result<std::unique_ptr<km::shm::Segment>> seg = km::shm::Segment::CreateAnonymous(c->capacity);
  BOOST_REQUIRE(seg.ok());
  BOOST_REQUIRE(kb::ReconcileSegment(**seg, c->pools).ok());
  km::shm::PoolAdmin access(**seg, *(*seg)->FindPool("p"));

  constexpr uint64_t kSec = 1'000'000'000ull;
  const uint64_t written_wall = 1'800'000'000ull * kSec;  // when the state was captured
  const uint64_t mono_now = 5'000 * kSec;
  kb::StateImage image;
  for (const km::shm::ExportedKey& e : access.ExportKeyStates()) {
    kb::PersistedKey k;
    k.name = e.name;
    k.fingerprint = e.fingerprint;
    k.state = e.state;
    // a: 60 s of an ordinary 429 left; b: its last cooldown was 900 s (a
    // Retry-After above max_cooldown), 800 s left.
    k.state.last_cooldown = (e.name == "a" ? 60 : 900) * kSec;
    k.cooldown_until_wall_ns = written_wall + (e.name == "a" ? 60 : 800) * kSec;
    image.pools["p"].push_back(k);
  }
  auto left = [&](const std::string& name) {
    for (const km::shm::ExportedKey& e : access.ExportKeyStates()) {
      if (e.name == name) return e.state.cooldown_deadline == 0 ? 0 : (e.state.cooldown_deadline - mono_now) / kSec;
    }
    BOOST_FAIL("no key " + name);
    return uint64_t{0};
  };
  // A clock that is right: what was left.
  kb::RestoreFromImage(**seg, image, written_wall, mono_now);
  BOOST_CHECK_EQUAL(left("a"), 60u);
  BOOST_CHECK_EQUAL(left("b"), 800u);
  // Ten years behind: at most max(max_cooldown, default, last cooldown).
  const uint64_t ten_years = 10ull * 365 * 24 * 3600 * kSec;
  kb::RestoreFromImage(**seg, image, written_wall - ten_years, mono_now);
  BOOST_CHECK_EQUAL(left("a"), 300u);
  BOOST_CHECK_EQUAL(left("b"), 900u);
}

// KM-17: the wall/monotonic offset is measured at every capture, in whole
// seconds, and kept while it moved less than a second (identical bytes for
// unchanged state).
BOOST_AUTO_TEST_CASE(wall_minus_mono_is_quantized_and_follows_a_step) {
  const int64_t first = kb::WallMinusMono(std::nullopt);
  BOOST_CHECK_EQUAL(first % 1'000'000'000, 0);
  BOOST_CHECK_EQUAL(kb::WallMinusMono(first), first);
  // A previous value 10 s off (the clock was stepped since): replaced.
  const int64_t stepped = kb::WallMinusMono(first - 10'000'000'000);
  BOOST_CHECK_EQUAL(stepped, first);
  // Off by less than a second: kept.
  BOOST_CHECK_EQUAL(kb::WallMinusMono(first + 400'000'000), first + 400'000'000);
}

// KM-13: a reload changes a key's config in place, in one critical section:
// a 429, a disable and a revocation that workers set after the reconcile
// read the pool (the hook runs there) survive it, and a margin with more
// than 6 decimals compares equal the next time (compared in ppm).
namespace {
km::shm::Segment* g_reload_segment = nullptr;
int g_reload_hook_calls = 0;

void ChangeStateDuringReload(std::string_view pool, std::string_view key) {
  ++g_reload_hook_calls;
  km::shm::PoolAdmin access(*g_reload_segment, *g_reload_segment->FindPool(pool));
  if (key == "a") {
    km::shm::LimitUpdate u;
    u.retry_after = 120.0;  // a worker's 429 with Retry-After
    BOOST_REQUIRE(access.ObserveLimits("a", u).ok());
  } else if (key == "b") {
    BOOST_REQUIRE(access.SetEnabled("b", false).ok());
  } else if (key == "c") {
    km::Result<km::shm::LeaseHandle> l = access.TryAcquire();
    BOOST_REQUIRE(l.ok());
    km::shm::Outcome revoked;
    revoked.kind = km::shm::OutcomeKind::kFailure;
    revoked.permanent = true;  // a 401: the key is revoked
    (void)access.Release(*l, revoked);
  }
}

std::string ReloadConfig(int rpm) {
  return R"({"socket":"s.sock","state_file":"/var/x.json","pools":{
    "p":{"keys":[{"name":"a","secret":"sk-aaaa1111","rpm":)" +
         std::to_string(rpm) + R"(,"rate_margin":0.1234567},{"name":"b","secret":"sk-bbbb2222","rpm":)" +
         std::to_string(rpm) + R"(}]},
    "q":{"keys":[{"name":"c","secret":"sk-cccc3333","rpm":)" +
         std::to_string(rpm) + "}]}}}";
}

const km::shm::ExportedKey& Exported(const std::vector<km::shm::ExportedKey>& keys, const std::string& name) {
  for (const auto& k : keys) {
    if (k.name == name) return k;
  }
  BOOST_FAIL("no key " + name);
  return keys.front();
}
}  // namespace

BOOST_AUTO_TEST_CASE(reload_keeps_what_workers_set_meanwhile) {
  km::Result<kb::BrokerConfig> before = Parse(ReloadConfig(10));
  km::Result<kb::BrokerConfig> after = Parse(ReloadConfig(20));
  BOOST_REQUIRE_MESSAGE(before.ok(), before.status().message());
  BOOST_REQUIRE(after.ok());
  km::Result<std::unique_ptr<km::shm::Segment>> seg = km::shm::Segment::CreateAnonymous(before->capacity);
  BOOST_REQUIRE(seg.ok());
  BOOST_REQUIRE(kb::ReconcileSegment(**seg, before->pools).ok());
  g_reload_segment = seg->get();
  g_reload_hook_calls = 0;
  kb::SetReconcileHookForTesting(&ChangeStateDuringReload);
  struct Unhook {
    ~Unhook() { kb::SetReconcileHookForTesting(nullptr); }
  } unhook;
  const uint64_t now = km::shm::MonotonicNowNanos();
  BOOST_REQUIRE(kb::ReconcileSegment(**seg, after->pools).ok());
  BOOST_CHECK_EQUAL(g_reload_hook_calls, 3);

  km::shm::PoolAdmin p(**seg, *(*seg)->FindPool("p"));
  km::shm::PoolAdmin q(**seg, *(*seg)->FindPool("q"));
  const auto pk = p.ExportKeyStates();
  const auto qk = q.ExportKeyStates();
  BOOST_CHECK_GT(Exported(pk, "a").state.cooldown_deadline, now + 100'000'000'000ull);  // the 429 stayed
  BOOST_CHECK(!Exported(pk, "b").state.enabled);                                        // the disable stayed
  BOOST_CHECK_EQUAL(Exported(qk, "c").state.circuit, static_cast<uint32_t>(km::shm::Circuit::kRevoked));
  BOOST_CHECK_EQUAL(p.AvailableCount(), 0u);
  BOOST_CHECK_EQUAL(q.AvailableCount(), 0u);
  // The new config is in place.
  km::Result<km::PoolStatus> snap = p.Snapshot();
  BOOST_REQUIRE(snap.ok());
  for (const km::KeyStatus& k : snap->keys) BOOST_CHECK_EQUAL(k.rpm, 20u);

  // The same config again: nothing to change (0.1234567 compares in ppm).
  g_reload_hook_calls = 0;
  BOOST_REQUIRE(kb::ReconcileSegment(**seg, after->pools).ok());
  BOOST_CHECK_EQUAL(g_reload_hook_calls, 0);
}

// KM-26: two discards within one second keep both files; temp files a dead
// writer left beside the state file are removed at start, nothing else.
BOOST_AUTO_TEST_CASE(move_aside_never_overwrites_and_stale_temps_go) {
  const ScratchDir scratch("kmu-aside-");
  const std::string& dir = scratch.path;
  const std::string path = dir + "/state.json";
  std::ofstream(path) << "first";
  km::Result<std::string> a = kb::MoveAside(path);
  std::ofstream(path) << "second";
  km::Result<std::string> b = kb::MoveAside(path);
  BOOST_REQUIRE(a.ok() && b.ok());
  BOOST_CHECK(*a != *b);
  BOOST_CHECK(std::filesystem::exists(*a) && std::filesystem::exists(*b));

  for (const char* name : {"state.json.tmp.123", "state.json.tmp.9", "state.json.tmp.77.0123456789abcdef",
                           "state.json.tmp.x1", "state.json.tmp.7.zz", "other.tmp.5"}) {
    std::ofstream(dir + "/" + name) << "junk";
  }
  std::vector<std::string> removed = kb::RemoveStaleTempFiles(path);
  std::sort(removed.begin(), removed.end());
  BOOST_CHECK(removed ==
              (std::vector<std::string>{dir + "/state.json.tmp.123", dir + "/state.json.tmp.77.0123456789abcdef",
                                        dir + "/state.json.tmp.9"}));
  BOOST_CHECK(std::filesystem::exists(dir + "/state.json.tmp.7.zz"));
  BOOST_CHECK(std::filesystem::exists(dir + "/state.json.tmp.x1"));
  BOOST_CHECK(std::filesystem::exists(dir + "/other.tmp.5"));
}

namespace {

// A MeshStore whose Redis is never there: every call fails as an
// unreachable Redis does (kIoError naming the endpoint).
class UnreachableStore : public kb::mesh::MeshStore {
 public:
  km::Status Connect() override { return Down(); }
  bool connected() const override { return false; }
  void Disconnect() override {}
  km::Result<kb::mesh::LeaseReply> Lease(const kb::mesh::LeaseRequest&) override { return Down(); }
  km::Status Leave(const std::string&) override { return Down(); }
  km::Result<kb::mesh::KeyEvent> Publish(const kb::mesh::KeyEvent&) override { return Down(); }
  km::Result<kb::mesh::EventBatch> ReadEvents(const std::string&, uint32_t) override { return Down(); }
  km::Result<kb::mesh::EventBatch> Snapshot() override { return Down(); }
  km::Result<bool> ClaimProbe(const std::string&, const std::string&, const std::string&, uint64_t) override {
    return Down();
  }
  km::Result<TimeSample> Time() override { return Down(); }
  void Interrupt() override {}

 private:
  static km::Status Down() { return km::Status(km::Code::kIoError, "mesh: redis 127.0.0.1:1: connection refused"); }
};

}  // namespace

// The `mesh` op's report carries every field of the job's status, the mode
// by name; without a mesh only enabled=false.
BOOST_AUTO_TEST_CASE(mesh_report_carries_every_status_field) {
  kb::mesh::MeshStatus s;
  BOOST_CHECK(!kb::ops::MeshReportOf(s).enabled);
  s.enabled = true;
  s.host = "web-1";
  s.ns = "ns";
  s.redis = "127.0.0.1:6379";
  s.mode = kb::mesh::MeshMode::kLearning;
  s.redis_ok = true;
  s.last_error = "e";
  s.rtt_seconds = 0.001;
  s.since_refresh = 0.5;
  s.lease_remaining = 29.5;
  s.hosts = 3;
  s.members = {"web-1", "web-2", "web-3"};
  s.epoch = "ep";
  s.refreshes = 10;
  s.refresh_failures = 1;
  s.events_published = 2;
  s.events_applied = 3;
  s.resyncs = 4;
  s.rebalances = 5;
  s.propagation_p50 = 0.002;
  s.propagation_p99 = 0.01;
  s.propagation_samples = 7;
  s.keys.push_back({"p", "a", 600, 1000, 190, 316, 2.5, 200, 300, 3, true});
  const km::protocol::MeshReport r = kb::ops::MeshReportOf(s);
  BOOST_CHECK(r.enabled && r.redis_ok);
  BOOST_CHECK_EQUAL(r.host, "web-1");
  BOOST_CHECK_EQUAL(r.ns, "ns");
  BOOST_CHECK_EQUAL(r.redis, "127.0.0.1:6379");
  BOOST_CHECK_EQUAL(r.mode, "learning");
  BOOST_CHECK_EQUAL(r.last_error, "e");
  BOOST_CHECK_EQUAL(r.rtt_seconds, 0.001);
  BOOST_CHECK_EQUAL(r.since_refresh, 0.5);
  BOOST_CHECK_EQUAL(r.lease_remaining, 29.5);
  BOOST_CHECK_EQUAL(r.hosts, 3u);
  BOOST_CHECK(r.members == s.members);
  BOOST_CHECK_EQUAL(r.epoch, "ep");
  BOOST_CHECK_EQUAL(r.refreshes, 10u);
  BOOST_CHECK_EQUAL(r.refresh_failures, 1u);
  BOOST_CHECK_EQUAL(r.events_published, 2u);
  BOOST_CHECK_EQUAL(r.events_applied, 3u);
  BOOST_CHECK_EQUAL(r.resyncs, 4u);
  BOOST_CHECK_EQUAL(r.rebalances, 5u);
  BOOST_CHECK_EQUAL(r.propagation_p50, 0.002);
  BOOST_CHECK_EQUAL(r.propagation_p99, 0.01);
  BOOST_CHECK_EQUAL(r.propagation_samples, 7u);
  BOOST_REQUIRE_EQUAL(r.keys.size(), 1u);
  const km::protocol::MeshReport::Key& k = r.keys[0];
  BOOST_CHECK_EQUAL(k.pool, "p");
  BOOST_CHECK_EQUAL(k.key, "a");
  BOOST_CHECK_EQUAL(k.limit_rpm, 600.0);
  BOOST_CHECK_EQUAL(k.limit_tpm, 1000.0);
  BOOST_CHECK_EQUAL(k.share_rpm, 190.0);
  BOOST_CHECK_EQUAL(k.share_tpm, 316.0);
  BOOST_CHECK_EQUAL(k.burst, 2.5);
  BOOST_CHECK_EQUAL(k.wants_rpm, 200.0);
  BOOST_CHECK_EQUAL(k.wants_tpm, 300.0);
  BOOST_CHECK_EQUAL(k.holders, 3u);
  BOOST_CHECK(k.mismatch);
  for (kb::mesh::MeshMode mode : {kb::mesh::MeshMode::kLeased, kb::mesh::MeshMode::kLearning,
                                  kb::mesh::MeshMode::kShare, kb::mesh::MeshMode::kClosed, kb::mesh::MeshMode::kOpen}) {
    s.mode = mode;
    BOOST_CHECK_EQUAL(kb::ops::MeshReportOf(s).mode, kb::mesh::MeshModeName(mode));
  }
}

// A mesh job whose Redis is unreachable (a fake store) reports at once:
// enabled, redis not ok, the outage mode `share`, no lease.
BOOST_AUTO_TEST_CASE(mesh_report_with_an_unreachable_redis) {
  kb::mesh::MeshConfig config;
  config.host = "lonely";
  config.redis.host = "127.0.0.1";
  config.redis.port = 1;
  config.refresh = 0.05;
  kb::mesh::MeshJob job(config, [] { return std::make_unique<UnreachableStore>(); });
  job.Start();
  const auto start = std::chrono::steady_clock::now();
  const km::protocol::MeshReport r = kb::ops::MeshReportOf(job.Status());
  BOOST_CHECK(std::chrono::steady_clock::now() - start < std::chrono::milliseconds(50));
  BOOST_CHECK(r.enabled);
  BOOST_CHECK(!r.redis_ok);
  BOOST_CHECK_EQUAL(r.mode, "share");
  BOOST_CHECK_EQUAL(r.host, "lonely");
  BOOST_CHECK_EQUAL(r.redis, "127.0.0.1:1");
  BOOST_CHECK_EQUAL(r.lease_remaining, 0.0);
  BOOST_CHECK_EQUAL(r.refreshes, 0u);
  job.Stop();
}
