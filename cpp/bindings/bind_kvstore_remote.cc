// The shared remote KV store (cpp/rtpllm/kvstore/remote): KVStoreServer (`rtpllm kvstore serve`)
// and RemoteStoreTier (the client tier an engine chains after host and disk), both over the UCX
// transfer engine; bound when built with UCX (_C.has_kvstore_remote). Blocking calls release the
// GIL; no thread of theirs calls into Python.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#ifdef RTPLLM_WITH_UCX
#include "rtpllm/kvstore/remote/kv_store_server.h"
#include "rtpllm/kvstore/remote/remote_store_tier.h"
#include "rtpllm/transfer/ucx/ucx_transfer.h"
#include "ucx_thread_init.h"
#endif
#ifdef RTPLLM_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace py = pybind11;

namespace rtpllm::bindings {
#ifdef RTPLLM_WITH_UCX
namespace {

KVStoreServer::TransferFactory ucx_factory(std::optional<int> cuda_device) {
  std::function<void()> thread_init = ucx_thread_init(cuda_device);
  return [thread_init](const TransferOptions& options) { return std::make_unique<UcxTransfer>(options, thread_init); };
}

// A save's one-sided put reads the pool outside the compute stream's order: the worker waits for
// an event recorded on that stream when save() was called.
RemoteStoreTier::SaveFence save_fence(std::optional<uintptr_t> stream) {
  if (!stream) return nullptr;
#ifdef RTPLLM_WITH_CUDA
  return [stream = *stream]() -> std::function<void()> {
    cudaEvent_t event = nullptr;
    if (cudaEventCreateWithFlags(&event, cudaEventDisableTiming) != cudaSuccess) {
      return [stream] { cudaStreamSynchronize(reinterpret_cast<cudaStream_t>(stream)); };
    }
    cudaEventRecord(event, reinterpret_cast<cudaStream_t>(stream));
    std::shared_ptr<void> owner(event, [](void* e) { cudaEventDestroy(static_cast<cudaEvent_t>(e)); });
    return [owner] { cudaEventSynchronize(static_cast<cudaEvent_t>(owner.get())); };
  };
#else
  throw std::invalid_argument("stream: rtpllm._C was built without CUDA");
#endif
}

}  // namespace

void bind_kvstore_remote(py::module_& m) {
  using Release = py::call_guard<py::gil_scoped_release>;
  py::class_<KVStoreServerStats>(m, "KVStoreServerStats")
      .def_readonly("identity", &KVStoreServerStats::identity)
      .def_readonly("shape", &KVStoreServerStats::shape)
      .def_readonly("bytes_per_block", &KVStoreServerStats::bytes_per_block)
      .def_readonly("capacity_blocks", &KVStoreServerStats::capacity_blocks)
      .def_readonly("used_blocks", &KVStoreServerStats::used_blocks)
      .def_readonly("pinned_blocks", &KVStoreServerStats::pinned_blocks)
      .def_readonly("disk_blocks", &KVStoreServerStats::disk_blocks)
      .def_readonly("clients", &KVStoreServerStats::clients)
      .def_readonly("refused_clients", &KVStoreServerStats::refused_clients)
      .def_readonly("pin_requests", &KVStoreServerStats::pin_requests)
      .def_readonly("pinned_hits", &KVStoreServerStats::pinned_hits)
      .def_readonly("pin_misses", &KVStoreServerStats::pin_misses)
      .def_readonly("disk_reads", &KVStoreServerStats::disk_reads)
      .def_readonly("saved_blocks", &KVStoreServerStats::saved_blocks)
      .def_readonly("skipped_blocks", &KVStoreServerStats::skipped_blocks)
      .def_readonly("evicted_blocks", &KVStoreServerStats::evicted_blocks)
      .def_readonly("bad_requests", &KVStoreServerStats::bad_requests)
      .def_readonly("expired_pins", &KVStoreServerStats::expired_pins)
      .def_readonly("expired_pin_blocks", &KVStoreServerStats::expired_pin_blocks);

  py::class_<KVStoreServer, std::shared_ptr<KVStoreServer>>(
      m, "KVStoreServer", "The shared KV store (see cpp/rtpllm/kvstore/remote/kv_store_server.h)")
      .def(py::init([](const std::string& host, int32_t port, int64_t capacity_bytes, const std::string& disk_dir,
                       int64_t disk_capacity_bytes, uint64_t identity, double transfer_timeout_s,
                       double pin_lease_s, int32_t max_blocks_per_request, int32_t max_clients) {
             KVStoreServerOptions o;
             o.host = host;
             o.port = port;
             o.capacity_bytes = capacity_bytes;
             o.disk_dir = disk_dir;
             o.disk_capacity_bytes = disk_capacity_bytes;
             o.identity = identity;
             o.transfer_timeout_s = transfer_timeout_s;
             o.pin_lease_s = pin_lease_s;
             o.max_blocks_per_request = max_blocks_per_request;
             o.max_clients = max_clients;
             py::gil_scoped_release release;
             return std::make_shared<KVStoreServer>(o, ucx_factory(std::nullopt));
           }),
           py::kw_only(), py::arg("host") = "127.0.0.1", py::arg("port") = 0, py::arg("capacity_bytes"),
           py::arg("disk_dir") = "", py::arg("disk_capacity_bytes") = 0, py::arg("identity") = 0,
           py::arg("transfer_timeout_s") = 10.0, py::arg("pin_lease_s") = 300.0, py::arg("max_blocks_per_request") = 4096,
           py::arg("max_clients") = 256)
      .def_property_readonly("port", &KVStoreServer::port)
      .def("stats", &KVStoreServer::stats)
      .def("flush_disk", &KVStoreServer::flush_disk, Release())
      .def("check_invariants", &KVStoreServer::check_invariants);

  py::class_<RemoteStoreTier, KVStoreTier, std::shared_ptr<RemoteStoreTier>>(
      m, "RemoteStoreTier", "The client tier of a shared KV store (see remote_store_tier.h)")
      .def(py::init([](const KVLayout& pool, const std::string& host, int32_t port, uint64_t identity,
                       const std::string& name, double connect_timeout_s, double request_timeout_s,
                       double retry_interval_s, std::optional<int> cuda_device, std::optional<uintptr_t> stream,
                       uint64_t key_salt) {
             RemoteStoreOptions o;
             o.host = host;
             o.port = port;
             o.identity = identity;
             o.name = name;
             o.connect_timeout_s = connect_timeout_s;
             o.request_timeout_s = request_timeout_s;
             o.retry_interval_s = retry_interval_s;
             o.key_salt = key_salt;
             o.validate();
             auto factory = ucx_factory(cuda_device);
             auto fence = save_fence(stream);
             py::gil_scoped_release release;
             return std::make_shared<RemoteStoreTier>(pool, o, factory, nullptr, fence);
           }),
           py::arg("pool"), py::kw_only(), py::arg("host"), py::arg("port"), py::arg("identity"),
           py::arg("name") = "rtpllm", py::arg("connect_timeout_s") = 2.0, py::arg("request_timeout_s") = 2.0,
           py::arg("retry_interval_s") = 2.0, py::arg("cuda_device") = std::nullopt, py::arg("stream") = std::nullopt,
           py::arg("key_salt") = 0)
      .def_property_readonly("connected", &RemoteStoreTier::connected)
      .def_property_readonly("last_error", &RemoteStoreTier::last_error)
      .def("wait_connected", &RemoteStoreTier::wait_connected, py::arg("timeout_s"), Release())
      .def("flush", [](RemoteStoreTier& t) { return t.wait_saves(30.0); }, Release(),
           "Waits (at most 30 s) until no save is in flight; True when none is");
  m.attr("has_kvstore_remote") = true;
}
#else
void bind_kvstore_remote(py::module_& m) { m.attr("has_kvstore_remote") = false; }
#endif

}  // namespace rtpllm::bindings
