/* KeyMesh C ABI: a key pool for other languages (the Python package uses it
 * through ctypes). Plain C11, opaque handles, nothing throws across it.
 *
 * Conventions
 *  - Every call returns an int status: KM_OK (0) or one of the KM_* codes
 *    below (the numbers of keymesh::Code). On failure a one-line message is
 *    kept per thread and read with km_last_error(); it never holds a secret
 *    (secrets are masked to their last 4 characters).
 *  - Output parameters are written only on KM_OK.
 *  - Strings returned as `const char*` are owned by the library and stay
 *    valid as documented; strings returned as `char*` are the caller's and
 *    are freed with km_string_free().
 *  - Durations are seconds (double).
 *
 * Option structs grow without breaking callers
 *  - km_pool_options, km_key_spec, km_acquire_options and km_end_options
 *    begin with `uint32_t struct_size`, which the matching *_init() call
 *    sets to the sizeof the caller was compiled with, together with every
 *    default. Initialise each struct with its *_init() call, then set the
 *    fields you need.
 *  - Fields are only ever appended, after the end of the previous version
 *    (padding included). The library reads only the fields that lie within
 *    struct_size, so a caller built against an older header gets the
 *    defaults of the fields it does not know; a struct_size of 0 or below
 *    the first version's is KM_INVALID_ARGUMENT, and so is a larger struct
 *    (a newer header) whose bytes beyond what this library knows are not
 *    all zero, because it would silently ignore them.
 *  - Size-prefixed structs rather than opaque options with setters (as
 *    leveldb's c.h): they live on the caller's stack with no allocation, no
 *    free and no call per field; ctypes and other FFIs map them directly;
 *    and the acquire and end options are built on the fast path, where a
 *    handle per call would cost an allocation.
 *
 * Threads and processes
 *  - A km_pool may be used from any number of threads at once, except that
 *    km_pool_destroy() must be the last call on it.
 *  - A pool created before fork() works in every child: an embedded pool's
 *    shared segment is inherited; an attached pool reconnects to the broker
 *    (registering the child) on the child's first call. Leases belong to the
 *    process that acquired them: the child starts with none held.
 *
 * Two ways to hold a key
 *  - Lease handles (km_pool_acquire[_ex] -> km_lease): end each with
 *    exactly one of km_lease_end / _release / _mark_failed /
 *    _mark_rate_limited / _cancel, then km_lease_destroy() it.
 *  - Keys held by this process (km_pool_acquire_key[_ex]): the pool
 *    remembers, per process, the leases held for each secret, and
 *    km_pool_end_key and the km_pool_*_key() calls end one of them, chosen
 *    by ticket or, with ticket 0, the oldest held for that secret. Ending a
 *    key this process does not hold is KM_NOT_HELD. This is the original
 *    Python API's model (acquire() returns the key string; release(key)).
 *
 * Deprecated calls (KM_DEPRECATED) are thin wrappers kept for callers of an
 * older header; each names its replacement.
 */
#ifndef KEYMESH_KEYMESH_H_
#define KEYMESH_KEYMESH_H_

#include <stddef.h>
#include <stdint.h>

#include "keymesh/export.h"

#if defined(__GNUC__) || defined(__clang__)
#define KM_DEPRECATED(replacement) __attribute__((deprecated("use " replacement)))
#else
#define KM_DEPRECATED(replacement)
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* Status codes (== keymesh::Code). */
#define KM_OK 0
#define KM_NO_AVAILABLE_KEY 1  /* no eligible key before the timeout */
#define KM_KEY_EXHAUSTED 2     /* mark_failed made the key reach max_failures (once) */
#define KM_UNKNOWN_KEY 3       /* no key/pool of that name or secret */
#define KM_NOT_HELD 4          /* this process does not hold that lease/key */
#define KM_CAPACITY_EXCEEDED 5 /* a fixed capacity of the segment */
#define KM_INVALID_ARGUMENT 6  /* bad input from the caller */
#define KM_LAYOUT_MISMATCH 7   /* segment of another layout version */
#define KM_SEGMENT_ERROR 8     /* the segment cannot be created/opened/mapped */
#define KM_BROKER_UNAVAILABLE 9
#define KM_PROTOCOL_ERROR 10
#define KM_PERMISSION_DENIED 11
#define KM_IO_ERROR 12
#define KM_CORRUPT_STATE 13
#define KM_ALREADY_EXISTS 14
#define KM_CLOSED 15 /* the pool was closed, or the wait was cancelled */
#define KM_INTERNAL 16
#define KM_BUSY 17 /* a pool lock stayed held past the caller's lock timeout */

/* Strategies (== keymesh::Strategy). */
#define KM_ROUND_ROBIN 0
#define KM_LEAST_BUSY 1
#define KM_WEIGHTED 2

/* How a lease ended (== keymesh::OutcomeKind). */
#define KM_OUTCOME_SUCCESS 0
#define KM_OUTCOME_FAILURE 1      /* a non-429 failure */
#define KM_OUTCOME_RATE_LIMITED 2 /* a 429 */
#define KM_OUTCOME_CANCELLED 3    /* no outcome: the request was never sent */

/* Special latency values for the end calls. */
#define KM_LATENCY_MEASURED (-1.0) /* the time since the grant */
#define KM_LATENCY_NONE (-2.0)     /* no sample: the latency EMA is unchanged */
/* Special timeout / cooldown / rate_margin value: the pool's configured
 * default. */
#define KM_DEFAULT (-1.0)

typedef struct km_pool km_pool;
typedef struct km_lease km_lease;
typedef struct km_cancel km_cancel;

/* The original KeyPool's options; km_pool_options_init() sets the struct
 * size and the defaults (least_busy, cooldown 60, max_failures 10,
 * acquire_timeout 30, max_lease_seconds 600, max_cooldown 600,
 * rate_margin 0.02, max_leases_per_process 0, burst 0). max_cooldown also
 * caps every cooldown a 429 or a Retry-After asks for. */
typedef struct km_pool_options {
  uint32_t struct_size;     /* sizeof(km_pool_options); set by km_pool_options_init() */
  int32_t strategy;         /* KM_ROUND_ROBIN / KM_LEAST_BUSY / KM_WEIGHTED */
  uint32_t max_failures;    /* consecutive failures that exhaust a key, >= 1 */
  double default_cooldown;  /* seconds a 429 cools a key when no cooldown is given */
  double acquire_timeout;   /* default wait of an acquire, seconds (0: try once) */
  double max_lease_seconds; /* leases held longer are reclaimed by a broker */
  double max_cooldown;      /* cap of escalating 429 cooldowns */
  double rate_margin;       /* keys are paced at (1 - rate_margin) x rpm/tpm; 0 <= m < 0.5 */
  /* Version 2 (appended): */
  uint32_t max_leases_per_process; /* leases one process may hold at once; 0: half the lease table */
  uint32_t reserved_v2;            /* version 2's tail padding, named so that version 3 starts after it; ignored */
  /* Version 3 (appended): */
  uint32_t burst; /* km_pool_create: the burst of every key whose km_key_spec.burst is 0, and of the keys
                     km_pool_add_key adds later with burst 0; 0: none (smooth pacing); <= 1000000 */
} km_pool_options;

/* One key; km_key_spec_init() sets the struct size and the defaults (no
 * name, weight 1, no limits, the pool's rate_margin). `name` may be NULL or
 * "" (a name "key-N" is generated); the strings are copied. weight 0 means
 * 1; zero limits mean unlimited. */
typedef struct km_key_spec {
  uint32_t struct_size; /* sizeof(km_key_spec); set by km_key_spec_init() */
  uint32_t weight;      /* used by KM_WEIGHTED */
  const char* name;
  const char* secret;
  uint32_t max_concurrency; /* leases at once, 0: unlimited */
  uint32_t rpm;             /* requests per minute, 0: unlimited */
  uint64_t tpm;             /* tokens per minute, 0: unlimited */
  uint32_t burst;           /* requests granted back to back (0 or 1: smooth pacing); <= 1000000 */
  double rate_margin;       /* this key's margin, 0 <= m < 0.5; KM_DEFAULT: the pool's */
} km_key_spec;

/* Flags of km_acquire_options. */
#define KM_ACQUIRE_POLL                                   \
  1u /* one attempt that never waits and, when no key is  \
      * eligible, returns KM_NO_AVAILABLE_KEY without     \
      * counting a failed acquire (for bindings that then \
      * wait elsewhere); timeout and cancel are ignored */

/* How to acquire; km_acquire_options_init() sets the struct size and the
 * defaults (the pool's acquire_timeout, no tokens, no token, no flags). */
typedef struct km_acquire_options {
  uint32_t struct_size; /* sizeof(km_acquire_options); set by km_acquire_options_init() */
  uint32_t flags;       /* KM_ACQUIRE_* */
  double timeout;       /* seconds to wait; KM_DEFAULT: the pool's acquire_timeout */
  uint64_t tokens;      /* the request's expected tokens, reserved from the key's TPM budget */
  km_cancel* cancel;    /* may be NULL: ends the wait from another thread (km_cancel_trigger) */
} km_acquire_options;

/* Flags of km_end_options. */
#define KM_END_PERMANENT                                   \
  1u /* with KM_OUTCOME_FAILURE: an authentication failure \
      * (e.g. HTTP 401) revokes the key until reset or     \
      * add_key */

/* How a lease ended; km_end_options_init() sets the struct size and the
 * defaults (success, measured latency, no tokens, the pool's cooldown). */
typedef struct km_end_options {
  uint32_t struct_size; /* sizeof(km_end_options); set by km_end_options_init() */
  uint32_t outcome;     /* KM_OUTCOME_* */
  uint32_t flags;       /* KM_END_* */
  double latency;       /* success only: seconds, KM_LATENCY_MEASURED or KM_LATENCY_NONE */
  uint64_t tokens;      /* tokens the request used (correcting the acquire's reservation) */
  double cooldown;      /* rate limited only: seconds, or KM_DEFAULT (the pool's default_cooldown) */
} km_end_options;

/* A key held by this process (km_pool_acquire_key). `secret` and `name`
 * stay valid until the pool is closed. */
typedef struct km_held {
  const char* secret;
  const char* name;
  uint64_t ticket; /* identifies this lease for the *_key calls; never 0 */
} km_held;

/* ---- Errors and version ------------------------------------------------ */

/* The message of the last failed call on this thread ("" if none). Valid
 * until the next km_* call on this thread. */
KEYMESH_EXPORT const char* km_last_error(void);
/* Stable lowercase name of a status code ("no_available_key", ...;
 * "unknown" for a number that is not a code). */
KEYMESH_EXPORT const char* km_code_name(int code);
/* Writes the library version ("0.1.0") to *out (static string). */
KEYMESH_EXPORT int km_version(const char** out);
/* Frees a string returned as char* by this library. NULL is ignored. */
KEYMESH_EXPORT int km_string_free(char* s);

/* ---- Option structs ------------------------------------------------------ */

KEYMESH_EXPORT int km_pool_options_init(km_pool_options* options);
KEYMESH_EXPORT int km_key_spec_init(km_key_spec* key);
KEYMESH_EXPORT int km_acquire_options_init(km_acquire_options* options);
KEYMESH_EXPORT int km_end_options_init(km_end_options* options);

/* ---- Pools ------------------------------------------------------------- */

/* A pool without a broker, in an anonymous shared segment shared with every
 * child forked afterwards. `keys` is an array of n specs, each from
 * km_key_spec_init() (one struct_size for all: it is the array's stride);
 * `options` NULL: the defaults. Needs n >= 1 keys with non-empty, unique
 * secrets and unique names (KM_INVALID_ARGUMENT). */
KEYMESH_EXPORT int km_pool_create(const km_key_spec* keys, size_t n, const km_pool_options* options, km_pool** out);

/* Attaches to pool `pool_name` of the keymesh-broker listening on
 * `socket_path` (NULL or "": $KEYMESH_SOCKET, else the default path).
 * KM_BROKER_UNAVAILABLE when nobody answers. */
KEYMESH_EXPORT int km_pool_connect(const char* socket_path, const char* pool_name, km_pool** out);

/* Closes the pool: waits blocked in it end with KM_CLOSED, calls in progress
 * are waited for, keys this process still holds are cancelled (no outcome
 * counted), the segment is unmapped. Later calls return KM_CLOSED.
 * Idempotent; safe while other threads use the pool. */
KEYMESH_EXPORT int km_pool_close(km_pool* pool);
/* Closes (if needed) and frees the handle. Must be the last call on it, and
 * every km_lease and km_cancel of the pool must have been destroyed. */
KEYMESH_EXPORT int km_pool_destroy(km_pool* pool);

/* ---- Lease handles ----------------------------------------------------- */

/* Acquires as `options` say (NULL: the defaults). A wait ends early with
 * KM_CLOSED when the pool is closed or options->cancel is triggered;
 * KM_NO_AVAILABLE_KEY on timeout. */
KEYMESH_EXPORT int km_pool_acquire_ex(km_pool* pool, const km_acquire_options* options, km_lease** out);
/* Waits up to `timeout` seconds (KM_DEFAULT: the pool's acquire_timeout)
 * for an eligible key. KM_NO_AVAILABLE_KEY on timeout. */
KEYMESH_EXPORT int km_pool_acquire(km_pool* pool, double timeout, km_lease** out);
/* One attempt, never waits. */
KEYMESH_EXPORT int km_pool_try_acquire(km_pool* pool, km_lease** out);
/* The lease's secret and key name (either out pointer may be NULL); valid
 * until the pool is closed. */
KEYMESH_EXPORT int km_lease_info(const km_lease* lease, const char** secret, const char** name);
/* Ends the lease as `options` say (NULL: a success with the measured
 * latency). KM_KEY_EXHAUSTED (the lease ended) exactly once: on the failure
 * that made the key reach max_failures, or on the permanent one that
 * revoked it. KM_INVALID_ARGUMENT for an unknown outcome or flag, or
 * KM_END_PERMANENT without KM_OUTCOME_FAILURE (the lease stays held). */
KEYMESH_EXPORT int km_lease_end(km_lease* lease, const km_end_options* options);
/* Success. latency: seconds, KM_LATENCY_MEASURED or KM_LATENCY_NONE;
 * tokens: tokens the request used. */
KEYMESH_EXPORT int km_lease_release(km_lease* lease, double latency, uint64_t tokens);
/* A non-429 failure. KM_KEY_EXHAUSTED (lease ended) exactly once: on the
 * failure that made the key reach max_failures. */
KEYMESH_EXPORT int km_lease_mark_failed(km_lease* lease);
/* A 429: cools the key for `cooldown` seconds (KM_DEFAULT: the pool's
 * default_cooldown), never shortening a deadline already set. */
KEYMESH_EXPORT int km_lease_mark_rate_limited(km_lease* lease, double cooldown);
/* Ends the lease without an outcome (the request was never sent). */
KEYMESH_EXPORT int km_lease_cancel(km_lease* lease);
/* Frees the handle; a lease not yet ended is cancelled. NULL is ignored. */
KEYMESH_EXPORT int km_lease_destroy(km_lease* lease);

/* ---- Keys held by this process (by secret) ----------------------------- */

/* Like km_pool_acquire_ex, and remembers the lease as held by this process.
 * With KM_ACQUIRE_POLL, KM_NO_AVAILABLE_KEY says no key is eligible now. */
KEYMESH_EXPORT int km_pool_acquire_key_ex(km_pool* pool, const km_acquire_options* options, km_held* out);
/* km_pool_acquire_key_ex with `timeout` and `cancel` (may be NULL). */
KEYMESH_EXPORT int km_pool_acquire_key(km_pool* pool, double timeout, km_cancel* cancel, km_held* out);
/* km_pool_acquire_key_ex with KM_ACQUIRE_POLL. */
KEYMESH_EXPORT int km_pool_poll_key(km_pool* pool, km_held* out);
/* Ends a held lease of `secret` as `options` say (NULL: a success with the
 * measured latency): the one with `ticket`, or with ticket 0 the oldest.
 * KM_UNKNOWN_KEY if no key of the pool has that secret, KM_NOT_HELD if this
 * process holds no such lease; otherwise as km_lease_end. */
KEYMESH_EXPORT int km_pool_end_key(km_pool* pool, const char* secret, uint64_t ticket, const km_end_options* options);
/* km_pool_end_key with one outcome; arguments as for the km_lease_* calls. */
KEYMESH_EXPORT int km_pool_release_key(km_pool* pool, const char* secret, uint64_t ticket, double latency,
                                       uint64_t tokens);
KEYMESH_EXPORT int km_pool_mark_failed_key(km_pool* pool, const char* secret, uint64_t ticket);
KEYMESH_EXPORT int km_pool_mark_rate_limited_key(km_pool* pool, const char* secret, uint64_t ticket, double cooldown);
KEYMESH_EXPORT int km_pool_cancel_key(km_pool* pool, const char* secret, uint64_t ticket);
/* Deprecated: km_pool_acquire_key_ex with options.tokens. */
KEYMESH_EXPORT KM_DEPRECATED("km_pool_acquire_key_ex") int km_pool_acquire_key_tokens(km_pool* pool, double timeout,
                                                                                      uint64_t tokens,
                                                                                      km_cancel* cancel, km_held* out);
/* Deprecated: km_pool_acquire_key_ex with KM_ACQUIRE_POLL and options.tokens. */
KEYMESH_EXPORT KM_DEPRECATED("km_pool_acquire_key_ex") int km_pool_poll_key_tokens(km_pool* pool, uint64_t tokens,
                                                                                   km_held* out);
/* Deprecated: km_pool_end_key with KM_OUTCOME_FAILURE and KM_END_PERMANENT. */
KEYMESH_EXPORT KM_DEPRECATED("km_pool_end_key") int km_pool_mark_failed_key_permanent(km_pool* pool, const char* secret,
                                                                                      uint64_t ticket);
/* Feeds a response's headers (Retry-After, retry-after-ms,
 * x-ratelimit-{limit,remaining,reset}-{requests,tokens}; others are
 * ignored, names case-insensitive) for the key with `secret` to the pool.
 * KM_INVALID_ARGUMENT names a malformed header (never echoing its value). */
KEYMESH_EXPORT int km_pool_observe_limits(km_pool* pool, const char* secret, const char* const* names,
                                          const char* const* values, size_t n);
/* Retry-After (delay-seconds or an HTTP-date) in seconds from now. */
KEYMESH_EXPORT int km_parse_retry_after(const char* value, double* seconds);
/* A Go-style duration as in x-ratelimit-reset-* ("1s", "6m0s", "250ms"). */
KEYMESH_EXPORT int km_parse_duration(const char* value, double* seconds);
/* How many leases this process holds for `secret` (NULL: for all keys). */
KEYMESH_EXPORT int km_pool_held_count(km_pool* pool, const char* secret, uint32_t* out);

/* ---- Cancelling waits --------------------------------------------------- */

/* A token that ends an acquire wait (km_acquire_options.cancel,
 * km_pool_acquire_key) from another thread. Closing the pool triggers every
 * token of the pool. */
KEYMESH_EXPORT int km_cancel_create(km_pool* pool, km_cancel** out);
/* Sets the token and wakes the waits of its pool; the wait using it returns
 * KM_CLOSED (unless it got a key first). Idempotent; any thread. */
KEYMESH_EXPORT int km_cancel_trigger(km_cancel* token);
/* Frees the token; no wait may still be using it. NULL is ignored. */
KEYMESH_EXPORT int km_cancel_destroy(km_cancel* token);

/* ---- Administration and status ----------------------------------------- */

/* Adds a key, or re-admits the existing key of the same name (or, with no
 * name, of the same secret): clears its failure streak and exhaustion. In
 * an embedded pool only the creating process can add keys (before fork).
 * `key` from km_key_spec_init(). */
KEYMESH_EXPORT int km_pool_add_key(km_pool* pool, const km_key_spec* key);
KEYMESH_EXPORT int km_pool_remove_key(km_pool* pool, const char* name);
KEYMESH_EXPORT int km_pool_enable_key(km_pool* pool, const char* name);
KEYMESH_EXPORT int km_pool_disable_key(km_pool* pool, const char* name);
/* Clears cooldown, failure and 429 streaks and exhaustion. */
KEYMESH_EXPORT int km_pool_reset_key(km_pool* pool, const char* name);
/* The name of the key whose secret is `secret` (km_string_free it). */
KEYMESH_EXPORT int km_pool_key_name(km_pool* pool, const char* secret, char** out);

/* The pool's status as a JSON object (free with km_string_free), in the
 * control protocol's shape (the broker's status op):
 *   {"name", "strategy", "generation",
 *    "options": {default_cooldown, max_failures, acquire_timeout,
 *                max_lease_seconds, max_cooldown, rate_margin},
 *    "acquire_wait": {counts, bounds, sum, count},
 *    "pool_metrics": {total_acquires, total_releases, total_failures,
 *                     total_rate_limited, total_reclaimed,
 *                     no_key_available_count, timeouts, uptime},
 *    "keys": [{name, key_suffix (masked secret), slot, fingerprint, state,
 *              enabled, weight, max_concurrency, rpm, tpm, active_requests,
 *              cooldown_remaining, fail_streak, rate_limit_streak, acquires,
 *              success_count, failure_count, rate_limited, reclaimed, tokens,
 *              cancelled, latency_avg, has_latency, last_used_ago,
 *              is_available, health_score, circuit, circuit_opens,
 *              escalation, requests_available, tokens_available, burst,
 *              rate_margin, reason}, ...]}
 * Counters are pool-wide (all processes). Never contains a secret. */
KEYMESH_EXPORT int km_pool_status_json(km_pool* pool, char** out);
/* Keys eligible right now. */
KEYMESH_EXPORT int km_pool_available_count(km_pool* pool, uint32_t* out);

/* Frees the leases of processes that no longer run (e.g. a gunicorn worker
 * that was killed while holding keys); *reclaimed (may be NULL) receives
 * how many. An attached pool's broker does this by itself
 * (KM_INVALID_ARGUMENT); an embedded pool needs its creator (the gunicorn
 * master) to call it. */
KEYMESH_EXPORT int km_pool_reclaim_dead(km_pool* pool, uint32_t* reclaimed);

/* ---- Schedulers outside the pool (snapshot, choose, acquire that key) -----
 *
 * For a scheduler written in the caller's language (a Python
 * BaseScheduler), which must never run under the pool's lock:
 *
 *   1. km_pool_snapshot(): one pass over the pool's keys into the caller's
 *      array of km_key_view (no allocation per key);
 *   2. the caller chooses one of the views whose `eligible` is 1;
 *   3. km_pool_acquire_this_key() acquires exactly that key if it is still
 *      eligible, with every check, the accounting, lease ownership and the
 *      per-process lease cap of km_pool_acquire_key_ex; it never waits.
 *      KM_NO_AVAILABLE_KEY: the key is there but no longer eligible;
 *      KM_UNKNOWN_KEY: the view is stale (the key was removed, or keys were
 *      added or removed since the snapshot). Either way: snapshot again.
 *      Neither counts as a failed acquire;
 *   4. when nothing suits the caller, km_pool_wait_change() with the
 *      snapshot's wake_seq sleeps on the pool's futex until a release, a
 *      key added, enabled or reset, the earliest cooldown or budget
 *      deadline, or the timeout, whichever comes first; then snapshot again.
 * Embedded and attached pools (the segment); a pool on the broker socket's
 * slow path returns KM_INVALID_ARGUMENT. A snapshot announces a sleeper, so
 * the next release (by any process) makes one futex wake-up. */

#define KM_NAME_CAPACITY 64

/* One key at the snapshot. km_key_view_init() sets struct_size; the
 * array's stride is its first element's struct_size. Output only, except
 * that km_pool_acquire_this_key reads slot, generation and fingerprint. */
typedef struct km_key_view {
  uint32_t struct_size;        /* sizeof(km_key_view); set by km_key_view_init() */
  uint32_t slot;               /* with generation and fingerprint: the key's identity */
  uint64_t generation;         /* the pool's key generation at the snapshot */
  uint64_t fingerprint;        /* salted hash of the secret (never the secret) */
  char name[KM_NAME_CAPACITY]; /* NUL-terminated */
  /* This process's copy of the secret, valid until the pool is closed;
   * NULL when this process does not know it yet. */
  const char* secret;
  uint32_t eligible;        /* 1: every check an acquire makes passed */
  uint32_t in_flight;       /* leases held, all processes */
  uint32_t max_concurrency; /* 0: unlimited */
  uint32_t weight;
  uint32_t fail_streak; /* consecutive failures */
  uint32_t has_latency; /* 1: latency_avg holds at least one sample */
  uint64_t successes;
  uint64_t failures;
  double cooldown_remaining; /* seconds, 0: not cooling */
  double latency_avg;        /* seconds (EMA) */
  double last_used_ago;      /* seconds since the last acquire, -1 if never */
} km_key_view;

/* The pool at the snapshot; km_snapshot_info_init() sets struct_size. */
typedef struct km_snapshot_info {
  uint32_t struct_size;  /* sizeof(km_snapshot_info); set by km_snapshot_info_init() */
  uint32_t count;        /* keys in the pool; above `capacity` only the first were written */
  uint64_t generation;   /* as in each view */
  uint32_t wake_seq;     /* for km_pool_wait_change */
  uint32_t max_failures; /* the pool's */
  double next_change;    /* seconds until the earliest cooldown or budget deadline, -1 if none */
  int32_t strategy;      /* the pool's KM_ROUND_ROBIN / KM_LEAST_BUSY / KM_WEIGHTED */
} km_snapshot_info;

KEYMESH_EXPORT int km_key_view_init(km_key_view* view);
KEYMESH_EXPORT int km_snapshot_info_init(km_snapshot_info* info);
/* Writes up to `capacity` views (views may be NULL when capacity is 0) and
 * *info. */
KEYMESH_EXPORT int km_pool_snapshot(km_pool* pool, km_key_view* views, size_t capacity, km_snapshot_info* info);
/* Acquires the key `view` names (see above), remembered as held by this
 * process as km_pool_acquire_key_ex does. `options` (NULL: the defaults):
 * only tokens is used; flags must be 0 or KM_ACQUIRE_POLL (it never waits
 * either way). */
KEYMESH_EXPORT int km_pool_acquire_this_key(km_pool* pool, const km_key_view* view, const km_acquire_options* options,
                                            km_held* out);
/* Sleeps as described above, at most `timeout` seconds; KM_OK also on
 * timeout (the caller keeps its own deadline). KM_CLOSED when `cancel`
 * (may be NULL) is triggered or the pool is closed. */
KEYMESH_EXPORT int km_pool_wait_change(km_pool* pool, uint32_t wake_seq, double timeout, km_cancel* cancel);

/* ---- Broker helpers ----------------------------------------------------- */

/* Asks the broker at `socket_path` (NULL or "": $KEYMESH_SOCKET, else the
 * default) to reclaim at once the leases of process `pid`, which has
 * exited (gunicorn child_exit). *reclaimed (may be NULL) receives how many
 * leases were freed, when the broker says. */
KEYMESH_EXPORT int km_broker_reclaim(const char* socket_path, int32_t pid, uint32_t* reclaimed);

/* ---- Restoring an embedded pool's keys (the Python package's storage=) --- */

/* A key's progress from an earlier run, kept by the caller's own storage;
 * km_key_restore_init() sets the struct size and the defaults (zero
 * counters, no latency sample, no cooldown). Size-prefixed like the option
 * structs above. */
typedef struct km_key_restore {
  uint32_t struct_size;        /* sizeof(km_key_restore); set by km_key_restore_init() */
  uint32_t has_latency;        /* 1: latency_avg holds a sample; 0: none */
  uint64_t success_count;      /* successes so far */
  uint64_t failure_count;      /* failures so far (not a streak: nothing is exhausted) */
  uint64_t rate_limited_count; /* 429s so far */
  double latency_avg;          /* seconds, finite, 0 <= x <= 1e9; read only when has_latency */
  double cooldown_remaining;   /* seconds from now, finite, 0 <= x <= 1e9 */
} km_key_restore;

KEYMESH_EXPORT int km_key_restore_init(km_key_restore* restore);
/* Overwrites key `name`'s success, failure and 429 counters and latency
 * average with `restore`'s, and cools it for restore->cooldown_remaining
 * seconds (capped at max(max_cooldown, default_cooldown)) unless it already
 * cools longer; its streaks, circuit, enabled flag and leases stay. Any
 * process of the pool may call it. KM_INVALID_ARGUMENT for a value out of
 * range (nothing is written) and for an attached pool (the broker restores
 * it from its state file); KM_UNKNOWN_KEY for an unknown name. */
KEYMESH_EXPORT int km_pool_restore_key(km_pool* pool, const char* name, const km_key_restore* restore);

#ifdef __cplusplus
}  // extern "C"
#endif

#endif /* KEYMESH_KEYMESH_H_ */
