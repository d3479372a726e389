// Sleeping on a 32-bit word in shared memory (Linux futex, not the PRIVATE
// variant, so waiters and wakers may be different processes).
#ifndef KEYMESH_SHM_FUTEX_H_
#define KEYMESH_SHM_FUTEX_H_

#include <atomic>
#include <cstdint>

namespace keymesh::shm {

// Sleeps while *word == expected, at most `timeout_nanos` (UINT64_MAX: no
// limit). Returns early on a wake, a signal, or when *word != expected.
// Spurious returns are allowed; callers re-check their condition.
void FutexWait(std::atomic<uint32_t>* word, uint32_t expected, uint64_t timeout_nanos) noexcept;

// Wakes every sleeper on `word`.
void FutexWakeAll(std::atomic<uint32_t>* word) noexcept;

}  // namespace keymesh::shm

#endif  // KEYMESH_SHM_FUTEX_H_
