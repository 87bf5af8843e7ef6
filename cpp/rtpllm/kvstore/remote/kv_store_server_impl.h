// KVStoreServer's state and methods, shared by kv_store_server.cc (the thread, connections, the
// handshake and the index updates) and kv_store_server_requests.cc (PIN, UNPIN, RESERVE, COMMIT and
// the disk behind the store). Private to those two files.
#pragma once

#include <atomic>
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <unordered_set>
#include <vector>

#include "rtpllm/core/host_allocator.h"
#include "rtpllm/kvstore/cpu_copy_engine.h"
#include "rtpllm/kvstore/disk_tier.h"
#include "rtpllm/kvstore/remote/kv_store_server.h"
#include "rtpllm/kvstore/remote/store_index.h"
#include "rtpllm/kvstore/remote/store_protocol.h"
#include "rtpllm/transfer/control_channel.h"

namespace rtpllm {

using StoreClock = std::chrono::steady_clock;

inline std::string store_hex(uint64_t value) {
  char text[24];
  std::snprintf(text, sizeof(text), "%016" PRIx64, value);
  return text;
}

inline StoreClock::duration store_seconds(double s) {
  return std::chrono::duration_cast<StoreClock::duration>(std::chrono::duration<double>(s));
}

// Slots the disk tier finished reading (its release callbacks run on its threads).
struct ReleasedSlots {
  std::mutex mutex;
  std::vector<int32_t> slots;
  int wake_fd = -1;
};

struct KVStoreServer::Impl {
  using Clock = StoreClock;

  struct Reservation {
    std::vector<BlockHash> hashes;
    std::vector<int32_t> slots;
  };
  struct Pin {
    std::vector<int32_t> slots;
    Clock::time_point lease_end;  // pinned at + pin_lease_s
  };
  struct Client {
    explicit Client(ControlConnection c) : connection(std::move(c)) {}
    ControlConnection connection;
    std::string name = "?";
    bool welcomed = false;
    Clock::time_point hello_deadline;
    std::map<uint64_t, Pin> pins;
    std::set<uint64_t> expired_pins;  // request ids whose pin the lease dropped (an UNPIN is still fine)
    std::map<uint64_t, Reservation> reservations;
  };
  // A PIN waiting for blocks read back from disk.
  struct DiskPin {
    uint64_t client = 0;
    uint64_t request_id = 0;
    std::vector<BlockHash> hashes;
    std::vector<int32_t> slots;  // -1 at the positions the disk fills
    std::vector<size_t> disk_positions;
    std::vector<int32_t> disk_slots;  // reserved, filled by the disk tier
    TransferHandle handle = 0;
  };

  Impl(KVStoreServerOptions o, TransferFactory f, KVStoreLogger l);
  ~Impl();
  void wake() const;
  StoreClock::duration grace() const;

  // ---- kv_store_server.cc: the thread, connections, handshake, index updates ----
  void run();
  void accept_clients(Clock::time_point now);
  void read_clients(Clock::time_point now);
  void drop_client(uint64_t id);
  bool send(Client& client, const std::string& payload);
  bool send_error(Client& client, uint64_t request_id, const std::string& message);
  // False: drop the client.
  bool handle(uint64_t id, Client& client, const std::string& payload);
  bool refuse(Client& client, const std::string& reason);
  bool handle_hello(Client& client, const StoreHello& hello);
  void build_pool(uint64_t identity, const KVBlockShape& s);
  // The disk tier indexed the directory's blocks of this identity; learn their hashes.
  void scan_disk();
  // Forgets disk blocks the disk tier evicted or lost.
  void sweep_disk();
  // Keeps `visible` (what clients are told the store holds: memory or disk) current for hash.
  void refresh(BlockHash hash);
  void broadcast_changes();

  // ---- kv_store_server_requests.cc ----
  // False (after an ERROR reply) when the request is not acceptable; the connection stays.
  bool check_request(Client& client, const StoreBlockRequest& request, bool in_use);
  bool handle_pin(uint64_t client_id, Client& client, const StoreBlockRequest& request);
  void finish_disk_pins();
  bool handle_unpin(Client& client, const StoreRelease& release);
  bool handle_reserve(Client& client, const StoreBlockRequest& request);
  bool handle_commit(Client& client, const StoreRelease& commit);
  void offer_to_disk(int32_t slot, BlockHash hash);
  void unpin_released();
  // Drops the pins whose lease ended (kv_store_server.h: pin_lease_s).
  void expire_leases(Clock::time_point now);

  const KVStoreServerOptions options;
  const TransferFactory make_transfer;
  const KVStoreLogger logger;
  ControlListener listener;
  int wake_read = -1;
  int wake_write = -1;
  std::atomic<bool> stopping{false};

  mutable std::mutex mutex;  // guards everything below; the store thread holds it while it works
  // Destroyed in reverse order: the disk tier first (it reads the buffer), the buffer last.
  HostBuffer buffer;
  KVLayout layout;
  std::unique_ptr<KVTransfer> transfer;
  std::shared_ptr<CpuKVCopyEngine> copy_engine;
  std::shared_ptr<DiskTier> disk;
  std::shared_ptr<ReleasedSlots> released;
  std::unique_ptr<StoreIndex> index;
  uint64_t pool_identity = 0;
  KVBlockShape shape;
  std::unordered_set<BlockHash> on_disk;
  std::unordered_set<BlockHash> visible;
  std::vector<BlockHash> pending_added;
  std::vector<BlockHash> pending_removed;
  std::map<uint64_t, std::unique_ptr<Client>> clients;
  uint64_t next_client = 1;
  std::vector<DiskPin> disk_pins;
  KVStoreServerStats stats;
  std::thread thread;  // last: started when everything above exists
};

}  // namespace rtpllm
