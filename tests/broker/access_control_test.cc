// Access control on the broker's socket (KM-03, KM-04, KM-20): the peer's
// role is checked for every op, hello names the peer's own pid, and a
// connection's slow-path leases end with it. The peers are real processes
// running as uid nobody (forked, setgroups/setgid/setuid, which is what
// setpriv --reuid/--regid/--groups does), against the real broker binary.
#define BOOST_TEST_MODULE access_control
#include <grp.h>
#include <sched.h>
#include <sys/stat.h>
#include <unistd.h>

#include <string>
#include <vector>

#include <boost/test/unit_test.hpp>

#include "protocol/control_client.h"
#include "support/broker_harness.h"

using keymesh::testing::BrokerProcess;
using keymesh::testing::ForkChild;
using keymesh::testing::NowSeconds;
using keymesh::testing::RawClient;
using keymesh::testing::WaitChild;

namespace {

constexpr uint32_t kNobody = 65534;
constexpr uint32_t kNogroup = 65534;
constexpr uint32_t kSupplementary = 4343;  // a group nobody is not in by default

const std::string kPools = R"({"p":{"keys":[{"name":"a","secret":"sk-acl-aaaaaaaaaaaa1111","max_concurrency":1},)"
                           R"({"name":"b","secret":"sk-acl-bbbbbbbbbbbb2222","max_concurrency":1}]}})";

bool RunningAsRoot() { return ::geteuid() == 0; }
#define NEEDS_ROOT *boost::unit_test::precondition([](boost::unit_test::test_unit_id) { return RunningAsRoot(); })

std::string ErrorCode(const std::optional<boost::json::object>& r) {
  if (!r) return "(no reply)";
  if (r->at("ok").as_bool()) return "ok";
  return std::string(r->at("error").as_object().at("code").as_string());
}

// Starts the broker and opens its directory and socket to everyone, so
// the broker's role check (not the file mode) is what decides.
void StartOpen(BrokerProcess& b, const std::string& extra) {
  b.WriteConfig(kPools, extra);
  BOOST_REQUIRE(b.Start());
  BOOST_REQUIRE(::chmod(b.dir().c_str(), 0755) == 0);
  BOOST_REQUIRE(::chmod(b.socket().c_str(), 0666) == 0);
}

// Becomes nobody, with `groups` as its only supplementary groups. Returns
// false if it could not.
bool BecomeNobody(const std::vector<gid_t>& groups = {}) {
  return ::setgroups(groups.size(), groups.data()) == 0 && ::setgid(kNogroup) == 0 && ::setuid(kNobody) == 0;
}

boost::json::object Hello() { return {{"pid", static_cast<int64_t>(::getpid())}}; }

// In-flight count of every key of pool p, summed.
int64_t InFlight(const BrokerProcess& b) {
  RawClient c(b.socket());
  std::optional<boost::json::object> r = c.Call("status", {{"pool", "p"}});
  if (!r || !r->at("ok").as_bool()) return -1;
  int64_t n = 0;
  for (const auto& k : r->at("pools").as_array()[0].as_object().at("keys").as_array()) {
    n += k.as_object().at("active_requests").to_number<int64_t>();
  }
  return n;
}

}  // namespace

BOOST_AUTO_TEST_CASE(uid_in_no_list_is_refused_hello_acquire_and_status, NEEDS_ROOT) {
  BrokerProcess b;
  StartOpen(b, R"(,"allow_uids":[4242],"worker_uids":[4243],"admin_uids":[4244])");
  const std::string sock = b.socket();
  const pid_t child = ForkChild([&] {
    if (!BecomeNobody()) return 100;
    RawClient c(sock);
    if (!c.connected()) return 1;
    if (ErrorCode(c.Call("hello", Hello())) != "permission_denied") return 2;
    if (ErrorCode(c.Call("acquire", {{"pool", "p"}})) != "permission_denied") return 3;
    if (ErrorCode(c.Call("status", {})) != "permission_denied") return 4;
    if (ErrorCode(c.Call("metrics", {})) != "permission_denied") return 5;
    if (ErrorCode(c.Call("mesh", {})) != "permission_denied") return 9;
    if (ErrorCode(c.Call("secrets", {{"pool", "p"}})) != "permission_denied") return 6;
    if (ErrorCode(c.Call("disable", {{"pool", "p"}, {"name", "a"}})) != "permission_denied") return 7;
    if (ErrorCode(c.Call("release", {{"pool", "p"}, {"slot", 0}, {"lease", 0}, {"seq", 1}})) != "permission_denied")
      return 8;
    return 0;
  });
  BOOST_CHECK_EQUAL(WaitChild(child), 0);
  BOOST_CHECK(b.WaitLog("event=hello_refused", 5));
  BOOST_CHECK_EQUAL(InFlight(b), 0);
}

BOOST_AUTO_TEST_CASE(worker_only_uid_acquires_but_is_refused_secrets_and_admin_ops, NEEDS_ROOT) {
  BrokerProcess b;
  StartOpen(b, R"(,"allow_uids":[4242],"worker_uids":[65534])");
  const std::string sock = b.socket();
  const pid_t child = ForkChild([&] {
    if (!BecomeNobody()) return 100;
    RawClient c(sock);
    if (!c.connected()) return 1;
    if (ErrorCode(c.Call("hello", Hello())) != "ok") return 2;
    std::optional<boost::json::object> a = c.Call("acquire", {{"pool", "p"}, {"timeout", 1.0}});
    if (ErrorCode(a) != "ok") return 3;
    if (ErrorCode(c.Call("status", {})) != "ok") return 4;
    if (ErrorCode(c.Call("mesh", {})) != "ok") return 10;  // a status reader's op
    if (ErrorCode(c.Call("secrets", {{"pool", "p"}})) != "permission_denied") return 5;
    for (const char* op : {"disable", "enable", "reset", "remove_key"}) {
      if (ErrorCode(c.Call(op, {{"pool", "p"}, {"name", "a"}})) != "permission_denied") return 6;
    }
    if (ErrorCode(c.Call("reclaim", {{"pid", 1}})) != "permission_denied") return 7;
    boost::json::object end{{"pool", "p"}, {"slot", a->at("slot")}, {"lease", a->at("lease")}, {"seq", a->at("seq")}};
    boost::json::object permanent = end;
    permanent["permanent"] = true;
    // A revocation is not a worker's to make; the lease is still held.
    if (ErrorCode(c.Call("mark_failed", permanent)) != "permission_denied") return 8;
    if (ErrorCode(c.Call("release", end)) != "ok") return 9;
    return 0;
  });
  BOOST_CHECK_EQUAL(WaitChild(child), 0);
  BOOST_CHECK_EQUAL(InFlight(b), 0);
  // No key was revoked or disabled.
  RawClient c(b.socket());
  std::optional<boost::json::object> st = c.Call("status", {{"pool", "p"}});
  BOOST_REQUIRE(st && st->at("ok").as_bool());
  for (const auto& k : st->at("pools").as_array()[0].as_object().at("keys").as_array()) {
    BOOST_CHECK_EQUAL(k.as_object().at("state").as_string(), "available");
  }
}

BOOST_AUTO_TEST_CASE(admin_uid_changes_keys_but_reads_no_secrets, NEEDS_ROOT) {
  BrokerProcess b;
  StartOpen(b, R"(,"admin_uids":[65534])");
  const std::string sock = b.socket();
  const pid_t child = ForkChild([&] {
    if (!BecomeNobody()) return 100;
    RawClient c(sock);
    if (ErrorCode(c.Call("disable", {{"pool", "p"}, {"name", "a"}})) != "ok") return 1;
    if (ErrorCode(c.Call("enable", {{"pool", "p"}, {"name", "a"}})) != "ok") return 2;
    if (ErrorCode(c.Call("secrets", {{"pool", "p"}})) != "permission_denied") return 3;
    if (ErrorCode(c.Call("hello", Hello())) != "ok") return 4;  // an admin is a worker too
    return 0;
  });
  BOOST_CHECK_EQUAL(WaitChild(child), 0);
}

BOOST_AUTO_TEST_CASE(supplementary_group_counts, NEEDS_ROOT) {
  BrokerProcess b;
  StartOpen(b, R"(,"allow_gids":[4343])");
  const std::string sock = b.socket();
  // The group only as a supplementary group (the primary gid is nogroup).
  const pid_t member = ForkChild([&] {
    if (!BecomeNobody({kSupplementary})) return 100;
    if (::getegid() == kSupplementary) return 101;
    RawClient c(sock);
    if (ErrorCode(c.Call("hello", Hello())) != "ok") return 1;
    if (ErrorCode(c.Call("secrets", {{"pool", "p"}})) != "ok") return 2;
    return 0;
  });
  BOOST_CHECK_EQUAL(WaitChild(member), 0);
  // Without it: refused.
  const pid_t outsider = ForkChild([&] {
    if (!BecomeNobody({})) return 100;
    RawClient c(sock);
    if (ErrorCode(c.Call("secrets", {{"pool", "p"}})) != "permission_denied") return 1;
    return 0;
  });
  BOOST_CHECK_EQUAL(WaitChild(outsider), 0);
}

BOOST_AUTO_TEST_CASE(hello_must_name_the_peers_own_pid) {
  BrokerProcess b;
  b.WriteConfig(kPools);
  BOOST_REQUIRE(b.Start());
  RawClient c(b.socket());
  BOOST_REQUIRE(c.connected());
  // Someone else's pid (one that never dies) is refused...
  BOOST_CHECK_EQUAL(ErrorCode(c.Call("hello", {{"pid", 1}})), "invalid_argument");
  BOOST_CHECK_EQUAL(ErrorCode(c.Call("acquire", {{"pool", "p"}})), "protocol_error");  // still no holder
  // ...so is our pid with another start time...
  BOOST_CHECK_EQUAL(ErrorCode(c.Call("hello", {{"pid", static_cast<int64_t>(::getpid())}, {"start_time", 1}})),
                    "invalid_argument");
  // ...our own is accepted, and a second hello may not switch to another.
  BOOST_CHECK_EQUAL(ErrorCode(c.Call("hello", Hello())), "ok");
  BOOST_CHECK_EQUAL(ErrorCode(c.Call("hello", {{"pid", static_cast<int64_t>(b.pid())}})), "invalid_argument");
  std::optional<boost::json::object> hi = c.Call("hello", Hello());
  BOOST_REQUIRE_EQUAL(ErrorCode(hi), "ok");
  BOOST_CHECK(!hi->contains("broker_pid"));  // not needed by any client
}

BOOST_AUTO_TEST_CASE(slow_leases_end_when_the_connection_closes) {
  BrokerProcess b;
  b.WriteConfig(kPools);
  BOOST_REQUIRE(b.Start());
  // A child takes both keys over the socket and exits without ending them
  // (the attack of KM-04 with its own pid: nothing outlives the connection).
  const std::string sock = b.socket();
  keymesh::testing::Latch held, go;
  const pid_t child = ForkChild([&] {
    RawClient c(sock);
    // The attack: leases under pid 1 (which never dies), then our own
    // hello, then close. Now hello(1) is refused and the leases are ours.
    (void)c.Call("hello", {{"pid", 1}});
    const bool as_pid1 = ErrorCode(c.Call("acquire", {{"pool", "p"}, {"timeout", 0}})) == "ok";
    if (ErrorCode(c.Call("hello", Hello())) != "ok") return 1;
    for (int i = as_pid1 ? 1 : 0; i < 2; ++i) {
      if (ErrorCode(c.Call("acquire", {{"pool", "p"}, {"timeout", 0}})) != "ok") return 2;
    }
    held.Notify();
    if (go.Wait(10) == 0) return 3;
    return 0;  // closes the connection with the leases held
  });
  BOOST_REQUIRE(held.Wait(10));
  BOOST_CHECK_EQUAL(InFlight(b), 2);
  go.Notify();
  BOOST_CHECK_EQUAL(WaitChild(child), 0);
  const double closed = NowSeconds();
  int64_t n = -1;
  while ((n = InFlight(b)) != 0 && NowSeconds() < closed + 1.0) {
  }
  const double took = NowSeconds() - closed;
  BOOST_CHECK_EQUAL(n, 0);
  BOOST_CHECK_LT(took, 0.1);
}

BOOST_AUTO_TEST_CASE(a_lease_ended_over_another_connection_is_forgotten_by_the_first) {
  BrokerProcess b;
  b.WriteConfig(kPools, R"(,"max_slow_leases":1)");
  BOOST_REQUIRE(b.Start());
  RawClient first(b.socket()), second(b.socket());
  BOOST_REQUIRE_EQUAL(ErrorCode(first.Call("hello", Hello())), "ok");
  BOOST_REQUIRE_EQUAL(ErrorCode(second.Call("hello", Hello())), "ok");
  for (int round = 0; round < 3; ++round) {
    std::optional<boost::json::object> a = first.Call("acquire", {{"pool", "p"}, {"timeout", 0}});
    BOOST_REQUIRE_EQUAL(ErrorCode(a), "ok");
    // At the cap: the next one on this connection is refused.
    BOOST_CHECK_EQUAL(ErrorCode(first.Call("acquire", {{"pool", "p"}, {"timeout", 0}})), "capacity_exceeded");
    BOOST_REQUIRE_EQUAL(
        ErrorCode(second.Call(
            "release", {{"pool", "p"}, {"slot", a->at("slot")}, {"lease", a->at("lease")}, {"seq", a->at("seq")}})),
        "ok");
  }
}

// KM-09: connections are capped per uid (root and the broker's uid are not
// counted per uid) and in all; a refused one gets one error line and EOF.
BOOST_AUTO_TEST_CASE(connections_are_capped_per_uid_and_in_all, NEEDS_ROOT) {
  BrokerProcess b;
  StartOpen(b, R"(,"worker_uids":[65534],"max_sessions_per_uid":2,"max_sessions":4)");
  const std::string sock = b.socket();
  const pid_t child = ForkChild([&] {
    if (!BecomeNobody()) return 100;
    RawClient one(sock), two(sock);
    if (ErrorCode(one.Call("status", {})) != "ok" || ErrorCode(two.Call("status", {})) != "ok") return 1;
    RawClient three(sock);
    std::optional<std::string> line = three.ReadLine(5);
    if (!line || line->find("max_sessions_per_uid") == std::string::npos) return 2;
    if (!three.WaitClosed(5)) return 3;
    return 0;
  });
  BOOST_CHECK_EQUAL(WaitChild(child), 0);
  // In all: four at most, root's included.
  std::vector<std::unique_ptr<RawClient>> open;
  for (int i = 0; i < 4; ++i) {
    open.push_back(std::make_unique<RawClient>(b.socket()));
    BOOST_CHECK_EQUAL(ErrorCode(open.back()->Call("status", {})), "ok");
  }
  RawClient fifth(b.socket());
  std::optional<std::string> line = fifth.ReadLine(5);
  BOOST_REQUIRE(line);
  BOOST_CHECK(line->find("max_sessions") != std::string::npos);
  BOOST_CHECK(fifth.WaitClosed(5));
  // The clients report the broker's reason, not a protocol error.
  keymesh::protocol::ControlClient client{keymesh::protocol::ControlClientOptions(b.socket())};
  keymesh::Result<boost::json::object> refused = client.Call(keymesh::protocol::Op::kStatus, {});
  BOOST_CHECK(refused.status().code() == keymesh::Code::kCapacityExceeded);
  BOOST_CHECK(refused.status().message().find("max_sessions") != std::string::npos);
  open.pop_back();
  // The broker notices the close on its next read; then there is room again.
  bool served = false;
  for (const double end = NowSeconds() + 5; !served && NowSeconds() < end;) {
    RawClient again(b.socket());
    served = ErrorCode(again.Call("status", {})) == "ok";
  }
  BOOST_CHECK(served);
}

// KM-15: a worker in another pid namespace names a pid the broker cannot
// use; hello says so instead of watching an unrelated process.
BOOST_AUTO_TEST_CASE(hello_from_another_pid_namespace_is_refused_clearly, NEEDS_ROOT) {
  BrokerProcess b;
  b.WriteConfig(kPools);
  BOOST_REQUIRE(b.Start());
  const std::string sock = b.socket();
  const pid_t child = ForkChild([&] {
    if (::unshare(CLONE_NEWPID) != 0) return 100;
    // The next child is pid 1 of the new namespace.
    const pid_t inner = ForkChild([&] {
      RawClient c(sock);
      std::optional<boost::json::object> r = c.Call("hello", Hello());
      if (ErrorCode(r) != "invalid_argument") return 1;
      const std::string message(r->at("error").as_object().at("message").as_string());
      return message.find("pid namespace") != std::string::npos ? 0 : 2;
    });
    return WaitChild(inner);
  });
  BOOST_CHECK_EQUAL(WaitChild(child), 0);
}
