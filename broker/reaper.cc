#include "broker/reaper.h"

#include <sys/syscall.h>
#include <unistd.h>

#include <boost/asio/posix/stream_descriptor.hpp>
#include <boost/asio/post.hpp>

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
  // Open first, then compare start times: if they match now, the pidfd
  // refers to the watched process (a pid is not reused while we hold it).
  std::optional<uint64_t> start = shm::ReadStartTime(static_cast<pid_t>(id.pid));
  if (fd < 0 || !start || *start != id.start_time) {
    if (fd >= 0) ::close(fd);
    boost::asio::post(io_, [this, id] { on_death_(id); });
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

void Reaper::Died(const shm::ProcessId& id) {
  watched_.erase(IdKey(id.pid, id.start_time));
  on_death_(id);
}

}  // namespace keymesh::broker
