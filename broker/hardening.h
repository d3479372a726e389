// Keeping the broker's secrets out of core dumps and out of other
// processes' reach (KM-16, docs/SECURITY.md). The broker holds every key's
// secret in memory; a crash that any segment writer could provoke must not
// write them to disk, and no process of the same uid may read its memory.
#ifndef KEYMESH_BROKER_HARDENING_H_
#define KEYMESH_BROKER_HARDENING_H_

#include <sys/types.h>

#include <string>
#include <string_view>
#include <vector>

#include "keymesh/status.h"

namespace keymesh::broker {

// Marks the process not dumpable (PR_SET_DUMPABLE 0: no core dump, no
// ptrace or /proc/PID/mem access by the same uid, /proc/PID owned by root)
// and sets RLIMIT_CORE to 0 (also covers a later setuid-style re-enable).
// kInternal naming the failed call; the broker refuses to start then.
Status ProtectProcessMemory();

// Overwrites a buffer that held a secret before it is freed or reused
// (explicit_bzero: the compiler may not drop it).
void WipeSecret(std::string& s) noexcept;

// KM-15: the broker tells live workers from dead ones through /proc. With
// /proc mounted hidepid=1/2 (noaccess/invisible/ptraceable) it cannot see
// other users' processes unless it is in the mount's gid= group (or root):
// it would then see every worker's liveness as unknown (kept, never
// reclaimed) and refuse their hello. `mountinfo` is /proc/self/mountinfo's
// text; `euid` and `groups` (primary and supplementary) are the broker's.
// kOk when /proc lets it see everyone, kPermissionDenied saying what to
// change otherwise.
Status CheckProcVisibility(std::string_view mountinfo, uid_t euid, const std::vector<gid_t>& groups);
// The same for this process (reads /proc/self/mountinfo; kOk when it cannot
// be read: nothing to go by).
Status CheckProcVisibility();

}  // namespace keymesh::broker

#endif  // KEYMESH_BROKER_HARDENING_H_
