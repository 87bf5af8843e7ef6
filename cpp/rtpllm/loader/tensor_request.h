// What a caller asks the loader for: bytes of one checkpoint tensor, and where they go.
//
// The common case is a whole tensor into a parameter (or into its rows of a fused parameter:
// `dst` is the parameter's data pointer plus the byte offset of those rows). A tensor-parallel
// rank asks for its slice:
//   - a row slice (rows r0..r1 of a row-major [R, C] matrix) is one contiguous range:
//     begin = r0 * C * esize, row_bytes = (r1 - r0) * C * esize, rows = 1;
//   - a column slice (columns c0..c1) is one strided request:
//     begin = c0 * esize, row_bytes = (c1 - c0) * esize, rows = R, src_stride = C * esize,
//     dst_stride = row_bytes (or the destination's own row pitch).
// Byte offsets are relative to the tensor's first byte; the loader checks them against the header.
// A request with an empty `tensor` reads raw bytes of any file (offsets from the file's start,
// checked against its size): how GGUF files, which have their own header format, are read.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "rtpllm/loader/safetensors_header.h"

namespace rtpllm::loader {

struct TensorRequest {
  std::string file;         // path of the safetensors file that holds the tensor
  std::string tensor;       // the tensor's name in that file's header; empty: raw file bytes
  uint64_t begin = 0;       // byte offset inside the tensor of the first byte of row 0
  uint64_t row_bytes = 0;   // bytes copied per row
  uint64_t rows = 1;        // > 1 for a strided (column-slice) request
  uint64_t src_stride = 0;  // bytes between row starts in the tensor (rows > 1)
  uintptr_t dst = 0;        // destination address (host memory or device memory, per the sink)
  uint64_t dst_bytes = 0;   // size of the destination buffer; must hold every row
  uint64_t dst_stride = 0;  // bytes between row starts at the destination (rows > 1)

  // The whole tensor into [dst, dst + dst_bytes).
  static TensorRequest whole(const std::string& file, const std::string& tensor, uintptr_t dst, uint64_t dst_bytes);
};

// One contiguous run of file bytes and the address it lands at.
struct ReadSpan {
  uint32_t file = 0;       // index into the loader's list of files
  uint64_t offset = 0;     // absolute byte offset in the file
  uint64_t bytes = 0;
  uintptr_t dst = 0;
  uint32_t request = 0;    // index of the TensorRequest it came from
};

// Checks `request` against the header of its file (the tensor exists, the rows lie inside it,
// the destination is large enough) and turns it into spans, one per row. Throws LoadError
// (kBadRequest) naming the file and the tensor.
void append_spans(const TensorRequest& request, const SafetensorsHeader& header, uint32_t file_index,
                  uint32_t request_index, std::vector<ReadSpan>& out);

// The same for a request whose bytes lie in `extent` (a tensor, or for raw requests the whole file).
void append_spans(const TensorRequest& request, const TensorInfo& extent, uint32_t file_index,
                  uint32_t request_index, std::vector<ReadSpan>& out);

}  // namespace rtpllm::loader
