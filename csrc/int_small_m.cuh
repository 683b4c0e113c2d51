// The integer GEMM for few tokens on Hopper (csrc/int_small_m.cu): W8A8, W4A8 and W4A4 (its packed int4
// codes widened to int8 in registers, or the codes stored one per byte), per-channel weights, int8 mma.sync
// fed straight from global memory, 32-channel blocks whose warps split K, and K split across the blocks of a
// thread-block cluster where the blocks are few. Declared here for the host code of csrc/int_gemm.cu, which
// checks the operands and calls it on an sm_90 GPU, and for quantkern._C.int_small_m_plan (csrc/bindings.cpp).
#pragma once

#include <cstdint>

#include <ATen/core/ScalarType.h>
#include <cuda_runtime.h>

#include "int_wgmma.cuh"

namespace quantkern {
namespace int_small_m {

constexpr int kChannels = 32;   // output channels per block (half a 64-row weight unit)
constexpr int kTokens = 16;     // tokens per block (grid.z walks larger M)
constexpr int kMaxSplits = 8;   // blocks of one cluster (the portable cluster size)
constexpr int kMaxTokens = 16;  // the automatic choice takes this kernel up to this M (csrc/int_gemm.cu)

// The operands: the wgmma kernel's parameter block (csrc/int_wgmma.cuh); tiles_per_split is the
// k-tiles of one block of a cluster.
using Params = int_wgmma::Params;

// A call's work split: warps per block (1, 2, 4, 8 or 16) and blocks per cluster (K splits, 1..kMaxSplits).
struct Plan {
  int warps;
  int splits;
};
// split_k > 0 asks for that many K splits (at most kMaxSplits); 0 chooses (see csrc/int_small_m.cu). a_bits: 8
// (int8 codes, one per byte) or 4 (packed int4 codes, with int4 weights in the W4A8 layout).
Plan plan(int64_t M, int64_t N, int64_t K, int w_bits, int a_bits, int64_t split_k, int sm_count);

// y = a_scale[m] * (acc * w_scale[n]) + bias[n] in out_dtype, or (raw) the exact int32 sums. p.tiles_per_split:
// the k-tiles of one block of a cluster (ceil(k_tiles / plan.splits)).
void launch(int w_bits, int a_bits, bool raw, at::ScalarType out_dtype, const Params& p, const Plan& plan,
            cudaStream_t stream);

}  // namespace int_small_m
}  // namespace quantkern
