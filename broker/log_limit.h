// A rate limit for log lines that a peer can trigger at will (refused
// requests, accept failures, rejected connections, unknown liveness): at
// most one line per interval, which reports how many were suppressed since
// the last one, so journald's own rate limit never drops real events
// (KM-25). Not thread-safe: one per event kind, on the io thread.
#ifndef KEYMESH_BROKER_LOG_LIMIT_H_
#define KEYMESH_BROKER_LOG_LIMIT_H_

#include <chrono>
#include <cstdint>

namespace keymesh::broker {

class LogLimiter {
 public:
  explicit LogLimiter(std::chrono::steady_clock::duration interval = std::chrono::seconds(10)) : interval_(interval) {}

  // True when a line may be written now; *suppressed then receives how
  // many were refused since the last one. Counts a refusal otherwise.
  bool Allow(uint64_t* suppressed) {
    const auto now = std::chrono::steady_clock::now();
    if (logged_ && now - last_ < interval_) {
      ++suppressed_;
      return false;
    }
    logged_ = true;
    last_ = now;
    *suppressed = suppressed_;
    suppressed_ = 0;
    return true;
  }

 private:
  std::chrono::steady_clock::duration interval_;
  std::chrono::steady_clock::time_point last_{};
  bool logged_ = false;
  uint64_t suppressed_ = 0;
};

}  // namespace keymesh::broker

#endif  // KEYMESH_BROKER_LOG_LIMIT_H_
