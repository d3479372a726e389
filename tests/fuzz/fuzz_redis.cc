// Redis's replies as untrusted input: the mesh's store (RedisMeshStore over
// RedisConnection, hiredis underneath) talks to a "Redis" that answers with
// the input's bytes. A listening Unix socket (one per process) takes the
// store's connection; the input's reply bytes are written to it whole and
// its write side is shut, then the store makes the input's calls: every
// read is served from those bytes or ends at their end (EOF, never a
// timeout), all on one thread, so an input always runs the same way.
//
// Input: [n] [n op bytes] [the reply stream]
//   op (mod 9): 0 Lease of one key, 1 Lease of two keys (one of them
//   request-only), 2 ReadEvents from "$", 3 ReadEvents from where the last
//   read ended ("0" before any), 4 Snapshot, 5 Publish, 6 ClaimProbe,
//   7 Time, 8 Leave.
// Each script call needs its SCRIPT LOAD reply first (a bulk of 40 hex
// digits) the first time in an input, as a fresh store has loaded nothing.
//
// What is checked beyond "no crash": a failure is a one-line message that
// starts with "mesh: " (no control character: quoted input is escaped); a
// success keeps the store's promises (a grant within the key's cap, one
// grant per key asked for, as many members as hosts, events of known kinds
// naming a pool and key). The calls stop at the first dropped connection.
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "broker/mesh/redis_store.h"
#include "common/text.h"
#include "fuzz_entries.h"

namespace keymesh::fuzz {
namespace {

using broker::mesh::EventBatch;
using broker::mesh::EventKind;
using broker::mesh::KeyEvent;
using broker::mesh::LeaseKey;
using broker::mesh::LeaseReply;
using broker::mesh::LeaseRequest;
using broker::mesh::MeshConfig;
using broker::mesh::RedisMeshStore;

[[noreturn]] void Broken(const char* what, const std::string& detail) {
  std::fprintf(stderr, "fuzz redis: %s: %s\n", what, detail.c_str());
  std::abort();
}

// The listening socket the store connects to: a Unix socket in the run's
// directory ($KEYMESH_FUZZ_DIR, whose path has the same length in every
// run of scripts/fuzz, so the store's messages, which name it, do too; a
// TCP port would differ from run to run and steer the coverage), removed
// at exit.
class Listener {
 public:
  Listener() {
    const char* env = std::getenv("KEYMESH_FUZZ_DIR");
    path_ = env && *env ? std::string(env) + "/redis.sock" : "/tmp/kmfuzz-redis-" + std::to_string(getpid()) + ".sock";
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    if (path_.size() >= sizeof(a.sun_path)) Broken("setup", "socket path too long: " + path_);
    std::memcpy(a.sun_path, path_.c_str(), path_.size() + 1);
    unlink(path_.c_str());
    fd_ = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd_ < 0 || bind(fd_, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0 || listen(fd_, 16) != 0) {
      Broken("setup", "cannot listen on " + path_);
    }
  }
  ~Listener() {
    close(fd_);
    unlink(path_.c_str());
  }
  Listener(const Listener&) = delete;
  Listener& operator=(const Listener&) = delete;

  const std::string& path() const { return path_; }
  // The connection the store just made (it waits in the backlog); -1 if
  // none came within a second.
  int Accept() const {
    pollfd p{fd_, POLLIN, 0};
    if (poll(&p, 1, 1000) != 1) return -1;
    return accept4(fd_, nullptr, nullptr, SOCK_CLOEXEC);
  }

 private:
  std::string path_;
  int fd_ = -1;
};

const Listener& TheListener() {
  static const Listener listener;
  return listener;
}

void CheckMessage(const Status& st) {
  const std::string& m = st.message();
  if (m.rfind("mesh: ", 0) != 0) Broken("a message without the mesh's prefix", m);
  if (HasControl(m)) Broken("a message with a control character", m);
}

// A call's result: its value meets `check`, or its failure is a clear one.
template <typename T, typename Check>
void Expect(const Result<T>& r, Check check) {
  if (r.ok()) {
    check(*r);
  } else {
    CheckMessage(r.status());
  }
}

LeaseKey Key(const std::string& name, double rpm, double tpm) {
  LeaseKey k;
  k.pool = "p";
  k.key = name;
  k.fingerprint = "f00d" + name;
  k.burst = 1;
  k.req = {rpm / 60, rpm / 120, rpm / 240, 7};
  k.tok = {tpm / 60, tpm / 120, 0, 0};
  return k;
}

void CheckLease(const LeaseRequest& req, const LeaseReply& r) {
  if (r.stale) return;
  if (r.keys.size() != req.keys.size()) Broken("lease", "a grant count unlike the keys asked for");
  if (r.members.size() != r.hosts) Broken("lease", "a member count unlike the host count");
  for (size_t i = 0; i < r.keys.size(); ++i) {
    const double caps[2] = {req.keys[i].req.limit, req.keys[i].tok.limit};
    const double grants[2] = {r.keys[i].req, r.keys[i].tok};
    for (int d = 0; d < 2; ++d) {
      const double cap = caps[d] * (1 - req.headroom);
      if (!std::isfinite(grants[d]) || grants[d] < 0 || grants[d] > cap * (1 + 1e-9) + 1e-9) {
        Broken("lease", "a grant beyond the key's cap: " + std::to_string(grants[d]));
      }
    }
  }
}

void CheckEvents(const EventBatch& b, EventKind last_kind) {
  for (const KeyEvent& e : b.events) {
    if (static_cast<uint8_t>(e.kind) > static_cast<uint8_t>(last_kind)) Broken("events", "an unknown kind");
    if (e.until_ms < 0) Broken("events", "a negative deadline");
    if (e.kind != EventKind::kRebalance && (e.pool.empty() || e.key.empty())) Broken("events", "no pool or key");
  }
}

}  // namespace

void RedisInput(const uint8_t* data, size_t size) {
  if (size == 0) return;
  const size_t n = data[0] % 6 + 1;
  if (size < 1 + n) return;
  const Listener& listener = TheListener();
  MeshConfig config;
  config.redis.unix_path = listener.path();
  config.host = "h1";
  config.ns = "fz";
  config.timeout = 1.0;  // never reached: every read ends at the bytes' end
  RedisMeshStore store(config);
  if (Status st = store.Connect(); !st.ok()) Broken("setup", st.message());
  const int peer = listener.Accept();
  if (peer < 0) Broken("setup", "the store's connection did not arrive");
  // The replies, whole, then EOF. The store's requests are never read (a
  // few KB: the socket buffers them).
  for (size_t off = 1 + n; off < size;) {
    const ssize_t w = write(peer, data + off, size - off);
    if (w <= 0) Broken("setup", "could not write the replies");
    off += static_cast<size_t>(w);
  }
  shutdown(peer, SHUT_WR);

  std::string last_id = "0";
  for (size_t i = 0; i < n && store.connected(); ++i) {
    switch (data[1 + i] % 9) {
      case 0:
      case 1: {
        LeaseRequest req;
        req.host = "h1";
        req.seq = i + 1;
        req.lease_ms = 10000;
        req.headroom = 0.02;
        req.keys.push_back(Key("a", 600, 60000));
        if (data[1 + i] % 9 == 1) req.keys.push_back(Key("b", 1200, 0));
        Expect(store.Lease(req), [&](const LeaseReply& r) { CheckLease(req, r); });
        break;
      }
      case 2:
      case 3: {
        Expect(store.ReadEvents(data[1 + i] % 9 == 2 ? "$" : last_id, 0), [&](const EventBatch& b) {
          CheckEvents(b, EventKind::kRebalance);
          last_id = b.last_id;
        });
        break;
      }
      case 4: {
        Expect(store.Snapshot(), [&](const EventBatch& b) {
          CheckEvents(b, EventKind::kReset);
          last_id = b.last_id;
        });
        break;
      }
      case 5: {
        KeyEvent e;
        e.pool = "p";
        e.key = "a";
        e.kind = EventKind::kCooldown;
        e.until_ms = 1'700'000'000'000;
        e.origin = "h1";
        Expect(store.Publish(e), [](const KeyEvent& merged) {
          if (merged.until_ms < 0) Broken("publish", "a negative deadline");
        });
        break;
      }
      case 6: {
        Expect(store.ClaimProbe("p", "a", "h1", 2000), [](bool) {});
        break;
      }
      case 7: {
        Expect(store.Time(), [](const broker::mesh::MeshStore::TimeSample& t) {
          if (t.redis_ms < 0) Broken("time", "a negative time");
        });
        break;
      }
      default: {
        Status st = store.Leave("h1");
        if (!st.ok()) CheckMessage(st);
        break;
      }
    }
  }
  close(peer);
}

}  // namespace keymesh::fuzz
