#include "protocol/framing.h"

#include <boost/json/serialize.hpp>
#include <boost/json/value.hpp>

#include "common/text.h"
#include "protocol/json_fields.h"

namespace keymesh::protocol {
namespace {

namespace json = boost::json;

Status ProtocolError(std::string message) { return Status(Code::kProtocolError, std::move(message)); }

Result<json::object> ParseObject(std::string_view frame, size_t max) {
  if (frame.size() > max) {
    return ProtocolError("frame of " + std::to_string(frame.size()) + " bytes exceeds " + std::to_string(max));
  }
  Result<json::value> v = ParseJson(frame);
  if (!v.ok()) return ProtocolError(v.status().message());
  if (!v->is_object()) return ProtocolError("a message must be a JSON object");
  return std::move(v->as_object());
}

std::optional<int64_t> AsInt(const json::value& v) {
  if (v.is_int64()) return v.get_int64();
  if (v.is_uint64() && v.get_uint64() <= static_cast<uint64_t>(INT64_MAX)) return static_cast<int64_t>(v.get_uint64());
  return std::nullopt;
}

// The envelope, then `fields` (which never overwrite it).
std::string Build(json::object envelope, json::object fields) {
  for (auto& kv : fields) {
    const std::string_view k = kv.key();
    if (k == "v" || k == "op" || k == "id" || k == "ok" || k == "error") continue;
    envelope.emplace(k, std::move(kv.value()));
  }
  return Frame(envelope);
}

}  // namespace

Result<Request> ParseRequest(std::string_view frame, int64_t* id) {
  *id = 0;
  Result<json::object> o = ParseObject(frame, kMaxFrame);
  if (!o.ok()) return o.status();
  Request r;
  const json::value* idv = o->if_contains("id");
  if (idv == nullptr) return ProtocolError("field 'id' is required");
  std::optional<int64_t> n = AsInt(*idv);
  if (!n) return ProtocolError("field 'id' must be an integer");
  *id = *n;
  r.id = *n;
  const json::value* ver = o->if_contains("v");
  if (ver == nullptr) return ProtocolError("field 'v' (protocol version) is required");
  std::optional<int64_t> vn = AsInt(*ver);
  if (!vn || *vn != kVersion) {
    return ProtocolError("unsupported protocol version (this broker speaks v" + std::to_string(kVersion) + ")");
  }
  const json::value* op = o->if_contains("op");
  if (op == nullptr || !op->is_string() || op->get_string().empty()) {
    return ProtocolError("field 'op' must be a non-empty string");
  }
  r.op = std::string(op->get_string());
  r.body = std::move(o).value();
  return r;
}

std::string Frame(const json::object& message) {
  std::string s = json::serialize(message);
  s.push_back('\n');
  return s;
}

std::string MakeRequest(std::string_view op, int64_t id, json::object fields) {
  return Build({{"v", kVersion}, {"op", op}, {"id", id}}, std::move(fields));
}

std::string OkReply(int64_t id, json::object fields) {
  return Build({{"v", kVersion}, {"id", id}, {"ok", true}}, std::move(fields));
}

std::string ErrorReply(int64_t id, const Status& status) {
  json::object error{{"code", CodeName(status.code())}, {"message", OneLine(status.message())}};
  return Frame({{"v", kVersion}, {"id", id}, {"ok", false}, {"error", std::move(error)}});
}

Result<Reply> ParseReply(std::string_view frame) {
  Result<json::object> o = ParseObject(frame, kMaxReplyFrame);
  if (!o.ok()) return o.status();
  Reply r;
  const json::value* id = o->if_contains("id");
  std::optional<int64_t> n = id != nullptr ? AsInt(*id) : std::nullopt;
  if (!n) return ProtocolError("reply without an integer 'id'");
  r.id = *n;
  const json::value* ok = o->if_contains("ok");
  if (ok == nullptr || !ok->is_bool()) return ProtocolError("reply without a boolean 'ok'");
  if (!ok->get_bool()) {
    const json::object* err = LenientObject(*o, "error");
    if (err == nullptr) return ProtocolError("error reply without an 'error' object");
    // The peer's message is input too: it stays one line here.
    r.status = Status(CodeFromName(LenientString(*err, "code")), OneLine(LenientString(*err, "message")));
  }
  r.body = std::move(o).value();
  return r;
}

Code CodeFromName(std::string_view name) {
  for (int32_t c = 1; c <= static_cast<int32_t>(kLastCode); ++c) {
    if (name == CodeName(static_cast<Code>(c))) return static_cast<Code>(c);
  }
  return Code::kProtocolError;
}

}  // namespace keymesh::protocol
