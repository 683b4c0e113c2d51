// Hopper (sm_90a) building blocks shared by the wgmma kernels (csrc/w4a16_wgmma.cu, csrc/int_wgmma.cu):
// wgmma fences and waits, the accumulator operand lists of the wgmma asm statements, mbarriers, the copy
// engine (TMA boxes and bulk copies), the shared-memory matrix descriptor of 128-byte-swizzled K-major
// tiles, the host's tensor-map encoder, and the check that the running GPU can take this build's sm_90a code.
#pragma once

#include <cstdint>
#include <string>

#include <cuda.h>  // CUtensorMap (the type only: the driver's encoder is fetched at run time)
#include <cudaTypedefs.h>

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include "common.cuh"

// The CUDA arch list the extension is built for (setup.py: -DQUANTKERN_CUDA_ARCHS="..."; CMake: a
// generated header), read by wgmma_available.
#if defined(QUANTKERN_BUILD_CONFIG_H)
#include "quantkern_build_config.h"
#endif
#ifndef QUANTKERN_CUDA_ARCHS
#define QUANTKERN_CUDA_ARCHS "unknown"
#endif

// wgmma, setmaxnreg and friends exist only in the arch-specific sm_90a target; other archs of a fat
// build compile the kernels' bodies away (the host never launches them there).
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define QK_HAS_WGMMA 1
#else
#define QK_HAS_WGMMA 0
#endif

// ---------------------------------------------------------------------------------------------
// wgmma accumulator operands (the inline-asm operand lists are long: generated once here)
// ---------------------------------------------------------------------------------------------
// QK_WGMMA_ACC_REGS_<N>: the "{%0, ..., %N-1}," placeholder list of N accumulator registers, to which
// the instruction's other operands follow as %N, %N+1, ...; QK_WGMMA_ACC_<N>(C): the N read-write
// operands d[0..N-1] with constraint letter C ("f": fp32 accumulators, "r": int32). An asm statement
// using them names its accumulator array d. N = TOKENS / 2 registers for a 64 x TOKENS tile.
#define QK_WGMMA_ACC_8(C, i)                                                                                      \
  "+" C(d[i]), "+" C(d[i + 1]), "+" C(d[i + 2]), "+" C(d[i + 3]), "+" C(d[i + 4]), "+" C(d[i + 5]), "+" C(d[i + 6]), \
      "+" C(d[i + 7])
#define QK_WGMMA_ACC_32(C) QK_WGMMA_ACC_8(C, 0), QK_WGMMA_ACC_8(C, 8), QK_WGMMA_ACC_8(C, 16), QK_WGMMA_ACC_8(C, 24)
#define QK_WGMMA_ACC_64(C)                                                                                    \
  QK_WGMMA_ACC_32(C), QK_WGMMA_ACC_8(C, 32), QK_WGMMA_ACC_8(C, 40), QK_WGMMA_ACC_8(C, 48), QK_WGMMA_ACC_8(C, 56)
#define QK_WGMMA_ACC_128(C)                                                                                   \
  QK_WGMMA_ACC_64(C), QK_WGMMA_ACC_8(C, 64), QK_WGMMA_ACC_8(C, 72), QK_WGMMA_ACC_8(C, 80), QK_WGMMA_ACC_8(C, 88), \
      QK_WGMMA_ACC_8(C, 96), QK_WGMMA_ACC_8(C, 104), QK_WGMMA_ACC_8(C, 112), QK_WGMMA_ACC_8(C, 120)
#define QK_WGMMA_ACC_REGS_32 \
  " {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15," \
  " %16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31},"
#define QK_WGMMA_ACC_REGS_64 \
  " {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15," \
  " %16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31," \
  " %32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47," \
  " %48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63},"
#define QK_WGMMA_ACC_REGS_128 \
  " {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15," \
  " %16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31," \
  " %32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47," \
  " %48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63," \
  " %64,%65,%66,%67,%68,%69,%70,%71,%72,%73,%74,%75,%76,%77,%78,%79," \
  " %80,%81,%82,%83,%84,%85,%86,%87,%88,%89,%90,%91,%92,%93,%94,%95," \
  " %96,%97,%98,%99,%100,%101,%102,%103,%104,%105,%106,%107,%108,%109,%110,%111," \
  " %112,%113,%114,%115,%116,%117,%118,%119,%120,%121,%122,%123,%124,%125,%126,%127},"

namespace quantkern {
namespace hopper {

// Whether `device` runs this build's wgmma kernels: an sm_90 GPU and "9.0a" among the built archs.
inline bool wgmma_available(int device) {
  static int cached[64] = {0};  // 0: unknown, 1: yes, 2: no
  if (device < 0 || device >= 64) device = 0;
  if (cached[device] == 0) {
    const bool built = std::string(QUANTKERN_CUDA_ARCHS).find("9.0a") != std::string::npos;
    int major = 0, minor = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
    cached[device] = built && major == 9 && minor == 0 ? 1 : 2;
  }
  return cached[device] == 1;
}

// A 2-D tensor map (inner dimension contiguous) for TMA boxes of box_inner x box_outer elements.
// Encoded per call where the tensor changes (a few microseconds; a kernel parameter under CUDA graph
// capture). The driver's encoder is fetched through the runtime, so nothing links libcuda.
inline CUtensorMap encode_tensor_map_2d(const char* op, CUtensorMapDataType dtype, const void* base, int64_t inner,
                                        int64_t outer, int64_t row_bytes, int box_inner, int box_outer,
                                        CUtensorMapSwizzle swizzle) {
  static PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found;
    C10_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found));
    TORCH_CHECK(found == cudaDriverEntryPointSuccess && fn != nullptr,
                "quantkern: the CUDA driver has no cuTensorMapEncodeTiled (needs CUDA 12)");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  CUtensorMap map;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(inner), static_cast<cuuint64_t>(outer)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(row_bytes)};
  const cuuint32_t box[2] = {static_cast<cuuint32_t>(box_inner), static_cast<cuuint32_t>(box_outer)};
  const cuuint32_t element_strides[2] = {1, 1};
  const CUresult result = encode(&map, dtype, 2, const_cast<void*>(base), dims, strides, box, element_strides,
                                 CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                                 CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  TORCH_CHECK(result == CUDA_SUCCESS, op, ": cuTensorMapEncodeTiled failed (CUresult ", static_cast<int>(result),
              ") for a tensor of ", outer, " rows x ", inner, " elements");
  return map;
}

// ---------------------------------------------------------------------------------------------
// wgmma (PTX ISA 8.0)
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// Orders this thread's generic-proxy writes to shared memory before later async-proxy reads of it (wgmma operands).
__device__ __forceinline__ void fence_proxy_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// Keep the compiler from moving accesses of wgmma operand registers across a wgmma fence, issue or
// wait (volatile asm statements stay in program order).
template <int N>
__device__ __forceinline__ void fence_registers(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
template <int N>
__device__ __forceinline__ void fence_registers(int (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+r"(r[i])::"memory");
}
__device__ __forceinline__ void pin_operands(uint32_t (&r)[4]) {
  asm volatile("" : "+r"(r[0]), "+r"(r[1]), "+r"(r[2]), "+r"(r[3])::"memory");
}

// Shared-memory matrix descriptor: K-major, 128-byte swizzle, 8-row core-matrix groups 1024 bytes
// apart (stride byte offset), leading byte offset unused with this swizzle (1).
__device__ __forceinline__ uint64_t smem_descriptor(uint32_t addr) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (static_cast<uint64_t>(1) << 16) |
         (static_cast<uint64_t>(1024 >> 4) << 32) | (static_cast<uint64_t>(1) << 62);
}

// ---------------------------------------------------------------------------------------------
// mbarriers and the copy engine (TMA): one barrier per stage counts the stage's bytes in
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ void mbarrier_init(uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbarrier_init_fence() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
// One lane of the (converged) warp: true in exactly one of them (elect.sync). Guarding a copy with it
// rather than with lane == 0 leaves the copy's operands in uniform registers: no per-lane loop.
__device__ __forceinline__ bool elect_one_lane() {
  uint32_t elected;
  asm volatile(
      "{\n .reg .pred p;\n elect.sync _|p, 0xffffffff;\n selp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(elected));
  return elected != 0;
}

__device__ __forceinline__ void mbarrier_expect_bytes(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
// One arrival on the barrier (release semantics: the thread's, and through elect.sync / __syncwarp its
// warp's, earlier shared-memory reads are ordered before it).
__device__ __forceinline__ void mbarrier_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.release.cta.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbarrier_wait(uint32_t bar, uint32_t phase) {
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(phase)
        : "memory");
  } while (!done);
}
// A 2-D box of the tensor map at (inner, outer) element coordinates; out-of-range elements arrive as
// zeros and count towards the barrier's bytes like the others.
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const CUtensorMap* map, int inner, int outer, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(
          dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(inner), "r"(outer), "r"(bar)
      : "memory");
}
// A contiguous run of `bytes` (a multiple of 16, 16-byte aligned at both ends).
__device__ __forceinline__ void bulk_load(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(dst),
               "l"(src), "r"(bytes), "r"(bar)
               : "memory");
}

// ---------------------------------------------------------------------------------------------
// The wgmma kernels' stage ring: STAGES shared-memory stages, stage s filled by the copy engine on
// the mbarrier at bar0 + 8 s, STAGES - 2 k-tiles in flight ahead of the one computed. Running
// indices, no division per k-tile: k-tile it is in stage `compute_stage` (barrier parity `parity`),
// and the stage refilled at k-tile it, the one of k-tile it - 2, is `refill_stage`.
// ---------------------------------------------------------------------------------------------

template <int STAGES>
struct StageRing {
  uint32_t bar0;
  int compute_stage = 0, refill_stage = STAGES - 2;
  uint32_t parity = 0;

  __device__ explicit StageRing(uint32_t first_barrier) : bar0(first_barrier) {}
  __device__ uint32_t barrier(int stage) const { return bar0 + 8 * stage; }

  // One k-tile's turn, called by every thread once the caller's wgmma wait has retired k-tile it - 2:
  // thread 0 arms the freed stage (arm(stage): its barrier's previous phase completed, since every
  // thread waited on it), the block barrier makes its data free in every warpgroup, then every thread
  // calls issue(stage), which has its chosen lanes issue their share of the copies into it; then the
  // wait for k-tile it. `refill`: whether a k-tile is left to load. Returns the stage of k-tile it.
  template <typename Arm, typename Issue>
  __device__ __forceinline__ int next(bool refill, bool thread0, Arm&& arm, Issue&& issue) {
    if (thread0 && refill) arm(refill_stage);
    __syncthreads();
    if (refill) issue(refill_stage);
    refill_stage = refill_stage == STAGES - 1 ? 0 : refill_stage + 1;
    mbarrier_wait(barrier(compute_stage), parity);
    const int stage = compute_stage;
    if (++compute_stage == STAGES) {
      compute_stage = 0;
      parity ^= 1;
    }
    return stage;
  }
};

// ---------------------------------------------------------------------------------------------
// The wgmma kernels' output tile: D[channel][token] fragments staged in shared memory as a
// [token][channel] tile of 16-bit values (rows padded by 16 bytes: conflict-free), then written to
// y [M, N] with coalesced 16-byte stores. The tile reuses the pipeline stages (the caller syncs first).
// ---------------------------------------------------------------------------------------------

template <int CHANNELS>
constexpr int kStagedRowBytes = CHANNELS * 2 + 16;

// A thread's packed pairs for channels ch and ch + 8 (low half: ch): `lo` of token tok, `hi` of tok + 1.
template <int CHANNELS>
__device__ __forceinline__ void stage_output_pairs(uint32_t tile, int tok, int ch, uint32_t lo, uint32_t hi) {
  constexpr int kPitch = kStagedRowBytes<CHANNELS>;
  const uint32_t base = tile + tok * kPitch;
  asm volatile("st.shared.u16 [%0], %1;\n" ::"r"(base + ch * 2), "h"(static_cast<uint16_t>(lo & 0xFFFF)));
  asm volatile("st.shared.u16 [%0], %1;\n" ::"r"(base + (ch + 8) * 2), "h"(static_cast<uint16_t>(lo >> 16)));
  asm volatile("st.shared.u16 [%0], %1;\n" ::"r"(base + kPitch + ch * 2), "h"(static_cast<uint16_t>(hi & 0xFFFF)));
  asm volatile("st.shared.u16 [%0], %1;\n" ::"r"(base + kPitch + (ch + 8) * 2), "h"(static_cast<uint16_t>(hi >> 16)));
}

// The staged TOKENS x CHANNELS tile -> y[m0.., n0..] (16-bit elements, row stride N; rows past M and
// columns past N are skipped: N is a multiple of 8).
template <int CHANNELS, int TOKENS, int THREADS>
__device__ __forceinline__ void store_staged_tile(uint32_t tile, void* y, int M, int N, int m0, int n0) {
  constexpr int kChunks = CHANNELS / 8;  // 16-byte chunks per token row
  uint16_t* __restrict__ out = static_cast<uint16_t*>(y);
#pragma unroll
  for (int i = threadIdx.x; i < TOKENS * kChunks; i += THREADS) {
    const int r = i / kChunks, c = i % kChunks;
    const int row = m0 + r, col = n0 + c * 8;
    if (row < M && col < N) {
      *reinterpret_cast<uint4*>(out + static_cast<int64_t>(row) * N + col) =
          ld_shared_v4(tile + r * kStagedRowBytes<CHANNELS> + c * 16);
    }
  }
}

}  // namespace hopper
}  // namespace quantkern
