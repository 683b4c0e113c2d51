// The per-token quantization formula of quantkern.reference.quantize_per_token, in one place for every
// kernel that quantizes activations (csrc/activation_quant.cu, the Hadamard kernels, csrc/block_rotation.cu), so
// their codes and scales are bit-identical:
//
//   scale = (absmax(row) * clip) / qmax   in fp32, each step rounded to nearest (no FMA, no reciprocal);
//           1 where that is 0 (an all-zero row); NaN stays NaN
//   code  = clamp(round_half_even(x / scale), -qmax, qmax)   (IEEE fp32 division; NaN -> 0)
//
// qmax = 2^(bits - 1) - 1: 7 for int4 codes, 127 for int8. Compile without --use_fast_math.
// Also the packing of a 16-byte vector's codes (quantize_store_vec), shared by csrc/activation_quant.cu and
// csrc/block_rotation.cu: element 2j in the low nibble of byte j (int4), one byte per code (int8, or unpacked int4).
#pragma once

#include <cfloat>
#include <cstdint>

#include <cuda_runtime.h>

#include "common.cuh"  // Vec16, to_float

namespace quantkern {

__device__ __forceinline__ float per_token_scale(float amax, float clip, float qmax) {
  const float scale = __fdiv_rn(__fmul_rn(amax, clip), qmax);
  return scale == 0.0f ? 1.0f : scale;
}

__device__ __forceinline__ int quantize_code(float v, float scale, int qmax) {
  const int r = __float2int_rn(__fdiv_rn(v, scale));  // saturates on +-inf, NaN -> 0
  return min(max(r, -qmax), qmax);
}

// quantize_code's result, with a multiplication by inverse = 1 / scale in place of the division where that gives
// the same code (fewer instructions than the IEEE division; csrc/block_rotation.cu uses it: with the division there
// the whole kernel took 6-15% longer on the H100, docs/PERF.md session 36):
// q = fl(v * fl(1 / scale)) is within 2^-22 |v / scale| of fl(v / scale) (two roundings of 2^-24 each, one more for
// the division's own), so the two round to different integers only where a half-integer lies between them; only
// codes with |v / scale| < qmax + 1 <= 128 can differ after the clamp, so q within 2^-15 of a half-integer. Those
// (q within 2^-12 of one), and rows whose inverse is not a normal float (usable_inverse gives 0), divide.
__device__ __forceinline__ float usable_inverse(float scale) {
  const float inverse = __frcp_rn(scale);
  return inverse >= FLT_MIN && inverse <= FLT_MAX ? inverse : 0.0f;  // (NaN: 0)
}

__device__ __forceinline__ int quantize_code_by_inverse(float v, float scale, float inverse, int qmax) {
  const float q = __fmul_rn(v, inverse);
  if (inverse == 0.0f || fabsf(q - floorf(q) - 0.5f) < 0x1p-12f) return quantize_code(v, scale, qmax);
  return min(max(__float2int_rn(q), -qmax), qmax);  // (+-inf saturates, NaN -> 0, as quantize_code)
}

// The code range of BITS-bit codes (qmax = 2^(BITS-1) - 1: 7 or 127) and the mask of a code stored in
// SBITS bits (BITS, or 8 for unpacked int4).
template <int BITS>
constexpr int kQmaxOf = (1 << (BITS - 1)) - 1;
template <int SBITS>
constexpr uint32_t kMaskOf = (1u << SBITS) - 1;

// Quantize one value with the row's scale.
template <int BITS>
__device__ __forceinline__ int quantize_one(float v, float scale) {
  static_assert(BITS == 4 || BITS == 8, "bits must be 4 or 8");
  return quantize_code(v, scale, kQmaxOf<BITS>);
}

// Store the low NBYTES bytes of `packed` (little-endian) at p, which is NBYTES-aligned.
template <int NBYTES>
__device__ __forceinline__ void store_packed(uint8_t* p, uint64_t packed) {
  if constexpr (NBYTES == 8) {
    *reinterpret_cast<uint2*>(p) = make_uint2(static_cast<uint32_t>(packed), static_cast<uint32_t>(packed >> 32));
  } else if constexpr (NBYTES == 4) {
    *reinterpret_cast<uint32_t*>(p) = static_cast<uint32_t>(packed);
  } else if constexpr (NBYTES == 2) {
    *reinterpret_cast<uint16_t*>(p) = static_cast<uint16_t>(packed);
  } else {
    static_assert(NBYTES == 8 || NBYTES == 4 || NBYTES == 2, "unsupported store width");
  }
}

// The codes of vector i of a row (its elements i * kElems ...), packed in SBITS bits each and stored at qrow. With
// an inverse (usable_inverse(scale)), by quantize_code_by_inverse: the same codes.
template <typename T, int BITS, int SBITS>
__device__ __forceinline__ void quantize_store_vec(const Vec16<T>& v, float scale, uint8_t* qrow, int64_t i,
                                                   float inverse = 0.0f) {
  constexpr int kElems = Vec16<T>::kElems;
  constexpr int kBytes = kElems * SBITS / 8;
  uint64_t packed = 0;
#pragma unroll
  for (int e = 0; e < kElems; ++e) {
    const int raw = quantize_code_by_inverse(to_float(v.v[e]), scale, inverse, kQmaxOf<BITS>);  // (inverse 0: divides)
    const uint32_t code = static_cast<uint32_t>(raw) & kMaskOf<SBITS>;
    packed |= static_cast<uint64_t>(code) << (SBITS * e);
  }
  store_packed<kBytes>(qrow + i * kBytes, packed);
}

}  // namespace quantkern
