"""Online Hadamard rotation: our CUDA kernels against peers in the same run.

Ours: ``hadamard`` (rotation alone, fp16 out) and ``hadamard_quantize`` (rotation + per-token int4 in one
pass), called as the extension's ops (torch.ops.quantkern.*), and the Triton versions.
Peers, same inputs, same run:
  * ``fht``: Dao-AILab ``fast_hadamard_transform.hadamard_transform`` (``_28N`` for 14336 = 28 x 512; its
    28 x 28 matrix is its own table, the timing is what matters; at powers of two, Sylvester's matrix as ours,
    its output is checked against ours before timing, a warning if off), when importable. The GPU machine has no
    package registry: scripts/gpu_check.sh (QUANTKERN_BENCH=hadamard, carry ``.peers``) builds it from its
    sources in the git-ignored ``.peers/fast-hadamard-transform`` (a copy of the GitHub repository at v1.1.0,
    setup.py cut to sm_90: the PyPI sdist, also there, carries no csrc); without it this peer is skipped and
    the JSON says so.
  * ``fht+quant``: fht, then our ``quantize_per_token`` (QuaRot's path: two passes over the activations).
  * ``two_pass``: our ``hadamard`` then our ``quantize_per_token``.
  * ``had_b_rows`` (blocked sizes): our whole-row ``hadamard`` on the ``[rows * n / b, b]`` view, the same
    transform, to see whether blocked mode should run that way (H100, docs/PERF.md session 17: no; 0.14-0.17 of
    a same-bytes copy at 4864 in blocks of 256, against the blocked kernel's 0.36-0.42).
  * ``matmul``: ``x @ (H / sqrt(n))`` with the dense fp16 matrix (cuBLAS).
  * ``copy``: a device-to-device copy of the SAME number of bytes as the measured op moves (so launch and
    tail effects at these sizes count against the copy too), plus the 1 GiB copy rate for reference.
Sizes: 4096, 8192, 14336, 16384 (the targets), 576 = 36 x 16 (SmolLM2), and 4864 = 19 x 256, which has no
Hadamard matrix: it runs in blocked mode (block 256), and the peers on the same 256-blocks.
Figures: GB/s counting bytes read + written (x read once; y or q + scales written once) and the fraction
of the same-bytes copy. Timing: triton.testing.do_bench medians (L2 flushed between repetitions). Before
timing, our CUDA and Triton ops are checked against the reference.

    python benchmarks/bench_hadamard.py --json out/bench_hadamard.json   (--no-triton: skip the Triton timings,
    whose per-shape compilations take minutes on the GPU machine)
"""

from __future__ import annotations

import argparse
import math

import torch

from common import HADAMARD_QUANTIZE_TARGET, copy_bandwidth_gbs, median_us, print_table, warm_up_gpu, write_json
from quantkern import backends, ops, reference
from quantkern.format import unpack_int4_signed
from quantkern.rotation import hadamard_matrix

SIZES = [4096, 8192, 14336, 16384, 576, 4864]
BLOCKS = {4864: 256}  # sizes with no Hadamard matrix: blocked mode
ROWS = [2048, 8192]
TARGET_SIZES = (4096, 8192, 14336, 16384)


def load_fht():
    try:
        import fast_hadamard_transform as fht
    except ImportError as error:
        return None, f"not importable ({error})"
    return fht, f"fast_hadamard_transform {getattr(fht, '__version__', '?')}"


def fht_call(fht, x, n, block):
    from fast_hadamard_transform import fast_hadamard_transform_interface as fi

    size = block or n
    scale = 1.0 / math.sqrt(size)
    rows = x.view(-1, size)
    if size % 28 == 0:
        return lambda: fi.hadamard_transform_28N(rows, scale)
    if size & (size - 1) == 0:
        return lambda: fht.hadamard_transform(rows, scale)
    return None  # 576 = 36 x 16: no 36N kernel in fast-hadamard-transform


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--sizes", type=int, nargs="+", default=SIZES)
    parser.add_argument("--rows", type=int, nargs="+", default=ROWS)
    parser.add_argument("--no-triton", action="store_true")
    args = parser.parse_args()
    if "hadamard_quantize" not in backends.status("cuda").kernels:
        raise SystemExit(f"the CUDA extension lacks the hadamard kernels: {backends.status('cuda').reason}")
    dtype = torch.float16
    warm_up_gpu()  # (an idle GPU's first rows come out erratic: benchmarks/common.py)
    copy_1g = copy_bandwidth_gbs()
    fht, fht_status = load_fht()
    tensor_core_sizes = set(backends.cuda_build_info().get("hadamard_quantize_tensor_core_sizes", ()))
    print(f"peer fast-hadamard-transform: {fht_status}")

    results, table = [], []
    for n in args.sizes:
        block = BLOCKS.get(n, 0)
        size = block or n
        h = (hadamard_matrix(size, dtype=torch.float64) / math.sqrt(size)).to("cuda", dtype)
        if block:
            h = torch.block_diag(*[h] * (n // block))
        for rows in args.rows:
            x = torch.randn(rows, n, device="cuda", dtype=dtype)
            # correctness first
            y = torch.ops.quantkern.hadamard(x, block)
            y_ref = reference.hadamard(x) if not block else ops.hadamard(x, backend="reference", block_size=block)
            assert torch.equal(y, y_ref) or (y.float() - y_ref.float()).abs().max() <= 2e-3 * y_ref.float().abs().max()
            q, s = torch.ops.quantkern.hadamard_quantize(x, 4, 1.0, block)
            q_ref, s_ref = reference.quantize_per_token(y_ref, 4)
            if n in tensor_core_sizes and not block:
                # (the tensor-core path rounds intermediates to fp16: a few codes differ by 1; the tests bound them)
                code_diff = (unpack_int4_signed(q).int() - unpack_int4_signed(q_ref).int()).abs()
                assert code_diff.max() <= 1 and (code_diff != 0).float().mean() < 0.03
            else:
                assert (q != q_ref).float().mean().item() < 0.01
            assert torch.allclose(s, s_ref, rtol=2e-3)
            if not args.no_triton:  # the Triton ops too, within tests/test_hadamard_kernels.py's bounds for them
                y_tr = ops.hadamard(x, backend="triton", block_size=block)
                assert (y_tr.float() - y_ref.float()).abs().max() <= 2e-3 * y_ref.float().abs().max()
                q_tr, s_tr = ops.hadamard_quantize(x, 4, backend="triton", block_size=block)
                code_diff = (unpack_int4_signed(q_tr).int() - unpack_int4_signed(q_ref).int()).abs()
                assert code_diff.max() <= 1 and (code_diff != 0).float().mean() <= 0.01
                assert torch.allclose(s_tr, s_ref, rtol=8e-3, atol=0)
            bytes_rot = 2 * rows * n * 2
            bytes_q = rows * n * 2 + rows * n // 2 + rows * 4
            times = {
                "hadamard": median_us(lambda: torch.ops.quantkern.hadamard(x, block)),
                "hadamard_quantize": median_us(lambda: torch.ops.quantkern.hadamard_quantize(x, 4, 1.0, block)),
                "two_pass": median_us(lambda: torch.ops.quantkern.quantize_per_token(
                    torch.ops.quantkern.hadamard(x, block), 4, 1.0)),
                "matmul": median_us(lambda: torch.matmul(x, h)),
            }
            if block:  # the same transform as rows of one block each: the whole-row kernel on a [rows*n/b, b] view
                view_y = torch.ops.quantkern.hadamard(x.view(-1, block), 0).view(rows, n)
                view_error = (view_y.float() - y.float()).abs().max()
                assert view_error <= 2e-3 * y.float().abs().max()
                times["hadamard_block_rows"] = median_us(
                    lambda: torch.ops.quantkern.hadamard(x.view(-1, block), 0))
            if not args.no_triton:
                times["triton_hadamard"] = median_us(lambda: ops.hadamard(x, backend="triton", block_size=block))
                times["triton_hadamard_quantize"] = median_us(
                    lambda: ops.hadamard_quantize(x, 4, backend="triton", block_size=block))
            call = fht_call(fht, x, n, block) if fht else None
            if call:
                y_fht = call().view(rows, n)
                if size & (size - 1) == 0:  # Sylvester's matrix, as ours: the same transform
                    fht_error = (y_fht.float() - y_ref.float()).abs().max()
                    if fht_error > 2e-3 * y_ref.float().abs().max():
                        print(f"warning: fht differs from the reference by {fht_error:.2e} at {rows}x{n}")
                times["fht"] = median_us(call)
                times["fht+quant"] = median_us(
                    lambda: torch.ops.quantkern.quantize_per_token(call().view(rows, n), 4, 1.0))
            src_rot = torch.empty(bytes_rot // 2, dtype=torch.uint8, device="cuda").random_()
            dst_rot = torch.empty_like(src_rot)
            src_q = torch.empty(bytes_q // 2, dtype=torch.uint8, device="cuda").random_()
            dst_q = torch.empty_like(src_q)
            times["copy_same_bytes_rot"] = median_us(lambda: dst_rot.copy_(src_rot))
            times["copy_same_bytes_quant"] = median_us(lambda: dst_q.copy_(src_q))
            rotation_only = ("hadamard", "hadamard_block_rows", "matmul", "triton_hadamard", "fht",
                             "copy_same_bytes_rot")
            nbytes = {k: (bytes_rot if k in rotation_only
                          else bytes_q) for k in times}
            gbs = {k: nbytes[k] / (t * 1e3) for k, t in times.items()}
            copy_rot, copy_q = gbs["copy_same_bytes_rot"], gbs["copy_same_bytes_quant"]
            frac = {k: gbs[k] / (copy_rot if nbytes[k] == bytes_rot else copy_q) for k in times}
            results.append({"n": n, "block_size": block, "rows": rows, "dtype": "float16", "bits": 4,
                            "time_us": times, "bytes": nbytes, "gbs": gbs, "fraction_of_same_bytes_copy": frac,
                            "fraction_of_1GiB_copy": {k: g / copy_1g for k, g in gbs.items()}})

            def f(key):
                return f"{frac[key]:.2f}" if key in frac else "-"

            table.append([f"{n}{'/b' + str(block) if block else ''}", rows,
                          f"{times['hadamard_quantize']:.1f}", f"{gbs['hadamard_quantize']:.0f}",
                          f("hadamard_quantize"), f("two_pass"), f("fht+quant"),
                          f("hadamard"), f("hadamard_block_rows"), f("fht"), f("matmul"),
                          f("triton_hadamard_quantize"),
                          "yes" if n in TARGET_SIZES and frac["hadamard_quantize"] >= HADAMARD_QUANTIZE_TARGET else
                          ("NO" if n in TARGET_SIZES else "")])
            print("progress:", n, rows, {k: round(t, 1) for k, t in times.items()}, flush=True)
    if args.json:
        write_json(args.json, results, {"copy_bandwidth_1GiB_gbs": copy_1g, "peer_fht": fht_status})
    print(f"\nonline Hadamard, fp16, int4 per-token; 1 GiB copy {copy_1g:.0f} GB/s (read+write); "
          f"figures = fraction of a copy of the same bytes; fht: {fht_status}")
    print_table(table, ["n", "rows", "fused_us", "fused_GB/s", "fused", "two_pass", "fht+quant", "had", "had_b_rows",
                        "fht", "matmul", "triton_fused", f">={HADAMARD_QUANTIZE_TARGET:g}"])


if __name__ == "__main__":
    main()
