// quantkern::permute_columns(Tensor x, Tensor permutation) -> Tensor y
//
// y[m, j] = x[m, permutation[j]]: the input gather of act-order layers (QuantLinear.input_permutation,
// the layers `quantkern convert` makes from GPTQ desc_act checkpoints, whose weight columns are stored in
// group order). Same result as x.index_select(-1, permutation).
//
// Why a kernel of our own: in a CUDA graph torch's index_select took 4.2-4.9 us per call at M = 1 and 16
// (H100, scripts/probe_act_order.py), as much as a 4096 x 4096 W4A16 layer, and the GEMM after it could not
// start early; this kernel takes 1.5-3.0 us, and a W4A16 layer after it 2.4-3.8 us more than alone (5.4-6.4
// after index_select). This kernel calls allow_dependent_launch as it starts and the host records it as a trigger
// kernel (csrc/common.cuh), so a small-M W4A16 GEMM captured right after it is launched as its programmatic
// dependent: the GEMM's blocks start while the gather runs, prefetch their first weights into L2, and wait
// (griddepcontrol.wait) for the gather's completion before they read y.
//
// Layout: x [M, K] contiguous fp16 / bf16 / fp32 (copied as 2- or 4-byte words: no arithmetic), permutation
//   int64 [K], y [M, K] contiguous in x's dtype.
// Two tilings:
// - Few rows (M <= kMaxColumnKernelRows: decode), permute_columns_kernel: thread t of block (bx, by) owns output
//   column j = by * kThreads + t for the kRowsPerBlock rows from bx * kRowsPerBlock: it loads permutation[j] once,
//   then issues the rows' loads x[m, permutation[j]] (rows of x are a few KiB: L1 / L2 hits) before their stores,
//   which are coalesced across the warp. K / 128 blocks even at M = 1: the whole gather is about two dependent L2
//   round trips.
// - Many rows (prefill), permute_rows_staged_kernel: there the first tiling's scattered 2-byte loads fetch a
//   32-byte sector each (H100, 2048 rows: 49 us against index_select's 28 at K = 4096, 520 against 199 at 14336).
//   A block takes 4 rows (2 or 1 where 4 would not fit kMaxStagedBytes of shared memory), copies them
//   into shared memory with 16-byte loads, then each thread loads the permutation entries of its columns once
//   (int64 entries: 4-8x the row's own bytes, so read once per block, not per row) and gathers them from every
//   staged row; stores coalesced across the warp. Where the row groups are fewer than 2 blocks per SM, the
//   columns are split over blockIdx.y too (each such block stages the whole rows, L2 hits, and writes its
//   columns). Rows wider than kMaxStagedBytes go to torch's index_select. H100, the gather alone, ours /
//   index_select, us: 2048 rows 11.6 / 28.3 (K = 4096), 79.5 / 200.3 (14336); 512 rows 5.3 / 9.6, 13.1 / 49.0;
//   64 rows 3.0 / 4.8, 5.0 / 7.1; 17 rows 2.3 / 4.7, 3.6 / 5.0.
// The permutation is trusted: QuantLinear validates it where it is built or loaded (check_permutation); an
//   entry outside [0, K) stops the kernel with a device error (trap) instead of reading out of bounds.

#include <algorithm>
#include <cstdint>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/index_select.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common.cuh"

namespace quantkern {
namespace {

constexpr int kThreads = 128;             // permute_columns_kernel
constexpr int kRowsPerBlock = 4;          // permute_columns_kernel
constexpr int64_t kMaxColumnKernelRows = 16;
constexpr int kStagedThreads = 256;       // permute_rows_staged_kernel
constexpr int kStagedColumnsPerThread = 4;  // permutation loads in flight per thread
constexpr int kStagedSplitColumns = kStagedThreads;  // a column split's width: a multiple of this
constexpr int64_t kMaxStagedBytes = 96 * 1024;  // within every arch's opt-in shared memory per block (sm_89: 99 KiB)

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

// ROWS rows per block from blockIdx.x * ROWS (the last block may have fewer), output columns [blockIdx.y *
// split_columns, + split_columns); VEC: rows copied as 16-byte vectors (x 16-byte aligned, K * sizeof(Word) a
// multiple of 16). K fits an int (a row fits kMaxStagedBytes).
template <typename Word, int ROWS, bool VEC>
__global__ void __launch_bounds__(kStagedThreads) permute_rows_staged_kernel(const Word* __restrict__ x,
                                                                             const int64_t* __restrict__ permutation,
                                                                             Word* __restrict__ y, int64_t M, int K,
                                                                             int split_columns) {
  allow_dependent_launch();
  extern __shared__ __align__(16) uint8_t staged_raw[];
  Word* staged = reinterpret_cast<Word*>(staged_raw);  // [ROWS][K]
  const int64_t first_row = static_cast<int64_t>(blockIdx.x) * ROWS;
  const int rows = static_cast<int>(std::min<int64_t>(ROWS, M - first_row));
  const Word* x_rows = x + first_row * K;
  if constexpr (VEC) {
    const int vectors = rows * K * static_cast<int>(sizeof(Word)) / 16;  // the rows are contiguous
    for (int v = threadIdx.x; v < vectors; v += kStagedThreads) {
      reinterpret_cast<uint4*>(staged)[v] = __ldg(reinterpret_cast<const uint4*>(x_rows) + v);
    }
  } else {
    for (int k = threadIdx.x; k < rows * K; k += kStagedThreads) staged[k] = x_rows[k];
  }
  __syncthreads();
  Word* y_rows = y + first_row * K;
  const int first_column = static_cast<int>(blockIdx.y) * split_columns;
  const int end_column = min(K, first_column + split_columns);
  for (int base = first_column + threadIdx.x; base < end_column; base += kStagedThreads * kStagedColumnsPerThread) {
    int sources[kStagedColumnsPerThread];
#pragma unroll
    for (int u = 0; u < kStagedColumnsPerThread; ++u) {
      const int column = base + u * kStagedThreads;
      sources[u] = column < end_column ? static_cast<int>(checked_source(permutation, column, K)) : 0;
    }
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      if (r >= rows) break;
#pragma unroll
      for (int u = 0; u < kStagedColumnsPerThread; ++u) {
        const int column = base + u * kStagedThreads;
        if (column < end_column) y_rows[r * K + column] = staged[r * K + sources[u]];
      }
    }
  }
}

template <typename Word, int ROWS>
void launch_staged(const Word* x, const int64_t* permutation, Word* y, int64_t M, int64_t K, int device,
                   cudaStream_t stream) {
  const size_t smem = static_cast<size_t>(ROWS) * K * sizeof(Word);
  const bool vec = is_aligned(x, 16) && (K * sizeof(Word)) % 16 == 0;
  const auto kernel =
      vec ? permute_rows_staged_kernel<Word, ROWS, true> : permute_rows_staged_kernel<Word, ROWS, false>;
  if (smem > 48 * 1024) {  // above the default limit of dynamic shared memory
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  const int64_t row_groups = (M + ROWS - 1) / ROWS;
  // Column splits (multiples of kStagedSplitColumns) up to 2 blocks per SM in all.
  const int64_t wanted_splits = (2 * static_cast<int64_t>(num_sms(device)) + row_groups - 1) / row_groups;
  const int64_t max_splits = (K + kStagedSplitColumns - 1) / kStagedSplitColumns;
  const int64_t splits = std::max<int64_t>(1, std::min(wanted_splits, max_splits));
  const int64_t split_chunks = (max_splits + splits - 1) / splits;  // kStagedSplitColumns-column chunks per split
  const int64_t used_splits = (max_splits + split_chunks - 1) / split_chunks;
  kernel<<<dim3(static_cast<unsigned>(row_groups), static_cast<unsigned>(used_splits)), kStagedThreads, smem,
           stream>>>(x, permutation, y, M, static_cast<int>(K), static_cast<int>(split_chunks * kStagedSplitColumns));
}

template <typename Word>
void launch(const at::Tensor& x, const at::Tensor& permutation, at::Tensor& y, cudaStream_t stream) {
  const int64_t M = x.size(0), K = x.size(1);
  const Word* xp = static_cast<const Word*>(x.const_data_ptr());
  const int64_t* pp = permutation.const_data_ptr<int64_t>();
  Word* yp = static_cast<Word*>(y.data_ptr());
  if (M > kMaxColumnKernelRows) {
    // As many rows per block as fit (4, 2 or 1): the permutation is read once per block.
    const int64_t fit = kMaxStagedBytes / (K * static_cast<int64_t>(sizeof(Word)));
    TORCH_CHECK(fit >= 1, "quantkern::permute_columns: internal error, a staged row does not fit");  // (caller checks)
    const int rows_per_block = fit >= 4 ? 4 : fit >= 2 ? 2 : 1;
    TORCH_CHECK((M + rows_per_block - 1) / rows_per_block < (int64_t{1} << 31), "quantkern::permute_columns: M = ",
                M, " is too large");
    if (rows_per_block == 4) {
      launch_staged<Word, 4>(xp, pp, yp, M, K, x.get_device(), stream);
    } else if (rows_per_block == 2) {
      launch_staged<Word, 2>(xp, pp, yp, M, K, x.get_device(), stream);
    } else {
      launch_staged<Word, 1>(xp, pp, yp, M, K, x.get_device(), stream);
    }
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
  if (x.size(0) > kMaxColumnKernelRows && x.size(1) * x.element_size() > kMaxStagedBytes) {
    return at::index_select(x, 1, permutation);  // rows too wide to stage (see the header)
  }
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
