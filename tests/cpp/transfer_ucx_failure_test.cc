// UcxTransfer against peers that misbehave: one that handshakes and then goes silent (a hung
// process: its sockets stay open, its UCX worker never progresses), garbage on the control port,
// and forged messages of the MESSAGES data path (ucx_message_wire.h) that would write outside the
// engine's memory or past what a put announced.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <functional>
#include <thread>

#include "host_kv_pool.h"
#include "rtpllm/transfer/control_channel.h"
#include "rtpllm/transfer/ucx/ucx_memory.h"
#include "rtpllm/transfer/ucx/ucx_message_wire.h"
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
    self.connection_key = kKey;
    const auto deadline = Clock::now() + std::chrono::seconds(5);
    std::string error;
    Frame reply;
    EXPECT_TRUE(connection.send(MessageType::HELLO, encode_descriptor(self), deadline, &error)) << error;
    EXPECT_TRUE(connection.receive_one(&reply, deadline, &error)) << error;
    EXPECT_EQ(reply.type, MessageType::HELLO);
    if (reply.type == MessageType::HELLO) engine = decode_descriptor(reply.payload);
  }
  ~FakePeer() {
    if (ep == nullptr) return;
    ucp_request_param_t param{};
    param.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
    param.flags = UCP_EP_CLOSE_FLAG_FORCE;
    ucs_status_ptr_t request = ucp_ep_close_nbx(ep, &param);
    if (UCS_PTR_IS_PTR(request)) wait(request);
  }

  // One active message to the engine, as the MESSAGES path sends them, progressed until sent.
  template <typename Header>
  void send_message(unsigned id, const Header& header, const void* data, size_t bytes) {
    if (ep == nullptr) {
      ucp_ep_params_t params{};
      params.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE;
      params.err_mode = UCP_ERR_HANDLING_MODE_PEER;  // as the engine's endpoints: UCX requires both sides alike
      params.address = reinterpret_cast<const ucp_address_t*>(engine.worker_address.data());
      check_ucs(ucp_ep_create(worker.worker(), &params, &ep), "ucp_ep_create");
    }
    ucp_request_param_t param{};
    param.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
    param.flags = UCP_AM_SEND_FLAG_EAGER | UCP_AM_SEND_FLAG_COPY_HEADER;
    ucs_status_ptr_t request = ucp_am_send_nbx(ep, id, &header, sizeof(header), data, bytes, &param);
    ASSERT_FALSE(UCS_PTR_IS_ERR(request));
    wait(request);
    // A send can complete locally while the endpoint still waits for its wireup: only a flush,
    // progressed here, makes sure the message left.
    ucp_request_param_t flush{};
    request = ucp_ep_flush_nbx(ep, &flush);
    ASSERT_FALSE(UCS_PTR_IS_ERR(request));
    wait(request);
  }

  void wait(ucs_status_ptr_t request) {
    if (request == nullptr) return;
    while (ucp_request_check_status(request) == UCS_INPROGRESS) ucp_worker_progress(worker.worker());
    ucp_request_free(request);
  }

  static constexpr uint64_t kKey = 0x5eed;  // the connection key its HELLO sent
  HostKVPool pool;
  UcxWorker worker;
  UcxRegistration registration;
  ControlConnection connection;
  PeerDescriptor engine;  // the engine's HELLO
  ucp_ep_h ep = nullptr;
};

PeerId first_peer(UcxTransfer& engine) {
  for (int i = 0; i < 200; ++i) {
    if (!engine.peers().empty()) return engine.peers().front().id;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return 0;
}

// Waits until the engine's first peer is FAILED; returns its error.
std::string failure_of_first_peer(UcxTransfer& engine) {
  const auto start = Clock::now();
  while (engine.peers().front().state == PeerState::CONNECTED && seconds_since(start) < 3 * kTimeout) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  EXPECT_EQ(engine.peers().front().state, PeerState::FAILED);
  return engine.peers().front().error;
}

// A fresh engine and a forger connected to it; `forge` sends the forger's messages, given the
// engine's pool layout and memory the engine never registered. The engine must fail the forger
// with an error containing `error`, and nothing may land in its pool or in that memory.
void expect_forgery_fails(const std::string& name, const std::string& error,
                          const std::function<void(FakePeer&, const KVLayout&, uint64_t outside)>& forge) {
  std::vector<uint8_t> unregistered(4096, 0);
  HostKVPool pool(KVShape{}, 8, 4);
  UcxTransfer engine(options("engine"));
  engine.register_kv(pool.layout());
  FakePeer forger(engine.listen_port());
  ASSERT_NE(first_peer(engine), 0u);
  const uint64_t before = pool.checksum_except({});
  forge(forger, pool.layout(), reinterpret_cast<uint64_t>(unregistered.data()));
  const std::string got = failure_of_first_peer(engine);
  EXPECT_NE(got.find(error), std::string::npos) << name << ": " << got;
  EXPECT_EQ(pool.checksum_except({}), before) << name;
  EXPECT_EQ(std::count(unregistered.begin(), unregistered.end(), 0xab), 0) << name;
  EXPECT_TRUE(engine.take_notices(0).empty()) << name;
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
  expect_forgery_fails("a notice of block 8 in a pool of 8", "out of range",
                       [](FakePeer& liar, const KVLayout&, uint64_t) {
                         std::string error;
                         ASSERT_TRUE(liar.connection.send(MessageType::NOTICE, encode_notice({1, -1, 4, {8}}),
                                                          Clock::now() + std::chrono::seconds(1), &error))
                             << error;
                       });
}

// The engine's memory is checked, not the forger's word: a put message aimed outside the engine's
// registration, or carrying more than its put announced, fails the peer and writes nothing there.
TEST_F(UcxTransferFailureTest, ForgedPutMessagesFailThePeerAndWriteNothingOutside) {
  struct Case {
    const char* name;
    bool outside;        // aimed at memory the engine never registered (else its own first block)
    uint64_t announced;  // a PUT_DONE before the data announcing this size (0: none)
    const char* error;
  };
  const Case cases[] = {{"outside the pool", true, 0, "outside this engine's KV memory"},
                        {"past what the put announced", false, 8, "more data than put 1 announced"}};
  for (const Case& c : cases) {
    expect_forgery_fails(c.name, c.error, [&](FakePeer& forger, const KVLayout& layout, uint64_t outside) {
      if (c.announced > 0) {
        forger.send_message(ucx_wire::kPutDone, ucx_wire::PutDoneHeader{FakePeer::kKey, 1, c.announced, 0}, nullptr, 0);
      }
      const std::vector<uint8_t> bytes(64, 0xab);
      const uint64_t address = c.outside ? outside : layout.layers[0].k_base;
      forger.send_message(ucx_wire::kPutData, ucx_wire::PutDataHeader{FakePeer::kKey, 1, address}, bytes.data(),
                          bytes.size());
    });
  }
}

// A PUT_SCATTER message is checked whole before any piece lands: one piece outside the engine's
// memory, pieces that do not add up to the data, or a count its table does not hold each fail the
// peer and write nothing (the piece inside the pool included).
TEST_F(UcxTransferFailureTest, ForgedScatterMessagesFailThePeerAndWriteNothing) {
  struct ScatterOfTwo {
    ucx_wire::PutScatterHeader head;
    ucx_wire::ScatterEntry entries[2];
  };
  struct Case {
    const char* name;
    bool second_outside;  // the second piece aims at memory the engine never registered
    uint64_t data_bytes;  // what the message carries (the pieces are 32 bytes each)
    uint64_t count;
    const char* error;
  };
  const Case cases[] = {{"a piece outside the pool", true, 64, 2, "outside this engine's KV memory"},
                        {"pieces that do not add up", false, 80, 2, "do not add up"},
                        {"a count the table does not hold", false, 64, 3, "malformed scatter message"}};
  for (const Case& c : cases) {
    expect_forgery_fails(c.name, c.error, [&](FakePeer& forger, const KVLayout& layout, uint64_t outside) {
      const uint64_t inside = layout.layers[0].k_base;
      const uint64_t second = c.second_outside ? outside : inside + 64;
      const ScatterOfTwo header{{FakePeer::kKey, 1, c.count}, {{inside, 32}, {second, 32}}};
      const std::vector<uint8_t> bytes(c.data_bytes, 0xab);
      forger.send_message(ucx_wire::kPutScatter, header, bytes.data(), bytes.size());
    });
  }
}

TEST_F(UcxTransferFailureTest, AForgedGetOfMemoryOutsideTheEngineFailsThePeer) {
  expect_forgery_fails("a get of unregistered memory", "a get outside this engine's KV memory",
                       [](FakePeer& forger, const KVLayout&, uint64_t outside) {
                         const uint64_t dst = forger.pool.layout().layers[0].k_base;
                         const ucx_wire::GetRequestHeader header{FakePeer::kKey, 1, outside, dst, 64};
                         forger.send_message(ucx_wire::kGetRequest, header, nullptr, 0);
                       });
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
