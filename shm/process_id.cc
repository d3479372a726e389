#include "shm/process_id.h"

#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "common/check.h"

namespace keymesh::shm {
namespace {

// Reads /proc/PID/stat; returns false if the process does not exist.
// Sets *zombie when its state is Z or X.
bool ReadStat(pid_t pid, uint64_t* start_time, bool* zombie) noexcept {
  char path[64];
  std::snprintf(path, sizeof(path), "/proc/%d/stat", static_cast<int>(pid));
  int fd = ::open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  char buf[1024];
  ssize_t n = ::read(fd, buf, sizeof(buf) - 1);
  ::close(fd);
  if (n <= 0) return false;
  buf[n] = '\0';
  // The command name (field 2) may contain spaces and parentheses: skip to
  // the last ')'.
  char* p = std::strrchr(buf, ')');
  if (p == nullptr || p[1] == '\0') return false;
  p += 2;  // now at field 3 (state)
  *zombie = (*p == 'Z' || *p == 'X');
  // Field 22 is starttime: skip 19 more fields after state.
  int field = 3;
  while (*p != '\0' && field < 22) {
    if (*p == ' ') ++field;
    ++p;
  }
  if (field != 22) return false;
  *start_time = std::strtoull(p, nullptr, 10);
  return true;
}

}  // namespace

namespace internal {

// g_self is written once per process by the thread that wins the 0 -> 1
// transition of g_self_state and published by the release store of 2;
// threads racing it wait for that store (a few microseconds, once per
// process), so nobody reads a half-written identity.
ProcessId g_self;
std::atomic<int> g_self_state{0};  // 0: unknown, 1: being computed, 2: valid

namespace {
// Runs in the only thread of a fork child.
void ResetSelfInChild() noexcept { g_self_state.store(0, std::memory_order_relaxed); }
}  // namespace

void ComputeSelf() noexcept {
  static const bool registered = [] {
    pthread_atfork(nullptr, nullptr, &ResetSelfInChild);
    return true;
  }();
  (void)registered;
  int expected = 0;
  if (g_self_state.compare_exchange_strong(expected, 1, std::memory_order_acq_rel)) {
    ProcessId id;
    id.pid = static_cast<uint32_t>(::getpid());
    // The pool lock packs the pid into 22 bits (robust_mutex.h).
    KM_CHECK_MSG(id.pid < (1u << 22), "pid beyond Linux's PID_MAX_LIMIT");
    bool zombie = false;
    if (!ReadStat(static_cast<pid_t>(id.pid), &id.start_time, &zombie)) id.start_time = 0;
    g_self = id;
    g_self_state.store(2, std::memory_order_release);
    return;
  }
  while (g_self_state.load(std::memory_order_acquire) != 2) sched_yield();
}

}  // namespace internal

std::optional<ProcStat> ReadProcStat(pid_t pid) noexcept {
  ProcStat st;
  if (!ReadStat(pid, &st.start_time, &st.zombie)) return std::nullopt;
  return st;
}

std::optional<uint64_t> ReadStartTime(pid_t pid) noexcept {
  uint64_t start = 0;
  bool zombie = false;
  if (!ReadStat(pid, &start, &zombie)) return std::nullopt;
  return start;
}

bool IsAlive(const ProcessId& id) noexcept {
  uint64_t start = 0;
  bool zombie = false;
  if (!ReadStat(static_cast<pid_t>(id.pid), &start, &zombie)) return false;
  return !zombie && start == id.start_time;
}

}  // namespace keymesh::shm
