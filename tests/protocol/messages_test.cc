// Unit tests of the protocol's pure code: framing and its limits, the JSON
// field readers, every message's round trip and every malformed field, the
// status JSON, the socket path rule, and the op table in messages.h's
// header comment against the code.
#define BOOST_TEST_MODULE protocol_messages
#include "protocol/messages.h"

#include <cmath>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include <boost/json.hpp>
#include <boost/test/unit_test.hpp>

#include "common/text.h"
#include "protocol/framing.h"
#include "protocol/json_fields.h"
#include "protocol/socket_path.h"
#include "protocol/status_json.h"

namespace km = keymesh;
namespace kp = keymesh::protocol;
namespace json = boost::json;
using kp::Op;

namespace {

// A JSON object through text and back, as it crosses the socket.
json::object Wire(const json::object& o) { return json::parse(json::serialize(o)).as_object(); }

std::set<std::string> Keys(const json::object& o) {
  std::set<std::string> out;
  for (const auto& kv : o) out.insert(std::string(kv.key()));
  return out;
}

// Parses `o` as the request of `op` (FromJson of its message).
km::Status ParseRequestFor(Op op, const json::object& o) {
  switch (op) {
    case Op::kHello: return kp::HelloRequest::FromJson(o).status();
    case Op::kSecrets: return kp::SecretsRequest::FromJson(o).status();
    case Op::kAcquire: return kp::AcquireRequest::FromJson(o).status();
    case Op::kRelease:
    case Op::kMarkFailed:
    case Op::kMarkRateLimited:
    case Op::kCancel: return kp::EndRequest::FromJson(op, o).status();
    case Op::kStatus: return kp::StatusRequest::FromJson(o).status();
    case Op::kAddKey: return kp::AddKeyRequest::FromJson(o).status();
    case Op::kRemoveKey:
    case Op::kEnable:
    case Op::kDisable:
    case Op::kReset: return kp::KeyOpRequest::FromJson(op, o).status();
    case Op::kMetrics: return km::Status::Ok();
    case Op::kReclaim: return kp::ReclaimRequest::FromJson(o).status();
    case Op::kObserveLimits: return kp::ObserveLimitsRequest::FromJson(o).status();
    case Op::kMesh: return km::Status::Ok();
  }
  return km::Status(km::Code::kInternal, "no such op");
}

km::Status ParseReplyFor(Op op, const json::object& o) {
  switch (op) {
    case Op::kHello: return kp::HelloReply::FromJson(o).status();
    case Op::kSecrets: return kp::SecretsReply::FromJson(o).status();
    case Op::kAcquire: return kp::LeaseGrant::FromJson(o).status();
    case Op::kStatus: return kp::StatusReply::FromJson(o).status();
    case Op::kMetrics: return kp::MetricsReply::FromJson(o).status();
    case Op::kReclaim: return kp::ReclaimReply::FromJson(o).status();
    case Op::kAddKey: return kp::AddKeyReply::FromJson(o).status();
    case Op::kMesh: return kp::MeshReply::FromJson(o).status();
    default: return km::Status::Ok();  // no fields
  }
}

// Every op with a request whose every field is set, one with only the
// required fields, and a reply with every field.
struct Sample {
  Op op;
  json::object full;
  json::object minimal;
  json::object reply;
};

kp::EndRequest FullEnd(km::OutcomeKind outcome) {
  kp::EndRequest e;
  e.pool = "p";
  e.slot = 3;
  e.lease = 4294967295u;
  e.seq = 9;
  e.acquire_ns = 123456789012345ull;
  e.outcome = outcome;
  e.latency = 0.25;
  e.tokens = 1234;
  e.cooldown = 20.5;
  e.permanent = true;
  return e;
}

kp::EndRequest MinimalEnd(km::OutcomeKind outcome) {
  kp::EndRequest e;
  e.pool = "p";
  e.outcome = outcome;
  return e;
}

km::PoolStatus SamplePool() {
  km::PoolStatus s;
  s.name = "openai";
  s.strategy = km::Strategy::kWeighted;
  s.options.strategy = km::Strategy::kWeighted;
  s.options.default_cooldown = 7.5;
  s.options.max_failures = 4;
  s.options.rate_margin = 0.1;
  s.totals.acquires = 12;
  s.totals.releases = 8;
  s.totals.reclaimed = 3;
  s.totals.timeouts = 2;
  s.uptime = 99.5;
  s.generation = 77;
  s.acquire_wait.counts[0] = 5;
  s.acquire_wait.counts[km::kWaitBuckets - 1] = 1;
  s.acquire_wait.sum = 31.25;
  s.acquire_wait.count = 6;
  km::KeyStatus k;
  k.name = "a";
  k.slot = 2;
  k.state = km::KeyState::kCooling;
  k.in_flight = 2;
  k.cooldown_remaining = 1.5;
  k.fingerprint = 0xFFFFFFFFFFFFFFF0ull;
  k.circuit = km::CircuitState::kHalfOpen;
  k.requests_available = 17;
  k.tokens_available = -1;
  k.tpm = 1ull << 40;
  k.burst = 3;
  k.rate_margin = 0.05;
  k.reason = "rate limited";
  k.has_latency = true;
  k.latency_avg = 0.125;
  s.keys.push_back(k);
  k.name = "b";
  k.state = km::KeyState::kAvailable;
  k.circuit = km::CircuitState::kRevoked;
  s.keys.push_back(k);
  return s;
}

kp::MeshReport SampleMesh() {
  kp::MeshReport m;
  m.enabled = true;
  m.host = "web-1";
  m.ns = "keymesh";
  m.redis = "127.0.0.1:6379";
  m.mode = "leased";
  m.redis_ok = true;
  m.last_error = "";
  m.rtt_seconds = 0.00042;
  m.since_refresh = 0.25;
  m.lease_remaining = 29.75;
  m.hosts = 2;
  m.members = {"web-1", "web-2"};
  m.epoch = "e-17";
  m.refreshes = 1ull << 40;
  m.refresh_failures = 3;
  m.events_published = 4;
  m.events_applied = 5;
  m.resyncs = 6;
  m.rebalances = 8;
  m.propagation_p50 = 0.0015;
  m.propagation_p99 = 0.02;
  m.propagation_samples = 99;
  m.keys.push_back({"openai", "a", 600, 100000, 285, 47500, 4.75, 300, 60000, 2, false});
  m.keys.push_back({"openai", "b", 600, 0, 0, 0, 0, 12.5, 0, 1, true});
  return m;
}

std::vector<Sample> Samples() {
  std::vector<Sample> out;
  kp::HelloRequest hello{4242, 987654321ull, std::string("p")};
  kp::HelloReply hello_reply{"keymesh-0123", 7, 99, {"p", "q"}, 64};
  out.push_back(
      {Op::kHello, hello.ToJson(), kp::HelloRequest{1, std::nullopt, std::nullopt}.ToJson(), hello_reply.ToJson()});
  kp::SecretsReply secrets;
  secrets.secrets = {{"a", "sk-aaaa"}, {"b", "sk-bbbb"}};
  out.push_back({Op::kSecrets, kp::SecretsRequest{"p"}.ToJson(), kp::SecretsRequest{"p"}.ToJson(), secrets.ToJson()});
  kp::LeaseGrant grant{"a", 1, 2, 3, 4, 5};
  out.push_back({Op::kAcquire, kp::AcquireRequest{"p", 2.5, 100}.ToJson(),
                 kp::AcquireRequest{"p", std::nullopt, 0}.ToJson(), grant.ToJson()});
  for (km::OutcomeKind k : {km::OutcomeKind::kSuccess, km::OutcomeKind::kFailure, km::OutcomeKind::kRateLimited,
                            km::OutcomeKind::kCancelled}) {
    out.push_back({kp::EndOp(k), FullEnd(k).ToJson(), MinimalEnd(k).ToJson(), {}});
  }
  kp::StatusReply status;
  status.pools.push_back({SamplePool(), {"...1111", "...2222"}});
  out.push_back(
      {Op::kStatus, kp::StatusRequest{std::string("p")}.ToJson(), kp::StatusRequest{}.ToJson(), status.ToJson()});
  kp::AddKeyRequest add;
  add.pool = "p";
  add.key = km::KeySpec{"k", "sk-new-key-0001", 3, 8, 500, 200000, 4, 0.1};
  kp::AddKeyRequest add_min;
  add_min.pool = "p";
  add_min.key.name = "k";
  add_min.key.secret = "sk-x";
  add.secret_env = "KEY_VAR";
  add.secret_file = "/etc/keymesh/k.key";  // both only to list every field (the broker takes one)
  out.push_back(
      {Op::kAddKey, add.ToJson(), add_min.ToJson(),
       kp::AddKeyReply{false, std::string("secret sent inline: the key lasts until the broker stops")}.ToJson()});
  for (Op op : {Op::kRemoveKey, Op::kEnable, Op::kDisable, Op::kReset}) {
    kp::KeyOpRequest r{op, "p", "k"};
    out.push_back({op, r.ToJson(), r.ToJson(), {}});
  }
  out.push_back({Op::kMetrics, {}, {}, kp::MetricsReply{"# HELP x\n"}.ToJson()});
  out.push_back(
      {Op::kReclaim, kp::ReclaimRequest{77}.ToJson(), kp::ReclaimRequest{77}.ToJson(), kp::ReclaimReply{5}.ToJson()});
  kp::ObserveLimitsRequest obs{"p", "a", 10, 1.5, 2000, 0.25, 30.0};
  kp::ObserveLimitsRequest obs_min;
  obs_min.pool = "p";
  obs_min.name = "a";
  out.push_back({Op::kObserveLimits, obs.ToJson(), obs_min.ToJson(), {}});
  out.push_back({Op::kMesh, {}, {}, kp::MeshReply{SampleMesh()}.ToJson()});
  return out;
}

// The op table of messages.h's header comment: op -> (request fields with
// their '?', reply fields).
struct TableRow {
  std::string op;
  std::vector<std::string> request;
  std::vector<std::string> reply;
};

std::vector<std::string> SplitFields(const std::string& text) {
  std::vector<std::string> out;
  if (text == "(none)") return out;
  std::stringstream ss(text);
  std::string f;
  while (std::getline(ss, f, ',')) {
    const size_t b = f.find_first_not_of(' ');
    const size_t e = f.find_last_not_of(' ');
    out.push_back(f.substr(b, e - b + 1));
  }
  return out;
}

std::vector<TableRow> HeaderTable() {
  std::ifstream in(std::string(KEYMESH_SOURCE_DIR) + "/protocol/messages.h");
  BOOST_REQUIRE(in);
  std::vector<TableRow> rows;
  std::string line;
  bool inside = false;
  while (std::getline(in, line)) {
    if (line.find("// Ops, in the order of the Op enum") == 0) {
      inside = true;
      continue;
    }
    if (!inside) continue;
    if (line.rfind("//   ", 0) != 0) {
      if (!rows.empty()) break;
      continue;
    }
    const std::string body = line.substr(5);
    if (body[0] != ' ') {
      const size_t gap = body.find(' ');
      TableRow r;
      r.op = body.substr(0, gap);
      r.request = SplitFields(body.substr(body.find_first_not_of(' ', gap)));
      rows.push_back(std::move(r));
    } else {
      const size_t arrow = body.find("-> ");
      BOOST_REQUIRE_MESSAGE(!rows.empty(), "bad table line: " + line);
      if (arrow == std::string::npos) {
        // A request's fields continued on the next line (after a ',').
        const std::vector<std::string> more = SplitFields(body.substr(body.find_first_not_of(' ')));
        rows.back().request.insert(rows.back().request.end(), more.begin(), more.end());
        continue;
      }
      rows.back().reply = SplitFields(body.substr(arrow + 3));
    }
  }
  return rows;
}

}  // namespace

BOOST_AUTO_TEST_CASE(op_names_round_trip) {
  std::set<std::string_view> names;
  for (size_t i = 0; i < kp::kOpCount; ++i) {
    const Op op = static_cast<Op>(i);
    names.insert(kp::OpName(op));
    BOOST_CHECK(kp::ParseOp(kp::OpName(op)) == op);
  }
  BOOST_CHECK_EQUAL(names.size(), kp::kOpCount);
  BOOST_CHECK(!kp::ParseOp("launch_missiles").has_value());
  BOOST_CHECK(!kp::ParseOp("").has_value());
  for (km::OutcomeKind k : {km::OutcomeKind::kSuccess, km::OutcomeKind::kFailure, km::OutcomeKind::kRateLimited,
                            km::OutcomeKind::kCancelled}) {
    BOOST_CHECK(kp::EndOutcome(kp::EndOp(k)) == k);
  }
  BOOST_CHECK_EQUAL(kp::OpName(Op::kMarkRateLimited), "mark_rate_limited");
  BOOST_CHECK(!kp::EndOutcome(Op::kAcquire).has_value());
  BOOST_CHECK(kp::IsKeyOp(Op::kRemoveKey) && !kp::IsKeyOp(Op::kAddKey));
}

// The header's table is the protocol's documentation: its ops, their order
// and their fields must be exactly what the code reads and writes.
BOOST_AUTO_TEST_CASE(header_op_table_matches_the_code) {
  const std::vector<TableRow> table = HeaderTable();
  const std::vector<Sample> samples = Samples();
  BOOST_REQUIRE_EQUAL(table.size(), kp::kOpCount);
  BOOST_REQUIRE_EQUAL(samples.size(), kp::kOpCount);
  for (size_t i = 0; i < kp::kOpCount; ++i) {
    const TableRow& row = table[i];
    BOOST_TEST_CONTEXT("op " << row.op) {
      BOOST_CHECK_EQUAL(row.op, kp::OpName(static_cast<Op>(i)));
      const Sample* s = nullptr;
      for (const Sample& x : samples) s = kp::OpName(x.op) == row.op ? &x : s;
      BOOST_REQUIRE(s != nullptr);
      std::set<std::string> all, required, reply;
      for (std::string f : row.request) {
        const bool optional = f.back() == '?';
        if (optional) f.pop_back();
        all.insert(f);
        if (!optional) required.insert(f);
      }
      for (std::string f : row.reply) {
        if (f.back() == '?') f.pop_back();  // the sample reply sets every field
        reply.insert(f);
      }
      BOOST_CHECK(Keys(s->full) == all);
      BOOST_CHECK(Keys(s->minimal) == required);
      BOOST_CHECK(Keys(s->reply) == reply);
      // The minimal request parses; dropping any required field does not.
      BOOST_CHECK(ParseRequestFor(s->op, Wire(s->minimal)).ok());
      for (const std::string& f : required) {
        json::object o = s->full;
        o.erase(f);
        km::Status st = ParseRequestFor(s->op, Wire(o));
        BOOST_CHECK_MESSAGE(st.code() == km::Code::kProtocolError, f + ": " + st.ToString());
        BOOST_CHECK_MESSAGE(st.message().find("'" + f + "'") != std::string::npos, st.message());
      }
    }
  }
}

BOOST_AUTO_TEST_CASE(every_message_round_trips) {
  {
    kp::HelloRequest h{4242, 987654321ull, std::string("p")};
    km::Result<kp::HelloRequest> b = kp::HelloRequest::FromJson(Wire(h.ToJson()));
    BOOST_REQUIRE(b.ok());
    BOOST_CHECK_EQUAL(b->pid, 4242u);
    BOOST_CHECK_EQUAL(*b->start_time, 987654321ull);
    BOOST_CHECK_EQUAL(*b->pool, "p");
    b = kp::HelloRequest::FromJson(Wire(kp::HelloRequest{7, std::nullopt, std::nullopt}.ToJson()));
    BOOST_REQUIRE(b.ok());
    BOOST_CHECK(!b->start_time && !b->pool);
  }
  {
    kp::HelloReply h{"keymesh-0123", 7, 1ull << 50, {"p", "q"}, 64};
    km::Result<kp::HelloReply> b = kp::HelloReply::FromJson(Wire(h.ToJson()));
    BOOST_REQUIRE(b.ok());
    BOOST_CHECK_EQUAL(b->segment, "keymesh-0123");
    BOOST_CHECK_EQUAL(b->layout_version, 7u);
    BOOST_CHECK_EQUAL(b->generation, 1ull << 50);
    BOOST_CHECK(b->pools == (std::vector<std::string>{"p", "q"}));
    BOOST_CHECK_EQUAL(b->keys_per_pool, 64u);
  }
  {
    kp::SecretsReply s;
    s.secrets = {{"a", "sk-aaaa"}, {"b", "sk-b\"\n"}};
    km::Result<kp::SecretsReply> b = kp::SecretsReply::FromJson(Wire(s.ToJson()));
    BOOST_REQUIRE(b.ok());
    BOOST_REQUIRE_EQUAL(b->secrets.size(), 2u);
    BOOST_CHECK_EQUAL(b->secrets[1].name, "b");
    BOOST_CHECK_EQUAL(b->secrets[1].secret, "sk-b\"\n");
    BOOST_CHECK_EQUAL(kp::SecretsRequest::FromJson(Wire(kp::SecretsRequest{"p"}.ToJson()))->pool, "p");
  }
  {
    kp::AcquireRequest a{"p", 0.0, 7};
    km::Result<kp::AcquireRequest> b = kp::AcquireRequest::FromJson(Wire(a.ToJson()));
    BOOST_REQUIRE(b.ok());
    BOOST_CHECK_EQUAL(b->pool, "p");
    BOOST_REQUIRE(b->timeout.has_value());  // 0 (try once) is not "absent"
    BOOST_CHECK_EQUAL(*b->timeout, 0.0);
    BOOST_CHECK_EQUAL(b->tokens, 7u);
    kp::LeaseGrant g{"a", 4294967295u, 2, 3, 1ull << 62, 0xFFFFFFFFFFFFFFFFull};
    km::Result<kp::LeaseGrant> gb = kp::LeaseGrant::FromJson(Wire(g.ToJson()));
    BOOST_REQUIRE(gb.ok());
    BOOST_CHECK_EQUAL(gb->key, "a");
    BOOST_CHECK_EQUAL(gb->slot, 4294967295u);
    BOOST_CHECK_EQUAL(gb->lease, 2u);
    BOOST_CHECK_EQUAL(gb->seq, 3u);
    BOOST_CHECK_EQUAL(gb->acquire_ns, 1ull << 62);
    BOOST_CHECK_EQUAL(gb->fingerprint, 0xFFFFFFFFFFFFFFFFull);
  }
  for (km::OutcomeKind k : {km::OutcomeKind::kSuccess, km::OutcomeKind::kFailure, km::OutcomeKind::kRateLimited,
                            km::OutcomeKind::kCancelled}) {
    const kp::EndRequest e = FullEnd(k);
    km::Result<kp::EndRequest> b = kp::EndRequest::FromJson(e.op(), Wire(e.ToJson()));
    BOOST_REQUIRE(b.ok());
    BOOST_CHECK(b->outcome == k);
    BOOST_CHECK_EQUAL(b->pool, "p");
    BOOST_CHECK_EQUAL(b->slot, 3u);
    BOOST_CHECK_EQUAL(b->lease, 4294967295u);
    BOOST_CHECK_EQUAL(b->seq, 9u);
    BOOST_CHECK_EQUAL(b->acquire_ns, e.acquire_ns);
    BOOST_CHECK_EQUAL(*b->latency, 0.25);
    BOOST_CHECK_EQUAL(b->tokens, 1234u);
    BOOST_CHECK_EQUAL(*b->cooldown, 20.5);
    BOOST_CHECK(b->permanent);
    b = kp::EndRequest::FromJson(e.op(), Wire(MinimalEnd(k).ToJson()));
    BOOST_REQUIRE(b.ok());
    BOOST_CHECK(!b->latency && !b->cooldown && !b->permanent && b->tokens == 0 && b->acquire_ns == 0);
  }
  {
    kp::AddKeyRequest a;
    a.pool = "p";
    a.key = km::KeySpec{"k", "sk-new-key-0001", 3, 8, 500, 1ull << 40, 4, 0.1};
    km::Result<kp::AddKeyRequest> b = kp::AddKeyRequest::FromJson(Wire(a.ToJson()));
    BOOST_REQUIRE(b.ok());
    BOOST_CHECK_EQUAL(b->pool, "p");
    BOOST_CHECK_EQUAL(b->key.name, "k");
    BOOST_CHECK_EQUAL(b->key.secret, "sk-new-key-0001");
    BOOST_CHECK_EQUAL(b->key.weight, 3u);
    BOOST_CHECK_EQUAL(b->key.max_concurrency, 8u);
    BOOST_CHECK_EQUAL(b->key.rpm, 500u);
    BOOST_CHECK_EQUAL(b->key.tpm, 1ull << 40);
    BOOST_CHECK_EQUAL(b->key.burst, 4u);  // burst and rate_margin reach the socket
    BOOST_CHECK_EQUAL(b->key.rate_margin, 0.1);
    a.key = km::KeySpec{"k", "sk-x"};
    b = kp::AddKeyRequest::FromJson(Wire(a.ToJson()));
    BOOST_REQUIRE(b.ok());
    BOOST_CHECK_EQUAL(b->key.weight, 1u);
    BOOST_CHECK_EQUAL(b->key.rate_margin, -1.0);  // the pool's
  }
  for (Op op : {Op::kRemoveKey, Op::kEnable, Op::kDisable, Op::kReset}) {
    km::Result<kp::KeyOpRequest> b = kp::KeyOpRequest::FromJson(op, Wire(kp::KeyOpRequest{op, "p", "k"}.ToJson()));
    BOOST_REQUIRE(b.ok());
    BOOST_CHECK(b->op() == op);
    BOOST_CHECK_EQUAL(b->pool, "p");
    BOOST_CHECK_EQUAL(b->name, "k");
  }
  BOOST_CHECK_EQUAL(*kp::StatusRequest::FromJson(Wire(kp::StatusRequest{std::string("q")}.ToJson()))->pool, "q");
  BOOST_CHECK(!kp::StatusRequest::FromJson({})->pool);
  BOOST_CHECK_EQUAL(kp::MetricsReply::FromJson(Wire(kp::MetricsReply{"a 1\n"}.ToJson()))->text, "a 1\n");
  BOOST_CHECK_EQUAL(kp::ReclaimRequest::FromJson(Wire(kp::ReclaimRequest{77}.ToJson()))->pid, 77u);
  BOOST_CHECK_EQUAL(kp::ReclaimReply::FromJson(Wire(kp::ReclaimReply{5}.ToJson()))->reclaimed, 5u);
  {
    kp::ObserveLimitsRequest o{"p", "a", 10, 1.5, 2000, 0.25, 30.0};
    km::Result<kp::ObserveLimitsRequest> b = kp::ObserveLimitsRequest::FromJson(Wire(o.ToJson()));
    BOOST_REQUIRE(b.ok());
    BOOST_CHECK_EQUAL(*b->remaining_requests, 10u);
    BOOST_CHECK_EQUAL(*b->reset_requests, 1.5);
    BOOST_CHECK_EQUAL(*b->remaining_tokens, 2000u);
    BOOST_CHECK_EQUAL(*b->reset_tokens, 0.25);
    BOOST_CHECK_EQUAL(*b->retry_after, 30.0);
  }
}

// Each field of each request, given a value of the wrong type, is refused
// with kProtocolError naming that field; so is each field of each reply.
BOOST_AUTO_TEST_CASE(every_mistyped_field_is_named) {
  for (const Sample& s : Samples()) {
    for (const auto& [what, message, parse] :
         {std::tuple{"request", s.full, &ParseRequestFor}, std::tuple{"reply", s.reply, &ParseReplyFor}}) {
      for (const auto& kv : message) {
        const std::string f(kv.key());
        for (const json::value& bad : {json::value(json::array{1}), json::value("text"), json::value(-1)}) {
          if (bad.is_string() && kv.value().is_string()) continue;
          if (s.op == Op::kStatus && std::string(what) == "reply") continue;  // lenient inside pools (below)
          json::object o = message;
          o[f] = bad;
          km::Status st = parse(s.op, Wire(o));
          BOOST_CHECK_MESSAGE(st.code() == km::Code::kProtocolError, kp::OpName(s.op) << " " << what << " " << f
                                                                                      << " = " << json::serialize(bad)
                                                                                      << ": " << st.ToString());
          BOOST_CHECK_MESSAGE(st.message().find("'" + f) != std::string::npos, st.message());
        }
      }
    }
  }
}

BOOST_AUTO_TEST_CASE(ranges_and_finiteness_are_checked) {
  auto error = [](Op op, const std::string& text) {
    km::Status st = ParseRequestFor(op, json::parse(text).as_object());
    BOOST_CHECK_MESSAGE(st.code() == km::Code::kProtocolError, text + ": " + st.ToString());
    return st.message();
  };
  BOOST_CHECK_EQUAL(error(Op::kHello, R"({"pid":0})"), "field 'pid' must be between 1 and 2147483647");
  error(Op::kHello, R"({"pid":2147483648})");
  error(Op::kHello, R"({"pid":1.0})");  // a double is not an integer
  BOOST_CHECK_EQUAL(error(Op::kRelease, R"({"pool":"p","slot":4294967296,"lease":0,"seq":0})"),
                    "field 'slot' must be between 0 and 4294967295");
  error(Op::kRelease, R"({"pool":"p","slot":0,"lease":-1,"seq":0})");
  BOOST_CHECK_EQUAL(error(Op::kAcquire, R"({"pool":"p","timeout":-0.5})"),
                    "field 'timeout' must be a finite number of seconds >= 0");
  error(Op::kAcquire, R"({"pool":"p","timeout":1e10})");
  error(Op::kAcquire, R"({"pool":"p","timeout":1e999})");  // Boost.JSON reads it as infinity
  error(Op::kMarkFailed, R"({"pool":"p","slot":0,"lease":0,"seq":0,"permanent":1})");
  error(Op::kMarkRateLimited, R"({"pool":"p","slot":0,"lease":0,"seq":0,"cooldown":"20"})");
  error(Op::kAddKey, R"({"pool":"p","name":"k","secret":"s","weight":0})");
  error(Op::kAddKey, R"({"pool":"p","name":"k","secret":"s","rpm":4294967296})");
  error(Op::kAddKey, R"({"pool":"p","name":"k","secret":"s","burst":1000001})");
  BOOST_CHECK_EQUAL(error(Op::kAddKey, R"({"pool":"p","name":"k","secret":"s","rate_margin":0.5})"),
                    "field 'rate_margin' must be a number >= 0 and < 0.5");
  error(Op::kAddKey, R"({"pool":"p","name":"k","secret":"s","rate_margin":-0.1})");
  error(Op::kReclaim, R"({"pid":0})");
  error(Op::kObserveLimits, R"({"pool":"p","name":"a","retry_after":-1})");
  error(Op::kObserveLimits, R"({"pool":"p","name":"a","remaining_tokens":-5})");
  // null is "not given"; unknown fields are ignored (a newer peer's).
  BOOST_CHECK(ParseRequestFor(Op::kAcquire, json::parse(R"({"pool":"p","timeout":null,"x":[1]})").as_object()).ok());
  // Replies are checked as strictly.
  BOOST_CHECK(!kp::LeaseGrant::FromJson(
                   json::parse(R"({"key":"a","slot":1,"lease":2,"acquire_ns":4,"fingerprint":5})").as_object())
                   .ok());
  BOOST_CHECK(!kp::SecretsReply::FromJson(json::parse(R"({"secrets":[{"name":"a"}]})").as_object()).ok());
  BOOST_CHECK(!kp::HelloReply::FromJson(json::parse(R"({"segment":"s","layout_version":1,"generation":1,
      "pools":["p",2],"broker_pid":1,"keys_per_pool":1})")
                                            .as_object())
                   .ok());
}

BOOST_AUTO_TEST_CASE(request_parsing) {
  int64_t id = -1;
  km::Result<kp::Request> r = kp::ParseRequest(R"({"v":1,"op":"status","id":7,"pool":"p"})", &id);
  BOOST_REQUIRE(r.ok());
  BOOST_CHECK_EQUAL(r->op, "status");
  BOOST_CHECK_EQUAL(r->id, 7);
  BOOST_CHECK_EQUAL(id, 7);

  BOOST_CHECK(kp::ParseRequest("{not json", &id).status().code() == km::Code::kProtocolError);
  BOOST_CHECK(kp::ParseRequest("[1,2]", &id).status().code() == km::Code::kProtocolError);
  r = kp::ParseRequest(R"({"v":2,"op":"status","id":9})", &id);
  BOOST_CHECK(!r.ok());
  BOOST_CHECK_EQUAL(id, 9);  // the error reply can still carry the id
  BOOST_CHECK(!kp::ParseRequest(R"({"v":1,"id":3})", &id).ok());
  BOOST_CHECK(!kp::ParseRequest(R"({"v":1,"op":5,"id":3})", &id).ok());
  BOOST_CHECK(!kp::ParseRequest(R"({"v":1,"op":"x","id":"3"})", &id).ok());
}

BOOST_AUTO_TEST_CASE(framing_limits) {
  int64_t id = 0;
  // A request of exactly kMaxFrame bytes is read; one byte more is refused.
  const std::string head = R"({"v":1,"op":"status","id":1,"pad":")";
  std::string frame = head + std::string(kp::kMaxFrame - head.size() - 2, 'x') + "\"}";
  BOOST_REQUIRE_EQUAL(frame.size(), kp::kMaxFrame);
  BOOST_CHECK(kp::ParseRequest(frame, &id).ok());
  frame.insert(head.size(), "x");
  km::Status st = kp::ParseRequest(frame, &id).status();
  BOOST_CHECK(st.code() == km::Code::kProtocolError);
  BOOST_CHECK(st.message().find("exceeds") != std::string::npos);
  // A reply may be larger than a request (a status of many keys), up to its own bound.
  const std::string big = R"({"v":1,"id":1,"ok":true,"text":")" + std::string(kp::kMaxFrame * 2, 'y') + "\"}";
  BOOST_CHECK(kp::ParseReply(big).ok());
  BOOST_CHECK(!kp::ParseReply(std::string(kp::kMaxReplyFrame + 1, ' ')).ok());
  // Every frame is one line, newline-terminated, envelope first and winning.
  const std::string req = kp::MakeRequest(Op::kStatus, 5, {{"id", 99}, {"v", 3}, {"op", "x"}, {"pool", "p"}});
  BOOST_CHECK_EQUAL(req, R"({"v":1,"op":"status","id":5,"pool":"p"})"
                         "\n");
  const std::string ok = kp::OkReply(6, {{"ok", false}, {"x", 1}});
  BOOST_CHECK_EQUAL(ok, R"({"v":1,"id":6,"ok":true,"x":1})"
                        "\n");
  const std::string err = kp::ErrorReply(7, km::Status(km::Code::kNotHeld, "gone\nagain"));
  BOOST_CHECK_EQUAL(std::count(err.begin(), err.end(), '\n'), 1);
  BOOST_CHECK_EQUAL(err.back(), '\n');
}

BOOST_AUTO_TEST_CASE(reply_round_trip) {
  std::string ok = kp::OkReply(4, {{"x", 1}});
  BOOST_CHECK_EQUAL(ok.back(), '\n');
  ok.pop_back();
  km::Result<kp::Reply> r = kp::ParseReply(ok);
  BOOST_REQUIRE(r.ok());
  BOOST_CHECK_EQUAL(r->id, 4);
  BOOST_CHECK(r->status.ok());
  std::string err = kp::ErrorReply(5, km::Status(km::Code::kNotHeld, "gone"));
  err.pop_back();
  r = kp::ParseReply(err);
  BOOST_REQUIRE(r.ok());
  BOOST_CHECK(r->status.code() == km::Code::kNotHeld);
  BOOST_CHECK_EQUAL(r->status.message(), "gone");
  BOOST_CHECK(kp::CodeFromName("protocol_error") == km::Code::kProtocolError);
  for (int32_t c = 1; c <= static_cast<int32_t>(km::kLastCode); ++c) {
    BOOST_CHECK(kp::CodeFromName(km::CodeName(static_cast<km::Code>(c))) == static_cast<km::Code>(c));
  }
  // A code we do not know, or "ok" on an error, is the peer's protocol error.
  BOOST_CHECK(kp::CodeFromName("quantum_flux") == km::Code::kProtocolError);
  BOOST_CHECK(kp::CodeFromName("ok") == km::Code::kProtocolError);
  r = kp::ParseReply(R"({"v":1,"id":1,"ok":false,"error":{"code":"ok","message":"a\u001bb"}})");
  BOOST_REQUIRE(r.ok());
  BOOST_CHECK(r->status.code() == km::Code::kProtocolError);
  BOOST_CHECK(!km::HasControl(r->status.message()));
  BOOST_CHECK(!kp::ParseReply(R"({"v":1,"id":1,"ok":false})").ok());
  BOOST_CHECK(!kp::ParseReply(R"({"v":1,"ok":true})").ok());
  BOOST_CHECK(!kp::ParseReply(R"({"v":1,"id":1,"ok":"yes"})").ok());
}

BOOST_AUTO_TEST_CASE(status_round_trip) {
  const km::PoolStatus s = SamplePool();
  json::object o = kp::PoolStatusToJson(s, [](const std::string&) { return std::string("...abcd"); });
  BOOST_CHECK_EQUAL(o.at("keys").as_array()[0].as_object().at("key_suffix").as_string(), "...abcd");
  std::vector<std::string> suffix;
  km::Result<km::PoolStatus> back = kp::PoolStatusFromJson(json::parse(json::serialize(o)), &suffix);
  BOOST_REQUIRE(back.ok());
  BOOST_CHECK(suffix == (std::vector<std::string>{"...abcd", "...abcd"}));
  BOOST_CHECK_EQUAL(back->name, "openai");
  BOOST_CHECK(back->strategy == km::Strategy::kWeighted);
  BOOST_CHECK_EQUAL(back->options.default_cooldown, 7.5);
  BOOST_CHECK_EQUAL(back->options.max_failures, 4u);
  BOOST_CHECK_EQUAL(back->options.rate_margin, 0.1);
  BOOST_CHECK_EQUAL(back->totals.acquires, 12u);
  BOOST_CHECK_EQUAL(back->totals.releases, 8u);
  BOOST_CHECK_EQUAL(back->totals.reclaimed, 3u);
  BOOST_CHECK_EQUAL(back->totals.timeouts, 2u);
  BOOST_CHECK_EQUAL(back->uptime, 99.5);
  BOOST_CHECK_EQUAL(back->generation, 77u);
  BOOST_CHECK_EQUAL(back->acquire_wait.counts[0], 5u);
  BOOST_CHECK_EQUAL(back->acquire_wait.counts[km::kWaitBuckets - 1], 1u);
  BOOST_CHECK_EQUAL(back->acquire_wait.sum, 31.25);
  BOOST_CHECK_EQUAL(back->acquire_wait.count, 6u);
  BOOST_REQUIRE_EQUAL(back->keys.size(), 2u);
  const km::KeyStatus& k = back->keys[0];
  BOOST_CHECK_EQUAL(k.name, "a");
  BOOST_CHECK_EQUAL(k.slot, 2u);
  BOOST_CHECK(k.state == km::KeyState::kCooling);
  BOOST_CHECK_EQUAL(k.in_flight, 2u);
  BOOST_CHECK_EQUAL(k.cooldown_remaining, 1.5);
  BOOST_CHECK_EQUAL(k.fingerprint, 0xFFFFFFFFFFFFFFF0ull);
  BOOST_CHECK(k.circuit == km::CircuitState::kHalfOpen);
  BOOST_CHECK(back->keys[1].circuit == km::CircuitState::kRevoked);
  BOOST_CHECK_EQUAL(k.requests_available, 17);
  BOOST_CHECK_EQUAL(k.tokens_available, -1);
  BOOST_CHECK_EQUAL(k.tpm, 1ull << 40);
  BOOST_CHECK_EQUAL(k.burst, 3u);
  BOOST_CHECK_EQUAL(k.rate_margin, 0.05);
  BOOST_CHECK_EQUAL(k.reason, "rate limited");
  BOOST_CHECK(k.has_latency);
  BOOST_CHECK_EQUAL(k.latency_avg, 0.125);
  BOOST_CHECK_EQUAL(o.at("keys").as_array()[0].as_object().at("circuit").as_string(), "half_open");
  // The typed reply carries the masked secrets beside the statuses.
  kp::StatusReply reply;
  reply.pools.push_back({s, {"...1111", "...2222"}});
  km::Result<kp::StatusReply> rb = kp::StatusReply::FromJson(Wire(reply.ToJson()));
  BOOST_REQUIRE(rb.ok());
  BOOST_REQUIRE_EQUAL(rb->pools.size(), 1u);
  BOOST_CHECK(rb->pools[0].key_suffix == (std::vector<std::string>{"...1111", "...2222"}));
  BOOST_CHECK_EQUAL(rb->pools[0].status.keys[1].name, "b");
}

// Status is read leniently (an older or newer broker), but never with an
// out-of-range conversion: numbers clamp into their field.
BOOST_AUTO_TEST_CASE(status_reads_leniently_and_clamps) {
  km::Result<km::PoolStatus> s = kp::PoolStatusFromJson(json::parse(R"({"name":"p","strategy":"fastest",
      "pool_metrics":{"total_acquires":1e300,"total_failures":-3,"total_releases":"x"},
      "keys":[{"name":"a","slot":1e20,"weight":5000000000,"tpm":12.9,"circuit":"sideways","state":"zen",
               "requests_available":1e300,"tokens_available":-1e300,"rate_margin":"x"},{}]})"));
  BOOST_REQUIRE(s.ok());
  BOOST_CHECK(s->strategy == km::Strategy::kLeastBusy);
  BOOST_CHECK_EQUAL(s->totals.acquires, UINT64_MAX);
  BOOST_CHECK_EQUAL(s->totals.failures, 0u);
  BOOST_CHECK_EQUAL(s->totals.releases, 0u);
  BOOST_REQUIRE_EQUAL(s->keys.size(), 2u);
  BOOST_CHECK_EQUAL(s->keys[0].slot, UINT32_MAX);
  BOOST_CHECK_EQUAL(s->keys[0].weight, UINT32_MAX);
  BOOST_CHECK_EQUAL(s->keys[0].tpm, 12u);
  BOOST_CHECK(s->keys[0].circuit == km::CircuitState::kClosed);
  BOOST_CHECK(s->keys[0].state == km::KeyState::kAvailable);
  BOOST_CHECK_EQUAL(s->keys[0].requests_available, INT64_MAX);
  BOOST_CHECK_EQUAL(s->keys[0].tokens_available, INT64_MIN);
  BOOST_CHECK_EQUAL(s->keys[0].rate_margin, -1.0);
  BOOST_CHECK_EQUAL(s->keys[1].requests_available, -1);
  BOOST_CHECK(!kp::PoolStatusFromJson(json::parse(R"({"name":"p"})")).ok());
  BOOST_CHECK(!kp::PoolStatusFromJson(json::parse(R"({"keys":[1]})")).ok());
  BOOST_CHECK(!kp::PoolStatusFromJson(json::parse("[]")).ok());
}

// The share fields of a key's status (the mesh) travel; a negative share
// (a broken or hostile broker) reads as 0.
BOOST_AUTO_TEST_CASE(status_carries_the_mesh_share) {
  km::PoolStatus s = SamplePool();
  s.keys[0].share_active = true;
  s.keys[0].share_rpm = 142.5;
  s.keys[0].share_tpm = 1e6;
  s.keys[0].share_burst = 3;
  const json::object o = kp::PoolStatusToJson(s, std::vector<std::string>{});
  const json::object& k0 = o.at("keys").as_array()[0].as_object();
  for (const char* f : {"share_active", "share_rpm", "share_tpm", "share_burst"}) BOOST_CHECK(k0.contains(f));
  km::Result<km::PoolStatus> back = kp::PoolStatusFromJson(json::parse(json::serialize(o)));
  BOOST_REQUIRE(back.ok());
  BOOST_CHECK(back->keys[0].share_active);
  BOOST_CHECK_EQUAL(back->keys[0].share_rpm, 142.5);
  BOOST_CHECK_EQUAL(back->keys[0].share_tpm, 1e6);
  BOOST_CHECK_EQUAL(back->keys[0].share_burst, 3u);
  BOOST_CHECK(!back->keys[1].share_active);
  BOOST_CHECK_EQUAL(back->keys[1].share_rpm, 0.0);
  back = kp::PoolStatusFromJson(json::parse(
      R"({"keys":[{"share_active":"yes","share_rpm":-5,"share_tpm":1e308,"share_burst":-1},{"share_burst":1e300}]})"));
  BOOST_REQUIRE(back.ok());
  BOOST_CHECK(!back->keys[0].share_active);
  BOOST_CHECK_EQUAL(back->keys[0].share_rpm, 0.0);
  BOOST_CHECK_EQUAL(back->keys[0].share_tpm, 1e308);
  BOOST_CHECK_EQUAL(back->keys[0].share_burst, 0u);
  BOOST_CHECK_EQUAL(back->keys[1].share_burst, UINT32_MAX);
}

BOOST_AUTO_TEST_CASE(mesh_reply_round_trips_and_reads_hostile_values_safely) {
  const kp::MeshReport m = SampleMesh();
  const json::object wire = Wire(kp::MeshReply{m}.ToJson());
  const json::object& o = wire.at("mesh").as_object();
  for (const char* f : {"enabled",
                        "host",
                        "namespace",
                        "redis",
                        "mode",
                        "redis_ok",
                        "last_error",
                        "rtt_seconds",
                        "since_refresh",
                        "lease_remaining",
                        "hosts",
                        "members",
                        "epoch",
                        "refreshes",
                        "refresh_failures",
                        "events_published",
                        "events_applied",
                        "resyncs",
                        "rebalances",
                        "propagation_p50",
                        "propagation_p99",
                        "propagation_samples",
                        "keys"}) {
    BOOST_CHECK_MESSAGE(o.contains(f), f);
  }
  for (const char* f : {"pool", "key", "limit_rpm", "limit_tpm", "share_rpm", "share_tpm", "burst", "wants_rpm",
                        "wants_tpm", "holders", "mismatch"}) {
    BOOST_CHECK_MESSAGE(o.at("keys").as_array()[0].as_object().contains(f), f);
  }
  km::Result<kp::MeshReply> back = kp::MeshReply::FromJson(wire);
  BOOST_REQUIRE(back.ok());
  const kp::MeshReport& b = back->mesh;
  BOOST_CHECK(b.enabled && b.redis_ok);
  BOOST_CHECK_EQUAL(b.host, "web-1");
  BOOST_CHECK_EQUAL(b.ns, "keymesh");
  BOOST_CHECK_EQUAL(b.redis, "127.0.0.1:6379");
  BOOST_CHECK_EQUAL(b.mode, "leased");
  BOOST_CHECK_EQUAL(b.rtt_seconds, 0.00042);
  BOOST_CHECK_EQUAL(b.since_refresh, 0.25);
  BOOST_CHECK_EQUAL(b.lease_remaining, 29.75);
  BOOST_CHECK_EQUAL(b.hosts, 2u);
  BOOST_CHECK(b.members == (std::vector<std::string>{"web-1", "web-2"}));
  BOOST_CHECK_EQUAL(b.epoch, "e-17");
  BOOST_CHECK_EQUAL(b.refreshes, 1ull << 40);
  BOOST_CHECK_EQUAL(b.refresh_failures, 3u);
  BOOST_CHECK_EQUAL(b.events_published, 4u);
  BOOST_CHECK_EQUAL(b.events_applied, 5u);
  BOOST_CHECK_EQUAL(b.resyncs, 6u);
  BOOST_CHECK_EQUAL(b.rebalances, 8u);
  BOOST_CHECK_EQUAL(b.propagation_p50, 0.0015);
  BOOST_CHECK_EQUAL(b.propagation_p99, 0.02);
  BOOST_CHECK_EQUAL(b.propagation_samples, 99u);
  BOOST_REQUIRE_EQUAL(b.keys.size(), 2u);
  BOOST_CHECK_EQUAL(b.keys[0].pool, "openai");
  BOOST_CHECK_EQUAL(b.keys[0].key, "a");
  BOOST_CHECK_EQUAL(b.keys[0].limit_rpm, 600.0);
  BOOST_CHECK_EQUAL(b.keys[0].limit_tpm, 100000.0);
  BOOST_CHECK_EQUAL(b.keys[0].share_rpm, 285.0);
  BOOST_CHECK_EQUAL(b.keys[0].share_tpm, 47500.0);
  BOOST_CHECK_EQUAL(b.keys[0].burst, 4.75);
  BOOST_CHECK_EQUAL(b.keys[0].wants_rpm, 300.0);
  BOOST_CHECK_EQUAL(b.keys[0].wants_tpm, 60000.0);
  BOOST_CHECK_EQUAL(b.keys[0].holders, 2u);
  BOOST_CHECK(!b.keys[0].mismatch && b.keys[1].mismatch);

  // Without a mesh: only `enabled`.
  const json::object off = Wire(kp::MeshReply{}.ToJson());
  BOOST_CHECK_EQUAL(json::serialize(off), R"({"mesh":{"enabled":false}})");
  BOOST_REQUIRE(kp::MeshReply::FromJson(off).ok());
  BOOST_CHECK(!kp::MeshReply::FromJson(off)->mesh.enabled);

  // Hostile or broken replies: clamped, or an error naming the field; never
  // a crash or an out-of-range conversion.
  back = kp::MeshReply::FromJson(json::parse(R"({"mesh":{"enabled":true,"hosts":1e300,"refreshes":-4,
      "rtt_seconds":-7,"since_refresh":"soon","propagation_p99":-0.5,"lease_remaining":-3,"mode":"\u001b[2J","keys":[{"share_rpm":-1,
      "holders":-2,"burst":1e308,"pool":5}]}})")
                                     .as_object());
  BOOST_REQUIRE(back.ok());
  BOOST_CHECK_EQUAL(back->mesh.hosts, UINT32_MAX);
  BOOST_CHECK_EQUAL(back->mesh.refreshes, 0u);
  BOOST_CHECK_EQUAL(back->mesh.rtt_seconds, -1.0);
  BOOST_CHECK_EQUAL(back->mesh.since_refresh, -1.0);
  BOOST_CHECK_EQUAL(back->mesh.propagation_p99, -1.0);
  BOOST_CHECK_EQUAL(back->mesh.lease_remaining, 0.0);
  BOOST_CHECK_EQUAL(back->mesh.mode, "\x1b[2J");
  BOOST_REQUIRE_EQUAL(back->mesh.keys.size(), 1u);
  BOOST_CHECK_EQUAL(back->mesh.keys[0].share_rpm, 0.0);
  BOOST_CHECK_EQUAL(back->mesh.keys[0].holders, 0u);
  BOOST_CHECK_EQUAL(back->mesh.keys[0].burst, 1e308);
  BOOST_CHECK_EQUAL(back->mesh.keys[0].pool, "");
  for (const char* bad :
       {R"({})", R"({"mesh":[]})", R"({"mesh":{"enabled":true,"keys":{}}})", R"({"mesh":{"enabled":true,"keys":[1]}})",
        R"({"mesh":{"enabled":true,"members":"h1"}})", R"({"mesh":{"enabled":true,"members":["h1",2]}})"}) {
    km::Result<kp::MeshReply> r = kp::MeshReply::FromJson(json::parse(bad).as_object());
    BOOST_CHECK_MESSAGE(!r.ok() && r.status().code() == km::Code::kProtocolError, bad);
  }
}

BOOST_AUTO_TEST_CASE(field_readers_name_the_field_in_each_style) {
  const json::object o = json::parse(R"({"s":"x","n":5,"neg":-1,"d":2.5,"b":true,"z":null})").as_object();
  BOOST_CHECK_EQUAL(*kp::GetString(o, "s"), "x");
  BOOST_CHECK_EQUAL(kp::GetString(o, "n").status().message(), "field 'n' must be a string");
  BOOST_CHECK_EQUAL(kp::GetString(o, "missing").status().message(), "field 'missing' is required");
  BOOST_CHECK_EQUAL(*kp::GetUint(o, "n", 1, 5), 5u);
  BOOST_CHECK_EQUAL(kp::GetUint(o, "n", 6, 9).status().message(), "field 'n' must be between 6 and 9");
  BOOST_CHECK_EQUAL(kp::GetUint(o, "neg").status().message(), "field 'neg' must be a non-negative integer");
  BOOST_CHECK(!kp::GetUint(o, "d").ok());
  BOOST_CHECK_EQUAL(**kp::GetOptSeconds(o, "d"), 2.5);
  BOOST_CHECK_EQUAL(**kp::GetOptSeconds(o, "n"), 5.0);
  BOOST_CHECK(!kp::GetOptSeconds(o, "neg").ok());
  BOOST_CHECK(**kp::GetOptBool(o, "b"));
  // The wire takes null as absent; the config file as a mistyped value.
  BOOST_CHECK(!kp::GetOptUint(o, "z")->has_value());
  km::Result<std::optional<uint64_t>> strict = kp::GetOptUint(o, "z", 0, UINT64_MAX, kp::kConfigField);
  BOOST_CHECK(strict.status().code() == km::Code::kInvalidArgument);
  BOOST_CHECK_EQUAL(strict.status().message(), "config: z: must be a non-negative integer");
  BOOST_CHECK_EQUAL(kp::ReadSeconds(json::value("x"), "pools.p.max_cooldown", kp::kConfigField).status().message(),
                    "config: pools.p.max_cooldown: must be a finite number of seconds >= 0");
  // Parsing never throws and reports one line.
  km::Result<json::value> bad = kp::ParseJson("{\"a\":");
  BOOST_CHECK(!bad.ok());
  BOOST_CHECK(bad.status().message().find("not valid JSON") == 0);
  BOOST_CHECK(!km::HasControl(bad.status().message()));
  BOOST_CHECK(kp::ParseJson(std::string(1000, '[')).status().code() == km::Code::kInvalidArgument);  // too deep
  // Lenient readers.
  BOOST_CHECK_EQUAL(kp::LenientUint(o, "n", 3), 3u);
  BOOST_CHECK_EQUAL(kp::LenientUint(o, "neg", UINT64_MAX, 9), 9u);
  BOOST_CHECK_EQUAL(kp::LenientUint(o, "d"), 2u);
  BOOST_CHECK_EQUAL(kp::LenientInt(o, "neg", 0), -1);
  BOOST_CHECK_EQUAL(kp::LenientNumber(o, "s", 4.0), 4.0);
  BOOST_CHECK(kp::LenientBool(o, "b"));
  BOOST_CHECK_EQUAL(kp::LenientString(o, "n"), "");
}

BOOST_AUTO_TEST_CASE(socket_path_rule) {
  ::unsetenv("KEYMESH_SOCKET");
  BOOST_CHECK_EQUAL(kp::ResolveSocketPath(""), "/run/keymesh/keymesh.sock");
  BOOST_CHECK_EQUAL(kp::ResolveSocketPath("/tmp/x.sock"), "/tmp/x.sock");
  ::setenv("KEYMESH_SOCKET", "/tmp/env.sock", 1);
  BOOST_CHECK_EQUAL(kp::ResolveSocketPath(""), "/tmp/env.sock");
  BOOST_CHECK_EQUAL(kp::ResolveSocketPath("/tmp/x.sock"), "/tmp/x.sock");  // explicit wins
  ::setenv("KEYMESH_SOCKET", "", 1);
  BOOST_CHECK_EQUAL(kp::ResolveSocketPath(""), kp::kDefaultSocket);  // empty counts as unset
  ::unsetenv("KEYMESH_SOCKET");
}
