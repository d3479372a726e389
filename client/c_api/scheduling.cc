// The C ABI of schedulers outside the pool (keymesh.h, "Schedulers outside
// the pool"): km_pool_snapshot, km_pool_acquire_this_key and
// km_pool_wait_change over Pool::SnapshotKeys, AcquireKey and
// WaitForChange.
#include <algorithm>
#include <cstddef>
#include <cstring>
#include <string>
#include <vector>

#include "client/c_api/convert.h"
#include "client/c_api/errors.h"
#include "client/c_api/handles.h"
#include "client/c_api/process_state.h"
#include "keymesh/keymesh.h"
#include "keymesh/pool.h"

using keymesh::Code;
using keymesh::KeySnapshot;
using keymesh::KeysSnapshotInfo;
using keymesh::Lease;
using keymesh::Result;
using keymesh::Status;
using keymesh::c_api::Fail;
using keymesh::c_api::FromStatus;
using keymesh::c_api::Guarded;
using keymesh::c_api::ProcState;
using keymesh::c_api::WithPool;

namespace {

// The first (this release's) sizes, frozen as in convert.cc.
constexpr size_t kKeyViewV1 = 160;
constexpr size_t kSnapshotInfoV1 = 40;
static_assert(sizeof(km_key_view) == kKeyViewV1 && offsetof(km_key_view, name) == 24 &&
              offsetof(km_key_view, secret) == 88 && offsetof(km_key_view, successes) == 120 &&
              offsetof(km_key_view, last_used_ago) == 152);
static_assert(sizeof(km_snapshot_info) == kSnapshotInfoV1 && offsetof(km_snapshot_info, wake_seq) == 16 &&
              offsetof(km_snapshot_info, next_change) == 24 && offsetof(km_snapshot_info, strategy) == 32);
static_assert(KM_NAME_CAPACITY == sizeof(KeySnapshot::name));
// A garbage struct_size (an uninitialised struct) rather than a newer header.
constexpr uint32_t kMaxStructSize = 1024;

uint32_t SizeOf(const void* s) noexcept {
  uint32_t size = 0;
  std::memcpy(&size, s, sizeof(size));
  return size;
}

int BadSize(const char* what, uint32_t size) {
  return Fail(Code::kInvalidArgument, std::string(what) + ".struct_size " + std::to_string(size) +
                                          " is not a size this library reads (initialise it with " + what + "_init())");
}

// Writes `full` into the caller's struct of `size` bytes: the fields that
// fit, struct_size kept as the caller's.
template <typename T>
void WriteSized(void* out, uint32_t size, T full) noexcept {
  full.struct_size = size;
  std::memcpy(out, &full, std::min<size_t>(size, sizeof(T)));
}

km_key_view ToView(const KeySnapshot& k) noexcept {
  km_key_view v{};
  v.slot = k.slot;
  v.generation = k.generation;
  v.fingerprint = k.fingerprint;
  std::memcpy(v.name, k.name, sizeof(v.name));
  v.name[sizeof(v.name) - 1] = '\0';
  v.secret = k.secret;
  v.eligible = k.eligible ? 1 : 0;
  v.in_flight = k.in_flight;
  v.max_concurrency = k.max_concurrency;
  v.weight = k.weight;
  v.fail_streak = k.fail_streak;
  v.has_latency = k.has_latency ? 1 : 0;
  v.successes = k.successes;
  v.failures = k.failures;
  v.cooldown_remaining = k.cooldown_remaining;
  v.latency_avg = k.latency_avg;
  v.last_used_ago = k.last_used_ago;
  return v;
}

}  // namespace

extern "C" {

int km_key_view_init(km_key_view* view) {
  if (view == nullptr) return Fail(Code::kInvalidArgument, "view must not be NULL");
  *view = km_key_view{};
  view->struct_size = sizeof(km_key_view);
  view->last_used_ago = -1.0;
  view->weight = 1;
  return KM_OK;
}

int km_snapshot_info_init(km_snapshot_info* info) {
  if (info == nullptr) return Fail(Code::kInvalidArgument, "info must not be NULL");
  *info = km_snapshot_info{};
  info->struct_size = sizeof(km_snapshot_info);
  info->next_change = -1.0;
  info->strategy = KM_LEAST_BUSY;
  return KM_OK;
}

int km_pool_snapshot(km_pool* p, km_key_view* views, size_t capacity, km_snapshot_info* info) {
  return WithPool(p, [&](ProcState& s) {
    if (info == nullptr || (views == nullptr && capacity != 0)) {
      return Fail(Code::kInvalidArgument, "info, and views when capacity > 0, must not be NULL");
    }
    const uint32_t info_size = SizeOf(info);
    if (info_size < kSnapshotInfoV1 || info_size > kMaxStructSize) return BadSize("km_snapshot_info", info_size);
    const uint32_t stride = capacity != 0 ? SizeOf(views) : uint32_t{sizeof(km_key_view)};
    if (stride < kKeyViewV1 || stride > kMaxStructSize || stride % alignof(km_key_view) != 0) {
      return BadSize("km_key_view", stride);
    }
    const uint32_t cap = static_cast<uint32_t>(std::min<size_t>(capacity, UINT32_MAX));
    // One buffer per thread, reused: no allocation per call once it is big
    // enough.
    thread_local std::vector<KeySnapshot> buffer;
    if (buffer.size() < cap) buffer.resize(cap);
    KeysSnapshotInfo got;
    Status st = s.pool->SnapshotKeys(buffer.data(), cap, &got);
    if (!st.ok()) return Fail(st);
    auto* out = reinterpret_cast<unsigned char*>(views);
    for (uint32_t i = 0; i < std::min(cap, got.count); ++i)
      WriteSized(out + size_t{i} * stride, stride, ToView(buffer[i]));
    km_snapshot_info full{};
    full.count = got.count;
    full.generation = got.generation;
    full.wake_seq = got.wake_seq;
    full.max_failures = got.max_failures;
    full.next_change = got.next_change;
    full.strategy = static_cast<int32_t>(got.strategy);
    WriteSized(info, info_size, full);
    return KM_OK;
  });
}

int km_pool_acquire_this_key(km_pool* p, const km_key_view* view, const km_acquire_options* options, km_held* out) {
  return WithPool(p, [&](ProcState& s) {
    if (view == nullptr || out == nullptr) return Fail(Code::kInvalidArgument, "view and out must not be NULL");
    const uint32_t size = SizeOf(view);
    if (size < kKeyViewV1 || size > kMaxStructSize) return BadSize("km_key_view", size);
    Result<keymesh::Pool::AcquireOptions> o = keymesh::c_api::ToAcquireOptions(options, p, &p->closing);
    if (!o.ok()) return Fail(o.status());
    KeySnapshot id;
    id.slot = view->slot;
    id.generation = view->generation;
    id.fingerprint = view->fingerprint;
    Result<Lease> lease = s.pool->AcquireKey(id, o->tokens);
    if (!lease.ok()) return Fail(lease.status());
    out->secret = lease->secret().c_str();  // lives in the Pool's key entries
    out->name = lease->key_name().c_str();
    out->ticket = s.held.Add(std::move(lease).value());
    return KM_OK;
  });
}

int km_pool_wait_change(km_pool* p, uint32_t wake_seq, double timeout, km_cancel* cancel) {
  return WithPool(p, [&](ProcState& s) {
    if (cancel != nullptr && cancel->pool != p) {
      return Fail(Code::kInvalidArgument, "the cancel token belongs to another pool");
    }
    const keymesh::CancelToken* token = cancel != nullptr ? &cancel->token : &p->closing;
    if (p->closing.cancelled()) return Fail(Code::kClosed, "the pool was closed");
    Status st = s.pool->WaitForChange(wake_seq, timeout, token);
    if (!st.ok() && st.code() == Code::kClosed && p->closing.cancelled()) {
      return Fail(Code::kClosed, "the pool was closed");
    }
    return FromStatus(st);
  });
}

}  // extern "C"
