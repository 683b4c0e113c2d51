"""Where the Triton W4A16 path's time goes: do_bench (L2 flushed; counts host time when it exceeds the
flush), one CUDA-graph replay (weights not rotated: shapes under the L2 size stay resident), and host
time per call in a loop; then every "small" config forced, timed by graph replay.

    python scripts/probe_triton_w4a16.py      (a CUDA GPU; the CUDA extension is not needed)
"""
import sys
import time

import torch
from triton.testing import do_bench, do_bench_cudagraph
sys.path.insert(0, "benchmarks")
from common import warm_up_gpu
from quantkern import ops, reference
from quantkern.triton_kernels import w4a16 as tw
warm_up_gpu()
for k, n in [(4096, 4096), (4096, 14336), (8192, 28672)]:
    torch.manual_seed(0)
    w = torch.randn(n, k, device="cuda") / k ** 0.5
    qw = reference.quantize_weight(w, 4, 128, symmetric=True, scale_dtype=torch.float16)
    p = ops.prepare_weight_only(qw, torch.float16, backend="triton")
    for m in (1, 4, 16, 64):
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        f = lambda: ops.weight_only_linear(x, p)
        f(); torch.cuda.synchronize()
        a = do_bench(f, warmup=25, rep=100, return_mode="median") * 1e3
        g = do_bench_cudagraph(f, rep=100, return_mode="median") * 1e3
        torch.cuda.synchronize(); t0 = time.perf_counter()
        for _ in range(200): f()
        t1 = time.perf_counter(); torch.cuda.synchronize()
        at = tw._AUTOTUNED["small" if m <= tw.SMALL_M else "large"]
        cfg = at.best_config
        cpu = (t1 - t0) / 200 * 1e6
        print(f"{k}x{n} M={m}: do_bench {a:.1f} us | cudagraph {g:.1f} us | cpu/call {cpu:.1f} us | "
              f"{cfg.kwargs} w{cfg.num_warps} s{cfg.num_stages}", flush=True)
print("## each small config (BLOCK_M/BLOCK_N/BLOCK_K/split: us per CUDA-graph replay), M = 1 and 16", flush=True)
for k, n in [(4096, 4096), (8192, 28672)]:
    torch.manual_seed(0)
    w = torch.randn(n, k, device="cuda") / k ** 0.5
    qw = reference.quantize_weight(w, 4, 128, symmetric=True, scale_dtype=torch.float16)
    t = tw.prepare_w4a16(qw, torch.float16)
    for m in (1, 16):
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        cells = []
        for cfg in tw.CONFIGS["small"]:
            f = lambda: tw._launch(x, t["qweight"], t["scales"], None, None, 128, k, config=cfg)
            f(); torch.cuda.synchronize()
            g = do_bench_cudagraph(f, rep=50, return_mode="median") * 1e3
            cells.append(f"{cfg['BLOCK_M']}/{cfg['BLOCK_N']}/{cfg['BLOCK_K']}/s{cfg['SPLIT_K']}:{g:.1f}")
        print(f"{k}x{n} M={m}: " + " ".join(cells), flush=True)
