#include "support/redis_server.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <stdexcept>
#include <thread>

#include "support/process.h"

namespace keymesh::testing {
namespace {

std::string MakeDir() {
  std::string tmpl = (std::filesystem::temp_directory_path() / "keymesh-redis-XXXXXX").string();
  if (mkdtemp(tmpl.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
  return tmpl;
}

}  // namespace

RedisServer::RedisServer(bool aof) : aof_(aof), dir_(MakeDir()) {}

RedisServer::~RedisServer() {
  Kill();
  std::error_code ec;
  std::filesystem::remove_all(dir_, ec);
}

uint16_t RedisServer::FreePort() {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) throw std::runtime_error("socket failed");
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  socklen_t len = sizeof(addr);
  if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    close(fd);
    throw std::runtime_error("bind to a free port failed");
  }
  close(fd);
  return ntohs(addr.sin_port);
}

std::string RedisServer::url() const { return "redis://127.0.0.1:" + std::to_string(port_) + "/0"; }

bool RedisServer::Start(double timeout) {
  if (pid_ > 0) return true;
  if (port_ == 0) port_ = FreePort();
  std::vector<std::string> args = {
      "redis-server", "--port",    std::to_string(port_), "--bind",      "127.0.0.1", "--save",           "",  "--dir",
      dir_,           "--logfile", dir_ + "/redis.log",   "--daemonize", "no",        "--protected-mode", "no"};
  if (aof_) {
    args.insert(args.end(), {"--appendonly", "yes", "--appendfsync", "always"});
  } else {
    args.insert(args.end(), {"--appendonly", "no"});
  }
  const pid_t pid = SpawnProgram(args);
  if (pid < 0) return false;
  pid_ = pid;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout);
  while (std::chrono::steady_clock::now() < deadline) {
    int status = 0;
    if (waitpid(pid_, &status, WNOHANG) == pid_) {
      pid_ = -1;
      return false;
    }
    if (Ping()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));  // polls a condition (PONG), not a settle
  }
  return false;
}

void RedisServer::Kill() {
  if (pid_ <= 0) return;
  kill(pid_, SIGCONT);
  kill(pid_, SIGKILL);
  int status = 0;
  while (waitpid(pid_, &status, 0) < 0 && errno == EINTR) {
  }
  pid_ = -1;
}

bool RedisServer::Restart(bool wipe, double timeout) {
  Kill();
  if (wipe) {
    std::error_code ec;
    for (const auto& entry : std::filesystem::directory_iterator(dir_, ec)) {
      if (entry.path().filename() != "redis.log") std::filesystem::remove_all(entry.path(), ec);
    }
  }
  return Start(timeout);
}

void RedisServer::Pause() {
  if (pid_ > 0) kill(pid_, SIGSTOP);
}
void RedisServer::Resume() {
  if (pid_ > 0) kill(pid_, SIGCONT);
}

std::string RedisServer::Cli(const std::vector<std::string>& args, bool* ok) const {
  int fds[2];
  if (pipe2(fds, O_CLOEXEC) != 0) {
    if (ok) *ok = false;
    return "";
  }
  std::vector<std::string> all = {"redis-cli", "-h", "127.0.0.1", "-p", std::to_string(port_)};
  all.insert(all.end(), args.begin(), args.end());
  const pid_t pid = SpawnProgram(all, fds[1]);
  close(fds[1]);
  std::string out;
  char buf[4096];
  for (;;) {
    const ssize_t n = read(fds[0], buf, sizeof(buf));
    if (n > 0) {
      out.append(buf, static_cast<size_t>(n));
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    break;
  }
  close(fds[0]);
  const int rc = pid > 0 ? WaitChild(pid) : -1;
  if (ok) *ok = rc == 0;
  while (!out.empty() && (out.back() == '\n' || out.back() == '\r')) out.pop_back();
  return out;
}

bool RedisServer::Ping() const {
  if (port_ == 0) return false;
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return false;
  timeval tv{0, 200000};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(port_);
  bool ok = false;
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0) {
    const char ping[] = "PING\r\n";
    char reply[16] = {};
    if (write(fd, ping, sizeof(ping) - 1) == static_cast<ssize_t>(sizeof(ping) - 1)) {
      const ssize_t n = read(fd, reply, sizeof(reply) - 1);
      ok = n >= 5 && std::string(reply, 5) == "+PONG";
    }
  }
  close(fd);
  return ok;
}

}  // namespace keymesh::testing
