// The shared KV store end to end in one process over UCX TCP: a KVStoreServer and RemoteStoreTier
// clients with host pools; blocks saved by one client are loaded by another byte for byte; bad
// clients and bad requests are refused; a store that goes away turns loads into FAILED (recompute).
#include <gtest/gtest.h>

#include <poll.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <stdexcept>
#include <thread>

#include "host_kv_pool.h"
#include "rtpllm/kvstore/cpu_copy_engine.h"
#include "rtpllm/kvstore/host_tier.h"
#include "rtpllm/kvstore/tiered_connector.h"
#include "rtpllm/kvstore/remote/kv_store_server.h"
#include "rtpllm/kvstore/remote/remote_store_tier.h"
#include "rtpllm/kvstore/remote/store_protocol.h"
#include "rtpllm/transfer/control_channel.h"
#include "rtpllm/transfer/ucx/ucx_transfer.h"

namespace rtpllm {
namespace {

using testing::HostKVPool;
using testing::KVShape;
using Clock = std::chrono::steady_clock;

constexpr uint64_t kIdentity = 0x1234abcd;
constexpr int32_t kBlockSize = 4;

std::unique_ptr<KVTransfer> make_ucx(const TransferOptions& o) { return std::make_unique<UcxTransfer>(o); }

KVStoreLogger quiet() {
  return [](const std::string&) {};
}

KVStoreServerOptions server_options(int64_t capacity_blocks, const std::string& disk_dir = "") {
  KVStoreServerOptions o;
  const int64_t bytes_per_block = 2LL * KVShape{}.num_layers * kBlockSize * KVShape{}.num_kv_heads * KVShape{}.head_dim *
                                  KVShape{}.element_bytes;
  o.capacity_bytes = capacity_blocks * bytes_per_block;
  o.transfer_timeout_s = 2.0;
  o.max_blocks_per_request = 16;
  o.disk_dir = disk_dir;
  o.disk_capacity_bytes = 64 << 20;
  return o;
}

// A raw control connection to the store that has sent its hello (kIdentity, this test's block
// shape), for tests that speak the protocol by hand.
ControlConnection said_hello(int32_t port, Clock::time_point deadline) {
  ControlConnection raw = ControlConnection::connect_to("127.0.0.1", port, deadline);
  std::string error;
  StoreHello hello;
  hello.identity = kIdentity;
  hello.shape = KVBlockShape{KVShape{}.num_layers, kBlockSize, KVShape{}.num_kv_heads, KVShape{}.head_dim, KVShape{}.element_bytes};
  EXPECT_TRUE(raw.send(MessageType::STORE, encode_store_hello(hello), deadline, &error)) << error;
  return raw;
}

RemoteStoreOptions client_options(int32_t port, uint64_t identity = kIdentity) {
  RemoteStoreOptions o;
  o.port = port;
  o.identity = identity;
  o.request_timeout_s = 1.0;
  o.retry_interval_s = 0.2;
  return o;
}

TransferState finish(KVConnector& tier, TransferHandle handle, double timeout_s = 10.0) {
  const auto deadline = Clock::now() + std::chrono::duration<double>(timeout_s);
  for (;;) {
    const TransferState state = tier.poll(handle);
    if (state != TransferState::PENDING) return state;
    if (Clock::now() > deadline) {
      ADD_FAILURE() << "transfer still pending after " << timeout_s << " s";
      return state;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
}

// Waits until the client's view of the store holds hashes (index updates are asynchronous).
bool eventually_matches(RemoteStoreTier& tier, const std::vector<BlockHash>& hashes, int32_t expected) {
  for (int i = 0; i < 500; ++i) {
    if (tier.match(hashes) == expected) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return false;
}

class KVStoreTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    setenv("UCX_TLS", "tcp", 0);
    setenv("UCX_NET_DEVICES", "lo", 0);
  }

  void start_server(int64_t capacity_blocks, const std::string& disk_dir = "") {
    server_ = std::make_unique<KVStoreServer>(server_options(capacity_blocks, disk_dir), make_ucx, quiet());
  }
  std::unique_ptr<RemoteStoreTier> client(HostKVPool& pool, uint64_t identity = kIdentity) {
    return std::make_unique<RemoteStoreTier>(pool.layout(), client_options(server_->port(), identity), make_ucx, quiet());
  }

  std::unique_ptr<KVStoreServer> server_;
};

TEST_F(KVStoreTest, ASecondInstanceLoadsWhatTheFirstSaved) {
  start_server(32);
  HostKVPool pool_a(KVShape{}, 16, kBlockSize);
  HostKVPool pool_b(KVShape{}, 16, kBlockSize);
  auto a = client(pool_a);
  auto b = client(pool_b);
  const std::vector<BlockId> a_blocks = {3, 7, 1};
  const std::vector<BlockHash> hashes = {101, 102, 103};
  pool_a.fill_sequence(a_blocks, 3 * kBlockSize, 42);
  EXPECT_EQ(finish(*a, a->save(hashes, a_blocks)), TransferState::DONE);
  ASSERT_TRUE(eventually_matches(*b, {101, 102, 103, 104}, 3));

  const std::vector<BlockId> b_blocks = {9, 0, 12};
  const uint64_t untouched = pool_b.checksum_except(b_blocks);
  EXPECT_EQ(finish(*b, b->load(hashes, b_blocks)), TransferState::DONE);
  EXPECT_EQ(pool_b.mismatches_all_layers(b_blocks, 3 * kBlockSize, 42), 0);
  EXPECT_EQ(pool_b.checksum_except(b_blocks), untouched);

  const KVTierStats stats = b->stats().front();
  EXPECT_EQ(stats.loaded_blocks, 3u);
  EXPECT_EQ(stats.load_bytes, 3u * static_cast<uint64_t>(pool_b.layout().bytes_per_block()));
  EXPECT_EQ(a->stats().front().saved_blocks, 3u);
  // Saving what the store holds moves nothing.
  EXPECT_EQ(finish(*b, b->save(hashes, b_blocks)), TransferState::DONE);
  EXPECT_EQ(b->stats().front().saved_blocks, 0u);
  EXPECT_EQ(server_->stats().used_blocks, 3);
  // The client sends UNPIN once its get is final; the store applies it a moment later.
  for (int i = 0; i < 400 && server_->stats().pinned_blocks != 0; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  EXPECT_EQ(server_->stats().pinned_blocks, 0);
  server_->check_invariants();
}

TEST_F(KVStoreTest, BehindAHostTierEverySaveReachesTheStoreToo) {
  start_server(16);
  HostKVPool pool_a(KVShape{}, 8, kBlockSize);
  auto host = std::make_shared<HostTier>(std::make_shared<CpuKVCopyEngine>(pool_a.layout()),
                                         4 * pool_a.layout().bytes_per_block());
  std::shared_ptr<RemoteStoreTier> remote = client(pool_a);
  TieredKVConnector tiered({host, remote}, 5.0);
  pool_a.fill_sequence({0, 1}, 2 * kBlockSize, 5);
  EXPECT_EQ(finish(tiered, tiered.save({21, 22}, {0, 1})), TransferState::DONE);
  EXPECT_EQ(tiered.match({21, 22}), 2);  // the host tier has them
  const std::vector<KVTierStats> stats = tiered.stats();
  ASSERT_EQ(stats.size(), 2u);
  EXPECT_EQ(stats[0].saved_blocks, 2u);
  EXPECT_EQ(stats[1].name, "remote");
  EXPECT_EQ(stats[1].saved_blocks, 2u);

  HostKVPool pool_b(KVShape{}, 8, kBlockSize);  // another instance: only the store has them
  auto b = client(pool_b);
  ASSERT_TRUE(eventually_matches(*b, {21, 22}, 2));
  EXPECT_EQ(finish(*b, b->load({21, 22}, {4, 5})), TransferState::DONE);
  EXPECT_EQ(pool_b.mismatches_all_layers({4, 5}, 2 * kBlockSize, 5), 0);
}

TEST_F(KVStoreTest, EvictsLeastRecentlyUsedBlocksAndMissesThemAfterwards) {
  start_server(4);
  HostKVPool pool(KVShape{}, 16, kBlockSize);
  auto tier = client(pool);
  pool.fill_sequence({0, 1, 2, 3, 4, 5}, 6 * kBlockSize, 7);
  for (BlockHash h = 1; h <= 6; ++h) {
    ASSERT_EQ(finish(*tier, tier->save({h}, {static_cast<BlockId>(h - 1)})), TransferState::DONE);
  }
  ASSERT_TRUE(eventually_matches(*tier, {5, 6}, 2));
  EXPECT_EQ(tier->match({1}), 0);
  EXPECT_EQ(server_->stats().evicted_blocks, 2u);
  EXPECT_EQ(server_->stats().used_blocks, 4);
  server_->check_invariants();
}

TEST_F(KVStoreTest, AnUnknownHashEndsTheLoadFailed) {
  start_server(8);
  HostKVPool pool(KVShape{}, 8, kBlockSize);
  auto tier = client(pool);
  // The view does not hold it, but a caller may ask anyway (a stale view): FAILED, not a hang.
  EXPECT_EQ(finish(*tier, tier->load({999}, {0})), TransferState::FAILED);
  EXPECT_EQ(tier->stats().front().failed_loads, 1u);
  EXPECT_EQ(server_->stats().pin_misses, 1u);
  EXPECT_TRUE(tier->connected());
}

TEST_F(KVStoreTest, ARefusedIdentityOrShapeIsAnErrorOnBothSides) {
  start_server(8);
  HostKVPool pool(KVShape{}, 8, kBlockSize);
  auto first = client(pool);  // fixes the store's identity and shape
  try {
    client(pool, kIdentity + 1);
    FAIL() << "a client of another identity was accepted";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("cache identity mismatch"), std::string::npos) << e.what();
  }
  HostKVPool other_shape(KVShape{3, 2, 6, 2}, 8, kBlockSize);
  try {
    client(other_shape);
    FAIL() << "a client of another block shape was accepted";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("shape mismatch"), std::string::npos) << e.what();
  }
  EXPECT_EQ(server_->stats().refused_clients, 2u);
  EXPECT_TRUE(first->connected());
}

TEST_F(KVStoreTest, GarbageAndOversizedRequestsDoNotHurtTheStore) {
  start_server(8);
  const auto deadline = Clock::now() + std::chrono::seconds(2);
  {  // raw garbage: the connection is dropped
    ControlConnection raw = ControlConnection::connect_to("127.0.0.1", server_->port(), deadline);
    const std::string junk(64, '\x7f');
    ASSERT_EQ(::write(raw.fd(), junk.data(), junk.size()), static_cast<ssize_t>(junk.size()));
    Frame frame;
    std::string error;
    EXPECT_FALSE(raw.receive_one(&frame, deadline, &error));
  }
  {  // a store frame before HELLO, then a well-formed frame of garbage
    ControlConnection raw = ControlConnection::connect_to("127.0.0.1", server_->port(), deadline);
    std::string error;
    ASSERT_TRUE(raw.send(MessageType::STORE, encode_store_request(StoreMessage::PIN, {1, {1}}), deadline, &error));
    Frame frame;
    ASSERT_TRUE(raw.receive_one(&frame, deadline, &error));
    EXPECT_EQ(store_message_type(frame.payload), StoreMessage::ERROR);
  }
  HostKVPool pool(KVShape{}, 32, kBlockSize);
  auto tier = client(pool);
  {  // an oversized PIN from a welcomed client gets ERROR and the connection stays
    ControlConnection raw = said_hello(server_->port(), deadline);
    std::string error;
    Frame frame;
    ASSERT_TRUE(raw.receive_one(&frame, deadline, &error));
    ASSERT_EQ(store_message_type(frame.payload), StoreMessage::WELCOME);
    ASSERT_TRUE(raw.receive_one(&frame, deadline, &error));  // the index snapshot
    ASSERT_EQ(store_message_type(frame.payload), StoreMessage::INDEX);
    std::vector<BlockHash> many(17, 5);
    ASSERT_TRUE(raw.send(MessageType::STORE, encode_store_request(StoreMessage::PIN, {3, many}), deadline, &error));
    ASSERT_TRUE(raw.receive_one(&frame, deadline, &error));
    ASSERT_EQ(store_message_type(frame.payload), StoreMessage::ERROR);
    EXPECT_NE(decode_store_error(frame.payload).message.find("at most"), std::string::npos);
    ASSERT_TRUE(raw.send(MessageType::STORE, encode_store_release(StoreMessage::UNPIN, {77, true}), deadline, &error));
    ASSERT_TRUE(raw.receive_one(&frame, deadline, &error));
    EXPECT_NE(decode_store_error(frame.payload).message.find("unknown request_id"), std::string::npos);
  }
  // The store still serves.
  pool.fill_sequence({0}, kBlockSize, 3);
  EXPECT_EQ(finish(*tier, tier->save({55}, {0})), TransferState::DONE);
  ASSERT_TRUE(eventually_matches(*tier, {55}, 1));
  EXPECT_EQ(finish(*tier, tier->load({55}, {1})), TransferState::DONE);
  EXPECT_EQ(pool.mismatches_all_layers({1}, kBlockSize, 3), 0);
  EXPECT_GE(server_->stats().bad_requests, 3u);
  server_->check_invariants();
}

TEST_F(KVStoreTest, APinNeverReleasedExpiresAfterItsLease) {
  KVStoreServerOptions o = server_options(8);
  o.transfer_timeout_s = 0.5;
  o.pin_lease_s = 1.0;
  server_ = std::make_unique<KVStoreServer>(o, make_ucx, quiet());
  o.pin_lease_s = o.transfer_timeout_s;  // a lease no longer than a read could hand out a slot being read
  EXPECT_THROW(KVStoreServer(o, make_ucx, quiet()), std::invalid_argument);
  HostKVPool pool(KVShape{}, 32, kBlockSize);
  auto tier = client(pool);
  pool.fill_sequence({0}, kBlockSize, 3);
  ASSERT_EQ(finish(*tier, tier->save({55}, {0})), TransferState::DONE);
  ASSERT_TRUE(eventually_matches(*tier, {55}, 1));
  // A client that stays connected, pins and never unpins.
  const auto deadline = Clock::now() + std::chrono::seconds(5);
  ControlConnection raw = said_hello(server_->port(), deadline);
  std::string error;
  Frame frame;
  auto next_reply = [&] {  // skips index updates
    do {
      EXPECT_TRUE(raw.receive_one(&frame, deadline, &error)) << error;
    } while (store_message_type(frame.payload) == StoreMessage::INDEX);
    return store_message_type(frame.payload);
  };
  ASSERT_EQ(next_reply(), StoreMessage::WELCOME);
  ASSERT_TRUE(raw.send(MessageType::STORE, encode_store_request(StoreMessage::PIN, {3, {55}}), deadline, &error));
  ASSERT_EQ(next_reply(), StoreMessage::PINNED);
  ASSERT_EQ(decode_store_slots(frame.payload).slots.size(), 1u);
  EXPECT_EQ(server_->stats().pinned_blocks, 1);
  const auto pinned_at = Clock::now();
  while (server_->stats().expired_pins == 0 && Clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  const double held_s = std::chrono::duration<double>(Clock::now() - pinned_at).count();
  const KVStoreServerStats stats = server_->stats();
  EXPECT_EQ(stats.expired_pins, 1u);
  EXPECT_EQ(stats.expired_pin_blocks, 1u);
  EXPECT_EQ(stats.pinned_blocks, 0);
  EXPECT_GE(held_s, 0.9);
  EXPECT_LT(held_s, 2.5);
  // Its late UNPIN is accepted (no ERROR): the next reply is the answer to the next PIN.
  ASSERT_TRUE(raw.send(MessageType::STORE, encode_store_release(StoreMessage::UNPIN, {3, true}), deadline, &error));
  ASSERT_TRUE(raw.send(MessageType::STORE, encode_store_request(StoreMessage::PIN, {4, {55}}), deadline, &error));
  ASSERT_EQ(next_reply(), StoreMessage::PINNED);
  EXPECT_EQ(decode_store_slots(frame.payload).request_id, 4u);
  EXPECT_EQ(server_->stats().bad_requests, 0u);
  server_->check_invariants();
}

TEST_F(KVStoreTest, AStoreThatGoesAwayIsAMissAndComesBack) {
  start_server(8);
  const int32_t port = server_->port();
  HostKVPool pool(KVShape{}, 8, kBlockSize);
  RemoteStoreOptions o = client_options(port);
  auto tier = std::make_unique<RemoteStoreTier>(pool.layout(), o, make_ucx, quiet());
  pool.fill_sequence({0}, kBlockSize, 1);
  ASSERT_EQ(finish(*tier, tier->save({1}, {0})), TransferState::DONE);
  ASSERT_TRUE(eventually_matches(*tier, {1}, 1));
  server_.reset();  // the store dies
  for (int i = 0; i < 400 && tier->connected(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  EXPECT_FALSE(tier->connected());
  EXPECT_EQ(tier->match({1}), 0);
  EXPECT_EQ(finish(*tier, tier->load({1}, {2}), 3.0), TransferState::FAILED);
  EXPECT_FALSE(tier->stats().front().enabled);
  // A new store on the same port: the tier reconnects by itself (empty store, of course).
  KVStoreServerOptions again = server_options(8);
  again.port = port;
  server_ = std::make_unique<KVStoreServer>(again, make_ucx, quiet());
  EXPECT_TRUE(tier->wait_connected(5.0));
  EXPECT_EQ(finish(*tier, tier->save({1}, {0})), TransferState::DONE);
  EXPECT_TRUE(eventually_matches(*tier, {1}, 1));
}

TEST_F(KVStoreTest, TransfersInFlightWhenTheStoreDiesEndWithinTheTimeout) {
  start_server(64);
  HostKVPool pool(KVShape{}, 64, kBlockSize);
  auto tier = client(pool);
  std::vector<BlockHash> hashes;
  std::vector<BlockId> blocks;
  for (int32_t i = 0; i < 32; ++i) {
    hashes.push_back(1000 + static_cast<BlockHash>(i));
    blocks.push_back(i);
  }
  // A save names at most max_blocks_per_request (16) blocks: a longer one keeps its leading blocks.
  ASSERT_EQ(finish(*tier, tier->save(hashes, blocks)), TransferState::DONE);
  ASSERT_TRUE(eventually_matches(*tier, hashes, 16));
  ASSERT_EQ(finish(*tier, tier->save({hashes.begin() + 16, hashes.end()}, {blocks.begin() + 16, blocks.end()})),
            TransferState::DONE);
  ASSERT_TRUE(eventually_matches(*tier, hashes, 32));
  std::vector<TransferHandle> handles;
  for (int32_t i = 0; i < 8; ++i) {
    std::vector<BlockHash> h(hashes.begin() + 4 * i, hashes.begin() + 4 * i + 4);
    std::vector<BlockId> b = {32 + 4 * i, 33 + 4 * i, 34 + 4 * i, 35 + 4 * i};
    handles.push_back(tier->load(h, b));
  }
  handles.push_back(tier->save({7, 8}, {0, 1}));
  server_.reset();  // the store dies with loads and a save in flight
  const auto start = Clock::now();
  for (TransferHandle handle : handles) EXPECT_NE(finish(*tier, handle, 10.0), TransferState::PENDING);
  EXPECT_LT(std::chrono::duration<double>(Clock::now() - start).count(), 10.0);
  EXPECT_EQ(tier->match(hashes), 0);
}

TEST_F(KVStoreTest, AnInstanceStartsBeforeItsStore) {
  // A free port: bind one and let it go.
  int32_t port = 0;
  {
    ControlListener probe("127.0.0.1", 0);
    port = probe.port();
  }
  HostKVPool pool(KVShape{}, 8, kBlockSize);
  auto tier = std::make_unique<RemoteStoreTier>(pool.layout(), client_options(port), make_ucx, quiet());
  EXPECT_FALSE(tier->connected());
  EXPECT_EQ(finish(*tier, tier->load({1}, {0})), TransferState::FAILED);
  EXPECT_EQ(finish(*tier, tier->save({1}, {0})), TransferState::DONE);  // skipped, nothing to do
  KVStoreServerOptions o = server_options(8);
  o.port = port;
  server_ = std::make_unique<KVStoreServer>(o, make_ucx, quiet());
  EXPECT_TRUE(tier->wait_connected(5.0));
}

TEST_F(KVStoreTest, ADiskBehindTheStoreServesBlocksAfterEvictionAndRestart) {
  const std::string dir = std::filesystem::temp_directory_path() / ("rtpllm_kvstore_test_" + std::to_string(::getpid()));
  std::filesystem::remove_all(dir);
  start_server(3, dir);
  HostKVPool pool(KVShape{}, 8, kBlockSize);
  {
    auto tier = client(pool);
    pool.fill_sequence({0, 1, 2, 3}, 4 * kBlockSize, 9);
    for (BlockHash h = 1; h <= 4; ++h) {
      ASSERT_EQ(finish(*tier, tier->save({h}, {static_cast<BlockId>(h - 1)})), TransferState::DONE);
      server_->flush_disk();
    }
    // Block 1 left memory (3 slots) but is on disk: still matched, and read back for the load.
    EXPECT_EQ(server_->stats().evicted_blocks, 1u);
    ASSERT_TRUE(eventually_matches(*tier, {1, 2, 3, 4}, 4));
    EXPECT_EQ(finish(*tier, tier->load({1, 2}, {5, 6})), TransferState::DONE);
    EXPECT_EQ(pool.mismatches_all_layers({5, 6}, 2 * kBlockSize, 9), 0);
    EXPECT_EQ(server_->stats().disk_reads, 1u);
  }
  server_.reset();
  start_server(3, dir);  // a restarted store finds its blocks on disk
  HostKVPool fresh(KVShape{}, 8, kBlockSize);
  auto tier = client(fresh);
  ASSERT_TRUE(eventually_matches(*tier, {1, 2, 3}, 3));
  EXPECT_EQ(finish(*tier, tier->load({1, 2, 3}, {0, 1, 2})), TransferState::DONE);
  EXPECT_EQ(fresh.mismatches_all_layers({0, 1, 2}, 3 * kBlockSize, 9), 0);
  server_->check_invariants();
  tier.reset();
  server_.reset();
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace rtpllm
