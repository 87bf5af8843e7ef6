// Binds the fused elementwise kernels (cuda/ops). Pointers arrive as integers
// (tensor.data_ptr()), the stream as an integer (torch.cuda.current_stream().cuda_stream);
// the checked Python wrappers live in python/rtpllm/layers/cuda_ops.py.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "cuda_status.h"
#include "cuda/ops/dtype.h"
#include "cuda/ops/embedding.h"
#include "cuda/ops/rms_norm.h"
#include "cuda/ops/rope_cache_write.h"
#include "cuda/ops/silu_and_mul.h"

namespace py = pybind11;

namespace rtpllm::bindings {
namespace {

using cuda::ScalarType;

template <typename T = void>
T* ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

cudaStream_t as_stream(uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

std::string describe(ScalarType dtype, const std::string& sizes) {
  return "dtype=" + std::string(cuda::scalar_type_name(dtype)) + ", " + sizes;
}

}  // namespace

void bind_fused_ops(py::module_& m) {
  py::enum_<ScalarType>(m, "ScalarType", "Element type of a kernel's tensors")
      .value("float32", ScalarType::kFloat32)
      .value("float16", ScalarType::kFloat16)
      .value("bfloat16", ScalarType::kBFloat16);

  m.def(
      "rms_norm",
      [](uintptr_t out, uintptr_t input, uintptr_t weight, int64_t num_rows, int hidden, int64_t input_row_stride,
         int64_t out_row_stride, float eps, ScalarType dtype, uintptr_t stream) {
        const cuda::RmsNormParams params{ptr(out),        ptr<const void>(input), nullptr, ptr<const void>(weight),
                                         num_rows,        hidden,                 input_row_stride,
                                         out_row_stride,  0,                      eps};
        throw_if_error(cuda::rms_norm(params, dtype, as_stream(stream)), "rms_norm",
                       describe(dtype, "hidden=" + std::to_string(hidden)));
      },
      py::arg("out"), py::arg("input"), py::arg("weight"), py::arg("num_rows"), py::arg("hidden"),
      py::arg("input_row_stride"), py::arg("out_row_stride"), py::arg("eps"), py::arg("dtype"), py::arg("stream"),
      "out = weight * rmsnorm(input); rows of `hidden` elements");

  m.def(
      "fused_add_rms_norm",
      [](uintptr_t input, uintptr_t residual, uintptr_t weight, int64_t num_rows, int hidden, int64_t input_row_stride,
         int64_t residual_row_stride, float eps, ScalarType dtype, uintptr_t stream) {
        const cuda::RmsNormParams params{ptr(input),       ptr<const void>(input), ptr(residual),
                                         ptr<const void>(weight), num_rows,       hidden,
                                         input_row_stride, input_row_stride,      residual_row_stride,
                                         eps};
        throw_if_error(cuda::rms_norm(params, dtype, as_stream(stream)), "fused_add_rms_norm",
                       describe(dtype, "hidden=" + std::to_string(hidden)));
      },
      py::arg("input"), py::arg("residual"), py::arg("weight"), py::arg("num_rows"), py::arg("hidden"),
      py::arg("input_row_stride"), py::arg("residual_row_stride"), py::arg("eps"), py::arg("dtype"),
      py::arg("stream"), "In place: residual += input; input = weight * rmsnorm(residual)");

  m.def(
      "rope_and_cache_write",
      [](uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t positions, uintptr_t cos_sin_cache, uintptr_t slot_mapping,
         uintptr_t k_cache, uintptr_t v_cache, int num_tokens, int num_heads, int num_kv_heads, int head_dim,
         int rotary_dim, int64_t max_position, int64_t q_token_stride, int64_t k_token_stride,
         int64_t v_token_stride, ScalarType dtype, uintptr_t stream) {
        const cuda::RopeCacheWriteParams params{ptr(q),
                                                ptr<const void>(k),
                                                ptr<const void>(v),
                                                ptr<const int64_t>(positions),
                                                ptr<const float>(cos_sin_cache),
                                                ptr<const int64_t>(slot_mapping),
                                                ptr(k_cache),
                                                ptr(v_cache),
                                                num_tokens,
                                                num_heads,
                                                num_kv_heads,
                                                head_dim,
                                                rotary_dim,
                                                max_position,
                                                q_token_stride,
                                                k_token_stride,
                                                v_token_stride};
        throw_if_error(cuda::rope_and_cache_write(params, dtype, as_stream(stream)), "rope_and_cache_write",
                       describe(dtype, "head_dim=" + std::to_string(head_dim) +
                                           ", rotary_dim=" + std::to_string(rotary_dim)));
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("positions"), py::arg("cos_sin_cache"),
      py::arg("slot_mapping"), py::arg("k_cache"), py::arg("v_cache"), py::arg("num_tokens"), py::arg("num_heads"),
      py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("rotary_dim"), py::arg("max_position"),
      py::arg("q_token_stride"), py::arg("k_token_stride"), py::arg("v_token_stride"), py::arg("dtype"),
      py::arg("stream"), "Rotates q in place; writes rotated k and v into the paged cache at slot_mapping");

  m.def(
      "silu_and_mul",
      [](uintptr_t out, uintptr_t input, int64_t num_tokens, int inter_size, int64_t input_row_stride,
         int64_t out_row_stride, ScalarType dtype, uintptr_t stream) {
        const cuda::SiluAndMulParams params{ptr(out),   ptr<const void>(input), num_tokens,
                                            inter_size, input_row_stride,       out_row_stride};
        throw_if_error(cuda::silu_and_mul(params, dtype, as_stream(stream)), "silu_and_mul",
                       describe(dtype, "inter_size=" + std::to_string(inter_size)));
      },
      py::arg("out"), py::arg("input"), py::arg("num_tokens"), py::arg("inter_size"), py::arg("input_row_stride"),
      py::arg("out_row_stride"), py::arg("dtype"), py::arg("stream"), "out = silu(input[:, :I]) * input[:, I:]");

  m.def(
      "embedding",
      [](uintptr_t out, uintptr_t table, uintptr_t ids, int64_t num_tokens, int64_t vocab_size, int hidden,
         int64_t out_row_stride, bool ids_are_int64, ScalarType dtype, uintptr_t stream) {
        const cuda::EmbeddingParams params{ptr(out),   ptr<const void>(table), ptr<const void>(ids), num_tokens,
                                           vocab_size, hidden,                 out_row_stride,       ids_are_int64};
        throw_if_error(cuda::embedding(params, dtype, as_stream(stream)), "embedding",
                       describe(dtype, "hidden=" + std::to_string(hidden)));
      },
      py::arg("out"), py::arg("table"), py::arg("ids"), py::arg("num_tokens"), py::arg("vocab_size"), py::arg("hidden"),
      py::arg("out_row_stride"), py::arg("ids_are_int64"), py::arg("dtype"), py::arg("stream"),
      "out[t] = table[ids[t]] (zeros for an id outside [0, vocab_size))");
}

}  // namespace rtpllm::bindings
