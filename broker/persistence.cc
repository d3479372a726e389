#include "broker/persistence.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <ctime>

#include <boost/json.hpp>

#include "broker/hash.h"
#include "common/text.h"
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

bool ReadU64(const json::object& o, std::string_view f, uint64_t* out) {
  const json::value* v = o.if_contains(f);
  if (v == nullptr) return false;
  if (v->is_uint64()) {
    *out = v->get_uint64();
    return true;
  }
  if (v->is_int64() && v->get_int64() >= 0) {
    *out = static_cast<uint64_t>(v->get_int64());
    return true;
  }
  return false;
}

bool ReadBool(const json::object& o, std::string_view f, bool* out) {
  const json::value* v = o.if_contains(f);
  if (v == nullptr || !v->is_bool()) return false;
  *out = v->get_bool();
  return true;
}

Status SyncDirectory(const std::string& path) {
  std::string dir = ".";
  if (const size_t slash = path.rfind('/'); slash != std::string::npos) dir = slash == 0 ? "/" : path.substr(0, slash);
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return Status(Code::kIoError, "cannot open directory " + Escaped(dir) + ": " + std::strerror(errno));
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  if (rc != 0) return Status(Code::kIoError, "cannot fsync directory " + Escaped(dir) + ": " + std::strerror(err));
  return Status::Ok();
}

}  // namespace

StateImage CaptureState(const shm::Segment& segment, int64_t wall_minus_mono) {
  StateImage image;
  image.salt[0] = segment.header()->fingerprint_salt[0];
  image.salt[1] = segment.header()->fingerprint_salt[1];
  for (uint32_t p = 0; p < segment.header()->max_pools; ++p) {
    const shm::PoolHeader* ph = segment.pool_header(p);
    if (ph->use != shm::PoolUse::kInUse) continue;
    shm::PoolAdmin access(segment, p);
    std::vector<PersistedKey>& out = image.pools[access.Info().name];
    for (shm::ExportedKey& e : access.ExportKeyStates()) {
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
  boost::system::error_code ec;
  json::value root;
  try {
    root = json::parse(text, ec);
  } catch (const std::exception& e) {
    return Corrupt(std::string("cannot parse: ") + e.what());
  }
  if (ec) return Corrupt("not valid JSON (" + ec.message() + ")");
  if (!root.is_object()) return Corrupt("not a JSON object");
  const json::object& file = root.get_object();
  const json::value* format = file.if_contains("format");
  if (format == nullptr || !format->is_string() || format->get_string() != kFormat) {
    return Corrupt("not a keymesh state file (format field)");
  }
  uint64_t version = 0;
  if (!ReadU64(file, "version", &version) || version != static_cast<uint64_t>(kStateFormatVersion)) {
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
    const json::value& s = salt->get_array()[i];
    if (s.is_uint64()) {
      image.salt[i] = s.get_uint64();
    } else if (s.is_int64() && s.get_int64() >= 0) {
      image.salt[i] = static_cast<uint64_t>(s.get_int64());
    } else {
      return Corrupt("bad salt");
    }
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
      auto& s = k.state;
      uint64_t fs = 0, rs = 0;
      bool ok = ReadU64(o, "fingerprint", &k.fingerprint) && ReadBool(o, "enabled", &s.enabled) &&
                ReadBool(o, "exhausted", &s.exhausted) && ReadU64(o, "fail_streak", &fs) &&
                ReadU64(o, "rate_limit_streak", &rs) &&
                ReadU64(o, "cooldown_until_wall_ns", &k.cooldown_until_wall_ns) &&
                ReadU64(o, "last_cooldown_ns", &s.last_cooldown) && ReadU64(o, "acquires", &s.acquires) &&
                ReadU64(o, "successes", &s.successes) && ReadU64(o, "failures", &s.failures) &&
                ReadU64(o, "rate_limited", &s.rate_limited) && ReadU64(o, "reclaimed", &s.reclaimed) &&
                ReadU64(o, "tokens", &s.tokens) && ReadBool(o, "has_latency", &s.has_latency);
      const json::value* ema = o.if_contains("ema_latency");
      if (!ok || ema == nullptr || !(ema->is_double() || ema->is_int64() || ema->is_uint64())) {
        return Corrupt(where + " has missing or mistyped fields");
      }
      s.ema_latency = ema->is_double() ? ema->get_double()
                                       : (ema->is_int64() ? static_cast<double>(ema->get_int64())
                                                          : static_cast<double>(ema->get_uint64()));
      s.fail_streak = static_cast<uint32_t>(fs);
      s.rl_streak = static_cast<uint32_t>(rs);
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
  const std::string content = SerializeState(image);
  const std::string tmp = path_ + ".tmp." + std::to_string(::getpid());
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) return Status(Code::kIoError, "cannot create " + tmp + ": " + std::strerror(errno));
  size_t off = 0;
  while (off < content.size()) {
    const ssize_t n = ::write(fd, content.data() + off, content.size() - off);
    if (n < 0) {
      if (errno == EINTR) continue;
      const int err = errno;
      ::close(fd);
      ::unlink(tmp.c_str());
      return Status(Code::kIoError, "cannot write " + tmp + ": " + std::strerror(err));
    }
    off += static_cast<size_t>(n);
  }
  if (::fsync(fd) != 0) {
    const int err = errno;
    ::close(fd);
    ::unlink(tmp.c_str());
    return Status(Code::kIoError, "cannot fsync " + tmp + ": " + std::strerror(err));
  }
  ::close(fd);
  if (::rename(tmp.c_str(), path_.c_str()) != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    return Status(Code::kIoError,
                  "cannot rename " + Escaped(tmp) + " to " + Escaped(path_) + ": " + std::strerror(err));
  }
  Status st = SyncDirectory(path_);
  if (!st.ok()) return st;
  last_body_ = std::move(body);
  return Status::Ok();
}

}  // namespace keymesh::broker
