#include "fuzz_entries.h"

#include <sys/socket.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include <boost/asio/local/connect_pair.hpp>
#include <boost/json.hpp>

#include "broker/broker.h"
#include "broker/config.h"
#include "broker/dispatch.h"
#include "broker/log.h"
#include "broker/persistence.h"
#include "broker/recovery.h"
#include "broker/session.h"
#include "common/text.h"
#include "fuzz_env.h"
#include "protocol/framing.h"
#include "shm/pool.h"
#include "shm/segment.h"

namespace keymesh::fuzz {
namespace {

// The private directory of this process: $KEYMESH_FUZZ_DIR/kmfuzz
// (scripts/fuzz makes a fresh $KEYMESH_FUZZ_DIR per run and removes it) or
// /tmp/kmfuzz-<pid>, removed at exit. Under scripts/fuzz the name holds no
// pid, so paths built from it have the same length in every run and do not
// steer the fuzzer's coverage differently from run to run.
const std::string& WorkDir() {
  static const std::string dir = [] {
    const char* env = std::getenv("KEYMESH_FUZZ_DIR");
    std::string d = env && *env ? std::string(env) + "/kmfuzz" : "/tmp/kmfuzz-" + std::to_string(::getpid());
    std::filesystem::create_directories(d);
    return d;
  }();
  return dir;
}

// One broker per process, started on first use and stopped at exit.
class BrokerEnv {
 public:
  BrokerEnv() {
    broker::SetLogLevel(broker::LogLevel::kError);
    dir_ = WorkDir() + "/broker";
    std::filesystem::create_directories(dir_);
    const std::string socket = dir_ + "/km.sock";
    std::ofstream(dir_ + "/config.json")
        << R"({"socket":")" << socket << R"(","state_file":")" << dir_ << R"(/state.json",)"
        << R"("capacity":{"max_pools":4,"keys_per_pool":16,"leases_per_pool":64},"pools":{)"
        << R"("p":{"strategy":"least_busy","default_cooldown":0.01,"max_failures":3,"acquire_timeout":0.05,"keys":[)"
        << R"({"name":"a","secret":"sk-fuzz-aaaaaaaa1111"},{"name":"b","secret":"sk-fuzz-bbbbbbbb2222","rpm":600},)"
        << R"({"name":"t","secret":"sk-fuzz-tttttttt4444","tpm":100000}]},)"
        << R"("q":{"strategy":"weighted","keys":[{"name":"c","secret":"sk-fuzz-cccccccc3333","weight":3,"max_concurrency":1}]}}})"
        << "\n";
    broker::BrokerOptions options;
    options.config_path = dir_ + "/config.json";
    broker_ = std::make_unique<broker::Broker>(std::move(options));
    Status st = broker_->StartForTesting();
    if (!st.ok()) {
      std::fprintf(stderr, "fuzz: broker did not start: %s\n", st.message().c_str());
      std::abort();
    }
    segment_ = broker_->segment().name();
    // scripts/fuzz removes the segment named here if the process dies.
    std::ofstream(WorkDir() + "/segment-name") << segment_ << "\n";
  }
  ~BrokerEnv() {
    broker_->StopForTesting();
    broker_.reset();
    (void)shm::Segment::Remove(segment_);
    std::error_code ec;
    std::filesystem::remove_all(WorkDir(), ec);
  }

  broker::Broker& broker() { return *broker_; }

 private:
  std::string dir_;
  std::string segment_;
  std::unique_ptr<broker::Broker> broker_;
};

BrokerEnv& Env() {
  // Destroyed at exit (libFuzzer exits through exit() at -max_total_time).
  static BrokerEnv env;
  return env;
}

// Checks every complete reply frame in *pending (and removes it): each is a
// JSON object, and an error's message is one line (input it quotes is
// escaped).
void CheckReplies(std::string* pending) {
  for (size_t nl = pending->find('\n'); nl != std::string::npos; nl = pending->find('\n')) {
    const std::string frame = pending->substr(0, nl);
    pending->erase(0, nl + 1);
    boost::system::error_code ec;
    const boost::json::value v = boost::json::parse(frame, ec);
    if (ec || !v.is_object()) std::abort();
    if (const boost::json::value* e = v.as_object().if_contains("error")) {
      const boost::json::value* m = e->is_object() ? e->as_object().if_contains("message") : nullptr;
      if (m == nullptr || !m->is_string() || HasControl(m->get_string())) std::abort();
    }
  }
}

// Reads whatever the session wrote to its peer into *pending and checks the
// complete frames.
size_t Drain(int fd, std::string* pending) {
  size_t total = 0;
  char buf[65536];
  for (;;) {
    const ssize_t n = ::recv(fd, buf, sizeof(buf), MSG_DONTWAIT);
    if (n <= 0) break;
    total += static_cast<size_t>(n);
    pending->append(buf, static_cast<size_t>(n));
  }
  CheckReplies(pending);
  return total;
}

// Runs ready handlers until the session's writes are all drained.
void Pump(boost::asio::io_context& io, int peer_fd, std::string* pending) {
  for (int i = 0; i < 1000; ++i) {
    if (io.stopped()) io.restart();
    const size_t ran = io.poll();
    const size_t drained = Drain(peer_fd, pending);
    if (ran == 0 && drained == 0) return;
  }
}

}  // namespace

void ProtocolInput(const uint8_t* data, size_t size) {
  broker::Broker& b = Env().broker();
  boost::asio::io_context& io = b.io_context();
  broker::Session::Socket ours(io), peer(io);
  boost::asio::local::connect_pair(ours, peer);
  broker::PeerCred cred;
  cred.pid = ::getpid();
  cred.uid = ::getuid();
  cred.gid = ::getgid();
  cred.start_time = keymesh::shm::Self().start_time;  // pinned at accept in the real listener
  // The first byte picks an allowed or a foreign peer (secrets, admin ops).
  if (size > 0 && (data[0] & 1)) cred.uid = 65534, cred.gid = 65534;
  auto session = std::make_shared<broker::Session>(std::move(ours), cred, b.dispatcher());
  b.dispatcher().OnOpen(session);
  const std::string_view in(reinterpret_cast<const char*>(data), size);
  std::string pending;  // reply bytes not yet checked
  size_t start = 0;
  int frames = 0;
  while (start < in.size() && frames < 64 && !session->closed()) {
    size_t nl = in.find('\n', start);
    if (nl == std::string_view::npos) nl = in.size();
    const std::string_view frame = in.substr(start, nl - start);
    start = nl + 1;
    if (frame.size() > protocol::kMaxFrame) break;  // Session closes the connection here
    ++frames;
    b.dispatcher().Handle(session, frame);
    Pump(io, peer.native_handle(), &pending);
  }
  session->Close();
  Pump(io, peer.native_handle(), &pending);
}

void ConfigInput(const uint8_t* data, size_t size) {
  static const std::string base = [] {
    const std::string d = WorkDir() + "/config";
    std::filesystem::create_directories(d);
    std::ofstream(d + "/key.txt") << "sk-fuzz-from-file-0000\n";
    std::ofstream(d + "/empty.txt");
    return d;
  }();
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  // A secret_file naming a device or a FIFO would block or never end; the
  // config is trusted input written by the operator, so stay off them.
  for (std::string_view bad : {"/dev", "/proc", "/sys", "/run"}) {
    if (text.find(bad) != std::string_view::npos) return;
  }
  broker::EnvLookup env = [](const std::string& name) -> std::optional<std::string> {
    if (name == "KM_FUZZ_SECRET") return std::string("sk-fuzz-from-env-0000");
    if (name == "KM_FUZZ_EMPTY") return std::string();
    return std::nullopt;
  };
  Result<broker::BrokerConfig> config = broker::ParseConfig(text, base, env);
  if (!config.ok()) {
    // Errors are one line and never carry a secret.
    const std::string& m = config.status().message();
    if (HasControl(m)) std::abort();
    // (The input itself may spell a secret, e.g. as a field name the
    // message quotes; only a secret the parser read must never appear.)
    for (std::string_view secret : {"sk-fuzz-from-env-0000", "sk-fuzz-from-file-0000"}) {
      if (m.find(secret) != std::string::npos && text.find(secret) == std::string_view::npos) std::abort();
    }
    return;
  }
  for (const broker::PoolConfigEntry& p : config->pools) {
    if (config->FindPool(p.name) == nullptr) std::abort();
  }
}

// The state file's checksum (persistence.cc): FNV-1a 64 of the compact body.
std::string StateChecksum(std::string_view bytes) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (unsigned char c : bytes) {
    h ^= c;
    h *= 0x100000001b3ull;
  }
  char buf[40];
  std::snprintf(buf, sizeof(buf), "fnv1a64:%016llx", static_cast<unsigned long long>(h));
  return buf;
}

void StateInput(const uint8_t* data, size_t size) {
  const std::string_view raw(reinterpret_cast<const char*>(data), size);
  Result<broker::StateImage> image = broker::ParseState(raw);
  if (!image.ok() && HasControl(image.status().message())) std::abort();  // errors are one line
  // Mutations nearly always break the checksum; to reach the body's
  // validation, also try the input with its checksum made right.
  if (!image.ok()) {
    boost::system::error_code ec;
    boost::json::value v = boost::json::parse(raw, ec);
    if (ec || !v.is_object()) return;
    boost::json::object& file = v.get_object();
    const boost::json::value* body = file.if_contains("body");
    if (body == nullptr) return;
    file["checksum"] = StateChecksum(boost::json::serialize(*body));
    image = broker::ParseState(boost::json::serialize(v));
    if (!image.ok() && HasControl(image.status().message())) std::abort();
    if (!image.ok()) return;
  }
  // Round trip: what we write we read back identically (but for the
  // written_at time stamp).
  auto without_time = [](const std::string& text) {
    boost::json::value v = boost::json::parse(text);
    v.as_object().erase("written_at");
    return boost::json::serialize(v);
  };
  const std::string again = broker::SerializeState(*image, kFuzzWallNs);
  Result<broker::StateImage> reparsed = broker::ParseState(again);
  if (!reparsed.ok() || without_time(broker::SerializeState(*reparsed, kFuzzWallNs)) != without_time(again)) {
    std::abort();
  }

  shm::Capacities caps;
  caps.max_pools = 2;
  caps.keys_per_pool = 8;
  caps.leases_per_pool = 16;
  Result<std::unique_ptr<shm::Segment>> seg = shm::Segment::CreateAnonymous(caps);
  if (!seg.ok()) std::abort();
  PinSegment(**seg);  // before the keys: their fingerprints use the salt
  std::vector<broker::PoolConfigEntry> pools(2);
  pools[0].name = "p";
  pools[1].name = "q";
  auto add = [](broker::PoolConfigEntry& p, const char* name, const char* secret, uint32_t weight, uint32_t cap,
                uint32_t rpm) {
    KeySpec k;
    k.name = name;
    k.secret = secret;
    k.weight = weight;
    k.max_concurrency = cap;
    k.rpm = rpm;
    p.keys.push_back(std::move(k));
  };
  add(pools[0], "a", "sk-fuzz-aaaaaaaa1111", 1, 0, 0);
  add(pools[0], "b", "sk-fuzz-bbbbbbbb2222", 1, 0, 600);
  add(pools[1], "c", "sk-fuzz-cccccccc3333", 3, 1, 0);
  if (!broker::ReconcileSegment(**seg, pools).ok()) std::abort();
  PinSegment(**seg);  // the pools' creation times
  broker::RestoreFromImage(**seg, *image, kFuzzWallNs, kFuzzMonoNs);
  const shm::FakeClock clock(kFuzzMonoNs);
  for (uint32_t i = 0; i < 2; ++i) {
    shm::PoolAdmin access(**seg, i, clock);
    if (!access.CheckConsistency().ok()) std::abort();
    if (!access.Snapshot().ok()) std::abort();
    Result<shm::LeaseHandle> h = access.TryAcquire();
    if (h.ok()) (void)access.Release(*h, shm::Outcome{});
  }
}

}  // namespace keymesh::fuzz
