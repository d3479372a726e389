// The ground truth of the multi-host tests: a mock LLM provider that
// enforces each key's global limit, shared by every process forked after
// it was made (its state lives in MAP_SHARED memory).
//
// Per key, a GCRA at the key's limit for the whole mesh: `rpm` requests per
// minute, `burst` B back to back (tolerance (B - 1) x 60 / rpm s). A call is
// admitted (200) or refused (429) with Retry-After in whole seconds, rounded
// up and at least 1, as providers quantize it (the exact wait is given too).
// A test can also make the next calls of a key refuse (InjectRefusals), to
// start a cooldown on one host at a known time.
//
// Every call is recorded (CLOCK_MONOTONIC, admitted or refused), so a test
// computes what the pools sent in any window. Overspend is measured on what
// was *sent*: the provider's own GCRA never admits more than B + r·W in a
// window W, so over-sending shows up as refusals, and the pools' overspend
// is max over windows W of sent − (B + r·W).
//
// Process and thread safety: Call, InjectRefusals and the counters are
// lock-free atomics on the shared memory, safe from any thread of any
// process forked after construction. Calls() and Overspend() read the log
// and are meant for the parent once the load stopped (a call still being
// recorded is skipped). Only the creating process may destroy it.
#ifndef KEYMESH_TESTS_SUPPORT_MOCK_PROVIDER_H_
#define KEYMESH_TESTS_SUPPORT_MOCK_PROVIDER_H_

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace keymesh::testing {

struct MockKeyLimit {
  std::string name;  // the key's name in the pools (1..63 bytes)
  uint32_t rpm = 0;  // > 0
  // Requests back to back; 0: one second of the rate (rpm / 60, at least
  // 1), as providers that quantize their limits per second allow.
  uint32_t burst = 0;
};

class MockProvider {
 public:
  struct Reply {
    int status = 0;                // 200, 429, or 404 for an unknown key
    uint32_t retry_after = 0;      // 429: whole seconds (>= 1)
    double retry_after_exact = 0;  // 429: seconds until the GCRA admits again
  };
  struct CallRecord {
    uint64_t mono_ns = 0;
    bool admitted = false;
    uint8_t origin = 0;  // the caller's tag (e.g. its host's index)
  };
  static constexpr uint8_t kMaxOrigin = 7;

  // `log_capacity`: calls recorded per key (later ones are counted, not
  // logged). Aborts on a bad limit (a bug in the test).
  explicit MockProvider(const std::vector<MockKeyLimit>& keys, size_t log_capacity = 1u << 17);
  ~MockProvider();
  MockProvider(const MockProvider&) = delete;
  MockProvider& operator=(const MockProvider&) = delete;

  // One request on the key named `key`, at CLOCK_MONOTONIC now, recorded
  // with `origin` (0..kMaxOrigin; larger values are recorded as kMaxOrigin).
  Reply Call(std::string_view key, uint8_t origin = 0);
  // The next `count` calls of `key` are refused with Retry-After `seconds`
  // (without touching the GCRA); returns false for an unknown key. The
  // time of the first such refusal is refusal_injected_ns().
  bool InjectRefusals(std::string_view key, uint32_t count, uint32_t seconds);
  uint64_t refusal_injected_ns(std::string_view key) const;

  size_t key_count() const noexcept { return count_; }
  // -1 when unknown.
  int IndexOf(std::string_view key) const;
  uint64_t admitted(std::string_view key) const;
  uint64_t refused(std::string_view key) const;
  uint64_t total_admitted() const;
  uint64_t total_refused() const;
  // Calls of `key` with from_ns <= time < to_ns: admitted ones, or all
  // sent; `origin` < 0: from every origin.
  uint64_t AdmittedBetween(std::string_view key, uint64_t from_ns, uint64_t to_ns, int origin = -1) const;
  uint64_t SentBetween(std::string_view key, uint64_t from_ns, uint64_t to_ns, int origin = -1) const;

  // The recorded calls of `key`, sorted by time.
  std::vector<CallRecord> Calls(std::string_view key) const;
  // max over windows of length `window` seconds starting at a sent call in
  // [from_ns, to_ns) of (calls sent in the window) − (B + r·window), with r
  // the key's rate per second; 0 when never over. Requests.
  double Overspend(std::string_view key, double window, uint64_t from_ns = 0, uint64_t to_ns = UINT64_MAX) const;
  // The worst overspend over windows of every length (from one sent call
  // to a later one, both in [from_ns, to_ns)); 0 when never over.
  double WorstOverspend(std::string_view key, uint64_t from_ns = 0, uint64_t to_ns = UINT64_MAX) const;

  // The key's limits.
  double rate_per_second(std::string_view key) const;
  uint32_t burst(std::string_view key) const;

 private:
  struct KeyState;
  const KeyState* Find(std::string_view key) const;
  KeyState* Find(std::string_view key);

  void* mem_ = nullptr;
  size_t bytes_ = 0;
  size_t count_ = 0;
  size_t log_capacity_ = 0;
};

// CLOCK_MONOTONIC in ns (the clock the provider records by).
uint64_t MonoNanos();

}  // namespace keymesh::testing

#endif  // KEYMESH_TESTS_SUPPORT_MOCK_PROVIDER_H_
