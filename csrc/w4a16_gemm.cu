// quantkern::w4a16_gemm(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, Tensor? bias,
//                       Tensor locks, int group_size, int split_k=0, int tile_m=0,
//                       bool scales_fit_fp16=False) -> Tensor y
//
// W4A16 linear layer on tensor cores: y[M, N] = x[M, K] @ dequant(W)^T (+ bias), x and y fp16 or
// bf16, W int4 codes with one scale (and, asymmetric, one zero code) per group of `group_size`
// input channels (32, 64, 128, or K = per-channel), fp32 accumulation. Semantics:
// quantkern.reference.weight_only_linear, dequant(W)[n, k] = (code - zero) * scale.
//
// Arithmetic (why the scale is applied in fp32, not folded into the weight operand)
//   The mma's weight operand is the exact small integer (code - zero), represented exactly in fp16
//   and bf16 (|code - zero| <= 15). Per group, the products x * (code - zero) are accumulated in
//   fp32 in a partial accumulator `pacc`, which is then folded into the main accumulator in fp32:
//   acc += pacc * scale[n]. Folding the scale into the 16-bit weight instead (Marlin's way) rounds
//   every dequantized weight to 8 significant bits in bf16, which alone costs ~1.5e-3 relative error
//   (as much as rounding the output), too close to the 2e-3 bar. This way the only roundings are the
//   fp32 accumulation and the final conversion of y to fp16/bf16, for both dtypes. The cost is a
//   second set of accumulators and 4 FMAs per (m16, n8) tile per 64 (group 32: 32) input channels.
//
// Weight layout (made once at load time by quantkern/layout_cuda.py, prepare_w4a16; shared with the
// small-M kernel of csrc/w4a16_small_m.cu)
//   qweight int32 [N/16, 2K]: N is cut into strips of 16 output channels, K into tiles of 64. Strip
//   ns, k-tile kt is a contiguous 512-byte unit at int32 offset (ns * K/64 + kt) * 128, holding
//   uint4 words[lane 0..31] = {w[kk=0], w[1], w[2], w[3]}: word kk is what lane (g = lane/4,
//   t = lane%4) needs for the k16 step kk. Its 8 nibbles, p = 4h + 2jk + jn:
//       nibble p = code[n = 16 ns + 8 jn + g][k = 64 kt + 16 kk + 8 jk + 2 t + h]
//   so that ((word >> 4(2jk + jn)) & 0x000F000F) puts the codes of k = .. + 2t and 2t+1 into the low
//   and high 16-bit halves: exactly mma.m16n8k16's B fragment register (jk = 0: b0, jk = 1: b1) of
//   n8-tile jn. (The order of p serves the small-M kernel, which uses the same word as an A fragment
//   and reads nibbles 1, 5 and 3, 7, the channels 8..15, without a shift.) One 16-byte ld.shared per
//   lane and k-tile gives a lane all its weights for 4 k16 steps.
//   scales [G, N] in the activation dtype (G = K / group_size), transposed so that one group's scales
//   for a tile of columns are contiguous; zeros [G, N] in the activation dtype holding the zero
//   codes (exact small integers), or absent (symmetric: implicit zero 8).
//
// int4 -> fp16/bf16 in registers (no conversion instructions)
//   (q >> 4i) & 0x000F000F | MAGIC is, read as two halves, MAGIC + code: fp16 0x6400 = 1024
//   (ulp 1), bf16 0x4300 = 128 (ulp 1). One lop3 (and one shift), then one sub2 of (MAGIC + zero)
//   gives (code - zero) exactly, two values per instruction.
//
// Dispatch (automatic_kernel): M <= 16 goes to the small-M kernel (csrc/w4a16_small_m.cu: weights streamed
//   into registers, ~1.5x faster at M = 1), larger M on Hopper to the wgmma kernel (csrc/w4a16_wgmma.cu)
//   except small weights at few tokens (the small-M kernel again), elsewhere to this file's kernel. tile_m = 1
//   forces the small-M kernel (in tiles of 16 tokens), 2 the same without its weight ring (register stages
//   only), 3 / 4 / 5 the wgmma kernel, 16 / 64 / 128 one of the tiles below. On the wgmma kernel, bf16 x of
//   enough tokens (stages_bf16) runs as an exact fp16 copy on the fp16 path where the caller says the scales
//   allow it (scales_fit_fp16; csrc/w4a16_wgmma.cu, "bf16 activations staged as fp16").
// Tiling: block tile BM x BN x 64 (BK), warps WM x WN, each warp a (BM/WM) x (BN/WN) tile of
//   mma.sync.m16n8k16 (row.col, f32 accumulate; f16 or bf16 operands). Three configurations:
//     tile_m 16 : BM = 16,  BN = 128, 4 warps (1 x 4), warp tile 16 x 32, 4 stages, 28 KiB smem
//     M <= 64   : BM = 64,  BN = 128, 8 warps (2 x 4), warp tile 32 x 32, 4 stages, 52 KiB smem
//     M >  64   : BM = 128, BN = 128, 8 warps (2 x 4), warp tile 64 x 32, 4 stages, 84 KiB smem
//   Needs K % 64 == 0 and N % 16 == 0 (a partial last N tile
//   is masked by whole strips); any M >= 1 (rows beyond M are zero-filled and not stored).
//
// Pipeline: per stage, cp.async (16-byte, .cg) of the activation tile (BM x 64, rows XOR-swizzled
//   in 16-byte chunks so that ldmatrix is bank-conflict free), the weight tile (BN/16 units of
//   512 B), and the tile's scale/zero rows. STAGES-1 tiles in flight, one __syncthreads per k-tile.
//   Activations reach the mma through ldmatrix.x4; weights through ld.shared.v4 + lop3 dequant.
//
// Work split: grid (N tiles, M tiles, splits). When there are fewer output tiles than the GPU can
//   hold, K is split into `splits` contiguous ranges of k-tiles (split_k > 0 forces a count). Each
//   block writes its fp32 partial tile to a workspace (from torch's allocator), then counts itself
//   in locks[tile] with one atomicAdd; the last block of a tile sums the partials in the fixed order
//   0..splits-1 (so the result is bit-identical whichever block comes last), adds the bias, writes y
//   and resets locks[tile] to 0. `locks` is an int32 scratch tensor owned by the prepared weight,
//   all zeros before and after every call (so it must not be used by two calls running concurrently
//   on different streams). No float atomics, no host sync, no allocation beyond y and the workspace.
//
// Compiled without --use_fast_math.

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "hopper.cuh"
#include "w4a16_common.cuh"

namespace quantkern {
namespace {

using namespace w4a16;

// ---------------------------------------------------------------------------------------------
// Kernel
// ---------------------------------------------------------------------------------------------

struct Params {
  const void* x;         // [M, K] T
  const uint4* qweight;  // [N/16, K/64, 32] uint4 (see the header)
  const void* scales;    // [G, N] T
  const void* zeros;     // [G, N] T zero codes, or nullptr (symmetric)
  const void* bias;      // [N] T or nullptr
  void* y;               // [M, N] T
  float* partials;       // [splits, M, N] fp32 (splits > 1 only)
  int* locks;            // one counter per output tile (splits > 1 only), all zero between calls
  int M, N, K;
  int group_len;         // 32, 64, 128 or K
  int k_tiles;           // K / 64
  int tiles_per_split;   // k-tiles per split (the last split may get fewer)
  int splits;
};

template <int BM, int BN, int WM, int WN, int STAGES>
struct TileConfig {
  static constexpr int kThreads = WM * WN * 32;
  static constexpr int kWarpM = BM / WM;
  static constexpr int kWarpN = BN / WN;
  static constexpr int kMT = kWarpM / 16;  // m16 tiles per warp
  static constexpr int kNT = kWarpN / 8;   // n8 tiles per warp
  static constexpr int kNS = kWarpN / 16;  // 16-wide weight strips per warp
  static constexpr int kABytes = BM * kBK * 2;
  static constexpr int kBBytes = BN / 16 * kUnitBytes;
  static constexpr int kSBytes = 2 * BN * 2;  // two group rows (group 32 has two groups per k-tile)
  static constexpr int kStageBytes = kABytes + kBBytes + 2 * kSBytes;  // A, B, scales, zeros
  static constexpr int kSmemBytes = STAGES * kStageBytes;
  static_assert(BM % (16 * WM) == 0 && BN % (16 * WN) == 0, "warp tiles must be whole m16 x n16 tiles");
  static_assert(STAGES >= 2, "need at least double buffering");
};

template <typename T, int BM, int BN, int WM, int WN, int STAGES, int MIN_BLOCKS>
__global__ void __launch_bounds__(WM * WN * 32, MIN_BLOCKS) w4a16_gemm_kernel(const Params p) {
  using Cfg = TileConfig<BM, BN, WM, WN, STAGES>;
  using Tr = W4Traits<T>;
  constexpr int kThreads = Cfg::kThreads;
  constexpr int kMT = Cfg::kMT, kNT = Cfg::kNT, kNS = Cfg::kNS;

  extern __shared__ __align__(16) uint8_t smem[];
  __shared__ int s_is_last;

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int wm = warp / WN, wn = warp % WN;
  const int g = lane >> 2, t = lane & 3;

  const int n_tile = blockIdx.x, m_tile = blockIdx.y, split = blockIdx.z;
  const int n0 = n_tile * BN, m0 = m_tile * BM;
  const int kt_begin = split * p.tiles_per_split;
  const int nk = min(p.tiles_per_split, p.k_tiles - kt_begin);  // >= 1 (the host makes no empty split)

  const T* __restrict__ x = static_cast<const T*>(p.x);
  const T* __restrict__ scales = static_cast<const T*>(p.scales);
  const T* __restrict__ zeros = static_cast<const T*>(p.zeros);
  const bool asym = zeros != nullptr;
  const bool g32 = p.group_len == 32;
  const int strips = p.N / 16;
  const uint32_t smem0 = smem_addr(smem);

  // ---- global -> shared, one k-tile ----------------------------------------------------------
  auto load_stage = [&](int stage, int kt) {
    const uint32_t a_s = smem0 + stage * Cfg::kStageBytes;
    const uint32_t b_s = a_s + Cfg::kABytes;
    const uint32_t s_s = b_s + Cfg::kBBytes;
    const uint32_t z_s = s_s + Cfg::kSBytes;
    load_x_tile<T, BM, kThreads>(a_s, x, m0, p.M, p.K, kt * kBK, tid);
#pragma unroll
    for (int i = tid; i < BN / 16 * 32; i += kThreads) {  // BN/16 units x 32 chunks of 16 B
      const int s = i >> 5, l = i & 31;
      const int strip = n0 / 16 + s;
      const bool ok = strip < strips;
      const uint4* src = p.qweight + (static_cast<int64_t>(ok ? strip : 0) * p.k_tiles + kt) * 32 + l;
      cp_async16(b_s + i * 16, src, ok);
    }
    const int rows = g32 ? 2 : 1;
    const int grp = g32 ? kt * 2 : (kt * kBK) / p.group_len;
    for (int i = tid; i < 2 * (BN / 8); i += kThreads) {
      const int r = i / (BN / 8), c = i % (BN / 8);
      if (r < rows) {
        const int col = n0 + c * 8;
        const bool ok = col < p.N;
        const int64_t off = static_cast<int64_t>(grp + r) * p.N + (ok ? col : 0);
        cp_async16(s_s + r * BN * 2 + c * 16, scales + off, ok);
        if (asym) cp_async16(z_s + r * BN * 2 + c * 16, zeros + off, ok);
      }
    }
  };

  float acc[kMT][kNT][4];
  float pacc[kMT][kNT][4];
#pragma unroll
  for (int m = 0; m < kMT; ++m)
#pragma unroll
    for (int j = 0; j < kNT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[m][j][e] = 0.0f, pacc[m][j][e] = 0.0f;

  // ---- prologue: STAGES-1 tiles in flight ------------------------------------------------------
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < nk) load_stage(s, kt_begin + s);
    cp_async_commit();
  }

  const int warp_col = wn * Cfg::kWarpN;  // first column of this warp within the block tile
  const int warp_row = wm * Cfg::kWarpM;

  for (int it = 0; it < nk; ++it) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();  // tile `it` is visible to all; the stage read in iteration it-1 is free again
    {
      const int next = it + STAGES - 1;
      if (next < nk) load_stage(next % STAGES, kt_begin + next);
      cp_async_commit();
    }
    const int stage = it % STAGES;
    const uint32_t a_s = smem0 + stage * Cfg::kStageBytes;
    const uint32_t b_s = a_s + Cfg::kABytes;
    const uint32_t s_s = b_s + Cfg::kBBytes;
    const uint32_t z_s = s_s + Cfg::kSBytes;

    uint4 bq[kNS];
#pragma unroll
    for (int s = 0; s < kNS; ++s) bq[s] = ld_shared_v4(b_s + (warp_col / 16 + s) * kUnitBytes + lane * 16);

    // (MAGIC + zero) for B columns g and 8 + g of each strip, as a pair of equal halves.
    uint32_t zb[kNS][2];
    auto load_zeros = [&](int row) {
#pragma unroll
      for (int s = 0; s < kNS; ++s)
#pragma unroll
        for (int jn = 0; jn < 2; ++jn) {
          if (asym) {
            const uint32_t z = ld_shared_u16(z_s + row * BN * 2 + (warp_col + 16 * s + 8 * jn + g) * 2);
            zb[s][jn] = Tr::add2(Tr::kMagic, z | (z << 16));
          } else {
            zb[s][jn] = static_cast<uint32_t>(Tr::kMagicPlus8) * 0x10001u;
          }
        }
    };
    // acc += pacc * scale[column]: the group's partial sums, scaled in fp32.
    auto fold = [&](int row) {
#pragma unroll
      for (int j = 0; j < kNT; ++j) {
        const float2 sc = Tr::to_float2(ld_shared_u32(s_s + row * BN * 2 + (warp_col + 8 * j + 2 * t) * 2));
#pragma unroll
        for (int m = 0; m < kMT; ++m) {
          acc[m][j][0] = fmaf(pacc[m][j][0], sc.x, acc[m][j][0]);
          acc[m][j][1] = fmaf(pacc[m][j][1], sc.y, acc[m][j][1]);
          acc[m][j][2] = fmaf(pacc[m][j][2], sc.x, acc[m][j][2]);
          acc[m][j][3] = fmaf(pacc[m][j][3], sc.y, acc[m][j][3]);
        }
      }
    };
    load_zeros(0);

#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      if (kk == 2 && g32) {  // group 32: the second group of this k-tile starts here
        fold(0);
#pragma unroll
        for (int m = 0; m < kMT; ++m)
#pragma unroll
          for (int j = 0; j < kNT; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) pacc[m][j][e] = 0.0f;
        load_zeros(1);
      }
      uint32_t a[kMT][4];
#pragma unroll
      for (int m = 0; m < kMT; ++m) {
        const int r = warp_row + m * 16 + (lane & 15);
        const int c = kk * 2 + (lane >> 4);
        ldmatrix_x4(a[m], a_s + r * 128 + ((c ^ (r & 7)) << 4));
      }
#pragma unroll
      for (int s = 0; s < kNS; ++s) {
        const uint32_t q = kk == 0 ? bq[s].x : kk == 1 ? bq[s].y : kk == 2 ? bq[s].z : bq[s].w;
        uint32_t b[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {  // b[2 jn + jk] holds nibbles 2 jk + jn and 4 + 2 jk + jn
          const int shift = 4 * (2 * (i & 1) + (i >> 1));
          b[i] = Tr::sub2(and_or(q >> shift, 0x000F000Fu, Tr::kMagic), zb[s][i >> 1]);
        }
#pragma unroll
        for (int m = 0; m < kMT; ++m)
#pragma unroll
          for (int jn = 0; jn < 2; ++jn) {
            if (kk == 0) {
              Tr::template mma<true>(pacc[m][2 * s + jn], a[m], b[2 * jn], b[2 * jn + 1]);
            } else {
              Tr::template mma<false>(pacc[m][2 * s + jn], a[m], b[2 * jn], b[2 * jn + 1]);
            }
          }
      }
    }
    fold(g32 ? 1 : 0);
  }
  cp_async_wait<0>();

  // ---- epilogue ------------------------------------------------------------------------------
  const T* __restrict__ bias = static_cast<const T*>(p.bias);
  T* __restrict__ y = static_cast<T*>(p.y);
  const int row_base = m0 + warp_row + g;
  const int col_base = n0 + warp_col + 2 * t;

  auto store = [&](int row, int col, float v0, float v1) {
    if (bias != nullptr) {
      const float2 b = Tr::to_float2(*reinterpret_cast<const uint32_t*>(bias + col));
      v0 += b.x;
      v1 += b.y;
    }
    *reinterpret_cast<uint32_t*>(y + static_cast<int64_t>(row) * p.N + col) = Tr::from_floats(v0, v1);
  };

  if (p.splits == 1) {
#pragma unroll
    for (int m = 0; m < kMT; ++m)
#pragma unroll
      for (int j = 0; j < kNT; ++j)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int row = row_base + 16 * m + 8 * h, col = col_base + 8 * j;
          if (row < p.M && col < p.N) store(row, col, acc[m][j][2 * h], acc[m][j][2 * h + 1]);
        }
    return;
  }

  // Split K: publish this block's partial tile, count in; the last block of the tile reduces.
  const int64_t split_stride = static_cast<int64_t>(p.M) * p.N;
  float* part = p.partials + split * split_stride;
#pragma unroll
  for (int m = 0; m < kMT; ++m)
#pragma unroll
    for (int j = 0; j < kNT; ++j)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = row_base + 16 * m + 8 * h, col = col_base + 8 * j;
        if (row < p.M && col < p.N) {
          __stcg(reinterpret_cast<float2*>(part + static_cast<int64_t>(row) * p.N + col),
                 make_float2(acc[m][j][2 * h], acc[m][j][2 * h + 1]));
        }
      }
  int* lock = p.locks + m_tile * gridDim.x + n_tile;
  if (!split_k_is_last_block(lock, p.splits, &s_is_last)) return;
  // The last block reduces the whole tile cooperatively: float4 columns, coalesced, with kBatch
  // independent loads in flight per thread; the additions stay in the fixed order 0..splits-1.
  constexpr int kBatch = 8;
  constexpr int kQuads = BN / 4;
  const int rows = min(BM, p.M - m0);
  for (int idx = tid; idx < rows * kQuads; idx += kThreads) {
    const int r = idx / kQuads;
    const int col = n0 + (idx % kQuads) * 4;
    if (col >= p.N) continue;
    const float* src = p.partials + static_cast<int64_t>(m0 + r) * p.N + col;
    float4 sum = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    for (int s0 = 0; s0 < p.splits; s0 += kBatch) {
      float4 v[kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        if (s0 + u < p.splits) v[u] = __ldcg(reinterpret_cast<const float4*>(src + (s0 + u) * split_stride));
      }
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        if (s0 + u < p.splits) {
          sum.x += v[u].x;
          sum.y += v[u].y;
          sum.z += v[u].z;
          sum.w += v[u].w;
        }
      }
    }
    store(m0 + r, col, sum.x, sum.y);
    store(m0 + r, col + 2, sum.z, sum.w);
  }
  if (tid == 0) *lock = 0;  // ready for the next call (kernels on one stream run in order)
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------

constexpr const char* kOp = "quantkern::w4a16_gemm";

struct LaunchShape {
  int bm, bn, blocks_per_sm;
};

template <typename T, int BM, int BN, int WM, int WN, int STAGES, int MIN_BLOCKS>
void launch_kernel(const Params& p, dim3 grid, cudaStream_t stream) {
  using Cfg = TileConfig<BM, BN, WM, WN, STAGES>;
  auto kernel = w4a16_gemm_kernel<T, BM, BN, WM, WN, STAGES, MIN_BLOCKS>;
  constexpr int smem = Cfg::kSmemBytes;
  if constexpr (smem > 48 * 1024) {
    // Not a stream operation: fine during CUDA graph capture.
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  }
  kernel<<<grid, Cfg::kThreads, smem, stream>>>(p);
  QK_CHECK_LAUNCH();
}

// The three tile configurations (see the header).
template <typename T>
void launch_config(int bm, const Params& p, dim3 grid, cudaStream_t stream) {
  switch (bm) {
    case 16:
      launch_kernel<T, 16, 128, 1, 4, 4, 4>(p, grid, stream);
      break;
    case 64:
      launch_kernel<T, 64, 128, 2, 4, 4, 2>(p, grid, stream);
      break;
    default:
      launch_kernel<T, 128, 128, 2, 4, 4, 1>(p, grid, stream);
      break;
  }
}

// The device's opt-in maximum of shared memory per block (csrc/common.cuh caches the query).
int smem_per_block(int device) { return device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>(device); }

// The fewest k-tiles an automatic K split gives each block (choose_splits, and the cost model's splits below).
constexpr int kMinTilesPerSplit = 4;

// K splits for `tiles` output tiles of blocks_per_sm resident blocks per SM: split_k > 0 forces a
// count; automatic: as many as keep every block resident at once (rounded down: one block more
// than the GPU holds costs a whole second wave), each split at least kMinTilesPerSplit k-tiles long.
int choose_splits(int64_t tiles, int k_tiles, int blocks_per_sm, int64_t split_k, int64_t max_locks, int device) {
  if (split_k > 0) {
    const int splits = static_cast<int>(std::min<int64_t>(split_k, k_tiles));
    TORCH_CHECK(splits == 1 || tiles <= max_locks, kOp, ": split_k > 1 needs one lock per output tile (", tiles,
                "), locks has ", max_locks);
    return splits;
  }
  const int64_t target = static_cast<int64_t>(num_sms(device)) * blocks_per_sm;
  if (tiles >= target || tiles > max_locks) return 1;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(target / tiles, k_tiles / kMinTilesPerSplit)));
}

}  // namespace

namespace w4a16 {

// Small weights: at most this many codes (K x N), 8 MiB packed (Llama's 4096 x 4096). With weights this small
// the wgmma kernel has few 128-channel blocks and splits K over most of the GPU.
constexpr int64_t kSmallWeightCodes = int64_t{1} << 24;
// Tiny weights: at most 2^23 codes (Qwen2.5-0.5B's and SmolLM2's layers, 0.9-4.4 M codes; not Llama's 4096 x 4096).
constexpr int64_t kTinyWeightCodes = int64_t{1} << 23;

Kernel automatic_kernel(int64_t M, int64_t N, int64_t K, bool wgmma_available) {
  if (M <= kSmallMTokens) return Kernel::kSmallM;
  if (!wgmma_available) return Kernel::kMmaSync;
  // There the small-M kernel, which reads the weights once per 16 tokens (from L2 after the first), was faster
  // on the H200 (CUDA-graph medians, `python scripts/probe_w4a16.py --cuda-graph --variants 0:0,1:0`, fp16,
  // docs/PERF.md):
  // - small weights up to 32 tokens: 896 x 4864 5.1-5.3 us against 7.1, 4864 x 896 6.7 against 12.0 (4096 x
  //   4096 even: 12.0 against 11.7 at M = 17, 12.2 both at M = 32; 8192 x 8192 at M = 32 29.9 against 24.9);
  // - up to 128 tokens where N <= 1536 (at most 12 blocks): 4864 x 896 at M = 128 12.6 us against 26.7,
  //   3072 x 1024 9.6 against 14.2; the one loss measured, 576 x 1536 at M = 64, 6.6 against 6.1;
  // - tiny weights up to 64 tokens (H100, session 26, against the wgmma kernel's best of six tiles and splits):
  //   896 x 4864 at M = 64 6.9 us against 7.6, 1024 x 3072 5.6 against 7.5 (at 128: 7.6 against 8.2, but 896 x
  //   4864 12.5 against 7.7).
  // Not measured on sm_89, where the alternative is the mma.sync kernel: the rule applies on Hopper only.
  if ((M <= 32 && K * N <= kSmallWeightCodes) || (M <= 64 && K * N <= kTinyWeightCodes) || (M <= 128 && N <= 1536)) {
    return Kernel::kSmallM;
  }
  return Kernel::kWgmma;
}

// bf16 activations staged as fp16 for the wgmma kernel (csrc/w4a16_wgmma.cu): where the scales allow it and from
// kStagedMinTokens tokens (kStagedMinTokensSmall for weights of at most kSmallWeightCodes codes), below which the
// staging pass (and fp16's token tiles) cost more than the bf16 kernel's drains. H100, CUDA-graph medians
// (`python scripts/probe_w4a16.py --cuda-graph --dtype bfloat16 --plain-bf16 --variants 0:0`, docs/PERF.md,
// session 21), staged / bf16 path, us:
// - M = 128 (staging forced): slower on 4096 x 4096 (18.3 / 16.8), 4096 x 14336 (37.8 / 35.3) and 14336 x 4096
//   (41.0 / 36.9), faster on 8192 x 28672 (121.9 / 139.9) and 28672 x 8192 (123.8 / 131.5);
// - M = 256: faster on the five larger Llama shapes (14336 x 4096 59.6 / 65.0, 8192 x 28672 193.3 / 279.0),
//   slower on 4096 x 4096 (27.2 / 23.1) and 896 x 4864 (12.8 / 9.5);
// - M = 512: slower on 4096 x 4096 (37.4 / 35.3) and 1024 x 3072 (14.3 / 10.7), faster on 896 x 4864 (14.8 /
//   18.1) and the larger shapes; M = 2048: faster on all eight measured (4096 x 4096 110.8 / 140.7, 1024 x 3072
//   28.2 / 31.2). Small weights between 512 and 2048 tokens were not measured.
constexpr int64_t kStagedMinTokens = 256;
constexpr int64_t kStagedMinTokensSmall = 1024;
bool stages_bf16(int64_t M, int64_t N, int64_t K, bool fp16, bool scales_fit_fp16) {
  return !fp16 && scales_fit_fp16 && M >= (K * N > kSmallWeightCodes ? kStagedMinTokens : kStagedMinTokensSmall);
}

// Small weights (at most 2^24 codes) from 65 tokens (129 for those above 2^23 codes): the wgmma kernel's token tile
// and K splits come from a cost model, the tile and split with the least predicted time (modelled_wgmma_tiling).
// Fixed rules did not fit these shapes: their few 128-channel blocks leave SMs idle (a wave of 264 blocks holds
// only some token tiles), so the tile, the blocks per SM and the splits trade against each other, and a split
// costs its fp32 partials (splits x M x N x 4 bytes, written and read back) plus the last block's serial sum.
// H100, CUDA-graph medians (`python scripts/probe_w4a16.py --cuda-graph --variants ...`, the Qwen/SmolLM2 shapes
// and 4096 x 4096; docs/PERF.md, session 26), the rules before against the best measured tile and split, us, fp16:
// 576 x 1536 at M = 1024 13.4 (two splits) against 7.0 (none), 1536 x 576 at M = 2048 17.1 (three splits) against
// 13.1 (none), 3072 x 1024 at 2048 29.1 against 26.6, 896 x 4864 at M = 128 9.9 against 7.7, 4096 x 4096 at 256
// 24.8 against 21.7; bf16 (its own path, below 1024 tokens here): 896 x 4864 at 128 11.8 against 8.3, 1024 x 3072
// at 128 10.8 against 8.4, 1536 x 576 at 512 11.9 against 9.4. The model is a least-squares fit to 144 fp16
// timings of forced plans at 512, 1024 and 2048 tokens (eight tiles and splits at each of 18 points; median error
// 6%; scripts/fit_wgmma_plan.py on docs/results/h100_probe_w4a16_plans_3ad4a7c.txt). Fitted without the shape it
// picks for, it picked within 2% of the best on those 18 points in total (the rules before: 11% over; its worst,
// 3072 x 1024 at M = 512, 15.6 us against 13.3). Later sweeps: at 300-4096 tokens (30 points) the automatic plan
// was the best or within 3% of it; at 64-256 tokens (23 points, given the measured plans) the model picked the
// best but on 4096 x 4096 at M = 128 (16.1 us, 128-token tiles, against 15.4 with 64: hence from 129 tokens
// there) and 576 x 1536 at 64 and 128 (where the few-token kernel runs); bf16 at 128 and 512 tokens (not fitted
// to them; 8 points where the model plans), the best at 5, within 1.1% at 2, and on 3072 x 1024 at 512 15.6 us
// against 14.1 (the rule before: 15.7).
// Its terms (us, for one SM's busiest share of the grid; the launch's fixed ~3 us, the same for every candidate,
// left out; coefficients kModel* below):
//   compute: per k-tile of 64 tokens of a block's tile, alone on its SM or sharing it (for each of the SM's blocks),
//     by tile size; where one block fits an SM (bf16's path at 128 tokens) the blocks run one after another at
//     the alone rate; 256-token tiles (one block per SM) one coefficient;
//   split: per MB of partials, and per split and 64 tokens of the tile (the last block's sum).
bool uses_modelled_tiling(int64_t M, int64_t N, int64_t K) {
  return K * N <= kSmallWeightCodes && M > (K * N <= kTinyWeightCodes ? 64 : 128);
}

namespace {
constexpr int kModelMaxSplits = 4;  // the largest split measured for the model
// The model's coefficients (us), fitted by `python scripts/fit_wgmma_plan.py
// docs/results/h100_probe_w4a16_plans_3ad4a7c.txt` (tests/test_wgmma_plan_fit.py checks that they are its fit):
// per k-tile of 64 tokens of a block's tile, alone on its SM / sharing it, by tile; per MB of split partials; per
// split and 64 tokens of the tile (the last block's sum).
constexpr double kModelAlone64 = 0.378;
constexpr double kModelShared64 = 0.278;
constexpr double kModelAlone128 = 0.222;
constexpr double kModelShared128 = 0.195;
constexpr double kModelTile256 = 0.157;
constexpr double kModelPartialMB = 0.288;
constexpr double kModelSplitSum = 0.149;

double modelled_wgmma_us(int64_t M, int64_t N, int64_t K, int tokens, int splits, bool bf16_path, int sm_count) {
  const int64_t k_tiles = K / kBK;
  const int64_t tiles_per_split = (k_tiles + splits - 1) / splits;
  const int64_t used_splits = (k_tiles + tiles_per_split - 1) / tiles_per_split;  // no empty split
  const int64_t blocks = (N + kWgmmaChannels - 1) / kWgmmaChannels * ((M + tokens - 1) / tokens) * used_splits;
  const int64_t busiest = (blocks + sm_count - 1) / sm_count;  // blocks on the busiest SM
  const double work = static_cast<double>(tiles_per_split) * tokens / 64;  // a block's k-tiles of 64 tokens
  double us;
  if (tokens == 256) {
    us = kModelTile256 * work * busiest;
  } else if (busiest == 1 || wgmma_blocks_per_sm(bf16_path, tokens) == 1) {  // (one block on its SM at a time)
    us = (tokens == 64 ? kModelAlone64 : kModelAlone128) * work * busiest;
  } else {
    us = (tokens == 64 ? kModelShared64 : kModelShared128) * work * busiest;
  }
  if (used_splits > 1) {
    const double partial_mb = 2.0 * used_splits * M * N * 4 / 1e6;
    us += kModelPartialMB * partial_mb + kModelSplitSum * used_splits * tokens / 64;
  }
  return us;
}
}  // namespace

WgmmaTiling modelled_wgmma_tiling(int64_t M, int64_t N, int64_t K, int tokens, bool bf16_path, int sm_count,
                                  int64_t max_locks) {
  const int64_t k_tiles = K / kBK;
  WgmmaTiling best{0, 1};
  double best_us = 0;
  for (const int t : {64, 128, 256}) {
    if ((tokens != 0 && t != tokens) || (bf16_path && t == 256)) continue;  // (no 256-token tile for bf16's path)
    const int64_t tiles = (N + kWgmmaChannels - 1) / kWgmmaChannels * ((M + t - 1) / t);
    for (int splits = 1; splits <= kModelMaxSplits; ++splits) {
      if (splits > 1 && (k_tiles / splits < kMinTilesPerSplit || tiles > max_locks)) break;
      const double us = modelled_wgmma_us(M, N, K, t, splits, bf16_path, sm_count);
      if (best.tokens == 0 || us < best_us) {
        best = {t, splits};
        best_us = us;
      }
    }
  }
  return best;
}

std::vector<int64_t> modelled_wgmma_plan(int64_t M, int64_t N, int64_t K, int tokens, bool bf16_path, int sm_count) {
  const WgmmaTiling tiling =
      modelled_wgmma_tiling(M, N, K, tokens, bf16_path, sm_count, std::numeric_limits<int64_t>::max());
  return {tiling.tokens, tiling.splits};
}

int wgmma_tokens_per_tile(int64_t M, int64_t N, int64_t K, bool fp16, int sm_count) {
  // 64-token tiles up to 64 tokens; the cost model's tile for small weights from 65 or 129 tokens; in fp16 64 for
  // the others up to 128 (4096 x 4096: twice the blocks of 128-token tiles where blocks are few; H200, tile_m 3
  // against 4 and 5 with choose_splits' splits, 15.3-15.8 us against 20.8-22.8 at M = 65-128). Larger weights
  // keep the larger tiles (H200, 8192 x 8192 at M = 128: 46.5 us against 38.2). bf16 (not measured) keeps them.
  if (M <= 64) return 64;
  // (The model splits only while the tiles are fewer than about two per SM, else a split adds whole rounds of
  // blocks: far below the launcher's lock counters, so the tile does not depend on them.)
  if (uses_modelled_tiling(M, N, K)) {
    return modelled_wgmma_tiling(M, N, K, 0, !fp16, sm_count, std::numeric_limits<int64_t>::max()).tokens;
  }
  if (!fp16) return 128;
  if (M <= 128 && K * N <= kSmallWeightCodes) return 64;  // (4096 x 4096 at 65-128 tokens)
  return M <= 128 ? 128 : 256;
}

std::string automatic_kernel_name(int64_t M, int64_t N, int64_t K, bool wgmma_available, bool fp16, int sm_count,
                                  bool scales_fit_fp16) {
  const bool staged = stages_bf16(M, N, K, fp16, scales_fit_fp16);
  switch (automatic_kernel(M, N, K, wgmma_available)) {
    case Kernel::kSmallM:
      return "small_m";
    case Kernel::kWgmma:
      return "wgmma" + std::to_string(wgmma_tokens_per_tile(M, N, K, fp16 || staged, sm_count)) +
             (staged ? "_staged" : "");
    default:
      return "mma_sync";
  }
}

}  // namespace w4a16

namespace {

void check_float16(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16, kOp, ": ", name,
              " must be float16 or bfloat16, got ", t.scalar_type());
}

at::Tensor w4a16_gemm_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                           const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& bias,
                           const at::Tensor& locks, int64_t group_size, int64_t split_k, int64_t tile_m,
                           bool scales_fit_fp16) {
  // ---- checks (all host-side metadata: no sync) ----------------------------------------------
  check_cuda(x, kOp, "x");
  check_dim(x, 2, kOp, "x");
  check_float16(x, "x");
  check_contiguous(x, kOp, "x");
  check_cuda(qweight, kOp, "qweight");
  check_dim(qweight, 2, kOp, "qweight");
  TORCH_CHECK(qweight.scalar_type() == at::kInt, kOp, ": qweight must be int32 (the layout of "
              "quantkern.layout_cuda.prepare_w4a16), got ", qweight.scalar_type());
  check_contiguous(qweight, kOp, "qweight");
  check_cuda(scales, kOp, "scales");
  check_dim(scales, 2, kOp, "scales");
  check_contiguous(scales, kOp, "scales");
  TORCH_CHECK(scales.scalar_type() == x.scalar_type(), kOp, ": scales must have x's dtype ", x.scalar_type(),
              " (prepare the weight for that dtype), got ", scales.scalar_type());
  check_cuda(locks, kOp, "locks");
  TORCH_CHECK(locks.scalar_type() == at::kInt && locks.dim() == 1 && locks.is_contiguous(), kOp,
              ": locks must be a contiguous 1-D int32 tensor of zeros, got ", locks.scalar_type(), " ",
              locks.sizes());

  const int64_t M = x.size(0), K = x.size(1);
  const int64_t N = scales.size(1), G = scales.size(0);
  TORCH_CHECK(K % kBK == 0 && K > 0, kOp, ": in_features (K = x.size(1)) must be a positive multiple of 64, got ", K);
  TORCH_CHECK(N % 16 == 0 && N > 0, kOp, ": out_features (N = scales.size(1)) must be a positive multiple of 16, got ",
              N);
  TORCH_CHECK(qweight.size(0) == N / 16 && qweight.size(1) == 2 * K, kOp, ": qweight must have shape [N/16, 2K] = [",
              N / 16, ", ", 2 * K, "] for x with K = ", K, " and N = ", N, ", got ", qweight.sizes());
  const int64_t glen = group_size == -1 ? K : group_size;
  TORCH_CHECK(glen == 32 || glen == 64 || glen == 128 || glen == K, kOp,
              ": group_size must be 32, 64, 128 or -1 (per-channel), got ", group_size);
  TORCH_CHECK(K % glen == 0 && G == K / glen, kOp, ": scales must have shape [K/group_size, N] = [", K / glen,
              ", ", N, "], got ", scales.sizes());
  TORCH_CHECK(glen % 32 == 0, kOp, ": the group length must be a multiple of 32, got ", glen);
  if (zeros.has_value()) {
    const at::Tensor& z = *zeros;
    check_cuda(z, kOp, "zeros");
    check_contiguous(z, kOp, "zeros");
    TORCH_CHECK(z.scalar_type() == x.scalar_type(), kOp, ": zeros must have x's dtype ", x.scalar_type(),
                ", got ", z.scalar_type());
    TORCH_CHECK(z.sizes() == scales.sizes(), kOp, ": zeros must have the shape of scales ", scales.sizes(),
                ", got ", z.sizes());
  }
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    check_cuda(b, kOp, "bias");
    check_contiguous(b, kOp, "bias");
    TORCH_CHECK(b.scalar_type() == x.scalar_type(), kOp, ": bias must have x's dtype ", x.scalar_type(),
                ", got ", b.scalar_type());
    TORCH_CHECK(b.dim() == 1 && b.size(0) == N, kOp, ": bias must have shape [", N, "], got ", b.sizes());
  }
  for (const at::Tensor* t : {&qweight, &scales, &locks}) {
    TORCH_CHECK(t->device() == x.device(), kOp, ": all tensors must be on x's device ", x.device(), ", got ",
                t->device());
  }
  if (zeros.has_value()) TORCH_CHECK(zeros->device() == x.device(), kOp, ": zeros must be on ", x.device());
  if (bias.has_value()) TORCH_CHECK(bias->device() == x.device(), kOp, ": bias must be on ", x.device());
  TORCH_CHECK(tile_m == 0 || tile_m == 1 || tile_m == 2 || tile_m == 3 || tile_m == 4 || tile_m == 5 ||
                  tile_m == 16 || tile_m == 64 || tile_m == 128,
              kOp, ": tile_m must be 0 (automatic), 1 (the small-M kernel), 2 (the same with register stages "
              "only), 3, 4 or 5 (the wgmma kernel with 64, 128 or 256 tokens per tile), 16, 64 or 128 (the mma.sync "
              "kernel's tiles), got ",
              tile_m);
  TORCH_CHECK(split_k >= 0, kOp, ": split_k must be >= 0 (0 = automatic), got ", split_k);
  // K < 2^29: the small-M kernel steps x by two rows in a 32-bit byte offset (4 K bytes; csrc/w4a16_small_m.cu).
  TORCH_CHECK(K < (int64_t{1} << 29) && N <= std::numeric_limits<int32_t>::max() &&
                  M <= std::numeric_limits<int32_t>::max(),
              kOp, ": sizes too large (K below 2^29, M and N below 2^31), got M = ", M, ", N = ", N, ", K = ", K);

  const c10::cuda::CUDAGuard device_guard(x.device());
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0) return y;

  // 16-byte cp.async needs 16-byte aligned rows: K % 64 == 0 makes the row stride a multiple of
  // 128 B, so only the base pointers matter. A misaligned (sliced) x is copied; the others come
  // from prepare_w4a16 whole.
  at::Tensor xa = is_aligned(x.const_data_ptr(), 16) ? x : x.clone();
  TORCH_CHECK(is_aligned(qweight.const_data_ptr(), 16) && is_aligned(scales.const_data_ptr(), 16) &&
                  (!zeros.has_value() || is_aligned(zeros->const_data_ptr(), 16)) &&
                  (!bias.has_value() || is_aligned(bias->const_data_ptr(), 4)),
              kOp, ": qweight, scales and zeros must be 16-byte aligned (bias 4-byte): pass whole tensors, not views");

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
  const int k_tiles = static_cast<int>(K / kBK);

  const bool on_hopper = hopper::wgmma_available(x.get_device());
  const Kernel automatic = automatic_kernel(M, N, K, on_hopper);

  // ---- few tokens: the small-M kernel (csrc/w4a16_small_m.cu) ----------------------------------
  if (tile_m == 1 || tile_m == 2 || (tile_m == 0 && automatic == Kernel::kSmallM)) {
    const int64_t token_tiles = (M + kSmallMTokens - 1) / kSmallMTokens;
    TORCH_CHECK(token_tiles <= 65535, kOp, ": M = ", M, " is too large for the small-M kernel");
    const int64_t chunks = (k_tiles + 1) / 2;
    // (A forced split count runs 32-channel blocks: warp pairs are planned for no split.)
    const SmallMConfig config =
        small_m_config(M, N, K, glen, zeros.has_value(), num_sms(x.get_device()), smem_per_block(x.get_device()),
                       locks.numel(), /*allow_paired=*/split_k == 0);
    const int64_t channels_per_block = small_m_block_channels(config.paired);
    const int64_t tiles = (N + channels_per_block - 1) / channels_per_block * token_tiles;
    int splits = config.splits;
    if (split_k > 0) {
      splits = static_cast<int>(std::min<int64_t>(split_k, chunks));
      TORCH_CHECK(splits == 1 || tiles <= locks.numel(), kOp, ": split_k > 1 needs one lock per output tile (",
                  tiles, "), locks has ", locks.numel());
    }
    const int chunks_per_split = static_cast<int>((chunks + splits - 1) / splits);
    splits = static_cast<int>((chunks + chunks_per_split - 1) / chunks_per_split);  // no empty split
    at::Tensor partials;
    if (splits > 1) partials = at::empty({splits, M, N}, x.options().dtype(at::kFloat));
    SmallMParams sp;
    sp.x = xa.const_data_ptr();
    sp.qweight = static_cast<const uint4*>(qweight.const_data_ptr());
    sp.scales = scales.const_data_ptr();
    sp.zeros = zeros.has_value() ? zeros->const_data_ptr() : nullptr;
    sp.bias = bias.has_value() ? bias->const_data_ptr() : nullptr;
    sp.y = y.data_ptr();
    sp.partials = splits > 1 ? partials.data_ptr<float>() : nullptr;
    sp.locks = locks.data_ptr<int>();
    sp.M = static_cast<int>(M);
    sp.N = static_cast<int>(N);
    sp.K = static_cast<int>(K);
    sp.group_len = static_cast<int>(glen);
    sp.k_tiles = k_tiles;
    sp.chunks_per_split = chunks_per_split;
    sp.splits = splits;
    sp.warps = config.warps;
    sp.weight_ring = config.weight_ring && tile_m != 2;
    sp.paired = config.paired;
    sp.programmatic = follows_trigger_kernel(stream, x.get_device());
    launch_small_m(x.scalar_type() == at::kBFloat16, sp, stream);
    record_trigger_kernel(stream);  // (the small-M kernel calls allow_dependent_launch)
    return y;
  }

  // ---- Hopper: the wgmma kernel (csrc/w4a16_wgmma.cu) ------------------------------------------
  const bool force_wgmma = tile_m == 3 || tile_m == 4 || tile_m == 5;
  TORCH_CHECK(on_hopper || !force_wgmma, kOp, ": tile_m 3, 4 and 5 (the wgmma kernel) need an sm_90 GPU and an "
              "extension built for it (TORCH_CUDA_ARCH_LIST with 9.0a)");
  TORCH_CHECK(tile_m != 5 || x.scalar_type() == at::kHalf || stages_bf16(M, N, K, false, scales_fit_fp16), kOp,
              ": tile_m 5 (256-token tiles) is for float16 x, or bfloat16 x staged as float16 (scales_fit_fp16 and at "
              "least ", kStagedMinTokens, " tokens, ", kStagedMinTokensSmall, " for weights of at most 2^24 codes)");
  if (force_wgmma || (tile_m == 0 && automatic == Kernel::kWgmma)) {
    // Tokens per tile: forced, or wgmma_tokens_per_tile (small weights above 64 or 128 tokens: the cost model's
    // tile; else 64 up to 64 tokens and in fp16 for small weights up to 128, else the smallest tile that holds M
    // up to 128, then 256 in fp16 and bf16 staged as fp16: bf16's second accumulator set does not fit beside
    // 256-token accumulators). Splits: forced, else the cost model's where it applies (to a forced tile too), else
    // choose_splits.
    const bool bf16 = x.scalar_type() == at::kBFloat16;
    const bool staged = stages_bf16(M, N, K, !bf16, scales_fit_fp16);
    const int tokens = tile_m == 3   ? 64
                       : tile_m == 4 ? 128
                       : tile_m == 5 ? 256
                                     : wgmma_tokens_per_tile(M, N, K, !bf16 || staged, num_sms(x.get_device()));
    const int64_t m_tiles = (M + tokens - 1) / tokens;
    const int64_t tiles = m_tiles * ((N + kWgmmaChannels - 1) / kWgmmaChannels);
    TORCH_CHECK(m_tiles <= 65535, kOp, ": M = ", M, " is too large (at most ", 65535 * tokens, " rows per call)");
    // (Resident blocks per SM as in csrc/w4a16_wgmma.cu; H100, M = 64: 8 splits of 4096 x 4096 and
    // 14336 x 4096 1.25x / 1.68x of cuBLAS, 4 splits 1.20x / 1.42x.)
    const int splits =
        split_k == 0 && uses_modelled_tiling(M, N, K)
            ? modelled_wgmma_tiling(M, N, K, tokens, bf16 && !staged, num_sms(x.get_device()), locks.numel()).splits
            : choose_splits(tiles, k_tiles, wgmma_blocks_per_sm(bf16 && !staged, tokens), split_k, locks.numel(),
                            x.get_device());
    WgmmaParams wp;
    wp.x = xa.const_data_ptr();
    wp.qweight = static_cast<const uint4*>(qweight.const_data_ptr());
    wp.scales = scales.const_data_ptr();
    wp.zeros = zeros.has_value() ? zeros->const_data_ptr() : nullptr;
    wp.bias = bias.has_value() ? bias->const_data_ptr() : nullptr;
    wp.y = y.data_ptr();
    wp.locks = locks.data_ptr<int>();
    wp.M = static_cast<int>(M);
    wp.N = static_cast<int>(N);
    wp.K = static_cast<int>(K);
    wp.group_len = static_cast<int>(glen);
    wp.k_tiles = k_tiles;
    wp.tiles_per_split = (k_tiles + splits - 1) / splits;
    wp.splits = (k_tiles + wp.tiles_per_split - 1) / wp.tiles_per_split;  // no empty split
    at::Tensor partials;
    if (wp.splits > 1) partials = at::empty({wgmma_workspace_floats(wp, tokens)}, x.options().dtype(at::kFloat));
    wp.partials = wp.splits > 1 ? partials.data_ptr<float>() : nullptr;
    wp.row_scale = nullptr;
    at::Tensor x16, row_scale;
    if (staged) {  // bf16 rows as exact fp16 rows (csrc/w4a16_wgmma.cu, "bf16 activations staged as fp16")
      x16 = at::empty({M, K}, x.options().dtype(at::kHalf));
      row_scale = at::empty({M}, x.options().dtype(at::kFloat));
      stage_bf16_rows(xa.const_data_ptr(), x16.data_ptr(), row_scale.data_ptr<float>(), static_cast<int>(M),
                      static_cast<int>(K), stream);
      wp.x = x16.const_data_ptr();
      wp.row_scale = row_scale.const_data_ptr<float>();
    }
    launch_wgmma(bf16, tokens, wp, stream, staged);
    return y;
  }

  // ---- configuration ---------------------------------------------------------------------------
  const int bm = tile_m != 0 ? static_cast<int>(tile_m) : (M <= 16 ? 16 : M <= 64 ? 64 : 128);
  const int bn = 128;
  const int blocks_per_sm = bm == 16 ? 4 : bm == 64 ? 2 : 1;
  const int64_t m_tiles = (M + bm - 1) / bm;
  const int64_t n_tiles = (N + bn - 1) / bn;
  TORCH_CHECK(m_tiles <= 65535, kOp, ": M = ", M, " is too large (at most ", 65535 * bm, " rows per call)");
  const int64_t tiles = m_tiles * n_tiles;
  int splits = choose_splits(tiles, k_tiles, blocks_per_sm, split_k, locks.numel(), x.get_device());
  const int tiles_per_split = (k_tiles + splits - 1) / splits;
  splits = (k_tiles + tiles_per_split - 1) / tiles_per_split;  // no empty split

  at::Tensor partials;
  if (splits > 1) partials = at::empty({splits, M, N}, x.options().dtype(at::kFloat));

  Params p;
  p.x = xa.const_data_ptr();
  p.qweight = static_cast<const uint4*>(qweight.const_data_ptr());
  p.scales = scales.const_data_ptr();
  p.zeros = zeros.has_value() ? zeros->const_data_ptr() : nullptr;
  p.bias = bias.has_value() ? bias->const_data_ptr() : nullptr;
  p.y = y.data_ptr();
  p.partials = splits > 1 ? partials.data_ptr<float>() : nullptr;
  p.locks = locks.data_ptr<int>();
  p.M = static_cast<int>(M);
  p.N = static_cast<int>(N);
  p.K = static_cast<int>(K);
  p.group_len = static_cast<int>(glen);
  p.k_tiles = k_tiles;
  p.tiles_per_split = tiles_per_split;
  p.splits = splits;

  const dim3 grid(static_cast<unsigned>(n_tiles), static_cast<unsigned>(m_tiles), static_cast<unsigned>(splits));
  if (x.scalar_type() == at::kHalf) {
    launch_config<__half>(bm, p, grid, stream);
  } else {
    launch_config<__nv_bfloat16>(bm, p, grid, stream);
  }
  return y;
}

}  // namespace
}  // namespace quantkern

TORCH_LIBRARY_IMPL(quantkern, CUDA, m) {
  m.impl("w4a16_gemm", &quantkern::w4a16_gemm_cuda);
}
