// UCX handles with an owner: the context + worker pair, and the registration of a KV layout's
// memory (one ucp_mem_map per region, each with its packed remote key).
#pragma once

#include <ucp/api/ucp.h>

#include <string>
#include <vector>

#include "rtpllm/kvstore/kv_layout.h"
#include "rtpllm/transfer/transfer_messages.h"

namespace rtpllm {

// Throws std::runtime_error("<what>: <UCX status string>") unless status is UCS_OK.
void check_ucs(ucs_status_t status, const char* what);

ucs_memory_type_t ucx_memory_type(MemoryKind memory);

// A UCP context with RMA, active messages and wakeup, and one worker (serialized: the engine's mutex guards it).
// Transports come from UCX's environment (UCX_TLS, UCX_NET_DEVICES, ...).
class UcxWorker {
 public:
  UcxWorker();
  ~UcxWorker();
  UcxWorker(const UcxWorker&) = delete;
  UcxWorker& operator=(const UcxWorker&) = delete;

  ucp_context_h context() const { return context_; }
  ucp_worker_h worker() const { return worker_; }
  const std::string& address() const { return address_; }  // what peers pass to ucp_ep_create
  int event_fd() const { return event_fd_; }                 // readable when the worker has events
  size_t max_am_header() const { return max_am_header_; }    // the largest active-message header it sends

 private:
  ucp_context_h context_ = nullptr;
  ucp_worker_h worker_ = nullptr;
  std::string address_;
  int event_fd_ = -1;
  size_t max_am_header_ = 0;
};

// The registered regions of one layout (transfer_plan.h layout_regions); unmapped on destruction.
class UcxRegistration {
 public:
  UcxRegistration(ucp_context_h context, const KVLayout& layout);
  ~UcxRegistration();
  UcxRegistration(const UcxRegistration&) = delete;
  UcxRegistration& operator=(const UcxRegistration&) = delete;

  const std::vector<RemoteRegion>& regions() const { return regions_; }  // with packed rkeys

 private:
  ucp_context_h context_;
  std::vector<ucp_mem_h> handles_;
  std::vector<RemoteRegion> regions_;
};

}  // namespace rtpllm
