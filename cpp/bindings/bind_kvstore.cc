// The hierarchical KV store (cpp/rtpllm/kvstore): KV layout registration, copy engines, the host
// and disk tiers and the coordinator that chains them. Everything is held by std::shared_ptr, so
// the scheduler can hold the coordinator as a std::shared_ptr<KVConnector>. Calls that may block
// (wait, flush) release the GIL; no background thread of the store ever calls into Python.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "rtpllm/kvstore/copy_engine.h"
#include "rtpllm/kvstore/cpu_copy_engine.h"
#include "rtpllm/kvstore/disk_tier.h"
#include "rtpllm/core/host_allocator.h"
#include "rtpllm/kvstore/host_tier.h"
#include "rtpllm/kvstore/kv_connector.h"
#include "rtpllm/kvstore/kv_layout.h"
#include "rtpllm/kvstore/kv_store_tier.h"
#include "rtpllm/kvstore/mirrored_connector.h"
#include "rtpllm/kvstore/tiered_connector.h"

namespace py = pybind11;

namespace rtpllm::bindings {
namespace {

std::vector<BlockCopy> block_copies(const std::vector<BlockId>& pool_blocks, const std::vector<uintptr_t>& host_addresses) {
  if (pool_blocks.size() != host_addresses.size()) {
    throw py::value_error("pool_blocks and host_addresses differ in length (" + std::to_string(pool_blocks.size()) + " vs " +
                          std::to_string(host_addresses.size()) + ")");
  }
  std::vector<BlockCopy> copies;
  for (size_t i = 0; i < pool_blocks.size(); ++i) {
    copies.push_back(BlockCopy{pool_blocks[i], reinterpret_cast<uint8_t*>(host_addresses[i])});
  }
  return copies;
}

// KVLayout, KVLayerAddress, MemoryKind and TransferState are bound here only; the KV transfer
// bindings (bind_transfer.cc, bound after these) use them too.
void bind_layout(py::module_& m) {
  py::enum_<MemoryKind>(m, "MemoryKind", "Where the KV pool lives").value("HOST", MemoryKind::HOST).value("CUDA", MemoryKind::CUDA);
  py::class_<KVLayerAddress>(m, "KVLayerAddress", "Base addresses of one layer's K and V planes (block 0)")
      .def(py::init([](uint64_t k_base, uint64_t v_base) { return KVLayerAddress{k_base, v_base}; }), py::arg("k_base"),
           py::arg("v_base"))
      .def_readwrite("k_base", &KVLayerAddress::k_base)
      .def_readwrite("v_base", &KVLayerAddress::v_base);
  py::class_<KVLayout>(m, "KVLayout", "Where the paged KV pool lives (C++ holds addresses, never ownership)")
      .def(py::init([](MemoryKind memory, int32_t device_index, int32_t num_blocks, int32_t block_size, int32_t num_kv_heads,
                       int32_t head_dim, int32_t element_bytes, int64_t block_stride_bytes, std::vector<KVLayerAddress> layers) {
             return KVLayout{memory, device_index, num_blocks, block_size, num_kv_heads, head_dim,
                             element_bytes, block_stride_bytes, std::move(layers)};
           }),
           py::kw_only(), py::arg("memory"), py::arg("device_index") = 0, py::arg("num_blocks"), py::arg("block_size"),
           py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("element_bytes"), py::arg("block_stride_bytes"),
           py::arg("layers"))
      .def_readwrite("memory", &KVLayout::memory)
      .def_readwrite("device_index", &KVLayout::device_index)
      .def_readwrite("num_blocks", &KVLayout::num_blocks)
      .def_readwrite("block_size", &KVLayout::block_size)
      .def_readwrite("num_kv_heads", &KVLayout::num_kv_heads)
      .def_readwrite("head_dim", &KVLayout::head_dim)
      .def_readwrite("element_bytes", &KVLayout::element_bytes)
      .def_readwrite("block_stride_bytes", &KVLayout::block_stride_bytes)
      .def_readwrite("layers", &KVLayout::layers)
      .def_property_readonly("num_layers", &KVLayout::num_layers)
      .def("block_bytes", &KVLayout::block_bytes)
      .def("bytes_per_block", &KVLayout::bytes_per_block)
      .def("validate", &KVLayout::validate, "Raises ValueError naming the bad field");
}

// Calls into a Python subclass of KVConnector (tests, experiments); the scheduler calls its
// connector with the GIL held.
class PyKVConnector : public KVConnector {
 public:
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

void bind_connector(py::module_& m) {
  py::enum_<TransferState>(m, "TransferState")
      .value("PENDING", TransferState::PENDING)
      .value("DONE", TransferState::DONE)
      .value("FAILED", TransferState::FAILED);
  py::class_<KVTierStats>(m, "KVTierStats", "Counters of one tier (cumulative unless said otherwise)")
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
      .def_readwrite("timed_out_loads", &KVTierStats::timed_out_loads)
      .def_readwrite("skipped_blocks", &KVTierStats::skipped_blocks)
      .def_readwrite("evicted_blocks", &KVTierStats::evicted_blocks)
      .def_readwrite("capacity_blocks", &KVTierStats::capacity_blocks)
      .def_readwrite("used_blocks", &KVTierStats::used_blocks)
      .def_readwrite("enabled", &KVTierStats::enabled)
      .def_readwrite("load_latency_s", &KVTierStats::load_latency_s)
      .def("__repr__", [](const KVTierStats& s) {
        return "KVTierStats(name='" + s.name + "', queries=" + std::to_string(s.queries) + ", hit_blocks=" +
               std::to_string(s.hit_blocks) + ", loaded_blocks=" + std::to_string(s.loaded_blocks) + ", saved_blocks=" +
               std::to_string(s.saved_blocks) + ", used_blocks=" + std::to_string(s.used_blocks) + "/" +
               std::to_string(s.capacity_blocks) + ", enabled=" + (s.enabled ? "True" : "False") + ")";
      });
  // Subclassable from Python (PyKVConnector): a Python subclass defines name() as a method.
  py::class_<KVConnector, PyKVConnector, std::shared_ptr<KVConnector>>(m, "KVConnector",
                                                                      "A place KV can live besides the GPU pool")
      .def(py::init<>())
      .def_property_readonly("name", &KVConnector::name)
      .def("match", &KVConnector::match, py::arg("hashes"))
      .def("load", &KVConnector::load, py::arg("hashes"), py::arg("gpu_blocks"))
      .def("save", &KVConnector::save, py::arg("hashes"), py::arg("gpu_blocks"))
      .def("poll", &KVConnector::poll, py::arg("handle"))
      .def("stats", &KVConnector::stats)
      .def("set_recompute_seconds_per_block", &KVConnector::set_recompute_seconds_per_block, py::arg("seconds"));
  py::class_<KVStoreTier, KVConnector, std::shared_ptr<KVStoreTier>>(m, "KVStoreTier")
      .def("contains", &KVStoreTier::contains, py::arg("hash"))
      .def("cancel", &KVStoreTier::cancel, py::arg("handle"))
      .def("expected_load_seconds", &KVStoreTier::expected_load_seconds, py::arg("num_blocks"));
}

void bind_copy_engines(py::module_& m) {
  py::class_<HostAllocator, std::shared_ptr<HostAllocator>>(m, "HostAllocator").def_property_readonly("name", &HostAllocator::name);
  py::class_<AlignedHostAllocator, HostAllocator, std::shared_ptr<AlignedHostAllocator>>(m, "AlignedHostAllocator").def(py::init<>());
  py::class_<HostBuffer, std::shared_ptr<HostBuffer>>(m, "HostBuffer", py::buffer_protocol(),
                                                      "Host memory from an allocator; a uint8 buffer (numpy.asarray)")
      .def(py::init([](std::shared_ptr<HostAllocator> allocator, size_t nbytes) {
             return std::make_shared<HostBuffer>(std::move(allocator), nbytes);
           }),
           py::arg("allocator"), py::arg("nbytes"))
      .def_property_readonly("address", [](const HostBuffer& b) { return reinterpret_cast<uintptr_t>(b.data()); })
      .def_property_readonly("nbytes", &HostBuffer::size)
      .def_buffer([](HostBuffer& b) {
        return py::buffer_info(b.data(), 1, py::format_descriptor<uint8_t>::format(), 1, {b.size()}, {size_t{1}});
      });

  py::enum_<CopyDirection>(m, "CopyDirection")
      .value("POOL_TO_HOST", CopyDirection::POOL_TO_HOST)
      .value("HOST_TO_POOL", CopyDirection::HOST_TO_POOL);
  py::class_<KVCopyEngine, std::shared_ptr<KVCopyEngine>>(m, "KVCopyEngine",
                                                          "Batched async block copies between the KV pool and host buffers")
      .def_property_readonly("name", &KVCopyEngine::name)
      .def_property_readonly("layout", &KVCopyEngine::layout)
      .def_property_readonly("host_allocator", &KVCopyEngine::host_allocator)
      .def(
          "submit",
          [](KVCopyEngine& engine, CopyDirection direction, const std::vector<BlockId>& pool_blocks,
             const std::vector<uintptr_t>& host_addresses) { return engine.submit(direction, block_copies(pool_blocks, host_addresses)); },
          py::arg("direction"), py::arg("pool_blocks"), py::arg("host_addresses"),
          "Host buffer i (bytes_per_block bytes, layer-major, K then V) <-> pool block i; returns a ticket")
      .def("query", &KVCopyEngine::query, py::arg("ticket"))
      .def("wait", &KVCopyEngine::wait, py::arg("ticket"), py::call_guard<py::gil_scoped_release>());
  py::class_<CpuKVCopyEngine, KVCopyEngine, std::shared_ptr<CpuKVCopyEngine>>(m, "CpuKVCopyEngine")
      .def(py::init<KVLayout, std::shared_ptr<HostAllocator>>(), py::arg("layout"), py::arg("allocator") = nullptr);
}

void bind_tiers(py::module_& m) {
  py::class_<HostTier, KVStoreTier, std::shared_ptr<HostTier>>(m, "HostTier", "Host-memory tier; writes every saved block through to next_tier")
      .def(py::init([](std::shared_ptr<KVCopyEngine> engine, int64_t capacity_bytes, std::shared_ptr<DiskTier> next_tier) {
             return std::make_shared<HostTier>(std::move(engine), capacity_bytes, std::shared_ptr<KVBlockSink>(std::move(next_tier)));
           }),
           py::arg("engine"), py::arg("capacity_bytes"), py::arg("next_tier") = nullptr)
      .def_property_readonly("capacity_blocks", &HostTier::capacity_blocks)
      .def("check_invariants", &HostTier::check_invariants);

  py::class_<DiskTierOptions>(m, "DiskTierOptions")
      .def(py::init<>())
      .def_readwrite("directory", &DiskTierOptions::directory)
      .def_readwrite("capacity_bytes", &DiskTierOptions::capacity_bytes)
      .def_readwrite("cache_identity", &DiskTierOptions::cache_identity)
      .def_readwrite("writer_threads", &DiskTierOptions::writer_threads)
      .def_readwrite("reader_threads", &DiskTierOptions::reader_threads)
      .def_readwrite("max_queued_writes", &DiskTierOptions::max_queued_writes)
      .def_readwrite("load_chunk_blocks", &DiskTierOptions::load_chunk_blocks)
      .def("validate", &DiskTierOptions::validate);
  py::class_<DiskTier, KVStoreTier, std::shared_ptr<DiskTier>>(m, "DiskTier", "Local-disk tier (one checksummed file per block)")
      .def(py::init([](std::shared_ptr<KVCopyEngine> engine, DiskTierOptions options) {
             return std::make_shared<DiskTier>(std::move(engine), std::move(options));
           }),
           py::arg("engine"), py::arg("options"), py::call_guard<py::gil_scoped_release>())
      .def("flush", &DiskTier::flush, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("used_bytes", &DiskTier::used_bytes)
      .def("take_warnings", &DiskTier::take_warnings, "Warnings (corrupt files, a full disk) since the last call; also on stderr")
      .def_property_readonly("file_bytes_per_block", &DiskTier::file_bytes_per_block)
      .def("check_invariants", &DiskTier::check_invariants);

  py::class_<TieredKVConnector, KVConnector, std::shared_ptr<TieredKVConnector>>(m, "TieredKVConnector",
                                                                                 "Chains tiers (fastest first) behind one connector")
      .def(py::init<std::vector<std::shared_ptr<KVStoreTier>>, double>(), py::arg("tiers"), py::arg("load_timeout_s"))
      .def_property_readonly("num_pending", &TieredKVConnector::num_pending);

  py::class_<MirroredKVConnector, KVConnector, std::shared_ptr<MirroredKVConnector>>(
      m, "MirroredKVConnector", "Rank 0's tiers, with every load and save repeated by the other tensor-parallel ranks")
      .def(py::init<std::shared_ptr<KVConnector>, int32_t>(), py::arg("local"), py::arg("num_mirrors"))
      .def("take_operations",
           [](MirroredKVConnector& self) {
             py::list out;
             for (MirroredOperation& op : self.take_operations()) {
               out.append(py::make_tuple(op.handle, op.is_load, std::move(op.hashes), std::move(op.gpu_blocks)));
             }
             return out;
           },
           "[(handle, is_load, hashes, gpu_blocks)] started since the last call, oldest first")
      .def("report", &MirroredKVConnector::report, py::arg("mirror"), py::arg("handle"), py::arg("done"))
      .def_property_readonly("num_mirrors", &MirroredKVConnector::num_mirrors)
      .def_property_readonly("num_pending", &MirroredKVConnector::num_pending);
}

}  // namespace

void bind_kvstore(py::module_& m) {
  bind_layout(m);
  bind_connector(m);
  bind_copy_engines(m);
  bind_tiers(m);
}

}  // namespace rtpllm::bindings
