"""Where the Triton W4A16 path's time goes: do_bench (L2 flushed; counts host time when it exceeds the
flush), one CUDA-graph replay (weights not rotated: shapes under the L2 size stay resident), and host
time per call in a loop; then every "small" config forced, timed by graph replay. ``--host``: only the
host time per call of each layer of the eager path, one inside the other (4096 x 4096, M = 1).

    python scripts/probe_triton_w4a16.py [--host]    (a CUDA GPU; the CUDA extension is not needed)
"""
import argparse
import sys
import time

import torch
import triton
from triton.testing import do_bench, do_bench_cudagraph
sys.path.insert(0, "benchmarks")
from common import warm_up_gpu
from quantkern import ops, reference
from quantkern.triton_kernels import w4a16 as tw
from quantkern.triton_kernels._host import _traced


def host_times(rows, calls=300, rounds=7):
    """Host microseconds per call of each ``(name, f)`` in ``rows``: loops of ``calls`` calls, the rows taken
    in turn for ``rounds`` rounds (so that a slow spell of the machine hits every row), best round kept."""
    for _, f in rows:
        for _ in range(20):
            f()
    torch.cuda.synchronize()
    best = {name: float("inf") for name, _ in rows}
    for _ in range(rounds):
        for name, f in rows:
            t0 = time.perf_counter()
            for _ in range(calls):
                f()
            best[name] = min(best[name], (time.perf_counter() - t0) / calls * 1e6)
            torch.cuda.synchronize()
    return best


def host_layers():
    k = n = 4096
    torch.manual_seed(0)
    qw = reference.quantize_weight(torch.randn(n, k, device="cuda") / 64, 4, 128, symmetric=True,
                                   scale_dtype=torch.float16)
    p = ops.prepare_weight_only(qw, torch.float16, backend="triton")
    t = p.tensors
    x = torch.randn(1, k, device="cuda", dtype=torch.float16)
    op_args = (x, t["qweight"], t["scales"], None, None, 128, k, t["locks"])
    ops.weight_only_linear(x, p)  # autotunes
    torch.cuda.synchronize()
    key = next(key for key in tw._TUNED_CONFIGS if key[1:3] == (n, k))
    tuned = tw._TUNED_CONFIGS[key]
    y = torch.empty((1, n), dtype=torch.float16, device="cuda")
    partials = torch.empty((tw.MAX_SPLIT_K, 1, n), dtype=torch.float32, device="cuda")
    args = (x, t["qweight"], t["scales"], t["scales"], t["scales"], y, partials, t["locks"], 1, n, k, k, n, n, 128, 16)
    flags = dict(HAS_ZEROS=False, HAS_BIAS=False, SCALE_MODE=tw.IN_TILE, DOT_IN_FP32=False)
    grid = (triton.cdiv(1, tuned["BLOCK_M"]) * triton.cdiv(n, tuned["BLOCK_N"]), tuned["SPLIT_K"])
    autotuner = tw._AUTOTUNED["small"]
    rows = [
        ("ops.weight_only_linear (public op)", lambda: ops.weight_only_linear(x, p)),
        ("through the custom op (dispatcher)", lambda: tw._w4a16_gemm_op.op(*op_args)),
        ("direct call (what eager runs)", lambda: tw._w4a16_gemm_op(*op_args)),
        ("its tracing check (_host._traced)", lambda: _traced(op_args)),
        ("_launch", lambda: tw._launch(*op_args)),
        ("autotuner, grid function", lambda: autotuner[lambda meta: grid](*args, **flags)),
        ("kernel, tuned config, grid tuple", lambda: tw._w4a16_kernel[grid](*args, **flags, **tuned, EVEN_K=True)),
        ("torch.zeros fp32 + .to(fp16) (old split-K)", lambda: torch.zeros((1, n), dtype=torch.float32, device="cuda").half()),
        ("torch.empty", lambda: torch.empty((1, n), dtype=torch.float32, device="cuda")),
    ]
    try:  # the CUDA extension's path, for scale, where it is built
        p_cuda = ops.prepare_weight_only(qw, torch.float16, backend="cuda")
        rows.append(("ops.weight_only_linear, CUDA backend", lambda: ops.weight_only_linear(x, p_cuda)))
    except Exception as error:  # noqa: BLE001 (any reason: say it and go on)
        print(f"(no CUDA-backend row: {error})")
    print(f"host time per call, 4096 x 4096, M = 1, fp16 group 128 (config {tuned})")
    for name, us in host_times(rows).items():
        print(f"{name:44s} {us:7.1f} us", flush=True)


parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--host", action="store_true", help="only the host time of each layer of the eager path")
cli = parser.parse_args()
warm_up_gpu()
if cli.host:
    host_layers()
    sys.exit(0)
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
            f = lambda: tw._launch(x, t["qweight"], t["scales"], None, None, 128, k, t["locks"], config=cfg)
            f(); torch.cuda.synchronize()
            g = do_bench_cudagraph(f, rep=50, return_mode="median") * 1e3
            cells.append(f"{cfg['BLOCK_M']}/{cfg['BLOCK_N']}/{cfg['BLOCK_K']}/s{cfg['SPLIT_K']}:{g:.1f}")
        print(f"{k}x{n} M={m}: " + " ".join(cells), flush=True)
