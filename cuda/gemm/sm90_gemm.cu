// See sm90_gemm.h: the registry of built kernels and the checked entry points. The kernels
// themselves live in the generated per-config translation units (cuda/CMakeLists.txt).
#include "cuda/gemm/sm90_gemm.h"

#include <cstdint>
#include <type_traits>

#include "cuda/gemm/sm90_gemm_config_types.h"

namespace rtpllm::cuda {
namespace {

using Launcher = cudaError_t (*)(const Sm90GemmParams&, cudaStream_t, size_t*);

struct Entry {
  Sm90GemmKernelInfo info;
  Launcher bf16;
  Launcher fp16;
};

#define RTPLLM_SM90_GEMM_ENTRY(NAME, SWAP, TM, TN, TK, CM, CN, SCHEDULE, TILE_SCHEDULER)            \
  Entry{{#NAME, SWAP, std::is_same_v<sm90::TILE_SCHEDULER, sm90::StreamK>, TM, TN, TK},             \
        &sm90::run_sm90_gemm<sm90::configs::NAME, __nv_bfloat16>, &sm90::run_sm90_gemm<sm90::configs::NAME, __half>},
const Entry kEntries[] = {RTPLLM_SM90_GEMM_CONFIGS(RTPLLM_SM90_GEMM_ENTRY)};
#undef RTPLLM_SM90_GEMM_ENTRY
constexpr int kCount = sizeof(kEntries) / sizeof(kEntries[0]);

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// What every kernel needs from the operands (TMA: 16-byte aligned bases and row strides).
bool valid(const Sm90GemmParams& p) {
  if (p.m < 1 || p.n < 1 || p.k < 1 || p.n % 8 != 0 || p.k % 8 != 0 || p.splits < 0) return false;
  if (p.swizzle != 1 && p.swizzle != 2 && p.swizzle != 4 && p.swizzle != 8) return false;
  if (p.ldx < p.k || p.ldx % 8 != 0 || p.ldy < p.n || p.ldy % 8 != 0) return false;
  if (p.x == nullptr || p.w == nullptr || p.y == nullptr || !aligned16(p.x) || !aligned16(p.w) || !aligned16(p.y))
    return false;
  if (p.bias != nullptr && !aligned16(p.bias)) return false;
  if (p.residual != nullptr && (p.ld_residual < p.n || p.ld_residual % 8 != 0 || !aligned16(p.residual)))
    return false;
  return true;
}

Launcher launcher(int kernel, ScalarType dtype) {
  if (kernel < 0 || kernel >= kCount) return nullptr;
  switch (dtype) {
    case ScalarType::kBFloat16: return kEntries[kernel].bf16;
    case ScalarType::kFloat16: return kEntries[kernel].fp16;
    default: return nullptr;
  }
}

}  // namespace

int sm90_gemm_kernel_count() { return kCount; }

const Sm90GemmKernelInfo& sm90_gemm_kernel_info(int kernel) { return kEntries[kernel].info; }

cudaError_t sm90_gemm_workspace_size(int kernel, const Sm90GemmParams& params, ScalarType dtype, size_t* bytes) {
  const Launcher run = launcher(kernel, dtype);
  if (run == nullptr || bytes == nullptr || !valid(params)) return cudaErrorInvalidValue;
  return run(params, nullptr, bytes);
}

cudaError_t sm90_gemm(int kernel, const Sm90GemmParams& params, ScalarType dtype, cudaStream_t stream) {
  const Launcher run = launcher(kernel, dtype);
  if (run == nullptr || !valid(params)) return cudaErrorInvalidValue;
  return run(params, stream, nullptr);
}

}  // namespace rtpllm::cuda
