// The small value helpers of keymesh/types.h.
#include "keymesh/types.h"

#include <cmath>
#include <cstdio>

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

Result<KeyState> ParseKeyState(std::string_view name) {
  for (uint32_t v = 0; v <= static_cast<uint32_t>(KeyState::kProbe); ++v) {
    if (name == KeyStateName(static_cast<KeyState>(v))) return static_cast<KeyState>(v);
  }
  return Status(Code::kInvalidArgument, "unknown key state " + Quoted(name));
}

std::string_view CircuitStateName(CircuitState state) noexcept {
  switch (state) {
    case CircuitState::kClosed: return "closed";
    case CircuitState::kOpen: return "open";
    case CircuitState::kHalfOpen: return "half_open";
    case CircuitState::kRevoked: return "revoked";
  }
  return "closed";
}

Result<CircuitState> ParseCircuitState(std::string_view name) {
  for (uint32_t v = 0; v <= static_cast<uint32_t>(CircuitState::kRevoked); ++v) {
    if (name == CircuitStateName(static_cast<CircuitState>(v))) return static_cast<CircuitState>(v);
  }
  return Status(Code::kInvalidArgument, "unknown circuit state " + Quoted(name));
}

std::string DescribeKeyState(const KeyStatus& k) {
  char why[160] = "";
  switch (k.state) {
    case KeyState::kAvailable: break;
    case KeyState::kRemoving:
      std::snprintf(why, sizeof(why), "removed; waits for %u lease(s) to end", k.in_flight);
      break;
    case KeyState::kDisabled: std::snprintf(why, sizeof(why), "disabled by an operator"); break;
    case KeyState::kRevoked:
      std::snprintf(why, sizeof(why), "authentication failed; out until reset or add_key");
      break;
    case KeyState::kHalfOpen: std::snprintf(why, sizeof(why), "circuit half-open: its probe is in flight"); break;
    case KeyState::kExhausted:
      std::snprintf(why, sizeof(why), "circuit open after %u consecutive failures; half-open in %.1fs", k.fail_streak,
                    k.cooldown_remaining);
      break;
    case KeyState::kProbe: std::snprintf(why, sizeof(why), "circuit half-open: the next caller probes it"); break;
    case KeyState::kCooling:
      std::snprintf(why, sizeof(why), "rate limited (429 #%u in a row); cooling %.1fs", k.rate_limit_streak,
                    k.cooldown_remaining);
      break;
    case KeyState::kThrottled:
      if (k.share_active && ((k.rpm != 0 && k.share_rpm == 0) || (k.tpm != 0 && k.share_tpm == 0))) {
        std::snprintf(why, sizeof(why), "no mesh share on this host");
        break;
      }
      std::snprintf(why, sizeof(why), "request/token budget spent; refills in %.3fs", k.ready_in);
      break;
    case KeyState::kBusy: std::snprintf(why, sizeof(why), "at max concurrency %u", k.max_concurrency); break;
  }
  return why;
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

Status ValidateSecret(std::string_view secret) {
  if (secret.find_first_not_of(" \t\r\n") == std::string_view::npos) {
    return Status(Code::kInvalidArgument, secret.empty() ? "the secret is empty" : "the secret is only white space");
  }
  if (HasControl(secret)) return Status(Code::kInvalidArgument, "the secret holds a control character");
  return Status::Ok();
}

std::string MaskSecret(std::string_view secret) {
  if (secret.size() < 12) return "***";
  return "..." + std::string(secret.substr(secret.size() - 4));
}

}  // namespace keymesh
