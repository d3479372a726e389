// The C ABI (include/keymesh/keymesh.h): shims over keymesh::Pool. Each
// converts its arguments (convert.h), runs through WithPool or Guarded
// (process_state.h, errors.h: nothing throws across the boundary) and turns
// the Status into a KM_* code.
#include <sys/time.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "client/c_api/convert.h"
#include "client/c_api/errors.h"
#include "client/c_api/handles.h"
#include "client/c_api/process_state.h"
#include "common/text.h"
#include "keymesh/keymesh.h"
#include "keymesh/pool.h"
#include "keymesh/rate_limit_headers.h"
#include "protocol/control_client.h"
#include "protocol/socket_path.h"

using keymesh::Code;
using keymesh::Lease;
using keymesh::OutcomeKind;
using keymesh::Pool;
using keymesh::Result;
using keymesh::Status;
using keymesh::c_api::EndArgs;
using keymesh::c_api::Fail;
using keymesh::c_api::FromStatus;
using keymesh::c_api::Guarded;
using keymesh::c_api::OutcomeArgs;
using keymesh::c_api::ProcState;
using keymesh::c_api::RateLimitedArgs;
using keymesh::c_api::ReleaseArgs;
using keymesh::c_api::ToEndArgs;
using keymesh::c_api::WithPool;

namespace {

int NullArgument(const char* what) { return Fail(Code::kInvalidArgument, std::string(what) + " must not be NULL"); }

int UnknownSecret(const char* secret) {
  return Fail(Code::kUnknownKey,
              "Unknown key " + keymesh::Quoted(keymesh::MaskSecret(secret)) + " — was it added to this pool?");
}

double NowUnixSeconds() {
  timeval tv{};
  gettimeofday(&tv, nullptr);
  return static_cast<double>(tv.tv_sec) + static_cast<double>(tv.tv_usec) / 1e6;
}

char* CopyOut(const std::string& s) {
  char* out = static_cast<char*>(std::malloc(s.size() + 1));
  if (out == nullptr) throw std::bad_alloc();
  std::memcpy(out, s.data(), s.size() + 1);
  return out;
}

template <typename T>
int InitStruct(T* s, void (*init)(T*) noexcept, const char* what) {
  if (s == nullptr) return NullArgument(what);
  init(s);
  return KM_OK;
}

// An acquire as `options` say on `p`, then keep(ProcState&, Lease) (its
// return value is the call's). A wait without a token of its own ends when
// the pool closes.
template <typename Keep>
int Acquire(km_pool* p, const km_acquire_options* options, const void* out, Keep&& keep) {
  return WithPool(p, [&](ProcState& s) {
    if (out == nullptr) return NullArgument("out");
    Result<Pool::AcquireOptions> o = keymesh::c_api::ToAcquireOptions(options, p, &p->closing);
    if (!o.ok()) return Fail(o.status());
    Result<Lease> lease = s.pool->Acquire(*o);
    if (!lease.ok()) return Fail(lease.status());
    return keep(s, std::move(lease).value());
  });
}

int AcquireLease(km_pool* p, const km_acquire_options* options, km_lease** out) {
  return Acquire(p, options, out, [&](ProcState&, Lease lease) {
    *out = new km_lease{std::move(lease)};
    return KM_OK;
  });
}

// An acquire remembered as held by this process (by secret).
int AcquireHeld(km_pool* p, const km_acquire_options* options, km_held* out) {
  return Acquire(p, options, out, [&](ProcState& s, Lease lease) {
    // The strings live in the Pool's key entries, which outlive the lease.
    out->secret = lease.secret().c_str();
    out->name = lease.key_name().c_str();
    out->ticket = s.held.Add(std::move(lease));
    return KM_OK;
  });
}

// Ends a lease handle with the arguments args_of() converts (inside the
// guard: a conversion may allocate).
template <typename ArgsOf>
int EndLease(km_lease* l, ArgsOf&& args_of) {
  return Guarded([&] {
    if (l == nullptr) return NullArgument("lease");
    if (!l->lease.active()) return Fail(Code::kNotHeld, "lease already ended");
    const Result<EndArgs> args = args_of();
    if (!args.ok()) return Fail(args.status());
    return FromStatus(l->lease.End(args->kind, args->options));
  });
}

// Ends one lease of `secret` held by this process (by ticket, or the
// oldest), with the arguments args_of() converts.
template <typename ArgsOf>
int EndHeld(km_pool* p, const char* secret, uint64_t ticket, ArgsOf&& args_of) {
  return WithPool(p, [&](ProcState& s) {
    if (secret == nullptr) return NullArgument("secret");
    const Result<EndArgs> args = args_of();
    if (!args.ok()) return Fail(args.status());
    std::optional<Lease> lease = s.held.Take(secret, ticket);
    if (!lease) {
      std::optional<std::string> name = s.pool->NameOfSecret(secret);
      if (!name) return UnknownSecret(secret);
      return Fail(Code::kNotHeld, "key " + keymesh::Quoted(*name) + " is not held by this process" +
                                      (ticket != 0 ? std::string(" under that lease (already ended?)")
                                                   : std::string(" (already released, or acquired elsewhere)")));
    }
    return FromStatus(lease->End(args->kind, args->options));
  });
}

int KeyOp(km_pool* p, const char* name, Status (Pool::*op)(std::string_view)) {
  return WithPool(p, [&](ProcState& s) {
    if (name == nullptr) return NullArgument("name");
    return FromStatus((s.pool->*op)(name));
  });
}

km_acquire_options AcquireArgs(double timeout, uint64_t tokens, km_cancel* cancel, uint32_t flags) {
  km_acquire_options o;
  km_acquire_options_init(&o);
  o.timeout = timeout;
  o.tokens = tokens;
  o.cancel = cancel;
  o.flags = flags;
  return o;
}

}  // namespace

extern "C" {

// ---- Errors and version ----------------------------------------------------

const char* km_last_error(void) { return keymesh::c_api::t_last_error.c_str(); }

const char* km_code_name(int code) {
  if (code < 0 || code > static_cast<int>(keymesh::kLastCode)) return "unknown";
  return keymesh::CodeName(static_cast<Code>(code));
}

int km_version(const char** out) {
  if (out == nullptr) return NullArgument("out");
  *out = KEYMESH_VERSION_STRING;  // CMakeLists.txt project(VERSION), the one place the version is written
  return KM_OK;
}

int km_string_free(char* s) {
  std::free(s);
  return KM_OK;
}

// ---- Option structs ----------------------------------------------------------

int km_pool_options_init(km_pool_options* o) { return InitStruct(o, &keymesh::c_api::InitPoolOptions, "options"); }
int km_key_spec_init(km_key_spec* k) { return InitStruct(k, &keymesh::c_api::InitKeySpec, "key"); }
int km_acquire_options_init(km_acquire_options* o) {
  return InitStruct(o, &keymesh::c_api::InitAcquireOptions, "options");
}
int km_end_options_init(km_end_options* o) { return InitStruct(o, &keymesh::c_api::InitEndOptions, "options"); }
int km_key_restore_init(km_key_restore* r) { return InitStruct(r, &keymesh::c_api::InitKeyRestore, "restore"); }

// ---- Pools -------------------------------------------------------------------

int km_pool_create(const km_key_spec* keys, size_t n, const km_pool_options* options, km_pool** out) {
  return Guarded([&] {
    if (out == nullptr || (keys == nullptr && n != 0)) return NullArgument("keys and out");
    uint32_t default_burst = 0;
    Result<keymesh::PoolOptions> opts = keymesh::c_api::ToPoolOptions(options, &default_burst);
    if (!opts.ok()) return Fail(opts.status());
    Result<std::vector<keymesh::KeySpec>> specs = keymesh::c_api::ToKeySpecs(keys, n);
    if (!specs.ok()) return Fail(specs.status());
    for (keymesh::KeySpec& spec : *specs) {
      if (spec.burst == 0) spec.burst = default_burst;
    }
    Result<std::unique_ptr<Pool>> pool = Pool::CreateEmbedded(*specs, *opts);
    if (!pool.ok()) return Fail(pool.status());
    auto p = std::make_unique<km_pool>();
    p->embedded = std::move(pool).value();
    p->default_burst = default_burst;
    Result<ProcState*> s = keymesh::c_api::CurrentState(p.get());
    if (!s.ok()) return Fail(s.status());
    keymesh::c_api::Register(p.get());
    *out = p.release();
    return KM_OK;
  });
}

int km_pool_connect(const char* socket_path, const char* pool_name, km_pool** out) {
  return Guarded([&] {
    if (out == nullptr || pool_name == nullptr) return NullArgument("pool_name and out");
    auto p = std::make_unique<km_pool>();
    p->attached = true;
    p->socket_path = socket_path != nullptr ? socket_path : "";
    p->pool_name = pool_name;
    Result<ProcState*> s = keymesh::c_api::CurrentState(p.get());
    if (!s.ok()) return Fail(s.status());
    keymesh::c_api::Register(p.get());
    *out = p.release();
    return KM_OK;
  });
}

int km_pool_close(km_pool* p) {
  return Guarded([&] {
    if (p == nullptr) return NullArgument("pool");
    std::lock_guard<std::mutex> close_lock(p->close_mu);
    if (p->freed) return KM_OK;
    p->closed.store(true, std::memory_order_seq_cst);
    p->closing.Cancel();
    {
      std::lock_guard<std::mutex> lock(p->tokens_mu);
      for (km_cancel* t : p->tokens) t->token.Cancel();
    }
    ProcState* s = keymesh::c_api::StateIfCurrent(p);
    if (s != nullptr) s->pool->WakeWaiters();
    for (int64_t u = p->users.load(); u != 0; u = p->users.load()) p->users.wait(u);
    if (s != nullptr) {
      s->held.CancelAll();
      p->state.store(nullptr, std::memory_order_release);
      delete s;  // attached: closes this process's connection
    }
    // Inherited embedded segment: unmapping it here touches only this process.
    p->embedded.reset();
    p->freed = true;
    return KM_OK;
  });
}

int km_pool_destroy(km_pool* p) {
  if (p == nullptr) return KM_OK;
  const int rc = km_pool_close(p);
  keymesh::c_api::Unregister(p);
  delete p;
  return rc;
}

// ---- Lease handles -----------------------------------------------------------

int km_pool_acquire_ex(km_pool* p, const km_acquire_options* options, km_lease** out) {
  return AcquireLease(p, options, out);
}

int km_pool_acquire(km_pool* p, double timeout, km_lease** out) {
  const km_acquire_options o = AcquireArgs(timeout, 0, nullptr, 0);
  return AcquireLease(p, &o, out);
}

int km_pool_try_acquire(km_pool* p, km_lease** out) {
  return WithPool(p, [&](ProcState& s) {
    if (out == nullptr) return NullArgument("out");
    Result<Lease> lease = s.pool->TryAcquire();
    if (!lease.ok()) return Fail(lease.status());
    *out = new km_lease{std::move(lease).value()};
    return KM_OK;
  });
}

int km_lease_info(const km_lease* l, const char** secret, const char** name) {
  if (l == nullptr) return NullArgument("lease");
  if (!l->lease.active()) return Fail(Code::kNotHeld, "lease already ended");
  if (secret != nullptr) *secret = l->lease.secret().c_str();
  if (name != nullptr) *name = l->lease.key_name().c_str();
  return KM_OK;
}

int km_lease_end(km_lease* l, const km_end_options* options) {
  return EndLease(l, [&] { return ToEndArgs(options); });
}

int km_lease_release(km_lease* l, double latency, uint64_t tokens) {
  return EndLease(l, [&] { return ReleaseArgs(latency, tokens); });
}

int km_lease_mark_failed(km_lease* l) {
  return EndLease(l, [&] { return OutcomeArgs(OutcomeKind::kFailure); });
}

int km_lease_mark_rate_limited(km_lease* l, double cooldown) {
  return EndLease(l, [&] { return RateLimitedArgs(cooldown); });
}

int km_lease_cancel(km_lease* l) {
  return EndLease(l, [&] { return OutcomeArgs(OutcomeKind::kCancelled); });
}

int km_lease_destroy(km_lease* l) {
  return Guarded([&] {
    if (l == nullptr) return KM_OK;
    if (l->lease.active()) (void)l->lease.Cancel();
    delete l;
    return KM_OK;
  });
}

// ---- Keys held by this process (by secret) -----------------------------------

int km_pool_acquire_key_ex(km_pool* p, const km_acquire_options* options, km_held* out) {
  return AcquireHeld(p, options, out);
}

int km_pool_acquire_key(km_pool* p, double timeout, km_cancel* cancel, km_held* out) {
  const km_acquire_options o = AcquireArgs(timeout, 0, cancel, 0);
  return AcquireHeld(p, &o, out);
}

int km_pool_poll_key(km_pool* p, km_held* out) {
  const km_acquire_options o = AcquireArgs(KM_DEFAULT, 0, nullptr, KM_ACQUIRE_POLL);
  return AcquireHeld(p, &o, out);
}

int km_pool_end_key(km_pool* p, const char* secret, uint64_t ticket, const km_end_options* options) {
  return EndHeld(p, secret, ticket, [&] { return ToEndArgs(options); });
}

int km_pool_release_key(km_pool* p, const char* secret, uint64_t ticket, double latency, uint64_t tokens) {
  return EndHeld(p, secret, ticket, [&] { return ReleaseArgs(latency, tokens); });
}

int km_pool_mark_failed_key(km_pool* p, const char* secret, uint64_t ticket) {
  return EndHeld(p, secret, ticket, [&] { return OutcomeArgs(OutcomeKind::kFailure); });
}

int km_pool_mark_rate_limited_key(km_pool* p, const char* secret, uint64_t ticket, double cooldown) {
  return EndHeld(p, secret, ticket, [&] { return RateLimitedArgs(cooldown); });
}

int km_pool_cancel_key(km_pool* p, const char* secret, uint64_t ticket) {
  return EndHeld(p, secret, ticket, [&] { return OutcomeArgs(OutcomeKind::kCancelled); });
}

int km_pool_acquire_key_tokens(km_pool* p, double timeout, uint64_t tokens, km_cancel* cancel, km_held* out) {
  const km_acquire_options o = AcquireArgs(timeout, tokens, cancel, 0);
  return AcquireHeld(p, &o, out);
}

int km_pool_poll_key_tokens(km_pool* p, uint64_t tokens, km_held* out) {
  const km_acquire_options o = AcquireArgs(KM_DEFAULT, tokens, nullptr, KM_ACQUIRE_POLL);
  return AcquireHeld(p, &o, out);
}

int km_pool_mark_failed_key_permanent(km_pool* p, const char* secret, uint64_t ticket) {
  return EndHeld(p, secret, ticket, [&] { return OutcomeArgs(OutcomeKind::kFailure, /*permanent=*/true); });
}

int km_pool_observe_limits(km_pool* p, const char* secret, const char* const* names, const char* const* values,
                           size_t n) {
  return WithPool(p, [&](ProcState& s) {
    if (secret == nullptr || (n > 0 && (names == nullptr || values == nullptr))) {
      return NullArgument("secret, names and values");
    }
    std::vector<std::pair<std::string, std::string>> headers;
    headers.reserve(n);
    for (size_t i = 0; i < n; ++i) {
      if (names[i] == nullptr || values[i] == nullptr) return NullArgument("a header's name and value");
      headers.emplace_back(names[i], values[i]);
    }
    Result<keymesh::LimitObservation> obs = keymesh::ParseLimitHeaders(headers, NowUnixSeconds());
    if (!obs.ok()) return Fail(obs.status());
    if (obs->empty()) return KM_OK;
    std::optional<std::string> name = s.pool->NameOfSecret(secret);
    if (!name) return UnknownSecret(secret);
    return FromStatus(s.pool->ObserveLimits(*name, *obs));
  });
}

int km_parse_retry_after(const char* value, double* seconds) {
  return Guarded([&] {
    if (value == nullptr || seconds == nullptr) return NullArgument("value and seconds");
    Result<double> r = keymesh::ParseRetryAfter(value, NowUnixSeconds());
    if (!r.ok()) return Fail(r.status());
    *seconds = *r;
    return KM_OK;
  });
}

int km_parse_duration(const char* value, double* seconds) {
  return Guarded([&] {
    if (value == nullptr || seconds == nullptr) return NullArgument("value and seconds");
    Result<double> r = keymesh::ParseRateLimitDuration(value);
    if (!r.ok()) return Fail(r.status());
    *seconds = *r;
    return KM_OK;
  });
}

int km_pool_held_count(km_pool* p, const char* secret, uint32_t* out) {
  return WithPool(p, [&](ProcState& s) {
    if (out == nullptr) return NullArgument("out");
    *out = s.held.Count(secret);
    return KM_OK;
  });
}

// ---- Cancelling waits --------------------------------------------------------

int km_cancel_create(km_pool* p, km_cancel** out) {
  return Guarded([&] {
    if (p == nullptr || out == nullptr) return NullArgument("pool and out");
    auto t = std::make_unique<km_cancel>();
    t->pool = p;
    {
      std::lock_guard<std::mutex> lock(p->tokens_mu);
      // A token made after close is born triggered.
      if (p->closed.load()) t->token.Cancel();
      p->tokens.insert(t.get());
    }
    *out = t.release();
    return KM_OK;
  });
}

int km_cancel_trigger(km_cancel* t) {
  return Guarded([&] {
    if (t == nullptr) return NullArgument("token");
    km_pool* p = t->pool;
    keymesh::c_api::Use use(p);
    ProcState* s = use.ok() ? keymesh::c_api::StateIfCurrent(p) : nullptr;
    // No state of this process: no wait of this process can be using the
    // token (a wait builds the state first). Closed: close woke everyone.
    if (s == nullptr) {
      t->token.Cancel();
      return KM_OK;
    }
    s->pool->Cancel(t->token);
    return KM_OK;
  });
}

int km_cancel_destroy(km_cancel* t) {
  return Guarded([&] {
    if (t == nullptr) return KM_OK;
    {
      std::lock_guard<std::mutex> lock(t->pool->tokens_mu);
      t->pool->tokens.erase(t);
    }
    delete t;
    return KM_OK;
  });
}

// ---- Administration and status -----------------------------------------------

int km_pool_add_key(km_pool* p, const km_key_spec* key) {
  return WithPool(p, [&](ProcState& s) {
    if (key == nullptr) return NullArgument("key");
    Result<keymesh::KeySpec> spec = keymesh::c_api::ToKeySpec(key);
    if (!spec.ok()) return Fail(spec.status());
    if (spec->burst == 0) spec->burst = p->default_burst;
    return FromStatus(s.pool->AddKey(*spec));
  });
}

int km_pool_remove_key(km_pool* p, const char* name) { return KeyOp(p, name, &Pool::RemoveKey); }
int km_pool_enable_key(km_pool* p, const char* name) { return KeyOp(p, name, &Pool::EnableKey); }
int km_pool_disable_key(km_pool* p, const char* name) { return KeyOp(p, name, &Pool::DisableKey); }
int km_pool_reset_key(km_pool* p, const char* name) { return KeyOp(p, name, &Pool::ResetKey); }

int km_pool_restore_key(km_pool* p, const char* name, const km_key_restore* restore) {
  return WithPool(p, [&](ProcState& s) {
    if (name == nullptr || restore == nullptr) return NullArgument("name and restore");
    Result<keymesh::KeyRestore> r = keymesh::c_api::ToKeyRestore(restore);
    if (!r.ok()) return Fail(r.status());
    return FromStatus(s.pool->RestoreKey(name, *r));
  });
}

int km_pool_key_name(km_pool* p, const char* secret, char** out) {
  return WithPool(p, [&](ProcState& s) {
    if (secret == nullptr || out == nullptr) return NullArgument("secret and out");
    std::optional<std::string> name = s.pool->NameOfSecret(secret);
    if (!name) return UnknownSecret(secret);
    *out = CopyOut(*name);
    return KM_OK;
  });
}

int km_pool_status_json(km_pool* p, char** out) {
  return WithPool(p, [&](ProcState& s) {
    if (out == nullptr) return NullArgument("out");
    Result<keymesh::PoolStatus> ps = s.pool->GetStatus();
    if (!ps.ok()) return Fail(ps.status());
    *out = CopyOut(keymesh::c_api::StatusJson(*s.pool, *ps));
    return KM_OK;
  });
}

int km_pool_available_count(km_pool* p, uint32_t* out) {
  return WithPool(p, [&](ProcState& s) {
    if (out == nullptr) return NullArgument("out");
    *out = s.pool->AvailableCount();
    return KM_OK;
  });
}

int km_pool_reclaim_dead(km_pool* p, uint32_t* reclaimed) {
  return WithPool(p, [&](ProcState& s) {
    Result<uint32_t> n = s.pool->ReclaimDead();
    if (!n.ok()) return Fail(n.status());
    if (reclaimed != nullptr) *reclaimed = *n;
    return KM_OK;
  });
}

// ---- Broker helpers ----------------------------------------------------------

int km_broker_reclaim(const char* socket_path, int32_t pid, uint32_t* reclaimed) {
  return Guarded([&] {
    if (pid <= 0) return Fail(Code::kInvalidArgument, "pid must be > 0");
    // One request, no hello: the caller (a gunicorn master) is not a worker.
    keymesh::protocol::ControlClient client(keymesh::protocol::ControlClientOptions(
        keymesh::protocol::ResolveSocketPath(socket_path != nullptr ? socket_path : "")));
    Result<keymesh::protocol::ReclaimReply> reply =
        client.Reclaim(keymesh::protocol::ReclaimRequest{static_cast<uint32_t>(pid)});
    if (!reply.ok()) return Fail(reply.status());
    if (reclaimed != nullptr) *reclaimed = reply->reclaimed;
    return KM_OK;
  });
}

}  // extern "C"
