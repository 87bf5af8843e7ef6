#include "rtpllm/transfer/control_channel.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <stdexcept>

namespace rtpllm {
namespace {

void set_nonblocking(int fd) { fcntl(fd, F_SETFL, fcntl(fd, F_GETFL, 0) | O_NONBLOCK); }

void set_nodelay(int fd) {
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));  // notices are small and urgent
}

int millis_until(SteadyTime deadline) {
  const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
  return left.count() <= 0 ? 0 : static_cast<int>(std::min<int64_t>(left.count(), 1 << 30));
}

// Resolves host (a name or a dotted address) to an IPv4 address.
sockaddr_in resolve(const std::string& host, int32_t port) {
  addrinfo hints{};
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* found = nullptr;
  if (getaddrinfo(host.c_str(), nullptr, &hints, &found) != 0 || found == nullptr) {
    throw std::runtime_error("cannot resolve host '" + host + "'");
  }
  sockaddr_in address = *reinterpret_cast<sockaddr_in*>(found->ai_addr);
  freeaddrinfo(found);
  address.sin_port = htons(static_cast<uint16_t>(port));
  return address;
}

}  // namespace

ControlListener::ControlListener(const std::string& host, int32_t port) {
  if (port < 0 || port > 65535) throw std::invalid_argument("listen_port: must be in [0, 65535]");
  sockaddr_in address = resolve(host, port);
  fd_ = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  int one = 1;
  setsockopt(fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  if (bind(fd_, reinterpret_cast<sockaddr*>(&address), sizeof(address)) != 0 || listen(fd_, 64) != 0) {
    const std::string reason = std::strerror(errno);
    close(fd_);
    throw std::runtime_error("cannot listen on " + host + ":" + std::to_string(port) + ": " + reason);
  }
  socklen_t length = sizeof(address);
  getsockname(fd_, reinterpret_cast<sockaddr*>(&address), &length);
  port_ = ntohs(address.sin_port);
  set_nonblocking(fd_);
}

ControlListener::~ControlListener() {
  if (fd_ >= 0) close(fd_);
}

int ControlListener::accept_one() {
  const int fd = accept4(fd_, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
  if (fd >= 0) set_nodelay(fd);
  return fd;
}

ControlConnection ControlConnection::connect_to(const std::string& host, int32_t port, SteadyTime deadline) {
  if (port <= 0 || port > 65535) throw std::invalid_argument("port: must be in [1, 65535], got " + std::to_string(port));
  const sockaddr_in address = resolve(host, port);
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  ControlConnection connection(fd);
  const std::string where = host + ":" + std::to_string(port);
  if (connect(fd, reinterpret_cast<const sockaddr*>(&address), sizeof(address)) != 0) {
    if (errno != EINPROGRESS) throw std::runtime_error("cannot connect to " + where + ": " + std::strerror(errno));
    pollfd waiter{fd, POLLOUT, 0};
    if (poll(&waiter, 1, millis_until(deadline)) != 1) throw std::runtime_error("timed out connecting to " + where);
    int error = 0;
    socklen_t length = sizeof(error);
    getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &length);
    if (error != 0) throw std::runtime_error("cannot connect to " + where + ": " + std::strerror(error));
  }
  set_nodelay(fd);
  return connection;
}

ControlConnection::ControlConnection(int fd) : fd_(fd) { set_nonblocking(fd_); }

ControlConnection::~ControlConnection() {
  if (fd_ >= 0) close(fd_);
}

ControlConnection::ControlConnection(ControlConnection&& other) noexcept
    : fd_(other.fd_), buffer_(std::move(other.buffer_)) {
  other.fd_ = -1;
}

ControlConnection& ControlConnection::operator=(ControlConnection&& other) noexcept {
  if (this != &other) {
    if (fd_ >= 0) close(fd_);
    fd_ = other.fd_;
    buffer_ = std::move(other.buffer_);
    other.fd_ = -1;
  }
  return *this;
}

bool ControlConnection::send(MessageType type, const std::string& payload, SteadyTime deadline, std::string* error) {
  const std::string frame = frame_message(type, payload);
  size_t sent = 0;
  while (sent < frame.size()) {
    const ssize_t n = ::send(fd_, frame.data() + sent, frame.size() - sent, MSG_NOSIGNAL);
    if (n > 0) {
      sent += static_cast<size_t>(n);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      pollfd waiter{fd_, POLLOUT, 0};
      if (poll(&waiter, 1, millis_until(deadline)) != 1) {
        *error = "timed out sending to the peer";
        return false;
      }
      continue;
    }
    *error = std::string("connection lost: ") + std::strerror(errno);
    return false;
  }
  return true;
}

bool ControlConnection::receive_available(std::vector<Frame>* frames, std::string* error) {
  char chunk[64 * 1024];
  for (;;) {
    const ssize_t n = recv(fd_, chunk, sizeof(chunk), 0);
    if (n > 0) {
      buffer_.append(chunk, static_cast<size_t>(n));
      continue;
    }
    if (n == 0) {
      // Frames that arrived before the close are still delivered.
      parse_frames(frames, error);
      *error = "connection closed by peer";
      return false;
    }
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return parse_frames(frames, error);
    *error = std::string("connection lost: ") + std::strerror(errno);
    return false;
  }
}

bool ControlConnection::receive_one(Frame* frame, SteadyTime deadline, std::string* error) {
  std::vector<Frame> frames;
  for (;;) {
    if (!receive_available(&frames, error)) {
      if (!frames.empty()) break;
      return false;
    }
    if (!frames.empty()) break;
    pollfd waiter{fd_, POLLIN, 0};
    if (poll(&waiter, 1, millis_until(deadline)) != 1) {
      *error = "timed out waiting for the peer";
      return false;
    }
  }
  // The handshake reads one frame; anything after it stays for the progress thread.
  *frame = std::move(frames.front());
  std::string rest;
  for (size_t i = 1; i < frames.size(); ++i) rest += frame_message(frames[i].type, frames[i].payload);
  buffer_ = rest + buffer_;
  return true;
}

bool ControlConnection::parse_frames(std::vector<Frame>* frames, std::string* error) {
  size_t pos = 0;
  constexpr size_t kHeader = 2 * sizeof(uint32_t);
  while (buffer_.size() - pos >= kHeader) {
    uint32_t type = 0;
    uint32_t length = 0;
    std::memcpy(&type, buffer_.data() + pos, sizeof(type));
    std::memcpy(&length, buffer_.data() + pos + sizeof(type), sizeof(length));
    if (type < static_cast<uint32_t>(MessageType::HELLO) || type > static_cast<uint32_t>(kLastMessageType) ||
        length > kMaxMessageBytes) {
      *error = "malformed frame from peer (type " + std::to_string(type) + ", length " + std::to_string(length) + ")";
      return false;
    }
    if (buffer_.size() - pos - kHeader < length) break;
    frames->push_back({static_cast<MessageType>(type), buffer_.substr(pos + kHeader, length)});
    pos += kHeader + length;
  }
  buffer_.erase(0, pos);
  return true;
}

}  // namespace rtpllm
