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
#ifndef KEYMESH_BROKER_METRICS_H_
#define KEYMESH_BROKER_METRICS_H_

#include <chrono>
#include <functional>
#include <string>
#include <vector>

#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>

#include "keymesh/status.h"
#include "keymesh/types.h"

namespace keymesh::broker {

// The exposition text of `pools`, one HELP and TYPE line per family, then
// its samples; families with no sample are left out. Pure: no I/O.
std::string RenderMetrics(const std::vector<PoolStatus>& pools);

// Writes RenderMetrics() of `snapshot()` to a file every `interval`, and
// once more on Stop(), atomically (atomic_file.h: a reader such as
// node_exporter sees the old or the new file, never a partial one), mode
// 0644. Runs on the io thread of `io`; must be destroyed on
// it (or after it stopped). Failures are logged once per change (a full
// disk does not log every interval), never thrown.
class MetricsFileWriter {
 public:
  using Snapshot = std::function<Result<std::vector<PoolStatus>>()>;

  MetricsFileWriter(boost::asio::io_context& io, std::string path, std::chrono::milliseconds interval,
                    Snapshot snapshot);
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
  boost::asio::steady_timer timer_;
  bool stopped_ = false;
  bool failing_ = false;
};

}  // namespace keymesh::broker

#endif  // KEYMESH_BROKER_METRICS_H_
