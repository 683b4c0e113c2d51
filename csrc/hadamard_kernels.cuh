// Device code and launch templates of the online Hadamard kernels, shared by the translation units
// csrc/hadamard.cu (host side, m = 1, the small kernel), csrc/hadamard_paley1.cu (m = 12, 20, 40) and
// csrc/hadamard_paley2.cu (m = 28, 36): split so that the build compiles them in parallel.
// The design (tiling, layout, pipeline, exactness) is described at the top of csrc/hadamard.cu.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common.cuh"
#include "per_token_quant.cuh"

namespace quantkern {
namespace hadamard_impl {


// ---------------------------------------------------------------------------------------------
// The base matrices H_m, generated (no pasted tables), exactly as quantkern/rotation.py builds them.
// ---------------------------------------------------------------------------------------------

// Quadratic character of a modulo the odd prime q (Euler's criterion): 0, +1 or -1.
__host__ __device__ constexpr int legendre_symbol(int a, int q) {
  a %= q;
  if (a < 0) a += q;
  if (a == 0) return 0;
  long long result = 1, base = a;
  for (int e = (q - 1) / 2; e > 0; e >>= 1) {
    if (e & 1) result = result * base % q;
    base = base * base % q;
  }
  return result == 1 ? 1 : -1;
}

// Paley I, order q + 1 (q = 3 mod 4): H = I + S, S = [[0, 1^T], [-1, Q]], Q[i][j] = legendre(j - i).
__host__ __device__ constexpr int paley_first_sign(int q, int a, int c) {
  if (a == 0) return 1;
  if (c == 0) return -1;
  if (a == c) return 1;
  return legendre_symbol(c - a, q);
}

// Paley II, order 2 (q + 1) (q = 1 mod 4): H = kron(S, A) + kron(I, B), S = [[0, 1^T], [1, Q]],
// A = [[1, 1], [1, -1]], B = [[1, -1], [-1, -1]].
__host__ __device__ constexpr int paley_second_sign(int q, int a, int c) {
  const int i = a / 2, p = a % 2, j = c / 2, r = c % 2;
  if (i == j) return (p == 0 && r == 0) ? 1 : -1;
  const int s = (i == 0 || j == 0) ? 1 : legendre_symbol(j - i, q);
  return (p == 1 && r == 1) ? -s : s;
}

// H_m[a][c] for m in {1, 12, 20, 28, 36, 40} (40 = [[H20, H20], [H20, -H20]]); 0 for anything else.
__host__ __device__ constexpr int base_sign(int m, int a, int c) {
  switch (m) {
    case 1: return 1;
    case 12: return paley_first_sign(11, a, c);
    case 20: return paley_first_sign(19, a, c);
    case 28: return paley_second_sign(13, a, c);
    case 36: return paley_second_sign(17, a, c);
    case 40: return (a >= 20 && c >= 20 ? -1 : 1) * paley_first_sign(19, a % 20, c % 20);
    default: return 0;
  }
}

// Compile-time loop: f(std::integral_constant<int, 0>{}), ..., f(integral_constant<N - 1>).
template <class F, int... Is>
__device__ __forceinline__ void static_for_impl(F&& f, std::integer_sequence<int, Is...>) {
  (f(std::integral_constant<int, Is>{}), ...);
}
template <int N, class F>
__device__ __forceinline__ void static_for(F&& f) {
  static_for_impl(f, std::make_integer_sequence<int, N>{});
}

// S[i][j] of Paley II's core matrix (q = 1 mod 4): 0 on the diagonal, 1 in row/column 0, legendre(j - i).
__host__ __device__ constexpr int paley_core_sign(int q, int i, int j) {
  return i == j ? 0 : ((i == 0 || j == 0) ? 1 : legendre_symbol(j - i, q));
}

// v <- H_M v for the Paley II orders (28: q = 13, 36: q = 17) through their structure
// H = kron(S, A) + kron(I, B): z_i = A (v_2i, v_2i+1), u = S z (q adds per output: S has a zero diagonal),
// y_2i = u_i0 + (v_2i - v_2i+1), y_2i+1 = u_i1 - (v_2i + v_2i+1). About 14 operations per element instead of
// M - 1 = 27 / 35 (same matrix; another summation order, within fp32 rounding).
template <int M>
__device__ __forceinline__ void apply_paley_second(float (&v)[M]) {
  constexpr int kQ = M / 2 - 1, kH = M / 2;
  float z0[kH], z1[kH];
#pragma unroll
  for (int i = 0; i < kH; ++i) {
    z0[i] = v[2 * i] + v[2 * i + 1];
    z1[i] = v[2 * i] - v[2 * i + 1];
  }
  static_for<kH>([&](auto I) {
    constexpr int i = decltype(I)::value;
    float u0 = 0.0f, u1 = 0.0f;
    static_for<kH>([&](auto J) {
      constexpr int j = decltype(J)::value;
      constexpr int ii = decltype(I)::value;
      constexpr int sign = paley_core_sign(kQ, ii, j);
      constexpr int first = ii == 0 ? 1 : 0;  // the row's first nonzero column
      if constexpr (j == first) {
        u0 = sign > 0 ? z0[j] : -z0[j];
        u1 = sign > 0 ? z1[j] : -z1[j];
      } else if constexpr (sign > 0) {
        u0 = u0 + z0[j];
        u1 = u1 + z1[j];
      } else if constexpr (sign < 0) {
        u0 = u0 - z0[j];
        u1 = u1 - z1[j];
      }
    });
    v[2 * i] = u0 + z1[i];
    v[2 * i + 1] = u1 - z0[i];
  });
}

// v <- H_M v over M registers: M - 1 adds/subtracts per output, signs folded at compile time
// (Paley II orders: apply_paley_second).
template <int M>
__device__ __forceinline__ void apply_base(float (&v)[M]) {
  if constexpr (M == 28 || M == 36) {
    apply_paley_second<M>(v);
    return;
  }
  float y[M];
  static_for<M>([&](auto A) {
    constexpr int a = decltype(A)::value;
    float acc = base_sign(M, a, 0) > 0 ? v[0] : -v[0];
    static_for<M - 1>([&](auto C1) {
      constexpr int c = decltype(C1)::value + 1;
      if constexpr (base_sign(M, decltype(A)::value, c) > 0) {
        acc = acc + v[c];
      } else {
        acc = acc - v[c];
      }
    });
    y[a] = acc;
  });
#pragma unroll
  for (int i = 0; i < M; ++i) v[i] = y[i];
}

// ---------------------------------------------------------------------------------------------
// Element I/O
// ---------------------------------------------------------------------------------------------

// (from_float and to_float: common.cuh)

// y rounded to T and back (identity for fp32).
template <typename T>
__device__ __forceinline__ float round_to(float v) { return to_float(from_float<T>(v)); }

// 8 consecutive values -> T (16-byte aligned).
template <typename T>
__device__ __forceinline__ void store8(T* p, const float (&f)[8]) {
  if constexpr (std::is_same_v<T, float>) {
    reinterpret_cast<float4*>(p)[0] = make_float4(f[0], f[1], f[2], f[3]);
    reinterpret_cast<float4*>(p)[1] = make_float4(f[4], f[5], f[6], f[7]);
  } else {
    Vec16<T> v;
#pragma unroll
    for (int e = 0; e < 8; ++e) v.v[e] = from_float<T>(f[e]);
    *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(&v);
  }
}

// An adjacent pair -> T (aligned to the pair's size).
template <typename T>
__device__ __forceinline__ void store2(T* p, float a, float b) {
  if constexpr (std::is_same_v<T, float>) {
    *reinterpret_cast<float2*>(p) = make_float2(a, b);
  } else if constexpr (std::is_same_v<T, __half>) {
    *reinterpret_cast<__half2*>(p) = __halves2half2(__float2half_rn(a), __float2half_rn(b));
  } else {
    *reinterpret_cast<__nv_bfloat162*>(p) = __halves2bfloat162(__float2bfloat16_rn(a), __float2bfloat16_rn(b));
  }
}

// ---------------------------------------------------------------------------------------------
// Kernel parameters and shared-memory addressing
// ---------------------------------------------------------------------------------------------

constexpr int kMaxRounds = 3;
constexpr int kMaxThreads = 256;  // per CTA (launch bound: up to 255 registers a thread)

struct Params {
  const void* x;
  void* out;        // hadamard: y [rows, n] in x's dtype; quantize: codes
  float* scales;    // quantize: [rows]
  int n;            // row length
  int k;            // log2 of the power-of-two factor (or of the block size)
  int nrounds;      // butterfly rounds in shared memory
  int lo[kMaxRounds], g[kMaxRounds];
  int r2;           // direct path: first bit of the final round
  int gf;           // direct path: butterfly bits done in the final round
  int swz;          // swizzle shift S
  int bits;         // 4 or 8 (quantize)
  float norm;       // fp32(1 / sqrt(transform size))
  float clip;
};

__device__ __forceinline__ int swizzle(int i, int s) {
  return i ^ (((i >> 5) & 1) << 2) ^ (((i >> s) & 3) << 3);
}

// Max of |v| over the block (all threads must call; NaN propagates like torch.amax).
__device__ __forceinline__ float block_absmax(float v, float* red) {
  v = warp_reduce_max(v);
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int nwarps = (blockDim.x + kWarpSize - 1) / kWarpSize;
  __syncthreads();  // `red` may still be read by a previous call
  if (lane == 0) red[warp] = v;
  __syncthreads();
  v = lane < nwarps ? red[lane] : 0.0f;
  return warp_reduce_max(v);
}

__device__ __forceinline__ float row_scale(float amax, float clip, int bits) {
  return per_token_scale(amax, clip, bits == 4 ? 7.0f : 127.0f);
}

// ---------------------------------------------------------------------------------------------
// Phases
// ---------------------------------------------------------------------------------------------

// Raw 16-byte loads of one 8-element vector (fp32: two), converted later: issuing all of a thread's loads
// before converting any keeps kLoadBatch * 16 bytes (or more) in flight per thread.
template <typename T>
struct Raw8 {
  static constexpr int kWords = sizeof(T) == 4 ? 2 : 1;
  uint4 w[kWords];
};

template <typename T>
__device__ __forceinline__ Raw8<T> load_raw8(const T* __restrict__ p) {
  Raw8<T> r;
#pragma unroll
  for (int i = 0; i < Raw8<T>::kWords; ++i) r.w[i] = __ldg(reinterpret_cast<const uint4*>(p) + i);
  return r;
}

// Convert, butterflies of bits 0-2, store to shared memory (fp32, swizzled) at element i.
template <typename T>
__device__ __forceinline__ void butterfly8_store(const Raw8<T>& r, float* s, int i, int swz) {
  float f[8];
  if constexpr (std::is_same_v<T, float>) {
    const float* src = reinterpret_cast<const float*>(r.w);
#pragma unroll
    for (int e = 0; e < 8; ++e) f[e] = src[e];
  } else {
    const Vec16<T>& v = *reinterpret_cast<const Vec16<T>*>(r.w);
#pragma unroll
    for (int e = 0; e < 8; ++e) f[e] = to_float(v.v[e]);
  }
#pragma unroll
  for (int h = 1; h < 8; h <<= 1) {
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      if ((j & h) == 0) {
        const float a = f[j], b = f[j | h];
        f[j] = a + b;
        f[j | h] = a - b;
      }
    }
  }
  *reinterpret_cast<float4*>(s + swizzle(i, swz)) = make_float4(f[0], f[1], f[2], f[3]);
  *reinterpret_cast<float4*>(s + swizzle(i + 4, swz)) = make_float4(f[4], f[5], f[6], f[7]);
}

constexpr int kLoadBatch = 4;  // vectors per thread in flight in the generic load loop

// Load the row, butterflies of bits 0-2 in registers, store to shared memory (fp32, swizzled).
template <typename T>
__device__ __forceinline__ void load_phase(const T* __restrict__ xr, float* s, int n, int swz) {
  const int nvec = n >> 3;
  const int stride = blockDim.x;
  for (int v0 = threadIdx.x; v0 < nvec; v0 += kLoadBatch * stride) {
    Raw8<T> r[kLoadBatch];
#pragma unroll
    for (int u = 0; u < kLoadBatch; ++u) {
      const int v = v0 + u * stride;
      if (v < nvec) r[u] = load_raw8(xr + static_cast<int64_t>(v) * 8);
    }
#pragma unroll
    for (int u = 0; u < kLoadBatch; ++u) {
      const int v = v0 + u * stride;
      if (v < nvec) butterfly8_store(r[u], s, v * 8, swz);
    }
  }
}

// The same with the row length and thread count known at compile time: every load of the thread first.
template <typename T, int N, int THREADS>
__device__ __forceinline__ void load_phase_ct(const T* __restrict__ xr, float* s, int swz) {
  constexpr int kVec = N / 8, kPer = (kVec + THREADS - 1) / THREADS;
  Raw8<T> r[kPer];
#pragma unroll
  for (int u = 0; u < kPer; ++u) {
    const int v = threadIdx.x + u * THREADS;
    if (kVec % THREADS == 0 || v < kVec) r[u] = load_raw8(xr + static_cast<int64_t>(v) * 8);
  }
#pragma unroll
  for (int u = 0; u < kPer; ++u) {
    const int v = threadIdx.x + u * THREADS;
    if (kVec % THREADS == 0 || v < kVec) butterfly8_store(r[u], s, v * 8, swz);
  }
}

// One round: butterflies of bits [lo, lo + G) for every column, in place.
template <int G>
__device__ __forceinline__ void round_phase(float* s, int n, int lo, int swz) {
  constexpr int R = 1 << G;
  const int cols = n >> G;
  const int low_mask = (1 << lo) - 1;
  for (int col = threadIdx.x; col < cols; col += blockDim.x) {
    const int base = (col & low_mask) + ((col >> lo) << (lo + G));
    float v[R];
#pragma unroll
    for (int j = 0; j < R; ++j) v[j] = s[swizzle(base + (j << lo), swz)];
#pragma unroll
    for (int h = 1; h < R; h <<= 1) {
#pragma unroll
      for (int j = 0; j < R; ++j) {
        if ((j & h) == 0) {
          const float a = v[j], b = v[j | h];
          v[j] = a + b;
          v[j | h] = a - b;
        }
      }
    }
#pragma unroll
    for (int j = 0; j < R; ++j) s[swizzle(base + (j << lo), swz)] = v[j];
  }
}

template <int GMAX>
__device__ __forceinline__ void run_rounds(float* s, const Params& p) {
#pragma unroll
  for (int r = 0; r < kMaxRounds; ++r) {  // unrolled: p.lo / p.g stay in the parameter bank
    if (r < p.nrounds) {
      __syncthreads();
      switch (p.g[r]) {
        case 1: round_phase<1>(s, p.n, p.lo[r], p.swz); break;
        case 2: round_phase<2>(s, p.n, p.lo[r], p.swz); break;
        case 3: round_phase<3>(s, p.n, p.lo[r], p.swz); break;
        case 4: round_phase<4>(s, p.n, p.lo[r], p.swz); break;
        default:
          if constexpr (GMAX >= 6) {
            if (p.g[r] == 6) {
              round_phase<6>(s, p.n, p.lo[r], p.swz);
              break;
            }
          }
          round_phase<5>(s, p.n, p.lo[r], p.swz);
          break;
      }
    }
  }
  __syncthreads();
}

// Code of v / scale computed as v * (1 / scale): round half to even by adding 1.5 * 2^23 (the low bits of the
// sum are the two's-complement code), clamp first (same result: the bounds are integers). The product is
// within 2 ulp of the IEEE quotient, so it rounds like the quotient unless the quotient lies within ~2e-5 of
// a half-integer: such values set `near_tie`, and the caller redoes the row's codes with IEEE division.
// About 7 instructions instead of the ~15 of a division.
__device__ __forceinline__ uint32_t fast_code(float v, float inv, float qmax, bool& near_tie) {
  constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23
  float t = __fmul_rn(v, inv);
  t = fminf(fmaxf(t, -qmax), qmax);
  const float tm = __fadd_rn(t, kMagic);
  near_tie |= fabsf(__fsub_rn(t, __fsub_rn(tm, kMagic))) > 0.4999f;
  return __float_as_uint(tm);
}

// Quantize and store the direct path's registers: one byte (int4 pair) or two (int8 pair) per (b, a).
template <int BITS, int M, int B>
__device__ __forceinline__ void store_codes_direct(const float (&v)[2][B][M], float scale, uint8_t* qr, int P,
                                                   int r2, int col) {
  constexpr int kQmax = BITS == 4 ? 7 : 127;
  constexpr uint32_t kMask = (1u << BITS) - 1;
  const float inv = __frcp_rn(scale);
  // NaN / Inf in the row (scale not finite): the IEEE path, which gives quantize_per_token's codes.
  bool near_tie = !(fabsf(scale) <= 3.402823466e38f);
  uint32_t packed[B][M];
#pragma unroll
  for (int b = 0; b < B; ++b) {
#pragma unroll
    for (int a = 0; a < M; ++a) {
      const uint32_t lo = fast_code(v[0][b][a], inv, static_cast<float>(kQmax), near_tie) & kMask;
      const uint32_t hi = fast_code(v[1][b][a], inv, static_cast<float>(kQmax), near_tie) & kMask;
      packed[b][a] = lo | (hi << BITS);
    }
  }
  if (near_tie) {  // rare: bit-exact IEEE division for this thread's values
#pragma unroll
    for (int b = 0; b < B; ++b) {
#pragma unroll
      for (int a = 0; a < M; ++a) {
        const uint32_t lo = static_cast<uint32_t>(quantize_code(v[0][b][a], scale, kQmax)) & kMask;
        const uint32_t hi = static_cast<uint32_t>(quantize_code(v[1][b][a], scale, kQmax)) & kMask;
        packed[b][a] = lo | (hi << BITS);
      }
    }
  }
#pragma unroll
  for (int b = 0; b < B; ++b) {
#pragma unroll
    for (int a = 0; a < M; ++a) {
      const int i = a * P + (b << r2) + (col << 1);  // the pair's first element
      if constexpr (BITS == 4) {
        qr[i / 2] = static_cast<uint8_t>(packed[b][a]);
      } else {
        *reinterpret_cast<uint16_t*>(qr + i) = static_cast<uint16_t>(packed[b][a]);
      }
    }
  }
}

// Direct final round: pair (bit 0) x bits [r2, r2 + GF) x the M blocks in registers; finish, then store
// (hadamard) or reduce + quantize + store, straight from registers.
// k, r2 and swz are arguments so that the compile-time-shaped kernels below fold them into immediates.
template <typename T, int M, bool QUANT, int GF>
__device__ __forceinline__ void final_direct(const float* s, float* red, const Params& p, int64_t row, int n,
                                             int k, int r2, int swz) {
  constexpr int B = 1 << GF;
  const int P = 1 << k;
  const int col = threadIdx.x;  // index bits 1 .. r2-1
  const bool active = col < (1 << (r2 - 1));
  float v[2][B][M];
  float amax = 0.0f;
  if (active) {
#pragma unroll
    for (int b = 0; b < B; ++b) {
#pragma unroll
      for (int a = 0; a < M; ++a) {
        const int i = a * P + (b << r2) + (col << 1);
        const float2 t = *reinterpret_cast<const float2*>(s + swizzle(i, swz));
        v[0][b][a] = t.x;
        v[1][b][a] = t.y;
      }
    }
#pragma unroll
    for (int e = 0; e < 2; ++e) {
#pragma unroll
      for (int h = 1; h < B; h <<= 1) {
#pragma unroll
        for (int b = 0; b < B; ++b) {
          if ((b & h) == 0) {
#pragma unroll
            for (int a = 0; a < M; ++a) {
              const float x0 = v[e][b][a], x1 = v[e][b | h][a];
              v[e][b][a] = x0 + x1;
              v[e][b | h][a] = x0 - x1;
            }
          }
        }
      }
      if constexpr (M > 1) {
#pragma unroll
        for (int b = 0; b < B; ++b) apply_base<M>(v[e][b]);
      }
#pragma unroll
      for (int b = 0; b < B; ++b) {
#pragma unroll
        for (int a = 0; a < M; ++a) {
          v[e][b][a] = __fmul_rn(v[e][b][a], p.norm);
          if constexpr (QUANT) {
            v[e][b][a] = round_to<T>(v[e][b][a]);
            amax = max_propagate_nan(amax, fabsf(v[e][b][a]));
          }
        }
      }
    }
  }
  if constexpr (!QUANT) {
    if (active) {
      T* yr = static_cast<T*>(p.out) + row * n;
#pragma unroll
      for (int b = 0; b < B; ++b) {
#pragma unroll
        for (int a = 0; a < M; ++a) store2(yr + a * P + (b << r2) + (col << 1), v[0][b][a], v[1][b][a]);
      }
    }
  } else {
    amax = block_absmax(amax, red);
    const float scale = row_scale(amax, p.clip, p.bits);
    if (threadIdx.x == 0) p.scales[row] = scale;
    if (active) {
      if (p.bits == 4) {
        store_codes_direct<4, M, B>(v, scale, static_cast<uint8_t*>(p.out) + row * (n / 2), P, r2, col);
      } else {
        store_codes_direct<8, M, B>(v, scale, static_cast<uint8_t*>(p.out) + row * n, P, r2, col);
      }
    }
  }
}

// Indirect path, dense step: one more round with the M blocks of each column (b) in registers.
template <int M>
__device__ __forceinline__ void dense_round(float* s, const Params& p) {
  const int P = 1 << p.k;
  for (int b = threadIdx.x; b < P; b += blockDim.x) {
    float v[M];
#pragma unroll
    for (int a = 0; a < M; ++a) v[a] = s[swizzle(a * P + b, p.swz)];
    apply_base<M>(v);
#pragma unroll
    for (int a = 0; a < M; ++a) s[swizzle(a * P + b, p.swz)] = v[a];
  }
  __syncthreads();
}

// Indirect path, output sweeps over 8-vectors in shared memory.
template <typename T, bool QUANT>
__device__ __forceinline__ void output_sweeps(const float* s, float* red, const Params& p, int64_t row) {
  const int nvec = p.n >> 3;
  auto read8 = [&](int v, float (&f)[8]) {
    const int i = v * 8;
    const float4 a = *reinterpret_cast<const float4*>(s + swizzle(i, p.swz));
    const float4 b = *reinterpret_cast<const float4*>(s + swizzle(i + 4, p.swz));
    f[0] = a.x; f[1] = a.y; f[2] = a.z; f[3] = a.w; f[4] = b.x; f[5] = b.y; f[6] = b.z; f[7] = b.w;
#pragma unroll
    for (int e = 0; e < 8; ++e) f[e] = __fmul_rn(f[e], p.norm);
  };
  if constexpr (!QUANT) {
    T* yr = static_cast<T*>(p.out) + row * p.n;
    for (int v = threadIdx.x; v < nvec; v += blockDim.x) {
      float f[8];
      read8(v, f);
      store8(yr + static_cast<int64_t>(v) * 8, f);
    }
  } else {
    float amax = 0.0f;
    for (int v = threadIdx.x; v < nvec; v += blockDim.x) {
      float f[8];
      read8(v, f);
#pragma unroll
      for (int e = 0; e < 8; ++e) amax = max_propagate_nan(amax, fabsf(round_to<T>(f[e])));
    }
    amax = block_absmax(amax, red);
    const float scale = row_scale(amax, p.clip, p.bits);
    if (threadIdx.x == 0) p.scales[row] = scale;
    for (int v = threadIdx.x; v < nvec; v += blockDim.x) {
      float f[8];
      read8(v, f);
      if (p.bits == 4) {
        uint32_t packed = 0;
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          packed |= (static_cast<uint32_t>(quantize_code(round_to<T>(f[e]), scale, 7)) & 0xF) << (4 * e);
        }
        reinterpret_cast<uint32_t*>(static_cast<uint8_t*>(p.out) + row * (p.n / 2))[v] = packed;
      } else {
        uint32_t w0 = 0, w1 = 0;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          w0 |= (static_cast<uint32_t>(quantize_code(round_to<T>(f[e]), scale, 127)) & 0xFF) << (8 * e);
          w1 |= (static_cast<uint32_t>(quantize_code(round_to<T>(f[e + 4]), scale, 127)) & 0xFF) << (8 * e);
        }
        reinterpret_cast<uint2*>(static_cast<uint8_t*>(p.out) + row * p.n)[v] = make_uint2(w0, w1);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------

// GF: bits of the direct final round (M == 1); GMAX: the widest round (5 or 6 bits). Separate
// instantiations keep each kernel's register allocation to what its own sizes need.
template <typename T, int M, bool QUANT, bool DIRECT, int GF, int GMAX>
__global__ void __launch_bounds__(kMaxThreads) hadamard_kernel(const Params p) {
  extern __shared__ float4 smem_vec[];
  float* s = reinterpret_cast<float*>(smem_vec);
  __shared__ float red[kMaxThreads / kWarpSize];
  const int64_t row = blockIdx.x;
  load_phase<T>(static_cast<const T*>(p.x) + row * p.n, s, p.n, p.swz);
  run_rounds<GMAX>(s, p);
  if constexpr (DIRECT) {
    final_direct<T, M, QUANT, GF>(s, red, p, row, p.n, p.k, p.r2, p.swz);
  } else {
    if constexpr (M > 1) dense_round<M>(s, p);
    output_sweeps<T, QUANT>(s, red, p, row);
  }
}

// The hot sizes with every shape parameter known at compile time (n = M * 2^K, one shared-memory round of
// bits [3, 3 + G1), final round of GF bits + the M blocks + the pair): all shared-memory addresses fold to
// per-thread base + immediate, which keeps the register count near the live values.
// Launch bound: 2^(2 + G1) threads, and at least two CTAs per SM for the 256-thread shapes (<= 128 registers).
template <typename T, int M, bool QUANT, int K, int G1, int GF>
__global__ void __launch_bounds__(1 << (2 + G1), G1 >= 6 ? 2 : 4) hadamard_kernel_ct(const Params p) {
  static_assert(3 + G1 + GF == K, "bits 0-2 at load, one round, the final round");
  constexpr int kN = M << K, kR2 = 3 + G1, kSwz = 3 + G1;
  extern __shared__ float4 smem_vec[];
  float* s = reinterpret_cast<float*>(smem_vec);
  __shared__ float red[kMaxThreads / kWarpSize];
  const int64_t row = blockIdx.x;
  load_phase_ct<T, kN, (1 << (2 + G1))>(static_cast<const T*>(p.x) + row * kN, s, kSwz);
  __syncthreads();
  round_phase<G1>(s, kN, 3, kSwz);
  __syncthreads();
  final_direct<T, M, QUANT, GF>(s, red, p, row, kN, K, kR2, kSwz);
}

// Small transforms (k < 3: n <= 160): one thread per output, y_i = sum_j H[i][j] x_j in fp32, with
// H[i][j] = H_m[i >> k][j >> k] * (-1)^popcount(i & j & (2^k - 1)). Rows staged in shared memory.
template <typename T, bool QUANT>
__global__ void __launch_bounds__(kMaxThreads) hadamard_small_kernel(const Params p, int m) {
  __shared__ float xs[kMaxThreads];
  __shared__ float red[kMaxThreads / kWarpSize];
  __shared__ int codes[kMaxThreads];
  const int64_t row = blockIdx.x;
  const int n = p.n, k = p.k, i = threadIdx.x;
  const int pmask = (1 << k) - 1;
  const T* xr = static_cast<const T*>(p.x) + row * n;
  if (i < n) xs[i] = to_float(xr[i]);
  __syncthreads();
  float y = 0.0f;
  if (i < n) {
    for (int j = 0; j < n; ++j) {
      const int sign = base_sign(m, i >> k, j >> k) * ((__popc(i & j & pmask) & 1) ? -1 : 1);
      y = sign > 0 ? y + xs[j] : y - xs[j];
    }
    y = __fmul_rn(y, p.norm);
  }
  if constexpr (!QUANT) {
    if (i < n) static_cast<T*>(p.out)[row * n + i] = from_float<T>(y);
  } else {
    y = round_to<T>(y);
    const float amax = block_absmax(i < n ? fabsf(y) : 0.0f, red);
    const float scale = row_scale(amax, p.clip, p.bits);
    if (i == 0) p.scales[row] = scale;
    if (p.bits == 8) {
      if (i < n) static_cast<int8_t*>(p.out)[row * n + i] = static_cast<int8_t>(quantize_code(y, scale, 127));
    } else {
      if (i < n) codes[i] = quantize_code(y, scale, 7);
      __syncthreads();
      if (2 * i < n) {
        static_cast<uint8_t*>(p.out)[row * (n / 2) + i] =
            static_cast<uint8_t>((codes[2 * i] & 0xF) | ((codes[2 * i + 1] & 0xF) << 4));
      }
    }
  }
}

struct Plan {
  Params p;
  int m;
  bool small;
  bool direct;
  bool hot;  // whole-row transform: may take a compile-time-shaped kernel
  int threads;
  size_t smem;
};

template <typename T, int M, bool QUANT, bool DIRECT, int GF, int GMAX>
void launch_fast(const Plan& plan, int64_t rows, cudaStream_t stream) {
  auto kernel = hadamard_kernel<T, M, QUANT, DIRECT, GF, GMAX>;
  if (plan.smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(plan.smem)));
  }
  kernel<<<static_cast<unsigned>(rows), plan.threads, plan.smem, stream>>>(plan.p);
  QK_CHECK_LAUNCH();
}

template <typename T, int M, bool QUANT, int K, int G1, int GF>
void launch_ct(const Plan& plan, int64_t rows, cudaStream_t stream) {
  auto kernel = hadamard_kernel_ct<T, M, QUANT, K, G1, GF>;
  constexpr int threads = 1 << (2 + G1);  // one per pair column: 2^(r2 - 1)
  constexpr size_t smem = sizeof(float) * (M << K);
  if constexpr (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  kernel<<<static_cast<unsigned>(rows), threads, smem, stream>>>(plan.p);
  QK_CHECK_LAUNCH();
}

// The sizes with a compile-time-shaped kernel (the Llama / Qwen / Mistral hidden and MLP sizes).
template <typename T, int M, bool QUANT>
bool launch_hot(const Plan& plan, int64_t rows, cudaStream_t stream) {
  if constexpr (M == 1) {
    switch (plan.p.k) {
      case 12: launch_ct<T, 1, QUANT, 12, 5, 4>(plan, rows, stream); return true;  // 4096
      case 13: launch_ct<T, 1, QUANT, 13, 5, 5>(plan, rows, stream); return true;  // 8192
      case 14: launch_ct<T, 1, QUANT, 14, 6, 5>(plan, rows, stream); return true;  // 16384
      default: return false;
    }
  } else if constexpr (M == 28) {
    if (plan.p.k == 9) {  // 14336 = 28 x 512
      launch_ct<T, 28, QUANT, 9, 6, 0>(plan, rows, stream);
      return true;
    }
  }
  return false;
}

template <typename T, int M, bool QUANT>
void launch_m(const Plan& plan, int64_t rows, cudaStream_t stream) {
  if (plan.hot && launch_hot<T, M, QUANT>(plan, rows, stream)) return;
  if (!plan.direct) {
    launch_fast<T, M, QUANT, false, 0, 6>(plan, rows, stream);
  } else if constexpr (M > 1) {
    launch_fast<T, M, QUANT, true, 0, 6>(plan, rows, stream);
  } else {
    // M == 1: gf < 5 comes with rounds of at most 5 bits (make_plan: r2 = 8 once k > 8).
    switch (plan.p.gf) {
      case 0: launch_fast<T, 1, QUANT, true, 0, 5>(plan, rows, stream); break;
      case 1: launch_fast<T, 1, QUANT, true, 1, 5>(plan, rows, stream); break;
      case 2: launch_fast<T, 1, QUANT, true, 2, 5>(plan, rows, stream); break;
      case 3: launch_fast<T, 1, QUANT, true, 3, 5>(plan, rows, stream); break;
      case 4: launch_fast<T, 1, QUANT, true, 4, 5>(plan, rows, stream); break;
      default: launch_fast<T, 1, QUANT, true, 5, 6>(plan, rows, stream); break;
    }
  }
}

// One per translation unit: run the row transform for the base orders that unit instantiates.
void launch_m1(const Plan& plan, int64_t rows, cudaStream_t stream, at::ScalarType dtype, bool quant);
void launch_paley_first(const Plan& plan, int64_t rows, cudaStream_t stream, at::ScalarType dtype, bool quant);
void launch_paley_second(const Plan& plan, int64_t rows, cudaStream_t stream, at::ScalarType dtype, bool quant);

// The per-unit entry points: a dtype switch around launch_m<T, M, QUANT>.
template <int M>
void launch_dtype(const Plan& plan, int64_t rows, cudaStream_t stream, at::ScalarType dtype, bool quant) {
  switch (dtype) {
    case at::kHalf:
      quant ? launch_m<__half, M, true>(plan, rows, stream) : launch_m<__half, M, false>(plan, rows, stream);
      break;
    case at::kBFloat16:
      quant ? launch_m<__nv_bfloat16, M, true>(plan, rows, stream)
            : launch_m<__nv_bfloat16, M, false>(plan, rows, stream);
      break;
    default:
      quant ? launch_m<float, M, true>(plan, rows, stream) : launch_m<float, M, false>(plan, rows, stream);
      break;
  }
}

}  // namespace hadamard_impl
}  // namespace quantkern

namespace quantkern {

// csrc/hadamard_mma.cu: the tensor-core fused Hadamard + quantization for fp16/bf16 rows of the sizes below.
// Returns false (and does nothing) where it does not serve x; x is contiguous, 16-byte aligned, [rows, n].
// packed = false with bits = 4: int4 codes one per byte (q int8 [rows, n]).
bool hadamard_quantize_tensor_cores(const at::Tensor& x, int64_t bits, double clip_ratio, int64_t block_size,
                                    bool packed, at::Tensor& q, at::Tensor& scale);
std::vector<int64_t> hadamard_quantize_tensor_core_sizes();

}  // namespace quantkern
