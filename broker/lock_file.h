// An exclusive lock file (flock) held for the broker's whole life, taken
// before the socket path or the segment is touched: a second broker on the
// same config refuses to start and never removes a live broker's socket.
// The kernel drops the lock when the holder dies, so a crashed broker leaves
// nothing that blocks its restart.
#ifndef KEYMESH_BROKER_LOCK_FILE_H_
#define KEYMESH_BROKER_LOCK_FILE_H_

#include <memory>
#include <string>

#include "keymesh/status.h"

namespace keymesh::broker {

class LockFile {
 public:
  ~LockFile();  // releases the lock (the file itself stays)
  LockFile(const LockFile&) = delete;
  LockFile& operator=(const LockFile&) = delete;

  // Creates `path` if needed (mode 0600) and locks it without waiting.
  // kAlreadyExists when another process holds it (its pid is in the
  // message), kIoError otherwise.
  static Result<std::unique_ptr<LockFile>> Acquire(const std::string& path);

  const std::string& path() const noexcept { return path_; }

 private:
  LockFile(int fd, std::string path) : fd_(fd), path_(std::move(path)) {}
  int fd_;
  std::string path_;
};

}  // namespace keymesh::broker

#endif  // KEYMESH_BROKER_LOCK_FILE_H_
