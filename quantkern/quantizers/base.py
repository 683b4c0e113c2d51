"""The interface shared by every quantization method, and the block-by-block driver.

The driver (``quantize_model``) does what all methods need; a method (a ``Quantizer`` subclass)
only says how to quantize one block:

1. find the model's structure (``quantkern.models``), choose the group size, check every layer;
2. cut or generate calibration windows (``quantkern.calibration``) if the method needs them;
3. ``Quantizer.prepare_model``: whole-model transforms done before any block (QuaRot's rotations);
4. run the embeddings once and keep the first block's inputs; then for each block in turn: move
   it to the compute device, ``Quantizer.quantize_block`` (which may run the block over the
   calibration inputs as often as it likes through ``BlockRunner`` and must leave its Linears
   holding their dequantized weights), compute the block's outputs with those weights as the next
   block's inputs, replace its Linears with ``QuantLinear`` and move it back. Only one block and
   its activations live on the compute device, so a model larger than the GPU quantizes on it;
5. lm_head: kept in its dtype (the seeds' ``headfp16``, default) or RTN-quantized;
6. ``Quantizer.finalize``: model-level settings that need the quantized model (the KV cache).

Methods are registered in ``quantkern.quantizers.METHODS`` by their CLI name.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Union

import torch
from torch import nn

from .. import ops, reference
from ..calibration import check_seq_len
from ..format import QuantizedWeight, check_bits, group_length
from ..models import (ATTENTION_ROLES, MLP_ROLES, DecoderBlock, ModelStructure, UnsupportedModelError,
                      model_structure)
from ..nn import AUTO_GROUP_SIZES, QuantLinear, set_submodule

ALL_ROLES = ATTENTION_ROLES + MLP_ROLES


@dataclass
class QuantizeConfig:
    """Everything a quantization run needs to know; ``options`` holds a method's own knobs."""

    method: str = "rtn"
    bits: int = 4
    group_size: Union[int, str] = "auto"  # 32/64/128/..., -1 per-channel, "auto": largest of 128/64/32 dividing all
    symmetric: bool = True
    act_bits: Optional[int] = None
    kv_bits: Optional[int] = None
    rotation: Optional[str] = None  # QuaRot: "hadamard" or "pca"
    keep_lm_head_fp16: bool = True
    scale_dtype: torch.dtype = torch.float16
    calib_path: Optional[str] = None  # None: self-generated calibration windows (unless calib_windows)
    calib_windows: Optional[torch.Tensor] = None  # token ids [samples, seq_len] made by the caller
    calib_samples: int = 128
    calib_seq_len: int = 512
    seed: int = 0
    device: Union[str, torch.device] = "cpu"
    kernel_shapes: str = "cuda"  # refuse W4A16 shapes the CUDA kernel cannot serve ("reference": no check)
    options: dict = field(default_factory=dict)


@dataclass
class QuantizeResult:
    model: nn.Module
    group_size: int
    calibration: Optional[dict]
    timings_s: Dict[str, float]
    extra_config: Dict[str, object]  # method facts the checkpoint must record (rotation, alpha, ...)


class BlockRunner:
    """Runs one decoder block over the calibration inputs, one window at a time.

    ``inputs`` are the block's input hidden states (one [1, seq, hidden] tensor per window, on the
    compute device) and ``kwargs`` the arguments the model passed to its blocks (rotary embeddings,
    attention mask), the same for every window."""

    def __init__(self, inputs: List[torch.Tensor], kwargs: dict):
        self.inputs = inputs
        self.kwargs = kwargs

    @torch.no_grad()
    def run(self, module: nn.Module, hooks: Optional[Dict[nn.Module, Callable]] = None,
            keep_outputs: bool = False, stop_after: Optional[nn.Module] = None) -> Optional[List[torch.Tensor]]:
        """Run ``module`` (the block) over every window. ``hooks`` maps submodules to
        ``callback(input, output)``, called at each of their forwards with their first positional
        input (after any forward pre-hooks, such as an online rotation) and their output.
        ``stop_after``: abandon each window's forward once this submodule has run (a statistic of
        an early layer's input needs only the start of the block)."""
        if keep_outputs and stop_after is not None:
            raise ValueError("keep_outputs needs the whole forward: do not pass stop_after")
        handles = [sub.register_forward_hook(_hook(callback)) for sub, callback in (hooks or {}).items()]
        if stop_after is not None:
            handles.append(stop_after.register_forward_hook(_raise_stop))
        outputs = [] if keep_outputs else None
        try:
            for hidden in self.inputs:
                try:
                    out = module(hidden, **self.kwargs)
                except _StopBlock:
                    continue
                if keep_outputs:
                    outputs.append(out[0] if isinstance(out, tuple) else out)
        finally:
            for handle in handles:
                handle.remove()
        return outputs

    @property
    def n_tokens(self) -> int:
        return sum(x.shape[0] * x.shape[1] for x in self.inputs)


class _StopBlock(Exception):
    pass


def _raise_stop(module, args, output):
    raise _StopBlock


def _hook(callback):
    def hook(module, args, output):
        callback(args[0] if args else None, output)
    return hook


def check_finite_inputs(statistic: torch.Tensor, layer_name: str) -> None:
    """ValueError naming ``layer_name`` if ``statistic`` (of its calibration inputs) holds NaN or Inf."""
    if not bool(torch.isfinite(statistic).all()):
        raise ValueError(f"{layer_name}: its calibration inputs contain NaN or Inf (the float model overflows "
                         f"on the calibration windows: an fp16 model? quantize a bfloat16 or float32 copy)")


def check_bool_options(method: str, options: dict, names) -> None:
    """ValueError unless each option in ``names`` is a bool: a CLI ``--option act_order=False`` (not JSON:
    read as the string "False") must not run as True."""
    for name in names:
        if not isinstance(options[name], bool):
            raise ValueError(f"{method}: option {name} must be true or false (JSON: --option {name}=false), "
                             f"got {options[name]!r}")


def check_int_option(method: str, options: dict, name: str, minimum: int = 1) -> None:
    """ValueError unless option ``name`` is an int (not a bool) of at least ``minimum``."""
    value = options[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{method}: option {name} must be an integer >= {minimum}, got {value!r}")


def check_positive_option(method: str, options: dict, name: str) -> None:
    """ValueError unless option ``name`` is a finite number > 0 (not a bool)."""
    value = options[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ValueError(f"{method}: option {name} must be a finite number > 0, got {value!r}")


@torch.no_grad()
def check_norm_folds(norm: nn.Module, name: str, method: str) -> None:
    """``UnsupportedModelError`` naming ``name`` unless multiplying the norm's weight (and bias) by a
    per-channel factor multiplies its output by that factor, which folding a scale into it assumes
    (false for Gemma's ``x / rms(x) * (1 + weight)``). The norm is left as it was."""
    weight = getattr(norm, "weight", None)
    bias = getattr(norm, "bias", None)
    bias = bias if isinstance(bias, torch.Tensor) else None
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        raise UnsupportedModelError(f"{method}: {name}: {type(norm).__name__} has no weight vector to fold into")
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(4, weight.shape[0], generator=generator).to(device=weight.device, dtype=weight.dtype)
    factor = (torch.rand(weight.shape[0], generator=generator) + 0.5).to(device=weight.device)
    saved = [(t, t.data) for t in (weight, bias) if t is not None]
    expected = norm(probe).float() * factor
    try:
        for t, data in saved:
            t.data = (data.float() * factor).to(data.dtype)
        got = norm(probe).float()
    finally:
        for t, data in saved:
            t.data = data
    error = float((got - expected).norm() / expected.norm().clamp(min=1e-12))
    if not error < 1e-2:
        raise UnsupportedModelError(f"{method}: {name}: {type(norm).__name__} does not scale its output by its "
                                    f"weight (relative error {error:.3g}; e.g. Gemma's 1 + weight): "
                                    f"{method} cannot fold its scales into it")


def set_fake_quantized(linear: nn.Linear, qw: QuantizedWeight) -> None:
    """Make ``linear`` compute with the dequantized weights of ``qw`` (what its QuantLinear will use)."""
    linear.weight.data = reference.dequantize_weight(qw, linear.weight.dtype).to(linear.weight.device)


class Quantizer:
    """A quantization method. Subclasses set ``name`` and ``needs_calibration``, list their knobs
    with defaults in ``default_options``, and implement ``quantize_block``."""

    name = "base"
    needs_calibration = True
    default_options: dict = {}
    # What the CLI uses for --bits, --acts-bits, --group-size when the user leaves them out
    # (keys: "bits", "acts_bits", "group_size"); unset keys take the CLI's general defaults.
    cli_defaults: dict = {}

    def __init__(self, config: QuantizeConfig, group_size: int):
        unknown = set(config.options) - set(self.default_options)
        if unknown:
            raise ValueError(f"{self.name}: unknown option(s) {sorted(unknown)}; "
                             f"known: {sorted(self.default_options) or 'none'}")
        self.config = config
        self.group_size = group_size
        self.options = {**self.default_options, **config.options}

    def check(self, structure: ModelStructure) -> None:
        """Raise ValueError if the configuration does not suit this method (before any slow work)."""
        if self.config.rotation is not None:
            raise ValueError(f"{self.name} does not rotate; --rotation is for quarot")
        if self.config.kv_bits is not None:
            raise ValueError(f"{self.name} does not quantize the KV cache; --kv-bits is for quarot")

    def prepare_model(self, structure: ModelStructure, windows: Optional[torch.Tensor],
                      progress: bool = False) -> None:
        """Whole-model transforms before the block loop (default: none); ``progress``: a bar for any
        pass over the blocks they make."""

    def quantize_block(self, block: DecoderBlock, runner: Optional[BlockRunner]) -> Dict[str, QuantizedWeight]:
        """Quantize the block's seven Linears; return role -> QuantizedWeight, leaving each Linear
        holding its dequantized weights (``set_fake_quantized``). ``runner`` is None for methods
        without calibration."""
        raise NotImplementedError

    def layer_options(self, block: DecoderBlock, role: str) -> dict:
        """Keyword arguments of ``QuantLinear.from_quantized`` for this layer beyond the weight."""
        return {"act_bits": self.config.act_bits}

    def finalize(self, structure: ModelStructure) -> None:
        """Model-level settings after every block is quantized (default: none)."""

    def extra_config(self) -> Dict[str, object]:
        """Facts of this run to record in the checkpoint's metadata (method options by default)."""
        return {"options": dict(self.options)}

    def rtn(self, weight: torch.Tensor) -> QuantizedWeight:
        return reference.quantize_weight(weight.detach(), self.config.bits, self.group_size,
                                         self.config.symmetric, self.config.scale_dtype)


def resolve_group_size(linears: List[nn.Linear], requested) -> int:
    """``requested`` if given; for "auto"/None the largest of 128, 64, 32 dividing every in_features."""
    if requested not in (None, "auto"):
        return int(requested)
    for size in AUTO_GROUP_SIZES:
        if all(linear.in_features % size == 0 for linear in linears):
            return size
    return -1


def _check_layers(structure: ModelStructure, config: QuantizeConfig, group_size: int) -> None:
    check_bits(config.bits)
    if config.act_bits is not None:
        check_bits(config.act_bits)
        if not config.symmetric:  # else QuantLinear refuses it only after the first block is quantized
            raise ValueError(f"act_bits={config.act_bits}: integer-activation GEMMs need symmetric weights "
                             f"(no zero points); drop --asymmetric or --act-bits")
    if config.kv_bits is not None:
        check_bits(config.kv_bits)
    if config.scale_dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"scale dtype must be float16 or bfloat16, got {config.scale_dtype}")
    for block in structure.blocks:
        for role in ALL_ROLES:
            linear, name = block.linears[role], block.linear_names[role]
            try:
                group_length(group_size, linear.in_features)
            except ValueError as error:
                raise ValueError(f"{name}: {error}") from None
            if config.act_bits is None:
                reason = ops.weight_only_unsupported_reason(config.bits, group_size, linear.in_features,
                                                            linear.out_features, config.kernel_shapes)
                if reason:
                    raise ValueError(f"{name}: {reason}")


@torch.no_grad()
def _first_block_inputs(structure: ModelStructure, windows: torch.Tensor, device) -> BlockRunner:
    """Run the model up to its first block on every window; keep the block's inputs and kwargs."""
    from ..kv_cache import CACHE_ARGUMENT_NAMES  # imports transformers: not at module level

    class _Stop(Exception):
        pass

    captured_inputs, captured_kwargs = [], {}

    def pre_hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured_inputs.append(hidden)
        if not captured_kwargs:
            captured_kwargs.update({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _Stop

    first = structure.blocks[0].module
    handle = first.register_forward_pre_hook(pre_hook, with_kwargs=True)
    homes = [(module, _device_of(module)) for module in structure.non_block_modules()]
    for module, _ in homes:
        module.to(device)
    try:
        for window in windows:
            try:
                structure.model(window[None].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
        for module, home in homes:
            if home is not None:
                module.to(home)
    captured_kwargs["use_cache"] = False
    for name in CACHE_ARGUMENT_NAMES:  # cache / past_key_values, whichever this transformers passes
        captured_kwargs.pop(name, None)
    return BlockRunner(captured_inputs, captured_kwargs)


def _device_of(module: nn.Module):
    for tensor in list(module.parameters()) + list(module.buffers()):
        return tensor.device
    return None


def check_windows(model: nn.Module, windows: torch.Tensor, vocab_size: int) -> None:
    """ValueError unless ``windows`` are int64 token ids [samples >= 1, seq_len >= 1] below ``vocab_size``
    and no longer than the model's ``max_position_embeddings`` (when its config has one)."""
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.dtype != torch.int64:
        raise ValueError(f"calib_windows must be int64 token ids [samples, seq_len], got "
                         f"{getattr(windows, 'dtype', type(windows).__name__)} {tuple(getattr(windows, 'shape', ()))}")
    if windows.numel() == 0:
        raise ValueError(f"calibration windows are empty: shape {tuple(windows.shape)}")
    low, high = int(windows.min()), int(windows.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(f"calibration token ids must lie in [0, {vocab_size}) (the embedding's rows), "
                         f"got ids from {low} to {high}")
    check_seq_len(model, windows.shape[1])


def quantize_model(model: nn.Module, tokenizer, config: QuantizeConfig, progress: bool = True) -> QuantizeResult:
    """Quantize ``model`` in place with ``config.method``; returns the model and what was done.

    The configuration, every layer's shape and the calibration windows are checked before the model
    is touched: such errors leave it as it was. An error after that (inside a method: a Hessian that
    cannot be factorised, activations that overflow, ...) leaves it **partly transformed** (QuaRot's
    rotations applied, earlier blocks already ``QuantLinear``): quantize a copy, or reload the model,
    if it must survive a failure."""
    from tqdm.auto import tqdm

    from . import METHODS
    from ..calibration import calibration_windows, windows_sha256

    if config.method not in METHODS:
        raise ValueError(f"unknown method {config.method!r}; choose from {', '.join(METHODS)}")
    timings = {}
    start = time.perf_counter()
    structure = model_structure(model)
    all_linears = [block.linears[role] for block in structure.blocks for role in ALL_ROLES]
    group_size = resolve_group_size(all_linears, config.group_size)
    _check_layers(structure, config, group_size)
    quantizer = METHODS[config.method](config, group_size)
    quantizer.check(structure)
    device = torch.device(config.device)

    windows, calibration = None, None
    if not quantizer.needs_calibration and (config.calib_path is not None or config.calib_windows is not None):
        # (QuaRot decides per run: RTN weights on a Hadamard rotation, with no clip search, read no data)
        warnings.warn(f"{config.method} with these settings reads no calibration data: the calibration given is "
                      f"not used", stacklevel=2)
    if quantizer.needs_calibration:
        calib_start = time.perf_counter()
        model_home = _device_of(model)
        if config.calib_windows is not None:
            windows = config.calib_windows
            check_windows(model, windows, structure.embed_tokens.num_embeddings)
            calibration = {"source": "caller", "samples": windows.shape[0], "seq_len": windows.shape[1],
                           "seed": None, "sha256": windows_sha256(windows)}
        else:
            check_seq_len(model, config.calib_seq_len)  # before the model writes its own samples
            if config.calib_path is None:
                model.to(device)  # the model writes its own samples: it runs whole, once
            try:
                windows, info = calibration_windows(model, tokenizer, config.calib_path, config.calib_samples,
                                                    config.calib_seq_len, config.seed, progress=progress)
            finally:
                model.to(model_home)
            check_windows(model, windows, structure.embed_tokens.num_embeddings)
            calibration = info.as_dict()
        timings["calibration"] = round(time.perf_counter() - calib_start, 2)

    quantizer.prepare_model(structure, windows, progress)
    runner = _first_block_inputs(structure, windows, device) if windows is not None else None

    blocks = structure.blocks
    label = f"{quantizer.name} W{config.bits}" + (f"A{config.act_bits}" if config.act_bits else "")
    for block in tqdm(blocks, desc=label, unit="block", disable=not progress):
        home = _device_of(block.module)
        block.module.to(device)
        quantized = quantizer.quantize_block(block, runner)
        missing = set(ALL_ROLES) - set(quantized)
        if missing:
            raise RuntimeError(f"{quantizer.name} left {sorted(missing)} of {block.name} unquantized")
        if runner is not None and block is not blocks[-1]:
            runner.inputs = runner.run(block.module, keep_outputs=True)
        for role in ALL_ROLES:
            linear = block.linears[role]
            layer = QuantLinear.from_quantized(quantized[role], linear.bias, **quantizer.layer_options(block, role))
            block.replace_linear(role, layer)
        block.module.to(home)
    runner = None

    if structure.lm_head is not None and not config.keep_lm_head_fp16:
        head = structure.lm_head
        if structure.tied_lm_head:  # the quantized head no longer shares the embedding's tensor
            model.config.tie_word_embeddings = False
        head_group = resolve_group_size([head], config.group_size) if config.group_size == "auto" else group_size
        qw = reference.quantize_weight(head.weight.detach(), config.bits, head_group, config.symmetric,
                                       config.scale_dtype)
        set_submodule(model, _qualified_name(model, head), QuantLinear.from_quantized(qw, head.bias))
    quantizer.finalize(structure)
    timings["quantize"] = round(time.perf_counter() - start, 2)
    return QuantizeResult(model, group_size, calibration, timings, quantizer.extra_config())


def _qualified_name(model: nn.Module, target: nn.Module) -> str:
    for name, module in model.named_modules():
        if module is target:
            return name
    raise ValueError("module not found in model")
