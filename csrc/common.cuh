// Shared helpers for quantkern's CUDA kernels.
//
// Deliberately light on includes: no <torch/extension.h> (only csrc/bindings.cpp includes it, to keep
// compile time down) and no <ATen/cuda/CUDAContext.h> (it pulls in cuBLAS/cuSPARSE headers that a
// bare CUDA toolkit may not have). The current stream comes from <c10/cuda/CUDAStream.h>.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

namespace quantkern {

// ---------------------------------------------------------------------------------------------
// Host-side checks and launch errors
// ---------------------------------------------------------------------------------------------

// Checks that the last kernel launch succeeded (cudaGetLastError: no host sync, fine inside
// CUDA graph capture). Throws a c10::Error with the CUDA error string otherwise.
#define QK_CHECK_LAUNCH() C10_CUDA_KERNEL_LAUNCH_CHECK()

// Input checks with messages that name the op and the argument.
inline void check_cuda(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got a tensor on ", t.device());
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", dim, "-D, got shape ", t.sizes());
}

inline void check_contiguous(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_contiguous(), op, ": ", name,
              " must be contiguous (row-major); call .contiguous() first. Got strides ", t.strides(),
              " for shape ", t.sizes());
}

inline void check_float_dtype(const at::Tensor& t, const char* op, const char* name) {
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kHalf || dt == at::kBFloat16 || dt == at::kFloat, op, ": ", name,
              " must be float16, bfloat16 or float32, got ", dt);
}

inline void check_bits(int64_t bits, const char* op) {
  TORCH_CHECK(bits == 4 || bits == 8, op, ": bits must be 4 or 8, got ", bits);
}

// The input of a per-token activation quantizer (quantize_per_token, hadamard_quantize): x [rows, K]
// contiguous float16/bfloat16/float32 on CUDA, bits 4 or 8 (4 packs two values per byte: K even),
// clip_ratio in (0, 1] (written so that NaN fails too), rows within a grid dimension.
inline void check_per_token_quant_input(const at::Tensor& x, int64_t bits, double clip_ratio, const char* op) {
  check_cuda(x, op, "x");
  check_dim(x, 2, op, "x");
  check_float_dtype(x, op, "x");
  check_contiguous(x, op, "x");
  check_bits(bits, op);
  TORCH_CHECK(clip_ratio > 0.0 && clip_ratio <= 1.0, op, ": clip_ratio must be in (0, 1], got ", clip_ratio);
  TORCH_CHECK(bits == 8 || x.size(1) % 2 == 0, op,
              ": bits=4 packs two values per byte, so x.size(1) (K) must be even, got K = ", x.size(1));
  TORCH_CHECK(x.size(0) <= INT32_MAX, op, ": too many rows (", x.size(0), "), at most 2^31 - 1");
}

inline bool is_aligned(const void* p, size_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// A device attribute, queried once per (attribute, device): the host paths that need one run on every call.
template <cudaDeviceAttr kAttribute>
int device_attribute(int device) {
  static int cached[64] = {0};
  if (device < 0 || device >= 64) device = 0;
  if (cached[device] == 0) C10_CUDA_CHECK(cudaDeviceGetAttribute(&cached[device], kAttribute, device));
  return cached[device];
}
inline int num_sms(int device) { return device_attribute<cudaDevAttrMultiProcessorCount>(device); }

// Programmatic dependent launch (sm_90+): a kernel launched with this attribute may start before the previous
// kernel on the stream has finished; it must call wait_for_prior_grids() before reading anything that kernel
// wrote (or writing anything it reads). What it does before that overlaps the previous kernel's tail.
inline bool programmatic_launch_supported(int device) {
  return device_attribute<cudaDevAttrComputeCapabilityMajor>(device) >= 9;
}

// The launch attribute that makes a launch programmatic (cudaLaunchKernelEx).
inline cudaLaunchAttribute programmatic_launch_attribute() {
  cudaLaunchAttribute attribute = {};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  return attribute;
}

// The launch attribute of a thread-block cluster of x * y blocks (cudaLaunchKernelEx; sm_90+).
inline cudaLaunchAttribute cluster_launch_attribute(unsigned x, unsigned y = 1) {
  cudaLaunchAttribute attribute = {};
  attribute.id = cudaLaunchAttributeClusterDimension;
  attribute.val.clusterDim.x = x;
  attribute.val.clusterDim.y = y;
  attribute.val.clusterDim.z = 1;
  return attribute;
}

// When to launch that way: only inside CUDA-graph capture, right after one of our kernels that calls
// allow_dependent_launch (record_trigger_kernel says which). The capture's tail node tells: it is that kernel's
// node exactly when nothing else was captured on the stream since. After any other kernel a programmatic launch
// measured slower (H200, W4A16 after a one-block elementwise kernel: +0.1-1.0 us), and eager launches leave the
// GPU idle between kernels anyway. Per host thread (a capture is recorded by the thread that launches into it).
namespace programmatic {
struct TriggerNode {
  unsigned long long capture_id = 0;
  cudaGraphNode_t node = nullptr;
};
inline TriggerNode& last_trigger_node() {
  thread_local TriggerNode last;
  return last;
}
// The stream's capture id and its one tail node; false when it is not capturing or has several tails.
inline bool capture_tail(cudaStream_t stream, unsigned long long* id, cudaGraphNode_t* node) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  const cudaGraphNode_t* tails = nullptr;
  size_t count = 0;
#if CUDART_VERSION >= 13000
  C10_CUDA_CHECK(cudaStreamGetCaptureInfo(stream, &status, id, nullptr, &tails, nullptr, &count));
#else
  C10_CUDA_CHECK(cudaStreamGetCaptureInfo_v2(stream, &status, id, nullptr, &tails, &count));
#endif
  if (status != cudaStreamCaptureStatusActive || count != 1) return false;
  *node = tails[0];
  return true;
}
}  // namespace programmatic

// Whether the next kernel on `stream` should be launched as a programmatic dependent (see above).
inline bool follows_trigger_kernel(cudaStream_t stream, int device) {
  if (!programmatic_launch_supported(device)) return false;
  unsigned long long id = 0;
  cudaGraphNode_t node = nullptr;
  if (!programmatic::capture_tail(stream, &id, &node)) return false;
  const programmatic::TriggerNode& last = programmatic::last_trigger_node();
  return last.capture_id == id && last.node == node;
}

// Call right after launching a kernel that calls allow_dependent_launch on `stream`.
inline void record_trigger_kernel(cudaStream_t stream) {
  unsigned long long id = 0;
  cudaGraphNode_t node = nullptr;
  if (programmatic::capture_tail(stream, &id, &node)) programmatic::last_trigger_node() = {id, node};
}

// ---------------------------------------------------------------------------------------------
// Device helpers
// ---------------------------------------------------------------------------------------------

constexpr int kWarpSize = 32;

// Element <-> float conversions for the three activation dtypes (exact widening).
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// float -> T, round to nearest even (torch builds with the implicit half conversions switched off).
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// One 16-byte vector of activations: 8 x fp16/bf16 or 4 x fp32. Loaded with a single 128-bit
// instruction (ld.global.nc.v4.u32) when the address is 16-byte aligned.
template <typename T>
struct alignas(16) Vec16 {
  static constexpr int kElems = 16 / static_cast<int>(sizeof(T));
  T v[kElems];
};

template <typename T>
__device__ __forceinline__ Vec16<T> load_vec16(const T* __restrict__ p) {
  Vec16<T> out;
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
  static_assert(sizeof(Vec16<T>) == sizeof(uint4), "Vec16 must be 16 bytes");
  *reinterpret_cast<uint4*>(&out) = raw;
  return out;
}

// 16 bytes read once (weights streamed by the few-token kernels): past L1, no allocation there.
__device__ __forceinline__ uint4 load_stream_v4(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// Asks L2 for the 128-byte line holding p (no register, no wait; the data stays coherent: L2 is where every
// write lands).
__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p)); }

// 16 bytes from shared memory at a shared-window address (as smem_addr or cvta.to.shared gives it).
__device__ __forceinline__ uint4 ld_shared_v4(uint32_t addr) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "r"(addr));
  return v;
}

// max() that propagates NaN (like torch.amax): NaN wins over any number.
__device__ __forceinline__ float max_propagate_nan(float a, float b) {
  return (a > b || a != a) ? a : b;
}

// The device side of programmatic dependent launch (no-ops before sm_90, and when the kernel was launched
// without the attribute). wait_for_prior_grids: until the grids this one depends on have completed and their
// memory is visible. allow_dependent_launch: the next kernel, if launched with the attribute, may start once
// every block of this grid has called it or exited (its blocks still wait for this grid's completion in
// wait_for_prior_grids).
__device__ __forceinline__ void wait_for_prior_grids() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void allow_dependent_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// Max over the 32 lanes of a warp; every lane gets the result.
__device__ __forceinline__ float warp_reduce_max(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    v = max_propagate_nan(v, __shfl_xor_sync(0xffffffffu, v, offset));
  }
  return v;
}

// Max over a group of GROUP threads (GROUP == 32: one warp; GROUP == blockDim.x: the whole block,
// through `smem`, which must hold GROUP / 32 floats). Every thread of the group gets the result.
// For GROUP > 32 every thread of the block must call it (it contains __syncthreads), and `smem`
// must not be reused without another barrier.
template <int GROUP>
__device__ __forceinline__ float group_reduce_max(float v, float* smem) {
  static_assert(GROUP % kWarpSize == 0, "group must be whole warps");
  v = warp_reduce_max(v);
  if constexpr (GROUP == kWarpSize) {
    return v;
  } else {
    constexpr int kWarps = GROUP / kWarpSize;
    const int warp = threadIdx.x / kWarpSize;
    const int lane = threadIdx.x % kWarpSize;
    if (lane == 0) smem[warp] = v;
    __syncthreads();
    v = lane < kWarps ? smem[lane] : 0.0f;  // |x| >= 0, so 0 is a neutral element
    return warp_reduce_max(v);
  }
}

// Split K, after every thread of the block has stored its share of the tile's fp32 partials (plain or .cg
// stores): counts the block in `lock` and tells every thread whether it is the tile's last block, which then
// reads the other splits' partials (with .cg loads) and resets the counter. One fence by thread 0 after the
// block barrier releases the whole block's stores (fences are cumulative: the barrier has made them visible
// to thread 0), and one by thread 0 of the last block acquires the others', which the second barrier passes
// on to its threads: the pattern of CUTLASS's semaphore. (A fence by every thread before the barrier was the
// top stall of the W4A16 wgmma kernel at 4096 x 4096, M = 64, 8 splits: ncu, H200.)
__device__ __forceinline__ bool split_k_is_last_block(int* lock, int splits, int* s_flag) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    const bool last = atomicAdd(lock, 1) == splits - 1;
    if (last) __threadfence();
    *s_flag = last;
  }
  __syncthreads();
  return *s_flag != 0;
}

}  // namespace quantkern
