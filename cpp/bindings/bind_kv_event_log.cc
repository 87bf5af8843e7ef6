// KVEventLog: drained as numpy arrays (one entry per event), not as per-event Python objects.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <vector>

#include "rtpllm/cache/kv_event_log.h"

namespace py = pybind11;

namespace rtpllm::bindings {

void bind_kv_event_log(py::module_& m) {
  py::enum_<KVEventKind>(m, "KVEventKind").value("STORED", KVEventKind::kStored).value("REMOVED", KVEventKind::kRemoved);
  py::enum_<KVTier>(m, "KVTier")
      .value("DEVICE", KVTier::kDevice)
      .value("HOST", KVTier::kHost)
      .value("DISK", KVTier::kDisk)
      .value("REMOTE", KVTier::kRemote);
  py::class_<KVEventLog>(m, "KVEventLog", "Bounded log of stored/evicted block hashes (see kv_event_log.h)")
      .def(py::init<size_t>(), py::arg("capacity"))
      .def_property_readonly("capacity", &KVEventLog::capacity)
      .def("__len__", &KVEventLog::size)
      .def("record", &KVEventLog::record, py::arg("kind"), py::arg("tier"), py::arg("hash"))
      .def(
          "drain",
          [](KVEventLog& log) {
            std::vector<KVEvent> events;
            const bool overflowed = log.drain(events);
            const auto n = static_cast<py::ssize_t>(events.size());
            py::array_t<uint64_t> hashes(n);
            py::array_t<uint8_t> kinds(n), tiers(n);
            auto h = hashes.mutable_unchecked<1>();
            auto k = kinds.mutable_unchecked<1>();
            auto t = tiers.mutable_unchecked<1>();
            for (py::ssize_t i = 0; i < n; ++i) {
              h(i) = events[i].hash;
              k(i) = static_cast<uint8_t>(events[i].kind);
              t(i) = static_cast<uint8_t>(events[i].tier);
            }
            return py::make_tuple(overflowed, hashes, kinds, tiers);
          },
          "(overflowed, hashes uint64[n], kinds uint8[n], tiers uint8[n]); empties the log. After an "
          "overflow the arrays are empty and the reader must resync from a snapshot.");
}

}  // namespace rtpllm::bindings
