/* The C ABI from plain C: an embedded pool, one acquire and release. */
#include <stdio.h>

#include "keymesh/keymesh.h"

int main(void) {
  km_key_spec keys[2];
  km_key_spec_init(&keys[0]);
  km_key_spec_init(&keys[1]);
  keys[0].name = "a";
  keys[0].secret = "sk-consumer-c-aaaaaaaaaa";
  keys[1].name = "b";
  keys[1].secret = "sk-consumer-c-bbbbbbbbbb";
  km_pool* pool = NULL;
  if (km_pool_create(keys, 2, NULL, &pool) != KM_OK) {
    fprintf(stderr, "consumer_c: %s\n", km_last_error());
    return 1;
  }
  km_lease* lease = NULL;
  if (km_pool_acquire(pool, 1.0, &lease) != KM_OK) {
    fprintf(stderr, "consumer_c: %s\n", km_last_error());
    return 1;
  }
  const char* name = NULL;
  km_lease_info(lease, NULL, &name);
  printf("consumer_c ok %s\n", name);
  int rc = km_lease_release(lease, 0.01, 0);
  km_lease_destroy(lease);
  km_pool_destroy(pool);
  return rc == KM_OK ? 0 : 1;
}
