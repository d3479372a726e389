#include "broker/segment_access.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "common/text.h"

namespace keymesh::broker {
namespace {

// linux/posix_acl_xattr.h: a little-endian header {u32 version = 2} and
// entries {u16 tag, u16 perm, u32 id}, sorted by tag then id.
constexpr uint32_t kAclVersion = 2;
constexpr uint16_t kUserObj = 0x01, kUser = 0x02, kGroupObj = 0x04, kGroup = 0x08, kMask = 0x10, kOther = 0x20;
constexpr uint16_t kReadWrite = 0x04 | 0x02;
constexpr uint32_t kUndefinedId = 0xffffffffu;

void PutLe(std::string* out, uint64_t v, int bytes) {
  for (int i = 0; i < bytes; ++i) out->push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}

void Entry(std::string* out, uint16_t tag, uint16_t perm, uint32_t id) {
  PutLe(out, tag, 2);
  PutLe(out, perm, 2);
  PutLe(out, id, 4);
}

std::vector<uint32_t> Sorted(std::vector<uint32_t> ids) {
  std::sort(ids.begin(), ids.end());
  ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
  return ids;
}

}  // namespace

std::string WorkerAcl(const std::vector<uint32_t>& uids, const std::vector<uint32_t>& gids) {
  std::string acl;
  PutLe(&acl, kAclVersion, 4);
  Entry(&acl, kUserObj, kReadWrite, kUndefinedId);
  for (uint32_t uid : Sorted(uids)) Entry(&acl, kUser, kReadWrite, uid);
  Entry(&acl, kGroupObj, 0, kUndefinedId);
  for (uint32_t gid : Sorted(gids)) Entry(&acl, kGroup, kReadWrite, gid);
  // The mask bounds every named entry and the owning group's; it shows as
  // the file's group mode bits (rw- when anyone is named, --- otherwise).
  Entry(&acl, kMask, uids.empty() && gids.empty() ? 0 : kReadWrite, kUndefinedId);
  Entry(&acl, kOther, 0, kUndefinedId);
  return acl;
}

Status GrantSegmentAccess(const std::string& segment_name, const std::vector<uint32_t>& uids,
                          const std::vector<uint32_t>& gids) {
  const std::string path = "/dev/shm/" + segment_name;
  const int fd = ::open(path.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) return Status(Code::kIoError, "cannot open segment " + Quoted(path) + ": " + std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || st.st_uid != ::geteuid()) {
    ::close(fd);
    return Status(Code::kPermissionDenied, "refusing to set access on segment " + Quoted(path) +
                                               ": it is not a regular file owned by uid " +
                                               std::to_string(::geteuid()));
  }
  const std::string acl = WorkerAcl(uids, gids);
  const int rc = ::fsetxattr(fd, "system.posix_acl_access", acl.data(), acl.size(), 0);
  const int err = errno;
  ::close(fd);
  if (rc != 0) {
    return Status(Code::kIoError, "cannot set the workers' access list on segment " + Quoted(path) + ": " +
                                      std::strerror(err) +
                                      (err == EOPNOTSUPP ? " (the file system of /dev/shm has no POSIX ACLs)" : ""));
  }
  return Status::Ok();
}

Status GrantWorkerAccess(const std::string& segment_name, const BrokerConfig& config) {
  auto all = [](std::initializer_list<const std::vector<uint32_t>*> lists) {
    std::vector<uint32_t> out;
    for (const std::vector<uint32_t>* l : lists) out.insert(out.end(), l->begin(), l->end());
    return out;  // WorkerAcl sorts and folds duplicates
  };
  return GrantSegmentAccess(segment_name, all({&config.worker_uids, &config.allow_uids, &config.admin_uids}),
                            all({&config.worker_gids, &config.allow_gids, &config.admin_gids}));
}

}  // namespace keymesh::broker
