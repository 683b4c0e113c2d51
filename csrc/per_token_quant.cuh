// The per-token quantization formula of quantkern.reference.quantize_per_token, in one place for every
// kernel that quantizes activations (csrc/activation_quant.cu and the Hadamard kernels), so their codes and
// scales are bit-identical:
//
//   scale = (absmax(row) * clip) / qmax   in fp32, each step rounded to nearest (no FMA, no reciprocal);
//           1 where that is 0 (an all-zero row); NaN stays NaN
//   code  = clamp(round_half_even(x / scale), -qmax, qmax)   (IEEE fp32 division; NaN -> 0)
//
// qmax = 2^(bits - 1) - 1: 7 for int4 codes, 127 for int8. Compile without --use_fast_math.
//
// Below them, the vector helpers of the kernels that quantize rows as 16-byte vectors: csrc/activation_quant.cu
// and the few-token integer GEMM that quantizes its own input (csrc/int_small_m.cu).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "common.cuh"

namespace quantkern {

__device__ __forceinline__ float per_token_scale(float amax, float clip, float qmax) {
  const float scale = __fdiv_rn(__fmul_rn(amax, clip), qmax);
  return scale == 0.0f ? 1.0f : scale;
}

__device__ __forceinline__ int quantize_code(float v, float scale, int qmax) {
  const int r = __float2int_rn(__fdiv_rn(v, scale));  // saturates on +-inf, NaN -> 0
  return min(max(r, -qmax), qmax);
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

template <typename T>
__device__ __forceinline__ float vec_absmax(const Vec16<T>& v, float m) {
#pragma unroll
  for (int e = 0; e < Vec16<T>::kElems; ++e) m = max_propagate_nan(m, fabsf(to_float(v.v[e])));
  return m;
}

template <typename T, int BITS, int SBITS>
__device__ __forceinline__ void quantize_store_vec(const Vec16<T>& v, float scale, uint8_t* qrow, int64_t i) {
  constexpr int kElems = Vec16<T>::kElems;
  constexpr int kBytes = kElems * SBITS / 8;
  uint64_t packed = 0;
#pragma unroll
  for (int e = 0; e < kElems; ++e) {
    const uint32_t code =
        static_cast<uint32_t>(quantize_one<BITS>(to_float(v.v[e]), scale)) & kMaskOf<SBITS>;
    packed |= static_cast<uint64_t>(code) << (SBITS * e);
  }
  store_packed<kBytes>(qrow + i * kBytes, packed);
}

// Vectors first, first + stride, ... (N of them) of a row into v, every load issued before any use; zeros past end
// (|0| is neutral for the max). Returns their absmax. (Index: the type first + u * stride is computed in.)
template <typename T, int N, typename Index>
__device__ __forceinline__ float load_vectors_absmax(Vec16<T> (&v)[N], const T* __restrict__ xrow, Index first,
                                                     int stride, int64_t end) {
#pragma unroll
  for (int u = 0; u < N; ++u) {
    const int64_t i = first + u * stride;
    if (i < end) {
      v[u] = load_vec16(xrow + i * Vec16<T>::kElems);
    } else {
      *reinterpret_cast<uint4*>(&v[u]) = make_uint4(0, 0, 0, 0);
    }
  }
  float amax = 0.0f;
#pragma unroll
  for (int u = 0; u < N; ++u) amax = vec_absmax(v[u], amax);
  return amax;
}

// Quantize, pack and store the vectors that load_vectors_absmax loaded (those before end).
template <typename T, int BITS, int SBITS, int N, typename Index>
__device__ __forceinline__ void quantize_store_vectors(const Vec16<T> (&v)[N], float scale, uint8_t* __restrict__ qrow,
                                                       Index first, int stride, int64_t end) {
#pragma unroll
  for (int u = 0; u < N; ++u) {
    const int64_t i = first + u * stride;
    if (i < end) quantize_store_vec<T, BITS, SBITS>(v[u], scale, qrow, i);
  }
}

}  // namespace quantkern
