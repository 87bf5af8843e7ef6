// rtpllm._C.loader: the pipelined safetensors reader (cpp/rtpllm/loader). A WeightLoader owns its
// staging allocator and sink: host destinations (device=None) use aligned malloc and memcpy; a
// CUDA device (built with RTPLLM_CUDA) uses pinned buffers and copies on a stream of its own.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "rtpllm/core/host_allocator.h"
#include "rtpllm/loader/gguf_dequantize.h"
#include "rtpllm/loader/load_error.h"
#include "rtpllm/loader/memcpy_sink.h"
#include "rtpllm/loader/safetensors_header.h"
#include "rtpllm/loader/weight_loader.h"
#ifdef RTPLLM_WITH_CUDA
#include "cuda/loader/cuda_copy_sink.h"
#include "cuda/memory/cuda_host_allocator.h"
#endif

namespace py = pybind11;

namespace rtpllm::bindings {
namespace {

using namespace rtpllm::loader;

// Owns what the WeightLoader references, in construction order (the loader is destroyed first).
struct BoundLoader {
  std::unique_ptr<HostAllocator> allocator;
  std::unique_ptr<ChunkSink> sink;
  std::unique_ptr<WeightLoader> loader;
};

DirectIo direct_io_from(const std::string& mode) {
  if (mode == "auto") return DirectIo::kAuto;
  if (mode == "always") return DirectIo::kAlways;
  if (mode == "never") return DirectIo::kNever;
  throw py::value_error("direct_io: must be 'auto', 'always' or 'never', got '" + mode + "'");
}

std::unique_ptr<BoundLoader> make_loader(size_t num_threads, uint64_t chunk_bytes, size_t buffers_per_thread,
                                         const std::string& direct_io, std::optional<int> cuda_device) {
  auto bound = std::make_unique<BoundLoader>();
  if (cuda_device.has_value()) {
#ifdef RTPLLM_WITH_CUDA
    bound->allocator = std::make_unique<cuda::CudaHostAllocator>();
    bound->sink = std::make_unique<cuda::CudaCopySink>(*cuda_device);
#else
    throw py::value_error("cuda_device: this build of rtpllm has no CUDA support (build with RTPLLM_CUDA=1)");
#endif
  } else {
    bound->allocator = std::make_unique<AlignedHostAllocator>();
    bound->sink = std::make_unique<MemcpySink>();
  }
  LoaderOptions options;
  options.num_threads = num_threads;
  options.buffers_per_thread = buffers_per_thread;
  options.plan.chunk_bytes = chunk_bytes;
  options.direct_io = direct_io_from(direct_io);
  try {
    bound->loader = std::make_unique<WeightLoader>(options, *bound->allocator, *bound->sink);
  } catch (const std::invalid_argument& e) {
    throw py::value_error(e.what());
  }
  return bound;
}

}  // namespace

void bind_loader(py::module_& parent) {
  auto m = parent.def_submodule("loader", "Pipelined safetensors reader (file-order reads, staging ring, sink)");

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const LoadError& e) {
      PyObject* type = PyExc_ValueError;
      if (e.kind() == LoadErrorKind::kNotFound) type = PyExc_FileNotFoundError;
      if (e.kind() == LoadErrorKind::kIo) type = PyExc_OSError;
      PyErr_SetString(type, e.what());
    }
  });

  py::class_<TensorInfo>(m, "TensorInfo")
      .def_readonly("name", &TensorInfo::name)
      .def_readonly("dtype", &TensorInfo::dtype)
      .def_readonly("shape", &TensorInfo::shape)
      .def_readonly("offset", &TensorInfo::offset, "absolute byte offset in the file")
      .def_readonly("nbytes", &TensorInfo::nbytes)
      .def("__repr__", [](const TensorInfo& t) {
        return "TensorInfo(" + t.name + ", " + t.dtype + ", offset=" + std::to_string(t.offset) +
               ", nbytes=" + std::to_string(t.nbytes) + ")";
      });

  py::class_<SafetensorsHeader>(m, "SafetensorsHeader")
      .def_property_readonly("file", &SafetensorsHeader::file)
      .def_property_readonly("file_size", &SafetensorsHeader::file_size)
      .def_property_readonly("data_offset", &SafetensorsHeader::data_offset)
      .def_property_readonly("tensors", &SafetensorsHeader::tensors, "in file order");
  m.def("read_safetensors_header", &SafetensorsHeader::read, py::arg("path"),
        "The validated header of a safetensors file; FileNotFoundError / ValueError name the file and tensor.");

  m.def(
      "gguf_type_supported", [](uint32_t ggml_type) { return gguf_type_supported(ggml_type); }, py::arg("ggml_type"),
      "True for the ggml types dequantize_gguf decodes (F32, F16, BF16, Q8_0, Q4_0, Q4_1).");
  m.def(
      "dequantize_gguf",
      [](uint32_t ggml_type, uintptr_t src, uint64_t src_bytes, uintptr_t dst, uint64_t num_values,
         size_t num_threads, std::optional<std::vector<uint64_t>> row_order, uint64_t row_values) {
        py::gil_scoped_release release;
        dequantize_gguf(ggml_type, reinterpret_cast<const uint8_t*>(src), src_bytes, reinterpret_cast<float*>(dst),
                        num_values, num_threads, row_order ? row_order->data() : nullptr, row_values);
      },
      py::arg("ggml_type"), py::arg("src"), py::arg("src_bytes"), py::arg("dst"), py::arg("num_values"),
      py::arg("num_threads") = 4, py::kw_only(), py::arg("row_order") = std::nullopt, py::arg("row_values") = 0,
      "Host GGUF data at address `src` -> `num_values` float32 at address `dst`, in one pass over threads; "
      "with `row_order`, source row r (of `row_values` values) lands in row row_order[r]. ValueError when the "
      "byte count does not match, the rows do not fit or the type is not supported.");

  py::class_<TensorRequest>(m, "TensorRequest")
      .def(py::init([](std::string file, std::string tensor, uintptr_t dst, uint64_t dst_bytes, uint64_t begin,
                       std::optional<uint64_t> row_bytes, uint64_t rows, uint64_t src_stride, uint64_t dst_stride) {
             TensorRequest r;
             r.file = std::move(file);
             r.tensor = std::move(tensor);
             r.dst = dst;
             r.dst_bytes = dst_bytes;
             r.begin = begin;
             r.row_bytes = row_bytes.value_or(dst_bytes);
             r.rows = rows;
             r.src_stride = src_stride;
             r.dst_stride = dst_stride;
             return r;
           }),
           py::arg("file"), py::arg("tensor"), py::arg("dst"), py::arg("dst_bytes"), py::kw_only(),
           py::arg("begin") = 0, py::arg("row_bytes") = std::nullopt, py::arg("rows") = 1,
           py::arg("src_stride") = 0, py::arg("dst_stride") = 0,
           "Bytes of tensor `tensor` of `file` into [dst, dst + dst_bytes). Default: the bytes from `begin` "
           "filling the destination. Strided (a column slice): `rows` rows of `row_bytes`, row r read at "
           "begin + r * src_stride and written at dst + r * dst_stride.")
      .def_readonly("file", &TensorRequest::file)
      .def_readonly("tensor", &TensorRequest::tensor)
      .def_readonly("dst", &TensorRequest::dst)
      .def_readonly("dst_bytes", &TensorRequest::dst_bytes);

  py::class_<LoadStats>(m, "LoadStats")
      .def_readonly("bytes_copied", &LoadStats::bytes_copied)
      .def_readonly("bytes_read", &LoadStats::bytes_read)
      .def_readonly("num_chunks", &LoadStats::num_chunks)
      .def_readonly("num_threads", &LoadStats::num_threads)
      .def_readonly("direct_files", &LoadStats::direct_files)
      .def_readonly("num_files", &LoadStats::num_files)
      .def_readonly("seconds", &LoadStats::seconds);

  py::class_<LoadJob>(m, "LoadJob")
      .def("wait_for", &LoadJob::wait_for, py::arg("seconds"), py::call_guard<py::gil_scoped_release>(),
           "True once the readers stopped (done or failed); waits at most `seconds`.")
      .def("finish", &LoadJob::finish, py::call_guard<py::gil_scoped_release>(),
           "Waits for every copy; raises the first error. Call once.")
      .def_property_readonly("bytes_done", &LoadJob::bytes_done)
      .def_property_readonly("total_bytes", &LoadJob::total_bytes);

  py::class_<BoundLoader>(m, "WeightLoader")
      .def(py::init(&make_loader), py::kw_only(), py::arg("num_threads") = 8, py::arg("chunk_bytes") = 16ull << 20,
           py::arg("buffers_per_thread") = 2, py::arg("direct_io") = "auto", py::arg("cuda_device") = std::nullopt,
           "Host destinations when cuda_device is None, else device pointers on that CUDA device.")
      .def(
          "header", [](BoundLoader& b, const std::string& path) { return b.loader->header(path); }, py::arg("path"))
      .def(
          "start",
          [](BoundLoader& b, const std::vector<TensorRequest>& requests) { return b.loader->start(requests); },
          py::arg("requests"), py::keep_alive<0, 1>(),
          "Validates every request (raising before any byte moves), then starts the readers.");
}

}  // namespace rtpllm::bindings
