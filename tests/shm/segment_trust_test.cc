// Who may create and open a named segment (KM-02) and what creation
// guarantees (KM-18): the fd of every segment is checked before it is
// mapped (regular file, no bits for others, the expected owner, the size
// its header says), and creation allocates every page so a full tmpfs is an
// error at creation, not SIGBUS later.
#define BOOST_TEST_MODULE segment_trust
#include <fcntl.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>

#include <boost/test/unit_test.hpp>

#include "support/shm_fixtures.h"

namespace km = keymesh;
namespace ks = keymesh::shm;
using ks::testing::SegmentNameGuard;
using ks::testing::UniqueSegmentName;

namespace {

constexpr uid_t kNobody = 65534;

ks::Capacities SmallCaps() {
  ks::Capacities caps;
  caps.max_pools = 1;
  caps.keys_per_pool = 4;
  caps.leases_per_pool = 8;
  return caps;
}

std::string ShmPath(const std::string& name) { return "/dev/shm/" + name; }

bool Contains(const std::string& text, const std::string& needle) { return text.find(needle) != std::string::npos; }

}  // namespace

BOOST_AUTO_TEST_CASE(created_segment_is_ours_private_and_fully_allocated) {
  SegmentNameGuard guard(UniqueSegmentName("trust"));
  auto seg = ks::Segment::CreateNamed(guard.name, SmallCaps());
  BOOST_REQUIRE_MESSAGE(seg.ok(), seg.status().ToString());
  struct stat st {};
  BOOST_REQUIRE_EQUAL(::stat(ShmPath(guard.name).c_str(), &st), 0);
  BOOST_CHECK_EQUAL(st.st_mode & 07777, 0660u);
  BOOST_CHECK_EQUAL(st.st_uid, ::geteuid());
  BOOST_CHECK_EQUAL(static_cast<uint64_t>(st.st_size), (*seg)->header()->segment_size);
  // posix_fallocate: every block is there (a sparse file has fewer).
  BOOST_CHECK_GE(static_cast<uint64_t>(st.st_blocks) * 512, (*seg)->header()->segment_size);
  // O_EXCL: a second create of the same name never takes the file over.
  auto again = ks::Segment::CreateNamed(guard.name, SmallCaps());
  BOOST_REQUIRE(!again.ok());
  BOOST_CHECK(again.status().code() == km::Code::kAlreadyExists);
  // Our own segment opens, with and without an owner to check.
  BOOST_CHECK(ks::Segment::Open(guard.name, ::geteuid()).ok());
  BOOST_CHECK(ks::Segment::Open(guard.name).ok());
}

BOOST_AUTO_TEST_CASE(open_refuses_a_segment_others_may_open) {
  SegmentNameGuard guard(UniqueSegmentName("trust"));
  BOOST_REQUIRE(ks::Segment::CreateNamed(guard.name, SmallCaps()).ok());
  BOOST_REQUIRE_EQUAL(::chmod(ShmPath(guard.name).c_str(), 0666), 0);
  for (bool with_owner : {true, false}) {
    auto seg = with_owner ? ks::Segment::Open(guard.name, ::geteuid()) : ks::Segment::Open(guard.name);
    BOOST_REQUIRE(!seg.ok());
    BOOST_CHECK(seg.status().code() == km::Code::kPermissionDenied);
    BOOST_CHECK_MESSAGE(Contains(seg.status().message(), "mode 0666"), seg.status().message());
  }
}

BOOST_AUTO_TEST_CASE(open_refuses_a_segment_owned_by_another_uid) {
  if (::geteuid() != 0) {
    BOOST_TEST_MESSAGE("skipped: chown to another uid needs root (CI runs as root)");
    return;
  }
  SegmentNameGuard guard(UniqueSegmentName("trust"));
  BOOST_REQUIRE(ks::Segment::CreateNamed(guard.name, SmallCaps()).ok());
  BOOST_REQUIRE_EQUAL(::chown(ShmPath(guard.name).c_str(), kNobody, kNobody), 0);
  auto seg = ks::Segment::Open(guard.name, ::geteuid());
  BOOST_REQUIRE(!seg.ok());
  BOOST_CHECK(seg.status().code() == km::Code::kPermissionDenied);
  BOOST_CHECK_MESSAGE(Contains(seg.status().message(), "owned by uid 65534 mode 0660, not by this broker (uid 0)"),
                      seg.status().message());
  // A worker (no owner to compare) accepts a 0660 segment of another uid:
  // that is the broker's, shared with the workers' group.
  BOOST_CHECK(ks::Segment::Open(guard.name).ok());
}

BOOST_AUTO_TEST_CASE(open_refuses_junk_and_a_size_that_differs_from_the_header) {
  SegmentNameGuard guard(UniqueSegmentName("trust"));
  const std::string path = ShmPath(guard.name);
  {
    std::ofstream(path) << "garbage";  // 7 bytes of junk, like a squatter's
  }
  BOOST_REQUIRE_EQUAL(::chmod(path.c_str(), 0600), 0);
  auto junk = ks::Segment::Open(guard.name, ::geteuid());
  BOOST_REQUIRE(!junk.ok());
  BOOST_CHECK(junk.status().code() == km::Code::kLayoutMismatch);
  BOOST_REQUIRE(ks::Segment::Remove(guard.name).ok());

  auto seg = ks::Segment::CreateNamed(guard.name, SmallCaps());
  BOOST_REQUIRE(seg.ok());
  const uint64_t size = (*seg)->header()->segment_size;
  BOOST_REQUIRE_EQUAL(::truncate(path.c_str(), static_cast<off_t>(size + 4096)), 0);
  auto grown = ks::Segment::Open(guard.name, ::geteuid());
  BOOST_REQUIRE(!grown.ok());
  BOOST_CHECK(grown.status().code() == km::Code::kLayoutMismatch);
  // Shrunk below the header's size: refused before anything is mapped
  // past the end (which would be SIGBUS).
  BOOST_REQUIRE_EQUAL(::truncate(path.c_str(), static_cast<off_t>(size - 4096)), 0);
  auto shrunk = ks::Segment::Open(guard.name, ::geteuid());
  BOOST_REQUIRE(!shrunk.ok());
  BOOST_CHECK(shrunk.status().code() == km::Code::kLayoutMismatch);
}

BOOST_AUTO_TEST_CASE(open_refuses_what_is_not_a_regular_file) {
  SegmentNameGuard guard(UniqueSegmentName("trust"));
  const std::string path = ShmPath(guard.name);
  BOOST_REQUIRE_EQUAL(::mkfifo(path.c_str(), 0600), 0);
  struct Unlink {
    std::string p;
    ~Unlink() { ::unlink(p.c_str()); }
  } unlink_fifo{path};
  // O_RDWR on a FIFO does not block on Linux; the fstat check refuses it.
  auto seg = ks::Segment::Open(guard.name, ::geteuid());
  BOOST_REQUIRE(!seg.ok());
  BOOST_CHECK(seg.status().code() == km::Code::kPermissionDenied);
  BOOST_CHECK_MESSAGE(Contains(seg.status().message(), "not a regular file"), seg.status().message());
}

// KM-18: a tmpfs too small for the segment fails creation with ENOSPC, a
// clear kSegmentError, and leaves no file behind. Needs a mount of its
// own (root); the tmpfs is unmounted whatever happens.
BOOST_AUTO_TEST_CASE(create_on_a_full_tmpfs_fails_cleanly) {
  char tmpl[] = "/tmp/kms-tmpfs-XXXXXX";
  const char* dir = ::mkdtemp(tmpl);
  BOOST_REQUIRE(dir != nullptr);
  struct Cleanup {
    std::string dir;
    bool mounted = false;
    ~Cleanup() {
      if (mounted) ::umount2(dir.c_str(), MNT_DETACH);
      ::rmdir(dir.c_str());
    }
  } cleanup{dir};
  if (::mount("tmpfs", dir, "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,mode=0700") != 0) {
    BOOST_TEST_MESSAGE("skipped: cannot mount a tmpfs here (needs CAP_SYS_ADMIN): " << std::strerror(errno));
    return;
  }
  cleanup.mounted = true;
  ks::Capacities caps;
  caps.max_pools = 2;
  caps.keys_per_pool = 64;
  caps.leases_per_pool = 1024;
  BOOST_REQUIRE_GT(ks::PlanLayout(caps).segment_size, 64u * 1024u);
  auto seg = ks::Segment::CreateInDirectoryForTesting(dir, "keymesh-full", caps);
  BOOST_REQUIRE(!seg.ok());
  BOOST_CHECK(seg.status().code() == km::Code::kSegmentError);
  BOOST_CHECK_MESSAGE(Contains(seg.status().message(), std::strerror(ENOSPC)), seg.status().message());
  BOOST_CHECK(!std::filesystem::exists(std::string(dir) + "/keymesh-full"));
  // A segment that fits is created there normally.
  auto small = ks::Segment::CreateInDirectoryForTesting(dir, "keymesh-fits", SmallCaps());
  BOOST_CHECK_MESSAGE(small.ok(), small.status().ToString());
  ::unlink((std::string(dir) + "/keymesh-fits").c_str());
}
