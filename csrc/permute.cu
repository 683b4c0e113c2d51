// quantkern::permute_columns(Tensor x, Tensor permutation) -> Tensor y
//
// y[m, j] = x[m, permutation[j]]: the input gather of act-order layers (QuantLinear.input_permutation,
// the layers `quantkern convert` makes from GPTQ desc_act checkpoints, whose weight columns are stored in
// group order). Same result as x.index_select(-1, permutation).
//
// Why a kernel of our own: in a CUDA graph torch's index_select took 4.2-4.9 us per call at M = 1 and 16
// (H100, scripts/probe_act_order.py), as much as a 4096 x 4096 W4A16 layer, and the GEMM after it could not
// start early. Both kernels here call allow_dependent_launch as they start and the host records them as trigger
// kernels (csrc/common.cuh), so a small-M W4A16 GEMM captured right after one is launched as its programmatic
// dependent: the GEMM's blocks start while the gather runs, prefetch their first weights into L2, and wait
// (griddepcontrol.wait) for the gather's completion before they read y.
//
// Layout: x [M, K] contiguous fp16 / bf16 / fp32 (copied as 2- or 4-byte words: no arithmetic), permutation
//   int64 [K], y [M, K] contiguous in x's dtype.
// Two tilings:
// - Few rows (M <= kMaxColumnKernelRows: decode), permute_columns_kernel: thread t of block (bx, by) owns output
//   column j = by * kThreads + t for the kRowsPerBlock rows from bx * kRowsPerBlock: it loads permutation[j] once,
//   then the rows' x[m, permutation[j]] (L2 hits), and stores them, coalesced across the warp. Many blocks even at
//   M = 1 (K / 128): the whole gather is about two dependent L2 round trips.
// - Many rows (prefill), permute_rows_staged_kernel: the scattered 2-byte loads of the first tiling fetch a
//   32-byte sector each (H100, 2048 rows of 14336: 520 us against index_select's 199), so there each block stages
//   one row in shared memory with coalesced 16-byte loads, then gathers from shared memory and stores coalesced.
//   Rows wider than kMaxStagedRowBytes keep the first tiling.
// The permutation is trusted: QuantLinear validates it where it is built or loaded (check_permutation); an
//   entry outside [0, K) stops the kernel with a device error (trap) instead of reading out of bounds.

#include <cstdint>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common.cuh"

namespace quantkern {
namespace {

constexpr int kThreads = 128;      // permute_columns_kernel
constexpr int kRowsPerBlock = 4;   // permute_columns_kernel
constexpr int kStagedThreads = 256;  // permute_rows_staged_kernel
constexpr int kGatherUnroll = 4;     // permute_rows_staged_kernel: permutation loads in flight per thread
constexpr int64_t kMaxColumnKernelRows = 16;
constexpr int64_t kMaxStagedRowBytes = 64 * 1024;  // fits every arch's shared memory (sm_89: 99 KiB a block)

__device__ __forceinline__ int64_t checked_source(const int64_t* __restrict__ permutation, int64_t column,
                                                  int64_t K) {
  const int64_t source = permutation[column];
  if (static_cast<uint64_t>(source) >= static_cast<uint64_t>(K)) __trap();
  return source;
}

template <typename Word>
__global__ void __launch_bounds__(kThreads) permute_columns_kernel(const Word* __restrict__ x,
                                                                   const int64_t* __restrict__ permutation,
                                                                   Word* __restrict__ y, int64_t M, int64_t K) {
  allow_dependent_launch();  // the GEMM after this gather may start now; it waits for our completion
  const int64_t column = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x;
  if (column >= K) return;
  const int64_t source = checked_source(permutation, column, K);
  const int64_t first_row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock;
  Word values[kRowsPerBlock];
#pragma unroll
  for (int r = 0; r < kRowsPerBlock; ++r) {
    if (first_row + r < M) values[r] = x[(first_row + r) * K + source];
  }
#pragma unroll
  for (int r = 0; r < kRowsPerBlock; ++r) {
    if (first_row + r < M) y[(first_row + r) * K + column] = values[r];
  }
}

// VEC: the row is read as 16-byte vectors (x 16-byte aligned and K * sizeof(Word) a multiple of 16). K fits an
// int here (the row fits kMaxStagedRowBytes).
template <typename Word, bool VEC>
__global__ void __launch_bounds__(kStagedThreads) permute_rows_staged_kernel(const Word* __restrict__ x,
                                                                             const int64_t* __restrict__ permutation,
                                                                             Word* __restrict__ y, int K) {
  allow_dependent_launch();
  extern __shared__ __align__(16) uint8_t staged_raw[];
  Word* staged = reinterpret_cast<Word*>(staged_raw);
  const int64_t row_offset = static_cast<int64_t>(blockIdx.x) * K;
  const Word* x_row = x + row_offset;
  if constexpr (VEC) {
    const int vectors = K * static_cast<int>(sizeof(Word)) / 16;
    for (int v = threadIdx.x; v < vectors; v += kStagedThreads) {
      reinterpret_cast<uint4*>(staged)[v] = reinterpret_cast<const uint4*>(x_row)[v];
    }
  } else {
    for (int k = threadIdx.x; k < K; k += kStagedThreads) staged[k] = x_row[k];
  }
  __syncthreads();
  Word* y_row = y + row_offset;
  for (int base = threadIdx.x; base < K; base += kStagedThreads * kGatherUnroll) {
    int sources[kGatherUnroll];
#pragma unroll
    for (int u = 0; u < kGatherUnroll; ++u) {
      const int column = base + u * kStagedThreads;
      sources[u] = column < K ? static_cast<int>(checked_source(permutation, column, K)) : 0;
    }
#pragma unroll
    for (int u = 0; u < kGatherUnroll; ++u) {
      const int column = base + u * kStagedThreads;
      if (column < K) y_row[column] = staged[sources[u]];
    }
  }
}

template <typename Word>
void launch(const at::Tensor& x, const at::Tensor& permutation, at::Tensor& y, cudaStream_t stream) {
  const int64_t M = x.size(0), K = x.size(1);
  const Word* xp = static_cast<const Word*>(x.const_data_ptr());
  const int64_t* pp = permutation.const_data_ptr<int64_t>();
  Word* yp = static_cast<Word*>(y.data_ptr());
  const int64_t row_bytes = K * static_cast<int64_t>(sizeof(Word));
  if (M > kMaxColumnKernelRows && row_bytes <= kMaxStagedRowBytes) {
    const bool vec = is_aligned(xp, 16) && row_bytes % 16 == 0;
    auto kernel = vec ? permute_rows_staged_kernel<Word, true> : permute_rows_staged_kernel<Word, false>;
    if (row_bytes > 48 * 1024) {  // above the default limit of dynamic shared memory
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(row_bytes)));
    }
    kernel<<<static_cast<unsigned>(M), kStagedThreads, static_cast<size_t>(row_bytes), stream>>>(
        xp, pp, yp, static_cast<int>(K));
  } else {
    const int64_t column_blocks = (K + kThreads - 1) / kThreads;
    const int64_t row_blocks = (M + kRowsPerBlock - 1) / kRowsPerBlock;
    TORCH_CHECK(column_blocks <= 65535, "quantkern::permute_columns: rows of at most ", 65535 * kThreads,
                " entries, got ", K);
    permute_columns_kernel<Word>
        <<<dim3(static_cast<unsigned>(row_blocks), static_cast<unsigned>(column_blocks)), kThreads, 0, stream>>>(
            xp, pp, yp, M, K);
  }
  QK_CHECK_LAUNCH();
  record_trigger_kernel(stream);
}

at::Tensor permute_columns_cuda(const at::Tensor& x, const at::Tensor& permutation) {
  constexpr const char* op = "quantkern::permute_columns";
  TORCH_CHECK(x.is_cuda() && permutation.is_cuda(), op, ": x and permutation must be CUDA tensors");
  TORCH_CHECK(x.device() == permutation.device(), op, ": x is on ", x.device(), " but permutation on ",
              permutation.device());
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), op, ": x must be a contiguous [M, K] tensor, got shape ",
              x.sizes(), x.is_contiguous() ? "" : " (not contiguous)");
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat,
              op, ": x must be float16, bfloat16 or float32, got ", x.scalar_type());
  TORCH_CHECK(permutation.scalar_type() == at::kLong && permutation.dim() == 1 && permutation.is_contiguous() &&
                  permutation.size(0) == x.size(1),
              op, ": permutation must be a contiguous int64 tensor of shape (", x.size(1), "), got ",
              permutation.scalar_type(), " ", permutation.sizes());
  const c10::cuda::CUDAGuard device_guard(x.device());
  at::Tensor y = at::empty_like(x);
  if (x.numel() == 0) return y;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
  if (x.element_size() == 2) {
    launch<uint16_t>(x, permutation, y, stream);
  } else {
    launch<uint32_t>(x, permutation, y, stream);
  }
  return y;
}

}  // namespace
}  // namespace quantkern

TORCH_LIBRARY_IMPL(quantkern, CUDA, m) {
  m.impl("permute_columns", &quantkern::permute_columns_cuda);
}
