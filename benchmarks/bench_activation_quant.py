"""Per-token activation quantization: our CUDA and Triton kernels against peers in the same run.

Peers: the plain-PyTorch reference run eagerly (several kernels, several passes over memory) and
the same reference compiled by torch.compile (Inductor fuses it into Triton). Figures are
effective bandwidth (bytes read + written, minimal traffic) as a fraction of the measured copy
bandwidth, and speed-ups over the peers.

    python benchmarks/bench_activation_quant.py --json out/bench_activation_quant.json
"""

from __future__ import annotations

import argparse

import torch

from common import copy_bandwidth_gbs, median_us, print_table, write_json
from quantkern import backends, ops, reference

HIDDEN_SIZES = [576, 896, 4096, 4864, 8192, 14336, 16384]
ROWS = [1, 16, 2048, 16384]


def minimal_bytes(rows: int, features: int, dtype: torch.dtype, bits: int) -> int:
    read = rows * features * torch.finfo(dtype).bits // 8
    written = rows * features * bits // 8 + rows * 4
    return read + written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16"])
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--quick", action="store_true", help="fewer shapes")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    copy_gbs = copy_bandwidth_gbs()
    compiled_reference = torch.compile(reference.quantize_per_token, dynamic=False)
    have_cuda = "quantize_per_token" in backends.status("cuda").kernels
    hidden = [576, 4096, 14336] if args.quick else HIDDEN_SIZES
    rows_list = [16, 2048] if args.quick else ROWS

    results, table = [], []
    for bits in args.bits:
        for features in hidden:
            for rows in rows_list:
                x = torch.randn(rows, features, device="cuda", dtype=dtype)
                times = {
                    "torch_eager": median_us(lambda: reference.quantize_per_token(x, bits)),
                    "torch_compile": median_us(lambda: compiled_reference(x, bits)),
                    "triton": median_us(lambda: ops.quantize_per_token(x, bits, backend="triton")),
                }
                if have_cuda:
                    times["cuda"] = median_us(lambda: ops.quantize_per_token(x, bits, backend="cuda"))
                nbytes = minimal_bytes(rows, features, dtype, bits)
                ours = times.get("cuda", times["triton"])
                frac = {name: nbytes / (t * 1e3) / copy_gbs for name, t in times.items()}
                results.append({"bits": bits, "rows": rows, "features": features, "dtype": args.dtype,
                                "time_us": times, "bytes": nbytes, "fraction_of_copy_bw": frac})
                table.append([f"int{bits}", rows, features, f"{ours:.1f}",
                              f"{frac.get('cuda', float('nan')):.2f}", f"{frac['triton']:.2f}",
                              f"{times['torch_eager'] / ours:.2f}x", f"{times['torch_compile'] / ours:.2f}x"])
    if args.json:
        write_json(args.json, results, {"copy_bandwidth_gbs": copy_gbs})
    print(f"\nper-token activation quantization, {args.dtype}; copy bandwidth {copy_gbs:.0f} GB/s (read+write)")
    print_table(table, ["bits", "rows", "K", "ours_us", "cuda_bw", "triton_bw", "vs_eager", "vs_compile"])


if __name__ == "__main__":
    main()
