// Programmatic dependent launch (Hopper): a kernel launched with `launch_pdl` may start while the
// kernel before it on the stream is still finishing. It does whatever does not depend on that
// kernel (launch, weight loads) first, then `wait_for_prior_grid()` blocks until the prior grid
// has completed and its writes are visible. A kernel that calls `allow_dependent_launch()` early
// lets such a successor be scheduled as soon as all of its own blocks are running.
//
// Both are no-ops for kernels launched the ordinary way, so a kernel can carry them unconditionally.
//
// Every kernel here calls allow_dependent_launch() only *after* its wait_for_prior_grid(). Called
// before, a chain of PDL kernels cascades: each successor triggers its own successor at once, so
// kernels several steps ahead sit resident on the SMs (holding registers and shared memory, and
// starting their weight loads) while the running kernel still needs them. After the wait, at
// most one kernel runs ahead: it starts when the kernel before it has passed its own wait.
// Measured on an H100, batch-1 Llama-8B decode graph: 5.96 ms with the triggers before the
// waits, 5.69 ms after (5.82 ms before the norm, RoPE and attention kernels used PDL at all).
//
// What a kernel may touch before its wait: constants (weights, norm weights, cos/sin tables) and
// the step's inputs that host copies wrote before the forward began (positions, slot mappings,
// sequence lengths, block tables), since a normally launched kernel (the embedding, a torch op)
// always stands between those copies and any PDL kernel. Never the previous kernels' outputs.
#pragma once

#include <cuda_runtime.h>

#include <utility>

namespace rtpllm::cuda {

__device__ __forceinline__ void wait_for_prior_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void allow_dependent_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}

// Launches `kernel` so that it may overlap the tail of the previous kernel on `stream`. The
// kernel must call wait_for_prior_grid() before touching anything that kernel writes (or reads:
// the successor's outputs may alias memory the allocator just recycled).
template <typename... KernelArgs, typename... Args>
cudaError_t launch_pdl(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t stream,
                       Args&&... args) {
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem_bytes;
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

}  // namespace rtpllm::cuda
