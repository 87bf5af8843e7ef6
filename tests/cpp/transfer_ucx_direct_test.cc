// DataPath::DIRECT's choice and refusals (the copies themselves run in every test of
// transfer_ucx_test.cc, DIRECT instance): AUTO goes direct only where both engines can, forced
// DIRECT refuses a peer it cannot map, and a map that works is used for puts and gets.
#include <gtest/gtest.h>

#include <chrono>
#include <cstdlib>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>

#include "host_kv_pool.h"
#include "rtpllm/transfer/ucx/ucx_transfer.h"

namespace rtpllm {
namespace {

using testing::HostKVPool;
using testing::KVShape;

class UcxDirectTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    setenv("UCX_TLS", "tcp", 0);
    setenv("UCX_NET_DEVICES", "lo", 0);
  }

  static TransferOptions options(const std::string& name, DataPath path) {
    TransferOptions o;
    o.name = name;
    o.identity = "tiny|fp16";
    o.timeout_s = 2.0;
    o.data_path = path;
    return o;
  }

  static std::shared_ptr<PeerMemory> in_process() { return make_in_process_peer_memory(); }

  HostKVPool pool_a_{KVShape{}, 8, 8};
  HostKVPool pool_b_{KVShape{}, 8, 4};
};

TEST_F(UcxDirectTest, AutoGoesDirectWhereBothEnginesCan) {
  UcxTransfer a(options("prefill", DataPath::AUTO), {}, in_process());
  UcxTransfer b(options("decode", DataPath::AUTO), {}, in_process());
  a.register_kv(pool_a_.layout());
  b.register_kv(pool_b_.layout());
  const PeerId peer = a.connect("127.0.0.1", b.listen_port());
  EXPECT_EQ(a.peers().front().data_path, DataPath::DIRECT);
  for (int i = 0; i < 200 && b.peers().empty(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  ASSERT_EQ(b.peers().size(), 1u);
  EXPECT_EQ(b.peers().front().data_path, DataPath::MESSAGES);  // the acceptor maps nothing under AUTO
  const std::vector<BlockId> src = {3, 1}, dst = {7, 0, 5, 2};
  pool_a_.fill_sequence(src, 13, 4);
  const TransferStatus status = a.wait(a.put(peer, {77, src, dst, 13, -1, true}), 5.0);
  ASSERT_EQ(status.state, TransferState::DONE) << status.error;
  const auto notices = b.take_notices(2.0);
  ASSERT_EQ(notices.size(), 1u);
  EXPECT_EQ(notices[0].request_id, 77u);
  EXPECT_EQ(pool_b_.mismatches_all_layers(dst, 13, 4), 0);
}

TEST_F(UcxDirectTest, AutoFallsBackToUcxWhenThePeerExportsNothing) {
  UcxTransfer a(options("prefill", DataPath::AUTO), {}, in_process());
  UcxTransfer b(options("decode", DataPath::AUTO));  // no peer memory: exports nothing
  a.register_kv(pool_a_.layout());
  b.register_kv(pool_b_.layout());
  const PeerId peer = a.connect("127.0.0.1", b.listen_port());
  EXPECT_EQ(a.peers().front().data_path, DataPath::MESSAGES);  // TCP: no RMA in hardware
  const std::vector<BlockId> src = {2}, dst = {6, 1};
  pool_a_.fill_sequence(src, 8, 9);
  ASSERT_EQ(a.wait(a.put(peer, {1, src, dst, 8, -1, true}), 5.0).state, TransferState::DONE);
  ASSERT_EQ(b.take_notices(2.0).size(), 1u);
  EXPECT_EQ(pool_b_.mismatches_all_layers(dst, 8, 9), 0);
}

TEST_F(UcxDirectTest, ForcedDirectRefusesAPeerItCannotMap) {
  EXPECT_THROW(UcxTransfer(options("x", DataPath::DIRECT)), std::invalid_argument);  // nothing to map with
  UcxTransfer a(options("prefill", DataPath::DIRECT), {}, in_process());
  UcxTransfer b(options("decode", DataPath::AUTO));
  a.register_kv(pool_a_.layout());
  b.register_kv(pool_b_.layout());
  try {
    a.connect("127.0.0.1", b.listen_port());
    ADD_FAILURE() << "a peer without exports was accepted for DIRECT";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("data_path DIRECT"), std::string::npos) << e.what();
  }
  EXPECT_TRUE(a.peers().empty());
}

// A PeerMemory of a given scope whose map() throws `map_error`, and that never copies.
class FakeMemory final : public PeerMemory {
 public:
  FakeMemory(std::string scope, std::string map_error) : scope_(std::move(scope)), map_error_(std::move(map_error)) {}
  std::string scope() const override { return scope_; }
  bool supports(MemoryKind) const override { return true; }
  std::string export_region(uint64_t, uint64_t) override { return "handle"; }
  uint64_t map(const std::string&, uint64_t) override { throw std::runtime_error(map_error_); }
  void unmap(uint64_t) noexcept override {}
  uint64_t copy(const std::vector<CopyOp>&) override { throw std::runtime_error("must not be called"); }
  bool done(uint64_t) override { return true; }
  void drain() noexcept override {}

 private:
  const std::string scope_, map_error_;
};

// Exports carry their scope: another process's (here: a scope that is not this process's) are
// never mapped, AUTO then uses UCX.
TEST_F(UcxDirectTest, ExportsOfAnotherScopeAreNeverMapped) {
  UcxTransfer a(options("prefill", DataPath::AUTO), {}, in_process());
  const auto elsewhere = std::make_shared<FakeMemory>("another host|boot|pid 1", "must not be called");
  UcxTransfer b(options("decode", DataPath::AUTO), {}, elsewhere);
  a.register_kv(pool_a_.layout());
  b.register_kv(pool_b_.layout());
  const PeerId peer = a.connect("127.0.0.1", b.listen_port());
  EXPECT_EQ(a.peers().front().data_path, DataPath::MESSAGES);
  const std::vector<BlockId> src = {0}, dst = {3, 4};
  pool_a_.fill_sequence(src, 8, 2);
  ASSERT_EQ(a.wait(a.put(peer, {5, src, dst, 8, -1, true}), 5.0).state, TransferState::DONE);
  EXPECT_EQ(pool_b_.mismatches_all_layers(dst, 8, 2), 0);
}

// The scopes match but the map fails (on GPUs: no shared IPC namespace, no peer access): forced
// DIRECT fails the peer and connect() throws; AUTO uses UCX.
TEST_F(UcxDirectTest, AMapThatFailsFailsForcedDirectAndFallsBackUnderAuto) {
  const auto unmappable = [] { return std::make_shared<FakeMemory>("one host|boot", "cudaIpcOpenMemHandle: denied"); };
  UcxTransfer b(options("decode", DataPath::AUTO), {}, unmappable());
  b.register_kv(pool_b_.layout());
  UcxTransfer forced(options("prefill", DataPath::DIRECT), {}, unmappable());
  forced.register_kv(pool_a_.layout());
  try {
    forced.connect("127.0.0.1", b.listen_port());
    ADD_FAILURE() << "connected although the map failed";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("denied"), std::string::npos) << e.what();
  }
  ASSERT_EQ(forced.peers().size(), 1u);
  EXPECT_EQ(forced.peers().front().state, PeerState::FAILED);

  UcxTransfer automatic(options("prefill-2", DataPath::AUTO), {}, unmappable());
  automatic.register_kv(pool_a_.layout());
  const PeerId peer = automatic.connect("127.0.0.1", b.listen_port());
  EXPECT_EQ(automatic.peers().front().data_path, DataPath::MESSAGES);
  const std::vector<BlockId> src = {1}, dst = {2, 5};
  pool_a_.fill_sequence(src, 8, 6);
  ASSERT_EQ(automatic.wait(automatic.put(peer, {3, src, dst, 8, -1, true}), 5.0).state, TransferState::DONE);
  EXPECT_EQ(pool_b_.mismatches_all_layers(dst, 8, 6), 0);
}

}  // namespace
}  // namespace rtpllm
