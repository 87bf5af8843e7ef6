// Binds the C++ runtime (cpp/rtpllm): one function per component, each in its own bind_*.cc file.
#include <pybind11/pybind11.h>

namespace py = pybind11;

namespace rtpllm::bindings {
void bind_types(py::module_& m);
void bind_options(py::module_& m);
void bind_request(py::module_& m);
void bind_block_hash(py::module_& m);
void bind_kv_event_log(py::module_& m);
void bind_scheduled_batch(py::module_& m);
void bind_scheduler(py::module_& m);
void bind_transfer(py::module_& m);
void bind_loader(py::module_& m);
void bind_kvstore(py::module_& m);
void bind_kvstore_remote(py::module_& m);

void bind_runtime(py::module_& m) {
  bind_types(m);
  bind_options(m);
  bind_request(m);
  bind_block_hash(m);
  bind_kv_event_log(m);
  bind_scheduled_batch(m);
  bind_kvstore(m);  // before the scheduler, whose set_kv_connector takes a KVConnector
  bind_scheduler(m);
  bind_transfer(m);  // after bind_kvstore: both use KVLayout, and kvstore's binding is the full one
  bind_kvstore_remote(m);  // after both: a KVStoreTier over the transfer engine
  bind_loader(m);
}
}  // namespace rtpllm::bindings
