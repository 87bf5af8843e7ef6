#include "rtpllm/transfer/ucx/ucx_memory.h"

#include <stdexcept>
#include <string>

#include "rtpllm/transfer/transfer_plan.h"

namespace rtpllm {

void check_ucs(ucs_status_t status, const char* what) {
  if (status != UCS_OK) throw std::runtime_error(std::string(what) + ": " + ucs_status_string(status));
}

ucs_memory_type_t ucx_memory_type(MemoryKind memory) {
  return memory == MemoryKind::CUDA ? UCS_MEMORY_TYPE_CUDA : UCS_MEMORY_TYPE_HOST;
}

UcxWorker::UcxWorker() {
  ucp_params_t params{};
  params.field_mask = UCP_PARAM_FIELD_FEATURES | UCP_PARAM_FIELD_MT_WORKERS_SHARED | UCP_PARAM_FIELD_NAME;
  params.features = UCP_FEATURE_RMA | UCP_FEATURE_AM | UCP_FEATURE_WAKEUP;  // AM: DataPath::MESSAGES
  // Registration (ucp_mem_map) runs on the caller's thread, the worker on the engine's thread.
  params.mt_workers_shared = 1;
  params.name = "rtpllm-kv-transfer";
  check_ucs(ucp_init(&params, nullptr, &context_), "ucp_init");  // configuration: UCX's environment (UCX_TLS, ...)

  ucp_worker_params_t worker_params{};
  worker_params.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
  worker_params.thread_mode = UCS_THREAD_MODE_SERIALIZED;
  if (ucs_status_t s = ucp_worker_create(context_, &worker_params, &worker_); s != UCS_OK) {
    ucp_cleanup(context_);
    check_ucs(s, "ucp_worker_create");
  }
  ucp_worker_attr_t attr{};
  attr.field_mask = UCP_WORKER_ATTR_FIELD_ADDRESS | UCP_WORKER_ATTR_FIELD_MAX_AM_HEADER;
  if (ucs_status_t s = ucp_worker_query(worker_, &attr); s != UCS_OK) {
    ucp_worker_destroy(worker_);
    ucp_cleanup(context_);
    check_ucs(s, "ucp_worker_query");
  }
  address_.assign(reinterpret_cast<const char*>(attr.address), attr.address_length);
  max_am_header_ = attr.max_am_header;
  ucp_worker_release_address(worker_, attr.address);
  if (ucs_status_t s = ucp_worker_get_efd(worker_, &event_fd_); s != UCS_OK) {
    ucp_worker_destroy(worker_);
    ucp_cleanup(context_);
    check_ucs(s, "ucp_worker_get_efd");
  }
}

UcxWorker::~UcxWorker() {
  ucp_worker_destroy(worker_);
  ucp_cleanup(context_);
}

UcxRegistration::UcxRegistration(ucp_context_h context, const KVLayout& layout) : context_(context) {
  try {
    for (const MemoryRegion& region : layout_regions(layout)) {
      ucp_mem_map_params_t params{};
      params.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH |
                          UCP_MEM_MAP_PARAM_FIELD_MEMORY_TYPE;
      params.address = reinterpret_cast<void*>(region.base);
      params.length = region.length;
      params.memory_type = ucx_memory_type(layout.memory);
      ucp_mem_h handle = nullptr;
      check_ucs(ucp_mem_map(context_, &params, &handle), "ucp_mem_map");
      handles_.push_back(handle);
      void* packed = nullptr;
      size_t packed_size = 0;
      check_ucs(ucp_rkey_pack(context_, handle, &packed, &packed_size), "ucp_rkey_pack");
      regions_.push_back({region.base, region.length, std::string(static_cast<const char*>(packed), packed_size), ""});
      ucp_rkey_buffer_release(packed);
    }
  } catch (...) {
    for (ucp_mem_h handle : handles_) ucp_mem_unmap(context_, handle);
    throw;
  }
}

UcxRegistration::~UcxRegistration() {
  for (ucp_mem_h handle : handles_) ucp_mem_unmap(context_, handle);
}

}  // namespace rtpllm
