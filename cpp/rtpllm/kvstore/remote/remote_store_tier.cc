#include "rtpllm/kvstore/remote/remote_store_tier.h"

#include <fcntl.h>
#include <poll.h>
#include <unistd.h>

#include <cinttypes>
#include <cstdio>
#include <stdexcept>

#include "rtpllm/kvstore/copy_engine.h"
#include "rtpllm/kvstore/remote/remote_store_tier_state.h"

namespace rtpllm {
namespace {

using Clock = std::chrono::steady_clock;

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

BlockHash store_key(BlockHash hash, uint64_t key_salt) {
  if (key_salt == 0) return hash;
  // splitmix64's finalizer over the hash and the salt: keys of different salts never line up.
  uint64_t x = hash ^ (key_salt * 0x9E3779B97F4A7C15ULL);
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  x ^= x >> 31;
  return x != 0 ? x : 1;
}

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
    next_attempt_ = Clock::now() + remote_seconds(options_.retry_interval_s);
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
  const Clock::time_point deadline = Clock::now() + remote_seconds(options_.connect_timeout_s);
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
    transfer_options.identity = remote_hex(options_.identity);
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
  return view_.count(store_key(hash, options_.key_salt)) > 0;
}

int32_t RemoteStoreTier::match(const std::vector<BlockHash>& hashes) {
  int32_t hits = 0;
  {
    std::lock_guard<std::mutex> lock(view_mutex_);
    while (hits < static_cast<int32_t>(hashes.size()) &&
           view_.count(store_key(hashes[static_cast<size_t>(hits)], options_.key_salt))) {
      ++hits;
    }
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
  op->hashes.reserve(hashes.size());
  for (BlockHash hash : hashes) op->hashes.push_back(store_key(hash, options_.key_salt));  // the store's keys
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
      const BlockHash key = store_key(hashes[i], options_.key_salt);
      if (view_.count(key)) continue;  // the store holds it
      op->hashes.push_back(key);
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
  const Clock::time_point deadline = Clock::now() + remote_seconds(timeout_s);
  while (!connected()) {
    if (Clock::now() >= deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return true;
}

bool RemoteStoreTier::wait_saves(double timeout_s) const {
  std::unique_lock<std::mutex> lock(ops_mutex_);
  return ops_changed_.wait_for(lock, remote_seconds(timeout_s), [this] { return pending_saves_ == 0; });
}

std::string RemoteStoreTier::last_error() const {
  std::lock_guard<std::mutex> lock(view_mutex_);
  return last_error_;
}

}  // namespace rtpllm
