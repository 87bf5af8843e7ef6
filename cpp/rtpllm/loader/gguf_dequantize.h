// GGUF (ggml) tensor data -> float32, on the host: one pass over the bytes, split over threads.
//
// The CPU engine runs in float32 and the default model ships as Q4_1 GGUF: decoding it with
// tensor ops takes several passes over memory per value (unpack, widen, scale, shift) and
// torch's thread pool; this decodes each 32-value block straight into its output.
// GPU loads dequantize on the device (python/rtpllm/loader/gguf_quants.py) and never call this.
#pragma once

#include <cstddef>
#include <cstdint>

namespace rtpllm::loader {

// ggml type ids (ggml.h) of the types decoded here.
enum class GgmlType : uint32_t { kF32 = 0, kF16 = 1, kQ4_0 = 2, kQ4_1 = 3, kQ8_0 = 8, kBF16 = 30 };

// True for the ggml type ids `dequantize_gguf` decodes.
bool gguf_type_supported(uint32_t ggml_type);

// Bytes that `num_values` values of `type` occupy; throws std::invalid_argument where
// `num_values` is not a whole number of blocks.
uint64_t gguf_bytes_for(GgmlType type, uint64_t num_values);

// Decodes `num_values` values of `type` from `src` (`src_bytes` long) into `dst` (num_values
// floats), with up to `num_threads` threads (small tensors use one). With `row_order` (one entry
// per row of `row_values` values), source row r lands in destination row row_order[r] (llama.cpp's
// q/k head permutation undone on the way). Throws std::invalid_argument when `src_bytes` does not
// match `num_values` of `type`, the type is not supported, or the rows do not fit.
void dequantize_gguf(uint32_t ggml_type, const uint8_t* src, uint64_t src_bytes, float* dst, uint64_t num_values,
                     size_t num_threads, const uint64_t* row_order = nullptr, uint64_t row_values = 0);

}  // namespace rtpllm::loader
