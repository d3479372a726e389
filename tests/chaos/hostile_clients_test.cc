// Hostile clients against the real keymesh-broker: more than 1000
// connections at once, some sending a partial frame and never finishing
// it, some flooding requests without reading a reply, some sending random
// bytes, some idle. Meanwhile a well-behaved client does hello + status and
// acquire/release round trips; it must never be starved (every round trip
// answered, p99 under a starvation bound far above normal latency) and the
// broker's resident memory stays bounded (under a cap, and not growing
// without bound between two phases of the same abuse). The good client's
// latency itself is a benchmark figure, printed here, not a pass mark: on a
// loaded 2-core CI machine it varies with everything else that runs.
#define BOOST_TEST_MODULE hostile_clients_test
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <fstream>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <boost/test/unit_test.hpp>

#include "shm/pool.h"
#include "shm/segment.h"
#include "support/broker_harness.h"

namespace {

using keymesh::testing::BrokerProcess;
using keymesh::testing::ChildGuard;
using keymesh::testing::ForkChild;
using keymesh::testing::Latch;
using keymesh::testing::NowSeconds;
using keymesh::testing::RawClient;

// Starvation bound: a broker that let one flooder monopolise it (the bug
// this test caught: all of a session's queued frames served in one turn)
// keeps the good client waiting for seconds; a fair one answers in about
// 1-10 ms on a quiet machine. 250 ms separates the two with room for a
// loaded machine and for ASan (2-20x slower, freed memory in quarantine).
// Under TSan (5-20x slower, every access instrumented) latency says nothing
// about the broker: that build checks for races under hostile input, bounded
// memory and that every round trip is answered.
constexpr double kP99Limit = 0.250;
#if defined(KEYMESH_SANITIZER_ADDRESS) || defined(KEYMESH_SANITIZER_THREAD)
constexpr long kRssLimitKb = 1024 * 1024;
#else
constexpr long kRssLimitKb = 200 * 1024;
#endif
#if defined(KEYMESH_SANITIZER_THREAD)
constexpr bool kCheckLatency = false;
#else
constexpr bool kCheckLatency = true;
#endif

constexpr int kPartial = 400;
constexpr int kFlooders = 50;
constexpr int kRandom = 250;
constexpr int kIdle = 350;  // 1050 hostile connections in all

long RssKb(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("VmRSS:", 0) == 0) return std::stol(line.substr(6));
  }
  return -1;
}

int ConnectNonBlocking(const std::string& path) {
  const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) return -1;
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, path.c_str(), sizeof(addr.sun_path) - 1);
  // A Unix stream connect completes at once or fails with EAGAIN when the
  // listen backlog is full; retry for a while then.
  for (int attempt = 0; attempt < 2000; ++attempt) {
    if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0) return fd;
    if (errno != EAGAIN) break;
    ::usleep(1000);
  }
  ::close(fd);
  return -1;
}

// Writes what fits now; false once the peer closed.
bool WriteSome(int fd, const std::string& bytes) {
  const ssize_t n = ::send(fd, bytes.data(), bytes.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
  return n >= 0 || errno == EAGAIN || errno == EWOULDBLOCK;
}

// What the abuse thread reports after each round: how many flooders the
// broker has dropped so far (a flooder is dropped once its reply queue
// reaches the session's bound, so this counts the abuse reaching full
// strength).
struct AbuseState {
  std::mutex mu;
  std::condition_variable changed;
  uint64_t flooders_dropped = 0;  // guarded by mu
};

struct Hostiles {
  std::vector<int> partial, flood, random, idle;
  ~Hostiles() {
    for (auto* v : {&partial, &flood, &random, &idle}) {
      for (int fd : *v) {
        if (fd >= 0) ::close(fd);
      }
    }
  }
};

// The abuse, run on its own thread until `stop`: flooders write status
// requests as fast as the socket takes them and never read; random
// connections get random bytes (newlines included, so some become bad
// frames); partial ones re-open when the broker drops them after its frame
// timeout and start another frame they never finish.
void Abuse(const std::string& socket, Hostiles* h, std::atomic<bool>* stop, std::atomic<uint64_t>* reconnects,
           AbuseState* state) {
  std::mt19937 rng(12345);
  std::string flood;
  for (int i = 0; i < 64; ++i) flood += "{\"v\":1,\"op\":\"status\",\"id\":" + std::to_string(i + 1) + "}\n";
  flood += "{\"v\":1,\"op\":\"nope\",\"id\":7}\n{\"v\":1,\"op\":\"hello\",\"id\":8,\"pid\":1}\n";
  const std::string partial_frame = "{\"v\":1,\"op\":\"status\",\"id\":1,\"pool\":\"p";
  while (!stop->load()) {
    uint64_t dropped = 0;
    for (int& fd : h->flood) {
      if (fd < 0 || !WriteSome(fd, flood)) {
        if (fd >= 0) ::close(fd);
        fd = ConnectNonBlocking(socket);
        reconnects->fetch_add(1);
        ++dropped;
      }
    }
    {
      std::lock_guard<std::mutex> lock(state->mu);
      state->flooders_dropped += dropped;
    }
    state->changed.notify_all();
    for (int& fd : h->random) {
      if (fd >= 0 && rng() % 10 != 0) continue;  // each writes every ~200 ms
      std::string junk(64 + rng() % 512, '\0');
      for (char& c : junk) c = static_cast<char>(rng() % 64 == 0 ? '\n' : rng() % 256);
      if (fd < 0 || !WriteSome(fd, junk)) {
        if (fd >= 0) ::close(fd);
        fd = ConnectNonBlocking(socket);
        reconnects->fetch_add(1);
      }
    }
    for (int& fd : h->partial) {
      char c;
      const ssize_t n = fd < 0 ? 0 : ::recv(fd, &c, 1, MSG_DONTWAIT);
      if (fd < 0 || n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK) || n > 0) {
        // Closed by the broker (frame timeout) or it replied: start again.
        if (fd >= 0) ::close(fd);
        fd = ConnectNonBlocking(socket);
        if (fd >= 0) WriteSome(fd, partial_frame);
        reconnects->fetch_add(1);
      }
    }
    ::usleep(20000);  // the abuse must not starve the broker of CPU itself
  }
}

// One phase of `seconds`: well-behaved round trips, their latencies.
std::vector<double> Measure(RawClient& client, double seconds) {
  std::vector<double> lat;
  const double end = NowSeconds() + seconds;
  while (NowSeconds() < end) {
    double t0 = NowSeconds();
    auto st = client.Call("status", {{"pool", "p"}});
    lat.push_back(NowSeconds() - t0);
    BOOST_REQUIRE_MESSAGE(st && st->at("ok").as_bool(), "status failed during the abuse");
    t0 = NowSeconds();
    auto a = client.Call("acquire", {{"pool", "p"}, {"timeout", 1.0}});
    lat.push_back(NowSeconds() - t0);
    BOOST_REQUIRE_MESSAGE(a && a->at("ok").as_bool(), "acquire failed during the abuse");
    t0 = NowSeconds();
    auto r = client.Call(
        "release",
        {{"pool", "p"}, {"slot", a->at("slot")}, {"lease", a->at("lease")}, {"seq", a->at("seq")}, {"latency", 0.001}});
    lat.push_back(NowSeconds() - t0);
    BOOST_REQUIRE_MESSAGE(r && r->at("ok").as_bool(), "release failed during the abuse");
    ::usleep(2000);
  }
  return lat;
}

double Percentile(std::vector<double> v, size_t pct) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[std::min(v.size() - 1, v.size() * pct / 100)];
}
double P99(const std::vector<double>& v) { return Percentile(v, 99); }

}  // namespace

BOOST_AUTO_TEST_CASE(broker_serves_a_good_client_among_1000_hostile_ones) {
  rlimit rl{};
  ::getrlimit(RLIMIT_NOFILE, &rl);
  if (rl.rlim_cur < 4096) {
    rl.rlim_cur = std::min<rlim_t>(std::max<rlim_t>(rl.rlim_max, 4096), 65536);
    if (rl.rlim_max < rl.rlim_cur) rl.rlim_max = rl.rlim_cur;  // works as root
    if (::setrlimit(RLIMIT_NOFILE, &rl) != 0) {
      ::getrlimit(RLIMIT_NOFILE, &rl);
      rl.rlim_cur = rl.rlim_max;
      ::setrlimit(RLIMIT_NOFILE, &rl);
    }
  }
  ::getrlimit(RLIMIT_NOFILE, &rl);
  BOOST_REQUIRE_MESSAGE(rl.rlim_cur >= 1200, "RLIMIT_NOFILE " << rl.rlim_cur << " is too low for 1000 connections");

  BrokerProcess b;  // the broker inherits our raised limit
  // More connections than the default max_sessions (1024) on purpose.
  b.WriteConfig(R"({"p":{"keys":[{"name":"a","secret":"sk-hostile-aaaaaaaa1111"},)"
                R"({"name":"b","secret":"sk-hostile-bbbbbbbb2222"}]}})",
                R"(,"max_sessions":4096)");
  BOOST_REQUIRE(b.Start());

  Hostiles h;
  for (int i = 0; i < kIdle; ++i) h.idle.push_back(ConnectNonBlocking(b.socket()));
  for (int i = 0; i < kPartial; ++i) {
    h.partial.push_back(ConnectNonBlocking(b.socket()));
    if (h.partial.back() >= 0) WriteSome(h.partial.back(), "{\"v\":1,\"op\":\"sta");
  }
  for (int i = 0; i < kFlooders; ++i) h.flood.push_back(ConnectNonBlocking(b.socket()));
  for (int i = 0; i < kRandom; ++i) h.random.push_back(ConnectNonBlocking(b.socket()));
  int open = 0;
  for (auto* v : {&h.partial, &h.flood, &h.random, &h.idle})
    open += static_cast<int>(std::count_if(v->begin(), v->end(), [](int fd) { return fd >= 0; }));
  BOOST_TEST_MESSAGE("hostile connections open: " << open);
  BOOST_REQUIRE_GE(open, 1000);

  RawClient good(b.socket());
  BOOST_REQUIRE(good.connected());
  auto hello = good.Call("hello", {{"pid", static_cast<int64_t>(::getpid())}});
  BOOST_REQUIRE(hello && hello->at("ok").as_bool());

  std::atomic<bool> stop{false};
  std::atomic<uint64_t> reconnects{0};
  AbuseState abuse;
  std::thread abuser(Abuse, b.socket(), &h, &stop, &reconnects, &abuse);

  // Measure only once the abuse is at full strength: the broker has had to
  // drop as many flooders as there are (each for a reply queue at its bound).
  {
    std::unique_lock<std::mutex> lock(abuse.mu);
    const bool saturated =
        abuse.changed.wait_for(lock, std::chrono::seconds(60), [&] { return abuse.flooders_dropped >= kFlooders; });
    const uint64_t dropped = abuse.flooders_dropped;
    lock.unlock();
    if (!saturated) {
      stop = true;
      abuser.join();
      BOOST_FAIL("the broker dropped only " << dropped << " flooders in 60 s; it should drop each non-reader");
    }
  }
  std::vector<double> lat1 = Measure(good, 6);
  const long rss1 = RssKb(b.pid());
  std::vector<double> lat2 = Measure(good, 6);
  const long rss2 = RssKb(b.pid());
  stop = true;
  abuser.join();

  std::vector<double> all = lat1;
  all.insert(all.end(), lat2.begin(), lat2.end());
  const double p99 = P99(all);
  BOOST_TEST_MESSAGE("round trips " << all.size() << ", p50 " << Percentile(all, 50) * 1000 << " ms, p99 " << p99 * 1000
                                    << " ms (phase 1 " << P99(lat1) * 1000 << ", phase 2 " << P99(lat2) * 1000
                                    << "), broker RSS " << rss1 / 1024 << " MB then " << rss2 / 1024
                                    << " MB, hostile reconnects " << reconnects.load());
  BOOST_CHECK_GT(all.size(), 30u);
  if (kCheckLatency) {
    BOOST_CHECK_GT(all.size(), 300u);
    BOOST_CHECK_LT(p99, kP99Limit);
  }
  BOOST_CHECK_GT(rss1, 0);
  BOOST_CHECK_LT(rss2, kRssLimitKb);
  // Same abuse, second phase: memory plateaus (queues are bounded).
  BOOST_CHECK_LT(rss2, rss1 + rss1 / 2 + 16 * 1024);

  // Still a normal broker afterwards.
  auto st = good.Call("status", {});
  BOOST_CHECK(st && st->at("ok").as_bool());
  BOOST_CHECK_EQUAL(b.Stop(), 0);
}

namespace {

std::string ErrorCode(const std::optional<boost::json::object>& r) {
  if (!r) return "(no reply)";
  if (r->at("ok").as_bool()) return "ok";
  return std::string(r->at("error").as_object().at("code").as_string());
}

boost::json::object Hello() { return {{"pid", static_cast<int64_t>(::getpid())}}; }

}  // namespace

// KM-09: the frame deadline counts from a frame's first byte; a peer that
// sends one byte every 100 ms (each read used to re-arm the timer) is
// closed at the deadline all the same.
BOOST_AUTO_TEST_CASE(a_dribbler_is_closed_at_the_frame_deadline_counted_from_its_first_byte) {
  constexpr double kTimeout = 0.5;  // the config's frame_timeout
  BrokerProcess b;
  b.WriteConfig(R"({"p":{"keys":[{"name":"a","secret":"sk-hostile-aaaaaaaa1111"}]}})", R"(,"frame_timeout":0.5)");
  BOOST_REQUIRE(b.Start());
  RawClient d(b.socket());
  BOOST_REQUIRE(d.connected());
  const std::string frame = R"({"v":1,"op":"status","id":1,"pool":"p"})";  // 41 bytes: 4 s at this pace
  const double first = NowSeconds();
  bool closed = false;
  for (size_t i = 0; i < frame.size() && !closed; ++i) {
    if (!d.SendRaw(frame.substr(i, 1))) break;
    closed = d.WaitClosed(0.1);  // the pace: one byte per 100 ms, unless the broker closes first
  }
  if (!closed) closed = d.WaitClosed(kTimeout);
  const double took = NowSeconds() - first;
  BOOST_CHECK(closed);
  BOOST_TEST_MESSAGE("dribbler closed after " << took << " s");
  BOOST_CHECK_GE(took, kTimeout - 0.05);
  BOOST_CHECK_LT(took, kTimeout + 0.3);
  // A frame that completes in time is served.
  RawClient c(b.socket());
  BOOST_CHECK_EQUAL(ErrorCode(c.Call("status", {{"pool", "p"}})), "ok");
}

// KM-09: 100k acquire frames on one connection: the broker drops the
// connection at max_pending_acquires instead of queueing them all, its
// memory hardly grows, and an honest waiter is served at once when the key
// comes free (it queued behind 64 waiters of a dead connection, not 100k).
BOOST_AUTO_TEST_CASE(an_acquire_flood_is_dropped_at_the_cap_and_a_good_client_is_served) {
  BrokerProcess b;
  b.WriteConfig(R"({"w":{"acquire_timeout":30,"keys":[{"name":"only","secret":"sk-hostile-only00001111",)"
                R"("max_concurrency":1}]}})");
  BOOST_REQUIRE(b.Start());
  RawClient holder(b.socket());
  BOOST_REQUIRE_EQUAL(ErrorCode(holder.Call("hello", Hello())), "ok");
  std::optional<boost::json::object> held = holder.Call("acquire", {{"pool", "w"}, {"timeout", 0}});
  BOOST_REQUIRE_EQUAL(ErrorCode(held), "ok");
  const long rss0 = RssKb(b.pid());

  RawClient flooder(b.socket());
  BOOST_REQUIRE_EQUAL(ErrorCode(flooder.Call("hello", Hello())), "ok");
  std::string flood;
  for (int i = 0; i < 100000; ++i) {
    flood += R"({"v":1,"op":"acquire","id":)" + std::to_string(i + 10) + R"(,"pool":"w","timeout":300})" + "\n";
  }
  (void)flooder.SendRaw(flood);  // fails part way once the broker closes
  BOOST_CHECK(flooder.WaitClosed(20));
  const long rss1 = RssKb(b.pid());
  BOOST_TEST_MESSAGE("broker RSS " << rss0 / 1024 << " MB before, " << rss1 / 1024 << " MB after the flood");
  BOOST_CHECK_LT(rss1 - rss0, 10 * 1024);
  BOOST_CHECK(b.WaitLog("max_pending_acquires", 5));

  RawClient good(b.socket());
  BOOST_REQUIRE_EQUAL(ErrorCode(good.Call("hello", Hello())), "ok");
  // An acquire timeout is bounded: max(acquire_timeout 30, 300 s).
  BOOST_CHECK_EQUAL(ErrorCode(good.Call("acquire", {{"pool", "w"}, {"timeout", 1e6}})), "invalid_argument");
  BOOST_REQUIRE(good.SendRaw(R"({"v":1,"op":"acquire","id":77,"pool":"w","timeout":5})"
                             "\n"));
  BOOST_REQUIRE_EQUAL(
      ErrorCode(holder.Call(
          "release",
          {{"pool", "w"}, {"slot", held->at("slot")}, {"lease", held->at("lease")}, {"seq", held->at("seq")}})),
      "ok");
  const double released = NowSeconds();
  std::optional<std::string> line = good.ReadLine(5);
  BOOST_REQUIRE(line);
  BOOST_CHECK(line->find("\"ok\":true") != std::string::npos);
  BOOST_CHECK_LT(NowSeconds() - released, 1.0);
}

// KM-07: a broker out of file descriptors (RLIMIT_NOFILE 64, 200
// connections opened) must not take "cannot open a pidfd" for death: a live
// fast-path holder the broker meets for the first time keeps its lease for
// three ticks and ends it itself; the backlog is shed, not left hanging;
// once the flood ends a new client is served.
BOOST_AUTO_TEST_CASE(running_out_of_descriptors_reclaims_no_live_lease) {
  BrokerProcess b;
  b.WriteConfig(R"({"p":{"keys":[{"name":"a","secret":"sk-hostile-aaaaaaaa1111"}]}})");
  BOOST_REQUIRE(b.Start());
#if defined(KEYMESH_SANITIZER_ADDRESS)
  // UBSan's vptr check validates a dynamic type it has not cached by
  // writing the vtable into a pipe (IsAccessibleMemoryRange); out of
  // descriptors it cannot, and reports the object as invalid. So the broker
  // meets the one error category it first uses in this test (Asio's misc
  // category: a peer's EOF) before it runs out: a connection it sees close.
  {
    const int fd = ConnectNonBlocking(b.socket());
    BOOST_REQUIRE(fd >= 0);
    BOOST_REQUIRE(::shutdown(fd, SHUT_WR) == 0);
    pollfd p{fd, POLLIN, 0};
    char c;
    BOOST_REQUIRE(::poll(&p, 1, 5000) == 1 && ::recv(fd, &c, 1, 0) == 0);  // the broker closed it
    ::close(fd);
  }
#endif
  const rlimit limit{64, 64};
  BOOST_REQUIRE(::prlimit(b.pid(), RLIMIT_NOFILE, &limit, nullptr) == 0);

  std::vector<int> flood;
  struct Closer {
    std::vector<int>& fds;
    ~Closer() {
      for (int fd : fds) {
        if (fd >= 0) ::close(fd);
      }
    }
  } closer{flood};
  for (int i = 0; i < 200; ++i) flood.push_back(ConnectNonBlocking(b.socket()));
  BOOST_REQUIRE(b.WaitLog("Too many open files", 10));  // accept_failed or connection_refused

  // A worker on the fast path that never said hello (as after a broker
  // restart): the broker's tick finds it in the lease table and tries to
  // watch it, without a descriptor to spare.
  Latch acquired, release, released;
  const std::string segment = b.segment();
  ChildGuard worker(ForkChild([&] {
    auto seg = keymesh::shm::Segment::Open(segment);
    if (!seg.ok()) return 1;
    std::optional<uint32_t> index = (*seg)->FindPool("p");
    if (!index) return 2;
    keymesh::shm::PoolUser pool(**seg, *index);
    keymesh::Result<keymesh::shm::LeaseHandle> h = pool.TryAcquire();
    if (!h.ok()) return 3;
    acquired.Notify();
    if (release.Wait(30) == 0) return 4;
    keymesh::shm::Outcome ok;
    ok.kind = keymesh::shm::OutcomeKind::kSuccess;
    if (!pool.Release(*h, ok).ok()) return 5;  // kNotHeld had the broker reclaimed it
    released.Notify();
    return 0;
  }));
  BOOST_REQUIRE(acquired.Wait(10));
  // Three ticks that could not tell (one line per tick at most).
  BOOST_CHECK(b.WaitLog("event=liveness_unknown", 10, 3));
  BOOST_CHECK(b.Log().find("event=leases_reclaimed") == std::string::npos);
  release.Notify();
  BOOST_CHECK(released.Wait(10));
  BOOST_CHECK_EQUAL(worker.Wait(), 0);

  for (int& fd : flood) {
    if (fd >= 0) ::close(fd);
    fd = -1;
  }
  // Served after the flood (the broker closes the flood's sessions as it
  // reads their EOFs; the connect itself may be shed while it catches up).
  bool served = false;
  for (const double end = NowSeconds() + 10; !served && NowSeconds() < end;) {
    RawClient c(b.socket());
    served = c.connected() && ErrorCode(c.Call("status", {{"pool", "p"}}, 2)) == "ok";
  }
  BOOST_CHECK(served);
  BOOST_CHECK(b.Log().find("event=leases_reclaimed") == std::string::npos);
  const int code = b.Stop();
  BOOST_CHECK_EQUAL(code, 0);
  if (!served || code != 0) BOOST_TEST_MESSAGE("broker log:\n" << b.Log());
}
