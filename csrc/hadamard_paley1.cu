// The online Hadamard kernels for the base orders m = 12, 20, 40 (see csrc/hadamard.cu): a separate
// translation unit so that the build compiles it in parallel with the others.
#include "hadamard_kernels.cuh"

namespace quantkern {
namespace hadamard_impl {

void launch_paley_first(const Plan& plan, int64_t rows, cudaStream_t stream, at::ScalarType dtype, bool quant) {
  switch (plan.m) {
    case 12: launch_dtype<12>(plan, rows, stream, dtype, quant); break;
    case 20: launch_dtype<20>(plan, rows, stream, dtype, quant); break;
    default: launch_dtype<40>(plan, rows, stream, dtype, quant); break;
  }
}

}  // namespace hadamard_impl
}  // namespace quantkern
