// FaultProxy (tests/support/fault_proxy.h) between a raw RESP client and a
// real redis-server: each mode does what the mesh tests rely on.
#define BOOST_TEST_MODULE fault_proxy_test
#include "support/fault_proxy.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <optional>
#include <stdexcept>
#include <string>

#include <boost/test/unit_test.hpp>

#include "support/process.h"
#include "support/redis_server.h"

namespace {

using keymesh::testing::FaultProxy;
using keymesh::testing::NowSeconds;
using keymesh::testing::RedisServer;

// One TCP connection speaking just enough RESP for these tests.
class Conn {
 public:
  explicit Conn(uint16_t port) {
    fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = htons(port);
    if (::connect(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
      connect_errno_ = errno;
      ::close(fd_);
      fd_ = -1;
    }
  }
  ~Conn() {
    if (fd_ >= 0) ::close(fd_);
  }
  bool connected() const { return fd_ >= 0; }
  int connect_errno() const { return connect_errno_; }
  int read_errno() const { return read_errno_; }
  bool closed() const { return closed_; }
  // The peer ended the connection: EOF, or a reset seen by a read or a send.
  bool gone() const {
    return closed_ || read_errno_ == ECONNRESET || send_errno_ == EPIPE || send_errno_ == ECONNRESET;
  }

  bool Send(const std::string& bytes) {
    size_t off = 0;
    while (off < bytes.size()) {
      const ssize_t n = ::send(fd_, bytes.data() + off, bytes.size() - off, MSG_NOSIGNAL);
      if (n <= 0) {
        send_errno_ = errno;
        return false;
      }
      off += static_cast<size_t>(n);
    }
    return true;
  }
  // One reply (a status line, an error, an integer or a bulk string), or
  // nullopt on timeout, EOF (closed()) or a reset (read_errno()).
  std::optional<std::string> Reply(double timeout) {
    const double deadline = NowSeconds() + timeout;
    for (;;) {
      if (std::optional<std::string> r = Complete()) return r;
      const double left = deadline - NowSeconds();
      if (left <= 0) return std::nullopt;
      pollfd p{fd_, POLLIN, 0};
      if (::poll(&p, 1, static_cast<int>(left * 1000) + 1) <= 0) continue;
      char buf[65536];
      const ssize_t n = ::recv(fd_, buf, sizeof(buf), 0);
      if (n == 0) {
        closed_ = true;
        return std::nullopt;
      }
      if (n < 0) {
        if (errno == EINTR) continue;
        read_errno_ = errno;
        return std::nullopt;
      }
      in_.append(buf, static_cast<size_t>(n));
    }
  }
  std::optional<std::string> Call(const std::string& command, double timeout = 5) {
    if (!Send(command)) return std::nullopt;
    return Reply(timeout);
  }

 private:
  std::optional<std::string> Complete() {
    const size_t eol = in_.find("\r\n");
    if (eol == std::string::npos) return std::nullopt;
    size_t end = eol + 2;
    if (in_[0] == '$') {
      const long len = std::stol(in_.substr(1, eol - 1));
      if (len >= 0) end += static_cast<size_t>(len) + 2;
    }
    if (in_.size() < end) return std::nullopt;
    std::string r = in_.substr(0, end);
    in_.erase(0, end);
    return r;
  }

  int fd_ = -1;
  int connect_errno_ = 0;
  int read_errno_ = 0;
  int send_errno_ = 0;
  bool closed_ = false;
  std::string in_;
};

const std::string kPing = "*1\r\n$4\r\nPING\r\n";
const std::string kPong = "+PONG\r\n";

std::string Command(std::initializer_list<std::string> args) {
  std::string out = "*" + std::to_string(args.size()) + "\r\n";
  for (const std::string& a : args) out += "$" + std::to_string(a.size()) + "\r\n" + a + "\r\n";
  return out;
}

// Waits (polling a condition with a deadline) until `fn` holds.
template <typename F>
bool Eventually(F fn, double timeout = 5) {
  const double deadline = NowSeconds() + timeout;
  while (NowSeconds() < deadline) {
    if (fn()) return true;
    ::usleep(2000);
  }
  return fn();
}

uint16_t Started(RedisServer& redis) {
  if (!redis.Start()) throw std::runtime_error("redis-server did not start");
  return redis.port();
}

struct Fixture {
  RedisServer redis;
  FaultProxy proxy{Started(redis)};
  Fixture() { BOOST_REQUIRE(proxy.Start()); }
};

BOOST_FIXTURE_TEST_CASE(PassForwardsCommandsAndLargeValuesBothWays, Fixture) {
  Conn c(proxy.port());
  BOOST_REQUIRE(c.connected());
  BOOST_CHECK_EQUAL(c.Call(kPing).value_or("none"), kPong);
  const std::string big(3u << 20, 'x');  // more than the proxy reads at once, both ways
  BOOST_CHECK_EQUAL(c.Call(Command({"SET", "k", big})).value_or("none"), "+OK\r\n");
  const std::optional<std::string> got = c.Call(Command({"GET", "k"}));
  BOOST_REQUIRE(got.has_value());
  BOOST_CHECK_EQUAL(got->size(), big.size() + std::to_string(big.size()).size() + 5);
  BOOST_CHECK(got->compare(got->size() - 2 - big.size(), big.size(), big) == 0);
  BOOST_CHECK_EQUAL(proxy.accepted(), 1u);
  // The proxy counts what send() took once it returned: the client may have
  // read the last bytes a moment before.
  BOOST_CHECK(Eventually([&] { return proxy.bytes_up() > big.size() && proxy.bytes_down() > big.size(); }));
}

BOOST_FIXTURE_TEST_CASE(DelayHoldsEachDirectionAndKeepsOrder, Fixture) {
  Conn c(proxy.port());
  BOOST_REQUIRE(c.connected());
  BOOST_REQUIRE_EQUAL(c.Call(kPing).value_or("none"), kPong);
  BOOST_REQUIRE(proxy.Delay(150));
  double t0 = NowSeconds();
  // Three commands in one write: the replies come back in order, after
  // both directions' delay.
  BOOST_REQUIRE(c.Send(Command({"SET", "a", "1"}) + Command({"INCR", "a"}) + Command({"GET", "a"})));
  BOOST_CHECK_EQUAL(c.Reply(5).value_or("none"), "+OK\r\n");
  const double rtt = NowSeconds() - t0;
  BOOST_CHECK_EQUAL(c.Reply(5).value_or("none"), ":2\r\n");
  BOOST_CHECK_EQUAL(c.Reply(5).value_or("none"), "$1\r\n2\r\n");
  BOOST_CHECK_GE(rtt, 0.295);
  BOOST_CHECK_LT(rtt, 2.0);
  BOOST_REQUIRE(proxy.Pass());
  t0 = NowSeconds();
  BOOST_CHECK_EQUAL(c.Call(kPing).value_or("none"), kPong);
  BOOST_CHECK_LT(NowSeconds() - t0, 0.1);
}

BOOST_FIXTURE_TEST_CASE(BlackholeKeepsConnectionsAndHoldsWhatWasSent, Fixture) {
  Conn before(proxy.port());
  BOOST_REQUIRE(before.connected());
  BOOST_REQUIRE_EQUAL(before.Call(kPing).value_or("none"), kPong);
  BOOST_REQUIRE(proxy.Blackhole());
  BOOST_REQUIRE(proxy.mode() == FaultProxy::Mode::kBlackhole);
  // An established connection: no answer (a deliberate wait: silence is
  // what is being checked), and the connection stays open.
  BOOST_CHECK(!before.Call(kPing, 0.3).has_value());
  BOOST_CHECK(!before.closed());
  BOOST_CHECK_EQUAL(before.read_errno(), 0);
  // A new connection is accepted, then hears nothing either.
  Conn during(proxy.port());
  BOOST_REQUIRE(during.connected());
  BOOST_CHECK(Eventually([&] { return proxy.accepted() == 2; }));
  BOOST_CHECK(!during.Call(kPing, 0.3).has_value());
  BOOST_CHECK(!during.closed());
  BOOST_CHECK_EQUAL(proxy.open_connections(), 2u);
  // Healed: what was held flows on, in order.
  BOOST_REQUIRE(proxy.Pass());
  BOOST_CHECK_EQUAL(before.Reply(5).value_or("none"), kPong);
  BOOST_CHECK_EQUAL(during.Reply(5).value_or("none"), kPong);
  BOOST_CHECK_EQUAL(before.Call(kPing).value_or("none"), kPong);
}

BOOST_FIXTURE_TEST_CASE(ResetClosesWithRstAndRefusesUntilPass, Fixture) {
  Conn before(proxy.port());
  BOOST_REQUIRE(before.connected());
  BOOST_REQUIRE_EQUAL(before.Call(kPing).value_or("none"), kPong);
  BOOST_REQUIRE(proxy.Reset());
  // SetMode returned: the connection is already gone, by RST.
  BOOST_CHECK(!before.Reply(2).has_value());
  BOOST_CHECK_EQUAL(before.read_errno(), ECONNRESET);
  BOOST_CHECK_EQUAL(proxy.open_connections(), 0u);
  Conn refused(proxy.port());
  BOOST_CHECK(!refused.connected());
  BOOST_CHECK_EQUAL(refused.connect_errno(), ECONNREFUSED);
  // Back on the same port.
  BOOST_REQUIRE(proxy.Pass());
  Conn after(proxy.port());
  BOOST_REQUIRE(after.connected());
  BOOST_CHECK_EQUAL(after.Call(kPing).value_or("none"), kPong);
}

BOOST_FIXTURE_TEST_CASE(DropRepliesActsOnRequestsAndLosesTheirAnswers, Fixture) {
  Conn lossy(proxy.port());
  Conn direct(redis.port());
  BOOST_REQUIRE(lossy.connected() && direct.connected());
  BOOST_REQUIRE_EQUAL(lossy.Call(kPing).value_or("none"), kPong);
  BOOST_REQUIRE(proxy.DropReplies());
  BOOST_REQUIRE(proxy.mode() == FaultProxy::Mode::kDropReplies);
  // The server acts on the request; its answer never arrives (a deliberate
  // wait: silence is what is being checked), and the connection stays open.
  BOOST_CHECK(!lossy.Call(Command({"INCR", "n"}), 0.3).has_value());
  BOOST_CHECK(!lossy.closed());
  BOOST_CHECK_EQUAL(direct.Call(Command({"GET", "n"})).value_or("none"), "$1\r\n1\r\n");
  BOOST_CHECK(Eventually([&] { return proxy.bytes_dropped() >= 4; }));  // ":1\r\n"
  // A new connection is forwarded too, and hears nothing.
  Conn during(proxy.port());
  BOOST_REQUIRE(during.connected());
  BOOST_CHECK(!during.Call(Command({"INCR", "n"}), 0.3).has_value());
  BOOST_CHECK_EQUAL(direct.Call(Command({"GET", "n"})).value_or("none"), "$1\r\n2\r\n");
  // Healed: answers flow again; what was dropped stays lost.
  BOOST_REQUIRE(proxy.Pass());
  BOOST_CHECK_EQUAL(lossy.Call(kPing).value_or("none"), kPong);
  BOOST_CHECK_EQUAL(during.Call(Command({"INCR", "n"})).value_or("none"), ":3\r\n");
}

BOOST_FIXTURE_TEST_CASE(UpstreamDeathClosesClientsAndRestartServesAgain, Fixture) {
  Conn before(proxy.port());
  BOOST_REQUIRE(before.connected());
  BOOST_REQUIRE_EQUAL(before.Call(Command({"SET", "k", "v"})).value_or("none"), "+OK\r\n");
  redis.Kill();
  BOOST_CHECK(!before.Reply(2).has_value());
  BOOST_CHECK(before.gone());
  // With the upstream refusing, a new connection is accepted, then reset.
  Conn during(proxy.port());
  BOOST_REQUIRE(during.connected());
  BOOST_CHECK(!during.Call(kPing, 2).has_value());
  BOOST_CHECK(during.gone());
  // Restarted empty on its port: served again through the same proxy.
  BOOST_REQUIRE(redis.Restart(/*wipe=*/true));
  Conn after(proxy.port());
  BOOST_REQUIRE(after.connected());
  BOOST_CHECK_EQUAL(after.Call(Command({"GET", "k"})).value_or("none"), "$-1\r\n");
}

BOOST_FIXTURE_TEST_CASE(OneProxyCutOffWhileAnotherPasses, Fixture) {
  FaultProxy other(redis.port());
  BOOST_REQUIRE(other.Start());
  Conn cut(proxy.port());
  Conn fine(other.port());
  BOOST_REQUIRE(cut.connected() && fine.connected());
  BOOST_REQUIRE(proxy.Blackhole());
  BOOST_CHECK(!cut.Call(kPing, 0.3).has_value());
  BOOST_CHECK_EQUAL(fine.Call(kPing).value_or("none"), kPong);
  BOOST_REQUIRE(proxy.Delay(50));
  BOOST_CHECK_EQUAL(cut.Reply(5).value_or("none"), kPong);
  BOOST_CHECK_EQUAL(fine.Call(kPing).value_or("none"), kPong);
}

}  // namespace
