#include "rtpllm/core/types.h"

namespace rtpllm {

const char* to_string(RequestStatus status) {
  switch (status) {
    case RequestStatus::WAITING: return "WAITING";
    case RequestStatus::RUNNING: return "RUNNING";
    case RequestStatus::PREEMPTED: return "PREEMPTED";
    case RequestStatus::FINISHED: return "FINISHED";
    case RequestStatus::WAITING_FOR_KV: return "WAITING_FOR_KV";
  }
  return "UNKNOWN";
}

const char* to_string(FinishReason reason) {
  switch (reason) {
    case FinishReason::NONE: return "NONE";
    case FinishReason::STOP: return "STOP";
    case FinishReason::LENGTH: return "LENGTH";
    case FinishReason::ABORT: return "ABORT";
    case FinishReason::ERROR: return "ERROR";
  }
  return "UNKNOWN";
}

}  // namespace rtpllm
