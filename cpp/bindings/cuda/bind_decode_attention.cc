// Binds paged decode attention (cuda/attention/paged_decode_attention.h): the host-side plan
// and the graph-capturable launch. The checked wrapper is python/rtpllm/layers/cuda_ops.py.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "cuda_status.h"
#include "cuda/attention/paged_decode_attention.h"

namespace py = pybind11;

namespace rtpllm::bindings {
namespace {

std::string describe(cuda::ScalarType dtype, int head_dim, int block_size, int num_heads, int num_kv_heads) {
  return "dtype=" + std::string(cuda::scalar_type_name(dtype)) + ", head_dim=" + std::to_string(head_dim) +
         ", block_size=" + std::to_string(block_size) + ", num_heads=" + std::to_string(num_heads) +
         ", num_kv_heads=" + std::to_string(num_kv_heads) + "; supported: float16/bfloat16, head_dim 64/128, "
         "block_size 16/32/64";
}

}  // namespace

void bind_decode_attention(py::module_& m) {
  m.def(
      "paged_decode_plan",
      [](int num_seqs, int num_heads, int num_kv_heads, int head_dim, int block_size, cuda::ScalarType dtype,
         int max_seq_len, int max_splits) {
        const cuda::PagedDecodePlanInputs inputs{num_seqs,   num_heads, num_kv_heads, head_dim,
                                                 block_size, dtype,     max_seq_len,  max_splits};
        int num_splits = 0;
        throw_if_error(cuda::plan_paged_decode(inputs, &num_splits), "paged_decode_plan",
                       describe(dtype, head_dim, block_size, num_heads, num_kv_heads));
        return num_splits;
      },
      py::arg("num_seqs"), py::arg("num_heads"), py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("block_size"),
      py::arg("dtype"), py::arg("max_seq_len"), py::arg("max_splits"),
      "Host only: how many splits to cut each context into (1 = no split merge)");

  m.def(
      "paged_decode_attention",
      [](uintptr_t out, uintptr_t q, uintptr_t k_cache, uintptr_t v_cache, uintptr_t block_tables,
         uintptr_t seq_lens, uintptr_t partial_out, uintptr_t partial_lse, uintptr_t split_counters, int num_seqs,
         int num_heads, int num_kv_heads, int head_dim, int block_size, int block_table_stride, int64_t q_stride,
         int64_t out_stride, int num_splits, float scale, cuda::ScalarType dtype, uintptr_t stream, uintptr_t rope_k,
         uintptr_t rope_v, uintptr_t positions, uintptr_t cos_sin_cache, uintptr_t slot_mapping, int64_t max_position,
         int64_t k_stride, int64_t v_stride) {
        const cuda::DecodeRopeParams rope{reinterpret_cast<const void*>(rope_k),
                                          reinterpret_cast<const void*>(rope_v),
                                          reinterpret_cast<const int64_t*>(positions),
                                          reinterpret_cast<const float*>(cos_sin_cache),
                                          reinterpret_cast<const int64_t*>(slot_mapping),
                                          max_position,
                                          k_stride,
                                          v_stride};
        const cuda::PagedDecodeParams params{reinterpret_cast<const void*>(q),
                                             reinterpret_cast<void*>(k_cache),
                                             reinterpret_cast<void*>(v_cache),
                                             reinterpret_cast<const int32_t*>(block_tables),
                                             reinterpret_cast<const int32_t*>(seq_lens),
                                             reinterpret_cast<void*>(out),
                                             reinterpret_cast<float*>(partial_out),
                                             reinterpret_cast<float*>(partial_lse),
                                             reinterpret_cast<int*>(split_counters),
                                             num_seqs,
                                             num_heads,
                                             num_kv_heads,
                                             head_dim,
                                             block_size,
                                             block_table_stride,
                                             q_stride,
                                             out_stride,
                                             num_splits,
                                             scale,
                                             rope};
        throw_if_error(cuda::paged_decode_attention(params, dtype, reinterpret_cast<cudaStream_t>(stream)),
                       "paged_decode_attention", describe(dtype, head_dim, block_size, num_heads, num_kv_heads));
      },
      py::arg("out"), py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("block_tables"),
      py::arg("seq_lens"), py::arg("partial_out"), py::arg("partial_lse"), py::arg("split_counters"),
      py::arg("num_seqs"), py::arg("num_heads"), py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("block_size"),
      py::arg("block_table_stride"),
      py::arg("q_stride"), py::arg("out_stride"), py::arg("num_splits"), py::arg("scale"), py::arg("dtype"),
      py::arg("stream"), py::arg("rope_k") = 0, py::arg("rope_v") = 0, py::arg("positions") = 0,
      py::arg("cos_sin_cache") = 0, py::arg("slot_mapping") = 0, py::arg("max_position") = 0,
      py::arg("k_stride") = 0, py::arg("v_stride") = 0,
      "One query token per sequence over the paged KV cache; CUDA-graph capturable. With cos_sin_cache "
      "set, q and rope_k are pre-RoPE and the kernel rotates them and writes the new K/V row itself");
}

}  // namespace rtpllm::bindings
