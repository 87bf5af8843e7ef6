// The rtpllm._C extension module: one init function per component, defined in
// its own bind_*.cc file. No logic lives in the bindings.
#include <pybind11/pybind11.h>

namespace py = pybind11;

namespace rtpllm::bindings {
void bind_runtime(py::module_& m);
#ifdef RTPLLM_WITH_CUDA
void bind_cuda_kernels(py::module_& m);
#endif
}  // namespace rtpllm::bindings

PYBIND11_MODULE(_C, m) {
  m.doc() = "rtp-llm C++ runtime (scheduler, block manager, prefix cache) and CUDA kernels";
  rtpllm::bindings::bind_runtime(m);
#ifdef RTPLLM_WITH_CUDA
  m.attr("has_cuda") = true;
  rtpllm::bindings::bind_cuda_kernels(m);
#else
  m.attr("has_cuda") = false;
#endif
}
