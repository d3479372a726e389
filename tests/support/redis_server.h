// A throwaway redis-server for the mesh tests: on a free loopback port, in
// a private directory, with no persistence unless asked, in a child process
// that the destructor stops by pid (SIGKILL, then reaped) and whose
// directory it removes, also when a test fails. Tests freeze it
// (SIGSTOP/SIGCONT), kill it and restart it empty or from its AOF.
#ifndef KEYMESH_TESTS_SUPPORT_REDIS_SERVER_H_
#define KEYMESH_TESTS_SUPPORT_REDIS_SERVER_H_

#include <sys/types.h>

#include <cstdint>
#include <string>
#include <vector>

namespace keymesh::testing {

class RedisServer {
 public:
  // `aof`: append-only persistence (fsync always), so a restart keeps the data.
  explicit RedisServer(bool aof = false);
  ~RedisServer();
  RedisServer(const RedisServer&) = delete;
  RedisServer& operator=(const RedisServer&) = delete;

  // Starts redis-server and waits until it answers PING (false if it did
  // not within `timeout` seconds). The port is chosen on the first start
  // and kept by restarts.
  bool Start(double timeout = 10);
  // SIGKILL and reap (no save: an AOF keeps what it had written).
  void Kill();
  // Kill(), then Start() on the same port; `wipe` removes its data first.
  bool Restart(bool wipe, double timeout = 10);
  void Pause();   // SIGSTOP: the socket accepts, nothing answers
  void Resume();  // SIGCONT
  // Runs one command with redis-cli; its stdout (trailing newline cut), or
  // "" with *ok = false when redis-cli failed.
  std::string Cli(const std::vector<std::string>& args, bool* ok = nullptr) const;
  bool Ping() const;

  uint16_t port() const noexcept { return port_; }
  pid_t pid() const noexcept { return pid_; }
  bool running() const noexcept { return pid_ > 0; }
  // "redis://127.0.0.1:PORT/0"
  std::string url() const;
  const std::string& dir() const noexcept { return dir_; }

  // A TCP port on 127.0.0.1 that nothing listens on now.
  static uint16_t FreePort();

 private:
  bool aof_;
  std::string dir_;
  uint16_t port_ = 0;
  pid_t pid_ = -1;
};

}  // namespace keymesh::testing

#endif  // KEYMESH_TESTS_SUPPORT_REDIS_SERVER_H_
