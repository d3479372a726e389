#include "broker/persistence.h"

#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>

#include <cerrno>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <limits>

#include <boost/json.hpp>

#include "broker/atomic_file.h"
#include "broker/hash.h"
#include "common/text.h"
#include "protocol/json_fields.h"
#include "protocol/messages.h"
#include "shm/clock.h"

namespace keymesh::broker {
namespace {

namespace json = boost::json;

constexpr const char* kFormat = "keymesh-state";

std::string Checksum(std::string_view bytes) {
  char buf[40];
  std::snprintf(buf, sizeof(buf), "fnv1a64:%016" PRIx64, Fnv1a64(bytes));
  return buf;
}

json::object BodyJson(const StateImage& image) {
  json::object body;
  json::array salt;
  salt.push_back(image.salt[0]);
  salt.push_back(image.salt[1]);
  body["salt"] = std::move(salt);
  json::object pools;
  for (const auto& [pool, keys] : image.pools) {
    json::object kj;
    for (const PersistedKey& k : keys) {
      const auto& s = k.state;
      json::object o;
      o["fingerprint"] = k.fingerprint;
      o["enabled"] = s.enabled;
      o["exhausted"] = s.exhausted;
      o["fail_streak"] = s.fail_streak;
      o["rate_limit_streak"] = s.rl_streak;
      o["cooldown_until_wall_ns"] = k.cooldown_until_wall_ns;
      o["last_cooldown_ns"] = s.last_cooldown;
      o["acquires"] = s.acquires;
      o["successes"] = s.successes;
      o["failures"] = s.failures;
      o["rate_limited"] = s.rate_limited;
      o["reclaimed"] = s.reclaimed;
      o["tokens"] = s.tokens;
      o["has_latency"] = s.has_latency;
      o["ema_latency"] = s.ema_latency;
      kj[k.name] = std::move(o);
    }
    pools[pool] = std::move(kj);
  }
  body["pools"] = std::move(pools);
  json::object runtime;
  for (const auto& [pool, keys] : image.runtime_keys) {
    json::object kj;
    for (const PersistedRuntimeKey& k : keys) {
      json::object o;
      if (!k.secret_env.empty()) o["secret_env"] = k.secret_env;
      if (!k.secret_file.empty()) o["secret_file"] = k.secret_file;
      o["weight"] = k.limits.weight;
      o["max_concurrency"] = k.limits.max_concurrency;
      o["rpm"] = k.limits.rpm;
      o["tpm"] = k.limits.tpm;
      o["burst"] = k.limits.burst;
      if (k.limits.rate_margin >= 0) o["rate_margin"] = k.limits.rate_margin;
      kj[k.limits.name] = std::move(o);
    }
    runtime[pool] = std::move(kj);
  }
  body["runtime_keys"] = std::move(runtime);
  json::object tombstones;
  for (const auto& [pool, keys] : image.tombstones) {
    json::object kj;
    for (const auto& [name, fingerprint] : keys) kj[name] = fingerprint;
    tombstones[pool] = std::move(kj);
  }
  body["tombstones"] = std::move(tombstones);
  return body;
}

Status Corrupt(const std::string& what) { return Status(Code::kCorruptState, what); }

// The state file's fields: a bad one is kCorruptState naming it (the
// caller adds which key it belongs to).
constexpr protocol::FieldStyle kStateField{Code::kCorruptState, "field '", "' ", false};

// Version 2's runtime_keys and tombstones (absent in version 1).
Status ParseDurableKeys(const json::object& b, StateImage* image) {
  if (const json::value* rk = b.if_contains("runtime_keys")) {
    if (!rk->is_object()) return Corrupt("runtime_keys is not an object");
    for (const auto& pv : rk->get_object()) {
      if (!pv.value().is_object()) return Corrupt("runtime_keys pool " + Quoted(pv.key()) + " is not an object");
      std::vector<PersistedRuntimeKey>& keys = image->runtime_keys[std::string(pv.key())];
      for (const auto& kv : pv.value().get_object()) {
        const std::string where = "runtime key " + Quoted(std::string(pv.key()) + "/" + std::string(kv.key()));
        if (!kv.value().is_object()) return Corrupt(where + " is not an object");
        const json::object& o = kv.value().get_object();
        PersistedRuntimeKey k;
        k.limits.name = std::string(kv.key());
        Status st = shm::ValidateName("key", k.limits.name);
        if (!st.ok()) return Corrupt(where + ": " + st.message());
        const json::value* env = o.if_contains("secret_env");
        const json::value* file = o.if_contains("secret_file");
        if ((env == nullptr) == (file == nullptr))
          return Corrupt(where + ": needs exactly one of secret_env, secret_file");
        const json::value* source = env != nullptr ? env : file;
        if (!source->is_string() || source->get_string().empty()) return Corrupt(where + ": bad secret source");
        (env != nullptr ? k.secret_env : k.secret_file) = std::string(source->get_string());
        for (const auto& f : o) {
          const std::string_view n = f.key();
          if (n != "secret_env" && n != "secret_file" && n != "weight" && n != "max_concurrency" && n != "rpm" &&
              n != "tpm" && n != "burst" && n != "rate_margin") {
            return Corrupt(where + ": unknown field " + Quoted(n));
          }
        }
        st = protocol::ReadKeyLimits(o, kStateField, "", &k.limits);
        if (!st.ok()) return Corrupt(where + ": " + st.message());
        keys.push_back(std::move(k));
      }
    }
  }
  if (const json::value* tb = b.if_contains("tombstones")) {
    if (!tb->is_object()) return Corrupt("tombstones is not an object");
    for (const auto& pv : tb->get_object()) {
      if (!pv.value().is_object()) return Corrupt("tombstones pool " + Quoted(pv.key()) + " is not an object");
      auto& keys = image->tombstones[std::string(pv.key())];
      for (const auto& kv : pv.value().get_object()) {
        Result<uint64_t> fp = protocol::ReadUint(kv.value(), "tombstone", 0, UINT64_MAX, kStateField);
        if (!fp.ok())
          return Corrupt("tombstone " + Quoted(std::string(pv.key()) + "/" + std::string(kv.key())) + ": " +
                         fp.status().message());
        keys[std::string(kv.key())] = *fp;
      }
    }
  }
  return Status::Ok();
}

}  // namespace

StateImage CaptureState(const shm::Segment& segment, int64_t wall_minus_mono, uint64_t lock_timeout_ns,
                        const StateImage* previous, std::vector<std::string>* busy) {
  StateImage image;
  image.salt[0] = segment.header()->fingerprint_salt[0];
  image.salt[1] = segment.header()->fingerprint_salt[1];
  for (uint32_t p = 0; p < segment.capacities().max_pools; ++p) {
    const shm::PoolHeader* ph = segment.pool_header(p);
    if (ph->use != shm::PoolUse::kInUse) continue;
    shm::PoolAdmin access(segment, p);
    access.set_lock_timeout(lock_timeout_ns);
    const std::string name = access.Info().name;
    std::vector<PersistedKey>& out = image.pools[name];
    std::vector<shm::ExportedKey> keys;
    if (!access.ExportKeyStates(&keys).ok()) {
      if (busy != nullptr) busy->push_back(name);
      if (previous != nullptr) {
        if (auto it = previous->pools.find(name); it != previous->pools.end()) out = it->second;
      }
      continue;
    }
    for (shm::ExportedKey& e : keys) {
      PersistedKey k;
      k.name = std::move(e.name);
      k.fingerprint = e.fingerprint;
      k.state = e.state;
      if (e.state.cooldown_deadline != 0) {
        k.cooldown_until_wall_ns =
            static_cast<uint64_t>(static_cast<int64_t>(e.state.cooldown_deadline) + wall_minus_mono);
      }
      k.state.cooldown_deadline = 0;
      out.push_back(std::move(k));
    }
  }
  return image;
}

int64_t WallMinusMono(std::optional<int64_t> previous) {
  constexpr int64_t kSecond = 1'000'000'000;
  const int64_t raw = static_cast<int64_t>(shm::WallNowNanos()) - static_cast<int64_t>(shm::MonotonicNowNanos());
  if (previous && raw - *previous < kSecond && *previous - raw < kSecond) return *previous;
  const int64_t half = raw >= 0 ? kSecond / 2 : -kSecond / 2;
  return (raw + half) / kSecond * kSecond;
}

std::string SerializeState(const StateImage& image) { return SerializeState(image, shm::WallNowNanos()); }

std::string SerializeState(const StateImage& image, uint64_t written_at) {
  json::object body = BodyJson(image);
  const std::string body_text = json::serialize(body);
  json::object file;
  file["format"] = kFormat;
  file["version"] = kStateFormatVersion;
  file["written_at"] = written_at;
  file["body"] = std::move(body);
  file["checksum"] = Checksum(body_text);
  std::string out = json::serialize(file);
  out.push_back('\n');
  return out;
}

Result<StateImage> ParseState(std::string_view text) {
  Result<json::value> root = protocol::ParseJson(text);
  if (!root.ok()) return Corrupt(root.status().message());
  if (!root->is_object()) return Corrupt("not a JSON object");
  const json::object& file = root->get_object();
  const json::value* format = file.if_contains("format");
  if (format == nullptr || !format->is_string() || format->get_string() != kFormat) {
    return Corrupt("not a keymesh state file (format field)");
  }
  Result<uint64_t> version = protocol::GetUint(file, "version", 0, UINT64_MAX, kStateField);
  if (!version.ok() || *version < 1 || *version > static_cast<uint64_t>(kStateFormatVersion)) {
    return Corrupt("unsupported state format version (this broker reads versions 1 to " +
                   std::to_string(kStateFormatVersion) + ")");
  }
  const json::value* body = file.if_contains("body");
  const json::value* checksum = file.if_contains("checksum");
  if (body == nullptr || !body->is_object()) return Corrupt("missing body");
  if (checksum == nullptr || !checksum->is_string()) return Corrupt("missing checksum");
  if (Checksum(json::serialize(*body)) != checksum->get_string()) return Corrupt("checksum mismatch");
  const json::object& b = body->get_object();
  StateImage image;
  const json::value* salt = b.if_contains("salt");
  if (salt == nullptr || !salt->is_array() || salt->get_array().size() != 2) return Corrupt("bad salt");
  for (size_t i = 0; i < 2; ++i) {
    Result<uint64_t> s = protocol::ReadUint(salt->get_array()[i], "salt", 0, UINT64_MAX, kStateField);
    if (!s.ok()) return Corrupt("bad salt");
    image.salt[i] = *s;
  }
  const json::value* pools = b.if_contains("pools");
  if (pools == nullptr || !pools->is_object()) return Corrupt("missing pools");
  for (const auto& pv : pools->get_object()) {
    if (!pv.value().is_object()) return Corrupt("pool " + Quoted(pv.key()) + " is not an object");
    std::vector<PersistedKey>& keys = image.pools[std::string(pv.key())];
    for (const auto& kv : pv.value().get_object()) {
      const std::string where = "key " + Quoted(std::string(pv.key()) + "/" + std::string(kv.key()));
      if (!kv.value().is_object()) return Corrupt(where + " is not an object");
      const json::object& o = kv.value().get_object();
      PersistedKey k;
      k.name = std::string(kv.key());
      shm::RestoredState& s = k.state;
      protocol::FieldReader in(o, kStateField);
      in.Required("fingerprint", &k.fingerprint);
      in.Required("enabled", &s.enabled);
      in.Required("exhausted", &s.exhausted);
      in.Required("fail_streak", &s.fail_streak);
      in.Required("rate_limit_streak", &s.rl_streak);
      in.Required("cooldown_until_wall_ns", &k.cooldown_until_wall_ns);
      in.Required("last_cooldown_ns", &s.last_cooldown);
      in.Required("acquires", &s.acquires);
      in.Required("successes", &s.successes);
      in.Required("failures", &s.failures);
      in.Required("rate_limited", &s.rate_limited);
      in.Required("reclaimed", &s.reclaimed);
      in.Required("tokens", &s.tokens);
      in.Required("has_latency", &s.has_latency);
      in.Required("ema_latency", &s.ema_latency, 0.0, std::numeric_limits<double>::max());
      if (!in.status().ok()) return Corrupt(where + ": " + in.status().message());
      keys.push_back(std::move(k));
    }
  }
  Status st = ParseDurableKeys(b, &image);
  if (!st.ok()) return st;
  return image;
}

Result<std::optional<StateImage>> ReadStateFile(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) return std::optional<StateImage>();
    return Status(Code::kIoError, "cannot read state file " + Escaped(path) + ": " + std::strerror(errno));
  }
  std::string text;
  char buf[65536];
  for (;;) {
    const ssize_t n = ::read(fd, buf, sizeof(buf));
    if (n < 0) {
      if (errno == EINTR) continue;
      const int err = errno;
      ::close(fd);
      return Status(Code::kIoError, "cannot read state file " + Escaped(path) + ": " + std::strerror(err));
    }
    if (n == 0) break;
    text.append(buf, static_cast<size_t>(n));
  }
  ::close(fd);
  Result<StateImage> image = ParseState(text);
  if (!image.ok())
    return Status(Code::kCorruptState, "state file " + Escaped(path) + " is corrupt: " + image.status().message());
  return std::optional<StateImage>(std::move(image).value());
}

Result<std::string> MoveAside(const std::string& path) {
  const std::string base = path + ".corrupt-" + std::to_string(::time(nullptr));
  for (int n = 0; n < 1000; ++n) {
    const std::string aside = n == 0 ? base : base + "-" + std::to_string(n);
    if (::renameat2(AT_FDCWD, path.c_str(), AT_FDCWD, aside.c_str(), RENAME_NOREPLACE) == 0) return aside;
    if (errno != EEXIST) break;
  }
  return Status(Code::kIoError, "cannot move " + Escaped(path) + " aside: " + std::strerror(errno));
}

std::vector<std::string> RemoveStaleTempFiles(const std::string& path) {
  std::vector<std::string> removed;
  const size_t slash = path.rfind('/');
  const std::string dir = slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
  const std::string prefix = (slash == std::string::npos ? path : path.substr(slash + 1)) + ".tmp.";
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return removed;
  while (const dirent* e = ::readdir(d)) {
    const std::string_view name(e->d_name);
    if (name.size() <= prefix.size() || name.substr(0, prefix.size()) != prefix) continue;
    // WriteFileAtomically's names: <pid>.<16 hex digits> (older brokers:
    // <pid> alone).
    std::string_view rest = name.substr(prefix.size());
    const size_t dot = rest.find('.');
    const std::string_view pid = rest.substr(0, dot);
    if (pid.empty() || pid.find_first_not_of("0123456789") != std::string_view::npos) continue;
    if (dot != std::string_view::npos) {
      const std::string_view random = rest.substr(dot + 1);
      if (random.size() != 16 || random.find_first_not_of("0123456789abcdef") != std::string_view::npos) continue;
    }
    const std::string full = dir + "/" + std::string(name);
    if (::unlinkat(::dirfd(d), e->d_name, 0) == 0) removed.push_back(full);
  }
  ::closedir(d);
  return removed;
}

Status StatePersister::Save(const StateImage& image, bool force) {
  std::string body = json::serialize(BodyJson(image));
  if (!force && body == last_body_) return Status::Ok();
  Status st = WriteFileAtomically(path_, SerializeState(image), 0600, Durability::kDurable);
  if (!st.ok()) return st;
  last_body_ = std::move(body);
  return Status::Ok();
}

}  // namespace keymesh::broker
