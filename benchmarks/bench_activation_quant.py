"""Per-token activation quantization: our CUDA and Triton kernels against peers in the same run.

Peer: per-token quantization as a user writes it in PyTorch (absmax, divide, round, clamp, pack),
run eagerly (several kernels, several passes over memory: QuaRot's unfused path) and compiled by
torch.compile (Inductor fuses it into one Triton kernel). ``cuda`` times the extension's op
directly; ``ops`` times it through ``quantkern.ops`` (Python validation and dispatch included).
Figures: effective bandwidth (minimal bytes read + written) as a fraction of the device copy
bandwidth measured in the same run, and speed-ups of the CUDA kernel over the peers. The table
printed last keeps the bandwidth-bound shapes (2048+ rows); the JSON has every shape. Before timing, our
CUDA and Triton kernels are checked bit for bit against the reference, and the peers within a rounding
step (a warning if not).

    python benchmarks/bench_activation_quant.py --json out/bench_activation_quant.json
"""

from __future__ import annotations

import argparse

import torch

from common import copy_bandwidth_gbs, median_us, print_table, warm_up_gpu, write_json
from quantkern import backends, ops, reference
from quantkern.format import unpack_int4_signed

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


def peer_difference(got, expected, bits: int) -> str:
    """'' where a peer's (codes, scales) are the reference's up to rounding (an ulp on a scale, a code one off
    at a tie, as benchmarks/test_bench_kernels.py allows torch.compile), else what is off."""
    codes = [(unpack_int4_signed(q) if bits == 4 else q).int() for q in (got[0], expected[0])]
    if codes[0].shape != codes[1].shape or got[1].shape != expected[1].shape:
        return f"shapes {tuple(got[0].shape)}, {tuple(got[1].shape)}"
    diff = (codes[0] - codes[1]).abs()
    scale_error = ((got[1].float() - expected[1]).abs() / expected[1].abs()).max().item()
    worst, share = (diff.max().item(), (diff != 0).float().mean().item()) if diff.numel() else (0, 0.0)
    if worst > 1 or share > 0.01 or scale_error > 1e-6:
        return f"codes up to {worst} off ({share:.2%} of them), scales {scale_error:.1e} relative"
    return ""


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
    warm_up_gpu()  # (an idle GPU's first rows come out erratic: benchmarks/common.py)
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
                got = ops.quantize_per_token(x, bits, backend="triton")  # bit-exact too (tests/test_triton_kernels)
                if not (torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])):
                    raise SystemExit(f"Triton kernel disagrees with the reference at {rows}x{features} int{bits}")
                for name, peer in (("torch_eager", torch_per_token_quant), ("torch_compile", compiled_peer)):
                    off = peer_difference(peer(x, bits), expected, bits)
                    if off:
                        print(f"warning: peer {name} at {rows}x{features} int{bits}: {off}")
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
