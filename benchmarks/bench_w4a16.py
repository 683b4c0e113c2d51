"""W4A16 linear: our CUDA and Triton kernels against peers in the same run.

Peers: cuBLAS through ``F.linear`` (fp16 and bf16 weights) and torch's built-in int4 kernel
(``torch.ops.aten._weight_int4pack_mm``, tinygemm, bf16 only, always with zero points). Group size 128
(64 where 128 does not divide K) and symmetric weights unless ``--group`` / ``--asymmetric`` say otherwise.
Each figure is the median of ``triton.testing.do_bench`` (L2 flushed before each call; a call whose
host time exceeds the flush is timed with that host time), or with ``--cuda-graph`` the median of CUDA-graph
replays (``do_bench_cudagraph``: no host time), every weight then rotated over copies that together
exceed the L2 cache so that each call streams its weights from memory. Speed-ups are over cuBLAS fp16.
In a graph the calls run back to back, and on sm_90 each small-M call of ours then starts in the previous
one's tail (programmatic dependent launch, csrc/w4a16_small_m.cu), as the q, k and v projections (or gate and
up) of a model do. ``--after-other-kernel`` puts a one-block elementwise kernel before every timed call of
every kernel instead, as where another op precedes the layer; the times then include it (its own time is
printed).
Before timing, every kernel's output is checked against the fp32 reference (relative error <= 2e-3).
The roofline columns count each kernel's bytes (weights, scales and zeros, x, y) against the device's 1 GiB
copy rate (read + written) measured in the same run: ``bw`` is the fraction of that rate a kernel moved, and
``ceiling`` the speed-up over cuBLAS fp16 that a kernel of ours moving its bytes at the full copy rate would
get. cuBLAS fp16 streams its weights at 0.8-0.97 of the copy rate on the large Llama shapes at M <= 64, on
the H200 and the H100 alike, so a 3.5x target asks ours for 3.5 / ceiling, 0.74-0.87 of the copy rate
(docs/PERF.md, sessions 14 and 15). Ours reaches more of it on the H100 (0.85-1.00 at M = 1 against 0.69-0.90
on the H200), whose slower memory asks fewer bytes per SM-cycle of kernels bound by issue and latency.

    python benchmarks/bench_w4a16.py --json out/bench_w4a16.json [--quick] [--shapes 4096x4096] [--backends cuda]
                                     [--cuda-graph] [--group 32] [--asymmetric]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from common import (W4A16_TARGETS, copies_for, copy_bandwidth_gbs, cycling, graph_us, median_us, print_table, verdict,
                    warm_up_gpu, write_json)
from quantkern import backends, ops, reference

# K x N of the real models' linear layers (Llama-3-8B/70B, Qwen2.5/3, SmolLM2).
SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192), (8192, 28672), (28672, 8192),
          (896, 4864), (4864, 896), (1024, 3072), (3072, 1024), (576, 1536), (1536, 576)]
QUICK_SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672)]
BATCHES = [1, 4, 16, 32, 64, 128, 512, 2048]
GROUP = 128  # the default; 64 where the group does not divide K (SmolLM2's 576)


def torch_int4_peer(w: torch.Tensor, group: int):
    """torch's tinygemm int4 kernel on the same weights (asymmetric-style scales/zeros in bf16)."""
    n, k = w.shape
    groups = w.float().reshape(n, k // group, group)
    wmin, wmax = groups.amin(-1), groups.amax(-1)
    scale = ((wmax - wmin) / 15).clamp(min=1e-6)
    codes = torch.clamp(torch.round((groups - wmin[..., None]) / scale[..., None]), 0, 15).to(torch.int32)
    codes = codes.reshape(n, k)
    packed = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)
    # tinygemm's inner k-tiles (2, 4 or 8) must divide K in steps of 16 (K = 576 takes 4).
    inner_k_tiles = next(t for t in (8, 4, 2) if k % (16 * t) == 0)
    weight = torch.ops.aten._convert_weight_to_int4pack(packed, inner_k_tiles)
    # tinygemm dequantizes (code - 8) * scale + zero, with zero = min + 8 * scale.
    zeros = wmin + 8 * scale
    scales_and_zeros = torch.stack([scale.T, zeros.T], dim=-1).to(torch.bfloat16).contiguous()
    dequant = ((codes.float().reshape(n, k // group, group) - 8) * scale[..., None] + zeros[..., None]).reshape(n, k)
    return (lambda x: torch.ops.aten._weight_int4pack_mm(x, weight, group, scales_and_zeros)), dequant


def bytes_moved(m: int, k: int, n: int, weight_bytes: float) -> float:
    """A linear's bytes: its weights (with scales and zeros), x read and y written, 16-bit activations."""
    return weight_bytes + 2 * m * k + 2 * m * n


def int4_weight_bytes(k: int, n: int, group: int, asymmetric: bool) -> float:
    """Packed int4 codes plus 16-bit scales (and zeros) of one group each."""
    return n * k / 2 + (2 if asymmetric else 1) * 2 * n * (k // group)


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--quick", action="store_true", help="the four Llama shapes only")
    parser.add_argument("--batches", type=int, nargs="+", default=BATCHES)
    parser.add_argument("--shapes", nargs="+", metavar="KxN", help="these K x N shapes (default: all, or --quick's)")
    parser.add_argument("--backends", nargs="+", choices=["cuda", "triton"], default=["cuda", "triton"],
                        help="our backends to time (where available)")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="time CUDA-graph replays, weights rotated past the L2 (kernel time, no host time)")
    parser.add_argument("--group", type=int, choices=[32, 64, 128], default=GROUP,
                        help="weight group size (the torch int4 peer uses the same)")
    parser.add_argument("--asymmetric", action="store_true", help="our weights with zero points")
    parser.add_argument("--after-other-kernel", action="store_true",
                        help="with --cuda-graph: a one-block elementwise kernel before every timed call")
    args = parser.parse_args()
    if args.after_other_kernel and not args.cuda_graph:
        parser.error("--after-other-kernel needs --cuda-graph")
    ours = [b for b in args.backends if "weight_only_linear" in backends.status(b).kernels]
    if not ours:
        reasons = "; ".join(backends.status(b).reason for b in ("cuda", "triton"))
        raise SystemExit("no W4A16 kernel is available: " + reasons)

    if args.shapes:
        shapes = [tuple(int(v) for v in shape.lower().split("x")) for shape in args.shapes]
    else:
        shapes = QUICK_SHAPES if args.quick else SHAPES

    warm_up_gpu()
    copy_gbs = copy_bandwidth_gbs()
    other = torch.zeros(256, device="cuda")
    other_us = graph_us(lambda: other.add_(1.0)) if args.after_other_kernel else 0.0

    def timed(fn):  # CUDA-graph median of fn, after the other kernel when asked
        return graph_us((lambda: (other.add_(1.0), fn())) if args.after_other_kernel else fn)

    results, table = [], []
    for k, n in shapes:
        torch.manual_seed(0)
        w = torch.randn(n, k, device="cuda") / k ** 0.5
        w16, wbf = w.half(), w.bfloat16()
        group = args.group if k % args.group == 0 else 64
        qw = reference.quantize_weight(w, 4, group, symmetric=not args.asymmetric, scale_dtype=torch.float16)
        prepared = {b: ops.prepare_weight_only(qw, torch.float16, backend=b) for b in ours}
        dequant = reference.dequantize_weight(qw)
        int4_peer, int4_dequant = torch_int4_peer(w, group)
        if args.cuda_graph:
            # Copies of every weight (fp16 copies: 2 bytes per element; int4: about half a byte).
            fp_copies, int_copies = copies_for(2 * n * k), copies_for(n * k // 2)
            next_w16 = cycling([w16] + [w16.clone() for _ in range(fp_copies - 1)])
            next_wbf = cycling([wbf] + [wbf.clone() for _ in range(fp_copies - 1)])
            next_int4 = cycling([int4_peer] + [torch_int4_peer(w, group)[0] for _ in range(int_copies - 1)])
            next_prepared = {b: cycling([prepared[b]] + [ops.prepare_weight_only(qw, torch.float16, backend=b)
                                                         for _ in range(int_copies - 1)]) for b in ours}
        for m in args.batches:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            xb = x.bfloat16()
            ref = x.float() @ dequant.T
            errors = {b: relative_error(ops.weight_only_linear(x, prepared[b]), ref) for b in ours}
            bad = {b: e for b, e in errors.items() if e > 2e-3}
            if bad:
                raise SystemExit(f"wrong results at M={m}, K={k}, N={n}: relative errors {bad}")
            # The peer is checked too, so that a mis-set-up peer is not timed (reported, not fatal).
            errors["torch_int4"] = relative_error(int4_peer(xb), xb.float() @ int4_dequant.T)
            if errors["torch_int4"] > 1e-2:
                print(f"warning: torch int4 peer relative error {errors['torch_int4']:.2e} at M={m}, {k}x{n}")
            if args.cuda_graph:
                times = {
                    "cublas_fp16": timed(lambda: F.linear(x, next_w16())),
                    "cublas_bf16": timed(lambda: F.linear(xb, next_wbf())),
                    "torch_int4": timed(lambda: next_int4()(xb)),
                }
                for b in ours:
                    times[b] = timed(lambda: ops.weight_only_linear(x, next_prepared[b]()))
            else:
                times = {
                    "cublas_fp16": median_us(lambda: F.linear(x, w16)),
                    "cublas_bf16": median_us(lambda: F.linear(xb, wbf)),
                    "torch_int4": median_us(lambda: int4_peer(xb)),
                }
                for b in ours:
                    times[b] = median_us(lambda: ops.weight_only_linear(x, prepared[b]))
            speedup = {name: times["cublas_fp16"] / t for name, t in times.items()}
            ours_bytes = bytes_moved(m, k, n, int4_weight_bytes(k, n, group, args.asymmetric))
            nbytes = {"cublas_fp16": bytes_moved(m, k, n, 2 * n * k), "ours": ours_bytes}
            bandwidth = {name: nbytes["cublas_fp16" if name.startswith("cublas") else "ours"] / (t * 1e3) / copy_gbs
                         for name, t in times.items() if name != "torch_int4"}
            ceiling = times["cublas_fp16"] / (ours_bytes / (copy_gbs * 1e3))
            results.append({"m": m, "k": k, "n": n, "group_size": group, "time_us": times,
                            "speedup_vs_cublas_fp16": speedup, "relative_error": errors, "bytes": nbytes,
                            "fraction_of_copy_bandwidth": bandwidth, "ceiling_speedup_at_copy_bandwidth": ceiling})
            target = verdict(speedup["cuda"], W4A16_TARGETS[m]) if "cuda" in ours and m in W4A16_TARGETS else ""
            table.append([f"{k}x{n}" + ("" if group == args.group else f" g{group}"), m, f"{times['cublas_fp16']:.1f}"]
                         + [f"{times[b]:.1f} ({speedup[b]:.2f}x)" for b in ours]
                         + [f"{speedup['torch_int4']:.2f}x", f"{speedup['cublas_bf16']:.2f}x",
                            " / ".join(f"{bandwidth[name]:.2f}" for name in ["cublas_fp16"] + ours), f"{ceiling:.2f}x",
                            target])
    if args.json:
        timing = ("do_bench_cudagraph median, weights rotated past L2" if args.cuda_graph
                  else "do_bench median, L2 flushed before each call")
        if args.after_other_kernel:
            timing += f", each call after a one-block elementwise kernel ({other_us:.2f} us alone), included"
        write_json(args.json, results, {"group_size": args.group, "symmetric": not args.asymmetric, "timing": timing,
                                        "copy_bandwidth_1GiB_gbs": copy_gbs})
    print(f"\nW4A16 linear, fp16 activations, group {args.group} (g64: group 64), "
          + ("with zero points" if args.asymmetric else "symmetric")
          + ": microseconds (speed-up over cuBLAS fp16)" + (", CUDA-graph replays" if args.cuda_graph else "")
          + (f", each call after a one-block elementwise kernel ({other_us:.1f} us alone, included)"
             if args.after_other_kernel else "")
          + f"; bw: fraction of the 1 GiB copy rate ({copy_gbs:.0f} GB/s) moved by cuBLAS fp16 / ours; ceiling: our "
          f"speed-up at that rate")
    print_table(table, ["KxN", "M", "cublas_fp16"] + ours + ["torch_int4", "cublas_bf16", "bw: " + " / ".join(
        ["cublas"] + ours), "ceiling", "cuda: target (issue 3)"])


if __name__ == "__main__":
    main()
