#include "broker/atomic_file.h"

#include <fcntl.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

#include "common/text.h"
#include "shm/clock.h"

namespace keymesh::broker {
namespace {

Status IoError(const std::string& what, const std::string& path, int err) {
  return Status(Code::kIoError, "cannot " + what + " " + Escaped(path) + ": " + std::strerror(err));
}

std::string DirectoryOf(const std::string& path) {
  const size_t slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : path.substr(0, slash);
}

// A temp name nobody can guess: the pid and 64 random bits.
std::string TempNameFor(const std::string& path) {
  uint64_t r = 0;
  if (::getrandom(&r, sizeof(r), 0) != static_cast<ssize_t>(sizeof(r))) {
    // No entropy source: O_EXCL below still refuses any file planted at
    // the name, so a predictable suffix only risks a clear failure.
    r = shm::MonotonicNowNanos();
  }
  char suffix[32];
  std::snprintf(suffix, sizeof(suffix), "%016llx", static_cast<unsigned long long>(r));
  return path + ".tmp." + std::to_string(::getpid()) + "." + suffix;
}

Status SyncDirectoryOf(const std::string& path) {
  const std::string dir = DirectoryOf(path);
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return IoError("open directory", dir, errno);
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  if (rc != 0) return IoError("fsync directory", dir, err);
  return Status::Ok();
}

// Writes all of `content` to `fd`, then sets its mode and, if asked,
// fsyncs it. Closes `fd`.
Status Fill(int fd, const std::string& tmp, std::string_view content, mode_t mode, Durability durability) {
  for (size_t off = 0; off < content.size();) {
    const ssize_t n = ::write(fd, content.data() + off, content.size() - off);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      const int err = n < 0 ? errno : EIO;
      ::close(fd);
      return IoError("write", tmp, err);
    }
    off += static_cast<size_t>(n);
  }
  // The umask may have narrowed the mode (node_exporter reads the metrics
  // file as another user).
  const char* failed = nullptr;
  if (::fchmod(fd, mode) != 0) {
    failed = "chmod";
  } else if (durability == Durability::kDurable && ::fsync(fd) != 0) {
    failed = "fsync";
  }
  if (failed != nullptr) {
    const int err = errno;
    ::close(fd);
    return IoError(failed, tmp, err);
  }
  if (::close(fd) != 0) return IoError("write", tmp, errno);
  return Status::Ok();
}

}  // namespace

Status CheckParentDirectory(const std::string& path) {
  const std::string dir = DirectoryOf(path);
  struct stat st {};
  if (::stat(dir.c_str(), &st) != 0) return IoError("stat directory", dir, errno);
  if (!S_ISDIR(st.st_mode)) return Status(Code::kIoError, "cannot use " + Escaped(dir) + ": not a directory");
  const uid_t me = ::geteuid();
  if (st.st_uid != me && st.st_uid != 0) {
    return Status(Code::kPermissionDenied, "refusing to write " + Escaped(path) + ": its directory " + Escaped(dir) +
                                               " belongs to uid " + std::to_string(st.st_uid) +
                                               ", not to this process (uid " + std::to_string(me) + ") or root");
  }
  if ((st.st_mode & (S_IWGRP | S_IWOTH)) != 0 && (st.st_mode & S_ISVTX) == 0) {
    char mode[8];
    std::snprintf(mode, sizeof(mode), "%04o", static_cast<unsigned>(st.st_mode & 07777));
    return Status(Code::kPermissionDenied, "refusing to write " + Escaped(path) + ": its directory " + Escaped(dir) +
                                               " (mode " + mode +
                                               ") is writable by other users without the sticky bit, so they could "
                                               "replace the file or plant links");
  }
  return Status::Ok();
}

Status WriteFileAtomically(const std::string& path, std::string_view content, mode_t mode, Durability durability,
                           Directory directory) {
  if (directory == Directory::kPrivate) {
    if (Status st = CheckParentDirectory(path); !st.ok()) return st;
  }
  const std::string tmp = TempNameFor(path);
  // O_EXCL | O_NOFOLLOW: never write through a link or into a file someone
  // else created at the temp name.
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, mode);
  if (fd < 0) return IoError("create", tmp, errno);
  Status st = Fill(fd, tmp, content, mode, durability);
  if (st.ok() && ::rename(tmp.c_str(), path.c_str()) != 0) {
    st = Status(Code::kIoError, "cannot rename " + Escaped(tmp) + " to " + Escaped(path) + ": " + std::strerror(errno));
  }
  if (!st.ok()) {
    ::unlink(tmp.c_str());
    return st;
  }
  return durability == Durability::kDurable ? SyncDirectoryOf(path) : Status::Ok();
}

}  // namespace keymesh::broker
