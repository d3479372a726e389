#include "protocol/socket_path.h"

#include <cstdlib>

namespace keymesh::protocol {

std::string ResolveSocketPath(std::string_view explicit_path) {
  if (!explicit_path.empty()) return std::string(explicit_path);
  if (const char* env = std::getenv("KEYMESH_SOCKET"); env != nullptr && *env != '\0') return env;
  return kDefaultSocket;
}

}  // namespace keymesh::protocol
