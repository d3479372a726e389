// How errors cross the C ABI: a KM_* code as the return value and a
// one-line message per thread (km_last_error). Nothing throws across the
// boundary: every entry point runs its body through Guarded().
#ifndef KEYMESH_CLIENT_C_API_ERRORS_H_
#define KEYMESH_CLIENT_C_API_ERRORS_H_

#include <exception>
#include <new>
#include <string>
#include <utility>

#include "keymesh/status.h"

namespace keymesh::c_api {

// The message of the last failed call on this thread (km_last_error).
inline thread_local std::string t_last_error;

// Records `message` as this thread's last error and returns `code`.
inline int Fail(Code code, std::string message) noexcept {
  try {
    t_last_error = std::move(message);
  } catch (...) {
    t_last_error.clear();
  }
  return static_cast<int>(code);
}

inline int Fail(const Status& status) noexcept { return Fail(status.code(), status.message()); }

// Fail(status) unless it is OK (then KM_OK).
inline int FromStatus(const Status& status) noexcept { return status.ok() ? 0 : Fail(status); }

// Runs `fn` (returning int) and turns any exception into a status.
template <typename Fn>
int Guarded(Fn&& fn) noexcept {
  try {
    return fn();
  } catch (const std::bad_alloc&) {
    return Fail(Code::kInternal, "out of memory");
  } catch (const std::exception& e) {
    return Fail(Code::kInternal, std::string("unexpected error: ") + e.what());
  } catch (...) {
    return Fail(Code::kInternal, "unexpected error");
  }
}

}  // namespace keymesh::c_api

#endif  // KEYMESH_CLIENT_C_API_ERRORS_H_
