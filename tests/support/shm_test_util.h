// Helpers shared by the shm test suites: segments and pools made per test,
// pipes and forked children that always end with _exit (a child must never
// return into Boost.Test), and a named-segment guard that removes the segment
// even when the test fails.
#ifndef KEYMESH_TESTS_SUPPORT_SHM_TEST_UTIL_H_
#define KEYMESH_TESTS_SUPPORT_SHM_TEST_UTIL_H_

#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "keymesh/status.h"
#include "keymesh/types.h"
#include "shm/clock.h"
#include "shm/layout.h"
#include "shm/pool.h"
#include "shm/segment.h"

namespace keymesh::shm::testing {

// Aborts the test (or the child) with a message when a Result failed.
template <typename T>
T Must(Result<T> r, const char* what) {
  if (!r.ok()) {
    std::fprintf(stderr, "%s failed: %s\n", what, r.status().ToString().c_str());
    std::abort();
  }
  return std::move(r).value();
}

inline PoolConfig MakeConfig(Strategy strategy, double default_cooldown = 60.0, uint32_t max_failures = 10,
                             double max_cooldown = 600.0, double max_lease = 600.0) {
  PoolConfig c{};
  c.strategy = static_cast<uint32_t>(strategy);
  c.max_failures = max_failures;
  c.default_cooldown = SecondsToNanos(default_cooldown);
  c.acquire_timeout = SecondsToNanos(30.0);
  c.max_lease = SecondsToNanos(max_lease);
  c.max_cooldown = SecondsToNanos(max_cooldown);
  return c;
}

// An anonymous segment with one pool ("p") and keys k0..k{n-1}; the
// PoolAdmin reads `clock`. Shared with children forked afterwards.
struct TestPool {
  std::unique_ptr<Segment> segment;
  uint32_t index = 0;
  std::unique_ptr<PoolAdmin> pool;

  TestPool(uint32_t keys, const PoolConfig& config, const Clock& clock = SystemClock::Instance(),
           Capacities caps = Capacities{1, 64, 256}, uint32_t max_concurrency = 0,
           const std::vector<uint32_t>& weights = {}) {
    segment = Must(Segment::CreateAnonymous(caps), "CreateAnonymous");
    index = Must(segment->CreatePool("p", config.strategy, config), "CreatePool");
    pool = std::make_unique<PoolAdmin>(*segment, index, clock);
    for (uint32_t i = 0; i < keys; ++i) {
      const std::string name = "k" + std::to_string(i);
      KeyDefinition def;
      def.name = name;
      def.fingerprint = 1000 + i;
      def.weight = i < weights.size() ? weights[i] : 1;
      def.max_concurrency = max_concurrency;
      Must(pool->AddKey(def), "AddKey");
    }
  }

  PoolStatus Snap() { return Must(pool->Snapshot(), "Snapshot"); }

  const KeyStatus& Key(const PoolStatus& s, std::string_view name) {
    for (const KeyStatus& k : s.keys) {
      if (k.name == name) return k;
    }
    std::fprintf(stderr, "no key %.*s in snapshot\n", static_cast<int>(name.size()), name.data());
    std::abort();
  }
};

inline std::string KeyName(uint32_t slot) { return "k" + std::to_string(slot); }

// A pipe whose ends close on destruction.
struct Pipe {
  int fds[2] = {-1, -1};
  Pipe() {
    if (::pipe(fds) != 0) std::abort();
  }
  ~Pipe() {
    CloseRead();
    CloseWrite();
  }
  Pipe(const Pipe&) = delete;
  Pipe& operator=(const Pipe&) = delete;
  void CloseRead() {
    if (fds[0] >= 0) ::close(fds[0]);
    fds[0] = -1;
  }
  void CloseWrite() {
    if (fds[1] >= 0) ::close(fds[1]);
    fds[1] = -1;
  }
  // Writes exactly n bytes (retrying on EINTR); false on error.
  bool Write(const void* data, size_t n) {
    const char* p = static_cast<const char*>(data);
    while (n > 0) {
      ssize_t w = ::write(fds[1], p, n);
      if (w < 0 && errno == EINTR) continue;
      if (w <= 0) return false;
      p += w;
      n -= static_cast<size_t>(w);
    }
    return true;
  }
  // Reads exactly n bytes; false on EOF or error (the writer died first).
  bool Read(void* data, size_t n) {
    char* p = static_cast<char*>(data);
    while (n > 0) {
      ssize_t r = ::read(fds[0], p, n);
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0) return false;
      p += r;
      n -= static_cast<size_t>(r);
    }
    return true;
  }
  template <typename T>
  bool Put(const T& v) {
    return Write(&v, sizeof(T));
  }
  template <typename T>
  bool Get(T* v) {
    return Read(v, sizeof(T));
  }
};

// Forks; the child runs fn and _exits with its return value (or 99 if it
// threw). Returns the child's pid to the parent.
inline pid_t ForkChild(const std::function<int()>& fn) {
  std::fflush(nullptr);
  pid_t pid = ::fork();
  if (pid < 0) std::abort();
  if (pid == 0) {
    int rc = 99;
    try {
      rc = fn();
    } catch (...) {
      rc = 99;
    }
    ::_exit(rc);
  }
  return pid;
}

// waitpid; returns the exit status (0..255), or 128+signal when killed.
inline int WaitChild(pid_t pid) {
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0) {
    if (errno != EINTR) return -1;
  }
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return -1;
}

// Kills and reaps a child that is still running (cleanup on a failed test).
struct ChildGuard {
  pid_t pid = -1;
  explicit ChildGuard(pid_t p) : pid(p) {}
  ~ChildGuard() {
    if (pid > 0) {
      ::kill(pid, SIGKILL);
      (void)WaitChild(pid);
    }
  }
  int Wait() {
    int rc = WaitChild(pid);
    pid = -1;
    return rc;
  }
  int KillAndWait() {
    ::kill(pid, SIGKILL);
    return Wait();
  }
};

// Memory shared with forked children (MAP_SHARED | MAP_ANONYMOUS), for
// counters the children report through.
template <typename T>
struct SharedArray {
  T* data = nullptr;
  size_t n = 0;
  explicit SharedArray(size_t count) : n(count) {
    void* p = ::mmap(nullptr, sizeof(T) * count, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) std::abort();
    data = static_cast<T*>(p);
    for (size_t i = 0; i < count; ++i) new (&data[i]) T();
  }
  ~SharedArray() { ::munmap(data, sizeof(T) * n); }
  SharedArray(const SharedArray&) = delete;
  SharedArray& operator=(const SharedArray&) = delete;
  T& operator[](size_t i) { return data[i]; }
};

// CPU time of the calling process in nanoseconds.
inline uint64_t ProcessCpuNanos() {
  timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * kNanosPerSecond + static_cast<uint64_t>(ts.tv_nsec);
}

// A segment name unique to this process and call.
inline std::string UniqueSegmentName(std::string_view tag) {
  static std::atomic<uint32_t> counter{0};
  return "keymesh-test-" + std::string(tag) + "-" + std::to_string(::getpid()) + "-" +
         std::to_string(counter.fetch_add(1));
}

// Removes a named segment when the scope ends, pass or fail.
struct SegmentNameGuard {
  std::string name;
  explicit SegmentNameGuard(std::string n) : name(std::move(n)) {}
  ~SegmentNameGuard() { (void)Segment::Remove(name); }
};

}  // namespace keymesh::shm::testing

#endif  // KEYMESH_TESTS_SUPPORT_SHM_TEST_UTIL_H_
