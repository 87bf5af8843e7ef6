// UcxTransfer against peers that misbehave: one that handshakes and then goes silent (a hung
// process: its sockets stay open, its UCX worker never progresses), and garbage on the control port.
#include <gtest/gtest.h>

#include <chrono>
#include <cstdlib>
#include <thread>

#include "host_kv_pool.h"
#include "rtpllm/transfer/control_channel.h"
#include "rtpllm/transfer/ucx/ucx_memory.h"
#include "rtpllm/transfer/ucx/ucx_transfer.h"

namespace rtpllm {
namespace {

using testing::HostKVPool;
using testing::KVShape;
using Clock = std::chrono::steady_clock;

constexpr double kTimeout = 1.0;

TransferOptions options(const std::string& name) {
  TransferOptions o;
  o.name = name;
  o.identity = "tiny";
  o.timeout_s = kTimeout;
  return o;
}

double seconds_since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

class UcxTransferFailureTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    setenv("UCX_TLS", "tcp", 0);
    setenv("UCX_NET_DEVICES", "lo", 0);
  }
};

// A peer built from the engine's parts: a real worker and registration and a completed handshake,
// after which the test decides what (if anything) it sends.
struct FakePeer {
  explicit FakePeer(int32_t port)
      : pool(KVShape{}, 8, 4), registration(worker.context(), pool.layout()),
        connection(ControlConnection::connect_to("127.0.0.1", port, Clock::now() + std::chrono::seconds(5))) {
    PeerDescriptor self;
    self.name = "fake";
    self.identity = "tiny";
    self.worker_address = worker.address();
    self.layout = pool.layout();
    self.regions = registration.regions();
    self.connection_key = 0x5eed;
    const auto deadline = Clock::now() + std::chrono::seconds(5);
    std::string error;
    Frame reply;
    EXPECT_TRUE(connection.send(MessageType::HELLO, encode_descriptor(self), deadline, &error)) << error;
    EXPECT_TRUE(connection.receive_one(&reply, deadline, &error)) << error;
    EXPECT_EQ(reply.type, MessageType::HELLO);
  }
  HostKVPool pool;
  UcxWorker worker;
  UcxRegistration registration;
  ControlConnection connection;
};

PeerId first_peer(UcxTransfer& engine) {
  for (int i = 0; i < 200; ++i) {
    if (!engine.peers().empty()) return engine.peers().front().id;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return 0;
}

TEST_F(UcxTransferFailureTest, HungPeerFailsItsTransferAndItselfWithinTheTimeout) {
  HostKVPool pool(KVShape{}, 8, 4);
  UcxTransfer engine(options("engine"));
  engine.register_kv(pool.layout());
  FakePeer hung(engine.listen_port());  // handshakes, then never progresses nor pings
  const PeerId peer = first_peer(engine);
  ASSERT_NE(peer, 0u);
  const auto start = Clock::now();
  std::vector<BlockId> blocks = {0, 1, 2, 3, 4, 5, 6, 7};
  const TransferHandle handle = engine.put(peer, {9, blocks, blocks, 32, -1, true});
  const TransferStatus status = engine.wait(handle, 4 * kTimeout);
  EXPECT_EQ(status.state, TransferState::FAILED);
  EXPECT_FALSE(status.error.empty());
  EXPECT_LT(seconds_since(start), 2.5 * kTimeout);
  EXPECT_EQ(engine.peers().front().state, PeerState::FAILED);
  EXPECT_EQ(engine.stats().failed, 1u);
}

TEST_F(UcxTransferFailureTest, NoticeNamingForeignBlocksFailsThePeer) {
  HostKVPool pool(KVShape{}, 8, 4);
  UcxTransfer engine(options("engine"));
  engine.register_kv(pool.layout());
  FakePeer liar(engine.listen_port());
  ASSERT_NE(first_peer(engine), 0u);
  std::string error;
  ASSERT_TRUE(liar.connection.send(MessageType::NOTICE, encode_notice({1, -1, 4, {8}}),
                                   Clock::now() + std::chrono::seconds(1), &error));
  const auto start = Clock::now();
  while (engine.peers().front().state == PeerState::CONNECTED && seconds_since(start) < 2 * kTimeout) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  EXPECT_EQ(engine.peers().front().state, PeerState::FAILED);
  EXPECT_NE(engine.peers().front().error.find("out of range"), std::string::npos) << engine.peers().front().error;
  EXPECT_TRUE(engine.take_notices(0).empty());
}

TEST_F(UcxTransferFailureTest, GarbageOnTheControlPortIsDroppedAndTheEngineStillServes) {
  HostKVPool pool(KVShape{}, 8, 4);
  UcxTransfer engine(options("engine"));
  engine.register_kv(pool.layout());
  const auto deadline = Clock::now() + std::chrono::seconds(5);
  {
    ControlConnection garbage = ControlConnection::connect_to("127.0.0.1", engine.listen_port(), deadline);
    std::string error;
    // A HELLO whose payload is not a descriptor, then a frame with an unknown type.
    ASSERT_TRUE(garbage.send(MessageType::HELLO, "not a descriptor", deadline, &error));
    Frame reply;
    ASSERT_TRUE(garbage.receive_one(&reply, deadline, &error)) << error;
    EXPECT_EQ(reply.type, MessageType::REFUSE);
    EXPECT_NE(reply.payload.find("malformed"), std::string::npos) << reply.payload;
  }
  EXPECT_TRUE(engine.peers().empty());
  UcxTransfer client(options("client"));
  HostKVPool client_pool(KVShape{}, 8, 4);
  client.register_kv(client_pool.layout());
  const PeerId peer = client.connect("127.0.0.1", engine.listen_port());
  client_pool.fill_sequence({3}, 4, 1);
  EXPECT_EQ(client.wait(client.put(peer, {1, {3}, {5}, 4, -1, true}), 5).state, TransferState::DONE);
  EXPECT_EQ(pool.mismatches_all_layers({5}, 4, 1), 0);
}

}  // namespace
}  // namespace rtpllm
