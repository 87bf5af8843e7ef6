// The CUDA copy engine and pinned host allocator (cuda/kvstore), for _C.has_cuda builds.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>

#include "cuda/kvstore/cuda_copy_engine.h"
#include "cuda/memory/cuda_host_allocator.h"

namespace py = pybind11;

namespace rtpllm::bindings {

void bind_kv_copy_engine(py::module_& m) {
  using cuda::CudaCopyMethod;
  using cuda::CudaHostAllocator;
  using cuda::CudaKVCopyEngine;
  py::class_<CudaHostAllocator, HostAllocator, std::shared_ptr<CudaHostAllocator>>(m, "CudaHostAllocator",
                                                                                   "Pinned, device-mapped host memory")
      .def(py::init<>());
  py::enum_<CudaCopyMethod>(m, "CudaCopyMethod")
      .value("KERNEL", CudaCopyMethod::KERNEL)
      .value("MEMCPY", CudaCopyMethod::MEMCPY)
      .value("STAGED", CudaCopyMethod::STAGED)
      .value("HYBRID", CudaCopyMethod::HYBRID);
  py::class_<CudaKVCopyEngine, KVCopyEngine, std::shared_ptr<CudaKVCopyEngine>>(
      m, "CudaKVCopyEngine", "Block copies on a stream of its own, ordered after the compute stream's work")
      .def(py::init<KVLayout, uintptr_t, CudaCopyMethod, int32_t>(), py::arg("layout"), py::arg("compute_stream"),
           py::arg("method") = CudaCopyMethod::KERNEL, py::arg("max_ctas") = 32)
      .def_property_readonly("copy_stream", &CudaKVCopyEngine::copy_stream);
}

}  // namespace rtpllm::bindings
