// The shared KV store (`rtpllm kvstore serve`): a process that holds KV blocks by block hash in
// host memory, optionally backed by a disk tier, and serves them to any number of engine
// instances (RemoteStoreTier) so that one instance finds a prefix another one computed.
//
// Memory: one buffer of whole blocks (block-major: [slot][layer][K, V][block_size, kv_heads,
// head_dim], transfer_plan.h make_block_major_layout), registered with a transfer engine; clients
// move bytes in and out one-sided (gets for loads, puts for saves), the store only hands out
// slots. StoreIndex keeps which slot holds which hash, pins and LRU eviction. The store learns the
// block shape from its first client (or is started with an identity and takes the shape from the
// first client of that identity): the buffer, the transfer engine and the disk tier are built
// then. A client of another identity or shape is refused, with the reason, on both sides.
//
// Disk (optional): every committed block is written through to a DiskTier (disk_tier.h) from its
// slot, pinned until the disk has read it; a block evicted from memory stays on disk, and a PIN
// of a block held only on disk first reads it back into a slot. A restarted store with the same
// directory serves what the disk holds.
//
// Control: a thread of its own runs the store protocol (store_protocol.h) over one TCP connection
// per client; a client that disconnects releases its pins and reservations after a grace period
// (StoreIndex::unpin_at). A client that stays connected but never releases a pin (a bug, a stuck
// engine) holds it for pin_lease_s at most: the pin is then dropped (counted in expired_pins) and
// the block may be evicted again; the client's late UNPIN of it is accepted. A malformed frame costs that client its connection; a bad request
// (unknown request id, too many blocks, duplicate id) gets an ERROR reply. Nothing a client sends
// can stop the store.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "rtpllm/kvstore/kv_store_tier.h"
#include "rtpllm/transfer/kv_transfer.h"

namespace rtpllm {

struct KVStoreServerOptions {
  std::string host = "127.0.0.1";  // listen address of the store protocol and the transfer engine
  int32_t port = 0;                // store protocol port; 0: any free port (see port())
  int64_t capacity_bytes = 0;      // host memory for blocks
  std::string disk_dir;            // empty: no disk tier
  int64_t disk_capacity_bytes = 0;
  uint64_t identity = 0;           // 0: taken from the first client
  double transfer_timeout_s = 10.0;
  double pin_lease_s = 300.0;      // a PIN's slots stay pinned this long at most (> transfer_timeout_s)
  int32_t max_blocks_per_request = 4096;
  int32_t max_clients = 256;

  // Throws std::invalid_argument naming the bad field.
  void validate() const;
};

struct KVStoreServerStats {
  uint64_t identity = 0;     // 0 until the first client fixed it
  std::string shape;         // KVBlockShape::describe(), empty until then
  int64_t bytes_per_block = 0;
  int64_t capacity_blocks = 0;
  int64_t used_blocks = 0;   // in memory
  int64_t pinned_blocks = 0;
  int64_t disk_blocks = 0;   // known to be on disk
  int64_t clients = 0;       // connected now
  uint64_t refused_clients = 0;
  uint64_t pin_requests = 0;
  uint64_t pinned_hits = 0;  // blocks handed out for loads
  uint64_t pin_misses = 0;   // PINs refused: a block not held (evicted meanwhile, unknown hash)
  uint64_t disk_reads = 0;   // blocks read back from disk for a PIN
  uint64_t saved_blocks = 0; // committed
  uint64_t skipped_blocks = 0;  // RESERVE entries already held (or no room)
  uint64_t evicted_blocks = 0;
  uint64_t expired_pins = 0;        // PINs dropped by the lease (their client never released them)
  uint64_t expired_pin_blocks = 0;
  uint64_t bad_requests = 0; // ERROR replies and connections dropped for a malformed frame
};

class KVStoreServer {
 public:
  // Builds the transfer engine once the block shape is known (UcxTransfer in production).
  using TransferFactory = std::function<std::unique_ptr<KVTransfer>(const TransferOptions&)>;

  // Listens at once (std::runtime_error when the address cannot be bound; std::invalid_argument
  // for bad options) and starts the store thread.
  KVStoreServer(KVStoreServerOptions options, TransferFactory make_transfer, KVStoreLogger logger = nullptr);
  ~KVStoreServer();  // stops the thread, closes every client (they see the store gone)
  KVStoreServer(const KVStoreServer&) = delete;
  KVStoreServer& operator=(const KVStoreServer&) = delete;

  int32_t port() const;
  KVStoreServerStats stats() const;
  // Waits until the disk tier has written every block it accepted. For tests and shutdown.
  void flush_disk();
  // StoreIndex and the store's own tables agree; throws std::logic_error otherwise. For tests.
  void check_invariants() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace rtpllm
