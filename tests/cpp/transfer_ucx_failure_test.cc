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

TEST_F(UcxTransferFailureTest, HungPeerFailsItsTransferAndItselfWithinTheTimeout) {
  HostKVPool pool(KVShape{}, 8, 4);
  HostKVPool hung_pool(KVShape{}, 8, 4);
  UcxTransfer engine(options("engine"));
  engine.register_kv(pool.layout());

  // The hung peer: a real worker and registration, a completed handshake, then nothing.
  UcxWorker worker;
  UcxRegistration registration(worker.context(), hung_pool.layout());
  PeerDescriptor self;
  self.name = "hung";
  self.identity = "tiny";
  self.worker_address = worker.address();
  self.layout = hung_pool.layout();
  self.regions = registration.regions();
  const auto deadline = Clock::now() + std::chrono::seconds(5);
  ControlConnection connection = ControlConnection::connect_to("127.0.0.1", engine.listen_port(), deadline);
  std::string error;
  Frame reply;
  ASSERT_TRUE(connection.send(MessageType::HELLO, encode_descriptor(self), deadline, &error)) << error;
  ASSERT_TRUE(connection.receive_one(&reply, deadline, &error)) << error;
  ASSERT_EQ(reply.type, MessageType::HELLO);

  PeerId peer = 0;
  for (int i = 0; i < 200 && peer == 0; ++i) {
    if (!engine.peers().empty()) peer = engine.peers().front().id;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
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
