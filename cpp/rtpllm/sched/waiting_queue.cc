#include "rtpllm/sched/waiting_queue.h"

#include <algorithm>

namespace rtpllm {

void WaitingQueue::push_new(Request* request) {
  // Behind everything at least as important. Scans from the back: with one priority class
  // (the common case) this is an O(1) append.
  auto it = queue_.end();
  while (it != queue_.begin() && (*std::prev(it))->priority > request->priority) --it;
  queue_.insert(it, request);
}

void WaitingQueue::push_preempted(Request* request) {
  // Ahead of everything not more important.
  auto it = queue_.begin();
  while (it != queue_.end() && (*it)->priority < request->priority) ++it;
  queue_.insert(it, request);
}

bool WaitingQueue::remove(const Request* request) {
  const auto it = std::find(queue_.begin(), queue_.end(), request);
  if (it == queue_.end()) return false;
  queue_.erase(it);
  return true;
}

}  // namespace rtpllm
