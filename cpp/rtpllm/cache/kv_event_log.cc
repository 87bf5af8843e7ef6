#include "rtpllm/cache/kv_event_log.h"

#include <stdexcept>

namespace rtpllm {

KVEventLog::KVEventLog(size_t capacity) : capacity_(capacity) {
  if (capacity == 0) throw std::invalid_argument("capacity: must be positive, got 0");
}

size_t KVEventLog::size() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return events_.size();
}

bool KVEventLog::overflowed() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return overflowed_;
}

void KVEventLog::record(KVEventKind kind, KVTier tier, BlockHash hash) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (overflowed_) return;  // nothing recorded now can be used: the reader resyncs anyway
  if (events_.size() == capacity_) {
    overflowed_ = true;
    events_.clear();
    events_.shrink_to_fit();  // a burst must not pin its memory until the next drain
    return;
  }
  events_.push_back(KVEvent{hash, kind, tier});
}

bool KVEventLog::drain(std::vector<KVEvent>& out) {
  std::lock_guard<std::mutex> lock(mutex_);
  const bool lost = overflowed_;
  if (!lost) out.insert(out.end(), events_.begin(), events_.end());
  events_.clear();
  overflowed_ = false;
  return lost;
}

}  // namespace rtpllm
