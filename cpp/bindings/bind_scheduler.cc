// Scheduler and SchedulerStats. Calls keep the GIL: the scheduler is not thread-safe, and the GIL
// is what serializes the engine's step thread against request submission.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <optional>
#include <string>

#include "rtpllm/sched/scheduler.h"

namespace py = pybind11;

namespace rtpllm::bindings {
namespace {

// update() and resolve(): the sampled tokens as an int32 array, the outputs as a list.
template <void (Scheduler::*Apply)(const ScheduledBatch&, const TokenId*, size_t, StepOutputs&)>
py::list apply_sampled(Scheduler& scheduler, const ScheduledBatch& batch, py::handle sampled_token_ids) {
  if (py::isinstance<py::array>(sampled_token_ids)) {
    const char kind = py::reinterpret_borrow<py::array>(sampled_token_ids).dtype().kind();
    if (kind != 'i' && kind != 'u') throw py::value_error("sampled_token_ids: expected an integer array");
  }
  const auto sampled = py::array_t<int32_t, py::array::c_style | py::array::forcecast>::ensure(sampled_token_ids);
  if (!sampled) throw py::value_error("sampled_token_ids: expected an int32 array or a list of int");
  if (sampled.ndim() > 1) throw py::value_error("sampled_token_ids: expected a 1-D array");
  StepOutputs outputs;
  (scheduler.*Apply)(batch, sampled.data(), static_cast<size_t>(sampled.size()), outputs);
  py::list result(outputs.size());
  for (size_t i = 0; i < outputs.size(); ++i) result[i] = py::cast(outputs.materialize(i));
  return result;
}

}  // namespace

void bind_scheduler(py::module_& m) {
  py::class_<SchedulerStats>(m, "SchedulerStats")
      .def_readonly("num_running", &SchedulerStats::num_running)
      .def_readonly("num_waiting", &SchedulerStats::num_waiting)
      .def_readonly("num_preempted_total", &SchedulerStats::num_preempted_total)
      .def_readonly("blocks_used", &SchedulerStats::blocks_used)
      .def_readonly("blocks_total", &SchedulerStats::blocks_total)
      .def_readonly("num_free_blocks", &SchedulerStats::num_free_blocks)
      .def_readonly("num_cached_blocks", &SchedulerStats::num_cached_blocks)
      .def_readonly("num_evicted_blocks", &SchedulerStats::num_evicted_blocks)
      .def_readonly("prefix_queries", &SchedulerStats::prefix_queries)
      .def_readonly("prefix_hits", &SchedulerStats::prefix_hits)
      .def_readonly("kv_usage", &SchedulerStats::kv_usage)
      .def_readonly("num_steps", &SchedulerStats::num_steps)
      .def_readonly("num_waiting_for_kv", &SchedulerStats::num_waiting_for_kv)
      .def_readonly("kv_tier_hit_blocks", &SchedulerStats::kv_tier_hit_blocks)
      .def_readonly("kv_tier_failed_loads", &SchedulerStats::kv_tier_failed_loads)
      .def_readonly("kv_tier_saved_blocks", &SchedulerStats::kv_tier_saved_blocks)
      .def_readonly("kv_transfer_held_blocks", &SchedulerStats::kv_transfer_held_blocks)
      .def("__repr__", [](const SchedulerStats& s) {
        return "SchedulerStats(num_running=" + std::to_string(s.num_running) + ", num_waiting=" +
               std::to_string(s.num_waiting) + ", num_preempted_total=" + std::to_string(s.num_preempted_total) +
               ", blocks_used=" + std::to_string(s.blocks_used) + ", blocks_total=" + std::to_string(s.blocks_total) +
               ", prefix_queries=" + std::to_string(s.prefix_queries) + ", prefix_hits=" + std::to_string(s.prefix_hits) + ")";
      });

  py::class_<Scheduler>(m, "Scheduler", "Continuous-batching scheduler over a paged KV pool with prefix caching")
      .def(py::init<const SchedulerOptions&, const CacheOptions&>(), py::arg("options"), py::arg("cache_options"))
      .def("add_request", &Scheduler::add_request, py::arg("spec"))
      .def("schedule", [](Scheduler& s) {
        auto batch = std::make_shared<ScheduledBatch>();
        s.schedule(*batch);
        return batch;
      })
      .def("update", &apply_sampled<&Scheduler::update>, py::arg("batch"), py::arg("sampled_token_ids"))
      .def("commit", &Scheduler::commit, py::arg("batch"),
           "Marks the latest batch as run with its sampled tokens still unknown (placeholders)")
      .def("resolve", &apply_sampled<&Scheduler::resolve>, py::arg("batch"), py::arg("sampled_token_ids"),
           "Fills the oldest committed batch's placeholders; returns its outputs as update() does")
      .def_property_readonly("num_committed_unresolved", &Scheduler::num_committed_unresolved)
      .def("set_lookahead", &Scheduler::set_lookahead, py::arg("request_id"), py::arg("num_tokens"),
           "Asks for lookahead (draft) slots in the request's next step; returns how many it gets")
      .def("abort", &Scheduler::abort, py::arg("request_id"), py::arg("reason") = FinishReason::ABORT)
      .def_property_readonly("num_running", &Scheduler::num_running)
      .def_property_readonly("num_waiting", &Scheduler::num_waiting)
      .def_property_readonly("num_free_blocks", &Scheduler::num_free_blocks)
      .def_property_readonly("max_context_len", &Scheduler::max_context_len)
      .def_property_readonly("options", &Scheduler::options)
      .def_property_readonly("cache_options", &Scheduler::cache_options)
      .def("has_unfinished", &Scheduler::has_unfinished)
      .def("stats", &Scheduler::stats)
      .def(
          "get_request",
          [](const Scheduler& s, RequestId request_id) -> std::optional<Request> {
            const Request* r = s.find(request_id);
            if (r == nullptr) return std::nullopt;
            return *r;
          },
          py::arg("request_id"), "A snapshot of an unfinished request, or None")
      .def("set_kv_event_log", &Scheduler::set_kv_event_log, py::arg("log").none(true), py::keep_alive<1, 2>(),
           "Records stored and evicted block hashes into `log` (None detaches)")
      .def(
          "tier_held_blocks",
          [](Scheduler& s) {
            const std::vector<KVEvent> held = s.tier_held_blocks();
            const auto n = static_cast<py::ssize_t>(held.size());
            py::array_t<uint64_t> hashes(n);
            py::array_t<uint8_t> tiers(n);
            auto h = hashes.mutable_unchecked<1>();
            auto t = tiers.mutable_unchecked<1>();
            for (py::ssize_t i = 0; i < n; ++i) {
              h(i) = held[i].hash;
              t(i) = static_cast<uint8_t>(held[i].tier);
            }
            return py::make_tuple(hashes, tiers);
          },
          "(hashes uint64[n], tiers uint8[n]): the blocks the KV connector's tiers hold now")
      .def("cached_block_hashes", [](const Scheduler& s) {
        return py::array_t<uint64_t>(py::cast(s.cached_block_hashes()));
      })

      .def(
          "set_kv_connector",
          [](Scheduler& s, std::shared_ptr<KVConnector> connector, double load_timeout_s, py::object) {
            s.set_kv_connector(std::move(connector), load_timeout_s);
          },
          py::arg("connector"), py::arg("load_timeout_s") = 30.0, py::arg("memory_owner") = py::none(),
          // The connector, and the Python objects owning the memory it copies (the KV tensors), live
          // at least as long as the scheduler: C++ holds their addresses, not their ownership.
          py::keep_alive<1, 2>(), py::keep_alive<1, 4>(),
          "Attaches the tiers below the GPU pool (None detaches); only while nothing is unfinished")
      .def("poll_kv_transfers", &Scheduler::poll_kv_transfers,
           "Submits the saves of newly cached blocks and polls every transfer (schedule() does it too)")
      .def_property_readonly("num_waiting_for_kv", &Scheduler::num_waiting_for_kv)
      .def("has_pending_kv_transfers", &Scheduler::has_pending_kv_transfers)
      // Prefill-decode disaggregation (scheduler_pd.cc).
      .def("add_remote_prefill", &Scheduler::add_remote_prefill, py::arg("spec"),
           "Admits a request whose prompt KV a prefill peer writes (WAITING_FOR_KV); False when there is no room")
      .def(
          "complete_remote_prefill",
          [](Scheduler& s, RequestId request_id, TokenId first_token) -> py::object {
            StepOutputs outputs;
            if (!s.complete_remote_prefill(request_id, first_token, outputs)) return py::none();
            py::list result(outputs.size());
            for (size_t i = 0; i < outputs.size(); ++i) result[i] = py::cast(outputs.materialize(i));
            return result;
          },
          py::arg("request_id"), py::arg("first_token"),
          "The peer's KV and first token arrived: the step outputs (as update()), or None when not waiting")
      .def_property_readonly("num_waiting_for_remote_kv", &Scheduler::num_waiting_for_remote_kv)
      .def("hold_blocks", &Scheduler::hold_blocks, py::arg("request_id"),
           "An extra reference on the request's blocks now; the hold id (0: unknown request)")
      .def("release_blocks", &Scheduler::release_blocks, py::arg("hold_id"))
      .def_property_readonly("num_held_blocks", &Scheduler::num_held_blocks)
      .def("check_invariants", &Scheduler::check_invariants);
}

}  // namespace rtpllm::bindings
