// The KV transfer engine (cpp/rtpllm/transfer): the KV layout it registers, the transfer plan, and
// UcxTransfer when built with UCX (_C.has_ucx). Blocking calls release the GIL.
//
// NOTE: KVLayout, MemoryKind and TransferState belong to the kvstore seam and are bound there
// (bind_kvstore.cc, which bind_runtime.cc runs first).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <string>

#include "rtpllm/kvstore/kv_layout.h"
#include "rtpllm/transfer/kv_transfer.h"
#include "rtpllm/transfer/transfer_plan.h"
#ifdef RTPLLM_WITH_UCX
#include "rtpllm/transfer/ucx/ucx_transfer.h"
#include "ucx_thread_init.h"
#ifdef RTPLLM_WITH_CUDA
#include "cuda/transfer/cuda_peer_memory.h"
#endif
#endif

namespace py = pybind11;

namespace rtpllm::bindings {
namespace {

void bind_plan(py::module_& m) {
  py::class_<TransferSegment>(m, "TransferSegment", "A run of tokens inside one source and one destination block")
      .def_readonly("src_block", &TransferSegment::src_block)
      .def_readonly("src_token", &TransferSegment::src_token)
      .def_readonly("dst_block", &TransferSegment::dst_block)
      .def_readonly("dst_token", &TransferSegment::dst_token)
      .def_readonly("num_tokens", &TransferSegment::num_tokens);
  m.def("plan_transfer", &plan_transfer, py::arg("src"), py::arg("src_blocks"), py::arg("dst"), py::arg("dst_blocks"),
        py::arg("num_tokens"), "Token ranges of src_blocks -> dst_blocks (ValueError naming the bad field)");
  m.def("check_kv_layout", &check_layout, py::arg("layout"), "ValueError naming the bad field");
  m.def("make_block_major_layout", &make_block_major_layout, py::kw_only(), py::arg("base"), py::arg("memory"),
        py::arg("num_blocks"), py::arg("num_layers"), py::arg("block_size"), py::arg("num_kv_heads"),
        py::arg("head_dim"), py::arg("element_bytes"),
        "A layout over one buffer of whole blocks, [num_blocks][num_layers][K, V][block_size, heads, head_dim]");
}

void bind_engine_types(py::module_& m) {
  py::enum_<DataPath>(m, "DataPath", "How puts and gets move bytes to a peer (kv_transfer.h DataPath)")
      .value("AUTO", DataPath::AUTO)
      .value("RMA", DataPath::RMA)
      .value("MESSAGES", DataPath::MESSAGES)
      .value("DIRECT", DataPath::DIRECT);

  py::class_<TransferOptions>(m, "TransferOptions")
      .def(py::init([](std::string name, std::string identity, std::string listen_host, int32_t listen_port,
                       double timeout_s, int32_t max_blocks_per_transfer, bool require_write_grants,
                       DataPath data_path) {
             TransferOptions o{std::move(name), std::move(identity), std::move(listen_host), listen_port, timeout_s,
                               max_blocks_per_transfer, require_write_grants, data_path};
             o.validate();
             return o;
           }),
           py::kw_only(), py::arg("name") = "rtpllm", py::arg("identity") = "", py::arg("listen_host") = "127.0.0.1",
           py::arg("listen_port") = 0, py::arg("timeout_s") = 10.0, py::arg("max_blocks_per_transfer") = 1 << 16,
           py::arg("require_write_grants") = false, py::arg("data_path") = DataPath::AUTO)
      .def_readonly("name", &TransferOptions::name)
      .def_readonly("identity", &TransferOptions::identity)
      .def_readonly("listen_host", &TransferOptions::listen_host)
      .def_readonly("listen_port", &TransferOptions::listen_port)
      .def_readonly("timeout_s", &TransferOptions::timeout_s)
      .def_readonly("max_blocks_per_transfer", &TransferOptions::max_blocks_per_transfer)
      .def_readonly("require_write_grants", &TransferOptions::require_write_grants)
      .def_readonly("data_path", &TransferOptions::data_path);

  py::class_<TransferRequest>(m, "TransferRequest", "Tokens [0, num_tokens) of local_blocks <-> remote_blocks")
      .def(py::init([](uint64_t request_id, std::vector<BlockId> local_blocks, std::vector<BlockId> remote_blocks,
                       int64_t num_tokens, int32_t layer, bool notify, py::bytes payload, int32_t num_heads,
                       int32_t local_head_offset, int32_t remote_head_offset) {
             return TransferRequest{request_id, std::move(local_blocks), std::move(remote_blocks), num_tokens, layer,
                                    notify, std::string(payload), num_heads, local_head_offset, remote_head_offset};
           }),
           py::kw_only(), py::arg("request_id"), py::arg("local_blocks"), py::arg("remote_blocks"),
           py::arg("num_tokens") = -1, py::arg("layer") = -1, py::arg("notify") = true,
           py::arg("payload") = py::bytes(), py::arg("num_heads") = -1, py::arg("local_head_offset") = 0,
           py::arg("remote_head_offset") = 0,
           "payload: up to 4 KiB echoed in the peer's notice; num_heads (-1: all) with the two offsets: "
           "only those KV heads move (tensor parallelism of different sizes)")
      .def_readonly("request_id", &TransferRequest::request_id)
      .def_readonly("local_blocks", &TransferRequest::local_blocks)
      .def_readonly("remote_blocks", &TransferRequest::remote_blocks)
      .def_readonly("num_tokens", &TransferRequest::num_tokens)
      .def_readonly("layer", &TransferRequest::layer)
      .def_readonly("notify", &TransferRequest::notify)
      .def_readonly("num_heads", &TransferRequest::num_heads)
      .def_readonly("local_head_offset", &TransferRequest::local_head_offset)
      .def_readonly("remote_head_offset", &TransferRequest::remote_head_offset)
      .def_property_readonly("payload", [](const TransferRequest& r) { return py::bytes(r.payload); });

  py::class_<TransferStatus>(m, "TransferStatus")
      .def_readonly("state", &TransferStatus::state)
      .def_readonly("error", &TransferStatus::error)
      .def("__repr__", [](const TransferStatus& s) {
        const char* names[] = {"PENDING", "DONE", "FAILED"};
        return std::string("TransferStatus(") + names[static_cast<int>(s.state)] +
               (s.error.empty() ? "" : ", error=" + s.error) + ")";
      });

  py::class_<TransferNotice>(m, "TransferNotice", "A put that landed in this engine's memory")
      .def_readonly("peer", &TransferNotice::peer)
      .def_readonly("request_id", &TransferNotice::request_id)
      .def_readonly("layer", &TransferNotice::layer)
      .def_readonly("blocks", &TransferNotice::blocks)
      .def_readonly("num_tokens", &TransferNotice::num_tokens)
      .def_property_readonly("payload", [](const TransferNotice& n) { return py::bytes(n.payload); });

  py::enum_<PeerState>(m, "PeerState").value("CONNECTED", PeerState::CONNECTED).value("FAILED", PeerState::FAILED);

  py::class_<PeerInfo>(m, "PeerInfo")
      .def_readonly("id", &PeerInfo::id)
      .def_readonly("name", &PeerInfo::name)
      .def_readonly("state", &PeerInfo::state)
      .def_readonly("error", &PeerInfo::error)
      .def_readonly("layout", &PeerInfo::layout)
      .def_readonly("data_path", &PeerInfo::data_path);

  py::class_<TransferStats>(m, "TransferStats")
      .def_readonly("puts", &TransferStats::puts)
      .def_readonly("gets", &TransferStats::gets)
      .def_readonly("failed", &TransferStats::failed)
      .def_readonly("bytes_put", &TransferStats::bytes_put)
      .def_readonly("bytes_got", &TransferStats::bytes_got)
      .def_readonly("notices_received", &TransferStats::notices_received)
      .def_readonly("peers_failed", &TransferStats::peers_failed);
}

#ifdef RTPLLM_WITH_UCX
void bind_ucx_transfer(py::module_& m) {
  using Release = py::call_guard<py::gil_scoped_release>;
  py::class_<UcxTransfer>(m, "UcxTransfer",
                          "KV transfer engine over UCX (see cpp/rtpllm/transfer/kv_transfer.h for the contract)")
      .def(py::init([](const TransferOptions& options, std::optional<int> cuda_device, bool direct_access) {
             std::shared_ptr<PeerMemory> peer_memory;
             if (direct_access || options.data_path == DataPath::DIRECT) {
               if (!cuda_device) throw std::invalid_argument("direct_access: needs cuda_device (KV on a GPU)");
#ifdef RTPLLM_WITH_CUDA
               peer_memory = cuda::make_cuda_peer_memory(*cuda_device);
#else
               throw std::invalid_argument("direct_access: rtpllm._C was built without CUDA");
#endif
             }
             return std::make_unique<UcxTransfer>(options, ucx_thread_init(cuda_device), std::move(peer_memory));
           }),
           py::arg("options"), py::kw_only(), py::arg("cuda_device") = std::nullopt, py::arg("direct_access") = false,
           "direct_access: map same-host peers' GPU memory and copy with our own kernel (DataPath.DIRECT, "
           "which AUTO then prefers); DataPath.DIRECT implies it")
      .def("register_kv", &UcxTransfer::register_kv, py::arg("layout"), Release(),
           "Registers the KV memory (the caller keeps it alive for the engine's lifetime)")
      .def_property_readonly("listen_port", &UcxTransfer::listen_port)
      .def("connect", &UcxTransfer::connect, py::arg("host"), py::arg("port"), Release())
      .def("peers", &UcxTransfer::peers)
      .def("disconnect", &UcxTransfer::disconnect, py::arg("peer"), Release())
      .def("put", &UcxTransfer::put, py::arg("peer"), py::arg("request"), Release())
      .def("get", &UcxTransfer::get, py::arg("peer"), py::arg("request"), Release())
      .def("poll", &UcxTransfer::poll, py::arg("handle"))
      .def("wait", &UcxTransfer::wait, py::arg("handle"), py::arg("timeout_s"), Release())
      .def("take_notices", &UcxTransfer::take_notices, py::arg("wait_s") = 0.0, Release())
      .def("notice_fd", &UcxTransfer::notice_fd,
           "An eventfd readable while notices wait to be taken (for select/poll beside other fds)")
      .def("stats", &UcxTransfer::stats)
      .def("grant_writes", &UcxTransfer::grant_writes, py::arg("request_id"), py::arg("blocks"),
           "Peers' puts naming request_id may write these blocks (with require_write_grants)")
      .def("revoke_writes", &UcxTransfer::revoke_writes, py::arg("request_id"));
}
#endif

}  // namespace

void bind_transfer(py::module_& m) {
  bind_plan(m);
  bind_engine_types(m);
#ifdef RTPLLM_WITH_UCX
  bind_ucx_transfer(m);
  m.attr("has_ucx") = true;
#else
  m.attr("has_ucx") = false;
#endif
}

}  // namespace rtpllm::bindings
