// Fused online Hadamard + per-token quantization on tensor cores (fp16 / bf16 activations, sm_80+):
// the fast path of quantkern::hadamard_quantize (csrc/hadamard.cu calls hadamard_quantize_tensor_cores first)
// for n = 256 * 2^c (1024 ... 16384) and n = 14336 = 28 x 512, the sizes of Llama / Qwen / Mistral layers.
//
// Why: the fp32-butterfly kernel (csrc/hadamard_kernels.cuh) spends ~30 instructions per element (k adds,
// shared-memory rounds, the dtype round trip, an exact-tie check) and is issue-bound at 0.28-0.48 of the
// copy bandwidth. Here a 16-point Walsh-Hadamard factor is one mma.m16n8k16 per 128 elements.
//
// Math. H_n = kron(H_m, H_{2^k}) (quantkern.rotation.hadamard_matrix), and H_{2^k} is the product of
// 2-point butterflies over the index bits in any grouping. Index i of a row = c * 256 + e, chunk c, e < 256:
//   stage A:  bits {0, 3, 4, 1} of e   one mma per 8 columns: D = (H16 / 16) . X         (T operands, fp32 sums)
//   stage B:  bits {5, 6, 7, 2} of e   D rounded to T, then E = (H16 / 16) . D^T        (fp32 out)
//   outer:    the chunk index c         2^k: fp16 rows: chunk bits 0-1 by a third mma (chunk_stage: the
//                                        values rounded to T as the A operand, M = butterflies (x) I); then
//                                        fp32 butterflies in registers (+ one exchange through shared
//                                        memory when a row spans several warps); 14336: H28 (padded to 32)
//                                        as the A operand of mma.m16n8k16 over the 28 blocks, then the
//                                        bit-8 butterfly in fp32.
// The 1/16 factors keep every rounded intermediate within max|x| (no fp16 overflow); the result is
// y = v * 256 / sqrt(n), folded into the quantization multiplier (no per-element multiply).
//
// Fragment layout (the reason no shuffles or transposes are needed). Lane L = 4 g + t loads the 16 bytes
// e = 8 L .. 8 L + 7 of each chunk; its four 32-bit words ARE mma B fragments: words 0, 1 = n-tile 0
// (k = 2t + h and 2t + 8 + h: e bits 0, 3, 4, 1; n = g: e bits 5-7), words 2, 3 = n-tile 1 (n bit 3 = e
// bit 2). The accumulator of D = H . X holds D[m = g (+8)][n = 2t + h (+8)], and an accumulator pair
// (c0, c1) converted to a T pair is exactly the B fragment of D^T (k = 2t + h, n = g): stage B reads stage A's
// accumulators in place. Stage B's accumulator E[m2 = g + 8 s][n2 = 2t + h + 8 j] is, by the same bit
// bookkeeping, element e = h + 2 j + 4 s + 8 L: every lane ends with ITS OWN 8 loaded elements, transformed
// over all 8 bits. So the codes of a chunk are one 4-byte (int4) / 8-byte (int8) store per lane, coalesced.
//
// Tiling and pipeline. Persistent CTAs (as many as fit at once; each takes rows blockIdx.x, + gridDim.x, ...),
// one row at a time, the next row's 16-byte loads (read once: L1 no-allocate) issued into registers as soon
// as the current row's are consumed, so they are in flight during the rest of the row.
// 2^k rows: F = n / 256 chunks, J = min(F, 8) chunks per warp (J * 8 fp32 values per lane), W = F / J warps
// (16384: 8 warps); 4096 takes J = 4, W = 4 instead: 78 registers against 127, 24 resident warps per SM against 16,
// and half the per-row latency (H100, fp16 int4, fraction of a same-bytes copy: 512 rows 1.05 -> 1.18, 2048 rows
// 0.88 -> 0.88, 8192 rows 0.90 -> 0.93; the same codes and scales bit for bit). Per chunk 4 mma + 4 packs (fp16
// rows: + 2 mma and 4 packs per 8 values of the chunk stage); butterflies over the J chunks in registers; for W > 1
// every lane writes its values to shared memory ([chunk][half][lane][4] fp32, conflict-free), one barrier, and
// reads back the chunks whose warp bits it still has to butterfly; codes stored straight from registers.
// 14336: 8 warps x 7 chunks, stage A / B, values rounded to T into a [32 blocks][512 + 8] shared tile (pitch
// 1040 B: the ldmatrix rows hit distinct banks; blocks 28-31 zero), one barrier, then each warp takes 8
// column tiles (4 for b = 0 and the matching 4 for b = 1), ldmatrix.x4.trans gives the B fragments over the
// blocks, 4 mma per tile apply H28, and the b butterfly pairs tile j with j + 4. Its codes (a byte per pair
// and block row) are staged in shared memory and written with coalesced 16-byte stores. (The next row's
// loads are issued after the mma phase there: 64 accumulators + 28 load registers + the rest fill the 128
// registers that 2 CTAs per SM allow; H28's fragments are re-read from L1 for every row for the same reason.)
// Tried on the H100 and slower (docs/PERF.md, session 38): the mma phase computed twice, for the absmax and then
// for the codes, so that the loads could go out after phase 1 (1-11%); and, in this and the 2^k kernels, the
// rows ahead asked into L2 with cp.async.bulk.prefetch (3-11% one round ahead, more at two).
// Quantization: per-thread |max| (NaN propagates), warp shuffles, one shared exchange between warps;
// scale = T(amax(v) * 256 / sqrt(n)) * clip / qmax (amax of the values rounded to T, as the two-kernel path
// sees them; 1 where 0), then code = rni(max(v * (256 / sqrt(n) / scale), -qmax)) and cvt.pack.sat
// saturates at +qmax and packs 2 codes per instruction. Rows that need no clamp (amax * multiplier < qmax + 0.5:
// clip >= 1 and a normal scale; NaN / inf rows never) take one FFMA with 1.5 * 2^23 per code and byte permutes
// instead (code_bits): 2 instructions per element against 3.5. Code layouts (STORE_BITS): int4 pairs, int8, or
// int4 codes one per byte (packed = false: the sm_90 W4A4 GEMM's input; the int8 stores, clamped at +7 first).
//
// Accuracy. Not bit-identical with reference.quantize_per_token(reference.hadamard(x)) (the fp32-butterfly
// kernel is): the stage A sums (and for 14336 the stage B sums, for fp16 2^k rows the chunk stage's operands)
// are rounded to x's dtype, the tensor cores accumulate in their own order, and the rotated values are quantized
// as fp32 rather than after rounding to x's dtype. A code can differ from the two-kernel path's where the
// rotated value lies within a few units in the last place of x's dtype of a rounding boundary: by 1 for int4
// codes; int8 codes of bf16 rows are finer than bf16 itself (127 steps against 8 significant bits), so there by
// a few. The tests bound each code against the exactly (fp64) rotated value: within 0.5 + 6 qmax u (u = 2^-11
// fp16, 2^-8 bf16; twice that where two roundings happen: 14336, fp16 2^k rows), and on average as close as the
// two-kernel path's codes. Measured on the H200 (300 rows per case): int4 codes within 1 of the two-kernel
// path's, int8 within 1 (fp16) and 2 (bf16).
//
// Compiled for every arch of the build; the kernels need mma.m16n8k16 with bf16 (sm_80+), so the host
// side takes this path only on such devices, and older archs compile empty bodies.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <iterator>
#include <type_traits>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "hadamard_kernels.cuh"  // base_sign: the base matrices, as rotation.py builds them
#include "w4a16_common.cuh"      // W4Traits: mma.m16n8k16 and the fp32 -> T pair conversion

namespace quantkern {
namespace hadamard_mma {

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define QK_HADAMARD_MMA_BODY 1
#else
#define QK_HADAMARD_MMA_BODY 0
#endif

constexpr int kChunk = 256;         // elements per mma chunk (stage A x stage B)
constexpr int kPaleyOrder = 28;     // 14336 = 28 x 512
constexpr int kPaleyBlock = 512;
constexpr int kPaleyPitch = kPaleyBlock + 8;  // T elements per shared-tile row (1040 bytes)
constexpr int kPaleyWarps = 8;

// Bit patterns of +1 and 1/16 in T (negative: | 0x8000).
template <typename T>
constexpr uint16_t kOneBits = std::is_same_v<T, __half> ? 0x3C00 : 0x3F80;
template <typename T>
constexpr uint16_t kSixteenthBits = std::is_same_v<T, __half> ? 0x2C00 : 0x3D80;

// ---------------------------------------------------------------------------------------------
// Tensor-core and conversion primitives
// ---------------------------------------------------------------------------------------------

// The mma.m16n8k16 (T operands, fp32 accumulators) and the fp32 -> T pair conversion are w4a16::W4Traits<T>'s
// (csrc/w4a16_common.cuh): mma<true> starts from zero accumulators, mma<false> adds to them.
template <typename T>
using Mma = w4a16::W4Traits<T>;

// max(a, |b|), NaN propagating (max.NaN, sm_80+): torch.amax's NaN semantics in one instruction.
__device__ __forceinline__ float max_abs_nan(float a, float b) {
  float d;
#if QK_HADAMARD_MMA_BODY
  asm("max.NaN.f32 %0, %1, %2;\n" : "=f"(d) : "f"(a), "f"(fabsf(b)));
#else
  d = fmaxf(a, fabsf(b));
#endif
  return d;
}

// Quantization code, before saturation at +qmax (done by the pack): round half to even of
// max(v * inv, -qmax). NaN gives -qmax (fmaxf returns the other operand).
__device__ __forceinline__ int code_of(float v, float inv, float qmax) {
  return __float2int_rn(fmaxf(__fmul_rn(v, inv), -qmax));
}

// (high << 2 * BITS) | sat(a) << BITS | sat(b): cvt.pack.sat.s{4,8}.s32.b32, sat = clamp to the signed range.
template <int BITS>
__device__ __forceinline__ uint32_t pack_codes(int a, int b, uint32_t high) {
  uint32_t d = 0;
#if QK_HADAMARD_MMA_BODY
  if constexpr (BITS == 4) {
    asm("cvt.pack.sat.s4.s32.b32 %0, %1, %2, %3;\n" : "=r"(d) : "r"(a), "r"(b), "r"(high));
  } else {
    asm("cvt.pack.sat.s8.s32.b32 %0, %1, %2, %3;\n" : "=r"(d) : "r"(a), "r"(b), "r"(high));
  }
#endif
  return d;
}

// The A fragment of H16 / 16 (symmetric, Sylvester order: (-1)^popcount(r & c)) for this lane: word 0 is
// (row g, cols 2t, 2t + 1); word 1 (row g + 8) and word 2 (cols + 8) equal it, word 3 is its negation.
template <typename T>
__device__ __forceinline__ void hadamard16_fragment(uint32_t (&a)[4]) {
  const int lane = threadIdx.x % kWarpSize, g = lane / 4, t = lane % 4;
  const uint32_t lo_neg = __popc(g & (2 * t)) & 1, hi_neg = lo_neg ^ (g & 1);
  const uint32_t w = (kSixteenthBits<T> | (lo_neg << 15)) | ((kSixteenthBits<T> | (hi_neg << 15)) << 16);
  a[0] = w;
  a[1] = w;
  a[2] = w;
  a[3] = w ^ 0x80008000u;
}

// Stages A and B of one 256-element chunk: `raw` is the lane's 16 loaded bytes (elements 8 L .. 8 L + 7),
// v gets those 8 elements of (H256 / 256) x in fp32 (the header says why the layout closes on itself).
template <typename T>
__device__ __forceinline__ void transform_chunk(const uint4& raw, const uint32_t (&h16)[4], float (&v)[8]) {
  float d0[4], d1[4];
  Mma<T>::template mma<true>(d0, h16, raw.x, raw.y);  // n-tile 0: e bit 2 = 0
  Mma<T>::template mma<true>(d1, h16, raw.z, raw.w);  // n-tile 1: e bit 2 = 1
  float e0[4], e1[4];
  Mma<T>::template mma<true>(e0, h16, Mma<T>::from_floats(d0[0], d0[1]), Mma<T>::from_floats(d1[0], d1[1]));
  Mma<T>::template mma<true>(e1, h16, Mma<T>::from_floats(d0[2], d0[3]), Mma<T>::from_floats(d1[2], d1[3]));
  // e = h + 2 j + 4 s + 8 L: accumulator e_j, register 2 s + h.
  v[0] = e0[0]; v[1] = e0[1]; v[2] = e1[0]; v[3] = e1[1];
  v[4] = e0[2]; v[5] = e0[3]; v[6] = e1[2]; v[7] = e1[3];
}

// The B operand of the chunk stage for n-tile nb: M[k][n] (k = 2 t + hh + 8 kb, n = 2 t' + hh') = [t == t'] *
// (-1)^(hh hh') * (-1)^(kb nb), i.e. butterflies over hh and kb, identity over the lane bits t. This lane's
// b0 (kb = 0) and b1 (kb = 1) words: k = 2 t + hh (+ 8), n = g.
template <typename T>
__device__ __forceinline__ void chunk_stage_fragment(uint32_t (&b)[2][2]) {
  const int lane = threadIdx.x % kWarpSize, g = lane / 4, t = lane % 4;
  const uint32_t one = t == g / 2 ? kOneBits<T> : 0u, odd_n = g & 1;
#pragma unroll
  for (int nb = 0; nb < 2; ++nb) {
#pragma unroll
    for (int kb = 0; kb < 2; ++kb) {
      const uint32_t sign_kb = (kb & nb) ? 0x8000u : 0u;
      const uint32_t entry_hh0 = one ? (one | sign_kb) : 0u, entry_hh1 = one ? (one | (sign_kb ^ (odd_n << 15))) : 0u;
      b[nb][kb] = entry_hh0 | (entry_hh1 << 16);
    }
  }
}

// Chunk bits 0 and 1 of the lane's values on tensor cores (a third mma stage, in place): for each group of 4
// chunks (4 q .. 4 q + 3) and element pair (e, e + 1), the A operand is those 8 values rounded to T, pairs
// over chunk bit 0 (k = 2 t + hh), words 2, 3 over chunk bit 1 (k + 8), words 1, 3 the element e + 1 (row
// g + 8); with chunk_stage_fragment's M the accumulator of n-tile nb is chunk 4 q + hh' + 2 nb, element e + mb
// at register 2 mb + hh'. Unnormalized, like the fp32 butterflies it replaces (2 mma + 4 conversions per 8
// values against 16 adds); its inputs are rounded to T, which the 1/16 factors of stages A and B keep within
// max|x|.
template <typename T, int J>
__device__ __forceinline__ void chunk_stage(float (&v)[J][8], const uint32_t (&m)[2][2]) {
  static_assert(J % 4 == 0, "groups of 4 chunks");
#pragma unroll
  for (int q = 0; q < J / 4; ++q) {
#pragma unroll
    for (int e = 0; e < 8; e += 2) {
      float(&v0)[8] = v[4 * q];
      float(&v1)[8] = v[4 * q + 1];
      float(&v2)[8] = v[4 * q + 2];
      float(&v3)[8] = v[4 * q + 3];
      const uint32_t a[4] = {Mma<T>::from_floats(v0[e], v1[e]), Mma<T>::from_floats(v0[e + 1], v1[e + 1]),
                             Mma<T>::from_floats(v2[e], v3[e]), Mma<T>::from_floats(v2[e + 1], v3[e + 1])};
      float d0[4], d1[4];
      Mma<T>::template mma<true>(d0, a, m[0][0], m[0][1]);
      Mma<T>::template mma<true>(d1, a, m[1][0], m[1][1]);
      v0[e] = d0[0]; v1[e] = d0[1]; v0[e + 1] = d0[2]; v1[e + 1] = d0[3];
      v2[e] = d1[0]; v3[e] = d1[1]; v2[e + 1] = d1[2]; v3[e + 1] = d1[3];
    }
  }
}

// Which rows take chunk_stage: fp16 ones. Its rounding of the inputs to T costs at most qmax * 2^-11 of a code
// there (0.06 for int8), and it measured 2% faster on average (H200: -6% at 16384, +4% at 4096 x 8192 rows);
// for bf16 the same rounding would be qmax * 2^-8 (half an int8 code), so bf16 rows keep fp32 butterflies.
template <typename T>
constexpr bool kChunkStageOnTensorCores = std::is_same_v<T, __half>;

// Butterflies (a, b) -> (a + b, a - b) over index bits [LO, HI) of v's first dimension, every position.
template <int LO, int HI, int N>
__device__ __forceinline__ void butterflies(float (&v)[N][8]) {
#pragma unroll
  for (int bit = LO; bit < HI; ++bit) {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      if ((i >> bit) & 1) continue;
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const float a = v[i][e], b = v[i | (1 << bit)][e];
        v[i][e] = a + b;
        v[i | (1 << bit)][e] = a - b;
      }
    }
  }
}

// Row absmax over the CTA (every thread gets it). `red` holds one float per warp; the barrier before the
// write keeps a previous use of `red` safe.
template <int WARPS>
__device__ __forceinline__ float cta_absmax(float local, float* red) {
  local = warp_reduce_max(local);
  if constexpr (WARPS == 1) {
    return local;
  } else {
    const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
    if (lane == 0) red[warp] = local;
    __syncthreads();
    float m = lane < WARPS ? red[lane] : 0.0f;
    return warp_reduce_max(m);
  }
}

struct QuantParams {
  const void* x;
  int64_t rows;
  uint8_t* q;       // int8 [rows, n] or uint8 [rows, n / 2]
  float* scales;    // [rows]
  float clip;
  float out_scale;  // fp32(256 / sqrt(n)): y = v * out_scale
};

// scale (as quantize_per_token computes it from the rounded row) and the code multiplier out_scale / scale.
template <typename T, int BITS>
__device__ __forceinline__ float row_scale_and_multiplier(float amax_v, const QuantParams& p, int64_t row,
                                                          float& inv) {
  constexpr float kQmax = BITS == 4 ? 7.0f : 127.0f;
  const float amax_y = to_float(from_float<T>(__fmul_rn(amax_v, p.out_scale)));
  const float scale = per_token_scale(amax_y, p.clip, kQmax);  // (csrc/per_token_quant.cuh)
  if (threadIdx.x == 0) p.scales[row] = scale;
  inv = __fdiv_rn(p.out_scale, scale);
  return kQmax;
}

// Rows that need no clamping: when amax(|v|) * inv < qmax + 0.5 no code rounds beyond +-qmax (so with clip_ratio
// >= 1 and a scale that is a normal number of T: the scale's rounding to T moves amax * inv by at most u, and
// 127 / (1 - 2^-8) < 127.5). Uniform over the CTA (every thread holds the row's amax and inv). NaN or inf in the
// row makes the test false: those rows keep the clamped path and its NaN semantics.
__device__ __forceinline__ bool codes_need_no_clamp(float amax, float inv, float qmax) {
  return __fmul_rn(amax, inv) < qmax + 0.5f;
}

// Unclamped codes by the round-to-integer constant: fp32(v * inv + 1.5 * 2^23), rounded ONCE (one FFMA), is
// 1.5 * 2^23 + rni(v * inv), so the low byte of its bits is the code in two's complement (|code| < 2^22). This
// replaces multiply, clamp, float-to-int and pack (3.5 instructions per element) with one FFMA plus byte
// permutes (1 per element for int4, 0.75 for int8). Rounding the exact product once can differ from
// rni(fp32(v * inv)) only where the product lies within half an fp32 ulp of a tie.
constexpr float kRoundToIntegerConstant = 12582912.0f;  // 1.5 * 2^23

__device__ __forceinline__ uint32_t code_bits(float v, float inv) {
  return __float_as_uint(__fmaf_rn(v, inv, kRoundToIntegerConstant));
}

// Low bytes of a, b, c, d (code_bits) as bytes 0..3 of one word.
__device__ __forceinline__ uint32_t gather_low_bytes(uint32_t a, uint32_t b, uint32_t c, uint32_t d) {
  return __byte_perm(__byte_perm(a, b, 0x0040), __byte_perm(c, d, 0x0040), 0x5410);
}

// Two codes as one int4 byte (element 0 in the low nibble), from code_bits.
__device__ __forceinline__ uint32_t nibble_pair(uint32_t lo, uint32_t hi) { return (lo & 0x0Fu) | ((hi << 4) & 0xF0u); }

// store_codes8 for rows that need no clamp (codes_need_no_clamp).
template <int BITS>
__device__ __forceinline__ void store_codes8_unclamped(const float (&v)[8], float inv, uint8_t* dst) {
  uint32_t r[8];
#pragma unroll
  for (int e = 0; e < 8; ++e) r[e] = code_bits(v[e], inv);
  if constexpr (BITS == 4) {
    // Even elements' codes as bytes, odd elements' codes as bytes, then nibble e = element e.
    const uint32_t even = gather_low_bytes(r[0], r[2], r[4], r[6]), odd = gather_low_bytes(r[1], r[3], r[5], r[7]);
    *reinterpret_cast<uint32_t*>(dst) = (even & 0x0F0F0F0Fu) | ((odd << 4) & 0xF0F0F0F0u);
  } else {
    *reinterpret_cast<uint2*>(dst) =
        make_uint2(gather_low_bytes(r[0], r[1], r[2], r[3]), gather_low_bytes(r[4], r[5], r[6], r[7]));
  }
}

// The 8 codes of one lane's chunk (elements 8 L .. 8 L + 7), packed: int4 -> 4 bytes, int8 -> 8 bytes;
// STORE_BITS = 8 with BITS = 4: int4 codes one per byte (8 bytes), clamped at +qmax here since the s8 pack
// saturates at 127.
template <int BITS, int STORE_BITS = BITS>
__device__ __forceinline__ void store_codes8(const float (&v)[8], float inv, float qmax, uint8_t* dst) {
  int c[8];
#pragma unroll
  for (int e = 0; e < 8; ++e) c[e] = code_of(v[e], inv, qmax);
  if constexpr (BITS == 4 && STORE_BITS == 8) {
#pragma unroll
    for (int e = 0; e < 8; ++e) c[e] = min(c[e], 7);
  }
  if constexpr (STORE_BITS == 4) {
    uint32_t w = pack_codes<4>(c[7], c[6], 0u);
    w = pack_codes<4>(c[5], c[4], w);
    w = pack_codes<4>(c[3], c[2], w);
    w = pack_codes<4>(c[1], c[0], w);
    *reinterpret_cast<uint32_t*>(dst) = w;
  } else {
    const uint32_t hi = pack_codes<8>(c[5], c[4], pack_codes<8>(c[7], c[6], 0u));
    const uint32_t lo = pack_codes<8>(c[1], c[0], pack_codes<8>(c[3], c[2], 0u));
    *reinterpret_cast<uint2*>(dst) = make_uint2(lo, hi);
  }
}

// ---------------------------------------------------------------------------------------------
// n = 256 * 2^LOG_CHUNKS
// ---------------------------------------------------------------------------------------------

template <int LOG_CHUNKS, int MAX_LOG_PER_WARP = 3>
struct Pow2Shape {
  static constexpr int kChunks = 1 << LOG_CHUNKS;
  static constexpr int kLogPerWarp = LOG_CHUNKS < MAX_LOG_PER_WARP ? LOG_CHUNKS : MAX_LOG_PER_WARP;
  static constexpr int kPerWarp = 1 << kLogPerWarp;        // J: chunks per warp
  static constexpr int kLogWarps = LOG_CHUNKS - kLogPerWarp;
  static constexpr int kWarps = 1 << kLogWarps;            // W
  static constexpr int kThreads = kWarps * kWarpSize;
  static constexpr int kN = kChunks * kChunk;
  static constexpr size_t kExchangeBytes = kWarps > 1 ? sizeof(float) * kN : 0;
  static_assert(kWarps <= kPerWarp, "phase 2 holds one chunk per warp bit combination");
};

// The J 16-byte loads of this lane's chunks of `row` (chunks warp * J + i).
template <typename T, int J>
__device__ __forceinline__ void load_chunks(uint4 (&raw)[J], const T* x, int64_t row, int n, int first_chunk) {
  const T* xr = x + row * n + first_chunk * kChunk + (threadIdx.x % kWarpSize) * 8;
#pragma unroll
  for (int i = 0; i < J; ++i) raw[i] = load_stream_v4(xr + i * kChunk);
}

// BITS: the codes' range (int4 or int8); STORE_BITS: bits per stored code (4: packed pairs; 8: one per byte).
template <typename T, int LOG_CHUNKS, int BITS, int STORE_BITS, int MAX_LOG_PER_WARP = 3>
__global__ void __launch_bounds__(Pow2Shape<LOG_CHUNKS, MAX_LOG_PER_WARP>::kThreads)
    hadamard_quantize_pow2_kernel(const QuantParams p) {
#if QK_HADAMARD_MMA_BODY
  using S = Pow2Shape<LOG_CHUNKS, MAX_LOG_PER_WARP>;
  constexpr int J = S::kPerWarp, W = S::kWarps;
  extern __shared__ float4 exchange_vec[];
  float* exchange = reinterpret_cast<float*>(exchange_vec);
  __shared__ float red[W];
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const T* x = static_cast<const T*>(p.x);
  uint32_t h16[4];
  hadamard16_fragment<T>(h16);
  uint32_t chunk_b[2][2] = {};
  if constexpr (kChunkStageOnTensorCores<T>) chunk_stage_fragment<T>(chunk_b);

  // Rows blockIdx.x, + gridDim.x, ...: the next row's loads are issued as soon as this row's are consumed.
  uint4 raw[J];
  load_chunks<T, J>(raw, x, blockIdx.x, S::kN, warp * J);
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    // Phase 1: chunks warp * J + i (i < J).
    float v[J][8];
#pragma unroll
    for (int i = 0; i < J; ++i) transform_chunk<T>(raw[i], h16, v[i]);
    if (row + gridDim.x < p.rows) load_chunks<T, J>(raw, x, row + gridDim.x, S::kN, warp * J);
    if constexpr (kChunkStageOnTensorCores<T>) {
      chunk_stage<T, J>(v, chunk_b);      // chunk bits 0, 1
      butterflies<2, S::kLogPerWarp>(v);  // chunk bits 2 .. log J - 1
    } else {
      butterflies<0, S::kLogPerWarp>(v);  // chunk bits 0 .. log J - 1
    }

    int chunk_of[J];  // the chunk whose values v[i] holds
#pragma unroll
    for (int i = 0; i < J; ++i) chunk_of[i] = warp * J + i;
    if constexpr (W > 1) {
      // Phase 2: v[i], i = hi * (J / W) + l, holds chunk hi * J + warp * (J / W) + l: the warp bits of the
      // chunk index are now register bits, butterflied below. (The previous row's reads of `exchange` ended
      // before its absmax barrier.)
      constexpr int kPer = J / W;
      auto slot = [&](int chunk, int half) { return exchange + (chunk * 2 + half) * (kWarpSize * 4) + lane * 4; };
#pragma unroll
      for (int i = 0; i < J; ++i) {
        *reinterpret_cast<float4*>(slot(chunk_of[i], 0)) = make_float4(v[i][0], v[i][1], v[i][2], v[i][3]);
        *reinterpret_cast<float4*>(slot(chunk_of[i], 1)) = make_float4(v[i][4], v[i][5], v[i][6], v[i][7]);
      }
      __syncthreads();
#pragma unroll
      for (int i = 0; i < J; ++i) {
        chunk_of[i] = (i / kPer) * J + warp * kPer + i % kPer;
        const float4 a = *reinterpret_cast<const float4*>(slot(chunk_of[i], 0));
        const float4 b = *reinterpret_cast<const float4*>(slot(chunk_of[i], 1));
        v[i][0] = a.x; v[i][1] = a.y; v[i][2] = a.z; v[i][3] = a.w;
        v[i][4] = b.x; v[i][5] = b.y; v[i][6] = b.z; v[i][7] = b.w;
      }
      butterflies<S::kLogPerWarp - S::kLogWarps, S::kLogPerWarp>(v);
    }

    float amax = 0.0f;
#pragma unroll
    for (int i = 0; i < J; ++i) {
#pragma unroll
      for (int e = 0; e < 8; ++e) amax = max_abs_nan(amax, v[i][e]);
    }
    amax = cta_absmax<W>(amax, red);
    float inv;
    const float qmax = row_scale_and_multiplier<T, BITS>(amax, p, row, inv);
    uint8_t* qr = p.q + row * (S::kN * STORE_BITS / 8);
    if (codes_need_no_clamp(amax, inv, qmax)) {
      // (unclamped codes are in range: their low bytes are the int8 codes, int4 ones too)
#pragma unroll
      for (int i = 0; i < J; ++i) {
        store_codes8_unclamped<STORE_BITS>(v[i], inv, qr + (chunk_of[i] * kChunk + lane * 8) * STORE_BITS / 8);
      }
    } else {
#pragma unroll
      for (int i = 0; i < J; ++i) {
        store_codes8<BITS, STORE_BITS>(v[i], inv, qmax, qr + (chunk_of[i] * kChunk + lane * 8) * STORE_BITS / 8);
      }
    }
  }
#endif
}

// ---------------------------------------------------------------------------------------------
// n = 14336 = 28 x 512
// ---------------------------------------------------------------------------------------------

// A fragments of H28 zero-padded to 32 x 32, per lane: [m-tile r][k-step s][word] as 16 words, each a T pair
// (low half: the even column). Generated at compile time from base_sign (no pasted table).
struct alignas(16) PaleyFragments {
  uint32_t words[kWarpSize][16];
};

__host__ __device__ constexpr uint32_t paley_entry_bits(uint16_t one, int m, int k) {
  if (m >= kPaleyOrder || k >= kPaleyOrder) return 0;
  return hadamard_impl::base_sign(kPaleyOrder, m, k) > 0 ? one : static_cast<uint16_t>(one | 0x8000);
}

__host__ __device__ constexpr PaleyFragments make_paley_fragments(uint16_t one) {
  PaleyFragments f{};
  for (int lane = 0; lane < kWarpSize; ++lane) {
    const int g = lane / 4, t = lane % 4;
    for (int r = 0; r < 2; ++r) {
      for (int s = 0; s < 2; ++s) {
        for (int w = 0; w < 4; ++w) {
          const int m = 16 * r + g + 8 * (w & 1), k = 16 * s + 2 * t + 8 * (w >> 1);
          f.words[lane][(r * 2 + s) * 4 + w] = paley_entry_bits(one, m, k) | (paley_entry_bits(one, m, k + 1) << 16);
        }
      }
    }
  }
  return f;
}

__device__ const PaleyFragments kPaleyHalf = make_paley_fragments(kOneBits<__half>);
__device__ const PaleyFragments kPaleyBf16 = make_paley_fragments(kOneBits<__nv_bfloat16>);

// ldmatrix.x4.trans: lane l gives row l's 16-byte address; register i gets matrix i transposed
// (rows 2t, 2t + 1 of column g), i.e. the B fragment with k over the rows.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
#if QK_HADAMARD_MMA_BODY
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#endif
}

// Codes staged in shared memory per block row (then written with coalesced 16-byte stores): a 16-byte pad
// per row puts the 8 block rows of one warp store in distinct banks.
template <int BITS>
constexpr int kStagedPitch = kPaleyBlock * BITS / 8 + 16;

template <typename T, int BITS, int STORE_BITS>
__global__ void __launch_bounds__(kPaleyWarps * kWarpSize, 2) hadamard_quantize_paley28_kernel(const QuantParams p) {
#if QK_HADAMARD_MMA_BODY
  constexpr int kN = kPaleyOrder * kPaleyBlock;
  constexpr int kChunksPerWarp = kN / kChunk / kPaleyWarps;  // 7
  constexpr int kTilesPerWarp = 8;                            // column tiles of 8: 4 with b = 0, 4 with b = 1
  constexpr int kRowBytes = kPaleyBlock * STORE_BITS / 8;     // codes of one block
  constexpr int kCodeMax = BITS == 4 ? 7 : 127;               // (int4 codes one per byte: clamped before the pack)
  __shared__ alignas(16) T tile[32 * kPaleyPitch];
  __shared__ alignas(16) uint8_t staged[kPaleyOrder * kStagedPitch<STORE_BITS>];
  __shared__ float red[kPaleyWarps];
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int g = lane / 4, t = lane % 4;
  const T* x = static_cast<const T*>(p.x);

  // Once per CTA: blocks 28-31 of the tile are zero (H28's padded columns multiply them; rows never write
  // them), the H16 fragment.
  *reinterpret_cast<uint4*>(tile + (kPaleyOrder + threadIdx.x / 64) * kPaleyPitch + (threadIdx.x % 64) * 8) =
      make_uint4(0, 0, 0, 0);
  uint32_t h16[4];
  hadamard16_fragment<T>(h16);
  const PaleyFragments& table = std::is_same_v<T, __half> ? kPaleyHalf : kPaleyBf16;
  const uint32_t tile_base = static_cast<uint32_t>(__cvta_generic_to_shared(tile)) + lane * kPaleyPitch * sizeof(T);

  // Rows blockIdx.x, + gridDim.x, ...: the next row's loads are issued as soon as this row's are consumed.
  uint4 raw[kChunksPerWarp];
  load_chunks<T, kChunksPerWarp>(raw, x, blockIdx.x, kN, warp * kChunksPerWarp);
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    // Phase 1: stages A and B of chunks 7 warp + i, rounded to T into the tile (the previous row's ldmatrix
    // reads ended before its absmax barrier).
#pragma unroll
    for (int i = 0; i < kChunksPerWarp; ++i) {
      float v[8];
      transform_chunk<T>(raw[i], h16, v);
      const int chunk = warp * kChunksPerWarp + i, block = chunk / 2, half = chunk % 2;
      *reinterpret_cast<uint4*>(tile + block * kPaleyPitch + half * kChunk + lane * 8) =
          make_uint4(Mma<T>::from_floats(v[0], v[1]), Mma<T>::from_floats(v[2], v[3]),
                     Mma<T>::from_floats(v[4], v[5]), Mma<T>::from_floats(v[6], v[7]));
    }
    // H28's fragments, read again for every row (2 KB, L1 hits): registers kept for the loads in flight.
    uint32_t h28[2][2][4];
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      const uint4 q = *reinterpret_cast<const uint4*>(&table.words[lane][w * 4]);
      h28[w / 2][w % 2][0] = q.x; h28[w / 2][w % 2][1] = q.y; h28[w / 2][w % 2][2] = q.z; h28[w / 2][w % 2][3] = q.w;
    }
    __syncthreads();

    // Phase 2: acc[j][r]: column tile 4 warp + j (b = 0) or + 32 (j >= 4, b = 1); rows 16 r + g (+ 8).
    float acc[kTilesPerWarp][2][4];
#pragma unroll
    for (int j = 0; j < kTilesPerWarp; ++j) {
      const int col_tile = 4 * warp + (j % 4) + (j / 4) * 32;
      uint32_t b[4];
      ldmatrix_x4_trans(b, tile_base + col_tile * 8 * sizeof(T));
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        Mma<T>::template mma<true>(acc[j][r], h28[r][0], b[0], b[1]);
        Mma<T>::template mma<false>(acc[j][r], h28[r][1], b[2], b[3]);
      }
    }
    // The next row's loads, in flight from here (after the mma phase: the registers allow no earlier point).
    if (row + gridDim.x < p.rows) load_chunks<T, kChunksPerWarp>(raw, x, row + gridDim.x, kN, warp * kChunksPerWarp);
    // Bit 8 (b): tile j (b = 0) with tile j + 4 (b = 1).
    float amax = 0.0f;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float a = acc[j][r][e], c = acc[j + 4][r][e];
          acc[j][r][e] = a + c;
          acc[j + 4][r][e] = a - c;
          amax = max_abs_nan(max_abs_nan(amax, acc[j][r][e]), acc[j + 4][r][e]);  // padded rows are 0
        }
      }
    }
    amax = cta_absmax<kPaleyWarps>(amax, red);
    float inv;
    const float qmax = row_scale_and_multiplier<T, BITS>(amax, p, row, inv);
    // Codes of a pair of columns into the staging rows (the previous row's copy-out ended before this row's
    // tile barrier), then one barrier and coalesced 16-byte stores.
    // Two straight-line versions, chosen once per row: a branch on `unclamped` inside the loops made the
    // compiler wrap every pair in a divergent branch (BSSY / BRA / BSYNC: ~140 of ~900 instructions per warp
    // and row, ncu on the H200). Block rows 28-31 (H28's padding) are computed like the others; only their
    // store is predicated off.
    auto stage_codes = [&](auto unclamped_tag) {
      constexpr bool kUnclamped = decltype(unclamped_tag)::value;
#pragma unroll
      for (int j = 0; j < kTilesPerWarp; ++j) {
        const int col = (4 * warp + (j % 4) + (j / 4) * 32) * 8 + 2 * t;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
#pragma unroll
          for (int s = 0; s < 2; ++s) {
            const int block = 16 * r + g + 8 * s;
            const float v0 = acc[j][r][2 * s], v1 = acc[j][r][2 * s + 1];
            uint32_t pair;  // the two codes, packed as the row stores them (low 8 or 16 bits)
            if constexpr (kUnclamped) {
              const uint32_t r0 = code_bits(v0, inv), r1 = code_bits(v1, inv);
              pair = STORE_BITS == 4 ? nibble_pair(r0, r1) : __byte_perm(r0, r1, 0x0040);
            } else {
              pair = pack_codes<STORE_BITS>(min(code_of(v1, inv, qmax), kCodeMax),
                                            min(code_of(v0, inv, qmax), kCodeMax), 0u);
            }
            if (block < kPaleyOrder) {
              uint8_t* dst = staged + block * kStagedPitch<STORE_BITS> + col * STORE_BITS / 8;
              if constexpr (STORE_BITS == 4) {
                *dst = static_cast<uint8_t>(pair);
              } else {
                *reinterpret_cast<uint16_t*>(dst) = static_cast<uint16_t>(pair);
              }
            }
          }
        }
      }
    };
    if (codes_need_no_clamp(amax, inv, qmax)) {
      stage_codes(std::true_type{});
    } else {
      stage_codes(std::false_type{});
    }
    __syncthreads();
    uint8_t* qr = p.q + row * (kN * STORE_BITS / 8);
    constexpr int kVectorsPerBlock = kRowBytes / 16;
    for (int v = threadIdx.x; v < kPaleyOrder * kVectorsPerBlock; v += kPaleyWarps * kWarpSize) {
      const int block = v / kVectorsPerBlock, offset = (v % kVectorsPerBlock) * 16;
      *reinterpret_cast<uint4*>(qr + block * kRowBytes + offset) =
          *reinterpret_cast<const uint4*>(staged + block * kStagedPitch<STORE_BITS> + offset);
    }
  }
#endif
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------

// Persistent launch: as many CTAs as fit on the device at once (each loops over rows), at most one per row.
template <typename Kernel>
void launch_persistent(Kernel kernel, int threads, size_t smem, const QuantParams& p, int device,
                       cudaStream_t stream) {
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem));
  const int64_t grid = std::min<int64_t>(p.rows, static_cast<int64_t>(num_sms(device)) * std::max(per_sm, 1));
  kernel<<<static_cast<unsigned>(grid), threads, smem, stream>>>(p);
  QK_CHECK_LAUNCH();
}

template <typename T, int LOG_CHUNKS, int BITS, int STORE_BITS, int MAX_LOG_PER_WARP = 3>
void launch_pow2(const QuantParams& p, int device, cudaStream_t stream) {
  using S = Pow2Shape<LOG_CHUNKS, MAX_LOG_PER_WARP>;
  launch_persistent(hadamard_quantize_pow2_kernel<T, LOG_CHUNKS, BITS, STORE_BITS, MAX_LOG_PER_WARP>, S::kThreads,
                    S::kExchangeBytes, p, device, stream);
}

template <typename T, int BITS, int STORE_BITS>
bool launch_size(int64_t n, const QuantParams& p, int device, cudaStream_t stream) {
  switch (n) {
    case 1024: launch_pow2<T, 2, BITS, STORE_BITS>(p, device, stream); return true;
    case 2048: launch_pow2<T, 3, BITS, STORE_BITS>(p, device, stream); return true;
    case 4096: launch_pow2<T, 4, BITS, STORE_BITS, 2>(p, device, stream); return true;  // (4 warps x 4 chunks)
    case 8192: launch_pow2<T, 5, BITS, STORE_BITS>(p, device, stream); return true;
    case 16384: launch_pow2<T, 6, BITS, STORE_BITS>(p, device, stream); return true;
    case kPaleyOrder * kPaleyBlock:
      launch_persistent(hadamard_quantize_paley28_kernel<T, BITS, STORE_BITS>, kPaleyWarps * kWarpSize, 0, p, device,
                        stream);
      return true;
    default: return false;
  }
}

// int4 packed, int4 one per byte (packed = false), or int8.
template <typename T>
bool launch_codes(int64_t n, int64_t bits, bool packed, const QuantParams& p, int device, cudaStream_t stream) {
  if (bits == 8) return launch_size<T, 8, 8>(n, p, device, stream);
  return packed ? launch_size<T, 4, 4>(n, p, device, stream) : launch_size<T, 4, 8>(n, p, device, stream);
}

}  // namespace hadamard_mma

// The row lengths this path serves (launch_size has a case for each; quantkern._C.build_info() reports them).
constexpr int64_t kTensorCoreSizes[] = {1024, 2048, 4096, 8192, 14336, 16384};

std::vector<int64_t> hadamard_quantize_tensor_core_sizes() {
  return std::vector<int64_t>(std::begin(kTensorCoreSizes), std::end(kTensorCoreSizes));
}

// Runs the tensor-core kernel when it serves x (fp16/bf16, a size above, whole-row transform, sm_80+) and
// returns true; false leaves the call to the fp32-butterfly kernel. x: contiguous, 16-byte aligned, 2-D.
bool hadamard_quantize_tensor_cores(const at::Tensor& x, int64_t bits, double clip_ratio, int64_t block_size,
                                    bool packed, at::Tensor& q, at::Tensor& scale) {
  using namespace hadamard_mma;
  const at::ScalarType dtype = x.scalar_type();
  const int64_t n = x.size(1), rows = x.size(0);
  if (block_size != 0 || (dtype != at::kHalf && dtype != at::kBFloat16)) return false;
  if (std::find(std::begin(kTensorCoreSizes), std::end(kTensorCoreSizes), n) == std::end(kTensorCoreSizes) ||
      rows == 0) {
    return false;
  }
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, x.get_device()));
  if (major < 8) return false;
  QuantParams p{};
  p.x = x.const_data_ptr();
  p.rows = rows;
  p.q = static_cast<uint8_t*>(q.data_ptr());
  p.scales = scale.data_ptr<float>();
  p.clip = static_cast<float>(clip_ratio);
  p.out_scale = static_cast<float>(kChunk / std::sqrt(static_cast<double>(n)));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
  const int device = x.get_device();
  return dtype == at::kHalf ? launch_codes<__half>(n, bits, packed, p, device, stream)
                            : launch_codes<__nv_bfloat16>(n, bits, packed, p, device, stream);
}

}  // namespace quantkern
