// PeerMemory (cpp/rtpllm/transfer/peer_memory.h) between GPU processes of one host.
//
// Export: the CUDA IPC handle of the allocation that holds a region (cudaIpcGetMemHandle on its
// base, found with cuMemGetAddressRange), the region's offset in it, the exporting process's
// nonce and its device. Memory
// that has no IPC handle (virtual memory management allocations, e.g. PyTorch's expandable
// segments) is not exported, and peers use UCX instead.
// Map: cudaIpcOpenMemHandle once per allocation (several regions may share one; a handle can be
// opened only once per process), with peer access where the two processes use different GPUs; an
// export of this same process is its own address (with peer access turned on if on another GPU).
// Copy: one kernel per put on a stream of this engine's own, at most kMaxCtas CTAs (the copy shares
// the SMs with the model's layers it overlaps), every run split into pieces of at most 256 KiB so
// that one long run still spreads over the CTAs; the copy list travels through pinned memory.
#pragma once

#include <memory>

#include "rtpllm/transfer/peer_memory.h"

namespace rtpllm::cuda {

std::unique_ptr<PeerMemory> make_cuda_peer_memory(int device);

}  // namespace rtpllm::cuda
