// quantkern::quantize_per_token(Tensor x, int bits, float clip_ratio, bool packed=True) -> (Tensor q, Tensor scale)
//
// Symmetric per-row (per-token) quantization of activations, bit-exact with
// quantkern.reference.quantize_per_token:
//
//   qmax  = 2^(bits-1) - 1                        (7 or 127)
//   scale = (absmax(row) * float(clip_ratio)) / qmax   in fp32, IEEE round-to-nearest, in that order;
//           1 where that is 0 (all-zero rows)
//   q     = clamp(round_half_even(x / scale), -qmax, qmax)   (IEEE fp32 division)
//
// Memory layout
//   x     [M, K] fp16 / bf16 / fp32, contiguous (row stride K elements).
//   q     bits=8: int8  [M, K]   one byte per element.
//         bits=4: uint8 [M, K/2] two signed two's-complement nibbles per byte, element 2j in the
//                 low nibble of byte j, element 2j+1 in the high nibble (K must be even);
//                 with packed=False: int8 [M, K], one code in [-7, 7] per byte (what the int8 tensor
//                 cores of sm_90 take: csrc/int_wgmma.cu runs W4A4 there as W4A8 on these codes).
//   scale fp32 [M].
//
// Tiling
//   A "row group" of GROUP threads owns one row: GROUP = 32 (one warp per row, 8 rows per 256-thread
//   block) when K <= kWarpPerRowMaxK, else GROUP = 256 (one block per row). Within a row, thread t
//   of the group owns the 16-byte vectors t, t + GROUP, t + 2*GROUP, ... (8 fp16/bf16 or 4 fp32
//   elements each; consecutive threads read consecutive 16 bytes, so every warp load is a fully
//   coalesced 512-byte transaction). The main loops issue kUnroll independent 16-byte loads per
//   thread before using any of them, to keep enough bytes in flight.
//   Vector path when x's base pointer is 16-byte aligned and K * sizeof(T) % 16 == 0 (then every row
//   is aligned, and so is every output vector: the outputs come fresh from the allocator and their
//   row stride is a multiple of the store width). Otherwise a scalar path, element by element
//   (bits=4: pair by pair), which is correct for any K >= 0 and any alignment.
//
// Few long rows on sm_90 (quantize_rows_cluster_kernel): one block per row leaves the row's arithmetic (an IEEE
//   division and a clamp per element) to one SM, and a few rows leave the other SMs idle. There a row is split over
//   the C (<= 8) blocks of a thread-block cluster instead: block r holds vectors [r * V, (r + 1) * V) of the row in
//   registers (at most kClusterVecsPerThread per thread, all loads issued before their use), reduces their absmax,
//   the cluster exchanges the blocks' maxima through distributed shared memory (every block computes the same row
//   scale from them; block 0 stores it), and each block quantizes and stores its own vectors. Taken for rows
//   longer than one round of the one-block path's loads (more than kUnroll * 256 vectors: K > 8192 in fp16 /
//   bf16), where M * C <= 2 * SMs (decode and small prefill) and the vector path applies; the codes and scales are
//   the same bit for bit. H200, one bf16 row (CUDA-graph medians): K = 14336 4.5 -> 3.4 us, 28672 7.2 -> 3.4;
//   16 rows of 14336 4.6 -> 3.9.
//
// Pipeline (per row group, no inter-block communication, no host sync, no allocation)
//   pass 1: stream the row, per-thread max |x| in fp32 (NaN-propagating, like torch.amax);
//           reduce: warp shuffles (xor butterfly), then for GROUP = 256 one shared-memory exchange
//           of the 8 warp maxima; every thread ends up with the row's absmax.
//   scale:  computed redundantly by every thread (identical); thread 0 of the group stores it.
//   pass 2: stream the row again (a row of up to K = 32768 fp16 is 64 KiB, so for typical tile
//           counts the re-read hits L2), quantize each element with __fdiv_rn + __float2int_rn
//           (round half to even; NaN -> 0, like the float->int8 cast of the reference), clamp in
//           integer, pack, and write one store per input vector: 8 B (bits=8, fp16/bf16),
//           4 B (bits=8 fp32, bits=4 fp16/bf16) or 2 B (bits=4 fp32).
//   one round: where one round of loads covers the row (at most kUnroll vectors a thread of its group: K up to
//           1024 fp16 / bf16 or 512 fp32 with a warp a row, up to 8192 or 4096 with a block a row) the row stays
//           in registers from pass 1 to pass 2 and is read once. At decode the quantizer is on a W4A4 layer's
//           critical path (its GEMM waits for it); H100, whole layer, 8192 x 8192: M = 1 16.0 -> 15.9 us, M = 16
//           17.0 -> 16.7; 4096 x 4096: 7.4 -> 7.2, 8.2 -> 8.0 (docs/PERF.md, session 31).
//
// Compiled without --use_fast_math: the divisions must be IEEE for bit-exact results.

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cooperative_groups.h>

#include "common.cuh"
#include "hopper.cuh"
#include "per_token_quant.cuh"

namespace quantkern {
namespace {

constexpr int kThreads = 256;             // threads per block, both variants
constexpr int kUnroll = 4;                // 16-byte vectors in flight per thread in the main loops
constexpr int64_t kWarpPerRowMaxK = 1024;  // K up to this: one warp per row

template <typename T>
__device__ __forceinline__ float vec_absmax(const Vec16<T>& v, float m) {
#pragma unroll
  for (int e = 0; e < Vec16<T>::kElems; ++e) m = max_propagate_nan(m, fabsf(to_float(v.v[e])));
  return m;
}

// Vectors first, first + stride, ... (N of them) of a row into v, every load issued before any use; zeros past end
// (|0| is neutral for the max). Returns their absmax. (Index: the type first + u * stride is computed in.)
template <typename T, int N, typename Index>
__device__ __forceinline__ float load_vectors_absmax(Vec16<T> (&v)[N], const T* __restrict__ xrow, Index first,
                                                     int stride, int64_t end) {
#pragma unroll
  for (int u = 0; u < N; ++u) {
    const int64_t i = first + u * stride;
    if (i < end) {
      v[u] = load_vec16(xrow + i * Vec16<T>::kElems);
    } else {
      *reinterpret_cast<uint4*>(&v[u]) = make_uint4(0, 0, 0, 0);
    }
  }
  float amax = 0.0f;
#pragma unroll
  for (int u = 0; u < N; ++u) amax = vec_absmax(v[u], amax);
  return amax;
}

// Quantize, pack and store the vectors that load_vectors_absmax loaded (those before end).
template <typename T, int BITS, int SBITS, int N, typename Index>
__device__ __forceinline__ void quantize_store_vectors(const Vec16<T> (&v)[N], float scale, uint8_t* __restrict__ qrow,
                                                       Index first, int stride, int64_t end) {
#pragma unroll
  for (int u = 0; u < N; ++u) {
    const int64_t i = first + u * stride;
    if (i < end) quantize_store_vec<T, BITS, SBITS>(v[u], scale, qrow, i);
  }
}

// The vector path of a row that one round of loads covers (at most kUnroll vectors a thread of its group): the
// row stays in registers from the absmax to the codes, read once (the two-pass loop below re-reads it from L2,
// a round trip on the critical path of a decode step's quantization).
template <typename T, int BITS, int SBITS, int GROUP>
__device__ __forceinline__ void quantize_row_in_registers(const T* __restrict__ xrow, uint8_t* __restrict__ qrow,
                                                          float* __restrict__ scale_out, int64_t K, float clip,
                                                          int t, float* smem) {
  const int64_t nvec = K / Vec16<T>::kElems;
  Vec16<T> v[kUnroll];
  float amax = load_vectors_absmax(v, xrow, t, GROUP, nvec);
  amax = group_reduce_max<GROUP>(amax, smem);
  const float scale = per_token_scale(amax, clip, static_cast<float>(kQmaxOf<BITS>));
  if (t == 0) *scale_out = scale;
  quantize_store_vectors<T, BITS, SBITS>(v, scale, qrow, t, GROUP, nvec);
}

// ONE_ROUND (with VEC): every row has at most kUnroll * GROUP vectors (quantize_row_in_registers).
template <typename T, int BITS, int SBITS, bool VEC, int GROUP, bool ONE_ROUND>
__global__ void __launch_bounds__(kThreads)
quantize_per_token_kernel(const T* __restrict__ x, uint8_t* __restrict__ q, float* __restrict__ scales,
                          int64_t M, int64_t K, float clip) {
  static_assert(kThreads % GROUP == 0, "a block holds whole row groups");
  constexpr int kRowsPerBlock = kThreads / GROUP;
  __shared__ float smem[kThreads / kWarpSize];

  // A GEMM launched as this kernel's programmatic dependent (csrc/int_small_m.cu) may start streaming
  // its weights now; it waits for this grid to complete before it reads q and the scales.
  allow_dependent_launch();
  const int t = threadIdx.x % GROUP;  // thread index within the row group
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / GROUP;
  if constexpr (kRowsPerBlock > 1) {
    // GROUP == one warp: its reduction uses no block barrier, so a surplus warp may leave.
    if (row >= M) return;
  }

  const T* __restrict__ xrow = x + row * K;
  uint8_t* __restrict__ qrow = q + row * (K * SBITS / 8);
  if constexpr (ONE_ROUND) {
    static_assert(VEC, "one round of 16-byte vectors");
    quantize_row_in_registers<T, BITS, SBITS, GROUP>(xrow, qrow, scales + row, K, clip, t, smem);
    return;
  }

  // ---- pass 1: absmax ----------------------------------------------------------------------
  float amax = 0.0f;
  if constexpr (VEC) {
    constexpr int kElems = Vec16<T>::kElems;
    const int64_t nvec = K / kElems;
    int64_t i = t;
    for (; i + (kUnroll - 1) * GROUP < nvec; i += kUnroll * GROUP) {
      Vec16<T> v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) v[u] = load_vec16(xrow + (i + u * GROUP) * kElems);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) amax = vec_absmax(v[u], amax);
    }
    for (; i < nvec; i += GROUP) amax = vec_absmax(load_vec16(xrow + i * kElems), amax);
  } else {
#pragma unroll 4
    for (int64_t i = t; i < K; i += GROUP) amax = max_propagate_nan(amax, fabsf(to_float(xrow[i])));
  }
  amax = group_reduce_max<GROUP>(amax, smem);

  // ---- scale ------------------------------------------------------------------------------
  const float scale = per_token_scale(amax, clip, static_cast<float>(kQmaxOf<BITS>));  // (csrc/per_token_quant.cuh)
  if (t == 0) scales[row] = scale;

  // ---- pass 2: quantize, pack, store --------------------------------------------------------
  if constexpr (VEC) {
    constexpr int kElems = Vec16<T>::kElems;
    const int64_t nvec = K / kElems;
    int64_t i = t;
    for (; i + (kUnroll - 1) * GROUP < nvec; i += kUnroll * GROUP) {
      Vec16<T> v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) v[u] = load_vec16(xrow + (i + u * GROUP) * kElems);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) quantize_store_vec<T, BITS, SBITS>(v[u], scale, qrow, i + u * GROUP);
    }
    for (; i < nvec; i += GROUP) quantize_store_vec<T, BITS, SBITS>(load_vec16(xrow + i * kElems), scale, qrow, i);
  } else if constexpr (SBITS == 8) {
#pragma unroll 4
    for (int64_t i = t; i < K; i += GROUP) {
      qrow[i] = static_cast<uint8_t>(quantize_one<BITS>(to_float(xrow[i]), scale) & 0xFF);
    }
  } else {
    const int64_t npairs = K / 2;
#pragma unroll 4
    for (int64_t j = t; j < npairs; j += GROUP) {
      const uint32_t lo = static_cast<uint32_t>(quantize_one<4>(to_float(xrow[2 * j]), scale)) & 0xF;
      const uint32_t hi = static_cast<uint32_t>(quantize_one<4>(to_float(xrow[2 * j + 1]), scale)) & 0xF;
      qrow[j] = static_cast<uint8_t>(lo | (hi << 4));
    }
  }
}

constexpr int kClusterMaxBlocks = 8;      // blocks of a row's cluster (the portable cluster size)
constexpr int kClusterVecsPerThread = 4;  // 16-byte vectors a thread of the cluster kernel holds

template <typename T, int BITS, int SBITS>
__global__ void __launch_bounds__(kThreads)
quantize_rows_cluster_kernel(const T* __restrict__ x, uint8_t* __restrict__ q, float* __restrict__ scales,
                             int64_t K, float clip, int vecs_per_block) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  constexpr int kElems = Vec16<T>::kElems;
  __shared__ float warp_max[kThreads / kWarpSize];
  __shared__ float block_max;
  allow_dependent_launch();  // as quantize_per_token_kernel

  const cg::cluster_group cluster = cg::this_cluster();
  const int rank = static_cast<int>(cluster.block_rank());
  const int blocks = static_cast<int>(cluster.num_blocks());
  const int64_t row = blockIdx.y;
  const T* __restrict__ xrow = x + row * K;
  uint8_t* __restrict__ qrow = q + row * (K * SBITS / 8);
  const int64_t nvec = K / kElems;
  const int64_t first = static_cast<int64_t>(rank) * vecs_per_block;
  const int64_t end = min(nvec, first + vecs_per_block);

  // ---- this block's vectors into registers (every load issued first), their absmax ----------------
  Vec16<T> v[kClusterVecsPerThread];
  float amax = load_vectors_absmax(v, xrow, first + threadIdx.x, kThreads, end);
  amax = group_reduce_max<kThreads>(amax, warp_max);
  if (threadIdx.x == 0) block_max = amax;

  // ---- the row's absmax from the cluster's blocks, the scale -------------------------------------
  cluster.sync();  // every block's maximum is stored (and visible across the cluster)
  float row_max = 0.0f;
  for (int r = 0; r < blocks; ++r) row_max = max_propagate_nan(row_max, *cluster.map_shared_rank(&block_max, r));
  const float scale = per_token_scale(row_max, clip, static_cast<float>(kQmaxOf<BITS>));
  if (rank == 0 && threadIdx.x == 0) scales[row] = scale;

  // ---- quantize, pack, store this block's vectors ------------------------------------------------
  quantize_store_vectors<T, BITS, SBITS>(v, scale, qrow, first + threadIdx.x, kThreads, end);
  cluster.sync();  // no block leaves while another may still read its block_max
#endif
}

// Blocks per row of the cluster kernel for rows of nvec 16-byte vectors: at least one vector per thread, at most
// kClusterMaxBlocks; 0 where it does not apply: rows whose loads one block issues in one round (kUnroll vectors a
// thread: there the cluster's launch and barriers cost more than they save, H200: K = 4096 bf16 2.2 -> 2.9 us
// at M = 1, 8192 2.9 -> 3.0), rows too long for the registers, or too many rows (M * C > 2 * SMs).
int cluster_blocks_for(int64_t M, int64_t nvec, int device) {
  if (nvec <= int64_t{kUnroll} * kThreads || nvec > int64_t{kClusterMaxBlocks} * kThreads * kClusterVecsPerThread ||
      !hopper::wgmma_available(device)) {
    return 0;
  }
  const int blocks = static_cast<int>(std::min<int64_t>(kClusterMaxBlocks, (nvec + kThreads - 1) / kThreads));
  return M * blocks <= 2 * static_cast<int64_t>(num_sms(device)) ? blocks : 0;
}

template <typename T, int BITS, int SBITS>
void launch_cluster(const T* x, uint8_t* q, float* scale, int64_t M, int64_t K, float clip, int blocks,
                    cudaStream_t stream) {
  const int64_t nvec = K / Vec16<T>::kElems;
  const int vecs_per_block = static_cast<int>((nvec + blocks - 1) / blocks);
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(blocks, static_cast<unsigned>(M), 1);
  config.blockDim = dim3(kThreads);
  config.stream = stream;
  cudaLaunchAttribute attribute[1] = {cluster_launch_attribute(static_cast<unsigned>(blocks))};
  config.attrs = attribute;
  config.numAttrs = 1;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, quantize_rows_cluster_kernel<T, BITS, SBITS>, x, q, scale, K, clip,
                                    vecs_per_block));
}

// Threads on one row in the group kernels: a warp for rows of up to kWarpPerRowMaxK (8 rows a block), else the
// whole block (one row).
int64_t row_group_threads(int64_t K) { return K <= kWarpPerRowMaxK ? kWarpSize : kThreads; }

template <typename T, int BITS, int SBITS, bool VEC, bool ONE_ROUND>
void launch_group(const T* x, uint8_t* q, float* scale, int64_t M, int64_t K, float clip, cudaStream_t stream) {
  if (row_group_threads(K) == kWarpSize) {
    constexpr int kRowsPerBlock = kThreads / kWarpSize;
    const int64_t blocks = (M + kRowsPerBlock - 1) / kRowsPerBlock;
    quantize_per_token_kernel<T, BITS, SBITS, VEC, kWarpSize, ONE_ROUND>
        <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(x, q, scale, M, K, clip);
  } else {
    quantize_per_token_kernel<T, BITS, SBITS, VEC, kThreads, ONE_ROUND>
        <<<static_cast<unsigned>(M), kThreads, 0, stream>>>(x, q, scale, M, K, clip);
  }
  QK_CHECK_LAUNCH();
}

// Whether one round of loads covers a row of K elements (kUnroll vectors a thread of its row group).
template <typename T>
bool fits_one_round(int64_t K) {
  return K / Vec16<T>::kElems <= kUnroll * row_group_threads(K);
}

template <typename T, int BITS, int SBITS>
void launch(const at::Tensor& x, at::Tensor& q, at::Tensor& scale, float clip, cudaStream_t stream) {
  const int64_t M = x.size(0), K = x.size(1);
  const T* xp = static_cast<const T*>(x.const_data_ptr());
  uint8_t* qp = static_cast<uint8_t*>(q.data_ptr());
  float* sp = scale.data_ptr<float>();
  const bool vec = is_aligned(xp, 16) && (K * static_cast<int64_t>(sizeof(T))) % 16 == 0;
  const int cluster_blocks = vec ? cluster_blocks_for(M, K / Vec16<T>::kElems, x.get_device()) : 0;
  if (cluster_blocks > 0) {
    launch_cluster<T, BITS, SBITS>(xp, qp, sp, M, K, clip, cluster_blocks, stream);
  } else if (vec && fits_one_round<T>(K)) {
    launch_group<T, BITS, SBITS, true, true>(xp, qp, sp, M, K, clip, stream);
  } else if (vec) {
    launch_group<T, BITS, SBITS, true, false>(xp, qp, sp, M, K, clip, stream);
  } else {
    launch_group<T, BITS, SBITS, false, false>(xp, qp, sp, M, K, clip, stream);
  }
}

template <typename T>
void launch_bits(int64_t bits, bool packed, const at::Tensor& x, at::Tensor& q, at::Tensor& scale, float clip,
                 cudaStream_t stream) {
  if (bits == 4) {
    packed ? launch<T, 4, 4>(x, q, scale, clip, stream) : launch<T, 4, 8>(x, q, scale, clip, stream);
  } else {
    launch<T, 8, 8>(x, q, scale, clip, stream);
  }
}

std::tuple<at::Tensor, at::Tensor> quantize_per_token_cuda(const at::Tensor& x, int64_t bits, double clip_ratio,
                                                           bool packed) {
  constexpr const char* op = "quantkern::quantize_per_token";
  check_per_token_quant_input(x, bits, clip_ratio, op);  // (grid: one block per row, or per 8 rows)
  const int64_t M = x.size(0), K = x.size(1);

  const c10::cuda::CUDAGuard device_guard(x.device());
  const bool pack = bits == 4 && packed;
  at::Tensor q = at::empty({M, pack ? K / 2 : K}, x.options().dtype(pack ? at::kByte : at::kChar));
  at::Tensor scale = at::empty({M}, x.options().dtype(at::kFloat));
  if (M == 0) return {q, scale};

  const float clip = static_cast<float>(clip_ratio);  // once, like torch.tensor(clip_ratio, dtype=float32)
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
  switch (x.scalar_type()) {
    case at::kHalf:
      launch_bits<__half>(bits, packed, x, q, scale, clip, stream);
      break;
    case at::kBFloat16:
      launch_bits<__nv_bfloat16>(bits, packed, x, q, scale, clip, stream);
      break;
    case at::kFloat:
      launch_bits<float>(bits, packed, x, q, scale, clip, stream);
      break;
    default:
      TORCH_CHECK(false, op, ": unsupported dtype ", x.scalar_type());
  }
  return {q, scale};
}

}  // namespace
}  // namespace quantkern

TORCH_LIBRARY_IMPL(quantkern, CUDA, m) {
  m.impl("quantize_per_token", &quantkern::quantize_per_token_cuda);
}
