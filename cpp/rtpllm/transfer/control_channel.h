// The transfer engine's control channel: framed messages (transfer_messages.h) over one TCP
// connection per peer. It carries the descriptor exchange, completion notices and heartbeats; the
// KV bytes themselves go over UCX. The connection also tells liveness: a peer process that dies
// closes its sockets, which the reader sees at once; a peer that hangs stops sending heartbeats.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include "rtpllm/transfer/transfer_messages.h"

namespace rtpllm {

using SteadyTime = std::chrono::steady_clock::time_point;

struct Frame {
  MessageType type = MessageType::PING;
  std::string payload;
};

// A listening TCP socket (non-blocking).
class ControlListener {
 public:
  // Throws std::runtime_error when the address cannot be bound.
  ControlListener(const std::string& host, int32_t port);
  ~ControlListener();
  ControlListener(const ControlListener&) = delete;
  ControlListener& operator=(const ControlListener&) = delete;

  int fd() const { return fd_; }
  int32_t port() const { return port_; }
  // A new connection's socket (non-blocking), or -1 when none is waiting.
  int accept_one();

 private:
  int fd_ = -1;
  int32_t port_ = 0;
};

// One peer's connection. Not thread safe: one thread owns it at a time.
class ControlConnection {
 public:
  // Connects within the deadline; throws std::runtime_error naming host:port on failure.
  static ControlConnection connect_to(const std::string& host, int32_t port, SteadyTime deadline);
  explicit ControlConnection(int fd);  // takes ownership of a connected socket
  ~ControlConnection();
  ControlConnection(ControlConnection&& other) noexcept;
  ControlConnection& operator=(ControlConnection&& other) noexcept;
  ControlConnection(const ControlConnection&) = delete;

  int fd() const { return fd_; }

  // Writes one frame, waiting for socket space until the deadline. False (and *error) when the
  // peer is gone or the deadline passed.
  bool send(MessageType type, const std::string& payload, SteadyTime deadline, std::string* error);

  // Reads whatever has arrived without blocking and appends the complete frames to *frames. False
  // (and *error) when the peer closed the connection or sent a malformed frame.
  bool receive_available(std::vector<Frame>* frames, std::string* error);

  // Waits for the next complete frame until the deadline. False (and *error) on close or timeout.
  bool receive_one(Frame* frame, SteadyTime deadline, std::string* error);

 private:
  // Moves complete frames out of buffer_; false on a malformed header.
  bool parse_frames(std::vector<Frame>* frames, std::string* error);

  int fd_ = -1;
  std::string buffer_;  // bytes received but not yet parsed into frames
};

}  // namespace rtpllm
