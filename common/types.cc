// The small value helpers of keymesh/types.h.
#include "keymesh/types.h"

#include <cmath>

#include "common/text.h"

namespace keymesh {

std::string_view StrategyName(Strategy strategy) noexcept {
  switch (strategy) {
    case Strategy::kRoundRobin: return "round_robin";
    case Strategy::kLeastBusy: return "least_busy";
    case Strategy::kWeighted: return "weighted";
  }
  return "least_busy";
}

Result<Strategy> ParseStrategy(std::string_view name) {
  if (name == "round_robin") return Strategy::kRoundRobin;
  if (name == "least_busy") return Strategy::kLeastBusy;
  if (name == "weighted") return Strategy::kWeighted;
  return Status(Code::kInvalidArgument, "strategy must be round_robin, least_busy or weighted, not " + Quoted(name));
}

std::string_view KeyStateName(KeyState state) noexcept {
  switch (state) {
    case KeyState::kAvailable: return "available";
    case KeyState::kBusy: return "busy";
    case KeyState::kCooling: return "cooling";
    case KeyState::kExhausted: return "exhausted";
    case KeyState::kDisabled: return "disabled";
    case KeyState::kRemoving: return "removing";
    case KeyState::kHalfOpen: return "half_open";
    case KeyState::kRevoked: return "revoked";
    case KeyState::kThrottled: return "throttled";
    case KeyState::kProbe: return "probe";
  }
  return "unknown";
}

namespace {
Status CheckSeconds(const char* field, double v, bool allow_zero) {
  if (!std::isfinite(v) || v < 0 || (!allow_zero && v == 0) || v > 1e9) {
    return Status(Code::kInvalidArgument,
                  std::string(field) + " must be a finite number of seconds " + (allow_zero ? ">= 0" : "> 0"));
  }
  return Status::Ok();
}
}  // namespace

Status ValidatePoolOptions(const PoolOptions& o) {
  if (o.max_failures < 1) return Status(Code::kInvalidArgument, "max_failures must be >= 1");
  for (Status st : {CheckSeconds("default_cooldown", o.default_cooldown, true),
                    CheckSeconds("acquire_timeout", o.acquire_timeout, true),
                    CheckSeconds("max_lease_seconds", o.max_lease_seconds, true),
                    CheckSeconds("max_cooldown", o.max_cooldown, true)}) {
    if (!st.ok()) return st;
  }
  if (!(o.rate_margin >= 0.0 && o.rate_margin < 0.5)) {
    return Status(Code::kInvalidArgument, "rate_margin must be >= 0 and < 0.5");
  }
  return Status::Ok();
}

std::string MaskSecret(std::string_view secret) {
  if (secret.size() < 12) return "***";
  return "..." + std::string(secret.substr(secret.size() - 4));
}

}  // namespace keymesh
