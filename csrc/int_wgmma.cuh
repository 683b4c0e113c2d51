// The Hopper integer GEMM (csrc/int_wgmma.cu): W8A8 and W4A8 (which also serves W4A4 on sm_90, the int4
// activations stored one per byte), per-channel weights, int8 wgmma. Declared here for the host code
// of csrc/int_gemm.cu, which checks the operands and calls it on an sm_90 GPU (hopper::wgmma_available).
#pragma once

#include <cstdint>

#include <ATen/core/ScalarType.h>
#include <cuda_runtime.h>

namespace quantkern {
namespace int_wgmma {

constexpr int kChannels = 128;  // output channels per block (two 64-row weight units)

struct Params {
  const void* a;         // int8 [M, K] activation codes
  const void* w;         // tiled weight [N_pad / 64, k_tiles, 64, 128 * w_bits / 8] (csrc/int_gemm.cu)
  const float* a_scale;  // [M]
  const float* w_scale;  // [N] (per-channel)
  const float* bias;     // [N] or nullptr
  void* out;             // [M, N] fp16 / bf16, or (atomic: split K, or the int32 test hook) int32, zeroed
  int M, N, K;
  int w_units;          // N_pad / 64
  int k_tiles;          // K_pad / 128
  int tiles_per_split;  // k-tiles per blockIdx.z
};

// y = a_scale[m] * (acc * w_scale[n]) + bias[n] in out_dtype (atomic = false), or out[m, n] += acc
// (int32, exact; atomic = true: the caller zeroes out and applies the scales). splits = gridDim.z.
void launch(int w_bits, int tokens, bool atomic, at::ScalarType out_dtype, const Params& p, int splits,
            cudaStream_t stream);

}  // namespace int_wgmma
}  // namespace quantkern
