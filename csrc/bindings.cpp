// The Python module quantkern._C and the schemas of the quantkern::* ops.
//
// This is the ONLY translation unit that includes <torch/extension.h> (it dominates compile time).
// The kernels live in csrc/*.cu and register their CUDA implementations themselves with
// TORCH_LIBRARY_IMPL(quantkern, CUDA, m); this file only declares the schemas.
//
// Importing quantkern._C (after `import torch`) registers the ops as torch.ops.quantkern.*.

#include <algorithm>
#include <string>
#include <vector>

#include <cuda_runtime_api.h>  // CUDART_VERSION

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/extension.h>
#include <pybind11/stl.h>
#include <torch/library.h>
#include <torch/version.h>  // TORCH_VERSION

#include "int_small_m.cuh"  // int_small_m::plan

// The CUDA arch list, baked in by setup.py (-DQUANTKERN_CUDA_ARCHS="...") or by CMakeLists.txt (a
// generated header, since CMake splits definitions at ';').
#if defined(QUANTKERN_BUILD_CONFIG_H)
#include "quantkern_build_config.h"
#endif
#ifndef QUANTKERN_CUDA_ARCHS
#define QUANTKERN_CUDA_ARCHS "unknown"
#endif

// The op schemas: one m.def per op. Each gets its CUDA kernel from a TORCH_LIBRARY_IMPL in its .cu file.
TORCH_LIBRARY(quantkern, m) {
  // The ops' fake (meta) implementations for torch.compile live in Python, in quantkern/_fake.py;
  // torch requires C++-defined ops to name that module (and imports it on demand).
  m.set_python_module("quantkern._fake");
  // x [M, K] fp16/bf16/fp32 -> (q int8 [M, K] (bits=8) or uint8 [M, K/2] (bits=4), scale fp32 [M])
  m.def("quantize_per_token(Tensor x, int bits, float clip_ratio, bool packed=True) -> (Tensor, Tensor)");
  // W4A16 linear (csrc/w4a16_gemm.cu): x [M, K] fp16/bf16, qweight int32 [N/16, 2K] (the layout of
  // quantkern.layout_cuda.prepare_w4a16), scales / zeros [K/group, N] in x's dtype, bias [N],
  // locks int32 scratch (all zeros before and after) -> y [M, N] in x's dtype.
  // split_k / tile_m: 0 = automatic (overrides for tuning; tile_m = 1: the small-M kernel, 2: the same without
  // its weight ring). scales_fit_fp16 (prepare_w4a16 checks it once): bf16 x may run on the Hopper kernel's fp16
  // path as an exact fp16 copy (csrc/w4a16_wgmma.cu, "bf16 activations staged as fp16").
  m.def("w4a16_gemm(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, Tensor? bias, Tensor locks, "
        "int group_size, int split_k=0, int tile_m=0, bool scales_fit_fp16=False) -> Tensor");
  // Integer GEMMs W8A8 / W4A4 / W4A8 (csrc/int_gemm.cu): a = quantize_per_token's q (int8 [M, K] or uint8
  // [M, K/2]), a_scale fp32 [M], w / w_scale in the layout of quantkern.layout_int.prepare_int_weight,
  // bias fp32 [N] -> y [M, N] in out_dtype (float16 / bfloat16). split_k / config: 0 = automatic.
  // w4a8_layout: int4 w in the W4A8 layout (prepare_int_weight on sm_90); with a_bits = 4 (packed codes) only
  // the sm_90 few-token kernel takes that pair (per-channel, M <= build_info()["int_small_m_max_tokens"]).
  m.def("int_gemm(Tensor a, Tensor a_scale, Tensor w, Tensor w_scale, Tensor? bias, int a_bits, int w_bits, "
        "int group_len, ScalarType out_dtype, int split_k=0, int config=0, bool w4a8_layout=False) -> Tensor");
  // The exact int32 accumulator a @ w^T [M, n] of the same operands (test hook).
  m.def("int_gemm_acc(Tensor a, Tensor w, int n, int a_bits, int w_bits, int split_k=0, int config=0, "
        "bool w4a8_layout=False) -> Tensor");
  // The input gather of act-order layers (csrc/permute.cu): x [M, K] fp16/bf16/fp32 contiguous, permutation int64
  // [K] -> y [M, K], y[m, j] = x[m, permutation[j]] (x.index_select(-1, permutation)).
  m.def("permute_columns(Tensor x, Tensor permutation) -> Tensor");
  // Online Hadamard rotation (csrc/hadamard.cu): x [..., n] fp16/bf16/fp32 -> x @ H^T / sqrt(n) in x's dtype,
  // H = quantkern.rotation.hadamard_matrix(n); block_size > 0: the same per block of that many entries.
  m.def("hadamard(Tensor x, int block_size=0) -> Tensor");
  // Fused: hadamard, rounded to x's dtype, then quantize_per_token: x [M, K] -> (q, scale) as quantize_per_token
  // (fp16/bf16 rows of the sizes in build_info()["hadamard_quantize_tensor_core_sizes"]: on tensor cores, with
  // intermediate sums rounded to x's dtype; csrc/hadamard_mma.cu).
  // packed = false with bits = 4: int4 codes one per byte (int8 [M, K]), as quantize_per_token(packed=False).
  m.def("hadamard_quantize(Tensor x, int bits, float clip_ratio, int block_size=0, bool packed=True) "
        "-> (Tensor, Tensor)");
  // Fused dense per-block rotation + quantize_per_token (csrc/block_rotation.cu): x [M, K] fp16/bf16, rotation fp32
  // [b, b] (b = 64 or 128, the same for every block) -> (q, scale) as quantize_per_token of each block's x @ R^T
  // rounded to x's dtype. block_rotation_fits (below) says where it runs.
  m.def("block_rotate_quantize(Tensor x, Tensor rotation, int bits, float clip_ratio) -> (Tensor, Tensor)");
}

namespace quantkern {
std::vector<int64_t> hadamard_quantize_tensor_core_sizes();  // csrc/hadamard_mma.cu
namespace block_rotation {
bool block_rotation_fits(int64_t K, int64_t b, int device);  // csrc/block_rotation.cu
}  // namespace block_rotation
namespace w4a16 {
// csrc/w4a16_small_m.cu
std::vector<int64_t> small_m_plan(int64_t M, int64_t N, int64_t K, int64_t group_len, bool asym, int sm_count,
                                  int smem_per_block);
// csrc/w4a16_gemm.cu
std::string automatic_kernel_name(int64_t M, int64_t N, int64_t K, bool wgmma_available, bool fp16, int sm_count,
                                  bool scales_fit_fp16);
// {tokens per tile, K splits} of the wgmma kernel's cost model for weights of up to 2^24 codes (no limit on the
// lock counters)
std::vector<int64_t> modelled_wgmma_plan(int64_t M, int64_t N, int64_t K, int tokens, bool bf16_path, int sm_count);
}  // namespace w4a16
}  // namespace quantkern

namespace {

std::string cuda_version_string() {
  // CUDART_VERSION = 1000 * major + 10 * minor, e.g. 13000 -> "13.0"
  return std::to_string(CUDART_VERSION / 1000) + "." + std::to_string((CUDART_VERSION % 1000) / 10);
}

// Names (without the "quantkern::" prefix) of the ops that have a CUDA kernel registered, read
// back from the dispatcher: the registrations themselves are the one place for the list.
std::vector<std::string> cuda_kernels() {
  const std::string prefix = "quantkern::";
  std::vector<std::string> names;
  for (const auto& op : c10::Dispatcher::singleton().getAllOpNamesForDispatchKey(c10::DispatchKey::CUDA)) {
    if (op.name.rfind(prefix, 0) != 0) continue;
    std::string name = op.name.substr(prefix.size());
    if (!op.overload_name.empty()) name += "." + op.overload_name;
    names.push_back(std::move(name));
  }
  std::sort(names.begin(), names.end());
  return names;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "quantkern CUDA kernels; the ops are registered as torch.ops.quantkern.*";
  m.def(
      "build_info",
      []() {
        pybind11::dict info;
        info["cuda_version"] = cuda_version_string();
        info["archs"] = std::string(QUANTKERN_CUDA_ARCHS);
        info["torch_version"] = std::string(TORCH_VERSION);
        info["kernels"] = cuda_kernels();
        info["hadamard_quantize_tensor_core_sizes"] = quantkern::hadamard_quantize_tensor_core_sizes();
        info["int_small_m_max_tokens"] = quantkern::int_small_m::kMaxTokens;
        return info;
      },
      "How this extension was built: {'cuda_version': CUDA runtime version at build time, "
      "'archs': the TORCH_CUDA_ARCH_LIST it was compiled for, 'torch_version': torch at build time, "
      "'kernels': names of the quantkern ops with a CUDA kernel, 'hadamard_quantize_tensor_core_sizes': the row "
      "lengths whose fp16/bf16 hadamard_quantize runs on tensor cores (sm_80+), 'int_small_m_max_tokens': the "
      "most tokens for which int_gemm takes the sm_90 few-token kernel (packed int4 activations need it)}.");
  m.def("block_rotation_fits", &quantkern::block_rotation::block_rotation_fits, pybind11::arg("features"),
        pybind11::arg("block_size"), pybind11::arg("device"),
        "Whether quantkern::block_rotate_quantize takes rows of `features` entries rotated in blocks of `block_size` "
        "(one [b, b] matrix) on CUDA device `device`: b = 64 or 128, and a tile of 4 rows fits its shared "
        "memory. Elsewhere ops.block_rotate_quantize takes the Triton kernel.");
  m.def(
      "w4a16_small_m_plan",
      [](int64_t M, int64_t N, int64_t K, int64_t group_size, bool symmetric, int sm_count, int smem_per_block) {
        // (M = 0 or N = 0 would divide by zero blocks in the plan: the op returns before planning there)
        TORCH_CHECK(M > 0 && N > 0 && K > 0 && sm_count > 0, "w4a16_small_m_plan: M, N, K and sm_count must be "
                    "positive, got M = ", M, ", N = ", N, ", K = ", K, ", sm_count = ", sm_count);
        TORCH_CHECK(group_size == -1 || group_size == 32 || group_size == 64 || group_size == 128,
                    "w4a16_small_m_plan: group_size must be 32, 64, 128 or -1 (per-channel), got ", group_size);
        const int64_t group_len = group_size == -1 ? K : group_size;  // -1: per-channel, as in the ops
        const std::vector<int64_t> plan =
            quantkern::w4a16::small_m_plan(M, N, K, group_len, !symmetric, sm_count, smem_per_block);
        pybind11::dict out;
        out["warps"] = plan[0];
        out["splits"] = plan[1];
        out["weight_ring"] = plan[2] != 0;
        out["paired"] = plan[3] != 0;
        return out;
      },
      pybind11::arg("M"), pybind11::arg("N"), pybind11::arg("K"), pybind11::arg("group_size"),
      pybind11::arg("symmetric"), pybind11::arg("sm_count"), pybind11::arg("smem_per_block"),
      "The W4A16 small-M kernel's launch plan (M <= 16, group_size 32, 64, 128 or -1 for per-channel) on a device "
      "with sm_count SMs and smem_per_block bytes of opt-in shared memory per block: {'warps': warps per block "
      "(2, 4, 8 or 16), 'splits': K splits, 'weight_ring': whether the weights go through each warp's "
      "shared-memory ring (M < 5, group 32 with zero points, where an SM holds 16 warps' rings), 'paired': whether "
      "warp pairs on 64-channel blocks share each chunk's activations (9 or more tokens, where those blocks fill "
      "7/8 of the SMs)}.");
  m.def(
      "int_small_m_plan",
      [](int64_t M, int64_t N, int64_t K, int64_t w_bits, int64_t split_k, int sm_count, int64_t a_bits) {
        TORCH_CHECK(w_bits == 4 || w_bits == 8, "int_small_m_plan: w_bits must be 4 or 8, got ", w_bits);
        TORCH_CHECK(a_bits == 8 || (a_bits == 4 && w_bits == 4), "int_small_m_plan: a_bits must be 8, or 4 with "
                    "int4 weights, got a_bits = ", a_bits, ", w_bits = ", w_bits);
        TORCH_CHECK(M > 0 && N > 0 && K > 0 && sm_count > 0, "int_small_m_plan: M, N, K and sm_count must be "
                    "positive, got M = ", M, ", N = ", N, ", K = ", K, ", sm_count = ", sm_count);
        const quantkern::int_small_m::Plan plan =
            quantkern::int_small_m::plan(M, N, K, static_cast<int>(w_bits), static_cast<int>(a_bits), split_k,
                                         sm_count);
        pybind11::dict out;
        out["warps"] = plan.warps;
        out["splits"] = plan.splits;
        return out;
      },
      pybind11::arg("M"), pybind11::arg("N"), pybind11::arg("K"), pybind11::arg("w_bits"),
      pybind11::arg("split_k") = 0, pybind11::arg("sm_count") = 132, pybind11::arg("a_bits") = 8,
      "The sm_90 few-token integer GEMM's launch plan (M <= 16; csrc/int_small_m.cu) for w_bits-bit weights and "
      "a_bits-bit activations (8, or 4: packed int4 codes) on a device with sm_count SMs: {'warps': warps per "
      "32-channel block (1, 2, 4, 8 or 16), 'splits': blocks of a cluster splitting K}. split_k > 0 asks for that "
      "many splits (at most 8).");
  m.def(
      "w4a16_modelled_wgmma_plan",
      [](int64_t M, int64_t N, int64_t K, int tokens, bool bf16_path, int sm_count) {
        TORCH_CHECK(M > 0 && N > 0 && K > 0 && K % 64 == 0 && sm_count > 0, "w4a16_modelled_wgmma_plan: M, N, K "
                    "and sm_count must be positive and K a multiple of 64, got M = ", M, ", N = ", N, ", K = ", K,
                    ", sm_count = ", sm_count);
        TORCH_CHECK(tokens == 0 || tokens == 64 || tokens == 128 || tokens == 256,
                    "w4a16_modelled_wgmma_plan: tokens must be 0 (the model chooses), 64, 128 or 256, got ", tokens);
        TORCH_CHECK(!(bf16_path && tokens == 256), "w4a16_modelled_wgmma_plan: bf16's path has no 256-token tile");
        const std::vector<int64_t> plan = quantkern::w4a16::modelled_wgmma_plan(M, N, K, tokens, bf16_path, sm_count);
        pybind11::dict out;
        out["tokens"] = plan[0];
        out["splits"] = plan[1];
        return out;
      },
      pybind11::arg("M"), pybind11::arg("N"), pybind11::arg("K"), pybind11::arg("tokens") = 0,
      pybind11::arg("bf16_path") = false, pybind11::arg("sm_count") = 132,
      "The wgmma kernel's launch plan from its cost model (weights of at most 2^24 codes from 65 tokens, 129 above "
      "2^23 codes; csrc/w4a16_gemm.cu): {'tokens': tokens per tile, 'splits': K splits} on a device of sm_count "
      "SMs; tokens > 0 fixes the tile (as tile_m 3, 4, 5 do) and asks for its splits; bf16_path: bfloat16 x on "
      "the kernel's bf16 path (not staged as float16).");
  m.def(
      "w4a16_automatic_kernel",
      [](int64_t M, int64_t N, int64_t K, bool wgmma_available, bool float16, int sm_count, bool scales_fit_fp16) {
        return quantkern::w4a16::automatic_kernel_name(M, N, K, wgmma_available, float16, sm_count, scales_fit_fp16);
      },
      pybind11::arg("M"), pybind11::arg("N"), pybind11::arg("K"), pybind11::arg("wgmma_available"),
      pybind11::arg("float16") = true, pybind11::arg("sm_count") = 132, pybind11::arg("scales_fit_fp16") = false,
      "The kernel that quantkern::w4a16_gemm runs for [M, K] x [K, N] when it chooses (tile_m = 0): 'small_m', "
      "'wgmma64' / 'wgmma128' / 'wgmma256' (the wgmma kernel and its tokens per tile; only where "
      "wgmma_available: an sm_90 GPU and a build with 9.0a; '_staged' appended where bfloat16 x runs as a float16 "
      "copy) or 'mma_sync'. float16: x is float16 (else bfloat16); sm_count: the device's SMs; scales_fit_fp16: "
      "the prepared weight's flag of that name (quantkern.layout_cuda.prepare_w4a16).");
}
