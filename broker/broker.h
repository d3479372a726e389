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
#include "broker/metrics.h"
#include "broker/persistence.h"
#include "broker/reaper.h"
#include "broker/slow_acquire.h"
#include "keymesh/status.h"
#include "shm/pool.h"
#include "shm/segment.h"

namespace keymesh::broker {

class Handlers;
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
  // io_context() itself (poll()) and may feed frames straight to handlers()
  // with a Session of its own; StopForTesting() then shuts down as SIGTERM
  // would. The listening socket is opened but nobody needs to connect.
  Status StartForTesting() { return Start(); }
  void StopForTesting() { Shutdown(); }
  boost::asio::io_context& io_context() noexcept { return io_; }
  Handlers& handlers() noexcept { return *handlers_; }

  // --- for the Handlers (io thread) ---------------------------------------
  const BrokerConfig& config() const noexcept { return config_; }
  shm::Segment& segment() noexcept { return *segment_; }
  // nullptr when there is no such pool. The pointer stays valid for the
  // broker's life.
  shm::PoolAdmin* FindPool(std::string_view name);
  std::vector<std::string> PoolNames() const;
  // name -> secret of a pool's keys; nullptr for an unknown pool.
  const std::map<std::string, std::string>* Secrets(std::string_view pool) const;
  // The masked secret of a key ("" when unknown).
  std::string Masked(std::string_view pool, const std::string& key) const;
  // root, the broker's own uid, allow_uids, allow_gids.
  bool PeerAllowed(const PeerCred& peer) const;

  Status AddKey(std::string_view pool, const KeySpec& key);
  Status RemoveKey(std::string_view pool, std::string_view name);
  // Frees the leases of `id` in every pool if it is dead; returns how many.
  uint32_t ReclaimIfDead(uint32_t pid);

  Reaper& reaper() noexcept { return *reaper_; }
  SlowAcquirer& slow() noexcept { return *slow_; }
  // After any change of cooldowns or leases made over the socket.
  void NoteChange() { cooldown_->Rearm(); }

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
  void RebuildTables();
  std::vector<PoolConfigEntry> DesiredPools() const;
  std::vector<shm::PoolAdmin*> AllPools();

  BrokerOptions options_;
  BrokerConfig config_;
  std::unique_ptr<LockFile> lock_;
  std::string segment_name_;
  std::unique_ptr<shm::Segment> segment_;
  std::map<std::string, std::unique_ptr<shm::PoolAdmin>, std::less<>> pools_;
  std::map<std::string, std::map<std::string, std::string>, std::less<>> secrets_;
  std::map<std::string, std::map<std::string, KeySpec>, std::less<>> runtime_keys_;  // added over the socket
  int64_t wall_minus_mono_ = 0;

  boost::asio::io_context io_;
  boost::asio::signal_set signals_;
  boost::asio::steady_timer tick_;
  std::unique_ptr<Reaper> reaper_;
  std::unique_ptr<SlowAcquirer> slow_;
  std::unique_ptr<CooldownTimer> cooldown_;
  std::unique_ptr<StatePersister> persister_;
  std::unique_ptr<Handlers> handlers_;
  std::unique_ptr<Listener> listener_;
  std::unique_ptr<MetricsFileWriter> metrics_file_;  // null without metrics_file
  bool stopping_ = false;
};

}  // namespace keymesh::broker

#endif  // KEYMESH_BROKER_BROKER_H_
