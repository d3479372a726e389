#include "broker/mesh/redis_connection.h"

#include <poll.h>
#include <sys/eventfd.h>
#include <sys/time.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <hiredis/hiredis.h>
#include <map>
#include <utility>

#include "common/text.h"

namespace keymesh::broker::mesh {
namespace {

using Clock = std::chrono::steady_clock;

timeval ToTimeval(double seconds) {
  if (!(seconds > 0)) seconds = 0.001;
  const auto us = static_cast<int64_t>(std::llround(seconds * 1e6));
  timeval tv{};
  tv.tv_sec = static_cast<time_t>(us / 1000000);
  tv.tv_usec = static_cast<suseconds_t>(us % 1000000);
  return tv;
}

// hiredis's messages ("Connection refused", "Resource temporarily
// unavailable") as ours: lower case, a timeout called a timeout.
std::string DescribeHiredisError(int err, const char* errstr) {
  std::string text = OneLine(errstr != nullptr ? errstr : "");
  if (err == REDIS_ERR_EOF) return "connection closed";
  if (text == "Resource temporarily unavailable" || text == "Connection timed out") return "timed out";
  if (text.empty()) return "i/o error";
  text[0] = static_cast<char>(std::tolower(static_cast<unsigned char>(text[0])));
  return text;
}

// Builds RedisReply trees while hiredis parses, so nothing of hiredis's
// reply types leaves this file and a reply over the limits is refused
// before it is allocated (hiredis calls createArray before the elements).
struct ReplyBuilder {
  RedisLimits limits;
  size_t elements = 0;
  size_t bytes = 0;
  bool over = false;  // a limit was hit: hiredis reports "out of memory", we report the limit

  void Reset() {
    elements = 0;
    bytes = 0;
    over = false;
  }
};

// What an array reserves before its elements arrive (Place).
constexpr size_t kReserveElements = 16;

uint32_t Depth(const redisReadTask* task) {
  uint32_t depth = 0;
  for (const redisReadTask* t = task->parent; t != nullptr; t = t->parent) ++depth;
  return depth;
}

// Places a new node: the root is heap-allocated (hiredis hands it back or
// frees it with FreeObject), a child is appended to its parent's vector.
// An array grows as its elements arrive, not to the count its header
// announces: "*1000000" alone would otherwise cost 70 MB. Growing moves
// only finished siblings (hiredis fills depth first and keeps pointers to
// the open path alone: each open array is the last element of its parent).
RedisReply* Place(const redisReadTask* task) {
  if (task->parent == nullptr) return new RedisReply();  // NOLINT(cppcoreguidelines-owning-memory): hiredis owns it
  auto* parent = static_cast<RedisReply*>(task->parent->obj);
  if (parent == nullptr || task->idx < 0 || static_cast<size_t>(task->idx) != parent->elements.size()) return nullptr;
  return &parent->elements.emplace_back();
}

ReplyBuilder* BuilderOf(const redisReadTask* task) { return static_cast<ReplyBuilder*>(task->privdata); }

void* CreateString(const redisReadTask* task, char* str, size_t len) {
  ReplyBuilder* b = BuilderOf(task);
  if (b == nullptr || len > b->limits.max_bulk || b->bytes + len > b->limits.max_total) {
    if (b != nullptr) b->over = true;
    return nullptr;
  }
  b->bytes += len;
  RedisReply* r = Place(task);
  if (r == nullptr) return nullptr;
  switch (task->type) {
    case REDIS_REPLY_ERROR: r->type = RedisReply::Type::kError; break;
    case REDIS_REPLY_STATUS: r->type = RedisReply::Type::kStatus; break;
    default: r->type = RedisReply::Type::kString; break;
  }
  r->str.assign(str, len);
  return r;
}

void* CreateArray(const redisReadTask* task, int count) {
  ReplyBuilder* b = BuilderOf(task);
  if (b == nullptr || count < 0 || Depth(task) + 1 > b->limits.max_depth ||
      b->elements + static_cast<size_t>(count) > b->limits.max_elements) {
    if (b != nullptr) b->over = true;
    return nullptr;
  }
  b->elements += static_cast<size_t>(count);
  RedisReply* r = Place(task);
  if (r == nullptr) return nullptr;
  r->type = RedisReply::Type::kArray;
  r->elements.reserve(std::min<size_t>(static_cast<size_t>(count), kReserveElements));
  return r;
}

void* CreateInteger(const redisReadTask* task, long long value) {  // NOLINT(google-runtime-int): hiredis's type
  RedisReply* r = Place(task);
  if (r == nullptr) return nullptr;
  r->type = RedisReply::Type::kInteger;
  r->integer = static_cast<int64_t>(value);
  return r;
}

void* CreateNil(const redisReadTask* task) {
  RedisReply* r = Place(task);
  if (r == nullptr) return nullptr;
  r->type = RedisReply::Type::kNil;
  return r;
}

// hiredis frees only roots (on an error, or a reply never taken).
void FreeObject(void* obj) { delete static_cast<RedisReply*>(obj); }  // NOLINT(cppcoreguidelines-owning-memory)

redisReplyObjectFunctions kReplyFunctions = {CreateString, CreateArray, CreateInteger, CreateNil, FreeObject};

bool IsSha(const std::string& s) {
  if (s.size() != 40) return false;
  for (char c : s) {
    if (!std::isxdigit(static_cast<unsigned char>(c))) return false;
  }
  return true;
}

}  // namespace

struct RedisConnection::Impl {
  redisContext* ctx = nullptr;
  ReplyBuilder builder;
  std::map<std::string, std::string> shas;  // script name -> SHA1 Redis gave for it
  // Interrupt() counts up here; every wait polls it beside the socket.
  int wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);

  ~Impl() {
    Close();
    if (wake_fd >= 0) close(wake_fd);
  }
  void Close() noexcept {
    if (ctx != nullptr) redisFree(ctx);
    ctx = nullptr;
  }
  // Consumes a pending Interrupt(); true if there was one.
  bool TakeWake() noexcept {
    uint64_t n = 0;
    return wake_fd >= 0 && read(wake_fd, &n, sizeof(n)) == static_cast<ssize_t>(sizeof(n));
  }
};

RedisConnection::RedisConnection(Options options)
    : options_(std::move(options)),
      prefix_("mesh: redis " + options_.endpoint.Describe() + ": "),
      impl_(std::make_unique<Impl>()) {
  impl_->builder.limits = options_.limits;
}

RedisConnection::~RedisConnection() = default;

bool RedisConnection::connected() const noexcept { return impl_->ctx != nullptr; }

void RedisConnection::Disconnect() noexcept { impl_->Close(); }

void RedisConnection::Interrupt() noexcept {
  const uint64_t one = 1;
  if (impl_->wake_fd >= 0) (void)!write(impl_->wake_fd, &one, sizeof(one));
}

Status RedisConnection::Fail(Code code, const std::string& what) {
  Disconnect();
  return Status(code, prefix_ + what);
}

Status RedisConnection::Connect() {
  if (impl_->ctx != nullptr) return Status::Ok();
  const timeval tv = ToTimeval(options_.timeout);
  const RedisEndpoint& ep = options_.endpoint;
  redisContext* c = ep.unix_path.empty() ? redisConnectWithTimeout(ep.host.c_str(), ep.port, tv)
                                         : redisConnectUnixWithTimeout(ep.unix_path.c_str(), tv);
  if (c == nullptr) return Status(Code::kIoError, prefix_ + "out of memory");
  if (c->err != 0) {
    std::string what = DescribeHiredisError(c->err, c->errstr);
    redisFree(c);
    return Status(Code::kIoError, prefix_ + what);
  }
  if (redisSetTimeout(c, tv) != REDIS_OK || (ep.unix_path.empty() && redisEnableKeepAlive(c) != REDIS_OK)) {
    std::string what = DescribeHiredisError(c->err, c->errstr);
    redisFree(c);
    return Status(Code::kIoError, prefix_ + what);
  }
  c->reader->fn = &kReplyFunctions;
  c->reader->privdata = &impl_->builder;
  impl_->ctx = c;

  std::vector<std::vector<std::string>> setup;
  if (!options_.password.empty()) setup.push_back({"AUTH", options_.password});
  if (ep.db != 0) setup.push_back({"SELECT", std::to_string(ep.db)});
  if (setup.empty()) return Status::Ok();
  Result<std::vector<RedisReply>> replies = Pipeline(setup);
  if (!replies.ok()) return replies.status();
  for (size_t i = 0; i < replies->size(); ++i) {
    const RedisReply& r = (*replies)[i];
    const bool auth = !options_.password.empty() && i == 0;
    if (r.type == RedisReply::Type::kError) {
      // Redis's error text never repeats the password.
      return Fail(Code::kIoError, std::string(auth ? "AUTH" : "SELECT") + " refused: " + OneLine(r.str));
    }
    if (r.type != RedisReply::Type::kStatus) {
      return Fail(Code::kProtocolError, std::string(auth ? "AUTH" : "SELECT") + ": unexpected reply");
    }
  }
  return Status::Ok();
}

Result<std::vector<RedisReply>> RedisConnection::Pipeline(const std::vector<std::vector<std::string>>& commands,
                                                          uint32_t extra_ms) {
  if (impl_->TakeWake()) return Fail(Code::kIoError, "interrupted");
  if (Status st = Connect(); !st.ok()) return st;
  redisContext* c = impl_->ctx;
  const auto deadline = Clock::now() + std::chrono::microseconds(static_cast<int64_t>(options_.timeout * 1e6)) +
                        std::chrono::milliseconds(extra_ms);
  // A blocking command waits longer than the socket's own timeout allows.
  if (extra_ms > 0 && redisSetTimeout(c, ToTimeval(options_.timeout + extra_ms / 1000.0)) != REDIS_OK) {
    return Fail(Code::kIoError, DescribeHiredisError(c->err, c->errstr));
  }
  for (const auto& args : commands) {
    std::vector<const char*> argv;
    std::vector<size_t> lens;
    argv.reserve(args.size());
    lens.reserve(args.size());
    for (const auto& a : args) {
      argv.push_back(a.data());
      lens.push_back(a.size());
    }
    if (redisAppendCommandArgv(c, static_cast<int>(argv.size()), argv.data(), lens.data()) != REDIS_OK) {
      return Fail(Code::kIoError, "out of memory");
    }
  }
  auto remaining_ms = [&]() -> int {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
    return left <= 0 ? 0 : static_cast<int>(left);
  };
  enum class Waited { kReady, kTimedOut, kInterrupted };
  auto wait = [&](short events) -> Waited {  // NOLINT(google-runtime-int): poll's type
    for (;;) {
      pollfd pfd[2] = {{c->fd, events, 0}, {impl_->wake_fd, POLLIN, 0}};
      const int left = remaining_ms();
      if (left == 0) return Waited::kTimedOut;
      const int n = poll(pfd, impl_->wake_fd >= 0 ? 2 : 1, left);
      if (n > 0 && (pfd[1].revents & POLLIN) != 0 && impl_->TakeWake()) return Waited::kInterrupted;
      if (n > 0 && pfd[0].revents != 0) return Waited::kReady;
      if (n == 0) return Waited::kTimedOut;
      if (n < 0 && errno != EINTR) return Waited::kTimedOut;
    }
  };
  auto waited = [&](Waited w) { return Fail(Code::kIoError, w == Waited::kInterrupted ? "interrupted" : "timed out"); };
  int done = 0;
  while (done == 0) {
    if (const Waited w = wait(POLLOUT); w != Waited::kReady) return waited(w);
    if (redisBufferWrite(c, &done) != REDIS_OK) return Fail(Code::kIoError, DescribeHiredisError(c->err, c->errstr));
  }
  std::vector<RedisReply> out;
  out.reserve(commands.size());
  ReplyBuilder& b = impl_->builder;
  // What the reader may buffer: one reply at its largest, plus framing
  // (a bulk announced larger than the limit is refused once this fills).
  const size_t max_buffer = options_.limits.max_total + (size_t{64} << 10);
  for (size_t i = 0; i < commands.size(); ++i) {
    b.Reset();
    void* raw = nullptr;
    for (;;) {
      if (redisGetReplyFromReader(c, &raw) != REDIS_OK) {
        if (b.over) return Fail(Code::kProtocolError, "reply over the size limits");
        if (c->err == REDIS_ERR_PROTOCOL) return Fail(Code::kProtocolError, "bad reply: " + OneLine(c->errstr));
        return Fail(Code::kIoError, DescribeHiredisError(c->err, c->errstr));
      }
      if (raw != nullptr) break;
      if (c->reader->len - c->reader->pos > max_buffer) return Fail(Code::kProtocolError, "reply over the size limits");
      if (const Waited w = wait(POLLIN); w != Waited::kReady) return waited(w);
      if (redisBufferRead(c) != REDIS_OK) return Fail(Code::kIoError, DescribeHiredisError(c->err, c->errstr));
    }
    std::unique_ptr<RedisReply> reply(static_cast<RedisReply*>(raw));
    out.push_back(std::move(*reply));
  }
  if (extra_ms > 0 && redisSetTimeout(c, ToTimeval(options_.timeout)) != REDIS_OK) {
    return Fail(Code::kIoError, DescribeHiredisError(c->err, c->errstr));
  }
  return out;
}

Result<RedisReply> RedisConnection::ErrorReplyToStatus(RedisReply reply) {
  if (reply.type == RedisReply::Type::kError) {
    // The connection is fine: Redis refused the command.
    return Status(Code::kIoError, prefix_ + "error reply: " + OneLine(reply.str.substr(0, 512)));
  }
  return reply;
}

Result<RedisReply> RedisConnection::Command(const std::vector<std::string>& args, uint32_t extra_ms) {
  Result<std::vector<RedisReply>> r = Pipeline({args}, extra_ms);
  if (!r.ok()) return r.status();
  if (r->size() != 1) return Fail(Code::kInternal, "pipeline lost a reply");
  return ErrorReplyToStatus(std::move(r->front()));
}

Result<RedisReply> RedisConnection::Eval(const LuaScript& script, const std::vector<std::string>& args) {
  for (int attempt = 0; attempt < 2; ++attempt) {
    auto it = impl_->shas.find(script.name);
    if (it == impl_->shas.end()) {
      Result<RedisReply> loaded = Command({"SCRIPT", "LOAD", script.source});
      if (!loaded.ok()) return loaded.status();
      if (!loaded->is_string() || !IsSha(loaded->str)) {
        return Fail(Code::kProtocolError, "SCRIPT LOAD: unexpected reply");
      }
      it = impl_->shas.emplace(script.name, loaded->str).first;
    }
    std::vector<std::string> argv = {"EVALSHA", it->second, "0"};
    argv.insert(argv.end(), args.begin(), args.end());
    Result<std::vector<RedisReply>> r = Pipeline({argv});
    if (!r.ok()) return r.status();
    RedisReply& reply = r->front();
    if (reply.type == RedisReply::Type::kError && reply.str.rfind("NOSCRIPT", 0) == 0) {
      impl_->shas.erase(it);  // Redis restarted or flushed its scripts: load again, once
      continue;
    }
    if (reply.type == RedisReply::Type::kError) {
      return Status(Code::kIoError, prefix_ + std::string(script.name) + ": " + OneLine(reply.str.substr(0, 512)));
    }
    return std::move(reply);
  }
  return Status(Code::kIoError, prefix_ + std::string(script.name) + ": NOSCRIPT after SCRIPT LOAD");
}

}  // namespace keymesh::broker::mesh
