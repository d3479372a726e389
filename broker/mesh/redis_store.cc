#include "broker/mesh/redis_store.h"

#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <set>
#include <utility>

#include "common/text.h"

namespace keymesh::broker::mesh {
namespace {

constexpr size_t kMaxName = 255;

bool Plain(char c) {
  return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-';
}

// Pool, key and host names: what the segment accepts (printable ASCII, no
// space), up to 255 bytes.
Status CheckName(const char* what, std::string_view name) {
  if (name.empty() || name.size() > kMaxName) {
    return Status(Code::kInvalidArgument, std::string("mesh: ") + what + " name must be 1..255 bytes");
  }
  for (char c : name) {
    if (c <= ' ' || c > '~') {
      return Status(Code::kInvalidArgument, std::string("mesh: ") + what +
                                                " name may hold only printable ASCII without spaces: " + Quoted(name));
    }
  }
  return Status::Ok();
}

std::string Num(double v) {
  char buf[40];
  std::snprintf(buf, sizeof(buf), "%.17g", v);
  return buf;
}

bool Finite(double v) { return std::isfinite(v) && v >= 0; }

bool ParseDouble(const std::string& s, double* out) {
  double v = 0;
  const auto [ptr, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec != std::errc() || ptr != s.data() + s.size() || !Finite(v)) return false;
  *out = v;
  return true;
}

bool ParseU64(const std::string& s, uint64_t* out) {
  uint64_t v = 0;
  const auto [ptr, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (s.empty() || ec != std::errc() || ptr != s.data() + s.size()) return false;
  *out = v;
  return true;
}

bool ParseI64(const std::string& s, int64_t* out) {
  int64_t v = 0;
  const auto [ptr, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (s.empty() || ec != std::errc() || ptr != s.data() + s.size()) return false;
  *out = v;
  return true;
}

// "MS-SEQ" as Redis writes stream ids.
bool IsStreamId(std::string_view id) {
  const size_t dash = id.find('-');
  if (dash == std::string_view::npos || dash == 0 || dash + 1 == id.size() || id.size() > 41) return false;
  for (size_t i = 0; i < id.size(); ++i) {
    if (i != dash && (id[i] < '0' || id[i] > '9')) return false;
  }
  return true;
}

bool IsInt(const RedisReply& r, int64_t lo, int64_t hi) { return r.is_integer() && r.integer >= lo && r.integer <= hi; }

bool IsArray(const RedisReply& r, size_t n) { return r.is_array() && r.elements.size() == n; }

std::string UsedText(uint64_t v) { return std::to_string(v); }

// Splits an ID back into pool and key; nullopt when it is not one of ours.
bool SplitId(const std::string& id, std::string* pool, std::string* key) {
  const size_t slash = id.find('/');
  if (slash == std::string::npos) return false;
  auto p = DecodeName(std::string_view(id).substr(0, slash));
  auto k = DecodeName(std::string_view(id).substr(slash + 1));
  if (!p || !k || !CheckName("pool", *p).ok() || !CheckName("key", *k).ok()) return false;
  *pool = std::move(*p);
  *key = std::move(*k);
  return true;
}

std::string MakeId(const std::string& pool, const std::string& key) { return EncodeName(pool) + "/" + EncodeName(key); }

}  // namespace

std::string EncodeName(std::string_view name) {
  static constexpr char kHex[] = "0123456789ABCDEF";
  std::string out;
  out.reserve(name.size());
  for (char c : name) {
    if (Plain(c)) {
      out.push_back(c);
    } else {
      const auto u = static_cast<unsigned char>(c);
      out.push_back('%');
      out.push_back(kHex[u >> 4]);
      out.push_back(kHex[u & 15]);
    }
  }
  return out;
}

std::optional<std::string> DecodeName(std::string_view encoded) {
  auto hex = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  };
  std::string out;
  for (size_t i = 0; i < encoded.size(); ++i) {
    const char c = encoded[i];
    if (Plain(c)) {
      out.push_back(c);
      continue;
    }
    if (c != '%' || i + 2 >= encoded.size()) return std::nullopt;
    const int hi = hex(encoded[i + 1]);
    const int lo = hex(encoded[i + 2]);
    if (hi < 0 || lo < 0) return std::nullopt;
    const char d = static_cast<char>((hi << 4) | lo);
    if (Plain(d)) return std::nullopt;  // one spelling per name
    out.push_back(d);
    i += 2;
  }
  return out;
}

RedisMeshStore::RedisMeshStore(const MeshConfig& config)
    : conn_(RedisConnection::Options{config.redis, config.password, config.timeout, RedisLimits{}}),
      prefix_(EncodeName(config.ns) + ":") {}

Status RedisMeshStore::Connect() { return conn_.Connect(); }
bool RedisMeshStore::connected() const { return conn_.connected(); }
void RedisMeshStore::Disconnect() {
  cursor_.reset();
  conn_.Disconnect();
}
void RedisMeshStore::Interrupt() { conn_.Interrupt(); }

Status RedisMeshStore::Bad(const std::string& what) {
  Disconnect();
  return Status(Code::kProtocolError, conn_.prefix() + what);
}

bool RedisMeshStore::NoteEpoch(const std::string& epoch) {
  const bool changed = epoch_known_ && epoch != epoch_;
  epoch_ = epoch;
  epoch_known_ = true;
  return changed;
}

Result<LeaseReply> RedisMeshStore::Lease(const LeaseRequest& request) {
  if (Status st = CheckName("host", request.host); !st.ok()) return st;
  if (request.lease_ms == 0 || request.lease_ms > 86400000) {
    return Status(Code::kInvalidArgument, "mesh: lease must be 1 ms .. 1 day");
  }
  if (!(request.headroom >= 0 && request.headroom < 1)) {
    return Status(Code::kInvalidArgument, "mesh: headroom must be >= 0 and < 1");
  }
  if (request.keys.size() > kMaxLeaseKeys) return Status(Code::kInvalidArgument, "mesh: too many keys in one lease");
  if (request.now_ms_for_testing &&
      (*request.now_ms_for_testing < 0 || *request.now_ms_for_testing > (int64_t{1} << 52))) {
    return Status(Code::kInvalidArgument, "mesh: now_ms_for_testing out of range");
  }
  if (request.deadline_ms < 0 || request.deadline_ms > (int64_t{1} << 52)) {
    return Status(Code::kInvalidArgument, "mesh: deadline_ms out of range");
  }
  std::vector<std::string> args = {prefix_,
                                   request.host,
                                   std::to_string(request.seq),
                                   std::to_string(request.lease_ms),
                                   Num(request.headroom),
                                   request.now_ms_for_testing ? std::to_string(*request.now_ms_for_testing) : "",
                                   std::to_string(request.keys.size())};
  args.reserve(args.size() + request.keys.size() * 11 + 1);
  std::set<std::string> ids;
  for (const LeaseKey& k : request.keys) {
    if (Status st = CheckName("pool", k.pool); !st.ok()) return st;
    if (Status st = CheckName("key", k.key); !st.ok()) return st;
    std::string id = MakeId(k.pool, k.key);
    if (!ids.insert(id).second) {
      return Status(Code::kInvalidArgument, "mesh: key " + Quoted(k.pool + "/" + k.key) + " twice in one lease");
    }
    if (k.fingerprint.empty() || k.fingerprint.size() > 128 || HasControl(k.fingerprint)) {
      return Status(Code::kInvalidArgument, "mesh: key " + Quoted(k.pool + "/" + k.key) + ": bad fingerprint");
    }
    for (double v : {k.burst, k.req.limit, k.req.wants, k.req.has, k.tok.limit, k.tok.wants, k.tok.has}) {
      if (!Finite(v) || v > 1e15) {
        return Status(Code::kInvalidArgument,
                      "mesh: key " + Quoted(k.pool + "/" + k.key) + ": rates must be finite and >= 0");
      }
    }
    args.push_back(std::move(id));
    args.push_back(k.fingerprint);
    args.push_back(Num(k.burst));
    args.push_back(Num(k.req.limit));
    args.push_back(Num(k.req.wants));
    args.push_back(Num(k.req.has));
    args.push_back(UsedText(k.req.used));
    args.push_back(Num(k.tok.limit));
    args.push_back(Num(k.tok.wants));
    args.push_back(Num(k.tok.has));
    args.push_back(UsedText(k.tok.used));
  }
  args.push_back(std::to_string(request.learning_quiet_ms));
  args.push_back(std::to_string(kStreamMaxLen));
  args.push_back(std::to_string(request.deadline_ms));
  Result<RedisReply> r = conn_.Eval(kLeaseScript, args);
  if (!r.ok()) return r.status();
  const RedisReply& top = *r;
  constexpr int64_t kMaxMs = int64_t{1} << 52;
  if (IsArray(top, 2) && top.elements[0].is_string() && top.elements[0].str == "stale") {
    if (!IsInt(top.elements[1], 0, kMaxMs)) return Bad("lease: unexpected reply");
    LeaseReply out;
    out.stale = true;
    out.now_ms = top.elements[1].integer;
    return out;
  }
  if (!IsArray(top, 8) || !IsInt(top.elements[0], 0, kMaxMs) || !IsInt(top.elements[1], 0, kMaxMs) ||
      !IsInt(top.elements[2], 0, 1) || !top.elements[3].is_string() || top.elements[3].str.size() > 64 ||
      !IsInt(top.elements[4], 1, 1 << 20) || !top.elements[5].is_array() ||
      !IsArray(top.elements[6], request.keys.size()) || !IsInt(top.elements[7], 0, 1)) {
    return Bad("lease: unexpected reply");
  }
  LeaseReply out;
  out.now_ms = top.elements[0].integer;
  out.expires_ms = top.elements[1].integer;
  out.learning = top.elements[2].integer == 1;
  out.epoch = top.elements[3].str;
  out.hosts = static_cast<uint32_t>(top.elements[4].integer);
  out.short_of_share = top.elements[7].integer == 1;
  if (top.elements[5].elements.size() != out.hosts) return Bad("lease: member list does not match the host count");
  for (const RedisReply& m : top.elements[5].elements) {
    if (!m.is_string() || !CheckName("host", m.str).ok()) return Bad("lease: bad member name");
    out.members.push_back(m.str);
  }
  out.keys.reserve(request.keys.size());
  for (size_t i = 0; i < request.keys.size(); ++i) {
    const RedisReply& e = top.elements[6].elements[i];
    KeyGrant g;
    if (!IsArray(e, 6) || !e.elements[0].is_string() || !e.elements[1].is_string() || !e.elements[2].is_string() ||
        !ParseDouble(e.elements[0].str, &g.req) || !ParseDouble(e.elements[1].str, &g.tok) ||
        !ParseDouble(e.elements[2].str, &g.burst) || !IsInt(e.elements[3], 0, 1) || !IsInt(e.elements[4], 0, kMaxMs) ||
        !IsInt(e.elements[5], 0, 1 << 20)) {
      return Bad("lease: unexpected reply for key " + std::to_string(i));
    }
    // A grant above the cap would break the mesh's one promise: refuse it.
    const LeaseKey& k = request.keys[i];
    auto over = [&](double grant, double limit) {
      const double cap = limit * (1 - request.headroom);
      return grant > cap * (1 + 1e-9) + 1e-9;
    };
    if (over(g.req, k.req.limit) || over(g.tok, k.tok.limit)) {
      return Bad("lease: a grant exceeds the limit of key " + Quoted(k.pool + "/" + k.key));
    }
    g.mismatch = e.elements[3].integer == 1;
    g.cool_until_ms = e.elements[4].integer;
    g.holders = static_cast<uint32_t>(e.elements[5].integer);
    out.keys.push_back(g);
  }
  NoteEpoch(out.epoch);
  return out;
}

Status RedisMeshStore::Leave(const std::string& host) {
  if (Status st = CheckName("host", host); !st.ok()) return st;
  Result<RedisReply> r = conn_.Eval(kLeaveScript, {prefix_, host});
  if (!r.ok()) return r.status();
  if (!r->is_integer()) return Bad("leave: unexpected reply");
  return Status::Ok();
}

Result<KeyEvent> RedisMeshStore::Publish(const KeyEvent& event) {
  if (Status st = CheckName("pool", event.pool); !st.ok()) return st;
  if (Status st = CheckName("key", event.key); !st.ok()) return st;
  if (Status st = CheckName("host", event.origin); !st.ok()) return st;
  if (static_cast<uint8_t>(event.kind) > static_cast<uint8_t>(EventKind::kReset)) {
    return Status(Code::kInvalidArgument, "mesh: unknown event kind");
  }
  if (event.until_ms < 0 || event.until_ms > (int64_t{1} << 52)) {
    return Status(Code::kInvalidArgument, "mesh: event deadline out of range");
  }
  Result<RedisReply> r =
      conn_.Eval(kPublishScript, {prefix_, MakeId(event.pool, event.key), event.pool, event.key,
                                  std::to_string(static_cast<int>(event.kind)), std::to_string(event.until_ms),
                                  std::to_string(event.version), event.origin, std::to_string(event.origin_mono_ns),
                                  std::to_string(kStreamMaxLen)});
  if (!r.ok()) return r.status();
  if (!IsArray(*r, 3) || !r->elements[0].is_string() || !IsInt(r->elements[1], 0, int64_t{1} << 52) ||
      !IsInt(r->elements[2], 0, int64_t{1} << 52) || (!r->elements[0].str.empty() && !IsStreamId(r->elements[0].str))) {
    return Bad("publish: unexpected reply");
  }
  KeyEvent out = event;
  out.stream_id = r->elements[0].str;
  if (event.kind == EventKind::kCooldown || event.kind == EventKind::kCircuitOpen)
    out.until_ms = r->elements[1].integer;
  out.version = static_cast<uint64_t>(r->elements[2].integer);
  return out;
}

namespace {

// One stream entry's fields as an event; false when it is not one of ours.
bool ParseEntry(const RedisReply& entry, KeyEvent* ev) {
  if (!IsArray(entry, 2) || !entry.elements[0].is_string() || !IsStreamId(entry.elements[0].str) ||
      !entry.elements[1].is_array() || entry.elements[1].elements.size() % 2 != 0) {
    return false;
  }
  ev->stream_id = entry.elements[0].str;
  int seen = 0;
  const auto& f = entry.elements[1].elements;
  for (size_t i = 0; i + 1 < f.size(); i += 2) {
    if (!f[i].is_string() || !f[i + 1].is_string()) return false;
    const std::string& name = f[i].str;
    const std::string& v = f[i + 1].str;
    uint64_t u = 0;
    if (name == "pool") {
      ev->pool = v;
      seen |= 1;
    } else if (name == "key") {
      ev->key = v;
      seen |= 2;
    } else if (name == "kind") {
      if (!ParseU64(v, &u) || u > static_cast<uint64_t>(EventKind::kRebalance)) return false;
      ev->kind = static_cast<EventKind>(u);
      seen |= 4;
    } else if (name == "until") {
      if (!ParseI64(v, &ev->until_ms) || ev->until_ms < 0) return false;
      seen |= 8;
    } else if (name == "version") {
      if (!ParseU64(v, &ev->version)) return false;
      seen |= 16;
    } else if (name == "origin") {
      ev->origin = v;
      seen |= 32;
    } else if (name == "mono") {
      if (!ParseU64(v, &ev->origin_mono_ns)) return false;
      seen |= 64;
    } else if (name == "seq") {
      if (!ParseU64(v, &ev->seq) || ev->seq == 0) return false;
    }
  }
  if (seen != 127 || !CheckName("host", ev->origin).ok()) return false;
  // A rebalance names no key: it asks every host to refresh.
  if (ev->kind == EventKind::kRebalance) return ev->pool.empty() && ev->key.empty();
  return CheckName("pool", ev->pool).ok() && CheckName("key", ev->key).ok();
}

}  // namespace

Result<EventBatch> RedisMeshStore::ReadEvents(const std::string& after_id, uint32_t block_ms) {
  if (after_id != "$" && after_id != "0" && !IsStreamId(after_id)) {
    return Status(Code::kInvalidArgument, "mesh: bad stream id " + Quoted(after_id));
  }
  EventBatch batch;
  std::string from = after_id;
  // Where this read starts. The store is placed again only by a read that
  // succeeds: any failure or gap leaves it unplaced.
  std::optional<Cursor> at = std::exchange(cursor_, std::nullopt);
  if (!at || at->id != after_id) {
    // Not where this store's last read or snapshot ended: find out where
    // `after_id` stands first (one more round trip, once).
    Result<RedisReply> meta = conn_.Eval(kReadMetaScript, {prefix_, after_id});
    if (!meta.ok()) return meta.status();
    if (!IsArray(*meta, 4) || !meta->elements[0].is_string() || meta->elements[0].str.size() > 64 ||
        !IsInt(meta->elements[1], 0, 1) || !meta->elements[2].is_string() || !IsStreamId(meta->elements[2].str) ||
        !IsInt(meta->elements[3], 0, int64_t{1} << 62)) {
      return Bad("read_meta: unexpected reply");
    }
    const bool epoch_changed = NoteEpoch(meta->elements[0].str);
    if (epoch_changed || meta->elements[1].integer == 1) {
      batch.gap = true;
      batch.last_id = meta->elements[2].str;
      return batch;
    }
    // "$" resolved now, so that nothing published between two calls is lost.
    from = after_id == "$" ? meta->elements[2].str : (after_id == "0" ? "0-0" : after_id);
    at = Cursor{from, static_cast<uint64_t>(meta->elements[3].integer)};
  }
  std::vector<std::string> cmd = {"XREAD", "COUNT", std::to_string(kReadCount)};
  if (block_ms > 0) {
    cmd.push_back("BLOCK");
    cmd.push_back(std::to_string(block_ms));
  }
  cmd.insert(cmd.end(), {"STREAMS", prefix_ + "events", from});
  Result<RedisReply> r = conn_.Command(cmd, block_ms);
  if (!r.ok()) return r.status();
  batch.last_id = from;
  if (r->is_nil()) {
    cursor_ = std::move(at);
    return batch;
  }
  if (!IsArray(*r, 1) || !IsArray(r->elements[0], 2) || !r->elements[0].elements[1].is_array()) {
    return Bad("xread: unexpected reply");
  }
  Cursor next = *at;
  for (const RedisReply& entry : r->elements[0].elements[1].elements) {
    KeyEvent ev;
    if (!ParseEntry(entry, &ev)) {
      // Not one of ours (another writer): step over it, never act on it.
      if (IsArray(entry, 2) && entry.elements[0].is_string() && IsStreamId(entry.elements[0].str)) {
        batch.last_id = next.id = entry.elements[0].str;
        continue;
      }
      return Bad("xread: unexpected entry");
    }
    if (ev.seq != 0) {
      if (ev.seq != next.seq + 1) {
        // Entries between the last one read and this one are gone (the
        // stream was trimmed past this reader, or Redis lost its state and
        // numbers from 1 again): the caller resyncs from a snapshot.
        EventBatch lost;
        lost.gap = true;
        lost.last_id = ev.stream_id;
        return lost;
      }
      next.seq = ev.seq;
    }
    batch.last_id = next.id = ev.stream_id;
    batch.events.push_back(std::move(ev));
  }
  cursor_ = next;
  return batch;
}

Result<EventBatch> RedisMeshStore::Snapshot() {
  Result<RedisReply> r = conn_.Eval(kSnapshotScript, {prefix_});
  if (!r.ok()) return r.status();
  if (!IsArray(*r, 4) || !r->elements[0].is_string() || r->elements[0].str.size() > 64 || !r->elements[1].is_string() ||
      !IsStreamId(r->elements[1].str) || !r->elements[2].is_array() || !IsInt(r->elements[3], 0, int64_t{1} << 62)) {
    return Bad("snapshot: unexpected reply");
  }
  EventBatch batch;
  batch.last_id = r->elements[1].str;
  for (const RedisReply& rec : r->elements[2].elements) {
    KeyEvent ev;
    uint64_t kind = 0;
    if (!IsArray(rec, 6)) return Bad("snapshot: unexpected record");
    for (const RedisReply& f : rec.elements) {
      if (!f.is_string()) return Bad("snapshot: unexpected record");
    }
    if (!SplitId(rec.elements[0].str, &ev.pool, &ev.key)) continue;  // not a key of ours
    // The state hash is input too: a field that does not parse is skipped.
    if (!ParseU64(rec.elements[1].str, &kind) || kind > static_cast<uint64_t>(EventKind::kReset) ||
        !ParseI64(rec.elements[2].str, &ev.until_ms) || ev.until_ms < 0 ||
        !ParseU64(rec.elements[3].str, &ev.version) || !ParseU64(rec.elements[5].str, &ev.origin_mono_ns)) {
      continue;
    }
    ev.kind = static_cast<EventKind>(kind);
    ev.origin = rec.elements[4].str;
    if (!ev.origin.empty() && !CheckName("host", ev.origin).ok()) ev.origin.clear();
    batch.events.push_back(std::move(ev));
  }
  NoteEpoch(r->elements[0].str);
  cursor_ = Cursor{batch.last_id, static_cast<uint64_t>(r->elements[3].integer)};
  return batch;
}

Result<bool> RedisMeshStore::ClaimProbe(const std::string& pool, const std::string& key, const std::string& host,
                                        uint64_t ttl_ms) {
  if (Status st = CheckName("pool", pool); !st.ok()) return st;
  if (Status st = CheckName("key", key); !st.ok()) return st;
  if (Status st = CheckName("host", host); !st.ok()) return st;
  if (ttl_ms == 0 || ttl_ms > 86400000) return Status(Code::kInvalidArgument, "mesh: probe ttl must be 1 ms .. 1 day");
  Result<RedisReply> r = conn_.Eval(kClaimProbeScript, {prefix_, MakeId(pool, key), host, std::to_string(ttl_ms)});
  if (!r.ok()) return r.status();
  if (!IsInt(*r, 0, 1)) return Bad("claim_probe: unexpected reply");
  return r->integer == 1;
}

Result<MeshStore::TimeSample> RedisMeshStore::Time() {
  if (Status st = conn_.Connect(); !st.ok()) return st;
  const auto t0 = std::chrono::steady_clock::now();
  Result<RedisReply> r = conn_.Command({"TIME"});
  const auto t1 = std::chrono::steady_clock::now();
  if (!r.ok()) return r.status();
  uint64_t sec = 0;
  uint64_t usec = 0;
  if (!IsArray(*r, 2) || !r->elements[0].is_string() || !r->elements[1].is_string() ||
      !ParseU64(r->elements[0].str, &sec) || !ParseU64(r->elements[1].str, &usec) || sec > (uint64_t{1} << 40) ||
      usec >= 1000000) {
    return Bad("TIME: unexpected reply");
  }
  TimeSample s;
  s.redis_ms = static_cast<int64_t>(sec * 1000 + usec / 1000);
  s.rtt_ns = static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(t1 - t0).count());
  return s;
}

}  // namespace keymesh::broker::mesh
