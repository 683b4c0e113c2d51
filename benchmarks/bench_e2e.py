"""End to end: greedy decoding of a random-weight model built from a real config, bf16 against
W4A16 (RTN, group 128; or W4A4 / W8A8 with ``--act-bits``) on our kernels, in one run: tokens/s at
batch 1 and 16, peak memory.

Eager HF forward is bound by Python overhead (about 70 ms a token at 8B), so each decode step is
captured once in a CUDA graph over a static KV cache and replayed: that is where kernel speed shows.
If capture fails, the reason is reported and the eager figure stands alone.

    python benchmarks/bench_e2e.py --config llama3-8b --batches 1 16 --json out/bench_e2e.json
    python benchmarks/bench_e2e.py --act-bits 4 --group-size -1     # W4A4 per-channel, per-token int4 acts
    python benchmarks/bench_e2e.py --act-bits 4 --group-size -1 --online-rotation   # as QuaRot's layers run
    python benchmarks/bench_e2e.py --compile --fuse-projections    # q/k/v and gate/up as one GEMM each, too

``--online-rotation``: QuaRot's online Hadamard before every down_proj and o_proj
(``QuantLinear.from_linear(..., rotate=True)``); with ``--act-bits`` it runs fused with the activation
quantization (``ops.hadamard_quantize``).

``--compile``: a third mode, the decode step through ``torch.compile(model, fullgraph=True, dynamic=False)``
(Inductor fuses the norms, rotary embedding and activations around our ops, which stay single graph nodes),
captured in a CUDA graph like the second. It compiles once per model and batch size (tens of seconds each);
the time of the first compiled step is reported as ``compile_s``.

``--quantize-lm-head``: lm_head quantized too (it stays bf16 by default, as in quantkern's checkpoints).

``--fuse-projections``: the quantized model once more with q/k/v_proj and gate/up_proj as one GEMM each
(``quantkern.fuse_projections``; with ``--act-bits``, one activation quantization per group too), in the same run.

``--act-order``: the quantized model once more with random input orders, as `quantkern convert` makes GPTQ
act-order (desc_act) checkpoints: q/k/v share one order, gate/up another, o_proj its own, and down_proj none (its
order is folded into gate/up's outputs): three gathers per block (``ops.permute_columns``), in the same run.

``--breakdown``: where a decode step's GPU time goes, per kind of kernel (ours, cuBLAS, attention, Inductor's
fused kernels, the rest), from torch.profiler over replays of the last graph mode (a second table).

``--projections``: the GPU time of each projection (q_proj ... down_proj, lm_head) per decode step, from profiled
eager steps (a third table; ``projection_breakdown`` says why eager).
"""

from __future__ import annotations

import argparse
import time

import torch

from common import print_table, write_json
from quantkern.decoding import GraphDecoder
from quantkern.nn import kernel_device

CONFIGS = {  # from the models' published config.json files
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, rms_norm_eps=1e-5,
                      max_position_embeddings=8192, tie_word_embeddings=False),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0, rms_norm_eps=1e-5,
                         max_position_embeddings=8192, tie_word_embeddings=True),
}


def build_model(name: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**CONFIGS[name])
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise directly in the target dtype: 16 GB, not 32, at 8B
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


# Kernel name patterns per kind, first match wins (our kernels live in namespace quantkern).
KERNEL_KINDS = (("quantkern", ("quantkern",)),
                ("attention", ("flash", "fmha", "attention", "sdpa", "softmax")),
                ("cublas", ("gemm", "nvjet", "cutlass", "xmma", "gemv")),
                ("inductor", ("triton_",)))


def add_act_order_permutations(model) -> None:
    """Random input orders on the quantized projections, shared as `quantkern convert` leaves an act-order
    checkpoint's (GPTQ derives one order per input: q/k/v's, gate/up's; down_proj's is folded away)."""
    shared = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up",
              "o_proj": "o"}
    for block in model.model.layers:
        orders = {}
        for name, module in block.named_modules():
            role = shared.get(name.rsplit(".", 1)[-1])
            if role is None or not hasattr(module, "input_permutation"):
                continue
            if role not in orders:
                # (where the layer runs: once prepared, its canonical buffers are parked in host memory)
                orders[role] = torch.randperm(module.in_features, device=kernel_device(module))
            module.input_permutation = orders[role]  # (the buffer's slot, None until now)


def kernel_breakdown(decoder, steps: int = 8) -> dict:
    """GPU time per decode step (us) by kind of kernel, over ``steps`` graph replays (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        decoder.decode(steps, use_graph=True)
        torch.cuda.synchronize()
    totals = {kind: 0.0 for kind, _ in KERNEL_KINDS}
    totals["other"] = 0.0
    for event in prof.key_averages():
        device_us = event.self_device_time_total
        if device_us <= 0:
            continue
        name = event.key.lower()
        kind = next((kind for kind, patterns in KERNEL_KINDS if any(p in name for p in patterns)), "other")
        totals[kind] += device_us / steps
    return totals


PROJECTION_ROLES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")


def projection_breakdown(decoder, steps: int = 4) -> dict:
    """GPU time per decode step (us) of each projection's kernels, summed over the layers (activation quantizers
    and online rotations included), from eager steps with a profiler range around every Linear by its role (the
    last part of its name). Eager, as graph replays do not say which layer launched a kernel; the kernels are
    the same, without the graph's overlap of one kernel's start with the previous one's tail. With fused
    projections a group's GEMM runs in its first member's call (q_proj, gate_proj)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from quantkern.nn import QuantLinear

    open_ranges, handles = [], []

    def enter(role):
        open_ranges.append(record_function(f"projection:{role}"))
        open_ranges[-1].__enter__()

    def leave():
        open_ranges.pop().__exit__(None, None, None)

    for name, module in decoder.model.named_modules():
        role = name.rsplit(".", 1)[-1]
        if role in PROJECTION_ROLES and isinstance(module, (torch.nn.Linear, QuantLinear)):
            handles.append(module.register_forward_pre_hook(lambda m, args, role=role: enter(role)))
            handles.append(module.register_forward_hook(lambda m, args, out: leave()))
    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            decoder.decode(steps, use_graph=False)
            torch.cuda.synchronize()
    finally:
        for handle in handles:
            handle.remove()
    totals = {role: 0.0 for role in PROJECTION_ROLES}
    for event in prof.key_averages():
        if event.key.startswith("projection:"):
            totals[event.key.split(":", 1)[1]] += event.device_time_total / steps
    return totals


def measure(model, batch: int, prompt_len: int, new_tokens: int, use_graph: bool, forward=None,
            breakdown: bool = False, projections: bool = False) -> dict:
    # (room for the 4 warm-up steps, the timed ones and kernel_breakdown's 8)
    decoder = GraphDecoder(model, batch, prompt_len + new_tokens + 16, forward)
    generator = torch.Generator("cuda").manual_seed(batch)  # the same prompt for every mode and model
    prompt = torch.randint(0, model.config.vocab_size, (batch, prompt_len), device="cuda", generator=generator)
    decoder.prefill(prompt)
    first_step_s = None
    if use_graph:
        first_step_s = decoder.capture()
        decoder.prefill(prompt)  # reset position after the warm-up steps
    decoder.decode(4, use_graph)
    torch.cuda.synchronize()
    start = time.perf_counter()
    tokens = decoder.decode(new_tokens, use_graph)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    result = {"tokens_per_s": batch * new_tokens / elapsed, "ms_per_step": 1e3 * elapsed / new_tokens,
              "tokens": torch.cat(tokens, dim=1)}
    if forward is not None:
        result["compile_s"] = first_step_s
    if breakdown:
        result["kernel_us_per_step"] = kernel_breakdown(decoder)
    if projections:
        result["projection_us_per_step"] = projection_breakdown(decoder)
    return result


def first_difference(tokens: torch.Tensor, other: torch.Tensor):
    """The first decode step (column) where two [batch, steps] token tensors differ; None if equal."""
    differs = (tokens != other).any(dim=0).nonzero()
    return int(differs[0]) if len(differs) else None


def run_all(model, label: str, batches, prompt_len: int, new_tokens: int, rows: list, results: list,
            compile_model: bool, breakdown: bool, projections: bool) -> None:
    modes = [("eager", False, None), ("cuda_graph", True, None)]
    if compile_model:
        # One wrapper per model: it recompiles per batch size (static shapes), and the quantized model is
        # the bf16 one with its Linears replaced, so the bf16 wrapper's compiled code is dropped first.
        torch._dynamo.reset()
        modes.append(("compiled_graph", True, torch.compile(model, fullgraph=True, dynamic=False)))
    names = [mode for mode, _, _ in modes]
    for batch in batches:
        torch.cuda.reset_peak_memory_stats()
        entry = {"model": label, "batch": batch}
        for mode, use_graph, forward in modes:
            try:
                entry[mode] = measure(model, batch, prompt_len, new_tokens, use_graph, forward,
                                      breakdown and mode == names[-1], projections and mode == "eager")
            except Exception as error:  # report, don't hide: the table says which mode failed and why
                entry[mode] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"}
        entry["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        # Each graph must compute what eager does: the same greedy tokens (reproducible at batch 1; at batch 16
        # even bf16 eager differs between runs, docs/PERF.md session 11).
        # (Compiled code rounds differently from eager: there a difference late in a random-weight model's
        # decode can be a near tie; the step where it starts is recorded.)
        for mode in names[1:]:
            if "tokens" in entry["eager"] and "tokens" in entry[mode]:
                step = first_difference(entry["eager"]["tokens"], entry[mode]["tokens"])
                entry[f"{mode}_tokens_match_eager"] = step is None
                entry[f"{mode}_first_different_step"] = step
        for mode in names:
            entry[mode].pop("tokens", None)
        results.append(entry)
        cell = lambda m: (f"{entry[m]['tokens_per_s']:.1f}" if "tokens_per_s" in entry[m]  # noqa: E731
                          else "failed")
        match = lambda m: ("-" if f"{m}_first_different_step" not in entry  # noqa: E731
                           else "yes" if entry[f"{m}_tokens_match_eager"]
                           else f"from step {entry[f'{m}_first_different_step']}")
        rows.append([label, batch] + [cell(mode) for mode in names] + [f"{entry['peak_memory_gib']:.1f}"]
                    + [match(mode) for mode in names[1:]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="llama3-8b", choices=sorted(CONFIGS))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--group-size", type=int, default=128, help="-1: per-channel")
    parser.add_argument("--bits", type=int, default=4, choices=[4, 8], help="weight bits")
    parser.add_argument("--act-bits", type=int, choices=[4, 8],
                        help="quantize activations per token too (W4A4, W4A8, W8A8); default: 16-bit activations")
    parser.add_argument("--online-rotation", action="store_true",
                        help="an online Hadamard rotation before every down_proj and o_proj, as QuaRot's models run")
    parser.add_argument("--compile", action="store_true",
                        help="also time the decode step compiled by torch.compile, in a CUDA graph")
    parser.add_argument("--quantize-lm-head", action="store_true",
                        help="quantize lm_head too, as `quantkern quantize --no-keep-lm-head-fp16` does "
                             "(default: lm_head stays bf16)")
    parser.add_argument("--fuse-projections", action="store_true",
                        help="also time the quantized model with q/k/v and gate/up fused into one GEMM each")
    parser.add_argument("--act-order", action="store_true",
                        help="also time the quantized model with act-order's input gathers (random orders)")
    parser.add_argument("--breakdown", action="store_true",
                        help="profile the last graph mode: GPU time per step by kind of kernel")
    parser.add_argument("--projections", action="store_true",
                        help="profile eager steps: GPU time per step of each projection (q_proj ... lm_head)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    from quantkern.nn import QuantLinear, fuse_projections, linear_layers, replace_linear, set_submodule

    dtype = torch.bfloat16
    torch.manual_seed(0)
    model = build_model(args.config, dtype)
    rows, results = [], []
    run_all(model, "bf16", args.batches, args.prompt_len, args.new_tokens, rows, results, args.compile, args.breakdown,
            args.projections)

    start = time.perf_counter()
    rotated = ("down_proj", "o_proj") if args.online_rotation else ()
    originals = [(name, linear) for name, linear in linear_layers(model) if name.rsplit(".", 1)[-1] in rotated]
    kept = () if args.quantize_lm_head else ("lm_head",)
    replace_linear(model, bits=args.bits, group_size=args.group_size, act_bits=args.act_bits, scale_dtype=dtype,
                   skip=kept + rotated)
    for name, linear in originals:
        set_submodule(model, name, QuantLinear.from_linear(linear, args.bits, args.group_size, act_bits=args.act_bits,
                                                           scale_dtype=dtype, rotate=True))
    del originals
    torch.cuda.empty_cache()
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.prepare(dtype)
    quantize_s = time.perf_counter() - start
    backend = next(m for m in model.modules() if isinstance(m, QuantLinear))._prepared.backend
    groups = "per-channel" if args.group_size == -1 else f"g{args.group_size}"
    quantized = (f"W{args.bits}A{args.act_bits or 16} {groups}" + (", online Hadamard" if args.online_rotation else "")
                 + (", lm_head too" if args.quantize_lm_head else ""))
    run_all(model, f"{quantized} ({backend})", args.batches, args.prompt_len, args.new_tokens,
            rows, results, args.compile, args.breakdown, args.projections)
    if args.act_order:
        add_act_order_permutations(model)
        quantized += ", act-order"
        run_all(model, f"{quantized} ({backend})", args.batches, args.prompt_len, args.new_tokens,
                rows, results, args.compile, args.breakdown, args.projections)
    if args.fuse_projections:
        fuse_projections(model)
        for module in model.modules():
            if isinstance(module, QuantLinear):
                module.prepare(dtype)  # once per fused group
        torch.cuda.empty_cache()
        run_all(model, f"{quantized}, fused q/k/v, gate/up ({backend})", args.batches, args.prompt_len,
                args.new_tokens, rows, results, args.compile, args.breakdown, args.projections)
    modes = ["eager", "cuda_graph"] + (["compiled_graph"] if args.compile else [])
    for entry in results:
        for mode in modes:
            if "error" in entry[mode]:
                print(f"{entry['model']} batch {entry['batch']} {mode}: {entry[mode]['error']}")
    if args.json:
        write_json(args.json, results, {"config": args.config, "quantized": quantized, "prompt_len": args.prompt_len,
                                        "new_tokens": args.new_tokens, "quantize_and_prepare_s": quantize_s})
    print(f"\nend to end, {args.config} (random weights), greedy decode of {args.new_tokens} tokens after "
          f"{args.prompt_len}: tokens/s (all sequences), peak GPU memory")
    print_table(rows, ["model", "batch"] + modes + ["peak_GiB"] + [f"{mode}==eager" for mode in modes[1:]])
    if args.breakdown:
        kinds = [kind for kind, _ in KERNEL_KINDS] + ["other"]
        table = []
        for entry in results:
            split = entry[modes[-1]].get("kernel_us_per_step")
            if split:
                table.append([entry["model"], entry["batch"]] + [f"{split[k]:.0f}" for k in kinds]
                             + [f"{sum(split.values()):.0f}", f"{1e3 * entry[modes[-1]]['ms_per_step']:.0f}"])
        print(f"\nGPU time per decode step ({modes[-1]}, us) by kind of kernel, and the step's wall time")
        print_table(table, ["model", "batch"] + kinds + ["kernels", "step"])
    if args.projections:
        table = [[entry["model"], entry["batch"]] + [f"{split[role]:.0f}" for role in PROJECTION_ROLES]
                 + [f"{sum(split.values()):.0f}"]
                 for entry in results if (split := entry["eager"].get("projection_us_per_step"))]
        print("\nGPU time per decode step (eager steps, us) of each projection's kernels, all layers")
        print_table(table, ["model", "batch"] + list(PROJECTION_ROLES) + ["all"])


if __name__ == "__main__":
    main()
