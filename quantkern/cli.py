"""The ``quantkern`` command line: ``quantkern info [DIR]``, ``quantkern quantize``, ``quantkern eval DIR``,
``quantkern generate DIR``, ``quantkern convert SRC``.

``python -m quantkern ...`` is the same program.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .format import SUPPORTED_GROUP_SIZES


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
        arch = "".join(map(str, torch.cuda.get_device_capability()))
        print(f"CUDA device: {torch.cuda.get_device_name()} (sm_{arch})")
        mismatch = backends.status("cuda").available and backends.cuda_device_mismatch(torch.device("cuda"))
        if mismatch:
            print(f"  the cuda backend cannot run here: {mismatch}")
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

    from safetensors import SafetensorError

    src = Path(src)
    _check_source(src)
    try:
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, local_files_only=True).to(device)
        tokenizer = AutoTokenizer.from_pretrained(src, local_files_only=True)
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:  # truncated or corrupt files
        raise ValueError(f"--src {src}: cannot load the model: {error}") from None
    return model.eval(), tokenizer, str(src)


def _check_source(src: Path) -> None:
    """A float Hugging Face model directory, checked before the model is loaded."""
    import json

    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"--src {src} has no config.json: not a Hugging Face model directory")
    try:
        config = json.loads((src / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"--src {src}/config.json is corrupt: {error}") from None
    qconfig = config.get("quantization_config") if isinstance(config, dict) else None
    if qconfig is not None:
        method = qconfig.get("quant_method", "?") if isinstance(qconfig, dict) else "?"
        hint = "" if method == "quantkern" else "; `quantkern convert` imports GPTQ, AWQ, AutoRound and " \
                                                "compressed-tensors checkpoints"
        raise ValueError(f"--src {src} is already quantized (quant_method {method}): quantize its float "
                         f"model{hint}")


def _parse_options(pairs) -> dict:
    """``--option key=value`` pairs of a method's own knobs; values read as JSON where they parse
    (numbers, true/false, null; Python's True/False too), otherwise as strings."""
    import json

    options = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--option expects KEY=VALUE, got {pair!r}")
        if value in ("True", "False"):  # (not JSON: it would stay the string "False", which is truthy)
            value = value.lower()
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def _check_evaluation_inputs(text_path, seq_len: int) -> None:
    if seq_len < 2:
        raise ValueError(f"--seq-len must be at least 2 (one context token and one predicted), got {seq_len}")
    if not Path(text_path).is_file():
        raise FileNotFoundError(f"--eval-text {text_path}: no such file")
    if not Path(text_path).read_text(encoding="utf-8").strip():
        raise ValueError(f"--eval-text {text_path} is empty")


def _check_device(device: str) -> None:
    """A usable --device, checked before the slow work."""
    import torch

    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a device (cpu, cuda, cuda:1, ...)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is visible to torch {torch.__version__}")


def _check_writable(dst) -> None:
    """Fail now, not after the slow work, where ``dst``'s staging directory cannot be made: write
    permission bits do not bind root, and read-only or pseudo file systems (/proc) refuse anyway."""
    import os
    import tempfile

    dst = Path(dst).absolute()
    ancestor = dst.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".quantkern-write-test-", dir=ancestor))
    except OSError as error:
        raise PermissionError(f"cannot write {dst}: {ancestor} refuses new files ({error.strerror})") from None


def _check_not_inside(src, dst) -> None:
    if src and Path(src).resolve().is_relative_to(Path(dst).resolve()):
        raise ValueError("--dst must not be --src or contain it: quantkern never writes into the source model")


def evaluation_dtype(device, storage_dtype):
    """The dtype a just-quantized model is evaluated in: the checkpoint's on a GPU, fp32 on the CPU."""
    import torch

    return storage_dtype if torch.device(device).type == "cuda" else torch.float32


def cmd_quantize(args) -> int:
    import torch

    from .calibration import read_calibration_texts
    from .evaluation import DEFAULT_EVAL_TEXT, perplexity
    from .io import (build_metadata, check_destination, directory_size, quant_tag, quantization_config,
                     save_quantized)
    from .models import model_structure
    from .nn import cast_unquantized_parameters
    from .quantizers import METHODS, QuantizeConfig, quantize_model
    from .quantizers.base import ALL_ROLES, resolve_group_size

    _check_device(args.device)
    method = METHODS[args.method]
    defaults = {"bits": 4, "acts_bits": None, "group_size": "auto", **method.cli_defaults}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.calib is not None and not method.needs_calibration:
        raise ValueError(f"--calib is not used by {args.method}, which needs no calibration data")
    if args.bits == 8 and args.acts_bits != 8:  # refused anyway, but only after the model has loaded
        raise ValueError(f"--bits 8 needs --acts-bits 8 (W8A8), got W8A{args.acts_bits or 16}: the weight-only "
                         f"kernels are 4-bit and W8A4 is no mode")
    if method.needs_calibration and args.calib_samples < 1:
        raise ValueError(f"--calib-samples must be at least 1, got {args.calib_samples}")
    if method.needs_calibration and args.calib_seq_len < 2:
        raise ValueError(f"--calib-seq-len must be at least 2, got {args.calib_seq_len}")
    options = _parse_options(args.option)
    if args.dst:  # fail before the slow work
        check_destination(args.dst, args.overwrite)
        _check_writable(args.dst)
        _check_not_inside(args.src, args.dst)
    if args.calib is not None:
        read_calibration_texts(args.calib)  # a missing or empty file fails now, not after loading the model
    if not args.no_eval:  # the evaluation runs after the checkpoint is written: check its inputs now
        _check_evaluation_inputs(args.eval_text or DEFAULT_EVAL_TEXT, args.seq_len)
    unknown = set(options) - set(method.default_options)
    if unknown:
        raise ValueError(f"{args.method}: unknown --option {sorted(unknown)}; known: "
                         f"{', '.join(sorted(method.default_options)) or 'none'}")
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    model, tokenizer, source = _load_source(args.src, "cpu")
    load_s = time.perf_counter() - start
    structure = model_structure(model)
    group_size = resolve_group_size([b.linears[r] for b in structure.blocks for r in ALL_ROLES], args.group_size)
    tag = quant_tag(args.method, args.bits, group_size, args.acts_bits, args.kv_bits, args.keep_lm_head_fp16)
    dst = Path(args.dst) if args.dst else Path(f"{Path(source).name}_{tag}")
    check_destination(dst, args.overwrite)
    _check_writable(dst)
    _check_not_inside(args.src, dst)
    fp16_bytes = sum(p.numel() * 2 for p in model.parameters())
    storage_dtype = getattr(torch, args.dtype)
    config = QuantizeConfig(
        method=args.method, bits=args.bits, group_size=group_size, symmetric=not args.asymmetric,
        act_bits=args.acts_bits, kv_bits=args.kv_bits, rotation=args.rotation,
        keep_lm_head_fp16=args.keep_lm_head_fp16, scale_dtype=storage_dtype, calib_path=args.calib,
        calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len, seed=args.seed,
        device=args.device, options=options)

    print(f"[{tag}] quantizing {len(structure.blocks)} blocks of {source} on {args.device}", file=sys.stderr)
    result = quantize_model(model, tokenizer, config)
    skip = ("lm_head",) if args.keep_lm_head_fp16 else ()
    extra = result.extra_config
    qconfig = quantization_config(args.method, args.bits, group_size, not args.asymmetric, args.acts_bits,
                                  args.kv_bits, extra.get("rotation"), modules_not_converted=skip,
                                  act_clip_ratio=extra.get("act_clip_ratio", 1.0),
                                  kv_rotate_keys=extra.get("kv_rotate_keys", False))
    metadata = build_metadata(qconfig, source, result.calibration,
                              {"load": round(load_s, 2), **result.timings_s}, args.keep_lm_head_fp16)
    metadata["method_config"] = result.extra_config
    # The checkpoint stores the unquantized tensors in --dtype; the evaluation below uses exactly
    # those values, so it measures what loads back: in --dtype on a GPU (our kernels take fp16 / bf16
    # activations only), upcast to fp32 on the CPU (where fp16 matmuls are slow).
    cast_unquantized_parameters(model, storage_dtype)
    save_quantized(model, dst, qconfig, metadata, tokenizer, overwrite=args.overwrite)
    cast_unquantized_parameters(model, evaluation_dtype(args.device, storage_dtype))
    disk = directory_size(dst)
    print(f"wrote {dst} ({disk / 2**20:.1f} MiB on disk; the fp16 model's parameters: {fp16_bytes / 2**20:.1f} MiB)")
    print(f"quantization took {result.timings_s['quantize']:.1f} s")
    if not args.no_eval:
        text = args.eval_text or DEFAULT_EVAL_TEXT
        ppl = perplexity(model.to(args.device), tokenizer, text, seq_len=args.seq_len)
        print(f"perplexity on {text} ({args.seq_len}-token windows): {ppl:.2f}")
    return 0


def _peak_memory_text(device: str) -> str:
    import resource

    import torch

    if torch.device(device).type == "cuda":
        return f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
    # ru_maxrss is in KiB on Linux: the process's peak resident memory, model loading included.
    return f"peak host memory (RSS) {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"


def cmd_eval(args) -> int:
    import torch

    from .evaluation import DEFAULT_EVAL_TEXT, perplexity
    from .io import directory_size, load_quantized, read_metadata

    _check_device(args.device)
    if args.gen_tokens is not None and args.gen_tokens < 0:
        raise ValueError(f"--gen-tokens must be 0 (skip) or more, got {args.gen_tokens}")
    _check_evaluation_inputs(args.eval_text or DEFAULT_EVAL_TEXT, args.seq_len)
    metadata = read_metadata(args.directory)
    model, tokenizer = load_quantized(args.directory, device=args.device)
    if tokenizer is None:
        raise FileNotFoundError(f"{args.directory} has no tokenizer files: perplexity needs one")
    text = args.eval_text or DEFAULT_EVAL_TEXT
    on_cuda = torch.device(args.device).type == "cuda"
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    ppl = perplexity(model, tokenizer, text, seq_len=args.seq_len)
    elapsed = time.perf_counter() - start
    tokens = len(tokenizer(Path(text).read_text())["input_ids"])
    print(f"{metadata['tag']}: perplexity {ppl:.2f} on {text} ({args.seq_len}-token windows)")
    print(f"disk size {directory_size(args.directory) / 2**20:.1f} MiB")
    print(f"scoring: {tokens / elapsed:.0f} tokens/s on {args.device} ({args.seq_len}-token windows, batch 1)")
    if args.gen_tokens is None:  # the reference path on a CPU dequantizes every layer at every token
        args.gen_tokens = 32 if on_cuda else 8
    if args.gen_tokens > 0:
        prompt = tokenizer("The GNU General Public License is", return_tensors="pt")["input_ids"].to(args.device)
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=2, do_sample=False, pad_token_id=tokenizer.eos_token_id)  # warm-up
            if on_cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = model.generate(prompt, max_new_tokens=args.gen_tokens, min_new_tokens=args.gen_tokens,
                                 do_sample=False, pad_token_id=tokenizer.eos_token_id)
            if on_cuda:
                torch.cuda.synchronize()
        new_tokens = out.shape[1] - prompt.shape[1]
        bound = "bound by Python overhead, not by the kernels" if on_cuda else \
            "the CPU reference path dequantizes every layer at every token"
        print(f"generation: {new_tokens / (time.perf_counter() - start):.1f} tokens/s on {args.device} "
              f"(greedy, batch 1, eager HF generate: {bound})")
        if on_cuda and args.gen_tokens > 1:
            from .decoding import capture_refusal, greedy_decode

            refusal = capture_refusal(model)
            if refusal is not None:
                print(f"decoding under a CUDA graph: not measured ({refusal})")
            else:
                decoded = greedy_decode(model, prompt, args.gen_tokens)
                steps = decoded.tokens.shape[1] - 1
                print(f"decoding: {steps / decoded.decode_s:.1f} tokens/s on {args.device} (greedy, batch 1, each "
                      f"step replayed from a CUDA graph over a static KV cache: the kernels' speed)")
    print(_peak_memory_text(args.device))
    return 0


def prompt_ids(tokenizer, prompt: str, chat: bool):
    """Token ids [1, T] of ``prompt``: wrapped in the tokenizer's chat template as one user turn (with
    the assistant's opening) when ``chat`` and the tokenizer has one, else the plain text."""
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    return tokenizer(prompt, return_tensors="pt")["input_ids"]


def cmd_generate(args) -> int:
    import torch
    from transformers import TextStreamer

    from .io import load_quantized

    if not args.prompt.strip():
        raise ValueError("--prompt is empty")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0 (0: greedy), got {args.temperature}")
    graph = args.cuda_graph or args.compile
    if graph and args.temperature > 0:
        raise ValueError("--cuda-graph / --compile decode greedily: leave --temperature at 0")
    _check_device(args.device)
    if graph and torch.device(args.device).type != "cuda":
        raise ValueError(f"--cuda-graph / --compile need --device cuda, got --device {args.device}")
    model, tokenizer = load_quantized(args.directory, device=args.device)
    if tokenizer is None:
        raise FileNotFoundError(f"{args.directory} has no tokenizer files: generation needs one")
    ids = prompt_ids(tokenizer, args.prompt, chat=not args.no_chat_template).to(args.device)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)  # prints as tokens come
    if graph:
        from .decoding import greedy_decode

        forward = torch.compile(model, fullgraph=True, dynamic=False) if args.compile else None
        decoded = greedy_decode(model, ids, args.max_new_tokens, forward=forward,
                                eos_token_id=tokenizer.eos_token_id, streamer=streamer)
        steps = decoded.tokens.shape[1] - 1
        summary = f"[{decoded.tokens.shape[1]} tokens; prefill and capture{' (compiling)' if args.compile else ''} " \
                  f"{decoded.capture_s:.1f} s"
        if steps:
            summary += f", then {steps} CUDA-graph steps at {steps / decoded.decode_s:.1f} tokens/s, printing included"
        print(summary + "]", file=sys.stderr)
        return 0
    sampling = {"do_sample": True, "temperature": args.temperature, "top_k": 0} if args.temperature > 0 else \
        {"do_sample": False}
    torch.manual_seed(args.seed)
    on_cuda = torch.device(args.device).type == "cuda"
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                             pad_token_id=tokenizer.eos_token_id, streamer=streamer, **sampling)
    if on_cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    new_tokens = out.shape[1] - ids.shape[1]
    print(f"[{new_tokens} tokens in {elapsed:.1f} s on {args.device} (the prompt's prefill included): "
          f"{new_tokens / elapsed:.1f} tokens/s through eager HF generate"
          + ("; --cuda-graph decodes without its Python overhead]" if on_cuda else "]"), file=sys.stderr)
    return 0


def cmd_convert(args) -> int:
    from .convert import convert_checkpoint
    from .io import directory_size, read_metadata

    _check_writable(args.dst)
    start = time.perf_counter()
    dst = convert_checkpoint(args.src, args.dst, overwrite=args.overwrite, progress=True)
    metadata = read_metadata(dst)
    source = metadata["method_config"]["imported_from"]
    activations = f", int{metadata['act_bits']} activations per token" if metadata["act_bits"] else ""
    print(f"[{metadata['tag']}] converted {source['layers']} layers of {args.src} ({source['format']} "
          f"{source['layout']}, group size {metadata['group_size']}, "
          f"{'symmetric' if metadata['symmetric'] else 'with zero points'}{activations})")
    if source.get("input_permutations"):
        print(f"act-order: {source['input_permutations']} layers gather their input once per call (q/k/v and gate/up "
              f"share one order each); down_proj's order moved into gate/up's outputs in "
              f"{source.get('down_proj_permutations_folded', 0)} blocks")
    print(f"wrote {dst} ({directory_size(dst) / 2**20:.1f} MiB) in {time.perf_counter() - start:.1f} s; "
          f"`quantkern eval {dst}` or `quantkern generate {dst} --prompt ...` run it")
    return 0


def _group_size_argument(text: str):
    """--group-size: 'auto' or a supported size, checked as the arguments are parsed (before the model loads), so
    that the error names the subcommand's usage."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer or 'auto', got {text!r}") from None
    if value not in SUPPORTED_GROUP_SIZES:
        raise argparse.ArgumentTypeError(f"must be 32, 64, 128, -1 (per channel) or 'auto', got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quantkern", description="Low-bit LLM quantization and kernels.")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="list backends and kernels, or show a checkpoint's metadata")
    info.add_argument("directory", nargs="?", help="a quantized checkpoint directory")
    info.set_defaults(func=cmd_info)

    from .quantizers import METHODS

    q = sub.add_parser("quantize", help="quantize a Hugging Face model (default: the built-in SmolLM2-135M-Instruct)")
    q.add_argument("--src", help="source model directory (default: the built-in SmolLM2-135M-Instruct)")
    q.add_argument("--dst", help="output directory (default: <model>_<tag> in the current directory)")
    q.add_argument("--method", default="rtn", choices=list(METHODS), help="quantization method (default: rtn)")
    q.add_argument("--bits", type=int, default=None, choices=[4, 8],
                   help="weight bits (default: 4; smoothquant: 8)")
    q.add_argument("--group-size", default=None, type=_group_size_argument,
                   help="32, 64, 128, -1 (per-channel) or auto: the largest of 128/64/32 dividing every layer "
                        "(default: auto; smoothquant: -1)")
    q.add_argument("--asymmetric", action="store_true", help="asymmetric weights with zero points")
    q.add_argument("--acts-bits", type=int, choices=[4, 8], default=None,
                   help="quantize activations per token too (W4A4, W4A8, W8A8; default: weight-only, "
                        "smoothquant: 8)")
    q.add_argument("--kv-bits", type=int, choices=[4, 8], default=None,
                   help="quantize the KV cache (quarot; default: no)")
    q.add_argument("--rotation", choices=["hadamard", "pca"], default=None,
                   help="quarot's residual rotation (default: hadamard)")
    q.add_argument("--calib", help="calibration text: one sample per line, or JSONL with a 'text' field "
                                   "(default: the model writes its own samples)")
    q.add_argument("--calib-samples", type=int, default=128, help="calibration windows (default: 128)")
    q.add_argument("--calib-seq-len", type=int, default=512, help="tokens per calibration window (default: 512)")
    q.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="a method's own setting, e.g. --option damp=0.01 --option act_order=true (repeatable)")
    q.add_argument("--keep-lm-head-fp16", action=argparse.BooleanOptionalAction, default=True,
                   help="leave lm_head unquantized (default: yes)")
    q.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"],
                   help="dtype of scales and of the tensors left unquantized (default: float16)")
    q.add_argument("--seed", type=int, default=0, help="seed of calibration sampling and random rotations")
    q.add_argument("--device", default="cpu", help="device to quantize and evaluate on (default: cpu)")
    q.add_argument("--overwrite", action="store_true",
                   help="replace an existing --dst that is a quantkern checkpoint (nothing else is replaced)")
    q.add_argument("--eval-text", help="text file for perplexity (default: /usr/share/common-licenses/GPL-3)")
    q.add_argument("--seq-len", type=int, default=512, help="perplexity window in tokens (default: 512)")
    q.add_argument("--no-eval", action="store_true", help="skip the perplexity evaluation")
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("eval", help="perplexity, disk size and speed of a quantized checkpoint")
    e.add_argument("directory", help="a checkpoint written by `quantkern quantize`")
    e.add_argument("--eval-text", help="text file (default: /usr/share/common-licenses/GPL-3)")
    e.add_argument("--seq-len", type=int, default=512, help="perplexity window in tokens (default: 512)")
    e.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    e.add_argument("--gen-tokens", type=int, default=None,
                   help="tokens to generate for the decoding speed figure (0: skip; default: 32 on a GPU, 8 on a CPU)")
    e.set_defaults(func=cmd_eval)

    g = sub.add_parser("generate", help="generate text from a prompt with a quantized checkpoint")
    g.add_argument("directory", help="a checkpoint written by `quantkern quantize`")
    g.add_argument("--prompt", required=True,
                   help="the prompt (a user turn of the chat template, if the model has one)")
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default: 64)")
    g.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default: 0, greedy)")
    g.add_argument("--seed", type=int, default=0, help="seed of the sampling (default: 0)")
    g.add_argument("--no-chat-template", action="store_true", help="feed the prompt as plain text")
    g.add_argument("--cuda-graph", action="store_true",
                   help="greedy decoding with each step replayed from a CUDA graph over a static KV cache (GPU)")
    g.add_argument("--compile", action="store_true",
                   help="as --cuda-graph, the step compiled by torch.compile first (tens of seconds)")
    g.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("convert", help="import a GPTQ, AWQ, AutoRound or compressed-tensors checkpoint into "
                                       "quantkern's format")
    c.add_argument("src", help="a Hugging Face model directory quantized by GPTQ (auto-gptq, GPTQModel), AWQ "
                               "(AutoAWQ, GEMM), AutoRound or llm-compressor (compressed-tensors: W4A16, W4A8, W8A8)")
    c.add_argument("--dst", required=True, help="output directory")
    c.add_argument("--overwrite", action="store_true",
                   help="replace an existing --dst that is a quantkern checkpoint (nothing else is replaced)")
    c.set_defaults(func=cmd_convert)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError, TypeError, KeyError) as error:  # OSError: files, directories, permissions
        print(f"quantkern {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a checkpoint is written through a staging directory: none is left half-written
        print(f"\nquantkern {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
