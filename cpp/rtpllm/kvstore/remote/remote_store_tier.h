// The client of the shared KV store (kv_store_server.h): one more tier behind the connector seam,
// chained after host (and disk) by TieredKVConnector.
//
//   match()/contains()  answered from a local view of the store's index, which the store keeps
//                       current with INDEX updates (a snapshot at connect, then every change): the
//                       step loop never waits on the network. The view can be stale by a message's
//                       latency: a block evicted meanwhile makes the load FAILED, never wrong;
//   load()   PIN the hashes at the store (its reply names the slots, pinned until UNPIN), one-sided
//            get of those slots into the pool blocks, UNPIN;
//   save()   hashes the view already holds are skipped; RESERVE the rest (the store answers a slot
//            per hash, -1 to skip), one-sided put of the pool blocks into the slots, COMMIT;
//   poll()   the worker thread's progress; never blocks.
// A worker thread of the tier owns the store connection and the transfer engine and runs every
// exchange; the scheduler thread only queues work and reads states.
//
// Failure policy: every reply is awaited at most request_timeout_s and every transfer at most the
// store's transfer timeout; a store that closes, dies or goes silent is dropped at once: loads in
// flight end FAILED (once the transfer engine no longer writes their pool blocks), the view is
// emptied (match() says 0, so the scheduler computes instead of waiting), and the worker retries
// the connection every retry_interval_s. A load also ends FAILED when the connection dropped while
// its get was in flight (the store may have reused the slots after its grace period). Nothing is
// retried behind the scheduler's back: a FAILED load is recomputed, a FAILED save is dropped.
//
// A store that refuses this instance (another cache identity or block shape) makes the
// constructor throw std::runtime_error with the store's reason; an unreachable store at start is
// logged and retried in the background, so that an instance can start before its store.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "rtpllm/kvstore/kv_store_tier.h"
#include "rtpllm/transfer/kv_transfer.h"

namespace rtpllm {

struct RemoteStoreOptions {
  std::string host = "127.0.0.1";
  int32_t port = 0;
  uint64_t identity = 0;             // the cache identity (root hash); must be non-zero
  std::string name = "rtpllm";       // shown in the store's log
  double connect_timeout_s = 2.0;    // one connection attempt, handshake included
  double request_timeout_s = 2.0;    // a PIN or RESERVE reply; later, the store counts as dead
  double retry_interval_s = 2.0;     // between connection attempts while the store is away
  int32_t max_pending_saves = 64;    // saves beyond this many in flight are skipped
  // Tensor parallelism: the first KV head of this rank's pool. Every rank's shard of a block goes
  // to the store under a key of its own (the block's hash mixed with this; 0: the hash itself), so
  // ranks holding other heads never read each other's bytes, while ranks of any TP size holding
  // the same heads (replicated heads included) share them. The head count is the store's shape
  // check: a shard of another width is refused at connection.
  uint64_t key_salt = 0;

  // Throws std::invalid_argument naming the bad field.
  void validate() const;
};

// The key under which the store holds `hash`'s bytes for a pool whose first KV head is `key_salt`.
BlockHash store_key(BlockHash hash, uint64_t key_salt);

class RemoteStoreTier final : public KVStoreTier {
 public:
  using TransferFactory = std::function<std::unique_ptr<KVTransfer>(const TransferOptions&)>;
  // Called on the scheduler thread by save(); returns what the worker calls before it reads the
  // saved pool blocks (a CUDA build waits there for the compute stream's work). Empty: no wait.
  using SaveFence = std::function<std::function<void()>()>;

  // pool: the KV pool this instance registers (its addresses stay valid for the tier's life).
  RemoteStoreTier(KVLayout pool, RemoteStoreOptions options, TransferFactory make_transfer,
                  KVStoreLogger logger = nullptr, SaveFence save_fence = nullptr);
  ~RemoteStoreTier() override;  // ends the worker; transfers in flight end before it returns

  std::string name() const override { return "remote"; }
  int32_t match(const std::vector<BlockHash>& hashes) override;
  TransferHandle load(const std::vector<BlockHash>& hashes, const std::vector<BlockId>& gpu_blocks) override;
  TransferHandle save(const std::vector<BlockHash>& hashes, const std::vector<BlockId>& gpu_blocks) override;
  TransferState poll(TransferHandle handle) override;
  std::vector<KVTierStats> stats() override;
  bool contains(BlockHash hash) override;
  void cancel(TransferHandle handle) override;
  bool saves_from_pool() const override { return true; }

  bool connected() const;
  // Waits up to timeout_s for the connection (tests, startup); true when connected.
  bool wait_connected(double timeout_s) const;
  // Waits up to timeout_s until no save is in flight (tests, shutdown); true when none is.
  bool wait_saves(double timeout_s) const;
  std::string last_error() const;

 private:
  struct Op;
  struct Connection;
  enum class Phase : uint8_t { QUEUED, AWAIT_REPLY, MOVING, DONE, FAILED };

  void run();
  // Connects and handshakes (bounded by connect_timeout_s and the engine's timeout). Throws
  // std::runtime_error with the reason; *refused tells a refusal from an unreachable store.
  std::unique_ptr<Connection> open_connection(bool* refused);
  void start_ops();
  void read_store();
  void advance_transfers();
  void check_deadlines();
  void drop_connection(const std::string& why);
  void finish(Op& op, bool ok);
  bool send(const std::string& payload);
  void wake() const;

  const KVLayout pool_;
  const RemoteStoreOptions options_;
  const TransferFactory make_transfer_;
  const KVStoreLogger logger_;
  const SaveFence save_fence_;
  const int64_t bytes_per_block_;
  int wake_read_ = -1;
  int wake_write_ = -1;
  std::atomic<bool> stopping_{false};

  // The view of the store's index, and whether the store is there.
  mutable std::mutex view_mutex_;
  std::unordered_set<BlockHash> view_;
  bool connected_ = false;
  int64_t capacity_blocks_ = 0;
  int64_t used_blocks_ = 0;
  std::string last_error_;

  // The operations, shared by the scheduler thread (load/save/poll) and the worker.
  mutable std::mutex ops_mutex_;
  mutable std::condition_variable ops_changed_;
  std::unordered_map<TransferHandle, std::shared_ptr<Op>> ops_;
  std::deque<std::shared_ptr<Op>> queued_;
  TransferHandle next_handle_ = 1;
  int32_t pending_saves_ = 0;
  KVTierStats stats_;

  // Worker thread only.
  std::unique_ptr<KVTransfer> transfer_;  // built at the first WELCOME, kept across reconnects
  std::unique_ptr<Connection> connection_;
  std::unordered_map<uint64_t, std::shared_ptr<Op>> awaiting_;  // by request id
  std::vector<std::shared_ptr<Op>> moving_;                     // transfers in flight
  std::chrono::steady_clock::time_point next_attempt_;
  uint64_t next_request_ = 1;
  std::thread worker_;
};

}  // namespace rtpllm
