// Who may map the segment: exactly the peers that may act as workers
// (ARCHITECTURE.md invariant 9, docs/SECURITY.md).
//
// The segment is a file in /dev/shm owned by the broker's uid. Its mode
// bits alone could only name one group; so the broker sets the file's POSIX
// access ACL (tmpfs supports them) to: the owner rw, one rw entry per worker
// uid and per worker gid (supplementary groups count, as for SO_PEERGROUPS
// on the socket), no access for the owning group as such or anyone else.
// Root bypasses it, as it bypasses every file mode. The ACL is set at start
// (also on a re-attached segment, whose ACL an older broker or an operator
// may have left different) and after every reload, so removing a worker
// from the config stops it opening the segment (a mapping it already has
// stays until it exits: the kernel checks access at open time only).
#ifndef KEYMESH_BROKER_SEGMENT_ACCESS_H_
#define KEYMESH_BROKER_SEGMENT_ACCESS_H_

#include <cstdint>
#include <string>
#include <vector>

#include "broker/config.h"
#include "keymesh/status.h"

namespace keymesh::broker {

// The binary value of a system.posix_acl_access xattr granting rw to the
// owner, to each uid in `uids` and each gid in `gids` (duplicates folded),
// and nothing to the owning group or others.
std::string WorkerAcl(const std::vector<uint32_t>& uids, const std::vector<uint32_t>& gids);

// Sets WorkerAcl on the segment file /dev/shm/`segment_name` (never through
// a link; the file must be owned by this process's uid). kIoError naming the
// file and the step (kPermissionDenied when another uid owns it); on a file
// system without ACL support the message says so.
Status GrantSegmentAccess(const std::string& segment_name, const std::vector<uint32_t>& uids,
                          const std::vector<uint32_t>& gids);

// GrantSegmentAccess for everyone `config` lets act as a worker: the
// worker lists, and the secret readers and admins (who are workers too).
Status GrantWorkerAccess(const std::string& segment_name, const BrokerConfig& config);

}  // namespace keymesh::broker

#endif  // KEYMESH_BROKER_SEGMENT_ACCESS_H_
