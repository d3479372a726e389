// Prometheus text exposition (format 0.0.4) of the pools' counters and
// gauges, and the writer of the optional metrics file for node_exporter's
// textfile collector.
//
// Every value comes from the shared segment, so it is aggregated over all
// processes attached to it. Labels: `pool`, and `key` for per-key series
// (the key's name, never its secret). Families (see RenderMetrics):
//
//   keymesh_pool_{acquires,releases,failures,rate_limited,reclaimed,
//                 no_key_available,acquire_timeouts}_total   counter {pool}
//   keymesh_pool_{in_flight,keys,eligible_keys}             gauge   {pool}
//   keymesh_pool_uptime_seconds                              gauge   {pool}
//   keymesh_acquire_wait_seconds                             histogram {pool}
//   keymesh_key_{acquires,successes,failures,rate_limited,reclaimed,
//                cancelled,tokens,circuit_opens}_total       counter {pool,key}
//   keymesh_key_{in_flight,max_concurrency,eligible,enabled,
//                cooldown_remaining_seconds,circuit_state}   gauge   {pool,key}
//   keymesh_key_requests_available   gauge, only keys with an rpm limit
//   keymesh_key_tokens_available     gauge, only keys with a tpm limit
//   keymesh_key_latency_ema_seconds  gauge, only keys with a latency sample
//
// With a mesh (several hosts, RenderMetrics' `mesh`), from the mesh job's
// last status:
//   keymesh_mesh_mode{mode}                  gauge: 1 for the current mode, 0 for
//                                            each other (leased, learning, share,
//                                            closed, open)
//   keymesh_mesh_redis_up                    gauge: 1 if the last Redis call succeeded
//   keymesh_mesh_redis_rtt_seconds           gauge, after the first round trip
//   keymesh_mesh_lease_age_seconds           gauge: since the last successful refresh
//                                            (+Inf before the first)
//   keymesh_mesh_lease_remaining_seconds     gauge
//   keymesh_mesh_hosts                       gauge: live hosts of the namespace
//   keymesh_mesh_{refreshes,refresh_failures,events_published,
//                 events_applied}_total      counter
//   keymesh_key_share_rpm, keymesh_key_share_tpm   gauge {pool,key}: this host's
//                                            share of the key's limits (per minute),
//                                            only keys with an rpm / tpm limit
#ifndef KEYMESH_BROKER_METRICS_H_
#define KEYMESH_BROKER_METRICS_H_

#include <chrono>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>

#include "broker/mesh/mesh_status.h"
#include "keymesh/status.h"
#include "keymesh/types.h"

namespace keymesh::broker {

// The exposition text of `pools` (and of `mesh` when not null), one HELP
// and TYPE line per family, then its samples; families with no sample are
// left out. Pure: no I/O.
std::string RenderMetrics(const std::vector<PoolStatus>& pools, const mesh::MeshStatus* mesh = nullptr);

// Writes RenderMetrics() of `snapshot()` to a file every `interval`, and
// once more on Stop(), atomically (atomic_file.h: a reader such as
// node_exporter sees the old or the new file, never a partial one), mode
// 0644. Runs on the io thread of `io`; must be destroyed on
// it (or after it stopped). Failures are logged once per change (a full
// disk does not log every interval), never thrown.
class MetricsFileWriter {
 public:
  using Snapshot = std::function<Result<std::vector<PoolStatus>>()>;
  // The mesh job's status, or nullopt without a mesh.
  using MeshSnapshot = std::function<std::optional<mesh::MeshStatus>()>;

  // `mesh` may be empty (no mesh families).
  MetricsFileWriter(boost::asio::io_context& io, std::string path, std::chrono::milliseconds interval,
                    Snapshot snapshot, MeshSnapshot mesh = {});
  MetricsFileWriter(const MetricsFileWriter&) = delete;
  MetricsFileWriter& operator=(const MetricsFileWriter&) = delete;

  // Writes now and then every interval.
  void Start();
  // Cancels the timer and writes a last time.
  void Stop();
  const std::string& path() const noexcept { return path_; }

 private:
  void WriteNow();
  void Arm();

  std::string path_;
  std::chrono::milliseconds interval_;
  Snapshot snapshot_;
  MeshSnapshot mesh_;
  boost::asio::steady_timer timer_;
  bool stopped_ = false;
  bool failing_ = false;
};

}  // namespace keymesh::broker

#endif  // KEYMESH_BROKER_METRICS_H_
