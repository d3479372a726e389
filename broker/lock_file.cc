#include "broker/lock_file.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "broker/atomic_file.h"
#include "common/text.h"

namespace keymesh::broker {

LockFile::~LockFile() {
  if (fd_ >= 0) ::close(fd_);
}

Result<std::unique_ptr<LockFile>> LockFile::Acquire(const std::string& path) {
  if (Status st = CheckParentDirectory(path); !st.ok()) return st;
  // O_NOFOLLOW: a link planted at the name is refused (ELOOP), never
  // followed and truncated.
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0600);
  if (fd < 0) return Status(Code::kIoError, "cannot open lock file " + Escaped(path) + ": " + std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || st.st_uid != ::geteuid()) {
    const bool stat_ok = S_ISREG(st.st_mode);
    ::close(fd);
    return Status(Code::kPermissionDenied,
                  "refusing lock file " + Escaped(path) + ": " +
                      (stat_ok ? "it belongs to uid " + std::to_string(st.st_uid) + ", not to this process (uid " +
                                     std::to_string(::geteuid()) + ")"
                               : std::string("not a regular file")));
  }
  if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
    const int err = errno;
    char buf[32] = {0};
    ssize_t n = ::pread(fd, buf, sizeof(buf) - 1, 0);
    ::close(fd);
    if (err == EWOULDBLOCK) {
      std::string holder = n > 0 ? std::string(buf, static_cast<size_t>(n)) : std::string("?");
      while (!holder.empty() && (holder.back() == '\n' || holder.back() == ' ')) holder.pop_back();
      return Status(Code::kAlreadyExists, "another keymesh-broker (pid " + Escaped(holder) +
                                              ") already serves this config (lock " + Escaped(path) + ")");
    }
    return Status(Code::kIoError, "cannot lock " + Escaped(path) + ": " + std::strerror(err));
  }
  const std::string pid = std::to_string(::getpid()) + "\n";
  if (::ftruncate(fd, 0) != 0 || ::pwrite(fd, pid.data(), pid.size(), 0) != static_cast<ssize_t>(pid.size())) {
    // The pid is informational only; the lock is what matters.
  }
  return std::unique_ptr<LockFile>(new LockFile(fd, path));
}

}  // namespace keymesh::broker
