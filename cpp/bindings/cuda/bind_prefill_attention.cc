// Binds the prefill attention kernel into rtpllm._C.ops. Device pointers (tensor.data_ptr()) and
// the stream come in as integers; the checked entry point is python/rtpllm/layers/prefill_attention.py.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "cuda/attention/prefill_attention.h"
#include "cuda_status.h"

namespace py = pybind11;

namespace rtpllm::bindings {
namespace {

std::string describe(const cuda::PrefillAttentionParams& p) {
  return "dtype=" + std::string(cuda::scalar_type_name(p.dtype)) + ", head_dim=" + std::to_string(p.head_dim) +
         ", block_size=" + std::to_string(p.block_size) + ", num_heads=" + std::to_string(p.num_heads) +
         ", num_kv_heads=" + std::to_string(p.num_kv_heads) + ", num_seqs=" + std::to_string(p.num_seqs) +
         ", max_query_len=" + std::to_string(p.max_query_len) + ", impl=" + std::to_string(static_cast<int>(p.impl));
}

}  // namespace

void bind_prefill_attention(py::module_& m) {
  using cuda::PrefillAttentionImpl;
  using cuda::PrefillAttentionParams;

  py::enum_<PrefillAttentionImpl>(m, "PrefillAttentionImpl", "Which prefill attention kernel to run")
      .value("AUTO", PrefillAttentionImpl::kAuto)
      .value("SM80_MMA", PrefillAttentionImpl::kSm80Mma)
      .value("SM90_WGMMA", PrefillAttentionImpl::kSm90Wgmma);

  m.def(
      "prefill_attention",
      [](uintptr_t out, uintptr_t q, uintptr_t kv_cache, uintptr_t query_start_loc, uintptr_t seq_lens,
         uintptr_t block_tables, int64_t q_token_stride, int64_t out_token_stride, int num_seqs, int num_heads,
         int num_kv_heads, int head_dim, int block_size, int num_blocks, int max_blocks_per_seq, int max_query_len,
         float scale, cuda::ScalarType dtype, PrefillAttentionImpl impl, uintptr_t stream) {
        PrefillAttentionParams params;
        params.out = reinterpret_cast<void*>(out);
        params.q = reinterpret_cast<const void*>(q);
        params.kv_cache = reinterpret_cast<const void*>(kv_cache);
        params.query_start_loc = reinterpret_cast<const int32_t*>(query_start_loc);
        params.seq_lens = reinterpret_cast<const int32_t*>(seq_lens);
        params.block_tables = reinterpret_cast<const int32_t*>(block_tables);
        params.q_token_stride = q_token_stride;
        params.out_token_stride = out_token_stride;
        params.num_seqs = num_seqs;
        params.num_heads = num_heads;
        params.num_kv_heads = num_kv_heads;
        params.head_dim = head_dim;
        params.block_size = block_size;
        params.num_blocks = num_blocks;
        params.max_blocks_per_seq = max_blocks_per_seq;
        params.max_query_len = max_query_len;
        params.scale = scale;
        params.dtype = dtype;
        params.impl = impl;
        if (const char* problem = cuda::check_prefill_attention_params(params)) {
          throw py::value_error(std::string("prefill_attention: ") + problem);
        }
        throw_if_error(cuda::launch_prefill_attention(params, reinterpret_cast<cudaStream_t>(stream)),
                       "prefill_attention", describe(params));
      },
      py::kw_only(), py::arg("out"), py::arg("q"), py::arg("kv_cache"), py::arg("query_start_loc"),
      py::arg("seq_lens"), py::arg("block_tables"), py::arg("q_token_stride"), py::arg("out_token_stride"),
      py::arg("num_seqs"), py::arg("num_heads"), py::arg("num_kv_heads"), py::arg("head_dim"),
      py::arg("block_size"), py::arg("num_blocks"), py::arg("max_blocks_per_seq"), py::arg("max_query_len"),
      py::arg("scale"), py::arg("dtype"), py::arg("impl"), py::arg("stream"),
      "Causal prefill/extend attention over the paged KV cache (raw pointers; see "
      "rtpllm.layers.prefill_attention for the checked wrapper).");
}

}  // namespace rtpllm::bindings
