// Identity of a process that survives pid reuse: pid plus its start time
// (field 22 of /proc/PID/stat, clock ticks since boot). Lease records name
// their holder this way, so a recycled pid is never mistaken for the holder.
#ifndef KEYMESH_SHM_PROCESS_ID_H_
#define KEYMESH_SHM_PROCESS_ID_H_

#include <sys/types.h>

#include <cstdint>
#include <optional>

namespace keymesh::shm {

struct ProcessId {
  uint32_t pid = 0;
  uint64_t start_time = 0;
  friend bool operator==(const ProcessId&, const ProcessId&) = default;
};

// The calling process's identity. Cached: computed once per process and
// recomputed in a fork child (pthread_atfork), so the fast path makes no
// system call. Async-signal-unsafe.
const ProcessId& Self() noexcept;

// Start time of `pid`, or nullopt if no such process exists now.
std::optional<uint64_t> ReadStartTime(pid_t pid) noexcept;

// True if the process named by `id` is still running (same pid, same start
// time). Zombies count as dead: they hold nothing any more.
bool IsAlive(const ProcessId& id) noexcept;

}  // namespace keymesh::shm

#endif  // KEYMESH_SHM_PROCESS_ID_H_
