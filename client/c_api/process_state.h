// How a km_pool lives across fork() and km_pool_close().
//
// Fork. A km_pool keeps a ProcState (handles.h): the Pool this process uses
// and the leases it holds by secret. The state is tagged with the fork
// generation (bumped by a pthread_atfork child handler); a call that finds
// a state of an older generation is running in a fork child and builds a
// fresh one: no leases held (the parent's leases are the parent's), and for
// an attached pool a new connection to the broker (which registers the
// child). The parent's state is leaked in the child on purpose: its mutex
// may have been held at fork, its leases must not be ended by the child,
// and destroying its broker connection could make the broker reap the
// parent.
//
// Closing. km_pool_close may run while other threads are inside the pool:
// it sets `closed` (so new calls fail with KM_CLOSED), sets every cancel
// token of the pool and wakes the waits, waits until `users` (counted by
// Use) drops to zero, and only then frees the Pool. The km_pool shell lives
// until km_pool_destroy.
#ifndef KEYMESH_CLIENT_C_API_PROCESS_STATE_H_
#define KEYMESH_CLIENT_C_API_PROCESS_STATE_H_

#include <cstdint>

#include "client/c_api/errors.h"
#include "client/c_api/handles.h"
#include "keymesh/status.h"

namespace keymesh::c_api {

// The fork generation of this process (0 in the first).
uint64_t ForkGeneration() noexcept;

// Adds a new km_pool to the registry the fork handlers walk (and installs
// them on first use); Unregister removes it before it is freed.
void Register(km_pool* p);
void Unregister(km_pool* p);

// Counts a call in progress on `p`; refuses calls once the pool is closed.
class Use {
 public:
  explicit Use(km_pool* p) noexcept;
  ~Use();
  Use(const Use&) = delete;
  Use& operator=(const Use&) = delete;
  bool ok() const noexcept { return ok_; }

 private:
  km_pool* p_;
  bool ok_ = false;
};

// This process's state for `p`, built on first use in a new fork
// generation (connecting again for an attached pool). Call inside a Use.
Result<ProcState*> CurrentState(km_pool* p);

// This process's state for `p` if it belongs to this fork generation, else
// null; never connects.
ProcState* StateIfCurrent(km_pool* p) noexcept;

inline int ClosedError() { return Fail(Code::kClosed, "the pool is closed"); }

// The prologue every call on a pool shares: guards against exceptions,
// refuses a NULL or closed pool, finds this process's state, then returns
// fn(ProcState&).
template <typename Fn>
int WithPool(km_pool* p, Fn&& fn) noexcept {
  return Guarded([&]() -> int {
    if (p == nullptr) return Fail(Code::kInvalidArgument, "pool must not be NULL");
    Use use(p);
    if (!use.ok()) return ClosedError();
    Result<ProcState*> state = CurrentState(p);
    if (!state.ok()) return Fail(state.status());
    return fn(**state);
  });
}

}  // namespace keymesh::c_api

#endif  // KEYMESH_CLIENT_C_API_PROCESS_STATE_H_
