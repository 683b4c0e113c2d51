// The online Hadamard kernels for the base orders m = 28, 36 (see csrc/hadamard.cu): a separate
// translation unit so that the build compiles it in parallel with the others.
#include "hadamard_kernels.cuh"

namespace quantkern {
namespace hadamard_impl {

void launch_paley_second(const Plan& plan, int64_t rows, cudaStream_t stream, at::ScalarType dtype, bool quant) {
  switch (plan.m) {
    case 28: launch_dtype<28>(plan, rows, stream, dtype, quant); break;
    default: launch_dtype<36>(plan, rows, stream, dtype, quant); break;
  }
}

}  // namespace hadamard_impl
}  // namespace quantkern
