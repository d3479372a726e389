// keymesh/status.h: code names and Status::ToString.
#include "keymesh/status.h"

#include <cstdio>
#include <cstdlib>
#include <string>

namespace keymesh {

const char* CodeName(Code code) noexcept {
  switch (code) {
    case Code::kOk: return "ok";
    case Code::kNoAvailableKey: return "no_available_key";
    case Code::kKeyExhausted: return "key_exhausted";
    case Code::kUnknownKey: return "unknown_key";
    case Code::kNotHeld: return "not_held";
    case Code::kCapacityExceeded: return "capacity_exceeded";
    case Code::kInvalidArgument: return "invalid_argument";
    case Code::kLayoutMismatch: return "layout_mismatch";
    case Code::kSegmentError: return "segment_error";
    case Code::kBrokerUnavailable: return "broker_unavailable";
    case Code::kProtocolError: return "protocol_error";
    case Code::kPermissionDenied: return "permission_denied";
    case Code::kIoError: return "io_error";
    case Code::kCorruptState: return "corrupt_state";
    case Code::kAlreadyExists: return "already_exists";
    case Code::kClosed: return "closed";
    case Code::kInternal: return "internal";
    case Code::kBusy: return "busy";
  }
  return "unknown";
}

std::string Status::ToString() const {
  if (ok()) return "ok";
  return std::string(CodeName(code_)) + ": " + message_;
}

namespace detail {

void ResultHasNoValue(const Status& status) noexcept {
  std::fprintf(stderr, "keymesh: bug: the value of an error Result was read (%s)\n", status.ToString().c_str());
  std::abort();
}

}  // namespace detail

}  // namespace keymesh
