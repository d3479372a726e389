#include "broker/config.h"

#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <unordered_map>
#include <unordered_set>

#include <boost/json/object.hpp>
#include <boost/json/value.hpp>

#include "common/text.h"
#include "protocol/json_fields.h"
#include "protocol/messages.h"
#include "protocol/socket_path.h"
#include "shm/segment.h"

namespace keymesh::broker {
namespace {

namespace json = boost::json;

Status Error(const std::string& field, const std::string& message) {
  return Status(Code::kInvalidArgument, "config: " + field + ": " + message);
}

std::string Join(const std::string& base, std::string_view key) {
  return base.empty() ? Escaped(key) : base + "." + Escaped(key);
}

std::string Absolute(const std::string& path, const std::string& base_dir) {
  if (path.empty() || path[0] == '/') return path;
  return base_dir + "/" + path;
}

// Checks that `obj` has only `allowed` fields.
Status OnlyFields(const json::object& obj, const std::string& where, std::initializer_list<std::string_view> allowed) {
  for (const auto& kv : obj) {
    bool ok = false;
    for (std::string_view a : allowed) ok = ok || kv.key() == a;
    if (!ok) return Error(Join(where, kv.key()), "unknown field");
  }
  return Status::Ok();
}

using protocol::kConfigField;

Result<std::string> GetString(const json::value& v, const std::string& field) {
  return protocol::ReadString(v, field, kConfigField);
}

Result<double> GetSeconds(const json::value& v, const std::string& field) {
  return protocol::ReadSeconds(v, field, kConfigField);
}

Result<uint64_t> GetUint(const json::value& v, const std::string& field, uint64_t min, uint64_t max) {
  return protocol::ReadUint(v, field, min, max, kConfigField);
}

Result<std::vector<uint32_t>> GetIdList(const json::value& v, const std::string& field) {
  if (!v.is_array()) return Error(field, "must be an array of integers");
  std::vector<uint32_t> out;
  const json::array& a = v.get_array();
  for (size_t i = 0; i < a.size(); ++i) {
    Result<uint64_t> id = GetUint(a[i], field + "[" + std::to_string(i) + "]", 0, UINT32_MAX - 1);
    if (!id.ok()) return id.status();
    out.push_back(static_cast<uint32_t>(*id));
  }
  return out;
}

}  // namespace

Result<std::string> ReadSecretFile(const std::string& path, const std::string& field) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return Error(field, "cannot read " + Escaped(path) + ": " + std::strerror(errno));
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) return Error(field, "cannot read " + Escaped(path));
  std::string s = ss.str();
  while (!s.empty() && (s.back() == '\n' || s.back() == '\r' || s.back() == ' ' || s.back() == '\t')) s.pop_back();
  return s;
}

namespace {

Result<KeySpec> ParseKey(const json::value& v, const std::string& where, const std::string& base_dir,
                         const EnvLookup& env) {
  if (!v.is_object()) return Error(where, "must be an object");
  const json::object& o = v.as_object();
  Status st = OnlyFields(o, where,
                         {"name", "secret", "secret_env", "secret_file", "weight", "max_concurrency", "rpm", "tpm",
                          "burst", "rate_margin"});
  if (!st.ok()) return st;
  KeySpec k;
  const json::value* name = o.if_contains("name");
  if (name == nullptr) return Error(where + ".name", "is required");
  Result<std::string> n = GetString(*name, where + ".name");
  if (!n.ok()) return n.status();
  st = shm::ValidateName("key", *n);
  if (!st.ok()) return Error(where + ".name", st.message());
  k.name = *n;
  int sources = 0;
  for (const char* f : {"secret", "secret_env", "secret_file"}) sources += o.contains(f) ? 1 : 0;
  if (sources != 1) return Error(where, "needs exactly one of secret, secret_env, secret_file");
  if (const json::value* s = o.if_contains("secret")) {
    Result<std::string> r = GetString(*s, where + ".secret");
    if (!r.ok()) return r.status();
    k.secret = *r;
  } else if (const json::value* e = o.if_contains("secret_env")) {
    Result<std::string> var = GetString(*e, where + ".secret_env");
    if (!var.ok()) return var.status();
    std::optional<std::string> val = env(*var);
    if (!val) return Error(where + ".secret_env", "environment variable " + Escaped(*var) + " is not set");
    k.secret = *val;
  } else {
    Result<std::string> path = GetString(o.at("secret_file"), where + ".secret_file");
    if (!path.ok()) return path.status();
    Result<std::string> r = ReadSecretFile(Absolute(*path, base_dir), where + ".secret_file");
    if (!r.ok()) return r.status();
    k.secret = *r;
  }
  st = ValidateSecret(k.secret);
  if (!st.ok()) return Error(where, st.message());
  st = protocol::ReadKeyLimits(o, kConfigField, where + ".", &k);
  if (!st.ok()) return st;
  return k;
}

Result<PoolConfigEntry> ParsePool(std::string_view name, const json::value& v, const std::string& base_dir,
                                  const EnvLookup& env) {
  const std::string where = "pools." + Escaped(name);
  Status st = shm::ValidateName("pool", name);
  if (!st.ok()) return Error(where, st.message());
  if (!v.is_object()) return Error(where, "must be an object");
  const json::object& o = v.as_object();
  st = OnlyFields(o, where,
                  {"strategy", "default_cooldown", "max_failures", "acquire_timeout", "max_lease_seconds",
                   "max_cooldown", "rate_margin", "max_leases_per_process", "keys"});
  if (!st.ok()) return st;
  PoolConfigEntry p;
  p.name = std::string(name);
  if (const json::value* s = o.if_contains("strategy")) {
    Result<std::string> r = GetString(*s, where + ".strategy");
    if (!r.ok()) return r.status();
    Result<Strategy> strategy = ParseStrategy(*r);
    if (!strategy.ok()) return Error(where + ".strategy", strategy.status().message());
    p.options.strategy = *strategy;
  }
  struct Dur {
    const char* field;
    double* dest;
  };
  for (Dur d :
       {Dur{"default_cooldown", &p.options.default_cooldown}, Dur{"acquire_timeout", &p.options.acquire_timeout},
        Dur{"max_lease_seconds", &p.options.max_lease_seconds}, Dur{"max_cooldown", &p.options.max_cooldown}}) {
    if (const json::value* x = o.if_contains(d.field)) {
      Result<double> r = GetSeconds(*x, where + "." + d.field);
      if (!r.ok()) return r.status();
      *d.dest = *r;
    }
  }
  if (const json::value* x = o.if_contains("rate_margin")) {
    Result<double> r = protocol::ReadRateMargin(*x, where + ".rate_margin", kConfigField);
    if (!r.ok()) return r.status();
    p.options.rate_margin = *r;
  }
  if (const json::value* x = o.if_contains("max_failures")) {
    Result<uint64_t> r = GetUint(*x, where + ".max_failures", 1, UINT32_MAX);
    if (!r.ok()) return r.status();
    p.options.max_failures = static_cast<uint32_t>(*r);
  }
  if (const json::value* x = o.if_contains("max_leases_per_process")) {
    Result<uint64_t> r = GetUint(*x, where + ".max_leases_per_process", 1, UINT32_MAX);
    if (!r.ok()) return r.status();
    p.options.max_leases_per_process = static_cast<uint32_t>(*r);
  }
  st = ValidatePoolOptions(p.options);
  if (!st.ok()) return Error(where, st.message());
  const json::value* keys = o.if_contains("keys");
  if (keys == nullptr) return Error(where + ".keys", "is required");
  if (!keys->is_array()) return Error(where + ".keys", "must be an array");
  std::unordered_map<std::string, size_t> names;
  std::unordered_map<std::string, size_t> secrets;
  const json::array& a = keys->get_array();
  for (size_t i = 0; i < a.size(); ++i) {
    const std::string kwhere = where + ".keys[" + std::to_string(i) + "]";
    Result<KeySpec> k = ParseKey(a[i], kwhere, base_dir, env);
    if (!k.ok()) return k.status();
    if (auto [it, fresh] = names.emplace(k->name, i); !fresh) {
      return Error(kwhere + ".name",
                   "duplicate key name " + Quoted(k->name) + " (also keys[" + std::to_string(it->second) + "])");
    }
    if (auto [it, fresh] = secrets.emplace(k->secret, i); !fresh) {
      return Error(kwhere, "repeats the secret of keys[" + std::to_string(it->second) + "]");
    }
    p.keys.push_back(std::move(k).value());
  }
  return p;
}

Result<double> GetRange(const json::value& v, const std::string& field, double lo, double hi, const char* unit) {
  Result<double> r = GetSeconds(v, field);
  if (!r.ok()) return r.status();
  if (*r < lo || *r > hi) {
    std::ostringstream m;
    m << "must be between " << lo << " and " << hi << unit;
    return Error(field, m.str());
  }
  return r;
}

Result<mesh::MeshConfig> ParseMesh(const json::value& v, const EnvLookup& env) {
  if (!v.is_object()) return Error("mesh", "must be an object");
  const json::object& o = v.as_object();
  Status st = OnlyFields(
      o, "mesh",
      {"redis", "redis_password_env", "host", "namespace", "refresh", "lease", "outage", "headroom", "timeout"});
  if (!st.ok()) return st;
  mesh::MeshConfig m;
  const json::value* redis = o.if_contains("redis");
  if (redis == nullptr) return Error("mesh.redis", "is required (redis://HOST:PORT[/DB] or unix:///PATH)");
  Result<std::string> url = GetString(*redis, "mesh.redis");
  if (!url.ok()) return url.status();
  Result<mesh::RedisEndpoint> ep = mesh::ParseRedisUrl(*url);
  if (!ep.ok()) return Error("mesh.redis", ep.status().message());
  m.redis = *ep;
  m.redis_url = *url;
  if (const json::value* x = o.if_contains("redis_password_env")) {
    Result<std::string> var = GetString(*x, "mesh.redis_password_env");
    if (!var.ok()) return var.status();
    if (var->empty()) return Error("mesh.redis_password_env", "must name an environment variable");
    std::optional<std::string> pw = env(*var);
    if (!pw) return Error("mesh.redis_password_env", "environment variable " + Escaped(*var) + " is not set");
    if (pw->empty()) return Error("mesh.redis_password_env", "environment variable " + Escaped(*var) + " is empty");
    m.redis_password_env = *var;
    m.password = *pw;
  }
  if (const json::value* x = o.if_contains("host")) {
    Result<std::string> r = GetString(*x, "mesh.host");
    if (!r.ok()) return r.status();
    m.host = *r;
  } else {
    char name[256] = {};
    if (::gethostname(name, sizeof(name) - 1) != 0 || name[0] == '\0') {
      return Error("mesh.host", "is not set and the host name cannot be read");
    }
    m.host = name;
  }
  st = shm::ValidateName("mesh host", m.host);
  if (!st.ok()) return Error("mesh.host", st.message());
  if (const json::value* x = o.if_contains("namespace")) {
    Result<std::string> r = GetString(*x, "mesh.namespace");
    if (!r.ok()) return r.status();
    m.ns = *r;
  }
  st = shm::ValidateName("mesh namespace", m.ns);
  if (!st.ok()) return Error("mesh.namespace", st.message());
  struct Range {
    const char* field;
    double* dest;
    double lo;
    double hi;
    const char* unit;
  };
  for (Range r : {Range{"refresh", &m.refresh, 0.05, 60, " seconds"}, Range{"lease", &m.lease, 0.5, 3600, " seconds"},
                  Range{"headroom", &m.headroom, 0, 0.5, ""}, Range{"timeout", &m.timeout, 0.005, 5, " seconds"}}) {
    if (const json::value* x = o.if_contains(r.field)) {
      Result<double> d = GetRange(*x, std::string("mesh.") + r.field, r.lo, r.hi, r.unit);
      if (!d.ok()) return d.status();
      *r.dest = *d;
    }
  }
  if (m.lease < 2 * m.refresh) {
    return Error("mesh.lease", "must be at least twice mesh.refresh (a lease outlives a missed refresh)");
  }
  if (m.timeout * 2 > m.refresh) return Error("mesh.timeout", "must be at most half of mesh.refresh");
  if (const json::value* x = o.if_contains("outage")) {
    Result<std::string> r = GetString(*x, "mesh.outage");
    if (!r.ok()) return r.status();
    if (*r == "share") {
      m.outage = mesh::OutageMode::kShare;
    } else if (*r == "closed") {
      m.outage = mesh::OutageMode::kClosed;
    } else if (*r == "open") {
      m.outage = mesh::OutageMode::kOpen;
    } else {
      return Error("mesh.outage", "must be one of share, closed, open (not " + Quoted(*r) + ")");
    }
  }
  return m;
}

}  // namespace

const PoolConfigEntry* BrokerConfig::FindPool(std::string_view name) const {
  for (const PoolConfigEntry& p : pools) {
    if (p.name == name) return &p;
  }
  return nullptr;
}

Result<BrokerConfig> ParseConfig(std::string_view text, const std::string& base_dir, const EnvLookup& env) {
  Result<json::value> root = protocol::ParseJson(text);
  if (!root.ok()) return Status(Code::kInvalidArgument, "config: " + root.status().message());
  if (!root->is_object()) return Error("(top level)", "must be a JSON object");
  const json::object& o = root->as_object();
  Status st =
      OnlyFields(o, "",
                 {"socket", "state_file", "allow_uids", "allow_gids", "worker_uids", "worker_gids", "admin_uids",
                  "admin_gids", "max_sessions", "max_sessions_per_uid", "max_pending_acquires", "max_slow_leases",
                  "frame_timeout", "pools", "capacity", "log_level", "metrics_file", "metrics_interval", "mesh"});
  if (!st.ok()) return st;
  BrokerConfig c;
  c.socket = protocol::kDefaultSocket;
  c.state_file = kDefaultStateFile;
  if (const json::value* v = o.if_contains("socket")) {
    Result<std::string> r = GetString(*v, "socket");
    if (!r.ok()) return r.status();
    if (r->empty()) return Error("socket", "must not be empty");
    if (r->size() > 100) return Error("socket", "path is longer than a Unix socket address allows");
    c.socket = Absolute(*r, base_dir);
  }
  if (const json::value* v = o.if_contains("state_file")) {
    Result<std::string> r = GetString(*v, "state_file");
    if (!r.ok()) return r.status();
    if (r->empty()) return Error("state_file", "must not be empty");
    c.state_file = Absolute(*r, base_dir);
  }
  if (c.socket.size() > 100) return Error("socket", "path is longer than a Unix socket address allows");
  struct IdList {
    const char* field;
    std::vector<uint32_t>* dest;
  };
  for (IdList l : {IdList{"allow_uids", &c.allow_uids}, IdList{"allow_gids", &c.allow_gids},
                   IdList{"worker_uids", &c.worker_uids}, IdList{"worker_gids", &c.worker_gids},
                   IdList{"admin_uids", &c.admin_uids}, IdList{"admin_gids", &c.admin_gids}}) {
    if (const json::value* v = o.if_contains(l.field)) {
      Result<std::vector<uint32_t>> r = GetIdList(*v, l.field);
      if (!r.ok()) return r.status();
      *l.dest = *r;
    }
  }
  // Who may read secrets may act as a worker unless the file says otherwise.
  if (!o.contains("worker_uids")) c.worker_uids = c.allow_uids;
  if (!o.contains("worker_gids")) c.worker_gids = c.allow_gids;
  struct Limit {
    const char* field;
    uint32_t* dest;
    uint32_t max;
  };
  for (Limit l : {Limit{"max_sessions", &c.max_sessions, 1u << 20},
                  Limit{"max_sessions_per_uid", &c.max_sessions_per_uid, 1u << 20},
                  Limit{"max_pending_acquires", &c.max_pending_acquires, 1u << 16},
                  Limit{"max_slow_leases", &c.max_slow_leases, shm::kMaxLeasesPerPoolLimit}}) {
    if (const json::value* v = o.if_contains(l.field)) {
      Result<uint64_t> r = GetUint(*v, l.field, 1, l.max);
      if (!r.ok()) return r.status();
      *l.dest = static_cast<uint32_t>(*r);
    }
  }
  if (const json::value* v = o.if_contains("frame_timeout")) {
    Result<double> r = GetSeconds(*v, "frame_timeout");
    if (!r.ok()) return r.status();
    if (*r < 0.05 || *r > 3600) return Error("frame_timeout", "must be between 0.05 and 3600 seconds");
    c.frame_timeout = *r;
  }
  if (const json::value* v = o.if_contains("log_level")) {
    Result<std::string> r = GetString(*v, "log_level");
    if (!r.ok()) return r.status();
    LogLevel level;
    if (!ParseLogLevel(*r, &level)) return Error("log_level", "must be one of debug, info, warn, error");
    c.log_level = level;
  }
  if (const json::value* v = o.if_contains("metrics_file")) {
    Result<std::string> r = GetString(*v, "metrics_file");
    if (!r.ok()) return r.status();
    if (r->empty() || r->back() == '/') return Error("metrics_file", "must be a file path");
    c.metrics_file = Absolute(*r, base_dir);
  }
  if (const json::value* v = o.if_contains("metrics_interval")) {
    Result<double> r = GetSeconds(*v, "metrics_interval");
    if (!r.ok()) return r.status();
    if (*r < 0.1) return Error("metrics_interval", "must be at least 0.1 seconds");
    c.metrics_interval = *r;
  }
  if (const json::value* v = o.if_contains("capacity")) {
    if (!v->is_object()) return Error("capacity", "must be an object");
    const json::object& co = v->as_object();
    st = OnlyFields(co, "capacity", {"max_pools", "keys_per_pool", "leases_per_pool"});
    if (!st.ok()) return st;
    struct Cap {
      const char* field;
      uint32_t* dest;
      uint32_t max;
    };
    for (Cap cap : {Cap{"max_pools", &c.capacity.max_pools, shm::kMaxPoolsLimit},
                    Cap{"keys_per_pool", &c.capacity.keys_per_pool, shm::kMaxKeysPerPoolLimit},
                    Cap{"leases_per_pool", &c.capacity.leases_per_pool, shm::kMaxLeasesPerPoolLimit}}) {
      if (const json::value* x = co.if_contains(cap.field)) {
        Result<uint64_t> r = GetUint(*x, std::string("capacity.") + cap.field, 1, cap.max);
        if (!r.ok()) return r.status();
        *cap.dest = static_cast<uint32_t>(*r);
      }
    }
  }
  if (const json::value* v = o.if_contains("mesh")) {
    Result<mesh::MeshConfig> m = ParseMesh(*v, env);
    if (!m.ok()) return m.status();
    c.mesh = std::move(m).value();
  }
  const json::value* pools = o.if_contains("pools");
  if (pools == nullptr) return Error("pools", "is required");
  if (!pools->is_object()) return Error("pools", "must be an object of pool name -> pool");
  for (const auto& kv : pools->get_object()) {
    Result<PoolConfigEntry> p = ParsePool(kv.key(), kv.value(), base_dir, env);
    if (!p.ok()) return p.status();
    if (p->keys.size() > c.capacity.keys_per_pool) {
      return Error("pools." + Escaped(p->name) + ".keys", std::to_string(p->keys.size()) +
                                                              " keys exceed capacity.keys_per_pool " +
                                                              std::to_string(c.capacity.keys_per_pool));
    }
    c.pools.push_back(std::move(p).value());
  }
  if (c.pools.size() > c.capacity.max_pools) {
    return Error("pools", std::to_string(c.pools.size()) + " pools exceed capacity.max_pools " +
                              std::to_string(c.capacity.max_pools));
  }
  return c;
}

Result<BrokerConfig> LoadConfig(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return Status(Code::kInvalidArgument, "config: cannot read " + Escaped(path) + ": " + std::strerror(errno));
  std::ostringstream ss;
  ss << in.rdbuf();
  std::string base_dir = ".";
  if (const size_t slash = path.rfind('/'); slash != std::string::npos)
    base_dir = slash == 0 ? "/" : path.substr(0, slash);
  if (base_dir.empty() || base_dir[0] != '/') {
    char cwd[4096];
    if (::getcwd(cwd, sizeof(cwd)) != nullptr)
      base_dir = base_dir == "." ? std::string(cwd) : std::string(cwd) + "/" + base_dir;
  }
  return ParseConfig(ss.str(), base_dir, [](const std::string& var) -> std::optional<std::string> {
    const char* v = std::getenv(var.c_str());
    if (v == nullptr) return std::nullopt;
    return std::string(v);
  });
}

}  // namespace keymesh::broker
