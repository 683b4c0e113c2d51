"""Run the fused Hadamard + quantization op a few times per size, for a profiler (ncu, nsys).

    ncu --kernel-name regex:hadamard_quantize --launch-skip 2 --launch-count 1 \
        python scripts/profile_hadamard.py --sizes 4096 --rows 8192

Each size runs 3 calls (warm-up, then the ones a profiler picks); nothing is timed here
(benchmarks/bench_hadamard.py times it against its peers).
"""

from __future__ import annotations

import argparse

import torch

from quantkern import ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192, 14336, 16384])
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    parser.add_argument("--bits", type=int, choices=[4, 8], default=4)
    parser.add_argument("--calls", type=int, default=3)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    for n in args.sizes:
        x = torch.randn(args.rows, n, device="cuda", dtype=dtype)
        for _ in range(args.calls):
            ops.hadamard_quantize(x, bits=args.bits)
        torch.cuda.synchronize()
        print(f"n={n} rows={args.rows} {args.dtype} int{args.bits}: {args.calls} calls")


if __name__ == "__main__":
    main()
