// KM-22: a client sends nothing to a server it does not trust. The fake
// server is a real process of another uid (root drops to nobody; CI runs as
// root) listening where a stale or mistyped socket path could point.
#define BOOST_TEST_MODULE server_identity_test
#include <grp.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <string>

#include <boost/test/unit_test.hpp>

#include "protocol/control_client.h"

namespace km = keymesh;
namespace kp = keymesh::protocol;

namespace {

constexpr uid_t kNobody = 65534;

// A directory removed at scope end.
struct Dir {
  Dir(mode_t mode, uid_t owner) {
    char tmpl[] = "/tmp/km-identity-XXXXXX";
    BOOST_REQUIRE(::mkdtemp(tmpl) != nullptr);
    path = tmpl;
    BOOST_REQUIRE(::chown(path.c_str(), owner, owner) == 0);
    BOOST_REQUIRE(::chmod(path.c_str(), mode) == 0);
  }
  ~Dir() { std::filesystem::remove_all(path); }
  std::string path;
};

// A server running as nobody at `path`: accepts one connection and exits
// with the number of bytes it received before the client closed (capped
// at 200); 100+ on a set-up failure. `ready` is written once it listens.
pid_t FakeServerAsNobody(const std::string& path, int ready) {
  const pid_t pid = ::fork();
  if (pid != 0) return pid;
  if (::setgroups(0, nullptr) != 0 || ::setgid(kNobody) != 0 || ::setuid(kNobody) != 0) ::_exit(101);
  const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, path.c_str(), sizeof(addr.sun_path) - 1);
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 || ::listen(fd, 4) != 0) ::_exit(102);
  (void)!::write(ready, "r", 1);
  const int c = ::accept(fd, nullptr, nullptr);
  if (c < 0) ::_exit(103);
  size_t got = 0;
  char buf[256];
  for (ssize_t n; (n = ::read(c, buf, sizeof(buf))) > 0;) got += static_cast<size_t>(n);
  ::_exit(static_cast<int>(got > 200 ? 200 : got));
}

int Wait(pid_t pid) {
  int status = 0;
  if (::waitpid(pid, &status, 0) != pid || !WIFEXITED(status)) return -1;
  return WEXITSTATUS(status);
}

// Runs FakeServerAsNobody at `path`, waits until it listens, calls `client`
// and returns the bytes the server received.
template <typename Fn>
int BytesReceivedBy(const std::string& path, Fn client) {
  int ready[2];
  BOOST_REQUIRE(::pipe(ready) == 0);
  const pid_t server = FakeServerAsNobody(path, ready[1]);
  char c;
  BOOST_REQUIRE_EQUAL(::read(ready[0], &c, 1), 1);
  client();
  ::close(ready[0]);
  ::close(ready[1]);
  return Wait(server);
}

bool RunningAsRoot() { return ::geteuid() == 0; }
const auto kNeedsRoot = boost::unit_test::precondition([](boost::unit_test::test_unit_id) { return RunningAsRoot(); });

}  // namespace

BOOST_AUTO_TEST_CASE(a_server_of_another_uid_in_a_shared_directory_gets_nothing, *kNeedsRoot) {
  Dir shared(01777, 0);  // like /tmp: anyone may create a socket there
  const std::string path = shared.path + "/keymesh.sock";
  const int received = BytesReceivedBy(path, [&] {
    kp::ControlClient client(kp::ControlClientOptions{path});
    km::Result<boost::json::object> r = client.Call(kp::Op::kAddKey, {{"pool", "p"}, {"secret", "sk-never-sent"}}, 2);
    BOOST_REQUIRE(!r.ok());
    BOOST_CHECK(r.status().code() == km::Code::kPermissionDenied);
    BOOST_CHECK_MESSAGE(r.status().message().find("runs as uid 65534") != std::string::npos, r.status().message());
  });
  BOOST_CHECK_EQUAL(received, 0);  // not one byte reached it
}

BOOST_AUTO_TEST_CASE(the_owner_of_a_private_socket_directory_is_trusted, *kNeedsRoot) {
  Dir theirs(0755, kNobody);  // /run/keymesh's shape: only the broker's uid writes it
  const std::string path = theirs.path + "/keymesh.sock";
  const int received = BytesReceivedBy(path, [&] {
    kp::ControlClient client(kp::ControlClientOptions{path});
    // The fake never answers: the call times out, but it was sent.
    km::Result<boost::json::object> r = client.Call(kp::Op::kStatus, {}, 0.5);
    BOOST_CHECK(r.status().code() == km::Code::kBrokerUnavailable);
  });
  BOOST_CHECK_GT(received, 0);
}
