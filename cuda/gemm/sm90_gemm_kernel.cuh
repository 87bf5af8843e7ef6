// The CUTLASS 3.x kernel behind every line of sm90_gemm_configs.h: a config struct turns into a
// TMA + WGMMA warp-specialized kernel, and `run_sm90_gemm<Config, T>` launches it. Included only by
// the per-config translation units that cuda/CMakeLists.txt generates; it is heavy to compile.
#pragma once

#include <cuda_runtime.h>

#include <type_traits>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/operations.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/gemm/kernel/tile_scheduler.hpp"
#include "cuda/gemm/sm90_gemm.h"
#include "cuda/gemm/sm90_gemm_config_types.h"

namespace rtpllm::cuda::sm90 {

template <class Sched> struct ScheduleTags;
template <> struct ScheduleTags<Cooperative> {
  using Mainloop = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
  using Epilogue = cutlass::epilogue::TmaWarpSpecializedCooperative;
};
template <> struct ScheduleTags<Pingpong> {
  using Mainloop = cutlass::gemm::KernelTmaWarpSpecializedPingpong;
  using Epilogue = cutlass::epilogue::TmaWarpSpecialized;
};
template <class S> struct TileSchedulerTag;
template <> struct TileSchedulerTag<Persistent> { using type = cutlass::gemm::PersistentScheduler; };
template <> struct TileSchedulerTag<StreamK> { using type = cutlass::gemm::StreamKScheduler; };

template <class T> struct CutlassElement;
template <> struct CutlassElement<__nv_bfloat16> { using type = cutlass::bfloat16_t; };
template <> struct CutlassElement<__half> { using type = cutlass::half_t; };

// Not swapped: A = x [M, K] row-major; B = w, which is K x N column-major; D = y [M, N] row-major;
// the bias runs along D's columns.
// Swapped: A = w [N, K] row-major; B = x^T, K x M column-major; D = y^T [N, M] column-major, i.e.
// y row-major; the bias runs along D's rows.
template <class Config, class T>
struct Sm90Gemm {
  using Element = typename CutlassElement<T>::type;
  static constexpr int kAlignment = 8;  // elements per 16 bytes: what TMA needs
  using LayoutA = cutlass::layout::RowMajor;
  using LayoutB = cutlass::layout::ColumnMajor;
  using LayoutD = std::conditional_t<Config::kSwapAB, cutlass::layout::ColumnMajor, cutlass::layout::RowMajor>;
  using TileShape = cute::Shape<cute::Int<Config::kTileM>, cute::Int<Config::kTileN>, cute::Int<Config::kTileK>>;
  using ClusterShape = cute::Shape<cute::Int<Config::kClusterM>, cute::Int<Config::kClusterN>, cute::_1>;
  // D = acc + beta * C + bias; the bias pointer may be null, and beta = 0 skips reading C.
  using Fusion = std::conditional_t<
      Config::kSwapAB, cutlass::epilogue::fusion::LinCombPerRowBias<Element, float, Element, Element, float>,
      cutlass::epilogue::fusion::LinCombPerColBias<Element, float, Element, Element, float>>;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, Element, LayoutD, kAlignment, Element,
      LayoutD, kAlignment, typename ScheduleTags<typename Config::Schedule>::Epilogue, Fusion>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutA, kAlignment, Element, LayoutB,
      kAlignment, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<
          static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
      typename ScheduleTags<typename Config::Schedule>::Mainloop>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<cute::Shape<int, int, int, int>, CollectiveMainloop,
                                                      CollectiveEpilogue,
                                                      typename TileSchedulerTag<typename Config::TileScheduler>::type>;
  using Adapter = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  static constexpr bool kStreamK = std::is_same_v<typename Config::TileScheduler, StreamK>;

  static typename Adapter::Arguments arguments(const Sm90GemmParams& p, int sm_count, int device) {
    using StrideA = typename Kernel::StrideA;
    using StrideB = typename Kernel::StrideB;
    using StrideC = typename Kernel::StrideC;
    using StrideD = typename Kernel::StrideD;
    [[maybe_unused]] const auto* x = static_cast<const Element*>(p.x);
    [[maybe_unused]] const auto* w = static_cast<const Element*>(p.w);
    const auto* residual = static_cast<const Element*>(p.residual);
    auto* y = static_cast<Element*>(p.y);

    typename Adapter::Arguments args{};
    args.mode = cutlass::gemm::GemmUniversalMode::kGemm;
    if constexpr (Config::kSwapAB) {
      args.problem_shape = {p.n, p.m, p.k, 1};
      args.mainloop = {w, StrideA{p.k, cute::_1{}, 0}, x, StrideB{p.ldx, cute::_1{}, 0}};
      args.epilogue.ptr_C = residual;
      args.epilogue.dC = StrideC{cute::_1{}, p.ld_residual, 0};
      args.epilogue.ptr_D = y;
      args.epilogue.dD = StrideD{cute::_1{}, p.ldy, 0};
    } else {
      args.problem_shape = {p.m, p.n, p.k, 1};
      args.mainloop = {x, StrideA{p.ldx, cute::_1{}, 0}, w, StrideB{p.k, cute::_1{}, 0}};
      args.epilogue.ptr_C = residual;
      args.epilogue.dC = StrideC{p.ld_residual, cute::_1{}, 0};
      args.epilogue.ptr_D = y;
      args.epilogue.dD = StrideD{p.ldy, cute::_1{}, 0};
    }
    args.epilogue.thread.alpha = 1.0f;
    args.epilogue.thread.beta = residual != nullptr ? 1.0f : 0.0f;
    args.epilogue.thread.bias_ptr = static_cast<const Element*>(p.bias);
    args.hw_info.device_id = device;
    args.hw_info.sm_count = sm_count;
    args.scheduler.max_swizzle_size = p.swizzle;
    if constexpr (kStreamK) {
      using Mode = typename Kernel::TileScheduler::DecompositionMode;
      if (p.splits == 0) {
        args.scheduler.decomposition_mode = Mode::StreamK;
      } else if (p.splits > 1) {
        args.scheduler.decomposition_mode = Mode::SplitK;
        args.scheduler.splits = p.splits;
      } else {
        args.scheduler.decomposition_mode = Mode::DataParallel;
      }
    }
    return args;
  }
};

// The SM count is a persistent kernel's grid size; asking the driver every launch costs time.
// The kernels are compiled for sm90a only and would be empty anywhere else: refuse other GPUs.
inline cudaError_t current_device_sms(int* device, int* sms) {
  static thread_local int cached_device = -1;
  static thread_local int cached_sms = 0;
  static thread_local int cached_major = 0;
  cudaError_t err = cudaGetDevice(device);
  if (err != cudaSuccess) return err;
  if (*device != cached_device) {
    err = cudaDeviceGetAttribute(&cached_sms, cudaDevAttrMultiProcessorCount, *device);
    if (err == cudaSuccess) err = cudaDeviceGetAttribute(&cached_major, cudaDevAttrComputeCapabilityMajor, *device);
    if (err != cudaSuccess) return err;
    cached_device = *device;
  }
  *sms = cached_sms;
  return cached_major == 9 ? cudaSuccess : cudaErrorNotSupported;
}

// With `workspace_bytes` set, only reports the workspace the launch would need.
template <class Config, class T>
cudaError_t run_sm90_gemm(const Sm90GemmParams& p, cudaStream_t stream, size_t* workspace_bytes) {
  using G = Sm90Gemm<Config, T>;
  if (!G::kStreamK && p.splits != 1) return cudaErrorInvalidValue;
  int device = 0, sms = 0;
  cudaError_t err = current_device_sms(&device, &sms);
  if (err != cudaSuccess) return err;
  const auto args = G::arguments(p, sms, device);
  if (G::Adapter::can_implement(args) != cutlass::Status::kSuccess) return cudaErrorInvalidValue;
  const size_t needed = G::Adapter::get_workspace_size(args);
  if (workspace_bytes != nullptr) {
    *workspace_bytes = needed;
    return cudaSuccess;
  }
  if (needed > p.workspace_bytes || (needed > 0 && p.workspace == nullptr)) return cudaErrorInvalidValue;
  // The adapter's initialize() would set the shared-memory attribute on every call; that is a
  // host call a CUDA-graph capture should not see, so it happens once, on the first (eager) call.
  static const cudaError_t attribute_status = G::Kernel::SharedStorageSize >= (48 << 10)
      ? cudaFuncSetAttribute(cutlass::device_kernel<typename G::Kernel>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(G::Kernel::SharedStorageSize))
      : cudaSuccess;
  if (attribute_status != cudaSuccess) return attribute_status;
  if (G::Kernel::initialize_workspace(args, p.workspace, stream) != cutlass::Status::kSuccess) return cudaErrorUnknown;
  auto params = G::Kernel::to_underlying_arguments(args, p.workspace);
  if (G::Adapter::run(params, stream) != cutlass::Status::kSuccess) return cudaErrorLaunchFailure;
  return cudaGetLastError();
}

}  // namespace rtpllm::cuda::sm90
