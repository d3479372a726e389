#include "support/mock_provider.h"

#include <sys/mman.h>
#include <time.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>

namespace keymesh::testing {

uint64_t MonoNanos() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1'000'000'000ull + static_cast<uint64_t>(ts.tv_nsec);
}

// One key's state in the shared memory. Lock-free atomics of 8 bytes or
// less work across processes on one mapping.
struct MockProvider::KeyState {
  char name[64] = {};
  uint32_t rpm = 0;
  uint32_t burst = 1;
  uint64_t interval_ns = 0;
  uint64_t tolerance_ns = 0;
  std::atomic<uint64_t> tat{0};  // the GCRA's theoretical arrival time
  std::atomic<uint64_t> admitted{0};
  std::atomic<uint64_t> refused{0};
  std::atomic<int64_t> inject_left{0};
  std::atomic<uint32_t> inject_seconds{0};
  std::atomic<uint64_t> injected_ns{0};
  std::atomic<uint64_t> log_next{0};
  // Followed (in the log area) by log_capacity words:
  // time << 4 | origin << 1 | admitted, 0 while not yet written (a
  // CLOCK_MONOTONIC of 2^60 ns is 36 years of uptime).
};
static_assert(std::atomic<uint64_t>::is_always_lock_free, "shared across processes: must not hide a lock");

namespace {
// The shared memory: one 256-byte KeyState per key, then each key's log.
constexpr size_t kStateBytes = 256;
size_t LogOffset(size_t keys) { return keys * kStateBytes; }
}  // namespace

MockProvider::MockProvider(const std::vector<MockKeyLimit>& keys, size_t log_capacity)
    : count_(keys.size()), log_capacity_(log_capacity) {
  static_assert(sizeof(KeyState) <= kStateBytes, "each key has kStateBytes before the logs");
  bytes_ = LogOffset(count_) + count_ * log_capacity_ * sizeof(uint64_t);
  mem_ = ::mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (mem_ == MAP_FAILED) std::abort();
  for (size_t i = 0; i < count_; ++i) {
    const MockKeyLimit& k = keys[i];
    if (k.name.empty() || k.name.size() >= 64 || k.rpm == 0) {
      std::fprintf(stderr, "MockProvider: bad limit for key '%s'\n", k.name.c_str());
      std::abort();
    }
    auto* s = new (static_cast<char*>(mem_) + i * kStateBytes) KeyState();
    std::memcpy(s->name, k.name.data(), k.name.size());
    s->rpm = k.rpm;
    s->burst = k.burst != 0 ? k.burst : std::max<uint32_t>(1, k.rpm / 60);
    s->interval_ns = 60'000'000'000ull / k.rpm;
    s->tolerance_ns = (s->burst - 1) * s->interval_ns;
  }
}

MockProvider::~MockProvider() { ::munmap(mem_, bytes_); }

int MockProvider::IndexOf(std::string_view key) const {
  for (size_t i = 0; i < count_; ++i) {
    const auto* s = reinterpret_cast<const KeyState*>(static_cast<const char*>(mem_) + i * kStateBytes);
    if (key == s->name) return static_cast<int>(i);
  }
  return -1;
}

const MockProvider::KeyState* MockProvider::Find(std::string_view key) const {
  const int i = IndexOf(key);
  if (i < 0) return nullptr;
  return reinterpret_cast<const KeyState*>(static_cast<const char*>(mem_) + static_cast<size_t>(i) * kStateBytes);
}

MockProvider::KeyState* MockProvider::Find(std::string_view key) {
  return const_cast<KeyState*>(static_cast<const MockProvider*>(this)->Find(key));
}

MockProvider::Reply MockProvider::Call(std::string_view key, uint8_t origin) {
  Reply reply;
  const int index = IndexOf(key);
  if (index < 0) {
    reply.status = 404;
    return reply;
  }
  KeyState* s = Find(key);
  auto* log = reinterpret_cast<std::atomic<uint64_t>*>(static_cast<char*>(mem_) + LogOffset(count_)) +
              static_cast<size_t>(index) * log_capacity_;
  const uint64_t now = MonoNanos();
  auto record = [&](bool admitted) {
    (admitted ? s->admitted : s->refused).fetch_add(1);
    const uint64_t at = s->log_next.fetch_add(1);
    const uint64_t tag = std::min(origin, kMaxOrigin);
    if (at < log_capacity_) log[at].store(now << 4 | tag << 1 | (admitted ? 1u : 0u), std::memory_order_release);
  };

  int64_t left = s->inject_left.load();
  while (left > 0) {
    if (s->inject_left.compare_exchange_weak(left, left - 1)) {
      uint64_t zero = 0;
      s->injected_ns.compare_exchange_strong(zero, now);
      reply.status = 429;
      reply.retry_after = s->inject_seconds.load();
      reply.retry_after_exact = reply.retry_after;
      record(false);
      return reply;
    }
  }

  uint64_t tat = s->tat.load();
  for (;;) {
    const uint64_t allow_at = tat > s->tolerance_ns ? tat - s->tolerance_ns : 0;
    if (allow_at > now) {
      const uint64_t wait = allow_at - now;
      reply.status = 429;
      reply.retry_after_exact = static_cast<double>(wait) / 1e9;
      reply.retry_after = static_cast<uint32_t>(std::max<uint64_t>(1, (wait + 999'999'999ull) / 1'000'000'000ull));
      record(false);
      return reply;
    }
    const uint64_t next = std::max(tat, now) + s->interval_ns;
    if (s->tat.compare_exchange_weak(tat, next)) break;
  }
  reply.status = 200;
  record(true);
  return reply;
}

bool MockProvider::InjectRefusals(std::string_view key, uint32_t count, uint32_t seconds) {
  KeyState* s = Find(key);
  if (s == nullptr) return false;
  s->injected_ns.store(0);
  s->inject_seconds.store(seconds);
  s->inject_left.store(count);
  return true;
}

uint64_t MockProvider::refusal_injected_ns(std::string_view key) const {
  const KeyState* s = Find(key);
  return s == nullptr ? 0 : s->injected_ns.load();
}

uint64_t MockProvider::admitted(std::string_view key) const {
  const KeyState* s = Find(key);
  return s == nullptr ? 0 : s->admitted.load();
}

uint64_t MockProvider::refused(std::string_view key) const {
  const KeyState* s = Find(key);
  return s == nullptr ? 0 : s->refused.load();
}

uint64_t MockProvider::total_admitted() const {
  uint64_t n = 0;
  for (size_t i = 0; i < count_; ++i) {
    n += reinterpret_cast<const KeyState*>(static_cast<const char*>(mem_) + i * kStateBytes)->admitted.load();
  }
  return n;
}

uint64_t MockProvider::total_refused() const {
  uint64_t n = 0;
  for (size_t i = 0; i < count_; ++i) {
    n += reinterpret_cast<const KeyState*>(static_cast<const char*>(mem_) + i * kStateBytes)->refused.load();
  }
  return n;
}

std::vector<MockProvider::CallRecord> MockProvider::Calls(std::string_view key) const {
  std::vector<CallRecord> out;
  const int index = IndexOf(key);
  if (index < 0) return out;
  const KeyState* s = Find(key);
  const auto* log = reinterpret_cast<const std::atomic<uint64_t>*>(static_cast<const char*>(mem_) + LogOffset(count_)) +
                    static_cast<size_t>(index) * log_capacity_;
  const uint64_t n = std::min<uint64_t>(s->log_next.load(), log_capacity_);
  out.reserve(n);
  for (uint64_t i = 0; i < n; ++i) {
    const uint64_t w = log[i].load(std::memory_order_acquire);
    if (w == 0) continue;
    out.push_back(CallRecord{w >> 4, (w & 1) != 0, static_cast<uint8_t>((w >> 1) & 7)});
  }
  std::sort(out.begin(), out.end(), [](const CallRecord& a, const CallRecord& b) { return a.mono_ns < b.mono_ns; });
  return out;
}

uint64_t MockProvider::AdmittedBetween(std::string_view key, uint64_t from_ns, uint64_t to_ns, int origin) const {
  uint64_t n = 0;
  for (const CallRecord& c : Calls(key)) {
    n += c.admitted && c.mono_ns >= from_ns && c.mono_ns < to_ns && (origin < 0 || c.origin == origin);
  }
  return n;
}

uint64_t MockProvider::SentBetween(std::string_view key, uint64_t from_ns, uint64_t to_ns, int origin) const {
  uint64_t n = 0;
  for (const CallRecord& c : Calls(key)) {
    n += c.mono_ns >= from_ns && c.mono_ns < to_ns && (origin < 0 || c.origin == origin);
  }
  return n;
}

double MockProvider::rate_per_second(std::string_view key) const {
  const KeyState* s = Find(key);
  return s == nullptr ? 0 : s->rpm / 60.0;
}

uint32_t MockProvider::burst(std::string_view key) const {
  const KeyState* s = Find(key);
  return s == nullptr ? 0 : s->burst;
}

double MockProvider::Overspend(std::string_view key, double window, uint64_t from_ns, uint64_t to_ns) const {
  const std::vector<CallRecord> calls = Calls(key);
  const double allowed = burst(key) + rate_per_second(key) * window;
  const auto w = static_cast<uint64_t>(window * 1e9);
  double worst = 0;
  size_t j = 0;
  for (size_t i = 0; i < calls.size(); ++i) {
    if (calls[i].mono_ns < from_ns || calls[i].mono_ns >= to_ns) continue;
    j = std::max(j, i);
    while (j < calls.size() && calls[j].mono_ns < calls[i].mono_ns + w) ++j;
    worst = std::max(worst, static_cast<double>(j - i) - allowed);
  }
  return worst;
}

double MockProvider::WorstOverspend(std::string_view key, uint64_t from_ns, uint64_t to_ns) const {
  // Over every window [t_i, t_j] of sent calls i <= j: (j - i + 1) - B -
  // r (t_j - t_i) = (j + 1 - r t_j) + (r t_i - i) - B, so one pass keeping
  // the best (r t_i - i) so far finds the worst window of any length.
  // Times are taken relative to the first call to keep the doubles exact.
  const std::vector<CallRecord> calls = Calls(key);
  const double r = rate_per_second(key);
  const double b = burst(key);
  double worst = 0;
  double best_start = -1e300;
  bool any = false;
  uint64_t origin = 0;
  size_t n = 0;
  for (const CallRecord& c : calls) {
    if (c.mono_ns < from_ns || c.mono_ns >= to_ns) continue;
    if (!any) origin = c.mono_ns;
    any = true;
    const double t = static_cast<double>(c.mono_ns - origin) / 1e9;
    const double i = static_cast<double>(n++);
    best_start = std::max(best_start, r * t - i);
    worst = std::max(worst, (i + 1 - r * t) + best_start - b);
  }
  return worst;
}

}  // namespace keymesh::testing
