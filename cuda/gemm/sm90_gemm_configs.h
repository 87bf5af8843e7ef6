// The sm90 GEMM kernels that get built. One line each; cuda/CMakeLists.txt compiles every line
// into its own translation units (one per dtype) so the build spreads over all cores. Only kernels
// the dispatch table (python/rtpllm/layers/gemm_dispatch.json) picks on some card are listed;
// tn_128x128x64_c1x1_coop_sk and swap_128x128x64_coop_sk were tuned on the H100 and H200 and
// never won, so they were dropped.
//
// X(name, swap_ab, tile_m, tile_n, tile_k, cluster_m, cluster_n, schedule, tile_scheduler)
//   schedule:       Cooperative (two consumer warpgroups share a tile) | Pingpong (they alternate tiles)
//   tile_scheduler: Persistent (data-parallel over tiles) | StreamK (also split-K and stream-K)
// Tile sizes are in the kernel's orientation: for swap-AB kernels tile_m runs over the weight's N
// and tile_n over the tokens.
#pragma once

#define RTPLLM_SM90_GEMM_CONFIGS(X)                                                   \
  /* prefill: large M */                                                              \
  X(tn_128x256x64_c2x1_coop, false, 128, 256, 64, 2, 1, Cooperative, Persistent)      \
  X(tn_256x128x64_c1x2_coop, false, 256, 128, 64, 1, 2, Cooperative, Persistent)      \
  X(tn_128x128x64_c1x2_pingpong, false, 128, 128, 64, 1, 2, Pingpong, Persistent)     \
  X(tn_128x256x64_c1x1_coop_sk, false, 128, 256, 64, 1, 1, Cooperative, StreamK)      \
  /* decode: few tokens, weights on the wide side */                                  \
  X(swap_128x16x128_coop_sk, true, 128, 16, 128, 1, 1, Cooperative, StreamK)          \
  X(swap_128x32x128_coop_sk, true, 128, 32, 128, 1, 1, Cooperative, StreamK)          \
  X(swap_128x64x128_coop_sk, true, 128, 64, 128, 1, 1, Cooperative, StreamK)          \
  X(swap_64x32x128_pingpong, true, 64, 32, 128, 1, 1, Pingpong, Persistent)           \
  X(swap_64x64x128_pingpong, true, 64, 64, 128, 1, 1, Pingpong, Persistent)
