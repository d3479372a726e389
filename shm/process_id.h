// Identity of a process that survives pid reuse: pid plus its start time
// (field 22 of /proc/PID/stat, clock ticks since boot). Lease records name
// their holder this way, so a recycled pid is never mistaken for the holder.
#ifndef KEYMESH_SHM_PROCESS_ID_H_
#define KEYMESH_SHM_PROCESS_ID_H_

#include <sys/types.h>

#include <atomic>
#include <cstdint>
#include <optional>

namespace keymesh::shm {

struct ProcessId {
  uint32_t pid = 0;
  uint64_t start_time = 0;
  friend bool operator==(const ProcessId&, const ProcessId&) = default;
};

namespace internal {
// The cached identity (see Self()): g_self is valid while g_self_state is 2.
extern ProcessId g_self;
extern std::atomic<int> g_self_state;
void ComputeSelf() noexcept;
}  // namespace internal

// The calling process's identity. Cached: computed once per process and
// recomputed in a fork child (pthread_atfork), so the fast path makes no
// system call (one acquire load). Async-signal-unsafe.
inline const ProcessId& Self() noexcept {
  if (internal::g_self_state.load(std::memory_order_acquire) != 2) [[unlikely]]
    internal::ComputeSelf();
  return internal::g_self;
}

// What /proc/PID/stat says of a process: its start time and whether it is a
// zombie (state Z or X: it ended, its parent has not reaped it yet). nullopt
// when the file cannot be read (no such process, or /proc hides it).
struct ProcStat {
  uint64_t start_time = 0;
  bool zombie = false;
};
std::optional<ProcStat> ReadProcStat(pid_t pid) noexcept;

// Start time of `pid`, or nullopt if no such process exists now.
std::optional<uint64_t> ReadStartTime(pid_t pid) noexcept;

// Whether a process still runs. kDead only on the kernel's word: its
// /proc/PID/stat shows another start time (the pid was reused) or a zombie
// (it ended; it holds nothing any more), or kill(pid, 0) says ESRCH.
// Everything else that keeps us from knowing (EACCES, EMFILE, ENFILE,
// ENOMEM, /proc mounted hidepid=2, which answers ENOENT for another user's
// process) is kUnknown: the caller retries later and never reclaims on it.
enum class Liveness { kAlive, kDead, kUnknown };

// What CheckLiveness saw, for ClassifyLiveness (a seam for tests).
struct LivenessProbe {
  std::optional<ProcStat> stat;  // /proc/PID/stat, when it could be read
  int stat_errno = 0;            // why not (informational)
  int kill_errno = 0;            // kill(pid, 0)'s errno when stat is unset; 0: it succeeded
};
Liveness ClassifyLiveness(const LivenessProbe& probe, uint64_t start_time) noexcept;

// Probes the process named by `id` (one open of /proc, and a kill(pid, 0)
// when that fails; no descriptor is kept).
Liveness CheckLiveness(const ProcessId& id) noexcept;

// True unless the process named by `id` is known dead (CheckLiveness is
// kDead). kUnknown counts as alive: a lease is never reclaimed on a guess.
bool IsAlive(const ProcessId& id) noexcept;

}  // namespace keymesh::shm

#endif  // KEYMESH_SHM_PROCESS_ID_H_
