#include "broker/atomic_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "common/text.h"

namespace keymesh::broker {
namespace {

Status IoError(const std::string& what, const std::string& path, int err) {
  return Status(Code::kIoError, "cannot " + what + " " + Escaped(path) + ": " + std::strerror(err));
}

Status SyncDirectoryOf(const std::string& path) {
  std::string dir = ".";
  if (const size_t slash = path.rfind('/'); slash != std::string::npos) dir = slash == 0 ? "/" : path.substr(0, slash);
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

Status WriteFileAtomically(const std::string& path, std::string_view content, mode_t mode, Durability durability) {
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode);
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
