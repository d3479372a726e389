// Where the broker's control socket is: one default and one rule for every
// client (the client library, the C ABI, keymeshctl) and the broker config's
// default (CONTRACT.md: $KEYMESH_SOCKET overrides the default for clients).
#ifndef KEYMESH_PROTOCOL_SOCKET_PATH_H_
#define KEYMESH_PROTOCOL_SOCKET_PATH_H_

#include <string>
#include <string_view>

namespace keymesh::protocol {

inline constexpr char kDefaultSocket[] = "/run/keymesh/keymesh.sock";

// `explicit_path` when it is not empty, else $KEYMESH_SOCKET when that is set
// and not empty, else kDefaultSocket. Reads the environment at each call
// (getenv: not safe against a concurrent setenv, like every getenv).
std::string ResolveSocketPath(std::string_view explicit_path);

}  // namespace keymesh::protocol

#endif  // KEYMESH_PROTOCOL_SOCKET_PATH_H_
