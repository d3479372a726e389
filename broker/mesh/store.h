// The store between the brokers of several hosts (ARCHITECTURE.md "Beyond
// one host"): what the mesh job (mesh_job.h) needs from Redis, behind an
// interface so that unit tests can drive a fake and a second store could
// plug in. RedisMeshStore (redis_store.h) is the one implementation; it is
// the only code in KeyMesh that talks to Redis.
//
// Never on a worker's path: only the broker's mesh threads call a store,
// and every call is bounded by the store's command timeout.
//
// Rates are per second of the key's provider limit for the whole mesh
// (rpm / 60, tpm / 60). Times in replies are Redis's own clock (TIME, ms);
// a host converts them to its CLOCK_MONOTONIC with the offset it measures.
//
// Threading: one store object per thread (the refresh thread, the event
// reader); a store is not thread-safe, but for Interrupt().
#ifndef KEYMESH_BROKER_MESH_STORE_H_
#define KEYMESH_BROKER_MESH_STORE_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "keymesh/status.h"

namespace keymesh::broker::mesh {

// One rate dimension of a key (requests or tokens) in a lease request.
struct Dimension {
  double limit = 0;   // the key's global rate per second; 0: not limited (nothing leased)
  double wants = 0;   // this host's demand per second
  double has = 0;     // the rate this host holds now (its last grant), per second
  uint64_t used = 0;  // cumulative count this host admitted (monotone; reports only)
};

struct LeaseKey {
  std::string pool;
  std::string key;
  std::string fingerprint;  // keyed hash of the secret, hex; never the secret
  double burst = 0;         // the key's global burst in requests (B_g), >= 1
  Dimension req;
  Dimension tok;
};

struct LeaseRequest {
  std::string host;
  uint64_t seq = 0;           // grows with every request of this host; a retry may reuse it
  uint64_t lease_ms = 30000;  // how long a grant stays valid without a refresh
  double headroom = 0.05;     // share of every limit never granted (reserve for newcomers)
  // Learning ends this long after a new epoch began when no host reported
  // holding a share meanwhile (a new mesh, not a lost one); 0: learning
  // always lasts the whole lease. The job passes 3 x refresh.
  uint64_t learning_quiet_ms = 0;
  std::vector<LeaseKey> keys;
  // Redis time (ms) after which the request is stale: the host gave up on
  // its reply, so Redis refuses it without recording anything (a request
  // that waited in a frozen Redis must not record a grant the host never
  // got). 0: none.
  int64_t deadline_ms = 0;
  // Unset in production (the script reads Redis TIME). Tests of the
  // allocator drive a fake clock through it.
  std::optional<int64_t> now_ms_for_testing;
};

struct KeyGrant {
  double req = 0;             // granted request rate per second (0 for an unlimited dimension)
  double tok = 0;             // granted token rate per second
  double burst = 0;           // requests this host may send back to back (b_h = B_g * r_h / r, >= 1 when req > 0)
  bool mismatch = false;      // another host registered a different secret under this pool/key: nothing granted
  int64_t cool_until_ms = 0;  // Redis time the key cools until (0: not cooling); nothing granted while cooling
  uint32_t holders = 0;       // live hosts holding a lease of this key
};

struct LeaseReply {
  int64_t now_ms = 0;                // Redis time when the script ran
  int64_t expires_ms = 0;            // this host's grants are valid until then (Redis time)
  bool learning = false;             // Redis lost its state recently: grants only echo what hosts held
  std::string epoch;                 // changes whenever Redis lost its state
  uint32_t hosts = 0;                // live hosts in the namespace (this one included)
  std::vector<std::string> members;  // their names, sorted
  std::vector<KeyGrant> keys;        // one per request key, in request order
  // Some grant fell short of this host's fair part (by more than 5 % of
  // the key's limit) because other hosts still hold it; they were asked to
  // refresh (EventKind::kRebalance).
  bool short_of_share = false;
  // Redis ran the request after its deadline_ms and recorded nothing; only
  // now_ms is set (the host's idea of Redis time was off: resync it).
  bool stale = false;
};

// A change of a key's shared state. Deadlines are Redis time (ms).
enum class EventKind : uint8_t {
  kCooldown = 0,       // cooling until until_ms (max-merged: never shortened)
  kCircuitOpen = 1,    // circuit open until until_ms (max-merged)
  kCircuitClosed = 2,  // a probe succeeded: the circuit closed (ends an open circuit of the same version)
  kRevoked = 3,        // an authentication failure: out until reset
  kDisabled = 4,       // an operator disabled the key (durable, no TTL)
  kEnabled = 5,
  kReset = 6,  // cooldown, streaks and circuit cleared; bumps the key's version
  // Not a key's change (pool and key empty; never published by a host, never
  // in a snapshot): a host's lease fell short because others hold what is
  // now its fair part; every other host refreshes at once to give it back.
  kRebalance = 7,
};

struct KeyEvent {
  std::string stream_id;  // the stream entry's id; "" for Snapshot records
  std::string pool;
  std::string key;
  EventKind kind = EventKind::kCooldown;
  int64_t until_ms = 0;         // kCooldown, kCircuitOpen
  uint64_t version = 0;         // the key's reset generation (Redis assigns it on Publish)
  std::string origin;           // the host that made the change
  uint64_t origin_mono_ns = 0;  // the origin's CLOCK_MONOTONIC at the change (delay measurements)
  uint64_t seq = 0;             // the stream entry's sequence number (one above the entry before it); 0: none
};

struct EventBatch {
  std::vector<KeyEvent> events;
  std::string last_id;  // read on from here
  // The stream no longer holds what follows after_id (trimmed), or Redis
  // lost its state (epoch changed): the reader must Snapshot() in full.
  bool gap = false;
};

class MeshStore {
 public:
  virtual ~MeshStore() = default;

  // (Re)connects if needed. Every other call connects lazily too; a failure
  // is kIoError ("mesh: redis 127.0.0.1:6379: connection refused"), a reply
  // of the wrong shape kProtocolError. Never blocks past the timeout.
  virtual Status Connect() = 0;
  virtual bool connected() const = 0;
  // Drops the connection (the next call reconnects).
  virtual void Disconnect() = 0;

  // One bulk call for all of this host's keys: renews this host's
  // membership and leases, cleans expired ones, and grants each key's share.
  // Guarantees: for every key and dimension, the sum of the live hosts'
  // grants never exceeds limit x (1 - headroom); a key revoked or disabled
  // in Redis gets 0, a cooling one its deadline (cool_until_ms) beside its
  // share; while learning, a host gets at most
  // min(has, wants) and a newcomer 0. A grant below the `has` a host
  // reported is counted as that `has` (at most its live record) until its
  // next request: the reply may be lost, and the host then keeps pacing at
  // what it holds until its lease ends. So what a host gives back reaches
  // the others one request later (the mesh job sends that one at once
  // after a large give-back, or any on a rebalance).
  virtual Result<LeaseReply> Lease(const LeaseRequest& request) = 0;
  // A clean stop: this host's leases and membership end at once.
  virtual Status Leave(const std::string& host) = 0;

  // Max-merges `event` into the key's shared state and appends it to the
  // event stream (unless it changed nothing). Returns the merged state's
  // event (version assigned, deadline possibly later than asked).
  virtual Result<KeyEvent> Publish(const KeyEvent& event) = 0;
  // Events after `after_id` ("0": from the start, "$": only new ones),
  // waiting up to block_ms for the first; gap when some are lost (the
  // stream trimmed past `after_id`, Redis lost its state).
  virtual Result<EventBatch> ReadEvents(const std::string& after_id, uint32_t block_ms) = 0;
  // Every key's shared state as events (cooldowns still running, open
  // circuits, revocations, disables) and the stream id to read on from.
  // A key reset at least once comes first as a kReset carrying its
  // version: a reader applies a kReset (from here or the stream, which may
  // deliver one twice) only when it is newer than the version it knows.
  virtual Result<EventBatch> Snapshot() = 0;
  // Exactly one host of the mesh wins the half-open probe of pool/key for
  // ttl_ms: true for the winner (also when it already holds it).
  virtual Result<bool> ClaimProbe(const std::string& pool, const std::string& key, const std::string& host,
                                  uint64_t ttl_ms) = 0;
  // Redis's clock (ms) and the round trip it took (ns).
  struct TimeSample {
    int64_t redis_ms = 0;
    uint64_t rtt_ns = 0;
  };
  virtual Result<TimeSample> Time() = 0;
  // Thread-safe, unlike the rest: makes the call this store is blocked in
  // (or its next one) fail at once with kIoError and drop the connection,
  // so that a reader blocked for long on ReadEvents stops or resyncs now.
  virtual void Interrupt() = 0;
};

}  // namespace keymesh::broker::mesh

#endif  // KEYMESH_BROKER_MESH_STORE_H_
