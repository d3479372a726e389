#include "shm/process_id.h"

#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "common/check.h"

namespace keymesh::shm {
namespace {

// Reads /proc/PID/stat; returns false if it cannot (*err: the errno of
// the failed open or read, ENOENT for no such file, EINVAL for a file that
// does not parse). Sets *zombie when its state is Z or X.
bool ReadStat(pid_t pid, uint64_t* start_time, bool* zombie, int* err) noexcept {
  *err = EINVAL;
  char path[64];
  std::snprintf(path, sizeof(path), "/proc/%d/stat", static_cast<int>(pid));
  int fd = ::open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    *err = errno;
    return false;
  }
  char buf[1024];
  ssize_t n = ::read(fd, buf, sizeof(buf) - 1);
  if (n < 0) *err = errno;
  if (n == 0) *err = ENOENT;  // the process was reaped between open and read
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
    int err = 0;
    if (!ReadStat(static_cast<pid_t>(id.pid), &id.start_time, &zombie, &err)) id.start_time = 0;
    g_self = id;
    g_self_state.store(2, std::memory_order_release);
    return;
  }
  while (g_self_state.load(std::memory_order_acquire) != 2) sched_yield();
}

}  // namespace internal

std::optional<ProcStat> ReadProcStat(pid_t pid) noexcept {
  ProcStat st;
  int err = 0;
  if (!ReadStat(pid, &st.start_time, &st.zombie, &err)) return std::nullopt;
  return st;
}

std::optional<uint64_t> ReadStartTime(pid_t pid) noexcept {
  uint64_t start = 0;
  bool zombie = false;
  int err = 0;
  if (!ReadStat(pid, &start, &zombie, &err)) return std::nullopt;
  return start;
}

Liveness ClassifyLiveness(const LivenessProbe& probe, uint64_t start_time) noexcept {
  if (probe.stat) {
    if (probe.stat->zombie || probe.stat->start_time != start_time) return Liveness::kDead;
    return Liveness::kAlive;
  }
  // /proc could not tell. Only the kernel's "no such process" is death:
  // ENOENT alone is also what hidepid=2 answers for another user's process.
  if (probe.kill_errno == ESRCH) return Liveness::kDead;
  return Liveness::kUnknown;  // EACCES, EMFILE, ENFILE, ENOMEM, hidden, a parse failure
}

Liveness CheckLiveness(const ProcessId& id) noexcept {
  if (id.pid == 0 || id.pid > static_cast<uint32_t>(INT32_MAX)) return Liveness::kDead;  // names no process
  const pid_t pid = static_cast<pid_t>(id.pid);
  LivenessProbe probe;
  ProcStat st;
  if (ReadStat(pid, &st.start_time, &st.zombie, &probe.stat_errno)) {
    probe.stat = st;
  } else {
    // kill(pid, 0) needs no descriptor and is not hidden by hidepid: ESRCH
    // means the pid names no process (EPERM: one of another user).
    probe.kill_errno = ::kill(pid, 0) == 0 ? 0 : errno;
  }
  return ClassifyLiveness(probe, id.start_time);
}

bool IsAlive(const ProcessId& id) noexcept { return CheckLiveness(id) != Liveness::kDead; }

}  // namespace keymesh::shm
