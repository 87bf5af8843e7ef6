// KVConnector (the seam below the GPU pool), its TransferState and KVTierStats. A Python subclass
// may implement a connector (tests, experiments); the C++ tiers bind their own subclasses.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <string>
#include <vector>

#include "rtpllm/kvstore/kv_connector.h"

namespace py = pybind11;

namespace rtpllm::bindings {
namespace {

// Calls into a Python subclass; the scheduler calls the connector with the GIL held.
class PyKVConnector : public KVConnector {
 public:
  using KVConnector::KVConnector;
  std::string name() const override { PYBIND11_OVERRIDE_PURE(std::string, KVConnector, name); }
  int32_t match(const std::vector<BlockHash>& hashes) override { PYBIND11_OVERRIDE_PURE(int32_t, KVConnector, match, hashes); }
  TransferHandle load(const std::vector<BlockHash>& hashes, const std::vector<BlockId>& gpu_blocks) override {
    PYBIND11_OVERRIDE_PURE(TransferHandle, KVConnector, load, hashes, gpu_blocks);
  }
  TransferHandle save(const std::vector<BlockHash>& hashes, const std::vector<BlockId>& gpu_blocks) override {
    PYBIND11_OVERRIDE_PURE(TransferHandle, KVConnector, save, hashes, gpu_blocks);
  }
  TransferState poll(TransferHandle handle) override { PYBIND11_OVERRIDE_PURE(TransferState, KVConnector, poll, handle); }
  std::vector<KVTierStats> stats() override { PYBIND11_OVERRIDE_PURE(std::vector<KVTierStats>, KVConnector, stats); }
};

}  // namespace

void bind_kv_connector(py::module_& m) {
  py::enum_<TransferState>(m, "TransferState")
      .value("PENDING", TransferState::PENDING)
      .value("DONE", TransferState::DONE)
      .value("FAILED", TransferState::FAILED);

  py::class_<KVTierStats>(m, "KVTierStats", "Counters of one tier below the GPU pool (cumulative unless noted)")
      .def(py::init<>())
      .def_readwrite("name", &KVTierStats::name)
      .def_readwrite("queries", &KVTierStats::queries)
      .def_readwrite("query_blocks", &KVTierStats::query_blocks)
      .def_readwrite("hit_blocks", &KVTierStats::hit_blocks)
      .def_readwrite("loaded_blocks", &KVTierStats::loaded_blocks)
      .def_readwrite("saved_blocks", &KVTierStats::saved_blocks)
      .def_readwrite("load_bytes", &KVTierStats::load_bytes)
      .def_readwrite("save_bytes", &KVTierStats::save_bytes)
      .def_readwrite("failed_loads", &KVTierStats::failed_loads)
      .def_readwrite("evicted_blocks", &KVTierStats::evicted_blocks)
      .def_readwrite("capacity_blocks", &KVTierStats::capacity_blocks)
      .def_readwrite("used_blocks", &KVTierStats::used_blocks)
      .def_readwrite("enabled", &KVTierStats::enabled)
      .def_readwrite("load_latency_s", &KVTierStats::load_latency_s)
      .def("__repr__", [](const KVTierStats& s) {
        return "KVTierStats(name='" + s.name + "', queries=" + std::to_string(s.queries) + ", hit_blocks=" +
               std::to_string(s.hit_blocks) + ", loaded_blocks=" + std::to_string(s.loaded_blocks) +
               ", saved_blocks=" + std::to_string(s.saved_blocks) + ", used_blocks=" + std::to_string(s.used_blocks) +
               "/" + std::to_string(s.capacity_blocks) + ", enabled=" + (s.enabled ? "True" : "False") + ")";
      });

  py::class_<KVConnector, PyKVConnector, std::shared_ptr<KVConnector>>(
      m, "KVConnector", "Where KV lives besides the GPU pool: match / load / save / poll by block hash")
      .def(py::init<>())
      .def("name", &KVConnector::name)
      .def("match", &KVConnector::match, py::arg("hashes"))
      .def("load", &KVConnector::load, py::arg("hashes"), py::arg("gpu_blocks"))
      .def("save", &KVConnector::save, py::arg("hashes"), py::arg("gpu_blocks"))
      .def("poll", &KVConnector::poll, py::arg("handle"))
      .def("stats", &KVConnector::stats);
}

}  // namespace rtpllm::bindings
