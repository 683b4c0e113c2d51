"""Integer-activation linear layers (W4A4, W8A8): our CUDA and Triton kernels against peers in the same run.

Every figure is a whole linear layer from bf16 activations to bf16 outputs, activation quantization included:
  w4a4 / w8a8         ours, CUDA: quantize_per_token kernel + int_gemm (fused scale epilogue)
  w4a4_tr / w8a8_tr   ours, Triton: the same quantizer kernel + the Triton int_gemm
  bf16                cuBLAS ``F.linear`` in bf16 (no quantization at all)
  int_mm              ``torch._int_mm`` (cuBLASLt int8) + our quantize_per_token kernel for its activations
                      + the scale epilogue in torch (``(acc.float() * sx[:, None] * sw).to(bf16)``):
                      the W8A8 a user assembles from torch's own int8 GEMM
Timing: CUDA-graph replays (``triton.testing.do_bench_cudagraph``, median), so launch overhead is not
measured (the ops are CUDA-graph and torch.compile friendly); each variant, the Triton rows included, cycles
through enough copies of its weight (>= 200 MB together) that the weights come from HBM, not from the 50 MB L2.
Ratios are peer time / our time (> 1: ours faster). Correctness is checked against the reference before timing,
at every M up to 2048 (the reference runs int_matmul in float64), for our CUDA and Triton rows (fatal) and the
torch._int_mm peer (a warning).

    python benchmarks/bench_int_gemm.py --json out/bench_int_gemm.json [--quick] [--all-shapes]

``--rotated``: layers with an online Hadamard rotation of their input (QuaRot's down_proj and o_proj:
``QuantLinear(input_rotation="hadamard")``), through ``ops.quantized_activation_linear(..., input_rotation=
"hadamard")`` (the fused ``hadamard_quantize`` where the GEMM takes packed codes) against the same layer with
the rotation and the quantization as two CUDA kernels, and against cuBLAS bf16 without any rotation.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
import torch.nn.functional as F

from common import copies_for, cycling, graph_us, int_linear_verdicts, print_table, warm_up_gpu, write_json
from quantkern import backends, ops, reference
from quantkern.layout_int import activations_packed, int_gemm_cuda

SHAPES = [(8192, 8192), (8192, 28672)]  # K x N
MORE_SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]
MS = [1, 16, 128, 512, 2048, 8192]


def sweep(shapes, small_only: bool = False) -> None:
    """GEMM alone (activations quantized beforehand), per tile config and split, for choosing the plan."""
    rows = []
    for k, n in shapes:
        w = torch.randn(n, k, device="cuda") / k ** 0.5
        for bits in (4, 8):
            qw = reference.quantize_weight(w, bits, -1, scale_dtype=torch.bfloat16)
            p = ops.prepare_int_weight(qw, bits, torch.bfloat16, backend="cuda").tensors
            ps = [p] + [dict(p, w=p["w"].clone()) for _ in range(copies_for(p["w"].numel()) - 1)]
            # configs 6 and 7: the sm_90 wgmma kernel (128 / 256 tokens); 8: the sm_90 few-token kernel
            # (split = blocks of a cluster); split 0: the automatic split
            hopper = torch.cuda.get_device_capability() == (9, 0)
            few = [(8, 0), (8, 1), (8, 2), (8, 4), (8, 8)] if hopper else []
            for m, cands in ((1, [(1, 1), (1, 2), (1, 4), (1, 8), (2, 1)] + few),
                             (16, [(1, 1), (1, 2), (1, 4), (2, 1)] + few),
                             (32, [(1, 0), (2, 0)] + few),
                             (64, [(2, 0), (3, 0)] + ([(6, 1)] if hopper else [])),
                             (128, [(2, 0), (3, 0)] + ([(6, 1), (6, 2), (6, 4)] if hopper else [])),
                             (512, [(3, 0), (4, 0)] + ([(6, 1), (7, 1), (7, 2)] if hopper else [])),
                             (2048, [(3, 1), (4, 1), (5, 1)] + ([(6, 0), (7, 0)] if hopper else [])),
                             (8192, [(3, 1), (4, 1), (5, 1)] + ([(7, 0)] if hopper else []))):
                if small_only and m > 32:
                    continue
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                # (W4A4 on sm_90: the few-token kernel takes packed int4 codes, the other kernels one per byte)
                packed = activations_packed(p, m)
                tq = graph_us(lambda: torch.ops.quantkern.quantize_per_token(x, bits, 1.0, packed))
                for config, split in cands:
                    q, sx = torch.ops.quantkern.quantize_per_token(x, bits, 1.0, packed and config in (0, 8))
                    nxt = cycling(ps)
                    t = graph_us(lambda: int_gemm_cuda(q, sx, nxt(), None, torch.bfloat16, split, config))
                    tops = 2 * m * n * k / (t * 1e-6) / 1e12
                    gbs = p["w"].numel() / (t * 1e-6) / 1e9
                    rows.append([f"{k}x{n}", f"W{bits}A{bits}", m, config, split, f"{t:.1f}", f"{tops:.0f}",
                                 f"{gbs:.0f}", f"{tq:.1f}"])
                    print(rows[-1], flush=True)
    print()
    print_table(rows, ["KxN", "mode", "M", "config", "split", "gemm_us", "TOPS", "weight_GB/s", "quant_us"])


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


def triton_weight_copies(prepared):
    """``prepared`` and clones of its packed weight, enough to rotate past the L2 (common.copies_for)."""
    w = prepared.tensors["w"]
    return [prepared] + [dataclasses.replace(prepared, tensors=dict(prepared.tensors, w=w.clone()))
                         for _ in range(copies_for(w.numel() * w.element_size()) - 1)]


ROTATED_SHAPES = [(4096, 4096), (14336, 4096), (8192, 8192)]  # K x N: Llama-3-8B o_proj, down_proj; 70B o_proj


def rotated(shapes, ms, json_path=None) -> None:
    """Rotated integer linears: the layer's own path (fused rotation + quantization) against two kernels."""
    dtype = torch.bfloat16
    results, table = [], []
    for k, n in shapes:
        w = torch.randn(n, k, device="cuda", dtype=dtype) / k ** 0.5
        ws_bf16 = cycling([w] + [w.clone() for _ in range(copies_for(w.numel() * 2) - 1)])
        for bits, act_bits in ((4, 4), (4, 8), (8, 8)):
            qw = reference.quantize_weight(reference.hadamard(w.float()), bits, -1, scale_dtype=dtype)
            prepared = ops.prepare_int_weight(qw, act_bits, dtype, backend="cuda")
            copies = copies_for(n * k * bits // 8)
            preps = [prepared] + [dataclasses.replace(prepared, tensors=dict(prepared.tensors,
                                                                              w=prepared.tensors["w"].clone()))
                                  for _ in range(copies - 1)]
            nxt_fused, nxt_two = cycling(preps), cycling(preps)
            for m in ms:
                packed = activations_packed(prepared.tensors, m)
                x = torch.randn(m, k, device="cuda", dtype=dtype)
                exact = None
                if m in (1, 16, 2048):  # correctness first (the reference runs int_matmul in float64)
                    # The GEMM on the fused pass's codes, bit for bit (the codes themselves are checked against
                    # the two-call reference in tests/test_hadamard_kernels.py: a code can flip by one at a
                    # rounding boundary, which moves y by more than a relative tolerance could say).
                    y = ops.quantized_activation_linear(x, prepared, act_bits, input_rotation="hadamard")
                    q, sx = ops.hadamard_quantize(x, act_bits)
                    codes = reference.unpack_int4_signed(q) if act_bits == 4 else q
                    exact = torch.equal(y, reference.linear_from_activation_codes(codes, sx, qw, None, dtype))
                    if not exact:
                        print(f"MISMATCH: rotated W{bits}A{act_bits} at M={m} {k}x{n} differs from the reference "
                              f"GEMM on its own activation codes", flush=True)

                def two_kernels():
                    p = nxt_two()
                    q, sx = torch.ops.quantkern.quantize_per_token(torch.ops.quantkern.hadamard(x, 0), act_bits, 1.0,
                                                                    packed)
                    return int_gemm_cuda(q, sx, p.tensors, None, dtype)

                times = {
                    "layer": graph_us(lambda: ops.quantized_activation_linear(x, nxt_fused(), act_bits,
                                                                              input_rotation="hadamard")),
                    "two_kernels": graph_us(two_kernels),
                    "bf16": graph_us(lambda: F.linear(x, ws_bf16())),
                }
                mode = f"W{bits}A{act_bits}"
                results.append({"M": m, "K": k, "N": n, "mode": mode, "rotated": True, "fused": True, "exact": exact,
                                "dtype": "bfloat16", "time_us": times, "weight_copies": copies})
                table.append([f"{k}x{n}", mode, m, "fused" if packed else "fused (int4 codes one per byte)",
                              f"{times['layer']:.1f}", f"{times['two_kernels']:.1f}", f"{times['bf16']:.1f}",
                              f"{times['two_kernels'] / times['layer']:.2f}x",
                              f"{times['bf16'] / times['layer']:.2f}x", {None: "-", True: "yes", False: "NO"}[exact]])
                print(table[-1], flush=True)
    if json_path:
        write_json(json_path, results, {"timing": "do_bench_cudagraph median, weights rotated past L2",
                                        "what": "rotated integer linears (online Hadamard of the input)"})
    print("\nrotated integer linear (online Hadamard, activation quantization included), bf16, per-channel; "
          "us, CUDA graphs")
    print_table(table, ["KxN", "mode", "M", "layer path", "layer", "two kernels", "bf16 (no rotation)",
                        "two/layer", "bf16/layer", "exact"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--quick", action="store_true", help="M in {1, 16, 2048, 8192} only")
    parser.add_argument("--all-shapes", action="store_true", help="also 4096x4096, 4096x14336, 14336x4096")
    parser.add_argument("--no-triton", action="store_true")
    parser.add_argument("--ms", help="comma-separated M values (default: all of " + ",".join(map(str, MS)) + ")")
    parser.add_argument("--sweep", action="store_true", help="time the CUDA GEMM alone per (config, split_k)")
    parser.add_argument("--sweep-small", action="store_true", help="the sweep for M <= 32 only")
    parser.add_argument("--rotated", action="store_true",
                        help="layers with an online Hadamard rotation of their input (fused with the quantization)")
    args = parser.parse_args()
    if "w4a4_linear" not in backends.status("cuda").kernels:
        raise SystemExit(f"the CUDA int_gemm is missing: {backends.status('cuda').reason}")
    shapes = SHAPES + (MORE_SHAPES if args.all_shapes else [])
    warm_up_gpu()  # (as bench_w4a16.py: an idle GPU's first rows come out erratic, benchmarks/common.py)
    if args.sweep or args.sweep_small:
        return sweep(shapes, small_only=args.sweep_small)
    dtype = torch.bfloat16
    ms = [int(m) for m in args.ms.split(",")] if args.ms else ([1, 16, 2048, 8192] if args.quick else MS)
    if args.rotated:
        return rotated(ROTATED_SHAPES, ms, args.json)
    torch.manual_seed(0)
    results, table = [], []
    for k, n in shapes:
        w = torch.randn(n, k, device="cuda", dtype=dtype) / k ** 0.5
        qw4 = reference.quantize_weight(w, 4, -1, scale_dtype=dtype)
        qw8 = reference.quantize_weight(w, 8, -1, scale_dtype=dtype)
        ws_bf16 = [w] + [w.clone() for _ in range(copies_for(w.numel() * 2) - 1)]
        p4 = ops.prepare_int_weight(qw4, 4, dtype, backend="cuda")
        p8 = ops.prepare_int_weight(qw8, 8, dtype, backend="cuda")
        p4s = [p4.tensors] + [dict(p4.tensors, w=p4.tensors["w"].clone()) for _ in range(copies_for(n * k // 2) - 1)]
        p8s = [p8.tensors] + [dict(p8.tensors, w=p8.tensors["w"].clone()) for _ in range(copies_for(n * k) - 1)]
        t4 = t8 = None
        if not args.no_triton:
            t4 = ops.prepare_int_weight(qw4, 4, dtype, backend="triton")
            t8 = ops.prepare_int_weight(qw8, 8, dtype, backend="triton")
            # rotated past the L2 like the CUDA rows' weights (one copy left 8192x8192's int4 weights in the L2)
            t4s, t8s = triton_weight_copies(t4), triton_weight_copies(t8)
        # torch._int_mm takes B as [K, N] (a column-major view of a row-major int8 [N, K] suits cuBLASLt).
        w8_rows = reference.signed_weight_values(qw8)
        w8_views = [w8_rows.t()] + [w8_rows.clone().t() for _ in range(copies_for(n * k) - 1)]
        sw8 = p8.tensors["w_scale"][0]  # per-channel fp32 [N]
        del w
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            nw4, nw8, nbf = cycling(p4s), cycling(p8s), cycling(ws_bf16)
            nw8v = cycling(w8_views)

            def ours(bits, nxt):
                prepared = nxt()
                q, sx = torch.ops.quantkern.quantize_per_token(x, bits, 1.0, activations_packed(prepared, m))
                return int_gemm_cuda(q, sx, prepared, None, dtype)

            def int_mm_peer():
                q, sx = torch.ops.quantkern.quantize_per_token(x, 8, 1.0)
                acc = torch._int_mm(q, nw8v())
                return (acc.float() * sx[:, None] * sw8[None, :]).to(dtype)

            # Correctness first, at every M up to 2048 (the reference runs int_matmul in float64): M = 1 and the
            # middle M take other kernels and configs than 16 and 2048, which alone were checked before.
            if m <= 2048:
                for bits, prep, tprep, qw in ((4, p4, t4, qw4), (8, p8, t8, qw8)):
                    ref = reference.quantized_activation_linear(x, qw, bits)
                    # (Triton: tests/test_int_gemm.py's bound for bf16 outputs)
                    for label, prepared, bound in (("CUDA", prep, 1e-3), ("Triton", tprep, 8e-3)):
                        if prepared is None:
                            continue
                        err = relative_error(ops.quantized_activation_linear(x, prepared, bits), ref)
                        if err > bound:
                            raise SystemExit(f"{label} W{bits}A{bits} disagrees with the reference at M={m} "
                                             f"{k}x{n}: {err:.2e}")
                    if bits == 8:  # the peer, so that a mis-set-up peer is not timed unnoticed (not fatal)
                        try:
                            err = relative_error(int_mm_peer(), ref)
                        except RuntimeError:
                            err = None  # (torch._int_mm refuses some small M: said below)
                        if err is not None and err > 8e-3:
                            print(f"warning: the torch._int_mm peer's relative error is {err:.2e} at M={m} {k}x{n}")
            times = {
                "w4a4": graph_us(lambda: ours(4, nw4)),
                "w8a8": graph_us(lambda: ours(8, nw8)),
                "bf16": graph_us(lambda: F.linear(x, nbf())),
            }
            try:
                times["int_mm"] = graph_us(int_mm_peer)
            except RuntimeError as error:  # torch._int_mm refuses some small M
                times["int_mm"] = None
                print(f"torch._int_mm at M={m}: {str(error).splitlines()[0]}")
            if not args.no_triton:
                nt4, nt8 = cycling(t4s), cycling(t8s)
                times["w4a4_tr"] = graph_us(lambda: ops.w4a4_linear(x, nt4()))
                times["w8a8_tr"] = graph_us(lambda: ops.w8a8_linear(x, nt8()))
            tops = {name: (2 * m * n * k / (t * 1e-6) / 1e12 if t else None) for name, t in times.items()}
            copies = {"w4a4": len(p4s), "w8a8": len(p8s), "bf16": len(ws_bf16), "int_mm": len(w8_views)}
            if not args.no_triton:
                copies.update(w4a4_tr=len(t4s), w8a8_tr=len(t8s))
            results.append({"M": m, "K": k, "N": n, "dtype": "bfloat16", "time_us": times, "tops": tops,
                            "weight_copies": copies, "checked": m <= 2048})

            def ratio(peer, ours_name):
                return f"{times[peer] / times[ours_name]:.2f}x" if times.get(peer) else "-"
            table.append([f"{k}x{n}", m, f"{times['w4a4']:.1f}", f"{times['w8a8']:.1f}", f"{times['bf16']:.1f}",
                          f"{times['int_mm']:.1f}" if times["int_mm"] else "-",
                          f"{times['w4a4_tr']:.1f}" if "w4a4_tr" in times else "-",
                          f"{times['w8a8_tr']:.1f}" if "w8a8_tr" in times else "-",
                          f"{tops['w4a4']:.0f}", ratio("bf16", "w4a4"), ratio("int_mm", "w4a4"),
                          ratio("bf16", "w8a8"), ratio("int_mm", "w8a8"), int_linear_verdicts(m, times)])
            print(table[-1], flush=True)
    if args.json:
        write_json(args.json, results, {"timing": "do_bench_cudagraph median, weights rotated past L2"})
    print("\ninteger linear (activation quantization included), bf16 in/out, per-channel weights; us, CUDA graphs")
    print_table(table, ["KxN", "M", "w4a4", "w8a8", "bf16", "int_mm+q", "w4a4_tr", "w8a8_tr", "w4a4_TOPS",
                        "bf16/w4a4", "intmm/w4a4", "bf16/w8a8", "intmm/w8a8", "targets (issue 5)"])


if __name__ == "__main__":
    main()
