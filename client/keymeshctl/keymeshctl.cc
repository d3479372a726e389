// keymeshctl: the operator's command line for a running keymesh-broker.
//
//   keymeshctl [--socket PATH] status [POOL] [--json]
//   keymeshctl [--socket PATH] watch [POOL]
//   keymeshctl [--socket PATH] add-key POOL NAME (--secret-env VAR | --secret-file FILE)
//                              [--weight W] [--max-concurrency N] [--rpm N] [--tpm N]
//   keymeshctl [--socket PATH] remove-key|enable|disable|reset POOL NAME
//   keymeshctl [--socket PATH] metrics
//
// Exit 0 on success; otherwise one line on stderr and a non-zero status
// (1: the broker refused or failed, 2: usage, 3: the broker is unreachable).
// Secrets are read locally, sent only over the (0660) socket, and never
// printed.
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <boost/json.hpp>

#include "common/text.h"
#include "keymesh/status.h"
#include "keymesh/types.h"
#include "protocol/protocol.h"

namespace {

namespace json = boost::json;
using keymesh::Code;
using keymesh::Escaped;
using keymesh::Quoted;
using keymesh::Result;
using keymesh::Status;

constexpr const char* kDefaultSocket = "/run/keymesh/keymesh.sock";
constexpr int kExitFailed = 1;
constexpr int kExitUsage = 2;
constexpr int kExitUnreachable = 3;

volatile sig_atomic_t g_stop = 0;
void OnSignal(int) { g_stop = 1; }

void Usage() {
  std::fprintf(stderr,
               "usage: keymeshctl [--socket PATH] COMMAND\n"
               "  status [POOL] [--json]      a table per pool (or JSON)\n"
               "  watch [POOL]                the table, refreshed every second until Ctrl-C\n"
               "  add-key POOL NAME (--secret-env VAR | --secret-file FILE)\n"
               "          [--weight W] [--max-concurrency N] [--rpm N] [--tpm N]\n"
               "  remove-key POOL NAME | enable POOL NAME | disable POOL NAME | reset POOL NAME\n"
               "  metrics                     Prometheus text exposition\n"
               "The socket is --socket, else $KEYMESH_SOCKET, else %s.\n",
               kDefaultSocket);
}

// One connection to the broker; requests are answered in order.
class Connection {
 public:
  ~Connection() {
    if (fd_ >= 0) ::close(fd_);
  }

  Status Open(const std::string& path) {
    path_ = path;
    if (path.size() >= sizeof(sockaddr_un::sun_path)) {
      return Status(Code::kInvalidArgument, "socket path too long: " + Escaped(path));
    }
    fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd_ < 0) return Unreachable(std::strerror(errno));
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
    if (::connect(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
      return Unreachable(std::strerror(errno));
    }
    return Status::Ok();
  }

  // Sends one request and waits (at most 10 s) for its reply.
  Result<keymesh::protocol::Reply> Call(std::string_view op, json::object fields) {
    const int64_t id = ++next_id_;
    const std::string frame = keymesh::protocol::MakeRequest(op, id, std::move(fields));
    for (size_t off = 0; off < frame.size();) {
      const ssize_t n = ::send(fd_, frame.data() + off, frame.size() - off, MSG_NOSIGNAL);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) return Unreachable(std::string("send: ") + std::strerror(errno));
      off += static_cast<size_t>(n);
    }
    for (;;) {
      const size_t nl = buffer_.find('\n');
      if (nl != std::string::npos) {
        std::string line = buffer_.substr(0, nl);
        buffer_.erase(0, nl + 1);
        Result<keymesh::protocol::Reply> reply = keymesh::protocol::ParseReply(line);
        if (!reply.ok()) return reply.status();
        if (reply->id != id) continue;  // not ours (cannot happen with one request in flight)
        return reply;
      }
      pollfd p{fd_, POLLIN, 0};
      const int r = ::poll(&p, 1, 10'000);
      if (r == 0)
        return Status(Code::kBrokerUnavailable, "the broker at " + Escaped(path_) + " did not answer within 10 s");
      if (r < 0) {
        if (errno == EINTR && !g_stop) continue;
        return Status(Code::kBrokerUnavailable, "interrupted");
      }
      char buf[65536];
      const ssize_t n = ::recv(fd_, buf, sizeof(buf), 0);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) return Status(Code::kBrokerUnavailable, "the broker at " + Escaped(path_) + " closed the connection");
      buffer_.append(buf, static_cast<size_t>(n));
      if (buffer_.size() > 64 * 1024 * 1024) return Status(Code::kProtocolError, "reply too large");
    }
  }

 private:
  Status Unreachable(const std::string& why) {
    return Status(Code::kBrokerUnavailable,
                  "cannot reach keymesh-broker at " + Escaped(path_) + " (" + why +
                      "); is it running? start it with 'keymesh-broker --config FILE' or 'systemctl start "
                      "keymesh-broker', or point --socket / $KEYMESH_SOCKET at its socket");
  }

  int fd_ = -1;
  int64_t next_id_ = 0;
  std::string path_;
  std::string buffer_;
};

std::string FormatSeconds(double s) {
  char buf[32];
  if (s <= 0) return "-";
  if (s < 1) {
    std::snprintf(buf, sizeof(buf), "%.0fms", s * 1000);
  } else if (s < 120) {
    std::snprintf(buf, sizeof(buf), "%.1fs", s);
  } else {
    std::snprintf(buf, sizeof(buf), "%.0fm%02.0fs", std::floor(s / 60), std::fmod(s, 60));
  }
  return buf;
}

std::string Str(const json::object& o, std::string_view k) {
  const json::value* v = o.if_contains(k);
  if (v == nullptr) return "";
  if (v->is_string()) return std::string(v->get_string());
  return json::serialize(*v);
}

double Num(const json::object& o, std::string_view k) {
  const json::value* v = o.if_contains(k);
  if (v == nullptr) return 0;
  if (v->is_double()) return v->get_double();
  if (v->is_int64()) return static_cast<double>(v->get_int64());
  if (v->is_uint64()) return static_cast<double>(v->get_uint64());
  return 0;
}

// Renders one pool as an aligned table. Columns are sized to their content.
std::string RenderPool(const json::object& pool) {
  std::vector<std::vector<std::string>> rows;
  rows.push_back({"KEY", "SECRET", "STATE", "IN-FLIGHT", "BUDGET", "COOLDOWN", "OK", "FAILED", "429", "EMA"});
  const json::value* keys = pool.if_contains("keys");
  if (keys != nullptr && keys->is_array()) {
    for (const json::value& kv : keys->get_array()) {
      if (!kv.is_object()) continue;
      const json::object& k = kv.get_object();
      std::string state = Str(k, "state");
      const std::string reason = Str(k, "reason");
      if (!reason.empty() && state != "available") state += " (" + reason + ")";
      const double max = Num(k, "max_concurrency");
      std::string inflight = Str(k, "active_requests") + "/" + (max > 0 ? Str(k, "max_concurrency") : "-");
      // Budget left now: requests (rpm keys) and tokens (tpm keys).
      std::string budget;
      if (Num(k, "rpm") > 0 && k.if_contains("requests_available")) {
        budget = std::to_string(static_cast<long long>(Num(k, "requests_available"))) + " req";
      }
      if (Num(k, "tpm") > 0 && k.if_contains("tokens_available")) {
        if (!budget.empty()) budget += ", ";
        budget += std::to_string(static_cast<long long>(Num(k, "tokens_available"))) + " tok";
      }
      if (budget.empty()) budget = "-";
      char ema[32];
      if (k.if_contains("has_latency") && k.at("has_latency").is_bool() && k.at("has_latency").get_bool()) {
        std::snprintf(ema, sizeof(ema), "%.0fms", Num(k, "latency_avg") * 1000);
      } else {
        std::snprintf(ema, sizeof(ema), "-");
      }
      rows.push_back({Str(k, "name"), Str(k, "key_suffix").empty() ? "***" : Str(k, "key_suffix"), state, inflight,
                      budget, FormatSeconds(Num(k, "cooldown_remaining")), Str(k, "success_count"),
                      Str(k, "failure_count"), Str(k, "rate_limited"), ema});
    }
  }
  std::vector<size_t> width(rows[0].size(), 0);
  for (const auto& r : rows) {
    for (size_t c = 0; c < r.size(); ++c) width[c] = std::max(width[c], r[c].size());
  }
  std::ostringstream out;
  const json::object* m = nullptr;
  if (const json::value* mv = pool.if_contains("pool_metrics"); mv != nullptr && mv->is_object()) m = &mv->get_object();
  out << "pool " << Str(pool, "name") << " (" << Str(pool, "strategy") << ")";
  if (m != nullptr) {
    out << "  acquires " << Str(*m, "total_acquires") << ", releases " << Str(*m, "total_releases") << ", failures "
        << Str(*m, "total_failures") << ", 429s " << Str(*m, "total_rate_limited") << ", reclaimed "
        << Str(*m, "total_reclaimed") << ", no key " << Str(*m, "no_key_available_count");
  }
  out << "\n";
  for (const auto& r : rows) {
    for (size_t c = 0; c < r.size(); ++c) {
      const bool right = c >= 6;  // counters and latency right-aligned
      const std::string pad(width[c] - r[c].size(), ' ');
      out << (c ? "  " : "") << (right ? pad + r[c] : r[c] + (c + 1 < r.size() ? pad : ""));
    }
    out << "\n";
  }
  return out.str();
}

int Fail(const Status& st) {
  std::fprintf(stderr, "keymeshctl: %s\n", st.message().c_str());
  return st.code() == Code::kBrokerUnavailable ? kExitUnreachable : kExitFailed;
}

int UsageError(const std::string& msg) {
  std::fprintf(stderr, "keymeshctl: %s (try --help)\n", msg.c_str());
  return kExitUsage;
}

Result<std::string> ReadSecret(const std::string& env, const std::string& file) {
  if (!env.empty()) {
    const char* v = std::getenv(env.c_str());
    if (v == nullptr || *v == '\0') {
      return Status(Code::kInvalidArgument, "environment variable " + env + " is not set or empty");
    }
    return std::string(v);
  }
  std::ifstream in(file, std::ios::binary);
  if (!in) return Status(Code::kIoError, "cannot read secret file " + Escaped(file) + ": " + std::strerror(errno));
  std::string s((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  while (!s.empty() && (s.back() == '\n' || s.back() == '\r' || s.back() == ' ')) s.pop_back();
  if (s.empty()) return Status(Code::kInvalidArgument, "secret file " + Escaped(file) + " is empty");
  return s;
}

Result<uint64_t> ParseCount(const std::string& flag, const char* text) {
  char* end = nullptr;
  errno = 0;
  const unsigned long long v = std::strtoull(text, &end, 10);
  if (errno != 0 || end == text || *end != '\0' || text[0] == '-') {
    return Status(Code::kInvalidArgument, flag + " needs a non-negative integer, not " + Quoted(text));
  }
  return static_cast<uint64_t>(v);
}

int Status_(Connection& conn, const std::string& pool, bool as_json, bool clear_screen) {
  json::object f;
  if (!pool.empty()) f["pool"] = pool;
  Result<keymesh::protocol::Reply> r = conn.Call("status", std::move(f));
  if (!r.ok()) return Fail(r.status());
  if (!r->status.ok()) return Fail(r->status);
  const json::value* pools = r->body.if_contains("pools");
  if (pools == nullptr || !pools->is_array()) return Fail(Status(Code::kProtocolError, "status reply without pools"));
  if (as_json) {
    std::printf("%s\n", json::serialize(*pools).c_str());
    return 0;
  }
  std::string text;
  for (const json::value& p : pools->get_array()) {
    if (p.is_object()) text += RenderPool(p.get_object()) + "\n";
  }
  if (clear_screen) std::fputs("\x1b[H\x1b[2J", stdout);
  std::fputs(text.c_str(), stdout);
  std::fflush(stdout);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  std::string socket_path;
  if (const char* env = std::getenv("KEYMESH_SOCKET"); env != nullptr && *env != '\0') socket_path = env;
  if (socket_path.empty()) socket_path = kDefaultSocket;
  size_t i = 0;
  while (i < args.size() && args[i].rfind("--", 0) == 0) {
    if (args[i] == "--help" || args[i] == "-h") {
      Usage();
      return 0;
    }
    if (args[i] == "--socket" && i + 1 < args.size()) {
      socket_path = args[i + 1];
      i += 2;
      continue;
    }
    if (args[i].rfind("--socket=", 0) == 0) {
      socket_path = args[i].substr(9);
      ++i;
      continue;
    }
    return UsageError("unknown option " + Quoted(args[i]));
  }
  if (i >= args.size()) {
    Usage();
    return kExitUsage;
  }
  const std::string command = args[i++];
  std::vector<std::string> rest(args.begin() + static_cast<long>(i), args.end());

  Connection conn;
  auto open = [&]() -> Status { return conn.Open(socket_path); };

  if (command == "status" || command == "watch") {
    bool as_json = false;
    std::string pool;
    for (const std::string& a : rest) {
      if (a == "--json" && command == "status") {
        as_json = true;
      } else if (a.rfind("--", 0) == 0 || !pool.empty()) {
        return UsageError("unexpected argument " + Quoted(a) + " for " + command);
      } else {
        pool = a;
      }
    }
    Status st = open();
    if (!st.ok()) return Fail(st);
    if (command == "status") return Status_(conn, pool, as_json, false);
    struct sigaction sa {};
    sa.sa_handler = OnSignal;
    sigaction(SIGINT, &sa, nullptr);
    sigaction(SIGTERM, &sa, nullptr);
    while (!g_stop) {
      const int rc = Status_(conn, pool, false, true);
      if (rc != 0) return rc;
      for (int t = 0; t < 10 && !g_stop; ++t) ::usleep(100'000);  // refresh period: 1 s
    }
    return 0;
  }

  if (command == "metrics") {
    if (!rest.empty()) return UsageError("metrics takes no arguments");
    Status st = open();
    if (!st.ok()) return Fail(st);
    Result<keymesh::protocol::Reply> r = conn.Call("metrics", {});
    if (!r.ok()) return Fail(r.status());
    if (!r->status.ok()) return Fail(r->status);
    const std::string text = Str(r->body, "text");
    std::fputs(text.c_str(), stdout);
    return 0;
  }

  if (command == "remove-key" || command == "enable" || command == "disable" || command == "reset") {
    if (rest.size() != 2) return UsageError(command + " needs POOL NAME");
    Status st = open();
    if (!st.ok()) return Fail(st);
    const std::string op = command == "remove-key" ? "remove_key" : command;
    Result<keymesh::protocol::Reply> r = conn.Call(op, {{"pool", rest[0]}, {"name", rest[1]}});
    if (!r.ok()) return Fail(r.status());
    if (!r->status.ok()) return Fail(r->status);
    std::printf("%s: %s/%s\n", command.c_str(), rest[0].c_str(), rest[1].c_str());
    return 0;
  }

  if (command == "add-key") {
    if (rest.size() < 2) return UsageError("add-key needs POOL NAME and --secret-env VAR or --secret-file FILE");
    json::object f{{"pool", rest[0]}, {"name", rest[1]}};
    std::string env, file;
    for (size_t a = 2; a < rest.size(); a += 2) {
      const std::string& flag = rest[a];
      if (a + 1 >= rest.size()) return UsageError(flag + " needs a value");
      const char* value = rest[a + 1].c_str();
      if (flag == "--secret-env") {
        env = value;
      } else if (flag == "--secret-file") {
        file = value;
      } else if (flag == "--weight" || flag == "--max-concurrency" || flag == "--rpm" || flag == "--tpm") {
        Result<uint64_t> v = ParseCount(flag, value);
        if (!v.ok()) return UsageError(v.status().message());
        std::string field = flag.substr(2);
        for (char& c : field) c = c == '-' ? '_' : c;
        f[field] = *v;
      } else {
        return UsageError("unknown add-key option " + Quoted(flag));
      }
    }
    if (env.empty() == file.empty()) return UsageError("add-key needs exactly one of --secret-env and --secret-file");
    Result<std::string> secret = ReadSecret(env, file);
    if (!secret.ok()) return Fail(secret.status());
    f["secret"] = *secret;
    if (!file.empty()) f["secret_file"] = file;
    Status st = open();
    if (!st.ok()) return Fail(st);
    Result<keymesh::protocol::Reply> r = conn.Call("add_key", std::move(f));
    if (!r.ok()) return Fail(r.status());
    if (!r->status.ok()) return Fail(r->status);
    std::printf("add-key: %s/%s (%s)\n", rest[0].c_str(), rest[1].c_str(), keymesh::MaskSecret(*secret).c_str());
    return 0;
  }

  return UsageError("unknown command " + Quoted(command));
}
