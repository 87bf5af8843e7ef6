// RequestSpec (what the engine submits), RequestState (a read-only snapshot of a Request) and
// StepOutput (what update() reports).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "rtpllm/core/request.h"
#include "rtpllm/core/step_output.h"
#include "token_ids_arg.h"

namespace py = pybind11;

namespace rtpllm::bindings {

void bind_request(py::module_& m) {
  py::class_<RequestSpec>(m, "RequestSpec", "A request to schedule; validated by Scheduler.add_request")
      .def(py::init([](RequestId request_id, py::handle prompt_token_ids, int32_t max_new_tokens, py::handle stop_token_ids,
                       bool ignore_eos, int32_t min_new_tokens, int32_t priority, double arrival_time, uint64_t extra_key) {
             RequestSpec spec;
             spec.request_id = request_id;
             spec.prompt_token_ids = token_ids_arg(prompt_token_ids, "prompt_token_ids");
             spec.max_new_tokens = max_new_tokens;
             if (!stop_token_ids.is_none()) spec.stop_token_ids = token_ids_arg(stop_token_ids, "stop_token_ids");
             spec.ignore_eos = ignore_eos;
             spec.min_new_tokens = min_new_tokens;
             spec.priority = priority;
             spec.arrival_time = arrival_time;
             spec.extra_key = extra_key;
             return spec;
           }),
           py::kw_only(), py::arg("request_id"), py::arg("prompt_token_ids"), py::arg("max_new_tokens") = 16,
           py::arg("stop_token_ids") = py::none(), py::arg("ignore_eos") = false, py::arg("min_new_tokens") = 0,
           py::arg("priority") = 0, py::arg("arrival_time") = 0.0, py::arg("extra_key") = 0)
      .def_readonly("request_id", &RequestSpec::request_id)
      .def_readonly("prompt_token_ids", &RequestSpec::prompt_token_ids)
      .def_readonly("max_new_tokens", &RequestSpec::max_new_tokens)
      .def_readonly("stop_token_ids", &RequestSpec::stop_token_ids)
      .def_readonly("ignore_eos", &RequestSpec::ignore_eos)
      .def_readonly("min_new_tokens", &RequestSpec::min_new_tokens)
      .def_readonly("priority", &RequestSpec::priority)
      .def_readonly("arrival_time", &RequestSpec::arrival_time)
      .def_readonly("extra_key", &RequestSpec::extra_key);

  py::class_<Request>(m, "RequestState", "Snapshot of a request inside the scheduler (Scheduler.get_request)")
      .def_readonly("request_id", &Request::id)
      .def_readonly("token_ids", &Request::token_ids)
      .def_readonly("num_prompt_tokens", &Request::num_prompt_tokens)
      .def_property_readonly("num_output_tokens", &Request::num_output_tokens)
      .def_property_readonly("output_token_ids", [](const Request& r) {
        return std::vector<TokenId>(r.token_ids.begin() + r.num_prompt_tokens, r.token_ids.end());
      })
      .def_readonly("num_computed_tokens", &Request::num_computed_tokens)
      .def_readonly("block_table", &Request::block_table)
      .def_readonly("block_hashes", &Request::block_hashes)
      .def_readonly("status", &Request::status)
      .def_readonly("priority", &Request::priority)
      .def_readonly("num_preemptions", &Request::num_preemptions);

  py::class_<StepOutput>(m, "StepOutput")
      .def_readonly("request_id", &StepOutput::request_id)
      .def_readonly("new_token_ids", &StepOutput::new_token_ids)
      .def_readonly("finished", &StepOutput::finished)
      .def_readonly("finish_reason", &StepOutput::finish_reason)
      .def_readonly("stop_token_id", &StepOutput::stop_token_id)
      .def("__repr__", [](const StepOutput& o) {
        std::string tokens;
        for (TokenId t : o.new_token_ids) tokens += (tokens.empty() ? "" : ", ") + std::to_string(t);
        return "StepOutput(request_id=" + std::to_string(o.request_id) + ", new_token_ids=[" + tokens +
               "], finished=" + (o.finished ? "True" : "False") + ", finish_reason=" + to_string(o.finish_reason) +
               ", stop_token_id=" + std::to_string(o.stop_token_id) + ")";
      });
}

}  // namespace rtpllm::bindings
