// The mesh job's watcher (this host's cooldowns, circuits, revocations,
// disables and resets out to Redis; the mesh-wide half-open probe) and its
// event reader (other hosts' changes merged into the segment).
#include <set>
#include <string>
#include <vector>

#include "broker/mesh/mesh_job_impl.h"

namespace keymesh::broker::mesh {
namespace {

// How often the watcher looks at the pools' change counters (one atomic
// load per pool): the first part of a cooldown's propagation delay.
constexpr auto kWatchInterval = std::chrono::milliseconds(1);
// A publish that failed is retried this often while Redis is away.
constexpr uint64_t kRetryNs = 100 * kMsNs;
// The blocking read of the event stream waits this long for an event: an
// idle reader costs Redis one XREAD per 30 s, next to the lease's one call
// per refresh. Stop() and a Redis that came back after an outage interrupt
// it (MeshStore::Interrupt); TCP keepalive finds a peer that vanished.
constexpr uint32_t kReadBlockMs = 30'000;
// A claimed half-open probe is claimed this long before the circuit's
// deadline, so losers extend their open circuit before they would probe.
constexpr uint64_t kProbeLeadNs = 200 * kMsNs;

}  // namespace

// --- watcher: local changes out, the shared probe ----------------------------

void MeshJob::Impl::WatchLoop() {
  std::unique_ptr<MeshStore> store = factory();
  std::map<std::string, uint64_t> seen_seq;  // pool -> events_seq last diffed
  uint64_t retry_at = 0;                     // mono ns: re-diff everything (a publish failed)
  // key -> the open circuit deadline (mono) this host already settled the
  // probe for (won it, or extended its circuit past it).
  std::map<std::string, uint64_t> probe_done;
  struct Open {
    std::string pool, key;
    uint64_t deadline;
  };
  std::map<std::string, Open> open;  // keys whose circuit is open here, from the last diff
  Backoff backoff(0.05, 1.0);
  uint64_t next_attempt = 0;
  uint64_t watched_gen = UINT64_MAX;
  std::map<std::string, std::set<std::string>> mesh_keys;  // pool -> key names
  const uint64_t probe_ttl_ns = static_cast<uint64_t>(std::max(1.0, 2 * config.refresh) * 1e9);
  while (Sleep(kWatchInterval)) {
    const uint64_t now = shm::MonotonicNowNanos();
    if (now < next_attempt) continue;
    if (keys_gen.load(std::memory_order_acquire) != watched_gen) {
      auto [defs, g] = Keys();
      watched_gen = g;
      mesh_keys.clear();
      for (const MeshKey& k : defs) mesh_keys[k.pool].insert(k.key);
      seen_seq.clear();
    }
    const bool retry = (retry_at != 0 && now >= retry_at) || rediff.exchange(false);
    bool failed = false;
    for (const auto& entry : mesh_keys) {
      // (Named, not a structured binding: the diff's lambda captures it.)
      const std::string& pool = entry.first;
      const std::set<std::string>& names = entry.second;
      shm::PoolAdmin* admin = pools(pool);
      if (admin == nullptr) continue;
      const uint64_t seq = admin->EventsSeq();
      auto it = seen_seq.find(pool);
      if (it != seen_seq.end() && it->second == seq && !retry) continue;
      // Diff under known_mu: the reader's merges and this diff never interleave.
      std::vector<KeyEvent> events;
      {
        std::lock_guard lock(known_mu);
        std::vector<shm::ExportedKey> exported;
        if (!admin->ExportKeyStates(&exported).ok()) continue;  // busy: next round
        seen_seq[pool] = seq;
        const uint64_t t = shm::MonotonicNowNanos();
        for (const shm::ExportedKey& x : exported) {
          if (names.count(x.name) == 0) continue;
          const std::string id = KeyOf(pool, x.name);
          Known& k = known[id];
          const Known before = k;
          Known cur;
          cur.cool = x.state.cooldown_deadline;
          cur.circuit = x.state.circuit;
          cur.enabled = x.state.enabled;
          cur.seen = true;
          auto event = [&](EventKind kind, uint64_t until) {
            KeyEvent e;
            e.pool = pool;
            e.key = x.name;
            e.kind = kind;
            e.until_ms = until != 0 ? offset.ToRedisMs(until) : 0;
            e.origin = config.host;
            e.origin_mono_ns = t;
            events.push_back(std::move(e));
          };
          const uint32_t kRevoked = static_cast<uint32_t>(shm::Circuit::kRevoked);
          const uint32_t kClosed = static_cast<uint32_t>(shm::Circuit::kClosed);
          const uint32_t kOpenC = static_cast<uint32_t>(shm::Circuit::kOpen);
          bool reset = false;
          if (before.seen) {
            // Only a reset moves a running deadline earlier or ends a revocation.
            reset = (before.cool > t + kMsNs && cur.cool + kMsNs < before.cool) ||
                    (before.circuit == kRevoked && cur.circuit != kRevoked);
            if (reset) event(EventKind::kReset, 0);
          }
          if (cur.circuit == kRevoked && before.circuit != kRevoked) event(EventKind::kRevoked, 0);
          if (cur.cool > t && (reset || cur.cool > before.cool + kMsNs)) {
            event(cur.circuit == kOpenC ? EventKind::kCircuitOpen : EventKind::kCooldown, cur.cool);
          }
          if (before.seen && !reset && before.circuit != kClosed && before.circuit != kRevoked &&
              cur.circuit == kClosed) {
            event(EventKind::kCircuitClosed, 0);
          }
          if (before.seen ? before.enabled != cur.enabled : !cur.enabled) {
            event(cur.enabled ? EventKind::kEnabled : EventKind::kDisabled, 0);
          }
          if (cur.circuit == kOpenC && cur.cool > t) {
            open[id] = Open{pool, x.name, cur.cool};
          } else {
            open.erase(id);
          }
          // Optimistically known; a failed publish re-diffs from `before`.
          cur.version = before.version;
          k = cur;
          if (!events.empty() && !offset.valid()) k = before;
        }
      }
      if (!events.empty() && !offset.valid()) {
        Result<MeshStore::TimeSample> ts = store->Time();
        if (ts.ok()) {
          offset.Set(ts->redis_ms, shm::MonotonicNowNanos() - ts->rtt_ns / 2);
          retry_at = shm::MonotonicNowNanos();  // re-diff now with deadlines convertible
        } else {
          failed = true;
        }
        continue;
      }
      for (size_t i = 0; i < events.size(); ++i) {
        Result<KeyEvent> merged = store->Publish(events[i]);
        if (!merged.ok()) {
          failed = true;
          // Forget what this round learned of the keys not yet sent, so the
          // next diff sends their state again.
          std::lock_guard lock(known_mu);
          for (size_t j = i; j < events.size(); ++j) {
            Known& k = known[KeyOf(events[j].pool, events[j].key)];
            k = Known{.version = k.version};
          }
          break;
        }
        if (events[i].kind == EventKind::kReset) {
          std::lock_guard lock(known_mu);
          Known& k = known[KeyOf(events[i].pool, events[i].key)];
          k.version = std::max(k.version, merged->version);
        }
        std::lock_guard lock(mu);
        ++status.events_published;
      }
    }
    // The mesh-wide half-open probe: just before an open circuit's
    // deadline, one host claims the probe; the others extend their open
    // circuit by the claim's lifetime and learn the probe's outcome from
    // the winner's event (closed, or open again).
    for (auto it = open.begin(); it != open.end() && !failed;) {
      const Open& o = it->second;
      const uint64_t t = shm::MonotonicNowNanos();
      if (o.deadline <= t + kProbeLeadNs && probe_done[it->first] != o.deadline) {
        Result<bool> won = store->ClaimProbe(o.pool, o.key, config.host, probe_ttl_ns / kMsNs);
        if (!won.ok()) {
          failed = true;
          break;
        }
        uint64_t settled = o.deadline;
        if (!*won) {
          std::lock_guard lock(known_mu);
          shm::PoolAdmin* admin = pools(o.pool);
          shm::RemoteKeyState r;
          r.open_until = o.deadline + probe_ttl_ns;
          if (admin != nullptr && admin->MergeRemote(o.key, r).ok()) {
            Known& k = known[it->first];
            k.cool = std::max(k.cool, r.open_until);
            settled = r.open_until;
          }
        }
        probe_done[it->first] = settled;
        it->second.deadline = settled;
      }
      ++it;
    }
    if (failed) {
      store->Disconnect();
      retry_at = shm::MonotonicNowNanos() + kRetryNs;
      next_attempt = shm::MonotonicNowNanos() + static_cast<uint64_t>(backoff.Next().count());
    } else {
      if (retry) retry_at = 0;
      backoff.Reset();
    }
  }
}

// --- reader: other hosts' changes in ------------------------------------------

void MeshJob::Impl::Apply(const KeyEvent& e, bool count) {
  shm::PoolAdmin* admin = pools(e.pool);
  if (admin == nullptr) return;
  shm::RemoteKeyState r;
  const uint64_t t = shm::MonotonicNowNanos();
  switch (e.kind) {
    case EventKind::kCooldown:
      r.cool_until = offset.ToMonoNs(e.until_ms);
      if (r.cool_until <= t) return;
      break;
    case EventKind::kCircuitOpen:
      r.open_until = offset.ToMonoNs(e.until_ms);
      if (r.open_until <= t) return;
      break;
    case EventKind::kCircuitClosed: r.close_circuit = true; break;
    case EventKind::kRevoked: r.revoke = true; break;
    case EventKind::kDisabled: r.enabled = false; break;
    case EventKind::kEnabled: r.enabled = true; break;
    case EventKind::kReset: r.reset = true; break;
    case EventKind::kRebalance: return;  // no key's change (the reader refreshes on it)
  }
  {
    std::lock_guard lock(known_mu);
    if (e.kind == EventKind::kReset) {
      // The stream may deliver a reset twice and a snapshot repeats the
      // last one: only a newer generation resets.
      Known& k = known[KeyOf(e.pool, e.key)];
      if (e.version <= k.version) return;
      k.version = e.version;
    }
    if (!admin->MergeRemote(e.key, r).ok()) return;  // not a key of this host, or busy
    // What the segment now holds is known: the watcher must not echo it.
    std::vector<shm::ExportedKey> exported;
    if (admin->ExportKeyStates(&exported).ok()) {
      for (const shm::ExportedKey& x : exported) {
        if (x.name != e.key) continue;
        Known& k = known[KeyOf(e.pool, e.key)];
        k.version = std::max(k.version, e.version);
        k.cool = x.state.cooldown_deadline;
        k.circuit = x.state.circuit;
        k.enabled = x.state.enabled;
        k.seen = true;
      }
    }
  }
  rediff.store(true);
  if (!count) return;
  std::lock_guard lock(mu);
  ++status.events_applied;
  if (e.origin_mono_ns != 0 && e.origin_mono_ns <= t && t - e.origin_mono_ns < 3600 * kSecNs) {
    const double d = static_cast<double>(shm::MonotonicNowNanos() - e.origin_mono_ns) / 1e9;
    constexpr size_t kRing = 1024;
    if (delays.size() < kRing) {
      delays.push_back(d);
    } else {
      delays[delay_next] = d;
      delay_next = (delay_next + 1) % kRing;
    }
  }
}

void MeshJob::Impl::ReadLoop() {
  std::unique_ptr<MeshStore> store = factory();
  {
    std::lock_guard lock(mu);
    reader_store = store.get();
  }
  struct Unpublish {
    Impl* m;
    ~Unpublish() {
      std::lock_guard lock(m->mu);
      m->reader_store = nullptr;
    }
  } unpublish{this};
  Backoff backoff(0.1, 2.0);
  std::string last_id;
  bool need_sync = true;
  while (!stop.load()) {
    if (!offset.valid()) {
      Result<MeshStore::TimeSample> ts = store->Time();
      if (!ts.ok()) {
        store->Disconnect();
        if (!Sleep(backoff.Next())) break;
        continue;
      }
      offset.Set(ts->redis_ms, shm::MonotonicNowNanos() - ts->rtt_ns / 2);
    }
    if (need_sync) {
      Result<EventBatch> snap = store->Snapshot();
      if (!snap.ok()) {
        store->Disconnect();
        if (!Sleep(backoff.Next())) break;
        continue;
      }
      for (const KeyEvent& e : snap->events) Apply(e, false);
      last_id = snap->last_id;
      need_sync = false;
      std::lock_guard lock(mu);
      ++status.resyncs;
    }
    Result<EventBatch> batch = store->ReadEvents(last_id, kReadBlockMs);
    if (!batch.ok()) {
      store->Disconnect();
      need_sync = true;  // whatever was missed meanwhile comes with the snapshot
      if (!Sleep(backoff.Next())) break;
      continue;
    }
    backoff.Reset();
    if (batch->gap) {
      need_sync = true;
      continue;
    }
    for (const KeyEvent& e : batch->events) {
      if (e.origin == config.host) continue;
      if (e.kind == EventKind::kRebalance) {
        RequestRefresh();
        continue;
      }
      Apply(e, true);
    }
    if (!batch->last_id.empty()) last_id = batch->last_id;
  }
}

}  // namespace keymesh::broker::mesh
