#include "support/broker_harness.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "broker/recovery.h"
#include "shm/segment.h"

namespace keymesh::testing {
namespace {
std::atomic<int> g_counter{0};
}

BrokerProcess::BrokerProcess() {
  dir_ = "/tmp/kmb-" + std::to_string(::getpid()) + "-" + std::to_string(g_counter.fetch_add(1));
  std::filesystem::remove_all(dir_);
  std::filesystem::create_directories(dir_);
  socket_ = dir_ + "/km.sock";
  state_file_ = dir_ + "/state.json";
  config_file_ = dir_ + "/config.json";
  segment_ = broker::SegmentNameFor(socket_);
}

BrokerProcess::~BrokerProcess() {
  if (pid_ > 0) Kill();
  JoinReader();
  (void)shm::Segment::Remove(segment_);
  std::error_code ec;
  std::filesystem::remove_all(dir_, ec);
}

void BrokerProcess::WriteConfig(const std::string& pools, const std::string& extra) {
  std::ofstream out(config_file_ + ".tmp");
  out << "{\"socket\":\"" << socket_ << "\",\"state_file\":\"" << state_file_ << "\"" << extra << ",\"pools\":" << pools
      << "}\n";
  out.close();
  std::filesystem::rename(config_file_ + ".tmp", config_file_);
}

bool BrokerProcess::Start(const std::vector<std::string>& extra_args, double timeout) {
  JoinReader();
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0) return false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    log_.clear();
  }
  std::vector<std::string> args = {KEYMESH_BROKER_BIN, "--config", config_file_};
  args.insert(args.end(), extra_args.begin(), extra_args.end());
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::dup2(fds[1], STDERR_FILENO);
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    ::execv(argv[0], argv.data());
    _exit(127);
  }
  ::close(fds[1]);
  pid_ = pid;
  log_fd_ = fds[0];
  const int fd = log_fd_;
  reader_ = std::thread([this, fd] {
    char buf[4096];
    for (;;) {
      const ssize_t n = ::read(fd, buf, sizeof(buf));
      if (n < 0 && errno == EINTR) continue;
      std::lock_guard<std::mutex> lock(mu_);
      if (n <= 0) {
        log_ += "\n<eof>\n";
        cv_.notify_all();
        return;
      }
      log_.append(buf, static_cast<size_t>(n));
      cv_.notify_all();
    }
  });
  return WaitLog("event=ready", timeout);
}

void BrokerProcess::JoinReader() {
  if (reader_.joinable()) reader_.join();
  if (log_fd_ >= 0) ::close(log_fd_);
  log_fd_ = -1;
}

bool BrokerProcess::WaitLog(const std::string& needle, double timeout, int count) {
  std::unique_lock<std::mutex> lock(mu_);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout);
  auto found = [&] {
    int n = 0;
    for (size_t pos = log_.find(needle); pos != std::string::npos; pos = log_.find(needle, pos + 1)) ++n;
    return n >= count;
  };
  while (!found()) {
    if (log_.find("<eof>") != std::string::npos) return found();
    if (cv_.wait_until(lock, deadline) == std::cv_status::timeout) return found();
  }
  return true;
}

std::string BrokerProcess::Log() {
  std::lock_guard<std::mutex> lock(mu_);
  return log_;
}

void BrokerProcess::Signal(int signo) {
  if (pid_ > 0) ::kill(pid_, signo);
}

int BrokerProcess::Stop() {
  if (pid_ <= 0) return -1;
  ::kill(pid_, SIGTERM);
  const int code = WaitChild(pid_, &core_dumped_);
  pid_ = -1;
  JoinReader();
  return code;
}

void BrokerProcess::Kill() {
  if (pid_ <= 0) return;
  ::kill(pid_, SIGKILL);
  WaitChild(pid_, &core_dumped_);
  pid_ = -1;
  JoinReader();
}

std::optional<int> BrokerProcess::WaitExit(double timeout) {
  if (pid_ <= 0) return std::nullopt;
  if (!WaitLog("<eof>", timeout)) return std::nullopt;
  const int code = WaitChild(pid_, &core_dumped_);
  pid_ = -1;
  JoinReader();
  return code;
}

RawClient::RawClient(const std::string& socket) {
  fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, socket.c_str(), sizeof(addr.sun_path) - 1);
  if (::connect(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    ::close(fd_);
    fd_ = -1;
  }
}

RawClient::~RawClient() {
  if (fd_ >= 0) ::close(fd_);
}

bool RawClient::SendRaw(const std::string& bytes) {
  size_t off = 0;
  while (off < bytes.size()) {
    const ssize_t n = ::send(fd_, bytes.data() + off, bytes.size() - off, MSG_NOSIGNAL);
    if (n <= 0) return false;
    off += static_cast<size_t>(n);
  }
  return true;
}

std::optional<std::string> RawClient::ReadLine(double timeout) {
  const double deadline = NowSeconds() + timeout;
  for (;;) {
    const size_t nl = in_.find('\n');
    if (nl != std::string::npos) {
      std::string line = in_.substr(0, nl);
      in_.erase(0, nl + 1);
      return line;
    }
    const double left = deadline - NowSeconds();
    if (left <= 0) return std::nullopt;
    pollfd p{fd_, POLLIN, 0};
    if (::poll(&p, 1, static_cast<int>(left * 1000) + 1) <= 0) continue;
    char buf[65536];
    const ssize_t n = ::recv(fd_, buf, sizeof(buf), 0);
    if (n <= 0) return std::nullopt;
    in_.append(buf, static_cast<size_t>(n));
  }
}

std::optional<boost::json::object> RawClient::Call(const std::string& op, boost::json::object fields, double timeout) {
  fields["v"] = 1;
  fields["op"] = op;
  fields["id"] = next_id_++;
  if (!SendRaw(boost::json::serialize(fields) + "\n")) return std::nullopt;
  std::optional<std::string> line = ReadLine(timeout);
  if (!line) return std::nullopt;
  boost::system::error_code ec;
  boost::json::value v = boost::json::parse(*line, ec);
  if (ec || !v.is_object()) return std::nullopt;
  return v.as_object();
}

bool RawClient::WaitClosed(double timeout) {
  const double deadline = NowSeconds() + timeout;
  for (;;) {
    const double left = deadline - NowSeconds();
    if (left <= 0) return false;
    pollfd p{fd_, POLLIN, 0};
    if (::poll(&p, 1, static_cast<int>(left * 1000) + 1) <= 0) continue;
    char buf[65536];
    const ssize_t n = ::recv(fd_, buf, sizeof(buf), 0);
    if (n <= 0) return true;
  }
}

}  // namespace keymesh::testing
