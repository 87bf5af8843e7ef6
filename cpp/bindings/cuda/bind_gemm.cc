// Binds the decode GEMV (cuda/gemm). Pointers and the stream arrive as integers; the checked
// Python wrapper is python/rtpllm/layers/cuda_gemm.py.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "cuda_status.h"
#include "cuda/gemm/gemv.h"

namespace py = pybind11;

namespace rtpllm::bindings {

void bind_gemm(py::module_& m) {
  m.attr("GEMV_MAX_ROWS") = cuda::kGemvMaxRows;
  m.def(
      "gemv",
      [](uintptr_t y, uintptr_t x, uintptr_t w, uintptr_t bias, int rows, int n, int k, int64_t ldx, int64_t ldy,
         cuda::ScalarType dtype, uintptr_t stream) {
        const cuda::GemvParams params{reinterpret_cast<void*>(y), reinterpret_cast<const void*>(x),
                                      reinterpret_cast<const void*>(w), reinterpret_cast<const void*>(bias),
                                      rows, n, k, ldx, ldy};
        throw_if_error(cuda::gemv(params, dtype, reinterpret_cast<cudaStream_t>(stream)), "gemv",
                       "m=" + std::to_string(rows) + ", n=" + std::to_string(n) + ", k=" + std::to_string(k));
      },
      py::arg("y"), py::arg("x"), py::arg("w"), py::arg("bias"), py::arg("m"), py::arg("n"), py::arg("k"),
      py::arg("ldx"), py::arg("ldy"), py::arg("dtype"), py::arg("stream"),
      "y[m, n] = x[m, k] @ w[n, k]^T (+ bias) for decode batch sizes (m <= GEMV_MAX_ROWS)");
}

}  // namespace rtpllm::bindings
