// Enums: FinishReason, RequestStatus.
#include <pybind11/pybind11.h>

#include "rtpllm/core/types.h"

namespace py = pybind11;

namespace rtpllm::bindings {

void bind_types(py::module_& m) {
  py::enum_<FinishReason>(m, "FinishReason", "Why a request finished (NONE while it runs)")
      .value("NONE", FinishReason::NONE)
      .value("STOP", FinishReason::STOP)
      .value("LENGTH", FinishReason::LENGTH)
      .value("ABORT", FinishReason::ABORT)
      .value("ERROR", FinishReason::ERROR);
  py::enum_<RequestStatus>(m, "RequestStatus")
      .value("WAITING", RequestStatus::WAITING)
      .value("RUNNING", RequestStatus::RUNNING)
      .value("PREEMPTED", RequestStatus::PREEMPTED)
      .value("FINISHED", RequestStatus::FINISHED)
      .value("WAITING_FOR_KV", RequestStatus::WAITING_FOR_KV);
}

}  // namespace rtpllm::bindings
