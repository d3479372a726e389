/* keymesh.h compiled as C11 (-pedantic): calls every function of the C ABI
 * against embedded pools (and a connect to a socket nobody listens on), the
 * deprecated wrappers included; c_api_coverage_test fails the build's tests
 * when a function of keymesh.h is not called here. Exits 0 when every check
 * holds; prints the failing check otherwise. */
#include <math.h>
#include <pthread.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "keymesh/keymesh.h"

static int g_failures = 0;

#define CHECK(cond)                                                                                              \
  do {                                                                                                           \
    if (!(cond)) {                                                                                               \
      fprintf(stderr, "%s:%d: CHECK failed: %s (last error: %s)\n", __FILE__, __LINE__, #cond, km_last_error()); \
      ++g_failures;                                                                                              \
    }                                                                                                            \
  } while (0)

#define CHECK_RC(expr, want) CHECK((expr) == (want))

static double now_seconds(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* The number after the first `field` (e.g. "\"burst\":") in `json`, or NAN. */
static double json_number(const char* json, const char* field) {
  const char* at = json != NULL ? strstr(json, field) : NULL;
  return at != NULL ? strtod(at + strlen(field), NULL) : NAN;
}

static void key_specs(km_key_spec* keys, size_t n) {
  for (size_t i = 0; i < n; ++i) CHECK_RC(km_key_spec_init(&keys[i]), KM_OK);
}

/* A key spec with the defaults and this name and secret. */
static void key_spec(km_key_spec* k, const char* name, const char* secret) {
  CHECK_RC(km_key_spec_init(k), KM_OK);
  k->name = name;
  k->secret = secret;
}

static km_pool* make_pool(int strategy, uint32_t max_failures) {
  km_key_spec keys[3];
  key_spec(&keys[0], "alpha", "sk-test-alpha-0000000001");
  key_spec(&keys[1], "beta", "sk-test-beta-00000000002");
  key_spec(&keys[2], NULL, "sk-test-gamma-0000000003"); /* generated name */
  km_pool_options opts;
  CHECK_RC(km_pool_options_init(&opts), KM_OK);
  opts.strategy = strategy;
  opts.max_failures = max_failures;
  opts.acquire_timeout = 0.05;
  km_pool* pool = NULL;
  CHECK_RC(km_pool_create(keys, 3, &opts, &pool), KM_OK);
  CHECK(pool != NULL);
  return pool;
}

static void test_errors_and_version(void) {
  const char* v = NULL;
  CHECK_RC(km_version(&v), KM_OK);
  CHECK(v != NULL && strlen(v) > 0);
  CHECK(strcmp(km_code_name(KM_NO_AVAILABLE_KEY), "no_available_key") == 0);
  CHECK(strcmp(km_code_name(KM_NOT_HELD), "not_held") == 0);
  CHECK(strcmp(km_code_name(999), "unknown") == 0);
  km_pool_options opts;
  CHECK_RC(km_pool_options_init(&opts), KM_OK);
  CHECK(opts.strategy == KM_LEAST_BUSY);
  CHECK(opts.default_cooldown == 60.0 && opts.max_failures == 10 && opts.acquire_timeout == 30.0);

  km_pool* pool = NULL;
  CHECK_RC(km_pool_create(NULL, 0, NULL, &pool), KM_INVALID_ARGUMENT);
  CHECK(strlen(km_last_error()) > 0);
  km_key_spec dup[2];
  key_specs(dup, 2);
  dup[0].secret = "same-secret-123456";
  dup[1].secret = "same-secret-123456";
  CHECK_RC(km_pool_create(dup, 2, NULL, &pool), KM_INVALID_ARGUMENT);
  CHECK(strstr(km_last_error(), "same-secret") == NULL); /* never echoes a secret */
  opts.strategy = 42;
  CHECK_RC(km_pool_create(dup, 1, &opts, &pool), KM_INVALID_ARGUMENT);
  CHECK_RC(km_string_free(NULL), KM_OK);
}

static void test_lease_handles(void) {
  km_pool* pool = make_pool(KM_ROUND_ROBIN, 2);
  km_lease* lease = NULL;
  CHECK_RC(km_pool_acquire(pool, KM_DEFAULT, &lease), KM_OK);
  const char* secret = NULL;
  const char* name = NULL;
  CHECK_RC(km_lease_info(lease, &secret, &name), KM_OK);
  CHECK(strcmp(name, "alpha") == 0); /* round robin starts at the first key */
  CHECK(strcmp(secret, "sk-test-alpha-0000000001") == 0);
  CHECK_RC(km_lease_release(lease, 0.5, 10), KM_OK);
  CHECK_RC(km_lease_release(lease, 0.5, 10), KM_NOT_HELD); /* double release */
  CHECK_RC(km_lease_info(lease, &secret, &name), KM_NOT_HELD);
  CHECK_RC(km_lease_destroy(lease), KM_OK);

  CHECK_RC(km_pool_try_acquire(pool, &lease), KM_OK);
  CHECK_RC(km_lease_release(lease, -5.0, 0), KM_INVALID_ARGUMENT); /* not ended */
  CHECK_RC(km_lease_release(lease, KM_LATENCY_MEASURED, 0), KM_OK);
  CHECK_RC(km_lease_destroy(lease), KM_OK);

  CHECK_RC(km_pool_acquire(pool, 1.0, &lease), KM_OK);
  CHECK_RC(km_lease_cancel(lease), KM_OK);
  CHECK_RC(km_lease_destroy(lease), KM_OK);

  /* max_failures 2: the second failure exhausts, reported once. */
  CHECK_RC(km_pool_reset_key(pool, "alpha"), KM_OK);
  int exhausted = 0;
  for (int i = 0; i < 6 && !exhausted; ++i) {
    CHECK_RC(km_pool_acquire(pool, 1.0, &lease), KM_OK);
    km_lease_info(lease, NULL, &name);
    int is_beta = strcmp(name, "beta") == 0;
    int rc = is_beta ? km_lease_mark_failed(lease) : km_lease_release(lease, KM_LATENCY_NONE, 0);
    if (is_beta && rc == KM_KEY_EXHAUSTED) exhausted = 1;
    CHECK(rc == KM_OK || rc == KM_KEY_EXHAUSTED);
    CHECK_RC(km_lease_destroy(lease), KM_OK);
  }
  CHECK(exhausted);
  uint32_t available = 0;
  CHECK_RC(km_pool_available_count(pool, &available), KM_OK);
  CHECK(available == 2);

  /* 429 with an explicit cooldown takes the key out of rotation. */
  CHECK_RC(km_pool_acquire(pool, 1.0, &lease), KM_OK);
  CHECK_RC(km_lease_mark_rate_limited(lease, 30.0), KM_OK);
  CHECK_RC(km_lease_destroy(lease), KM_OK);
  CHECK_RC(km_pool_available_count(pool, &available), KM_OK);
  CHECK(available == 1);
  CHECK_RC(km_pool_acquire(pool, 1.0, &lease), KM_OK);
  CHECK_RC(km_lease_mark_rate_limited(lease, KM_DEFAULT), KM_OK);
  CHECK_RC(km_lease_destroy(lease), KM_OK);
  double t0 = now_seconds();
  CHECK_RC(km_pool_acquire(pool, 0.05, &lease), KM_NO_AVAILABLE_KEY);
  CHECK(now_seconds() - t0 < 1.0);
  CHECK_RC(km_pool_try_acquire(pool, &lease), KM_NO_AVAILABLE_KEY);
  CHECK_RC(km_lease_destroy(NULL), KM_OK);
  CHECK_RC(km_pool_destroy(pool), KM_OK);
}

static void test_keys_by_secret(void) {
  km_pool* pool = make_pool(KM_LEAST_BUSY, 10);
  km_held a, b;
  CHECK_RC(km_pool_acquire_key(pool, KM_DEFAULT, NULL, &a), KM_OK);
  CHECK_RC(km_pool_acquire_key(pool, KM_DEFAULT, NULL, &b), KM_OK);
  CHECK(a.ticket != 0 && b.ticket != 0 && a.ticket != b.ticket);
  CHECK(strcmp(a.secret, b.secret) != 0); /* least busy spreads */
  uint32_t held = 0;
  CHECK_RC(km_pool_held_count(pool, NULL, &held), KM_OK);
  CHECK(held == 2);
  CHECK_RC(km_pool_held_count(pool, a.secret, &held), KM_OK);
  CHECK(held == 1);

  CHECK_RC(km_pool_release_key(pool, a.secret, 0, 0.5, 0), KM_OK);
  CHECK_RC(km_pool_release_key(pool, a.secret, 0, 0.5, 0), KM_NOT_HELD);
  CHECK_RC(km_pool_release_key(pool, "sk-not-in-this-pool-000", 0, 0.5, 0), KM_UNKNOWN_KEY);
  CHECK(strstr(km_last_error(), "sk-not-in") == NULL);
  CHECK_RC(km_pool_mark_failed_key(pool, b.secret, a.ticket), KM_NOT_HELD); /* wrong ticket */
  CHECK_RC(km_pool_mark_failed_key(pool, b.secret, b.ticket), KM_OK);

  km_held c;
  CHECK_RC(km_pool_poll_key(pool, &c), KM_OK);
  CHECK_RC(km_pool_mark_rate_limited_key(pool, c.secret, c.ticket, 0.0), KM_OK);
  CHECK_RC(km_pool_acquire_key(pool, 1.0, NULL, &c), KM_OK);
  CHECK_RC(km_pool_cancel_key(pool, c.secret, 0), KM_OK);
  CHECK_RC(km_pool_held_count(pool, NULL, &held), KM_OK);
  CHECK(held == 0);

  char* name = NULL;
  CHECK_RC(km_pool_key_name(pool, "sk-test-gamma-0000000003", &name), KM_OK);
  CHECK(name != NULL && strncmp(name, "key-", 4) == 0);
  km_string_free(name);
  CHECK_RC(km_pool_key_name(pool, "nope-nope-nope", &name), KM_UNKNOWN_KEY);

  /* Admin. */
  km_key_spec extra;
  CHECK_RC(km_key_spec_init(&extra), KM_OK);
  extra.name = "delta";
  extra.secret = "sk-test-delta-0000000004";
  extra.weight = 3;
  CHECK_RC(km_pool_add_key(pool, &extra), KM_OK);
  uint32_t available = 0;
  CHECK_RC(km_pool_available_count(pool, &available), KM_OK);
  CHECK(available == 4);
  CHECK_RC(km_pool_disable_key(pool, "delta"), KM_OK);
  CHECK_RC(km_pool_available_count(pool, &available), KM_OK);
  CHECK(available == 3);
  CHECK_RC(km_pool_enable_key(pool, "delta"), KM_OK);
  CHECK_RC(km_pool_remove_key(pool, "delta"), KM_OK);
  CHECK_RC(km_pool_remove_key(pool, "delta"), KM_UNKNOWN_KEY);
  CHECK_RC(km_pool_reset_key(pool, "no-such-key"), KM_UNKNOWN_KEY);

  char* json = NULL;
  CHECK_RC(km_pool_status_json(pool, &json), KM_OK);
  CHECK(json != NULL);
  if (json != NULL) {
    CHECK(strstr(json, "\"pool_metrics\"") != NULL);
    CHECK(strstr(json, "\"total_acquires\"") != NULL);
    CHECK(strstr(json, "\"key_suffix\":\"...0001\"") != NULL);
    CHECK(strstr(json, "\"share_active\":false") != NULL); /* the mesh share fields travel */
    CHECK(strstr(json, "sk-test") == NULL);                /* no secret */
    km_string_free(json);
  }

  /* A held key left at close is cancelled; every later call says closed. */
  CHECK_RC(km_pool_acquire_key(pool, 1.0, NULL, &c), KM_OK);
  CHECK_RC(km_pool_close(pool), KM_OK);
  CHECK_RC(km_pool_close(pool), KM_OK);
  CHECK_RC(km_pool_available_count(pool, &available), KM_CLOSED);
  CHECK_RC(km_pool_acquire_key(pool, 1.0, NULL, &c), KM_CLOSED);
  CHECK_RC(km_pool_destroy(pool), KM_OK);
}

struct waiter_arg {
  km_pool* pool;
  km_cancel* token;
  int rc;
  double waited;
};

static void* waiter(void* p) {
  struct waiter_arg* a = (struct waiter_arg*)p;
  km_held h;
  double t0 = now_seconds();
  a->rc = km_pool_acquire_key(a->pool, 20.0, a->token, &h);
  a->waited = now_seconds() - t0;
  return NULL;
}

static void test_cancel_and_close_wake_waiters(void) {
  km_key_spec key;
  CHECK_RC(km_key_spec_init(&key), KM_OK);
  key.secret = "sk-only-one-key-00000009";
  key.max_concurrency = 1;
  km_pool* pool = NULL;
  CHECK_RC(km_pool_create(&key, 1, NULL, &pool), KM_OK);
  km_held h;
  CHECK_RC(km_pool_acquire_key(pool, KM_DEFAULT, NULL, &h), KM_OK); /* the only key is busy now */

  struct waiter_arg a = {pool, NULL, -1, 0.0};
  CHECK_RC(km_cancel_create(pool, &a.token), KM_OK);
  pthread_t t;
  pthread_create(&t, NULL, waiter, &a);
  /* Triggered before or during the wait: either way the wait ends. */
  CHECK_RC(km_cancel_trigger(a.token), KM_OK);
  pthread_join(t, NULL);
  CHECK(a.rc == KM_CLOSED);
  CHECK(a.waited < 5.0);
  CHECK_RC(km_cancel_destroy(a.token), KM_OK);
  CHECK_RC(km_cancel_destroy(NULL), KM_OK);

  /* A sync waiter (no token) is woken by close. */
  struct waiter_arg b = {pool, NULL, -1, 0.0};
  pthread_create(&t, NULL, waiter, &b);
  CHECK_RC(km_pool_close(pool), KM_OK);
  pthread_join(t, NULL);
  CHECK(b.rc == KM_CLOSED);
  CHECK(b.waited < 5.0);
  CHECK_RC(km_pool_destroy(pool), KM_OK);
}

static void test_fork_child_holds_nothing(void) {
  km_pool* pool = make_pool(KM_LEAST_BUSY, 10);
  km_held h;
  CHECK_RC(km_pool_acquire_key(pool, KM_DEFAULT, NULL, &h), KM_OK);
  pid_t pid = fork();
  if (pid == 0) {
    int bad = 0;
    uint32_t held = 99;
    if (km_pool_held_count(pool, NULL, &held) != KM_OK || held != 0) bad |= 1;
    if (km_pool_release_key(pool, h.secret, 0, 0.1, 0) != KM_NOT_HELD) bad |= 2; /* the parent's lease */
    km_held mine;
    if (km_pool_acquire_key(pool, 1.0, NULL, &mine) != KM_OK)
      bad |= 4;
    else if (km_pool_release_key(pool, mine.secret, mine.ticket, 0.1, 0) != KM_OK)
      bad |= 8;
    km_pool_destroy(pool);
    _exit(bad);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  /* A child killed while holding a key: its lease is reclaimed. */
  pid = fork();
  if (pid == 0) {
    km_held mine;
    if (km_pool_acquire_key(pool, 1.0, NULL, &mine) != KM_OK) _exit(1);
    _exit(0); /* exits holding it */
  }
  waitpid(pid, &status, 0);
  CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  uint32_t reclaimed = 0;
  CHECK_RC(km_pool_reclaim_dead(pool, &reclaimed), KM_OK);
  CHECK(reclaimed == 1);
  uint32_t held = 0;
  CHECK_RC(km_pool_held_count(pool, NULL, &held), KM_OK);
  CHECK(held == 1);
  CHECK_RC(km_pool_release_key(pool, h.secret, h.ticket, 0.1, 0), KM_OK);
  char* json = NULL;
  CHECK_RC(km_pool_status_json(pool, &json), KM_OK);
  if (json != NULL) {
    CHECK(strstr(json, "\"total_acquires\":3") != NULL);
    CHECK(strstr(json, "\"total_releases\":2") != NULL);
    km_string_free(json);
  }
  CHECK_RC(km_pool_destroy(pool), KM_OK);
}

/* The size-prefixed structs: defaults, refusal of a missing or foreign
 * struct_size, a newer caller's larger struct taken when its unknown tail
 * is zero. */
static void test_option_structs(void) {
  km_key_spec k;
  memset(&k, 0xAB, sizeof(k));
  CHECK_RC(km_key_spec_init(&k), KM_OK);
  CHECK(k.struct_size == sizeof(km_key_spec));
  CHECK(k.weight == 1 && k.name == NULL && k.secret == NULL && k.max_concurrency == 0 && k.rpm == 0 && k.tpm == 0);
  CHECK(k.burst == 0 && k.rate_margin == KM_DEFAULT);
  km_acquire_options a;
  CHECK_RC(km_acquire_options_init(&a), KM_OK);
  CHECK(a.struct_size == sizeof(km_acquire_options) && a.flags == 0 && a.timeout == KM_DEFAULT && a.tokens == 0 &&
        a.cancel == NULL);
  km_end_options e;
  CHECK_RC(km_end_options_init(&e), KM_OK);
  CHECK(e.struct_size == sizeof(km_end_options) && e.outcome == KM_OUTCOME_SUCCESS && e.flags == 0);
  CHECK(e.latency == KM_LATENCY_MEASURED && e.tokens == 0 && e.cooldown == KM_DEFAULT);
  km_pool_options o;
  CHECK_RC(km_pool_options_init(&o), KM_OK);
  CHECK(o.struct_size == sizeof(km_pool_options) && o.rate_margin == 0.02);
  CHECK(o.max_lease_seconds == 600.0 && o.max_cooldown == 600.0);
  CHECK_RC(km_pool_options_init(NULL), KM_INVALID_ARGUMENT);
  CHECK_RC(km_key_spec_init(NULL), KM_INVALID_ARGUMENT);

  km_pool* pool = NULL;
  k.secret = "sk-struct-size-00000001";
  k.struct_size = 0; /* a struct never initialised */
  CHECK_RC(km_pool_create(&k, 1, NULL, &pool), KM_INVALID_ARGUMENT);
  CHECK(strstr(km_last_error(), "km_key_spec_init") != NULL);
  k.struct_size = 8; /* below the first version */
  CHECK_RC(km_pool_create(&k, 1, NULL, &pool), KM_INVALID_ARGUMENT);
  k.struct_size = 0xFFFFFFFFu; /* garbage: refused without being read */
  CHECK_RC(km_pool_create(&k, 1, NULL, &pool), KM_INVALID_ARGUMENT);
  k.struct_size = sizeof(km_key_spec);
  o.struct_size = 0;
  CHECK_RC(km_pool_create(&k, 1, &o, &pool), KM_INVALID_ARGUMENT);
  CHECK(strstr(km_last_error(), "km_pool_options") != NULL);

  /* A caller built against a newer header: a larger struct. */
  struct {
    km_pool_options base;
    uint64_t newer_field;
  } newer;
  memset(&newer, 0, sizeof(newer));
  CHECK_RC(km_pool_options_init(&newer.base), KM_OK);
  newer.base.struct_size = sizeof(newer);
  newer.base.acquire_timeout = 0.0;
  newer.newer_field = 7; /* a setting this library cannot honour */
  CHECK_RC(km_pool_create(&k, 1, &newer.base, &pool), KM_INVALID_ARGUMENT);
  CHECK(strstr(km_last_error(), "newer") != NULL);
  newer.newer_field = 0; /* left at its default: fine */
  CHECK_RC(km_pool_create(&k, 1, &newer.base, &pool), KM_OK);

  /* An array of larger key specs: the stride is their struct_size. */
  struct {
    km_key_spec base;
    uint64_t newer_field;
  } wide[2];
  memset(wide, 0, sizeof(wide));
  for (int i = 0; i < 2; ++i) {
    CHECK_RC(km_key_spec_init(&wide[i].base), KM_OK);
    wide[i].base.struct_size = sizeof(wide[0]);
  }
  wide[0].base.secret = "sk-wide-spec-000000000001";
  wide[1].base.secret = "sk-wide-spec-000000000002";
  wide[1].base.name = "second";
  km_pool* wide_pool = NULL;
  CHECK_RC(km_pool_create(&wide[0].base, 2, NULL, &wide_pool), KM_OK);
  char* name = NULL;
  CHECK_RC(km_pool_key_name(wide_pool, "sk-wide-spec-000000000002", &name), KM_OK);
  CHECK(name != NULL && strcmp(name, "second") == 0);
  km_string_free(name);
  wide[1].base.struct_size = sizeof(km_key_spec); /* mixed sizes in one array */
  km_pool* mixed = NULL;
  CHECK_RC(km_pool_create(&wide[0].base, 2, NULL, &mixed), KM_INVALID_ARGUMENT);
  CHECK_RC(km_pool_destroy(wide_pool), KM_OK);

  /* Acquire and end options are checked the same way. */
  km_lease* lease = NULL;
  a.struct_size = 0;
  CHECK_RC(km_pool_acquire_ex(pool, &a, &lease), KM_INVALID_ARGUMENT);
  CHECK_RC(km_acquire_options_init(&a), KM_OK);
  a.flags = 0x80;
  CHECK_RC(km_pool_acquire_ex(pool, &a, &lease), KM_INVALID_ARGUMENT);
  CHECK_RC(km_pool_acquire_ex(pool, NULL, &lease), KM_OK);
  e.struct_size = 3;
  CHECK_RC(km_lease_end(lease, &e), KM_INVALID_ARGUMENT);
  CHECK_RC(km_lease_info(lease, NULL, NULL), KM_OK); /* still held */
  CHECK_RC(km_lease_end(lease, NULL), KM_OK);        /* a success, measured */
  CHECK_RC(km_lease_destroy(lease), KM_OK);
  CHECK_RC(km_pool_destroy(pool), KM_OK);
}

/* burst and rate_margin from C reach the pool (pool-wide and per key). */
static void test_burst_and_rate_margin(void) {
  km_key_spec keys[2];
  key_spec(&keys[0], "paced", "sk-paced-key-000000000001");
  keys[0].rpm = 600;
  keys[0].burst = 4;
  keys[0].rate_margin = 0.25;
  key_spec(&keys[1], "plain", "sk-plain-key-000000000002");
  km_pool_options opts;
  CHECK_RC(km_pool_options_init(&opts), KM_OK);
  opts.rate_margin = 0.125;
  km_pool* pool = NULL;
  CHECK_RC(km_pool_create(keys, 2, &opts, &pool), KM_OK);
  char* json = NULL;
  CHECK_RC(km_pool_status_json(pool, &json), KM_OK);
  CHECK(json_number(json, "\"rate_margin\":") == 0.125); /* options come first */
  const char* paced = json != NULL ? strstr(json, "\"name\":\"paced\"") : NULL;
  const char* plain = json != NULL ? strstr(json, "\"name\":\"plain\"") : NULL;
  CHECK(paced != NULL && plain != NULL);
  CHECK(json_number(paced, "\"burst\":") == 4.0);
  CHECK(json_number(paced, "\"rate_margin\":") == 0.25);
  CHECK(json_number(plain, "\"burst\":") == 0.0);
  CHECK(json_number(plain, "\"rate_margin\":") == -1.0); /* the pool's */
  km_string_free(json);

  km_key_spec bad;
  CHECK_RC(km_key_spec_init(&bad), KM_OK);
  bad.secret = "sk-bad-margin-0000000003";
  bad.rate_margin = 0.7;
  CHECK_RC(km_pool_add_key(pool, &bad), KM_INVALID_ARGUMENT);
  CHECK(strstr(km_last_error(), "rate_margin") != NULL);
  bad.rate_margin = KM_DEFAULT;
  bad.burst = 2000000;
  CHECK_RC(km_pool_add_key(pool, &bad), KM_INVALID_ARGUMENT);
  CHECK(strstr(km_last_error(), "burst") != NULL);
  bad.burst = 2;
  CHECK_RC(km_pool_add_key(pool, &bad), KM_OK);
  CHECK_RC(km_pool_destroy(pool), KM_OK);

  km_pool* refused = NULL;
  opts.rate_margin = 0.6;
  CHECK_RC(km_pool_create(keys, 2, &opts, &refused), KM_INVALID_ARGUMENT);

  /* A pool-wide burst (version 3): the keys created or added with burst 0
   * get it; a key's own burst wins. */
  CHECK_RC(km_pool_options_init(&opts), KM_OK);
  CHECK(opts.burst == 0);
  opts.burst = 3;
  CHECK_RC(km_pool_create(keys, 2, &opts, &pool), KM_OK);
  km_key_spec added;
  CHECK_RC(km_key_spec_init(&added), KM_OK);
  added.name = "added";
  added.secret = "sk-added-key-000000000004";
  CHECK_RC(km_pool_add_key(pool, &added), KM_OK);
  CHECK_RC(km_pool_status_json(pool, &json), KM_OK);
  paced = json != NULL ? strstr(json, "\"name\":\"paced\"") : NULL;
  plain = json != NULL ? strstr(json, "\"name\":\"plain\"") : NULL;
  const char* added_at = json != NULL ? strstr(json, "\"name\":\"added\"") : NULL;
  CHECK(paced != NULL && plain != NULL && added_at != NULL);
  CHECK(json_number(paced, "\"burst\":") == 4.0);
  CHECK(json_number(plain, "\"burst\":") == 3.0);
  CHECK(json_number(added_at, "\"burst\":") == 3.0);
  km_string_free(json);
  CHECK_RC(km_pool_destroy(pool), KM_OK);
  opts.burst = 1000001; /* range-checked, and named */
  CHECK_RC(km_pool_create(keys, 2, &opts, &refused), KM_INVALID_ARGUMENT);
  CHECK(strstr(km_last_error(), "burst") != NULL);
  /* A caller built against version 2 never sets it: no pool-wide burst. */
  opts.struct_size = (uint32_t)offsetof(km_pool_options, burst);
  CHECK_RC(km_pool_create(keys, 2, &opts, &pool), KM_OK);
  CHECK_RC(km_pool_status_json(pool, &json), KM_OK);
  plain = json != NULL ? strstr(json, "\"name\":\"plain\"") : NULL;
  CHECK(plain != NULL && json_number(plain, "\"burst\":") == 0.0);
  km_string_free(json);
  CHECK_RC(km_pool_destroy(pool), KM_OK);
}

/* The general acquire and end calls, on both kinds of holding a key. */
static void test_acquire_and_end_options(void) {
  /* Tokens reserved up front from a key's TPM budget (at most one second
   * of it may be spent ahead). */
  km_key_spec budget_key;
  CHECK_RC(km_key_spec_init(&budget_key), KM_OK);
  budget_key.name = "budget";
  budget_key.secret = "sk-budget-key-0000000001";
  budget_key.tpm = 1000;
  km_pool* budget = NULL;
  CHECK_RC(km_pool_create(&budget_key, 1, NULL, &budget), KM_OK);
  km_acquire_options a;
  CHECK_RC(km_acquire_options_init(&a), KM_OK);
  a.flags = KM_ACQUIRE_POLL;
  km_held h1, h2;
  CHECK_RC(km_pool_acquire_key_ex(budget, &a, &h1), KM_OK); /* no tokens: nothing reserved */
  CHECK_RC(km_pool_acquire_key_ex(budget, &a, &h2), KM_OK);
  CHECK_RC(km_pool_end_key(budget, h1.secret, h1.ticket, NULL), KM_OK);
  CHECK_RC(km_pool_end_key(budget, h2.secret, h2.ticket, NULL), KM_OK);
  a.flags = 0;
  a.tokens = 900;
  a.timeout = 1.0;
  km_lease* lease = NULL;
  CHECK_RC(km_pool_acquire_ex(budget, &a, &lease), KM_OK);
  km_end_options e;
  CHECK_RC(km_end_options_init(&e), KM_OK);
  e.latency = 0.5;
  e.tokens = 900;
  CHECK_RC(km_lease_end(lease, &e), KM_OK);
  CHECK_RC(km_lease_end(lease, &e), KM_NOT_HELD);
  CHECK_RC(km_lease_destroy(lease), KM_OK);
  /* The budget is spent for most of a minute: a poll finds nothing and
   * counts no failed acquire; a plain attempt counts one. */
  a.flags = KM_ACQUIRE_POLL;
  a.tokens = 10;
  CHECK_RC(km_pool_acquire_key_ex(budget, &a, &h1), KM_NO_AVAILABLE_KEY);
  char* json = NULL;
  CHECK_RC(km_pool_status_json(budget, &json), KM_OK);
  CHECK(json_number(json, "\"no_key_available_count\":") == 0.0);
  CHECK(json_number(json, "\"tokens\":") == 900.0);
  km_string_free(json);
  a.flags = 0;
  a.timeout = 0.0;
  CHECK_RC(km_pool_acquire_ex(budget, &a, &lease), KM_NO_AVAILABLE_KEY);
  CHECK_RC(km_pool_status_json(budget, &json), KM_OK);
  CHECK(json_number(json, "\"no_key_available_count\":") == 1.0);
  km_string_free(json);
  CHECK_RC(km_pool_destroy(budget), KM_OK);

  km_key_spec keys[2];
  key_spec(&keys[0], "first", "sk-first-key-00000000001");
  key_spec(&keys[1], "spare", "sk-spare-key-00000000002");
  km_pool_options opts;
  CHECK_RC(km_pool_options_init(&opts), KM_OK);
  opts.strategy = KM_ROUND_ROBIN;
  opts.max_failures = 5;
  opts.acquire_timeout = 0.05;
  km_pool* pool = NULL;
  CHECK_RC(km_pool_create(keys, 2, &opts, &pool), KM_OK);
  CHECK_RC(km_acquire_options_init(&a), KM_OK);
  CHECK_RC(km_pool_acquire_key_ex(pool, &a, &h1), KM_OK);
  CHECK_RC(km_pool_acquire_key_ex(pool, NULL, &h2), KM_OK);
  CHECK(strcmp(h1.name, "first") == 0 && strcmp(h2.name, "spare") == 0);

  /* Ending held keys with options: bad arguments leave the lease held. */
  CHECK_RC(km_end_options_init(&e), KM_OK);
  e.flags = KM_END_PERMANENT; /* only a failure can be permanent */
  CHECK_RC(km_pool_end_key(pool, h1.secret, h1.ticket, &e), KM_INVALID_ARGUMENT);
  e.flags = 0;
  e.outcome = 9;
  CHECK_RC(km_pool_end_key(pool, h1.secret, h1.ticket, &e), KM_INVALID_ARGUMENT);
  e.outcome = KM_OUTCOME_RATE_LIMITED;
  e.cooldown = -4.0;
  CHECK_RC(km_pool_end_key(pool, h1.secret, h1.ticket, &e), KM_INVALID_ARGUMENT);
  uint32_t held = 0;
  CHECK_RC(km_pool_held_count(pool, NULL, &held), KM_OK);
  CHECK(held == 2);
  e.cooldown = 0.0;
  e.tokens = 5;
  CHECK_RC(km_pool_end_key(pool, h1.secret, h1.ticket, &e), KM_OK);
  CHECK_RC(km_pool_end_key(pool, h1.secret, h1.ticket, &e), KM_NOT_HELD);
  CHECK_RC(km_pool_end_key(pool, "sk-not-in-this-pool-000", 0, NULL), KM_UNKNOWN_KEY);
  CHECK_RC(km_pool_end_key(pool, h2.secret, 0, NULL), KM_OK); /* success, measured latency */

  /* Each outcome on a lease handle is counted as that outcome. */
  int outcomes[] = {KM_OUTCOME_FAILURE, KM_OUTCOME_CANCELLED, KM_OUTCOME_SUCCESS};
  for (int i = 0; i < 3; ++i) {
    CHECK_RC(km_pool_acquire_ex(pool, &a, &lease), KM_OK);
    CHECK_RC(km_end_options_init(&e), KM_OK);
    e.outcome = (uint32_t)outcomes[i];
    e.latency = KM_LATENCY_NONE;
    CHECK_RC(km_lease_end(lease, &e), KM_OK);
    CHECK_RC(km_lease_destroy(lease), KM_OK);
  }
  CHECK_RC(km_pool_status_json(pool, &json), KM_OK);
  CHECK(json_number(json, "\"total_failures\":") == 1.0);
  CHECK(json_number(json, "\"total_rate_limited\":") == 1.0);
  CHECK(json_number(json, "\"total_releases\":") == 2.0);
  CHECK(json_number(json, "\"tokens\":") == 5.0); /* the 429's, on the first key */
  km_string_free(json);

  /* A permanent failure revokes the key, reported once. */
  CHECK_RC(km_pool_acquire_ex(pool, &a, &lease), KM_OK);
  CHECK_RC(km_end_options_init(&e), KM_OK);
  e.outcome = KM_OUTCOME_FAILURE;
  e.flags = KM_END_PERMANENT;
  CHECK_RC(km_lease_end(lease, &e), KM_KEY_EXHAUSTED);
  CHECK_RC(km_lease_destroy(lease), KM_OK);
  uint32_t available = 0;
  CHECK_RC(km_pool_available_count(pool, &available), KM_OK);
  CHECK(available == 1);

  /* A cancel token from another pool is refused. */
  km_pool* other = make_pool(KM_LEAST_BUSY, 10);
  km_cancel* foreign = NULL;
  CHECK_RC(km_cancel_create(other, &foreign), KM_OK);
  a.cancel = foreign;
  CHECK_RC(km_pool_acquire_ex(pool, &a, &lease), KM_INVALID_ARGUMENT);
  CHECK_RC(km_cancel_destroy(foreign), KM_OK);
  CHECK_RC(km_pool_destroy(other), KM_OK);
  CHECK_RC(km_pool_destroy(pool), KM_OK);
}

/* The deprecated suffix calls still do what they did. */
#if defined(__GNUC__) || defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
#endif
static void test_deprecated_wrappers(void) {
  km_key_spec keys[2];
  key_spec(&keys[0], "budget", "sk-deprecated-00000000001");
  keys[0].tpm = 1000;
  keys[0].max_concurrency = 1;
  key_spec(&keys[1], "other", "sk-deprecated-00000000002");
  keys[1].max_concurrency = 1;
  km_pool_options opts;
  CHECK_RC(km_pool_options_init(&opts), KM_OK);
  opts.strategy = KM_ROUND_ROBIN;
  km_pool* pool = NULL;
  CHECK_RC(km_pool_create(keys, 2, &opts, &pool), KM_OK);
  km_held h;
  CHECK_RC(km_pool_acquire_key_tokens(pool, 1.0, 900, NULL, &h), KM_OK);
  CHECK(strcmp(h.name, "budget") == 0);
  CHECK_RC(km_pool_release_key(pool, h.secret, h.ticket, 0.1, 900), KM_OK);
  /* The budget key is spent: the other one, then nothing (uncounted). */
  CHECK_RC(km_pool_poll_key_tokens(pool, 10, &h), KM_OK);
  CHECK(strcmp(h.name, "other") == 0);
  km_held none;
  CHECK_RC(km_pool_poll_key_tokens(pool, 10, &none), KM_NO_AVAILABLE_KEY);
  CHECK_RC(km_pool_mark_failed_key_permanent(pool, h.secret, h.ticket), KM_KEY_EXHAUSTED);
  CHECK_RC(km_pool_mark_failed_key_permanent(pool, h.secret, h.ticket), KM_NOT_HELD);
  char* json = NULL;
  CHECK_RC(km_pool_status_json(pool, &json), KM_OK);
  CHECK(json != NULL && strstr(json, "\"circuit\":\"revoked\"") != NULL);
  km_string_free(json);
  CHECK_RC(km_pool_destroy(pool), KM_OK);
}
#if defined(__GNUC__) || defined(__clang__)
#pragma GCC diagnostic pop
#endif

/* Provider headers: parsed, fed to the key with that secret. */
static void test_observe_limits_and_parsers(void) {
  km_pool* pool = make_pool(KM_LEAST_BUSY, 10);
  uint32_t available = 0;
  CHECK_RC(km_pool_available_count(pool, &available), KM_OK);
  CHECK(available == 3);
  const char* names[] = {"Content-Type", "Retry-After"};
  const char* values[] = {"application/json", "30"};
  CHECK_RC(km_pool_observe_limits(pool, "sk-test-beta-00000000002", names, values, 2), KM_OK);
  CHECK_RC(km_pool_available_count(pool, &available), KM_OK);
  CHECK(available == 2); /* beta cools for 30 s */
  CHECK_RC(km_pool_observe_limits(pool, "sk-test-beta-00000000002", NULL, NULL, 0), KM_OK);
  const char* bad_values[] = {"application/json", "soon-ish-secret-value"};
  CHECK_RC(km_pool_observe_limits(pool, "sk-test-alpha-0000000001", names, bad_values, 2), KM_INVALID_ARGUMENT);
  CHECK(strstr(km_last_error(), "Retry-After") != NULL || strstr(km_last_error(), "retry-after") != NULL);
  CHECK(strstr(km_last_error(), "soon-ish") == NULL); /* never echoes the value */
  CHECK_RC(km_pool_observe_limits(pool, "sk-not-in-this-pool-000", names, values, 2), KM_UNKNOWN_KEY);
  CHECK_RC(km_pool_observe_limits(pool, NULL, names, values, 2), KM_INVALID_ARGUMENT);
  CHECK_RC(km_pool_available_count(pool, &available), KM_OK);
  CHECK(available == 2);
  CHECK_RC(km_pool_destroy(pool), KM_OK);

  double seconds = -1;
  CHECK_RC(km_parse_retry_after("120", &seconds), KM_OK);
  CHECK(seconds == 120.0);
  CHECK_RC(km_parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", &seconds), KM_OK);
  CHECK(seconds == 0.0); /* a date in the past */
  seconds = -1;
  CHECK_RC(km_parse_retry_after("tomorrow", &seconds), KM_INVALID_ARGUMENT);
  CHECK(seconds == -1); /* not written on failure */
  CHECK_RC(km_parse_retry_after(NULL, &seconds), KM_INVALID_ARGUMENT);
  CHECK_RC(km_parse_duration("6m0s", &seconds), KM_OK);
  CHECK(seconds == 360.0);
  CHECK_RC(km_parse_duration("250ms", &seconds), KM_OK);
  CHECK(seconds == 0.25);
  CHECK_RC(km_parse_duration("1h2m3.5s", &seconds), KM_OK);
  CHECK(seconds == 3723.5);
  CHECK_RC(km_parse_duration("6 minutes", &seconds), KM_INVALID_ARGUMENT);
  CHECK_RC(km_parse_duration("1s", NULL), KM_INVALID_ARGUMENT);
}

static void test_broker_unavailable(void) {
  km_pool* pool = NULL;
  CHECK_RC(km_pool_connect("/nonexistent/keymesh-test.sock", "openai", &pool), KM_BROKER_UNAVAILABLE);
  uint32_t n = 0;
  CHECK_RC(km_broker_reclaim("/nonexistent/keymesh-test.sock", 12345, &n), KM_BROKER_UNAVAILABLE);
  CHECK_RC(km_broker_reclaim(NULL, 0, &n), KM_INVALID_ARGUMENT);
}

/* A scheduler outside the pool: snapshot, acquire the chosen key, a stale
 * view, a key no longer eligible, and the wait for a change. */
static void test_snapshot_and_acquire_this_key(void) {
  km_pool* pool = make_pool(KM_ROUND_ROBIN, 10);
  km_key_view views[4];
  km_snapshot_info info;
  CHECK_RC(km_key_view_init(&views[0]), KM_OK);
  CHECK_RC(km_snapshot_info_init(&info), KM_OK);
  CHECK(views[0].struct_size == sizeof(km_key_view) && views[0].last_used_ago == -1.0);
  CHECK_RC(km_pool_snapshot(pool, views, 4, &info), KM_OK);
  CHECK(info.count == 3 && info.strategy == KM_ROUND_ROBIN && info.max_failures == 10);
  CHECK(strcmp(views[1].name, "beta") == 0 && views[1].eligible == 1 && views[1].in_flight == 0);
  CHECK(views[1].secret != NULL && strcmp(views[1].secret, "sk-test-beta-00000000002") == 0);
  /* The chosen key, not round robin's first. */
  km_held held;
  CHECK_RC(km_pool_acquire_this_key(pool, &views[1], NULL, &held), KM_OK);
  CHECK(strcmp(held.name, "beta") == 0 && held.ticket != 0);
  km_key_view after[4];
  CHECK_RC(km_key_view_init(&after[0]), KM_OK);
  CHECK_RC(km_pool_snapshot(pool, after, 4, &info), KM_OK);
  CHECK(after[1].in_flight == 1);
  CHECK_RC(km_pool_release_key(pool, held.secret, held.ticket, 0.25, 0), KM_OK);
  /* No longer eligible between the snapshot and the acquire. */
  CHECK_RC(km_pool_disable_key(pool, "alpha"), KM_OK);
  CHECK_RC(km_pool_acquire_this_key(pool, &views[0], NULL, &held), KM_NO_AVAILABLE_KEY);
  CHECK_RC(km_pool_enable_key(pool, "alpha"), KM_OK);
  /* Stale: the key was removed since the snapshot. */
  CHECK_RC(km_pool_remove_key(pool, "gamma-not-a-name"), KM_UNKNOWN_KEY);
  CHECK_RC(km_pool_remove_key(pool, views[2].name), KM_OK);
  CHECK_RC(km_pool_acquire_this_key(pool, &views[2], NULL, &held), KM_UNKNOWN_KEY);
  /* A short buffer: count says how many there are. */
  CHECK_RC(km_pool_snapshot(pool, after, 1, &info), KM_OK);
  CHECK(info.count == 2);
  CHECK_RC(km_pool_snapshot(pool, NULL, 0, &info), KM_OK);
  CHECK_RC(km_pool_snapshot(pool, NULL, 1, &info), KM_INVALID_ARGUMENT);
  km_key_view bad = views[0];
  bad.struct_size = 8;
  CHECK_RC(km_pool_acquire_this_key(pool, &bad, NULL, &held), KM_INVALID_ARGUMENT);
  /* The wait: a change since the snapshot returns at once; a timeout ends it. */
  CHECK_RC(km_pool_snapshot(pool, after, 4, &info), KM_OK);
  CHECK_RC(km_pool_acquire_this_key(pool, &after[0], NULL, &held), KM_OK);
  CHECK_RC(km_pool_cancel_key(pool, held.secret, held.ticket), KM_OK);
  double t0 = now_seconds();
  CHECK_RC(km_pool_wait_change(pool, info.wake_seq, 10.0, NULL), KM_OK);
  CHECK(now_seconds() - t0 < 5.0);
  CHECK_RC(km_pool_snapshot(pool, after, 4, &info), KM_OK);
  t0 = now_seconds();
  CHECK_RC(km_pool_wait_change(pool, info.wake_seq, 0.02, NULL), KM_OK);
  CHECK(now_seconds() - t0 >= 0.015);
  km_cancel* token = NULL;
  CHECK_RC(km_cancel_create(pool, &token), KM_OK);
  CHECK_RC(km_cancel_trigger(token), KM_OK);
  CHECK_RC(km_pool_wait_change(pool, info.wake_seq, 10.0, token), KM_CLOSED);
  CHECK_RC(km_cancel_destroy(token), KM_OK);
  CHECK_RC(km_pool_destroy(pool), KM_OK);
}

/* km_pool_restore_key: counters, latency and a (capped) cooldown written
 * into the segment, every hostile value refused with nothing written. */
static void test_restore_key(void) {
  km_pool* pool = make_pool(KM_LEAST_BUSY, 3);
  km_key_restore r;
  CHECK_RC(km_key_restore_init(NULL), KM_INVALID_ARGUMENT);
  CHECK_RC(km_key_restore_init(&r), KM_OK);
  CHECK(r.struct_size == sizeof(km_key_restore) && r.has_latency == 0 && r.success_count == 0 &&
        r.cooldown_remaining == 0.0);
  r.success_count = 41;
  r.failure_count = 7; /* above max_failures: a count, not a streak */
  r.rate_limited_count = 3;
  r.has_latency = 1;
  r.latency_avg = 0.25;
  r.cooldown_remaining = 1e9; /* capped at max(max_cooldown, default_cooldown) = 600 */
  CHECK_RC(km_pool_restore_key(pool, "alpha", &r), KM_OK);
  char* json = NULL;
  CHECK_RC(km_pool_status_json(pool, &json), KM_OK);
  /* alpha is the first key of the status. */
  CHECK(json_number(json, "\"success_count\":") == 41.0);
  CHECK(json_number(json, "\"failure_count\":") == 7.0);
  CHECK(json_number(json, "\"rate_limited\":") == 3.0);
  CHECK(fabs(json_number(json, "\"latency_avg\":") - 0.25) < 1e-9);
  const double left = json_number(json, "\"cooldown_remaining\":");
  CHECK(left > 590.0 && left <= 600.0);
  CHECK(json_number(json, "\"fail_streak\":") == 0.0);
  km_string_free(json);
  /* alpha cools: the two others are handed out, never alpha. */
  uint32_t n = 0;
  CHECK_RC(km_pool_available_count(pool, &n), KM_OK);
  CHECK(n == 2);

  /* Hostile values: refused, nothing written. */
  km_key_restore bad = r;
  bad.latency_avg = NAN;
  CHECK_RC(km_pool_restore_key(pool, "beta", &bad), KM_INVALID_ARGUMENT);
  bad = r;
  bad.latency_avg = -1.0;
  CHECK_RC(km_pool_restore_key(pool, "beta", &bad), KM_INVALID_ARGUMENT);
  bad = r;
  bad.cooldown_remaining = INFINITY;
  CHECK_RC(km_pool_restore_key(pool, "beta", &bad), KM_INVALID_ARGUMENT);
  bad = r;
  bad.cooldown_remaining = -0.5;
  CHECK_RC(km_pool_restore_key(pool, "beta", &bad), KM_INVALID_ARGUMENT);
  bad = r;
  bad.cooldown_remaining = 2e9;
  CHECK_RC(km_pool_restore_key(pool, "beta", &bad), KM_INVALID_ARGUMENT);
  bad = r;
  bad.has_latency = 2;
  CHECK_RC(km_pool_restore_key(pool, "beta", &bad), KM_INVALID_ARGUMENT);
  bad = r;
  bad.struct_size = 0;
  CHECK_RC(km_pool_restore_key(pool, "beta", &bad), KM_INVALID_ARGUMENT);
  CHECK_RC(km_pool_restore_key(pool, "no-such-key", &r), KM_UNKNOWN_KEY);
  CHECK_RC(km_pool_restore_key(pool, NULL, &r), KM_INVALID_ARGUMENT);
  CHECK_RC(km_pool_restore_key(pool, "beta", NULL), KM_INVALID_ARGUMENT);
  CHECK_RC(km_pool_available_count(pool, &n), KM_OK);
  CHECK(n == 2);

  /* A shorter cooldown never shortens one already set; no latency sample
   * and no cooldown leave the key eligible. */
  km_key_restore shorter;
  CHECK_RC(km_key_restore_init(&shorter), KM_OK);
  shorter.cooldown_remaining = 1.0;
  CHECK_RC(km_pool_restore_key(pool, "alpha", &shorter), KM_OK);
  CHECK_RC(km_pool_status_json(pool, &json), KM_OK);
  CHECK(json_number(json, "\"cooldown_remaining\":") > 590.0);
  CHECK(json_number(json, "\"success_count\":") == 0.0);
  km_string_free(json);
  km_key_restore plain;
  CHECK_RC(km_key_restore_init(&plain), KM_OK);
  CHECK_RC(km_pool_restore_key(pool, "beta", &plain), KM_OK);
  CHECK_RC(km_pool_available_count(pool, &n), KM_OK);
  CHECK(n == 2);
  CHECK_RC(km_pool_destroy(pool), KM_OK);
}

int main(void) {
  test_errors_and_version();
  test_lease_handles();
  test_keys_by_secret();
  test_cancel_and_close_wake_waiters();
  test_fork_child_holds_nothing();
  test_broker_unavailable();
  test_option_structs();
  test_burst_and_rate_margin();
  test_acquire_and_end_options();
  test_deprecated_wrappers();
  test_observe_limits_and_parsers();
  test_snapshot_and_acquire_this_key();
  test_restore_key();
  if (g_failures != 0) {
    fprintf(stderr, "%d check(s) failed\n", g_failures);
    return 1;
  }
  printf("c_api_test: all checks passed\n");
  return 0;
}
