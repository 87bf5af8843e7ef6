#include "rtpllm/kvstore/remote/remote_store_tier.h"

#include <fcntl.h>
#include <poll.h>
#include <unistd.h>

#include <cinttypes>
#include <cstdio>
#include <stdexcept>

#include "rtpllm/kvstore/copy_engine.h"
#include "rtpllm/kvstore/remote/store_protocol.h"
#include "rtpllm/transfer/control_channel.h"

namespace rtpllm {
namespace {

using Clock = std::chrono::steady_clock;

Clock::duration seconds(double s) {
  return std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(s));
}

std::string hex(uint64_t value) {
  char text[24];
  std::snprintf(text, sizeof(text), "%016" PRIx64, value);
  return text;
}

}  // namespace

void RemoteStoreOptions::validate() const {
  if (port <= 0 || port > 65535) throw std::invalid_argument("port: must be in [1, 65535], got " + std::to_string(port));
  if (host.empty()) throw std::invalid_argument("host: must not be empty");
  if (identity == 0) throw std::invalid_argument("identity: must be a non-zero cache identity");
  if (!(connect_timeout_s > 0)) throw std::invalid_argument("connect_timeout_s: must be positive");
  if (!(request_timeout_s > 0)) throw std::invalid_argument("request_timeout_s: must be positive");
  if (!(retry_interval_s > 0)) throw std::invalid_argument("retry_interval_s: must be positive");
  if (max_pending_saves <= 0) throw std::invalid_argument("max_pending_saves: must be positive");
}

struct RemoteStoreTier::Op {
  bool is_load = false;
  std::vector<BlockHash> hashes;
  std::vector<BlockId> blocks;
  std::function<void()> fence;  // saves: wait before reading the pool blocks
  Clock::time_point start;
  // Guarded by ops_mutex_.
  TransferState state = TransferState::PENDING;
  bool cancelled = false;
  // Worker thread only.
  Phase phase = Phase::QUEUED;
  uint64_t request_id = 0;
  Clock::time_point deadline;
  TransferHandle transfer = 0;
  int64_t moved_blocks = 0;
  bool connection_lost = false;  // the store connection dropped while the transfer was in flight
};

struct RemoteStoreTier::Connection {
  ControlConnection control;
  PeerId peer = 0;
  StoreWelcome welcome;
};

RemoteStoreTier::RemoteStoreTier(KVLayout pool, RemoteStoreOptions options, TransferFactory make_transfer,
                                 KVStoreLogger logger, SaveFence save_fence)
    : pool_(std::move(pool)),
      options_((options.validate(), std::move(options))),
      make_transfer_(std::move(make_transfer)),
      logger_(logger ? std::move(logger) : default_kvstore_logger()),
      save_fence_(std::move(save_fence)),
      bytes_per_block_(pool_.bytes_per_block()) {
  pool_.validate();
  stats_.name = "remote";
  int fds[2];
  if (pipe2(fds, O_NONBLOCK | O_CLOEXEC) != 0) throw std::runtime_error("RemoteStoreTier: pipe failed");
  wake_read_ = fds[0];
  wake_write_ = fds[1];
  // One attempt now: a store that refuses this instance is a configuration error to report at
  // start; one that is not up yet is retried by the worker.
  bool refused = false;
  try {
    connection_ = open_connection(&refused);
    std::lock_guard<std::mutex> lock(view_mutex_);
    connected_ = true;
    capacity_blocks_ = connection_->welcome.capacity_blocks;
  } catch (const std::runtime_error& e) {
    if (refused) {
      ::close(wake_read_);
      ::close(wake_write_);
      throw;
    }
    logger_(std::string("remote KV store: ") + e.what() + "; retrying every " + std::to_string(options_.retry_interval_s) + " s");
    std::lock_guard<std::mutex> lock(view_mutex_);
    last_error_ = e.what();
    next_attempt_ = Clock::now() + seconds(options_.retry_interval_s);
  }
  worker_ = std::thread([this] { run(); });
}

RemoteStoreTier::~RemoteStoreTier() {
  stopping_ = true;
  wake();
  worker_.join();
  transfer_.reset();
  ::close(wake_read_);
  ::close(wake_write_);
}

void RemoteStoreTier::wake() const {
  const char byte = 1;
  [[maybe_unused]] ssize_t n = ::write(wake_write_, &byte, 1);
}

std::unique_ptr<RemoteStoreTier::Connection> RemoteStoreTier::open_connection(bool* refused) {
  const std::string where = "the KV store at " + options_.host + ":" + std::to_string(options_.port);
  const Clock::time_point deadline = Clock::now() + seconds(options_.connect_timeout_s);
  auto connection = std::make_unique<Connection>(Connection{ControlConnection::connect_to(options_.host, options_.port, deadline), 0, {}});
  StoreHello hello;
  hello.name = options_.name;
  hello.identity = options_.identity;
  hello.shape = KVBlockShape{pool_.num_layers(), pool_.block_size, pool_.num_kv_heads, pool_.head_dim, pool_.element_bytes};
  std::string error;
  Frame reply;
  if (!connection->control.send(MessageType::STORE, encode_store_hello(hello), deadline, &error) ||
      !connection->control.receive_one(&reply, deadline, &error)) {
    throw std::runtime_error(where + ": " + error);
  }
  if (reply.type != MessageType::STORE) throw std::runtime_error(where + ": protocol error (not a store frame)");
  const StoreMessage type = store_message_type(reply.payload);
  if (type == StoreMessage::REFUSE || type == StoreMessage::ERROR) {
    *refused = true;
    throw std::runtime_error(where + " refused this instance: " + decode_store_error(reply.payload).message);
  }
  connection->welcome = decode_store_welcome(reply.payload);
  if (!transfer_) {
    TransferOptions transfer_options;
    transfer_options.name = options_.name;
    transfer_options.identity = hex(options_.identity);
    transfer_options.timeout_s = connection->welcome.transfer_timeout_s;
    transfer_options.max_blocks_per_transfer = std::max(1, connection->welcome.max_blocks_per_request);
    transfer_ = make_transfer_(transfer_options);
    transfer_->register_kv(pool_);
  }
  connection->peer = transfer_->connect(options_.host, connection->welcome.transfer_port);
  logger_("remote KV store: connected to " + options_.host + ":" + std::to_string(options_.port) + " (" +
          std::to_string(connection->welcome.capacity_blocks) + " blocks)");
  return connection;
}

// ---- the scheduler thread ----

bool RemoteStoreTier::contains(BlockHash hash) {
  std::lock_guard<std::mutex> lock(view_mutex_);
  return view_.count(hash) > 0;
}

int32_t RemoteStoreTier::match(const std::vector<BlockHash>& hashes) {
  int32_t hits = 0;
  {
    std::lock_guard<std::mutex> lock(view_mutex_);
    while (hits < static_cast<int32_t>(hashes.size()) && view_.count(hashes[static_cast<size_t>(hits)])) ++hits;
  }
  std::lock_guard<std::mutex> lock(ops_mutex_);
  ++stats_.queries;
  stats_.query_blocks += hashes.size();
  stats_.hit_blocks += static_cast<uint64_t>(hits);
  return hits;
}

TransferHandle RemoteStoreTier::load(const std::vector<BlockHash>& hashes, const std::vector<BlockId>& gpu_blocks) {
  if (hashes.size() != gpu_blocks.size()) {
    throw std::invalid_argument("RemoteStoreTier: " + std::to_string(hashes.size()) + " hashes but " +
                                std::to_string(gpu_blocks.size()) + " gpu_blocks");
  }
  check_pool_blocks(pool_, gpu_blocks);
  auto op = std::make_shared<Op>();
  op->is_load = true;
  op->hashes = hashes;
  op->blocks = gpu_blocks;
  op->start = Clock::now();
  std::lock_guard<std::mutex> lock(ops_mutex_);
  const TransferHandle handle = next_handle_++;
  ops_.emplace(handle, op);
  if (hashes.empty()) {
    op->state = TransferState::DONE;
  } else if (!connected()) {
    op->state = TransferState::FAILED;
    ++stats_.failed_loads;
  } else {
    queued_.push_back(op);
    wake();
  }
  return handle;
}

TransferHandle RemoteStoreTier::save(const std::vector<BlockHash>& hashes, const std::vector<BlockId>& gpu_blocks) {
  if (hashes.size() != gpu_blocks.size()) {
    throw std::invalid_argument("RemoteStoreTier: " + std::to_string(hashes.size()) + " hashes but " +
                                std::to_string(gpu_blocks.size()) + " gpu_blocks");
  }
  check_pool_blocks(pool_, gpu_blocks);
  auto op = std::make_shared<Op>();
  op->start = Clock::now();
  bool up = false;
  {
    std::lock_guard<std::mutex> lock(view_mutex_);
    up = connected_;
    for (size_t i = 0; i < hashes.size() && up; ++i) {
      if (view_.count(hashes[i])) continue;  // the store holds it
      op->hashes.push_back(hashes[i]);
      op->blocks.push_back(gpu_blocks[i]);
    }
  }
  std::lock_guard<std::mutex> lock(ops_mutex_);
  const TransferHandle handle = next_handle_++;
  ops_.emplace(handle, op);
  if (!up || op->hashes.empty() || pending_saves_ >= options_.max_pending_saves) {
    op->state = TransferState::DONE;  // nothing to do (or no room): the store simply lacks these blocks
  } else {
    if (save_fence_) op->fence = save_fence_();
    ++pending_saves_;
    queued_.push_back(op);
    wake();
  }
  return handle;
}

TransferState RemoteStoreTier::poll(TransferHandle handle) {
  std::lock_guard<std::mutex> lock(ops_mutex_);
  auto it = ops_.find(handle);
  if (it == ops_.end()) throw std::invalid_argument("RemoteStoreTier: unknown transfer handle " + std::to_string(handle));
  const TransferState state = it->second->state;
  if (state != TransferState::PENDING) ops_.erase(it);
  return state;
}

void RemoteStoreTier::cancel(TransferHandle handle) {
  std::lock_guard<std::mutex> lock(ops_mutex_);
  auto it = ops_.find(handle);
  if (it == ops_.end() || it->second->state != TransferState::PENDING) return;
  it->second->cancelled = true;
  wake();
}

std::vector<KVTierStats> RemoteStoreTier::stats() {
  KVTierStats s;
  {
    std::lock_guard<std::mutex> lock(ops_mutex_);
    s = stats_;
    stats_.load_latency_s.clear();
  }
  std::lock_guard<std::mutex> lock(view_mutex_);
  s.capacity_blocks = static_cast<uint64_t>(capacity_blocks_);
  s.used_blocks = static_cast<uint64_t>(used_blocks_);
  s.enabled = connected_;
  return {s};
}

bool RemoteStoreTier::connected() const {
  std::lock_guard<std::mutex> lock(view_mutex_);
  return connected_;
}

bool RemoteStoreTier::wait_connected(double timeout_s) const {
  const Clock::time_point deadline = Clock::now() + seconds(timeout_s);
  while (!connected()) {
    if (Clock::now() >= deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return true;
}

bool RemoteStoreTier::wait_saves(double timeout_s) const {
  std::unique_lock<std::mutex> lock(ops_mutex_);
  return ops_changed_.wait_for(lock, seconds(timeout_s), [this] { return pending_saves_ == 0; });
}

std::string RemoteStoreTier::last_error() const {
  std::lock_guard<std::mutex> lock(view_mutex_);
  return last_error_;
}

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
        next_attempt_ = Clock::now() + seconds(options_.retry_interval_s);
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
  const Clock::time_point deadline = Clock::now() + seconds(60);
  while (!moving_.empty() && Clock::now() < deadline) {
    advance_transfers();
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
}

bool RemoteStoreTier::send(const std::string& payload) {
  std::string error;
  if (connection_ && connection_->control.send(MessageType::STORE, payload, Clock::now() + seconds(options_.request_timeout_s), &error)) {
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
    op->deadline = Clock::now() + seconds(options_.request_timeout_s);
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
  next_attempt_ = Clock::now() + seconds(options_.retry_interval_s);
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
