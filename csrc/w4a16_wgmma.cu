// The W4A16 kernel for many tokens on Hopper (sm_90a): y[M, N] = x[M, K] @ dequant(W)^T (+ bias) with
// wgmma. Same semantics, arguments and weight layout as csrc/w4a16_gemm.cu, whose host function
// checks the inputs and calls launch_wgmma on an sm_90 GPU when the extension carries sm_90a code
// (wgmma_available); this file holds only the kernel and its launcher.
//
// Why: the mma.sync kernel of csrc/w4a16_gemm.cu tops out near 190 TFLOP/s on the H100 (0.27x of
// cuBLAS at M = 2048): Hopper's full tensor-core rate is reached only through wgmma.
//
// Swapped operands, weights from registers: wgmma takes its A operand (64 rows x 16 k per
//   warpgroup) from registers in the layout of mma.m16n8k16's A fragment, warp w of the warpgroup
//   holding rows 16w..16w+15. One packed word of the weight layout (see csrc/w4a16_gemm.cu) is
//   exactly a lane's A fragment for one 16-channel strip and one k16 step, so the weights are the A
//   operand (rows = output channels), dequantized in registers, and the activations are the B
//   operand (k x tokens) read by the tensor cores from shared memory: D[channel][token].
// Dequantization: (q >> 4i) & 0x000F000F | MAGIC, minus (MAGIC + zero), gives (code - zero) exactly
//   (4 lop3 + 3 shifts + 4 sub per 8 codes). fp16: multiplied by the group's scale in fp16 (the
//   weight rounded to 11 significant bits, as Marlin does), and the wgmmas accumulate straight into
//   the fp32 accumulators. bf16: rounding the scaled weight to 8 bits would cost ~1.5e-3 relative
//   error, so the operand stays (code - zero) and each group's wgmmas go to a partial accumulator,
//   folded into the main one in fp32 (acc += pacc * scale) once the group's wgmmas have completed,
//   as in the mma.sync kernel; that costs a second accumulator set and a drain of the warpgroup's
//   wgmma pipeline per k-tile (see Pipeline). So from 256 tokens (1024 for small weights) bf16 x goes the
//   fp16 way instead (STAGED, the host's choice: stages_bf16 in csrc/w4a16_gemm.cu): stage_bf16_rows
//   (below) writes each row times a power of two as an exact fp16 row, the bf16 scales (times
//   2^kStagedScaleShift) and zeros are converted to fp16 as they are read (exact for bf16's 8
//   significant bits in the range the host checked), the weight operand is rounded to 11 bits as in
//   fp16, and the epilogue multiplies each token's sums by the inverse powers of two and writes bf16.
//
// Tiling: a block is 2 warpgroups (256 threads) on 128 output channels (8 strips of 16: warp w of
//   the block owns strip 8 * blockIdx.x + w) and TOKENS (64, 128, or 256 in fp16) tokens; K in tiles
//   of 64 (kBK). Per k-tile each warpgroup issues 4 wgmma.m64n{TOKENS}k16 (A: registers, B: shared
//   memory). Two blocks per SM at 64 and 128 tokens (<= 128 registers, <= 113 KiB of shared memory
//   each; bf16 at 128 tokens carries a second accumulator set and fits one), one at 256.
// Shared-memory stage (kStages of them), filled by the copy engine (TMA): three boxes (four with zeros), all
//   issued by one elected lane of warp 0 (see issue_copies): the activation tile TOKENS x 64 of x's tensor
//   map with the 128-byte swizzle (token row r at r * 128 bytes, its 16-byte chunk c at chunk position
//   c ^ (r % 8); 1024-byte aligned; wgmma descriptor stride 1024 bytes per 8 rows, +32 bytes per k16
//   step), the block's 8 weight units (512 bytes each, strip-major: qweight seen as a 2-D int32 tensor),
//   the k-tile's one or two rows of 128 scales (and zeros). Strips and channels past N, and rows past M of a
//   last token tile, arrive as zeros, so every stage's full barrier expects the same bytes. One token tile of
//   fewer tokens (M < TOKENS) copies a box of M rows rounded up to 8 instead (x_box_rows: the copy engine's
//   zero fill of a box reaching past M was slow, up to 1.3x the kernel's time at M = 17), and the tile's
//   other rows are zeroed once in every stage before the main loop. Zeros, not whatever the shared memory
//   held: those columns' sums are never stored, but with the stale bytes 28672 x 8192 at M = 24-32 ran 5-6%
//   slower than with the whole box (why was not measured; docs/PERF.md, session 25).
// Pipeline: kStages - 2 k-tiles in flight ahead of the one computed; no block barrier in the main loop.
//   Two mbarriers per stage: full (the arming lane's arrival plus the bytes) and empty (one arrival per
//   warp). Per k-tile: wgmma.wait_group 1 (the k-tile before the previous one is done in this
//   warpgroup, so its A register set is free), wait on the k-tile's full barrier, ld.shared of the
//   weight words and scales, conversion into A registers (two sets, alternating by k-tile parity), 4
//   wgmmas, one commit; then each warp arrives on the empty barrier of the k-tile two back (retired by
//   the wait), and warp 0's elected lane waits for that barrier and refills the stage with the k-tile
//   kStages - 2 ahead. bf16 drains (wait_group 0) every k-tile instead, so that a group's fold may
//   read pacc. (Earlier versions: every thread's 16-byte cp.async, which also needed fence.proxy.async
//   before wgmma read the stages, ~0.1x slower at M = 2048; then a __syncthreads per k-tile and every
//   warp issuing its own weight unit's bulk copy: ~235 SASS instructions per warp per k-tile at M = 64,
//   ~137 now.) ptxas serializes wgmmas (warnings C7513-C7515 and C7520, printed by
//   scripts/gpu_check.sh) when a register they read is defined between their fence and their wait,
//   or when a branch separates them from it: hence the pinned operands, the immediate scale-d, the
//   k-tile pairs without a branch inside (an odd last k-tile runs after the loop), and the refill
//   after the commit (before the full-barrier wait, its spin loop in warp 0's divergent path made
//   ptxas serialize the bf16 asymmetric kernels, C7520).
// Measured (fp16, group 128, CUDA-graph medians, `benchmarks/bench_w4a16.py --cuda-graph`, docs/PERF.md):
//   H200, this version, 1.02-1.06x of cuBLAS fp16 at M = 2048 and 0.97-1.62x at M = 64 on the Llama
//   shapes (the __syncthreads version: 0.99-1.02x and 0.94-1.59x; H100, when thread 0 issued every
//   bulk copy: 0.76-0.82x at M = 2048; the mma.sync kernel: 0.27x). bf16 (H100, a40110a; 128-token tiles, one
//   block per SM, a drain per k-tile): 0.35-0.39x of cuBLAS bf16 at M = 2048, 0.71-0.84x at M = 128.
//   Staged bf16 (H100, session 21): 0.88-0.98x of cuBLAS bf16 at M = 2048 on the Llama shapes against
//   0.67-0.72x for the bf16 path (its scale loads hoisted out of the k16 steps in the same change).
//   ncu (H200, M = 64, 8192 x 28672, this version): issue slots 47% busy, tensor pipe 40% of elapsed
//   cycles, 3.4 warps per scheduler, stalls per issued instruction mostly "wait" (1.5, fixed-latency
//   dependencies) and long scoreboard (1.05); 0.85 waves (224 blocks on 132 SMs x 2). Cutting the
//   instructions per k-tile by 40% did not change the M = 64 time: latency, not issue, bounds it.
// Work split: grid (channel blocks, token tiles, splits). Where the tiles do not cover the SMs, K is
//   split into contiguous ranges as in the mma.sync kernel: each block writes its fp32 accumulators
//   to a workspace in fragment order (each thread its own 16-byte columns, coalesced), counts
//   itself in locks[tile]; the last block sums the splits in split order (bit-identical whichever
//   block is last), then runs the common epilogue and resets the counter.
// Epilogue: bias added in fp32, converted, staged through shared memory as a [token][channel] tile
//   (rows padded by 16 bytes: conflict-free) and written to y with coalesced 16-byte stores.
//
// Compiled without --use_fast_math. Without sm_90a (other archs of a fat build) the kernel body is
// empty and the host never launches it.

#include <type_traits>

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>

#include "hopper.cuh"
#include "w4a16_common.cuh"

namespace quantkern {
namespace w4a16 {
namespace {

using namespace hopper;

constexpr int kWgThreads = 256;      // 2 warpgroups
constexpr int kWgChannels = kWgmmaChannels;
constexpr int kWgStrips = kWgChannels / 16;  // 16-channel strips per block: one per warp

template <int TOKENS>
struct WgmmaConfig {
  // Two blocks per SM fit at 64 and 128 tokens (<= 113 KiB each), one at 256.
  static constexpr int kStages = TOKENS == 256 ? 5 : TOKENS == 128 ? 5 : 6;
  static constexpr int kXBytes = TOKENS * kBK * 2;                 // activation tile, swizzled
  static constexpr int kWBytes = kWgStrips * kUnitBytes;           // 8 weight units
  static constexpr int kSBytes = 2 * kWgChannels * 2;              // two rows of scales
  static constexpr int kStageBytes = kXBytes + kWBytes + 2 * kSBytes;  // + two rows of zeros
  static constexpr int kSmemBytes = kStages * kStageBytes + 1024;  // + alignment slack
  static_assert(kStageBytes % 1024 == 0, "stages must keep the activation tiles 1024-byte aligned");
  static_assert(TOKENS * kStagedRowBytes<kWgChannels> <= kStages * kStageBytes, "the output tile reuses the stages");
  // Two blocks (4 warpgroups) per SM where the registers allow (<= 128 per thread), so that one
  // warpgroup's conversion and drain overlap another's wgmmas; bf16 at 128 tokens carries a second
  // accumulator set and fits one.
  template <typename T>
  static constexpr int blocks_per_sm() {
    return TOKENS == 256 || (TOKENS == 128 && !std::is_same_v<T, __half>) ? 1 : 2;
  }
};

// ---------------------------------------------------------------------------------------------
// wgmma with the weights from registers
// ---------------------------------------------------------------------------------------------

// D[64 x TOKENS] (+)= A[64 x 16] (registers) * B[16 x TOKENS] (shared memory, descriptor);
// SCALE_D = 0: D = A * B. ACC = TOKENS / 2 accumulator registers (hopper.cuh); TAIL places A, the
// descriptor and scale-d after them.
#define QK_WGMMA_RS(TOKENS_N, ACC, TYPE, TAIL)                                                                \
  asm volatile("wgmma.mma_async.sync.aligned.m64n" #TOKENS_N "k16.f32." TYPE "." TYPE "\n" QK_WGMMA_ACC_REGS_##ACC \
               TAIL                                                                                              \
               : QK_WGMMA_ACC_##ACC("f")                                                                         \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "n"(SCALE_D))
#define QK_WGMMA_RS_M64N64K16(TYPE) QK_WGMMA_RS(64, 32, TYPE, " {%32,%33,%34,%35}, %36, %37, 1, 1, 0;\n")
#define QK_WGMMA_RS_M64N128K16(TYPE) QK_WGMMA_RS(128, 64, TYPE, " {%64,%65,%66,%67}, %68, %69, 1, 1, 0;\n")
#define QK_WGMMA_RS_M64N256K16(TYPE) \
  QK_WGMMA_RS(256, 128, TYPE, " {%128,%129,%130,%131}, %132, %133, 1, 1, 0;\n")

template <typename T, int TOKENS, int SCALE_D>
__device__ __forceinline__ void wgmma_rs(float (&d)[TOKENS / 2], const uint32_t (&a)[4], uint64_t desc) {
#if QK_HAS_WGMMA
  constexpr bool kHalf = std::is_same_v<T, __half>;
  if constexpr (TOKENS == 256) {
    static_assert(kHalf, "256-token tiles are for fp16 (bf16 needs a second accumulator set)");
    QK_WGMMA_RS_M64N256K16("f16");
  } else if constexpr (TOKENS == 128) {
    if constexpr (kHalf) {
      QK_WGMMA_RS_M64N128K16("f16");
    } else {
      QK_WGMMA_RS_M64N128K16("bf16");
    }
  } else {
    static_assert(TOKENS == 64, "token tiles of 64, 128 or 256");
    if constexpr (kHalf) {
      QK_WGMMA_RS_M64N64K16("f16");
    } else {
      QK_WGMMA_RS_M64N64K16("bf16");
    }
  }
#endif
}

#if QK_HAS_WGMMA
__device__ __forceinline__ uint32_t mul2_f16(uint32_t a, uint32_t b) {
  uint32_t d;
  asm("mul.rn.f16x2 %0, %1, %2;\n" : "=r"(d) : "r"(a), "r"(b));
  return d;
}
#endif

// ---------------------------------------------------------------------------------------------
// Kernel
// ---------------------------------------------------------------------------------------------

template <typename T, int TOKENS, bool ASYM, bool STAGED>
__global__ void __launch_bounds__(kWgThreads, WgmmaConfig<TOKENS>::template blocks_per_sm<T>())
    w4a16_wgmma_kernel(const WgmmaParams p, const __grid_constant__ CUtensorMap x_map,
                       const __grid_constant__ CUtensorMap w_map, const __grid_constant__ CUtensorMap s_map,
                       const __grid_constant__ CUtensorMap z_map) {
#if QK_HAS_WGMMA
  using Cfg = WgmmaConfig<TOKENS>;
  using Tr = W4Traits<T>;
  constexpr int kStages = Cfg::kStages;
  constexpr int kAcc = TOKENS / 2;  // accumulator registers per thread: 64 channels x TOKENS / 128
  // fp16: the scale goes into the operand; bf16: per-group partial sums scaled in fp32 (see header).
  constexpr bool kFoldScale = std::is_same_v<T, __half>;
  constexpr int kPartial = kFoldScale ? 1 : kAcc;
  static_assert(!STAGED || kFoldScale, "bf16 staged as fp16 runs the fp16 kernel");
  // STAGED: the scales and zeros in shared memory are bf16 (as prepared); to fp16, the scales times
  // 2^kStagedScaleShift (exact in the range the host checked: bits << 16 is the bf16 value as fp32).
  auto scale_bits = [](uint32_t raw) -> uint32_t {
    if constexpr (STAGED) {
      const float scale = __uint_as_float(raw << 16) * static_cast<float>(1 << kStagedScaleShift);
      return __half_as_ushort(__float2half_rn(scale));
    } else {
      return raw;
    }
  };
  auto zero_bits = [](uint32_t raw) -> uint32_t {
    if constexpr (STAGED) {
      return __half_as_ushort(__float2half_rn(__uint_as_float(raw << 16)));
    } else {
      return raw;
    }
  };

  extern __shared__ uint8_t smem_raw[];
  __shared__ int s_is_last;
  __shared__ __align__(8) uint64_t stage_full[kStages];   // mbarriers: the stage's bytes have landed
  __shared__ __align__(8) uint64_t stage_empty[kStages];  // ... every warp is done reading the stage
  const uint32_t smem0 = (smem_addr(smem_raw) + 1023u) & ~1023u;

  const int tid = threadIdx.x, lane = tid & 31;
  // The warp index, broadcast so that the compiler knows it is warp-uniform (uniform registers for the
  // copies' addresses).
  const int warp = __shfl_sync(0xffffffffu, tid >> 5, 0);
  const int g = lane >> 2, t = lane & 3;
  const int ch0 = 16 * warp + g;  // this thread's channels (A rows g and g + 8) within the block: ch0, ch0 + 8
  const int block_n = blockIdx.x, token_tile = blockIdx.y, split = blockIdx.z;
  const int n0 = block_n * kWgChannels, m0 = token_tile * TOKENS;
  const int kt_begin = split * p.tiles_per_split;
  const int nk = min(p.tiles_per_split, p.k_tiles - kt_begin);  // >= 1 (the host makes no empty split)
  const bool g32 = p.group_len == 32;

  // ---- global -> shared, one k-tile, on the copy engine -----------------------------------------
  // Three TMA boxes (four with zeros), issued by one elected lane of warp 0: x (TOKENS rows x 64 k,
  // 128-byte swizzle), the block's 8 weight units (8 strip rows x 512 bytes of qweight seen as a 2-D
  // int32 tensor), the k-tile's one or two rows of 128 scales (and zeros). Out-of-range rows and
  // channels arrive as zeros and count towards the stage's bytes like the others, so every stage
  // expects the same bytes. (Before, every warp issued its own weight unit's bulk copy and the last
  // warp the scale rows: ~60 of the ~235 SASS instructions each warp spent per k-tile at M = 64.)
  const uint32_t stage_bytes =
      p.x_box_rows * kBK * 2 + Cfg::kWBytes + (g32 ? 2 : 1) * kWgChannels * 2 * (ASYM ? 2 : 1);
  // k-tile -> its (first) group: group 64 one per k-tile, 128 one per two, per-channel (group_len = K)
  // always 0 (a shift of 31 on a k-tile index); group 32 two per k-tile (the box has two rows).
  const int group_shift = p.group_len == p.K ? 31 : p.group_len == 128 ? 1 : 0;
  const uint32_t full0 = smem_addr(&stage_full[0]), empty0 = smem_addr(&stage_empty[0]);
  auto issue_copies = [&](int stage, int kt) {  // one lane, once the stage is free
    const uint32_t xs = smem0 + stage * Cfg::kStageBytes;
    const uint32_t ws = xs + Cfg::kXBytes;
    const uint32_t ss = ws + Cfg::kWBytes;
    const uint32_t bar = full0 + 8 * stage;
    const int grp = g32 ? kt * 2 : kt >> group_shift;
    mbarrier_expect_bytes(bar, stage_bytes);
    tma_load_2d(xs, &x_map, kt * kBK, m0, bar);
    tma_load_2d(ws, &w_map, kt * (kUnitBytes / 4), block_n * kWgStrips, bar);
    tma_load_2d(ss, &s_map, n0, grp, bar);
    if constexpr (ASYM) tma_load_2d(ss + Cfg::kSBytes, &z_map, n0, grp, bar);
  };

  float acc[kAcc];
  float pacc[kPartial];
#pragma unroll
  for (int i = 0; i < kAcc; ++i) acc[i] = 0.0f;
#pragma unroll
  for (int i = 0; i < kPartial; ++i) pacc[i] = 0.0f;
  float fold_scale[2] = {0.0f, 0.0f};  // bf16: the open group's scales of channels ch0 and ch0 + 8
  bool group_open = false;             // bf16: pacc holds a group's sums not yet folded

  // bf16: acc += pacc * scale (pacc complete: every wgmma has been waited for).
  auto fold = [&]() {
#pragma unroll
    for (int j = 0; j < kPartial / 4; ++j) {
      acc[4 * j + 0] = fmaf(pacc[4 * j + 0], fold_scale[0], acc[4 * j + 0]);
      acc[4 * j + 1] = fmaf(pacc[4 * j + 1], fold_scale[0], acc[4 * j + 1]);
      acc[4 * j + 2] = fmaf(pacc[4 * j + 2], fold_scale[1], acc[4 * j + 2]);
      acc[4 * j + 3] = fmaf(pacc[4 * j + 3], fold_scale[1], acc[4 * j + 3]);
    }
  };

  // ---- main loop: one k-tile per iteration -----------------------------------------------------
  // The ring: k-tile it (local index) in stage it % kStages; full barriers count one arrival (the
  // arming lane's) plus the bytes, empty barriers one arrival per warp. Running indices, no division.
  int compute_stage = 0, release_stage = 0, refill_stage = kStages - 2;
  // The empty barriers' first wait (parity 1, the phase before the first) passes at once: the stages
  // start free.
  uint32_t compute_parity = 0, refill_parity = 1;
  // BUF: which of the two A register sets (the other may still be read by wgmmas in flight).
  uint32_t a_sets[2][4][4];
  auto tile_step = [&](auto buf_tag, int it) {
    uint32_t (&a)[4][4] = a_sets[decltype(buf_tag)::value];
    if constexpr (kFoldScale) {
      wgmma_wait<1>();  // k-tile it - 2 is done in this warpgroup (it - 1 may still run)
    } else {
      // bf16: drained every k-tile, so that a fold may read pacc (a conditional drain before the fold
      // made ptxas serialize the wgmmas, C7514).
      wgmma_wait<0>();
      fence_registers(pacc);
    }
    mbarrier_wait(full0 + 8 * compute_stage, compute_parity);
    const int stage = compute_stage;
    if (++compute_stage == kStages) {
      compute_stage = 0;
      compute_parity ^= 1;
    }
    [[maybe_unused]] const int kt = kt_begin + it;
    const uint32_t xs = smem0 + stage * Cfg::kStageBytes;
    const uint32_t ws = xs + Cfg::kXBytes;
    const uint32_t ss = ws + Cfg::kWBytes;
    [[maybe_unused]] const uint32_t zs = ss + Cfg::kSBytes;

    // Per k-tile, once: (MAGIC + zero) and the scale of channels ch0 (jn = 0) and ch0 + 8 (jn = 1), as pairs of
    // equal halves, for the k-tile's one row (two with group 32: k16 steps 2 and 3 take row 1).
    uint32_t zero_pairs[2][2], scale_pairs[2][2] = {};
#pragma unroll
    for (int row = 0; row < 2; ++row) {
#pragma unroll
      for (int jn = 0; jn < 2; ++jn) {
        if (row == 1 && !g32) {
          zero_pairs[1][jn] = zero_pairs[0][jn];
          scale_pairs[1][jn] = scale_pairs[0][jn];
          continue;
        }
        [[maybe_unused]] const int offset = row * kWgChannels * 2 + (ch0 + 8 * jn) * 2;
        if constexpr (ASYM) {
          const uint32_t z = zero_bits(ld_shared_u16(zs + offset));
          zero_pairs[row][jn] = Tr::add2(Tr::kMagic, z | (z << 16));
        } else {
          zero_pairs[row][jn] = static_cast<uint32_t>(Tr::kMagicPlus8) * 0x10001u;
        }
        if constexpr (kFoldScale) scale_pairs[row][jn] = scale_bits(ld_shared_u16(ss + offset)) * 0x10001u;
      }
    }
    const uint4 wq = ld_shared_v4(ws + warp * kUnitBytes + lane * 16);
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      const int row = kk >> 1;
      const uint32_t q = kk == 0 ? wq.x : kk == 1 ? wq.y : kk == 2 ? wq.z : wq.w;
#pragma unroll
      for (int i = 0; i < 4; ++i) {  // register i: channel ch0 + 8 (i & 1), k + 8 (i >> 1)
        a[kk][i] = Tr::sub2(and_or(q >> (4 * i), 0x000F000Fu, Tr::kMagic), zero_pairs[row][i & 1]);
        if constexpr (kFoldScale) a[kk][i] = mul2_f16(a[kk][i], scale_pairs[row][i & 1]);
      }
    }
    uint64_t desc[4];
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) desc[kk] = smem_descriptor(xs + kk * 32);
    // Everything the wgmmas read is defined before the fence and pinned there: a register defined
    // between a wgmma fence and its wait makes ptxas serialize the wgmmas (warning C7513).
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      pin_operands(a[kk]);
      asm volatile("" : "+l"(desc[kk])::"memory");
    }

    if constexpr (kFoldScale) {
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) wgmma_rs<T, TOKENS, 1>(acc, a[kk], desc[kk]);
      wgmma_commit();
    } else {
      // Groups start at k16 steps 0 (and 2 with group 32) of a k-tile; a split may also start inside
      // one. There the previous group is folded (its wgmmas have all been waited for: at the top of
      // this k-tile, or just before step 2) and pacc is zeroed, both right after a wait and before
      // the fence; the wgmma itself is the same on every path (a branch choosing between wgmma
      // variants made ptxas insert warpgroup arrives and serialize them, C7519/C7520).
      auto start_group = [&](int row) {
        if (group_open) fold();
#pragma unroll
        for (int i = 0; i < kPartial; ++i) pacc[i] = 0.0f;
        fold_scale[0] = Tr::to_float2(ld_shared_u16(ss + row * kWgChannels * 2 + ch0 * 2)).x;
        fold_scale[1] = Tr::to_float2(ld_shared_u16(ss + row * kWgChannels * 2 + (ch0 + 8) * 2)).x;
        group_open = true;
      };
      if ((kt & ((1u << group_shift) - 1)) == 0 || it == 0) start_group(0);
      wgmma_fence();
      wgmma_rs<T, TOKENS, 1>(pacc, a[0], desc[0]);
      wgmma_rs<T, TOKENS, 1>(pacc, a[1], desc[1]);
      if (g32) {  // group 32: the second half of the k-tile is a new group
        wgmma_commit();
        wgmma_wait<0>();
        fence_registers(pacc);
        start_group(1);
        wgmma_fence();
      }
      wgmma_rs<T, TOKENS, 1>(pacc, a[2], desc[2]);
      wgmma_rs<T, TOKENS, 1>(pacc, a[3], desc[3]);
      wgmma_commit();
    }
    // This warp is done with k-tile it - 2's stage (the wait at the top retired its wgmmas); once every
    // warp is, warp 0 refills it with k-tile it + kStages - 2. No block barrier: the other warps go on.
    // (After this k-tile's wgmmas are issued, so that warp 0's wait overlaps them.)
    if (it >= 2) {
      if (elect_one_lane()) mbarrier_arrive(empty0 + 8 * release_stage);
      release_stage = release_stage == kStages - 1 ? 0 : release_stage + 1;
    }
    if (warp == 0 && it + kStages - 2 < nk) {
      if (elect_one_lane()) {
        mbarrier_wait(empty0 + 8 * refill_stage, refill_parity);
        issue_copies(refill_stage, kt_begin + it + kStages - 2);
      }
    }
    if (++refill_stage == kStages) {
      refill_stage = 0;
      refill_parity ^= 1;
    }
  };
  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbarrier_init(full0 + 8 * s, 1);
      mbarrier_init(empty0 + 8 * s, kWgStrips);
    }
    mbarrier_init_fence();
    for (int s = 0; s < kStages - 2 && s < nk; ++s) issue_copies(s, kt_begin + s);
  }
  // A box of fewer rows than the tile (one token tile of M < TOKENS tokens): the copies never write the tile's
  // rows from x_box_rows on, so they are zeroed once in every stage, as the copy's out-of-bounds fill would be.
  const int pad_offset = p.x_box_rows * kBK * 2, pad_bytes = Cfg::kXBytes - pad_offset;
  if (pad_bytes > 0) {
    for (int s = 0; s < kStages; ++s) {
      const uint32_t pad = smem0 + s * Cfg::kStageBytes + pad_offset;
      for (int i = 16 * tid; i < pad_bytes; i += 16 * kWgThreads) {
        asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};\n" ::"r"(pad + i), "r"(0u) : "memory");
      }
    }
    fence_proxy_async_shared();  // before the wgmmas read them
  }
  __syncthreads();  // the barriers are initialized (and the padding rows zeroed) before any wait
  // Pairs of k-tiles (the two A register sets), then an odd last one: no branch inside the pair
  // (a conditional second step made ptxas serialize the wgmmas).
  int it = 0;
  for (; it + 1 < nk; it += 2) {
    tile_step(std::integral_constant<int, 0>{}, it);
    tile_step(std::integral_constant<int, 1>{}, it + 1);
  }
  if (it < nk) tile_step(std::integral_constant<int, 0>{}, it);
  wgmma_wait<0>();
  fence_registers(acc);
  fence_registers(pacc);
  if constexpr (!kFoldScale) fold();  // the last group

  // ---- split K: publish the partial tile in fragment order; the last block sums in split order ----
  const int tile = token_tile * gridDim.x + block_n;
  if (p.splits > 1) {
    float4* part =
        reinterpret_cast<float4*>(p.partials) + static_cast<int64_t>(tile) * p.splits * (kAcc / 4) * kWgThreads;
#pragma unroll
    for (int i = 0; i < kAcc / 4; ++i) {
      __stcg(part + (static_cast<int64_t>(split) * (kAcc / 4) + i) * kWgThreads + tid,
             make_float4(acc[4 * i], acc[4 * i + 1], acc[4 * i + 2], acc[4 * i + 3]));
    }
    if (!split_k_is_last_block(p.locks + tile, p.splits, &s_is_last)) return;
#pragma unroll
    for (int i = 0; i < kAcc; ++i) acc[i] = 0.0f;
    for (int sp = 0; sp < p.splits; ++sp) {
#pragma unroll
      for (int i = 0; i < kAcc / 4; ++i) {
        const float4 v = __ldcg(part + (static_cast<int64_t>(sp) * (kAcc / 4) + i) * kWgThreads + tid);
        acc[4 * i] += v.x;
        acc[4 * i + 1] += v.y;
        acc[4 * i + 2] += v.z;
        acc[4 * i + 3] += v.w;
      }
    }
    if (tid == 0) p.locks[tile] = 0;  // ready for the next call (kernels on one stream run in order)
  }

  // ---- epilogue: bias, convert, stage as [token][channel], coalesced 16-byte stores ------------
  // (STAGED: the token's multiplier undoes its staging shift and the scales'; exact powers of two; y is bf16.)
  using OutT = std::conditional_t<STAGED, __nv_bfloat16, T>;
  using OutTr = W4Traits<OutT>;
  __syncthreads();  // every warpgroup is done with the stages
  const OutT* __restrict__ bias = static_cast<const OutT*>(p.bias);
  float b0 = 0.0f, b1 = 0.0f;
  if (bias != nullptr) {
    const int c0 = min(n0 + ch0, p.N - 1), c1 = min(n0 + ch0 + 8, p.N - 1);
    b0 = to_float(bias[c0]);
    b1 = to_float(bias[c1]);
  }
#pragma unroll
  for (int j = 0; j < kAcc / 4; ++j) {
    const int tok = 8 * j + 2 * t;
    if constexpr (STAGED) {
      const float r0 = p.row_scale[min(m0 + tok, p.M - 1)], r1 = p.row_scale[min(m0 + tok + 1, p.M - 1)];
      acc[4 * j + 0] *= r0;
      acc[4 * j + 2] *= r0;
      acc[4 * j + 1] *= r1;
      acc[4 * j + 3] *= r1;
    }
    const uint32_t lo = OutTr::from_floats(acc[4 * j + 0] + b0, acc[4 * j + 2] + b1);  // token tok: channels g, g + 8
    const uint32_t hi = OutTr::from_floats(acc[4 * j + 1] + b0, acc[4 * j + 3] + b1);  // token tok + 1
    stage_output_pairs<kWgChannels>(smem0, tok, ch0, lo, hi);
  }
  __syncthreads();
  store_staged_tile<kWgChannels, TOKENS, kWgThreads>(smem0, p.y, p.M, p.N, m0, n0);
#endif  // QK_HAS_WGMMA
}

// ---------------------------------------------------------------------------------------------
// bf16 activations staged as fp16
// ---------------------------------------------------------------------------------------------
// Why: scaled weights rounded to bf16 would cost ~1.4e-3 relative error (2.2e-3 with y's own bf16 rounding, over
// the 2e-3 bound; a CPU emulation), so the bf16 kernel above keeps per-group partial sums and drains its wgmmas
// every k-tile: 0.67-0.72x of cuBLAS bf16 at M = 2048 on the H100 (session 21), where fp16 runs at 1.02-1.06x of
// cuBLAS fp16. A bf16 row times the power of two that brings its largest magnitude into [2^14, 2^15) is exactly
// an fp16 row (8 significant bits fit in 11; only values more than 2^28 below the row's largest become fp16
// subnormals, their error below 2^-39 of it), so such rows run the fp16 kernel, which multiplies by the inverse
// power of two (and the scales' 2^-kStagedScaleShift) in its epilogue and writes bf16. The weight operand
// (code - zero) * scale is rounded to fp16's 11 bits where it needs 12 (with zero points: 1.1e-4 relative error
// before y's rounding, in an emulation; exact without). Staged (H100, session 21, docs/PERF.md): 0.88-0.98x of
// cuBLAS bf16 at M = 2048 on the six Llama shapes, 0.89-0.99x at M = 512 on the five larger ones.
// One block per row, 16-byte vectors: the row's absolute maximum (NaNs skipped: they stay NaN), then the scaled
// conversion, the row read twice (the second time from L1/L2).
constexpr int kStageThreads = 128;

__global__ void __launch_bounds__(kStageThreads)
    stage_bf16_rows_kernel(const uint4* __restrict__ x, uint4* __restrict__ x16, float* __restrict__ row_scale,
                           int vecs_per_row) {
  const int64_t base = static_cast<int64_t>(blockIdx.x) * vecs_per_row;
  const int tid = threadIdx.x;
  auto bf16_pair = [](uint32_t w) { return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xFFFF0000u)); };
  float amax = 0.0f;
  for (int v = tid; v < vecs_per_row; v += kStageThreads) {
    const uint4 u = x[base + v];
    for (const uint32_t w : {u.x, u.y, u.z, u.w}) {
      const float2 f = bf16_pair(w);
      amax = fmaxf(amax, fmaxf(fabsf(f.x), fabsf(f.y)));
    }
  }
  __shared__ float warp_max[kStageThreads / kWarpSize];
  amax = group_reduce_max<kStageThreads>(amax, warp_max);  // (no NaN reaches it: fmaxf above skipped them)
  // amax in [2^e, 2^(e+1)) -> multiplier 2^(14 - e); rows of zeros or with an infinity keep 2^0. Rows below
  // 2^-113 (bf16 reaches 2^-133) are scaled as if at 2^-113: the multiplier stays within fp32 (2^127) and the
  // output multiplier 2^(e - 14 - kStagedScaleShift) >= 2^-135 an exact fp32 subnormal.
  int shift = 0;
  if (amax > 0.0f && amax <= 3.3895314e38f) shift = 14 - max(ilogbf(amax), -113);
  const float multiplier = ldexpf(1.0f, shift);
  if (tid == 0) row_scale[blockIdx.x] = ldexpf(1.0f, -shift - kStagedScaleShift);
  for (int v = tid; v < vecs_per_row; v += kStageThreads) {
    const uint4 u = x[base + v];
    uint32_t out[4];
    int i = 0;
    for (const uint32_t w : {u.x, u.y, u.z, u.w}) {
      const float2 f = bf16_pair(w);
      const __half2 h = __floats2half2_rn(f.x * multiplier, f.y * multiplier);
      out[i++] = *reinterpret_cast<const uint32_t*>(&h);
    }
    x16[base + v] = make_uint4(out[0], out[1], out[2], out[3]);
  }
}

// Rows of x's copy box: the token tile's, or with one tile of fewer tokens (M < TOKENS) M rounded up to 8 (the
// kernel zeroes the tile's other rows once). A box reaching past M has the copy engine fill the missing rows with
// zeros on every copy, and that was slow: H100, fp16 g128, M = 17 on 64-token tiles, 8192 x 28672 96.0 us with the
// whole box against 74.2 with a box of 24 rows (4096 x 14336 30.0 against 23.8; docs/PERF.md, session 25).
int x_box_rows(int M, int tokens) { return M < tokens ? (M + 7) / 8 * 8 : tokens; }

// The TMA descriptor of x [M, K] for boxes of box_rows rows x 64 k with the 128-byte swizzle (host; encoded per
// call, since x changes).
CUtensorMap make_x_map(const void* x, int M, int K, bool bf16, int box_rows) {
  const CUtensorMapDataType dtype = bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  return encode_tensor_map_2d("quantkern::w4a16_gemm", dtype, x, K, M, static_cast<int64_t>(K) * 2, kBK, box_rows,
                              CU_TENSOR_MAP_SWIZZLE_128B);
}

// The weights' map: qweight [N/16, K/64, 32] uint4 as N/16 rows of 2K int32, boxes of the block's 8 strips x
// one k-tile's 512 bytes. The scales' (zeros') map: [G, N] 16-bit, boxes of 128 channels x the k-tile's
// rows (two with group 32, else one).
CUtensorMap make_w_map(const WgmmaParams& p) {
  const int64_t row_words = 2 * static_cast<int64_t>(p.K);  // one strip: K / 64 units of 128 int32
  return encode_tensor_map_2d("quantkern::w4a16_gemm", CU_TENSOR_MAP_DATA_TYPE_INT32, p.qweight, row_words, p.N / 16,
                              row_words * 4, kUnitBytes / 4, kWgStrips, CU_TENSOR_MAP_SWIZZLE_NONE);
}
CUtensorMap make_scale_map(const void* scales, const WgmmaParams& p, bool bf16) {
  const CUtensorMapDataType dtype = bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  return encode_tensor_map_2d("quantkern::w4a16_gemm", dtype, scales, p.N, p.K / p.group_len,
                              static_cast<int64_t>(p.N) * 2, kWgChannels, p.group_len == 32 ? 2 : 1,
                              CU_TENSOR_MAP_SWIZZLE_NONE);
}

template <typename T, int TOKENS, bool STAGED = false>
void launch_typed(const WgmmaParams& p, cudaStream_t stream) {
  constexpr int smem = WgmmaConfig<TOKENS>::kSmemBytes;
  constexpr bool kBf16 = !std::is_same_v<T, __half>;
  const dim3 grid((p.N + kWgChannels - 1) / kWgChannels, (p.M + TOKENS - 1) / TOKENS, p.splits);
  WgmmaParams q = p;
  q.x_box_rows = x_box_rows(p.M, TOKENS);
  const CUtensorMap x_map = make_x_map(p.x, p.M, p.K, kBf16, q.x_box_rows);
  const CUtensorMap w_map = make_w_map(p);
  // (STAGED: the scales and zeros are bf16, converted in the kernel)
  const CUtensorMap s_map = make_scale_map(p.scales, p, kBf16 || STAGED);
  const CUtensorMap z_map =
      p.zeros != nullptr ? make_scale_map(p.zeros, p, kBf16 || STAGED) : s_map;  // (unused if symmetric)
  auto launch = [&](auto kernel) {
    // Not a stream operation: fine during CUDA graph capture.
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    kernel<<<grid, kWgThreads, smem, stream>>>(q, x_map, w_map, s_map, z_map);
  };
  if (p.zeros != nullptr) {
    launch(w4a16_wgmma_kernel<T, TOKENS, true, STAGED>);
  } else {
    launch(w4a16_wgmma_kernel<T, TOKENS, false, STAGED>);
  }
  QK_CHECK_LAUNCH();
}

}  // namespace

void stage_bf16_rows(const void* x, void* x16, float* row_scale, int M, int K, cudaStream_t stream) {
  stage_bf16_rows_kernel<<<M, kStageThreads, 0, stream>>>(static_cast<const uint4*>(x), static_cast<uint4*>(x16),
                                                          row_scale, K / 8);
  QK_CHECK_LAUNCH();
}

int64_t wgmma_workspace_floats(const WgmmaParams& p, int tokens) {
  const int64_t tiles = static_cast<int64_t>((p.N + kWgChannels - 1) / kWgChannels) * ((p.M + tokens - 1) / tokens);
  return p.splits > 1 ? tiles * p.splits * kWgChannels * tokens : 0;
}

int wgmma_blocks_per_sm(bool bf16, int tokens) {
  if (bf16) {
    return tokens == 64 ? WgmmaConfig<64>::blocks_per_sm<__nv_bfloat16>()
                        : WgmmaConfig<128>::blocks_per_sm<__nv_bfloat16>();
  }
  return tokens == 64 ? WgmmaConfig<64>::blocks_per_sm<__half>()
         : tokens == 128 ? WgmmaConfig<128>::blocks_per_sm<__half>() : WgmmaConfig<256>::blocks_per_sm<__half>();
}

void launch_wgmma(bool bf16, int tokens, const WgmmaParams& p, cudaStream_t stream, bool staged) {
  TORCH_CHECK(tokens == 64 || tokens == 128 || (tokens == 256 && (!bf16 || staged)),
              "quantkern::w4a16_gemm: the wgmma kernel has tiles of 64 or 128 tokens, and 256 in fp16; got ", tokens);
  if (staged) {  // x: the fp16 copy of bf16 activations (stage_bf16_rows); y, scales, zeros, bias: bf16
    tokens == 64    ? launch_typed<__half, 64, true>(p, stream)
    : tokens == 128 ? launch_typed<__half, 128, true>(p, stream)
                    : launch_typed<__half, 256, true>(p, stream);
  } else if (bf16) {
    tokens == 64 ? launch_typed<__nv_bfloat16, 64>(p, stream) : launch_typed<__nv_bfloat16, 128>(p, stream);
  } else if (tokens == 64) {
    launch_typed<__half, 64>(p, stream);
  } else if (tokens == 128) {
    launch_typed<__half, 128>(p, stream);
  } else {
    launch_typed<__half, 256>(p, stream);
  }
}

}  // namespace w4a16
}  // namespace quantkern
