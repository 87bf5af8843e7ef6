#include "rtpllm/loader/tensor_request.h"

#include "rtpllm/loader/load_error.h"

namespace rtpllm::loader {
namespace {

[[noreturn]] void bad(const TensorRequest& request, const std::string& what) {
  const std::string subject = request.tensor.empty() ? "raw read" : "tensor " + request.tensor;
  throw LoadError(LoadErrorKind::kBadRequest, request.file + ": " + subject + ": " + what);
}

}  // namespace

TensorRequest TensorRequest::whole(const std::string& file, const std::string& tensor, uintptr_t dst,
                                   uint64_t dst_bytes) {
  TensorRequest request;
  request.file = file;
  request.tensor = tensor;
  request.row_bytes = dst_bytes;
  request.dst = dst;
  request.dst_bytes = dst_bytes;
  return request;
}

void append_spans(const TensorRequest& request, const SafetensorsHeader& header, uint32_t file_index,
                  uint32_t request_index, std::vector<ReadSpan>& out) {
  const TensorInfo* info = header.find(request.tensor);
  if (info == nullptr) bad(request, "not in this file");
  append_spans(request, *info, file_index, request_index, out);
}

void append_spans(const TensorRequest& request, const TensorInfo& extent, uint32_t file_index,
                  uint32_t request_index, std::vector<ReadSpan>& out) {
  const TensorInfo* info = &extent;
  if (request.rows == 0) bad(request, "rows must be at least 1");
  if (request.dst == 0 && request.row_bytes != 0) bad(request, "destination pointer is null");
  const uint64_t last = request.rows - 1;
  if (request.rows > 1 && request.src_stride < request.row_bytes)
    bad(request, "src_stride " + std::to_string(request.src_stride) + " is smaller than row_bytes " +
                     std::to_string(request.row_bytes));
  if (request.rows > 1 && request.dst_stride < request.row_bytes)
    bad(request, "dst_stride " + std::to_string(request.dst_stride) + " is smaller than row_bytes " +
                     std::to_string(request.row_bytes));
  const std::string where = request.tensor.empty() ? "the file's " : "the tensor's ";
  // Overflow-safe form of begin + last * src_stride + row_bytes <= nbytes.
  const uint64_t src_span = request.rows > 1 ? last * request.src_stride : 0;
  if (request.rows > 1 && request.src_stride != 0 && last > info->nbytes / request.src_stride)
    bad(request, "rows reach past " + where + std::to_string(info->nbytes) + " bytes");
  if (request.begin > info->nbytes || request.row_bytes > info->nbytes - request.begin ||
      src_span > info->nbytes - request.begin - request.row_bytes)
    bad(request, "requested bytes [" + std::to_string(request.begin) + ", " +
                     std::to_string(request.begin + src_span + request.row_bytes) + ") reach past " + where +
                     std::to_string(info->nbytes) + " bytes");
  const uint64_t dst_needed = (request.rows > 1 ? last * request.dst_stride : 0) + request.row_bytes;
  if (dst_needed > request.dst_bytes)
    bad(request, "destination holds " + std::to_string(request.dst_bytes) + " bytes, the request needs " +
                     std::to_string(dst_needed));
  if (request.row_bytes == 0) return;
  for (uint64_t row = 0; row < request.rows; ++row) {
    ReadSpan span;
    span.file = file_index;
    span.offset = info->offset + request.begin + row * request.src_stride;
    span.bytes = request.row_bytes;
    span.dst = request.dst + row * request.dst_stride;
    span.request = request_index;
    out.push_back(span);
  }
}

}  // namespace rtpllm::loader
