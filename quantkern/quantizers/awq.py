"""AWQ: activation-aware weight quantization (Lin et al., 2023, arXiv:2306.00978).

A few input channels of each Linear carry much larger activations than the rest, and the rounding
error of their weights costs the most output error. AWQ protects them without mixed precision:
for a Linear ``y = x W^T`` and any positive per-input-channel scale ``s``,
``y = (x / s) (W * s)^T`` exactly, and quantizing ``W * s`` (columns multiplied by ``s``) shrinks
the *relative* rounding error of the scaled-up columns. ``x / s`` costs nothing at inference: it
is folded into the operation that produces ``x`` (a norm's weight, or the output rows of the
previous Linear). Per block, in the order of the reference implementation:

1. *Capture*: one pass of the full-precision block over the calibration windows records the inputs
   of ``q_proj`` (= the input norm's output), ``o_proj``, ``gate_proj`` and ``down_proj``, the
   per-input-channel mean ``|x|`` of each over every token, and the arguments the block passes to
   its attention module (rotary embeddings, mask), so that attention can be run on its own.
2. *Scale search*, for each scaling pair (previous op -> Linears sharing its output as input):

   * ``input_layernorm -> (q_proj, k_proj, v_proj)``, loss on the attention module's output
     (with ``o_proj`` in full precision);
   * ``v_proj -> o_proj``, only when ``v_proj.out_features == o_proj.in_features`` (no grouped-query
     attention: with GQA a ``v_proj`` row feeds several ``o_proj`` columns, which cannot take
     different scales), loss on ``o_proj``'s output;
   * ``post_attention_layernorm -> (gate_proj, up_proj)``, loss on the MLP's output;
   * ``up_proj -> down_proj``, loss on ``down_proj``'s output.

   ``s = mean|x| ** alpha`` (clamped at 1e-4, then divided by ``sqrt(max(s) * min(s))`` so that the
   scales straddle 1), for ``alpha = i / n_grid``, ``i = 0 .. n_grid - 1`` (``alpha = 0`` is plain
   RTN). Each candidate replaces the pair's Linears by ``RTN(W * s) / s`` (the method's bits, group
   size, symmetric or asymmetric grid) and measures the mean squared error of the inspected
   module's output against its full-precision output; the best ``s`` wins. The attention and MLP
   losses run those modules over the search windows. The two single-Linear losses need no forward
   pass: with ``D = RTN(W * s) / s - W``, ``||X D^T||^2 = trace(D (X^T X) D^T)``, so they use the Gram
   matrix ``X^T X`` accumulated during the capture, over every calibration token.
   All searches run on the full-precision block, then all scales are folded: the previous op's
   weight (and bias) divided by ``s``, the Linears' columns multiplied by ``s``. The folding is exact
   in real arithmetic; it is checked on random inputs for each norm, so a norm of another form
   (Gemma's ``1 + weight``) is refused instead of silently changing the model.
3. *Clipping search* (the reference's ``auto_clip``), on the scaled weights and the correspondingly
   scaled inputs, for every Linear except ``q_proj`` and ``k_proj`` (their error passes through
   the query-key product, which a per-Linear output error does not see, as in the paper): for each
   output channel and weight group, the group's quantization range is shrunk to
   ``r = 1, 1 - 1/n_grid, ..., 1 - max_shrink`` of its RTN range (symmetric: ``[-r absmax, r absmax]``;
   asymmetric: ``[r min(w, 0), r max(w, 0)]``), and the ratio minimising the mean squared error of that
   group's share of the output, ``x_g . (RTN(clip(w_g)) - w_g)``, over ``n_clip_tokens`` tokens is kept;
   the weights are clamped to it. Plain RTN of the clamped weights then reproduces exactly that grid.
4. Every Linear is quantized with RTN (``reference.quantize_weight``) and left holding its
   dequantized weights.

Options (``QuantizeConfig.options``):

* ``n_grid`` (20): grid points of ``alpha`` in ``[0, 1)``, and the step ``1 / n_grid`` of the clip ratios.
* ``scale`` (True): run the scale search and folding (False: clipping only).
* ``clip`` (True): run the clipping search (False: scaling only).
* ``max_shrink`` (0.5): the smallest clip ratio tried is ``1 - max_shrink``; in ``[0, 1)``.
* ``n_clip_tokens`` (512): tokens of the clipping search, taken evenly spaced from the search windows
  (bounds its memory: output channels x tokens x groups floats, in chunks of output channels).
* ``duo_scaling`` (False): search ``s = mean|x| ** alpha / w_mean ** (1 - alpha)`` instead, where
  ``w_mean`` is each input channel's mean ``|w| / max|w| of its group`` over the pair's output rows
  (the later reference implementation's default), so that the search also weighs the weights' own
  spread; ``alpha = 0`` is then not plain RTN.
* ``search_windows`` (None: all): how many calibration windows (the first ones) the attention and
  MLP losses and the clipping tokens come from; the mean ``|x|`` statistics and the Gram matrices
  always use every window. Each scale candidate runs attention or the MLP over these windows, so
  this bounds the search's time and the memory of the stored inputs (4 to 8 windows of 512 tokens
  already give most of the gain on SmolLM2-135M; on a GPU all 128 are cheap).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from .. import reference
from ..format import QuantizedWeight, group_length, implicit_zero
from ..models import DecoderBlock, ModelStructure, UnsupportedModelError
from .base import ALL_ROLES, BlockRunner, Quantizer, check_finite_inputs, check_norm_folds, set_fake_quantized

# The captured inputs: which Linear's input, and the roles that read it.
INPUT_OF = {"qkv": "q_proj", "o": "o_proj", "gate_up": "gate_proj", "down": "down_proj"}
READERS = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate_up": ("gate_proj", "up_proj"),
           "down": ("down_proj",)}
CLIPPED_ROLES = ("v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # not q/k, as the paper
# Inputs of the pairs whose loss is one Linear's output error: ||X D^T||^2 = trace(D X^T X D^T)
# needs only the Gram matrix X^T X, so their search sees every token at the cost of one GEMM.
GRAM_KEYS = ("o", "down")
# fp32 temporaries per step of the clipping search: a step's output channels each take tokens x groups
# (the error) plus ~4 K (the clipped, fake-quantized and difference copies of their weights: per-channel
# groups make K the larger term).
CLIP_CHUNK_ELEMENTS = 1 << 24


@dataclass
class _Pair:
    """One scaling pair: ``prev`` (a norm or Linear) produces the input ``key`` of ``roles``;
    ``inspect`` maps that input to the output whose error the search measures, None when that
    output is the single Linear's own (its error then comes from the inputs' Gram matrix)."""

    name: str
    prev: nn.Module
    key: str
    roles: Tuple[str, ...]
    inspect: Optional[Callable[[torch.Tensor], torch.Tensor]]


class _Captured:
    """Per-block captures: the inputs of the search windows, mean |x| over all windows, and the
    attention module's call arguments."""

    def __init__(self):
        self.inputs: Dict[str, List[torch.Tensor]] = {key: [] for key in INPUT_OF}
        self.abs_sum: Dict[str, torch.Tensor] = {}
        self.n_tokens: Dict[str, int] = {key: 0 for key in INPUT_OF}
        self.gram: Dict[str, torch.Tensor] = {}  # sum of x x^T over every token, for GRAM_KEYS
        self.attn_args: Optional[tuple] = None
        self.attn_kwargs: Optional[dict] = None

    def mean_abs(self, key: str) -> torch.Tensor:
        return self.abs_sum[key] / self.n_tokens[key]


class AWQQuantizer(Quantizer):
    name = "awq"
    needs_calibration = True
    default_options = {
        "n_grid": 20,
        "scale": True,
        "clip": True,
        "max_shrink": 0.5,
        "n_clip_tokens": 512,
        "search_windows": None,
        "duo_scaling": False,
    }

    def __init__(self, config, group_size):
        super().__init__(config, group_size)
        opts = self.options
        if not _is_int(opts["n_grid"]) or opts["n_grid"] < 1:
            raise ValueError(f"awq: n_grid must be a positive int, got {opts['n_grid']!r}")
        for flag in ("scale", "clip", "duo_scaling"):
            if not isinstance(opts[flag], bool):
                raise ValueError(f"awq: {flag} must be True or False, got {opts[flag]!r}")
        shrink = opts["max_shrink"]
        if isinstance(shrink, bool) or not isinstance(shrink, (int, float)) or not 0 <= shrink < 1:
            raise ValueError(f"awq: max_shrink must be a number in [0, 1), got {shrink!r}")
        if not _is_int(opts["n_clip_tokens"]) or opts["n_clip_tokens"] < 1:
            raise ValueError(f"awq: n_clip_tokens must be a positive int, got {opts['n_clip_tokens']!r}")
        windows = opts["search_windows"]
        if windows is not None and (not _is_int(windows) or windows < 1):
            raise ValueError(f"awq: search_windows must be a positive int or None (all), got {windows!r}")
        # Per block, in order: {pair name: alpha chosen} and {role: mean clip ratio chosen}.
        self.alphas: List[Dict[str, float]] = []
        self.clip_ratios: List[Dict[str, float]] = []

    def check(self, structure: ModelStructure) -> None:
        super().check(structure)
        if self.options["scale"]:  # refuse a norm the scales cannot fold into before any calibration
            for block in structure.blocks:
                for role, norm in block.norms.items():
                    check_norm_folds(norm, f"{block.name}.{role}", self.name)

    # ------------------------------------------------------------------------------------------
    def quantize_block(self, block: DecoderBlock, runner: Optional[BlockRunner]) -> Dict[str, QuantizedWeight]:
        if runner is None:
            raise ValueError("awq needs calibration inputs (a BlockRunner)")
        captured = self._capture(block, runner)
        for key, role in INPUT_OF.items():
            check_finite_inputs(captured.abs_sum[key], block.linear_names[role])
        if self.options["scale"]:
            pairs = self._pairs(block, captured)
            found = [(pair, self._search_scale(block, pair, captured)) for pair in pairs]
            self.alphas.append({pair.name: alpha for pair, (_, alpha) in found})
            for pair, (scales, _) in found:
                fold_scales(pair.prev, [block.linears[role] for role in pair.roles], scales)
                # The captured inputs now reach the scaled Linears divided by s.
                captured.inputs[pair.key] = [x / scales.to(x.dtype) for x in captured.inputs[pair.key]]
        if self.options["clip"]:
            ratios = {}
            for key, roles in READERS.items():
                clip_roles = [role for role in roles if role in CLIPPED_ROLES]
                if not clip_roles:
                    continue
                tokens = self._clip_tokens(captured.inputs[key])
                for role in clip_roles:
                    linear = block.linears[role]
                    clipped, ratio = self._search_clip(linear.weight.detach(), tokens)
                    linear.weight.data = clipped.to(linear.weight.dtype)
                    ratios[role] = round(ratio, 4)
            self.clip_ratios.append(ratios)
        quantized = {}
        for role in ALL_ROLES:
            quantized[role] = self.rtn(block.linears[role].weight)
            set_fake_quantized(block.linears[role], quantized[role])
        return quantized

    def extra_config(self) -> Dict[str, object]:
        """The options, and per block the alphas and mean clip ratios the searches chose."""
        return {"options": dict(self.options), "alphas": self.alphas, "mean_clip_ratios": self.clip_ratios}

    # ------------------------------------------------------------------------------------------
    def _capture(self, block: DecoderBlock, runner: BlockRunner) -> _Captured:
        captured = _Captured()
        n_search = self.options["search_windows"] or len(runner.inputs)

        def recorder(key):
            def record(x, output):
                flat = x.detach().reshape(-1, x.shape[-1])
                total = flat.float().abs().sum(dim=0)
                captured.abs_sum[key] = captured.abs_sum[key] + total if key in captured.abs_sum else total
                captured.n_tokens[key] += flat.shape[0]
                if key in GRAM_KEYS:
                    gram = flat.float().T @ flat.float()
                    captured.gram[key] = captured.gram[key] + gram if key in captured.gram else gram
                if len(captured.inputs[key]) < n_search:
                    captured.inputs[key].append(x.detach())
            return record

        def attention_pre_hook(module, args, kwargs):
            if captured.attn_kwargs is None:  # the same for every window (see BlockRunner)
                captured.attn_args, captured.attn_kwargs = tuple(args), dict(kwargs)

        handle = block.attention.register_forward_pre_hook(attention_pre_hook, with_kwargs=True)
        try:
            runner.run(block.module, hooks={block.linears[role]: recorder(key) for key, role in INPUT_OF.items()})
        finally:
            handle.remove()
        return captured

    def _pairs(self, block: DecoderBlock, captured: _Captured) -> List[_Pair]:
        lin = block.linears
        args, kwargs = captured.attn_args, captured.attn_kwargs

        def attention(x):
            # Call attention as the block did, with x in place of its hidden states.
            if "hidden_states" in kwargs:
                out = block.attention(*args, **{**kwargs, "hidden_states": x})
            else:
                out = block.attention(x, *args[1:], **kwargs)
            return out[0] if isinstance(out, tuple) else out

        pairs = [_Pair("input_layernorm->qkv", block.norms["input_layernorm"], "qkv",
                       ("q_proj", "k_proj", "v_proj"), attention)]
        if lin["v_proj"].out_features == lin["o_proj"].in_features:
            pairs.append(_Pair("v_proj->o_proj", lin["v_proj"], "o", ("o_proj",), None))
        pairs.append(_Pair("post_attention_layernorm->gate_up", block.norms["post_attention_layernorm"],
                           "gate_up", ("gate_proj", "up_proj"), block.mlp))
        pairs.append(_Pair("up_proj->down_proj", lin["up_proj"], "down", ("down_proj",), None))
        return pairs

    def _fake_quantize(self, w: torch.Tensor) -> torch.Tensor:
        """``dequantize(RTN(w))`` in fp32, with the arithmetic of ``reference.quantize_weight`` and
        ``reference.dequantize_weight`` (scales rounded to their dtype first) minus the packing."""
        bits, n, k = self.config.bits, w.shape[0], w.shape[1]
        scales, zeros = reference.weight_quant_params(w, bits, self.group_size, self.config.symmetric,
                                                      self.config.scale_dtype)
        glen = group_length(self.group_size, k)
        scale = scales.float()[..., None]
        zero = zeros.float()[..., None] if zeros is not None else float(implicit_zero(bits))
        codes = (torch.round(w.float().reshape(n, k // glen, glen) / scale) + zero).clamp(0, (1 << bits) - 1)
        return ((codes - zero) * scale).reshape(n, k)

    @torch.no_grad()
    def _search_scale(self, block: DecoderBlock, pair: _Pair, captured: _Captured) -> Tuple[torch.Tensor, float]:
        x_mean = captured.mean_abs(pair.key)
        linears = [block.linears[role] for role in pair.roles]
        originals = [linear.weight.data for linear in linears]
        w_mean = weight_salience(originals, self.group_size) if self.options["duo_scaling"] else None
        if pair.inspect is not None:
            inputs = captured.inputs[pair.key]
            targets = [pair.inspect(x) for x in inputs]
            n_elements = sum(t.numel() for t in targets)
        else:
            gram = captured.gram[pair.key]
            n_elements = captured.n_tokens[pair.key] * linears[0].out_features
        best_loss, best_scales, best_alpha = math.inf, None, 0.0
        try:
            for i in range(self.options["n_grid"]):
                alpha = i / self.options["n_grid"]
                scales = search_scales(x_mean, alpha, w_mean)
                if pair.inspect is not None:
                    for linear, w in zip(linears, originals):
                        linear.weight.data = (self._fake_quantize(w.float() * scales) / scales).to(w.dtype)
                    loss = sum(float((pair.inspect(x).float() - t.float()).pow(2).sum())
                               for x, t in zip(inputs, targets)) / n_elements
                else:
                    w = originals[0]
                    # As the Linear would compute: weights rounded to their dtype, then the error.
                    delta = (self._fake_quantize(w.float() * scales) / scales).to(w.dtype).float() - w.float()
                    loss = float(((delta @ gram) * delta).sum()) / n_elements
                if loss < best_loss:  # strict: ties keep the smaller alpha
                    best_loss, best_scales, best_alpha = loss, scales, alpha
        finally:
            for linear, w in zip(linears, originals):
                linear.weight.data = w
        if best_scales is None:  # every loss was NaN (inputs are finite: checked): never silently unscaled
            raise ValueError(f"awq: {block.name}, scale search {pair.name}: the loss is NaN for every alpha "
                             f"(NaN or Inf in the weights of {list(pair.roles)} or in their outputs)")
        return best_scales, best_alpha

    def _clip_tokens(self, inputs: List[torch.Tensor]) -> torch.Tensor:
        flat = torch.cat([x.reshape(-1, x.shape[-1]) for x in inputs])
        n = min(self.options["n_clip_tokens"], flat.shape[0])
        index = torch.linspace(0, flat.shape[0] - 1, n, device=flat.device).round().long()
        return flat[index].float()

    @torch.no_grad()
    def _search_clip(self, weight: torch.Tensor, x: torch.Tensor) -> Tuple[torch.Tensor, float]:
        """Weights clamped, per output channel and group, to the range ratio with the least error of
        the group's share of the output over the tokens ``x`` [T, K]; also the mean ratio chosen."""
        n_out, k = weight.shape
        glen = group_length(self.group_size, k)
        n_groups = k // glen
        n_grid = self.options["n_grid"]
        ratios = [1.0 - i / n_grid for i in range(int(round(self.options["max_shrink"] * n_grid)) + 1)]
        xg = x.reshape(x.shape[0], n_groups, glen)
        rows = max(1, CLIP_CHUNK_ELEMENTS // (x.shape[0] * n_groups + 4 * k))
        out = torch.empty(n_out, k, dtype=torch.float32, device=weight.device)
        ratio_sum = 0.0
        for start in range(0, n_out, rows):
            w = weight[start:start + rows].float()
            groups = w.reshape(w.shape[0], n_groups, glen)
            if self.config.symmetric:
                hi = groups.abs().amax(dim=-1)
                lo = -hi
            else:
                hi = groups.amax(dim=-1).clamp(min=0)
                lo = groups.amin(dim=-1).clamp(max=0)
            best_err = torch.full_like(hi, math.inf)
            best_ratio = torch.ones_like(hi)
            for ratio in ratios:
                clipped = torch.minimum(torch.maximum(groups, (lo * ratio)[..., None]), (hi * ratio)[..., None])
                delta = self._fake_quantize(clipped.reshape(w.shape)).reshape(groups.shape) - groups
                err = torch.einsum("ngk,tgk->ntg", delta, xg).pow(2).mean(dim=1)  # [rows, groups]
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_ratio = torch.where(better, torch.full_like(best_ratio, ratio), best_ratio)
            clipped = torch.minimum(torch.maximum(groups, (lo * best_ratio)[..., None]), (hi * best_ratio)[..., None])
            out[start:start + rows] = clipped.reshape(w.shape)
            ratio_sum += float(best_ratio.sum())
        return out, ratio_sum / (n_out * n_groups)


def search_scales(x_mean: torch.Tensor, alpha: float, w_mean: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``mean|x| ** alpha`` (or ``mean|x| ** alpha / w_mean ** (1 - alpha)`` with ``w_mean``), at least
    1e-4, divided by ``sqrt(max * min)`` to straddle 1 (fp32)."""
    scales = x_mean.float().pow(alpha)
    if w_mean is not None:
        scales = scales / (w_mean.float().pow(1 - alpha) + 1e-4)
    scales = scales.clamp(min=1e-4)
    return scales / (scales.max() * scales.min()).sqrt()


def weight_salience(weights: List[torch.Tensor], group_size: int) -> torch.Tensor:
    """Per input channel, the mean over the output rows of all ``weights`` of ``|w|`` relative to the
    largest ``|w|`` of its weight group (``duo_scaling``: channels whose weights sit near the top of
    their group's range gain little from being scaled up)."""
    w = torch.cat([weight.float() for weight in weights]).abs()
    n, k = w.shape
    glen = group_length(group_size, k)
    groups = w.reshape(n, k // glen, glen)
    return (groups / (groups.amax(dim=-1, keepdim=True) + 1e-6)).reshape(n, k).mean(dim=0)


@torch.no_grad()
def fold_scales(prev: nn.Module, linears: List[nn.Linear], scales: torch.Tensor) -> None:
    """Multiply the columns of ``linears`` by ``scales`` and divide the output of ``prev`` (a Linear's
    rows and bias, or a norm's weight and bias) by them: the composition is unchanged. A norm is
    checked on random inputs to really scale its output by its weight."""
    check = None
    bias = getattr(prev, "bias", None)
    bias = bias if isinstance(bias, torch.Tensor) else None
    touched = [t for t in [prev.weight, bias] + [linear.weight for linear in linears] if t is not None]
    saved = [t.data for t in touched]
    if not isinstance(prev, nn.Linear):
        weight = prev.weight
        probe = torch.randn(4, weight.shape[0], generator=torch.Generator().manual_seed(0))
        probe = probe.to(device=weight.device, dtype=weight.dtype)
        check = (probe, prev(probe).float() / scales)
    for linear in linears:
        linear.weight.data = (linear.weight.data.float() * scales).to(linear.weight.dtype)
    if isinstance(prev, nn.Linear):
        prev.weight.data = (prev.weight.data.float() / scales[:, None]).to(prev.weight.dtype)
    else:
        prev.weight.data = (prev.weight.data.float() / scales).to(prev.weight.dtype)
    if bias is not None:
        bias.data = (bias.data.float() / scales).to(bias.dtype)
    if check is not None:
        probe, expected = check
        error = (prev(probe).float() - expected).norm() / expected.norm().clamp(min=1e-12)
        if not error < 1e-2:
            for t, data in zip(touched, saved):
                t.data = data  # leave the model as it was
            raise UnsupportedModelError(
                f"awq: {type(prev).__name__} does not scale its output by its weight (relative error "
                f"{float(error):.3g} after folding); AWQ cannot fold its scales into this norm")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
