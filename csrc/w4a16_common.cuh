// Pieces shared by the two W4A16 kernels (csrc/w4a16_gemm.cu: tiles of up to 128 tokens, x in shared
// memory; csrc/w4a16_small_m.cu: up to 16 tokens, weights streamed into registers): PTX wrappers, the
// per-dtype mma and int4 conversion traits, and the small-M kernel's launcher.
#pragma once

#include <cstdint>
#include <vector>

#include "common.cuh"

namespace quantkern {
namespace w4a16 {

constexpr int kBK = 64;          // K per k-tile: 4 k16 mma steps
constexpr int kUnitBytes = 512;  // one (16-channel strip, 64-deep k-tile) unit of packed weights

// ---------------------------------------------------------------------------------------------
// PTX wrappers
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; writes zeros (reads nothing) when !valid.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ uint32_t ld_shared_u32(uint32_t addr) {
  uint32_t v;
  asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(v) : "r"(addr));
  return v;
}

__device__ __forceinline__ uint16_t ld_shared_u16(uint32_t addr) {
  uint16_t v;
  asm volatile("ld.shared.u16 %0, [%1];\n" : "=h"(v) : "r"(addr));
  return v;
}

// cp.async of one activation tile (the mma.sync kernel's loader): ROWS token rows from row0 (rows >= M
// zero-filled, nothing read) x 64 k from k0 into shared memory at dst, row r at r * 128 bytes, its
// 16-byte chunk c at chunk position c ^ (r % 8): the XOR swizzle that keeps ldmatrix conflict-free (and
// the layout TMA's 128-byte swizzle gives the wgmma kernel).
template <typename T, int ROWS, int THREADS>
__device__ __forceinline__ void load_x_tile(uint32_t dst, const T* __restrict__ x, int row0, int M, int K, int k0,
                                            int tid) {
#pragma unroll
  for (int i = tid; i < ROWS * 8; i += THREADS) {  // ROWS rows x 8 chunks of 16 B
    const int r = i >> 3, c = i & 7;
    const int row = row0 + r;
    const bool ok = row < M;
    cp_async16(dst + r * 128 + ((c ^ (r & 7)) << 4), x + static_cast<int64_t>(ok ? row : 0) * K + k0 + c * 8, ok);
  }
}

// (a & b) | c in one instruction.
__device__ __forceinline__ uint32_t and_or(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

// Per activation dtype: the mma instruction, the magic number of the int4 conversion, packing.
template <typename T>
struct W4Traits;

template <>
struct W4Traits<__half> {
  static constexpr uint32_t kMagic = 0x64006400u;  // 1024.0 in both halves
  static constexpr uint16_t kMagicPlus8 = 0x6408;  // 1032.0: MAGIC + the implicit zero 8
  static constexpr uint32_t kOnes = 0x3C003C00u;   // 1.0 in both halves
  // Small-M kernel: a word of 8 codes -> the mma A fragment {a0, a1, a2, a3} holding MAGIC + code
  // (registers a0, a2: channel g) and MAGIC + 16 code (a1, a3: channel g + 8): nibbles 1, 5 and 3, 7
  // are taken in place (0x00F0 is 16 ulp of 1024), so one shift and four lop3 per 8 codes.
  static constexpr float kMagicLo = 1024.0f, kMagicHi = 64.0f, kScaleHi = 1.0f / 16.0f;
  __device__ __forceinline__ static void dequant_a(uint32_t q, uint32_t (&a)[4]) {
    const uint32_t q8 = q >> 8;
    a[0] = and_or(q, 0x000F000Fu, kMagic);
    a[1] = and_or(q, 0x00F000F0u, kMagic);
    a[2] = and_or(q8, 0x000F000Fu, kMagic);
    a[3] = and_or(q8, 0x00F000F0u, kMagic);
  }
  __device__ __forceinline__ static uint32_t sub2(uint32_t a, uint32_t b) {
    uint32_t d;
    asm("sub.rn.f16x2 %0, %1, %2;\n" : "=r"(d) : "r"(a), "r"(b));
    return d;
  }
  __device__ __forceinline__ static uint32_t add2(uint32_t a, uint32_t b) {
    uint32_t d;
    asm("add.rn.f16x2 %0, %1, %2;\n" : "=r"(d) : "r"(a), "r"(b));
    return d;
  }
  __device__ __forceinline__ static float2 to_float2(uint32_t v) {
    __half2 h = *reinterpret_cast<__half2*>(&v);
    return __half22float2(h);
  }
  __device__ __forceinline__ static uint32_t from_floats(float a, float b) {
    __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  template <bool ZERO_C>
  __device__ __forceinline__ static void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    if constexpr (ZERO_C) {
      asm(
          "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
          "{%10, %10, %10, %10};\n"
          : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(0.0f));
    } else {
      asm(
          "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
          "{%0, %1, %2, %3};\n"
          : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
  }
};

template <>
struct W4Traits<__nv_bfloat16> {
  static constexpr uint32_t kMagic = 0x43004300u;  // 128.0 in both halves
  static constexpr uint16_t kMagicPlus8 = 0x4308;  // 136.0
  static constexpr uint32_t kOnes = 0x3F803F80u;   // 1.0 in both halves
  // Small-M kernel: as for fp16, but bf16's 7-bit mantissa cannot hold 16 code in place (bit 7 is
  // the exponent's), so every nibble pair is shifted down: MAGIC + code in all four registers.
  static constexpr float kMagicLo = 128.0f, kMagicHi = 128.0f, kScaleHi = 1.0f;
  __device__ __forceinline__ static void dequant_a(uint32_t q, uint32_t (&a)[4]) {
    a[0] = and_or(q, 0x000F000Fu, kMagic);
    a[1] = and_or(q >> 4, 0x000F000Fu, kMagic);
    a[2] = and_or(q >> 8, 0x000F000Fu, kMagic);
    a[3] = and_or(q >> 12, 0x000F000Fu, kMagic);
  }
  // bf16x2 add/sub as fma with 1.0 / -1.0 (sm_80+; exact here: integer values below 256).
  __device__ __forceinline__ static uint32_t sub2(uint32_t a, uint32_t b) {
    uint32_t d;
    asm("fma.rn.bf16x2 %0, %1, %2, %3;\n" : "=r"(d) : "r"(b), "r"(0xBF80BF80u), "r"(a));
    return d;
  }
  __device__ __forceinline__ static uint32_t add2(uint32_t a, uint32_t b) {
    uint32_t d;
    asm("fma.rn.bf16x2 %0, %1, %2, %3;\n" : "=r"(d) : "r"(b), "r"(0x3F803F80u), "r"(a));
    return d;
  }
  __device__ __forceinline__ static float2 to_float2(uint32_t v) {
    // bf16 -> fp32 is a 16-bit shift.
    return make_float2(__uint_as_float(v << 16), __uint_as_float(v & 0xFFFF0000u));
  }
  __device__ __forceinline__ static uint32_t from_floats(float a, float b) {
    __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  template <bool ZERO_C>
  __device__ __forceinline__ static void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    if constexpr (ZERO_C) {
      asm(
          "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
          "{%10, %10, %10, %10};\n"
          : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(0.0f));
    } else {
      asm(
          "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
          "{%0, %1, %2, %3};\n"
          : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
  }
};


// The small-M kernel (csrc/w4a16_small_m.cu): y[M, N] = x @ dequant(W)^T (+ bias) for any M, in tiles of
// 16 tokens (meant for M <= 16, where it reads the weights once). Arguments as checked by the host
// function of csrc/w4a16_gemm.cu; `partials` is an fp32 workspace of [splits, M, N] when splits > 1.
struct SmallMParams {
  const void* x;         // [M, K] T
  const uint4* qweight;  // [N/16, K/64, 32] uint4
  const void* scales;    // [G, N] T
  const void* zeros;     // [G, N] T zero codes, or nullptr (symmetric: 8)
  const void* bias;      // [N] T or nullptr
  void* y;               // [M, N] T
  float* partials;       // [splits, M, N] fp32 (splits > 1 only)
  int* locks;            // one counter per (token tile, channel block); all zero between calls
  int M, N, K;
  int group_len;         // 32, 64, 128 or K
  int k_tiles;           // K / 64
  int chunks_per_split;  // 128-deep chunks of K per split (the last split may get fewer)
  int splits;
  int warps;             // per block (each block: kSmallMChannels output channels, twice that when paired)
  bool weight_ring;      // M < 5, group 32, zeros: weights, scales and zeros through each warp's smem ring
  bool paired;           // two token tiles: warp pairs sharing activations (2 kSmallMChannels per block)
  bool programmatic;     // launched as a programmatic dependent of the previous kernel (sm_90+)
};

// Channels and tokens per block of the small-M kernel (twice the channels with warp pairs), and its launch
// configuration for a problem: warps per block, K splits (1 when `max_locks` cannot count the tiles), the weight
// ring, warp pairs (only with allow_paired: a forced split count takes 32-channel blocks); smem_per_block: the
// device's opt-in maximum of shared memory per block.
constexpr int kSmallMChannels = 32;
constexpr int small_m_block_channels(bool paired) { return paired ? 2 * kSmallMChannels : kSmallMChannels; }
constexpr int kSmallMTokens = 16;
struct SmallMConfig {
  int splits;
  int warps;
  bool weight_ring;
  bool paired;
};
SmallMConfig small_m_config(int64_t M, int64_t N, int64_t K, int64_t group_len, bool asym, int sm_count,
                            int smem_per_block, int64_t max_locks, bool allow_paired);
// {warps per block, K splits, weight ring (0/1), warp pairs (0/1)} of small_m_config for a device of sm_count SMs
// (no limit on the lock counters): quantkern._C.w4a16_small_m_plan, so tests without a GPU can check the launch rule.
std::vector<int64_t> small_m_plan(int64_t M, int64_t N, int64_t K, int64_t group_len, bool asym, int sm_count,
                                  int smem_per_block);
void launch_small_m(bool bf16, const SmallMParams& p, cudaStream_t stream);

// Which kernel the op (csrc/w4a16_gemm.cu) runs when it chooses (tile_m = 0): the small-M kernel, the wgmma
// kernel (`wgmma_available`: an sm_90 GPU and this build's sm_90a code) or the mma.sync kernel.
enum class Kernel { kSmallM, kWgmma, kMmaSync };
Kernel automatic_kernel(int64_t M, int64_t N, int64_t K, bool wgmma_available);
// The wgmma kernel's tokens per tile when it chooses (64, 128 or 256; fp16: x is float16, else bfloat16) on a
// device of sm_count SMs.
int wgmma_tokens_per_tile(int64_t M, int64_t N, int64_t K, bool fp16, int sm_count);
// Small weights from 65 or 129 tokens (uses_modelled_tiling): the wgmma kernel's token tile and K splits from a cost
// model fitted on the H100 (csrc/w4a16_gemm.cu); bf16_path: bf16 x not staged as fp16 (its kernel holds one
// 128-token block per SM and has no 256-token tile). tokens = 0: the model chooses the tile too; else its splits
// for that tile. Splits > 1 only where the tiles need at most max_locks counters.
bool uses_modelled_tiling(int64_t M, int64_t N, int64_t K);
struct WgmmaTiling {
  int tokens;  // 64, 128 or 256
  int splits;
};
WgmmaTiling modelled_wgmma_tiling(int64_t M, int64_t N, int64_t K, int tokens, bool bf16_path, int sm_count,
                                  int64_t max_locks);

// The Hopper kernel (csrc/w4a16_wgmma.cu): y = x @ dequant(W)^T (+ bias) with wgmma, in tiles of 128
// channels x `tokens` (64, 128 or 256) tokens; sm_90a only (see hopper::wgmma_available in csrc/hopper.cuh).
// `partials`: an fp32 workspace of wgmma_workspace_floats(p, tokens) floats when splits > 1.
struct WgmmaParams {
  const void* x;         // [M, K] T
  const uint4* qweight;  // [N/16, K/64, 32] uint4
  const void* scales;    // [G, N] T
  const void* zeros;     // [G, N] T zero codes, or nullptr (symmetric: 8)
  const void* bias;      // [N] T or nullptr
  void* y;               // [M, N] T
  float* partials;       // split-K workspace (splits > 1 only)
  int* locks;            // one counter per (channel block, token tile); all zero between calls
  int M, N, K;
  int group_len;         // 32, 64, 128 or K
  int k_tiles;           // K / 64
  int tiles_per_split;   // k-tiles per split (the last split may get fewer)
  int splits;
  const float* row_scale;  // bf16 x staged as fp16 (launch_wgmma's `staged`): per-token output multipliers
  int x_box_rows;          // rows of x's copy box (the launcher sets it: x_box_rows in csrc/w4a16_wgmma.cu)
};
constexpr int kWgmmaChannels = 128;  // output channels per block of the wgmma kernel
int64_t wgmma_workspace_floats(const WgmmaParams& p, int tokens);
int wgmma_blocks_per_sm(bool bf16, int tokens);  // resident blocks per SM (its launch bound)
void launch_wgmma(bool bf16, int tokens, const WgmmaParams& p, cudaStream_t stream, bool staged = false);
// bf16 activations on the fp16 kernel (csrc/w4a16_wgmma.cu, "bf16 staged as fp16"): the bf16 scales (and zeros)
// are multiplied by 2^kStagedScaleShift as they are converted to fp16, so scales s with
// 2^-(14 + shift) <= |s| <= 4094 * 2^-shift (or 0) convert exactly and (code - zero) * s stays finite; the caller
// (quantkern.layout_cuda.prepare_w4a16) checks that range once, as `scales_fit_fp16`.
constexpr int kStagedScaleShift = 8;
void stage_bf16_rows(const void* x, void* x16, float* row_scale, int M, int K, cudaStream_t stream);

}  // namespace w4a16
}  // namespace quantkern
