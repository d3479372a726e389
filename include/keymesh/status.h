// KeyMesh's one error vocabulary.
//
// Every fallible call returns a Status (or a Result<T>, a value or a Status).
// Checking one costs a compare; an OK Status holds an empty string (the size
// of a code and a std::string, no allocation). The set of codes is closed;
// each has a fixed meaning documented below and a stable numeric value that
// the C ABI (keymesh.h) exposes as KM_* constants (static_asserts in the C
// ABI hold them equal). Messages are one line: input they quote is escaped.
//
// Thread safety: several threads may call const methods of one Status or
// Result at once; a non-const call needs external synchronization, as for
// any std type.
#ifndef KEYMESH_STATUS_H_
#define KEYMESH_STATUS_H_

#include <cstdint>
#include <optional>
#include <string>
#include <utility>

#include "keymesh/export.h"

namespace keymesh {

enum class Code : int32_t {
  kOk = 0,
  kNoAvailableKey = 1,     // no eligible key before the timeout
  kKeyExhausted = 2,       // mark_failed made the key reach max_failures (reported once)
  kUnknownKey = 3,         // no key/pool of that name or secret in this pool
  kNotHeld = 4,            // the caller does not hold this lease (double release, reclaimed)
  kCapacityExceeded = 5,   // a fixed capacity of the segment would be exceeded
  kInvalidArgument = 6,    // bad input from the caller
  kLayoutMismatch = 7,     // segment has another magic/layout version/size
  kSegmentError = 8,       // the segment cannot be created, opened or mapped, or its content is inconsistent
  kBrokerUnavailable = 9,  // the broker socket cannot be reached
  kProtocolError = 10,     // malformed or unexpected control-protocol message
  kPermissionDenied = 11,  // the peer is not allowed (SO_PEERCRED, file modes)
  kIoError = 12,           // a file or socket operation failed
  kCorruptState = 13,      // a persisted state file failed its checks
  kAlreadyExists = 14,     // a name is taken (pool, key, lock file)
  kClosed = 15,            // the object was closed
  kInternal = 16,          // a bug: an invariant did not hold
  kBusy = 17,              // a lock stayed held past the caller's lock timeout (a stopped or stuck holder)
};

// The highest code: loops over every code (name lookups) stop here.
inline constexpr Code kLastCode = Code::kBusy;

// Short, stable, lowercase name of a code ("no_available_key", ...).
KEYMESH_EXPORT const char* CodeName(Code code) noexcept;

class [[nodiscard]] Status {
 public:
  Status() noexcept = default;
  Status(Code code, std::string message) : code_(code), message_(std::move(message)) {}

  static Status Ok() noexcept { return Status(); }

  bool ok() const noexcept { return code_ == Code::kOk; }
  Code code() const noexcept { return code_; }
  const std::string& message() const noexcept { return message_; }
  // "code_name: message", or "ok".
  KEYMESH_EXPORT std::string ToString() const;

 private:
  Code code_ = Code::kOk;
  std::string message_;
};

namespace detail {
// Reading the value of an error Result is a bug: this prints the Result's
// status and aborts.
[[noreturn]] KEYMESH_EXPORT void ResultHasNoValue(const Status& status) noexcept;
}  // namespace detail

// A value or the Status that says why there is none. Reading the value of
// an error Result (value(), *, ->) aborts with the status: check ok() first.
// Like Status, safe to read from several threads at once.
template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : value_(std::move(value)) {}          // NOLINT(google-explicit-constructor): natural return
  Result(Status status) : status_(std::move(status)) {}  // NOLINT(google-explicit-constructor)

  bool ok() const noexcept { return value_.has_value(); }
  const Status& status() const noexcept { return status_; }
  T& value() & { return Checked(); }
  const T& value() const& { return Checked(); }
  T&& value() && { return std::move(Checked()); }
  T* operator->() { return &Checked(); }
  const T* operator->() const { return &Checked(); }
  T& operator*() & { return Checked(); }
  const T& operator*() const& { return Checked(); }
  T&& operator*() && { return std::move(Checked()); }

 private:
  T& Checked() {
    if (!value_.has_value()) [[unlikely]]
      detail::ResultHasNoValue(status_);
    return *value_;
  }
  const T& Checked() const {
    if (!value_.has_value()) [[unlikely]]
      detail::ResultHasNoValue(status_);
    return *value_;
  }

  std::optional<T> value_;
  Status status_;
};

}  // namespace keymesh

#endif  // KEYMESH_STATUS_H_
