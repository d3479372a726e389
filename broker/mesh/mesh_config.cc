#include "broker/mesh/mesh_config.h"

#include <charconv>

#include "common/text.h"

namespace keymesh::broker::mesh {
namespace {

Status Bad(std::string_view url, std::string_view why) {
  return Status(Code::kInvalidArgument, "redis URL " + Quoted(url) + ": " + std::string(why));
}

bool ParseUint(std::string_view text, uint64_t max, uint64_t* out) {
  if (text.empty()) return false;
  uint64_t v = 0;
  const auto [ptr, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
  if (ec != std::errc() || ptr != text.data() + text.size() || v > max) return false;
  *out = v;
  return true;
}

}  // namespace

std::string RedisEndpoint::Describe() const {
  if (!unix_path.empty()) return "unix:" + unix_path;
  if (host.find(':') != std::string::npos) return "[" + host + "]:" + std::to_string(port);
  return host + ":" + std::to_string(port);
}

Result<RedisEndpoint> ParseRedisUrl(std::string_view url) {
  RedisEndpoint ep;
  constexpr std::string_view kTcp = "redis://";
  constexpr std::string_view kUnix = "unix://";
  if (url.size() > 4096) return Bad(url.substr(0, 64), "too long");
  for (char c : url) {
    if (static_cast<unsigned char>(c) <= 0x20 || c == 0x7f) return Bad(url, "contains a space or control character");
  }
  if (url.substr(0, kUnix.size()) == kUnix) {
    std::string_view rest = url.substr(kUnix.size());
    std::string_view query;
    if (const size_t q = rest.find('?'); q != std::string_view::npos) {
      query = rest.substr(q + 1);
      rest = rest.substr(0, q);
    }
    if (rest.empty() || rest.front() != '/') return Bad(url, "expected unix:///ABSOLUTE/PATH");
    ep.unix_path = std::string(rest);
    if (!query.empty()) {
      uint64_t db = 0;
      if (query.substr(0, 3) != "db=" || !ParseUint(query.substr(3), 1u << 20, &db)) {
        return Bad(url, "the only query is ?db=N");
      }
      ep.db = static_cast<uint32_t>(db);
    }
    return ep;
  }
  if (url.substr(0, kTcp.size()) != kTcp) return Bad(url, "expected redis://HOST:PORT[/DB] or unix:///PATH");
  std::string_view rest = url.substr(kTcp.size());
  if (rest.find('@') != std::string_view::npos) {
    return Bad(url, "a password does not belong in the URL: name an environment variable in redis_password_env");
  }
  std::string_view hostport = rest;
  if (const size_t slash = rest.find('/'); slash != std::string_view::npos) {
    hostport = rest.substr(0, slash);
    const std::string_view db = rest.substr(slash + 1);
    uint64_t v = 0;
    if (!db.empty()) {
      if (!ParseUint(db, 1u << 20, &v)) return Bad(url, "the database after '/' must be a number");
      ep.db = static_cast<uint32_t>(v);
    }
  }
  std::string_view port;
  if (!hostport.empty() && hostport.front() == '[') {
    const size_t close = hostport.find(']');
    if (close == std::string_view::npos) return Bad(url, "unclosed '[' in the host");
    ep.host = std::string(hostport.substr(1, close - 1));
    std::string_view after = hostport.substr(close + 1);
    if (!after.empty()) {
      if (after.front() != ':') return Bad(url, "expected ':PORT' after ']'");
      port = after.substr(1);
      if (port.empty()) return Bad(url, "empty port");
    }
  } else {
    const size_t colon = hostport.rfind(':');
    if (colon != std::string_view::npos) {
      ep.host = std::string(hostport.substr(0, colon));
      port = hostport.substr(colon + 1);
      if (port.empty()) return Bad(url, "empty port");
    } else {
      ep.host = std::string(hostport);
    }
  }
  if (ep.host.empty()) return Bad(url, "no host");
  if (!port.empty()) {
    uint64_t v = 0;
    if (!ParseUint(port, 65535, &v) || v == 0) return Bad(url, "the port must be 1-65535");
    ep.port = static_cast<uint16_t>(v);
  }
  return ep;
}

const char* OutageModeName(OutageMode mode) noexcept {
  switch (mode) {
    case OutageMode::kShare: return "share";
    case OutageMode::kClosed: return "closed";
    case OutageMode::kOpen: return "open";
  }
  return "?";
}

}  // namespace keymesh::broker::mesh
