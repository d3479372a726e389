// Uses only the installed public headers: an embedded pool of two keys,
// one acquire and release. Exit 0 and "consumer ok <key>" on success.
#include <cstdio>

#include "keymesh/pool.h"

int main() {
  keymesh::Result<std::unique_ptr<keymesh::Pool>> pool =
      keymesh::Pool::CreateEmbedded({{"a", "sk-consumer-aaaaaaaaaaaa"}, {"b", "sk-consumer-bbbbbbbbbbbb"}}, {});
  if (!pool.ok()) {
    std::fprintf(stderr, "consumer: %s\n", pool.status().message().c_str());
    return 1;
  }
  keymesh::Result<keymesh::Lease> lease = (*pool)->Acquire(1.0);
  if (!lease.ok()) {
    std::fprintf(stderr, "consumer: %s\n", lease.status().message().c_str());
    return 1;
  }
  std::printf("consumer ok %s\n", lease->key_name().c_str());
  return lease->Release(0.01).ok() ? 0 : 1;
}
