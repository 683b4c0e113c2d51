// The integer GEMM for many tokens on Hopper (sm_90a): W8A8 and W4A8 with int8 wgmma. Also W4A4 on
// sm_90: Hopper has no int4 tensor cores, so there the int4 activation codes are stored one per byte
// (quantize_per_token(packed=False)) and the layer runs as W4A8 with codes in [-7, 7]: the same int32
// sums. Semantics, weight layouts and operand checks are those of csrc/int_gemm.cu, whose host function
// calls launch() for per-channel weights on an sm_90 GPU; this file holds the kernel and its launcher.
//
// Why: the mma.sync kernel of csrc/int_gemm.cu tops out near 580 TOPS on the H100 (int8 mma.sync peaks
// at ~1200 there); the full int8 tensor-core rate (~1980 TOPS dense) is reached only through wgmma.
//
// Operands: the weights are wgmma's A operand (64 rows = output channels per warpgroup, 32 k per
//   wgmma), from registers; the activations are the B operand (32 k x TOKENS tokens), read by the
//   tensor cores from shared memory; D[channel][token] in int32.
//   A fragments: a warp's 16 rows of a weight unit are ldmatrix'ed (x4: rows 0-7 / 8-15 x two 16-byte
//   chunks) exactly as csrc/int_gemm.cu does for mma.m16n8k32, whose A fragment is wgmma's per-warp
//   register fragment. int8 weights: a 16-byte chunk is 16 k, two chunks one k32 step, no conversion.
//   int4 weights (the W4A8 layout: K permuted in every 32-chunk so that widening lands in the
//   fragment's natural order): a 16-byte chunk is one k32 step; lo = (w << 4) & 0xF0F0F0F0 and
//   hi = w & 0xF0F0F0F0 are int8 lanes holding 16 x the nibble (exact), two LOPs per 8 values; the
//   accumulator is 16 x the sum (exact in int32 for K <= 65536) and is shifted back (exact) at the end.
// Tiling: a block is 2 warpgroups (256 threads) on 128 output channels (warpgroup w: weight unit
//   2 * blockIdx.x + w, 64 rows; warp w of the block owns channels 16w..16w+15) and TOKENS (128 or
//   256) tokens; K in k-tiles of 128 (one weight unit's width, one 128-byte row of activations).
//   Per k-tile each warpgroup issues 4 wgmma.m64n{TOKENS}k32.s32.s8.s8.
// Shared-memory stage (kStages of them), filled by the copy engine on one mbarrier per stage, the
//   copies issued by one lane of warp 0 (activations) and of warps 0 and 4 (the weight units; see
//   issue_copies): the activation tile TOKENS x 128 bytes as one TMA box with the 128-byte swizzle
//   (16-byte chunk c of token row r at c ^ (r % 8); rows past M and k past K arrive as zeros; the wgmma
//   descriptor: 1024 bytes per 8 rows, +32 bytes per k32 step), then the block's one or two weight
//   units as TMA boxes of 64 rows, with the 64-byte (int4: 64-byte rows, chunk c of row r at
//   c ^ ((r / 2) % 4)) or 128-byte swizzle (int8: 128-byte rows), so that ldmatrix is conflict-free.
// Pipeline: kStages - 2 k-tiles in flight ahead of the one computed; one __syncthreads per k-tile.
//   Per k-tile: wgmma.wait_group 1 (the k-tile before the previous one is done in this warpgroup, so
//   its stage and its set of A registers are free once the barrier passes; thread 0 arms that
//   stage's mbarrier just before it), the warps issue the copies of a new k-tile into it, everyone
//   waits on the k-tile's mbarrier, ldmatrix (and widening) into one of two A register sets
//   (alternating by k-tile parity), 4 wgmmas, one commit: the fragment loads overlap the previous
//   k-tile's wgmmas. The A operands are defined before the wgmma fence and pinned there, and k-tiles
//   run in pairs without a branch inside (ptxas serializes wgmmas otherwise: warnings C7513-C7515,
//   C7520; see csrc/w4a16_wgmma.cu).
// Epilogue (fused): y = (float(acc) * w_scale[n]) * a_scale[m] + bias[n], each step rounded to fp32
//   like the reference (bit-identical), converted, staged through shared memory as a [token][channel]
//   tile (rows padded by 16 bytes) and written with coalesced 16-byte stores. Split K (asked for, or
//   automatic where the 128-token blocks fill less than half the SMs: see make_wgmma_plan): every split adds
//   its exact int32 sums into a zeroed [M, N] workspace (red.global.add), and the host runs
//   csrc/int_gemm.cu's split epilogue; the test hook int_gemm_acc reads that workspace as is.
// Measured (H100, bf16 out, per-channel, `benchmarks/bench_int_gemm.py --sweep`, GEMM alone):
//   W4A4 1350-1460 TOPS and W8A8 1180-1310 TOPS at M = 2048 and 8192 on 8192 x 8192 and 8192 x 28672
//   (the mma.sync kernel: 480-610); with the activation quantization, 1.89-2.00x cuBLAS bf16.
//
// Compiled without --use_fast_math. Without sm_90a (other archs of a fat build) the kernel body is
// empty and the host never launches it.

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include <c10/cuda/CUDAException.h>

#include "common.cuh"
#include "hopper.cuh"
#include "int_wgmma.cuh"
#include "w4a16_common.cuh"  // smem_addr, ldmatrix_x4

namespace quantkern {
namespace int_wgmma {
namespace {

using namespace hopper;
using w4a16::ldmatrix_x4;
using w4a16::smem_addr;

constexpr int kThreads = 256;                   // 2 warpgroups
constexpr int kUnitRows = 64;                   // rows of one weight unit (csrc/int_gemm.cu's tiled layout)
constexpr int kTileK = 128;                     // k per k-tile: one unit's width

template <int WBITS, int TOKENS>
struct Config {
  static constexpr int kXBytes = TOKENS * kTileK;                    // int8 activations, swizzled
  static constexpr int kUnitBytes = kUnitRows * kTileK * WBITS / 8;  // 4 KB (int4) or 8 KB (int8)
  static constexpr int kStageBytes = kXBytes + 2 * kUnitBytes;
  // 128 tokens: two blocks per SM (<= 128 registers, <= ~113 KB each); 256: one (128 accumulators).
  static constexpr int kBlocksPerSm = TOKENS == 256 ? 1 : 2;
  static constexpr int kStages = (kBlocksPerSm == 1 ? 220 * 1024 : 112 * 1024) / kStageBytes;
  static constexpr int kSmemBytes = kStages * kStageBytes + 1024;  // + alignment slack
  static_assert(kStages >= 3, "at least one k-tile in flight ahead");
  static_assert(kStageBytes % 1024 == 0, "stages must keep the swizzled tiles 1024-byte aligned");
  static_assert(TOKENS * kStagedRowBytes<kChannels> <= kStages * kStageBytes, "the output tile reuses the stages");
};

// ---------------------------------------------------------------------------------------------
// wgmma, int8 x int8 -> int32, A from registers (generated operand lists)
// ---------------------------------------------------------------------------------------------

// D[64 x TOKENS] += A[64 x 32] (registers) * B[32 x TOKENS] (shared memory, descriptor); ACC = TOKENS / 2
// accumulator registers (hopper.cuh); TAIL places A and the descriptor after them.
#define QK_WGMMA_S8(TOKENS_N, ACC, TAIL)                                                                     \
  asm volatile("wgmma.mma_async.sync.aligned.m64n" #TOKENS_N "k32.s32.s8.s8\n" QK_WGMMA_ACC_REGS_##ACC TAIL \
               : QK_WGMMA_ACC_##ACC("r")                                                                  \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc))
#define QK_WGMMA_S8_M64N128K32 QK_WGMMA_S8(128, 64, " {%64,%65,%66,%67}, %68, 1;\n")
#define QK_WGMMA_S8_M64N256K32 QK_WGMMA_S8(256, 128, " {%128,%129,%130,%131}, %132, 1;\n")

template <int TOKENS>
__device__ __forceinline__ void wgmma_s8(int (&d)[TOKENS / 2], const uint32_t (&a)[4], uint64_t desc) {
#if QK_HAS_WGMMA
  if constexpr (TOKENS == 256) {
    QK_WGMMA_S8_M64N256K32;
  } else {
    static_assert(TOKENS == 128, "token tiles of 128 or 256");
    QK_WGMMA_S8_M64N128K32;
  }
#endif
}

#if QK_HAS_WGMMA
// Widen 8 signed nibbles (one word) to two words of 4 int8 lanes, each 16 x its nibble.
__device__ __forceinline__ uint32_t widen_lo(uint32_t w) { return (w << 4) & 0xF0F0F0F0u; }
__device__ __forceinline__ uint32_t widen_hi(uint32_t w) { return w & 0xF0F0F0F0u; }
#endif

template <typename OutT>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same_v<OutT, __half>) {
    const __half2 h = __halves2half2(__float2half_rn(lo), __float2half_rn(hi));
    return *reinterpret_cast<const uint32_t*>(&h);
  } else {
    const __nv_bfloat162 h = __halves2bfloat162(__float2bfloat16_rn(lo), __float2bfloat16_rn(hi));
    return *reinterpret_cast<const uint32_t*>(&h);
  }
}

// ---------------------------------------------------------------------------------------------
// Kernel
// ---------------------------------------------------------------------------------------------

// ATOMIC: add the int32 sums into p.out (split K / test hook); else the fused epilogue into OutT.
template <int WBITS, int TOKENS, bool ATOMIC, typename OutT>
__global__ void __launch_bounds__(kThreads, Config<WBITS, TOKENS>::kBlocksPerSm)
    int_wgmma_kernel(const Params p, const __grid_constant__ CUtensorMap a_map,
                     const __grid_constant__ CUtensorMap w_map) {
#if QK_HAS_WGMMA
  using Cfg = Config<WBITS, TOKENS>;
  constexpr int kStages = Cfg::kStages;
  constexpr int kAcc = TOKENS / 2;  // accumulator registers per thread: 64 channels x TOKENS / 128
  constexpr int kShift = WBITS == 4 ? 4 : 0;  // widened nibbles are 16 x their value

  extern __shared__ uint8_t smem_raw[];
  __shared__ __align__(8) uint64_t stage_full[kStages];  // mbarriers: the stage's bytes have landed
  const uint32_t smem0 = (smem_addr(smem_raw) + 1023u) & ~1023u;

  const int tid = threadIdx.x, lane = tid & 31;
  // The warp index, broadcast so that the compiler knows it is warp-uniform (uniform registers for the
  // copies' operands).
  const int warp = __shfl_sync(0xffffffffu, tid >> 5, 0), wg = warp >> 2;
  const int g = lane >> 2, t = lane & 3;
  const int ch0 = 16 * warp + g;  // this thread's channels (A rows g and g + 8) within the block
  const int block_n = blockIdx.x, m0 = blockIdx.y * TOKENS, split = blockIdx.z;
  const int n0 = block_n * kChannels;
  const int kt_begin = split * p.tiles_per_split;
  const int nk = min(p.tiles_per_split, p.k_tiles - kt_begin);  // >= 1 (the host makes no empty split)
  const int units = min(2, p.w_units - 2 * block_n);             // the block's valid weight units

  // ---- global -> shared, one k-tile, on the copy engine -----------------------------------------
  // Thread 0 arms the stage's barrier before the block barrier that frees the stage; after it, one lane
  // of warp 0 issues the activation box and one of the first warp of warpgroup u its weight unit u,
  // so that no warp carries every copy of the k-tile (see csrc/w4a16_wgmma.cu: one thread issuing all
  // of them put their serial instructions on every k-tile's path).
  StageRing<kStages> ring(smem_addr(&stage_full[0]));
  auto arm_stage = [&](int stage) {
    mbarrier_expect_bytes(ring.barrier(stage), Cfg::kXBytes + units * Cfg::kUnitBytes);
  };
  auto issue_copies = [&](int stage, int kt) {  // one elected lane of each warp, after arm_stage(stage)
    const uint32_t xs = smem0 + stage * Cfg::kStageBytes;
    const uint32_t bar = ring.barrier(stage);
    if (warp == 0) tma_load_2d(xs, &a_map, kt * kTileK, m0, bar);
    if ((warp & 3) == 0 && wg < units) {
      tma_load_2d(xs + Cfg::kXBytes + wg * Cfg::kUnitBytes, &w_map, 0,
                  ((2 * block_n + wg) * p.k_tiles + kt) * kUnitRows, bar);
    }
  };

  int acc[kAcc];
#pragma unroll
  for (int i = 0; i < kAcc; ++i) acc[i] = 0;

  // ldmatrix addressing: lane l reads row (l & 15) of the warp's 16 rows, chunk +(l >> 4).
  const int frag_row = 16 * (warp & 3) + (lane & 15);
  const int frag_chunk = lane >> 4;

  // ---- main loop: one k-tile per iteration ------------------------------------------------------
  uint32_t a_sets[2][4][4];  // two A register sets (the other may still be read by wgmmas in flight)
  auto tile_step = [&](auto buf_tag, int it) {
    uint32_t (&a)[4][4] = a_sets[decltype(buf_tag)::value];
    wgmma_wait<1>();  // k-tile it - 2 is done in this warpgroup (it - 1 may still run)
    // The stage of k-tile it - 2 is refilled with k-tile it + kStages - 2; k-tile it has landed after.
    const int stage = ring.next(it + kStages - 2 < nk, tid == 0, arm_stage, [&](int refill_stage) {
      if (elect_one_lane()) issue_copies(refill_stage, kt_begin + it + kStages - 2);
    });
    const uint32_t xs = smem0 + stage * Cfg::kStageBytes;
    const uint32_t ws = xs + Cfg::kXBytes + wg * Cfg::kUnitBytes;
    if constexpr (WBITS == 4) {
      // 64-byte rows, 64-byte swizzle: chunk c of row r at c ^ ((r >> 1) & 3). One chunk = one k32 step.
#pragma unroll
      for (int pair = 0; pair < 2; ++pair) {
        const int c = 2 * pair + frag_chunk;
        uint32_t raw[4];
        ldmatrix_x4(raw, ws + frag_row * 64 + ((c ^ ((frag_row >> 1) & 3)) << 4));
#pragma unroll
        for (int ks = 0; ks < 2; ++ks) {
          a[2 * pair + ks][0] = widen_lo(raw[2 * ks]);
          a[2 * pair + ks][1] = widen_lo(raw[2 * ks + 1]);
          a[2 * pair + ks][2] = widen_hi(raw[2 * ks]);
          a[2 * pair + ks][3] = widen_hi(raw[2 * ks + 1]);
        }
      }
    } else {
      // 128-byte rows, 128-byte swizzle: chunk c of row r at c ^ (r & 7). Two chunks = one k32 step.
#pragma unroll
      for (int ks = 0; ks < 4; ++ks) {
        const int c = 2 * ks + frag_chunk;
        ldmatrix_x4(a[ks], ws + frag_row * 128 + ((c ^ (frag_row & 7)) << 4));
      }
    }
    uint64_t desc[4];
#pragma unroll
    for (int ks = 0; ks < 4; ++ks) desc[ks] = smem_descriptor(xs + ks * 32);
    // Everything the wgmmas read is defined before the fence and pinned there (C7513 otherwise).
#pragma unroll
    for (int ks = 0; ks < 4; ++ks) {
      pin_operands(a[ks]);
      asm volatile("" : "+l"(desc[ks])::"memory");
    }
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < 4; ++ks) wgmma_s8<TOKENS>(acc, a[ks], desc[ks]);
    wgmma_commit();
  };
  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) mbarrier_init(smem_addr(&stage_full[s]), 1);
    mbarrier_init_fence();
    for (int s = 0; s < kStages - 2 && s < nk; ++s) arm_stage(s);
  }
  __syncthreads();  // the barriers are initialized and armed before any copy or wait
  if (elect_one_lane()) {
    for (int s = 0; s < kStages - 2 && s < nk; ++s) issue_copies(s, kt_begin + s);
  }
  int it = 0;
  for (; it + 1 < nk; it += 2) {  // pairs of k-tiles (the two A register sets), then an odd last one
    tile_step(std::integral_constant<int, 0>{}, it);
    tile_step(std::integral_constant<int, 1>{}, it + 1);
  }
  if (it < nk) tile_step(std::integral_constant<int, 0>{}, it);
  wgmma_wait<0>();
  fence_registers(acc);

  // ---- epilogue ----------------------------------------------------------------------------------
  // Thread (g, t) holds, per n8 column block j: acc[4j + 0, 1] = channel ch0, tokens 8j + 2t (+1);
  // acc[4j + 2, 3] = channel ch0 + 8, the same tokens.
  const int c0 = n0 + ch0, c1 = c0 + 8;
  if constexpr (ATOMIC) {
    int* __restrict__ out = static_cast<int*>(p.out);
#pragma unroll
    for (int j = 0; j < kAcc / 4; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int m = m0 + 8 * j + 2 * t + (e & 1), n = (e & 2) ? c1 : c0;
        if (m < p.M && n < p.N) atomicAdd(out + static_cast<int64_t>(m) * p.N + n, acc[4 * j + e] >> kShift);
      }
    }
  } else {
    __syncthreads();  // every warpgroup is done with the stages
    const float sw0 = c0 < p.N ? __ldg(p.w_scale + c0) : 0.0f, sw1 = c1 < p.N ? __ldg(p.w_scale + c1) : 0.0f;
    float b0 = 0.0f, b1 = 0.0f;
    if (p.bias != nullptr) {
      b0 = c0 < p.N ? __ldg(p.bias + c0) : 0.0f;
      b1 = c1 < p.N ? __ldg(p.bias + c1) : 0.0f;
    }
    auto finish = [&](int v, float sw, float sx, float b) {
      float y = __fmul_rn(__fmul_rn(static_cast<float>(v >> kShift), sw), sx);
      return p.bias != nullptr ? __fadd_rn(y, b) : y;
    };
#pragma unroll
    for (int j = 0; j < kAcc / 4; ++j) {
      const int tok = 8 * j + 2 * t;
      const float sx0 = __ldg(p.a_scale + min(m0 + tok, p.M - 1));
      const float sx1 = __ldg(p.a_scale + min(m0 + tok + 1, p.M - 1));
      const uint32_t lo = pack2<OutT>(finish(acc[4 * j + 0], sw0, sx0, b0), finish(acc[4 * j + 2], sw1, sx0, b1));
      const uint32_t hi = pack2<OutT>(finish(acc[4 * j + 1], sw0, sx1, b0), finish(acc[4 * j + 3], sw1, sx1, b1));
      stage_output_pairs<kChannels>(smem0, tok, ch0, lo, hi);
    }
    __syncthreads();
    store_staged_tile<kChannels, TOKENS, kThreads>(smem0, p.out, p.M, p.N, m0, n0);
  }
#endif  // QK_HAS_WGMMA
}

template <int WBITS, int TOKENS>
void launch_typed(bool atomic, at::ScalarType out_dtype, const Params& p, int splits, cudaStream_t stream) {
  constexpr const char* op = "quantkern::int_gemm";
  using Cfg = Config<WBITS, TOKENS>;
  constexpr int row_bytes = kTileK * WBITS / 8;
  const CUtensorMap a_map = encode_tensor_map_2d(op, CU_TENSOR_MAP_DATA_TYPE_UINT8, p.a, p.K, p.M, p.K, kTileK,
                                                 TOKENS, CU_TENSOR_MAP_SWIZZLE_128B);
  const CUtensorMap w_map = encode_tensor_map_2d(
      op, CU_TENSOR_MAP_DATA_TYPE_UINT8, p.w, row_bytes, static_cast<int64_t>(p.w_units) * p.k_tiles * kUnitRows,
      row_bytes, row_bytes, kUnitRows, WBITS == 4 ? CU_TENSOR_MAP_SWIZZLE_64B : CU_TENSOR_MAP_SWIZZLE_128B);
  const dim3 grid((p.N + kChannels - 1) / kChannels, (p.M + TOKENS - 1) / TOKENS, splits);
  auto run = [&](auto kernel) {
    // Not a stream operation: fine during CUDA graph capture.
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes));
    kernel<<<grid, kThreads, Cfg::kSmemBytes, stream>>>(p, a_map, w_map);
  };
  if (atomic) {
    run(int_wgmma_kernel<WBITS, TOKENS, true, float>);
  } else if (out_dtype == at::kHalf) {
    run(int_wgmma_kernel<WBITS, TOKENS, false, __half>);
  } else {
    run(int_wgmma_kernel<WBITS, TOKENS, false, __nv_bfloat16>);
  }
  QK_CHECK_LAUNCH();
}

}  // namespace

void launch(int w_bits, int tokens, bool atomic, at::ScalarType out_dtype, const Params& p, int splits,
            cudaStream_t stream) {
  TORCH_CHECK(tokens == 128 || tokens == 256, "quantkern::int_gemm: the wgmma kernel has tiles of 128 or 256 tokens");
  TORCH_CHECK(w_bits == 4 || w_bits == 8, "quantkern::int_gemm: the wgmma kernel takes 4- or 8-bit weights");
  if (w_bits == 4) {
    tokens == 128 ? launch_typed<4, 128>(atomic, out_dtype, p, splits, stream)
                  : launch_typed<4, 256>(atomic, out_dtype, p, splits, stream);
  } else {
    tokens == 128 ? launch_typed<8, 128>(atomic, out_dtype, p, splits, stream)
                  : launch_typed<8, 256>(atomic, out_dtype, p, splits, stream);
  }
}

}  // namespace int_wgmma
}  // namespace quantkern
