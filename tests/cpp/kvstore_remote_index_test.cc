// The shared KV store's slot bookkeeping (StoreIndex), its typed messages (store_protocol.h) and
// the keys a tensor-parallel rank's share of a block goes under (store_key).
#include <gtest/gtest.h>

#include <set>
#include <stdexcept>

#include "rtpllm/kvstore/remote/remote_store_tier.h"
#include "rtpllm/kvstore/remote/store_index.h"
#include "rtpllm/kvstore/remote/store_protocol.h"

namespace rtpllm {
namespace {

// Reserves a slot and commits hash into it.
int32_t put(StoreIndex& index, BlockHash hash, std::vector<BlockHash>* evicted = nullptr) {
  const int32_t slot = index.reserve(evicted);
  EXPECT_GE(slot, 0);
  EXPECT_TRUE(index.commit(slot, hash));
  return slot;
}

TEST(StoreIndexTest, EvictsLeastRecentlyUsedAndNeverAPinnedBlock) {
  StoreIndex index(3);
  put(index, 10);
  put(index, 11);
  put(index, 12);
  const int32_t pinned = index.pin(10);  // the oldest, but pinned
  ASSERT_GE(pinned, 0);
  std::vector<BlockHash> evicted;
  put(index, 13, &evicted);
  EXPECT_EQ(evicted, (std::vector<BlockHash>{11}));
  EXPECT_TRUE(index.contains(10));
  EXPECT_FALSE(index.contains(11));
  index.unpin(pinned);  // 10 is now the most recently used
  evicted.clear();
  put(index, 14, &evicted);
  EXPECT_EQ(evicted, (std::vector<BlockHash>{12}));
  index.check_invariants();
}

TEST(StoreIndexTest, ReserveFailsWhenEverySlotIsPinnedOrReserved) {
  StoreIndex index(2);
  const int32_t a = put(index, 1);
  index.pin_slot(a);
  const int32_t b = index.reserve(nullptr);
  ASSERT_GE(b, 0);
  EXPECT_EQ(index.reserve(nullptr), -1);
  index.abandon(b);
  EXPECT_EQ(index.num_free(), 1);
  index.unpin(a);
  index.check_invariants();
}

TEST(StoreIndexTest, CommitOfAHashHeldElsewhereFreesTheSlot) {
  StoreIndex index(4);
  put(index, 7);
  const int32_t slot = index.reserve(nullptr);
  EXPECT_FALSE(index.commit(slot, 7));
  EXPECT_EQ(index.num_held(), 1);
  EXPECT_EQ(index.num_free(), 3);
  index.check_invariants();
}

TEST(StoreIndexTest, DeferredUnpinAndAbandonRunAtTheirDeadline) {
  StoreIndex index(2);
  const int32_t held = put(index, 5);
  index.pin_slot(held);
  const int32_t reserved = index.reserve(nullptr);
  const auto now = StoreIndex::Clock::now();
  index.unpin_at(held, now + std::chrono::seconds(1));
  index.abandon_at(reserved, now + std::chrono::seconds(1));
  index.expire(now);
  EXPECT_EQ(index.num_pinned(), 1);
  EXPECT_EQ(index.reserve(nullptr), -1);  // nothing is reusable before the deadline
  index.expire(now + std::chrono::seconds(2));
  EXPECT_EQ(index.num_pinned(), 0);
  EXPECT_EQ(index.num_free(), 1);
  EXPECT_FALSE(index.has_deferred());
  index.check_invariants();
}

TEST(StoreIndexTest, ReportsIndexChanges) {
  StoreIndex index(1);
  put(index, 1);
  std::vector<BlockHash> added, removed;
  index.take_changes(&added, &removed);
  EXPECT_EQ(added, (std::vector<BlockHash>{1}));
  EXPECT_TRUE(removed.empty());
  put(index, 2);  // evicts 1
  index.take_changes(&added, &removed);
  EXPECT_EQ(added, (std::vector<BlockHash>{2}));
  EXPECT_EQ(removed, (std::vector<BlockHash>{1}));
}

TEST(StoreIndexTest, MisuseIsALogicError) {
  StoreIndex index(2);
  EXPECT_THROW(index.unpin(0), std::logic_error);
  EXPECT_THROW(index.commit(1, 3), std::logic_error);
  EXPECT_THROW(StoreIndex(0), std::invalid_argument);
}

TEST(StoreProtocolTest, MessagesRoundTrip) {
  StoreHello hello;
  hello.name = "a";
  hello.identity = 0xABCDEF;
  hello.shape = KVBlockShape{2, 16, 4, 8, 2};
  const StoreHello h = decode_store_hello(encode_store_hello(hello));
  EXPECT_EQ(h.identity, hello.identity);
  EXPECT_TRUE(h.shape == hello.shape);
  EXPECT_EQ(h.name, "a");

  const StoreBlockRequest r = decode_store_request(encode_store_request(StoreMessage::PIN, {9, {1, 2, 3}}));
  EXPECT_EQ(r.request_id, 9u);
  EXPECT_EQ(r.hashes, (std::vector<BlockHash>{1, 2, 3}));

  const StoreSlotsReply s = decode_store_slots(encode_store_slots(StoreMessage::RESERVED, {4, {0, -1, 7}, ""}));
  EXPECT_EQ(s.slots, (std::vector<int32_t>{0, -1, 7}));

  const StoreWelcome w = decode_store_welcome(encode_store_welcome({1234, 99, 512, 2.5}));
  EXPECT_EQ(w.transfer_port, 1234);
  EXPECT_EQ(w.capacity_blocks, 99);
  EXPECT_DOUBLE_EQ(w.transfer_timeout_s, 2.5);

  const StoreIndexUpdate u = decode_store_index(encode_store_index({{5}, {6, 7}, 3}));
  EXPECT_EQ(u.removed.size(), 2u);
  EXPECT_EQ(store_message_type(encode_store_release(StoreMessage::COMMIT, {1, true})), StoreMessage::COMMIT);
}

TEST(StoreProtocolTest, MalformedPayloadsThrow) {
  std::string pin = encode_store_request(StoreMessage::PIN, {1, {1, 2}});
  EXPECT_THROW(decode_store_request(pin.substr(0, pin.size() - 3)), std::runtime_error);  // truncated
  EXPECT_THROW(decode_store_request(pin + "x"), std::runtime_error);                      // trailing
  EXPECT_THROW(decode_store_hello(pin), std::runtime_error);                              // wrong type
  EXPECT_THROW(store_message_type("ab"), std::runtime_error);
  std::string unknown(8, '\xff');
  EXPECT_THROW(store_message_type(unknown), std::runtime_error);
  // A count claiming billions of hashes is refused before anything is allocated.
  std::string huge = encode_store_request(StoreMessage::PIN, {1, {}});
  huge[12] = '\xff';
  huge[13] = '\xff';
  huge[14] = '\xff';
  huge[15] = '\x7f';
  EXPECT_THROW(decode_store_request(huge), std::runtime_error);
}

}  // namespace
}  // namespace rtpllm

namespace rtpllm {
namespace {

// Tensor parallelism: each rank's share of a block is stored under a key of its own.
TEST(StoreKey, SaltZeroIsTheHashAndOtherSaltsGiveDistinctNonZeroKeys) {
  for (BlockHash hash : {BlockHash{1}, BlockHash{0x1234567890abcdefULL}, ~BlockHash{0}}) {
    EXPECT_EQ(store_key(hash, 0), hash);
    std::set<BlockHash> keys{hash};
    for (uint64_t salt = 1; salt <= 64; ++salt) {
      const BlockHash key = store_key(hash, salt);
      EXPECT_NE(key, 0u);
      EXPECT_EQ(key, store_key(hash, salt));  // the same on every instance
      EXPECT_TRUE(keys.insert(key).second) << "salt " << salt << " collides";
    }
  }
  EXPECT_NE(store_key(1, 2), store_key(2, 1));
}

}  // namespace
}  // namespace rtpllm
