// Internal entry points of the prefill attention kernels, one per implementation, instantiated for
// T in {__half, __nv_bfloat16} and HEAD_DIM in {64, 128} in their own .cu files (so they compile in
// parallel). Parameters are already validated by launch_prefill_attention.
#pragma once

#include <cuda_runtime.h>

#include "cuda/attention/prefill_attention_common.cuh"

namespace rtpllm::cuda::prefill {

template <typename T, int HEAD_DIM>
cudaError_t run_prefill_sm80(const KernelParams& params, int num_seqs, int max_query_len, cudaStream_t stream);

template <typename T, int HEAD_DIM>
cudaError_t run_prefill_sm90(const KernelParams& params, int num_seqs, int max_query_len, cudaStream_t stream);

}  // namespace rtpllm::cuda::prefill
