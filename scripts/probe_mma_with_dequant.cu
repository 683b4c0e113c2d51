// Probe (run by hand on an sm_90 GPU, not part of the build): how fast the tensor cores run beside the W4A16
// kernels' dequantization. First wgmma m64nNk16 with its A operand from registers (RS: the W4A16 wgmma kernel's
// weights, csrc/w4a16_wgmma.cu) or from shared memory (SS), alone and with the kernel's per-k-tile conversion work
// (4 packed words -> 16 fp16x2 registers: shift, lop3, sub, mul) in the same warps. No global memory: every block
// loops over one resident stage, 256 threads (2 warpgroups) a block, one or two blocks per SM, 4 wgmmas per k-tile
// and one commit, the A registers in two sets (wait_group 1), as in the kernel. Then two other layouts (below).
// Prints TFLOP/s and the cycles per k-tile step at 1.98 GHz.
//
//   nvcc -O3 -std=c++17 -gencode arch=compute_90a,code=sm_90a scripts/probe_mma_with_dequant.cu -o /tmp/probe
//   /tmp/probe
//
// Measured (H100, docs/PERF.md session 25): RS m64n64k16 963-969 TFLOP/s alone, 732-745 with the conversion
// (2 blocks per SM; 660-721 with one), whichever comes first in a k-tile, the conversion or the issue; RS
// m64n128k16 884-970 with or without it (within one run, equal); SS m64n64k16 964-983 with or without it.
// The last four rows (session 26): a converter warpgroup storing fp16 A tiles beside SS wgmmas 341 TFLOP/s at one
// block per SM (the converter's loop, 803 cycles a step, is the longer one), 305 at two (1,798 cycles a step; a
// guess, not measured: shared memory's bandwidth, the SS reads and the stores asking ~168 bytes a cycle at the
// wgmmas' rate against its 128); mma.sync m16n8k16 at 64 tokens 568 alone, 495 with the conversion. Neither beats
// the RS wgmmas' 735 with the conversion on their own warps.
#include <cstdint>
#include <cstdio>

#include <cuda_runtime.h>

#define ACC8(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
    "+f"(d[i + 6]), "+f"(d[i + 7])

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// K-major, 128-byte swizzle, 8-row groups 1024 bytes apart (as csrc/hopper.cuh's smem_descriptor).
__device__ __forceinline__ uint64_t descriptor(uint32_t addr) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (uint64_t{1} << 16) | (uint64_t{1024 >> 4} << 32) |
         (uint64_t{1} << 62);
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ uint32_t and_or(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}
__device__ __forceinline__ uint32_t sub2(uint32_t a, uint32_t b) {
  uint32_t d;
  asm("sub.rn.f16x2 %0, %1, %2;\n" : "=r"(d) : "r"(a), "r"(b));
  return d;
}
__device__ __forceinline__ uint32_t mul2(uint32_t a, uint32_t b) {
  uint32_t d;
  asm("mul.rn.f16x2 %0, %1, %2;\n" : "=r"(d) : "r"(a), "r"(b));
  return d;
}

// D[64 x N] += A[64 x 16] * B[16 x N], fp16 in, fp32 accumulators (N / 2 per thread): rs() with A from registers,
// ss() with A from shared memory. ACC_REGS is the "{%0, ...}," list of the N / 2 accumulators and the variadic
// arguments their operands; A's registers (or its descriptor) and B's descriptor follow them.
template <int N>
struct Wgmma;
#define DEFINE_WGMMA(N, ACC_REGS, RS_TAIL, SS_TAIL, ...)                                                         \
  template <>                                                                                                    \
  struct Wgmma<N> {                                                                                              \
    __device__ static void rs(float* d, const uint32_t* a, uint64_t b) {                                         \
      asm volatile("wgmma.mma_async.sync.aligned.m64n" #N "k16.f32.f16.f16 " ACC_REGS RS_TAIL                    \
                   : __VA_ARGS__                                                                                 \
                   : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));                                        \
    }                                                                                                            \
    __device__ static void ss(float* d, uint64_t a, uint64_t b) {                                                \
      asm volatile("wgmma.mma_async.sync.aligned.m64n" #N "k16.f32.f16.f16 " ACC_REGS SS_TAIL                    \
                   : __VA_ARGS__                                                                                 \
                   : "l"(a), "l"(b));                                                                            \
    }                                                                                                            \
  };
#define ACC_REGS_32                                                                   \
  "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21," \
  "%22,%23,%24,%25,%26,%27,%28,%29,%30,%31},"
#define ACC_REGS_64                                                                   \
  "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21," \
  "%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41," \
  "%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61," \
  "%62,%63},"
DEFINE_WGMMA(64, ACC_REGS_32, " {%32, %33, %34, %35}, %36, 1, 1, 1, 0;\n", " %32, %33, 1, 1, 1, 0, 0;\n", ACC8(0),
             ACC8(8), ACC8(16), ACC8(24))
DEFINE_WGMMA(128, ACC_REGS_64, " {%64, %65, %66, %67}, %68, 1, 1, 1, 0;\n", " %64, %65, 1, 1, 1, 0, 0;\n", ACC8(0),
             ACC8(8), ACC8(16), ACC8(24), ACC8(32), ACC8(40), ACC8(48), ACC8(56))

// RS: A from registers (converted each k-tile when CONVERT); SS: A from shared memory (the conversion, when asked,
// still runs on registers the wgmmas do not read).
template <int N, bool RS, bool CONVERT, int BLOCKS_PER_SM>
__global__ void __launch_bounds__(256, BLOCKS_PER_SM) probe(int k_tiles, uint32_t seed, float* out) {
  extern __shared__ uint8_t smem_raw[];
  const uint32_t base = (smem_u32(smem_raw) + 1023) & ~1023u;  // A tile (8 KB), then B (N rows of 128 bytes)
  for (int i = threadIdx.x; i < (8192 + N * 128) / 4; i += 256) {
    const uint32_t v = 0x3C003C00u ^ (i * 2654435761u & 0x00FF00FFu);  // small fp16 values
    asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(base + 4 * i), "r"(v));
  }
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
  __syncthreads();
  float d[N / 2];
  for (int i = 0; i < N / 2; ++i) d[i] = 0.0f;
  uint32_t a_sets[2][4][4];
  for (int s = 0; s < 2; ++s)
    for (int k = 0; k < 4; ++k)
      for (int i = 0; i < 4; ++i) a_sets[s][k][i] = 0x3C003C00u ^ (seed * (s + 3 * k + 7 * i + threadIdx.x));
  const uint32_t word = seed ^ threadIdx.x;
  auto k_tile = [&](uint32_t(&a)[4][4], int t) {
    wgmma_wait<1>();  // the k-tile before the previous one is done: its register set is free
    if (CONVERT) {
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const uint32_t q = word * (k + 1) + t;  // a packed word of 8 codes (made up)
#pragma unroll
        for (int i = 0; i < 4; ++i) a[k][i] = mul2(sub2(and_or(q >> (4 * i), 0x000F000Fu, 0x64006400u), 0x64086408u),
                                                   0x2C002C00u);
      }
    }
    uint64_t da[4], db[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      asm volatile("" : "+r"(a[k][0]), "+r"(a[k][1]), "+r"(a[k][2]), "+r"(a[k][3])::"memory");
      da[k] = descriptor(base + 32 * k);
      db[k] = descriptor(base + 8192 + 32 * k);
      asm volatile("" : "+l"(da[k]), "+l"(db[k]));
    }
    wgmma_fence();
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      if (RS) {
        Wgmma<N>::rs(d, a[k], db[k]);
      } else {
        Wgmma<N>::ss(d, da[k], db[k]);
      }
    }
    wgmma_commit();
  };
  for (int t = 0; t < k_tiles; t += 2) {
    k_tile(a_sets[0], t);
    k_tile(a_sets[1], t + 1);
  }
  wgmma_wait<0>();
  for (int i = 0; i < N / 2; ++i) asm volatile("" : "+f"(d[i])::"memory");
  float sum = 0.0f;
  for (int i = 0; i < N / 2; ++i) sum += d[i];
  if (sum == 1234.5f) out[threadIdx.x] = sum;  // (keeps the sums alive)
}

// Times `kernel` (threads a block, dynamic shared memory) on blocks_per_sm blocks an SM, the best of 5 launches
// of k_tiles k-tiles after a warm-up, and prints its rate: each block multiplies `channels` weight rows by `tokens`
// tokens over 64 k a k-tile.
template <typename Kernel>
void time_and_print(const char* name, Kernel kernel, int threads, int smem, int channels, int tokens,
                    int blocks_per_sm, int sms, float* out) {
  const int k_tiles = 4000, blocks = sms * blocks_per_sm;
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  kernel<<<blocks, threads, smem>>>(100, 1, out);  // warm-up
  cudaEvent_t start, stop;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  float best_ms = 1e30f;
  for (int r = 0; r < 5; ++r) {
    cudaEventRecord(start);
    kernel<<<blocks, threads, smem>>>(k_tiles, r + 1, out);
    cudaEventRecord(stop);
    cudaEventSynchronize(stop);
    float ms;
    cudaEventElapsedTime(&ms, start, stop);
    best_ms = ms < best_ms ? ms : best_ms;
  }
  const double flop = 2.0 * blocks * static_cast<double>(k_tiles) * channels * tokens * 64;
  const cudaError_t err = cudaGetLastError();
  printf("%-32s %d block(s)/SM: %7.1f TFLOP/s, %6.1f cycles per k-tile step at 1.98 GHz %s\n", name, blocks_per_sm,
         flop / best_ms / 1e9, best_ms * 1e-3 * 1.98e9 / k_tiles, err == cudaSuccess ? "" : cudaGetErrorString(err));
}

template <int N, bool RS, bool CONVERT, int BLOCKS_PER_SM>
void run(const char* name, int sms, float* out) {
  time_and_print(name, probe<N, RS, CONVERT, BLOCKS_PER_SM>, 256, 1024 + 8192 + N * 128, 128, N, BLOCKS_PER_SM, sms,
                 out);
}

// The layout that would keep the dequantization off the wgmma warps: a third warpgroup converts each k-tile's
// weights (the same ALU work, 4 words a thread) and stores them as an fp16 A tile to shared memory (8 KB per
// consumer k-tile: 4 st.shared.v4 a thread), while two consumer warpgroups issue SS m64n64k16 wgmmas. No
// synchronization between them (a ceiling: the stores go to a scratch tile the wgmmas do not read), so the kernel
// takes the longer of the two loops.
template <int BLOCKS_PER_SM>
__global__ void __launch_bounds__(384, BLOCKS_PER_SM)
    probe_converter_warpgroup(int k_tiles, uint32_t seed, float* out) {
  extern __shared__ uint8_t smem_raw[];
  const uint32_t base = (smem_u32(smem_raw) + 1023) & ~1023u;  // A (8 KB), B (8 KB), scratch A tile (8 KB)
  for (int i = threadIdx.x; i < 16384 / 4; i += 384) {
    const uint32_t v = 0x3C003C00u ^ (i * 2654435761u & 0x00FF00FFu);
    asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(base + 4 * i), "r"(v));
  }
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
  __syncthreads();
  const int warpgroup = threadIdx.x / 128, t128 = threadIdx.x % 128;
  if (warpgroup == 2) {  // the converter: two k-tiles (one per consumer) per step
    const uint32_t word = seed ^ threadIdx.x, scratch = base + 16384 + 64 * t128;
    for (int t = 0; t < 2 * k_tiles; ++t) {
      uint32_t a[4][4];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const uint32_t q = word * (k + 1) + t;
#pragma unroll
        for (int i = 0; i < 4; ++i) a[k][i] = mul2(sub2(and_or(q >> (4 * i), 0x000F000Fu, 0x64006400u), 0x64086408u),
                                                   0x2C002C00u);
      }
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"r"(scratch + 16 * k), "r"(a[k][0]),
                     "r"(a[k][1]), "r"(a[k][2]), "r"(a[k][3])
                     : "memory");
      }
    }
    return;
  }
  float d[32];
  for (int i = 0; i < 32; ++i) d[i] = 0.0f;
  for (int t = 0; t < k_tiles; ++t) {
    wgmma_wait<1>();
    uint64_t da[4], db[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      da[k] = descriptor(base + 32 * k);
      db[k] = descriptor(base + 8192 + 32 * k);
      asm volatile("" : "+l"(da[k]), "+l"(db[k]));
    }
    wgmma_fence();
#pragma unroll
    for (int k = 0; k < 4; ++k) Wgmma<64>::ss(d, da[k], db[k]);
    wgmma_commit();
  }
  wgmma_wait<0>();
  for (int i = 0; i < 32; ++i) asm volatile("" : "+f"(d[i])::"memory");
  float sum = 0.0f;
  for (int i = 0; i < 32; ++i) sum += d[i];
  if (sum == 1234.5f) out[threadIdx.x] = sum;
}

// The few-token kernel's way at 64 tokens, for comparison: mma.sync m16n8k16 with the weights as the A operand (one
// packed word a strip and k16 step, converted in registers when CONVERT) and the 64 tokens as 8 n8 tiles of a
// resident x tile read with ldmatrix (4 ldmatrix.x4 a k16 step, shared by the warp's 2 strips); 8 warps a block, two
// blocks an SM (16 warps, as csrc/w4a16_small_m.cu). No global memory.
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
               "{%0, %1, %2, %3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <bool CONVERT>
__global__ void __launch_bounds__(256, 2) probe_mma_sync(int k_tiles, uint32_t seed, float* out) {
  extern __shared__ uint8_t smem_raw[];
  const uint32_t base = (smem_u32(smem_raw) + 1023) & ~1023u;  // x: 64 token rows x 64 k, 128-byte rows, swizzled
  for (int i = threadIdx.x; i < 8192 / 4; i += 256) {
    const uint32_t v = 0x3C003C00u ^ (i * 2654435761u & 0x00FF00FFu);
    asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(base + 4 * i), "r"(v));
  }
  __syncthreads();
  const int lane = threadIdx.x % 32;
  const int row = (lane & 7) + 8 * (lane >> 4), half = (lane >> 3) & 1;  // ldmatrix.x4: 16 tokens x k16
  float acc[2][8][4];
  for (int s = 0; s < 2; ++s)
    for (int j = 0; j < 8; ++j)
      for (int i = 0; i < 4; ++i) acc[s][j][i] = 0.0f;
  uint32_t a[2][4];
  for (int s = 0; s < 2; ++s)
    for (int i = 0; i < 4; ++i) a[s][i] = 0x3C003C00u ^ (seed * (s + 7 * i + threadIdx.x));
  const uint32_t word = seed ^ threadIdx.x;
  for (int t = 0; t < k_tiles; ++t) {
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      uint32_t b[8][2];
#pragma unroll
      for (int jp = 0; jp < 4; ++jp) {
        const int r = 16 * jp + row, chunk = 2 * kk + half;
        uint32_t m[4];
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                     : "=r"(m[0]), "=r"(m[1]), "=r"(m[2]), "=r"(m[3])
                     : "r"(base + r * 128 + ((chunk ^ (r & 7)) << 4)));
        b[2 * jp][0] = m[0];
        b[2 * jp][1] = m[1];
        b[2 * jp + 1][0] = m[2];
        b[2 * jp + 1][1] = m[3];
      }
#pragma unroll
      for (int s = 0; s < 2; ++s) {
        if (CONVERT) {
          const uint32_t q = word * (s + 1) + 4 * t + kk;
#pragma unroll
          for (int i = 0; i < 4; ++i) a[s][i] = mul2(sub2(and_or(q >> (4 * i), 0x000F000Fu, 0x64006400u), 0x64086408u),
                                                     0x2C002C00u);
        }
#pragma unroll
        for (int j = 0; j < 8; ++j) mma_m16n8k16(acc[s][j], a[s], b[j][0], b[j][1]);
      }
    }
  }
  float sum = 0.0f;
  for (int s = 0; s < 2; ++s)
    for (int j = 0; j < 8; ++j)
      for (int i = 0; i < 4; ++i) sum += acc[s][j][i];
  if (sum == 1234.5f) out[threadIdx.x] = sum;
}

template <bool CONVERT>
void run_mma_sync(const char* name, int sms, float* out) {
  time_and_print(name, probe_mma_sync<CONVERT>, 256, 1024 + 8192, 8 * 32, 64, 2, sms, out);  // 8 warps x 2 strips
}

template <int BLOCKS_PER_SM>
void run_converter_warpgroup(int sms, float* out) {
  time_and_print("SS m64n64k16 + converter WG", probe_converter_warpgroup<BLOCKS_PER_SM>, 384, 1024 + 3 * 8192, 128,
                 64, BLOCKS_PER_SM, sms, out);
}

int main() {
  int sms;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  float* out;
  cudaMalloc(&out, 4096);
  run<64, true, false, 2>("RS m64n64k16", sms, out);
  run<64, true, true, 2>("RS m64n64k16 + conversion", sms, out);
  run<64, true, false, 1>("RS m64n64k16", sms, out);
  run<64, true, true, 1>("RS m64n64k16 + conversion", sms, out);
  run<64, false, false, 2>("SS m64n64k16", sms, out);
  run<64, false, true, 2>("SS m64n64k16 + conversion beside", sms, out);
  run<128, true, false, 1>("RS m64n128k16", sms, out);
  run<128, true, true, 1>("RS m64n128k16 + conversion", sms, out);
  run_converter_warpgroup<1>(sms, out);
  run_converter_warpgroup<2>(sms, out);
  run_mma_sync<false>("mma.sync m16n8k16, 64 tokens", sms, out);
  run_mma_sync<true>("mma.sync m16n8k16 + conversion", sms, out);
  return 0;
}
