// RemoteStoreTier's worker thread: the store connection (reconnects), PIN / RESERVE and their
// replies, the index updates, the one-sided transfers and their UNPIN / COMMIT.
#include <poll.h>
#include <unistd.h>

#include <stdexcept>
#include <thread>

#include "rtpllm/kvstore/remote/remote_store_tier_state.h"

namespace rtpllm {
namespace {

using Clock = std::chrono::steady_clock;

}  // namespace

// ---- the worker thread ----

void RemoteStoreTier::run() {
  if (connection_) {
    std::lock_guard<std::mutex> lock(view_mutex_);
    connected_ = true;
  }
  while (!stopping_) {
    if (!connection_ && Clock::now() >= next_attempt_) {
      bool refused = false;
      try {
        connection_ = open_connection(&refused);
        std::lock_guard<std::mutex> lock(view_mutex_);
        connected_ = true;
        capacity_blocks_ = connection_->welcome.capacity_blocks;
        last_error_.clear();
      } catch (const std::exception& e) {
        std::lock_guard<std::mutex> lock(view_mutex_);
        if (last_error_ != e.what()) logger_(std::string("remote KV store: ") + e.what());
        last_error_ = e.what();
        next_attempt_ = Clock::now() + remote_seconds(options_.retry_interval_s);
      }
    }
    start_ops();
    std::vector<pollfd> fds{{wake_read_, POLLIN, 0}};
    if (connection_) fds.push_back({connection_->control.fd(), POLLIN, 0});
    int timeout_ms = 50;
    if (!moving_.empty()) timeout_ms = 1;  // the transfer engine completes transfers on its own thread
    ::poll(fds.data(), fds.size(), timeout_ms);
    char drain[64];
    while (::read(wake_read_, drain, sizeof(drain)) > 0) {
    }
    read_store();
    advance_transfers();
    check_deadlines();
  }
  // Shutting down: nothing new starts; what moves is waited for (the engine bounds it).
  drop_connection("the tier is closing");
  start_ops();
  const Clock::time_point deadline = Clock::now() + remote_seconds(60);
  while (!moving_.empty() && Clock::now() < deadline) {
    advance_transfers();
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
}

bool RemoteStoreTier::send(const std::string& payload) {
  std::string error;
  if (connection_ && connection_->control.send(MessageType::STORE, payload, Clock::now() + remote_seconds(options_.request_timeout_s), &error)) {
    return true;
  }
  if (connection_) drop_connection("sending to the store failed: " + error);
  return false;
}

void RemoteStoreTier::start_ops() {
  std::deque<std::shared_ptr<Op>> queued;
  {
    std::lock_guard<std::mutex> lock(ops_mutex_);
    queued.swap(queued_);
  }
  for (const std::shared_ptr<Op>& op : queued) {
    bool cancelled = false;
    {
      std::lock_guard<std::mutex> lock(ops_mutex_);
      cancelled = op->cancelled;
    }
    const int32_t limit = connection_ ? connection_->welcome.max_blocks_per_request : 0;
    if (cancelled || !connection_ || (op->is_load && static_cast<int64_t>(op->hashes.size()) > limit)) {
      finish(*op, false);
      continue;
    }
    if (static_cast<int64_t>(op->hashes.size()) > limit) {  // a save: its leading blocks are worth the most
      op->hashes.resize(static_cast<size_t>(limit));
      op->blocks.resize(static_cast<size_t>(limit));
    }
    op->request_id = next_request_++;
    op->phase = Phase::AWAIT_REPLY;
    op->deadline = Clock::now() + remote_seconds(options_.request_timeout_s);
    awaiting_.emplace(op->request_id, op);
    send(encode_store_request(op->is_load ? StoreMessage::PIN : StoreMessage::RESERVE, {op->request_id, op->hashes}));
  }
}

void RemoteStoreTier::read_store() {
  if (!connection_) return;
  std::vector<Frame> frames;
  std::string error;
  const bool alive = connection_->control.receive_available(&frames, &error);
  try {
    for (const Frame& frame : frames) {
      if (!connection_) return;
      if (frame.type != MessageType::STORE) throw std::runtime_error("not a store frame");
      const StoreMessage type = store_message_type(frame.payload);
      if (type == StoreMessage::INDEX) {
        StoreIndexUpdate update = decode_store_index(frame.payload);
        std::lock_guard<std::mutex> lock(view_mutex_);
        for (BlockHash hash : update.removed) view_.erase(hash);
        view_.insert(update.added.begin(), update.added.end());
        used_blocks_ = update.used_blocks;
        continue;
      }
      if (type == StoreMessage::ERROR || type == StoreMessage::REFUSE) {
        const StoreError e = decode_store_error(frame.payload);
        auto it = awaiting_.find(e.request_id);
        if (it == awaiting_.end()) throw std::runtime_error("the store reported: " + e.message);
        logger_("remote KV store: request refused: " + e.message);
        std::shared_ptr<Op> op = it->second;
        awaiting_.erase(it);
        finish(*op, false);
        continue;
      }
      if (type != StoreMessage::PINNED && type != StoreMessage::RESERVED) {
        throw std::runtime_error("unexpected message type " + std::to_string(static_cast<uint32_t>(type)));
      }
      StoreSlotsReply reply = decode_store_slots(frame.payload);
      auto it = awaiting_.find(reply.request_id);
      if (it == awaiting_.end()) throw std::runtime_error("a reply to an unknown request " + std::to_string(reply.request_id));
      std::shared_ptr<Op> op = it->second;
      awaiting_.erase(it);
      if (op->is_load != (type == StoreMessage::PINNED)) throw std::runtime_error("a reply of the wrong kind");
      if (!reply.error.empty()) {  // evicted since the view said otherwise: recompute
        finish(*op, false);
        continue;
      }
      if (reply.slots.size() != op->hashes.size()) throw std::runtime_error("a reply with the wrong number of slots");
      TransferRequest request;
      request.request_id = op->request_id;
      request.notify = false;
      for (size_t i = 0; i < reply.slots.size(); ++i) {
        if (reply.slots[i] < 0) continue;  // RESERVED: the store does not want this one
        request.local_blocks.push_back(op->blocks[i]);
        request.remote_blocks.push_back(reply.slots[i]);
      }
      bool cancelled = false;
      {
        std::lock_guard<std::mutex> lock(ops_mutex_);
        cancelled = op->cancelled;
      }
      const StoreRelease release{op->request_id, false};
      if (op->is_load && (cancelled || request.local_blocks.size() != op->hashes.size())) {
        send(encode_store_release(StoreMessage::UNPIN, release));
        finish(*op, false);
        continue;
      }
      if (request.local_blocks.empty()) {  // a save of nothing the store wants
        send(encode_store_release(StoreMessage::COMMIT, {op->request_id, true}));
        finish(*op, true);
        continue;
      }
      try {
        if (op->fence) op->fence();
        op->transfer = op->is_load ? transfer_->get(connection_->peer, request) : transfer_->put(connection_->peer, request);
      } catch (const std::exception& e) {  // slots out of our view of the store's buffer, a failed peer
        logger_(std::string("remote KV store: transfer refused: ") + e.what());
        send(encode_store_release(op->is_load ? StoreMessage::UNPIN : StoreMessage::COMMIT, release));
        finish(*op, false);
        continue;
      }
      op->moved_blocks = static_cast<int64_t>(request.local_blocks.size());
      op->phase = Phase::MOVING;
      moving_.push_back(op);
    }
  } catch (const std::exception& e) {
    drop_connection(std::string("protocol error: ") + e.what());
    return;
  }
  if (!alive && connection_) drop_connection(error);
}

void RemoteStoreTier::advance_transfers() {
  for (size_t i = 0; i < moving_.size();) {
    std::shared_ptr<Op> op = moving_[i];
    const TransferStatus status = transfer_->poll(op->transfer);
    if (status.state == TransferState::PENDING) {
      ++i;
      continue;
    }
    moving_.erase(moving_.begin() + static_cast<std::ptrdiff_t>(i));
    // Only bytes that moved while the store kept the slots for us count.
    const bool ok = status.state == TransferState::DONE && !op->connection_lost;
    if (!op->connection_lost) {
      send(encode_store_release(op->is_load ? StoreMessage::UNPIN : StoreMessage::COMMIT, {op->request_id, ok}));
    }
    if (!status.error.empty()) logger_("remote KV store: transfer failed: " + status.error);
    finish(*op, ok);
  }
}

void RemoteStoreTier::check_deadlines() {
  const Clock::time_point now = Clock::now();
  for (const auto& [id, op] : awaiting_) {
    if (now > op->deadline) {
      drop_connection("the store did not answer within " + std::to_string(options_.request_timeout_s) + " s");
      return;
    }
  }
}

void RemoteStoreTier::drop_connection(const std::string& why) {
  if (connection_) {
    if (!stopping_) logger_("remote KV store: connection lost (" + why + "); loads fall back to recompute");
    const PeerId peer = connection_->peer;
    connection_.reset();
    // The peer fails: its transfers end FAILED, once they no longer touch our blocks.
    if (transfer_ && peer != 0) transfer_->disconnect(peer);
  }
  for (auto& [id, op] : awaiting_) finish(*op, false);
  awaiting_.clear();
  for (const std::shared_ptr<Op>& op : moving_) op->connection_lost = true;
  next_attempt_ = Clock::now() + remote_seconds(options_.retry_interval_s);
  std::lock_guard<std::mutex> lock(view_mutex_);
  connected_ = false;
  last_error_ = why;
  view_.clear();
  used_blocks_ = 0;
}

void RemoteStoreTier::finish(Op& op, bool ok) {
  std::lock_guard<std::mutex> lock(ops_mutex_);
  op.phase = ok ? Phase::DONE : Phase::FAILED;
  op.state = ok ? TransferState::DONE : TransferState::FAILED;
  if (op.is_load) {
    if (ok) {
      stats_.loaded_blocks += static_cast<uint64_t>(op.moved_blocks);
      stats_.load_bytes += static_cast<uint64_t>(op.moved_blocks * bytes_per_block_);
      stats_.load_latency_s.push_back(std::chrono::duration<double>(Clock::now() - op.start).count());
    } else {
      ++stats_.failed_loads;
    }
  } else {
    if (ok) {
      stats_.saved_blocks += static_cast<uint64_t>(op.moved_blocks);
      stats_.save_bytes += static_cast<uint64_t>(op.moved_blocks * bytes_per_block_);
    }
    --pending_saves_;
  }
  ops_changed_.notify_all();
}

}  // namespace rtpllm
