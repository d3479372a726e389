// One client connection: reads newline-delimited frames, hands each to the
// Dispatcher, and writes replies with one write in flight plus a queue, so a
// slow reader never stalls the io thread or other sessions.
//
// Limits: a frame longer than protocol::kMaxFrame gets an error reply and the
// connection is closed; a started frame must complete within the frame
// timeout (the config's frame_timeout, kFrameTimeout by default) counted
// from its first byte, however the bytes dribble in;
// an idle connection is closed after kIdleTimeout unless the dispatcher
// says it holds something (slow-path leases, a waiting acquire). A client
// that stops reading is dropped once kMaxQueuedReplies replies, or
// kMaxQueuedBytes bytes behind the reply being written, pile up beyond what
// the kernel's socket buffer holds (a 30-byte status request can cost a
// reply 100x larger, so a count alone would let each of a thousand
// non-reading clients hold megabytes).
//
// Lifetime: shared_ptr-owned (enable_shared_from_this); every pending Asio
// operation holds a reference. All members are used on the io thread only.
// The session owns its ClientContext (the protocol state of the
// connection) but never looks inside it.
#ifndef KEYMESH_BROKER_SESSION_H_
#define KEYMESH_BROKER_SESSION_H_

#include <array>
#include <chrono>
#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <vector>

#include <boost/asio/local/stream_protocol.hpp>
#include <boost/asio/steady_timer.hpp>

namespace keymesh::broker {

class Dispatcher;
struct ClientContext;

// The peer's credentials, taken at accept (listener.cc): SO_PEERCRED's
// pid, uid and primary gid, SO_PEERGROUPS' supplementary groups, and the
// pid's start time read while a pidfd of the peer was open (so it is the
// connecting process's, not a later owner's of a reused pid).
struct PeerCred {
  int32_t pid = 0;  // in the broker's pid namespace; 0: not visible from it
  uint32_t uid = 0;
  uint32_t gid = 0;
  std::vector<uint32_t> groups;  // supplementary groups (empty without SO_PEERGROUPS)
  uint64_t start_time = 0;       // 0: unknown (hello is refused)
};

inline constexpr std::chrono::seconds kFrameTimeout{5};
inline constexpr std::chrono::seconds kIdleTimeout{30};
inline constexpr size_t kMaxQueuedReplies = 4096;
inline constexpr size_t kMaxQueuedBytes = 64 * 1024;
// Frames handled per turn of a session before the others get theirs.
inline constexpr int kFramesPerTurn = 1;

class Session : public std::enable_shared_from_this<Session> {
 public:
  using Socket = boost::asio::local::stream_protocol::socket;

  // `dispatcher` must outlive the session.
  Session(Socket socket, PeerCred peer, Dispatcher& dispatcher);
  ~Session();

  void Start();
  // Queues one serialized frame (newline included).
  void Send(std::string frame);
  // Sends `frame`, then closes.
  void SendAndClose(std::string frame);
  void Close();
  bool closed() const noexcept { return closed_; }
  const PeerCred& peer() const noexcept { return peer_; }
  // Re-evaluates the read timeout (after the dispatcher changed what the
  // connection holds).
  void ArmTimer();
  // The connection's protocol state, for the dispatcher and the ops.
  ClientContext& context() noexcept { return *context_; }

 private:
  void DoRead();
  void OnRead(const boost::system::error_code& ec, size_t n);
  void DoWrite();

  Socket socket_;
  PeerCred peer_;
  Dispatcher& dispatcher_;
  std::unique_ptr<ClientContext> context_;
  boost::asio::steady_timer timer_;
  std::array<char, 16384> buf_;
  std::string in_;                                       // bytes of the frame(s) not yet complete
  std::chrono::steady_clock::time_point frame_start_{};  // when in_'s first byte came
  std::deque<std::string> out_;
  size_t out_bytes_ = 0;  // sum of out_'s sizes
  bool writing_ = false;
  bool close_after_write_ = false;
  bool closed_ = false;
};

}  // namespace keymesh::broker

#endif  // KEYMESH_BROKER_SESSION_H_
