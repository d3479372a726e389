// RedisMeshStore against a real redis-server: the allocator's promise
// (the live hosts' grants of a key never sum above limit x (1 - headroom))
// through joins, leaves, deaths, demand shifts and a Redis that lost its
// state, driven by a fake clock; the event stream, snapshots and the
// mesh-wide probe; and the failure modes (a frozen or absent Redis, a
// hostile server) that must come back as errors within the timeout.
#define BOOST_TEST_MODULE mesh_store_test
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <map>
#include <memory>
#include <ostream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <boost/test/unit_test.hpp>

#include "broker/mesh/redis_connection.h"
#include "broker/mesh/redis_store.h"
#include "support/process.h"
#include "support/redis_server.h"

namespace keymesh {
// Boost.Test prints a Code that a check compares.
inline std::ostream& boost_test_print_type(std::ostream& os, Code code) { return os << CodeName(code); }
}  // namespace keymesh

namespace keymesh::broker::mesh {
namespace {

using keymesh::testing::RedisServer;

// One redis-server for the suite (started once: a start costs ~50 ms of a
// shared CPU); every case starts from FLUSHALL.
RedisServer& Server() {
  static RedisServer* server = [] {
    auto* s = new RedisServer();
    if (!s->Start()) throw std::runtime_error("redis-server did not start");
    return s;
  }();
  return *server;
}

struct ServerCleanup {
  ~ServerCleanup() { delete &Server(); }  // stops it by pid, removes its directory
};
BOOST_TEST_GLOBAL_FIXTURE(ServerCleanup);

MeshConfig Config(uint16_t port = 0, double timeout = 0.5) {
  MeshConfig c;
  c.redis.host = "127.0.0.1";
  c.redis.port = port != 0 ? port : Server().port();
  c.ns = "t";
  c.timeout = timeout;
  return c;
}

struct Fresh {
  Fresh() {
    bool ok = false;
    Server().Cli({"FLUSHALL"}, &ok);
    BOOST_REQUIRE(ok);
  }
  // An epoch with no learning period, as a mesh that has been up for long.
  static void SeedEpoch() {
    bool ok = false;
    Server().Cli({"HSET", "t:epoch", "id", "seed", "learning_until", "0"}, &ok);
    BOOST_REQUIRE(ok);
  }
};

constexpr double kHeadroom = 0.05;

struct KeyDef {
  std::string pool;
  std::string key;
  double req_limit;  // per second
  double tok_limit;
  double burst;
};

// A host as the mesh job would drive it: its own store, its last grants as
// `has`, and what it wants.
struct Host {
  Host(std::string name, const std::vector<KeyDef>& keys) : name(std::move(name)), defs(keys), store(Config()) {
    wants_req.assign(keys.size(), 0);
    wants_tok.assign(keys.size(), 0);
    has_req.assign(keys.size(), 0);
    has_tok.assign(keys.size(), 0);
  }
  Result<LeaseReply> Refresh(int64_t now_ms, uint64_t lease_ms = 1000, const std::string& fingerprint = "f00d") {
    LeaseRequest r;
    r.host = name;
    r.seq = ++seq;
    r.lease_ms = lease_ms;
    r.headroom = kHeadroom;
    r.now_ms_for_testing = now_ms;
    r.learning_quiet_ms = quiet_ms;
    r.deadline_ms = deadline_ms;
    for (size_t i = 0; i < defs.size(); ++i) {
      LeaseKey k;
      k.pool = defs[i].pool;
      k.key = defs[i].key;
      k.fingerprint = fingerprint;
      k.burst = defs[i].burst;
      k.req = Dimension{defs[i].req_limit, wants_req[i], has_req[i], seq};
      k.tok = Dimension{defs[i].tok_limit, wants_tok[i], has_tok[i], seq * 10};
      r.keys.push_back(k);
    }
    Result<LeaseReply> reply = store.Lease(r);
    if (reply.ok() && !reply->stale) {
      expires = reply->expires_ms;
      for (size_t i = 0; i < defs.size(); ++i) {
        has_req[i] = reply->keys[i].req;
        has_tok[i] = reply->keys[i].tok;
      }
    }
    return reply;
  }
  // A request Redis runs whose reply never reaches the host (a timeout, a
  // reset): the host keeps what it holds.
  void RefreshLosingTheReply(int64_t now_ms) {
    const std::vector<double> req = has_req, tok = has_tok;
    const int64_t was = expires;
    Result<LeaseReply> r = Refresh(now_ms);
    BOOST_REQUIRE_MESSAGE(r.ok(), r.status().ToString());
    has_req = req;
    has_tok = tok;
    expires = was;
  }
  void Leave() {
    BOOST_REQUIRE(store.Leave(name).ok());
    std::fill(has_req.begin(), has_req.end(), 0);
    std::fill(has_tok.begin(), has_tok.end(), 0);
    expires = 0;
  }
  bool live(int64_t now) const { return expires > now; }
  uint64_t quiet_ms = 0;
  int64_t deadline_ms = 0;

  std::string name;
  std::vector<KeyDef> defs;
  RedisMeshStore store;
  uint64_t seq = 0;
  int64_t expires = 0;
  std::vector<double> wants_req, wants_tok, has_req, has_tok;
};

// Σ over hosts whose grant is still valid at `now` (what they may spend).
void CheckSums(const std::vector<std::unique_ptr<Host>>& hosts, const std::vector<KeyDef>& defs, int64_t now,
               const std::string& when) {
  for (size_t k = 0; k < defs.size(); ++k) {
    double req = 0;
    double tok = 0;
    for (const auto& h : hosts) {
      if (!h->live(now)) continue;
      req += h->has_req[k];
      tok += h->has_tok[k];
    }
    const double cap_req = defs[k].req_limit * (1 - kHeadroom);
    const double cap_tok = defs[k].tok_limit * (1 - kHeadroom);
    BOOST_TEST_INFO(when << " key " << defs[k].key);
    BOOST_TEST(req <= cap_req * (1 + 1e-12) + 1e-12);
    BOOST_TEST_INFO(when << " key " << defs[k].key);
    BOOST_TEST(tok <= cap_tok * (1 + 1e-12) + 1e-12);
  }
}

const std::vector<KeyDef> kTwoKeys = {{"p", "a", 10, 0, 10}, {"p", "b", 10, 1000, 5}};

BOOST_AUTO_TEST_CASE(names_are_encoded_unambiguously) {
  BOOST_TEST(EncodeName("a:b/c%{d}") == "a%3Ab%2Fc%25%7Bd%7D");
  BOOST_TEST(EncodeName("Key_1.x-y") == "Key_1.x-y");
  BOOST_TEST(*DecodeName("a%3Ab%2Fc%25%7Bd%7D") == "a:b/c%{d}");
  BOOST_TEST(!DecodeName("%3a").has_value());  // lower-case hex: a second spelling
  BOOST_TEST(!DecodeName("%41").has_value());  // 'A' escaped: a second spelling
  BOOST_TEST(!DecodeName("%4").has_value());
  BOOST_TEST(!DecodeName("a:b").has_value());
}

BOOST_FIXTURE_TEST_CASE(grants_never_sum_above_the_cap, Fresh) {
  SeedEpoch();
  const std::vector<KeyDef> defs = {{"p", "req-only", 10, 0, 10}, {"p", "both", 20, 5000, 20}, {"q", "x:y", 3, 100, 1}};
  std::vector<std::unique_ptr<Host>> hosts;
  for (int i = 0; i < 4; ++i) hosts.push_back(std::make_unique<Host>("h" + std::to_string(i), defs));
  std::mt19937 rng(12);  // fixed seed: the same sequence every run
  std::uniform_real_distribution<double> demand(0, 30);
  std::vector<bool> running(hosts.size(), false);
  int64_t now = 1'000'000;
  for (int step = 0; step < 400; ++step) {
    const size_t i = rng() % hosts.size();
    Host& h = *hosts[i];
    const unsigned action = rng() % 10;
    std::string what;
    if (action == 0 && running[i]) {
      h.Leave();
      running[i] = false;
      what = "leave";
    } else if (action == 1 && running[i]) {
      running[i] = false;  // dies: keeps its grant until it expires, never refreshes
      what = "death";
    } else if (action == 2 && running[i]) {
      for (size_t k = 0; k < defs.size(); ++k) h.wants_req[k] = demand(rng) / 10;  // would give back
      h.RefreshLosingTheReply(now);
      what = "refresh whose reply was lost";
    } else if (action <= 3) {
      now += rng() % 700;
      what = "time";
    } else {
      if (action <= 5 || !running[i]) {
        for (size_t k = 0; k < defs.size(); ++k) {
          h.wants_req[k] = demand(rng);
          h.wants_tok[k] = demand(rng) * 300;
        }
      }
      running[i] = true;
      Result<LeaseReply> r = h.Refresh(now);
      BOOST_REQUIRE_MESSAGE(r.ok(), r.status().ToString());
      BOOST_TEST(!r->learning);
      what = "refresh";
    }
    CheckSums(hosts, defs, now, "step " + std::to_string(step) + " (" + what + " of " + h.name + ")");
  }
}

// a's refresh, then b's, 100 ms apart.
void RefreshBoth(Host& a, Host& b, int64_t* now) {
  BOOST_REQUIRE(a.Refresh(*now += 100).ok());
  BOOST_REQUIRE(b.Refresh(*now += 100).ok());
}

// Two hosts on kTwoKeys, a busy (8 a second of each key) and b nearly idle
// (1), refreshed until settled: a holds 8.25, b 1.25 (what neither asked for
// is lent to both alike). a, first alone, is lent the whole key; it gives
// back in its second reply, which its third request reports.
struct Settled : Fresh {
  Settled() {
    SeedEpoch();
    a.wants_req = {8, 8};
    b.wants_req = {1, 1};
    for (int i = 0; i < 3; ++i) RefreshBoth(a, b, &now);
    BOOST_REQUIRE(std::fabs(a.has_req[0] - 8.25) < 1e-9);
    BOOST_REQUIRE(std::fabs(b.has_req[0] - 1.25) < 1e-9);
  }
  Host a{"a", kTwoKeys};
  Host b{"b", kTwoKeys};
  int64_t now = 5000;
};

BOOST_FIXTURE_TEST_CASE(share_follows_demand_within_two_refreshes, Settled) {
  // The busy host goes idle and the idle one gets busy. a's refresh still
  // sees b's old wants and lends a itself half of what is free (4.75; until
  // a's next request Redis counts a's 8.25, as a may not have got the
  // reply); b, short of its fair part while a holds it, is told so (and the
  // others asked to refresh at once); a's next refresh gives it back, and
  // the one after tells Redis a got that reply; b's takes it.
  a.wants_req = {1, 1};
  b.wants_req = {8, 8};
  BOOST_REQUIRE(a.Refresh(now += 100).ok());
  Result<LeaseReply> rb = b.Refresh(now += 100);
  BOOST_REQUIRE(rb.ok());
  BOOST_TEST(rb->short_of_share);
  BOOST_TEST(a.has_req[0] == 4.75, boost::test_tools::tolerance(1e-9));
  BOOST_TEST(b.has_req[0] == 1.25, boost::test_tools::tolerance(1e-9));
  BOOST_REQUIRE(a.Refresh(now += 100).ok());
  BOOST_TEST(a.has_req[0] == 1.25, boost::test_tools::tolerance(1e-9));
  BOOST_REQUIRE(a.Refresh(now += 100).ok());
  rb = b.Refresh(now += 100);
  BOOST_REQUIRE(rb.ok());
  BOOST_TEST(!rb->short_of_share);
  BOOST_TEST(a.has_req[0] == 1.25, boost::test_tools::tolerance(1e-9));
  BOOST_TEST(b.has_req[0] == 8.25, boost::test_tools::tolerance(1e-9));
  // Both want more than there is: each converges to half of the cap.
  a.wants_req = {50, 50};
  b.wants_req = {50, 50};
  Result<LeaseReply> last = Status(Code::kInternal, "");
  for (int i = 0; i < 3; ++i) {
    BOOST_REQUIRE(a.Refresh(now += 100).ok());
    last = b.Refresh(now += 100);
    BOOST_REQUIRE(last.ok());
  }
  BOOST_TEST(std::fabs(a.has_req[0] - 4.75) < 1e-9);
  BOOST_TEST(std::fabs(b.has_req[0] - 4.75) < 1e-9);
  BOOST_TEST(last->keys[0].holders == 2u);
  BOOST_TEST(last->hosts == 2u);
  BOOST_TEST((last->members == std::vector<std::string>{"a", "b"}));
  // The burst is split like the rate; an unlimited token dimension gets 0.
  BOOST_TEST(std::fabs(last->keys[0].burst - 10 * 4.75 / 10) < 1e-9);
  BOOST_TEST(last->keys[0].tok == 0);
  // Nobody wants key b's tokens: each host is lent half of them.
  BOOST_TEST(std::fabs(last->keys[1].tok - 475) < 1e-9);
}

// Hosts capped at a fractional level of a key that counts per second could
// each send its ceiling in the same second (three at 3.17 of a 10/s key:
// 4 + 4 + 4). So all but one are granted the whole part of the level (3)
// and that one the rest (3.5), in turn, ten leases each, in name order: no
// second holds more than 3 + 3 + 4. Two hosts at 4.75 (5 + 5 fits) and
// three at 3.8 of a 12/s key (4 + 4 + 4 fits) keep the plain split.
BOOST_FIXTURE_TEST_CASE(hosts_capped_together_get_whole_requests_but_one, Fresh) {
  SeedEpoch();
  const std::vector<KeyDef> defs = {{"p", "ten", 10, 0, 1}, {"p", "twelve", 12, 0, 1}};
  std::vector<std::unique_ptr<Host>> hosts;
  for (const char* name : {"c", "a", "b"}) {
    hosts.push_back(std::make_unique<Host>(name, defs));
    hosts.back()->wants_req = {50, 50};
  }
  constexpr uint64_t kLease = 10'000;
  auto rounds = [&](int64_t* now, int n) {
    for (int i = 0; i < n; ++i) {
      for (auto& h : hosts) {
        Result<LeaseReply> r = h->Refresh(*now += 100, kLease);
        BOOST_REQUIRE_MESSAGE(r.ok(), r.status().ToString());
      }
    }
  };
  // Exactly one host holds the rest of the 10/s key, the others 3 each;
  // the 12/s key splits evenly (4 + 4 + 4 fits). Returns the holder.
  auto check = [&](const std::string& when) {
    int whole_seconds = 0;
    std::vector<std::string> holders;
    for (const auto& h : hosts) {
      BOOST_TEST_INFO(when << ": " << h->name << " holds " << h->has_req[0]);
      BOOST_TEST((std::abs(h->has_req[0] - 3.5) < 1e-9 || std::abs(h->has_req[0] - 3.0) < 1e-9));
      if (h->has_req[0] > 3.25) holders.push_back(h->name);
      whole_seconds += static_cast<int>(std::ceil(h->has_req[0] - 1e-9));
      BOOST_TEST_INFO(when << ": " << h->name);
      BOOST_TEST(h->has_req[1] == 11.4 / 3, boost::test_tools::tolerance(1e-9));
    }
    BOOST_TEST(whole_seconds <= 10);
    BOOST_REQUIRE_EQUAL(holders.size(), 1u);
    return holders[0];
  };
  // The rest moves on in name order (a, b, c) every ten leases; the
  // leases stay live across the move, so the last holder's 3.5 counts
  // until it reports the 3.
  constexpr int64_t kTurn = 10 * static_cast<int64_t>(kLease);
  int64_t now = 3 * kTurn - 3000;
  rounds(&now, 4);
  const std::string first = check("before the move");
  now = 3 * kTurn;
  rounds(&now, 3);
  const std::string second = check("after the move");
  BOOST_TEST(second == (first == "a" ? "b" : first == "b" ? "c" : "a"));
  CheckSums(hosts, defs, now, "after the move");
  // One of them turns light: the other two are capped at 4.4, and 5 + 5 +
  // its ceiling would pass 10, so one of them gets 4 and the other 4.8.
  hosts[0]->wants_req = {0.7, 50};  // c
  rounds(&now, 3);
  BOOST_TEST(hosts[0]->has_req[0] == 0.7, boost::test_tools::tolerance(1e-9));
  BOOST_TEST(hosts[1]->has_req[0] + hosts[2]->has_req[0] == 9.5 - 0.7, boost::test_tools::tolerance(1e-9));
  BOOST_TEST(std::min(hosts[1]->has_req[0], hosts[2]->has_req[0]) == 4.0, boost::test_tools::tolerance(1e-9));
}

// Where the rest of a key falls starts key by key (a hash of its name), so
// that a host's keys do not all hand it the rest at once.
BOOST_FIXTURE_TEST_CASE(the_rest_falls_on_different_hosts_key_by_key, Fresh) {
  SeedEpoch();
  std::vector<KeyDef> defs;
  for (int i = 0; i < 6; ++i) defs.push_back({"p", "k" + std::to_string(i), 10, 0, 1});
  std::vector<std::unique_ptr<Host>> hosts;
  for (const char* name : {"a", "b", "c"}) {
    hosts.push_back(std::make_unique<Host>(name, defs));
    hosts.back()->wants_req = std::vector<double>(defs.size(), 50);
  }
  int64_t now = 1000;
  for (int round = 0; round < 4; ++round) {
    for (auto& h : hosts) BOOST_REQUIRE(h->Refresh(now += 100, 10'000).ok());
  }
  std::map<std::string, int> rests;  // host -> keys whose rest it holds
  for (size_t k = 0; k < defs.size(); ++k) {
    int holders = 0;
    for (const auto& h : hosts) {
      if (h->has_req[k] > 3.25) {
        ++holders;
        ++rests[h->name];
      }
    }
    BOOST_TEST_INFO(defs[k].key);
    BOOST_TEST(holders == 1);
  }
  BOOST_TEST(rests.size() >= 2u);
}

// A host short of its fair part because another holds it (lent while
// nobody wanted it) asks every other host to refresh at once: one
// rebalance event (kind 7, no key), at most one per 200 ms.
BOOST_FIXTURE_TEST_CASE(a_short_host_asks_the_others_to_refresh, Fresh) {
  SeedEpoch();
  RedisMeshStore reader(Config());
  Result<EventBatch> start = reader.ReadEvents("$", 0);
  BOOST_REQUIRE(start.ok());
  Host a("a", kTwoKeys);
  Host b("b", kTwoKeys);
  a.wants_req = {1, 1};
  b.wants_req = {8, 8};
  BOOST_REQUIRE(a.Refresh(1000).ok());
  BOOST_TEST(a.has_req[0] == 9.5, boost::test_tools::tolerance(1e-9));  // alone: lent the whole key
  Result<LeaseReply> r = b.Refresh(1001);
  BOOST_REQUIRE(r.ok());
  BOOST_TEST(r->short_of_share);
  BOOST_TEST(b.has_req[0] == 0);
  BOOST_REQUIRE(b.Refresh(1002).ok());  // short again at once: no second event
  Result<EventBatch> got = reader.ReadEvents(start->last_id, 0);
  BOOST_REQUIRE_MESSAGE(got.ok(), got.status().ToString());
  BOOST_REQUIRE(got->events.size() == 1u);
  BOOST_TEST((got->events[0].kind == EventKind::kRebalance));
  BOOST_TEST(got->events[0].origin == "b");
  BOOST_TEST(got->events[0].pool.empty());
  BOOST_TEST(got->events[0].key.empty());
  // a gives back what it was lent (and says so with its next request); b
  // takes its part, no longer short.
  BOOST_REQUIRE(a.Refresh(1003).ok());
  BOOST_REQUIRE(a.Refresh(1004).ok());
  r = b.Refresh(1005);
  BOOST_REQUIRE(r.ok());
  BOOST_TEST(!r->short_of_share);
  BOOST_TEST(a.has_req[0] == 1.25, boost::test_tools::tolerance(1e-9));
  BOOST_TEST(b.has_req[0] == 8.25, boost::test_tools::tolerance(1e-9));
  // Hosts never publish one.
  KeyEvent e;
  e.pool = "p";
  e.key = "a";
  e.kind = EventKind::kRebalance;
  e.origin = "a";
  BOOST_TEST(a.store.Publish(e).status().code() == Code::kInvalidArgument);
}

// A reply that never reached its host must not let the others take what
// the host gave back in it: the host still paces at what it held.
BOOST_FIXTURE_TEST_CASE(a_grant_whose_reply_was_lost_is_not_granted_twice, Settled) {
  const double cap = kTwoKeys[0].req_limit * (1 - kHeadroom);
  // a gives back in a reply it never gets; b asks for the key.
  a.wants_req = {1, 1};
  a.RefreshLosingTheReply(now += 100);
  b.wants_req = {8, 8};
  BOOST_REQUIRE(b.Refresh(now += 100).ok());
  BOOST_TEST(a.has_req[0] + b.has_req[0] <= cap + 1e-9);
  // a's next reply gives back; Redis counts a's old share until a's request
  // after that reports the smaller one.
  BOOST_REQUIRE(a.Refresh(now += 100).ok());
  BOOST_TEST(a.has_req[0] == 1.25, boost::test_tools::tolerance(1e-9));
  BOOST_REQUIRE(b.Refresh(now += 100).ok());
  BOOST_TEST(b.has_req[0] <= cap - 8 + 1e-9);
  RefreshBoth(a, b, &now);
  BOOST_TEST(b.has_req[0] == 8.25, boost::test_tools::tolerance(1e-9));
  // A host reporting more than its record gets no more counted than that.
  a.has_req = {9.5, 9.5};
  RefreshBoth(a, b, &now);
  BOOST_TEST(b.has_req[0] == 8.25, boost::test_tools::tolerance(1e-9));
}

// A shortfall that is only what another host gave back and has not yet
// reported having asks nobody to refresh (that host's next request frees
// it); one that another host still holds by its grant does.
BOOST_FIXTURE_TEST_CASE(a_shortfall_of_unreported_give_backs_asks_no_rebalance, Settled) {
  // b wants more before a refreshed: a still holds it by its grant.
  b.wants_req = {8, 8};
  Result<LeaseReply> r = b.Refresh(now += 100);
  BOOST_REQUIRE(r.ok());
  BOOST_TEST(r->short_of_share);
  // a's refresh gives back (its grant falls to 4.75; Redis counts 8.25 until
  // a reports the smaller one): b is still short by Redis's count, but not
  // by a's grant.
  BOOST_REQUIRE(a.Refresh(now += 100).ok());
  BOOST_REQUIRE(a.has_req[0] == 4.75);
  r = b.Refresh(now += 100);
  BOOST_REQUIRE(r.ok());
  BOOST_TEST(!r->short_of_share);
  BOOST_TEST(b.has_req[0] == 1.25, boost::test_tools::tolerance(1e-9));
  RefreshBoth(a, b, &now);
  BOOST_TEST(b.has_req[0] == 4.75, boost::test_tools::tolerance(1e-9));
}

// A lease record written before records kept the grant (10 fields) still
// counts: a rolling upgrade grants nothing twice.
BOOST_FIXTURE_TEST_CASE(a_record_without_a_grant_field_still_counts, Fresh) {
  SeedEpoch();
  Host b("b", kTwoKeys);
  b.wants_req = {50, 50};
  RedisMeshStore probe(Config());
  bool ok = false;
  Server().Cli({"HSET", probe.key_prefix() + "lease:p/a", "old", "6 0 6 0 999999999 1 0 0 10 0"}, &ok);
  BOOST_REQUIRE(ok);
  Server().Cli({"ZADD", probe.key_prefix() + "hosts", "999999999", "old"}, &ok);
  BOOST_REQUIRE(ok);
  Result<LeaseReply> r = b.Refresh(1000);
  BOOST_REQUIRE_MESSAGE(r.ok(), r.status().ToString());
  BOOST_TEST(b.has_req[0] == 9.5 - 6, boost::test_tools::tolerance(1e-9));
  BOOST_TEST(r->keys[0].holders == 2u);
  BOOST_TEST(r->short_of_share);  // by the old record's grant (its has) too
}

BOOST_FIXTURE_TEST_CASE(a_dead_hosts_share_returns_after_its_lease, Fresh) {
  SeedEpoch();
  Host a("a", kTwoKeys);
  Host b("b", kTwoKeys);
  a.wants_req = b.wants_req = {50, 50};
  int64_t now = 10'000;
  for (int i = 0; i < 2; ++i) {
    BOOST_REQUIRE(a.Refresh(now).ok());
    BOOST_REQUIRE(b.Refresh(now).ok());
  }
  const int64_t b_expires = b.expires;
  // b dies. Until its lease ends a cannot have its share.
  Result<LeaseReply> r = a.Refresh(b_expires - 1);
  BOOST_REQUIRE(r.ok());
  BOOST_TEST(std::fabs(a.has_req[0] - 4.75) < 1e-9);
  BOOST_TEST(r->hosts == 2u);
  r = a.Refresh(b_expires);
  BOOST_REQUIRE(r.ok());
  BOOST_TEST(std::fabs(a.has_req[0] - 9.5) < 1e-9);
  BOOST_TEST(r->hosts == 1u);
  BOOST_TEST(r->keys[0].holders == 1u);
}

BOOST_FIXTURE_TEST_CASE(leave_frees_the_share_at_once, Fresh) {
  SeedEpoch();
  Host a("a", kTwoKeys);
  Host b("b", kTwoKeys);
  a.wants_req = b.wants_req = {50, 50};
  const int64_t now = 10'000;
  for (int i = 0; i < 2; ++i) {
    BOOST_REQUIRE(a.Refresh(now).ok());
    BOOST_REQUIRE(b.Refresh(now).ok());
  }
  b.Leave();
  Result<LeaseReply> r = a.Refresh(now + 1);
  BOOST_REQUIRE(r.ok());
  BOOST_TEST(std::fabs(a.has_req[0] - 9.5) < 1e-9);
  BOOST_TEST((r->members == std::vector<std::string>{"a"}));
}

BOOST_FIXTURE_TEST_CASE(learning_after_redis_lost_its_state_grants_nothing_twice, Fresh) {
  SeedEpoch();
  std::vector<std::unique_ptr<Host>> hosts;
  for (const char* n : {"a", "b", "c"}) hosts.push_back(std::make_unique<Host>(n, kTwoKeys));
  Host& a = *hosts[0];
  Host& b = *hosts[1];
  Host& c = *hosts[2];
  a.wants_req = {2, 2};
  b.wants_req = {50, 50};
  int64_t now = 20'000;
  const uint64_t lease = 3000;
  for (int i = 0; i < 3; ++i) {
    BOOST_REQUIRE(a.Refresh(now, lease).ok());
    BOOST_REQUIRE(b.Refresh(now, lease).ok());
  }
  BOOST_TEST(a.has_req[0] == 2);
  BOOST_TEST(std::fabs(b.has_req[0] - 7.5) < 1e-9);
  const std::string old_epoch = a.Refresh(now, lease)->epoch;

  Fresh wipe;  // Redis restarts empty: nobody's lease is known any more
  // Demand shifted while Redis was away: a now wants everything. It may only
  // keep what it held; the newcomer c gets nothing; b re-reports its share.
  a.wants_req = {50, 50};
  c.wants_req = {50, 50};
  now += 100;
  Result<LeaseReply> r = a.Refresh(now, lease);
  BOOST_REQUIRE(r.ok());
  BOOST_TEST(r->learning);
  BOOST_TEST(r->epoch != old_epoch);
  BOOST_TEST(a.has_req[0] == 2);
  CheckSums(hosts, kTwoKeys, now, "a re-reported");
  BOOST_REQUIRE(c.Refresh(now, lease).ok());
  BOOST_TEST(c.has_req[0] == 0);
  CheckSums(hosts, kTwoKeys, now, "newcomer c");
  BOOST_REQUIRE(b.Refresh(now, lease).ok());
  BOOST_TEST(std::fabs(b.has_req[0] - 7.5) < 1e-9);
  CheckSums(hosts, kTwoKeys, now, "b re-reported");
  // A host that claims more than is left is held to what is left.
  b.has_req[0] = 9;
  BOOST_REQUIRE(b.Refresh(now, lease).ok());
  BOOST_TEST(std::fabs(b.has_req[0] - 7.5) < 1e-9);
  CheckSums(hosts, kTwoKeys, now, "b claimed more");
  // After one lease the allocator shares by demand again.
  now += static_cast<int64_t>(lease);
  for (int i = 0; i < 3; ++i) {
    for (auto& h : hosts) {
      r = h->Refresh(now, lease);
      BOOST_REQUIRE(r.ok());
      BOOST_TEST(!r->learning);
      CheckSums(hosts, kTwoKeys, now, "after learning");
    }
  }
  BOOST_TEST(c.has_req[0] > 0);
}

BOOST_FIXTURE_TEST_CASE(a_new_mesh_learns_only_until_it_is_quiet, Fresh) {
  // No epoch at all: Redis cannot tell a new mesh from a lost one. Nobody
  // reports holding a share within the quiet time: the mesh is new, so
  // learning ends then instead of after a whole lease.
  Host a("a", kTwoKeys);
  Host b("b", kTwoKeys);
  a.quiet_ms = b.quiet_ms = 600;
  a.wants_req = b.wants_req = {3, 3};
  const uint64_t lease = 30'000;
  int64_t now = 50'000;
  Result<LeaseReply> r = a.Refresh(now, lease);
  BOOST_REQUIRE(r.ok());
  BOOST_TEST(r->learning);
  BOOST_TEST(a.has_req[0] == 0);
  now += 300;
  BOOST_REQUIRE(b.Refresh(now, lease).ok());
  BOOST_TEST(b.has_req[0] == 0);
  now += 300;
  r = a.Refresh(now, lease);
  BOOST_REQUIRE(r.ok());
  BOOST_TEST(!r->learning);
  BOOST_TEST(a.has_req[0] == 4.75, boost::test_tools::tolerance(1e-9));  // its 3 and half of what nobody asked for
  BOOST_REQUIRE(b.Refresh(now, lease).ok());
  BOOST_TEST(b.has_req[0] == 4.75, boost::test_tools::tolerance(1e-9));

  // Redis loses its state while both hold shares: a host re-reports its
  // share within the quiet time, so learning lasts the whole lease and the
  // newcomer c gets nothing meanwhile.
  Fresh wipe;
  Host c("c", kTwoKeys);
  c.quiet_ms = 600;
  c.wants_req = {3, 3};
  now += 100;
  r = a.Refresh(now, lease);
  BOOST_REQUIRE(r.ok());
  BOOST_TEST(r->learning);
  BOOST_TEST(a.has_req[0] == 3);  // what it held, at most its wants
  now += 1000;                    // past the quiet time
  r = c.Refresh(now, lease);
  BOOST_REQUIRE(r.ok());
  BOOST_TEST(r->learning);
  BOOST_TEST(c.has_req[0] == 0);
  now += static_cast<int64_t>(lease);
  BOOST_REQUIRE(a.Refresh(now, lease).ok());  // alone (c's lease ended): lent the whole key
  r = c.Refresh(now, lease);
  BOOST_REQUIRE(r.ok());
  BOOST_TEST(!r->learning);
  BOOST_TEST(c.has_req[0] == 0);
  BOOST_TEST(r->short_of_share);
  BOOST_REQUIRE(a.Refresh(now + 1, lease).ok());  // gives back
  BOOST_REQUIRE(a.Refresh(now + 2, lease).ok());  // and reports it
  BOOST_REQUIRE(c.Refresh(now + 2, lease).ok());
  BOOST_TEST(c.has_req[0] == 4.75, boost::test_tools::tolerance(1e-9));
}

BOOST_FIXTURE_TEST_CASE(hosts_with_different_limits_share_the_smallest, Fresh) {
  SeedEpoch();
  Host a("a", kTwoKeys);
  Host b("b", {{"p", "a", 6, 0, 10}, kTwoKeys[1]});  // its config was reloaded first
  a.wants_req = b.wants_req = {50, 50};
  // a alone got its own limit's share; b then gets nothing until a has
  // refreshed under the smaller limit, after which the sum stays under it.
  BOOST_REQUIRE(a.Refresh(1000).ok());
  BOOST_REQUIRE(b.Refresh(1000).ok());
  BOOST_TEST(b.has_req[0] == 0);
  for (int i = 1; i < 4; ++i) {
    BOOST_REQUIRE(a.Refresh(1000 + i).ok());
    BOOST_TEST(a.has_req[0] + b.has_req[0] <= 6 * (1 - kHeadroom) + 1e-9);
    BOOST_REQUIRE(b.Refresh(1000 + i).ok());
    BOOST_TEST(a.has_req[0] + b.has_req[0] <= 6 * (1 - kHeadroom) + 1e-9);
  }
  BOOST_TEST(std::fabs(a.has_req[0] - 2.85) < 1e-9);
  BOOST_TEST(std::fabs(b.has_req[0] - 2.85) < 1e-9);
}

BOOST_FIXTURE_TEST_CASE(a_different_secret_under_the_same_name_is_refused, Fresh) {
  SeedEpoch();
  Host a("a", kTwoKeys);
  Host b("b", kTwoKeys);
  a.wants_req = b.wants_req = {5, 5};
  BOOST_REQUIRE(a.Refresh(1000, 1000, "aaaa").ok());
  Result<LeaseReply> r = b.Refresh(1000, 1000, "bbbb");
  BOOST_REQUIRE(r.ok());
  BOOST_TEST(r->keys[0].mismatch);
  BOOST_TEST(r->keys[0].req == 0);
  BOOST_TEST(r->keys[0].holders == 1u);
  r = a.Refresh(1001, 1000, "aaaa");
  BOOST_REQUIRE(r.ok());
  BOOST_TEST(!r->keys[0].mismatch);
  BOOST_TEST(r->keys[0].req == 9.5, boost::test_tools::tolerance(1e-9));  // b holds nothing of it: a is lent the rest
  // Once no lease of the first secret lives, the new one is accepted (rotation).
  a.Leave();
  r = b.Refresh(1002, 1000, "bbbb");
  BOOST_REQUIRE(r.ok());
  BOOST_TEST(!r->keys[0].mismatch);
  BOOST_TEST(r->keys[0].req == 9.5, boost::test_tools::tolerance(1e-9));
}

KeyEvent Ev(EventKind kind, int64_t until, const std::string& key = "a", const std::string& origin = "a") {
  KeyEvent e;
  e.pool = "p";
  e.key = key;
  e.kind = kind;
  e.until_ms = until;
  e.origin = origin;
  e.origin_mono_ns = 42;
  return e;
}

BOOST_FIXTURE_TEST_CASE(a_revoked_or_disabled_key_gets_nothing_a_cooling_one_its_deadline, Fresh) {
  SeedEpoch();
  Host a("a", kTwoKeys);
  a.wants_req = {5, 5};
  a.wants_tok = {0, 100};
  BOOST_REQUIRE(a.Refresh(1000).ok());
  BOOST_TEST(a.has_req[0] == 9.5, boost::test_tools::tolerance(1e-9));  // alone: its 5 and the rest, lent
  BOOST_REQUIRE(a.store.Publish(Ev(EventKind::kCooldown, 3000)).ok());
  Result<LeaseReply> r = a.Refresh(1100);
  BOOST_REQUIRE(r.ok());
  // Cooling: the deadline comes back (every host merges it), the share
  // stays, so the key is served at once when the cooldown ends.
  BOOST_TEST(r->keys[0].req == 9.5, boost::test_tools::tolerance(1e-9));
  BOOST_TEST(r->keys[0].cool_until_ms == 3000);
  BOOST_TEST(r->keys[1].req == 9.5, boost::test_tools::tolerance(1e-9));  // the other key is untouched
  r = a.Refresh(3000);
  BOOST_REQUIRE(r.ok());
  BOOST_TEST(r->keys[0].req == 9.5, boost::test_tools::tolerance(1e-9));
  BOOST_TEST(r->keys[0].cool_until_ms == 0);

  BOOST_REQUIRE(a.store.Publish(Ev(EventKind::kDisabled, 0, "b")).ok());
  r = a.Refresh(3100);
  BOOST_REQUIRE(r.ok());
  BOOST_TEST(r->keys[1].req == 0);
  BOOST_TEST(r->keys[1].tok == 0);
  BOOST_REQUIRE(a.store.Publish(Ev(EventKind::kEnabled, 0, "b")).ok());
  BOOST_REQUIRE(a.store.Publish(Ev(EventKind::kRevoked, 0, "b")).ok());
  r = a.Refresh(3200);
  BOOST_REQUIRE(r.ok());
  BOOST_TEST(r->keys[1].req == 0);
  BOOST_REQUIRE(a.store.Publish(Ev(EventKind::kReset, 0, "b")).ok());
  r = a.Refresh(3300);
  BOOST_REQUIRE(r.ok());
  BOOST_TEST(r->keys[1].req == 9.5, boost::test_tools::tolerance(1e-9));
  BOOST_TEST(r->keys[1].tok == 950, boost::test_tools::tolerance(1e-9));
}

BOOST_FIXTURE_TEST_CASE(publish_max_merges_and_reset_bumps_the_version, Fresh) {
  RedisMeshStore s(Config());
  Result<KeyEvent> e = s.Publish(Ev(EventKind::kCooldown, 1000));
  BOOST_REQUIRE(e.ok());
  BOOST_TEST(e->until_ms == 1000);
  BOOST_TEST(!e->stream_id.empty());
  e = s.Publish(Ev(EventKind::kCooldown, 500));  // never shortened, nothing sent
  BOOST_REQUIRE(e.ok());
  BOOST_TEST(e->until_ms == 1000);
  BOOST_TEST(e->stream_id.empty());
  e = s.Publish(Ev(EventKind::kCooldown, 2000));
  BOOST_REQUIRE(e.ok());
  BOOST_TEST(e->until_ms == 2000);
  BOOST_TEST(e->version == 0u);
  e = s.Publish(Ev(EventKind::kReset, 0));
  BOOST_REQUIRE(e.ok());
  BOOST_TEST(e->version == 1u);
  e = s.Publish(Ev(EventKind::kCooldown, 500));  // the reset cleared the old deadline
  BOOST_REQUIRE(e.ok());
  BOOST_TEST(e->until_ms == 500);
  BOOST_TEST(e->version == 1u);
  e = s.Publish(Ev(EventKind::kCircuitOpen, 700));
  BOOST_REQUIRE(e.ok());
  BOOST_TEST(e->until_ms == 700);
  e = s.Publish(Ev(EventKind::kCircuitClosed, 0));
  BOOST_REQUIRE(e.ok());
  BOOST_TEST(!e->stream_id.empty());
  e = s.Publish(Ev(EventKind::kCircuitClosed, 0));  // already closed: nothing sent
  BOOST_REQUIRE(e.ok());
  BOOST_TEST(e->stream_id.empty());
  BOOST_TEST(s.Publish(Ev(static_cast<EventKind>(9), 0)).status().code() == Code::kInvalidArgument);
  BOOST_TEST(s.Publish(Ev(EventKind::kCooldown, 1, "bad key")).status().code() == Code::kInvalidArgument);
}

BOOST_FIXTURE_TEST_CASE(read_events_returns_other_hosts_changes_and_reports_gaps, Fresh) {
  RedisMeshStore a(Config());
  RedisMeshStore b(Config());
  Result<EventBatch> start = b.ReadEvents("$", 0);
  BOOST_REQUIRE(start.ok());
  BOOST_TEST(!start->gap);
  BOOST_REQUIRE(a.Publish(Ev(EventKind::kCooldown, 1000, "k:1")).ok());
  BOOST_REQUIRE(a.Publish(Ev(EventKind::kDisabled, 0, "k2")).ok());
  Result<EventBatch> got = b.ReadEvents(start->last_id, 0);
  BOOST_REQUIRE_MESSAGE(got.ok(), got.status().ToString());
  BOOST_TEST(!got->gap);
  BOOST_REQUIRE(got->events.size() == 2u);
  BOOST_TEST(got->events[0].key == "k:1");
  BOOST_TEST(got->events[0].until_ms == 1000);
  BOOST_TEST(got->events[0].origin == "a");
  BOOST_TEST(got->events[0].origin_mono_ns == 42u);
  BOOST_TEST((got->events[1].kind == EventKind::kDisabled));
  BOOST_TEST(got->last_id == got->events[1].stream_id);

  // A blocked reader wakes for a new event, long before its block ends.
  std::atomic<bool> published{false};
  std::thread writer([&] {
    RedisMeshStore w(Config());
    std::this_thread::sleep_for(std::chrono::milliseconds(50));  // the reader must be blocked first: not a settle
    published = w.Publish(Ev(EventKind::kCooldown, 5000, "k3")).ok();
  });
  const auto t0 = std::chrono::steady_clock::now();
  Result<EventBatch> woke = b.ReadEvents(got->last_id, 5000);
  const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  writer.join();
  BOOST_REQUIRE(published);
  BOOST_REQUIRE_MESSAGE(woke.ok(), woke.status().ToString());
  BOOST_REQUIRE(woke->events.size() == 1u);
  BOOST_TEST(woke->events[0].key == "k3");
  BOOST_TEST(waited < 2.0);
  // Nothing new: an empty batch after the block, the id kept.
  Result<EventBatch> idle = b.ReadEvents(woke->last_id, 20);
  BOOST_REQUIRE(idle.ok());
  BOOST_TEST(idle->events.empty());
  BOOST_TEST(idle->last_id == woke->last_id);

  // The stream trimmed past the reader: a gap.
  const std::string behind = woke->last_id;
  for (int i = 0; i < 3; ++i) BOOST_REQUIRE(a.Publish(Ev(EventKind::kCooldown, 6000 + i, "k4")).ok());
  bool ok = false;
  Server().Cli({"XTRIM", "t:events", "MAXLEN", "1"}, &ok);
  BOOST_REQUIRE(ok);
  Result<EventBatch> gap = b.ReadEvents(behind, 0);
  BOOST_REQUIRE(gap.ok());
  BOOST_TEST(gap->gap);
  // Placed anew (a reader resuming where it read before), the stream
  // trimmed past it: a gap too.
  RedisMeshStore c(Config());
  Result<EventBatch> placed = c.ReadEvents(behind, 0);
  BOOST_REQUIRE(placed.ok());
  BOOST_TEST(placed->gap);
  // Redis lost its state (a new epoch): a gap for a reader placing itself,
  // and for one reading on, at the first entry after it.
  Result<EventBatch> caught = b.ReadEvents(gap->last_id, 0);
  BOOST_REQUIRE(caught.ok());
  BOOST_TEST(!caught->gap);
  Result<EventBatch> c_caught = c.ReadEvents(caught->last_id, 0);
  BOOST_REQUIRE(c_caught.ok());
  BOOST_TEST(!c_caught->gap);
  Fresh wipe;
  Host h("h", kTwoKeys);
  BOOST_REQUIRE(h.Refresh(1).ok());  // recreates the epoch
  RedisMeshStore d(Config());
  Result<EventBatch> lost = d.ReadEvents(caught->last_id, 0);
  BOOST_REQUIRE(lost.ok());
  BOOST_TEST(lost->gap);
  BOOST_REQUIRE(a.Publish(Ev(EventKind::kCooldown, 7000, "k5")).ok());  // numbered from 1 again
  Result<EventBatch> renumbered = b.ReadEvents(caught->last_id, 0);
  BOOST_REQUIRE(renumbered.ok());
  BOOST_TEST(renumbered->gap);
  BOOST_TEST(renumbered->events.empty());
  BOOST_TEST(b.ReadEvents("nonsense", 0).status().code() == Code::kInvalidArgument);
}

// A reader reading on from its last read or a snapshot costs Redis one
// XREAD per read, nothing else: an idle host's reader adds one command per
// block, not one per refresh.
BOOST_FIXTURE_TEST_CASE(reading_on_is_one_xread_per_read, Fresh) {
  RedisMeshStore a(Config());
  RedisMeshStore b(Config());
  Result<EventBatch> snap = b.Snapshot();
  BOOST_REQUIRE(snap.ok());
  BOOST_REQUIRE(a.Publish(Ev(EventKind::kCooldown, 1000, "k1")).ok());
  bool ok = false;
  Server().Cli({"CONFIG", "RESETSTAT"}, &ok);
  BOOST_REQUIRE(ok);
  Result<EventBatch> got = b.ReadEvents(snap->last_id, 0);
  BOOST_REQUIRE_MESSAGE(got.ok(), got.status().ToString());
  BOOST_TEST(got->events.size() == 1u);
  BOOST_TEST(got->events[0].seq == 1u);
  Result<EventBatch> idle = b.ReadEvents(got->last_id, 10);
  BOOST_REQUIRE(idle.ok());
  BOOST_TEST(idle->events.empty());
  Result<EventBatch> again = b.ReadEvents(idle->last_id, 0);
  BOOST_REQUIRE(again.ok());
  const std::string stats = Server().Cli({"INFO", "commandstats"}, &ok);
  BOOST_REQUIRE(ok);
  BOOST_TEST(stats.find("cmdstat_xread:calls=3,") != std::string::npos, stats);
  BOOST_TEST(stats.find("cmdstat_evalsha") == std::string::npos, stats);
}

// Interrupt() from another thread ends a blocked read at once; the store
// reconnects on its next call.
BOOST_FIXTURE_TEST_CASE(an_interrupt_ends_a_blocked_read, Fresh) {
  RedisMeshStore b(Config());
  Result<EventBatch> start = b.ReadEvents("$", 0);
  BOOST_REQUIRE(start.ok());
  std::atomic<bool> returned{false};
  Result<EventBatch> blocked = Status(Code::kInternal, "not run");
  std::thread reader([&] {
    blocked = b.ReadEvents(start->last_id, 60'000);
    returned = true;
  });
  // Once Redis counts the reader as blocked, interrupt it.
  bool ok = false;
  for (int i = 0; i < 5000 && Server().Cli({"INFO", "clients"}, &ok).find("blocked_clients:1") == std::string::npos;
       ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  BOOST_TEST(!returned.load());
  b.Interrupt();
  reader.join();
  BOOST_TEST(blocked.status().code() == Code::kIoError);
  BOOST_TEST(blocked.status().message().find("interrupted") != std::string::npos, blocked.status().message());
  RedisMeshStore a(Config());
  BOOST_REQUIRE(a.Publish(Ev(EventKind::kCooldown, 1000, "k1")).ok());
  Result<EventBatch> next = b.ReadEvents(start->last_id, 0);
  BOOST_REQUIRE_MESSAGE(next.ok(), next.status().ToString());
  BOOST_TEST(next->events.size() == 1u);
}

// A lease request Redis runs after the host gave up on its reply (it waited
// in a frozen Redis past the host's timeout) is refused and records
// nothing: the host, which never sees that grant, keeps pacing at what it
// holds, and no other host is granted that part meanwhile.
BOOST_FIXTURE_TEST_CASE(a_lease_run_after_its_deadline_records_nothing, Fresh) {
  SeedEpoch();
  Host a("a", kTwoKeys);
  Host b("b", kTwoKeys);
  a.wants_req = {8, 8};
  b.wants_req = {8, 8};
  BOOST_REQUIRE(a.Refresh(1000).ok());
  BOOST_REQUIRE(b.Refresh(1001).ok());
  BOOST_REQUIRE(a.Refresh(1002).ok());
  const std::vector<double> held = a.has_req;
  BOOST_REQUIRE(held[0] > 4);
  // a asks for little (it would give back most), but Redis runs the request
  // after its deadline.
  a.wants_req = {1, 1};
  a.deadline_ms = 1500;
  Result<LeaseReply> late = a.Refresh(2000);
  BOOST_REQUIRE_MESSAGE(late.ok(), late.status().ToString());
  BOOST_TEST(late->stale);
  BOOST_TEST(late->now_ms == 2000);
  BOOST_TEST(late->keys.empty());
  // b, asking for the whole keys, is granted nothing of what a still holds.
  b.wants_req = {10, 10};
  BOOST_REQUIRE(b.Refresh(2001).ok());
  for (size_t k = 0; k < kTwoKeys.size(); ++k) {
    BOOST_TEST(held[k] + b.has_req[k] <= kTwoKeys[k].req_limit * (1 - kHeadroom) + 1e-9, "key " << k);
  }
  // The same request in time is run: a gives back.
  a.deadline_ms = 2500;
  Result<LeaseReply> on_time = a.Refresh(2002);
  BOOST_REQUIRE(on_time.ok());
  BOOST_TEST(!on_time->stale);
  BOOST_TEST(a.has_req[0] < held[0]);
}

BOOST_FIXTURE_TEST_CASE(snapshot_holds_every_live_state, Fresh) {
  RedisMeshStore s(Config());
  Result<MeshStore::TimeSample> t = s.Time();
  BOOST_REQUIRE(t.ok());
  const int64_t now = t->redis_ms;
  BOOST_REQUIRE(s.Publish(Ev(EventKind::kCooldown, now + 60'000, "cool")).ok());
  BOOST_REQUIRE(s.Publish(Ev(EventKind::kCooldown, now - 1000, "over")).ok());  // already over: not in it
  BOOST_REQUIRE(s.Publish(Ev(EventKind::kCircuitOpen, now + 60'000, "open")).ok());
  BOOST_REQUIRE(s.Publish(Ev(EventKind::kRevoked, 0, "rev")).ok());
  BOOST_REQUIRE(s.Publish(Ev(EventKind::kCooldown, now + 60'000, "was-reset")).ok());
  BOOST_REQUIRE(s.Publish(Ev(EventKind::kReset, 0, "was-reset")).ok());
  Result<KeyEvent> last = s.Publish(Ev(EventKind::kDisabled, 0, "off/1"));
  BOOST_REQUIRE(last.ok());
  Result<EventBatch> snap = s.Snapshot();
  BOOST_REQUIRE_MESSAGE(snap.ok(), snap.status().ToString());
  BOOST_TEST(snap->last_id == last->stream_id);
  std::map<std::string, EventKind> by_key;
  for (const KeyEvent& e : snap->events) {
    BOOST_TEST(e.pool == "p");
    BOOST_TEST(e.origin == "a");
    by_key[e.key] = e.kind;
    if (e.key == "was-reset") BOOST_TEST(e.version == 1u);
  }
  BOOST_TEST(by_key.size() == 5u);
  BOOST_TEST((by_key["was-reset"] == EventKind::kReset));  // its version, and no cooldown
  BOOST_TEST((by_key["cool"] == EventKind::kCooldown));
  BOOST_TEST((by_key["open"] == EventKind::kCircuitOpen));
  BOOST_TEST((by_key["rev"] == EventKind::kRevoked));
  BOOST_TEST((by_key["off/1"] == EventKind::kDisabled));
  BOOST_TEST(by_key.count("over") == 0u);
  // Reading on from the snapshot's id misses nothing and repeats nothing.
  Result<EventBatch> next = s.ReadEvents(snap->last_id, 0);
  BOOST_REQUIRE(next.ok());
  BOOST_TEST(!next->gap);
  BOOST_TEST(next->events.empty());
}

BOOST_FIXTURE_TEST_CASE(exactly_one_host_wins_the_probe, Fresh) {
  // Real processes racing for it, each with its own connection.
  std::vector<std::unique_ptr<keymesh::testing::ChildGuard>> children;
  for (int i = 0; i < 4; ++i) {
    const pid_t pid = keymesh::testing::ForkChild([i] {
      RedisMeshStore s(Config());
      Result<bool> won = s.ClaimProbe("p", "k", "host" + std::to_string(i), 60'000);
      if (!won.ok()) return 2;
      Result<bool> again = s.ClaimProbe("p", "k", "host" + std::to_string(i), 60'000);
      if (!again.ok() || *again != *won) return 3;  // the winner keeps it, the losers stay out
      return *won ? 1 : 0;
    });
    children.push_back(std::make_unique<keymesh::testing::ChildGuard>(pid));
  }
  int winners = 0;
  for (auto& c : children) {
    const int rc = c->Wait();
    BOOST_TEST((rc == 0 || rc == 1), "child exit " << rc);
    winners += rc == 1 ? 1 : 0;
  }
  BOOST_TEST(winners == 1);
  // After its ttl anyone may claim it again.
  RedisMeshStore s(Config());
  Result<bool> first = s.ClaimProbe("p", "short", "x", 30);
  BOOST_REQUIRE(first.ok());
  BOOST_TEST(*first);
  BOOST_TEST(!*s.ClaimProbe("p", "short", "y", 30));
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  bool taken = false;
  while (!taken && std::chrono::steady_clock::now() < deadline) {
    Result<bool> r = s.ClaimProbe("p", "short", "y", 30);
    BOOST_REQUIRE(r.ok());
    taken = *r;
  }
  BOOST_TEST(taken);
}

BOOST_FIXTURE_TEST_CASE(a_frozen_redis_fails_within_the_timeout_and_recovers, Fresh) {
  RedisMeshStore s(Config(0, 0.1));
  BOOST_REQUIRE(s.Time().ok());
  Server().Pause();
  struct Thaw {
    ~Thaw() { Server().Resume(); }
  } thaw;
  const auto t0 = std::chrono::steady_clock::now();
  Result<MeshStore::TimeSample> r = s.Time();
  const double took = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  BOOST_TEST(r.status().code() == Code::kIoError);
  BOOST_TEST(r.status().message().find("timed out") != std::string::npos, r.status().message());
  BOOST_TEST(took < 0.6);
  BOOST_TEST(!s.connected());
  Server().Resume();
  Result<MeshStore::TimeSample> back = s.Time();
  BOOST_REQUIRE_MESSAGE(back.ok(), back.status().ToString());
  BOOST_TEST(s.connected());
}

BOOST_FIXTURE_TEST_CASE(a_restarted_redis_costs_one_failed_call_then_works, Fresh) {
  SeedEpoch();
  Host h("h", kTwoKeys);
  h.wants_req = {5, 5};
  BOOST_REQUIRE(h.Refresh(1000).ok());
  // Killed: the call fails at once (closed or refused), it does not hang.
  Server().Kill();
  const auto t0 = std::chrono::steady_clock::now();
  Result<LeaseReply> down = h.Refresh(1100);
  BOOST_TEST(down.status().code() == Code::kIoError, down.status().ToString());
  BOOST_TEST(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() < 1.0);
  // Back empty: the store reconnects, finds its scripts gone (NOSCRIPT),
  // loads them again, and Redis starts a new epoch in learning.
  BOOST_REQUIRE(Server().Restart(true));
  Result<LeaseReply> back = h.Refresh(1200);
  BOOST_REQUIRE_MESSAGE(back.ok(), back.status().ToString());
  BOOST_TEST(back->learning);
  BOOST_TEST(back->keys[0].req == 5);  // it keeps what it held, no more
  bool ok = false;
  Server().Cli({"SCRIPT", "FLUSH"}, &ok);
  BOOST_REQUIRE(ok);
  BOOST_TEST(h.Refresh(1300).ok());
}

BOOST_AUTO_TEST_CASE(connection_refused_is_a_clear_error) {
  const uint16_t port = RedisServer::FreePort();
  RedisMeshStore s(Config(port));
  Status st = s.Connect();
  BOOST_TEST(st.code() == Code::kIoError);
  BOOST_TEST(st.message() == "mesh: redis 127.0.0.1:" + std::to_string(port) + ": connection refused");
  BOOST_TEST(s.Time().status().code() == Code::kIoError);
}

BOOST_FIXTURE_TEST_CASE(auth_and_select, Fresh) {
  const std::string password = "pw-that-must-not-leak";
  MeshConfig c = Config();
  c.password = password;
  c.redis.db = 3;
  bool ok = false;
  Server().Cli({"CONFIG", "SET", "requirepass", password}, &ok);
  BOOST_REQUIRE(ok);
  RedisConnection admin({c.redis, password, 0.5, {}});
  struct Unset {
    RedisConnection& conn;
    ~Unset() { (void)conn.Command({"CONFIG", "SET", "requirepass", ""}); }
  } unset{admin};
  RedisMeshStore s(c);
  Result<KeyEvent> e = s.Publish(Ev(EventKind::kDisabled, 0));
  BOOST_REQUIRE_MESSAGE(e.ok(), e.status().ToString());
  Result<RedisReply> in_db3 = admin.Command({"EXISTS", "t:state:p/a"});
  BOOST_REQUIRE(in_db3.ok());
  BOOST_TEST(in_db3->integer == 1);
  MeshConfig wrong = c;
  wrong.password = "not-it-either";
  RedisMeshStore w(wrong);
  Status st = w.Connect();
  BOOST_TEST(st.code() == Code::kIoError);
  BOOST_TEST(st.message().find("AUTH refused") != std::string::npos, st.message());
  BOOST_TEST(st.message().find("not-it-either") == std::string::npos);
  BOOST_TEST(!w.connected());
}

// A TCP listener that answers every read with the next canned reply
// (then stays silent), on its own thread, stopped by the destructor.
class HostileServer {
 public:
  explicit HostileServer(std::vector<std::string> replies, bool close_after = false)
      : replies_(std::move(replies)), close_after_(close_after) {
    fd_ = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof(addr);
    BOOST_REQUIRE(bind(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0);
    BOOST_REQUIRE(listen(fd_, 4) == 0);
    BOOST_REQUIRE(getsockname(fd_, reinterpret_cast<sockaddr*>(&addr), &len) == 0);
    port_ = ntohs(addr.sin_port);
    thread_ = std::thread([this] { Run(); });
  }
  ~HostileServer() {
    stop_ = true;
    thread_.join();
    close(fd_);
  }
  uint16_t port() const { return port_; }

 private:
  void Run() {
    int conn = -1;
    size_t next = 0;
    while (!stop_) {
      pollfd pfd{conn >= 0 ? conn : fd_, POLLIN, 0};
      if (poll(&pfd, 1, 20) <= 0) continue;
      if (conn < 0) {
        conn = accept4(fd_, nullptr, nullptr, SOCK_CLOEXEC);
        continue;
      }
      char buf[4096];
      const ssize_t n = read(conn, buf, sizeof(buf));
      if (n <= 0) {
        close(conn);
        conn = -1;
        continue;
      }
      if (next < replies_.size()) {
        const std::string& r = replies_[next++];
        size_t off = 0;
        while (off < r.size()) {
          const ssize_t w = write(conn, r.data() + off, r.size() - off);
          if (w <= 0) break;
          off += static_cast<size_t>(w);
        }
        if (close_after_ && next == replies_.size()) {
          close(conn);
          conn = -1;
        }
      }
    }
    if (conn >= 0) close(conn);
  }

  std::vector<std::string> replies_;
  bool close_after_;
  int fd_ = -1;
  uint16_t port_ = 0;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

Status CommandAgainst(const std::string& reply, RedisLimits limits = {}, bool close_after = false,
                      bool stays_connected = false) {
  HostileServer hs({reply}, close_after);
  RedisEndpoint ep;
  ep.host = "127.0.0.1";
  ep.port = hs.port();
  RedisConnection conn({ep, "", 0.3, limits});
  Result<RedisReply> r = conn.Command({"GET", "x"});
  BOOST_TEST(conn.connected() == stays_connected);
  return r.status();
}

BOOST_AUTO_TEST_CASE(a_hostile_server_gets_protocol_errors_not_a_crash) {
  RedisLimits small;
  small.max_bulk = 1000;
  small.max_total = 4000;
  small.max_elements = 100;
  BOOST_TEST(CommandAgainst("hello\r\n").code() == Code::kProtocolError);
  BOOST_TEST(CommandAgainst("$5000\r\n" + std::string(5000, 'x') + "\r\n", small).code() == Code::kProtocolError);
  BOOST_TEST(CommandAgainst("$2000000000\r\n" + std::string(200'000, 'x'), small).code() == Code::kProtocolError);
  std::string many = "*200\r\n";
  for (int i = 0; i < 200; ++i) many += ":1\r\n";
  BOOST_TEST(CommandAgainst(many, small).code() == Code::kProtocolError);
  BOOST_TEST(CommandAgainst("*2147483647\r\n").code() == Code::kProtocolError);  // refused before it is allocated
  std::string deep;
  for (int i = 0; i < 12; ++i) deep += "*1\r\n";
  deep += ":1\r\n";
  BOOST_TEST(CommandAgainst(deep).code() == Code::kProtocolError);
  // Cut off mid-reply, or silent: I/O errors within the timeout.
  Status cut = CommandAgainst("$10\r\nabc", {}, true);
  BOOST_TEST(cut.code() == Code::kIoError);
  BOOST_TEST(cut.message().find("connection closed") != std::string::npos, cut.message());
  Status silent = CommandAgainst("");
  BOOST_TEST(silent.code() == Code::kIoError);
  // An error reply is kIoError with its text on one line; the connection
  // itself is fine.
  Status err = CommandAgainst("-ERR bad\x01thing\r\n", {}, false, true);
  BOOST_TEST(err.code() == Code::kIoError);
  BOOST_TEST(err.message().find("ERR bad\\x01thing") != std::string::npos, err.message());
}

// An array's header announces a count; its elements cost memory only as
// they arrive. A server that announces the most elements a reply may hold
// (2^20) and then falls silent: the call times out, and the process's
// peak resident set grew by far less than the 70 MB the count would have
// taken up front. In a forked child, whose peak starts at what it has.
BOOST_AUTO_TEST_CASE(an_announced_array_costs_nothing_until_its_elements_come) {
  keymesh::testing::ChildGuard child(keymesh::testing::ForkChild([] {
    rusage before{};
    getrusage(RUSAGE_SELF, &before);
    Status st;
    {
      HostileServer hs({"*1048575\r\n:1\r\n:2\r\n"}, false);
      RedisEndpoint ep;
      ep.host = "127.0.0.1";
      ep.port = hs.port();
      RedisConnection conn({ep, "", 0.3, {}});
      st = conn.Command({"GET", "x"}).status();
    }
    rusage after{};
    getrusage(RUSAGE_SELF, &after);
    const long grown_kb = after.ru_maxrss - before.ru_maxrss;  // NOLINT(google-runtime-int): rusage's type
    std::fprintf(stderr, "announced 2^20 elements: %s; peak grew %ld KB\n", st.ToString().c_str(), grown_kb);
    return st.code() == Code::kIoError && grown_kb < 20 * 1024 ? 0 : 1;
  }));
  BOOST_TEST(child.Wait() == 0);
}

BOOST_AUTO_TEST_CASE(wrong_reply_shapes_are_protocol_errors) {
  const std::string sha = "$40\r\n" + std::string(40, 'a') + "\r\n";
  MeshConfig c = Config();
  LeaseRequest req;
  req.host = "h";
  req.keys.push_back(LeaseKey{"p", "k", "ff", 1, {10, 1, 0, 0}, {}});
  for (const std::string& bad : {std::string(":1\r\n"), std::string("*2\r\n:1\r\n:2\r\n"),
                                 std::string("*8\r\n:1\r\n:2\r\n:0\r\n$1\r\ne\r\n:1\r\n*1\r\n$1\r\nh\r\n*1\r\n"
                                             "*6\r\n$3\r\nnan\r\n$1\r\n0\r\n$1\r\n1\r\n:0\r\n:0\r\n:1\r\n:0\r\n"),
                                 std::string("*8\r\n:1\r\n:2\r\n:0\r\n$1\r\ne\r\n:1\r\n*1\r\n$1\r\nh\r\n*1\r\n"
                                             "*6\r\n$3\r\n100\r\n$1\r\n0\r\n$1\r\n1\r\n:0\r\n:0\r\n:1\r\n:0\r\n"),
                                 // the short flag out of range, and missing (the reply of an older script)
                                 std::string("*8\r\n:1\r\n:2\r\n:0\r\n$1\r\ne\r\n:1\r\n*1\r\n$1\r\nh\r\n*1\r\n"
                                             "*6\r\n$3\r\n9.5\r\n$1\r\n0\r\n$1\r\n1\r\n:0\r\n:0\r\n:1\r\n:2\r\n"),
                                 std::string("*7\r\n:1\r\n:2\r\n:0\r\n$1\r\ne\r\n:1\r\n*1\r\n$1\r\nh\r\n*1\r\n"
                                             "*6\r\n$3\r\n9.5\r\n$1\r\n0\r\n$1\r\n1\r\n:0\r\n:0\r\n:1\r\n")}) {
    HostileServer hs({sha, bad});
    c.redis.port = hs.port();
    RedisMeshStore s(c);
    Result<LeaseReply> r = s.Lease(req);
    BOOST_TEST(r.status().code() == Code::kProtocolError, r.status().ToString());
    BOOST_TEST(!s.connected());
  }
  // A well-formed reply passes (the parser is not simply refusing everything).
  HostileServer hs({sha,
                    "*8\r\n:1\r\n:2\r\n:0\r\n$1\r\ne\r\n:1\r\n*1\r\n$1\r\nh\r\n*1\r\n"
                    "*6\r\n$3\r\n9.5\r\n$1\r\n0\r\n$1\r\n1\r\n:0\r\n:0\r\n:1\r\n:1\r\n"});
  c.redis.port = hs.port();
  RedisMeshStore s(c);
  Result<LeaseReply> r = s.Lease(req);
  BOOST_REQUIRE_MESSAGE(r.ok(), r.status().ToString());
  BOOST_TEST(r->keys[0].req == 9.5);
  BOOST_TEST(r->short_of_share);
  BOOST_TEST((r->members == std::vector<std::string>{"h"}));
}

BOOST_AUTO_TEST_CASE(other_calls_check_their_replies_too) {
  const std::string sha = "$40\r\n" + std::string(40, 'b') + "\r\n";
  MeshConfig c = Config();
  {
    HostileServer hs({sha, "*3\r\n$3\r\nbad\r\n:1\r\n:1\r\n"});
    c.redis.port = hs.port();
    RedisMeshStore s(c);
    BOOST_TEST(s.Publish(Ev(EventKind::kCooldown, 5)).status().code() == Code::kProtocolError);
  }
  {
    HostileServer hs({sha, "*4\r\n$1\r\ne\r\n:0\r\n$3\r\n1-1\r\n:0\r\n", "*1\r\n:7\r\n"});
    c.redis.port = hs.port();
    RedisMeshStore s(c);
    BOOST_TEST(s.ReadEvents("1-1", 0).status().code() == Code::kProtocolError);
  }
  {
    HostileServer hs({sha, "*4\r\n$1\r\ne\r\n$3\r\n1-1\r\n:5\r\n:0\r\n"});
    c.redis.port = hs.port();
    RedisMeshStore s(c);
    BOOST_TEST(s.Snapshot().status().code() == Code::kProtocolError);
  }
  {
    HostileServer hs({sha, "$1\r\n1\r\n"});
    c.redis.port = hs.port();
    RedisMeshStore s(c);
    BOOST_TEST(s.ClaimProbe("p", "k", "h", 10).status().code() == Code::kProtocolError);
  }
  {
    HostileServer hs({"*2\r\n$2\r\n-5\r\n$1\r\n0\r\n"});
    c.redis.port = hs.port();
    RedisMeshStore s(c);
    BOOST_TEST(s.Time().status().code() == Code::kProtocolError);
  }
}

BOOST_FIXTURE_TEST_CASE(bad_requests_are_refused_before_redis, Fresh) {
  RedisMeshStore s(Config());
  LeaseRequest req;
  req.host = "h";
  req.keys.push_back(LeaseKey{"p", "k", "ff", 1, {10, 1, 0, 0}, {}});
  req.keys.push_back(req.keys[0]);
  BOOST_TEST(s.Lease(req).status().code() == Code::kInvalidArgument);  // the same key twice
  req.keys.pop_back();
  req.keys[0].req.wants = std::nan("");
  BOOST_TEST(s.Lease(req).status().code() == Code::kInvalidArgument);
  req.keys[0].req.wants = 1;
  req.host = "two words";
  BOOST_TEST(s.Lease(req).status().code() == Code::kInvalidArgument);
  req.host = "h";
  req.now_ms_for_testing = -1;
  BOOST_TEST(s.Lease(req).status().code() == Code::kInvalidArgument);
  BOOST_TEST(s.Leave("").code() == Code::kInvalidArgument);
  BOOST_TEST(s.ClaimProbe("p", "k", "h", 0).status().code() == Code::kInvalidArgument);
}

// Not an assertion on speed (a shared 2-core machine): the figure for the
// report, and a check that 100 keys are still one call.
BOOST_FIXTURE_TEST_CASE(lease_round_trip, Fresh) {
  SeedEpoch();
  for (size_t n : {size_t{2}, size_t{100}}) {
    std::vector<KeyDef> defs;
    for (size_t i = 0; i < n; ++i) defs.push_back({"pool", "key" + std::to_string(i), 10, 3000, 10});
    Host h("h", defs);
    std::fill(h.wants_req.begin(), h.wants_req.end(), 5);
    std::vector<double> us;
    for (int i = 0; i < 30; ++i) {
      const auto t0 = std::chrono::steady_clock::now();
      BOOST_REQUIRE(h.Refresh(1000 + i).ok());
      us.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count());
    }
    std::sort(us.begin(), us.end());
    // Redis's own time for the script, free of this machine's scheduling.
    Server().Cli({"CONFIG", "SET", "slowlog-log-slower-than", "0"});
    Server().Cli({"SLOWLOG", "RESET"});
    BOOST_REQUIRE(h.Refresh(2000).ok());
    const std::string slow = Server().Cli({"SLOWLOG", "GET", "1"});
    Server().Cli({"CONFIG", "SET", "slowlog-log-slower-than", "10000"});
    BOOST_TEST_MESSAGE("lease of " << n << " keys: round trip median " << us[us.size() / 2] << " us, min " << us.front()
                                   << " us; slowlog (id, time, us, ...): " << slow.substr(0, slow.find("EVALSHA")));
  }
}

}  // namespace
}  // namespace keymesh::broker::mesh
