#include <gtest/gtest.h>

#include <map>
#include <stdexcept>
#include <vector>

#include "rtpllm/kvstore/mirrored_connector.h"

namespace rtpllm {
namespace {

// Rank 0's tiers, scripted: transfers end when the test says, match answers what the test says.
struct ScriptedConnector : KVConnector {
  int32_t matched = 0;
  std::map<TransferHandle, TransferState> states;
  std::vector<std::vector<BlockId>> loads, saves;
  double recompute = 0;
  TransferHandle next = 100;
  std::string name() const override { return "scripted"; }
  int32_t match(const std::vector<BlockHash>&) override { return matched; }
  TransferHandle load(const std::vector<BlockHash>& hashes, const std::vector<BlockId>& blocks) override {
    if (hashes.size() != blocks.size()) throw std::invalid_argument("sizes");
    loads.push_back(blocks);
    states[next] = TransferState::PENDING;
    return next++;
  }
  TransferHandle save(const std::vector<BlockHash>&, const std::vector<BlockId>& blocks) override {
    saves.push_back(blocks);
    states[next] = TransferState::PENDING;
    return next++;
  }
  TransferState poll(TransferHandle handle) override {
    const TransferState state = states.at(handle);
    if (state != TransferState::PENDING) states.erase(handle);
    return state;
  }
  std::vector<KVTierStats> stats() override { return {KVTierStats{"host"}}; }
  void set_recompute_seconds_per_block(double seconds) override { recompute = seconds; }
};

struct MirroredConnectorTest : ::testing::Test {
  std::shared_ptr<ScriptedConnector> local = std::make_shared<ScriptedConnector>();
  MirroredKVConnector connector{local, 2};
};

TEST_F(MirroredConnectorTest, MatchAndStatsAreRankZeros) {
  local->matched = 3;
  EXPECT_EQ(connector.match({1, 2, 3, 4}), 3);
  ASSERT_EQ(connector.stats().size(), 1u);
  EXPECT_EQ(connector.stats()[0].name, "host");
  connector.set_recompute_seconds_per_block(0.25);
  EXPECT_EQ(local->recompute, 0.25);
}

TEST_F(MirroredConnectorTest, OperationsAreRecordedInOrderAndTakenOnce) {
  const TransferHandle save = connector.save({11, 12}, {1, 2});
  const TransferHandle load = connector.load({21}, {7});
  auto ops = connector.take_operations();
  ASSERT_EQ(ops.size(), 2u);
  EXPECT_EQ(ops[0].handle, save);
  EXPECT_FALSE(ops[0].is_load);
  EXPECT_EQ(ops[0].hashes, (std::vector<BlockHash>{11, 12}));
  EXPECT_EQ(ops[0].gpu_blocks, (std::vector<BlockId>{1, 2}));
  EXPECT_EQ(ops[1].handle, load);
  EXPECT_TRUE(ops[1].is_load);
  EXPECT_TRUE(connector.take_operations().empty());
  EXPECT_EQ(local->saves.size(), 1u);
  EXPECT_EQ(local->loads.size(), 1u);
}

TEST_F(MirroredConnectorTest, DoneOnlyOnceRankZeroAndEveryMirrorAreDone) {
  const TransferHandle h = connector.load({21, 22}, {3, 4});
  EXPECT_EQ(connector.poll(h), TransferState::PENDING);
  connector.report(1, h, true);
  local->states.begin()->second = TransferState::DONE;
  EXPECT_EQ(connector.poll(h), TransferState::PENDING);  // mirror 0 still copies
  connector.report(0, h, true);
  EXPECT_EQ(connector.poll(h), TransferState::DONE);
  EXPECT_EQ(connector.num_pending(), 0u);
  EXPECT_THROW(connector.poll(h), std::invalid_argument);  // forgotten once reported
}

TEST_F(MirroredConnectorTest, MirrorsDoneBeforeRankZeroStillWaitForRankZero) {
  const TransferHandle h = connector.save({5}, {9});
  connector.report(0, h, true);
  connector.report(1, h, true);
  EXPECT_EQ(connector.poll(h), TransferState::PENDING);
  local->states.begin()->second = TransferState::DONE;
  EXPECT_EQ(connector.poll(h), TransferState::DONE);
}

TEST_F(MirroredConnectorTest, AnyFailedPartFailsTheTransferAfterEveryPartEnded) {
  const TransferHandle h = connector.load({21}, {3});
  local->states.begin()->second = TransferState::DONE;
  connector.report(0, h, false);
  // Mirror 1 may still be writing into block 3: the caller must keep it reserved.
  EXPECT_EQ(connector.poll(h), TransferState::PENDING);
  connector.report(1, h, true);
  EXPECT_EQ(connector.poll(h), TransferState::FAILED);

  const TransferHandle g = connector.load({22}, {4});
  local->states.begin()->second = TransferState::FAILED;
  connector.report(0, g, true);
  connector.report(1, g, true);
  EXPECT_EQ(connector.poll(g), TransferState::FAILED);
}

TEST_F(MirroredConnectorTest, BadCallsAreRefusedWithoutRecordingAnything) {
  EXPECT_THROW(connector.load({1, 2}, {3}), std::invalid_argument);
  EXPECT_TRUE(connector.take_operations().empty());
  const TransferHandle h = connector.save({5}, {9});
  EXPECT_THROW(connector.report(2, h, true), std::invalid_argument);
  EXPECT_THROW(connector.report(-1, h, true), std::invalid_argument);
  EXPECT_THROW(connector.report(0, h + 1, true), std::invalid_argument);
  connector.report(0, h, true);
  EXPECT_THROW(connector.report(0, h, true), std::invalid_argument);
  EXPECT_THROW(MirroredKVConnector(local, 0), std::invalid_argument);
  EXPECT_THROW(MirroredKVConnector(nullptr, 1), std::invalid_argument);
}

}  // namespace
}  // namespace rtpllm
