// Liveness: finds dead workers promptly and without polling.
//
// Each watched process gets a pidfd (pidfd_open) registered with Asio as a
// stream_descriptor; it becomes readable the moment the process exits
// (zombies included), and the owner's callback reclaims its leases. A
// process is named by pid plus start time, so a reused pid is never taken
// for the watched one: if the pid already runs something else when the
// watch starts, the watched process is reported dead at once.
#ifndef KEYMESH_BROKER_REAPER_H_
#define KEYMESH_BROKER_REAPER_H_

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <utility>

#include <boost/asio/io_context.hpp>

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

 private:
  struct Entry;
  using IdKey = std::pair<uint32_t, uint64_t>;
  void Died(const shm::ProcessId& id);

  boost::asio::io_context& io_;
  OnDeath on_death_;
  std::map<IdKey, std::unique_ptr<Entry>> watched_;
};

}  // namespace keymesh::broker

#endif  // KEYMESH_BROKER_REAPER_H_
