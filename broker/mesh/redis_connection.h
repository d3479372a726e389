// One synchronous connection to Redis (hiredis underneath, hidden here):
// connect with a timeout, AUTH and SELECT, commands and pipelines bounded
// by one deadline each, replies copied into our own RedisReply while they
// are parsed, with limits on depth, element count and bulk size.
//
// Every reply is input from another process: a reply over the limits or of
// a shape the protocol does not allow is kProtocolError, an I/O failure
// (refused, timed out, closed) kIoError "mesh: redis HOST:PORT: <what>";
// after either the connection is dropped and the next call reconnects.
// The password is sent with AUTH and never appears in a message.
//
// Threading: not thread-safe, one connection per thread; but Interrupt()
// may be called from any thread.
#ifndef KEYMESH_BROKER_MESH_REDIS_CONNECTION_H_
#define KEYMESH_BROKER_MESH_REDIS_CONNECTION_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "broker/mesh/lua_scripts.h"
#include "broker/mesh/mesh_config.h"
#include "keymesh/status.h"

namespace keymesh::broker::mesh {

// A reply as Redis sent it (RESP2), owned by us.
struct RedisReply {
  enum class Type : uint8_t { kNil, kStatus, kError, kInteger, kString, kArray };
  Type type = Type::kNil;
  int64_t integer = 0;               // kInteger
  std::string str;                   // kStatus, kError, kString
  std::vector<RedisReply> elements;  // kArray

  bool is_nil() const noexcept { return type == Type::kNil; }
  bool is_string() const noexcept { return type == Type::kString || type == Type::kStatus; }
  bool is_array() const noexcept { return type == Type::kArray; }
  bool is_integer() const noexcept { return type == Type::kInteger; }
};

// What one reply may hold; more is kProtocolError and drops the connection.
struct RedisLimits {
  uint32_t max_depth = 7;          // nested arrays (hiredis itself stops at 7)
  size_t max_elements = 1u << 20;  // array elements in one reply, all levels
  size_t max_bulk = 16u << 20;     // bytes of one string
  size_t max_total = 64u << 20;    // bytes of all strings of one reply
};

class RedisConnection {
 public:
  struct Options {
    RedisEndpoint endpoint;
    std::string password;  // empty: no AUTH; never logged
    double timeout = 0.1;  // seconds: connect, and each command or pipeline
    RedisLimits limits;
  };
  explicit RedisConnection(Options options);
  ~RedisConnection();
  RedisConnection(const RedisConnection&) = delete;
  RedisConnection& operator=(const RedisConnection&) = delete;

  // Connects (AUTH, SELECT) unless connected.
  Status Connect();
  bool connected() const noexcept;
  void Disconnect() noexcept;
  // Thread-safe: the call in progress (or the next one) fails at once,
  // kIoError "interrupted", and drops the connection.
  void Interrupt() noexcept;

  // Sends every command, then reads one reply per command, all before the
  // timeout plus `extra_ms` (a blocking command's own wait). Redis error
  // replies come back as kError values; connects lazily.
  Result<std::vector<RedisReply>> Pipeline(const std::vector<std::vector<std::string>>& commands,
                                           uint32_t extra_ms = 0);
  // One command; a Redis error reply is kIoError with its text (one line).
  Result<RedisReply> Command(const std::vector<std::string>& args, uint32_t extra_ms = 0);
  // EVALSHA of `script` (SCRIPT LOAD the first time and after NOSCRIPT,
  // then one retry). A Redis error reply is kIoError.
  Result<RedisReply> Eval(const LuaScript& script, const std::vector<std::string>& args);

  // "mesh: redis 127.0.0.1:6379: " (the prefix of every message).
  const std::string& prefix() const noexcept { return prefix_; }

 private:
  struct Impl;
  Status Fail(Code code, const std::string& what);
  Result<RedisReply> ErrorReplyToStatus(RedisReply reply);

  Options options_;
  std::string prefix_;
  std::unique_ptr<Impl> impl_;
};

}  // namespace keymesh::broker::mesh

#endif  // KEYMESH_BROKER_MESH_REDIS_CONNECTION_H_
