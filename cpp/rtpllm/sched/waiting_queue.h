// Requests waiting for admission, ordered by priority (lower value first).
//
// Within one priority, preempted requests come first (the most recently preempted at the
// head: it had the most context computed and is resumed first) and new requests follow in the
// order they were added. The scheduler only admits from the head, so a request that does not
// fit holds the line instead of being overtaken forever by smaller ones.
#pragma once

#include <cstddef>
#include <deque>

#include "rtpllm/core/request.h"

namespace rtpllm {

class WaitingQueue {
 public:
  void push_new(Request* request);
  void push_preempted(Request* request);
  void pop_front() { queue_.pop_front(); }
  // Removes a request (abort); returns whether it was queued.
  bool remove(const Request* request);

  Request* front() const { return queue_.front(); }
  bool empty() const { return queue_.empty(); }
  size_t size() const { return queue_.size(); }
  std::deque<Request*>::const_iterator begin() const { return queue_.begin(); }
  std::deque<Request*>::const_iterator end() const { return queue_.end(); }

 private:
  std::deque<Request*> queue_;
};

}  // namespace rtpllm
