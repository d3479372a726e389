#include "broker/reaper.h"

#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <string>

#include <boost/asio/posix/stream_descriptor.hpp>
#include <boost/asio/post.hpp>

#include "broker/log.h"

namespace keymesh::broker {

struct Reaper::Entry {
  explicit Entry(boost::asio::io_context& io) : fd(io) {}
  boost::asio::posix::stream_descriptor fd;
};

Reaper::Reaper(boost::asio::io_context& io, OnDeath on_death) : io_(io), on_death_(std::move(on_death)) {}

Reaper::~Reaper() = default;

bool Reaper::Watching(const shm::ProcessId& id) const { return watched_.count(IdKey(id.pid, id.start_time)) != 0; }

void Reaper::Watch(const shm::ProcessId& id) {
  const IdKey key(id.pid, id.start_time);
  if (watched_.count(key) != 0 || id.pid == 0) return;
  const int fd = static_cast<int>(::syscall(SYS_pidfd_open, static_cast<pid_t>(id.pid), 0));
  const int open_errno = fd < 0 ? errno : 0;
  if (fd < 0 && open_errno != ESRCH) {
    // EMFILE, ENFILE, ENOMEM...: we cannot tell; the next tick retries.
    Unknown(id, "pidfd_open: " + std::string(std::strerror(open_errno)));
    return;
  }
  // Open first, then compare start times: if they match now, the pidfd
  // refers to the watched process (a pid is not reused while we hold it).
  // ESRCH from pidfd_open is death too, but CheckLiveness confirms it the
  // same way (a zombie, another start time, kill's ESRCH).
  const shm::Liveness liveness = fd < 0 ? shm::Liveness::kDead : shm::CheckLiveness(id);
  if (liveness != shm::Liveness::kAlive) {
    if (fd >= 0) ::close(fd);
    if (liveness == shm::Liveness::kDead) {
      boost::asio::post(io_, [this, id] { on_death_(id); });
    } else {
      Unknown(id, "its /proc entry cannot be read (hidepid? out of descriptors?)");
    }
    return;
  }
  auto entry = std::make_unique<Entry>(io_);
  boost::system::error_code ec;
  entry->fd.assign(fd, ec);
  if (ec) {
    ::close(fd);
    return;
  }
  entry->fd.async_wait(boost::asio::posix::stream_descriptor::wait_read,
                       [this, id](const boost::system::error_code& e) {
                         if (e == boost::asio::error::operation_aborted) return;
                         Died(id);
                       });
  watched_.emplace(key, std::move(entry));
}

void Reaper::Unknown(const shm::ProcessId& id, const std::string& why) {
  ++unknown_;
  uint64_t suppressed = 0;
  if (!unknown_log_.Allow(&suppressed)) return;
  Log(LogLevel::kWarn, "liveness_unknown",
      {{"pid", std::to_string(id.pid)},
       {"reason", why},
       {"action", "leases kept, retried next tick"},
       {"suppressed", std::to_string(suppressed)}});
}

void Reaper::Died(const shm::ProcessId& id) {
  watched_.erase(IdKey(id.pid, id.start_time));
  on_death_(id);
}

}  // namespace keymesh::broker
