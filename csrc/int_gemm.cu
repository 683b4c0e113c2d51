// Integer GEMMs with a fused scale epilogue: W8A8, W4A4 and W4A8.
//
//   quantkern::int_gemm(a, a_scale, w, w_scale, bias, a_bits, w_bits, group_len, out_dtype, split_k, config)
//       y[M, N] = sx[m] * sum_g(acc_g[m, n] * sw[g, n]) (+ bias[n])      (fp32, cast to fp16/bf16)
//   quantkern::int_gemm_acc(a, w, n, a_bits, w_bits, split_k, config)
//       the exact int32 accumulator acc[m, n] = sum_k a[m, k] * w[n, k] (test hook; also checks split-K)
//
// Semantics: quantkern.reference.quantized_activation_linear after quantize_per_token. The int32 sums
// are exact (bit-exact with reference.int_matmul). The epilogue rounds like the reference, step by step:
// y = 0; per group y = y + float(acc_g) * sw_g (two roundings, no FMA); y = y * sx; y = y + bias; cast
// (round to nearest even). Without split-K over a grouped weight the output is bit-identical to the
// reference; split-K over groups adds the splits' fp32 partials in another order (fp rounding only);
// split-K per-channel reduces exact int32 partials, so it stays bit-identical.
//
// Operands (K contiguous; the weight made by quantkern.layout_int.prepare_int_weight, once)
//   a        int8 [M, K] (a_bits 8) or uint8 [M, K/2] (a_bits 4: signed nibbles, element 2j in the low
//            nibble of byte j): quantize_per_token's output, taken as is.
//   a_scale  fp32 [M].
//   w        rows of signed weight values, tiled: [N_pad/64, K_pad/128, 64, 128*w_bits/8], i.e. units of
//            64 rows x 128 k stored contiguously (N zero-padded to a multiple of 64, K to 128), so every
//            pipeline stage reads whole 4 KB (int4) or 8 KB (int8) units: full DRAM bursts. Within a row:
//            W8A8: int8 values (canonical code - 128).
//            W4A4: signed nibbles in the natural order (canonical code ^ 8 per nibble).
//            W4A8: signed nibbles, K permuted inside every 32-chunk: physical nibble
//                  p = 8t + 2j + h holds logical k = 16h + 4t + j (t, j < 4; h < 2), so that the widened
//                  nibbles land exactly where the int8 A fragment of mma.m16n8k32 expects them.
//   w_scale  fp32 [G, N] (transposed canonical scales, exact widening of fp16/bf16), G = K / group_len.
//   bias     fp32 [N] or None.
//   Needs K % 32 == 0 (one mma k-step never straddles K or a group), N % 8 == 0, group_len % 32 == 0.
//
// Tensor-core paths
//   int8 operands: ldmatrix (x4) of 16-byte rows straight into the m16n8k32 .s8 fragments (A row-major,
//   B = W [N, K] is the "col" operand as stored).
//   int4 operands on sm_90 (no int4 tensor cores on Hopper): the packed tile is ldmatrix'ed like int8 data
//   (a 16-byte row = 32 k values) and widened in registers: lo = (w << 4) & 0xF0F0F0F0 and
//   hi = w & 0xF0F0F0F0 give int8 lanes holding 16 x the nibble (exact), so two LOP/SHF per 8 values and
//   no sign-extension arithmetic; the accumulator is then 16x (one int4 operand) or 256x (two) the true
//   sum, still exact in int32 for K <= 65536, and is shifted back (arithmetic shift, exact) before the
//   epilogue. The widened registers hold the thread's 8 k values in the order (0,2,4,6 | 1,3,5,7): for
//   W4A4 both operands are widened the same way, and a dot product does not care about a common
//   permutation of k; for W4A8 the weight's offline permutation above makes it match natural int8 A.
//   int4 x int4 on sm_80/86/89: native mma.m16n8k64 .s4.s4 on the very same ldmatrix registers (the
//   natural nibble order is the .s4 fragment order), no widening, twice the int8 rate.
//
// Tiling: a block computes BM x BN of y over a K range (all of K, or one of split_k slices), with
// WM x WN warps of (BM/WM) x (BN/WN) each. One stage holds A [BM, BK] and W [BN, BK] (BK = 128 k: 64 bytes
// a row for int4, 128 for int8), 16-byte chunks XOR-swizzled by row so that
// ldmatrix and cp.async are bank-conflict free. Output tiles are rasterised in bands of 8 M-tiles so
// that consecutive blocks share W tiles in L2.
// Pipeline: STAGES-deep cp.async.cg (16 B, zero-filled past M, N and K) ring, one __syncthreads per
// k-tile; fragments ldmatrix'ed per 64-k pair of mma k-steps and consumed at once.
// Epilogue: the per-group flush (grouped weights only) converts the int32 accumulators to fp32 and adds
// acc * sw; the fused path then scales by sx, adds bias and stores fp16/bf16 pairs. Split-K (small M,
// where the weights dominate and too few output tiles exist to fill the SMs) adds int32 (per-channel:
// exact) or fp32 (grouped) partials with atomics into a zeroed [M, N] workspace, and a second small
// kernel applies sx, bias and the cast.
// Configs (`config`, 0 = by M): 1 (M <= 32): 16x64 tiles, 4 warps (1x4), 8 stages, split-K up to ~3
// blocks per SM; 2 (M <= 128): 64x128, 4 warps (2x2), 4 stages; 3: 128x128, 8 warps (2x4, 64x32 per
// warp), 4 stages (grouped weights, or split-K); 4 (M >= 512, per-channel): 128x256, 8 warps of 64x64,
// 4 stages (up to 192 KB of shared memory for W8A8); 5: 256x128, 8 warps (4x2) of 64x64.
// 6, 7 (and automatic from M = 65 on an sm_90 GPU, int8 activations, per-channel weights): the wgmma
// kernel of csrc/int_wgmma.cu with 128x128 / 128x256 (channels x tokens) tiles. 8 (and automatic up to
// M = 16 there): the few-token kernel of csrc/int_small_m.cu (weights straight to registers, 32-channel
// blocks whose warps split K, and K split across a thread-block cluster where the blocks are few).
// Measured on the H100 (GEMM alone, benchmarks/bench_int_gemm.py --sweep): 8192^3: config 3 460 TOPS,
// 4 and 5 ~580 TOPS (one 256-thread block per SM at ~248 registers; the mma.sync int8 peak measured here
// is 1212 TOPS, torch._int_mm reaches ~920 with wgmma); the wgmma kernel 1180-1460 TOPS at M >= 2048.
// M = 1, K = 8192, W4A4, config 1: 1.9 TB/s of weights (N = 8192, split 4) and 2.4 TB/s (N = 28672, no split).
//
// Compiled without --use_fast_math (the epilogue uses explicit __fmul_rn / __fadd_rn).

#include <algorithm>
#include <cstdint>
#include <limits>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common.cuh"
#include "hopper.cuh"
#include "int_small_m.cuh"
#include "int_wgmma.cuh"

namespace quantkern {
namespace {

// ---------------------------------------------------------------------------------------------
// PTX wrappers
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy global -> shared; src_bytes = 0 zero-fills the destination.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// D = A * B + D, m16n8k32, int8 x int8 -> int32.
__device__ __forceinline__ void mma_s8(int (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                       uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
// D = A * B + D, m16n8k64, int4 x int4 -> int32 (native on sm_80/86/89; emulated on sm_90, not used there).
__device__ __forceinline__ void mma_s4(int (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                       uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k64.row.col.s32.s4.s4.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
#endif

// Widen 8 signed nibbles (one 32-bit word) to two words of 4 int8 lanes each, every lane 16x the value.
__device__ __forceinline__ uint32_t widen_lo(uint32_t w) { return (w << 4) & 0xF0F0F0F0u; }
__device__ __forceinline__ uint32_t widen_hi(uint32_t w) { return w & 0xF0F0F0F0u; }

// Whether this compilation (arch) multiplies int4 x int4 natively.
__host__ __device__ constexpr bool native_s4() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  return true;
#else
  return false;
#endif
}

// ---------------------------------------------------------------------------------------------
// Kernel
// ---------------------------------------------------------------------------------------------

enum Epilogue : int { kFused = 0, kAtomicInt = 1, kAtomicFloat = 2 };

constexpr int kUnitRows = 64;  // rows of one weight unit of the tiled layout
constexpr int kTileK = 128;    // k values of one k-tile (= one unit's width)

template <int ABITS, int WBITS, int BM, int BN, int WM, int WN, int STAGES>
struct Cfg {
  static constexpr int kThreads = WM * WN * 32;
  static constexpr int BK = kTileK;                                  // k values per stage
  static constexpr int kRowA = BK * ABITS / 8;                       // bytes per A row per stage
  static constexpr int kRowW = BK * WBITS / 8;
  static constexpr int kChunksA = kRowA / 16, kChunksW = kRowW / 16;
  static constexpr int kStageA = BM * kRowA, kStageW = BN * kRowW;
  static constexpr int kStageBytes = kStageA + kStageW;
  static constexpr int kSmem = STAGES * kStageBytes;
  static constexpr int WTM = BM / WM, WTN = BN / WN;  // warp tile
  static constexpr int MT = WTM / 16, NT = WTN / 8;   // mma tiles per warp
  static_assert(MT >= 1 && NT >= 2 && NT % 2 == 0, "warp tile must be >= 16 x 16, NT even");
  static_assert(BK % 64 == 0, "k-steps come in pairs");
  static_assert(BN % kUnitRows == 0 || kUnitRows % BN == 0, "weight tiles are whole units");
};

// XOR swizzle of 16-byte chunk c of row r in rows of CHUNKS chunks (2, 4 or 8): conflict-free ldmatrix.
template <int CHUNKS>
__device__ __forceinline__ int swizzle(int r, int c) {
  return c ^ ((r / (8 / CHUNKS)) & (CHUNKS - 1));
}

template <typename OutT>
__device__ __forceinline__ void store_pair(OutT* p, float v0, float v1);
template <>
__device__ __forceinline__ void store_pair<__half>(__half* p, float v0, float v1) {
  *reinterpret_cast<__half2*>(p) = __halves2half2(__float2half_rn(v0), __float2half_rn(v1));
}
template <>
__device__ __forceinline__ void store_pair<__nv_bfloat16>(__nv_bfloat16* p, float v0, float v1) {
  *reinterpret_cast<__nv_bfloat162*>(p) = __halves2bfloat162(__float2bfloat16_rn(v0), __float2bfloat16_rn(v1));
}

struct Params {
  const uint8_t* a;      // [M, K * ABITS / 8]
  const float* a_scale;  // [M]
  const uint8_t* w;      // [N, K * WBITS / 8]
  const float* w_scale;  // [G, N]
  const float* bias;     // [N] or nullptr
  void* out;             // fused: [M, N] OutT; atomic: int32 / fp32 [M, N] workspace
  int M, N, K;
  int n_pad;      // rows of the tiled weight (N rounded up to 64)
  int w_k_tiles;  // k-tiles of the tiled weight (K rounded up to 128, over 128)
  int group_len;
  int k_tiles_per_split;  // in units of BK
};

template <int ABITS, int WBITS, int BM, int BN, int WM, int WN, int STAGES, int EPI, bool GROUPED, typename OutT>
__global__ void __launch_bounds__(WM * WN * 32)
int_gemm_kernel(const Params p) {
  using C = Cfg<ABITS, WBITS, BM, BN, WM, WN, STAGES>;
  constexpr int BK = C::BK;
  constexpr int MT = C::MT, NT = C::NT;
  // Shift that undoes the widening (16x per widened int4 operand).
  constexpr bool kNativeS4 = native_s4() && ABITS == 4 && WBITS == 4;
  constexpr int kShift = kNativeS4 ? 0 : (ABITS == 4 ? 4 : 0) + (WBITS == 4 ? 4 : 0);

  extern __shared__ __align__(128) uint8_t smem[];

  const int tid = threadIdx.x;
  const int lane = tid % 32, warp = tid / 32;
  const int warp_m = warp / WN, warp_n = warp % WN;
  const int g = lane / 4, tig = lane % 4;

  // Rasterisation: bands of 8 M-tiles, N-tiles inner within a band.
  const int tiles_m = (p.M + BM - 1) / BM, tiles_n = (p.N + BN - 1) / BN;
  int tile_m, tile_n;
  {
    constexpr int kBand = 8;
    const int id = blockIdx.x;
    const int band = id / (kBand * tiles_n);
    const int first_m = band * kBand;
    const int band_rows = min(tiles_m - first_m, kBand);
    const int in_band = id - band * kBand * tiles_n;
    tile_m = first_m + in_band % band_rows;
    tile_n = in_band / band_rows;
  }
  const int m0 = tile_m * BM, n0 = tile_n * BN;

  const int k_tiles_total = (p.K + BK - 1) / BK;
  const int kt_begin = blockIdx.y * p.k_tiles_per_split;
  const int kt_end = min(kt_begin + p.k_tiles_per_split, k_tiles_total);
  const int k_end = min(kt_end * BK, p.K);  // exclusive, in k values
  const int num_k_tiles = kt_end - kt_begin;

  const int64_t row_bytes_a = static_cast<int64_t>(p.K) * ABITS / 8;

  // ---- global -> shared loader -------------------------------------------------------------
  auto load_tile = [&](int stage, int kt) {
    uint8_t* sa = smem + stage * C::kStageBytes;
    uint8_t* sw = sa + C::kStageA;
    const int64_t kbyte_a = static_cast<int64_t>(kt) * C::kRowA;
#pragma unroll
    for (int i = tid; i < BM * C::kChunksA; i += C::kThreads) {
      const int r = i / C::kChunksA, c = i % C::kChunksA;
      const int64_t col = kbyte_a + c * 16;
      const bool ok = (m0 + r < p.M) && (col < row_bytes_a);
      const uint8_t* src = ok ? p.a + static_cast<int64_t>(m0 + r) * row_bytes_a + col : p.a;
      cp_async16(smem_u32(sa + r * C::kRowA + swizzle<C::kChunksA>(r, c) * 16), src, ok ? 16 : 0);
    }
    // Tiled weight: unit (n / 64, kt) is 64 rows x kRowW bytes, contiguous (see the layout above).
#pragma unroll
    for (int i = tid; i < BN * C::kChunksW; i += C::kThreads) {
      const int r = i / C::kChunksW, c = i % C::kChunksW;
      const int n = n0 + r;
      const bool ok = n < p.n_pad;
      const uint8_t* src =
          ok ? p.w + (static_cast<int64_t>(n / kUnitRows) * p.w_k_tiles + kt) * (kUnitRows * C::kRowW) +
                   (n % kUnitRows) * C::kRowW + c * 16
             : p.w;
      cp_async16(smem_u32(sw + r * C::kRowW + swizzle<C::kChunksW>(r, c) * 16), src, ok ? 16 : 0);
    }
  };

  int acc[MT][NT][4];
  float yacc[GROUPED || EPI == kFused ? MT : 1][GROUPED || EPI == kFused ? NT : 1][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0;
  if constexpr (GROUPED || EPI == kFused) {
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) yacc[i][j][e] = 0.0f;
  }

  // y += float(acc >> shift) * sw[grp, n]; acc = 0.
  auto flush = [&](int grp) {
    if constexpr (GROUPED || EPI == kFused) {
      const float* srow = p.w_scale + static_cast<int64_t>(grp) * p.N;
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const int n = n0 + warp_n * C::WTN + j * 8 + 2 * tig;
        const float2 s = n < p.N ? __ldg(reinterpret_cast<const float2*>(srow + n)) : make_float2(0.f, 0.f);
#pragma unroll
        for (int i = 0; i < MT; ++i) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const float sv = (e & 1) ? s.y : s.x;
            yacc[i][j][e] = __fadd_rn(yacc[i][j][e], __fmul_rn(static_cast<float>(acc[i][j][e] >> kShift), sv));
            acc[i][j][e] = 0;
          }
        }
      }
    }
  };

  // ---- prologue ---------------------------------------------------------------------------
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < num_k_tiles) load_tile(s, kt_begin + s);
    cp_async_commit();
  }

  // ---- main loop ----------------------------------------------------------------------------
  for (int it = 0; it < num_k_tiles; ++it) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    {
      const int pre = it + STAGES - 1;
      if (pre < num_k_tiles) load_tile(pre % STAGES, kt_begin + pre);
      cp_async_commit();
    }
    const uint8_t* sa = smem + (it % STAGES) * C::kStageBytes;
    const uint8_t* sw = sa + C::kStageA;
    const int kbase = (kt_begin + it) * BK;

#pragma unroll
    for (int pair = 0; pair < BK / 64; ++pair) {
      // k-steps 2*pair and 2*pair+1 (32 k each) of this tile.
      if (kbase + pair * 64 >= p.K) break;
      uint32_t af[2][MT][4];   // [kstep][mtile][reg] (int8-layout fragments; on native s4: raw packed)
      uint32_t bf[2][NT][2];   // [kstep][ntile][reg]
      // A fragments
#pragma unroll
      for (int i = 0; i < MT; ++i) {
        const int r = warp_m * C::WTM + i * 16 + (lane & 15);
        if constexpr (ABITS == 8) {
#pragma unroll
          for (int ks = 0; ks < 2; ++ks) {
            const int c = 2 * (2 * pair + ks) + (lane >> 4);
            ldmatrix_x4(af[ks][i], smem_u32(sa + r * C::kRowA + swizzle<C::kChunksA>(r, c) * 16));
          }
        } else {
          uint32_t raw[4];
          const int c = 2 * pair + (lane >> 4);
          ldmatrix_x4(raw, smem_u32(sa + r * C::kRowA + swizzle<C::kChunksA>(r, c) * 16));
          if constexpr (kNativeS4) {
#pragma unroll
            for (int e = 0; e < 4; ++e) af[0][i][e] = raw[e];
          } else {
#pragma unroll
            for (int ks = 0; ks < 2; ++ks) {
              af[ks][i][0] = widen_lo(raw[2 * ks]);
              af[ks][i][1] = widen_lo(raw[2 * ks + 1]);
              af[ks][i][2] = widen_hi(raw[2 * ks]);
              af[ks][i][3] = widen_hi(raw[2 * ks + 1]);
            }
          }
        }
      }
      // W fragments, two n8-tiles per ldmatrix.x4
#pragma unroll
      for (int j = 0; j < NT; j += 2) {
        const int r = warp_n * C::WTN + j * 8 + (lane & 7) + 8 * (lane >> 4);
        if constexpr (WBITS == 8) {
#pragma unroll
          for (int ks = 0; ks < 2; ++ks) {
            uint32_t raw[4];
            const int c = 2 * (2 * pair + ks) + ((lane >> 3) & 1);
            ldmatrix_x4(raw, smem_u32(sw + r * C::kRowW + swizzle<C::kChunksW>(r, c) * 16));
            bf[ks][j][0] = raw[0];
            bf[ks][j][1] = raw[1];
            bf[ks][j + 1][0] = raw[2];
            bf[ks][j + 1][1] = raw[3];
          }
        } else {
          uint32_t raw[4];
          const int c = 2 * pair + ((lane >> 3) & 1);
          ldmatrix_x4(raw, smem_u32(sw + r * C::kRowW + swizzle<C::kChunksW>(r, c) * 16));
          if constexpr (kNativeS4) {
            bf[0][j][0] = raw[0];
            bf[0][j][1] = raw[1];
            bf[0][j + 1][0] = raw[2];
            bf[0][j + 1][1] = raw[3];
          } else {
#pragma unroll
            for (int ks = 0; ks < 2; ++ks) {
              bf[ks][j][0] = widen_lo(raw[ks]);
              bf[ks][j][1] = widen_hi(raw[ks]);
              bf[ks][j + 1][0] = widen_lo(raw[2 + ks]);
              bf[ks][j + 1][1] = widen_hi(raw[2 + ks]);
            }
          }
        }
      }
      // MMAs
      if constexpr (kNativeS4) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#pragma unroll
        for (int i = 0; i < MT; ++i)
#pragma unroll
          for (int j = 0; j < NT; ++j)
            mma_s4(acc[i][j], af[0][i][0], af[0][i][1], af[0][i][2], af[0][i][3], bf[0][j][0], bf[0][j][1]);
#endif
        if constexpr (GROUPED) {
          // A 64-k step holds two 32-k chunks; groups are multiples of 32 but a native k64 step needs
          // group_len % 64 == 0 (the host refuses group 32 on this path).
          const int kg = kbase + pair * 64 + 64;
          if (kg % p.group_len == 0 || kg >= k_end) flush((kg - 1) / p.group_len);
        }
      } else {
#pragma unroll
        for (int ks = 0; ks < 2; ++ks) {
          const int kstart = kbase + (2 * pair + ks) * 32;
          if (kstart < p.K) {
#pragma unroll
            for (int i = 0; i < MT; ++i)
#pragma unroll
              for (int j = 0; j < NT; ++j)
                mma_s8(acc[i][j], af[ks][i][0], af[ks][i][1], af[ks][i][2], af[ks][i][3], bf[ks][j][0],
                       bf[ks][j][1]);
            if constexpr (GROUPED) {
              const int kg = kstart + 32;
              if (kg % p.group_len == 0 || kg >= k_end) flush((kg - 1) / p.group_len);
            }
          }
        }
      }
    }
  }
  cp_async_wait<0>();

  // ---- epilogue -----------------------------------------------------------------------------
  if constexpr (!GROUPED && EPI == kFused) flush(0);

#pragma unroll
  for (int i = 0; i < MT; ++i) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int m = m0 + warp_m * C::WTM + i * 16 + g + 8 * h;
      if (m >= p.M) continue;
      float sx = 0.0f;
      if constexpr (EPI == kFused) sx = __ldg(p.a_scale + m);
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const int n = n0 + warp_n * C::WTN + j * 8 + 2 * tig;
        if (n >= p.N) continue;
        const int64_t off = static_cast<int64_t>(m) * p.N + n;
        if constexpr (EPI == kFused) {
          float v0 = __fmul_rn(yacc[i][j][2 * h], sx);
          float v1 = __fmul_rn(yacc[i][j][2 * h + 1], sx);
          if (p.bias != nullptr) {
            v0 = __fadd_rn(v0, __ldg(p.bias + n));
            v1 = __fadd_rn(v1, __ldg(p.bias + n + 1));
          }
          store_pair<OutT>(static_cast<OutT*>(p.out) + off, v0, v1);
        } else if constexpr (EPI == kAtomicInt) {
          int* o = static_cast<int*>(p.out) + off;
          atomicAdd(o, acc[i][j][2 * h] >> kShift);
          atomicAdd(o + 1, acc[i][j][2 * h + 1] >> kShift);
        } else {
          float* o = static_cast<float*>(p.out) + off;
          atomicAdd(o, yacc[i][j][2 * h]);
          atomicAdd(o + 1, yacc[i][j][2 * h + 1]);
        }
      }
    }
  }
}

// Split-K epilogue: y = (grouped ? ws : float(ws) * sw[n]) * sx[m] (+ bias[n]), cast. Two outputs a thread.
template <bool GROUPED, typename OutT>
__global__ void __launch_bounds__(256)
split_epilogue_kernel(const void* __restrict__ ws, const float* __restrict__ a_scale,
                      const float* __restrict__ w_scale, const float* __restrict__ bias, OutT* __restrict__ out,
                      int64_t M, int N) {
  const int64_t pairs = M * N / 2;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < pairs;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t off = 2 * i;
    const int64_t m = off / N;
    const int n = static_cast<int>(off - m * N);
    float v0, v1;
    if constexpr (GROUPED) {
      const float2 y = reinterpret_cast<const float2*>(ws)[i];
      v0 = y.x;
      v1 = y.y;
    } else {
      const int2 a = reinterpret_cast<const int2*>(ws)[i];
      v0 = __fmul_rn(static_cast<float>(a.x), w_scale[n]);
      v1 = __fmul_rn(static_cast<float>(a.y), w_scale[n + 1]);
    }
    const float sx = a_scale[m];
    v0 = __fmul_rn(v0, sx);
    v1 = __fmul_rn(v1, sx);
    if (bias != nullptr) {
      v0 = __fadd_rn(v0, bias[n]);
      v1 = __fadd_rn(v1, bias[n + 1]);
    }
    store_pair<OutT>(out + off, v0, v1);
  }
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------

// Config ids (the `config` argument; 0 = automatic by M). 6 and 7: the wgmma kernel of
// csrc/int_wgmma.cu with 128- or 256-token tiles (sm_90a; int8 activations, per-channel weights).
// 8: the few-token kernel of csrc/int_small_m.cu (sm_90; int8 activations, per-channel weights).
enum ConfigId : int {
  kAuto = 0, kSmall = 1, kMedium = 2, kLarge = 3, kWide = 4, kTall = 5, kWgmma128 = 6, kWgmma256 = 7, kSmallM = 8
};

template <int ABITS, int WBITS, int BM, int BN, int WM, int WN, int STAGES, int EPI, bool GROUPED, typename OutT>
void launch_kernel(const Params& prm, int split, cudaStream_t stream) {
  using C = Cfg<ABITS, WBITS, BM, BN, WM, WN, STAGES>;
  auto kernel = int_gemm_kernel<ABITS, WBITS, BM, BN, WM, WN, STAGES, EPI, GROUPED, OutT>;
  if (C::kSmem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmem));
  }
  const int tiles = ((prm.M + BM - 1) / BM) * ((prm.N + BN - 1) / BN);
  kernel<<<dim3(tiles, split), C::kThreads, C::kSmem, stream>>>(prm);
  QK_CHECK_LAUNCH();
}

template <int ABITS, int WBITS, int EPI, bool GROUPED, typename OutT>
void launch_config(int config, const Params& prm, int split, cudaStream_t stream) {
  switch (config) {
    case kSmall:
      launch_kernel<ABITS, WBITS, 16, 64, 1, 4, 8, EPI, GROUPED, OutT>(prm, split, stream);
      break;
    case kMedium:
      launch_kernel<ABITS, WBITS, 64, 128, 2, 2, 4, EPI, GROUPED, OutT>(prm, split, stream);
      break;
    case kWide:  // 64 x 64 warp tiles: per-channel, fused epilogue only (the grouped flush would spill)
      if constexpr (EPI == kFused && !GROUPED) {
        launch_kernel<ABITS, WBITS, 128, 256, 2, 4, 4, EPI, GROUPED, OutT>(prm, split, stream);
      } else {
        launch_kernel<ABITS, WBITS, 128, 128, 2, 4, 4, EPI, GROUPED, OutT>(prm, split, stream);
      }
      break;
    case kTall:
      if constexpr (EPI == kFused && !GROUPED) {
        launch_kernel<ABITS, WBITS, 256, 128, 4, 2, 4, EPI, GROUPED, OutT>(prm, split, stream);
      } else {
        launch_kernel<ABITS, WBITS, 128, 128, 2, 4, 4, EPI, GROUPED, OutT>(prm, split, stream);
      }
      break;
    default:
      launch_kernel<ABITS, WBITS, 128, 128, 2, 4, 4, EPI, GROUPED, OutT>(prm, split, stream);
      break;
  }
}

struct Plan {
  int config;
  int split;
  int k_tiles_per_split;
};

// Tile shape and split of one call. kWide / kTall (64 x 64 warp tiles) serve only per-channel weights
// without split-K (their fused epilogue keeps no fp32 group accumulators); elsewhere they become kLarge.
Plan make_plan(int64_t M, int64_t N, int64_t K, bool per_channel, int64_t split_k, int64_t config, int device) {
  Plan plan;
  plan.config = static_cast<int>(config);
  if (plan.config == kAuto) {
    plan.config = M <= 32 ? kSmall : (M <= 128 ? kMedium : (per_channel && M >= 512 ? kWide : kLarge));
  }
  TORCH_CHECK(plan.config >= kSmall && plan.config <= kTall, "int_gemm: config must be 0..8, got ", config);
  if ((plan.config == kWide || plan.config == kTall) && !per_channel) plan.config = kLarge;
  const int k_tiles = static_cast<int>((K + kTileK - 1) / kTileK);
  int split = 1;
  for (int attempt = 0; attempt < 2; ++attempt) {
    const int bm = plan.config == kSmall ? 16 : (plan.config == kMedium ? 64 : (plan.config == kTall ? 256 : 128));
    const int bn = plan.config == kSmall ? 64 : (plan.config == kWide ? 256 : 128);
    const int64_t tiles = ((M + bm - 1) / bm) * ((N + bn - 1) / bn);
    split = static_cast<int>(split_k);
    if (split <= 0) {
      // Enough blocks: about 3 per SM for the small (memory-bound) tiles, one wave otherwise; keep at
      // least 4 k-tiles per split.
      const int64_t want = plan.config == kSmall ? 3 * num_sms(device) : (num_sms(device) * 9) / 10;
      split = 1;
      while (tiles * split < want && k_tiles / (split * 2) >= 4) split *= 2;
    }
    split = std::max(1, std::min(split, k_tiles));
    if (split == 1 || (plan.config != kWide && plan.config != kTall)) break;
    plan.config = kLarge;  // the wide tiles do not split: retry with 128 x 128
  }
  plan.k_tiles_per_split = (k_tiles + split - 1) / split;
  plan.split = (k_tiles + plan.k_tiles_per_split - 1) / plan.k_tiles_per_split;  // no empty splits
  return plan;
}

// The wgmma kernel (csrc/int_wgmma.cu) serves int8 activations (W8A8, W4A8, and W4A4 on sm_90 with its
// codes stored one per byte) and per-channel weights on an sm_90 GPU, from kWgmmaMinTokens tokens up
// (below, the mma.sync tiles with split K; at M = 64 the wgmma kernel, forced, measured faster on the
// H100, 28.5 against 42.6 us for W4A4 8192 x 8192, so the threshold may come down).
constexpr int64_t kWgmmaMinTokens = 65;

// Its grid walks the tokens along y (at most 65535 tiles); the automatic choice leaves larger M to the mma.sync
// tiles (grid x).
constexpr int64_t kMaxGridY = 65535;

bool use_wgmma(const char* op, int64_t config, int64_t M, int64_t a_bits, bool grouped, int device) {
  const bool available = hopper::wgmma_available(device);
  if (config == kWgmma128 || config == kWgmma256) {
    TORCH_CHECK(available, op, ": configs 6 and 7 (the wgmma kernel) need an sm_90 GPU and an extension built "
                "for 9.0a");
    TORCH_CHECK(a_bits == 8 && !grouped, op, ": configs 6 and 7 (the wgmma kernel) take int8 activations and "
                "per-channel weights");
    const int64_t tokens = config == kWgmma128 ? 128 : 256;
    TORCH_CHECK((M + tokens - 1) / tokens <= kMaxGridY, op, ": config ", config, " (the wgmma kernel, ", tokens,
                "-token tiles) takes at most ", kMaxGridY * tokens, " rows, got M = ", M);
    return true;
  }
  return config == kAuto && available && a_bits == 8 && !grouped && M >= kWgmmaMinTokens &&
         (M + 255) / 256 <= kMaxGridY;
}

// The few-token kernel (csrc/int_small_m.cu): per-channel weights on an sm_90 GPU, int8 activations or
// packed int4 ones with int4 weights in the W4A8 layout (w4a8_layout), automatic up to int_small_m::kMaxTokens
// tokens (its plan: int_small_m::plan). On the H200 it streams int4 weights at 2.9 TB/s at 8192 x 8192 and
// 3.6 TB/s at 8192 x 28672 (M = 1); on the H100 the best mma.sync tile and split had reached 1.9 and 2.3.
bool use_small_m(const char* op, int64_t config, int64_t M, int64_t a_bits, bool w4a8_layout, bool grouped,
                 int device) {
  const bool available = hopper::wgmma_available(device);  // an sm_90 GPU and an sm_90 build
  const bool takes_a = a_bits == 8 || w4a8_layout;
  if (config == kSmallM) {
    TORCH_CHECK(available, op, ": config 8 (the few-token kernel) needs an sm_90 GPU and an extension built for 9.0a");
    TORCH_CHECK(takes_a && !grouped, op, ": config 8 (the few-token kernel) takes int8 activations (or packed int4 "
                "ones with weights in the W4A8 layout) and per-channel weights");
    TORCH_CHECK((M + int_small_m::kTokens - 1) / int_small_m::kTokens <= kMaxGridY, op,
                ": config 8 (the few-token kernel) takes at most ", kMaxGridY * int_small_m::kTokens,
                " rows (grid z), got M = ", M);
    return true;
  }
  const bool chosen = config == kAuto && available && takes_a && !grouped && M <= int_small_m::kMaxTokens;
  // Packed int4 activations against W4A8-layout weights: no other kernel takes that pair.
  TORCH_CHECK(chosen || a_bits == 8 || !w4a8_layout, op, ": packed int4 activations with weights in the W4A8 "
              "layout run only on the sm_90 few-token kernel (per-channel weights, M <= ", int_small_m::kMaxTokens,
              "; here M = ", M, grouped ? ", grouped weights" : "", available ? "" : ", no sm_90 GPU and 9.0a build",
              "): quantize the activations with packed=False");
  return chosen;
}

struct WgmmaPlan {
  int tokens;
  int splits;
  int tiles_per_split;
};

// Token tile and K split of a wgmma call. split_k > 0 asks for that many splits; 0 (automatic) splits K only
// for 128-token tiles (M <= 128) whose blocks fill less than half the SMs, doubling the split while the blocks
// still fit on the SMs and each split keeps at least 4 k-tiles. The split path (a zeroed int32 workspace,
// atomics, a separate epilogue) costs a few microseconds, so it pays only where most SMs would idle. H200,
// W8A8 at M = 128, GEMM alone, config 6 with each split forced (a one-off probe like bench_int_gemm.py --sweep,
// CUDA-graph medians, weights from HBM): 14336 x 4096 (32 blocks) 56.3 us
// unsplit, 38.4 split 2, 28.5 split 4, 29.2 split 8; 8192 x 8192 (64 blocks) 37.2, 33.0, 33.1, 39.9;
// 4096 x 4096 (32 blocks) 18.6, 16.8, 15.0, 18.1. On the H100, 8192 x 28672 (224 blocks) at M = 128 was
// slower split (85 us against 53 for W4A4, split 2): it is not split here.
WgmmaPlan make_wgmma_plan(int64_t M, int64_t N, int64_t K, int64_t config, int64_t split_k, int device) {
  WgmmaPlan plan;
  plan.tokens = config == kWgmma128 || (config == kAuto && M <= 128) ? 128 : 256;
  const int64_t k_tiles = (K + kTileK - 1) / kTileK;
  int64_t split = split_k;
  if (split <= 0) {
    split = 1;
    const int64_t blocks =
        (N + int_wgmma::kChannels - 1) / int_wgmma::kChannels * ((M + plan.tokens - 1) / plan.tokens);
    while (plan.tokens == 128 && 2 * blocks * split <= num_sms(device) && k_tiles / (2 * split) >= 4) split *= 2;
  }
  split = std::max<int64_t>(1, std::min<int64_t>(split, k_tiles));
  plan.tiles_per_split = static_cast<int>((k_tiles + split - 1) / split);
  plan.splits = static_cast<int>((k_tiles + plan.tiles_per_split - 1) / plan.tiles_per_split);  // no empty splits
  return plan;
}

// The parameter block of both Hopper kernels (csrc/int_wgmma.cu, csrc/int_small_m.cu).
int_wgmma::Params hopper_params(const at::Tensor& a, const at::Tensor& w, const float* a_scale, const float* w_scale,
                                const float* bias, void* out, int64_t M, int64_t N, int64_t K, int tiles_per_split) {
  return int_wgmma::Params{a.const_data_ptr(), w.const_data_ptr(), a_scale, w_scale, bias, out,
                           static_cast<int>(M), static_cast<int>(N), static_cast<int>(K), static_cast<int>(w.size(0)),
                           static_cast<int>(w.size(1)), tiles_per_split};
}

// k-tiles per block when `splits` blocks share K.
int tiles_per_split(const at::Tensor& w, int splits) {
  return static_cast<int>((w.size(1) + splits - 1) / splits);
}

// Checks a and the tiled w against each other; returns K. N: the true out_features (<= w's padded rows).
int64_t check_operands(const char* op, const at::Tensor& a, const at::Tensor& w, int64_t N, int64_t a_bits,
                       int64_t w_bits, bool w4a8_layout) {
  check_cuda(a, op, "a");
  check_cuda(w, op, "w");
  check_dim(a, 2, op, "a");
  check_dim(w, 4, op, "w (tiled: [N_pad / 64, K_pad / 128, 64, 128 * w_bits / 8])");
  check_contiguous(a, op, "a");
  check_contiguous(w, op, "w");
  TORCH_CHECK((a_bits == 8 && w_bits == 8) || (a_bits == 4 && w_bits == 4) || (a_bits == 8 && w_bits == 4), op,
              ": supported (a_bits, w_bits) are (8, 8), (4, 4) and (8, 4), got (", a_bits, ", ", w_bits, ")");
  TORCH_CHECK(!w4a8_layout || w_bits == 4, op, ": w4a8_layout describes int4 weights, got ", w_bits, "-bit ones");
  TORCH_CHECK(a.scalar_type() == (a_bits == 8 ? at::kChar : at::kByte), op, ": a must be ",
              a_bits == 8 ? "int8" : "uint8 (packed int4)", ", got ", a.scalar_type());
  TORCH_CHECK(w.scalar_type() == (w_bits == 8 ? at::kChar : at::kByte), op, ": w must be ",
              w_bits == 8 ? "int8" : "uint8 (packed int4)", ", got ", w.scalar_type());
  TORCH_CHECK(a.device() == w.device(), op, ": a and w must be on the same device");
  const int64_t K = a_bits == 8 ? a.size(1) : 2 * a.size(1);
  TORCH_CHECK(K % 32 == 0 && K > 0, op, ": K must be a positive multiple of 32, got ", K);
  TORCH_CHECK(K <= 65536, op, ": K must be at most 65536 (int32 headroom of the widened products), got ", K);
  TORCH_CHECK(w.size(1) == (K + kTileK - 1) / kTileK && w.size(2) == kUnitRows && w.size(3) == kTileK * w_bits / 8,
              op, ": w must be tiled as [N_pad / 64, ", (K + kTileK - 1) / kTileK, ", 64, ", kTileK * w_bits / 8,
              "] for K = ", K, " (quantkern.layout_int.tile_int_weight), got ", w.sizes());
  TORCH_CHECK(N % 8 == 0 && N > w.size(0) * kUnitRows - kUnitRows && N <= w.size(0) * kUnitRows, op,
              ": N = ", N, " must be a multiple of 8 that fits w's ", w.size(0) * kUnitRows, " padded rows");
  TORCH_CHECK(a.size(0) <= std::numeric_limits<int32_t>::max() / 2 && N < (1 << 30), op, ": too many rows");
  TORCH_CHECK(is_aligned(a.const_data_ptr(), 16) && is_aligned(w.const_data_ptr(), 16), op,
              ": a and w must be 16-byte aligned");
  return K;
}

template <int ABITS, int WBITS>
void dispatch_epi(int epi, bool grouped, at::ScalarType out_dtype, int config, const Params& prm, int split,
                  cudaStream_t stream) {
  if (epi == kAtomicInt) {
    launch_config<ABITS, WBITS, kAtomicInt, false, float>(config, prm, split, stream);
  } else if (epi == kAtomicFloat) {
    launch_config<ABITS, WBITS, kAtomicFloat, true, float>(config, prm, split, stream);
  } else if (out_dtype == at::kHalf) {
    if (grouped) launch_config<ABITS, WBITS, kFused, true, __half>(config, prm, split, stream);
    else launch_config<ABITS, WBITS, kFused, false, __half>(config, prm, split, stream);
  } else {
    if (grouped) launch_config<ABITS, WBITS, kFused, true, __nv_bfloat16>(config, prm, split, stream);
    else launch_config<ABITS, WBITS, kFused, false, __nv_bfloat16>(config, prm, split, stream);
  }
}

void dispatch_bits(int64_t a_bits, int64_t w_bits, int epi, bool grouped, at::ScalarType out_dtype, int config,
                   const Params& prm, int split, cudaStream_t stream) {
  if (a_bits == 8 && w_bits == 8) {
    dispatch_epi<8, 8>(epi, grouped, out_dtype, config, prm, split, stream);
  } else if (a_bits == 4) {
    dispatch_epi<4, 4>(epi, grouped, out_dtype, config, prm, split, stream);
  } else {
    dispatch_epi<8, 4>(epi, grouped, out_dtype, config, prm, split, stream);
  }
}

// y = the split-K workspace ws [M, N] (int32 sums, or fp32 grouped partials) through the epilogue.
void launch_split_epilogue(const at::Tensor& ws, bool grouped, at::ScalarType out_dtype, const float* sx,
                           const float* sw, const float* bias, at::Tensor& out, cudaStream_t stream) {
  const int64_t M = out.size(0);
  const int N = static_cast<int>(out.size(1));
  const int64_t pairs = M * N / 2;
  const int blocks = static_cast<int>(std::min<int64_t>((pairs + 255) / 256, 8 * num_sms(out.get_device())));
  auto run = [&](auto kernel, auto* y) {
    kernel<<<blocks, 256, 0, stream>>>(ws.const_data_ptr(), sx, sw, bias, y, M, N);
  };
  if (out_dtype == at::kHalf) {
    auto* y = static_cast<__half*>(out.data_ptr());
    grouped ? run(split_epilogue_kernel<true, __half>, y) : run(split_epilogue_kernel<false, __half>, y);
  } else {
    auto* y = static_cast<__nv_bfloat16*>(out.data_ptr());
    grouped ? run(split_epilogue_kernel<true, __nv_bfloat16>, y) : run(split_epilogue_kernel<false, __nv_bfloat16>, y);
  }
  QK_CHECK_LAUNCH();
}

at::Tensor int_gemm_acc_cuda(const at::Tensor& a, const at::Tensor& w, int64_t n, int64_t a_bits, int64_t w_bits,
                             int64_t split_k, int64_t config, bool w4a8_layout) {
  constexpr const char* op = "quantkern::int_gemm_acc";
  const int64_t K = check_operands(op, a, w, n, a_bits, w_bits, w4a8_layout);
  const int64_t M = a.size(0), N = n;
  const c10::cuda::CUDAGuard device_guard(a.device());
  at::Tensor out = at::zeros({M, N}, a.options().dtype(at::kInt));
  if (M == 0 || N == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(a.get_device()).stream();
  // (config 0 here: the automatic choice but for the few-token kernel, which config 8 asks for; packed int4 codes
  // with W4A8 weights take it either way)
  const int64_t small_m_config = config == kAuto && !(a_bits == 4 && w4a8_layout) ? -1 : config;
  if (use_small_m(op, small_m_config, M, a_bits, w4a8_layout, false, a.get_device())) {
    const int_small_m::Plan plan = int_small_m::plan(M, N, K, static_cast<int>(w_bits), static_cast<int>(a_bits),
                                                     split_k, num_sms(a.get_device()));
    int_small_m::launch(static_cast<int>(w_bits), static_cast<int>(a_bits), true, at::kInt,
                        hopper_params(a, w, nullptr, nullptr, nullptr, out.data_ptr(), M, N, K,
                                      tiles_per_split(w, plan.splits)),
                        plan, stream);
    return out;
  }
  if (use_wgmma(op, config == kAuto ? -1 : config, M, a_bits, false, a.get_device())) {
    const WgmmaPlan wplan = make_wgmma_plan(M, N, K, config, split_k, a.get_device());
    int_wgmma::launch(static_cast<int>(w_bits), wplan.tokens, true, at::kInt,
                      hopper_params(a, w, nullptr, nullptr, nullptr, out.data_ptr(), M, N, K, wplan.tiles_per_split),
                      wplan.splits, stream);
    return out;
  }
  const Plan plan = make_plan(M, N, K, false, split_k, config, a.get_device());
  Params prm{static_cast<const uint8_t*>(a.const_data_ptr()), nullptr,
             static_cast<const uint8_t*>(w.const_data_ptr()), nullptr, nullptr, out.data_ptr(),
             static_cast<int>(M), static_cast<int>(N), static_cast<int>(K),
             static_cast<int>(w.size(0) * kUnitRows), static_cast<int>(w.size(1)), static_cast<int>(K),
             plan.k_tiles_per_split};
  dispatch_bits(a_bits, w_bits, kAtomicInt, false, at::kFloat, plan.config, prm, plan.split, stream);
  return out;
}

at::Tensor int_gemm_cuda(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& w,
                         const at::Tensor& w_scale, const std::optional<at::Tensor>& bias, int64_t a_bits,
                         int64_t w_bits, int64_t group_len, at::ScalarType out_dtype, int64_t split_k,
                         int64_t config, bool w4a8_layout) {
  constexpr const char* op = "quantkern::int_gemm";
  TORCH_CHECK(w_scale.dim() == 2, op, ": w_scale must be 2-D [K / group_len, N]");
  const int64_t K = check_operands(op, a, w, w_scale.size(1), a_bits, w_bits, w4a8_layout);
  const int64_t M = a.size(0), N = w_scale.size(1);
  TORCH_CHECK(out_dtype == at::kHalf || out_dtype == at::kBFloat16, op, ": out_dtype must be float16 or bfloat16");
  TORCH_CHECK(group_len > 0 && group_len % 32 == 0 && K % group_len == 0, op,
              ": group_len must be a positive multiple of 32 dividing K = ", K, ", got ", group_len);
  const bool grouped = group_len < K;
  // (a's device, not the current one: the guard below is not set yet)
  TORCH_CHECK(!(grouped && a_bits == 4 && w_bits == 4 && group_len % 64 != 0 &&
                device_attribute<cudaDevAttrComputeCapabilityMajor>(a.get_device()) < 9),
              op, ": W4A4 with group 32 needs sm_90 (the native int4 path steps 64 k at a time)");
  const auto check_scale = [&](const at::Tensor& t, const char* name) {
    check_cuda(t, op, name);
    check_contiguous(t, op, name);
    TORCH_CHECK(t.device() == a.device(), op, ": ", name, " must be on a's device ", a.device(), ", got ", t.device());
    TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t.scalar_type());
  };
  check_scale(a_scale, "a_scale");
  check_scale(w_scale, "w_scale");
  TORCH_CHECK(a_scale.dim() == 1 && a_scale.size(0) == M, op, ": a_scale must be [M] = [", M, "], got ",
              a_scale.sizes());
  TORCH_CHECK(w_scale.dim() == 2 && w_scale.size(0) == K / group_len && w_scale.size(1) == N, op,
              ": w_scale must be [K / group_len, N] = [", K / group_len, ", ", N, "], got ", w_scale.sizes());
  // The mma.sync kernel reads w_scale as float2 pairs (N is even): a view at an odd float offset would fault.
  TORCH_CHECK(is_aligned(w_scale.const_data_ptr(), 8), op, ": w_scale must be 8-byte aligned: pass a whole tensor, "
              "not a view at an odd offset");
  const float* bias_ptr = nullptr;
  if (bias.has_value() && bias->defined()) {
    check_cuda(*bias, op, "bias");
    check_contiguous(*bias, op, "bias");
    TORCH_CHECK(bias->device() == a.device(), op, ": bias must be on a's device ", a.device(), ", got ",
                bias->device());
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->dim() == 1 && bias->size(0) == N, op,
                ": bias must be float32 [N] = [", N, "], got ", bias->scalar_type(), " ", bias->sizes());
    bias_ptr = bias->data_ptr<float>();
  }
  const c10::cuda::CUDAGuard device_guard(a.device());
  at::Tensor out = at::empty({M, N}, a.options().dtype(out_dtype));
  if (M == 0 || N == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(a.get_device()).stream();
  const float* sw = w_scale.data_ptr<float>();
  const float* sx = a_scale.data_ptr<float>();
  if (use_small_m(op, config, M, a_bits, w4a8_layout, grouped, a.get_device())) {
    const int_small_m::Plan plan = int_small_m::plan(M, N, K, static_cast<int>(w_bits), static_cast<int>(a_bits),
                                                     split_k, num_sms(a.get_device()));
    int_small_m::launch(static_cast<int>(w_bits), static_cast<int>(a_bits), false, out_dtype,
                        hopper_params(a, w, sx, sw, bias_ptr, out.data_ptr(), M, N, K, tiles_per_split(w, plan.splits)),
                        plan, stream);
    return out;
  }
  if (use_wgmma(op, config, M, a_bits, grouped, a.get_device())) {
    const WgmmaPlan wplan = make_wgmma_plan(M, N, K, config, split_k, a.get_device());
    if (wplan.splits == 1) {
      int_wgmma::launch(static_cast<int>(w_bits), wplan.tokens, false, out_dtype,
                        hopper_params(a, w, sx, sw, bias_ptr, out.data_ptr(), M, N, K, wplan.tiles_per_split), 1,
                        stream);
      return out;
    }
    at::Tensor ws = at::zeros({M, N}, a.options().dtype(at::kInt));
    int_wgmma::launch(static_cast<int>(w_bits), wplan.tokens, true, at::kInt,
                      hopper_params(a, w, nullptr, nullptr, nullptr, ws.data_ptr(), M, N, K, wplan.tiles_per_split),
                      wplan.splits, stream);
    launch_split_epilogue(ws, false, out_dtype, sx, sw, bias_ptr, out, stream);
    return out;
  }
  const Plan plan = make_plan(M, N, K, !grouped, split_k, config, a.get_device());
  Params prm{static_cast<const uint8_t*>(a.const_data_ptr()), a_scale.data_ptr<float>(),
             static_cast<const uint8_t*>(w.const_data_ptr()), w_scale.data_ptr<float>(), bias_ptr, out.data_ptr(),
             static_cast<int>(M), static_cast<int>(N), static_cast<int>(K),
             static_cast<int>(w.size(0) * kUnitRows), static_cast<int>(w.size(1)), static_cast<int>(group_len),
             plan.k_tiles_per_split};
  if (plan.split == 1) {
    dispatch_bits(a_bits, w_bits, kFused, grouped, out_dtype, plan.config, prm, 1, stream);
    return out;
  }
  at::Tensor ws = at::zeros({M, N}, a.options().dtype(grouped ? at::kFloat : at::kInt));
  prm.out = ws.data_ptr();
  dispatch_bits(a_bits, w_bits, grouped ? kAtomicFloat : kAtomicInt, grouped, out_dtype, plan.config, prm,
                plan.split, stream);
  launch_split_epilogue(ws, grouped, out_dtype, sx, sw, bias_ptr, out, stream);
  return out;
}

}  // namespace
}  // namespace quantkern

TORCH_LIBRARY_IMPL(quantkern, CUDA, m) {
  m.impl("int_gemm", &quantkern::int_gemm_cuda);
  m.impl("int_gemm_acc", &quantkern::int_gemm_acc_cuda);
}
