"""Probe the CUDA W4A16 kernel's speed: split-K / tile sweep against cuBLAS in the same dtype (do_bench medians,
or with --cuda-graph CUDA-graph medians with the weights rotated past L2, as benchmarks/bench_w4a16.py --cuda-graph).

    python scripts/probe_w4a16.py                 # the sweep table
    python scripts/probe_w4a16.py --case K N M TILE_M  # run one configuration 20 times (for ncu)
    python scripts/probe_w4a16.py --dtype bfloat16 --plain-bf16  # each variant also on the bf16 path
"""
import argparse
import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench

sys.path.insert(0, "benchmarks")
from common import copies_for, cycling, graph_us, warm_up_gpu  # noqa: E402
from quantkern import ops, reference  # noqa: E402
from quantkern.layout_cuda import w4a16_linear  # noqa: E402


def setup(k, n, dtype=torch.float16, group=128, symmetric=True):
    torch.manual_seed(0)
    w = torch.randn(n, k, device="cuda") / k ** 0.5
    qw = reference.quantize_weight(w, 4, group, symmetric=symmetric, scale_dtype=dtype)
    return w.to(dtype), qw, ops.prepare_weight_only(qw, dtype, backend="cuda")


def us(fn):
    return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", type=int, nargs=4)
    ap.add_argument("--shapes", default="4096x4096,4096x14336,14336x4096,8192x28672")
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--variants", default="0:0,16:0,1:0,1:1,1:2,1:4", help="tile_m:split_k pairs")
    ap.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16",
                    help="activations (and cuBLAS, the peer) in this dtype")
    ap.add_argument("--group", type=int, default=128, help="weight group size (-1: per channel)")
    ap.add_argument("--asym", action="store_true", help="asymmetric weights (zero points)")
    ap.add_argument("--plain-bf16", action="store_true",
                    help="bf16: time each variant also with scales_fit_fp16 off (the wgmma kernel's bf16 path, "
                         "not bf16 staged as fp16), cell 'plain'")
    ap.add_argument("--cuda-graph", action="store_true",
                    help="time CUDA-graph replays, weights rotated past the L2 (kernel time, no host time)")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.case:
        k, n, m, tm = args.case
        _, _, prep = setup(k, n, dtype, args.group, not args.asym)
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        for _ in range(20):
            w4a16_linear(x, prep.tensors, tile_m=tm)
        torch.cuda.synchronize()
        return
    warm_up_gpu()  # (as in the benchmarks: the first shape's rows are erratic on an idle GPU)
    rows = []
    for shape in args.shapes.split(","):
        k, n = map(int, shape.split("x"))
        if args.group > 0 and k % args.group:
            print(f"{shape}: skipped, group {args.group} does not divide K = {k}", flush=True)
            continue
        w16, qw, prep = setup(k, n, dtype, args.group, not args.asym)
        next_w16, next_prep = (lambda: w16), (lambda: prep.tensors)
        if args.cuda_graph:
            next_w16 = cycling([w16] + [w16.clone() for _ in range(copies_for(2 * n * k) - 1)])
            next_prep = cycling([prep.tensors] + [ops.prepare_weight_only(qw, dtype, backend="cuda").tensors
                                                  for _ in range(copies_for(n * k // 2) - 1)])
        timer = graph_us if args.cuda_graph else us
        deq = reference.dequantize_weight(qw)
        groups = k // args.group if args.group > 0 else 1
        wbytes = n * k / 2 + groups * n * 2 * (2 if args.asym else 1)  # codes, scales (and zeros)
        for m in map(int, args.batches.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            ref = x.float() @ deq.T
            t_cublas = timer(lambda: F.linear(x, next_w16()))
            cells = []
            paths = [("", lambda t: t)]
            if args.plain_bf16 and dtype == torch.bfloat16:
                paths.append((" plain", lambda t: dict(t, scales_fit_fp16=False)))
            for v in args.variants.split(","):
                tm, s = map(int, v.split(":"))
                for label, path in paths:
                    y = w4a16_linear(x, path(prep.tensors), split_k=s, tile_m=tm)
                    err = ((y.float() - ref).norm() / ref.norm()).item()
                    t = timer(lambda: w4a16_linear(x, path(next_prep()), split_k=s, tile_m=tm))
                    cells.append(f"{v}{label}:{t:.1f}us {t_cublas / t:.2f}x {wbytes / t / 1e3:.0f}GB/s"
                                 + ("" if err < 2e-3 else f" ERR {err:.1e}"))
            rows.append(f"{k}x{n} M={m} cublas {t_cublas:.1f}us | " + " | ".join(cells))
            print(rows[-1], flush=True)
    print()
    print("\n".join(rows))


if __name__ == "__main__":
    main()
