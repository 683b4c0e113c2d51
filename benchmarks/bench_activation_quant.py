"""Per-token activation quantization: our CUDA and Triton kernels against peers in the same run.

Peer: per-token quantization as a user writes it in PyTorch (absmax, divide, round, clamp, pack),
run eagerly (several kernels, several passes over memory: QuaRot's unfused path) and compiled by
torch.compile (Inductor fuses it into one Triton kernel). ``cuda`` times the extension's op
directly; ``ops`` times it through ``quantkern.ops`` (Python validation and dispatch included).
Figures: effective bandwidth (minimal bytes read + written) as a fraction of the device copy
bandwidth measured in the same run, and speed-ups of the CUDA kernel over the peers. The table
printed last keeps the bandwidth-bound shapes (2048+ rows); the JSON has every shape.

    python benchmarks/bench_activation_quant.py --json out/bench_activation_quant.json
"""

from __future__ import annotations

import argparse

import torch

from common import copy_bandwidth_gbs, median_us, print_table, write_json
from quantkern import backends, ops, reference

HIDDEN_SIZES = [576, 896, 4096, 4864, 8192, 14336, 16384]
ROWS = [1, 16, 2048, 16384]


def torch_per_token_quant(x: torch.Tensor, bits: int):
    """The peer: what a PyTorch user writes (same outputs as the reference up to rounding details)."""
    qmax = 2 ** (bits - 1) - 1
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / qmax
    q = torch.clamp(torch.round(x.float() / scale), -qmax, qmax).to(torch.int8)
    if bits == 4:
        q = ((q[:, 0::2] & 0xF) | ((q[:, 1::2] & 0xF) << 4)).to(torch.uint8)
    return q, scale.squeeze(-1)


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
    # One specialised compilation per shape: lift Dynamo's recompile limit (default 8), past which
    # it would silently run the peer eagerly.
    torch._dynamo.config.cache_size_limit = 1024
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = 1024
    compiled_peer = torch.compile(torch_per_token_quant, dynamic=False)
    if "quantize_per_token" not in backends.status("cuda").kernels:
        raise SystemExit(f"the CUDA extension is missing: {backends.status('cuda').reason}")
    hidden = [576, 4096, 14336] if args.quick else HIDDEN_SIZES
    rows_list = [16, 2048] if args.quick else ROWS

    results, table = [], []
    for bits in args.bits:
        for features in hidden:
            for rows in rows_list:
                x = torch.randn(rows, features, device="cuda", dtype=dtype)
                expected = reference.quantize_per_token(x, bits)
                got = torch.ops.quantkern.quantize_per_token(x, bits, 1.0)
                if not (torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])):
                    raise SystemExit(f"CUDA kernel disagrees with the reference at {rows}x{features} int{bits}")
                times = {
                    "cuda": median_us(lambda: torch.ops.quantkern.quantize_per_token(x, bits, 1.0)),
                    "ops": median_us(lambda: ops.quantize_per_token(x, bits)),
                    "triton": median_us(lambda: ops.quantize_per_token(x, bits, backend="triton")),
                    "torch_eager": median_us(lambda: torch_per_token_quant(x, bits)),
                    "torch_compile": median_us(lambda: compiled_peer(x, bits)),
                }
                nbytes = minimal_bytes(rows, features, dtype, bits)
                frac = {name: nbytes / (t * 1e3) / copy_gbs for name, t in times.items()}
                results.append({"bits": bits, "rows": rows, "features": features, "dtype": args.dtype,
                                "time_us": times, "bytes": nbytes, "fraction_of_copy_bw": frac})
                if rows >= 2048:
                    ours = times["cuda"]
                    table.append([f"int{bits}", rows, features, f"{ours:.1f}", f"{frac['cuda']:.2f}",
                                  f"{frac['triton']:.2f}", f"{frac['torch_compile']:.2f}",
                                  f"{times['torch_eager'] / ours:.2f}x", f"{times['torch_compile'] / ours:.2f}x"])
    if args.json:
        write_json(args.json, results, {"copy_bandwidth_gbs": copy_gbs})
    print(f"\nper-token activation quantization, {args.dtype}; copy bandwidth {copy_gbs:.0f} GB/s (read+write)")
    small = [r for r in results if r["rows"] < 2048]
    if small:
        print("rows < 2048 (latency-bound): cuda %.1f-%.1f us, through quantkern.ops %.1f-%.1f us" % (
            min(r["time_us"]["cuda"] for r in small), max(r["time_us"]["cuda"] for r in small),
            min(r["time_us"]["ops"] for r in small), max(r["time_us"]["ops"] for r in small)))
    print_table(table, ["bits", "rows", "K", "cuda_us", "cuda_bw", "triton_bw", "compile_bw", "vs_eager",
                        "vs_compile"])


if __name__ == "__main__":
    main()
