// ControlClient against a real server in the test: a thread per connection
// on a Unix socket in a private directory, answering what each test
// scripts. Covers hello on every new connection, reuse of idle connections,
// the deadline, the one retry on a pooled connection the server closed, a
// fork child that must dial with its own hello, concurrent calls, reply
// validation and an unreachable socket. Waits are on conditions (the
// server's records under a condition variable), never sleeps.
#define BOOST_TEST_MODULE protocol_control_client
#include "protocol/control_client.h"

#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <filesystem>
#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <boost/json.hpp>
#include <boost/test/unit_test.hpp>

#include "common/text.h"
#include "protocol/framing.h"
#include "protocol/messages.h"

namespace km = keymesh;
namespace kp = keymesh::protocol;
namespace json = boost::json;
using kp::Op;

namespace {

double Now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

// What the server does with one request.
struct Action {
  Action(std::string r, bool c = false, std::function<void()> b = {})
      : reply(std::move(r)), close(c), before(std::move(b)) {}
  std::string reply;             // bytes to send (a frame, or anything)
  bool close = false;            // close the connection after sending `reply`
  std::function<void()> before;  // runs before replying (e.g. wait on a gate)
};

// A scripted control-protocol server. `script(connection, request)` decides
// each answer; by default hello is answered with a fixed reply and every
// other op with {"ok":true,"echo":<op>}. Records, per connection, the pid
// its hello named and the ops it received.
class TestServer {
 public:
  using Script = std::function<std::optional<Action>(int conn, const kp::Request& req)>;

  explicit TestServer(Script script = nullptr) : script_(std::move(script)) {
    static std::atomic<int> counter{0};
    dir_ = "/tmp/kmcc-" + std::to_string(::getpid()) + "-" + std::to_string(counter++);
    std::filesystem::create_directories(dir_);
    path_ = dir_ + "/s.sock";
    listen_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strncpy(addr.sun_path, path_.c_str(), sizeof(addr.sun_path) - 1);
    BOOST_REQUIRE(::bind(listen_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0);
    BOOST_REQUIRE(::listen(listen_, 64) == 0);
    BOOST_REQUIRE(::pipe(stop_) == 0);
    acceptor_ = std::thread([this] { Accept(); });
  }

  ~TestServer() {
    (void)!::write(stop_[1], "x", 1);
    acceptor_.join();
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (int fd : fds_) ::shutdown(fd, SHUT_RDWR);
    }
    for (std::thread& t : workers_) t.join();
    ::close(listen_);
    ::close(stop_[0]);
    ::close(stop_[1]);
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }

  const std::string& path() const { return path_; }

  int connections() {
    std::lock_guard<std::mutex> lock(mu_);
    return static_cast<int>(records_.size());
  }
  std::optional<uint32_t> hello_pid(int conn) {
    std::lock_guard<std::mutex> lock(mu_);
    return records_.at(static_cast<size_t>(conn)).hello_pid;
  }
  std::vector<std::string> ops(int conn) {
    std::lock_guard<std::mutex> lock(mu_);
    return records_.at(static_cast<size_t>(conn)).ops;
  }
  // Waits until connection `conn` has received `n` requests.
  bool WaitOps(int conn, size_t n, double timeout = 10) {
    const size_t c = static_cast<size_t>(conn);
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, std::chrono::duration<double>(timeout),
                        [&] { return records_.size() > c && records_[c].ops.size() >= n; });
  }
  // Waits until connection `conn` is closed (by either side).
  bool WaitClosed(int conn, double timeout = 10) {
    const size_t c = static_cast<size_t>(conn);
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, std::chrono::duration<double>(timeout),
                        [&] { return records_.size() > c && records_[c].closed; });
  }

 private:
  struct Record {
    std::optional<uint32_t> hello_pid;
    std::vector<std::string> ops;
    bool closed = false;
  };

  void Accept() {
    for (;;) {
      pollfd p[2] = {{listen_, POLLIN, 0}, {stop_[0], POLLIN, 0}};
      if (::poll(p, 2, -1) < 0) continue;
      if (p[1].revents != 0) return;
      const int fd = ::accept4(listen_, nullptr, nullptr, SOCK_CLOEXEC);
      if (fd < 0) continue;
      int conn;
      {
        std::lock_guard<std::mutex> lock(mu_);
        conn = static_cast<int>(records_.size());
        records_.emplace_back();
        fds_.push_back(fd);
      }
      cv_.notify_all();
      workers_.emplace_back([this, fd, conn] { Serve(fd, conn); });
    }
  }

  void Serve(int fd, int conn) {
    std::string in;
    char buf[4096];
    bool open = true;
    while (open) {
      const ssize_t n = ::recv(fd, buf, sizeof(buf), 0);
      if (n <= 0) break;
      in.append(buf, static_cast<size_t>(n));
      for (size_t nl = in.find('\n'); open && nl != std::string::npos; nl = in.find('\n')) {
        const std::string line = in.substr(0, nl);
        in.erase(0, nl + 1);
        int64_t id = 0;
        km::Result<kp::Request> req = kp::ParseRequest(line, &id);
        if (!req.ok()) {  // (Boost.Test's checks are not for other threads)
          open = false;
          break;
        }
        {
          std::lock_guard<std::mutex> lock(mu_);
          Record& r = records_[static_cast<size_t>(conn)];
          r.ops.push_back(req->op);
          if (req->op == "hello") {
            km::Result<kp::HelloRequest> h = kp::HelloRequest::FromJson(req->body);
            if (h.ok()) r.hello_pid = h->pid;
          }
        }
        cv_.notify_all();
        std::optional<Action> a = script_ ? script_(conn, *req) : std::nullopt;
        if (!a) a = Default(*req);
        if (a->before) a->before();
        for (size_t off = 0; off < a->reply.size();) {
          const ssize_t w = ::send(fd, a->reply.data() + off, a->reply.size() - off, MSG_NOSIGNAL);
          if (w <= 0) break;
          off += static_cast<size_t>(w);
        }
        if (a->close) open = false;
      }
    }
    ::shutdown(fd, SHUT_RDWR);
    {
      std::lock_guard<std::mutex> lock(mu_);
      records_[static_cast<size_t>(conn)].closed = true;
    }
    cv_.notify_all();
  }

 public:
  static Action Default(const kp::Request& req) {
    if (req.op == "hello") {
      kp::HelloReply h{"keymesh-test", 1, 1, {"p"}, 8};
      return {kp::OkReply(req.id, h.ToJson())};
    }
    return {kp::OkReply(req.id, {{"echo", req.op}})};
  }

 private:
  Script script_;
  std::string dir_, path_;
  int listen_ = -1;
  int stop_[2] = {-1, -1};
  std::thread acceptor_;
  std::vector<std::thread> workers_;  // joined by the destructor
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<Record> records_;  // guarded by mu_
  std::vector<int> fds_;         // guarded by mu_
};

kp::ControlClientOptions WithHello(const std::string& path) {
  kp::ControlClientOptions o(path);
  o.hello = [] { return kp::HelloRequest{static_cast<uint32_t>(::getpid()), std::nullopt, std::string("p")}; };
  return o;
}

std::string OpOf(const km::Result<json::object>& r) {
  return r.ok() && r->if_contains("echo") ? std::string(r->at("echo").as_string()) : "";
}

// A one-shot gate the server's script waits on.
class Gate {
 public:
  void Open() {
    std::lock_guard<std::mutex> lock(mu_);
    open_ = true;
    cv_.notify_all();
  }
  void Wait() {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait_for(lock, std::chrono::seconds(20), [this] { return open_; });
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool open_ = false;
};

}  // namespace

BOOST_AUTO_TEST_CASE(hello_once_per_connection_and_reuse) {
  TestServer server;
  kp::ControlClient client(WithHello(server.path()));
  BOOST_CHECK(!client.hello_reply().has_value());
  BOOST_REQUIRE(client.Connect().ok());
  BOOST_REQUIRE(client.hello_reply().has_value());
  BOOST_CHECK_EQUAL(client.hello_reply()->segment, "keymesh-test");
  for (int i = 0; i < 3; ++i) BOOST_CHECK_EQUAL(OpOf(client.Call(Op::kStatus, {})), "status");
  BOOST_CHECK_EQUAL(server.connections(), 1);
  BOOST_CHECK_EQUAL(*server.hello_pid(0), static_cast<uint32_t>(::getpid()));
  BOOST_CHECK(server.ops(0) == (std::vector<std::string>{"hello", "status", "status", "status"}));
  // Without hello configured, a connection goes straight to its request.
  kp::ControlClient plain(kp::ControlClientOptions{server.path()});
  BOOST_CHECK_EQUAL(OpOf(plain.Call(Op::kMetrics, {})), "metrics");
  BOOST_CHECK(server.ops(1) == (std::vector<std::string>{"metrics"}));
}

BOOST_AUTO_TEST_CASE(typed_calls_and_broker_errors) {
  TestServer server([](int, const kp::Request& req) -> std::optional<Action> {
    if (req.op == "acquire") {
      if (req.body.at("pool").as_string() == "bad") {
        return Action{kp::OkReply(req.id, {{"key", "a"}, {"slot", 1}, {"lease", 2}})};  // no seq
      }
      return Action{kp::OkReply(req.id, kp::LeaseGrant{"a", 1, 2, 3, 4, 5}.ToJson())};
    }
    if (req.op == "release") return Action{kp::ErrorReply(req.id, km::Status(km::Code::kNotHeld, "stale lease"))};
    return std::nullopt;
  });
  kp::ControlClient client(WithHello(server.path()));
  km::Result<kp::LeaseGrant> g = client.Acquire(kp::AcquireRequest{"p", 1.0, 0}, 5.0);
  BOOST_REQUIRE_MESSAGE(g.ok(), g.status().ToString());
  BOOST_CHECK_EQUAL(g->key, "a");
  BOOST_CHECK_EQUAL(g->seq, 3u);
  g = client.Acquire(kp::AcquireRequest{"bad", 1.0, 0}, 5.0);
  BOOST_CHECK(g.status().code() == km::Code::kProtocolError);
  BOOST_CHECK_MESSAGE(g.status().message().find("'seq'") != std::string::npos, g.status().message());
  kp::EndRequest end;
  end.pool = "p";
  km::Status st = client.End(end);
  BOOST_CHECK(st.code() == km::Code::kNotHeld);
  BOOST_CHECK_EQUAL(st.message(), "stale lease");
  // A broker error keeps the connection: all of it went over one.
  BOOST_CHECK_EQUAL(server.connections(), 1);
  BOOST_CHECK(client.Call(Op::kStatus, {}, -1).status().code() == km::Code::kInvalidArgument);
}

BOOST_AUTO_TEST_CASE(deadline_expires_and_a_late_reply_is_never_taken) {
  Gate gate;
  TestServer server([&](int conn, const kp::Request& req) -> std::optional<Action> {
    if (conn == 0 && req.op == "acquire") {
      // Answers only after the client gave up, with a reply that must not
      // be taken for the answer to anything else.
      return Action{kp::OkReply(req.id, {{"echo", "late"}}), false, [&] { gate.Wait(); }};
    }
    return std::nullopt;
  });
  kp::ControlClient client(WithHello(server.path()));
  const double t0 = Now();
  km::Result<json::object> r = client.Call(Op::kAcquire, {{"pool", "p"}}, 0.3);
  const double waited = Now() - t0;
  BOOST_CHECK(r.status().code() == km::Code::kBrokerUnavailable);
  BOOST_CHECK_MESSAGE(r.status().message().find(server.path()) != std::string::npos, r.status().message());
  BOOST_CHECK_MESSAGE(r.status().message().find("'acquire'") != std::string::npos, r.status().message());
  BOOST_CHECK_GE(waited, 0.3);
  BOOST_CHECK_LT(waited, 3.0);
  gate.Open();
  // The timed-out connection was closed; the next call dials afresh and
  // gets its own answer.
  BOOST_CHECK_EQUAL(OpOf(client.Call(Op::kStatus, {})), "status");
  BOOST_CHECK_EQUAL(server.connections(), 2);
  BOOST_CHECK(server.WaitClosed(0));
}

// The broker closed an idle pooled connection (its idle timeout, a
// restart): the next call notices and uses a new one, without an error.
BOOST_AUTO_TEST_CASE(closed_idle_connection_is_replaced) {
  TestServer server([](int conn, const kp::Request& req) -> std::optional<Action> {
    if (conn == 0 && req.op == "status") {
      Action a = TestServer::Default(req);
      a.close = true;  // answers, then drops the connection like an idle timeout
      return a;
    }
    return std::nullopt;
  });
  kp::ControlClient client(WithHello(server.path()));
  BOOST_CHECK_EQUAL(OpOf(client.Call(Op::kStatus, {})), "status");
  BOOST_REQUIRE(server.WaitClosed(0));
  BOOST_CHECK_EQUAL(OpOf(client.Call(Op::kMetrics, {})), "metrics");
  BOOST_CHECK_EQUAL(server.connections(), 2);
  BOOST_CHECK(server.ops(1) == (std::vector<std::string>{"hello", "metrics"}));
}

// A pooled connection that the broker closes after the request was sent,
// before any reply byte: retried once on a new connection, with its hello.
BOOST_AUTO_TEST_CASE(pooled_connection_closed_before_the_reply_is_retried_once) {
  TestServer server([](int conn, const kp::Request& req) -> std::optional<Action> {
    if (conn == 0 && req.op == "metrics") return Action{"", true};  // reads it, answers nothing, closes
    return std::nullopt;
  });
  kp::ControlClient client(WithHello(server.path()));
  BOOST_REQUIRE(client.Connect().ok());
  km::Result<json::object> r = client.Call(Op::kMetrics, {});
  BOOST_CHECK_EQUAL(OpOf(r), "metrics");
  BOOST_CHECK_EQUAL(server.connections(), 2);
  BOOST_CHECK(server.ops(1) == (std::vector<std::string>{"hello", "metrics"}));
}

BOOST_AUTO_TEST_CASE(a_fresh_connection_that_dies_is_not_retried) {
  TestServer server([](int, const kp::Request& req) -> std::optional<Action> {
    if (req.op == "acquire") return Action{"", true};
    return std::nullopt;
  });
  kp::ControlClient client(WithHello(server.path()));
  km::Result<json::object> r = client.Call(Op::kAcquire, {{"pool", "p"}});
  BOOST_CHECK(r.status().code() == km::Code::kBrokerUnavailable);
  BOOST_CHECK_MESSAGE(r.status().message().find("closed the connection") != std::string::npos, r.status().message());
  BOOST_CHECK_EQUAL(server.connections(), 1);  // no second attempt
  // A pooled one is retried once, and only once.
  BOOST_REQUIRE(client.Connect().ok());  // connection 1, pooled
  r = client.Call(Op::kAcquire, {{"pool", "p"}});
  BOOST_CHECK(r.status().code() == km::Code::kBrokerUnavailable);
  BOOST_CHECK_EQUAL(server.connections(), 3);
  BOOST_CHECK(server.ops(2) == (std::vector<std::string>{"hello", "acquire"}));
}

// Whether this build runs under ThreadSanitizer.
#if defined(__SANITIZE_THREAD__)
constexpr bool kThreadSanitizer = true;
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
constexpr bool kThreadSanitizer = true;
#else
constexpr bool kThreadSanitizer = false;
#endif
#else
constexpr bool kThreadSanitizer = false;
#endif

// A fork child never speaks over its parent's connections: it dials its
// own, and its hello names the child. The child is forked while the test
// server's threads run, so it runs in the release and ASan builds only:
// ThreadSanitizer checks nothing in a child forked from a multi-threaded
// process, and its runtime (before its 2024 fix) could deadlock there on a
// lock another thread held at the fork.
BOOST_AUTO_TEST_CASE(fork_child_dials_with_its_own_hello,
                     *boost::unit_test::precondition([](boost::unit_test::test_unit_id) {
                       return !kThreadSanitizer;
                     })) {
  TestServer server;
  kp::ControlClient client(WithHello(server.path()));
  BOOST_CHECK_EQUAL(OpOf(client.Call(Op::kStatus, {})), "status");
  BOOST_REQUIRE_EQUAL(server.connections(), 1);
  const pid_t child = ::fork();
  if (child == 0) {
    const bool ok = OpOf(client.Call(Op::kStatus, {})) == "status" && OpOf(client.Call(Op::kMetrics, {})) == "metrics";
    ::_exit(ok ? 0 : 1);
  }
  BOOST_REQUIRE(child > 0);
  int status = 0;
  BOOST_REQUIRE_EQUAL(::waitpid(child, &status, 0), child);
  BOOST_CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  BOOST_REQUIRE_EQUAL(server.connections(), 2);
  BOOST_CHECK_EQUAL(*server.hello_pid(0), static_cast<uint32_t>(::getpid()));
  BOOST_CHECK_EQUAL(*server.hello_pid(1), static_cast<uint32_t>(child));
  BOOST_CHECK(server.ops(1) == (std::vector<std::string>{"hello", "status", "metrics"}));
  BOOST_CHECK(server.ops(0) == (std::vector<std::string>{"hello", "status"}));  // the child never used it
  // The parent keeps its own connection.
  BOOST_CHECK_EQUAL(OpOf(client.Call(Op::kStatus, {})), "status");
  BOOST_CHECK_EQUAL(server.connections(), 2);
  BOOST_CHECK(server.ops(0) == (std::vector<std::string>{"hello", "status", "status"}));
}

// Threads never wait for each other's blocking calls: each borrows its own
// connection.
BOOST_AUTO_TEST_CASE(a_blocked_call_does_not_block_other_threads) {
  Gate gate;
  TestServer server([&](int, const kp::Request& req) -> std::optional<Action> {
    if (req.op == "acquire") {
      Action a{kp::OkReply(req.id, {{"echo", "acquire"}})};
      a.before = [&] { gate.Wait(); };
      return a;
    }
    return std::nullopt;
  });
  kp::ControlClient client(WithHello(server.path()));
  BOOST_REQUIRE(client.Connect().ok());
  std::string blocked;
  std::thread t([&] { blocked = OpOf(client.Call(Op::kAcquire, {{"pool", "p"}}, 30)); });
  BOOST_REQUIRE(server.WaitOps(0, 2));  // hello, acquire
  // While the acquire waits in the server, another thread's call completes.
  BOOST_CHECK_EQUAL(OpOf(client.Call(Op::kStatus, {}, 5)), "status");
  BOOST_CHECK_EQUAL(blocked, "");
  gate.Open();
  t.join();
  BOOST_CHECK_EQUAL(blocked, "acquire");
  BOOST_CHECK_EQUAL(server.connections(), 2);
}

BOOST_AUTO_TEST_CASE(replies_are_validated) {
  TestServer server([](int, const kp::Request& req) -> std::optional<Action> {
    if (req.op == "status") return Action{kp::OkReply(req.id + 1000, {})};  // another id
    if (req.op == "metrics") return Action{"this is not json\n"};
    if (req.op == "reclaim") return Action{std::string(kp::kMaxReplyFrame + 2, 'x')};  // no newline, too large
    return std::nullopt;
  });
  kp::ControlClient client(WithHello(server.path()));
  km::Status st = client.Call(Op::kStatus, {}).status();
  BOOST_CHECK(st.code() == km::Code::kProtocolError);
  BOOST_CHECK_MESSAGE(st.message().find("id") != std::string::npos, st.message());
  st = client.Call(Op::kMetrics, {}).status();
  BOOST_CHECK(st.code() == km::Code::kProtocolError);
  st = client.Reclaim(kp::ReclaimRequest{5}).status();
  BOOST_CHECK(st.code() == km::Code::kProtocolError);
  BOOST_CHECK_MESSAGE(st.message().find("exceeds") != std::string::npos, st.message());
  // Every failed connection was dropped, not reused.
  BOOST_CHECK_EQUAL(server.connections(), 3);
  BOOST_CHECK(!km::HasControl(st.message()));
}

BOOST_AUTO_TEST_CASE(hello_refused_is_the_brokers_error) {
  TestServer server([](int, const kp::Request& req) -> std::optional<Action> {
    if (req.op == "hello") return Action{kp::ErrorReply(req.id, km::Status(km::Code::kUnknownKey, "no pool 'p'"))};
    return std::nullopt;
  });
  kp::ControlClient client(WithHello(server.path()));
  km::Status st = client.Connect();
  BOOST_CHECK(st.code() == km::Code::kUnknownKey);
  BOOST_CHECK_EQUAL(st.message(), "no pool 'p'");
  BOOST_CHECK(client.Call(Op::kStatus, {}).status().code() == km::Code::kUnknownKey);
  BOOST_CHECK(!client.hello_reply().has_value());
}

BOOST_AUTO_TEST_CASE(unreachable_socket_is_one_clear_line) {
  const std::string path = "/tmp/kmcc-nobody-" + std::to_string(::getpid()) + ".sock";
  kp::ControlClient client(WithHello(path));
  km::Status st = client.Connect(1.0);
  BOOST_CHECK(st.code() == km::Code::kBrokerUnavailable);
  BOOST_CHECK_EQUAL(st.message(), "cannot reach keymesh-broker at " + path + ": No such file or directory");
  st = client.Call(Op::kStatus, {}).status();
  BOOST_CHECK(st.code() == km::Code::kBrokerUnavailable);
  BOOST_CHECK(st.message().find(path) != std::string::npos);
  kp::ControlClient weird(kp::ControlClientOptions{"/tmp/a\nb.sock"});
  st = weird.Call(Op::kStatus, {}).status();
  BOOST_CHECK(st.code() == km::Code::kBrokerUnavailable);
  BOOST_CHECK(!km::HasControl(st.message()));
  kp::ControlClient too_long(kp::ControlClientOptions{"/tmp/" + std::string(200, 'x')});
  BOOST_CHECK(too_long.Call(Op::kStatus, {}).status().code() == km::Code::kBrokerUnavailable);
}
