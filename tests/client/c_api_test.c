/* keymesh.h compiled as C11: calls every function of the C ABI against an
 * embedded pool (and a connect to a socket nobody listens on). Exits 0 when
 * every check holds; prints the failing check otherwise. */
#include <pthread.h>
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

static km_pool* make_pool(int strategy, uint32_t max_failures) {
  km_key_spec keys[3];
  memset(keys, 0, sizeof(keys));
  keys[0].name = "alpha";
  keys[0].secret = "sk-test-alpha-0000000001";
  keys[1].name = "beta";
  keys[1].secret = "sk-test-beta-00000000002";
  keys[2].name = NULL; /* generated name */
  keys[2].secret = "sk-test-gamma-0000000003";
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
  memset(dup, 0, sizeof(dup));
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
  memset(&extra, 0, sizeof(extra));
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
    CHECK(strstr(json, "sk-test") == NULL); /* no secret */
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
  memset(&key, 0, sizeof(key));
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

static void test_broker_unavailable(void) {
  km_pool* pool = NULL;
  CHECK_RC(km_pool_connect("/nonexistent/keymesh-test.sock", "openai", &pool), KM_BROKER_UNAVAILABLE);
  uint32_t n = 0;
  CHECK_RC(km_broker_reclaim("/nonexistent/keymesh-test.sock", 12345, &n), KM_BROKER_UNAVAILABLE);
  CHECK_RC(km_broker_reclaim(NULL, 0, &n), KM_INVALID_ARGUMENT);
}

int main(void) {
  test_errors_and_version();
  test_lease_handles();
  test_keys_by_secret();
  test_cancel_and_close_wake_waiters();
  test_fork_child_holds_nothing();
  test_broker_unavailable();
  if (g_failures != 0) {
    fprintf(stderr, "%d check(s) failed\n", g_failures);
    return 1;
  }
  printf("c_api_test: all checks passed\n");
  return 0;
}
