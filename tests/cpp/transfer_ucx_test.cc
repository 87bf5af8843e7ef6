// UcxTransfer end to end: two engines in one process over TCP loopback (UCX_TLS=tcp), host pools
// of different block sizes, bytes compared token by token; bad input and dead peers. Every test
// runs on each DataPath: AUTO (messages over TCP), RMA (UCX's emulated RMA over TCP), MESSAGES and
// DIRECT (in-process peer memory: the engine's DIRECT logic with memcpy for the CUDA copy kernel).
#include <gtest/gtest.h>
#include <poll.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <thread>

#include "host_kv_pool.h"
#include "rtpllm/transfer/transfer_plan.h"
#include "rtpllm/transfer/ucx/ucx_transfer.h"

namespace rtpllm {
namespace {

using testing::HostKVPool;
using testing::KVShape;
using Clock = std::chrono::steady_clock;

constexpr double kTimeout = 2.0;

TransferOptions base_options(const std::string& name, const std::string& identity) {
  TransferOptions o;
  o.name = name;
  o.identity = identity;
  o.timeout_s = kTimeout;
  o.max_blocks_per_transfer = 64;
  return o;
}

// A status that is final within the timeout (plus slack for the loaded CI machine).
TransferStatus finish(KVTransfer& engine, TransferHandle handle) {
  const TransferStatus status = engine.wait(handle, 3 * kTimeout);
  EXPECT_NE(status.state, TransferState::PENDING) << "transfer still pending after the timeout";
  return status;
}

class UcxTransferTest : public ::testing::TestWithParam<DataPath> {
 protected:
  TransferOptions options(const std::string& name, const std::string& identity = "tiny-llama|fp16") const {
    TransferOptions o = base_options(name, identity);
    o.data_path = GetParam();
    return o;
  }

  // DIRECT: in-process peer memory (both engines live in this process); UCX's paths: none.
  std::shared_ptr<PeerMemory> memory() const {
    return GetParam() == DataPath::DIRECT ? std::shared_ptr<PeerMemory>(make_in_process_peer_memory()) : nullptr;
  }

  static void SetUpTestSuite() {
    // CI and this test: TCP over loopback (UCX's choice otherwise); the caller's setting wins.
    setenv("UCX_TLS", "tcp", 0);
    setenv("UCX_NET_DEVICES", "lo", 0);
  }

  // prefill-like (block 8) and decode-like (block 3) pools with the same per-token shape.
  // With b_grants, B requires write grants (a decode instance behind a router).
  void start(int32_t a_block = 8, int32_t b_block = 3, bool b_grants = false) {
    pool_a_ = std::make_unique<HostKVPool>(KVShape{}, 16, a_block);
    pool_b_ = std::make_unique<HostKVPool>(KVShape{}, 48, b_block);
    a_ = std::make_unique<UcxTransfer>(options("prefill"), std::function<void()>{}, memory());
    TransferOptions b_options = options("decode");
    b_options.require_write_grants = b_grants;
    b_ = std::make_unique<UcxTransfer>(b_options, std::function<void()>{}, memory());
    a_->register_kv(pool_a_->layout());
    b_->register_kv(pool_b_->layout());
    peer_ = a_->connect("127.0.0.1", b_->listen_port());
  }

  // B's id for A (B learns of A when A connects).
  PeerId peer_of_b() {
    for (int i = 0; i < 200; ++i) {
      auto peers = b_->peers();
      if (!peers.empty()) return peers.front().id;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    ADD_FAILURE() << "B never saw A";
    return 0;
  }

  std::unique_ptr<HostKVPool> pool_a_, pool_b_;
  std::unique_ptr<UcxTransfer> a_, b_;
  PeerId peer_ = 0;
};

TEST_P(UcxTransferTest, PutMapsBlockSizesAndNotifiesAfterTheBytes) {
  start(8, 3);
  const std::vector<BlockId> src = {7, 2, 11};                 // 19 tokens in blocks of 8
  const std::vector<BlockId> dst = {40, 3, 17, 0, 22, 9, 31};  // ... in blocks of 3
  pool_a_->fill_sequence(src, 19, 5);
  const uint64_t untouched = pool_b_->checksum_except(dst);
  TransferRequest request{1234, src, dst, 19, -1, true};
  const TransferStatus status = finish(*a_, a_->put(peer_, request));
  ASSERT_EQ(status.state, TransferState::DONE) << status.error;
  const auto notices = b_->take_notices(kTimeout);
  ASSERT_EQ(notices.size(), 1u);
  EXPECT_EQ(notices[0].request_id, 1234u);
  EXPECT_EQ(notices[0].layer, -1);
  EXPECT_EQ(notices[0].blocks, dst);
  EXPECT_EQ(notices[0].num_tokens, 19);
  EXPECT_EQ(pool_b_->mismatches_all_layers(dst, 19, 5), 0);
  EXPECT_EQ(pool_b_->checksum_except(dst), untouched);
  const TransferStats stats = a_->stats();
  EXPECT_EQ(stats.puts, 1u);
  EXPECT_EQ(stats.bytes_put, 19u * 20u * 2u * 3u);
  EXPECT_THROW(a_->poll(1), std::invalid_argument);  // reported once, then forgotten
}

// notice_fd() lets a caller wait for notices and its own sockets in one poll (the decode engine).
TEST_P(UcxTransferTest, NoticeFdIsReadableExactlyWhileNoticesWait) {
  start(8, 8);
  const int fd = b_->notice_fd();
  ASSERT_GE(fd, 0);
  pollfd ready{fd, POLLIN, 0};
  EXPECT_EQ(::poll(&ready, 1, 0), 0);
  const std::vector<BlockId> src = {1}, dst = {2};
  ASSERT_EQ(finish(*a_, a_->put(peer_, {5, src, dst, 8, -1, true})).state, TransferState::DONE);
  ready.revents = 0;
  ASSERT_EQ(::poll(&ready, 1, static_cast<int>(kTimeout * 1000)), 1);  // the notice follows the bytes
  EXPECT_EQ(b_->take_notices(0).size(), 1u);
  ready.revents = 0;
  EXPECT_EQ(::poll(&ready, 1, 0), 0);  // taken: quiet until the next notice
}

TEST_P(UcxTransferTest, LayerByLayerPushesOnlyThatLayer) {
  start(8, 8);
  const std::vector<BlockId> src = {1, 4}, dst = {9, 2};
  pool_a_->fill_sequence(src, 13, 9);
  for (int32_t layer = 0; layer < 3; ++layer) {
    const TransferStatus status = finish(*a_, a_->put(peer_, {77, src, dst, 13, layer, true}));
    ASSERT_EQ(status.state, TransferState::DONE) << status.error;
    const auto notices = b_->take_notices(kTimeout);
    ASSERT_EQ(notices.size(), 1u);
    EXPECT_EQ(notices[0].layer, layer);
    for (int32_t l = 0; l < 3; ++l) {
      const int64_t expected_bad = l <= layer ? 0 : 13;
      EXPECT_EQ(pool_b_->mismatches(dst, 13, 9, l, 0), expected_bad) << "after layer " << layer << ", layer " << l;
      EXPECT_EQ(pool_b_->mismatches(dst, 13, 9, l, 1), expected_bad);
    }
  }
}

TEST_P(UcxTransferTest, GetReadsBlocksFromABlockMajorStore) {
  // A store holds whole blocks in one host buffer; a client gets them into its paged pool.
  const KVShape shape{};
  const int32_t block = 4, blocks = 9;
  std::vector<uint8_t> store(static_cast<size_t>(blocks) * 2 * shape.num_layers * block * 20);
  const KVLayout store_layout = make_block_major_layout(reinterpret_cast<uint64_t>(store.data()), MemoryKind::HOST,
                                                        blocks, shape.num_layers, block, shape.num_kv_heads,
                                                        shape.head_dim, shape.element_bytes);
  // Fill the store's blocks 8, 0, 5 through a pool view of the same memory layout.
  HostKVPool client(shape, 6, block);
  UcxTransfer store_engine(options("store"), {}, memory());
  UcxTransfer client_engine(options("client"), {}, memory());
  store_engine.register_kv(store_layout);
  client_engine.register_kv(client.layout());
  const PeerId store_peer = client_engine.connect("127.0.0.1", store_engine.listen_port());
  // Put a known sequence into the store, then read it back into other blocks.
  client.fill_sequence({0, 1, 2}, 11, 3);
  ASSERT_EQ(finish(client_engine, client_engine.put(store_peer, {1, {0, 1, 2}, {8, 0, 5}, 11, -1, false})).state,
            TransferState::DONE);
  const std::vector<BlockId> local = {5, 3, 4};
  const TransferStatus status = finish(client_engine, client_engine.get(store_peer, {2, local, {8, 0, 5}, 11, -1, false}));
  ASSERT_EQ(status.state, TransferState::DONE) << status.error;
  EXPECT_EQ(client.mismatches_all_layers(local, 11, 3), 0);
  EXPECT_TRUE(store_engine.take_notices(0).empty());  // notify=false
}

TEST_P(UcxTransferTest, BadInputThrowsAndLeavesTheEngineWorking) {
  start(8, 3);
  const std::vector<BlockId> src = {0, 1}, dst = {0, 1, 2, 3, 4, 5};
  EXPECT_THROW(a_->put(999, {1, src, dst, 16, -1, true}), std::invalid_argument);  // unknown peer
  EXPECT_THROW(a_->put(peer_, {1, {0, 99}, dst, 16, -1, true}), std::invalid_argument);  // local id out of range
  EXPECT_THROW(a_->put(peer_, {1, src, {0, 1, 2, 3, 4, 48}, 16, -1, true}), std::invalid_argument);  // remote id
  EXPECT_THROW(a_->put(peer_, {1, src, {0, 1, 2}, 16, -1, true}), std::invalid_argument);  // too few remote blocks
  EXPECT_THROW(a_->put(peer_, {1, src, dst, 16, 3, true}), std::invalid_argument);         // layer
  EXPECT_THROW(a_->put(peer_, {1, src, dst, -5, -1, true}), std::invalid_argument);        // num_tokens
  std::vector<BlockId> oversized(65, 0);
  try {
    a_->put(peer_, {1, oversized, dst, 16, -1, true});
    ADD_FAILURE() << "oversized block list accepted";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("local_blocks"), std::string::npos) << e.what();
  }
  EXPECT_THROW(a_->poll(12345), std::invalid_argument);
  EXPECT_THROW(a_->register_kv(pool_a_->layout()), std::runtime_error);  // twice
  // Nothing was queued and the engine still works.
  pool_a_->fill_sequence(src, 16, 8);
  ASSERT_EQ(finish(*a_, a_->put(peer_, {2, src, dst, 16, -1, true})).state, TransferState::DONE);
  EXPECT_EQ(pool_b_->mismatches_all_layers(dst, 16, 8), 0);
  EXPECT_EQ(a_->stats().failed, 0u);
}

TEST_P(UcxTransferTest, WriteGrantsBoundWhatAPutMayWrite) {
  start(8, 8, /*b_grants=*/true);
  const std::vector<BlockId> src = {1, 4}, granted = {9, 2};
  pool_a_->fill_sequence(src, 13, 3);
  auto expect_refused = [&](uint64_t request_id, const std::vector<BlockId>& dst, const std::string& why) {
    const uint64_t before = pool_b_->checksum_except({});
    const TransferStatus status = finish(*a_, a_->put(peer_, {request_id, src, dst, 13, -1, true}));
    EXPECT_EQ(status.state, TransferState::FAILED);
    EXPECT_NE(status.error.find(why), std::string::npos) << status.error;
    EXPECT_EQ(pool_b_->checksum_except({}), before) << "a refused put wrote into B's pool";
  };
  expect_refused(5, granted, "no write grant for request 5");  // never granted
  b_->grant_writes(5, granted);
  expect_refused(5, {9, 3}, "block 3 is outside the write grant");  // another request's block
  expect_refused(6, granted, "no write grant for request 6");       // another request's id
  ASSERT_EQ(finish(*a_, a_->put(peer_, {5, src, granted, 13, 0, true})).state, TransferState::DONE);
  ASSERT_EQ(finish(*a_, a_->put(peer_, {5, src, granted, 13, 1, true})).state, TransferState::DONE);
  EXPECT_EQ(pool_b_->mismatches(granted, 13, 3, 0, 0), 0);
  b_->revoke_writes(5);
  expect_refused(5, granted, "no write grant for request 5");  // a stale list after the request ended
  EXPECT_EQ(b_->take_notices(kTimeout).size(), 2u);  // refused puts sent no notice
  // Refusals cost no connection; a peer that requires no grants is written without asking.
  EXPECT_EQ(a_->peers().front().state, PeerState::CONNECTED);
  EXPECT_THROW(b_->grant_writes(7, {48}), std::invalid_argument);
}

TEST_P(UcxTransferTest, MismatchedPeersAreRefused) {
  HostKVPool pool(KVShape{}, 4, 8);
  HostKVPool other_head_dim(KVShape{3, 2, 7, 2}, 4, 8);  // another head count connects (head slices)
  UcxTransfer server(options("server"), {}, memory());
  server.register_kv(pool.layout());
  UcxTransfer wrong_shape(options("client"), {}, memory());
  wrong_shape.register_kv(other_head_dim.layout());
  EXPECT_THROW(wrong_shape.connect("127.0.0.1", server.listen_port()), std::runtime_error);
  UcxTransfer wrong_model(options("client", "another-model|fp16"), {}, memory());
  wrong_model.register_kv(pool.layout());
  try {
    wrong_model.connect("127.0.0.1", server.listen_port());
    ADD_FAILURE() << "identity mismatch accepted";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("identity"), std::string::npos) << e.what();
  }
  UcxTransfer unregistered(options("client"), {}, memory());
  EXPECT_THROW(unregistered.connect("127.0.0.1", server.listen_port()), std::runtime_error);
  EXPECT_TRUE(server.peers().empty());
}

TEST_P(UcxTransferTest, UnreachablePeerFailsFast) {
  HostKVPool pool(KVShape{}, 4, 8);
  UcxTransfer engine(options("lonely"), {}, memory());
  engine.register_kv(pool.layout());
  int32_t closed_port = 0;
  {
    UcxTransfer gone(options("gone"), {}, memory());
    closed_port = gone.listen_port();
  }
  const auto start = Clock::now();
  EXPECT_THROW(engine.connect("127.0.0.1", closed_port), std::runtime_error);
  EXPECT_LT(std::chrono::duration<double>(Clock::now() - start).count(), kTimeout + 1);
}

TEST_P(UcxTransferTest, PeerThatGoesAwayIsAnErrorWithinTheTimeout) {
  start(8, 3);
  ASSERT_NE(peer_of_b(), 0u);  // B accepted A before it goes away
  b_.reset();                   // the decode side goes away (its sockets close)
  const auto start = Clock::now();
  PeerState state = PeerState::CONNECTED;
  while (Clock::now() - start < std::chrono::duration<double>(kTimeout + 1)) {
    state = a_->peers().front().state;
    if (state == PeerState::FAILED) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ASSERT_EQ(state, PeerState::FAILED);
  EXPECT_FALSE(a_->peers().front().error.empty());
  EXPECT_THROW(a_->put(peer_, {1, {0}, {0, 1, 2}, 8, -1, true}), std::runtime_error);
  EXPECT_EQ(a_->stats().peers_failed, 1u);
}

TEST_P(UcxTransferTest, InFlightTransfersFailWhenThePeerDisconnects) {
  start(8, 3);
  // Queue several puts and close the connection at once: each ends, DONE or FAILED, never PENDING.
  std::vector<TransferHandle> handles;
  for (int i = 0; i < 8; ++i) handles.push_back(a_->put(peer_, {static_cast<uint64_t>(i), {0, 1}, {0, 1, 2, 3, 4, 5}, 16, -1, true}));
  const PeerId a_seen_by_b = peer_of_b();
  b_->disconnect(a_seen_by_b);
  for (TransferHandle h : handles) finish(*a_, h);
  // A sees B's close within the timeout; further puts are refused.
  const auto start = Clock::now();
  while (a_->peers().front().state == PeerState::CONNECTED &&
         Clock::now() - start < std::chrono::duration<double>(kTimeout + 1)) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_EQ(a_->peers().front().state, PeerState::FAILED);
  EXPECT_THROW(a_->put(peer_, {1, {0}, {0, 1, 2}, 8, -1, true}), std::runtime_error);
}

TEST_P(UcxTransferTest, PeersReportTheDataPathTheyUse) {
  start(8, 3);
  ASSERT_NE(peer_of_b(), 0u);
  // Over TCP nothing does RMA in hardware: AUTO sends messages. B chose by its own options.
  const DataPath expected = GetParam() == DataPath::AUTO ? DataPath::MESSAGES : GetParam();
  EXPECT_EQ(a_->peers().front().data_path, expected);
  EXPECT_EQ(b_->peers().front().data_path, expected);
}

// Copies of whole runs of blocks larger than one message (256 KiB) arrive intact, layer by layer
// with one notice at the end, and come back by get.
TEST_P(UcxTransferTest, LargeCopiesArriveWholeAndComeBack) {
  const KVShape shape{2, 8, 128, 2};  // 2 KiB per token and plane: a block of 16 tokens is 32 KiB
  HostKVPool src_pool(shape, 64, 16), dst_pool(shape, 64, 16);
  UcxTransfer a(options("prefill"), {}, memory()), b(options("decode"), {}, memory());
  a.register_kv(src_pool.layout());
  b.register_kv(dst_pool.layout());
  const PeerId peer = a.connect("127.0.0.1", b.listen_port());
  std::vector<BlockId> src, dst, back;
  for (BlockId i = 0; i < 40; ++i) {
    src.push_back(i);         // consecutive: one copy of 40 blocks (1.25 MiB) per plane
    dst.push_back(63 - i);    // reversed: one copy per block
    back.push_back(i + 24);   // overlaps src: the get overwrites what was sent
  }
  const int64_t tokens = 40 * 16 - 5;
  src_pool.fill_sequence(src, tokens, 21);
  const uint64_t untouched = dst_pool.checksum_except(dst);
  for (int32_t layer = 0; layer < shape.num_layers; ++layer) {
    const bool last = layer + 1 == shape.num_layers;
    ASSERT_EQ(finish(a, a.put(peer, {3, src, dst, tokens, layer, last})).state, TransferState::DONE);
  }
  const auto notices = b.take_notices(kTimeout);
  ASSERT_EQ(notices.size(), 1u);
  EXPECT_EQ(notices[0].layer, shape.num_layers - 1);
  EXPECT_EQ(dst_pool.mismatches_all_layers(dst, tokens, 21), 0);
  EXPECT_EQ(dst_pool.checksum_except(dst), untouched);
  const TransferStatus got = finish(a, a.get(peer, {4, back, dst, tokens, -1, false}));
  ASSERT_EQ(got.state, TransferState::DONE) << got.error;
  EXPECT_EQ(src_pool.mismatches_all_layers(back, tokens, 21), 0);
  EXPECT_EQ(a.stats().bytes_got, static_cast<uint64_t>(tokens) * 2048 * 2 * shape.num_layers);
}

// Tensor parallelism of different sizes: a 4-head engine (prefill TP=1) puts heads [0, 2) into one
// 2-head engine and [2, 4) into another (decode TP=2), block sizes 8 and 3; a get brings one half
// back into a third 4-head pool's upper heads. A slice outside either layout is refused, naming
// the request's field.
TEST_P(UcxTransferTest, HeadSlicesMoveBetweenDifferentHeadCounts) {
  const KVShape four{3, 4, 5, 2}, two{3, 2, 5, 2};
  const int64_t head_bytes = 5 * 2, tokens = 19;
  HostKVPool whole(four, 16, 8), half0(two, 48, 3), half1(two, 48, 3), back(four, 16, 8);
  UcxTransfer a(options("prefill"), {}, memory()), b0(options("decode-rank0"), {}, memory()),
      b1(options("decode-rank1"), {}, memory());
  a.register_kv(whole.layout());
  b0.register_kv(half0.layout());
  b1.register_kv(half1.layout());
  const std::vector<BlockId> src = {7, 2, 11}, dst = {40, 3, 17, 0, 22, 9, 31};
  whole.fill_sequence(src, tokens, 9);
  const uint64_t untouched = half1.checksum_except(dst);
  const PeerId p0 = a.connect("127.0.0.1", b0.listen_port()), p1 = a.connect("127.0.0.1", b1.listen_port());
  TransferRequest request{77, src, dst, tokens, -1, true};
  request.num_heads = 2;
  ASSERT_EQ(finish(a, a.put(p0, request)).state, TransferState::DONE);
  request.local_head_offset = 2;
  ASSERT_EQ(finish(a, a.put(p1, request)).state, TransferState::DONE);
  ASSERT_EQ(b1.take_notices(kTimeout).size(), 1u);
  EXPECT_EQ(half1.checksum_except(dst), untouched);
  auto heads = [&](HostKVPool& pool, const std::vector<BlockId>& blocks, int32_t l, int plane, int64_t t, int32_t first) {
    const uint8_t* p = pool.token(l, plane, blocks, t) + first * head_bytes;
    return std::vector<uint8_t>(p, p + 2 * head_bytes);
  };
  for (int32_t l = 0; l < four.num_layers; ++l) {
    for (int plane = 0; plane < 2; ++plane) {
      for (int64_t t = 0; t < tokens; ++t) {
        ASSERT_EQ(heads(half0, dst, l, plane, t, 0), heads(whole, src, l, plane, t, 0)) << l << plane << t;
        ASSERT_EQ(heads(half1, dst, l, plane, t, 0), heads(whole, src, l, plane, t, 2)) << l << plane << t;
      }
    }
  }
  EXPECT_EQ(a.stats().bytes_put, static_cast<uint64_t>(tokens) * 2 * head_bytes * 2 * four.num_layers * 2);

  UcxTransfer c(options("reader"), {}, memory());
  c.register_kv(back.layout());
  const PeerId from1 = c.connect("127.0.0.1", b1.listen_port());
  TransferRequest get{78, src, dst, tokens, -1, false};
  get.num_heads = 2;
  get.local_head_offset = 2;
  ASSERT_EQ(finish(c, c.get(from1, get)).state, TransferState::DONE);
  for (int64_t t = 0; t < tokens; ++t) ASSERT_EQ(heads(back, src, 1, 1, t, 2), heads(whole, src, 1, 1, t, 2)) << t;

  request.local_head_offset = 3;  // heads [3, 5) of 4
  try {
    a.put(p1, request);
    ADD_FAILURE() << "a slice outside the local heads was accepted";
  } catch (const std::invalid_argument& e) {
    EXPECT_EQ(std::string(e.what()).rfind("local_head_offset", 0), 0u) << e.what();
  }
  request.local_head_offset = 0;
  request.remote_head_offset = 1;  // heads [1, 3) of the peer's 2
  EXPECT_THROW(a.put(p1, request), std::invalid_argument);
  request.num_heads = -1;  // every head, but 4 against 2
  request.remote_head_offset = 0;
  EXPECT_THROW(a.put(p1, request), std::invalid_argument);
}

// Tens of thousands of small copies (a head slice of 12000 tokens, 3 layers: 72000 copies of 20
// bytes, more requests than a target queues unanswered, kMaxQueuedReplies, were they sent at
// once): a put packs them into scatter messages, a get goes out window by window (kGetWindow), and
// every slice lands where it belongs. (kv_transfer_bench --head-split 2 is where a get without
// the window failed its peer: "too many gets waiting for replies".)
TEST_P(UcxTransferTest, ThousandsOfSmallCopiesGoThereAndBack) {
  const KVShape four{3, 4, 5, 2};
  const int64_t head_bytes = 5 * 2, tokens = 12000, blocks = tokens / 8;
  HostKVPool a_pool(four, 2 * blocks, 8), b_pool(four, blocks, 8);
  TransferOptions a_options = options("prefill"), b_options = options("decode");
  a_options.max_blocks_per_transfer = b_options.max_blocks_per_transfer = static_cast<int32_t>(blocks);
  UcxTransfer a(a_options, {}, memory()), b(b_options, {}, memory());
  a.register_kv(a_pool.layout());
  b.register_kv(b_pool.layout());
  const PeerId peer = a.connect("127.0.0.1", b.listen_port());
  std::vector<BlockId> src, dst, back;
  for (BlockId i = 0; i < blocks; ++i) {
    src.push_back(i);
    dst.push_back(static_cast<BlockId>(blocks - 1 - i));
    back.push_back(static_cast<BlockId>(blocks + i));  // apart from src: the get must not overwrite what the put sent
  }
  a_pool.fill_sequence(src, tokens, 3);
  TransferRequest put{9, src, dst, tokens, -1, true};
  put.num_heads = 2;
  put.local_head_offset = 1;
  put.remote_head_offset = 2;
  ASSERT_EQ(finish(a, a.put(peer, put)).state, TransferState::DONE);
  ASSERT_EQ(b.take_notices(kTimeout).size(), 1u);
  TransferRequest get{10, back, dst, tokens, -1, false};
  get.num_heads = 2;
  get.remote_head_offset = 2;  // the heads the put wrote, into heads [0, 2) here
  const TransferStatus got = finish(a, a.get(peer, get));
  ASSERT_EQ(got.state, TransferState::DONE) << got.error;
  for (int32_t l = 0; l < four.num_layers; ++l) {
    for (int plane = 0; plane < 2; ++plane) {
      for (int64_t t = 0; t < tokens; ++t) {
        const uint8_t* sent = a_pool.token(l, plane, src, t) + head_bytes;  // heads [1, 3) of the source
        const uint8_t* landed = b_pool.token(l, plane, dst, t) + 2 * head_bytes;
        const uint8_t* returned = a_pool.token(l, plane, back, t);
        ASSERT_EQ(std::memcmp(sent, landed, 2 * head_bytes), 0) << l << " " << plane << " " << t;
        ASSERT_EQ(std::memcmp(sent, returned, 2 * head_bytes), 0) << l << " " << plane << " " << t;
      }
    }
  }
}

std::string path_name(const ::testing::TestParamInfo<DataPath>& info) {
  switch (info.param) {
    case DataPath::AUTO: return "Auto";
    case DataPath::RMA: return "Rma";
    case DataPath::MESSAGES: return "Messages";
    case DataPath::DIRECT: return "Direct";
  }
  return "Unknown";
}

INSTANTIATE_TEST_SUITE_P(DataPaths, UcxTransferTest,
                         ::testing::Values(DataPath::AUTO, DataPath::RMA, DataPath::MESSAGES, DataPath::DIRECT),
                         path_name);

}  // namespace
}  // namespace rtpllm
