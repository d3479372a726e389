// The JSON readers every parser of KeyMesh shares: the control protocol's
// messages, the broker's config file and its state file. One set, so that
// "a non-negative integer" or "a number of seconds" means the same thing in
// every input, and every error names the field it is about.
//
// Strict readers return an error Status whose code and wording come from a
// FieldStyle: the wire reports kProtocolError ("field 'timeout' must be ..."),
// the config file kInvalidArgument ("config: pools.p.keys[0].weight: must
// be ..."). The field name is written as it is given: a caller that builds
// it from input (a pool name in a config path) escapes it first
// (common/text.h).
//
// Lenient readers (status replies only) never fail: a missing or mistyped
// field reads as its fallback, and a number beyond the target's range is
// clamped (never an out-of-range conversion), so a client can show the
// status of an older or newer broker.
//
// All functions are pure and thread-safe.
#ifndef KEYMESH_PROTOCOL_JSON_FIELDS_H_
#define KEYMESH_PROTOCOL_JSON_FIELDS_H_

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>

#include <boost/json/object.hpp>
#include <boost/json/value.hpp>

#include "keymesh/status.h"

namespace keymesh::protocol {

// How a reader's error names the field it read: the code, and the text
// around the field's name ("<before><field><after><problem>"); and whether a
// null value counts as an absent field.
struct FieldStyle {
  Code code;
  std::string_view before;
  std::string_view after;
  bool null_is_absent;
};
// Control-protocol messages: kProtocolError, "field 'timeout' must be ...";
// null is absent (clients write "timeout": null for "the pool's default").
inline constexpr FieldStyle kWireField{Code::kProtocolError, "field '", "' ", true};
// The broker's config file: kInvalidArgument, "config: pools.p.rpm: must be
// ..."; null is a mistyped value (an operator who wrote it meant something).
inline constexpr FieldStyle kConfigField{Code::kInvalidArgument, "config: ", ": ", false};

// Seconds are finite, >= 0 and at most this (about 31 years): larger values
// overflow a nanosecond deadline.
inline constexpr double kMaxSeconds = 1e9;

// The error for `field` in `style`: "<before><field><after><problem>".
Status FieldError(const FieldStyle& style, std::string_view field, std::string_view problem);

// Parses JSON text. Never throws (Boost.JSON reports allocation failure by
// exception; it becomes an error here). The error is kInvalidArgument with
// "not valid JSON: <why>"; callers re-code it for their input (a state file
// is kCorruptState, a frame kProtocolError).
Result<boost::json::value> ParseJson(std::string_view text);

// --- strict readers of one value -------------------------------------------
Result<std::string> ReadString(const boost::json::value& v, std::string_view field,
                               const FieldStyle& style = kWireField);
// An integer in [min, max] (a double, even 3.0, is not an integer).
// (A reader of one value takes null as a value of the wrong type.)
Result<uint64_t> ReadUint(const boost::json::value& v, std::string_view field, uint64_t min = 0,
                          uint64_t max = UINT64_MAX, const FieldStyle& style = kWireField);
// A finite number in [min, max]; integers are accepted.
Result<double> ReadNumber(const boost::json::value& v, std::string_view field, double min, double max,
                          const FieldStyle& style = kWireField);
// A duration: a finite number of seconds in [0, kMaxSeconds].
Result<double> ReadSeconds(const boost::json::value& v, std::string_view field, const FieldStyle& style = kWireField);
Result<bool> ReadBool(const boost::json::value& v, std::string_view field, const FieldStyle& style = kWireField);

// The field `field` of `o`, or nullptr when it is absent (or null, where
// `style` says null is absent).
const boost::json::value* Present(const boost::json::object& o, std::string_view field, const FieldStyle& style);

// --- strict readers of an object's field -----------------------------------
// Required fields: missing is an error naming the field. Optional fields:
// missing reads as nullopt. Null counts as missing where the style says so.
Result<std::string> GetString(const boost::json::object& o, std::string_view field,
                              const FieldStyle& style = kWireField);
Result<uint64_t> GetUint(const boost::json::object& o, std::string_view field, uint64_t min = 0,
                         uint64_t max = UINT64_MAX, const FieldStyle& style = kWireField);
Result<bool> GetBool(const boost::json::object& o, std::string_view field, const FieldStyle& style = kWireField);
Result<double> GetNumber(const boost::json::object& o, std::string_view field, double min, double max,
                         const FieldStyle& style = kWireField);
Result<std::optional<std::string>> GetOptString(const boost::json::object& o, std::string_view field,
                                                const FieldStyle& style = kWireField);
Result<std::optional<uint64_t>> GetOptUint(const boost::json::object& o, std::string_view field, uint64_t min = 0,
                                           uint64_t max = UINT64_MAX, const FieldStyle& style = kWireField);
Result<std::optional<double>> GetOptSeconds(const boost::json::object& o, std::string_view field,
                                            const FieldStyle& style = kWireField);
Result<std::optional<bool>> GetOptBool(const boost::json::object& o, std::string_view field,
                                       const FieldStyle& style = kWireField);

// Reads the fields of one message or record in a row: each call reads one
// field into its target unless an earlier one failed; status() is the first
// failure. So a parser lists its fields and checks once. `o` must outlive
// the reader.
class FieldReader {
 public:
  explicit FieldReader(const boost::json::object& o, const FieldStyle& style = kWireField) : o_(o), style_(style) {}

  // Required fields.
  void Required(std::string_view f, std::string* out) { Take(GetString(o_, f, style_), out); }
  void Required(std::string_view f, uint64_t* out, uint64_t min = 0, uint64_t max = UINT64_MAX) {
    Take(GetUint(o_, f, min, max, style_), out);
  }
  void Required(std::string_view f, uint32_t* out, uint64_t min = 0, uint64_t max = UINT32_MAX);
  void Required(std::string_view f, bool* out) { Take(GetBool(o_, f, style_), out); }
  void Required(std::string_view f, double* out, double min, double max) {
    Take(GetNumber(o_, f, min, max, style_), out);
  }
  // Optional fields: absent (or null, per the style) leaves *out as it is.
  void Optional(std::string_view f, std::optional<std::string>* out) { Take(GetOptString(o_, f, style_), out); }
  void Optional(std::string_view f, std::optional<uint64_t>* out) {
    Take(GetOptUint(o_, f, 0, UINT64_MAX, style_), out);
  }
  void Optional(std::string_view f, uint64_t* out);
  void Optional(std::string_view f, bool* out);
  void Seconds(std::string_view f, std::optional<double>* out) { Take(GetOptSeconds(o_, f, style_), out); }
  // Records a failure found by the caller (the first one wins).
  void Fail(Status st) {
    if (status_.ok()) status_ = std::move(st);
  }

  const Status& status() const noexcept { return status_; }
  // `message`, or the first failure.
  template <typename T>
  Result<T> Finish(T message) {
    if (!status_.ok()) return status_;
    return message;
  }

 private:
  template <typename T, typename Out>
  void Take(Result<T> r, Out* out) {
    if (!status_.ok()) return;
    if (!r.ok()) {
      status_ = r.status();
      return;
    }
    *out = std::move(r).value();
  }

  const boost::json::object& o_;
  const FieldStyle style_;
  Status status_;
};

// --- lenient readers (status) ----------------------------------------------
// A non-negative number (integers, or doubles truncated) clamped to `max`;
// `fallback` when missing or of another type.
uint64_t LenientUint(const boost::json::object& o, std::string_view field, uint64_t max = UINT64_MAX,
                     uint64_t fallback = 0);
// An integer (or a truncated double) clamped to int64_t; `fallback` otherwise.
int64_t LenientInt(const boost::json::object& o, std::string_view field, int64_t fallback);
// Any finite number; `fallback` otherwise.
double LenientNumber(const boost::json::object& o, std::string_view field, double fallback = 0.0);
bool LenientBool(const boost::json::object& o, std::string_view field, bool fallback = false);
std::string LenientString(const boost::json::object& o, std::string_view field);
// The object under `field`, or nullptr when missing or not an object.
const boost::json::object* LenientObject(const boost::json::object& o, std::string_view field);

}  // namespace keymesh::protocol

#endif  // KEYMESH_PROTOCOL_JSON_FIELDS_H_
