// C ABI arguments to C++ values and back: the size-prefixed option structs
// of keymesh.h (read only within their struct_size), the sentinel doubles
// (KM_DEFAULT, KM_LATENCY_*), and the status JSON. The static_asserts that
// tie every KM_* number to its C++ twin are in convert.cc.
#ifndef KEYMESH_CLIENT_C_API_CONVERT_H_
#define KEYMESH_CLIENT_C_API_CONVERT_H_

#include <cstddef>
#include <optional>
#include <string>
#include <vector>

#include "keymesh/keymesh.h"
#include "keymesh/pool.h"
#include "keymesh/status.h"
#include "keymesh/types.h"

namespace keymesh::c_api {

// The defaults the *_init() calls write.
void InitPoolOptions(km_pool_options* options) noexcept;
void InitKeySpec(km_key_spec* key) noexcept;
void InitAcquireOptions(km_acquire_options* options) noexcept;
void InitEndOptions(km_end_options* options) noexcept;
void InitKeyRestore(km_key_restore* restore) noexcept;

// `options` NULL: the defaults. *default_burst (if not null) receives
// km_pool_options.burst (range-checked), which PoolOptions does not hold:
// the C ABI gives it to the keys whose own burst is 0 (km_pool::default_burst).
Result<PoolOptions> ToPoolOptions(const km_pool_options* options, uint32_t* default_burst = nullptr);
Result<KeySpec> ToKeySpec(const km_key_spec* key);
// An array of `n` specs whose stride is keys[0].struct_size.
Result<std::vector<KeySpec>> ToKeySpecs(const km_key_spec* keys, size_t n);

// An acquire as km_acquire_options say (NULL: the defaults). The cancel
// token is options->cancel's, else `fallback` (the pool's own, which
// km_pool_close sets); km_cancel tokens of another pool are refused.
Result<Pool::AcquireOptions> ToAcquireOptions(const km_acquire_options* options, km_pool* pool,
                                              const CancelToken* fallback);

struct EndArgs {
  OutcomeKind kind = OutcomeKind::kSuccess;
  Lease::EndOptions options;
};
// An end as km_end_options say (NULL: a success with the measured latency),
// checked whole before any lease is touched.
Result<EndArgs> ToEndArgs(const km_end_options* options);
// The simple calls' arguments in the same form.
Result<EndArgs> ReleaseArgs(double latency, uint64_t tokens);
Result<EndArgs> RateLimitedArgs(double cooldown);
// A failure or a cancel: no latency, tokens or cooldown.
Result<EndArgs> OutcomeArgs(OutcomeKind kind, bool permanent = false);

// A km_key_restore (not NULL) as the Pool takes it (which range-checks it);
// has_latency other than 0 or 1 is refused.
Result<KeyRestore> ToKeyRestore(const km_key_restore* restore);

// KM_DEFAULT -> nullopt (the pool's); anything else as given (the Pool
// checks the range).
std::optional<double> TimeoutArg(double timeout) noexcept;

// The control protocol's status JSON (the broker's shape, so every status
// has one), each key's secret masked through what `pool` knows.
std::string StatusJson(Pool& pool, const PoolStatus& status);

}  // namespace keymesh::c_api

#endif  // KEYMESH_CLIENT_C_API_CONVERT_H_
