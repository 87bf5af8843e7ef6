// Prefill-decode transfers after churn, end to end through the schedulers: a decode instance that
// has served many remote-prefill requests reserves a 4k-token prompt's blocks in few runs, the
// prefill instance's own blocks for it come in few runs too, and the transfer plan writes one
// piece per stretch that is consecutive on both sides (prefill blocks of 64 tokens, decode blocks
// of 16): a handful of writes per layer and plane instead of one per decode block.
#include <gtest/gtest.h>

#include <random>
#include <vector>

#include "rtpllm/sched/scheduler.h"
#include "rtpllm/transfer/transfer_plan.h"
#include "scheduler_harness.h"

namespace rtpllm {
namespace {

constexpr int32_t kPromptTokens = 4096;
constexpr int32_t kDecodeBlockSize = 16;
constexpr int32_t kPrefillBlockSize = 64;
constexpr TokenId kSampled = 7;  // never a stop token here
// After the churn below with room to spare; scattered decode blocks would take 256.
constexpr size_t kMaxWritesPerPlane = 16;

// The harness's spec with a random prompt of `prompt_len` tokens.
RequestSpec random_spec(RequestId id, int32_t prompt_len, int32_t max_new_tokens, std::mt19937& rng) {
  std::vector<TokenId> prompt(static_cast<size_t>(prompt_len));
  for (TokenId& t : prompt) t = static_cast<TokenId>(3 + rng() % 30000);
  return testing::make_spec(id, std::move(prompt), max_new_tokens, {2});
}

// One step of the engine loop, every sequence sampling kSampled.
void step(Scheduler& scheduler, ScheduledBatch& batch, StepOutputs& outputs) {
  scheduler.schedule(batch);
  const std::vector<TokenId> sampled(static_cast<size_t>(batch.num_sampled), kSampled);
  scheduler.update(batch, sampled.data(), sampled.size(), outputs);
}

// A KV layout at made-up addresses (the plan never touches memory): Llama-3-8B's KV shape, two
// layers, every plane its own allocation.
KVLayout fake_layout(int32_t num_blocks, int32_t block_size) {
  KVLayout layout;
  layout.num_blocks = num_blocks;
  layout.block_size = block_size;
  layout.num_kv_heads = 8;
  layout.head_dim = 128;
  layout.element_bytes = 2;
  layout.block_stride_bytes = layout.block_bytes();
  const uint64_t plane = static_cast<uint64_t>(num_blocks) * layout.block_stride_bytes + 4096;
  for (uint64_t l = 0; l < 2; ++l) layout.layers.push_back({(1ull << 40) + 2 * l * plane, (1ull << 40) + (2 * l + 1) * plane});
  return layout;
}

// The fewest writes any plan can make for one plane: a write must be consecutive on both sides,
// so one starts at token 0 and wherever either side's next block is not the block after.
size_t fewest_writes(const std::vector<BlockId>& src, int32_t src_block_size, const std::vector<BlockId>& dst,
                     int32_t dst_block_size) {
  size_t writes = 1;
  for (int32_t t = 1; t < kPromptTokens; ++t) {
    const bool src_jump = t % src_block_size == 0 && src[t / src_block_size] != src[t / src_block_size - 1] + 1;
    const bool dst_jump = t % dst_block_size == 0 && dst[t / dst_block_size] != dst[t / dst_block_size - 1] + 1;
    writes += (src_jump || dst_jump) ? 1 : 0;
  }
  return writes;
}

// A decode instance after `num_steps` steps of remote-prefill requests (prompts of 256..4096 tokens,
// 16..512 output tokens, up to 32 at once, prefix caching on: the free blocks are almost all
// cached), then reserving blocks for a 4k-token prompt; returns that reservation.
std::vector<BlockId> decode_reservation_after_churn(uint32_t seed, int32_t num_blocks, int num_steps) {
  Scheduler decode({8192, 32, true, 8192}, {num_blocks, kDecodeBlockSize, true});
  std::mt19937 rng(seed);
  ScheduledBatch batch;
  StepOutputs outputs;
  RequestId next_id = 1;
  for (int s = 0; s < num_steps; ++s) {
    if (decode.num_running() < 32) {
      const RequestSpec spec = random_spec(next_id++, 256 + static_cast<int32_t>(rng() % 3841),
                                         16 + static_cast<int32_t>(rng() % 497), rng);
      if (decode.add_remote_prefill(spec)) {
        EXPECT_TRUE(decode.complete_remote_prefill(spec.request_id, kSampled, outputs));
      }
    }
    step(decode, batch, outputs);
  }
  const RequestSpec target = random_spec(next_id, kPromptTokens, 16, rng);
  while (!decode.add_remote_prefill(target)) step(decode, batch, outputs);  // until enough blocks are free
  decode.check_invariants();
  return decode.find(target.request_id)->block_table;
}

// A prefill instance after 400 steps of prompts (256..4096 tokens, chunked, 2048 tokens a step,
// prefix caching on), then computing a 4k-token prompt; returns its blocks.
std::vector<BlockId> prefill_blocks_after_churn(uint32_t seed, int32_t num_blocks) {
  Scheduler prefill({2048, 16, true, 8192}, {num_blocks, kPrefillBlockSize, true});
  std::mt19937 rng(seed);
  ScheduledBatch batch;
  StepOutputs outputs;
  RequestId next_id = 1;
  for (int s = 0; s < 400; ++s) {
    if (prefill.num_waiting() < 4) prefill.add_request(random_spec(next_id++, 256 + static_cast<int32_t>(rng() % 3841), 1, rng));
    step(prefill, batch, outputs);
  }
  while (prefill.has_unfinished()) step(prefill, batch, outputs);
  const RequestSpec target = random_spec(next_id, kPromptTokens, 1, rng);
  prefill.add_request(target);
  std::vector<BlockId> blocks;
  while (prefill.has_unfinished()) {
    prefill.schedule(batch);
    const Request* r = prefill.find(target.request_id);
    if (r != nullptr) blocks = r->block_table;  // the last chunk's schedule holds every block
    const std::vector<TokenId> sampled(static_cast<size_t>(batch.num_sampled), kSampled);
    prefill.update(batch, sampled.data(), sampled.size(), outputs);
  }
  prefill.check_invariants();
  return blocks;
}

// Writes per layer and plane to move the 4k-token prompt after churn on both instances.
size_t writes_after_churn(int32_t decode_blocks, int decode_steps) {
  const int32_t prefill_blocks = 1024;
  const KVLayout src = fake_layout(prefill_blocks, kPrefillBlockSize);
  const KVLayout dst = fake_layout(decode_blocks, kDecodeBlockSize);
  const std::vector<BlockId> d = decode_reservation_after_churn(1, decode_blocks, decode_steps);
  const std::vector<BlockId> p = prefill_blocks_after_churn(1, prefill_blocks);
  EXPECT_EQ(d.size(), size_t{kPromptTokens / kDecodeBlockSize});
  EXPECT_EQ(p.size(), size_t{kPromptTokens / kPrefillBlockSize});
  const size_t writes = plan_copies(src, dst, plan_transfer(src, p, dst, d, kPromptTokens), /*layer=*/1).size() / 2;
  EXPECT_EQ(writes, fewest_writes(p, kPrefillBlockSize, d, kDecodeBlockSize)) << "the plan merges all it can";
  // The old pool's shape: the same reservation handed out tail first, one write per block.
  const std::vector<BlockId> reversed(d.rbegin(), d.rend());
  EXPECT_EQ(plan_copies(src, dst, plan_transfer(src, p, dst, reversed, kPromptTokens), 1).size() / 2,
            size_t{kPromptTokens / kDecodeBlockSize});
  return writes;
}

TEST(PDBlockRuns, TransferAfterChurnWritesAFewPiecesPerPlane) {
  // 8192 decode blocks: room to spare when the reservation comes (7 writes).
  EXPECT_LE(writes_after_churn(8192, 600), kMaxWritesPerPlane);
}

TEST(PDBlockRuns, TransferAfterChurnOfAFullPoolStillWritesFarLess) {
  // 4096 decode blocks: the pool runs full (requests wait for room), so the reservation takes
  // what the last finished requests freed, their decode blocks scattered among others' (63
  // writes, against 256).
  EXPECT_LE(writes_after_churn(4096, 1000), size_t{kPromptTokens / kDecodeBlockSize / 2});
}

}  // namespace
}  // namespace rtpllm
