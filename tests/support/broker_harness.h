// Test harness for the broker integration tests: a private directory, the
// real keymesh-broker binary in a child process (its stderr captured in a
// file of that directory, so tests wait for its log lines instead of
// sleeping) and a raw protocol client. Forked workers, pipes and latches
// come from support/process.h.
//
// The capture takes no thread: a test process that forks workers (which run
// library code before any exec) must have no other thread then, or the
// child may inherit a lock held mid-operation (ThreadSanitizer's runtime
// before its 2024 fix took its allocator's lock unguarded, and a forked
// child of a multi-threaded process under it hung now and then).
//
// Every BrokerProcess uses names derived from the test process's pid and a
// counter; its destructor kills a still-running broker, removes the segments
// it recorded and the directory, so nothing is left behind even when a test fails.
#ifndef KEYMESH_TESTS_SUPPORT_BROKER_HARNESS_H_
#define KEYMESH_TESTS_SUPPORT_BROKER_HARNESS_H_

#include <sys/types.h>

#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include <boost/json.hpp>

#include "support/process.h"

namespace keymesh::testing {

class BrokerProcess {
 public:
  BrokerProcess();
  ~BrokerProcess();
  BrokerProcess(const BrokerProcess&) = delete;
  BrokerProcess& operator=(const BrokerProcess&) = delete;

  // Writes the config: socket and state file in the private directory,
  // `pools` is the JSON object of pools, `extra` more top-level fields
  // (",\"allow_uids\":[5]").
  void WriteConfig(const std::string& pools, const std::string& extra = "");
  // Starts the broker and waits for its "event=ready" line (false if it
  // exited or did not get ready within `timeout` seconds).
  bool Start(const std::vector<std::string>& extra_args = {}, double timeout = 10);
  // SIGTERM, then waits; returns the exit code (-1 if killed by a signal).
  int Stop();
  // SIGKILL, then waits.
  void Kill();
  void Signal(int signo);
  // Waits for the broker to exit on its own; its exit code, or nullopt.
  std::optional<int> WaitExit(double timeout);
  // Whether the kernel wrote a core dump when the broker last ended (Stop,
  // Kill, WaitExit).
  bool core_dumped() const noexcept { return core_dumped_; }
  bool running() const noexcept { return pid_ > 0; }
  pid_t pid() const noexcept { return pid_; }
  // Waits until the captured stderr contains `needle` `count` times (false
  // once the broker exited without it, or at `timeout`).
  bool WaitLog(const std::string& needle, double timeout, int count = 1);
  // The broker's stderr since its last Start.
  std::string Log();

  const std::string& dir() const noexcept { return dir_; }
  const std::string& socket() const noexcept { return socket_; }
  const std::string& state_file() const noexcept { return state_file_; }
  const std::string& config_file() const noexcept { return config_file_; }
  // The segment name the broker recorded beside its socket ("" before its
  // first start); every name seen is removed by the destructor.
  std::string segment();
  // Where the broker records it.
  std::string segment_name_file() const { return socket_ + ".segment"; }

 private:
  // Whether the broker process has not exited yet (it is not reaped).
  bool Alive() const;
  // Appends what the broker wrote since the last read to log_ (under mu_).
  void ReadLogLocked();
  void CloseLog();

  std::string dir_, socket_, state_file_, config_file_, log_file_;
  std::vector<std::string> segments_seen_;
  pid_t pid_ = -1;
  bool core_dumped_ = false;
  int log_fd_ = -1;  // the capture, read-only
  std::mutex mu_;
  std::string log_;
};

// A blocking protocol client for tests (one connection, replies in order).
class RawClient {
 public:
  explicit RawClient(const std::string& socket);
  ~RawClient();
  bool connected() const noexcept { return fd_ >= 0; }
  bool SendRaw(const std::string& bytes);
  // One line (without '\n'), or nullopt on EOF, error or timeout.
  std::optional<std::string> ReadLine(double timeout = 5);
  // Sends {"v":1,"op":op,"id":N,...fields} and returns the parsed reply.
  std::optional<boost::json::object> Call(const std::string& op, boost::json::object fields = {}, double timeout = 5);
  // True if the broker closed the connection within `timeout`.
  bool WaitClosed(double timeout);

 private:
  int fd_ = -1;
  int64_t next_id_ = 1;
  std::string in_;
};

}  // namespace keymesh::testing

#endif  // KEYMESH_TESTS_SUPPORT_BROKER_HARNESS_H_
