// SchedulerOptions and CacheOptions (validated when a Scheduler is built from them).
#include <pybind11/pybind11.h>

#include <string>

#include "rtpllm/cache/cache_options.h"
#include "rtpllm/sched/scheduler_options.h"

namespace py = pybind11;

namespace rtpllm::bindings {

void bind_options(py::module_& m) {
  py::class_<SchedulerOptions>(m, "SchedulerOptions")
      .def(py::init([](int32_t max_num_batched_tokens, int32_t max_num_seqs, bool enable_chunked_prefill,
                       int32_t max_model_len) {
             return SchedulerOptions{max_num_batched_tokens, max_num_seqs, enable_chunked_prefill, max_model_len};
           }),
           py::kw_only(), py::arg("max_num_batched_tokens") = 8192, py::arg("max_num_seqs") = 256,
           py::arg("enable_chunked_prefill") = true, py::arg("max_model_len") = 4096)
      .def_readwrite("max_num_batched_tokens", &SchedulerOptions::max_num_batched_tokens)
      .def_readwrite("max_num_seqs", &SchedulerOptions::max_num_seqs)
      .def_readwrite("enable_chunked_prefill", &SchedulerOptions::enable_chunked_prefill)
      .def_readwrite("max_model_len", &SchedulerOptions::max_model_len)
      .def("validate", &SchedulerOptions::validate)
      .def("__repr__", [](const SchedulerOptions& o) {
        return "SchedulerOptions(max_num_batched_tokens=" + std::to_string(o.max_num_batched_tokens) +
               ", max_num_seqs=" + std::to_string(o.max_num_seqs) +
               ", enable_chunked_prefill=" + (o.enable_chunked_prefill ? "True" : "False") +
               ", max_model_len=" + std::to_string(o.max_model_len) + ")";
      });

  py::class_<CacheOptions>(m, "CacheOptions")
      .def(py::init([](int32_t num_blocks, int32_t block_size, bool enable_prefix_caching, uint64_t root_hash) {
             return CacheOptions{num_blocks, block_size, enable_prefix_caching, root_hash};
           }),
           py::kw_only(), py::arg("num_blocks") = 1024, py::arg("block_size") = 16,
           py::arg("enable_prefix_caching") = true, py::arg("root_hash") = 0)
      .def_readwrite("num_blocks", &CacheOptions::num_blocks)
      .def_readwrite("block_size", &CacheOptions::block_size)
      .def_readwrite("enable_prefix_caching", &CacheOptions::enable_prefix_caching)
      .def_readwrite("root_hash", &CacheOptions::root_hash)
      .def("validate", &CacheOptions::validate)
      .def("__repr__", [](const CacheOptions& o) {
        return "CacheOptions(num_blocks=" + std::to_string(o.num_blocks) + ", block_size=" + std::to_string(o.block_size) +
               ", enable_prefix_caching=" + (o.enable_prefix_caching ? "True" : "False") +
               ", root_hash=" + std::to_string(o.root_hash) + ")";
      });
}

}  // namespace rtpllm::bindings
