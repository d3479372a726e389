#include "keymesh/rate_limit_headers.h"

#include <cctype>
#include <charconv>
#include <cmath>
#include <ctime>

#include "common/text.h"

namespace keymesh {
namespace {

std::string_view Trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  return s;
}

bool IEquals(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::tolower(static_cast<unsigned char>(a[i])) != std::tolower(static_cast<unsigned char>(b[i]))) {
      return false;
    }
  }
  return true;
}

// A non-negative decimal number without exponent ("12", "0.25", ".5").
std::optional<double> ParseDecimal(std::string_view s) {
  if (s.empty() || s.size() > 32) return std::nullopt;
  bool digit = false;
  bool dot = false;
  for (char c : s) {
    if (c >= '0' && c <= '9') {
      digit = true;
    } else if (c == '.' && !dot) {
      dot = true;
    } else {
      return std::nullopt;
    }
  }
  if (!digit) return std::nullopt;
  double v = 0;
  auto [ptr, ec] = std::from_chars(s.data(), s.data() + s.size(), v, std::chars_format::fixed);
  if (ec != std::errc() || ptr != s.data() + s.size() || !std::isfinite(v)) return std::nullopt;
  return v;
}

std::optional<uint64_t> ParseCount(std::string_view s) {
  s = Trim(s);
  uint64_t v = 0;
  if (s.empty()) return std::nullopt;
  auto [ptr, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec != std::errc() || ptr != s.data() + s.size()) return std::nullopt;
  return v;
}

int MonthIndex(std::string_view m) {
  static constexpr std::string_view kMonths[] = {"Jan", "Feb", "Mar", "Apr", "May", "Jun",
                                                 "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"};
  for (int i = 0; i < 12; ++i) {
    if (IEquals(m, kMonths[i])) return i;
  }
  return -1;
}

// Parses the three HTTP-date forms into Unix seconds.
std::optional<double> ParseHttpDate(std::string_view s) {
  char buf[64];
  if (s.size() >= sizeof(buf)) return std::nullopt;
  std::copy(s.begin(), s.end(), buf);
  buf[s.size()] = '\0';
  int day = 0, year = 0, hh = 0, mm = 0, ss = 0, used = 0;
  char wkday[16] = {0}, mon[4] = {0};
  // IMF-fixdate: "Sun, 06 Nov 1994 08:49:37 GMT"
  if (std::sscanf(buf, "%15[A-Za-z], %2d %3s %4d %2d:%2d:%2d GMT%n", wkday, &day, mon, &year, &hh, &mm, &ss, &used) ==
          7 &&
      used == static_cast<int>(s.size())) {
  } else if (used = 0; std::sscanf(buf, "%15[A-Za-z], %2d-%3s-%2d %2d:%2d:%2d GMT%n", wkday, &day, mon, &year, &hh, &mm,
                                   &ss, &used) == 7 &&
                       used == static_cast<int>(s.size())) {
    year += year < 70 ? 2000 : 1900;  // RFC 850: two-digit year
  } else if (used = 0; std::sscanf(buf, "%15[A-Za-z] %3s %2d %2d:%2d:%2d %4d%n", wkday, mon, &day, &hh, &mm, &ss, &year,
                                   &used) == 7 &&
                       used == static_cast<int>(s.size())) {
    // asctime
  } else {
    return std::nullopt;
  }
  const int month = MonthIndex(mon);
  if (month < 0 || day < 1 || day > 31 || year < 1970 || year > 9999 || hh > 23 || mm > 59 || ss > 60 || hh < 0 ||
      mm < 0 || ss < 0) {
    return std::nullopt;
  }
  std::tm tm{};
  tm.tm_year = year - 1900;
  tm.tm_mon = month;
  tm.tm_mday = day;
  tm.tm_hour = hh;
  tm.tm_min = mm;
  tm.tm_sec = ss;
  const time_t t = timegm(&tm);
  if (t == static_cast<time_t>(-1)) return std::nullopt;
  return static_cast<double>(t);
}

double Capped(double seconds) { return seconds > kMaxHeaderDelaySeconds ? kMaxHeaderDelaySeconds : seconds; }

Status Bad(std::string_view what) {
  return Status(Code::kInvalidArgument, "malformed " + std::string(what) + " value");
}

}  // namespace

Result<double> ParseRetryAfter(std::string_view value, double now_unix_seconds) {
  value = Trim(value);
  if (std::optional<double> secs = ParseDecimal(value)) return Capped(*secs);
  if (std::optional<double> at = ParseHttpDate(value)) {
    const double d = *at - now_unix_seconds;
    return d > 0 ? Capped(d) : 0.0;
  }
  return Bad("Retry-After");
}

Result<double> ParseRateLimitDuration(std::string_view value) {
  value = Trim(value);
  if (std::optional<double> secs = ParseDecimal(value)) return Capped(*secs);
  if (value.empty() || value.size() > 64) return Bad("duration");
  double total = 0;
  size_t i = 0;
  while (i < value.size()) {
    size_t j = i;
    while (j < value.size() && ((value[j] >= '0' && value[j] <= '9') || value[j] == '.')) ++j;
    std::optional<double> number = ParseDecimal(value.substr(i, j - i));
    if (!number) return Bad("duration");
    size_t k = j;
    while (k < value.size() && !((value[k] >= '0' && value[k] <= '9') || value[k] == '.')) ++k;
    const std::string_view unit = value.substr(j, k - j);
    double scale = 0;
    if (unit == "h") {
      scale = 3600;
    } else if (unit == "m") {
      scale = 60;
    } else if (unit == "s") {
      scale = 1;
    } else if (unit == "ms") {
      scale = 1e-3;
    } else if (unit == "us" || unit == "\xC2\xB5s") {
      scale = 1e-6;
    } else if (unit == "ns") {
      scale = 1e-9;
    } else {
      return Bad("duration");
    }
    total += *number * scale;
    i = k;
  }
  if (!std::isfinite(total)) return Bad("duration");
  return Capped(total);
}

Result<LimitObservation> ParseLimitHeaders(const std::vector<std::pair<std::string, std::string>>& headers,
                                           double now_unix_seconds) {
  LimitObservation obs;
  for (const auto& header : headers) {
    const std::string_view name = Trim(header.first);
    const std::string& value = header.second;
    auto count = [&](std::optional<uint64_t>* out) -> Status {
      std::optional<uint64_t> v = ParseCount(value);
      if (!v) return Status(Code::kInvalidArgument, "malformed " + Escaped(name) + " value");
      *out = v;
      return Status::Ok();
    };
    auto duration = [&](std::optional<double>* out) -> Status {
      Result<double> v = ParseRateLimitDuration(value);
      if (!v.ok()) return Status(Code::kInvalidArgument, "malformed " + Escaped(name) + " value");
      *out = *v;
      return Status::Ok();
    };
    Status st;
    if (IEquals(name, "x-ratelimit-limit-requests")) {
      st = count(&obs.limit_requests);
    } else if (IEquals(name, "x-ratelimit-limit-tokens")) {
      st = count(&obs.limit_tokens);
    } else if (IEquals(name, "x-ratelimit-remaining-requests")) {
      st = count(&obs.remaining_requests);
    } else if (IEquals(name, "x-ratelimit-remaining-tokens")) {
      st = count(&obs.remaining_tokens);
    } else if (IEquals(name, "x-ratelimit-reset-requests")) {
      st = duration(&obs.reset_requests);
    } else if (IEquals(name, "x-ratelimit-reset-tokens")) {
      st = duration(&obs.reset_tokens);
    } else if (IEquals(name, "retry-after-ms")) {
      std::optional<double> ms = ParseDecimal(Trim(value));
      if (!ms)
        st = Status(Code::kInvalidArgument, "malformed retry-after-ms value");
      else
        obs.retry_after = Capped(*ms / 1000.0);
    } else if (IEquals(name, "retry-after")) {
      Result<double> v = ParseRetryAfter(value, now_unix_seconds);
      if (!v.ok())
        st = v.status();
      else if (!obs.retry_after)
        obs.retry_after = *v;  // retry-after-ms is more precise
    }
    if (!st.ok()) return st;
  }
  return obs;
}

}  // namespace keymesh
