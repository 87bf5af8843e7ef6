#include "rtpllm/kvstore/mirrored_connector.h"

#include <stdexcept>
#include <utility>

namespace rtpllm {

MirroredKVConnector::MirroredKVConnector(std::shared_ptr<KVConnector> local, int32_t num_mirrors)
    : local_(std::move(local)), num_mirrors_(num_mirrors) {
  if (!local_) throw std::invalid_argument("MirroredKVConnector: null local connector");
  if (num_mirrors_ < 1) throw std::invalid_argument("MirroredKVConnector: num_mirrors must be at least 1");
}

TransferHandle MirroredKVConnector::load(const std::vector<BlockHash>& hashes, const std::vector<BlockId>& gpu_blocks) {
  // Rank 0 first: a call it refuses (sizes disagree) is never sent to the mirrors.
  return start(true, local_->load(hashes, gpu_blocks), hashes, gpu_blocks);
}

TransferHandle MirroredKVConnector::save(const std::vector<BlockHash>& hashes, const std::vector<BlockId>& gpu_blocks) {
  return start(false, local_->save(hashes, gpu_blocks), hashes, gpu_blocks);
}

TransferHandle MirroredKVConnector::start(bool is_load, TransferHandle local, const std::vector<BlockHash>& hashes,
                                          const std::vector<BlockId>& gpu_blocks) {
  const TransferHandle handle = next_handle_++;
  Transfer& transfer = transfers_[handle];
  transfer.local = local;
  transfer.mirrors.assign(static_cast<size_t>(num_mirrors_), TransferState::PENDING);
  unsent_.push_back(MirroredOperation{handle, is_load, hashes, gpu_blocks});
  return handle;
}

TransferState MirroredKVConnector::poll(TransferHandle handle) {
  const auto it = transfers_.find(handle);
  if (it == transfers_.end()) {
    throw std::invalid_argument("MirroredKVConnector: unknown transfer handle " + std::to_string(handle));
  }
  Transfer& transfer = it->second;
  if (transfer.local_state == TransferState::PENDING) transfer.local_state = local_->poll(transfer.local);
  if (transfer.local_state == TransferState::PENDING) return TransferState::PENDING;
  TransferState end = transfer.local_state;
  for (TransferState mirror : transfer.mirrors) {
    if (mirror == TransferState::PENDING) return TransferState::PENDING;
    if (mirror == TransferState::FAILED) end = TransferState::FAILED;
  }
  transfers_.erase(it);
  return end;
}

std::vector<MirroredOperation> MirroredKVConnector::take_operations() {
  std::vector<MirroredOperation> out;
  out.swap(unsent_);
  return out;
}

void MirroredKVConnector::report(int32_t mirror, TransferHandle handle, bool done) {
  if (mirror < 0 || mirror >= num_mirrors_) {
    throw std::invalid_argument("MirroredKVConnector: mirror " + std::to_string(mirror) + " outside [0, " +
                                std::to_string(num_mirrors_) + ")");
  }
  const auto it = transfers_.find(handle);
  if (it == transfers_.end()) {
    throw std::invalid_argument("MirroredKVConnector: report for unknown transfer handle " + std::to_string(handle));
  }
  TransferState& state = it->second.mirrors[static_cast<size_t>(mirror)];
  if (state != TransferState::PENDING) {
    throw std::invalid_argument("MirroredKVConnector: mirror " + std::to_string(mirror) + " reported transfer " +
                                std::to_string(handle) + " twice");
  }
  state = done ? TransferState::DONE : TransferState::FAILED;
}

}  // namespace rtpllm
