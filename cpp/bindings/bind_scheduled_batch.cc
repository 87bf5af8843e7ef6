// ScheduledBatch: scalars plus numpy views of the arrays the batch owns (no copies; each view
// keeps the batch alive through its base object).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <memory>
#include <vector>

#include "rtpllm/sched/scheduled_batch.h"

namespace py = pybind11;

namespace rtpllm::bindings {
namespace {

template <typename T>
py::array_t<T> view(py::object owner, std::vector<T>& data, std::vector<py::ssize_t> shape) {
  // numpy wants a non-null pointer even for an empty array.
  if (data.capacity() == 0) data.reserve(1);
  return py::array_t<T>(shape, data.data(), owner);
}

template <typename T>
auto vector_view(std::vector<T> ScheduledBatch::*member) {
  return [member](py::object self) {
    auto& batch = self.cast<ScheduledBatch&>();
    auto& data = batch.*member;
    return view<T>(self, data, {static_cast<py::ssize_t>(data.size())});
  };
}

}  // namespace

void bind_scheduled_batch(py::module_& m) {
  py::class_<ScheduledBatch, std::shared_ptr<ScheduledBatch>>(m, "ScheduledBatch",
                                                              "One step's work; arrays are views of memory the batch owns")
      .def_readonly("num_seqs", &ScheduledBatch::num_seqs)
      .def_readonly("num_tokens", &ScheduledBatch::num_tokens)
      .def_readonly("num_sampled", &ScheduledBatch::num_sampled)
      .def_readonly("max_query_len", &ScheduledBatch::max_query_len)
      .def_readonly("max_seq_len", &ScheduledBatch::max_seq_len)
      .def_readonly("max_blocks_per_seq", &ScheduledBatch::max_blocks_per_seq)
      .def_readonly("step_id", &ScheduledBatch::step_id)
      .def_property_readonly("request_ids", vector_view(&ScheduledBatch::request_ids))
      .def_property_readonly("input_token_ids", vector_view(&ScheduledBatch::input_token_ids))
      .def_property_readonly("positions", vector_view(&ScheduledBatch::positions))
      .def_property_readonly("query_start_loc", vector_view(&ScheduledBatch::query_start_loc))
      .def_property_readonly("seq_lens", vector_view(&ScheduledBatch::seq_lens))
      .def_property_readonly("num_computed", vector_view(&ScheduledBatch::num_computed))
      .def_property_readonly("slot_mapping", vector_view(&ScheduledBatch::slot_mapping))
      .def_property_readonly("logits_indices", vector_view(&ScheduledBatch::logits_indices))
      .def_property_readonly("sampled_request_ids", vector_view(&ScheduledBatch::sampled_request_ids))
      .def_readonly("num_draft_tokens", &ScheduledBatch::num_draft_tokens)
      .def_property_readonly("draft_counts", vector_view(&ScheduledBatch::draft_counts))
      .def_property_readonly("verify_offsets", vector_view(&ScheduledBatch::verify_offsets))
      .def_property_readonly("verify_logits_indices", vector_view(&ScheduledBatch::verify_logits_indices))
      .def_property_readonly("draft_token_indices", vector_view(&ScheduledBatch::draft_token_indices))
      .def_property_readonly("block_tables",
                             [](py::object self) {
                               auto& batch = self.cast<ScheduledBatch&>();
                               return view<int32_t>(self, batch.block_tables, {batch.num_seqs, batch.max_blocks_per_seq});
                             })
      .def("__len__", [](const ScheduledBatch& b) { return b.num_seqs; })
      .def("__repr__", [](const ScheduledBatch& b) {
        return "ScheduledBatch(step_id=" + std::to_string(b.step_id) + ", num_seqs=" + std::to_string(b.num_seqs) +
               ", num_tokens=" + std::to_string(b.num_tokens) + ", num_sampled=" + std::to_string(b.num_sampled) + ")";
      });
}

}  // namespace rtpllm::bindings
