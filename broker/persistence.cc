#include "broker/persistence.h"

#include <fcntl.h>
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
  return body;
}

Status Corrupt(const std::string& what) { return Status(Code::kCorruptState, what); }

// The state file's fields: a bad one is kCorruptState naming it (the
// caller adds which key it belongs to).
constexpr protocol::FieldStyle kStateField{Code::kCorruptState, "field '", "' ", false};

}  // namespace

StateImage CaptureState(const shm::Segment& segment, int64_t wall_minus_mono, uint64_t lock_timeout_ns,
                        const StateImage* previous, std::vector<std::string>* busy) {
  StateImage image;
  image.salt[0] = segment.header()->fingerprint_salt[0];
  image.salt[1] = segment.header()->fingerprint_salt[1];
  for (uint32_t p = 0; p < segment.header()->max_pools; ++p) {
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

std::string SerializeState(const StateImage& image) {
  json::object body = BodyJson(image);
  const std::string body_text = json::serialize(body);
  json::object file;
  file["format"] = kFormat;
  file["version"] = kStateFormatVersion;
  file["written_at"] = shm::WallNowNanos();
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
  if (!version.ok() || *version != static_cast<uint64_t>(kStateFormatVersion)) {
    return Corrupt("unsupported state format version (this broker reads version " +
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
  const std::string aside = path + ".corrupt-" + std::to_string(::time(nullptr));
  if (::rename(path.c_str(), aside.c_str()) != 0) {
    return Status(Code::kIoError, "cannot move " + Escaped(path) + " aside: " + std::strerror(errno));
  }
  return aside;
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
