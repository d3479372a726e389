#include "support/broker_harness.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <thread>

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
  log_file_ = dir_ + "/broker.stderr";
}

std::string BrokerProcess::segment() {
  std::ifstream in(segment_name_file());
  std::string name;
  std::getline(in, name);
  if (!name.empty() && std::find(segments_seen_.begin(), segments_seen_.end(), name) == segments_seen_.end()) {
    segments_seen_.push_back(name);
  }
  return name;
}

BrokerProcess::~BrokerProcess() {
  if (pid_ > 0) Kill();
  CloseLog();
  (void)segment();
  for (const std::string& name : segments_seen_) (void)shm::Segment::Remove(name);
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
  CloseLog();
  {
    std::lock_guard<std::mutex> lock(mu_);
    log_.clear();
  }
  // Truncated here, before the fork: a read must never see the last run's.
  const int out = ::open(log_file_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_APPEND | O_CLOEXEC, 0600);
  if (out < 0) return false;
  log_fd_ = ::open(log_file_.c_str(), O_RDONLY | O_CLOEXEC);
  if (log_fd_ < 0) {
    ::close(out);
    return false;
  }
  std::vector<std::string> args = {KEYMESH_BROKER_BIN, "--config", config_file_};
  args.insert(args.end(), extra_args.begin(), extra_args.end());
  const pid_t pid = SpawnProgram(args, -1, out);
  ::close(out);
  if (pid < 0) return false;
  pid_ = pid;
  return WaitLog("event=ready", timeout);
}

void BrokerProcess::CloseLog() {
  if (log_fd_ >= 0) ::close(log_fd_);
  log_fd_ = -1;
}

bool BrokerProcess::Alive() const {
  if (pid_ <= 0) return false;
  siginfo_t info{};
  if (::waitid(P_PID, static_cast<id_t>(pid_), &info, WEXITED | WNOHANG | WNOWAIT) != 0) return false;
  return info.si_pid == 0;
}

void BrokerProcess::ReadLogLocked() {
  if (log_fd_ < 0) return;
  char buf[8192];
  for (;;) {
    const ssize_t n = ::read(log_fd_, buf, sizeof(buf));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;
    log_.append(buf, static_cast<size_t>(n));
  }
}

bool BrokerProcess::WaitLog(const std::string& needle, double timeout, int count) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout);
  auto found = [&] {
    int n = 0;
    for (size_t pos = log_.find(needle); pos != std::string::npos; pos = log_.find(needle, pos + 1)) ++n;
    return n >= count;
  };
  for (;;) {
    // Asked before the read: a broker that exited wrote everything by then.
    const bool gone = !Alive();
    {
      std::lock_guard<std::mutex> lock(mu_);
      ReadLogLocked();
      if (found()) return true;
    }
    if (gone || std::chrono::steady_clock::now() >= deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));  // the file has no wake-up; a poll
  }
}

std::string BrokerProcess::Log() {
  std::lock_guard<std::mutex> lock(mu_);
  ReadLogLocked();
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
  return code;
}

void BrokerProcess::Kill() {
  if (pid_ <= 0) return;
  ::kill(pid_, SIGKILL);
  WaitChild(pid_, &core_dumped_);
  pid_ = -1;
}

std::optional<int> BrokerProcess::WaitExit(double timeout) {
  if (pid_ <= 0) return std::nullopt;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout);
  while (Alive()) {
    if (std::chrono::steady_clock::now() >= deadline) return std::nullopt;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));  // waitpid has no timeout; a poll
  }
  const int code = WaitChild(pid_, &core_dumped_);
  pid_ = -1;
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
