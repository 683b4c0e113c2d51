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
// Few rows only (M <= kMaxKernelRows: decode). More rows go to torch's index_select: there this kernel's scattered
//   2-byte loads fetch a 32-byte sector each (H100, 2048 rows: 49 us against index_select's 28 at K = 4096, 520
//   against 199 at 14336), and a prefill GEMM takes 0.1-0.4 ms anyway.
// Tiling: thread t of block (bx, by) owns output column j = by * kThreads + t for the kRowsPerBlock rows from
//   bx * kRowsPerBlock: it loads permutation[j] once, then issues the rows' loads x[m, permutation[j]] (rows of x
//   are a few KiB: L1 / L2 hits) before their stores, which are coalesced across the warp. K / 128 blocks even at
//   M = 1: the whole gather is about two dependent L2 round trips.
// The permutation is trusted: QuantLinear validates it where it is built or loaded (check_permutation); an
//   entry outside [0, K) stops the kernel with a device error (trap) instead of reading out of bounds.

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

constexpr int kThreads = 128;
constexpr int kRowsPerBlock = 4;
constexpr int64_t kMaxKernelRows = 16;

template <typename Word>
__global__ void __launch_bounds__(kThreads) permute_columns_kernel(const Word* __restrict__ x,
                                                                   const int64_t* __restrict__ permutation,
                                                                   Word* __restrict__ y, int64_t M, int64_t K) {
  allow_dependent_launch();  // the GEMM after this gather may start now; it waits for our completion
  const int64_t column = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x;
  if (column >= K) return;
  const int64_t source = permutation[column];
  if (static_cast<uint64_t>(source) >= static_cast<uint64_t>(K)) __trap();
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

template <typename Word>
void launch(const at::Tensor& x, const at::Tensor& permutation, at::Tensor& y, cudaStream_t stream) {
  const int64_t M = x.size(0), K = x.size(1);
  const int64_t column_blocks = (K + kThreads - 1) / kThreads;
  const int64_t row_blocks = (M + kRowsPerBlock - 1) / kRowsPerBlock;
  TORCH_CHECK(column_blocks <= 65535, "quantkern::permute_columns: rows of at most ", 65535 * kThreads,
              " entries, got ", K);
  permute_columns_kernel<Word><<<dim3(static_cast<unsigned>(row_blocks), static_cast<unsigned>(column_blocks)),
                                 kThreads, 0, stream>>>(static_cast<const Word*>(x.const_data_ptr()),
                                                        permutation.const_data_ptr<int64_t>(),
                                                        static_cast<Word*>(y.data_ptr()), M, K);
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
  if (x.size(0) > kMaxKernelRows) return at::index_select(x, 1, permutation);  // (see the header)
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
