// quantkern::hadamard(Tensor x, int block_size=0) -> Tensor
// quantkern::hadamard_quantize(Tensor x, int bits, float clip_ratio, int block_size=0, bool packed=True)
//   -> (Tensor q, Tensor scale)
//   (fp16/bf16 rows of the sizes csrc/hadamard_mma.cu serves go to its tensor-core kernel first; packed = false
//   with bits = 4: int4 codes one per byte, which the kernels below write packed and the host then spreads)
//
// Online rotation kernels: the orthonormal Hadamard transform along the last dim,
//
//   y = x @ H^T / sqrt(n),   H = quantkern.rotation.hadamard_matrix(n) = kron(H_m, H_{2^k}),
//
// for n = m * 2^k, m in {1, 12, 20, 28, 36, 40} (the same factorisation order as rotation.py: m = 1 first,
// 40 before 20), and, fused, the per-token symmetric quantization of y exactly as
// quantkern::quantize_per_token (csrc/activation_quant.cu) does it:
//
//   yr    = float(dtype(y))        y rounded to x's dtype FIRST: the QuantLinear path (ops.hadamard returns x's
//                                  dtype, then the quantizer reads it), so the fused op serves QuantLinear
//   scale = (absmax(yr) * clip) / qmax   (fp32, RN, in that order; 1 where 0)
//   q     = clamp(round_half_even(yr / scale), -qmax, qmax)     (IEEE division)
//   layout: int8 [M, K] or uint8 [M, K/2] (element 2j in the low nibble), fp32 scales [M].
//
// block_size > 0 applies the transform to each consecutive block of block_size entries instead (a power of
// two >= 8 dividing n): kron(I, H_b) / sqrt(b), i.e. rotation.block_hadamard_transform. Quantization stays
// per token over the whole row.
//
// Arithmetic and exactness. Everything is accumulated in fp32. The Walsh-Hadamard factor H_{2^k} is a
// radix-2 butterfly over the index bits 0, 1, ..., k-1 IN THAT ORDER, each butterfly (lo, hi) ->
// (lo + hi, lo - hi), then the dense m x m step, then one multiply by fp32(1 / sqrt(n)): the same operations
// in the same order as quantkern.rotation.hadamard_transform, so for n = 2^k (and blocked mode) the result
// is bit-identical to quantkern.reference.hadamard, and the fused quantization bit-identical to
// reference.quantize_per_token(reference.hadamard(x)). For m > 1 the dense step's summation order differs
// from the reference's matmul: the rotated values agree to fp32 rounding, and a quantization code can differ
// by 1 where yr / scale sits on a rounding boundary (rare; tested).
//
// Tiling and layout (one row per CTA; the row lives in shared memory as fp32, n * 4 bytes)
//   load:    thread t reads 16-byte-aligned vectors of 8 consecutive elements (vector v = t, t + T, ...:
//            one fully coalesced 512-byte (fp16) transaction per warp), converts to fp32 and does the
//            butterflies of bits 0-2 in registers, then stores the 8 values to shared memory (2 x 16 B).
//   rounds:  bits [lo, lo + G) (G <= 6): each thread takes a "column" (all other index bits fixed), reads its
//            2^G values (stride 2^lo) into registers, does G butterfly stages, writes them back; one
//            __syncthreads between rounds. Columns map to lanes so that a warp reads 32 banks.
//   final:   (direct path) each thread holds an adjacent PAIR of elements (bit 0) x the last GF <= 5 bits
//            x all m blocks of the dense factor: 2 * 2^GF * m <= 80 registers; it finishes the butterflies,
//            applies the m x m base matrix as straight-line adds/subtracts (its signs are compile-time
//            constants generated from Paley's constructions, below: no table), scales, rounds to x's dtype,
//            reduces the row absmax (warp shuffles + one shared exchange), quantizes and stores straight from
//            registers: a pair is one 4-byte (fp16 out), 1-byte (int4) or 2-byte (int8) store, and the 32
//            lanes of a warp write 32 consecutive pairs (coalesced).
//            (indirect path: blocked mode, or where the direct path would need too many registers) all
//            butterflies are done in rounds, the dense step is one more round, and an output sweep re-reads
//            8-vectors from shared memory: absmax sweep, block reduce, quantize sweep (16/8/4-byte stores).
//   threads: 2^(r2-1) (direct path: one per pair column, at most 256), else 256 (strided loops). With the
//            launch bound of 256 a thread may use up to 255 registers: no spills at 80 live values.
//   swizzle: element i lives at i ^ (bit5(i) << 2) ^ (bits[S, S+2)(i) << 3) (16-byte chunks permuted within
//            each 128-byte row: vector accesses stay aligned), S = the end of the first round, so the first
//            round (bits 3..), whose lanes differ in bits 0-2 and S.., hits 32 distinct banks, and so do the
//            16-byte vector stores of the load phase.
//   sizes:   k >= 3 takes the paths above (n <= 32768 for 2^k, n <= 40960 and 2^(k-1) <= 1024 for m > 1);
//            k < 3 (n = 1, 2, 4 or 12..160 with an odd-ish factor) runs a small dense kernel (one thread per
//            output, signs computed on the fly). Anything else is refused with the list of supported sizes.
//
// Measured (H100 80GB HBM3, fp16, benchmarks/bench_hadamard.py; fraction of a device copy of the same bytes):
//   rotation alone 0.87-0.96 at n = 4096 / 8192 / 16384 and 0.78-0.80 at 14336 (fast-hadamard-transform in
//   the same run: 0.68-0.74 and 0.36); this kernel's rotation + int4 quantization fused: 0.28-0.48, issue-bound
//   (the k butterfly adds, the shared-memory exchanges, ~15 more instructions for the dtype round trip, absmax,
//   quantization and packing). So hadamard_quantize of fp16/bf16 rows of 1024-16384 and 14336 entries runs the
//   tensor-core kernel of csrc/hadamard_mma.cu instead (docs/PERF.md); this one serves fp32, the other sizes
//   and blocked mode.
//
// Files: the device code and launch templates are in csrc/hadamard_kernels.cuh; this unit holds the host
// side and the m = 1 kernels, csrc/hadamard_paley1.cu / hadamard_paley2.cu the m = 12, 20, 40 / 28, 36 ones
// (three units that the build compiles in parallel).
//
// Compiled without --use_fast_math: the divisions and the butterflies must be IEEE.

#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "hadamard_kernels.cuh"

namespace quantkern {
namespace hadamard_impl {

void launch_m1(const Plan& plan, int64_t rows, cudaStream_t stream, at::ScalarType dtype, bool quant) {
  launch_dtype<1>(plan, rows, stream, dtype, quant);
}

}  // namespace hadamard_impl

namespace {

using namespace hadamard_impl;

// ---------------------------------------------------------------------------------------------
// Host side: size checks, the launch plan, dispatch
// ---------------------------------------------------------------------------------------------

constexpr int kMaxN = 40960;       // n * 4 bytes of shared memory per CTA (160 KiB)
constexpr int kMaxPow2N = 32768;
constexpr int kFactorOrder[] = {1, 40, 36, 28, 20, 12};  // rotation._FACTORIZATION_ORDER

bool is_pow2(int64_t v) { return v > 0 && (v & (v - 1)) == 0; }
int log2i(int64_t v) {
  int k = 0;
  while ((int64_t{1} << k) < v) ++k;
  return k;
}


// Splits bits [from, to) into rounds of at most 6 bits, balanced.
void plan_rounds(Params& p, int from, int to) {
  const int width = to - from;
  p.nrounds = (width + 5) / 6;
  int lo = from;
  for (int r = 0; r < p.nrounds; ++r) {
    const int g = (width - (lo - from) + (p.nrounds - r) - 1) / (p.nrounds - r);
    p.lo[r] = lo;
    p.g[r] = g;
    lo += g;
  }
  p.swz = p.nrounds > 0 ? p.lo[0] + p.g[0] : 6;
}

Plan make_plan(int64_t n64, int64_t block_size, const char* op) {
  const char* supported =
      "supported sizes: n = 2^k (8 <= ... <= 32768, and 1, 2, 4) or n = m * 2^k with m in (12, 20, 28, 36, 40) "
      "and n <= 40960, 2^k <= 2048 (the orders of quantkern.rotation.hadamard_matrix); block_size: a power of "
      "two >= 8 dividing n. Other sizes: quantkern.rotation.block_hadamard_transform on the CPU/reference path";
  Plan plan{};
  Params& p = plan.p;
  TORCH_CHECK(n64 > 0 && n64 <= kMaxN, op, ": no kernel for a last dimension of ", n64, "; ", supported);
  const int n = static_cast<int>(n64);
  p.n = n;
  if (block_size > 0) {
    TORCH_CHECK(is_pow2(block_size) && block_size >= 8 && block_size <= kMaxPow2N && n % block_size == 0, op,
                ": block_size must be a power of two >= 8 that divides the last dimension ", n, ", got ",
                block_size);
    plan.m = 1;
    p.k = log2i(block_size);
    p.norm = static_cast<float>(1.0 / std::sqrt(static_cast<double>(block_size)));
    plan.small = false;
    plan.direct = false;
    plan_rounds(p, 3, p.k);
    plan.threads = std::min(256, std::max(32, ((n / 8) + 31) / 32 * 32));
    plan.smem = static_cast<size_t>(n) * sizeof(float);
    return plan;
  }
  TORCH_CHECK(block_size == 0, op, ": block_size must be 0 (whole row) or positive, got ", block_size);
  int m = 0;
  for (int cand : kFactorOrder) {
    if (n % cand == 0 && is_pow2(n / cand)) {
      m = cand;
      break;
    }
  }
  TORCH_CHECK(m != 0, op, ": no Hadamard matrix of order ", n, "; ", supported);
  TORCH_CHECK(m > 1 || n <= kMaxPow2N, op, ": n = ", n, " is larger than 32768; ", supported);
  plan.m = m;
  p.k = log2i(n / m);
  p.norm = static_cast<float>(1.0 / std::sqrt(static_cast<double>(n)));
  if (p.k < 3) {
    plan.small = true;
    plan.threads = (n + 31) / 32 * 32;
    return plan;
  }
  TORCH_CHECK(m == 1 || p.k <= 11, op, ": n = ", n, " = ", m, " x 2^", p.k, " needs 2^k <= 2048; ", supported);
  plan.small = false;
  plan.hot = true;
  plan.smem = static_cast<size_t>(n) * sizeof(float);
  // Direct path: final round = pair x 2^gf x m registers, 2^(r2 - 1) threads.
  p.gf = m == 1 ? std::min(5, std::max(0, p.k - 8)) : 0;
  p.r2 = p.k - p.gf;
  plan.direct = 2 * (1 << p.gf) * m <= 80 && (1 << (p.r2 - 1)) <= kMaxThreads;
  if (plan.direct) {
    plan_rounds(p, 3, p.r2);
    plan.threads = std::max(32, 1 << (p.r2 - 1));
  } else {
    plan_rounds(p, 3, p.k);
    plan.threads = std::min(256, std::max(32, ((n / 8) + 31) / 32 * 32));
  }
  return plan;
}

template <typename T, bool QUANT>
void launch_small(const Plan& plan, int64_t rows, cudaStream_t stream) {
  hadamard_small_kernel<T, QUANT><<<static_cast<unsigned>(rows), plan.threads, 0, stream>>>(plan.p, plan.m);
  QK_CHECK_LAUNCH();
}

template <bool QUANT>
void dispatch(const at::Tensor& x, const Plan& plan, int64_t rows, cudaStream_t stream, const char* op) {
  const at::ScalarType dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat, op, ": unsupported dtype ", dtype);
  // The row lives in shared memory as fp32: up to 160 KiB (n = 40960), more than sm_86 / sm_89 give a block.
  const int64_t smem_limit = device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>(x.get_device());
  TORCH_CHECK(static_cast<int64_t>(plan.smem) <= smem_limit, op, ": a row of ", plan.p.n, " entries needs ",
              plan.smem, " bytes of shared memory (4 per entry), more than this GPU's ", smem_limit,
              " per block (the reference path, quantkern.rotation, serves it)");
  if (plan.small) {
    switch (dtype) {
      case at::kHalf: launch_small<__half, QUANT>(plan, rows, stream); break;
      case at::kBFloat16: launch_small<__nv_bfloat16, QUANT>(plan, rows, stream); break;
      default: launch_small<float, QUANT>(plan, rows, stream); break;
    }
  } else if (plan.m == 1) {
    launch_m1(plan, rows, stream, dtype, QUANT);
  } else if (plan.m == 28 || plan.m == 36) {
    launch_paley_second(plan, rows, stream, dtype, QUANT);
  } else {
    launch_paley_first(plan, rows, stream, dtype, QUANT);
  }
}

// The input as the kernels need it: contiguous, 16-byte aligned.
at::Tensor prepared_input(const at::Tensor& x) {
  return is_aligned(x.const_data_ptr(), 16) ? x : x.clone(at::MemoryFormat::Contiguous);
}

at::Tensor hadamard_cuda(const at::Tensor& x_in, int64_t block_size) {
  constexpr const char* op = "quantkern::hadamard";
  check_cuda(x_in, op, "x");
  TORCH_CHECK(x_in.dim() >= 1, op, ": x must have at least one dimension (the transformed one)");
  check_float_dtype(x_in, op, "x");
  check_contiguous(x_in, op, "x");
  const int64_t n = x_in.size(-1);
  Plan plan = make_plan(n, block_size, op);
  const int64_t rows = n > 0 ? x_in.numel() / n : 0;
  TORCH_CHECK(rows <= std::numeric_limits<int32_t>::max(), op, ": too many rows (", rows, "), at most 2^31 - 1");
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  at::Tensor y = at::empty(x_in.sizes(), x_in.options());
  if (rows == 0) return y;
  const at::Tensor x = prepared_input(x_in);
  plan.p.x = x.const_data_ptr();
  plan.p.out = y.data_ptr();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
  dispatch<false>(x, plan, rows, stream, op);
  return y;
}

std::tuple<at::Tensor, at::Tensor> hadamard_quantize_cuda(const at::Tensor& x_in, int64_t bits, double clip_ratio,
                                                          int64_t block_size, bool packed) {
  constexpr const char* op = "quantkern::hadamard_quantize";
  check_per_token_quant_input(x_in, bits, clip_ratio, op);
  const int64_t rows = x_in.size(0), n = x_in.size(1);
  Plan plan = make_plan(n, block_size, op);
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  const bool pack = bits == 4 && packed;
  at::Tensor q = at::empty({rows, pack ? n / 2 : n}, x_in.options().dtype(pack ? at::kByte : at::kChar));
  at::Tensor scale = at::empty({rows}, x_in.options().dtype(at::kFloat));
  if (rows == 0) return {q, scale};
  const at::Tensor x = prepared_input(x_in);
  if (hadamard_quantize_tensor_cores(x, bits, clip_ratio, block_size, packed, q, scale)) return {q, scale};
  if (bits == 4 && !packed) {
    // The fp32-butterfly kernel writes packed int4 only: pack, then spread each byte's two signed nibbles
    // (element 2j low) into bytes 2j and 2j + 1 (sign-extending shifts of int8).
    at::Tensor pairs;
    std::tie(pairs, scale) = hadamard_quantize_cuda(x_in, bits, clip_ratio, block_size, true);
    const at::Tensor signed_pairs = pairs.view(at::kChar);
    at::Tensor spread = q.view({rows, n / 2, 2});
    spread.select(2, 0).copy_(signed_pairs.__lshift__(4).__rshift__(4));
    spread.select(2, 1).copy_(signed_pairs.__rshift__(4));
    return {q, scale};
  }
  plan.p.x = x.const_data_ptr();
  plan.p.out = q.data_ptr();
  plan.p.scales = scale.data_ptr<float>();
  plan.p.bits = static_cast<int>(bits);
  plan.p.clip = static_cast<float>(clip_ratio);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
  dispatch<true>(x, plan, rows, stream, op);
  return {q, scale};
}

}  // namespace
}  // namespace quantkern

TORCH_LIBRARY_IMPL(quantkern, CUDA, m) {
  m.impl("hadamard", &quantkern::hadamard_cuda);
  m.impl("hadamard_quantize", &quantkern::hadamard_quantize_cuda);
}

