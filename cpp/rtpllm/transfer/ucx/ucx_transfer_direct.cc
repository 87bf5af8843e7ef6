// UcxTransfer's DataPath::DIRECT (kv_transfer.h): the peer's regions are mapped into this process
// at the handshake (PeerMemory), a put or get is one PeerMemory::copy between local and mapped
// addresses, and a put's notice goes out on the control channel once that copy has finished
// (finish_transfers_locked), as after an RMA put's flush.
#include <algorithm>
#include <stdexcept>

#include "rtpllm/transfer/ucx/ucx_transfer.h"
#include "rtpllm/transfer/ucx/ucx_transfer_state.h"

namespace rtpllm {

std::string UcxTransfer::direct_obstacle(const PeerDescriptor& remote) const {
  if (!peer_memory_) return "this engine has no access to peers' memory";
  if (!peer_memory_->supports(layout_.memory)) return "this engine's KV memory cannot be copied directly";
  if (remote.memory_scope.empty()) return "the peer exports no memory";
  if (remote.memory_scope != peer_memory_->scope()) {
    return "the peer's memory is out of reach (scope '" + remote.memory_scope + "', this engine's '" +
           peer_memory_->scope() + "')";
  }
  const bool all_exported = std::all_of(remote.regions.begin(), remote.regions.end(),
                                        [](const RemoteRegion& r) { return !r.exported.empty(); });
  if (!all_exported) return "the peer exports only part of its memory";
  return "";
}

bool UcxTransfer::map_peer_locked(Peer& peer, std::string* why) {
  *why = direct_obstacle(peer.remote);
  if (!why->empty()) return false;
  try {
    for (const RemoteRegion& region : peer.remote.regions) {
      peer.mapped.push_back(peer_memory_->map(region.exported, region.length));
    }
  } catch (const std::runtime_error& error) {
    *why = std::string("mapping the peer's memory failed: ") + error.what();
    unmap_peer_locked(peer);
    return false;
  }
  return true;
}

void UcxTransfer::unmap_peer_locked(Peer& peer) {
  if (peer.mapped.empty()) return;
  peer_memory_->drain();  // no copy of ours still reads or writes it
  for (uint64_t address : peer.mapped) peer_memory_->unmap(address);
  peer.mapped.clear();
}

void UcxTransfer::issue_direct_locked(Transfer& transfer, Peer& peer) {
  std::vector<CopyOp> copies = transfer.copies;
  for (CopyOp& copy : copies) {
    uint64_t& remote = transfer.is_put ? copy.dst : copy.src;
    const uint64_t here = peer.mapped_for(remote, copy.bytes);
    if (here == 0) {
      transfer.error = "remote address outside the peer's registered memory";
      return;
    }
    remote = here;
  }
  try {
    transfer.direct_ticket = peer_memory_->copy(copies);
  } catch (const std::runtime_error& error) {
    transfer.error = std::string("direct copy: ") + error.what();
  }
}

bool UcxTransfer::direct_copy_ended_locked(Transfer& transfer) {
  try {
    if (!peer_memory_->done(transfer.direct_ticket)) return false;
  } catch (const std::runtime_error& error) {
    if (transfer.error.empty()) transfer.error = std::string("direct copy: ") + error.what();
  }
  transfer.direct_ticket = 0;
  last_activity_ = std::chrono::steady_clock::now();
  return true;
}

}  // namespace rtpllm
