// The integer GEMM for few tokens (decode) on Hopper: W8A8 and W4A8 with int8 mma.sync, and W4A4 (Hopper has
// no int4 tensor cores) on its packed int4 codes, widened to int8 in registers like the weights. Semantics,
// weight layouts and operand checks are those of csrc/int_gemm.cu, whose host function calls launch() for
// M <= kMaxTokens, per-channel weights on an sm_90 GPU, and int8 activations or packed int4 ones with int4
// weights in the W4A8 layout; this file holds the kernel.
//
// Why: at M <= 16 the op streams the weights and little else. The mma.sync tiles of csrc/int_gemm.cu
// move them through a cp.async ring in shared memory with a barrier per k-tile, and split K with int32
// atomics into a zeroed workspace plus a separate epilogue kernel (three launches): 1.9 TB/s of weights
// at 8192 x 8192 on the H100. Here:
//
// Operands swapped: the weights are the mma's A operand (16 channels x 32 k), the tokens its B operand
//   (32 k x 8 tokens); mma.m16n8k32.s8 gives D[channel][token] in int32.
// Weights straight to registers: a lane's A fragments of one k-tile (128 k) of a 16-channel strip are
//   16-byte loads (ld.global.nc, L1 bypassed) of rows g and g + 8 of the tiled weight unit, coalesced:
//   int4 (64-byte rows): chunk t (k 32t..32t+31, the W4A8 layout's permuted nibbles) of each row; word s
//   of the chunk is the k32 step s (lo = (w << 4) & 0xF0F0F0F0 -> a0/a1, hi = w & 0xF0F0F0F0 -> a2/a3:
//   int8 lanes at 16 x the nibble, exact; the sum is shifted back at the end).
//   int8 (128-byte rows): chunks t and 4 + t; step s takes words 2(s % 2), 2(s % 2) + 1 of chunk s / 2.
//   Which k lands in which mma slot differs from the natural fragment order; a dot product does not
//   care as long as the activations follow: lane t's B fragment for step s is read from the same k,
//   so each lane loads the matching 2 x 16 bytes of each of its token rows (L1/L2 hits: every warp of
//   the block, and every block, reads the same activations).
// Packed int4 activations (W4A4, ABITS = 4; quantize_per_token's packed codes, code 2i in byte i's low
//   nibble): lane t loads the 16 bytes of k 32t..32t+31 of each token row, and step s widens the nibbles
//   of k 32t+4s..+3 (b0) and 32t+16+4s..+3 (b1) to int8 lanes at 16 x the code (a byte permute of the word
//   and its copy shifted by 4, then a mask): the same k as the W4A8 weights' fragments. Both operands at
//   16 x their values: the sums are shifted back by 8. Half the activation bytes and registers of int4 codes
//   stored one per byte, so these instances hold 16 warps per SM at two token tiles too (3 stages, 119
//   registers) where the byte codes' held 8 (182): H100, W4A4 linear at 16 tokens, 8192 x 28672 54.1 -> 45.5 us,
//   8192 x 8192 19.4 -> 17.8 (two machines of one kind; docs/PERF.md, session 30).
// Pipeline: STAGES k-tiles of weights and activations in registers, the next k-tile's loads issued as
//   soon as a stage is consumed; no shared memory and no barrier in the main loop. The first stages'
//   weight loads are issued before griddepcontrol.wait, so under programmatic dependent launch (the
//   quantization kernel before it triggers early) they overlap the previous kernel.
// Tiling: a block is WARPS warps (1, 2, 4, 8 or 16) on the same 32 channels (2 strips: rows 32h..32h+31
//   of weight unit u, block x = 2u + h) and 16 tokens (one or two n8 token tiles: M <= 8 uses one); the
//   block's k-tiles are dealt round-robin to its warps, which add their int32 sums into the block's tile
//   in shared memory (atomics: exact in any order). Grid (ceil(N / 32), splits, ceil(M / 16)). plan()
//   takes the most warps per block with which the blocks run in one wave (warps_per_sm: what the
//   instances' registers allow), as csrc/w4a16_small_m.cu does: more warps on fewer k-tiles each.
//   (Before, a block was 4 warps on 128 channels, each warp on its own 32 channels over the whole K
//   range, and K was split over a cluster to fill the GPU. H200, GEMM alone, W4A4 M = 1, same process:
//   8192 x 8192 14.0 -> 11.5 us, 14336 x 4096 12.9 -> 10.5, 896 x 4864 5.1 -> 3.3, 8192 x 28672 33.5 ->
//   32.4; W8A8 M = 16 8192 x 8192 27.1 -> 20.5; 8192 x 28672 3-4% slower in W4A4 at M = 16 and in W8A8
//   (docs/PERF.md, session 9).)
// Split K in a cluster, where the blocks alone leave SMs idle (few channels): the `splits` blocks of a
//   cluster (along grid.y, at most 8; without a split the launch takes no cluster attribute, which cost ~1 us)
//   take contiguous k-tile ranges; each holds its int32 tile in its own shared memory, the cluster syncs, and
//   block r reduces its share of the tile's 4-channel vectors over the cluster's blocks (distributed shared
//   memory, exact int32 sums), applies the epilogue and writes y with 8-byte stores. One launch, no workspace,
//   no counters.
// Epilogue: y = (float(acc) * w_scale[n]) * a_scale[m] + bias[n], each step rounded to fp32 like the
//   reference (bit-identical), then cast.
//
// Compiled without --use_fast_math. Below sm_90 (no clusters) the kernel body is empty and the host
// never launches it.

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include <cooperative_groups.h>

#include <c10/cuda/CUDAException.h>

#include "common.cuh"
#include "int_small_m.cuh"

namespace quantkern {
namespace int_small_m {
namespace {

namespace cg = cooperative_groups;

constexpr int kStripsPerWarp = 2;  // 16-channel strips
constexpr int kUnitRows = 64;      // rows of one weight unit (csrc/int_gemm.cu's tiled layout)
constexpr int kTileK = 128;        // k per k-tile: one unit's width

static_assert(kChannels == kStripsPerWarp * 16, "a warp covers the block's channels");

template <int WBITS, int ABITS>
struct Layout {
  static_assert(ABITS == 8 || (ABITS == 4 && WBITS == 4), "packed int4 activations go with int4 weights");
  static constexpr int kRowBytes = kTileK * WBITS / 8;         // 64 (int4) or 128 (int8)
  static constexpr int kUnitBytes = kUnitRows * kRowBytes;     // 4 or 8 KB
  static constexpr int kChunks = WBITS == 4 ? 1 : 2;           // 16-byte loads per row per k-tile
  static constexpr int kStages = ABITS == 4 ? 3 : (WBITS == 4 ? 4 : 3);  // k-tiles in registers
  static constexpr int kXPieces = ABITS == 4 ? 1 : 2;          // 16-byte activation loads per token row per k-tile
  // Byte offsets (within a token row's k-tile) of lane t's 16-byte activation pieces.
  __device__ static int x_offset(int t, int piece) {
    return ABITS == 4 ? 16 * t : (WBITS == 4 ? 32 * t + 16 * piece : 16 * t + 64 * piece);
  }
  // The first k of lane t's piece (a piece is wholly inside or outside K, a multiple of 32).
  __device__ static int x_first_k(int t, int piece) { return ABITS == 4 ? 32 * t : x_offset(t, piece); }
  // Byte offset (within a 128-byte-or-less weight row) of lane t's chunk c.
  __device__ static int w_offset(int t, int c) { return 16 * t + 64 * c; }
};

// One pipeline stage of a warp: its weight fragments (2 strips x rows g / g + 8 x chunks) and
// activation pieces (token tiles x pieces) for one k-tile.
template <int WBITS, int ABITS, int TOKEN_TILES>
struct Stage {
  uint4 w[kStripsPerWarp][2][Layout<WBITS, ABITS>::kChunks];
  uint4 x[TOKEN_TILES][Layout<WBITS, ABITS>::kXPieces];
};

// The device helpers exist only where the kernel has a body (sm_90 and up).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define QK_SMALL_M_BODY 1
#else
#define QK_SMALL_M_BODY 0
#endif

#if QK_SMALL_M_BODY
__device__ __forceinline__ uint32_t word(const uint4& v, int i) {
  return i == 0 ? v.x : (i == 1 ? v.y : (i == 2 ? v.z : v.w));
}

// Widen 8 signed nibbles (one word) to two words of 4 int8 lanes, each 16 x its nibble.
__device__ __forceinline__ uint32_t widen_lo(uint32_t w) { return (w << 4) & 0xF0F0F0F0u; }
__device__ __forceinline__ uint32_t widen_hi(uint32_t w) { return w & 0xF0F0F0F0u; }
// Widen the 4 packed codes of halfword `half` of w (natural order: code 2i in byte i's low nibble) to 4 int8
// lanes, each 16 x its code; shifted = w << 4 (shared by both halves).
__device__ __forceinline__ uint32_t widen_half(uint32_t w, uint32_t shifted, int half) {
  // Bytes (shifted.b, w.b, shifted.b+1, w.b+1), b = 2 half: codes 4 half + 0..3 in the high nibbles.
  return __byte_perm(w, shifted, half == 0 ? 0x1504u : 0x3726u) & 0xF0F0F0F0u;
}

// Activations: 16 bytes, or zeros when !ok (a predicated load: nothing waits for it before its use).
__device__ __forceinline__ uint4 load_act(const uint8_t* p, bool ok) {
  uint4 v;
  asm volatile(
      "{\n .reg .pred q;\n setp.ne.b32 q, %5, 0;\n"
      " mov.b32 %0, 0;\n mov.b32 %1, 0;\n mov.b32 %2, 0;\n mov.b32 %3, 0;\n"
      " @q ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];\n}\n"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p), "r"(static_cast<int>(ok)));
  return v;
}

// D = A * B + D, m16n8k32, int8 x int8 -> int32.
__device__ __forceinline__ void mma_s8(int (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Four outputs (8 bytes, 8-byte aligned), each rounded to nearest even.
template <typename OutT>
__device__ __forceinline__ void store4(OutT* p, const float (&v)[4]) {
  OutT h[4];
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    if constexpr (std::is_same_v<OutT, __half>) {
      h[e] = __float2half_rn(v[e]);
    } else {
      h[e] = __float2bfloat16_rn(v[e]);
    }
  }
  *reinterpret_cast<uint2*>(p) = *reinterpret_cast<const uint2*>(h);
}
#endif  // QK_SMALL_M_BODY

// Warps per SM each instance is built for (its launch bound, with blocks of up to that many warps; a block of 8
// warps where this is 12 runs one to an SM). Int8 activations: 16 for int4 weights at one token tile (126
// registers), 12 for int8 at one (146-170), 8 for int8 at two (about 180; at 12 they spilled 36-44 bytes); int4
// at two tiles: 8 (up to 255 registers) except for blocks of 2 warps, 12, so that grids of ~600 blocks still run in
// one wave. (At 12 for every width the 170-register cap changed the 1- and 4-warp blocks' code: H200, W4A4 M = 16,
// GEMM alone, 8192 x 8192 15.7 us against 14.5 at 8, 8192 x 28672 52.2 against 48.2; at 8 the 2-warp blocks of
// 3584 x 18944 took two waves: 22.5 against 15.3. docs/PERF.md, sessions 9 and 10.) Packed int4 activations: 16 at
// both token tile counts (95 and 119 registers).
constexpr int warps_per_sm(int w_bits, int a_bits, int token_tiles, int warps) {
  if (a_bits == 4) return 16;
  if (w_bits == 4) return token_tiles == 1 ? 16 : (warps == 2 ? 12 : 8);
  return token_tiles == 1 ? 12 : 8;
}
// Blocks of `warps` warps an SM holds.
constexpr int blocks_per_sm(int w_bits, int a_bits, int token_tiles, int warps) {
  return std::max(1, warps_per_sm(w_bits, a_bits, token_tiles, warps) / warps);
}

// OutT int: the raw int32 sums (test hook). ABITS: 8 (int8 codes, one per byte) or 4 (packed int4 codes).
// TOKEN_TILES: n8 token tiles per block (1 for M <= 8). WARPS: warps per block, all on the block's 32 channels,
// taking its k-tiles round-robin.
template <int WBITS, int ABITS, int TOKEN_TILES, int WARPS, typename OutT>
__global__ void __launch_bounds__(WARPS * 32, blocks_per_sm(WBITS, ABITS, TOKEN_TILES, WARPS))
    int_small_m_kernel(const Params p) {
#if QK_SMALL_M_BODY
  using L = Layout<WBITS, ABITS>;
  using StageT = Stage<WBITS, ABITS, TOKEN_TILES>;
  constexpr int kThreads = WARPS * 32;
  constexpr int kStages = L::kStages;
  constexpr int kRows = 8 * TOKEN_TILES;  // token rows of the block's tile
  // Widened nibbles are 16 x their value, in the weights and (ABITS 4) in the activations.
  constexpr int kShift = (WBITS == 4 ? 4 : 0) + (ABITS == 4 ? 4 : 0);
  constexpr int kPartStride = kChannels + 4;  // int32 row stride of the block's tile: lanes hit distinct banks
  __shared__ __align__(16) int part[kRows][kPartStride];

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const cg::cluster_group cluster = cg::this_cluster();
  const int splits = static_cast<int>(cluster.num_blocks());
  const int rank = static_cast<int>(cluster.block_rank());
  const int n0 = blockIdx.x * kChannels;
  const int m0 = blockIdx.z * kTokens;
  const int kt_begin = blockIdx.y * p.tiles_per_split;
  const int kt_end = min(kt_begin + p.tiles_per_split, p.k_tiles);
  // This warp's k-tiles: kt_begin + warp + i * WARPS for i < my_tiles.
  const int my_tiles = max(0, (kt_end - kt_begin - warp + WARPS - 1) / WARPS);

  // The block's channels: rows 32 * (blockIdx.x % 2) .. + 31 of weight unit blockIdx.x / 2 (the grid has
  // ceil(N / 32) blocks along x, so that unit exists: the layout pads N to whole 64-row units).
  const uint8_t* w_lane = static_cast<const uint8_t*>(p.w) +
                          static_cast<int64_t>(blockIdx.x / 2) * p.k_tiles * L::kUnitBytes +
                          (32 * (blockIdx.x % 2) + g) * L::kRowBytes;
  const uint8_t* x_row[TOKEN_TILES];
  bool x_ok[TOKEN_TILES];
#pragma unroll
  for (int tt = 0; tt < TOKEN_TILES; ++tt) {
    const int m = m0 + 8 * tt + g;
    x_ok[tt] = m < p.M;
    x_row[tt] = static_cast<const uint8_t*>(p.a) +
                static_cast<int64_t>(x_ok[tt] ? m : 0) * (ABITS == 8 ? p.K : p.K / 2);  // (row bytes)
  }

  // The warp's i-th k-tile into st (nothing past its tiles).
  auto load_weights = [&](StageT& st, int i) {
    if (i < my_tiles) {
      const uint8_t* base = w_lane + static_cast<int64_t>(kt_begin + warp + i * WARPS) * L::kUnitBytes;
#pragma unroll
      for (int s = 0; s < kStripsPerWarp; ++s)
#pragma unroll
        for (int r = 0; r < 2; ++r)
#pragma unroll
          for (int c = 0; c < L::kChunks; ++c)
            st.w[s][r][c] = load_stream_v4(base + (16 * s + 8 * r) * L::kRowBytes + L::w_offset(t, c));
    }
  };
  auto load_acts = [&](StageT& st, int i) {
    if (i < my_tiles) {
      const int kt = kt_begin + warp + i * WARPS;
#pragma unroll
      for (int tt = 0; tt < TOKEN_TILES; ++tt)
#pragma unroll
        for (int piece = 0; piece < L::kXPieces; ++piece) {
          const int k = kt * kTileK + L::x_first_k(t, piece);  // the piece's first k
          const int byte = kt * (kTileK * ABITS / 8) + L::x_offset(t, piece);  // (a token row's k-tile bytes)
          st.x[tt][piece] = load_act(x_row[tt] + byte, x_ok[tt] && k < p.K);
        }
    }
  };

  int acc[kStripsPerWarp][TOKEN_TILES][4] = {};

  auto compute = [&](const StageT& st) {
#pragma unroll
    for (int step = 0; step < 4; ++step) {
      uint32_t b[TOKEN_TILES][2];
#pragma unroll
      for (int tt = 0; tt < TOKEN_TILES; ++tt) {
        if constexpr (ABITS == 4) {
          // k 32t+4s..+3: halfword s % 2 of word s / 2; k 32t+16+4s..+3: the same halfword of word 2 + s / 2.
          const uint32_t lo = word(st.x[tt][0], step / 2), hi = word(st.x[tt][0], 2 + step / 2);
          b[tt][0] = widen_half(lo, lo << 4, step % 2);
          b[tt][1] = widen_half(hi, hi << 4, step % 2);
        } else if constexpr (WBITS == 4) {
          b[tt][0] = word(st.x[tt][0], step);
          b[tt][1] = word(st.x[tt][1], step);
        } else {
          b[tt][0] = word(st.x[tt][step / 2], 2 * (step % 2));
          b[tt][1] = word(st.x[tt][step / 2], 2 * (step % 2) + 1);
        }
      }
#pragma unroll
      for (int s = 0; s < kStripsPerWarp; ++s) {
        uint32_t a[4];
        if constexpr (WBITS == 4) {
          const uint32_t w0 = word(st.w[s][0][0], step), w1 = word(st.w[s][1][0], step);
          a[0] = widen_lo(w0);
          a[1] = widen_lo(w1);
          a[2] = widen_hi(w0);
          a[3] = widen_hi(w1);
        } else {
          a[0] = word(st.w[s][0][step / 2], 2 * (step % 2));
          a[1] = word(st.w[s][1][step / 2], 2 * (step % 2));
          a[2] = word(st.w[s][0][step / 2], 2 * (step % 2) + 1);
          a[3] = word(st.w[s][1][step / 2], 2 * (step % 2) + 1);
        }
#pragma unroll
        for (int tt = 0; tt < TOKEN_TILES; ++tt) mma_s8(acc[s][tt], a, b[tt][0], b[tt][1]);
      }
    }
  };

  for (int i = threadIdx.x; i < kRows * kPartStride; i += kThreads) (&part[0][0])[i] = 0;

  // ---- pipeline: weights first (independent of the previous kernel), then wait, then activations ----
  StageT stages[kStages];
#pragma unroll
  for (int i = 0; i < kStages; ++i) load_weights(stages[i], i);
  wait_for_prior_grids();  // no-op unless launched as a dependent
#pragma unroll
  for (int i = 0; i < kStages; ++i) load_acts(stages[i], i);

  for (int i0 = 0; i0 < my_tiles; i0 += kStages) {
#pragma unroll
    for (int j = 0; j < kStages; ++j) {
      if (i0 + j < my_tiles) {
        compute(stages[j]);
        load_weights(stages[j], i0 + j + kStages);
        load_acts(stages[j], i0 + j + kStages);
      }
    }
  }

  // ---- the warps' sums -> the block's tile in shared memory, [token][channel] (int32: exact in any order) --
  __syncthreads();  // (the tile is zeroed)
#pragma unroll
  for (int s = 0; s < kStripsPerWarp; ++s)
#pragma unroll
    for (int tt = 0; tt < TOKEN_TILES; ++tt)
#pragma unroll
      for (int e = 0; e < 4; ++e) atomicAdd(&part[8 * tt + 2 * t + (e & 1)][16 * s + g + 8 * (e >> 1)], acc[s][tt][e]);
  cluster.sync();  // every block's tile is complete (and visible across the cluster)

  // ---- this block's share of the tile: sum the cluster's tiles, epilogue, store ---------------------
  constexpr int kVectors = kRows * kChannels / 4;  // 4-channel vectors of the tile
  const int per_rank = (kVectors + splits - 1) / splits;
  const int v_end = min(kVectors, (rank + 1) * per_rank);
  for (int v = rank * per_rank + static_cast<int>(threadIdx.x); v < v_end; v += kThreads) {
    const int row = v / (kChannels / 4), col = 4 * (v % (kChannels / 4));
    const int m = m0 + row, n = n0 + col;
    if (m >= p.M || n >= p.N) continue;  // N % 8 == 0: a vector is wholly inside or outside
    int4 sum = make_int4(0, 0, 0, 0);
    for (int r = 0; r < splits; ++r) {
      const int4 x = *reinterpret_cast<const int4*>(cluster.map_shared_rank(&part[row][col], r));
      sum.x += x.x;
      sum.y += x.y;
      sum.z += x.z;
      sum.w += x.w;
    }
    const int sums[4] = {sum.x >> kShift, sum.y >> kShift, sum.z >> kShift, sum.w >> kShift};
    if constexpr (std::is_same_v<OutT, int>) {
      *reinterpret_cast<int4*>(static_cast<int*>(p.out) + static_cast<int64_t>(m) * p.N + n) =
          make_int4(sums[0], sums[1], sums[2], sums[3]);
    } else {
      const float sx = p.a_scale[m];
      float y[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        y[e] = __fmul_rn(__fmul_rn(static_cast<float>(sums[e]), p.w_scale[n + e]), sx);
        if (p.bias != nullptr) y[e] = __fadd_rn(y[e], p.bias[n + e]);
      }
      store4<OutT>(static_cast<OutT*>(p.out) + static_cast<int64_t>(m) * p.N + n, y);
    }
  }
  cluster.sync();  // no block leaves while another still reads its shared memory
#endif
}

template <int WBITS, int ABITS, int TOKEN_TILES, int WARPS, typename OutT>
void launch_kernel(const Params& p, int splits, cudaStream_t stream) {
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3((p.N + kChannels - 1) / kChannels, splits, (p.M + kTokens - 1) / kTokens);
  config.blockDim = dim3(WARPS * 32);
  config.dynamicSmemBytes = 0;
  config.stream = stream;
  // Programmatic dependent launch: the blocks may start while the previous kernel (the activation
  // quantization) finishes; they wait for it (griddepcontrol.wait) before reading its output.
  cudaLaunchAttribute attributes[2];
  attributes[0] = programmatic_launch_attribute();
  config.attrs = attributes;
  config.numAttrs = 1;
  // K split over a cluster (splits > 1). Without a split the launch takes no cluster attribute (the kernel's
  // cluster is then its own block, cluster.sync() a block barrier): a 1 x 1 x 1 cluster launch cost the GEMM about
  // 1 us (H100, W4A4 GEMM alone, M = 1: 8192 x 8192 14.4 -> 13.4 us, 4096 x 4096 6.3 -> 5.2; docs/PERF.md,
  // session 31).
  if (splits > 1) {
    attributes[1] = cluster_launch_attribute(1, static_cast<unsigned>(splits));
    config.numAttrs = 2;
  }
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, int_small_m_kernel<WBITS, ABITS, TOKEN_TILES, WARPS, OutT>, p));
}

template <int WBITS, int ABITS, int TOKEN_TILES, int WARPS>
void launch_out(bool raw, at::ScalarType out_dtype, const Params& p, int splits, cudaStream_t stream) {
  if (raw) {
    launch_kernel<WBITS, ABITS, TOKEN_TILES, WARPS, int>(p, splits, stream);
  } else if (out_dtype == at::kHalf) {
    launch_kernel<WBITS, ABITS, TOKEN_TILES, WARPS, __half>(p, splits, stream);
  } else {
    launch_kernel<WBITS, ABITS, TOKEN_TILES, WARPS, __nv_bfloat16>(p, splits, stream);
  }
}

template <int WBITS, int ABITS, int TOKEN_TILES>
void launch_warps(int warps, bool raw, at::ScalarType out_dtype, const Params& p, int splits, cudaStream_t stream) {
  if (warps == 1) {
    launch_out<WBITS, ABITS, TOKEN_TILES, 1>(raw, out_dtype, p, splits, stream);
  } else if (warps == 2) {
    launch_out<WBITS, ABITS, TOKEN_TILES, 2>(raw, out_dtype, p, splits, stream);
  } else if (warps == 4) {
    launch_out<WBITS, ABITS, TOKEN_TILES, 4>(raw, out_dtype, p, splits, stream);
  } else if (warps == 8) {
    launch_out<WBITS, ABITS, TOKEN_TILES, 8>(raw, out_dtype, p, splits, stream);
  } else {
    // 16-warp blocks are built only where the instance holds 16 warps per SM.
    constexpr bool kHas16 = warps_per_sm(WBITS, ABITS, TOKEN_TILES, 16) == 16;
    TORCH_CHECK(kHas16 && warps == 16, "int_small_m: no ", warps, "-warp instance for int", WBITS,
                " weights, ", ABITS, "-bit activations and ", TOKEN_TILES, " token tile(s)");
    if constexpr (kHas16) launch_out<WBITS, ABITS, TOKEN_TILES, 16>(raw, out_dtype, p, splits, stream);
  }
}

}  // namespace

Plan plan(int64_t M, int64_t N, int64_t K, int w_bits, int a_bits, int64_t split_k, int sm_count) {
  const int64_t k_tiles = (K + kTileK - 1) / kTileK;
  const int token_tiles = M <= 8 ? 1 : 2;
  const int64_t blocks = (N + kChannels - 1) / kChannels * ((M + kTokens - 1) / kTokens);
  Plan plan;
  // The most warps per block (16, 8, 4 or 2, at most warps_per_sm) with which the blocks run in one wave; one
  // warp when none does.
  plan.warps = 1;
  for (const int warps : {16, 8, 4, 2}) {
    if (warps <= warps_per_sm(w_bits, a_bits, token_tiles, warps) &&
        blocks <= static_cast<int64_t>(sm_count) * blocks_per_sm(w_bits, a_bits, token_tiles, warps)) {
      plan.warps = warps;
      break;
    }
  }
  // K split over a cluster where the blocks leave SMs idle: double it while the grid still runs in one wave and
  // each warp keeps at least two k-tiles.
  const int64_t wave = static_cast<int64_t>(sm_count) * blocks_per_sm(w_bits, a_bits, token_tiles, plan.warps);
  int64_t splits = split_k;
  if (splits <= 0) {
    splits = 1;
    while (splits < kMaxSplits && 2 * splits * blocks <= wave && k_tiles >= 2 * splits * 2 * plan.warps) {
      splits *= 2;
    }
  }
  splits = std::max<int64_t>(1, std::min<int64_t>({splits, kMaxSplits, k_tiles}));
  const int64_t per_split = (k_tiles + splits - 1) / splits;
  plan.splits = static_cast<int>((k_tiles + per_split - 1) / per_split);  // no empty splits
  return plan;
}

void launch(int w_bits, int a_bits, bool raw, at::ScalarType out_dtype, const Params& p, const Plan& plan,
            cudaStream_t stream) {
  const int splits = plan.splits;
  TORCH_CHECK(splits >= 1 && splits <= kMaxSplits, "int_small_m: splits must be 1..", kMaxSplits, ", got ", splits);
  TORCH_CHECK(a_bits == 8 || (a_bits == 4 && w_bits == 4), "int_small_m: packed int4 activations need int4 weights");
  const bool one_tile = p.M <= 8;  // one n8 token tile per block
  if (a_bits == 4) {
    one_tile ? launch_warps<4, 4, 1>(plan.warps, raw, out_dtype, p, splits, stream)
             : launch_warps<4, 4, 2>(plan.warps, raw, out_dtype, p, splits, stream);
  } else if (w_bits == 4) {
    one_tile ? launch_warps<4, 8, 1>(plan.warps, raw, out_dtype, p, splits, stream)
             : launch_warps<4, 8, 2>(plan.warps, raw, out_dtype, p, splits, stream);
  } else {
    one_tile ? launch_warps<8, 8, 1>(plan.warps, raw, out_dtype, p, splits, stream)
             : launch_warps<8, 8, 2>(plan.warps, raw, out_dtype, p, splits, stream);
  }
}

}  // namespace int_small_m
}  // namespace quantkern
