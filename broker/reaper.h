// Liveness: finds dead workers promptly and without polling.
//
// Each watched process gets a pidfd (pidfd_open) registered with Asio as a
// stream_descriptor; it becomes readable the moment the process exits
// (zombies included), and the owner's callback reclaims its leases. A
// process is named by pid plus start time, so a reused pid is never taken
// for the watched one: if the pid already runs something else when the
// watch starts, the watched process is reported dead at once.
//
// Only the kernel's word is death (pidfd_open's ESRCH, or shm::CheckLiveness
// kDead). When it cannot tell (EMFILE, ENFILE, ENOMEM, /proc unreadable or
// hidden) the process is not watched and not reclaimed: the broker's tick
// calls Watch for every holder again, so the watch is retried each second.
#ifndef KEYMESH_BROKER_REAPER_H_
#define KEYMESH_BROKER_REAPER_H_

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>

#include <boost/asio/io_context.hpp>

#include "broker/log_limit.h"
#include "shm/process_id.h"

namespace keymesh::broker {

class Reaper {
 public:
  // Called on the io thread, once per watched process, after it exited.
  using OnDeath = std::function<void(const shm::ProcessId&)>;

  // `io` must outlive the Reaper.
  Reaper(boost::asio::io_context& io, OnDeath on_death);
  ~Reaper();
  Reaper(const Reaper&) = delete;
  Reaper& operator=(const Reaper&) = delete;

  // Watches `id` until it exits (idempotent). io thread only.
  void Watch(const shm::ProcessId& id);
  bool Watching(const shm::ProcessId& id) const;
  size_t size() const noexcept { return watched_.size(); }
  // Watches refused so far because liveness was unknown.
  uint64_t unknown() const noexcept { return unknown_; }

 private:
  struct Entry;
  using IdKey = std::pair<uint32_t, uint64_t>;
  void Died(const shm::ProcessId& id);
  void Unknown(const shm::ProcessId& id, const std::string& why);

  boost::asio::io_context& io_;
  OnDeath on_death_;
  std::map<IdKey, std::unique_ptr<Entry>> watched_;
  uint64_t unknown_ = 0;
  LogLimiter unknown_log_{std::chrono::milliseconds(900)};  // about one line per tick
};

}  // namespace keymesh::broker

#endif  // KEYMESH_BROKER_REAPER_H_
