// Replacing a file so that a reader, or the next start after a crash, sees
// the old content or the new, never a mix: leveldb's SetCurrentFile shape
// (temp file in the same directory, write, rename over the old one). The
// one writer of the broker's files (the state file, the metrics file).
#ifndef KEYMESH_BROKER_ATOMIC_FILE_H_
#define KEYMESH_BROKER_ATOMIC_FILE_H_

#include <sys/types.h>

#include <string>
#include <string_view>

#include "keymesh/status.h"

namespace keymesh::broker {

enum class Durability {
  // Readers see the old or the new file; after a power loss the new file
  // may be missing or empty (fine for metrics, rewritten every interval).
  kAtomic,
  // Also fsync the new file before the rename and the directory after it,
  // so that once the call returns the new content survives a crash
  // (ARCHITECTURE.md invariant 7: the state file).
  kDurable,
};

// kOk when the directory holding `path` is one where no other user can
// replace the file or plant a link at its name: owned by this process's uid
// or root, and not writable by group or others unless sticky (like /tmp,
// where others cannot remove or rename our files). kPermissionDenied naming
// the directory's owner or mode otherwise (KM-21).
Status CheckParentDirectory(const std::string& path);

enum class Directory {
  // The directory must pass CheckParentDirectory: files whose content the
  // broker trusts later (the state file).
  kPrivate,
  // Any directory the broker may write, also one shared with other users
  // (node_exporter's textfile directory): the temp name is still never
  // followed or reused, and a rename replaces a link planted at `path`
  // instead of writing through it; others may still delete the file.
  kShared,
};

// Writes `content` to `path` through `path`.tmp.<pid>.<random> in the same
// directory (a rename never crosses file systems), created exclusively and
// never through a symlink, with mode `mode` whatever the umask. On failure
// the old file is untouched and the temp file removed; kIoError naming the
// file and the failed step (kPermissionDenied from the directory check).
Status WriteFileAtomically(const std::string& path, std::string_view content, mode_t mode, Durability durability,
                           Directory directory = Directory::kPrivate);

}  // namespace keymesh::broker

#endif  // KEYMESH_BROKER_ATOMIC_FILE_H_
