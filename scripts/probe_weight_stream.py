"""How fast the small-M W4A16 kernel's weight access pattern streams with no math: the ceiling of
csrc/w4a16_small_m.cu's main loop at few tokens, against which its times are read.

    python scripts/probe_weight_stream.py 8192x28672,4096x4096     # K x N shapes of int4 weights

Each block reads 2 strips (32 channels) of the packed weights ([N/16, K/64, 32] x 16 B), its warps taking
128-deep chunks round-robin as the kernel does: 4 x 16 B per lane per chunk with ld.global.nc.L1::no_allocate,
STAGES chunks in flight per warp, WARPS warps per block, nothing but an XOR of the loaded words (no
launch bound: more warps may share an SM than the kernel's 16). CUDA-graph medians, the weights rotated
past L2 (as benchmarks/bench_w4a16.py --cuda-graph). Prints us and GB/s for each STAGES x WARPS.
Compiles its kernel with torch.utils.cpp_extension.load_inline (nvcc on the GPU machine, ~1 minute).
"""
import sys

import torch
from torch.utils.cpp_extension import load_inline

sys.path.insert(0, "benchmarks")
from common import copies_for, cycling, graph_us, warm_up_gpu  # noqa: E402

VARIANTS = [(2, 2), (4, 2), (2, 4), (4, 4), (2, 8), (4, 8), (2, 16)]  # (stages, warps per block)

CUDA_SOURCE = r"""
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>

__device__ __forceinline__ uint4 load_stream(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

// Block: strips 2b and 2b + 1; warp w: chunks w, w + WARPS, ... (a chunk: 2 k-tiles x 2 strips, 16 B per lane
// per (strip, k-tile) unit); STAGES chunks in flight per warp, each refilled right after it is consumed.
template <int STAGES, int WARPS>
__global__ void stream_weights(const uint4* __restrict__ w, int k_tiles, unsigned* out) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int my_chunks = (k_tiles / 2 - warp + WARPS - 1) / WARPS;
  const uint4* p0 = w + (static_cast<int64_t>(blockIdx.x) * 2 * k_tiles + warp * 2) * 32 + lane;
  const uint4* p1 = p0 + static_cast<int64_t>(k_tiles) * 32;
  constexpr int kStep = WARPS * 2 * 32;
  uint4 buf[STAGES][4];
  auto load = [&](uint4 (&b)[4]) {
    b[0] = load_stream(p0); b[1] = load_stream(p0 + 32); b[2] = load_stream(p1); b[3] = load_stream(p1 + 32);
    p0 += kStep; p1 += kStep;
  };
  unsigned acc = lane;
#pragma unroll
  for (int s = 0; s < STAGES; ++s) if (s < my_chunks) load(buf[s]);
  for (int i = 0; i < my_chunks; i += STAGES) {
#pragma unroll
    for (int s = 0; s < STAGES; ++s) {
      if (i + s < my_chunks) {
#pragma unroll
        for (int u = 0; u < 4; ++u) acc ^= buf[s][u].x + buf[s][u].y * 3 + buf[s][u].z * 5 + buf[s][u].w * 7;
        if (i + s + STAGES < my_chunks) load(buf[s]);
      }
    }
  }
  if (acc == 0x12345678u) out[0] = acc;  // (keeps the loads)
}

template <int STAGES, int WARPS>
void launch(const torch::Tensor& w, int64_t k_tiles, int64_t strips, torch::Tensor& out) {
  stream_weights<STAGES, WARPS><<<strips / 2, WARPS * 32, 0, c10::cuda::getCurrentCUDAStream()>>>(
      static_cast<const uint4*>(w.data_ptr()), static_cast<int>(k_tiles), static_cast<unsigned*>(out.data_ptr()));
}

void stream(torch::Tensor w, int64_t k_tiles, int64_t strips, torch::Tensor out, int64_t stages, int64_t warps) {
#define CASE(S, W) if (stages == S && warps == W) return launch<S, W>(w, k_tiles, strips, out);
  CASE(2, 2) CASE(4, 2) CASE(2, 4) CASE(4, 4) CASE(2, 8) CASE(4, 8) CASE(2, 16)
  TORCH_CHECK(false, "no instance for ", stages, " stages and ", warps, " warps");
}
"""


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    arch = "%d%d" % torch.cuda.get_device_capability()
    arch += "a" if arch == "90" else ""
    module = load_inline(
        "qk_probe_weight_stream",
        cpp_sources="void stream(torch::Tensor w, int64_t k_tiles, int64_t strips, torch::Tensor out, "
                    "int64_t stages, int64_t warps);",
        cuda_sources=CUDA_SOURCE, functions=["stream"],
        extra_cuda_cflags=["-O3", f"-gencode=arch=compute_{arch},code=sm_{arch}"])
    warm_up_gpu()
    out = torch.zeros(1, dtype=torch.int32, device="cuda")
    for shape in sys.argv[1].split(","):
        k, n = map(int, shape.split("x"))
        if k % 128 or n % 32:
            sys.exit(f"{shape}: K must be a multiple of 128 and N of 32")
        nbytes = k * n // 2
        w = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device="cuda")
        next_w = cycling([w] + [w.clone() for _ in range(copies_for(nbytes) - 1)])
        cells = []
        for stages, warps in VARIANTS:
            t = graph_us(lambda: module.stream(next_w(), k // 64, n // 16, out, stages, warps))
            cells.append(f"S{stages}W{warps} {t:.1f}us {nbytes / t / 1e3:.0f}GB/s")
        print(f"{shape}: " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
