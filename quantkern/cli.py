"""The ``quantkern`` command line: ``quantkern info [DIR]``, ``quantkern quantize``, ``quantkern eval DIR``.

``python -m quantkern ...`` is the same program.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _print_table(rows, headers) -> None:
    widths = [max(len(str(x)) for x in column) for column in zip(headers, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    print(line(headers))
    print(line(["-" * w for w in widths]))
    for row in rows:
        print(line(row))


def cmd_info(args) -> int:
    if args.directory:
        import json

        from .io import read_metadata

        print(json.dumps(read_metadata(args.directory), indent=2))
        return 0
    import torch

    from . import __version__, backends

    print(f"quantkern {__version__}, torch {torch.__version__}")
    if torch.cuda.is_available():
        print(f"CUDA device: {torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))})")
    else:
        print("CUDA device: none visible")
    print("\nBackends:")
    for name in backends.BACKENDS:
        st = backends.status(name)
        print(f"  {name:<9} {'available' if st.available else 'MISSING  '}  {st.reason}")
    print("\nKernels (op x backend):")
    table = {}
    for op, name, state in backends.report():
        table.setdefault(op, {})[name] = state
    _print_table([[op] + [table[op][b] for b in backends.BACKENDS] for op in backends.OPS],
                 ["op"] + list(backends.BACKENDS))
    return 0


def _load_source(src, device):
    import torch

    from .builtin_model import DEFAULT_MODEL_NAME, load_builtin_model

    if src is None:
        model, tokenizer = load_builtin_model(dtype=torch.float32, device=device)
        return model, tokenizer, DEFAULT_MODEL_NAME
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = Path(src)
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"--src {src} has no config.json: not a Hugging Face model directory")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, local_files_only=True).to(device)
    tokenizer = AutoTokenizer.from_pretrained(src, local_files_only=True)
    return model.eval(), tokenizer, str(src)


def cmd_quantize(args) -> int:
    import torch

    from .evaluation import DEFAULT_EVAL_TEXT, perplexity
    from .io import build_metadata, directory_size, quant_tag, quantization_config, save_quantized
    from .nn import cast_unquantized_parameters, choose_group_size, linear_layers, replace_linear

    skip = ("lm_head",) if args.keep_lm_head_fp16 else ()
    if args.dst and Path(args.dst).exists() and not args.overwrite:  # fail before the slow work
        raise FileExistsError(f"{args.dst} already exists; pass --overwrite to replace it")
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    model, tokenizer, source = _load_source(args.src, args.device)
    load_s = time.perf_counter() - start
    layers = linear_layers(model, skip)
    group_size = choose_group_size(layers, args.group_size)
    tag = quant_tag(args.method, args.bits, group_size, args.acts_bits, None, args.keep_lm_head_fp16)
    dst = Path(args.dst) if args.dst else Path(f"{Path(source).name}_{tag}")
    if dst.exists() and not args.overwrite:
        raise FileExistsError(f"{dst} already exists; pass --overwrite to replace it")
    if args.src and dst.resolve() == Path(args.src).resolve():
        raise ValueError("--dst must differ from --src: quantkern never writes into the source model")
    fp16_bytes = sum(p.numel() * 2 for p in model.parameters())
    storage_dtype = getattr(torch, args.dtype)

    print(f"[{tag}] quantizing {len(layers)} Linear layers of {source} (group size {group_size})", file=sys.stderr)
    start = time.perf_counter()
    replace_linear(model, args.bits, group_size, not args.asymmetric, args.acts_bits, skip, storage_dtype,
                   progress=True)
    quantize_s = time.perf_counter() - start

    qconfig = quantization_config(args.method, args.bits, group_size, not args.asymmetric, args.acts_bits,
                                  modules_not_converted=skip)
    metadata = build_metadata(qconfig, source, None, {"load": round(load_s, 2), "quantize": round(quantize_s, 2)},
                              args.keep_lm_head_fp16)
    # The checkpoint stores the unquantized tensors in --dtype; the evaluation below uses exactly
    # those values (upcast back to fp32 on the CPU, where fp16 matmuls are slow), so it measures
    # what loads back.
    cast_unquantized_parameters(model, storage_dtype)
    save_quantized(model, dst, qconfig, metadata, tokenizer, overwrite=args.overwrite)
    if args.device == "cpu":
        cast_unquantized_parameters(model, torch.float32)
    disk = directory_size(dst)
    print(f"wrote {dst} ({disk / 2**20:.1f} MiB on disk; the fp16 model's parameters: {fp16_bytes / 2**20:.1f} MiB)")
    if not args.no_eval:
        text = args.eval_text or DEFAULT_EVAL_TEXT
        ppl = perplexity(model, tokenizer, text, seq_len=args.seq_len)
        print(f"perplexity on {text} ({args.seq_len}-token windows): {ppl:.2f}")
    return 0


def cmd_eval(args) -> int:
    import torch

    from .evaluation import DEFAULT_EVAL_TEXT, perplexity
    from .io import directory_size, load_quantized, read_metadata

    metadata = read_metadata(args.directory)
    model, tokenizer = load_quantized(args.directory, device=args.device)
    if tokenizer is None:
        raise FileNotFoundError(f"{args.directory} has no tokenizer files: perplexity needs one")
    text = args.eval_text or DEFAULT_EVAL_TEXT
    if torch.cuda.is_available() and args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    ppl = perplexity(model, tokenizer, text, seq_len=args.seq_len)
    elapsed = time.perf_counter() - start
    tokens = len(tokenizer(Path(text).read_text())["input_ids"])
    print(f"{metadata['tag']}: perplexity {ppl:.2f} on {text} ({args.seq_len}-token windows)")
    print(f"disk size {directory_size(args.directory) / 2**20:.1f} MiB; "
          f"{tokens / elapsed:.0f} tokens/s scored on {args.device}")
    if torch.cuda.is_available() and args.device.startswith("cuda"):
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quantkern", description="Low-bit LLM quantization and kernels.")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="list backends and kernels, or show a checkpoint's metadata")
    info.add_argument("directory", nargs="?", help="a quantized checkpoint directory")
    info.set_defaults(func=cmd_info)

    q = sub.add_parser("quantize", help="quantize a Hugging Face model (default: the built-in SmolLM2-135M-Instruct)")
    q.add_argument("--src", help="source model directory (default: the built-in SmolLM2-135M-Instruct)")
    q.add_argument("--dst", help="output directory (default: <model>_<tag> in the current directory)")
    q.add_argument("--method", default="rtn", choices=["rtn"], help="quantization method (default: rtn)")
    q.add_argument("--bits", type=int, default=4, choices=[4, 8], help="weight bits (default: 4)")
    q.add_argument("--group-size", default="auto",
                   help="32, 64, 128, -1 (per-channel) or auto: the largest of 128/64/32 dividing every layer")
    q.add_argument("--asymmetric", action="store_true", help="asymmetric weights with zero points")
    q.add_argument("--acts-bits", type=int, choices=[4, 8], default=None,
                   help="quantize activations too (W4A4 or W8A8; default: weight-only)")
    q.add_argument("--keep-lm-head-fp16", action=argparse.BooleanOptionalAction, default=True,
                   help="leave lm_head unquantized (default: yes)")
    q.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"],
                   help="dtype of scales and of the tensors left unquantized (default: float16)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--device", default="cpu", help="device to quantize and evaluate on (default: cpu)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing --dst")
    q.add_argument("--eval-text", help="text file for perplexity (default: /usr/share/common-licenses/GPL-3)")
    q.add_argument("--seq-len", type=int, default=512, help="perplexity window in tokens (default: 512)")
    q.add_argument("--no-eval", action="store_true", help="skip the perplexity evaluation")
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("eval", help="perplexity, disk size and speed of a quantized checkpoint")
    e.add_argument("directory", help="a checkpoint written by `quantkern quantize`")
    e.add_argument("--eval-text", help="text file (default: /usr/share/common-licenses/GPL-3)")
    e.add_argument("--seq-len", type=int, default=512, help="perplexity window in tokens (default: 512)")
    e.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    e.set_defaults(func=cmd_eval)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "group_size", None) not in (None, "auto"):
        try:
            args.group_size = int(args.group_size)
        except ValueError:
            build_parser().error(f"--group-size must be an integer or 'auto', got {args.group_size!r}")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, TypeError, KeyError) as error:
        print(f"quantkern {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
