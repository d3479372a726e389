/* The C ABI from plain C: an embedded pool, one acquire and release. */
#include <stdio.h>

#include "keymesh/keymesh.h"

int main(void) {
  km_key_spec keys[2] = {{"a", "sk-consumer-c-aaaaaaaaaa", 1, 0, 0, 0}, {"b", "sk-consumer-c-bbbbbbbbbb", 1, 0, 0, 0}};
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
