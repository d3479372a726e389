// Whoever can map the segment is exactly whoever may act as a worker
// (ARCHITECTURE.md invariant 9): the broker sets the segment's access list
// from the config, at start and at every reload. Peers of other uids are
// real processes (root drops to uid nobody); CI runs as root.
#define BOOST_TEST_MODULE segment_access_test
#include "broker/segment_access.h"

#include <fcntl.h>
#include <grp.h>
#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <string>
#include <vector>

#include <boost/test/unit_test.hpp>

#include "support/broker_harness.h"
#include "support/process.h"

namespace kb = keymesh::broker;
namespace kt = keymesh::testing;

namespace {

constexpr uint32_t kNobody = 65534;
constexpr uint32_t kSomeGroup = 4343;  // not nobody's group, not root's
constexpr const char* kPools = R"({"p":{"keys":[{"name":"a","secret":"sk-test-aaaaaaaaaaaa1111"}]}})";

bool RunningAsRoot() { return ::geteuid() == 0; }

// In a child running as uid nobody with primary gid `gid` and the given
// supplementary groups: 0 if it can open the segment read-write, the errno
// otherwise (100+ for a set-up failure).
int OpenAs(const std::string& segment, uint32_t gid, const std::vector<gid_t>& groups) {
  const pid_t child = kt::ForkChild([&] {
    if (::setgroups(groups.size(), groups.data()) != 0) return 101;
    if (::setgid(gid) != 0 || ::setuid(kNobody) != 0) return 102;
    const int fd = ::open(("/dev/shm/" + segment).c_str(), O_RDWR | O_CLOEXEC);
    if (fd < 0) return errno;
    ::close(fd);
    return 0;
  });
  return kt::WaitChild(child);
}

struct AclEntry {
  uint16_t tag, perm;
  uint32_t id;
};

std::vector<AclEntry> Decode(const std::string& acl) {
  auto le = [&](size_t at, int bytes) {
    uint64_t v = 0;
    for (int i = bytes - 1; i >= 0; --i) v = v << 8 | static_cast<unsigned char>(acl[at + static_cast<size_t>(i)]);
    return v;
  };
  std::vector<AclEntry> out;
  for (size_t at = 4; at + 8 <= acl.size(); at += 8) {
    out.push_back(
        {static_cast<uint16_t>(le(at, 2)), static_cast<uint16_t>(le(at + 2, 2)), static_cast<uint32_t>(le(at + 4, 4))});
  }
  return out;
}

const auto kNeedsRoot = boost::unit_test::precondition([](boost::unit_test::test_unit_id) { return RunningAsRoot(); });

}  // namespace

BOOST_AUTO_TEST_CASE(the_access_list_names_each_worker_once_and_nobody_else) {
  const std::string acl = kb::WorkerAcl({7, 5, 7}, {9});
  BOOST_REQUIRE_EQUAL(acl.size(), 4u + 7 * 8);
  BOOST_CHECK_EQUAL(acl.substr(0, 4), std::string("\x02\x00\x00\x00", 4));
  const std::vector<AclEntry> e = Decode(acl);
  // Sorted by tag then id, as the kernel requires.
  const std::vector<std::pair<uint16_t, uint32_t>> want = {{0x01, 0xffffffffu}, {0x02, 5}, {0x02, 7},
                                                           {0x04, 0xffffffffu}, {0x08, 9}, {0x10, 0xffffffffu},
                                                           {0x20, 0xffffffffu}};
  for (size_t i = 0; i < want.size(); ++i) {
    BOOST_CHECK_EQUAL(e[i].tag, want[i].first);
    BOOST_CHECK_EQUAL(e[i].id, want[i].second);
  }
  BOOST_CHECK_EQUAL(e[0].perm, 6);  // owner rw
  BOOST_CHECK_EQUAL(e[3].perm, 0);  // the owning group as such: nothing
  BOOST_CHECK_EQUAL(e[6].perm, 0);  // others: nothing
  // No worker: the mask closes every group entry too.
  BOOST_CHECK_EQUAL(Decode(kb::WorkerAcl({}, {}))[2].perm, 0);
}

BOOST_AUTO_TEST_CASE(only_configured_workers_can_open_the_segment, *kNeedsRoot) {
  kt::BrokerProcess b;
  b.WriteConfig(kPools, R"(,"allow_uids":[65534],"allow_gids":[4343])");
  BOOST_REQUIRE(b.Start());
  const std::string segment = b.segment();
  BOOST_REQUIRE(!segment.empty());
  BOOST_CHECK_EQUAL(OpenAs(segment, kNobody, {}), 0);  // listed by uid
  BOOST_CHECK_EQUAL(b.Stop(), 0);

  kt::BrokerProcess c;
  c.WriteConfig(kPools, R"(,"allow_uids":[4242],"allow_gids":[4343])");
  BOOST_REQUIRE(c.Start());
  const std::string other = c.segment();
  BOOST_CHECK_EQUAL(OpenAs(other, kNobody, {}), EACCES);  // not listed
  // Members of the broker's own group (root's here) are not workers as such:
  // the mode bits no longer grant the owning group anything.
  BOOST_CHECK_EQUAL(OpenAs(other, 0, {}), EACCES);
  // A listed group counts also as a supplementary group only.
  BOOST_CHECK_EQUAL(OpenAs(other, kNobody, {static_cast<gid_t>(kSomeGroup)}), 0);
}

BOOST_AUTO_TEST_CASE(a_reload_that_drops_a_worker_stops_it_opening_the_segment, *kNeedsRoot) {
  kt::BrokerProcess b;
  b.WriteConfig(kPools, R"(,"allow_uids":[65534])");
  BOOST_REQUIRE(b.Start());
  const std::string segment = b.segment();
  BOOST_REQUIRE_EQUAL(OpenAs(segment, kNobody, {}), 0);
  b.WriteConfig(kPools, R"(,"allow_uids":[4242])");
  b.Signal(SIGHUP);
  BOOST_REQUIRE(b.WaitLog("event=reloaded", 5));
  BOOST_CHECK_EQUAL(OpenAs(segment, kNobody, {}), EACCES);
  // And back, as a worker that may not read secrets: still a worker.
  b.WriteConfig(kPools, R"(,"allow_uids":[4242],"worker_uids":[65534])");
  b.Signal(SIGHUP);
  BOOST_REQUIRE(b.WaitLog("event=reloaded", 5, 2));
  BOOST_CHECK_EQUAL(OpenAs(segment, kNobody, {}), 0);
}
