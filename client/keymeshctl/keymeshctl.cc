// keymeshctl: the operator's command line for a running keymesh-broker.
//
//   keymeshctl [--socket PATH] status [POOL] [--json]
//   keymeshctl [--socket PATH] watch [POOL]
//   keymeshctl [--socket PATH] add-key POOL NAME (--secret-env VAR | --secret-file FILE)
//                              [--weight W] [--max-concurrency N] [--rpm N] [--tpm N]
//                              [--burst N] [--rate-margin F]
//   keymeshctl [--socket PATH] remove-key|enable|disable|reset POOL NAME
//   keymeshctl [--socket PATH] metrics
//   keymeshctl [--socket PATH] mesh [--json]
//
// Exit 0 on success; otherwise one line on stderr and a non-zero status
// (1: the broker refused or failed, 2: usage, 3: the broker is unreachable).
// Secrets are read locally, sent only over the (0660) socket, and never
// printed. Everything it says to the broker goes through
// protocol::ControlClient.
#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include <boost/json/serialize.hpp>

#include "client/keymeshctl/table.h"
#include "common/text.h"
#include "keymesh/status.h"
#include "keymesh/types.h"
#include "protocol/control_client.h"
#include "protocol/messages.h"
#include "protocol/socket_path.h"

namespace {

namespace kp = keymesh::protocol;
using keymesh::Code;
using keymesh::Escaped;
using keymesh::Quoted;
using keymesh::Result;
using keymesh::Status;

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
               "          [--weight W] [--max-concurrency N] [--rpm N] [--tpm N] [--burst N] [--rate-margin F]\n"
               "  remove-key POOL NAME | enable POOL NAME | disable POOL NAME | reset POOL NAME\n"
               "  metrics                     Prometheus text exposition\n"
               "  mesh [--json]               the hosts sharing the keys through Redis, and this host's shares\n"
               "The socket is --socket, else $KEYMESH_SOCKET, else %s.\n",
               kp::kDefaultSocket);
}

int Fail(const Status& st) {
  if (st.code() == Code::kBrokerUnavailable) {
    std::fprintf(stderr,
                 "keymeshctl: %s; is it running? start it with 'keymesh-broker --config FILE' or 'systemctl start "
                 "keymesh-broker', or point --socket / $KEYMESH_SOCKET at its socket\n",
                 st.message().c_str());
    return kExitUnreachable;
  }
  std::fprintf(stderr, "keymeshctl: %s\n", st.message().c_str());
  return kExitFailed;
}

int UsageError(const std::string& msg) {
  std::fprintf(stderr, "keymeshctl: %s (try --help)\n", msg.c_str());
  return kExitUsage;
}

Result<std::string> ReadSecret(const std::string& env, const std::string& file) {
  std::string s;
  if (!env.empty()) {
    const char* v = std::getenv(env.c_str());
    if (v == nullptr || *v == '\0') {
      return Status(Code::kInvalidArgument, "environment variable " + Escaped(env) + " is not set or empty");
    }
    s = v;
  } else {
    std::ifstream in(file, std::ios::binary);
    if (!in) return Status(Code::kIoError, "cannot read secret file " + Escaped(file) + ": " + std::strerror(errno));
    s.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
    while (!s.empty() && (s.back() == '\n' || s.back() == '\r' || s.back() == ' ')) s.pop_back();
    if (s.empty()) return Status(Code::kInvalidArgument, "secret file " + Escaped(file) + " is empty");
  }
  Status st = keymesh::ValidateSecret(s);
  if (!st.ok()) return st;
  return s;
}

// A non-negative integer flag value.
Result<uint64_t> ParseCount(const std::string& flag, const std::string& text) {
  char* end = nullptr;
  errno = 0;
  const unsigned long long v = std::strtoull(text.c_str(), &end, 10);
  if (errno != 0 || end == text.c_str() || *end != '\0' || text[0] == '-') {
    return Status(Code::kInvalidArgument, flag + " needs a non-negative integer, not " + Quoted(text));
  }
  return static_cast<uint64_t>(v);
}

Result<double> ParseFraction(const std::string& flag, const std::string& text) {
  char* end = nullptr;
  errno = 0;
  const double v = std::strtod(text.c_str(), &end);
  if (errno != 0 || end == text.c_str() || *end != '\0' || !(v >= 0 && v < 0.5)) {
    return Status(Code::kInvalidArgument, flag + " needs a number >= 0 and < 0.5, not " + Quoted(text));
  }
  return v;
}

// Prints the status of `pool` (every pool when empty) as tables or JSON.
int ShowStatus(kp::ControlClient& broker, const std::string& pool, bool as_json, bool clear_screen) {
  kp::StatusRequest request;
  if (!pool.empty()) request.pool = pool;
  Result<boost::json::object> reply = broker.Call(request.op(), request.ToJson());
  if (!reply.ok()) return Fail(reply.status());
  Result<kp::StatusReply> status = kp::StatusReply::FromJson(*reply);
  if (!status.ok()) return Fail(status.status());
  if (as_json) {
    // The broker's own JSON, as it sent it (fields this keymeshctl does not
    // know included).
    std::printf("%s\n", boost::json::serialize(reply->at("pools")).c_str());
    return 0;
  }
  std::string text;
  for (const kp::StatusReply::Pool& p : status->pools) text += keymesh::ctl::RenderPool(p) + "\n";
  for (const std::string& b : status->busy) text += "busy: " + b + "\n";
  if (clear_screen) std::fputs("\x1b[H\x1b[2J", stdout);
  std::fputs(text.c_str(), stdout);
  std::fflush(stdout);
  return 0;
}

int StatusCommand(kp::ControlClient& broker, const std::string& command, const std::vector<std::string>& rest) {
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
  if (command == "status") return ShowStatus(broker, pool, as_json, false);
  struct sigaction sa {};
  sa.sa_handler = OnSignal;
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);
  while (!g_stop) {
    const int rc = ShowStatus(broker, pool, false, true);
    if (rc != 0) return rc;
    for (int t = 0; t < 10 && !g_stop; ++t) ::usleep(100'000);  // the refresh period: 1 s
  }
  return 0;
}

// Prints the broker's report of the mesh as a table or JSON.
int MeshCommand(kp::ControlClient& broker, const std::vector<std::string>& rest) {
  bool as_json = false;
  for (const std::string& a : rest) {
    if (a != "--json") return UsageError("unexpected argument " + Quoted(a) + " for mesh");
    as_json = true;
  }
  Result<boost::json::object> reply = broker.Call(kp::Op::kMesh, {});
  if (!reply.ok()) return Fail(reply.status());
  Result<kp::MeshReply> mesh = kp::MeshReply::FromJson(*reply);
  if (!mesh.ok()) return Fail(mesh.status());
  if (as_json) {
    // The broker's own JSON (fields this keymeshctl does not know included).
    std::printf("%s\n", boost::json::serialize(reply->at("mesh")).c_str());
    return 0;
  }
  std::fputs(keymesh::ctl::RenderMesh(mesh->mesh).c_str(), stdout);
  return 0;
}

int AddKeyCommand(kp::ControlClient& broker, const std::vector<std::string>& rest) {
  if (rest.size() < 2) return UsageError("add-key needs POOL NAME and --secret-env VAR or --secret-file FILE");
  kp::AddKeyRequest request;
  request.pool = rest[0];
  keymesh::KeySpec& key = request.key;
  key.name = rest[1];
  std::string env, file;
  struct Count {
    const char* flag;
    uint64_t max;
    uint32_t* u32;
    uint64_t* u64;
  };
  const Count counts[] = {{"--weight", UINT32_MAX, &key.weight, nullptr},
                          {"--max-concurrency", UINT32_MAX, &key.max_concurrency, nullptr},
                          {"--rpm", UINT32_MAX, &key.rpm, nullptr},
                          {"--tpm", UINT64_MAX, nullptr, &key.tpm},
                          {"--burst", kp::kMaxBurst, &key.burst, nullptr}};
  for (size_t a = 2; a < rest.size(); a += 2) {
    const std::string& flag = rest[a];
    if (a + 1 >= rest.size()) return UsageError(flag + " needs a value");
    const std::string& value = rest[a + 1];
    const Count* count = nullptr;
    for (const Count& c : counts) count = flag == c.flag ? &c : count;
    if (flag == "--secret-env") {
      env = value;
    } else if (flag == "--secret-file") {
      file = value;
    } else if (flag == "--rate-margin") {
      Result<double> v = ParseFraction(flag, value);
      if (!v.ok()) return UsageError(v.status().message());
      key.rate_margin = *v;
    } else if (count != nullptr) {
      Result<uint64_t> v = ParseCount(flag, value);
      if (!v.ok()) return UsageError(v.status().message());
      // Out of range is the broker's kind of refusal (exit 1), as it was
      // when the broker checked it.
      if (*v > count->max) {
        return Fail(Status(Code::kInvalidArgument, flag + " must be at most " + std::to_string(count->max)));
      }
      if (count->u32 != nullptr) *count->u32 = static_cast<uint32_t>(*v);
      if (count->u64 != nullptr) *count->u64 = *v;
    } else {
      return UsageError("unknown add-key option " + Quoted(flag));
    }
  }
  if (env.empty() == file.empty()) return UsageError("add-key needs exactly one of --secret-env and --secret-file");
  Result<std::string> secret = ReadSecret(env, file);
  if (!secret.ok()) return Fail(secret.status());
  key.secret = *secret;
  // Where the secret comes from, so that the broker can read it again after
  // a restart (it checks that it yields the same secret; a variable of this
  // shell that the broker's environment lacks leaves the key ephemeral).
  if (!env.empty()) {
    request.secret_env = env;
  } else {
    std::error_code ec;
    const std::filesystem::path abs = std::filesystem::absolute(file, ec);
    if (!ec) request.secret_file = abs.string();
  }
  Status st = broker.AddKey(request);
  if (!st.ok()) return Fail(st);
  std::printf("add-key: %s/%s (%s)\n", Escaped(rest[0]).c_str(), Escaped(rest[1]).c_str(),
              keymesh::MaskSecret(key.secret).c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  std::string socket_flag;
  size_t i = 0;
  while (i < args.size() && args[i].rfind("--", 0) == 0) {
    if (args[i] == "--help" || args[i] == "-h") {
      Usage();
      return 0;
    }
    if (args[i] == "--socket" && i + 1 < args.size()) {
      socket_flag = args[i + 1];
      i += 2;
      continue;
    }
    if (args[i].rfind("--socket=", 0) == 0) {
      socket_flag = args[i].substr(9);
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
  const std::vector<std::string> rest(args.begin() + static_cast<long>(i), args.end());
  kp::ControlClient broker(kp::ControlClientOptions(kp::ResolveSocketPath(socket_flag)));

  if (command == "status" || command == "watch") return StatusCommand(broker, command, rest);
  if (command == "add-key") return AddKeyCommand(broker, rest);
  if (command == "mesh") return MeshCommand(broker, rest);
  if (command == "metrics") {
    if (!rest.empty()) return UsageError("metrics takes no arguments");
    Result<kp::MetricsReply> metrics = broker.Metrics();
    if (!metrics.ok()) return Fail(metrics.status());
    std::fputs(metrics->text.c_str(), stdout);
    return 0;
  }
  const std::optional<kp::Op> op = kp::ParseOp(command == "remove-key" ? "remove_key" : command);
  if (op && kp::IsKeyOp(*op) && command != "remove_key") {
    if (rest.size() != 2) return UsageError(command + " needs POOL NAME");
    Status st = broker.KeyOp(kp::KeyOpRequest{*op, rest[0], rest[1]});
    if (!st.ok()) return Fail(st);
    std::printf("%s: %s/%s\n", command.c_str(), Escaped(rest[0]).c_str(), Escaped(rest[1]).c_str());
    return 0;
  }
  return UsageError("unknown command " + Quoted(command));
}
