"""What an act-order layer's input gather costs (``QuantLinear.input_permutation``, the layers `quantkern convert`
makes from GPTQ act-order checkpoints): CUDA-graph medians of the same W4A16 layer without a permutation, with one
(the layer's gather: ``ops.permute_columns``, csrc/permute.cu), and after torch's ``x.index_select(-1, perm)`` (what
the layer ran before csrc/permute.cu), and of each gather alone; weights rotated past the L2.

    python scripts/probe_act_order.py [--shapes 4096x4096,4096x14336,14336x4096] [--batches 1,16] [--after-norm]

``--after-norm``: also an RMSNorm then the layer, through torch.compile, as in a compiled model: no gather, our
gather (an opaque op), and torch's index_select, which Inductor may fuse into the norm's kernel. One layer per
shape there (a compiled function is specialized to its module), so its weights may sit in the L2.
"""
import argparse
import sys

import torch

sys.path.insert(0, "benchmarks")
from common import copies_for, cycling, graph_us, warm_up_gpu  # noqa: E402
from quantkern import ops, reference  # noqa: E402
from quantkern.nn import QuantLinear  # noqa: E402


def layers(k, n, permuted, copies):
    torch.manual_seed(0)
    qw = reference.quantize_weight(torch.randn(n, k, device="cuda") / k ** 0.5, 4, 128, symmetric=True,
                                   scale_dtype=torch.float16)
    perm = torch.randperm(k, device="cuda") if permuted else None
    out = []
    for _ in range(copies):
        layer = QuantLinear.from_quantized(qw, input_permutation=perm).cuda()
        layer.prepare(torch.float16)
        out.append(layer)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="4096x4096,4096x14336,14336x4096")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--after-norm", action="store_true", help="also RMSNorm + layer under torch.compile")
    args = ap.parse_args()
    warm_up_gpu()
    rows = []
    for shape in args.shapes.split(","):
        k, n = map(int, shape.split("x"))
        copies = copies_for(n * k // 2)
        plain, permuted = cycling(layers(k, n, False, copies)), cycling(layers(k, n, True, copies))
        perm = torch.randperm(k, device="cuda")
        for m in map(int, args.batches.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            with torch.no_grad():
                t_plain = graph_us(lambda: plain()(x))
                t_perm = graph_us(lambda: permuted()(x))
                t_index_select = graph_us(lambda: plain()(x.index_select(-1, perm)))
                t_gather = graph_us(lambda: ops.permute_columns(x, perm))
                t_gather_torch = graph_us(lambda: x.index_select(-1, perm))
            rows.append(f"{k}x{n} M={m}: plain {t_plain:.1f} us | permuted {t_perm:.1f} us (+{t_perm - t_plain:.1f}) | "
                        f"after index_select {t_index_select:.1f} us (+{t_index_select - t_plain:.1f}) | gather "
                        f"alone: ours {t_gather:.1f} us, index_select {t_gather_torch:.1f} us")
            print(rows[-1], flush=True)
    if args.after_norm:
        for shape in args.shapes.split(","):
            k, n = map(int, shape.split("x"))
            torch._dynamo.reset()  # the lambdas below are the same code objects for every shape: a fresh cache
            (plain,), (permuted,) = layers(k, n, False, 1), layers(k, n, True, 1)
            perm = permuted.input_permutation
            norm = torch.nn.RMSNorm(k, eps=1e-5, device="cuda", dtype=torch.float16)
            variants = {"no gather": torch.compile(lambda x: plain(norm(x)), dynamic=False),
                        "ours": torch.compile(lambda x: permuted(norm(x)), dynamic=False),
                        "index_select": torch.compile(lambda x: plain(norm(x).index_select(-1, perm)), dynamic=False)}
            for m in map(int, args.batches.split(",")):
                x = torch.randn(m, k, device="cuda", dtype=torch.float16)
                with torch.no_grad():
                    want = variants["index_select"](x).float()
                    error = (variants["ours"](x).float() - want).abs().max() / want.abs().max()
                    assert error < 1e-2, f"the compiled gathers disagree ({error:.1e})"  # (norms may round apart)
                    times = {name: graph_us(lambda: fn(x)) for name, fn in variants.items()}
                rows.append(f"{k}x{n} M={m}, RMSNorm + layer compiled: "
                            + " | ".join(f"{name} {t:.1f} us" for name, t in times.items()))
                print(rows[-1], flush=True)
    print()
    print("\n".join(rows))


if __name__ == "__main__":
    main()
