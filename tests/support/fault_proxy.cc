#include "support/fault_proxy.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <deque>
#include <list>
#include <vector>

namespace keymesh::testing {
namespace {

// Bytes held per direction before the proxy stops reading that side (the
// sender then sees TCP's own back-pressure).
constexpr size_t kMaxQueued = 4u << 20;

uint64_t MonoNs() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1'000'000'000ull + static_cast<uint64_t>(ts.tv_nsec);
}

void CloseWithReset(int fd) {
  if (fd < 0) return;
  linger l{1, 0};
  (void)::setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof(l));
  ::close(fd);
}

sockaddr_in Loopback(uint16_t port) {
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(port);
  return addr;
}

// A listening socket on 127.0.0.1:port (0: a free one); -1 on failure.
int Listen(uint16_t port, uint16_t* bound) {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) return -1;
  const int one = 1;
  (void)::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  sockaddr_in addr = Loopback(port);
  socklen_t len = sizeof(addr);
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 || ::listen(fd, 128) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    ::close(fd);
    return -1;
  }
  *bound = ntohs(addr.sin_port);
  return fd;
}

// A connection to the upstream, non-blocking once connected; -1 when it
// refuses. Loopback connects complete at once (the kernel answers for a
// stopped server too), so the blocking connect never stalls the loop.
int ConnectUpstream(uint16_t port) {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  sockaddr_in addr = Loopback(port);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    ::close(fd);
    return -1;
  }
  const int one = 1;
  (void)::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  (void)::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) | O_NONBLOCK);
  return fd;
}

struct Chunk {
  uint64_t due_ns = 0;
  std::string data;
  size_t off = 0;
};

// One direction of a connection.
struct Flow {
  std::deque<Chunk> q;
  size_t queued = 0;
  bool eof = false;   // the source closed its side
  bool shut = false;  // ... and everything was forwarded: the sink's side shut down
};

struct Conn {
  int client = -1;
  int upstream = -1;  // -1 until connected (held in blackhole)
  Flow up;            // client -> upstream
  Flow down;          // upstream -> client
  bool dead = false;
};

}  // namespace

FaultProxy::FaultProxy(uint16_t upstream_port) : upstream_port_(upstream_port) {}

FaultProxy::~FaultProxy() {
  if (thread_.joinable()) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    const uint64_t one = 1;
    (void)!::write(wake_fd_, &one, sizeof(one));
    thread_.join();
  }
  if (listen_fd_ >= 0) ::close(listen_fd_);
  if (wake_fd_ >= 0) ::close(wake_fd_);
}

bool FaultProxy::Start() {
  if (thread_.joinable()) return true;
  listen_fd_ = Listen(0, &port_);
  if (listen_fd_ < 0) return false;
  wake_fd_ = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (wake_fd_ < 0) return false;
  thread_ = std::thread([this] { Run(); });
  return true;
}

std::string FaultProxy::url() const { return "redis://127.0.0.1:" + std::to_string(port_) + "/0"; }

FaultProxy::Mode FaultProxy::mode() const {
  std::lock_guard<std::mutex> lock(mu_);
  return mode_;
}

bool FaultProxy::SetMode(Mode mode, uint32_t delay_ms) {
  std::unique_lock<std::mutex> lock(mu_);
  if (!thread_.joinable()) return false;  // before Start()
  mode_ = mode;
  delay_ms_ = mode == Mode::kDelay ? delay_ms : 0;
  const uint64_t ticket = ++asked_;
  const uint64_t one = 1;
  (void)!::write(wake_fd_, &one, sizeof(one));
  cv_.wait(lock, [&] { return applied_ >= ticket || stop_; });
  return !rebind_failed_;
}

void FaultProxy::Run() {
  std::list<Conn> conns;
  Mode mode = Mode::kPass;
  uint64_t delay_ns = 0;

  // In drop_replies: what the upstream answered is gone.
  auto drop_down = [&](Conn& c) {
    bytes_dropped_.fetch_add(c.down.queued);
    c.down.q.clear();
    c.down.queued = 0;
  };
  auto kill_conn = [&](Conn& c) {
    CloseWithReset(c.client);
    CloseWithReset(c.upstream);
    c.client = c.upstream = -1;
    c.dead = true;
  };
  // Reads what `from` has into `flow`; false on an error (the connection dies).
  auto pull = [&](int from, Flow& flow, uint64_t now) {
    char buf[65536];
    for (;;) {
      if (flow.queued >= kMaxQueued) return true;
      const ssize_t n = ::recv(from, buf, sizeof(buf), 0);
      if (n > 0) {
        const uint64_t tail = flow.q.empty() ? 0 : flow.q.back().due_ns;
        flow.q.push_back(Chunk{std::max(now + delay_ns, tail), std::string(buf, static_cast<size_t>(n)), 0});
        flow.queued += static_cast<size_t>(n);
        continue;
      }
      if (n == 0) {
        flow.eof = true;
        return true;
      }
      if (errno == EINTR) continue;
      return errno == EAGAIN || errno == EWOULDBLOCK;
    }
  };
  // Writes what is due of `flow` to `to`; false on an error.
  auto push = [&](int to, Flow& flow, uint64_t now, std::atomic<uint64_t>& counter) {
    while (!flow.q.empty() && flow.q.front().due_ns <= now) {
      Chunk& c = flow.q.front();
      const ssize_t n = ::send(to, c.data.data() + c.off, c.data.size() - c.off, MSG_NOSIGNAL);
      if (n < 0) {
        if (errno == EINTR) continue;
        return errno == EAGAIN || errno == EWOULDBLOCK;
      }
      c.off += static_cast<size_t>(n);
      flow.queued -= static_cast<size_t>(n);
      counter.fetch_add(static_cast<uint64_t>(n));
      if (c.off == c.data.size()) flow.q.pop_front();
    }
    if (flow.eof && flow.q.empty() && !flow.shut) {
      (void)::shutdown(to, SHUT_WR);
      flow.shut = true;
    }
    return true;
  };

  for (;;) {
    // Apply a mode change, then tell the caller.
    {
      std::unique_lock<std::mutex> lock(mu_);
      if (stop_) break;
      if (applied_ != asked_) {
        rebind_failed_ = false;
        Mode want = mode_;
        if (want == Mode::kReset) {
          for (Conn& c : conns) kill_conn(c);
          if (listen_fd_ >= 0) ::close(listen_fd_);
          listen_fd_ = -1;
        } else if (listen_fd_ < 0) {
          uint16_t bound = 0;
          listen_fd_ = Listen(port_, &bound);
          if (listen_fd_ < 0) {
            rebind_failed_ = true;
            want = mode_ = Mode::kReset;
          }
        }
        mode = want;
        if (mode == Mode::kDropReplies) {
          for (Conn& c : conns) drop_down(c);
        }
        delay_ns = static_cast<uint64_t>(delay_ms_) * 1'000'000ull;
        conns.remove_if([&](const Conn& c) { return c.dead; });
        open_.store(conns.size());
        applied_ = asked_;
        cv_.notify_all();
      }
    }
    conns.remove_if([&](const Conn& c) { return c.dead; });
    open_.store(conns.size());

    const uint64_t now = MonoNs();
    const bool flowing = mode == Mode::kPass || mode == Mode::kDelay || mode == Mode::kDropReplies;
    if (flowing) {
      for (Conn& c : conns) {
        if (c.upstream >= 0) continue;
        c.upstream = ConnectUpstream(upstream_port_);
        if (c.upstream < 0) kill_conn(c);
      }
    }

    std::vector<pollfd> fds;
    std::vector<std::pair<Conn*, bool>> owners;  // (connection, is the client side) per fds[i], from index 2
    fds.push_back({wake_fd_, POLLIN, 0});
    fds.push_back({listen_fd_, static_cast<short>(listen_fd_ >= 0 ? POLLIN : 0), 0});
    int timeout_ms = -1;
    auto due_in = [&](const Flow& f) {
      if (f.q.empty() || f.q.front().due_ns <= now) return;
      const int ms = static_cast<int>((f.q.front().due_ns - now + 999'999) / 1'000'000);
      timeout_ms = timeout_ms < 0 ? ms : std::min(timeout_ms, ms);
    };
    if (flowing) {
      for (Conn& c : conns) {
        if (c.dead || c.upstream < 0) continue;
        auto events = [&](const Flow& in, const Flow& out) {
          short e = 0;
          if (!in.eof && in.queued < kMaxQueued) e |= POLLIN;
          if (!out.q.empty() && out.q.front().due_ns <= now) e |= POLLOUT;
          return e;
        };
        fds.push_back({c.client, events(c.up, c.down), 0});
        owners.push_back({&c, true});
        fds.push_back({c.upstream, events(c.down, c.up), 0});
        owners.push_back({&c, false});
        due_in(c.up);
        due_in(c.down);
      }
    }
    const int rc = ::poll(fds.data(), fds.size(), timeout_ms);
    if (rc < 0 && errno != EINTR) break;
    const uint64_t after = MonoNs();

    if (fds[0].revents & POLLIN) {
      uint64_t v = 0;
      (void)!::read(wake_fd_, &v, sizeof(v));
    }
    if (listen_fd_ >= 0 && (fds[1].revents & POLLIN)) {
      for (;;) {
        const int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
        if (fd < 0) break;
        accepted_.fetch_add(1);
        const int one = 1;
        (void)::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        Conn c;
        c.client = fd;
        if (flowing) {
          c.upstream = ConnectUpstream(upstream_port_);
          if (c.upstream < 0) {
            CloseWithReset(fd);
            continue;
          }
        }
        conns.push_back(std::move(c));
      }
    }
    for (size_t i = 2; i < fds.size(); ++i) {
      Conn& c = *owners[i - 2].first;
      if (c.dead) continue;
      const bool client_side = owners[i - 2].second;
      const short re = fds[i].revents;
      const int fd = client_side ? c.client : c.upstream;
      Flow& in = client_side ? c.up : c.down;   // what this side sends
      Flow& out = client_side ? c.down : c.up;  // what this side receives
      if (re & (POLLIN | POLLHUP | POLLERR)) {
        if (!pull(fd, in, after)) {
          kill_conn(c);
          continue;
        }
        if (!client_side && mode == Mode::kDropReplies) drop_down(c);
      }
      if (re & POLLOUT) {
        if (!push(fd, out, after, client_side ? bytes_down_ : bytes_up_)) kill_conn(c);
      }
    }
    // Data that just arrived in pass mode, and the shutdowns of flows that
    // ended, go out without waiting for another poll round.
    if (flowing) {
      const uint64_t t = MonoNs();
      for (Conn& c : conns) {
        if (c.dead || c.upstream < 0) continue;
        if (!push(c.upstream, c.up, t, bytes_up_) || !push(c.client, c.down, t, bytes_down_)) {
          kill_conn(c);
          continue;
        }
        if (c.up.shut && c.down.shut) {
          ::close(c.client);
          ::close(c.upstream);
          c.client = c.upstream = -1;
          c.dead = true;
        }
      }
    }
  }
  for (Conn& c : conns) {
    if (!c.dead) kill_conn(c);
  }
  open_.store(0);
  std::lock_guard<std::mutex> lock(mu_);
  applied_ = asked_;
  cv_.notify_all();
}

}  // namespace keymesh::testing
