// FNV-1a, 64 bits: the broker's one non-cryptographic hash (state-file
// checksums, the segment name derived from the socket path). Both values
// are persisted or shared between processes, so the function must never
// change.
#ifndef KEYMESH_BROKER_HASH_H_
#define KEYMESH_BROKER_HASH_H_

#include <cstdint>
#include <string_view>

namespace keymesh::broker {

inline uint64_t Fnv1a64(std::string_view bytes) noexcept {
  uint64_t h = 0xcbf29ce484222325ull;
  for (unsigned char c : bytes) {
    h ^= c;
    h *= 0x100000001b3ull;
  }
  return h;
}

}  // namespace keymesh::broker

#endif  // KEYMESH_BROKER_HASH_H_
