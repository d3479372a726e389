#include "broker/hardening.h"

#include <sys/prctl.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

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

Status CheckProcVisibility(std::string_view mountinfo, uid_t euid, const std::vector<gid_t>& groups) {
  // A mountinfo line: "ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS [TAGS] - FSTYPE SOURCE SUPEROPTS".
  std::string hidepid, gid;
  for (size_t at = 0; at < mountinfo.size();) {
    size_t end = mountinfo.find('\n', at);
    if (end == std::string_view::npos) end = mountinfo.size();
    std::istringstream line{std::string(mountinfo.substr(at, end - at))};
    at = end + 1;
    std::vector<std::string> f;
    for (std::string w; line >> w;) f.push_back(w);
    const auto dash = std::find(f.begin(), f.end(), "-");
    if (f.size() < 5 || f[4] != "/proc" || dash == f.end() || f.end() - dash < 4 || *(dash + 1) != "proc") continue;
    hidepid.clear();
    gid.clear();
    std::istringstream opts(*(dash + 3));
    for (std::string o; std::getline(opts, o, ',');) {
      if (o.rfind("hidepid=", 0) == 0) hidepid = o.substr(8);
      if (o.rfind("gid=", 0) == 0) gid = o.substr(4);
    }
  }
  if (hidepid.empty() || hidepid == "0" || hidepid == "off") return Status::Ok();
  if (euid == 0) return Status::Ok();  // CAP_SYS_PTRACE: sees every process
  if (!gid.empty()) {
    for (gid_t g : groups) {
      if (std::to_string(g) == gid) return Status::Ok();
    }
  }
  return Status(Code::kPermissionDenied,
                "/proc is mounted hidepid=" + hidepid +
                    (gid.empty() ? std::string(" with no gid= exemption") : " with gid=" + gid) +
                    ", so this broker (uid " + std::to_string(euid) +
                    ") cannot tell live workers from dead ones: remount /proc with gid=<a group of the broker> "
                    "(e.g. mount -o remount,hidepid=invisible,gid=keymesh /proc) or give the broker that group");
}

Status CheckProcVisibility() {
  std::ifstream in("/proc/self/mountinfo");
  if (!in) return Status::Ok();
  std::stringstream ss;
  ss << in.rdbuf();
  std::vector<gid_t> groups(static_cast<size_t>(std::max(::getgroups(0, nullptr), 0)));
  const int n = ::getgroups(static_cast<int>(groups.size()), groups.data());
  groups.resize(static_cast<size_t>(std::max(n, 0)));
  groups.push_back(::getegid());
  return CheckProcVisibility(ss.str(), ::geteuid(), groups);
}

}  // namespace keymesh::broker
