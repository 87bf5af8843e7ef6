// Binds the GEMMs (cuda/gemm): the decode GEMV and the CUTLASS sm90 kernels. Pointers and the
// stream arrive as integers; the checked Python wrappers are python/rtpllm/layers/cuda_gemm.py
// and python/rtpllm/layers/sm90_gemm.py.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "cuda_status.h"
#include "cuda/gemm/gemv.h"
#include "cuda/gemm/sm90_gemm.h"

namespace py = pybind11;

namespace rtpllm::bindings {
namespace {

// The GEMV entry points share one signature: y, x, w, bias, sizes, strides, dtype, stream.
template <cudaError_t (*Launch)(const cuda::GemvParams&, cuda::ScalarType, cudaStream_t)>
void bind_gemv(py::module_& m, const char* name, const char* doc) {
  m.def(
      name,
      [name](uintptr_t y, uintptr_t x, uintptr_t w, uintptr_t bias, int rows, int n, int k, int64_t ldx, int64_t ldy,
             cuda::ScalarType dtype, uintptr_t stream) {
        const cuda::GemvParams params{reinterpret_cast<void*>(y), reinterpret_cast<const void*>(x),
                                      reinterpret_cast<const void*>(w), reinterpret_cast<const void*>(bias),
                                      rows, n, k, ldx, ldy};
        throw_if_error(Launch(params, dtype, reinterpret_cast<cudaStream_t>(stream)), name,
                       "m=" + std::to_string(rows) + ", n=" + std::to_string(n) + ", k=" + std::to_string(k));
      },
      py::arg("y"), py::arg("x"), py::arg("w"), py::arg("bias"), py::arg("m"), py::arg("n"), py::arg("k"),
      py::arg("ldx"), py::arg("ldy"), py::arg("dtype"), py::arg("stream"), doc);
}

}  // namespace

void bind_gemm(py::module_& m) {
  m.attr("GEMV_MAX_ROWS") = cuda::kGemvMaxRows;
  bind_gemv<&cuda::gemv>(m, "gemv", "y[m, n] = x[m, k] @ w[n, k]^T (+ bias) for decode batch sizes (m <= GEMV_MAX_ROWS)");
  bind_gemv<&cuda::gemv_silu_and_mul>(
      m, "gemv_silu_and_mul",
      "y[m, n] = silu(x @ w[:n]^T) * (x @ w[n:]^T) for decode batch sizes (w is gate | up, [2n, k])");

  m.def(
      "sm90_gemm_kernels",
      [] {
        py::list kernels;
        for (int i = 0; i < cuda::sm90_gemm_kernel_count(); ++i) {
          const cuda::Sm90GemmKernelInfo& info = cuda::sm90_gemm_kernel_info(i);
          py::dict d;
          d["name"] = info.name;
          d["swap_ab"] = info.swap_ab;
          d["stream_k"] = info.stream_k;
          d["tile"] = py::make_tuple(info.tile_m, info.tile_n, info.tile_k);
          kernels.append(d);
        }
        return kernels;
      },
      "The built sm90 GEMM kernels, in kernel-id order: name, swap_ab, stream_k, tile (m, n, k)");

  auto params = [](uintptr_t y, uintptr_t x, uintptr_t w, uintptr_t bias, uintptr_t residual, int rows, int n, int k,
                   int64_t ldx, int64_t ldy, int64_t ld_residual, int splits, int swizzle, uintptr_t workspace,
                   size_t workspace_bytes) {
    return cuda::Sm90GemmParams{reinterpret_cast<void*>(y), reinterpret_cast<const void*>(x),
                                reinterpret_cast<const void*>(w), reinterpret_cast<const void*>(bias),
                                reinterpret_cast<const void*>(residual), rows, n, k, ldx, ldy, ld_residual, splits,
                                swizzle, reinterpret_cast<void*>(workspace), workspace_bytes};
  };
  auto describe = [](int kernel, int rows, int n, int k, int splits) {
    return "kernel=" + std::to_string(kernel) + ", m=" + std::to_string(rows) + ", n=" + std::to_string(n) +
           ", k=" + std::to_string(k) + ", splits=" + std::to_string(splits);
  };
  m.def(
      "sm90_gemm",
      [params, describe](int kernel, uintptr_t y, uintptr_t x, uintptr_t w, uintptr_t bias, uintptr_t residual,
                         int rows, int n, int k, int64_t ldx, int64_t ldy, int64_t ld_residual, int splits,
                         int swizzle, uintptr_t workspace, size_t workspace_bytes, cuda::ScalarType dtype,
                         uintptr_t stream) {
        const auto p = params(y, x, w, bias, residual, rows, n, k, ldx, ldy, ld_residual, splits, swizzle,
                              workspace, workspace_bytes);
        throw_if_error(cuda::sm90_gemm(kernel, p, dtype, reinterpret_cast<cudaStream_t>(stream)), "sm90_gemm",
                       describe(kernel, rows, n, k, splits));
      },
      py::arg("kernel"), py::arg("y"), py::arg("x"), py::arg("w"), py::arg("bias"), py::arg("residual"),
      py::arg("m"), py::arg("n"), py::arg("k"), py::arg("ldx"), py::arg("ldy"), py::arg("ld_residual"),
      py::arg("splits"), py::arg("swizzle"), py::arg("workspace"), py::arg("workspace_bytes"), py::arg("dtype"),
      py::arg("stream"),
      "y[m, n] = x[m, k] @ w[n, k]^T (+ bias[n]) (+ residual[m, n]) with sm90 kernel `kernel`");
  m.def(
      "sm90_gemm_workspace_size",
      [params, describe](int kernel, uintptr_t y, uintptr_t x, uintptr_t w, int rows, int n, int k, int64_t ldx,
                         int64_t ldy, int splits, cuda::ScalarType dtype) {
        size_t bytes = 0;
        const auto p = params(y, x, w, 0, 0, rows, n, k, ldx, ldy, 0, splits, 1, 0, 0);
        throw_if_error(cuda::sm90_gemm_workspace_size(kernel, p, dtype, &bytes), "sm90_gemm_workspace_size",
                       describe(kernel, rows, n, k, splits));
        return bytes;
      },
      py::arg("kernel"), py::arg("y"), py::arg("x"), py::arg("w"), py::arg("m"), py::arg("n"), py::arg("k"),
      py::arg("ldx"), py::arg("ldy"), py::arg("splits"), py::arg("dtype"),
      "Workspace bytes sm90 kernel `kernel` needs for this problem (raises when it cannot run it)");
}

}  // namespace rtpllm::bindings
