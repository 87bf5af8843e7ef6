// Direct access to a peer's KV memory (DataPath::DIRECT, kv_transfer.h): the receiving engine
// exports its registered regions, a sender in the same scope maps them into its own address space
// and moves the bytes itself, with copies of its own instead of the network library's.
//
// Why: between two processes on one host, UCX's CUDA IPC transport moves a put as one
// cudaMemcpyAsync per contiguous run (a 4k-token prompt into a fragmented decode pool is 16,384 of
// them, ~9 us each) and a run at a fraction of the device's copy rate. A mapped peer pool is
// addressed like local memory, so one kernel copies every run of a put at device-memory speed.
//
// Implementations: InProcessPeerMemory (below; memcpy, peers in this same process: what CI
// exercises) and CudaPeerMemory (cuda/transfer/: CUDA IPC handles, a copy kernel on a stream of
// its own). Callers serialize their calls (UcxTransfer calls them under its mutex).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "rtpllm/kvstore/kv_layout.h"
#include "rtpllm/transfer/transfer_plan.h"

namespace rtpllm {

class PeerMemory {
 public:
  virtual ~PeerMemory() = default;

  // Exports map only between engines whose scopes are equal (e.g. one host and boot, one kind).
  virtual std::string scope() const = 0;

  // Whether this implementation exports and copies memory of this kind.
  virtual bool supports(MemoryKind kind) const = 0;

  // Opaque bytes with which a peer of the same scope maps [base, base + length) of this process's
  // memory. Throws std::runtime_error when the memory cannot be exported.
  virtual std::string export_region(uint64_t base, uint64_t length) = 0;

  // Maps a region a peer exported (`length` bytes from its start); returns the address of its
  // first byte in this process. Throws std::runtime_error when it cannot be mapped.
  virtual uint64_t map(const std::string& exported, uint64_t length) = 0;

  // Undoes one map() of the region (by the address map() returned). Copies into it must have
  // finished (drain()). Never throws.
  virtual void unmap(uint64_t address) noexcept = 0;

  // Starts copies between addresses of this process (local or mapped); returns a ticket, nonzero
  // and larger than every earlier one.
  virtual uint64_t copy(const std::vector<CopyOp>& copies) = 0;

  // Whether the copies of `ticket` have finished (and those of every earlier ticket). Throws
  // std::runtime_error when the device failed them (then for every later ticket too).
  virtual bool done(uint64_t ticket) = 0;

  // Waits until every copy started has finished (or failed). Never throws.
  virtual void drain() noexcept = 0;
};

// "<host name>|<boot id>": processes of one running host share it (containers with the host's
// network may too, with PID namespaces of their own: tell processes apart by process_nonce()).
std::string host_scope();

// 128 random bits drawn once per process, in hex: names this process in exports (a pid does not:
// two containers of one host may both run their server as pid 1).
const std::string& process_nonce();

// For engines in one process (tests, and a prefill and a decode engine sharing a process): the
// export is the address itself, copies are memcpy and finished when copy() returns.
std::unique_ptr<PeerMemory> make_in_process_peer_memory();

}  // namespace rtpllm
