#include "client/c_api/convert.h"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <limits>
#include <string>

#include <boost/json.hpp>

#include "client/c_api/handles.h"
#include "client/pool_backend.h"
#include "protocol/status_json.h"

namespace keymesh::c_api {
namespace {

// ---------------------------------------------------------------------------
// The C numbers are the C++ ones: a change on either side fails the build
// here instead of silently misreading a caller's code, strategy or outcome.

static_assert(KM_OK == static_cast<int>(Code::kOk));
static_assert(KM_NO_AVAILABLE_KEY == static_cast<int>(Code::kNoAvailableKey));
static_assert(KM_KEY_EXHAUSTED == static_cast<int>(Code::kKeyExhausted));
static_assert(KM_UNKNOWN_KEY == static_cast<int>(Code::kUnknownKey));
static_assert(KM_NOT_HELD == static_cast<int>(Code::kNotHeld));
static_assert(KM_CAPACITY_EXCEEDED == static_cast<int>(Code::kCapacityExceeded));
static_assert(KM_INVALID_ARGUMENT == static_cast<int>(Code::kInvalidArgument));
static_assert(KM_LAYOUT_MISMATCH == static_cast<int>(Code::kLayoutMismatch));
static_assert(KM_SEGMENT_ERROR == static_cast<int>(Code::kSegmentError));
static_assert(KM_BROKER_UNAVAILABLE == static_cast<int>(Code::kBrokerUnavailable));
static_assert(KM_PROTOCOL_ERROR == static_cast<int>(Code::kProtocolError));
static_assert(KM_PERMISSION_DENIED == static_cast<int>(Code::kPermissionDenied));
static_assert(KM_IO_ERROR == static_cast<int>(Code::kIoError));
static_assert(KM_CORRUPT_STATE == static_cast<int>(Code::kCorruptState));
static_assert(KM_ALREADY_EXISTS == static_cast<int>(Code::kAlreadyExists));
static_assert(KM_CLOSED == static_cast<int>(Code::kClosed));
static_assert(KM_INTERNAL == static_cast<int>(Code::kInternal));
static_assert(KM_BUSY == static_cast<int>(Code::kBusy));
static_assert(KM_BUSY == static_cast<int>(kLastCode), "a new code needs its KM_* twin");

static_assert(KM_ROUND_ROBIN == static_cast<int>(Strategy::kRoundRobin));
static_assert(KM_LEAST_BUSY == static_cast<int>(Strategy::kLeastBusy));
static_assert(KM_WEIGHTED == static_cast<int>(Strategy::kWeighted));

static_assert(KM_OUTCOME_SUCCESS == static_cast<uint32_t>(OutcomeKind::kSuccess));
static_assert(KM_OUTCOME_FAILURE == static_cast<uint32_t>(OutcomeKind::kFailure));
static_assert(KM_OUTCOME_RATE_LIMITED == static_cast<uint32_t>(OutcomeKind::kRateLimited));
static_assert(KM_OUTCOME_CANCELLED == static_cast<uint32_t>(OutcomeKind::kCancelled));

// The sentinels. KM_DEFAULT as a key's rate_margin is the C++ "the pool's"
// value; as a timeout or cooldown it becomes an empty std::optional. The
// latency sentinels become std::nullopt (measured: Lease::EndOptions) and
// NaN (no sample: the shm layer skips a non-finite latency). None of them
// can be a valid number of seconds, which is what makes them unambiguous.
static_assert(KM_DEFAULT == kPoolRateMargin);
static_assert(KM_DEFAULT < 0 && KM_LATENCY_MEASURED < 0 && KM_LATENCY_NONE < 0);
static_assert(KM_LATENCY_MEASURED != KM_LATENCY_NONE);
static_assert((KM_ACQUIRE_POLL & (KM_ACQUIRE_POLL - 1)) == 0 && (KM_END_PERMANENT & (KM_END_PERMANENT - 1)) == 0);

// ---------------------------------------------------------------------------
// The first version of each size-prefixed struct (this release), frozen: a
// new field goes after the current end, never into padding, and
// struct_size below these sizes is refused. See keymesh.h.

constexpr size_t kPoolOptionsV1 = 56;
constexpr size_t kPoolOptionsV2 = 64;  // + max_leases_per_process
constexpr size_t kPoolOptionsV3 = 72;  // + burst (after version 2's named tail padding)
constexpr size_t kKeySpecV1 = 56;
constexpr size_t kAcquireOptionsV1 = 32;
constexpr size_t kEndOptionsV1 = 40;
constexpr size_t kKeyRestoreV1 = 48;

static_assert(sizeof(km_pool_options) == kPoolOptionsV3 && offsetof(km_pool_options, burst) == kPoolOptionsV2 &&
              offsetof(km_pool_options, strategy) == 4 && offsetof(km_pool_options, max_failures) == 8 &&
              offsetof(km_pool_options, default_cooldown) == 16 && offsetof(km_pool_options, rate_margin) == 48 &&
              offsetof(km_pool_options, max_leases_per_process) == kPoolOptionsV1);
static_assert(sizeof(km_key_spec) == kKeySpecV1 && offsetof(km_key_spec, name) == 8 &&
              offsetof(km_key_spec, tpm) == 32 && offsetof(km_key_spec, burst) == 40 &&
              offsetof(km_key_spec, rate_margin) == 48);
static_assert(sizeof(km_acquire_options) == kAcquireOptionsV1 && offsetof(km_acquire_options, timeout) == 8 &&
              offsetof(km_acquire_options, cancel) == 24);
static_assert(sizeof(km_end_options) == kEndOptionsV1 && offsetof(km_end_options, latency) == 16 &&
              offsetof(km_end_options, cooldown) == 32);

static_assert(sizeof(km_key_restore) == kKeyRestoreV1 && offsetof(km_key_restore, success_count) == 8 &&
              offsetof(km_key_restore, latency_avg) == 32 && offsetof(km_key_restore, cooldown_remaining) == 40);

// Above this a struct_size is garbage (an uninitialised struct), not a
// newer header: refuse it without reading that far.
constexpr uint32_t kMaxStructSize = 1024;

constexpr uint32_t kAcquireFlags = KM_ACQUIRE_POLL;
constexpr uint32_t kEndFlags = KM_END_PERMANENT;

uint32_t SizeOf(const void* in) noexcept {
  uint32_t size = 0;
  std::memcpy(&size, in, sizeof(size));
  return size;
}

// Copies what the caller wrote of a size-prefixed struct over *out, which
// holds this library's defaults: the fields within struct_size, and none
// beyond. A larger struct (a newer header) is taken only when every byte
// this library does not know is zero (it would otherwise drop a setting).
template <typename T>
Status ReadSized(const void* in, size_t min_size, const char* what, T* out) {
  const uint32_t size = SizeOf(in);
  if (size < min_size || size > kMaxStructSize) {  // the message only here: it allocates
    return Status(Code::kInvalidArgument, std::string(what) + ".struct_size " + std::to_string(size) +
                                              " is not a size this library reads (initialise it with " + what +
                                              "_init())");
  }
  const auto* bytes = static_cast<const unsigned char*>(in);
  if (size > sizeof(T) && std::any_of(bytes + sizeof(T), bytes + size, [](unsigned char b) { return b != 0; })) {
    return Status(Code::kInvalidArgument, std::string(what) + " sets fields this library does not know " +
                                              "(the caller was built against a newer keymesh.h)");
  }
  std::memcpy(out, in, std::min<size_t>(size, sizeof(T)));
  out->struct_size = sizeof(T);
  return Status::Ok();
}

Status Invalid(std::string message) { return Status(Code::kInvalidArgument, std::move(message)); }

// The fields a C struct and its C++ twin share, as pairs of member
// pointers: the one list that both directions (the *_init defaults out, a
// caller's arguments in) walk, so a new field is added once.
template <typename Fn>
void PoolOptionFields(Fn&& field) {
  field(&km_pool_options::max_failures, &PoolOptions::max_failures);
  field(&km_pool_options::default_cooldown, &PoolOptions::default_cooldown);
  field(&km_pool_options::acquire_timeout, &PoolOptions::acquire_timeout);
  field(&km_pool_options::max_lease_seconds, &PoolOptions::max_lease_seconds);
  field(&km_pool_options::max_cooldown, &PoolOptions::max_cooldown);
  field(&km_pool_options::rate_margin, &PoolOptions::rate_margin);
  field(&km_pool_options::max_leases_per_process, &PoolOptions::max_leases_per_process);
}

template <typename Fn>
void KeySpecFields(Fn&& field) {
  field(&km_key_spec::weight, &KeySpec::weight);
  field(&km_key_spec::max_concurrency, &KeySpec::max_concurrency);
  field(&km_key_spec::rpm, &KeySpec::rpm);
  field(&km_key_spec::tpm, &KeySpec::tpm);
  field(&km_key_spec::burst, &KeySpec::burst);
  field(&km_key_spec::rate_margin, &KeySpec::rate_margin);
}

// KM_LATENCY_MEASURED -> nullopt (Lease measures); KM_LATENCY_NONE / NaN ->
// NaN, which the pool takes as "no sample".
Result<std::optional<double>> LatencyArg(double latency) {
  if (std::isnan(latency) || latency == KM_LATENCY_NONE) {
    return std::optional<double>(std::numeric_limits<double>::quiet_NaN());
  }
  if (latency == KM_LATENCY_MEASURED) return std::optional<double>();
  if (!(latency >= 0) || !std::isfinite(latency)) {
    return Invalid("latency must be a finite number of seconds >= 0");
  }
  return std::optional<double>(latency);
}

Result<std::optional<double>> CooldownArg(double cooldown) {
  if (cooldown == KM_DEFAULT) return std::optional<double>();
  if (!(cooldown >= 0) || !std::isfinite(cooldown) || cooldown > 1e9) {
    return Invalid("cooldown must be a finite number of seconds >= 0");
  }
  return std::optional<double>(cooldown);
}

}  // namespace

void InitPoolOptions(km_pool_options* o) noexcept {
  const PoolOptions d;
  *o = km_pool_options{};
  o->struct_size = sizeof(km_pool_options);
  o->strategy = static_cast<int32_t>(d.strategy);
  PoolOptionFields([&](auto c, auto cpp) { o->*c = d.*cpp; });
}

void InitKeySpec(km_key_spec* k) noexcept {
  const KeySpec d;
  *k = km_key_spec{};
  k->struct_size = sizeof(km_key_spec);
  KeySpecFields([&](auto c, auto cpp) { k->*c = d.*cpp; });
}

void InitAcquireOptions(km_acquire_options* o) noexcept {
  *o = km_acquire_options{};
  o->struct_size = sizeof(km_acquire_options);
  o->timeout = KM_DEFAULT;
}

void InitEndOptions(km_end_options* o) noexcept {
  *o = km_end_options{};
  o->struct_size = sizeof(km_end_options);
  o->outcome = KM_OUTCOME_SUCCESS;
  o->latency = KM_LATENCY_MEASURED;
  o->cooldown = KM_DEFAULT;
}

void InitKeyRestore(km_key_restore* r) noexcept {
  *r = km_key_restore{};
  r->struct_size = sizeof(km_key_restore);
}

Result<KeyRestore> ToKeyRestore(const km_key_restore* in) {
  km_key_restore r;
  InitKeyRestore(&r);
  Status st = ReadSized(in, kKeyRestoreV1, "km_key_restore", &r);
  if (!st.ok()) return st;
  if (r.has_latency > 1) return Invalid("km_key_restore.has_latency must be 0 or 1");
  KeyRestore out;
  out.successes = r.success_count;
  out.failures = r.failure_count;
  out.rate_limited = r.rate_limited_count;
  if (r.has_latency == 1) out.latency_avg = r.latency_avg;
  out.cooldown_remaining = r.cooldown_remaining;
  return out;
}

Result<PoolOptions> ToPoolOptions(const km_pool_options* in, uint32_t* default_burst) {
  PoolOptions opts;
  if (default_burst != nullptr) *default_burst = 0;
  if (in == nullptr) return opts;
  km_pool_options o;
  InitPoolOptions(&o);
  Status st = ReadSized(in, kPoolOptionsV1, "km_pool_options", &o);
  if (!st.ok()) return st;
  if (o.strategy < KM_ROUND_ROBIN || o.strategy > KM_WEIGHTED) {
    return Invalid("strategy must be KM_ROUND_ROBIN, KM_LEAST_BUSY or KM_WEIGHTED");
  }
  if (o.burst > detail::kMaxBurst) return Invalid("burst must be at most " + std::to_string(detail::kMaxBurst));
  opts.strategy = static_cast<Strategy>(o.strategy);
  PoolOptionFields([&](auto c, auto cpp) { opts.*cpp = o.*c; });
  if (default_burst != nullptr) *default_burst = o.burst;
  return opts;
}

Result<KeySpec> ToKeySpec(const km_key_spec* in) {
  km_key_spec k;
  InitKeySpec(&k);
  Status st = ReadSized(in, kKeySpecV1, "km_key_spec", &k);
  if (!st.ok()) return st;
  if (k.secret == nullptr) return Invalid("key secret is NULL");
  KeySpec spec;
  spec.name = k.name != nullptr ? k.name : "";
  spec.secret = k.secret;
  KeySpecFields([&](auto c, auto cpp) { spec.*cpp = k.*c; });
  if (spec.weight == 0) spec.weight = 1;  // keymesh.h: weight 0 means 1
  return spec;
}

Result<std::vector<KeySpec>> ToKeySpecs(const km_key_spec* keys, size_t n) {
  std::vector<KeySpec> specs;
  if (n == 0) return specs;
  const uint32_t stride = SizeOf(keys);
  specs.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    const auto* at = reinterpret_cast<const km_key_spec*>(reinterpret_cast<const unsigned char*>(keys) + i * stride);
    if (SizeOf(at) != stride) {
      return Invalid("key #" + std::to_string(i + 1) + " has another struct_size than key #1 (initialise every " +
                     "key with km_key_spec_init())");
    }
    Result<KeySpec> spec = ToKeySpec(at);
    if (!spec.ok()) {
      return Status(spec.status().code(), "key #" + std::to_string(i + 1) + ": " + spec.status().message());
    }
    specs.push_back(std::move(spec).value());
  }
  return specs;
}

Result<Pool::AcquireOptions> ToAcquireOptions(const km_acquire_options* in, km_pool* pool,
                                              const CancelToken* fallback) {
  km_acquire_options o;
  InitAcquireOptions(&o);
  if (in != nullptr) {
    Status st = ReadSized(in, kAcquireOptionsV1, "km_acquire_options", &o);
    if (!st.ok()) return st;
  }
  if ((o.flags & ~kAcquireFlags) != 0) return Invalid("unknown km_acquire_options flags");
  if (o.cancel != nullptr && o.cancel->pool != pool) return Invalid("the cancel token belongs to another pool");
  Pool::AcquireOptions out;
  out.timeout = TimeoutArg(o.timeout);
  out.tokens = o.tokens;
  out.cancel = o.cancel != nullptr ? &o.cancel->token : fallback;
  out.poll = (o.flags & KM_ACQUIRE_POLL) != 0;
  return out;
}

Result<EndArgs> ToEndArgs(const km_end_options* in) {
  km_end_options o;
  InitEndOptions(&o);
  if (in != nullptr) {
    Status st = ReadSized(in, kEndOptionsV1, "km_end_options", &o);
    if (!st.ok()) return st;
  }
  if (o.outcome > KM_OUTCOME_CANCELLED) return Invalid("unknown outcome " + std::to_string(o.outcome));
  if ((o.flags & ~kEndFlags) != 0) return Invalid("unknown km_end_options flags");
  const bool permanent = (o.flags & KM_END_PERMANENT) != 0;
  if (permanent && o.outcome != KM_OUTCOME_FAILURE) return Invalid("KM_END_PERMANENT needs KM_OUTCOME_FAILURE");
  EndArgs out;
  out.kind = static_cast<OutcomeKind>(o.outcome);
  out.options.tokens = out.kind == OutcomeKind::kCancelled ? 0 : o.tokens;
  out.options.permanent = permanent;
  if (out.kind == OutcomeKind::kSuccess) {
    Result<std::optional<double>> latency = LatencyArg(o.latency);
    if (!latency.ok()) return latency.status();
    out.options.latency = *latency;
  } else if (out.kind == OutcomeKind::kRateLimited) {
    Result<std::optional<double>> cooldown = CooldownArg(o.cooldown);
    if (!cooldown.ok()) return cooldown.status();
    out.options.cooldown = *cooldown;
  }
  return out;
}

Result<EndArgs> ReleaseArgs(double latency, uint64_t tokens) {
  km_end_options o;
  InitEndOptions(&o);
  o.latency = latency;
  o.tokens = tokens;
  return ToEndArgs(&o);
}

Result<EndArgs> RateLimitedArgs(double cooldown) {
  km_end_options o;
  InitEndOptions(&o);
  o.outcome = KM_OUTCOME_RATE_LIMITED;
  o.cooldown = cooldown;
  return ToEndArgs(&o);
}

Result<EndArgs> OutcomeArgs(OutcomeKind kind, bool permanent) {
  EndArgs out;
  out.kind = kind;
  out.options.permanent = permanent;
  return out;
}

std::optional<double> TimeoutArg(double timeout) noexcept {
  if (timeout == KM_DEFAULT) return std::nullopt;
  return timeout;
}

std::string StatusJson(Pool& pool, const PoolStatus& ps) {
  return boost::json::serialize(protocol::PoolStatusToJson(ps, [&](const std::string& name) -> std::string {
    for (const KeyStatus& k : ps.keys) {
      if (k.name == name) {
        std::optional<std::string> masked = pool.MaskedSecretOfSlot(k.slot);
        return masked ? *masked : std::string("***");
      }
    }
    return "***";
  }));
}

}  // namespace keymesh::c_api
