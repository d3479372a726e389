// The broker's files and memory as a trust boundary (docs/SECURITY.md):
// links planted at its file names are never followed (KM-21), directories
// other users can write are refused, and the broker process can neither
// dump core nor be read by a process of its uid (KM-16).
#define BOOST_TEST_MODULE hardening_test
#include "broker/hardening.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include <boost/test/unit_test.hpp>

#include "broker/atomic_file.h"
#include "broker/lock_file.h"
#include "support/broker_harness.h"
#include "support/process.h"

namespace km = keymesh;
namespace kb = keymesh::broker;
namespace kt = keymesh::testing;

namespace {

std::string ReadAll(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// A private scratch directory removed at scope end, also when a check fails.
struct ScratchDir {
  ScratchDir() {
    char tmpl[] = "/tmp/km-hardening-XXXXXX";
    BOOST_REQUIRE(::mkdtemp(tmpl) != nullptr);
    path = tmpl;
  }
  ~ScratchDir() { std::filesystem::remove_all(path); }
  std::string path;
};

}  // namespace

BOOST_AUTO_TEST_CASE(a_link_planted_at_the_lock_file_is_refused_and_its_target_untouched) {
  ScratchDir dir;
  const std::string victim = dir.path + "/victim";
  std::ofstream(victim) << "precious";
  const std::string lock = dir.path + "/keymesh.sock.lock";
  BOOST_REQUIRE(::symlink(victim.c_str(), lock.c_str()) == 0);
  km::Result<std::unique_ptr<kb::LockFile>> got = kb::LockFile::Acquire(lock);
  BOOST_REQUIRE(!got.ok());
  BOOST_CHECK_MESSAGE(got.status().message().find("cannot open lock file") == 0, got.status().message());
  BOOST_CHECK_EQUAL(ReadAll(victim), "precious");
}

BOOST_AUTO_TEST_CASE(a_lock_file_owned_by_another_uid_is_refused) {
  ScratchDir dir;
  const std::string lock = dir.path + "/keymesh.sock.lock";
  std::ofstream(lock) << "1\n";
  BOOST_REQUIRE(::chown(lock.c_str(), 65534, 65534) == 0);  // nobody: we run as root (CI too)
  km::Result<std::unique_ptr<kb::LockFile>> got = kb::LockFile::Acquire(lock);
  BOOST_REQUIRE(!got.ok());
  BOOST_CHECK(got.status().code() == km::Code::kPermissionDenied);
  BOOST_CHECK_MESSAGE(got.status().message().find("belongs to uid 65534") != std::string::npos, got.status().message());
}

BOOST_AUTO_TEST_CASE(a_link_at_the_final_name_is_replaced_never_followed) {
  ScratchDir dir;
  const std::string victim = dir.path + "/victim";
  std::ofstream(victim) << "precious";
  const std::string state = dir.path + "/state.json";
  BOOST_REQUIRE(::symlink(victim.c_str(), state.c_str()) == 0);
  BOOST_REQUIRE(kb::WriteFileAtomically(state, "{}", 0600, kb::Durability::kDurable).ok());
  BOOST_CHECK_EQUAL(ReadAll(victim), "precious");
  struct stat st {};
  BOOST_REQUIRE(::lstat(state.c_str(), &st) == 0);
  BOOST_CHECK(S_ISREG(st.st_mode));
  BOOST_CHECK_EQUAL(ReadAll(state), "{}");
}

BOOST_AUTO_TEST_CASE(temp_names_are_unpredictable_and_created_exclusively) {
  ScratchDir dir;
  const std::string path = dir.path + "/metrics.prom";
  // The old predictable name, planted as a link: no longer used, so the
  // write succeeds and the link's target stays as it was.
  const std::string victim = dir.path + "/victim";
  std::ofstream(victim) << "precious";
  const std::string old_tmp = path + ".tmp." + std::to_string(::getpid());
  BOOST_REQUIRE(::symlink(victim.c_str(), old_tmp.c_str()) == 0);
  BOOST_REQUIRE(kb::WriteFileAtomically(path, "a 1\n", 0644, kb::Durability::kAtomic).ok());
  BOOST_CHECK_EQUAL(ReadAll(victim), "precious");
  BOOST_CHECK_EQUAL(ReadAll(path), "a 1\n");
  size_t temps = 0;
  for (const auto& e : std::filesystem::directory_iterator(dir.path)) {
    if (e.path().string().find(".tmp.") != std::string::npos && e.path().string() != old_tmp) ++temps;
  }
  BOOST_CHECK_EQUAL(temps, 0u);
}

BOOST_AUTO_TEST_CASE(directories_other_users_can_write_are_refused) {
  ScratchDir dir;
  const std::string shared = dir.path + "/shared";
  BOOST_REQUIRE(::mkdir(shared.c_str(), 0700) == 0);
  BOOST_REQUIRE(::chmod(shared.c_str(), 0777) == 0);
  km::Status st = kb::WriteFileAtomically(shared + "/state.json", "{}", 0600, kb::Durability::kDurable);
  BOOST_CHECK(st.code() == km::Code::kPermissionDenied);
  BOOST_CHECK_MESSAGE(st.message().find("(mode 0777) is writable by other users") != std::string::npos, st.message());
  BOOST_CHECK(std::filesystem::is_empty(shared));
  // Group-writable is refused the same way; the lock file too.
  BOOST_REQUIRE(::chmod(shared.c_str(), 0770) == 0);
  BOOST_CHECK(!kb::LockFile::Acquire(shared + "/x.lock").ok());
  // The metrics file may live in a directory shared with node_exporter:
  // written there, still without following links.
  BOOST_CHECK(
      kb::WriteFileAtomically(shared + "/m.prom", "a 1\n", 0644, kb::Durability::kAtomic, kb::Directory::kShared).ok());
  BOOST_REQUIRE(std::filesystem::remove(shared + "/m.prom"));
  // Sticky, like /tmp: others cannot remove or rename our files there.
  BOOST_REQUIRE(::chmod(shared.c_str(), 01777) == 0);
  BOOST_CHECK(kb::WriteFileAtomically(shared + "/state.json", "{}", 0600, kb::Durability::kDurable).ok());
  // Owned by another (non-root) uid, even if private.
  const std::string theirs = dir.path + "/theirs";
  BOOST_REQUIRE(::mkdir(theirs.c_str(), 0700) == 0);
  BOOST_REQUIRE(::chown(theirs.c_str(), 65534, 65534) == 0);
  st = kb::WriteFileAtomically(theirs + "/state.json", "{}", 0600, kb::Durability::kDurable);
  BOOST_CHECK(st.code() == km::Code::kPermissionDenied);
  BOOST_CHECK_MESSAGE(st.message().find("belongs to uid 65534") != std::string::npos, st.message());
}

BOOST_AUTO_TEST_CASE(protecting_a_process_makes_it_undumpable_with_no_core_limit) {
  // In a child: the flag is per process and this test binary stays normal.
  const pid_t child = kt::ForkChild([] {
    if (::prctl(PR_GET_DUMPABLE) != 1) return 2;  // the precondition: dumpable before
    if (!kb::ProtectProcessMemory().ok()) return 3;
    if (::prctl(PR_GET_DUMPABLE) != 0) return 4;
    rlimit rl{};
    if (::getrlimit(RLIMIT_CORE, &rl) != 0 || rl.rlim_cur != 0 || rl.rlim_max != 0) return 5;
    return 0;
  });
  BOOST_CHECK_EQUAL(kt::WaitChild(child), 0);
}

BOOST_AUTO_TEST_CASE(the_broker_is_not_dumpable_and_a_crash_writes_no_core) {
  // The broker inherits a core limit as high as allowed, so only its own
  // protection can keep a core file from being written.
  rlimit saved{};
  BOOST_REQUIRE(::getrlimit(RLIMIT_CORE, &saved) == 0);
  BOOST_REQUIRE_MESSAGE(saved.rlim_max != 0, "the hard core limit is 0: this test cannot tell");
  const rlimit high{saved.rlim_max, saved.rlim_max};
  BOOST_REQUIRE(::setrlimit(RLIMIT_CORE, &high) == 0);
  kt::BrokerProcess broker;
  broker.WriteConfig(R"({"p":{"keys":[{"name":"k","secret":"sk-hardening-0001"}]}})");
  const bool started = broker.Start();
  BOOST_REQUIRE(::setrlimit(RLIMIT_CORE, &saved) == 0);
  BOOST_REQUIRE(started);
  std::ifstream limits("/proc/" + std::to_string(broker.pid()) + "/limits");
  bool core_limit_zero = false;
  for (std::string line; std::getline(limits, line);) {
    if (line.rfind("Max core file size", 0) == 0) {
      std::istringstream fields(line.substr(std::string("Max core file size").size()));
      std::string soft, hard;
      fields >> soft >> hard;
      core_limit_zero = soft == "0" && hard == "0";
    }
  }
  BOOST_CHECK(core_limit_zero);
  // A signal whose default action is a core dump (SIGQUIT: the sanitizers
  // do not intercept it) must not write the secrets in the broker's memory
  // to a core file, whatever core_pattern says.
  broker.Signal(SIGQUIT);
  const std::optional<int> code = broker.WaitExit(10);
  BOOST_REQUIRE(code.has_value());
  BOOST_CHECK_EQUAL(*code, 128 + SIGQUIT);
  BOOST_CHECK(!broker.core_dumped());
}

BOOST_AUTO_TEST_CASE(a_wiped_secret_leaves_no_byte_of_itself) {
  std::string s = "sk-a-secret-longer-than-the-small-string-buffer-0123456789";
  s = "sk-short";  // a shorter secret in the same buffer: the tail of the old one is still there
  const size_t capacity = s.capacity();
  BOOST_REQUIRE_GT(capacity, 40u);
  const char* buf = s.data();
  kb::WipeSecret(s);
  BOOST_CHECK(s.empty());
  BOOST_REQUIRE_EQUAL(s.data(), buf);  // clear() keeps the buffer: what we inspect is what held the secret
  size_t nonzero = 0;
  for (size_t i = 0; i < capacity; ++i) nonzero += buf[i] != 0;
  BOOST_CHECK_EQUAL(nonzero, 0u);
}

BOOST_AUTO_TEST_CASE(proc_hidden_from_the_broker_by_hidepid_is_refused) {
  const std::string plain = "22 27 0:21 / /proc rw,relatime - proc proc rw\n";
  const std::string hidden = "22 27 0:21 / /proc rw,nosuid shared:12 - proc proc rw,hidepid=invisible\n";
  const std::string exempt = "22 27 0:21 / /proc rw - proc proc rw,gid=4343,hidepid=2\n";
  const std::string other = "30 22 0:40 / /proc/sys/fs/binfmt_misc rw - binfmt_misc binfmt_misc rw,hidepid=2\n";
  BOOST_CHECK(kb::CheckProcVisibility(plain, 1000, {1000}).ok());
  BOOST_CHECK(kb::CheckProcVisibility(plain + other, 1000, {1000}).ok());  // only /proc itself counts
  km::Status st = kb::CheckProcVisibility(hidden, 1000, {1000});
  BOOST_CHECK(st.code() == km::Code::kPermissionDenied);
  BOOST_CHECK_MESSAGE(st.message().find("hidepid=invisible with no gid= exemption") != std::string::npos, st.message());
  BOOST_CHECK(kb::CheckProcVisibility(hidden, 0, {0}).ok());  // root sees every process
  BOOST_CHECK(kb::CheckProcVisibility(exempt, 1000, {1000, 4343}).ok());
  st = kb::CheckProcVisibility(exempt, 1000, {1000});
  BOOST_CHECK(st.code() == km::Code::kPermissionDenied);
  BOOST_CHECK_MESSAGE(st.message().find("gid=4343") != std::string::npos, st.message());
  BOOST_CHECK(kb::CheckProcVisibility(hidden + plain, 1000, {1000}).ok());  // the last mount on /proc wins
  BOOST_CHECK(kb::CheckProcVisibility("", 1000, {1000}).ok());
  // This machine's own /proc: the suite runs where the broker can start.
  BOOST_CHECK_MESSAGE(kb::CheckProcVisibility().ok(), kb::CheckProcVisibility().message());
}
