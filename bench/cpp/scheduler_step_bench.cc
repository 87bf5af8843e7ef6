// Times one scheduler step, schedule() + update(), as the engine's step loop drives it.
//
//   scheduler_step_bench [--steps N] [--tiers]
//
// Scenarios: N running decode sequences (every step: one token each, KV blocks grow, full blocks
// enter the prefix cache), and a mix where long prompts keep arriving and are chunk-prefilled
// next to the decodes while finished requests leave, and speculative decoding (every decode asks
// for lookahead slots, half the drafts are accepted, the rest rolled back), and the mix again in a pool
// that finished requests' cached blocks fill, so that allocations evict. Batch and output buffers are reused, as a
// C++ caller would; the Python binding adds its own object overhead on top.
// --tiers: every scenario also with a host KV tier attached (TieredKVConnector over a HostTier
// far smaller than the working set, CPU copy engine, 128-byte blocks so that the copies cost
// nothing): what the tiers add to a step on the scheduler thread (hashing, save bookkeeping, the
// tier's index and LRU churn) when nothing is ever reused.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "rtpllm/kvstore/cpu_copy_engine.h"
#include "rtpllm/kvstore/host_tier.h"
#include "rtpllm/kvstore/tiered_connector.h"
#include "rtpllm/sched/scheduler.h"

namespace rtpllm {
namespace {

using Clock = std::chrono::steady_clock;

struct Result {
  std::string name;
  double mean_seqs = 0, mean_tokens = 0, median_us = 0, p90_us = 0;
  int steps = 0;
};

struct Scenario {
  std::string name;
  int32_t num_decodes;      // sequences decoding when timing starts
  int32_t prompt_len;       // their prompt length
  int32_t prefill_arrival;  // > 0: keep one prompt of this length arriving (chunked prefill mix)
  int32_t token_budget;
  int32_t lookahead = 0;  // > 0: every decode asks for this many draft slots and accepts half
  // > 0: a pool of this many blocks instead of room for everyone: finished requests' cached
  // blocks fill it, so allocations evict (the block pool's eviction path on every step).
  int32_t pool_blocks = 0;
};

constexpr TokenId kSampledToken = 7;  // never a stop token here
constexpr int32_t kBlockSize = 16;

RequestSpec make_request(RequestId id, int32_t prompt_len, int32_t max_new_tokens, std::mt19937& rng) {
  RequestSpec spec;
  spec.request_id = id;
  spec.prompt_token_ids.resize(static_cast<size_t>(prompt_len));
  for (TokenId& t : spec.prompt_token_ids) t = static_cast<TokenId>(rng() % 32000);
  spec.max_new_tokens = max_new_tokens;
  spec.stop_token_ids = {2};
  spec.arrival_time = static_cast<double>(id);
  return spec;
}

// A host tier of 4096 tiny blocks over a host-memory pool of `blocks` blocks (see --tiers).
struct TinyTiers {
  std::vector<uint8_t> k, v;
  std::shared_ptr<TieredKVConnector> connector;
  explicit TinyTiers(int32_t blocks) {
    KVLayout layout;
    layout.memory = MemoryKind::HOST;
    layout.num_blocks = blocks;
    layout.block_size = kBlockSize;
    layout.num_kv_heads = 1;
    layout.head_dim = 2;
    layout.element_bytes = 2;
    layout.block_stride_bytes = layout.block_bytes();
    k.assign(static_cast<size_t>(layout.block_bytes() * blocks), 0);
    v.assign(k.size(), 0);
    layout.layers.push_back(KVLayerAddress{reinterpret_cast<uint64_t>(k.data()), reinterpret_cast<uint64_t>(v.data())});
    auto engine = std::make_shared<CpuKVCopyEngine>(layout);
    auto host = std::make_shared<HostTier>(engine, 4096 * layout.bytes_per_block());
    connector = std::make_shared<TieredKVConnector>(std::vector<std::shared_ptr<KVStoreTier>>{host}, 10.0);
  }
};

Result run(const Scenario& sc, int timed_steps, bool tiers) {
  const int32_t max_seqs = sc.num_decodes + (sc.prefill_arrival > 0 ? 8 : 0);
  // Room for the warm-up (prefilling every sequence) plus the timed steps, so nobody finishes.
  const int32_t decode_len = sc.prefill_arrival > 0 ? 0 : timed_steps + 1000;
  const int32_t max_len = std::max(sc.prompt_len + timed_steps + 1100, sc.prefill_arrival + 64);
  const int32_t blocks =
      sc.pool_blocks > 0 ? sc.pool_blocks : (max_seqs + 2) * ((max_len + kBlockSize - 1) / kBlockSize);
  Scheduler scheduler({sc.token_budget, max_seqs, true, max_len}, {blocks, kBlockSize, true});
  std::unique_ptr<TinyTiers> tiny = tiers ? std::make_unique<TinyTiers>(blocks) : nullptr;
  if (tiny) scheduler.set_kv_connector(tiny->connector, 10.0);
  std::mt19937 rng(1234);
  ScheduledBatch batch;
  StepOutputs outputs;
  std::vector<TokenId> sampled;
  RequestId next_id = 0;
  auto step = [&] {
    for (RequestId id = 0; sc.lookahead > 0 && id < next_id; ++id) scheduler.set_lookahead(id, sc.lookahead);
    scheduler.schedule(batch);
    // One token per verified row: per sequence its accepted drafts (half), one more, then -1.
    sampled.assign(static_cast<size_t>(batch.num_sampled + batch.num_draft_tokens), -1);
    for (int32_t k = 0; k < batch.num_sampled; ++k) {
      const int32_t begin = batch.verify_offsets[k];
      const int32_t keep = 1 + (batch.verify_offsets[k + 1] - begin - 1) / 2;
      std::fill_n(sampled.begin() + begin, keep, kSampledToken);
    }
    scheduler.update(batch, sampled.data(), sampled.size(), outputs);
  };

  // Warm up: prefill every decode sequence. In the mix they finish at staggered times and are
  // replaced, so the batch keeps churning.
  for (int32_t i = 0; i < sc.num_decodes; ++i) {
    const int32_t max_new = decode_len > 0 ? decode_len : 64 + static_cast<int32_t>(rng() % 192);
    scheduler.add_request(make_request(next_id++, sc.prompt_len, max_new, rng));
  }
  while (scheduler.num_waiting() > 0) step();
  for (int i = 0; i < 8; ++i) step();

  std::vector<double> micros;
  double seqs = 0, tokens = 0;
  for (int s = 0; s < timed_steps; ++s) {
    if (sc.prefill_arrival > 0) {
      // Keep the decode population steady and one long prompt always in prefill.
      while (scheduler.num_running() + scheduler.num_waiting() < sc.num_decodes) {
        scheduler.add_request(make_request(next_id++, sc.prompt_len, 64 + static_cast<int32_t>(rng() % 192), rng));
      }
      if (scheduler.num_waiting() == 0) {
        scheduler.add_request(make_request(next_id++, sc.prefill_arrival, 16, rng));
      }
    }
    const auto start = Clock::now();
    step();
    micros.push_back(std::chrono::duration<double, std::micro>(Clock::now() - start).count());
    seqs += batch.num_seqs;
    tokens += batch.num_tokens;
  }
  std::sort(micros.begin(), micros.end());
  Result r;
  r.name = sc.name + (tiers ? ", host tier" : "");
  r.steps = timed_steps;
  r.mean_seqs = seqs / timed_steps;
  r.mean_tokens = tokens / timed_steps;
  r.median_us = micros[micros.size() / 2];
  r.p90_us = micros[micros.size() * 9 / 10];
  return r;
}

}  // namespace
}  // namespace rtpllm

int main(int argc, char** argv) {
  int steps = 2000;
  bool tiers = false;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--steps") == 0 && i + 1 < argc) {
      steps = std::atoi(argv[++i]);
    } else if (std::strcmp(argv[i], "--tiers") == 0) {
      tiers = true;
    } else {
      std::fprintf(stderr, "usage: %s [--steps N] [--tiers]\n", argv[0]);
      return 2;
    }
  }
  if (steps < 10) {
    std::fprintf(stderr, "--steps must be >= 10\n");
    return 2;
  }
  using rtpllm::Scenario;
  const Scenario scenarios[] = {
      {"decode 256 seqs, prompt 512", 256, 512, 0, 8192},
      {"decode 1024 seqs, prompt 512", 1024, 512, 0, 8192},
      {"decode 256 + chunked 4k prefill", 256, 512, 4096, 2048},
      {"decode 256, 4 draft slots (2 accepted)", 256, 512, 0, 8192, 4},
      {"decode 256 + chunked 4k prefill, pool full (evicts)", 256, 512, 4096, 2048, 0, 14000},
  };
  std::printf("%-52s %8s %10s %12s %10s %8s\n", "scenario", "seqs", "tokens", "median us", "p90 us", "steps");
  for (const Scenario& sc : scenarios) {
    for (bool with_tiers : {false, true}) {
      if (with_tiers && !tiers) continue;
      const rtpllm::Result r = rtpllm::run(sc, steps, with_tiers);
      std::printf("%-52s %8.1f %10.1f %12.1f %10.1f %8d\n", r.name.c_str(), r.mean_seqs, r.mean_tokens, r.median_us,
                  r.p90_us, r.steps);
    }
  }
  return 0;
}
