// The C ABI's opaque handles (keymesh.h: km_pool, km_lease, km_cancel) and
// the per-process part of a km_pool (ProcState). process_state.h says how
// they live across fork() and km_pool_close().
#ifndef KEYMESH_CLIENT_C_API_HANDLES_H_
#define KEYMESH_CLIENT_C_API_HANDLES_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_set>

#include "client/c_api/held_leases.h"
#include "keymesh/keymesh.h"
#include "keymesh/pool.h"

namespace keymesh::c_api {

// What one process knows of a km_pool: built per fork generation.
struct ProcState {
  uint64_t generation = 0;
  std::unique_ptr<Pool> owned;  // attached pools: this generation's connection
  Pool* pool = nullptr;         // the Pool used (owned, or the km_pool's embedded one)
  HeldLeases held;              // the leases this process holds by secret
};

}  // namespace keymesh::c_api

struct km_cancel {
  km_pool* pool = nullptr;  // the pool whose waits it ends; outlives the token
  keymesh::CancelToken token;
};

struct km_lease {
  keymesh::Lease lease;
};

struct km_pool {
  bool attached = false;
  std::string socket_path;                  // attached: as given to km_pool_connect
  std::string pool_name;                    // attached
  std::unique_ptr<keymesh::Pool> embedded;  // embedded pools: shared by every generation
  uint32_t default_burst = 0;               // km_pool_options.burst: given to keys created or added with burst 0
  std::atomic<keymesh::c_api::ProcState*> state{nullptr};
  std::atomic<bool> closed{false};
  // Set by km_pool_close: the cancel token of every wait that has none of
  // its own (km_cancel tokens are set one by one).
  keymesh::CancelToken closing;
  std::atomic<int64_t> users{0};  // calls in progress (Use)
  std::mutex reconnect_mu;        // one (re)connection at a time
  std::mutex tokens_mu;           // guards tokens
  std::unordered_set<km_cancel*> tokens;
  std::mutex close_mu;  // guards freed
  bool freed = false;   // close finished
};

#endif  // KEYMESH_CLIENT_C_API_HANDLES_H_
