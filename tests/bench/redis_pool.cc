#include "redis_pool.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>
#include <memory>

namespace keymesh::bench {
namespace {

// Least busy key (ties: first in hash order), incremented atomically.
constexpr const char* kAcquireLua =
    "local all = redis.call('HGETALL', KEYS[1]) "
    "local best, bestn = nil, nil "
    "for i = 1, #all, 2 do "
    "  local n = tonumber(all[i + 1]) "
    "  if bestn == nil or n < bestn then best, bestn = all[i], n end "
    "end "
    "if best == nil then return nil end "
    "redis.call('HINCRBY', KEYS[1], best, 1) "
    "return best";
constexpr const char* kReleaseLua =
    "local n = redis.call('HINCRBY', KEYS[1], ARGV[1], -1) "
    "if n < 0 then redis.call('HSET', KEYS[1], ARGV[1], 0) return redis.error_reply('not held') end "
    "return n";

Status Io(const std::string& what) { return Status(Code::kIoError, "redis: " + what + ": " + std::strerror(errno)); }

}  // namespace

RedisPool::~RedisPool() {
  if (fd_ >= 0) ::close(fd_);
}

Result<std::string> RedisPool::Command(const std::vector<std::string>& args) {
  std::string out = "*" + std::to_string(args.size()) + "\r\n";
  for (const std::string& a : args) out += "$" + std::to_string(a.size()) + "\r\n" + a + "\r\n";
  for (size_t off = 0; off < out.size();) {
    ssize_t n = ::write(fd_, out.data() + off, out.size() - off);
    if (n <= 0) return Io("write");
    off += static_cast<size_t>(n);
  }
  // Read one reply: simple string, error, integer or bulk string (enough here).
  auto read_line = [&](std::string* line) -> Status {
    for (;;) {
      size_t pos = buf_.find("\r\n");
      if (pos != std::string::npos) {
        *line = buf_.substr(0, pos);
        buf_.erase(0, pos + 2);
        return Status::Ok();
      }
      char tmp[4096];
      ssize_t n = ::read(fd_, tmp, sizeof(tmp));
      if (n <= 0) return Io("read");
      buf_.append(tmp, static_cast<size_t>(n));
    }
  };
  std::string line;
  Status st = read_line(&line);
  if (!st.ok()) return st;
  if (line.empty()) return Status(Code::kProtocolError, "redis: empty reply");
  switch (line[0]) {
    case '+':
    case ':': return line.substr(1);
    case '-': return Status(Code::kProtocolError, "redis: " + line.substr(1));
    case '$': {
      const long len = std::strtol(line.c_str() + 1, nullptr, 10);
      if (len < 0) return std::string();
      while (buf_.size() < static_cast<size_t>(len) + 2) {
        char tmp[4096];
        ssize_t n = ::read(fd_, tmp, sizeof(tmp));
        if (n <= 0) return Io("read");
        buf_.append(tmp, static_cast<size_t>(n));
      }
      std::string v = buf_.substr(0, static_cast<size_t>(len));
      buf_.erase(0, static_cast<size_t>(len) + 2);
      return v;
    }
    default: return Status(Code::kProtocolError, "redis: unexpected reply '" + line + "'");
  }
}

Result<std::unique_ptr<RedisPool>> RedisPool::Connect(int port, const std::string& hash,
                                                      const std::vector<std::string>& keys, bool init) {
  std::unique_ptr<RedisPool> p(new RedisPool());
  p->hash_ = hash;
  p->fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (p->fd_ < 0) return Io("socket");
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(p->fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) return Io("connect");
  int one = 1;
  ::setsockopt(p->fd_, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  if (init) {
    Result<std::string> r = p->Command({"DEL", hash});
    if (!r.ok()) return r.status();
    for (const std::string& k : keys) {
      r = p->Command({"HSET", hash, k, "0"});
      if (!r.ok()) return r.status();
    }
  }
  Result<std::string> a = p->Command({"SCRIPT", "LOAD", kAcquireLua});
  if (!a.ok()) return a.status();
  Result<std::string> r = p->Command({"SCRIPT", "LOAD", kReleaseLua});
  if (!r.ok()) return r.status();
  p->acquire_sha_ = *a;
  p->release_sha_ = *r;
  return p;
}

Result<std::string> RedisPool::Acquire() { return Command({"EVALSHA", acquire_sha_, "1", hash_}); }

Status RedisPool::Release(const std::string& key) {
  Result<std::string> r = Command({"EVALSHA", release_sha_, "1", hash_, key});
  return r.ok() ? Status::Ok() : r.status();
}

}  // namespace keymesh::bench
