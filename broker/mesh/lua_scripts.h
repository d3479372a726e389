// The Lua scripts the Redis store runs (EVALSHA), one per MeshStore call
// that must be atomic. The data model they share, under the prefix P
// (the encoded namespace and ':'), with ID = the encoded pool, '/', the
// encoded key (redis_store.cc EncodeName: bytes other than [A-Za-z0-9._-]
// as %XX, so no name can reach into another's keys):
//
//   P epoch        hash   id (changes when Redis lost its state), learning_until (ms)
//   P hosts        zset   host -> lease expiry (ms)
//   P keys         set    every ID ever leased or published
//   P lease:ID     hash   host -> "has_r has_t wants_r wants_t expiry seq used_r used_t lim_r lim_t grant_r grant_t"
//                         (has: max(grant, min(reported has, record)), what it may pace at, which
//                         the cap counts; grant: its last grant, which shortfalls are judged by;
//                         a record of 10 fields, from before grants were kept: grant = has),
//                         and ' fp' -> the fingerprint registered first (kept while a
//                         lease of it lives; no host name holds a space)
//   P state:ID     hash   cool_until, open_until, revoked, disabled, version, origin, mono
//   P events       stream pool key kind until version origin mono seq  (MAXLEN ~)
//   P seq          string the seq of the newest entry of P events (INCR with each XADD):
//                         a reader that sees an entry's seq jump missed entries
//   P probe:ID     string the host holding the half-open probe (PX ttl)
//   P rebalance    string the host that last asked the others to refresh (PX 200 ms)
//
// Times are Redis TIME in ms (the lease script takes a fake now for tests).
// Rates go in and out as "%.17g" strings (Lua numbers become integers in
// replies). Keys are built inside the scripts, so this is for a single
// Redis (or a primary with replicas), not Redis Cluster.
#ifndef KEYMESH_BROKER_MESH_LUA_SCRIPTS_H_
#define KEYMESH_BROKER_MESH_LUA_SCRIPTS_H_

namespace keymesh::broker::mesh {

struct LuaScript {
  const char* name;    // for messages and the SHA cache
  const char* source;  // Lua
};

// ARGV: P host seq lease_ms headroom now_ms|"" nkeys, then per key
//   ID fp burst req_limit req_wants req_has req_used tok_limit tok_wants tok_has tok_used,
//   then learning_quiet_ms stream_maxlen deadline_ms (0: none)
// -> {now, expires, learning 0|1, epoch, nhosts, {members}, {{req, tok, burst, mismatch, cool_until, holders}...},
//     short 0|1}, or {'stale', now} (nothing written) when now > deadline_ms
// short: some grant fell short of this host's fair part, by more than 5 %
// of the key's limit, because other hosts still hold it; the script then XADDs a kind-7 (rebalance) event, at most
// one per namespace per 200 ms, on which the other hosts refresh at once.
extern const LuaScript kLeaseScript;
// ARGV: P ID pool key kind until version origin mono maxlen
// -> {stream_id|"", until (merged), version}
extern const LuaScript kPublishScript;
// ARGV: P after_id -> {epoch|"", gap 0|1, last_generated_id, seq of after_id's entry}
extern const LuaScript kReadMetaScript;
// ARGV: P -> {epoch|"", last_id, {{pool, key, kind, until, version, origin, mono}...}, seq of last_id's entry}
extern const LuaScript kSnapshotScript;
// ARGV: P ID host ttl_ms -> 1 | 0
extern const LuaScript kClaimProbeScript;
// ARGV: P host -> number of keys looked at
extern const LuaScript kLeaveScript;

}  // namespace keymesh::broker::mesh

#endif  // KEYMESH_BROKER_MESH_LUA_SCRIPTS_H_
