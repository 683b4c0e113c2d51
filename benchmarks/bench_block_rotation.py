"""Dense per-block rotation (PCA of head_dim blocks) + per-token int4 quantization: ours against peers in
the same run.

Ours: ``fused`` = ``ops.block_rotate_quantize`` as it runs by default: the CUDA kernel (csrc/block_rotation.cu, one
pass) for a shared R where it applies and rows of at most ``ops.CUDA_BLOCK_ROTATION_AUTO_MAX_K``, else the
Triton kernel (the ``ours`` column says which); ``triton`` = the same op on the Triton kernel
(triton_kernels/block_rotation.py: two launches, nothing rotated stored between them); ``cuda`` = the same op on
the CUDA kernel wherever it applies; ``rotate`` = ``ops.block_rotate`` alone (Triton, fp16 out).
Peers, same inputs: ``cublas+quant`` = the rotation as one cuBLAS GEMM (``x.view(-1, b) @ R.T`` for a shared R,
one ``torch.bmm`` over the blocks for one R per block; R in x's dtype), then our ``quantize_per_token`` (the
CUDA kernel where built); ``copy`` = a device copy of the same bytes as the fused op moves at least (x read,
codes + scales written), the roofline. Timing: CUDA-graph replays (no host time; nothing rotated past the L2:
x, its outputs and the copy's buffers stay in the L2 alike where they fit). Figures: microseconds and the share
of the same-bytes copy's rate. Before timing, ours is checked against the reference (tests/test_block_rotation.py's
bounds; fatal) and the peer within a rounding step (its R is rounded to fp16; a warning).

    python benchmarks/bench_block_rotation.py --json out/bench_block_rotation.json
"""

from __future__ import annotations

import argparse

import torch

from common import graph_us, print_table, warm_up_gpu, write_json
from quantkern import backends, ops, reference

SHAPES = [(576, 64), (4096, 128), (8192, 128), (14336, 128)]  # K, b: SmolLM2, Llama-3-8B, -70B, -8B's MLP width
ROWS = [1, 16, 2048, 8192]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--rows", type=int, nargs="+", default=ROWS)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    if "block_rotate_quantize" not in backends.status("triton").kernels:
        raise SystemExit(f"the Triton kernels are missing: {backends.status('triton').reason}")
    has_cuda = "block_rotate_quantize" in backends.status("cuda").kernels
    dtype = torch.float16
    warm_up_gpu()  # (an idle GPU's first rows come out erratic: benchmarks/common.py)
    results, table = [], []
    for k, b in SHAPES:
        for per_block in (False, True):
            g = torch.Generator(device="cuda").manual_seed(0)
            shape = (k // b, b, b) if per_block else (b, b)
            rotation = torch.linalg.qr(torch.randn(*shape, device="cuda", generator=g))[0].contiguous()
            rotation16 = rotation.to(dtype)
            for m in args.rows:
                x = torch.randn(m, k, device="cuda", dtype=dtype, generator=g)

                def peer():
                    if per_block:  # one batched GEMM over the blocks: [K/b, M, b] @ [K/b, b, b]
                        blocks = torch.bmm(x.view(m, k // b, b).transpose(0, 1), rotation16.transpose(-1, -2))
                        y = blocks.transpose(0, 1).reshape(m, k)
                    else:
                        y = (x.view(-1, b) @ rotation16.T).view(m, k)
                    return ops.quantize_per_token(y, 4)

                # correctness first: one fp32 summation order against another, rounded to fp16 (the tests' bounds)
                expected = reference.block_rotate(x, rotation)
                rotated = ops.block_rotate(x, rotation)
                if not torch.allclose(rotated.float(), expected.float(), rtol=2 ** -10, atol=2 ** -10):
                    raise SystemExit(f"block_rotate disagrees with the reference at M={m} K={k} b={b}")
                q_ref, s_ref = reference.quantize_per_token(expected, 4)
                cuda_fits = has_cuda and ops._cuda_block_rotation_fits(x, rotation)
                ours = "cuda" if cuda_fits and k <= ops.CUDA_BLOCK_ROTATION_AUTO_MAX_K else "triton"
                candidates = {"fused": lambda: ops.block_rotate_quantize(x, rotation, 4),
                              "triton": lambda: ops.block_rotate_quantize(x, rotation, 4, backend="triton")}
                if cuda_fits:  # the CUDA kernel where it runs, also past the automatic choice's widths
                    candidates["cuda"] = lambda: ops.block_rotate_quantize(x, rotation, 4, backend="cuda")
                for name, fn, scale_tol in (*((name, fn, 2 ** -10) for name, fn in candidates.items()),
                                            ("cublas+quant", peer, 2e-3)):
                    q, scales = fn()
                    diff = (reference.unpack_int4_signed(q).int() - reference.unpack_int4_signed(q_ref).int()).abs()
                    if not (diff.max().item() <= 1 and diff.float().mean().item() < 0.01
                            and torch.allclose(scales, s_ref, rtol=scale_tol, atol=0)):
                        message = f"{name} disagrees with the reference at M={m} K={k} b={b}"
                        if name != "cublas+quant":
                            raise SystemExit(message)
                        print("warning: " + message, flush=True)
                moved = m * k * 2 + m * k // 2 + m * 4  # x read; int4 codes and fp32 scales written
                src = torch.empty(moved // 2, dtype=torch.uint8, device="cuda")
                dst = torch.empty_like(src)
                times = {name: graph_us(fn) for name, fn in candidates.items()}
                times.update({
                    "rotate": graph_us(lambda: ops.block_rotate(x, rotation)),
                    "cublas+quant": graph_us(peer),
                    "copy": graph_us(lambda: dst.copy_(src)),
                })
                share = times["copy"] / times["fused"]
                results.append({"K": k, "block": b, "per_block_rotation": per_block, "M": m, "dtype": "float16",
                                "ours": ours, "time_us": times, "bytes_moved": moved, "copy_share": share})
                table.append([k, b, "per block" if per_block else "shared", m, ours, f"{times['fused']:.1f}",
                              f"{times['triton']:.1f}", f"{times['cuda']:.1f}" if cuda_fits else "-",
                              f"{times['rotate']:.1f}", f"{times['cublas+quant']:.1f}",
                              f"{times['copy']:.1f}", f"{times['cublas+quant'] / times['fused']:.2f}x",
                              f"{share:.2f}"])
                print(table[-1], flush=True)
    if args.json:
        write_json(args.json, results, {"timing": "do_bench_cudagraph median"})
    print("\ndense per-block rotation + per-token int4 (fp16 rows); us, CUDA graphs")
    print_table(table, ["K", "b", "rotation", "M", "ours", "fused", "triton", "cuda", "rotate alone", "cublas+quant",
                        "copy (same bytes)", "peer/fused", "copy share"])


if __name__ == "__main__":
    main()
