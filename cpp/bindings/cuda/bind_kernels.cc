// Binds the CUDA kernels: one function per kernel family, each in its own bind_*.cc file.
#include <pybind11/pybind11.h>

namespace py = pybind11;

namespace rtpllm::bindings {
void bind_decode_attention(py::module_& m);
void bind_prefill_attention(py::module_& m);
void bind_fused_ops(py::module_& m);
void bind_gemm(py::module_& m);
void bind_kv_copy_engine(py::module_& m);

void bind_cuda_kernels(py::module_& m) {
  auto ops = m.def_submodule("ops", "CUDA kernels (raw device pointers + stream)");
  bind_decode_attention(ops);
  bind_prefill_attention(ops);
  bind_fused_ops(ops);
  bind_gemm(ops);
  bind_kv_copy_engine(m);  // a runtime class, next to the CPU engine, not a kernel
}
}  // namespace rtpllm::bindings
