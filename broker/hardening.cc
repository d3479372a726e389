#include "broker/hardening.h"

#include <sys/prctl.h>
#include <sys/resource.h>

#include <cerrno>
#include <cstring>

namespace keymesh::broker {

Status ProtectProcessMemory() {
  const rlimit none{0, 0};
  if (::setrlimit(RLIMIT_CORE, &none) != 0) {
    return Status(Code::kInternal,
                  std::string("cannot disable core dumps (setrlimit RLIMIT_CORE): ") + std::strerror(errno));
  }
  if (::prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0) {
    return Status(Code::kInternal,
                  std::string("cannot mark the process not dumpable (prctl PR_SET_DUMPABLE): ") + std::strerror(errno));
  }
  return Status::Ok();
}

void WipeSecret(std::string& s) noexcept {
  // The whole capacity: a shorter secret may have overwritten a longer one.
  if (s.capacity() > 0) ::explicit_bzero(s.data(), s.capacity());
  s.clear();
}

}  // namespace keymesh::broker
