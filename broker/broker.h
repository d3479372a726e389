// keymesh-broker's shared state and life cycle: loads the config, takes the
// lock file, opens (re-attaches, restores or creates) the segment, serves the
// socket, and runs the periodic jobs (persistence, lease expiry, holder
// discovery for the reaper, cooldown re-arming) on one io thread until
// SIGTERM/SIGINT; SIGHUP reloads the config.
//
// Threading: everything here runs on the io thread, except the SlowAcquirer
// lanes, which touch only PoolAdmin (itself process- and thread-safe).
#ifndef KEYMESH_BROKER_BROKER_H_
#define KEYMESH_BROKER_BROKER_H_

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <boost/asio/io_context.hpp>
#include <boost/asio/signal_set.hpp>
#include <boost/asio/steady_timer.hpp>

#include "broker/config.h"
#include "broker/cooldown_timer.h"
#include "broker/lock_file.h"
#include "broker/mesh/mesh_job.h"
#include "broker/metrics.h"
#include "broker/persistence.h"
#include "broker/pool_registry.h"
#include "broker/reaper.h"
#include "broker/slow_acquire.h"
#include "keymesh/status.h"
#include "shm/pool.h"
#include "shm/segment.h"

namespace keymesh::broker {

class Dispatcher;
class Listener;
struct PeerCred;

struct BrokerOptions {
  std::string config_path;
  bool discard_state = false;  // move a corrupt state file aside and start without it
};

class Broker {
 public:
  explicit Broker(BrokerOptions options);
  ~Broker();
  Broker(const Broker&) = delete;
  Broker& operator=(const Broker&) = delete;

  // Starts, serves until SIGTERM/SIGINT, shuts down cleanly. Returns the
  // process exit code (0 after a clean stop); start-up errors are printed
  // as one line on stderr.
  int Run();

  // --- for in-process tests and fuzzers -----------------------------------
  // Start() without serving: after it returns ok the caller drives
  // io_context() itself (poll()) and may feed frames straight to
  // dispatcher() with a Session of its own; StopForTesting() then shuts
  // down as SIGTERM would. The listening socket is opened but nobody needs
  // to connect.
  Status StartForTesting() { return Start(); }
  void StopForTesting() { Shutdown(); }
  boost::asio::io_context& io_context() noexcept { return io_; }
  Dispatcher& dispatcher() noexcept { return *dispatcher_; }

  // --- for the ops (io thread) --------------------------------------------
  const BrokerConfig& config() const noexcept { return config_; }
  shm::Segment& segment() noexcept { return *segment_; }
  PoolRegistry& pools() noexcept { return *pools_; }
  // May read secrets (dispatch.h's reader role): root, the broker's own
  // uid, allow_uids, allow_gids (primary or supplementary group).
  bool PeerAllowed(const PeerCred& peer) const;
  // Frees the leases of process `pid` in every pool if it is dead; returns
  // how many.
  uint32_t ReclaimIfDead(uint32_t pid);

  Reaper& reaper() noexcept { return *reaper_; }
  SlowAcquirer& slow() noexcept { return *slow_; }
  // Re-arms the cooldown timer for the earliest deadline of all pools: after
  // an op over the socket that may have set, moved or cleared one (a 429, a
  // Retry-After, a reset).
  void RearmCooldownTimer() { cooldown_->Rearm(); }
  // The mesh job; nullptr when the config has no `mesh`.
  mesh::MeshJob* mesh() noexcept { return mesh_.get(); }
  // Hands the mesh job the keys of every configured pool (limits from the
  // segment, fingerprints of the secrets): after start, a reload, and keys
  // added or removed over the socket. A no-op without a mesh.
  void SyncMeshKeys();

 private:
  Status Start();
  void Shutdown();
  void Reload();
  void Tick();
  void ArmTick();
  void WaitSignal();
  void OnProcessDied(const shm::ProcessId& id);
  void WatchHolders();
  void SaveState(bool force);
  // (Re)starts the metrics file writer for config_ (none without metrics_file).
  void StartMetricsFile();

  BrokerOptions options_;
  BrokerConfig config_;
  std::unique_ptr<LockFile> lock_;
  std::string segment_name_;
  // Dead holders to reclaim again at the next tick: a pool was busy (KM-05).
  std::vector<shm::ProcessId> reclaim_retry_;
  StateImage last_state_;  // the last capture, for pools busy at the next
  std::unique_ptr<shm::Segment> segment_;
  std::unique_ptr<PoolRegistry> pools_;
  std::optional<int64_t> wall_minus_mono_;  // WallMinusMono() at the last capture

  boost::asio::io_context io_;
  boost::asio::signal_set signals_;
  boost::asio::steady_timer tick_;
  std::unique_ptr<Reaper> reaper_;
  std::unique_ptr<SlowAcquirer> slow_;
  std::unique_ptr<CooldownTimer> cooldown_;
  std::unique_ptr<StatePersister> persister_;
  std::unique_ptr<Dispatcher> dispatcher_;
  std::unique_ptr<Listener> listener_;
  std::unique_ptr<MetricsFileWriter> metrics_file_;  // null without metrics_file
  std::unique_ptr<mesh::MeshJob> mesh_;              // null without mesh
  bool stopping_ = false;
};

}  // namespace keymesh::broker

#endif  // KEYMESH_BROKER_BROKER_H_
