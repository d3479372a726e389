#include "protocol/json_fields.h"

#include <cmath>
#include <cstdio>
#include <exception>
#include <utility>

#include <boost/json/parse.hpp>

namespace keymesh::protocol {
namespace {

namespace json = boost::json;

// The integer value of `v`, if it is one (int64 >= 0 or uint64).
std::optional<uint64_t> AsUint(const json::value& v) {
  if (v.is_uint64()) return v.get_uint64();
  if (v.is_int64() && v.get_int64() >= 0) return static_cast<uint64_t>(v.get_int64());
  return std::nullopt;
}

std::optional<double> AsNumber(const json::value& v) {
  if (v.is_double()) return v.get_double();
  if (v.is_int64()) return static_cast<double>(v.get_int64());
  if (v.is_uint64()) return static_cast<double>(v.get_uint64());
  return std::nullopt;
}

std::string Number(double d) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", d);
  return buf;
}

// `d` (finite or not) clamped into [lo, hi]; NaN reads as lo.
double Clamp(double d, double lo, double hi) {
  if (!(d >= lo)) return lo;
  return d > hi ? hi : d;
}

}  // namespace

const json::value* Present(const json::object& o, std::string_view field, const FieldStyle& style) {
  const json::value* v = o.if_contains(field);
  return v == nullptr || (v->is_null() && style.null_is_absent) ? nullptr : v;
}

Status FieldError(const FieldStyle& style, std::string_view field, std::string_view problem) {
  std::string m;
  m.reserve(style.before.size() + field.size() + style.after.size() + problem.size());
  m.append(style.before).append(field).append(style.after).append(problem);
  return Status(style.code, std::move(m));
}

Result<json::value> ParseJson(std::string_view text) {
  boost::system::error_code ec;
  json::value v;
  try {
    v = json::parse(text, ec);
  } catch (const std::exception& e) {  // bad_alloc only; never let it escape
    return Status(Code::kInvalidArgument, std::string("cannot parse JSON: ") + e.what());
  }
  if (ec) return Status(Code::kInvalidArgument, "not valid JSON: " + ec.message());
  return v;
}

Result<std::string> ReadString(const json::value& v, std::string_view field, const FieldStyle& style) {
  if (!v.is_string()) return FieldError(style, field, "must be a string");
  return std::string(v.get_string());
}

Result<uint64_t> ReadUint(const json::value& v, std::string_view field, uint64_t min, uint64_t max,
                          const FieldStyle& style) {
  std::optional<uint64_t> u = AsUint(v);
  if (!u) return FieldError(style, field, "must be a non-negative integer");
  if (*u < min || *u > max) {
    return FieldError(style, field, "must be between " + std::to_string(min) + " and " + std::to_string(max));
  }
  return *u;
}

Result<double> ReadNumber(const json::value& v, std::string_view field, double min, double max,
                          const FieldStyle& style) {
  std::optional<double> d = AsNumber(v);
  if (!d || !std::isfinite(*d) || *d < min || *d > max) {
    return FieldError(style, field, "must be a finite number from " + Number(min) + " to " + Number(max));
  }
  return *d;
}

Result<double> ReadSeconds(const json::value& v, std::string_view field, const FieldStyle& style) {
  std::optional<double> d = AsNumber(v);
  if (!d || !std::isfinite(*d) || *d < 0 || *d > kMaxSeconds) {
    return FieldError(style, field, "must be a finite number of seconds >= 0");
  }
  return *d;
}

Result<bool> ReadBool(const json::value& v, std::string_view field, const FieldStyle& style) {
  if (!v.is_bool()) return FieldError(style, field, "must be a boolean");
  return v.get_bool();
}

namespace {

// A required field: absent is "is required", present is read by `read`.
template <typename Read>
auto Required(const json::object& o, std::string_view field, const FieldStyle& style, Read read)
    -> decltype(read(std::declval<const json::value&>())) {
  const json::value* v = Present(o, field, style);
  if (v == nullptr) return FieldError(style, field, "is required");
  return read(*v);
}

// An optional field: absent is nullopt, present is read by `read`.
template <typename T, typename Read>
Result<std::optional<T>> Optional(const json::object& o, std::string_view field, const FieldStyle& style, Read read) {
  const json::value* v = Present(o, field, style);
  if (v == nullptr) return std::optional<T>();
  Result<T> r = read(*v);
  if (!r.ok()) return r.status();
  return std::optional<T>(std::move(r).value());
}

}  // namespace

Result<std::string> GetString(const json::object& o, std::string_view field, const FieldStyle& style) {
  return Required(o, field, style, [&](const json::value& v) { return ReadString(v, field, style); });
}

Result<uint64_t> GetUint(const json::object& o, std::string_view field, uint64_t min, uint64_t max,
                         const FieldStyle& style) {
  return Required(o, field, style, [&](const json::value& v) { return ReadUint(v, field, min, max, style); });
}

Result<bool> GetBool(const json::object& o, std::string_view field, const FieldStyle& style) {
  return Required(o, field, style, [&](const json::value& v) { return ReadBool(v, field, style); });
}

Result<double> GetNumber(const json::object& o, std::string_view field, double min, double max,
                         const FieldStyle& style) {
  return Required(o, field, style, [&](const json::value& v) { return ReadNumber(v, field, min, max, style); });
}

Result<std::optional<std::string>> GetOptString(const json::object& o, std::string_view field,
                                                const FieldStyle& style) {
  return Optional<std::string>(o, field, style, [&](const json::value& v) { return ReadString(v, field, style); });
}

Result<std::optional<uint64_t>> GetOptUint(const json::object& o, std::string_view field, uint64_t min, uint64_t max,
                                           const FieldStyle& style) {
  return Optional<uint64_t>(o, field, style, [&](const json::value& v) { return ReadUint(v, field, min, max, style); });
}

Result<std::optional<double>> GetOptSeconds(const json::object& o, std::string_view field, const FieldStyle& style) {
  return Optional<double>(o, field, style, [&](const json::value& v) { return ReadSeconds(v, field, style); });
}

Result<std::optional<bool>> GetOptBool(const json::object& o, std::string_view field, const FieldStyle& style) {
  return Optional<bool>(o, field, style, [&](const json::value& v) { return ReadBool(v, field, style); });
}

void FieldReader::Required(std::string_view f, uint32_t* out, uint64_t min, uint64_t max) {
  uint64_t v = 0;
  Required(f, &v, min, max < UINT32_MAX ? max : UINT32_MAX);
  if (status_.ok()) *out = static_cast<uint32_t>(v);
}

void FieldReader::Optional(std::string_view f, uint64_t* out) {
  std::optional<uint64_t> v;
  Optional(f, &v);
  if (status_.ok() && v) *out = *v;
}

void FieldReader::Optional(std::string_view f, bool* out) {
  std::optional<bool> v;
  Take(GetOptBool(o_, f, style_), &v);
  if (status_.ok() && v) *out = *v;
}

uint64_t LenientUint(const json::object& o, std::string_view field, uint64_t max, uint64_t fallback) {
  const json::value* v = o.if_contains(field);
  if (v == nullptr) return fallback;
  if (std::optional<uint64_t> u = AsUint(*v)) return *u > max ? max : *u;
  if (v->is_double() && std::isfinite(v->get_double())) {
    // 2^64 as a double; every double below it converts exactly.
    const double d = Clamp(v->get_double(), 0.0, 18446744073709551616.0);
    if (d >= 18446744073709551616.0) return max;
    const uint64_t u = static_cast<uint64_t>(d);
    return u > max ? max : u;
  }
  return fallback;
}

int64_t LenientInt(const json::object& o, std::string_view field, int64_t fallback) {
  const json::value* v = o.if_contains(field);
  if (v == nullptr) return fallback;
  if (v->is_int64()) return v->get_int64();
  if (v->is_uint64())
    return v->get_uint64() > static_cast<uint64_t>(INT64_MAX) ? INT64_MAX : static_cast<int64_t>(v->get_uint64());
  if (v->is_double() && std::isfinite(v->get_double())) {
    // [-2^63, 2^63): both bounds are exact doubles.
    const double d = v->get_double();
    if (d >= 9223372036854775808.0) return INT64_MAX;
    if (d < -9223372036854775808.0) return INT64_MIN;
    return static_cast<int64_t>(d);
  }
  return fallback;
}

double LenientNumber(const json::object& o, std::string_view field, double fallback) {
  const json::value* v = o.if_contains(field);
  if (v == nullptr) return fallback;
  std::optional<double> d = AsNumber(*v);
  return d && std::isfinite(*d) ? *d : fallback;
}

bool LenientBool(const json::object& o, std::string_view field, bool fallback) {
  const json::value* v = o.if_contains(field);
  return v != nullptr && v->is_bool() ? v->get_bool() : fallback;
}

std::string LenientString(const json::object& o, std::string_view field) {
  const json::value* v = o.if_contains(field);
  return v != nullptr && v->is_string() ? std::string(v->get_string()) : std::string();
}

const json::object* LenientObject(const json::object& o, std::string_view field) {
  const json::value* v = o.if_contains(field);
  return v != nullptr && v->is_object() ? &v->get_object() : nullptr;
}

}  // namespace keymesh::protocol
