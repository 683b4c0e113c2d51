// Fused dense per-block rotation + per-token quantization (quantkern::block_rotate_quantize): x [M, K] fp16/bf16,
// every block of b consecutive entries of a row times R^T (R [b, b] fp32, the same for every block: e.g. a PCA
// rotation of head_dim shared by the heads), the result rounded to x's dtype, then quantize_per_token's codes and
// scales (csrc/per_token_quant.cuh's formula), in one pass over memory: x read once, codes and scales written once.
// b = 64 or 128 (head_dim); one R per block ([K / b, b, b]), other b and fp32 rows take the Triton kernel
// (triton_kernels/block_rotation.py), which ops.block_rotate_quantize chooses (block_rotation_fits); its automatic
// choice also takes Triton for rows wider than 14336 (ops.CUDA_BLOCK_ROTATION_AUTO_MAX_K).
// Speed (H100, docs/PERF.md sessions 35-37, fp16, one shared R, CUDA graphs): K = 4096 at 2,048 / 8,192 rows 28.5 /
// 110.9 us, K = 8192 57.9 / 224.3 (clusters of 2: 1.37-1.39x the one-CTA tiles); at 1-16 rows 5.8-5.9 us at 4096,
// 6.9-7.0 at 8192, 8.7-8.8 at 14336 (clusters of 16). Against cuBLAS + the quantizer still 0.75-0.87x at 4096 and
// 8192 from 2,048 rows, 0.78-1.01x at 576, 0.73-0.85x at 1-16 rows of 4096-14336. Latency-bound: two CTAs an SM at
// b = 128 (ncu at K = 4096: 0.93 eligible warps per scheduler, issue slots 53% busy).
//
// Why not cuBLAS + the quantizer: the rotated rows make a round trip through memory, and the GEMM of [M K / b, b]
// by [b, b] is far from cuBLAS's shapes; the Triton kernel reads x twice and does the math twice (its absmax pass).
//
// Tiling: a CTA is 8 warps on TOKENS (4 or 8) token rows and the whole of K (a row's absmax needs all of it). Its
//   rows live in shared memory for the whole CTA: x arrives there, is rotated in place and quantized from there.
//   Warp w owns 16 outputs of a block (rows 16 (w % (b / 16)) .. + 15 of R) and keeps their R in registers for the
//   whole CTA; the b / 16 warps of a block's outputs take the CTA's blocks one by one (b = 64: two blocks at a
//   time, the last step of an odd number of blocks one). On sm_90 a cluster of S <= 8 CTAs shares each tile
//   (splits_for) where the tiles leave SMs idle (few rows; S <= 16 for one or two tiles, a non-portable cluster size
//   where the device runs it: max_splits), and where a whole-row tile would hold fewer CTAs an SM
//   than the registers allow (K = 8192: S = 2, two CTAs an SM instead of one; 14336: S = 4): CTA r takes steps r,
//   r + S, ..., holds only their columns, and the CTAs exchange their per-token maxima through distributed shared
//   memory.
// Math: mma.m16n8k16 with R's rows as A (16 outputs) and the tokens as B (8 of them: TOKENS real, the rest zeros):
//   D[n][token] = sum_k R[n][k] x[token][k]. Which k sits in which mma slot does not matter to a dot product as long
//   as A and B agree: lane (g, t) takes k = 32c + 8t + 0..3 in k-step 0 of chunk c and + 4..7 in step 1, so its B
//   operands are one 16-byte load of its token row g per chunk, and its A operands two 16-byte loads of each of
//   R's rows 16o + g and 16o + g + 8. R is split as R = R_hi + R_lo, both in x's dtype (about 22 significant bits
//   for fp16, 16 for bf16), two mmas with exact products and fp32 sums (as the Triton kernel): the sums' error
//   stays far below the rounding of the result to x's dtype. R_hi's and R_lo's products go to separate
//   accumulators (two independent chains), summed before the rounding.
// Results: lane (g, t) holds outputs 16o + g (+ 8) of tokens 2t, 2t + 1; one exchange with lane g ^ 1 gives each
//   lane two adjacent outputs of one token (even g: token 2t, odd g: token 2t + 1), rounded to x's dtype as a pair,
//   its |max| kept per token (NaN-propagating), and stored as one 32-bit word over the block's x.
// Shared memory: only the tile, TOKENS rows of the CTA's columns (K, or its steps' share of K in a cluster), each row
//   shifted within its 128-byte pitch so that the step's loads and stores hit distinct banks (row_pitch_bytes,
//   row_shift_bytes). TOKENS is 4 for M <= 4, else 8, halved while the tile does not fit (block_rotation_fits says
//   whether 4 of whole rows do). Two CTAs an SM at b = 128 (<= 128 registers), three at b = 64.
// Pipeline: the copies of the CTA's first kStepsAhead (16) steps are issued at the start, one commit group per step,
//   and each step issues those of the step 16 ahead (empty groups past the last step), so "step s has landed" is
//   always the same cp.async.wait_group; R is loaded and split while the first copies are in flight. (The first
//   version issued every step's copies at once; its waits could name only a bounded count of groups, so at K = 4096
//   its first step waited for 25 of the 32 steps.) Per step: 16 mmas per 32 k (b = 128: 4 chunks) on operands
//   already in registers; the pairs rounded and their maxima kept; the wait for step s + 1's copies and one barrier
//   (every warp has read step s, which the results now overwrite, and step s + 1 is visible to all); the pairs
//   stored, and step s + 1's operands read. (The first version waited and read before its mmas, with a second
//   barrier.) Then the maxima over the warps and the cluster's CTAs give the scales, and warp w quantizes row w
//   from shared memory with quantize_store_vec (4- or 8-byte code stores, consecutive lanes on consecutive bytes),
//   multiplying by the inverse scale and dividing only near a rounding boundary: the same codes as quantize_code's
//   division (csrc/per_token_quant.cuh), which would cost 6-15% more time.
// NaN and inf: a row holding NaN rotates to NaN: NaN scale, codes 0 (as the reference). A row holding +-inf
//   gives inf * R_lo = NaN where R is exact in x's dtype (R_lo = 0), so such rows get a NaN scale where the
//   reference's is inf; the codes are 0 either way (the Triton kernel behaves the same).
//
// Compiled without --use_fast_math. Below sm_80 (no bf16 mma) the kernel body is empty and the host refuses.

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <type_traits>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cooperative_groups.h>

#include "common.cuh"
#include "hopper.cuh"  // wgmma_available: an sm_90 GPU with this build's sm_90a code (clusters)
#include "per_token_quant.cuh"
#include "w4a16_common.cuh"  // W4Traits (the mma and the fp32 <-> pair conversions), cp.async, smem_addr

namespace quantkern {
namespace block_rotation {
namespace {

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define QK_BLOCK_ROTATION_BODY 0
#else
#define QK_BLOCK_ROTATION_BODY 1
#endif
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define QK_BLOCK_ROTATION_CLUSTER 1
#else
#define QK_BLOCK_ROTATION_CLUSTER 0
#endif

namespace cg = cooperative_groups;

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * kWarpSize;
constexpr int kMaxTokens = 8;    // the mma's 8 B columns
constexpr int kMaxPortableSplits = 8;  // CTAs of a cluster: the portable cluster size,
constexpr int kMaxSplits = 16;         // or the non-portable one at decode where the device runs it (max_splits)
constexpr int kMaxTilesForWideClusters = 2;  // token tiles (M <= 16 rows) that may take more than 8 CTAs (splits_for)
constexpr int kStepColumns = 128;  // columns a CTA step covers: one block of 128, or two of 64
constexpr int kStepsAhead = 16;    // steps whose copies are in flight ahead of the one rotated (32 KiB at 8 rows)
// CTAs an SM that the registers allow (the kernel's __launch_bounds__: <= 128 registers at b = 128, <= 80 at 64).
constexpr int ctas_by_registers(int b) { return b == 64 ? 3 : 2; }
// Token rows a CTA starts from for M rows: 4 for M <= 4 (decode), else the mma's 8.
constexpr int initial_tokens(int64_t M) { return M <= 4 ? 4 : kMaxTokens; }

// The tile's rows: row r starts at r * row_pitch_bytes(K) + row_shift_bytes(r), the pitch a multiple of 128 bytes
// with room for the shifts. The shifts (16 bytes times 0, 4, 1, 5, 2, 6, 3, 7) keep both of the step's shared-memory
// patterns free of bank conflicts: the B-operand loads (lanes 8q .. 8q + 7 read 16 bytes t = 0..3 of rows 2q and
// 2q + 1: rows 64 bytes apart modulo 128) and the pair stores (8 rows, the same 16 bytes of each: rows at 8 distinct
// 16-byte positions modulo 128). (Rows K + 8 elements apart served the stores only: each load took two wavefronts
// a quarter warp; ncu counted 47% of the first versions' shared wavefronts as excess.)
__host__ __device__ constexpr int64_t row_pitch_bytes(int64_t K) { return (2 * K + 127) / 128 * 128 + 128; }
__device__ __forceinline__ int row_shift_bytes(int r) { return 16 * ((r >> 1) + 4 * (r & 1)); }
// Columns a CTA's tile holds when `splits` CTAs deal a row's steps out: the most steps one CTA takes.
__host__ __device__ constexpr int64_t held_columns(int64_t K, int64_t splits) {
  return ((K + kStepColumns - 1) / kStepColumns + splits - 1) / splits * kStepColumns;
}
int64_t tile_bytes(int64_t tokens, int64_t K, int64_t splits) {
  return tokens * row_pitch_bytes(held_columns(K, splits));
}

struct Params {
  const void* x;
  const float* rotation;  // [b, b] fp32
  uint8_t* q;
  float* scales;
  int64_t rows;
  int K;
  float clip;
  int bits;
  int splits;  // CTAs of a cluster that share each tile's rows, dealing its steps out (1: no cluster)
};

#if QK_BLOCK_ROTATION_BODY
using w4a16::cp_async16;
using w4a16::cp_async_commit;
using w4a16::cp_async_wait;
using w4a16::smem_addr;

__device__ __forceinline__ void st_shared_u32(uint32_t addr, uint32_t v) {
  asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(addr), "r"(v));
}

// R_hi and R_lo pairs of 8 consecutive fp32 values: hi[i] / lo[i] hold values 2i, 2i + 1.
template <typename T>
__device__ __forceinline__ void split_pairs(const float (&v)[8], uint32_t (&hi)[4], uint32_t (&lo)[4]) {
  using Traits = w4a16::W4Traits<T>;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    hi[i] = Traits::from_floats(v[2 * i], v[2 * i + 1]);
    const float2 h = Traits::to_float2(hi[i]);
    lo[i] = Traits::from_floats(v[2 * i] - h.x, v[2 * i + 1] - h.y);
  }
}
#endif

template <typename T, int TOKENS, int B>
__global__ void __launch_bounds__(kThreads, ctas_by_registers(B)) block_rotate_quantize_kernel(const Params p) {
#if QK_BLOCK_ROTATION_BODY
  using Traits = w4a16::W4Traits<T>;
  constexpr int kChunks = B / 32;                // chunks of 32 k per block
  constexpr int kOutputTiles = B / 16;           // warps on one block's outputs
  constexpr int kBlocksPerStep = kWarps / kOutputTiles;  // 1 (b = 128) or 2 (b = 64)
  static_assert(kBlocksPerStep * B == kStepColumns, "a step covers kStepColumns columns");
  extern __shared__ __align__(16) uint8_t smem[];
  __shared__ float warp_amax[kWarps][kMaxTokens];
  __shared__ float cta_amax[kMaxTokens];
  __shared__ float row_scale[kMaxTokens];

  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize, g = lane / 4, t = lane % 4;
  const int K = p.K, step_count = (K + kStepColumns - 1) / kStepColumns;
  const int rank = static_cast<int>(blockIdx.x % p.splits);  // this CTA's place in its cluster
  const int64_t row0 = static_cast<int64_t>(blockIdx.x / p.splits) * TOKENS;
  const T* x = static_cast<const T*>(p.x);
  // The CTA's steps: rank, rank + splits, ...; its tile holds only their columns, step s at columns s * 128 ...
  const int steps = (step_count - rank + p.splits - 1) / p.splits;
  const uint32_t tile = smem_addr(smem);  // TOKENS rows (row_pitch_bytes, row_shift_bytes)
  const int pitch_bytes = static_cast<int>(row_pitch_bytes(held_columns(K, p.splits)));
  auto element = [&](int r, int held_column) {  // the shared address of row r's held column
    return tile + static_cast<uint32_t>(r * pitch_bytes + row_shift_bytes(r) + held_column * 2);
  };
  // This warp's outputs and block within a step.
  const int out0 = 16 * (warp % kOutputTiles), block_in_step = warp / kOutputTiles;

  // 1. The copies of the CTA's first kStepsAhead steps (rows past M arrive as zeros): one commit group per step,
  //    also for steps past the last (empty), so that "step s has landed" is always the same wait.
  constexpr int kUnitsPerRow = kStepColumns / 8;
  static_assert(TOKENS * kUnitsPerRow <= kThreads, "at most one 16-byte piece a thread and step");
  // This thread's piece of every step: row copy_row, 8 columns from copy_column0 plus the step's offset (held across
  // the steps: recomputing row, column and source every step cost registers and about 1.2x the time at K >= 4096).
  const int copy_row = threadIdx.x / kUnitsPerRow, copy_offset = 8 * (threadIdx.x % kUnitsPerRow);
  const int copy_column0 = rank * kStepColumns + copy_offset;
  const bool copies = threadIdx.x < TOKENS * kUnitsPerRow, copy_valid = row0 + copy_row < p.rows;
  const T* copy_row_src = x + (copy_valid ? (row0 + copy_row) * K : 0);
  auto issue_step = [&](int s) {
    const int column = copy_column0 + s * p.splits * kStepColumns;
    // (b = 64 with an odd number of blocks: the last step has one)
    if (copies && s < steps && column < K) {
      cp_async16(element(copy_row, s * kStepColumns + copy_offset), copy_row_src + (copy_valid ? column : 0),
                 copy_valid);
    }
    cp_async_commit();
  };
#pragma unroll 1
  for (int s = 0; s < kStepsAhead; ++s) issue_step(s);

  // 2. This warp's rows of R (16 outputs) as mma A operands, split into R_hi + R_lo, while x is in flight:
  //    a[c][s][0..3] = R_hi, a[c][s][4..7] = R_lo for chunk c, k-step s (rows g, g + 8; k 32c + 8t + 4s + 0..3).
  uint32_t a[kChunks][2][8];
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    uint32_t hi_g[4], lo_g[4], hi_g8[4], lo_g8[4];
    float v[8];
    const float4* row_g = reinterpret_cast<const float4*>(p.rotation + (out0 + g) * B + 32 * c + 8 * t);
    const float4* row_g8 = reinterpret_cast<const float4*>(p.rotation + (out0 + g + 8) * B + 32 * c + 8 * t);
    float4 u0 = __ldg(row_g), u1 = __ldg(row_g + 1);
    v[0] = u0.x; v[1] = u0.y; v[2] = u0.z; v[3] = u0.w; v[4] = u1.x; v[5] = u1.y; v[6] = u1.z; v[7] = u1.w;
    split_pairs<T>(v, hi_g, lo_g);
    u0 = __ldg(row_g8), u1 = __ldg(row_g8 + 1);
    v[0] = u0.x; v[1] = u0.y; v[2] = u0.z; v[3] = u0.w; v[4] = u1.x; v[5] = u1.y; v[6] = u1.z; v[7] = u1.w;
    split_pairs<T>(v, hi_g8, lo_g8);
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      // a0 = row g, k pair 0 of the step; a1 = row g + 8, pair 0; a2 = row g, pair 1; a3 = row g + 8, pair 1.
      a[c][s][0] = hi_g[2 * s], a[c][s][1] = hi_g8[2 * s], a[c][s][2] = hi_g[2 * s + 1], a[c][s][3] = hi_g8[2 * s + 1];
      a[c][s][4] = lo_g[2 * s], a[c][s][5] = lo_g8[2 * s], a[c][s][6] = lo_g[2 * s + 1], a[c][s][7] = lo_g8[2 * s + 1];
    }
  }

  // 3. Step by step: every warp rotates its 16 outputs of its block for all TOKENS rows. One barrier a step: it
  //    follows every warp's reads of step s (so step s's results may overwrite them) and every thread's wait for
  //    step s + 1's copies (so they may be read); the mmas of step s run before it, on operands in registers.
  auto step_column = [&](int s) { return (rank + s * p.splits) * kStepColumns + block_in_step * B; };
  uint4 xb[kChunks];
  auto read_operands = [&](int s) {
    const bool active = step_column(s) < K;
    const int held0 = s * kStepColumns + block_in_step * B;
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      xb[c] = active && g < TOKENS ? ld_shared_v4(element(g, held0 + 32 * c + 8 * t)) : make_uint4(0, 0, 0, 0);
    }
  };
  cp_async_wait<kStepsAhead - 1>();  // this thread's copies of step 0
  __syncthreads();                    // everyone's
  read_operands(0);
  issue_step(kStepsAhead);
  float amax = 0.0f;  // token 2t + (g & 1)
  for (int s = 0; s < steps; ++s) {
    float hi[4] = {0.0f, 0.0f, 0.0f, 0.0f}, lo[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      const uint32_t (&a0_hi)[4] = *reinterpret_cast<const uint32_t(*)[4]>(&a[c][0][0]);
      const uint32_t (&a0_lo)[4] = *reinterpret_cast<const uint32_t(*)[4]>(&a[c][0][4]);
      const uint32_t (&a1_hi)[4] = *reinterpret_cast<const uint32_t(*)[4]>(&a[c][1][0]);
      const uint32_t (&a1_lo)[4] = *reinterpret_cast<const uint32_t(*)[4]>(&a[c][1][4]);
      Traits::template mma<false>(hi, a0_hi, xb[c].x, xb[c].y);  // k 32c + 8t + 0..3
      Traits::template mma<false>(lo, a0_lo, xb[c].x, xb[c].y);
      Traits::template mma<false>(hi, a1_hi, xb[c].z, xb[c].w);  // k 32c + 8t + 4..7
      Traits::template mma<false>(lo, a1_lo, xb[c].z, xb[c].w);
    }
    // [0], [1]: output out0 + g, tokens 2t, 2t + 1; [2], [3]: output out0 + g + 8. With lane g ^ 1's values, even g
    // keeps token 2t of outputs g, g + 1 (and + 8), odd g token 2t + 1 of outputs g - 1, g (and + 8).
    const float y[4] = {hi[0] + lo[0], hi[1] + lo[1], hi[2] + lo[2], hi[3] + lo[3]};
    float other[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) other[i] = __shfl_xor_sync(0xffffffffu, y[i], 4);
    const bool odd = g & 1;
    const uint32_t pair = odd ? Traits::from_floats(other[1], y[1]) : Traits::from_floats(y[0], other[0]);
    const uint32_t pair8 = odd ? Traits::from_floats(other[3], y[3]) : Traits::from_floats(y[2], other[2]);
    const float2 f = Traits::to_float2(pair), f8 = Traits::to_float2(pair8);
    amax = max_propagate_nan(amax, max_propagate_nan(max_propagate_nan(fabsf(f.x), fabsf(f.y)),
                                                     max_propagate_nan(fabsf(f8.x), fabsf(f8.y))));
    cp_async_wait<kStepsAhead - 1>();  // this thread's copies of step s + 1
    __syncthreads();
    const int token = 2 * t + (odd ? 1 : 0), column = s * kStepColumns + block_in_step * B + out0 + (g & ~1);
    if (step_column(s) < K && token < TOKENS) {
      st_shared_u32(element(token, column), pair);
      st_shared_u32(element(token, column + 8), pair8);
    }
    if (s + 1 < steps) read_operands(s + 1);
    issue_step(s + 1 + kStepsAhead);
  }

  // 4. Per-token maxima: lanes of the same t and g parity hold one token's; then over the warps, then over the
  //    cluster's CTAs (distributed shared memory), and the scales.
#pragma unroll
  for (int offset = 8; offset < kWarpSize; offset <<= 1) {
    amax = max_propagate_nan(amax, __shfl_xor_sync(0xffffffffu, amax, offset));
  }
  if (lane < 8) warp_amax[warp][2 * t + (g & 1)] = amax;  // lanes 0..7: g = 0, 1
  __syncthreads();
  if (threadIdx.x < TOKENS) {
    float m = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) m = max_propagate_nan(m, warp_amax[w][threadIdx.x]);
    cta_amax[threadIdx.x] = m;
  }
  const int qmax = p.bits == 4 ? kQmaxOf<4> : kQmaxOf<8>;
#if QK_BLOCK_ROTATION_CLUSTER
  const cg::cluster_group cluster = cg::this_cluster();  // launched without clusters: the CTA itself
  cluster.sync();  // every CTA's maxima are stored and visible across the cluster
  if (threadIdx.x < TOKENS) {
    // Every CTA's maximum read at once (a loop over p.splits read them one round trip after another).
    float remote[kMaxSplits];
#pragma unroll
    for (int r = 0; r < kMaxSplits; ++r) {
      remote[r] = r < p.splits ? *cluster.map_shared_rank(&cta_amax[threadIdx.x], r) : 0.0f;
    }
    float m = 0.0f;
#pragma unroll
    for (int r = 0; r < kMaxSplits; ++r) m = max_propagate_nan(m, remote[r]);
    row_scale[threadIdx.x] = per_token_scale(m, p.clip, static_cast<float>(qmax));
  }
  cluster.sync();  // no CTA leaves while another may still read its maxima; row_scale is visible to the CTA
#else
  __syncthreads();
  if (threadIdx.x < TOKENS) {
    row_scale[threadIdx.x] = per_token_scale(cta_amax[threadIdx.x], p.clip, static_cast<float>(qmax));
  }
  __syncthreads();
#endif
  if (rank == 0 && threadIdx.x < TOKENS && row0 + threadIdx.x < p.rows) {
    p.scales[row0 + threadIdx.x] = row_scale[threadIdx.x];
  }

  // 5. Codes: warp w quantizes row w's columns of this CTA's steps, a 16-byte vector (8 values) a lane at a time,
  //    packed and stored as csrc/activation_quant.cu does (quantize_store_vec: 4- or 8-byte stores, consecutive
  //    lanes on consecutive bytes).
  constexpr int kVecsPerStep = kStepColumns / 8;
  auto store_codes = [&](auto bits_constant) {
    constexpr int kBits = decltype(bits_constant)::value;
    for (int r = warp; r < TOKENS && row0 + r < p.rows; r += kWarps) {
      const float scale = row_scale[r], inverse = usable_inverse(scale);
      uint8_t* qrow = p.q + (row0 + r) * (K * kBits / 8);
      for (int i = lane; i < steps * kVecsPerStep; i += kWarpSize) {
        const int column = (rank + (i / kVecsPerStep) * p.splits) * kStepColumns + 8 * (i % kVecsPerStep);
        if (column >= K) continue;
        Vec16<T> v;
        *reinterpret_cast<uint4*>(&v) = ld_shared_v4(element(r, 8 * i));
        quantize_store_vec<T, kBits, kBits>(v, scale, qrow, column / Vec16<T>::kElems, inverse);
      }
    }
  };
  if (p.bits == 4) {
    store_codes(std::integral_constant<int, 4>{});
  } else {
    store_codes(std::integral_constant<int, 8>{});
  }
#endif
}

bool block_size_supported(int64_t b) { return b == 64 || b == 128; }

constexpr int64_t kStaticSmemBytes = (kWarps + 2) * kMaxTokens * sizeof(float);  // warp_amax, cta_amax, row_scale

// Token rows per CTA for M rows of K dealt over `splits` CTAs, on a device with `smem_optin` bytes of shared memory
// per block: 4 for M <= 4, else 8, halved while the tile does not fit; 0 when 4 do not.
int tokens_per_cta(int64_t M, int64_t K, int64_t splits, int64_t smem_optin) {
  int tokens = initial_tokens(M);
  while (tokens >= 4 && tile_bytes(tokens, K, splits) > smem_optin - kStaticSmemBytes) tokens /= 2;
  return tokens >= 4 ? tokens : 0;
}

int64_t smem_optin(int device) { return device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>(device); }

// CTAs an SM holds by shared memory alone, for a tile of `tile` bytes.
int64_t ctas_by_smem(int64_t tile, int device) {
  const int64_t per_cta = tile + kStaticSmemBytes + device_attribute<cudaDevAttrReservedSharedMemoryPerBlock>(device);
  return device_attribute<cudaDevAttrMaxSharedMemoryPerMultiprocessor>(device) / per_cta;
}

// The largest cluster the kernel may take on `device` (sm_90): kMaxSplits CTAs where the device schedules such a
// cluster (non-portable: the H100 does), else kMaxPortableSplits. Asked once per device, of a b = 128 instance: its
// registers allow the fewest CTAs an SM (2), which binds; the tiles of such decode clusters (at most 8 rows of 7
// steps: about 15 KiB at K = 14336) do not.
int max_splits(int device) {
  static int cached[64] = {0};
  if (device < 0 || device >= 64) device = 0;
  if (cached[device] == 0) {
    auto kernel = block_rotate_quantize_kernel<__half, 4, 128>;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
    cudaLaunchConfig_t config = {};
    config.gridDim = dim3(kMaxSplits);
    config.blockDim = dim3(kThreads);
    config.dynamicSmemBytes = static_cast<size_t>(tile_bytes(4, 32 * kStepColumns, kMaxSplits));
    cudaLaunchAttribute attribute[1] = {cluster_launch_attribute(kMaxSplits)};
    config.attrs = attribute;
    config.numAttrs = 1;
    int clusters = 0;
    const bool ok = cudaOccupancyMaxActiveClusters(&clusters, kernel, &config) == cudaSuccess && clusters > 0;
    (void)cudaGetLastError();  // (a refusal is an answer here, not an error to report later)
    cached[device] = ok ? kMaxSplits : kMaxPortableSplits;
  }
  return cached[device];
}

// CTAs per tile (a cluster on sm_90 that deals each tile's steps out, at least one step a CTA; elsewhere 1):
// - while the tile holds fewer CTAs an SM than the registers allow (wide rows: K = 8192 at 8 rows takes 129 KiB, one
//   CTA an SM, 8 warps), so that each CTA holds a shorter tile;
// - while the tiles leave SMs idle (few rows: decode): up to 16 CTAs for one or two tiles where the device runs such
//   clusters, else up to 8. At decode each CTA's steps run one after another, about 0.5 us each (H100, 1 and 16 rows,
//   16 CTAs against 8: K = 4096 6.8 -> 5.9 us, 8192 8.9 -> 7.0, 14336 12.0 -> 8.7); at 64 rows (8 tiles) 16 CTAs
//   ran 0.93-1.11x as fast as 8 (slower at K = 4096), hence the tile limit (docs/PERF.md, session 37).
int splits_for(int64_t M, int64_t K, int64_t b, int device) {
  if (!hopper::wgmma_available(device)) return 1;
  const int64_t steps = (K + kStepColumns - 1) / kStepColumns;
  const int tokens = initial_tokens(M);
  const int64_t tiles = (M + tokens - 1) / tokens;
  const int decode_limit = tiles <= kMaxTilesForWideClusters ? max_splits(device) : kMaxPortableSplits;
  int splits = 1;
  auto may_double = [&](int limit) { return splits * 2 <= limit && splits * 2 <= steps; };
  while (may_double(kMaxPortableSplits) &&
         ctas_by_smem(tile_bytes(tokens, K, splits), device) < ctas_by_registers(b)) {
    splits *= 2;
  }
  while (may_double(decode_limit) && tiles * splits * 2 <= num_sms(device)) splits *= 2;
  return splits;
}

template <typename T, int TOKENS, int B>
void launch_instance(const Params& p, int64_t ctas, cudaStream_t stream) {
  const int smem = static_cast<int>(tile_bytes(TOKENS, p.K, p.splits));
  auto kernel = block_rotate_quantize_kernel<T, TOKENS, B>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(ctas));
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  if (p.splits > kMaxPortableSplits) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  }
  if (p.splits > 1) {  // (no cluster attribute otherwise: the CTA is its own cluster)
    attribute[0] = cluster_launch_attribute(static_cast<unsigned>(p.splits));
    config.attrs = attribute;
    config.numAttrs = 1;
  }
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, p));
}

template <typename T, int B>
void launch_block(const Params& p, int tokens, cudaStream_t stream) {
  const int64_t ctas = (p.rows + tokens - 1) / tokens * p.splits;
  tokens == 8 ? launch_instance<T, 8, B>(p, ctas, stream) : launch_instance<T, 4, B>(p, ctas, stream);
}

template <typename T>
void launch(const Params& p, int64_t b, int tokens, cudaStream_t stream) {
  b == 64 ? launch_block<T, 64>(p, tokens, stream) : launch_block<T, 128>(p, tokens, stream);
}

std::tuple<at::Tensor, at::Tensor> block_rotate_quantize_cuda(const at::Tensor& x_in, const at::Tensor& rotation,
                                                              int64_t bits, double clip_ratio) {
  constexpr const char* op = "quantkern::block_rotate_quantize";
  check_per_token_quant_input(x_in, bits, clip_ratio, op);
  TORCH_CHECK(x_in.scalar_type() == at::kHalf || x_in.scalar_type() == at::kBFloat16, op,
              ": x must be float16 or bfloat16 (fp32 rows take the Triton kernel), got ", x_in.scalar_type());
  check_cuda(rotation, op, "rotation");
  check_contiguous(rotation, op, "rotation");
  TORCH_CHECK(rotation.scalar_type() == at::kFloat, op, ": rotation must be float32, got ", rotation.scalar_type());
  TORCH_CHECK(rotation.dim() == 2 && rotation.size(0) == rotation.size(1), op,
              ": rotation must be one [b, b] matrix for every block (one per block takes the Triton kernel), "
              "got shape ", rotation.sizes());
  TORCH_CHECK(rotation.device() == x_in.device(), op, ": rotation is on ", rotation.device(), ", x on ",
              x_in.device());
  const int64_t M = x_in.size(0), K = x_in.size(1), b = rotation.size(0);
  TORCH_CHECK(block_size_supported(b), op, ": block size (head_dim) must be 64 or 128 here, got ", b);
  TORCH_CHECK(K > 0 && K % b == 0, op, ": x's last dimension (", K, ") must be a positive multiple of the block "
              "size ", b);
  const int device = x_in.get_device();
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  TORCH_CHECK(major >= 8, op, ": needs sm_80 or newer (bf16 mma.sync), this GPU is sm_", major, "x");
  const int splits = splits_for(M, K, b, device);
  const int tokens = tokens_per_cta(M, K, splits, smem_optin(device));
  TORCH_CHECK(tokens > 0, op, ": rows of ", K, " with blocks of ", b, " do not fit this GPU's shared memory (",
              smem_optin(device), " bytes per block); the Triton kernel takes them");
  // 16-byte units (cp.async of x, vector loads of R): a storage offset off that grid takes an aligned copy.
  const at::Tensor x = is_aligned(x_in.const_data_ptr(), 16) ? x_in : x_in.clone();
  const at::Tensor rot = is_aligned(rotation.const_data_ptr(), 16) ? rotation : rotation.clone();

  at::Tensor q = at::empty({M, bits == 4 ? K / 2 : K}, x.options().dtype(bits == 4 ? at::kByte : at::kChar));
  at::Tensor scales = at::empty({M}, x.options().dtype(at::kFloat));
  if (M == 0) return {q, scales};
  const Params p{x.const_data_ptr(), rot.const_data_ptr<float>(), static_cast<uint8_t*>(q.data_ptr()),
                 scales.data_ptr<float>(), M, static_cast<int>(K), static_cast<float>(clip_ratio),
                 static_cast<int>(bits), splits};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  if (x.scalar_type() == at::kHalf) {
    launch<__half>(p, b, tokens, stream);
  } else {
    launch<__nv_bfloat16>(p, b, tokens, stream);
  }
  return {q, scales};
}

}  // namespace

// Whether block_rotate_quantize_cuda takes rows of K with blocks of b on `device` (b = 64 or 128, a tile of at least
// 4 rows in shared memory); exposed to Python as quantkern._C.block_rotation_fits.
bool block_rotation_fits(int64_t K, int64_t b, int device) {
  return block_size_supported(b) && K > 0 && K % b == 0 && tokens_per_cta(1, K, 1, smem_optin(device)) > 0;
}

}  // namespace block_rotation
}  // namespace quantkern

TORCH_LIBRARY_IMPL(quantkern, CUDA, m) {
  m.impl("block_rotate_quantize", &quantkern::block_rotation::block_rotate_quantize_cuda);
}
