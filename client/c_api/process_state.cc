#include "client/c_api/process_state.h"

#include <pthread.h>

#include <mutex>
#include <unordered_set>

namespace keymesh::c_api {
namespace {

std::atomic<uint64_t> g_fork_generation{0};

// Live km_pools, so the fork handlers can reset their per-process parts.
std::mutex g_registry_mu;
std::unordered_set<km_pool*>* g_registry = new std::unordered_set<km_pool*>();  // never freed

// Lock every mutex a fork child might otherwise inherit locked, so the child
// gets them unlocked and consistent.
void AtForkPrepare() {
  g_registry_mu.lock();
  for (km_pool* p : *g_registry) {
    p->reconnect_mu.lock();
    p->tokens_mu.lock();
  }
}

void AtForkParent() {
  for (km_pool* p : *g_registry) {
    p->tokens_mu.unlock();
    p->reconnect_mu.unlock();
  }
  g_registry_mu.unlock();
}

void AtForkChild() {
  g_fork_generation.fetch_add(1, std::memory_order_relaxed);
  for (km_pool* p : *g_registry) {
    // Only the forking thread exists in the child: nobody is inside the pool.
    p->users.store(0, std::memory_order_relaxed);
    p->tokens_mu.unlock();
    p->reconnect_mu.unlock();
  }
  g_registry_mu.unlock();
}

}  // namespace

uint64_t ForkGeneration() noexcept { return g_fork_generation.load(std::memory_order_relaxed); }

void Register(km_pool* p) {
  static const bool registered = [] {
    pthread_atfork(&AtForkPrepare, &AtForkParent, &AtForkChild);
    return true;
  }();
  (void)registered;
  std::lock_guard<std::mutex> lock(g_registry_mu);
  g_registry->insert(p);
}

void Unregister(km_pool* p) {
  std::lock_guard<std::mutex> lock(g_registry_mu);
  g_registry->erase(p);
}

Use::Use(km_pool* p) noexcept : p_(p) {
  p_->users.fetch_add(1, std::memory_order_seq_cst);
  ok_ = !p_->closed.load(std::memory_order_seq_cst);
}

Use::~Use() {
  if (p_->users.fetch_sub(1, std::memory_order_seq_cst) == 1 && p_->closed.load(std::memory_order_seq_cst)) {
    p_->users.notify_all();
  }
}

ProcState* StateIfCurrent(km_pool* p) noexcept {
  ProcState* s = p->state.load(std::memory_order_acquire);
  return s != nullptr && s->generation == ForkGeneration() ? s : nullptr;
}

Result<ProcState*> CurrentState(km_pool* p) {
  if (ProcState* s = StateIfCurrent(p)) [[likely]]
    return s;
  std::lock_guard<std::mutex> lock(p->reconnect_mu);
  if (ProcState* s = StateIfCurrent(p)) return s;
  auto fresh = std::make_unique<ProcState>();
  fresh->generation = ForkGeneration();
  if (p->attached) {
    Result<std::unique_ptr<Pool>> pool = Pool::Connect(p->socket_path, p->pool_name);
    if (!pool.ok()) return pool.status();
    fresh->owned = std::move(pool).value();
    fresh->pool = fresh->owned.get();
  } else {
    fresh->pool = p->embedded.get();
  }
  // The old state (another generation) is deliberately leaked: see
  // process_state.h.
  ProcState* raw = fresh.release();
  p->state.store(raw, std::memory_order_release);
  return raw;
}

}  // namespace keymesh::c_api
