// A faulty network between one broker and redis-server, without touching
// the real network: a TCP forwarder on a free loopback port, run by one
// thread of the test process, whose mode a test changes at any time.
//
//   pass       forwards both ways at once
//   delay(ms)  holds every byte `ms` in each direction before forwarding it
//              (a round trip grows by 2 x ms); order is kept
//   blackhole  a partition: connections are accepted (the kernel completes
//              the handshake) and kept, but nothing is read, forwarded or
//              connected upstream; what was in flight is held, as TCP would
//              retransmit it, and flows on when the mode goes back to pass
//              or delay
//   drop_replies  forwards what the clients send, and reads and discards
//              what the upstream answers (also what was held for the
//              clients): a reply lost on its way back after the server
//              acted on the request, as a timeout or a reset after the
//              request reached the server looks to the client
//   reset      every connection is closed with RST (what was held is
//              dropped) and the listening socket is closed, so new
//              connections are refused (ECONNREFUSED) like a dead server;
//              leaving reset binds the same port again
//
// When the upstream refuses (redis-server killed), an accepted connection
// is closed with RST at once, as a real server's death would look.
//
// SetMode() returns once the proxy's thread applied the mode: a test that
// calls Reset() knows every connection is gone when it returns.
//
// Thread safety: every method may be called from any thread of the process
// that made the proxy (not from forked children). The destructor stops the
// thread and closes every socket, also when a test fails.
#ifndef KEYMESH_TESTS_SUPPORT_FAULT_PROXY_H_
#define KEYMESH_TESTS_SUPPORT_FAULT_PROXY_H_

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <string>
#include <thread>

namespace keymesh::testing {

class FaultProxy {
 public:
  enum class Mode : uint8_t { kPass = 0, kDelay = 1, kBlackhole = 2, kReset = 3, kDropReplies = 4 };

  // Forwards to 127.0.0.1:upstream_port.
  explicit FaultProxy(uint16_t upstream_port);
  ~FaultProxy();
  FaultProxy(const FaultProxy&) = delete;
  FaultProxy& operator=(const FaultProxy&) = delete;

  // Binds a free loopback port and starts the thread, in pass mode (false
  // if the port could not be bound).
  bool Start();

  // Applies a mode (after Start; false before); `delay_ms` only for
  // kDelay. False also when leaving reset could not bind the port again
  // (then the proxy stays in reset).
  bool SetMode(Mode mode, uint32_t delay_ms = 0);
  bool Pass() { return SetMode(Mode::kPass); }
  bool Delay(uint32_t ms) { return SetMode(Mode::kDelay, ms); }
  bool Blackhole() { return SetMode(Mode::kBlackhole); }
  bool Reset() { return SetMode(Mode::kReset); }
  bool DropReplies() { return SetMode(Mode::kDropReplies); }
  Mode mode() const;

  uint16_t port() const noexcept { return port_; }
  // "redis://127.0.0.1:PORT/0", for a broker's mesh config.
  std::string url() const;

  // Connections accepted since Start, and open now.
  uint64_t accepted() const noexcept { return accepted_.load(); }
  uint64_t open_connections() const noexcept { return open_.load(); }
  // Bytes forwarded to the upstream and back to the clients.
  uint64_t bytes_up() const noexcept { return bytes_up_.load(); }
  uint64_t bytes_down() const noexcept { return bytes_down_.load(); }
  // Bytes of the upstream's answers discarded in drop_replies.
  uint64_t bytes_dropped() const noexcept { return bytes_dropped_.load(); }

 private:
  struct Loop;
  void Run();

  uint16_t upstream_port_;
  uint16_t port_ = 0;
  int listen_fd_ = -1;
  int wake_fd_ = -1;  // eventfd: a mode change or the stop
  std::thread thread_;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  Mode mode_ = Mode::kPass;  // the mode asked for (guarded by mu_)
  uint32_t delay_ms_ = 0;
  uint64_t asked_ = 0;    // mode changes asked for
  uint64_t applied_ = 0;  // ... and applied by the thread
  bool rebind_failed_ = false;
  bool stop_ = false;

  std::atomic<uint64_t> accepted_{0};
  std::atomic<uint64_t> open_{0};
  std::atomic<uint64_t> bytes_up_{0};
  std::atomic<uint64_t> bytes_down_{0};
  std::atomic<uint64_t> bytes_dropped_{0};
};

}  // namespace keymesh::testing

#endif  // KEYMESH_TESTS_SUPPORT_FAULT_PROXY_H_
