#include "broker/broker.h"

#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>

#include "broker/dispatch.h"
#include "broker/key_ledger.h"
#include "broker/listener.h"
#include "broker/log.h"
#include "broker/mesh/redis_store.h"
#include "broker/recovery.h"
#include "broker/segment_access.h"
#include "broker/session.h"
#include "common/text.h"
#include "shm/clock.h"
#include "shm/process_id.h"

namespace keymesh::broker {

namespace {
constexpr std::chrono::seconds kTickInterval{1};

void RaiseFileLimit() {
  rlimit rl{};
  if (::getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
    rl.rlim_cur = rl.rlim_max;
    (void)::setrlimit(RLIMIT_NOFILE, &rl);
  }
}

// The broker's own environment (a runtime key's secret_env).
std::optional<std::string> ProcessEnv(const std::string& var) {
  const char* v = std::getenv(var.c_str());
  if (v == nullptr) return std::nullopt;
  return std::string(v);
}
}  // namespace

Broker::Broker(BrokerOptions options)
    : options_(std::move(options)), signals_(io_, SIGTERM, SIGINT, SIGHUP), tick_(io_) {}

Broker::~Broker() = default;

int Broker::Run() {
  Status st = Start();
  if (!st.ok()) {
    std::fprintf(stderr, "keymesh-broker: %s\n", st.message().c_str());
    return st.code() == Code::kAlreadyExists ? 3 : 1;
  }
  io_.run();
  return 0;
}

Status Broker::Start() {
  Result<BrokerConfig> config = LoadConfig(options_.config_path);
  if (!config.ok()) return config.status();
  config_ = std::move(config).value();
  if (config_.log_level) SetConfigLogLevel(*config_.log_level);
  RaiseFileLimit();
  // The lock comes before the socket path or the segment is touched.
  Result<std::unique_ptr<LockFile>> lock = LockFile::Acquire(config_.socket + ".lock");
  if (!lock.ok()) return lock.status();
  lock_ = std::move(lock).value();
  // Temp files of writers that died before their rename (KM-26).
  for (const std::string& file : {config_.state_file, SegmentNameFileFor(config_.socket)}) {
    for (const std::string& stale : RemoveStaleTempFiles(file)) {
      Log(LogLevel::kWarn, "stale_temp_file_removed", {{"file", stale}});
    }
  }
  Result<std::optional<StateImage>> image = LoadStateForStart(config_.state_file, options_.discard_state, nullptr);
  if (!image.ok()) return image.status();
  KeyLedger ledger;
  if (*image) ledger.LoadFrom(**image, &ProcessEnv);
  Result<OpenedSegment> opened = OpenSegment(config_, *image, [&](const shm::Segment& segment) {
    return ledger.Apply(config_.pools, [&](std::string_view secret) { return segment.Fingerprint(secret); });
  });
  if (!opened.ok()) return opened.status();
  segment_ = std::move(opened->segment);
  segment_name_ = segment_->name();
  // Before any worker learns the name: only workers may open it.
  if (Status access = GrantWorkerAccess(segment_name_, config_); !access.ok()) {
    return access;
  }
  const shm::ProcessId& self = shm::Self();
  segment_->header()->broker_pid.store(self.pid, std::memory_order_release);
  segment_->header()->broker_start_time.store(self.start_time, std::memory_order_release);
  pools_ = std::make_unique<PoolRegistry>(*segment_, std::move(ledger));
  pools_->Configure(config_.pools);

  reaper_ = std::make_unique<Reaper>(io_, [this](const shm::ProcessId& id) { OnProcessDied(id); });
  slow_ = std::make_unique<SlowAcquirer>(io_);
  cooldown_ = std::make_unique<CooldownTimer>(io_, [this] { return pools_->All(); });
  persister_ = std::make_unique<StatePersister>(config_.state_file);
  dispatcher_ = std::make_unique<Dispatcher>(*this);
  listener_ = std::make_unique<Listener>(io_, *dispatcher_);

  SaveState(true);
  WatchHolders();  // leases of workers that were served by a previous broker
  cooldown_->Rearm();
  Status st = listener_->Open(config_.socket);
  if (!st.ok()) return st;
  listener_->Start();
  WaitSignal();
  ArmTick();
  Log(LogLevel::kInfo, "ready",
      {{"socket", config_.socket},
       {"segment", segment_name_},
       {"mode", StartModeName(opened->mode)},
       {"pools", std::to_string(pools_->pools().size())},
       {"keys", std::to_string(pools_->key_count())},
       {"pid", std::to_string(::getpid())}});
  StartMetricsFile();
  if (config_.mesh) {
    // After the segment and the socket: the broker serves its own host
    // whatever Redis does, and the job never holds anything they need.
    mesh::MeshConfig mc = *config_.mesh;
    mesh_ = std::make_unique<mesh::MeshJob>(
        mc, [mc]() -> std::unique_ptr<mesh::MeshStore> { return std::make_unique<mesh::RedisMeshStore>(mc); });
    SyncMeshKeys();
    mesh_->Start();
  }
  return Status::Ok();
}

void Broker::SyncMeshKeys() {
  if (!mesh_) return;
  std::vector<mesh::MeshKey> keys;
  std::map<std::string, shm::PoolAdmin*> admins;
  for (const std::string& pool : pools_->Names()) {
    shm::PoolAdmin* admin = pools_->Find(pool);
    const std::map<std::string, std::string>* secrets = pools_->Secrets(pool);
    if (admin == nullptr || secrets == nullptr) continue;
    admins[pool] = admin;
    Result<PoolStatus> snap = pools_->Snapshot(pool);
    if (!snap.ok()) {
      Log(LogLevel::kWarn, "mesh_keys_stale", {{"pool", pool}, {"error", snap.status().message()}});
      continue;
    }
    for (const KeyStatus& k : snap->keys) {
      auto secret = secrets->find(k.name);
      if (secret == secrets->end()) continue;
      mesh::MeshKey mk;
      mk.pool = pool;
      mk.key = k.name;
      mk.fingerprint = mesh::MeshFingerprint(config_.mesh->ns, secret->second);
      mk.rpm = k.rpm;
      mk.tpm = k.tpm;
      mk.burst = k.burst;
      keys.push_back(std::move(mk));
    }
  }
  mesh_->SetKeys(std::move(keys), std::move(admins));
}

void Broker::WaitSignal() {
  signals_.async_wait([this](const boost::system::error_code& ec, int signo) {
    if (ec) return;
    if (signo == SIGHUP) {
      Reload();
      WaitSignal();
      return;
    }
    Log(LogLevel::kInfo, "stopping", {{"signal", signo == SIGTERM ? "SIGTERM" : "SIGINT"}});
    Shutdown();
  });
}

void Broker::Shutdown() {
  if (stopping_) return;
  stopping_ = true;
  listener_->Stop();
  // Gives this host's shares back to the mesh at once (a clean stop).
  if (mesh_) mesh_->Stop();
  slow_->Stop();
  dispatcher_->CloseAll();
  cooldown_->Stop();
  tick_.cancel();
  signals_.cancel();
  SaveState(true);
  if (metrics_file_) metrics_file_->Stop();  // the final counters
  segment_->header()->broker_pid.store(0, std::memory_order_release);
  segment_->header()->broker_start_time.store(0, std::memory_order_release);
  Log(LogLevel::kInfo, "stopped", {{"state_file", config_.state_file}});
  io_.stop();
}

void Broker::ArmTick() {
  tick_.expires_after(kTickInterval);
  tick_.async_wait([this](const boost::system::error_code& ec) {
    if (ec || stopping_) return;
    Tick();
    ArmTick();
  });
}

void Broker::Tick() {
  // Dead holders whose pool was busy when they died: their leases are freed
  // once the pool's lock is free again.
  std::vector<shm::ProcessId> retry;
  retry.swap(reclaim_retry_);
  for (const shm::ProcessId& id : retry) OnProcessDied(id);
  for (const auto& [name, pool] : pools_->pools()) {
    Result<uint32_t> n = pool->ReclaimExpired();
    if (!n.ok() && n.status().code() == Code::kBusy) pools_->NoteBusy(name, n.status());
    if (n.ok() && *n > 0) {
      Log(LogLevel::kWarn, "leases_expired",
          {{"pool", name},
           {"count", std::to_string(*n)},
           {"max_lease_seconds", std::to_string(pool->header()->config.max_lease / 1000000000ull)}});
    }
  }
  WatchHolders();
  SaveState(false);
  cooldown_->Rearm();
}

void Broker::WatchHolders() {
  for (const auto& [name, pool] : pools_->pools()) {
    std::vector<shm::ProcessId> holders;
    if (Status st = pool->Holders(&holders); st.code() == Code::kBusy) pools_->NoteBusy(name, st);
    for (const shm::ProcessId& id : holders) reaper_->Watch(id);
  }
}

void Broker::OnProcessDied(const shm::ProcessId& id) {
  uint32_t total = 0;
  bool retry = false;
  for (const auto& [name, pool] : pools_->pools()) {
    Result<uint32_t> n = pool->ReclaimProcess(id);
    if (!n.ok() && n.status().code() == Code::kBusy) {
      pools_->NoteBusy(name, n.status());
      retry = true;
    }
    if (n.ok() && *n > 0) {
      total += *n;
      Log(LogLevel::kWarn, "leases_reclaimed",
          {{"pool", name}, {"pid", std::to_string(id.pid)}, {"count", std::to_string(*n)}});
    }
  }
  // Reclaiming again in a pool that already freed them is a no-op.
  if (retry) reclaim_retry_.push_back(id);
  if (total > 0) cooldown_->Rearm();
}

uint32_t Broker::ReclaimIfDead(uint32_t pid) {
  uint32_t total = 0;
  for (const auto& [name, pool] : pools_->pools()) {
    for (const shm::ProcessId& id : pool->Holders()) {
      if (id.pid != pid || shm::IsAlive(id)) continue;
      Result<uint32_t> n = pool->ReclaimProcess(id);
      if (n.ok()) total += *n;
    }
  }
  if (total > 0) {
    Log(LogLevel::kWarn, "leases_reclaimed",
        {{"pid", std::to_string(pid)}, {"count", std::to_string(total)}, {"by", "request"}});
  }
  return total;
}

void Broker::SaveState(bool force) {
  wall_minus_mono_ = WallMinusMono(wall_minus_mono_);
  // A busy pool keeps the state saved last for it (KM-05).
  std::vector<std::string> busy;
  StateImage image = CaptureState(*segment_, *wall_minus_mono_, kBrokerLockTimeoutNs, &last_state_, &busy);
  for (const std::string& pool : busy) {
    pools_->NoteBusy(pool, Status(Code::kBusy, "pool " + Quoted(pool) + " is busy: its state was not saved anew"));
  }
  pools_->ledger().SaveTo(&image);
  Status st = persister_->Save(image, force);
  last_state_ = std::move(image);
  if (!st.ok()) Log(LogLevel::kError, "state_write_failed", {{"file", config_.state_file}, {"error", st.message()}});
}

void Broker::StartMetricsFile() {
  if (config_.metrics_file.empty()) return;
  const auto interval = std::chrono::milliseconds(static_cast<int64_t>(config_.metrics_interval * 1000));
  metrics_file_ = std::make_unique<MetricsFileWriter>(
      io_, config_.metrics_file, interval, [this] { return pools_->SnapshotAll(); },
      [this]() -> std::optional<mesh::MeshStatus> {
        if (mesh_ == nullptr) return std::nullopt;
        return mesh_->Status();
      });
  metrics_file_->Start();
  char interval_text[32];
  std::snprintf(interval_text, sizeof(interval_text), "%gs", config_.metrics_interval);
  Log(LogLevel::kInfo, "metrics_file", {{"file", config_.metrics_file}, {"interval", interval_text}});
}

void Broker::Reload() {
  Result<BrokerConfig> fresh = LoadConfig(options_.config_path);
  if (!fresh.ok()) {
    Log(LogLevel::kError, "reload_refused", {{"error", fresh.status().message()}});
    return;
  }
  BrokerConfig next = std::move(fresh).value();
  if (next.socket != config_.socket || next.state_file != config_.state_file ||
      next.capacity.max_pools != config_.capacity.max_pools ||
      next.capacity.keys_per_pool != config_.capacity.keys_per_pool ||
      next.capacity.leases_per_pool != config_.capacity.leases_per_pool) {
    Log(LogLevel::kWarn, "reload_partial", {{"reason", "socket, state_file and capacity change only on restart"}});
    next.socket = config_.socket;
    next.state_file = config_.state_file;
    next.capacity = config_.capacity;
  }
  if (next.mesh.has_value() != config_.mesh.has_value() ||
      (next.mesh && (next.mesh->redis_url != config_.mesh->redis_url || next.mesh->host != config_.mesh->host ||
                     next.mesh->ns != config_.mesh->ns || next.mesh->refresh != config_.mesh->refresh ||
                     next.mesh->lease != config_.mesh->lease || next.mesh->outage != config_.mesh->outage ||
                     next.mesh->headroom != config_.mesh->headroom || next.mesh->timeout != config_.mesh->timeout ||
                     next.mesh->password != config_.mesh->password))) {
    Log(LogLevel::kWarn, "reload_partial", {{"reason", "mesh changes only on restart"}});
  }
  next.mesh = config_.mesh;
  BrokerConfig old = std::move(config_);
  config_ = std::move(next);
  if (config_.log_level) SetConfigLogLevel(*config_.log_level);
  if (config_.metrics_file != old.metrics_file || config_.metrics_interval != old.metrics_interval) {
    if (metrics_file_) metrics_file_->Stop();
    metrics_file_.reset();
    StartMetricsFile();
  }
  if (Status access = GrantWorkerAccess(segment_name_, config_); !access.ok()) {
    // The previous access list stays on the segment.
    Log(LogLevel::kError, "segment_access_failed", {{"error", access.message()}});
  }
  pools_->Configure(config_.pools);
  Status st = pools_->Reconcile();
  if (!st.ok()) {
    // Whatever was applied stays applied; report and keep serving.
    Log(LogLevel::kError, "reload_failed", {{"error", st.message()}});
  }
  cooldown_->Rearm();
  SyncMeshKeys();
  SaveState(false);
  Log(LogLevel::kInfo, "reloaded",
      {{"pools", std::to_string(config_.pools.size())}, {"generation", std::to_string(segment_->generation())}});
}

bool Broker::PeerAllowed(const PeerCred& peer) const {
  return (RolesOf(peer, config_, static_cast<uint32_t>(::geteuid())) & kRoleReader) != 0;
}

}  // namespace keymesh::broker
