// The one rotation every RoPE site uses (the standalone RoPE + cache-write kernel and the decode
// attention kernel that fuses it), spelled with explicit rounding intrinsics so that both
// compile to the same fp32 operations: the fused and unfused decode paths then agree bit for bit.
#pragma once

namespace rtpllm::cuda {

// (x1, x2) = elements i and i + rotary_dim / 2 of a head; (c, s) = cos and sin of the angle.
__device__ __forceinline__ void rope_rotate(float x1, float x2, float c, float s, float& y1, float& y2) {
  y1 = __fmaf_rn(x1, c, -__fmul_rn(x2, s));
  y2 = __fmaf_rn(x2, c, __fmul_rn(x1, s));
}

}  // namespace rtpllm::cuda
