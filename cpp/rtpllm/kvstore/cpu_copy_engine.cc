#include "rtpllm/kvstore/cpu_copy_engine.h"

#include <cstring>
#include <stdexcept>
#include <utility>

namespace rtpllm {

CpuKVCopyEngine::CpuKVCopyEngine(KVLayout layout, std::shared_ptr<HostAllocator> allocator)
    : layout_(std::move(layout)),
      allocator_(allocator ? std::move(allocator) : std::make_shared<AlignedHostAllocator>()) {
  layout_.validate();
  if (layout_.memory != MemoryKind::HOST) {
    throw std::invalid_argument("CpuKVCopyEngine: KVLayout.memory must be HOST (a CUDA pool needs the CUDA engine)");
  }
  worker_ = std::thread([this] { run(); });
}

CpuKVCopyEngine::~CpuKVCopyEngine() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  work_cv_.notify_all();
  worker_.join();
}

CopyTicket CpuKVCopyEngine::submit(CopyDirection direction, const std::vector<BlockCopy>& copies) {
  check_block_copies(layout_, copies);
  std::lock_guard<std::mutex> lock(mutex_);
  const CopyTicket ticket = next_ticket_++;
  if (copies.empty()) {
    states_.emplace(ticket, TransferState::DONE);
    return ticket;
  }
  states_.emplace(ticket, TransferState::PENDING);
  queue_.push_back(Job{ticket, direction, copies});
  work_cv_.notify_one();
  return ticket;
}

TransferState CpuKVCopyEngine::take_final(std::unordered_map<CopyTicket, TransferState>::iterator it) {
  const TransferState state = it->second;
  if (state != TransferState::PENDING) states_.erase(it);
  return state;
}

TransferState CpuKVCopyEngine::query(CopyTicket ticket) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = states_.find(ticket);
  if (it == states_.end()) throw std::invalid_argument("CpuKVCopyEngine: unknown copy ticket " + std::to_string(ticket));
  return take_final(it);
}

TransferState CpuKVCopyEngine::wait(CopyTicket ticket) {
  std::unique_lock<std::mutex> lock(mutex_);
  auto it = states_.find(ticket);
  if (it == states_.end()) throw std::invalid_argument("CpuKVCopyEngine: unknown copy ticket " + std::to_string(ticket));
  done_cv_.wait(lock, [&] { return states_.at(ticket) != TransferState::PENDING; });
  return take_final(states_.find(ticket));
}

void CpuKVCopyEngine::copy_block(CopyDirection direction, const BlockCopy& copy) const {
  const size_t bytes = static_cast<size_t>(layout_.block_bytes());
  for (int32_t layer = 0; layer < layout_.num_layers(); ++layer) {
    for (int32_t kv = 0; kv < 2; ++kv) {
      auto* pool = reinterpret_cast<uint8_t*>(pool_segment_address(layout_, copy.pool_block, layer, kv));
      uint8_t* host = copy.host + host_segment_offset(layout_, layer, kv);
      if (direction == CopyDirection::POOL_TO_HOST) {
        std::memcpy(host, pool, bytes);
      } else {
        std::memcpy(pool, host, bytes);
      }
    }
  }
}

void CpuKVCopyEngine::run() {
  std::unique_lock<std::mutex> lock(mutex_);
  while (true) {
    work_cv_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
    if (queue_.empty()) return;  // stopping, and every queued copy is done
    Job job = std::move(queue_.front());
    queue_.pop_front();
    lock.unlock();
    for (const BlockCopy& copy : job.copies) copy_block(job.direction, copy);
    lock.lock();
    states_[job.ticket] = TransferState::DONE;
    done_cv_.notify_all();
  }
}

}  // namespace rtpllm
