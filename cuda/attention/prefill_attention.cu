// Validation and dispatch for prefill attention: runtime dtype / head_dim / implementation become
// template arguments here; anything unsupported is rejected before a launch.
#include "cuda/attention/prefill_attention.h"

#include <cmath>

#include "cuda/attention/prefill_attention_kernels.h"

namespace rtpllm::cuda {
namespace {

bool is_power_of_two(int x) { return x > 0 && (x & (x - 1)) == 0; }

int log2_of_power_of_two(int x) {
  int log2 = 0;
  while ((1 << log2) < x) ++log2;
  return log2;
}

bool aligned_16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

// Compute capability major of the current device, cached per device (the query costs a driver call).
cudaError_t current_device_major(int& major) {
  constexpr int kMaxDevices = 64;
  static int cached[kMaxDevices] = {};
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  if (device < kMaxDevices && cached[device] != 0) {
    major = cached[device];
    return cudaSuccess;
  }
  err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (err == cudaSuccess && device < kMaxDevices) cached[device] = major;
  return err;
}

template <typename T>
cudaError_t dispatch_head_dim(const PrefillAttentionParams& params, const prefill::KernelParams& kp, bool use_sm90,
                              cudaStream_t stream) {
  const int n = params.num_seqs;
  const int m = params.max_query_len;
  switch (params.head_dim) {
    case 64:
      return use_sm90 ? prefill::run_prefill_sm90<T, 64>(kp, n, m, stream)
                      : prefill::run_prefill_sm80<T, 64>(kp, n, m, stream);
    case 128:
      return use_sm90 ? prefill::run_prefill_sm90<T, 128>(kp, n, m, stream)
                      : prefill::run_prefill_sm80<T, 128>(kp, n, m, stream);
    default:
      return cudaErrorInvalidValue;  // unreachable: check_prefill_attention_params rejects it
  }
}

}  // namespace

const char* check_prefill_attention_params(const PrefillAttentionParams& p) {
  if (p.num_seqs < 0) return "num_seqs must be >= 0";
  if (p.num_seqs > 65535) return "num_seqs must be <= 65535 (grid z)";
  if (p.max_query_len < 0) return "max_query_len must be >= 0";
  if (p.num_heads <= 0) return "num_heads must be positive";
  if (p.num_kv_heads <= 0 || p.num_kv_heads > 65535) return "num_kv_heads must be in [1, 65535]";
  if (p.num_heads % p.num_kv_heads != 0) return "num_heads must be a multiple of num_kv_heads";
  if (p.head_dim != 64 && p.head_dim != 128) return "head_dim must be 64 or 128";
  if (!is_power_of_two(p.block_size)) return "block_size must be a power of two";
  if (p.num_blocks <= 0) return "num_blocks must be positive";
  if (p.max_blocks_per_seq <= 0) return "max_blocks_per_seq must be positive";
  if (!(p.scale > 0.f) || !std::isfinite(p.scale)) return "scale must be a positive finite number";
  if (p.dtype != ScalarType::kFloat16 && p.dtype != ScalarType::kBFloat16) return "dtype must be float16 or bfloat16";
  if (p.impl != PrefillAttentionImpl::kAuto && p.impl != PrefillAttentionImpl::kSm80Mma &&
      p.impl != PrefillAttentionImpl::kSm90Wgmma) {
    return "impl must be kAuto, kSm80Mma or kSm90Wgmma";
  }
  if (p.num_seqs == 0 || p.max_query_len == 0) return nullptr;  // nothing to launch
  if (p.out == nullptr || p.q == nullptr || p.kv_cache == nullptr) return "out, q and kv_cache must be non-null";
  if (p.query_start_loc == nullptr || p.seq_lens == nullptr || p.block_tables == nullptr) {
    return "query_start_loc, seq_lens and block_tables must be non-null";
  }
  if (!aligned_16(p.out) || !aligned_16(p.q) || !aligned_16(p.kv_cache)) {
    return "out, q and kv_cache must be 16-byte aligned";
  }
  const int64_t row = static_cast<int64_t>(p.num_heads) * p.head_dim;
  if (p.q_token_stride < row || p.q_token_stride % 8 != 0) {
    return "q_token_stride must be >= num_heads * head_dim and a multiple of 8 elements";
  }
  if (p.out_token_stride < row || p.out_token_stride % 8 != 0) {
    return "out_token_stride must be >= num_heads * head_dim and a multiple of 8 elements";
  }
  return nullptr;
}

cudaError_t launch_prefill_attention(const PrefillAttentionParams& params, cudaStream_t stream) {
  if (check_prefill_attention_params(params) != nullptr) return cudaErrorInvalidValue;
  if (params.num_seqs == 0 || params.max_query_len == 0) return cudaSuccess;

  int major = 0;
  cudaError_t err = current_device_major(major);
  if (err != cudaSuccess) return err;
  bool use_sm90 = false;
  switch (params.impl) {
    case PrefillAttentionImpl::kAuto:
      use_sm90 = major == 9;
      break;
    case PrefillAttentionImpl::kSm80Mma:
      if (major < 8) return cudaErrorNotSupported;
      break;
    case PrefillAttentionImpl::kSm90Wgmma:
      if (major != 9) return cudaErrorNotSupported;
      use_sm90 = true;
      break;
  }
  if (!use_sm90 && major < 8) return cudaErrorNotSupported;

  const int64_t cache_half = static_cast<int64_t>(params.num_blocks) * params.block_size * params.num_kv_heads *
                             params.head_dim;  // elements in the K (or V) half of kv_cache
  prefill::KernelParams kp{};
  kp.out = params.out;
  kp.q = params.q;
  kp.k_cache = params.kv_cache;
  kp.v_cache = static_cast<const uint16_t*>(params.kv_cache) + cache_half;  // both dtypes are 16-bit
  kp.query_start_loc = params.query_start_loc;
  kp.seq_lens = params.seq_lens;
  kp.block_tables = params.block_tables;
  kp.q_token_stride = params.q_token_stride;
  kp.out_token_stride = params.out_token_stride;
  kp.kv_slot_stride = static_cast<int64_t>(params.num_kv_heads) * params.head_dim;
  kp.num_heads = params.num_heads;
  kp.num_kv_heads = params.num_kv_heads;
  kp.group_size = params.num_heads / params.num_kv_heads;
  kp.block_size_log2 = log2_of_power_of_two(params.block_size);
  kp.max_blocks_per_seq = params.max_blocks_per_seq;
  kp.scale_log2 = params.scale * 1.4426950408889634f;

  return dispatch_half_types(params.dtype, [&](auto type_tag) {
    return dispatch_head_dim<decltype(type_tag)>(params, kp, use_sm90, stream);
  });
}

}  // namespace rtpllm::cuda
