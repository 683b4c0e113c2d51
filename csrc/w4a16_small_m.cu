// The W4A16 kernel for few tokens (decode): y[M, N] = x[M, K] @ dequant(W)^T (+ bias), M <= 16 per
// token tile. Same semantics, arguments and weight layout as csrc/w4a16_gemm.cu (whose host function
// checks the inputs and calls launch_small_m); this file holds only the kernel and its launcher.
//
// Why a second kernel: at M <= 16 the op is bound by streaming the weights, and on the H100 (13 bytes
// of HBM per SM-cycle) the large-M kernel's instruction stream per weight byte (shared-memory round
// trip, per-pair zero subtraction, a barrier per k-tile) held it to ~1.4 TB/s (ncu: 2.85 bytes of
// weights per warp instruction, issue-bound). This kernel spends about a third of the instructions:
//
// Swapped operands: the weights are the mma's A operand (16 channels x 16 k), the tokens its B
//   operand (16 k x 8 tokens): mma.m16n8k16 gives D[channel][token]. One packed word (8 codes) is
//   exactly one lane's A fragment, so a k16 step costs one mma per 8 tokens (two for 16), not two.
// Conversion without subtraction: the A registers hold MAGIC + code (fp16: MAGIC = 1024, and the
//   codes of channels 8..15 as MAGIC + 16 code, taken in place without a shift; bf16: 128 for all),
//   1 shift + 4 lop3 per 8 codes in fp16 (3 + 4 in bf16). The offset is removed per group in fp32:
//     sum_k x (code - zero) = (D - MAGIC Sx) / f - zero Sx,  Sx = sum_k x  (f = 1 or 16),
//   with Sx from one extra mma per k16 step (shared by the warp's strips): an all-ones A against one 8-token
//   tile, or with two tiles the activation tile itself as A against a 0/1 B (see xsum).
//   Cost in accuracy: D carries MAGIC Sx through the mma's accumulation, whose rounding then weighs
//   ~MAGIC / |code - zero| times more: measured up to 1.9e-4 relative error against the reference
//   rounded to the output dtype (large-M kernel: 8e-5), 2.2e-4 (fp16) against the fp32 reference.
// Weights straight to registers: each lane's 16 bytes of a (strip, k-tile) unit are one coalesced
//   ld.global.v4 (no shared memory, no barrier in the main loop). A pipeline stage is a chunk of 2
//   k-tiles (128 deep); two stages in registers, the next chunk's loads issued before the current
//   one's math, nothing reading a loaded register before its use (EARLY_REFILL, M <= 4, symmetric, one scale row
//   per chunk: a stage's refill, the chunk two ahead, is issued k-tile by k-tile as soon as its registers
//   are read, not after the chunk's math). The chunk's scale and zero rows
//   travel in the stage at M <= 4 (in the weight ring's slot with W_RING, below), else in the activation
//   ring's slot (X_PRIVATE, below); its activation fragments travel in the stage at M <= 4 when the
//   registers allow (one token tile, symmetric, group >= 64). From M = 5 (X_RING, kXRingMinTokens) and
//   with two token tiles (9 <= M <= 16) they go through a private shared-memory ring per warp (X_PRIVATE:
//   2 slots), issued two chunks ahead with cp.async and read with ldmatrix; what remains (M <= 4,
//   asymmetric or group 32) loads them at use (L1/L2 hits: every block reads the same x). X_PRIVATE
//   replaced loads at use: ncu (H200, 4096 x 14336, M = 16) had shown 10.5 cycles of long-scoreboard stall
//   per instruction and 22% of DRAM bandwidth. At one tile the per-lane 32-bit loads touch a row of x per lane group
//   (8 rows per load instruction at M = 8): H200, 8192 x 28672, M = 8 ran in 46.3 us, and in 34.4 us
//   when every token read row 0 (wrong results, same instructions), as fast as M = 1; ncu there showed
//   360 MB of L1 load traffic (61% hits) against 154 MB at M = 1. The ring at one tile (ldmatrix.x2)
//   made M = 8 12-24% faster on the Llama shapes and Qwen2.5-7B's 3584 x 18944 (group 128 and 32), was
//   mixed at M = 4 and slower at M = 2 (up to 6%), hence the threshold. X_PRIVATE's slots also carry the
//   chunk's scale and zero rows (lanes below kPieces copy a 16-byte piece each, read by the whole warp),
//   which freed the registers two stages of them took: the two-tile instances had spilled 16-512 bytes
//   (group 32 with zeros: 512), the one-tile ones up to 264. H200, fp16, M = 5 / 8 / 16, against the
//   stages in one call: group 32 with zeros 1.29-1.57x faster on the Llama shapes, group 64 with zeros
//   1.10-1.16x at M = 16, group 128 1.00-1.06x; 896 x 4864, 1024 x 3072 and 4096 x 4096 at M = 5 and 8
//   up to 0.2 us (5%) slower.
// The weight ring (W_RING; M <= 4, group 32 with zeros, where an SM holds 16 warps' rings, Hopper's
//   228 KB: small_m_config). There a register stage carries 4 scale and 4 zero rows, and the kernel spilled
//   (H200, 8192 x 28672 fp16, M = 1: 82 us against 44 us for group 32 without zeros). With the ring each
//   lane cp.async's its own 16 B of the chunk's 4 weight units into its warp's slot and reads back only
//   those (no barrier for the weights); lanes below kPieces each copy one 16-byte piece of the chunk's
//   scale and zero rows, which the whole warp reads after a __syncwarp. kWSlots = 4 slots, refilled 3
//   chunks ahead (8 KB of weights per warp in flight against the register stages' 4 KB): 48 us there.
//   Where the register stages do not spill the ring was slower (its shared-memory round trip) or equal,
//   even where it holds more bytes in flight. tile_m = 2 forces the register stages (the same sums in
//   the same order: the same bits).
//
// Work split: a block is 2, 4, 8 or 16 warps (small_m_config: 16 when the blocks fit one per SM; 4 when
//   the 8-warp blocks would take more than one wave but 4-warp ones fit in one; 2 one step further, at one
//   token tile and groups other than 32)
//   on the same 32 output channels (2 strips) and the same token tile of 16; its K range is cut into
//   chunks, dealt round-robin to its warps, which fold their group sums into fp32 accumulators (scale
//   applied in fp32, as in the large-M kernel); the block then sums its warps in shared memory in warp
//   order. (A second variant, 4 warps on 128 channels sharing each chunk's activations through one
//   shared-memory ring per block, was removed once X_PRIVATE beat it at M = 9 and 16 on every shape,
//   dtype and group kind measured on the H200: 8192 x 28672 fp16 g128 58 us against 67 us.)
//   Warp pairs (PAIRED, two token tiles, where 64-channel blocks fill at least 7/8 of the SMs: small_m_config):
//   a block's warps work in pairs on 64 channels, each warp on 2 strips, both warps of a pair on the same
//   chunks; each copies 8 of a chunk's 16 token rows into the pair's ring (kPairXSlots slots), and they meet
//   at a named barrier per chunk. Half the activation bytes per warp from L2 (at 16 tokens a chunk's x is 4 KB
//   against 2 KB of the warp's weights).
//   Only when the blocks do not cover the SMs is K also split across blocks (grid.y): each
//   writes an fp32 partial tile to a workspace and counts itself in locks[tile]; the last one
//   sums the partials in split order (bit-identical whichever block is last), adds the bias, writes y
//   and resets the counter. Grid: (channel blocks, splits, token tiles).
//   Measured (H100, M = 1, `python scripts/probe_w4a16.py`): 2.3 TB/s of weights at 8192 x 28672.
// Back to back (sm_90, CUDA graphs): each block calls griddepcontrol.launch_dependents once its weights are
//   streamed, and a call captured right after another small-M call (q, k, v projections; gate and up) is
//   launched as its programmatic dependent (follows_trigger_kernel, csrc/common.cuh): its blocks start in the
//   previous kernel's tail, prefetch their first two chunks of weights into L2, and wait (griddepcontrol.wait)
//   before loading anything. H200, fp16 g128, M = 1, same call, us: 4096 x 4096 6.0 -> 5.0, 8192 x 8192
//   11.8 -> 10.8, 28672 x 8192 32.5 -> 31.5, 896 x 4864 3.4 -> 2.6. Loading the first chunks into registers
//   before the wait was as fast on small shapes and slower on the largest (28672 x 8192 33.6), four chunks
//   prefetched slower (8192 x 8192 11.7); after another kernel a programmatic launch was 0.1-1.0 us slower
//   than a plain one, hence only after our own.
//
// Compiled without --use_fast_math.

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>

#include "w4a16_common.cuh"

namespace quantkern {
namespace w4a16 {
namespace {

constexpr int kStrips = kSmallMChannels / 16;  // 16-channel strips per warp
// Warps per block (template parameter WARPS): 2, 4, 8 or 16 (small_m_config says which); 16 warps per SM in
// every case (the launch bound: 128 registers per thread).
constexpr int kWarpsPerSM = 16;
constexpr int kChunkTiles = 2;    // k-tiles per chunk (K = 128): one pipeline stage
// Two token tiles, or one from kXRingMinTokens tokens: each warp's private activation ring (dynamic shared
// memory), kXSlots slots of one chunk each (8 token rows of 256 B per 8-token tile), kXAlign-byte aligned
// (the kernel's ldmatrix addressing needs it).
constexpr int kXRowBytes = kChunkTiles * kBK * 2;
constexpr int x_slot_bytes(int n8_tiles) { return n8_tiles * 8 * kXRowBytes; }
constexpr int kXRingMinTokens = 5;
constexpr int kXSlots = 2;
constexpr int kXAlign = 256;
// Warp pairs (template parameter PAIRED, two token tiles; small_m_config says where): the two warps of a pair
// take the same chunks for 2 strips each (blocks of small_m_block_channels(true)) and share each chunk's
// activations in one ring per pair of kPairXSlots slots, each warp copying 8 of the 16 token rows. A slot is
// refilled at step i with chunk i + 2 once both warps have passed step i's pair barrier, so after both are done
// with chunk i - 1 (its slot): hence 3 slots, and one barrier per chunk.
constexpr int kPairXSlots = 3;

// Group kinds (template parameter): how many scale rows a chunk of 128 needs, where groups start.
enum GroupKind { kGroup32 = 0, kGroup64 = 1, kGroupWide = 2 /* 128, or per-channel */ };

// 32-bit load, or 0 when !ok; a predicated load, so that nothing waits for the data before its use.
__device__ __forceinline__ uint32_t load_u32_or_zero(const void* p, bool ok) {
  uint32_t v;
  asm volatile(
      "{\n .reg .pred q;\n setp.ne.b32 q, %2, 0;\n mov.b32 %0, 0;\n @q ld.global.nc.b32 %0, [%1];\n}\n"
      : "=r"(v)
      : "l"(p), "r"(static_cast<int>(ok)));
  return v;
}

__device__ __forceinline__ uint32_t load_u32(const void* p) { return __ldg(static_cast<const unsigned int*>(p)); }
__device__ __forceinline__ uint32_t load_u16(const void* p) { return __ldg(static_cast<const unsigned short*>(p)); }

// p + bytes, as an opaque step: the compiler cannot rewrite a chain of them as p + j * stride and keep the
// products of every j in registers across the main loop (it did, and spilled).
template <typename P>
__device__ __forceinline__ const P* advance_bytes(const P* p, int bytes) {
  const P* q;
  asm("{\n .reg .s64 t;\n cvt.s64.s32 t, %2;\n add.s64 %0, %1, t;\n}\n" : "=l"(q) : "l"(p), "r"(bytes));
  return q;
}

// A raw 16-bit value of type T (held in the low half of a register) as fp32.
template <typename T>
__device__ __forceinline__ float bits_to_float(uint32_t v);
template <>
__device__ __forceinline__ float bits_to_float<__half>(uint32_t v) {
  return to_float(__ushort_as_half(static_cast<unsigned short>(v)));
}
template <>
__device__ __forceinline__ float bits_to_float<__nv_bfloat16>(uint32_t v) {
  return to_float(__ushort_as_bfloat16(static_cast<unsigned short>(v)));
}

// 8-token tiles per token tile of 16 for M tokens (TOKEN_TILES): one up to M = 8, else two (with M > 16
// there are several token tiles of 16).
constexpr int n8_tiles_for(int64_t M) { return M <= 8 ? 1 : 2; }
// Shared memory of a block of `warps` warps with `n8_tiles` 8-token tiles: the warps' sums (static; the
// kernel checks its declarations against this) and, with two tiles, the private activation rings plus
// room to align them (dynamic).
constexpr int static_smem_bytes(int n8_tiles, int warps) {
  return warps * kStrips * n8_tiles * 32 * static_cast<int>(sizeof(float4)) + 128;
}
// Whether a kernel instance stages x in the private ring: two token tiles always, one with X_RING.
constexpr bool uses_x_ring(int n8_tiles, bool x_ring_one_tile) { return n8_tiles == 2 || x_ring_one_tile; }
// A chunk's scale rows and zero rows in shared memory (the activation ring's and the weight ring's slots):
// 16 channels (32 B) per strip and group row.
constexpr int scale_slot_bytes(int group_rows, bool asym) { return group_rows * kStrips * 32 * (asym ? 2 : 1); }
// The activation rings: per warp kXSlots slots of activations, then kXSlots slots of scale and zero rows.
// Paired: per pair kPairXSlots slots of activations (two token tiles), then per warp kPairXSlots slots of its
// strips' scale and zero rows.
constexpr int dynamic_smem_bytes(int n8_tiles, int warps, bool x_ring, int group_rows, bool asym,
                                 bool paired = false) {
  const int scale_slot = scale_slot_bytes(group_rows, asym);
  return paired   ? (warps / 2) * kPairXSlots * x_slot_bytes(2) + warps * kPairXSlots * scale_slot + kXAlign
         : x_ring ? warps * kXSlots * (x_slot_bytes(n8_tiles) + scale_slot) + kXAlign
                  : 0;
}
// The weight ring (W_RING, M < kXRingMinTokens, group 32 with zeros, where shared memory allows, see
// small_m_config): each warp's chunks of weights, scales and zeros go through kWSlots slots of its own, issued
// kWSlots - 1 chunks ahead.
// A slot: the chunk's 2 x 2 units of weights (2 KB), then its scale rows and zero rows.
constexpr int kWSlots = 4;
constexpr int kWeightSlotBytes = kChunkTiles * kStrips * kUnitBytes;
constexpr int w_slot_bytes(int group_rows, bool asym) { return kWeightSlotBytes + scale_slot_bytes(group_rows, asym); }
constexpr int w_ring_smem_bytes(int warps, int group_rows, bool asym) {
  return warps * kWSlots * w_slot_bytes(group_rows, asym);
}

// Scale rows a chunk of 128 needs: 4 (group 32), 2 (group 64) or 1.
constexpr int group_rows_per_chunk(int group_kind) {
  return group_kind == kGroup32 ? 4 : group_kind == kGroup64 ? 2 : 1;
}
// The scale row a chunk reads in place of row r when its second k-tile is missing (odd K/64): the rows of
// the missing tile (group 32/64) re-read the chunk's first ones, whose sums there are zero.
constexpr int row_for_missing_tile(int group_kind, int r) {
  return group_kind == kGroup32 ? (r >= 2 ? r - 2 : r) : group_kind == kGroup64 ? 0 : r;
}

// One pipeline stage: a chunk (2 k-tiles) of one warp. Weights of its 2 strips; the raw 16-bit scale
// (and zero) of channels g and g + 8 for each of the chunk's kRows groups (SCALES_IN_SMEM: only the weights,
// and with W_RING none of these: they are in the ring's slot); when X_STAGED, the chunk's activation
// fragments too (one token tile).
template <int GK, bool ASYM, bool X_STAGED>
struct Stage {
  static constexpr int kRows = group_rows_per_chunk(GK);
  uint4 w[kChunkTiles][kStrips];
  uint32_t scale[kRows][kStrips][2];
  uint32_t zero[ASYM ? kRows : 1][kStrips][2];
  uint32_t x[X_STAGED ? kChunkTiles : 1][4][2];
};

// The named barrier of warp pair `pair` of a block (ids 1-8; 0 is __syncthreads'): its two warps' 64 threads.
__device__ __forceinline__ void pair_barrier(int pair) {
  asm volatile("bar.sync %0, 64;\n" ::"r"(1 + pair) : "memory");
}

// The block's warps share 2 strips and split K; PAIRED: the block's pairs share 4 strips (each warp of a pair 2 of
// them) and split K.
template <typename T, int TOKEN_TILES, int GK, bool ASYM, int WARPS, bool X_RING, bool W_RING, bool PAIRED>
__global__ void __launch_bounds__(WARPS * 32, kWarpsPerSM / WARPS) w4a16_small_m_kernel(const SmallMParams p) {
  constexpr int kWarps = WARPS, kThreads = WARPS * 32;
  static_assert(!PAIRED || (TOKEN_TILES == 2 && WARPS % 2 == 0), "warp pairs are built for two token tiles");
  // Who takes chunks: the warps, or the pairs (both warps of a pair take the same chunks).
  constexpr int kUnits = PAIRED ? kWarps / 2 : kWarps;
  constexpr int kBlockStrips = PAIRED ? 2 * kStrips : kStrips;
  using Tr = W4Traits<T>;
  // Activations ride in the stage when the registers allow (one token tile, few scale rows).
  constexpr bool X_STAGED = TOKEN_TILES == 1 && !X_RING && !ASYM && GK != kGroup32;
  // Early refill (see compute) only where it measured faster: X_STAGED with one scale row per chunk. (H200, fp16:
  // applied everywhere it made M = 8 and 16 up to 2% slower, and group 64 spilled: M = 1 on 8192 x 28672 36.8
  // -> 45.5 us.)
  constexpr bool EARLY_REFILL = X_STAGED && GK == kGroupWide;
  // Two token tiles, or one with X_RING (M >= kXRingMinTokens): each warp stages its own chunks'
  // activations in a private cp.async ring (kXSlots slots), issued kXSlots chunks ahead with the weights
  // and read with ldmatrix, instead of loading them from L2 right before their mma.
  constexpr bool X_PRIVATE = uses_x_ring(TOKEN_TILES, X_RING);
  constexpr int kXSlotBytes = x_slot_bytes(TOKEN_TILES);
  constexpr int kSlots = PAIRED ? kPairXSlots : kXSlots;  // of the activation ring
  static_assert(!(W_RING && X_PRIVATE), "the weight ring is for one token tile without the activation ring");
  // The chunk's scale and zero rows come through shared memory with either ring (in its slot), else in
  // the register stage.
  constexpr bool SCALES_IN_SMEM = W_RING || X_PRIVATE;
  using StageT = Stage<GK, ASYM, X_STAGED>;
  constexpr int kRows = StageT::kRows;
  constexpr int kWSlotBytes = w_slot_bytes(kRows, ASYM);
  constexpr int kScaleSlotBytes = scale_slot_bytes(kRows, ASYM);
  __shared__ float4 partial_sums[kWarps][kStrips][TOKEN_TILES][32];
  // X_PRIVATE: [unit][kSlots][kXSlotBytes] (kXAlign-aligned; a unit: a warp, or a pair), then
  // [warp][kSlots][kScaleSlotBytes]; W_RING: [warp][kWSlots][kWSlotBytes].
  extern __shared__ __align__(128) uint8_t warp_rings[];
  __shared__ int s_is_last;
  static_assert(sizeof(partial_sums) + sizeof(s_is_last) <= static_smem_bytes(TOKEN_TILES, kWarps),
                "static_smem_bytes (the launcher's shared-memory budget) is out of date");

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int block_n = blockIdx.x, split = blockIdx.y, token_tile = blockIdx.z;
  const int unit = PAIRED ? warp / 2 : warp, half = PAIRED ? warp % 2 : 0;  // (half: the warp's place in its pair)
  const int block_strip0 = block_n * kBlockStrips;  // the block's first strip
  const int strip0 = block_strip0 + half * kStrips;  // the warp's first strip
  const int strips = p.N / 16;
  const int tok0 = token_tile * kSmallMTokens;
  const T* __restrict__ x = static_cast<const T*>(p.x);

  // This warp's chunks (its unit's): c = c_first + i * chunk_step for i < my_chunks.
  const int n_chunks = (p.k_tiles + kChunkTiles - 1) / kChunkTiles;
  const int c_begin = split * p.chunks_per_split;
  const int c_end = min(n_chunks, c_begin + p.chunks_per_split);
  constexpr int chunk_step = kUnits;
  const int my_chunks = max(0, (c_end - c_begin - unit + kUnits - 1) / kUnits);
  const int c_first = c_begin + unit;

  // Running pointers of the next chunk to load (advanced by chunk_step chunks per load). A strip past
  // N reads strip 0 (its sums are never stored); a token past M reads row 0 (likewise).
  const uint4* wload[kStrips];
  const T* sload[kStrips];
  const T* zload[kStrips];
#pragma unroll
  for (int s = 0; s < kStrips; ++s) {
    const int strip = strip0 + s < strips ? strip0 + s : 0;
    wload[s] = p.qweight + (static_cast<int64_t>(strip) * p.k_tiles + c_first * kChunkTiles) * 32 + lane;
    // Scale row of the chunk's first group: group 32: 4c, group 64: 2c, 128: c, per-channel: 0.
    const int64_t row = p.group_len >= p.K ? 0 : static_cast<int64_t>(c_first) * kRows;
    sload[s] = static_cast<const T*>(p.scales) + row * p.N + strip * 16 + g;
    zload[s] = ASYM ? static_cast<const T*>(p.zeros) + row * p.N + strip * 16 + g : nullptr;
  }
  const int64_t row_step = p.group_len >= p.K ? 0 : static_cast<int64_t>(chunk_step) * kRows * p.N;
  const T* xload[TOKEN_TILES];
#pragma unroll
  for (int j = 0; j < TOKEN_TILES; ++j) {
    const int tok = tok0 + 8 * j + g;
    xload[j] = x + static_cast<int64_t>(tok < p.M ? tok : 0) * p.K + c_first * (kChunkTiles * kBK) + 2 * t;
  }
  int c_load = c_first;  // the chunk the running pointers are at

  // SCALES_IN_SMEM: lane l < kPieces copies piece l of a chunk's scale and zero rows into the chunk's slot:
  // [scales, zeros][row][strip][8 channels], 16 B each, read by the whole warp (fold). Same rows as
  // load_stage; row 0 for a chunk past the range (never read).
  constexpr int kScalePieces = kRows * kStrips * 2, kPieces = kScalePieces * (ASYM ? 2 : 1);
  static_assert(kPieces <= 32 && kScaleSlotBytes == kPieces * 16, "one scale or zero piece per lane");
  const bool copies_piece = SCALES_IN_SMEM && lane < kPieces;
  const int piece_row = (lane % kScalePieces) / (kStrips * 2);
  const int piece_strip = strip0 + (lane / 2) % kStrips;
  const T* piece_base = static_cast<const T*>(lane < kScalePieces ? p.scales : p.zeros) +
                        (piece_strip < strips ? piece_strip : 0) * 16 + (lane % 2) * 8;
  auto copy_scale_piece = [&](int c, uint32_t scale_slot) {
    const bool tile1_ok = c * kChunkTiles + 1 < p.k_tiles;
    const int row = tile1_ok ? piece_row : row_for_missing_tile(GK, piece_row);
    const int64_t r = p.group_len >= p.K || c >= c_end ? 0 : static_cast<int64_t>(c) * kRows + row;
    cp_async16(scale_slot + lane * 16, piece_base + r * p.N, true);
  };

  // W_RING: the warp's i-th chunk into slot `slot` (one cp.async group, empty past the warp's chunks).
  // Every lane copies its own 16 B of each of the chunk's 4 weight units (and reads back only those), and
  // lanes below kPieces the scale and zero pieces. Same addresses as load_stage.
  const uint32_t w_ring_base = smem_addr(warp_rings) + warp * kWSlots * kWSlotBytes;
  int c_wload = c_first;
  auto load_w_chunk = [&](int i, int slot) {
    if (i < my_chunks) {
      const bool tile1_ok = c_wload * kChunkTiles + 1 < p.k_tiles;
      const uint32_t dst = w_ring_base + slot * kWSlotBytes;
#pragma unroll
      for (int s = 0; s < kStrips; ++s) {
        cp_async16(dst + s * kUnitBytes + lane * 16, wload[s], true);
        cp_async16(dst + (kStrips + s) * kUnitBytes + lane * 16, wload[s] + (tile1_ok ? 32 : 0), true);
        wload[s] += chunk_step * kChunkTiles * 32;
      }
      if (copies_piece) copy_scale_piece(c_wload, dst + kWeightSlotBytes);
      c_wload += chunk_step;
    }
    cp_async_commit();
  };

  // Strip s's weights of k-tile u of the chunk at the running pointers (c_load). No predicate: the address is
  // clamped, and a missing second tile (odd K/64: the last chunk has one) re-reads the first.
  auto load_weights = [&](int s, int u) {
    const bool tile1_ok = c_load * kChunkTiles + 1 < p.k_tiles;
    return load_stream_v4(wload[s] + (u == 1 && tile1_ok ? 32 : 0));
  };
  // The chunk at the running pointers into st, then the pointers on to the warp's next chunk. The weights
  // only with `weights` (EARLY_REFILL: compute has loaded them).
  auto load_stage = [&](StageT& st, bool weights) {
    const bool tile1_ok = c_load * kChunkTiles + 1 < p.k_tiles;  // (odd K/64: the last chunk has one tile)
#pragma unroll
    for (int s = 0; s < kStrips; ++s) {
      if constexpr (W_RING) break;  // the weight ring's loader copies them
      if (weights) {
        st.w[0][s] = load_weights(s, 0);
        st.w[1][s] = load_weights(s, 1);
      }
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        if constexpr (SCALES_IN_SMEM) break;  // the ring's loader copies them
        const int rr = tile1_ok ? r : row_for_missing_tile(GK, r);
        st.scale[r][s][0] = load_u16(sload[s] + rr * p.N);
        st.scale[r][s][1] = load_u16(sload[s] + rr * p.N + 8);
        if constexpr (ASYM) {
          st.zero[r][s][0] = load_u16(zload[s] + rr * p.N);
          st.zero[r][s][1] = load_u16(zload[s] + rr * p.N + 8);
        }
      }
      wload[s] += chunk_step * kChunkTiles * 32;
      sload[s] += row_step;
      if constexpr (ASYM) zload[s] += row_step;
    }
    if constexpr (X_STAGED) {
#pragma unroll
      for (int u = 0; u < kChunkTiles; ++u)
#pragma unroll
        for (int kk = 0; kk < 4; ++kk)
#pragma unroll
          for (int h = 0; h < 2; ++h)
            st.x[u][kk][h] = u == 0 ? load_u32(xload[0] + 16 * kk + 8 * h)
                                    : load_u32_or_zero(xload[0] + kBK + 16 * kk + 8 * h, tile1_ok);
    }
#pragma unroll
    for (int j = 0; j < TOKEN_TILES; ++j) xload[j] += chunk_step * kChunkTiles * kBK;
    c_load += chunk_step;
  };

  float acc[kStrips][TOKEN_TILES][4];   // scaled sums: [channel g, g+8] x [token 2t, 2t+1]
  float dsum[kStrips][TOKEN_TILES][4];  // this group's raw mma sums (MAGIC offset included)
  // This group's sum of x per token. One tile: an mma of all-ones weights against the tile, d0 = token 2t,
  // d1 = 2t + 1 (as dsum). Two tiles: one mma per k16 step instead of two (at M = 16 they had been 16 of a
  // chunk's 48 mmas), of ldmatrix's four 8 x 8 matrices taken as they come as the A operand, {tokens 0-7,
  // 0-7, 8-15, 8-15} x {k 0-7, 8-15, 0-7, 8-15} in the places of {rows 0-7, 8-15} x {k 0-7, 8-15}, against a B
  // whose even columns sum the first 8 k and odd ones the last 8 (x_sum_b): lane (g, t) gets d0 + d2 = token
  // g's sum and d1 + d3 = token g + 8's, which fold moves to the dsum layout with 4 shuffles.
  float xsum[TOKEN_TILES == 2 ? 1 : TOKEN_TILES][4] = {};  // (set by each group's first mma; {} quiets a warning)
  const uint32_t x_sum_b0 = g % 2 == 0 ? Tr::kOnes : 0u, x_sum_b1 = g % 2 == 0 ? 0u : Tr::kOnes;
#pragma unroll
  for (int s = 0; s < kStrips; ++s)
#pragma unroll
    for (int j = 0; j < TOKEN_TILES; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[s][j][e] = 0.0f;

  // acc += scale/f (D - (MAGIC + f zero) Sx), per channel (f = 1 for channel g, 1 or 16 for g + 8).
  // (SCALES_IN_SMEM: the scale and zero rows are in the chunk's slot, at scale_slot.)
  auto fold = [&](const StageT& st, int r, uint32_t scale_slot) {
    float xs[TOKEN_TILES][2];  // [tile][token 2t, 2t + 1]
    if constexpr (TOKEN_TILES == 2) {
      const float tile0 = xsum[0][0] + xsum[0][2], tile1 = xsum[0][1] + xsum[0][3];  // tokens g, g + 8
      const int src_lane = 8 * t;  // tokens 2t and 2t + 1 (of either tile) are at g = 2t (lane 8t) and 2t + 1
      xs[0][0] = __shfl_sync(0xffffffffu, tile0, src_lane);
      xs[0][1] = __shfl_sync(0xffffffffu, tile0, src_lane + 4);
      xs[1][0] = __shfl_sync(0xffffffffu, tile1, src_lane);
      xs[1][1] = __shfl_sync(0xffffffffu, tile1, src_lane + 4);
    } else {
      xs[0][0] = xsum[0][0];
      xs[0][1] = xsum[0][1];
    }
#pragma unroll
    for (int s = 0; s < kStrips; ++s) {
      uint32_t scale_bits[2], zero_bits[2];
      if constexpr (SCALES_IN_SMEM) {
        const uint32_t piece = scale_slot + (r * kStrips + s) * 2 * 16 + g * 2;
        scale_bits[0] = ld_shared_u16(piece);
        scale_bits[1] = ld_shared_u16(piece + 16);  // channel g + 8: the next piece
        if constexpr (ASYM) {
          zero_bits[0] = ld_shared_u16(piece + kScalePieces * 16);
          zero_bits[1] = ld_shared_u16(piece + kScalePieces * 16 + 16);
        }
      } else {
        scale_bits[0] = st.scale[r][s][0];
        scale_bits[1] = st.scale[r][s][1];
        if constexpr (ASYM) {
          zero_bits[0] = st.zero[r][s][0];
          zero_bits[1] = st.zero[r][s][1];
        }
      }
      const float s_lo = bits_to_float<T>(scale_bits[0]);
      const float s_hi = bits_to_float<T>(scale_bits[1]);
      float z_lo = 8.0f, z_hi = 8.0f;
      if constexpr (ASYM) {
        z_lo = bits_to_float<T>(zero_bits[0]);
        z_hi = bits_to_float<T>(zero_bits[1]);
      }
      const float off_lo = s_lo * (Tr::kMagicLo + z_lo);
      const float f_hi = s_hi * Tr::kScaleHi, off_hi = s_hi * (Tr::kMagicHi + z_hi);
#pragma unroll
      for (int j = 0; j < TOKEN_TILES; ++j) {
        acc[s][j][0] = fmaf(s_lo, dsum[s][j][0], fmaf(-off_lo, xs[j][0], acc[s][j][0]));
        acc[s][j][1] = fmaf(s_lo, dsum[s][j][1], fmaf(-off_lo, xs[j][1], acc[s][j][1]));
        acc[s][j][2] = fmaf(f_hi, dsum[s][j][2], fmaf(-off_hi, xs[j][0], acc[s][j][2]));
        acc[s][j][3] = fmaf(f_hi, dsum[s][j][3], fmaf(-off_hi, xs[j][1], acc[s][j][3]));
      }
    }
  };

  const uint32_t ones[4] = {Tr::kOnes, Tr::kOnes, Tr::kOnes, Tr::kOnes};
  // x pointer of the chunk being computed (X_STAGED: unused).
  const T* xcomp[TOKEN_TILES];
#pragma unroll
  for (int j = 0; j < TOKEN_TILES; ++j) xcomp[j] = xload[j];
  int c_comp = c_first;

  // X_PRIVATE: this warp's chunk c (its chunks only) into its slot `slot`: 16 rows x 16 pieces of
  // 16 B, the pieces of a row XOR-swizzled by (row & 7) so that ldmatrix's 8 row reads hit 8 different
  // bank groups. Lane l always copies piece l % 16 of rows r0 + 2 j (r0 = l / 16, j < 8; PAIRED: the pair's
  // slot, r0 = l / 16 + 8 half and j < 4, the partner copying the other 8 rows). A missing second
  // tile, chunks past the range and rows past M read nothing and are zero (the source address stays at the
  // lane's last row that exists). Rows past M had re-read that row instead, which spares a predicate per
  // copy but sends many copies to the same few L2 lines (probably why it was slow): with one tile (M = 5-7)
  // that made the Llama shapes 2-8% slower on the H200; with two, M = 9 took up to 15% longer than M = 16
  // (H100, session 28, fp16 g128, us, re-read -> zeros: 8192 x 28672 57.0 -> 47.1, 4096 x 14336 16.2 ->
  // 13.6, 14336 x 4096 15.4 -> 13.3; M = 10-13 up to 8% faster, M = 16 unchanged).
  // Addresses: with the slot 256-byte aligned, row r0 + 2 j's swizzled piece is the lane's row-r0 address
  // XOR ((2 j) & 7) << 4 (since (r0 + 2 j) & 7 = r0 ^ ((2 j) & 7)) plus the row offset, a constant of the
  // copy instruction; the source steps by two rows of x per copy. (The previous loader selected between
  // two 64-bit addresses per row and recomputed each row's swizzle: ~10 instructions per copy, a quarter
  // of the M = 16 main loop in sm_90a SASS.)
  // (kXAlign = 256-byte aligned, so that a row's 16-byte pieces differ only in address bits 4-7: see
  // compute.)
  const uint32_t x_rings_base = (smem_addr(warp_rings) + (kXAlign - 1)) & ~uint32_t(kXAlign - 1);
  const uint32_t x_private_base = x_rings_base + unit * kSlots * kXSlotBytes;
  const uint32_t x_scale_base = x_rings_base + kUnits * kSlots * kXSlotBytes + warp * kSlots * kScaleSlotBytes;
  constexpr int kXCopies = PAIRED ? 2 * TOKEN_TILES : 4 * TOKEN_TILES;  // rows r0 + 2 j a lane copies
  const int x_piece = lane & 15, x_row0 = (lane >> 4) + 8 * half;
  const T* x_lane = x + static_cast<int64_t>(min(tok0 + x_row0, p.M - 1)) * p.K + x_piece * 8;
  const uint32_t x_lane_dst = x_private_base + x_row0 * kXRowBytes + ((x_piece ^ (x_row0 & 7)) << 4);
  const int x_rows_ok = p.M - tok0 - x_row0;  // the lane's rows r0 + 2 j with 2 j < x_rows_ok exist
  const int x_last_pair = max(0, (x_rows_ok - 1) / 2);  // the last of them (the source stays there)
  const int x_pair_bytes = 2 * p.K * static_cast<int>(sizeof(T));  // (16 rows of K fit 32 bits)
  auto load_x_chunk_private = [&](int c, int slot) {
    const bool chunk_ok = c < c_end;
    const bool piece_ok = chunk_ok && c * kChunkTiles + x_piece / 8 < p.k_tiles;
    const T* src = x_lane + (chunk_ok ? c * (kChunkTiles * kBK) : 0);
    const uint32_t lane_dst = x_lane_dst + slot * kXSlotBytes;
#pragma unroll
    for (int j = 0; j < kXCopies; ++j) {
      cp_async16((lane_dst ^ (((2 * j) & 7) << 4)) + 2 * j * kXRowBytes, src, piece_ok && 2 * j < x_rows_ok);
      src = advance_bytes(src, j < x_last_pair ? x_pair_bytes : 0);
    }
    if (copies_piece) copy_scale_piece(c, x_scale_base + slot * kScaleSlotBytes);
  };
  const int ldm_row = (lane & 7) + 8 * (lane >> 4);  // ldmatrix.x4: matrix lane/8 = (token tile, k half)
  const int ldm_half = (lane >> 3) & 1;
  // X_PRIVATE: this lane's ldmatrix address of piece 0 + ldm_half in slot 0 (the XOR base, see compute).
  const uint32_t x_lane_ldm0 = x_private_base + ldm_row * kXRowBytes + ((ldm_half ^ (ldm_row & 7)) << 4);

  // `slot`: the chunk's slot in the activation ring (X_PRIVATE) or the weight ring (W_RING).
  // reload (EARLY_REFILL): load the weights of the chunk at the running pointers (the warp's chunk two
  // ahead) into st as soon as a k-tile's registers are read, not after the chunk's math.
  auto compute = [&](StageT& st, int slot, bool reload) {
    const bool tile1_ok = c_comp * kChunkTiles + 1 < p.k_tiles;
    const uint32_t w_slot = w_ring_base + slot * kWSlotBytes;
    const uint32_t scale_slot = W_RING ? w_slot + kWeightSlotBytes : x_scale_base + slot * kScaleSlotBytes;
    uint4 w_ring[kChunkTiles][kStrips];  // W_RING: the lane's own 16 B of each unit (else unused)
    if constexpr (W_RING) {
#pragma unroll
      for (int u = 0; u < kChunkTiles; ++u)
#pragma unroll
        for (int s = 0; s < kStrips; ++s) {
          w_ring[u][s] = ld_shared_v4(w_slot + (u * kStrips + s) * kUnitBytes + lane * 16);
        }
    }
#pragma unroll
    for (int u = 0; u < kChunkTiles; ++u) {
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        uint32_t b[TOKEN_TILES][2];
        if constexpr (X_PRIVATE) {
          // Piece u * 8 + kk * 2 + ldm_half of row ldm_row sits at piece ^ (row & 7); with the slot
          // 256-byte aligned that address is the lane's piece-0 address XOR (u * 8 + kk * 2) << 4: one
          // LOP3 per ldmatrix, and no table of 16 precomputed offsets (which had spilled).
          const uint32_t addr = (x_lane_ldm0 + slot * kXSlotBytes) ^ static_cast<uint32_t>((u * 8 + kk * 2) << 4);
          if constexpr (TOKEN_TILES == 2) {
            uint32_t r[4];
            ldmatrix_x4(r, addr);
            b[0][0] = r[0];
            b[0][1] = r[1];
            b[TOKEN_TILES - 1][0] = r[2];
            b[TOKEN_TILES - 1][1] = r[3];
          } else {  // one tile: matrices 0 and 1 (rows 0-7, both k halves), addressed by lanes 0-15
            uint32_t r[2];
            ldmatrix_x2(r, addr);
            b[0][0] = r[0];
            b[0][1] = r[1];
          }
        } else {
#pragma unroll
          for (int j = 0; j < TOKEN_TILES; ++j)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              if constexpr (X_STAGED) {
                b[j][h] = st.x[u][kk][h];
              } else {
                b[j][h] = u == 0 ? load_u32(xcomp[j] + 16 * kk + 8 * h)
                                 : load_u32_or_zero(xcomp[j] + kBK + 16 * kk + 8 * h, tile1_ok);
              }
            }
        }
        // The first k16 step of a group starts its sums from zero.
        const bool fresh = GK == kGroup32 ? (kk % 2 == 0) : GK == kGroup64 ? kk == 0 : (u == 0 && kk == 0);
        if constexpr (TOKEN_TILES == 2) {
          const uint32_t x_as_a[4] = {b[0][0], b[0][1], b[1][0], b[1][1]};  // ldmatrix's registers as they are
          if (fresh) {
            Tr::template mma<true>(xsum[0], x_as_a, x_sum_b0, x_sum_b1);
          } else {
            Tr::template mma<false>(xsum[0], x_as_a, x_sum_b0, x_sum_b1);
          }
        } else {
          if (fresh) {
            Tr::template mma<true>(xsum[0], ones, b[0][0], b[0][1]);
          } else {
            Tr::template mma<false>(xsum[0], ones, b[0][0], b[0][1]);
          }
        }
#pragma unroll
        for (int s = 0; s < kStrips; ++s) {
          const uint4& w = W_RING ? w_ring[u][s] : st.w[u][s];
          const uint32_t q = kk == 0 ? w.x : kk == 1 ? w.y : kk == 2 ? w.z : w.w;
          uint32_t a[4];
          Tr::dequant_a(q, a);
          // The unit's last word is read: refill its registers now, so that the next chunk's loads are in
          // flight during this chunk's remaining math. (H200, M = 1: with the math dropped (wrong results) the
          // Llama shapes ran 14-21% faster; refilling here made three of them 1-3% faster, the others equal.)
          if constexpr (EARLY_REFILL) {
            if (kk == 3 && reload) st.w[u][s] = load_weights(s, u);
          }
#pragma unroll
          for (int j = 0; j < TOKEN_TILES; ++j) {
            if (fresh) {
              Tr::template mma<true>(dsum[s][j], a, b[j][0], b[j][1]);
            } else {
              Tr::template mma<false>(dsum[s][j], a, b[j][0], b[j][1]);
            }
          }
        }
        // The last k16 step of a group folds it.
        if constexpr (GK == kGroup32) {
          if (kk % 2 == 1) fold(st, 2 * u + kk / 2, scale_slot);
        } else if constexpr (GK == kGroup64) {
          if (kk == 3) fold(st, u, scale_slot);
        } else {
          if (u == 1 && kk == 3) fold(st, 0, scale_slot);
        }
      }
    }
#pragma unroll
    for (int j = 0; j < TOKEN_TILES; ++j) xcomp[j] += chunk_step * kChunkTiles * kBK;
    c_comp += chunk_step;
  };

  // ---- main loop: two register stages, written out so that their indices are constants ----------
  // Launched as a programmatic dependent (right after another small-M kernel in a captured graph: see the
  // header), the blocks may start while that kernel finishes: they only ask L2 for their first two chunks of
  // weights (safe whatever that kernel writes: a prefetch only warms L2, where every write lands), then wait for
  // it before loading anything into registers or shared memory. (sm_90+: elsewhere the host never sets programmatic.)
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (p.programmatic) {
#pragma unroll
    for (int ahead = 0; ahead < 2; ++ahead) {
      if (ahead < my_chunks) {
        const bool tile1_ok = (c_first + ahead * chunk_step) * kChunkTiles + 1 < p.k_tiles;
#pragma unroll
        for (int s = 0; s < kStrips; ++s) {
          const uint4* w = wload[s] + ahead * chunk_step * kChunkTiles * 32;
          prefetch_l2(w);
          if (tile1_ok) prefetch_l2(w + 32);
        }
      }
    }
  }
#endif
  wait_for_prior_grids();
  StageT stage0, stage1;
  if constexpr (X_PRIVATE) {
    static_assert(kXSlots == 2 && kPairXSlots == 3, "the ring's prologue fills slots 0 and 1");
    load_x_chunk_private(c_first, 0);
    cp_async_commit();
    load_x_chunk_private(c_first + chunk_step, 1);
    cp_async_commit();
  }
  if constexpr (W_RING) {
#pragma unroll
    for (int i = 0; i < kWSlots - 1; ++i) load_w_chunk(i, i);
  }
  // One chunk: the math, then the weights of the chunk two ahead. X_PRIVATE: first wait for the
  // warp's own chunk i (one cp.async group per chunk, always committed, empty past the range),
  // compute from slot i % kXSlots, then refill that slot with chunk i + kXSlots once every lane is
  // done reading it. PAIRED: wait for the warp's copies of chunk i, meet the partner at the pair barrier (its
  // copies are in, and both are done with chunk i - 1), refill chunk i - 1's slot with chunk i + 2, then compute
  // from slot i % kPairXSlots. W_RING: first refill the slot that chunk i - 1 used with chunk i + kWSlots - 1 (the
  // previous step's last __syncwarp: every lane is done reading its scales), then wait for chunk i.
  auto step = [&](StageT& st, int i) {
    if constexpr (W_RING) {
      load_w_chunk(i + kWSlots - 1, (i + kWSlots - 1) % kWSlots);
      cp_async_wait<kWSlots - 1>();
      __syncwarp();
    }
    if constexpr (PAIRED) {
      cp_async_wait<1>();
      pair_barrier(unit);
      load_x_chunk_private(c_first + (i + 2) * chunk_step, (i + 2) % kPairXSlots);
      cp_async_commit();
    } else if constexpr (X_PRIVATE) {
      cp_async_wait<kXSlots - 1>();
      __syncwarp();
    }
    compute(st, i % (W_RING ? kWSlots : kSlots), EARLY_REFILL && i + 2 < my_chunks);
    if constexpr (W_RING) __syncwarp();
    if constexpr (X_PRIVATE && !PAIRED) {
      __syncwarp();
      load_x_chunk_private(c_first + (i + kXSlots) * chunk_step, i % kXSlots);
      cp_async_commit();
    }
    if (i + 2 < my_chunks) load_stage(st, !EARLY_REFILL);
  };
  if (my_chunks > 0) load_stage(stage0, true);
  if (my_chunks > 1) load_stage(stage1, true);
  for (int i = 0; i < my_chunks; i += 2) {
    step(stage0, i);
    if (i + 1 < my_chunks) step(stage1, i + 1);
  }
  if constexpr (PAIRED) {
    // Every pair passes as many pair barriers as the first (which has the most chunks). Not needed for
    // correctness: without it compute-sanitizer's racecheck (CUDA 13.0) reported the warps' sums in
    // partial_sums, written before the __syncthreads below and read after it, as races wherever pairs had
    // different chunk counts (and only there).
    const int most_chunks = (c_end - c_begin + kUnits - 1) / kUnits;
    for (int i = my_chunks; i < most_chunks; ++i) pair_barrier(unit);
  }
  if constexpr (X_PRIVATE || W_RING) cp_async_wait<0>();
  // The weight stream is done: the next kernel may launch and start its own (it waits for this grid's
  // completion before it touches y, the partials or the locks).
  allow_dependent_launch();

  // ---- the block's sum over its warps, in warp order (PAIRED: each half's warps, in pair order) -------
#pragma unroll
  for (int s = 0; s < kStrips; ++s)
#pragma unroll
    for (int j = 0; j < TOKEN_TILES; ++j)
      partial_sums[warp][s][j][lane] = make_float4(acc[s][j][0], acc[s][j][1], acc[s][j][2], acc[s][j][3]);
  __syncthreads();

  const T* __restrict__ bias = static_cast<const T*>(p.bias);
  T* __restrict__ y = static_cast<T*>(p.y);
  constexpr int kElems = kStrips * TOKEN_TILES * 32 * 4;  // one warp's sums; the block adds its warps
  constexpr int kBlockElems = kElems * (PAIRED ? 2 : 1);   // the block's outputs (PAIRED: both halves')
  const float* sums = reinterpret_cast<const float*>(partial_sums);
  const int64_t split_stride = static_cast<int64_t>(p.M) * p.N;
  // Output idx of the block: element e of the (half, strip, token tile, lane) fragment: channel g + 8 (e / 2),
  // token 2t + e % 2.
  auto element = [&](int idx, int& tok, int& ch) {
    const int e = idx & 3, l = (idx >> 2) & 31, j = (idx >> 7) % TOKEN_TILES, s = (idx >> 7) / TOKEN_TILES;
    ch = (block_strip0 + s) * 16 + (l >> 2) + 8 * (e >> 1);  // (s counts on into the second half's strips)
    tok = tok0 + 8 * j + 2 * (l & 3) + (e & 1);
  };
  // The warps' sums of output idx, in unit order.
  auto block_sum = [&](int idx) {
    const int half_of_idx = idx / kElems, warp_idx = idx % kElems;
    float v = 0.0f;
#pragma unroll
    for (int u = 0; u < kUnits; ++u) v += sums[(PAIRED ? 2 * u + half_of_idx : u) * kElems + warp_idx];
    return v;
  };
  auto store = [&](int tok, int ch, float v) {
    if (bias != nullptr) v += to_float(bias[ch]);
    y[static_cast<int64_t>(tok) * p.N + ch] = from_float<T>(v);
  };
  for (int idx = threadIdx.x; idx < kBlockElems; idx += kThreads) {
    int tok, ch;
    element(idx, tok, ch);
    const float v = block_sum(idx);
    if (tok >= p.M || ch >= p.N) continue;
    if (p.splits == 1) {
      store(tok, ch, v);
    } else {
      __stcg(p.partials + split * split_stride + static_cast<int64_t>(tok) * p.N + ch, v);
    }
  }
  if (p.splits == 1) return;

  // ---- split K: the last block of this tile sums the splits' partials in split order -------------
  int* lock = p.locks + token_tile * gridDim.x + block_n;
  if (!split_k_is_last_block(lock, p.splits, &s_is_last)) return;
  for (int idx = threadIdx.x; idx < kBlockElems; idx += kThreads) {
    int tok, ch;
    element(idx, tok, ch);
    if (tok >= p.M || ch >= p.N) continue;
    const float* src = p.partials + static_cast<int64_t>(tok) * p.N + ch;
    float v = 0.0f;
    for (int sp = 0; sp < p.splits; ++sp) v += __ldcg(src + sp * split_stride);
    store(tok, ch, v);
  }
  if (threadIdx.x == 0) *lock = 0;  // ready for the next call (kernels on one stream run in order)
}


template <typename T, int TOKEN_TILES, int GK, int WARPS, bool X_RING, bool W_RING, bool PAIRED>
void launch_warps(const SmallMParams& p, dim3 grid, cudaStream_t stream) {
  auto launch = [&](auto kernel, bool asym) {
    const int smem = W_RING ? w_ring_smem_bytes(WARPS, group_rows_per_chunk(GK), asym)
                            : dynamic_smem_bytes(TOKEN_TILES, WARPS, uses_x_ring(TOKEN_TILES, X_RING),
                                                 group_rows_per_chunk(GK), asym, PAIRED);
    // Not stream operations: fine during CUDA graph capture. (W_RING: the largest carveout, so that the
    // SM holds its 16 warps' rings.)
    if (smem > 0) C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    if (W_RING) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                          cudaSharedmemCarveoutMaxShared));
    }
    cudaLaunchConfig_t config = {};
    config.gridDim = grid;
    config.blockDim = dim3(WARPS * 32);
    config.dynamicSmemBytes = smem;
    config.stream = stream;
    cudaLaunchAttribute programmatic = programmatic_launch_attribute();
    config.attrs = &programmatic;
    config.numAttrs = p.programmatic ? 1 : 0;
    C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, p));
  };
  if (p.zeros != nullptr) {
    launch(w4a16_small_m_kernel<T, TOKEN_TILES, GK, true, WARPS, X_RING, W_RING, PAIRED>, true);
  } else if constexpr (W_RING) {
    TORCH_CHECK(false, "w4a16 small-M kernel: the weight ring is only built for weights with zero points");
  } else {
    launch(w4a16_small_m_kernel<T, TOKEN_TILES, GK, false, WARPS, X_RING, W_RING, PAIRED>, false);
  }
}

template <typename T, int TOKEN_TILES, int GK, bool X_RING, bool W_RING, bool PAIRED>
void launch_kind(const SmallMParams& p, dim3 grid, cudaStream_t stream) {
  if (p.warps == 16) {
    launch_warps<T, TOKEN_TILES, GK, 16, X_RING, W_RING, PAIRED>(p, grid, stream);
  } else if (p.warps == 4) {
    launch_warps<T, TOKEN_TILES, GK, 4, X_RING, W_RING, PAIRED>(p, grid, stream);
  } else if (p.warps == 2) {  // small_m_config gives 2 warps only to one token tile and groups other than 32
    if constexpr (TOKEN_TILES == 1 && GK != kGroup32 && !PAIRED) {
      launch_warps<T, TOKEN_TILES, GK, 2, X_RING, W_RING, PAIRED>(p, grid, stream);
    } else {
      TORCH_CHECK(false, "w4a16 small-M kernel: no 2-warp instance for this token tile count and group size");
    }
  } else {
    launch_warps<T, TOKEN_TILES, GK, 8, X_RING, W_RING, PAIRED>(p, grid, stream);
  }
}

template <typename T, int TOKEN_TILES, bool X_RING, bool W_RING = false, bool PAIRED = false>
void launch_typed(const SmallMParams& p, cudaStream_t stream) {
  constexpr int kChannels = small_m_block_channels(PAIRED);
  const dim3 grid((p.N + kChannels - 1) / kChannels, p.splits, (p.M + kSmallMTokens - 1) / kSmallMTokens);
  if constexpr (W_RING) {  // built for group 32 with zeros only (small_m_config)
    TORCH_CHECK(p.group_len == 32, "w4a16 small-M kernel: the weight ring is only built for group 32");
    launch_kind<T, TOKEN_TILES, kGroup32, X_RING, W_RING, PAIRED>(p, grid, stream);
  } else if (p.group_len == 32) {
    launch_kind<T, TOKEN_TILES, kGroup32, X_RING, W_RING, PAIRED>(p, grid, stream);
  } else if (p.group_len == 64) {
    launch_kind<T, TOKEN_TILES, kGroup64, X_RING, W_RING, PAIRED>(p, grid, stream);
  } else {
    launch_kind<T, TOKEN_TILES, kGroupWide, X_RING, W_RING, PAIRED>(p, grid, stream);
  }
  QK_CHECK_LAUNCH();
}

// Two token tiles (M > 8) always stage x in the ring (per warp pair where small_m_config pairs them); one tile
// does from kXRingMinTokens tokens (see X_RING); below that, the weights go through the weight ring where
// small_m_config says so (W_RING).
template <typename T>
void launch_for_tokens(const SmallMParams& p, cudaStream_t stream) {
  if (n8_tiles_for(p.M) == 2) {
    if (p.paired) {
      launch_typed<T, 2, false, false, true>(p, stream);
    } else {
      launch_typed<T, 2, false>(p, stream);
    }
  } else if (p.M >= kXRingMinTokens) {
    launch_typed<T, 1, true>(p, stream);
  } else if (p.weight_ring) {
    launch_typed<T, 1, false, true>(p, stream);
  } else {
    launch_typed<T, 1, false>(p, stream);
  }
}

}  // namespace

SmallMConfig small_m_config(int64_t M, int64_t N, int64_t K, int64_t group_len, bool asym, int sm_count,
                            int smem_per_block, int64_t max_locks, bool allow_paired) {
  const int64_t token_tiles = (M + kSmallMTokens - 1) / kSmallMTokens;
  const int64_t chunks = (K / kBK + kChunkTiles - 1) / kChunkTiles;
  SmallMConfig config;
  // Warp pairs (PAIRED, two token tiles) where their blocks of 64 channels still fill at least 7/8 of the SMs (so
  // need no K split either). Pairs halve the activations each warp copies from L2 (at 16 tokens 4 KB per 2 KB of
  // weights a chunk). H100, fp16 g128, CUDA-graph medians, same build, 32-channel blocks -> pairs, us at M = 9 /
  // 16: 8192 x 8192 16.6 -> 15.6 / 15.5 -> 14.4, 28672 x 8192 52.6 -> 46.5 / 47.0 -> 44.1, 4096 x 14336 18.0 ->
  // 16.7 / 14.7 -> 14.0, 8192 x 28672 53.5 -> 55.7 (slower) / 51.8 -> 49.3; at M = 32 (two token tiles of small
  // weights) 4096 x 4096 8.7 -> 8.3, 896 x 4864 4.9 -> 5.0. Pairs everywhere (session 23) were slower where fewer
  // blocks made the plan split K (4096 x 4096 at M = 16: 6.5 -> 8.3) or left SMs idle (896 x 4864: 76 blocks of
  // pairs against 152 of 8 warps, 3.6 -> 3.8).
  // Only where a block of 16 paired warps fits (Hopper's 227 KB; measured only there).
  const int n8_tiles = n8_tiles_for(M);
  const int group_rows = group_rows_per_chunk(group_len == 32 ? kGroup32 : group_len == 64 ? kGroup64 : kGroupWide);
  auto fits16 = [&](bool paired) {
    return static_smem_bytes(n8_tiles, 16) + dynamic_smem_bytes(n8_tiles, 16, true, group_rows, asym, paired) <=
           smem_per_block;
  };
  auto blocks_of = [&](bool paired) {
    return (N + small_m_block_channels(paired) - 1) / small_m_block_channels(paired) * token_tiles;
  };
  const int64_t paired_blocks = blocks_of(true);
  config.paired = allow_paired && n8_tiles == 2 && fits16(true) &&
                  8 * paired_blocks >= 7 * static_cast<int64_t>(sm_count);
  const int64_t blocks = blocks_of(config.paired);
  // 16-warp blocks when they all run in one wave (one per SM) and 16 warps' shared memory fits a block (two
  // token tiles: 160 KB, more than sm_89's 99 KB). Between one and two blocks per SM, 16-warp blocks had
  // run a second wave: 8-warp ones in one wave measured on the H200 (fp16, same call, M = 1 / 16), group
  // 128: 896 x 4864 (152 blocks) 4.6 -> 3.2 us / 6.9 -> 4.6, 8192 x 8192 (256) 13.8 -> 11.5 / 19.0 -> 16.8,
  // 28672 x 8192 33.4 -> 31.5 / 53.4 -> 53.3, 2048 x 8192 6.3 -> 5.2 / 8.9 -> 6.8; group 32 with zeros
  // 1.03-1.59x faster on the same shapes. In one wave, 8 warps instead (H100, session 27, fp16 g128, M = 1 / 4,
  // us, back to back; then each call after another kernel): 14336 x 4096 11.5 -> 13.6 / 12.7 -> 14.6 (12.6 ->
  // 13.4 / 13.9 -> 14.2), 3072 x 1024 and 1536 x 576 slower too; 4096 x 4096 5.9 -> 5.5 / 6.2 -> 5.9 back to
  // back only (the next call's blocks fit beside 8-warp ones); after another kernel 5.9 / 6.1 either way.
  config.warps = blocks <= sm_count && fits16(config.paired) ? 16 : 8;
  // 4-warp blocks (4 per SM) when 8-warp ones would run in more than one wave and 4-warp ones fit in
  // one: no partial second wave. Measured on the H200 (4096 x 14336: 448 blocks, 1.7 waves of 8-warp
  // blocks): 6-10% faster at M = 1..16; with more blocks than one wave holds (8192 x 28672) no gain.
  // (sm_89's 100 KB of shared memory per SM holds two 4-warp blocks with two token tiles, or one 8-warp
  // one: the same warps per SM, in twice the block slots.)
  if (blocks > 2 * sm_count && blocks <= 4 * sm_count) config.warps = 4;
  // 2-warp blocks (8 per SM) one step further: 4-warp ones would take more than one wave, 2-warp ones fit
  // in one. Measured on the H200 (fp16, M = 1, 4, 8, repeated in one call): group 128 at 8192 x 28672
  // (896 blocks) 3.9-5.3% faster at M = 1 and 4, equal at M = 8; 3584 x 18944 (592 blocks) 2.5-4% faster.
  // Group 32 was mixed (8192 x 28672 M = 8 13% faster, 3584 x 18944 2-11% slower), so it keeps 8 warps.
  // Only one token tile: two would need 8 private activation rings of 33 KB per SM.
  if (n8_tiles == 1 && group_len != 32 && blocks > 4 * sm_count && blocks <= 8 * sm_count) config.warps = 2;
  // The weight ring (W_RING) below kXRingMinTokens tokens for group 32 with zeros, where an SM holds 16
  // warps' rings: the H100 / H200 (228 KB per SM) do, sm_80's 164 KB and sm_86/89's 100 KB do not. (An
  // SM's shared memory is taken as the per-block maximum + 1 KB, and each block reserves 1 KB.) Measured
  // on the H200 (fp16, M = 1 and 4, ring against register stages in one call): group 32 with zeros, whose
  // register stages spill, 1.4-1.7x faster on the Llama shapes (8192 x 28672 M = 1: 48.0 us against
  // 82.4); everywhere else the ring was slower or equal (group 128 symmetric 8192 x 8192 M = 4: 18.6 us
  // against 14.5; group 128 with zeros 4096 x 14336 M = 1: 13.3 against 11.4).
  const int64_t blocks_per_sm = kWarpsPerSM / config.warps;
  const int64_t ring_block_bytes =
      static_smem_bytes(1, config.warps) + w_ring_smem_bytes(config.warps, group_rows, asym);
  config.weight_ring = M < kXRingMinTokens && group_len == 32 && asym && ring_block_bytes <= smem_per_block &&
                       blocks_per_sm * (ring_block_bytes + 1024) <= smem_per_block + 1024;
  // Splitting K costs a partial tile to write and read and a serial step at the end (measured on the
  // H100: a second split made every Llama shape slower once the blocks cover the SMs, also where the blocks
  // fill the SMs unevenly, e.g. 8192 x 28672 at M = 16, 448 blocks: 47.6 us, 2 splits 51.8-66.6; session 27),
  // so split only up to one block per SM, and keep at least one chunk per warp.
  config.splits = 1;
  if (blocks < sm_count && blocks <= max_locks) {
    config.splits = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(sm_count / blocks, chunks / config.warps)));
  }
  return config;
}

std::vector<int64_t> small_m_plan(int64_t M, int64_t N, int64_t K, int64_t group_len, bool asym, int sm_count,
                                  int smem_per_block) {
  const SmallMConfig config =
      small_m_config(M, N, K, group_len, asym, sm_count, smem_per_block, std::numeric_limits<int64_t>::max(), true);
  return {config.warps, config.splits, config.weight_ring ? 1 : 0, config.paired ? 1 : 0};
}

void launch_small_m(bool bf16, const SmallMParams& p, cudaStream_t stream) {
  bf16 ? launch_for_tokens<__nv_bfloat16>(p, stream) : launch_for_tokens<__half>(p, stream);
}

}  // namespace w4a16
}  // namespace quantkern
