// The copy engine of the CPU build: a KV pool in host memory, copied with memcpy by one worker
// thread, so that callers see the same asynchronous contract as on the GPU (and CI exercises it).
#pragma once

#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "rtpllm/kvstore/copy_engine.h"

namespace rtpllm {

class CpuKVCopyEngine final : public KVCopyEngine {
 public:
  // The layout must be validated host memory (MemoryKind::HOST); throws std::invalid_argument
  // otherwise. allocator: nullptr means AlignedHostAllocator.
  explicit CpuKVCopyEngine(KVLayout layout, std::shared_ptr<HostAllocator> allocator = nullptr);
  ~CpuKVCopyEngine() override;  // finishes the queued copies, then joins the worker

  std::string name() const override { return "cpu"; }
  const KVLayout& layout() const override { return layout_; }
  std::shared_ptr<HostAllocator> host_allocator() const override { return allocator_; }
  CopyTicket submit(CopyDirection direction, const std::vector<BlockCopy>& copies) override;
  TransferState query(CopyTicket ticket) override;
  TransferState wait(CopyTicket ticket) override;

 private:
  struct Job {
    CopyTicket ticket;
    CopyDirection direction;
    std::vector<BlockCopy> copies;
  };

  void run();
  void copy_block(CopyDirection direction, const BlockCopy& copy) const;
  TransferState take_final(std::unordered_map<CopyTicket, TransferState>::iterator it);

  const KVLayout layout_;
  const std::shared_ptr<HostAllocator> allocator_;

  std::mutex mutex_;
  std::condition_variable work_cv_;  // the worker waits for jobs
  std::condition_variable done_cv_;  // wait() waits for tickets
  std::deque<Job> queue_;
  std::unordered_map<CopyTicket, TransferState> states_;  // submitted and not yet reported final
  CopyTicket next_ticket_ = 1;
  bool stopping_ = false;
  std::thread worker_;
};

}  // namespace rtpllm
