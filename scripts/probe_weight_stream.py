"""How fast the small-M W4A16 kernel's weight access pattern streams with no math: the ceiling of
csrc/w4a16_small_m.cu's main loop at few tokens, against which its times are read.

    python scripts/probe_weight_stream.py 8192x28672,4096x4096     # K x N shapes of int4 weights

Each block reads 2 strips (32 channels) of the packed weights ([N/16, K/64, 32] x 16 B), its warps taking
128-deep chunks round-robin as the kernel does: 4 x 16 B per lane per chunk with ld.global.nc.L1::no_allocate,
STAGES chunks in flight per warp, WARPS warps per block, nothing but an XOR of the loaded words (no
launch bound: more warps may share an SM than the kernel's 16). On Hopper also the same chunks through the copy
engine ("bulk SxWy": each warp's ring of S 2 KB slots in shared memory, one lane issuing the chunk's two 1 KB
cp.async.bulk copies on the slot's mbarrier, S - 1 chunks ahead; the lanes read their 16 B pieces back; more
slots than shared memory holds for all blocks of a wave run in two waves). CUDA-graph medians, the weights
rotated past L2 (as benchmarks/bench_w4a16.py --cuda-graph). Prints us and GB/s for each variant.
Compiles its kernel with torch.utils.cpp_extension.load_inline (nvcc on the GPU machine, ~1 minute).
"""
import sys
from pathlib import Path

import torch
from torch.utils.cpp_extension import load_inline

sys.path.insert(0, "benchmarks")
from common import copies_for, cycling, graph_us, warm_up_gpu  # noqa: E402

VARIANTS = [(2, 2), (4, 2), (2, 4), (4, 4), (2, 8), (4, 8), (2, 16)]  # (stages, warps per block)
# The same chunks through the copy engine (cp.async.bulk, Hopper): (slots per warp, warps per block).
BULK_VARIANTS = [(4, 2), (8, 2), (4, 4), (8, 4), (4, 8), (6, 8), (4, 16)]

CUDA_SOURCE = r"""
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>

#include "hopper.cuh"  // (csrc/: load_stream_v4, ld_shared_v4, the mbarrier and bulk-copy helpers)

using quantkern::load_stream_v4;

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
    b[0] = load_stream_v4(p0); b[1] = load_stream_v4(p0 + 32); b[2] = load_stream_v4(p1);
    b[3] = load_stream_v4(p1 + 32);
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

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define NO_BULK 1
#endif
// Each warp's chunks through its own ring of SLOTS shared-memory slots (2 KB: strip 0's 1 KB run of the chunk,
// then strip 1's), filled by the copy engine: one elected lane issues the chunk's two 1 KB bulk copies on the
// slot's mbarrier, SLOTS - 1 chunks ahead; every lane reads its 4 x 16 B back (the kernel's layout).
template <int SLOTS, int WARPS>
__global__ void stream_weights_bulk(const uint4* __restrict__ w, int k_tiles, unsigned* out) {
#ifndef NO_BULK
  extern __shared__ __align__(128) uint8_t ring[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int my_chunks = (k_tiles / 2 - warp + WARPS - 1) / WARPS;
  const uint4* p0 = w + (static_cast<int64_t>(blockIdx.x) * 2 * k_tiles + warp * 2) * 32;
  const uint4* p1 = p0 + static_cast<int64_t>(k_tiles) * 32;
  constexpr int kStep = WARPS * 2 * 32;
  const uint32_t base = static_cast<uint32_t>(__cvta_generic_to_shared(ring)) + warp * SLOTS * 2048;
  const uint32_t bars = static_cast<uint32_t>(__cvta_generic_to_shared(ring)) + WARPS * SLOTS * 2048 + warp * SLOTS * 8;
  namespace hp = quantkern::hopper;
  if (lane == 0) {
    for (int s = 0; s < SLOTS; ++s) hp::mbarrier_init(bars + 8 * s, 1);
    hp::mbarrier_init_fence();
  }
  __syncwarp();
  auto issue = [&](int slot) {
    if (lane == 0) {
      // The lanes' reads of the slot (generic proxy) before the copy engine's writes (async proxy).
      asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
      hp::mbarrier_expect_bytes(bars + 8 * slot, 2048);
      hp::bulk_load(base + slot * 2048, p0, 1024, bars + 8 * slot);
      hp::bulk_load(base + slot * 2048 + 1024, p1, 1024, bars + 8 * slot);
    }
    p0 += kStep; p1 += kStep;
  };
  for (int s = 0; s < SLOTS; ++s) if (s < my_chunks) issue(s);
  unsigned acc = lane;
  for (int i = 0; i < my_chunks; ++i) {
    const int slot = i % SLOTS;
    hp::mbarrier_wait(bars + 8 * slot, (i / SLOTS) & 1);
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const uint4 v = quantkern::ld_shared_v4(base + slot * 2048 + u * 512 + lane * 16);
      acc ^= v.x + v.y * 3 + v.z * 5 + v.w * 7;
    }
    __syncwarp();
    if (i + SLOTS < my_chunks) issue(slot);
  }
  if (acc == 0x12345678u) out[0] = acc;
#endif
}

template <int SLOTS, int WARPS>
void launch_bulk(const torch::Tensor& w, int64_t k_tiles, int64_t strips, torch::Tensor& out) {
  const int smem = WARPS * SLOTS * (2048 + 8);
  auto kernel = stream_weights_bulk<SLOTS, WARPS>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  kernel<<<strips / 2, WARPS * 32, smem, c10::cuda::getCurrentCUDAStream()>>>(
      static_cast<const uint4*>(w.data_ptr()), static_cast<int>(k_tiles), static_cast<unsigned*>(out.data_ptr()));
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

void stream_bulk(torch::Tensor w, int64_t k_tiles, int64_t strips, torch::Tensor out, int64_t slots, int64_t warps) {
#define BULK(S, W) if (slots == S && warps == W) return launch_bulk<S, W>(w, k_tiles, strips, out);
  BULK(4, 2) BULK(8, 2) BULK(4, 4) BULK(8, 4) BULK(4, 8) BULK(6, 8) BULK(4, 16)
  TORCH_CHECK(false, "no bulk instance for ", slots, " slots and ", warps, " warps");
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
                    "int64_t stages, int64_t warps);\n"
                    "void stream_bulk(torch::Tensor w, int64_t k_tiles, int64_t strips, torch::Tensor out, "
                    "int64_t slots, int64_t warps);",
        cuda_sources=CUDA_SOURCE, functions=["stream", "stream_bulk"],
        extra_cuda_cflags=["-O3", f"-gencode=arch=compute_{arch},code=sm_{arch}"],
        extra_include_paths=[str(Path(__file__).resolve().parent.parent / "csrc")])
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
        if arch.startswith("90"):
            for slots, warps in BULK_VARIANTS:
                t = graph_us(lambda: module.stream_bulk(next_w(), k // 64, n // 16, out, slots, warps))
                cells.append(f"bulk S{slots}W{warps} {t:.1f}us {nbytes / t / 1e3:.0f}GB/s")
        print(f"{shape}: " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
