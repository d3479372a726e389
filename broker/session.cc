#include "broker/session.h"

#include <boost/asio/post.hpp>
#include <boost/asio/write.hpp>

#include "broker/dispatch.h"
#include "broker/log.h"
#include "protocol/framing.h"

namespace keymesh::broker {

Session::Session(Socket socket, PeerCred peer, Dispatcher& dispatcher)
    : socket_(std::move(socket)),
      peer_(peer),
      dispatcher_(dispatcher),
      context_(std::make_unique<ClientContext>()),
      timer_(socket_.get_executor()) {}

Session::~Session() = default;

void Session::Start() {
  dispatcher_.OnOpen(shared_from_this());
  DoRead();
}

void Session::ArmTimer() {
  if (closed_) return;
  if (!in_.empty()) {
    // Absolute: a frame's deadline counts from its first byte, so a peer
    // that dribbles one byte at a time cannot hold the connection.
    timer_.expires_at(frame_start_ + dispatcher_.frame_timeout());
  } else if (Dispatcher::Holds(*context_)) {
    timer_.cancel();
    return;
  } else {
    timer_.expires_after(kIdleTimeout);
  }
  timer_.async_wait([self = shared_from_this()](const boost::system::error_code& ec) {
    if (ec == boost::asio::error::operation_aborted || self->closed_) return;
    Log(LogLevel::kDebug, "session_timeout",
        {{"peer_pid", std::to_string(self->peer_.pid)}, {"partial_frame", self->in_.empty() ? "false" : "true"}});
    self->Close();
  });
}

void Session::DoRead() {
  if (closed_) return;
  ArmTimer();
  socket_.async_read_some(boost::asio::buffer(buf_), [self = shared_from_this()](const boost::system::error_code& ec,
                                                                                 size_t n) { self->OnRead(ec, n); });
}

void Session::OnRead(const boost::system::error_code& ec, size_t n) {
  if (closed_) return;
  if (ec) {
    Close();
    return;
  }
  if (in_.empty() && n > 0) frame_start_ = std::chrono::steady_clock::now();
  in_.append(buf_.data(), n);
  size_t start = 0;
  for (int frames = 0;; ++frames) {
    const size_t nl = in_.find('\n', start);
    if (nl == std::string::npos) break;
    if (frames == kFramesPerTurn) {
      // Fairness: one read may hold hundreds of frames; handle the rest
      // after the other sessions' ready handlers, not before them.
      in_.erase(0, start);
      if (!in_.empty()) frame_start_ = std::chrono::steady_clock::now();
      boost::asio::post(socket_.get_executor(), [self = shared_from_this()] { self->OnRead({}, 0); });
      return;
    }
    std::string_view frame(in_.data() + start, nl - start);
    if (!frame.empty() && frame.back() == '\r') frame.remove_suffix(1);
    start = nl + 1;
    if (frame.empty()) continue;
    dispatcher_.Handle(shared_from_this(), frame);
    if (closed_ || close_after_write_) return;
  }
  in_.erase(0, start);
  // The rest begins a new frame, whose first byte came in this read.
  if (start > 0 && !in_.empty()) frame_start_ = std::chrono::steady_clock::now();
  if (in_.size() > protocol::kMaxFrame) {
    in_.clear();
    SendAndClose(protocol::ErrorReply(
        0, Status(Code::kProtocolError, "frame exceeds " + std::to_string(protocol::kMaxFrame) + " bytes")));
    return;
  }
  DoRead();
}

void Session::Send(std::string frame) {
  if (closed_ || close_after_write_) return;
  const size_t behind = out_bytes_ - (writing_ ? out_.front().size() : 0);
  if (out_.size() >= kMaxQueuedReplies || (behind > 0 && behind + frame.size() > kMaxQueuedBytes)) {
    Log(LogLevel::kWarn, "session_dropped",
        {{"peer_pid", std::to_string(peer_.pid)}, {"reason", "client does not read its replies"}});
    Close();
    return;
  }
  out_bytes_ += frame.size();
  out_.push_back(std::move(frame));
  ArmTimer();
  if (!writing_) DoWrite();
}

void Session::SendAndClose(std::string frame) {
  Send(std::move(frame));
  close_after_write_ = true;
  timer_.expires_after(kFrameTimeout);  // a peer that never reads cannot keep us
  timer_.async_wait([self = shared_from_this()](const boost::system::error_code& ec) {
    if (ec != boost::asio::error::operation_aborted) self->Close();
  });
}

void Session::DoWrite() {
  if (out_.empty()) {
    writing_ = false;
    if (close_after_write_) Close();
    return;
  }
  writing_ = true;
  boost::asio::async_write(socket_, boost::asio::buffer(out_.front()),
                           [self = shared_from_this()](const boost::system::error_code& ec, size_t) {
                             if (self->closed_) return;
                             if (ec) {
                               self->Close();
                               return;
                             }
                             self->out_bytes_ -= self->out_.front().size();
                             self->out_.pop_front();
                             self->DoWrite();
                           });
}

void Session::Close() {
  if (closed_) return;
  closed_ = true;
  timer_.cancel();
  boost::system::error_code ec;
  socket_.shutdown(Socket::shutdown_both, ec);
  socket_.close(ec);
  dispatcher_.OnClosed(shared_from_this());
}

}  // namespace keymesh::broker
