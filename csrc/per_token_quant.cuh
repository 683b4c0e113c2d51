// The per-token quantization formula of quantkern.reference.quantize_per_token, in one place for every
// kernel that quantizes activations (csrc/activation_quant.cu and the Hadamard kernels), so their codes and
// scales are bit-identical:
//
//   scale = (absmax(row) * clip) / qmax   in fp32, each step rounded to nearest (no FMA, no reciprocal);
//           1 where that is 0 (an all-zero row); NaN stays NaN
//   code  = clamp(round_half_even(x / scale), -qmax, qmax)   (IEEE fp32 division; NaN -> 0)
//
// qmax = 2^(bits - 1) - 1: 7 for int4 codes, 127 for int8. Compile without --use_fast_math.
#pragma once

#include <cuda_runtime.h>

namespace quantkern {

__device__ __forceinline__ float per_token_scale(float amax, float clip, float qmax) {
  const float scale = __fdiv_rn(__fmul_rn(amax, clip), qmax);
  return scale == 0.0f ? 1.0f : scale;
}

__device__ __forceinline__ int quantize_code(float v, float scale, int qmax) {
  const int r = __float2int_rn(__fdiv_rn(v, scale));  // saturates on +-inf, NaN -> 0
  return min(max(r, -qmax), qmax);
}

}  // namespace quantkern
