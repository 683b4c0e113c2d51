// Fused dense per-block rotation + per-token quantization (quantkern::block_rotate_quantize): x [M, K] fp16/bf16,
// every block of b consecutive entries of a row times R^T (R [b, b] fp32, the same for every block: e.g. a PCA
// rotation of head_dim shared by the heads), the result rounded to x's dtype, then quantize_per_token's codes and
// scales (csrc/per_token_quant.cuh's formula), in one pass over memory: x read once, codes and scales written once.
// b = 64 or 128 (head_dim); one R per block ([K / b, b, b]), other b and fp32 rows take the Triton kernel
// (triton_kernels/block_rotation.py), which ops.block_rotate_quantize chooses (block_rotation_fits); its automatic
// choice also takes Triton for rows wider than 4096 (ops.CUDA_BLOCK_ROTATION_AUTO_MAX_K).
// Speed (H100, docs/PERF.md session 34): faster than the Triton kernel at K = 576 and 4096 (1.1-2.9x), slower at 8192
// from 16 rows on; against cuBLAS + the quantizer 0.89-1.07x at 576 and 0.39-0.70x at 4096 and 8192. A CTA loads,
// rotates and quantizes its tile in turn with one or two CTAs an SM: little overlap between memory and math.
//
// Why not cuBLAS + the quantizer: the rotated rows make a round trip through memory, and the GEMM of [M K / b, b]
// by [b, b] is far from cuBLAS's shapes; the Triton kernel reads x twice and does the math twice (its absmax pass).
//
// Tiling: a CTA is 8 warps on TOKENS (4 or 8) token rows and the whole of K (a row's absmax needs all of it). Its
//   rows live in shared memory for the whole CTA: x arrives there, is rotated in place and quantized from there.
//   Warp w owns 16 outputs of a block (rows 16 (w % (b / 16)) .. + 15 of R) and keeps their R in registers for the
//   whole CTA; the b / 16 warps of a block's outputs take the CTA's blocks one by one (b = 64: two blocks at a
//   time, the last step of an odd number of blocks one). On sm_90, where the tiles leave SMs idle (few rows), a
//   cluster of S <= 8 CTAs shares each tile (splits_for): CTA r takes steps r, r + S, ..., and the CTAs exchange
//   their per-token maxima through distributed shared memory.
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
// Shared memory: only the tile [TOKENS][K + 8] (the 8 elements of padding keep the pair stores conflict-free);
//   TOKENS is 4 for M <= 4, else 8, halved while the tile does not fit (block_rotation_fits says whether 4 do).
// Pipeline: every thread issues cp.async for its pieces of all of the CTA's blocks at the start, one commit group per
//   step (block, or pair of blocks), then loads and splits its warp's R while they are in flight. Per step: wait
//   for the step's group, barrier (the step's x has landed everywhere), each warp reads its B operands, barrier
//   (every warp has read the block before any overwrites it), 16 mmas per 32 k (b = 128: 4 chunks), the pairs
//   stored. Then the maxima over the warps and the cluster's CTAs give the scales, and warp w quantizes row w from
//   shared memory (4- or 8-byte code stores, consecutive lanes on consecutive bytes).
// NaN and inf: a row holding NaN rotates to NaN: NaN scale, codes 0 (as the reference). A row holding +-inf
//   gives inf * R_lo = NaN where R is exact in x's dtype (R_lo = 0), so such rows get a NaN scale where the
//   reference's is inf; the codes are 0 either way (the Triton kernel behaves the same).
//
// Compiled without --use_fast_math. Below sm_80 (no bf16 mma) the kernel body is empty and the host refuses.

#include <algorithm>
#include <cstdint>
#include <tuple>

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
constexpr int kRowPadElems = 8;  // a tile row is K + 8 elements: rows 16 bytes apart modulo 128
constexpr int kMaxTokens = 8;    // the mma's 8 B columns
constexpr int kMaxSplits = 8;    // CTAs of a cluster (the portable cluster size)
constexpr int kStepColumns = 128;  // columns a CTA step covers: one block of 128, or two of 64

int64_t tile_bytes(int64_t tokens, int64_t K) { return tokens * (K + kRowPadElems) * 2; }

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
using w4a16::smem_addr;

// Waits until at most `pending` of this thread's cp.async groups are in flight (more than 7 waits for 7: safe,
// it only waits longer).
__device__ __forceinline__ void cp_async_wait_at_most(int pending) {
  switch (pending) {
    case 0: w4a16::cp_async_wait<0>(); break;
    case 1: w4a16::cp_async_wait<1>(); break;
    case 2: w4a16::cp_async_wait<2>(); break;
    case 3: w4a16::cp_async_wait<3>(); break;
    case 4: w4a16::cp_async_wait<4>(); break;
    case 5: w4a16::cp_async_wait<5>(); break;
    case 6: w4a16::cp_async_wait<6>(); break;
    default: w4a16::cp_async_wait<7>(); break;
  }
}

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
__global__ void __launch_bounds__(kThreads, 2) block_rotate_quantize_kernel(const Params p) {
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
  const int K = p.K, pitch = K + kRowPadElems, step_count = (K + kStepColumns - 1) / kStepColumns;
  const int rank = static_cast<int>(blockIdx.x % p.splits);  // this CTA's place in its cluster
  const int64_t row0 = static_cast<int64_t>(blockIdx.x / p.splits) * TOKENS;
  const T* x = static_cast<const T*>(p.x);
  const uint32_t tile = smem_addr(smem);  // [TOKENS][pitch] of T
  // The CTA's steps: rank, rank + splits, ...; this warp's outputs and block within a step.
  const int steps = (step_count - rank + p.splits - 1) / p.splits;
  const int out0 = 16 * (warp % kOutputTiles), block_in_step = warp / kOutputTiles;

  // 1. All of the CTA's x into the tile, one commit group per step (rows past M arrive as zeros).
  constexpr int kUnitsPerRow = kStepColumns / 8;
  for (int s = 0; s < steps; ++s) {
    const int column0 = (rank + s * p.splits) * kStepColumns;
    for (int i = threadIdx.x; i < TOKENS * kUnitsPerRow; i += kThreads) {
      const int r = i / kUnitsPerRow, column = column0 + 8 * (i % kUnitsPerRow);
      if (column >= K) continue;  // b = 64 with an odd number of blocks: the last step has one
      const bool ok = row0 + r < p.rows;
      const T* src = x + (ok ? (row0 + r) * K + column : 0);
      cp_async16(tile + static_cast<uint32_t>((r * pitch + column) * 2), src, ok);
    }
    cp_async_commit();
  }

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

  // 3. Step by step: every warp rotates its 16 outputs of its block for all TOKENS rows.
  float amax = 0.0f;  // token 2t + (g & 1)
  for (int s = 0; s < steps; ++s) {
    cp_async_wait_at_most(steps - 1 - s);
    __syncthreads();  // the step's x has landed, from every thread's copies
    const int column0 = (rank + s * p.splits) * kStepColumns + block_in_step * B;
    const bool active = column0 < K;  // (the barriers stay uniform)
    uint4 xb[kChunks];
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      const uint32_t address = tile + static_cast<uint32_t>((g * pitch + column0 + 32 * c + 8 * t) * 2);
      xb[c] = active && g < TOKENS ? ld_shared_v4(address) : make_uint4(0, 0, 0, 0);
    }
    __syncthreads();  // every warp has read the block before any overwrites it
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
    const int token = 2 * t + (odd ? 1 : 0), column = column0 + out0 + (g & ~1);
    if (active && token < TOKENS) {
      st_shared_u32(tile + static_cast<uint32_t>((token * pitch + column) * 2), pair);
      st_shared_u32(tile + static_cast<uint32_t>((token * pitch + column + 8) * 2), pair8);
    }
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
  const int qmax = p.bits == 4 ? 7 : 127;
#if QK_BLOCK_ROTATION_CLUSTER
  const cg::cluster_group cluster = cg::this_cluster();  // launched without clusters: the CTA itself
  cluster.sync();  // every CTA's maxima are stored and visible across the cluster
  if (threadIdx.x < TOKENS) {
    float m = 0.0f;
    for (int r = 0; r < p.splits; ++r) m = max_propagate_nan(m, *cluster.map_shared_rank(&cta_amax[threadIdx.x], r));
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

  // 5. Codes: warp w quantizes row w's columns of this CTA's steps, 8 values a lane at a time.
  constexpr int kVecsPerStep = kStepColumns / 8;
  for (int r = warp; r < TOKENS && row0 + r < p.rows; r += kWarps) {
    const int64_t row = row0 + r;
    const float scale = row_scale[r];
    for (int i = lane; i < steps * kVecsPerStep; i += kWarpSize) {
      const int column = (rank + (i / kVecsPerStep) * p.splits) * kStepColumns + 8 * (i % kVecsPerStep);
      if (column >= K) continue;
      const uint4 v = ld_shared_v4(tile + static_cast<uint32_t>((r * pitch + column) * 2));
      const uint32_t words[4] = {v.x, v.y, v.z, v.w};
      int codes[8];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float2 f = Traits::to_float2(words[e]);
        codes[2 * e] = quantize_code(f.x, scale, qmax);
        codes[2 * e + 1] = quantize_code(f.y, scale, qmax);
      }
      if (p.bits == 4) {  // element 2j in byte j's low nibble
        uint32_t packed = 0;
#pragma unroll
        for (int e = 0; e < 8; ++e) packed |= static_cast<uint32_t>(codes[e] & 0xF) << (4 * e);
        *reinterpret_cast<uint32_t*>(p.q + row * (K / 2) + column / 2) = packed;
      } else {
        uint32_t lo = 0, hi = 0;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          lo |= static_cast<uint32_t>(codes[e] & 0xFF) << (8 * e);
          hi |= static_cast<uint32_t>(codes[4 + e] & 0xFF) << (8 * e);
        }
        *reinterpret_cast<uint2*>(p.q + row * K + column) = make_uint2(lo, hi);
      }
    }
  }
#endif
}

bool block_size_supported(int64_t b) { return b == 64 || b == 128; }

// Token rows per CTA for M rows of K on a device with `smem_optin` bytes of shared memory per block: 4 for M <= 4,
// else 8, halved while the tile does not fit; 0 when 4 do not.
int tokens_per_cta(int64_t M, int64_t K, int64_t smem_optin) {
  int tokens = M <= 4 ? 4 : kMaxTokens;
  const int64_t budget = smem_optin - static_cast<int64_t>((kWarps + 2) * kMaxTokens * sizeof(float));  // static
  while (tokens >= 4 && tile_bytes(tokens, K) > budget) tokens /= 2;
  return tokens >= 4 ? tokens : 0;
}

int64_t smem_optin(int device) { return device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>(device); }

// CTAs per tile: on sm_90, where the tiles leave SMs idle (few rows: decode), a cluster of up to 8 CTAs deals each
// tile's steps out, at least one step a CTA; elsewhere 1.
int splits_for(int64_t M, int tokens, int64_t steps, int device) {
  if (!hopper::wgmma_available(device)) return 1;
  const int64_t tiles = (M + tokens - 1) / tokens;
  int splits = 1;
  while (splits * 2 <= kMaxSplits && splits * 2 <= steps && tiles * splits * 2 <= num_sms(device)) splits *= 2;
  return splits;
}

template <typename T, int TOKENS, int B>
void launch_instance(const Params& p, int64_t ctas, cudaStream_t stream) {
  const int smem = static_cast<int>(tile_bytes(TOKENS, p.K));
  auto kernel = block_rotate_quantize_kernel<T, TOKENS, B>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(ctas));
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  if (p.splits > 1) {  // (no cluster attribute otherwise: the CTA is its own cluster)
    attribute[0].id = cudaLaunchAttributeClusterDimension;
    attribute[0].val.clusterDim.x = p.splits;
    attribute[0].val.clusterDim.y = 1;
    attribute[0].val.clusterDim.z = 1;
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
  const int tokens = tokens_per_cta(M, K, smem_optin(device));
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
                 static_cast<int>(bits), splits_for(M, tokens, (K + kStepColumns - 1) / kStepColumns, device)};
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
  return block_size_supported(b) && K > 0 && K % b == 0 && tokens_per_cta(1, K, smem_optin(device)) > 0;
}

}  // namespace block_rotation
}  // namespace quantkern

TORCH_LIBRARY_IMPL(quantkern, CUDA, m) {
  m.impl("block_rotate_quantize", &quantkern::block_rotation::block_rotate_quantize_cuda);
}
