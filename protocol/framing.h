// The control protocol's framing: pure parse and serialize, no I/O.
//
// One JSON object per line ('\n'-terminated). Requests are at most kMaxFrame
// bytes without the newline (the broker answers a longer one with an error
// and closes the connection); replies at most kMaxReplyFrame (a status reply
// lists every key of every pool). Envelopes:
//   request  {"v":1,"op":"<op>","id":<int>, ...the op's fields}
//   reply    {"v":1,"id":<the request's id>,"ok":true, ...result fields}
//            {"v":1,"id":<id>,"ok":false,"error":{"code":"<CodeName>","message":"<one line>"}}
// An error reply with id 0 is about the connection itself (refused at
// accept: max_sessions, max_sessions_per_uid; a frame too long); the broker
// closes the connection after it. The ops and their fields are in messages.h.
#ifndef KEYMESH_PROTOCOL_FRAMING_H_
#define KEYMESH_PROTOCOL_FRAMING_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include <boost/json/object.hpp>

#include "keymesh/status.h"

namespace keymesh::protocol {

inline constexpr int64_t kVersion = 1;
inline constexpr size_t kMaxFrame = 64 * 1024;
inline constexpr size_t kMaxReplyFrame = 64 * 1024 * 1024;

struct Request {
  int64_t id = 0;
  std::string op;
  boost::json::object body;  // the whole message, envelope included
};

// Parses one request frame (without its newline). kProtocolError on
// malformed JSON, a frame over kMaxFrame, a missing or wrong version, op or
// id. *id receives the id whenever it could be read (0 otherwise) so the
// error reply can carry it.
Result<Request> ParseRequest(std::string_view frame, int64_t* id);

// The one frame builder: `message` serialized, plus the newline.
std::string Frame(const boost::json::object& message);

// Serialized frames (newline included). The envelope's fields come first and
// win: a field of `fields` called v, op, id, ok or error is not written.
std::string MakeRequest(std::string_view op, int64_t id, boost::json::object fields);
std::string OkReply(int64_t id, boost::json::object fields = {});
// `status` must not be ok; its message is made one line (OneLine()).
std::string ErrorReply(int64_t id, const Status& status);

struct Reply {
  int64_t id = 0;
  Status status;             // ok, or the error the peer sent
  boost::json::object body;  // the whole message, envelope included
};
// Parses one reply frame (without its newline); kProtocolError if it is not
// a well-formed reply of at most kMaxReplyFrame bytes. The peer's error
// message is made one line.
Result<Reply> ParseReply(std::string_view frame);

// Inverse of CodeName(). kProtocolError for a name no code has (and for
// "ok", which names no error): the peer spoke a vocabulary we do not know.
Code CodeFromName(std::string_view name);

}  // namespace keymesh::protocol

#endif  // KEYMESH_PROTOCOL_FRAMING_H_
