"""SmoothQuant (Xiao et al., 2022): W8A8 with activation outliers migrated into the weights.

Per-token int8 activations lose precision when a few input channels carry values far larger than
the rest (LLMs have such outlier channels, in the same channels for every token). Weights are easy
to quantize per output channel. SmoothQuant rescales each input channel ``j`` of a Linear by a
smoothing factor ``s_j``::

    Y = X W^T = (X diag(s)^-1) (W diag(s))^T

so that the activation ``X / s`` has a flatter range across channels and the weight ``W * s``
absorbs the difficulty. With ``a_j = max |X_j|`` over the calibration tokens and ``w_j = max |W_ij|``
over every Linear that reads that input (the largest weight in column ``j``),

    s_j = a_j ** alpha / w_j ** (1 - alpha)

(``alpha = 0.5``, the paper's default, equalizes the two maxima ``a_j / s_j = w_j * s_j``). The
division by ``s`` costs nothing at inference: it is folded into the operation that produces ``X``:

* ``input_layernorm`` -> ``q_proj``/``k_proj``/``v_proj``: the norm's weight (and bias) / s;
* ``post_attention_layernorm`` -> ``gate_proj``/``up_proj``: the same;
* ``v_proj`` -> ``o_proj`` (option ``smooth_o_proj``): attention mixes the value vectors with
  per-head weights, so scaling the rows of ``v_proj`` (and its bias) by ``1/s`` scales ``o_proj``'s
  input channels by ``1/s``; with grouped-query attention, one value channel feeds the same channel
  of every query head of its group, so those ``o_proj`` columns share one factor;
* ``up_proj`` -> ``down_proj`` (option ``smooth_down_proj``): ``down_proj``'s input is
  ``act(gate) * up``, linear in ``up``'s output, so ``up_proj``'s rows are scaled by ``1/s``.

The float model is unchanged by the smoothing (up to rounding). The smoothed weights are then
round-to-nearest quantized per output channel (8-bit, symmetric) and every Linear of the block runs
W8A8: ``QuantLinear(bits=8, act_bits=8)``, per-token dynamic symmetric int8 activations
(``reference.quantized_activation_linear``).

Options:

* ``alpha`` (default 0.5): the migration strength in [0, 1] (0: ``s_j = 1 / w_j``, all of the
  range moved into the activations, *not* "no smoothing"; 1: ``s_j = a_j``, all of it moved into the
  weights), or ``"auto"``: for each of the block's smoothing groups, the alpha of
  ``alpha_grid`` whose fake-quantized group (smoothed weights RTN-quantized, smoothed activations
  per-token int8) has the smallest summed squared output error on the calibration tokens; the chosen
  alphas are recorded in the checkpoint's metadata (``alphas``). The search is local (one group's
  output error), so it need not beat a fixed alpha on perplexity (SmolLM2-135M: 22.31, against 22.26
  for 0.5 and 22.28 for 0.7) and adds a grid of RTN passes and matmuls per group;
* ``alpha_grid`` (default 0, 0.1, ..., 1): the candidates of ``"auto"``;
* ``smooth_o_proj``, ``smooth_down_proj`` (default True): also smooth the two inner pairs above
  (the paper smooths the norm-fed Linears only; the ``down_proj`` input holds the largest outliers:
  on SmolLM2-135M, 32 calibration windows of 512 tokens, GPL-3 perplexity 22.26 with them against
  22.51 without; RTN W8A8 22.90, fp32 22.05);
* ``auto_tokens`` (default 2048): at most this many calibration tokens (spread evenly over the
  windows) are kept per group for the ``"auto"`` search; the maxima ``a_j`` always use every token.

Configuration: ``act_bits`` must be 8 (SmoothQuant is an activation-quantization method: an unset
``act_bits`` is an error rather than a silent W8A16 or a silent A8), weights symmetric, ``bits`` 8
with ``group_size=-1`` (per-channel W8A8, the paper's setting) or ``bits`` 4 (W4A8, any group size:
the same smoothing, 4-bit weights). W4A4 is refused: per-token int4 activations need rotations
(the ``quarot`` method), not smoothing alone.

Errors: calibration inputs holding NaN/Inf (an fp16 model overflowing) are an error naming the
layer; so is a smoothing whose folded weights would overflow the model's dtype (an input channel
never active in calibration gets ``s_j = EPS ** alpha / w_j ** (1 - alpha)``, which divides its
producer's weights by up to ``1e5`` at ``alpha = 1``) - nothing of the block is changed then.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from .. import reference
from ..format import QuantizedWeight
from ..models import DecoderBlock, ModelStructure
from .base import (ALL_ROLES, BlockRunner, Quantizer, check_bool_options, check_finite_inputs, check_int_option,
                   check_norm_folds, set_fake_quantized)

ACT_BITS = 8
DEFAULT_ALPHA_GRID = tuple(round(0.1 * i, 1) for i in range(11))
EPS = 1e-5  # floor of maxima and factors: a channel never seen active must not divide by zero

# group name -> (role whose input is recorded, roles reading that input)
GROUPS = {
    "qkv": ("q_proj", ("q_proj", "k_proj", "v_proj")),
    "o": ("o_proj", ("o_proj",)),
    "gate_up": ("gate_proj", ("gate_proj", "up_proj")),
    "down": ("down_proj", ("down_proj",)),
}


def smoothing_factors(act_max: torch.Tensor, weight_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s_j = a_j ** alpha / w_j ** (1 - alpha)`` in fp32, maxima and result floored at ``EPS``."""
    a = act_max.float().clamp(min=EPS)
    w = weight_max.float().clamp(min=EPS)
    return (a.pow(alpha) / w.pow(1.0 - alpha)).clamp(min=EPS)


def column_max(linears: Sequence[nn.Linear]) -> torch.Tensor:
    """Largest |weight| of each input column over all ``linears`` (which share one input), fp32."""
    return torch.stack([linear.weight.detach().abs().float().amax(dim=0) for linear in linears]).amax(dim=0)


def fake_quantize_tokens(x: torch.Tensor, bits: int = ACT_BITS) -> torch.Tensor:
    """Per-token symmetric fake quantization (fp32), what ``quantize_per_token`` then dequantize gives."""
    qmax = (1 << (bits - 1)) - 1
    scale = x.abs().amax(dim=-1, keepdim=True) / qmax
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return torch.clamp(torch.round(x / scale), -qmax, qmax) * scale


@torch.no_grad()
def scale_input_channels(linear: nn.Linear, s: torch.Tensor) -> None:
    """W <- W diag(s): the Linear now expects its input divided by ``s``."""
    linear.weight.data = (linear.weight.data.float() * s[None, :]).to(linear.weight.dtype)


@torch.no_grad()
def scale_output_channels(module: nn.Module, s: torch.Tensor) -> None:
    """Divide the weight's rows (a Linear) or entries (a norm), and the bias, by ``s``."""
    weight = module.weight.data.float()
    module.weight.data = (weight / (s[:, None] if weight.dim() == 2 else s)).to(module.weight.dtype)
    bias = getattr(module, "bias", None)
    if bias is not None:
        bias.data = (bias.data.float() / s).to(bias.dtype)


class SmoothQuantQuantizer(Quantizer):
    name = "smoothquant"
    needs_calibration = True
    cli_defaults = {"bits": 8, "acts_bits": 8, "group_size": -1}  # the paper's W8A8, per-channel weights
    default_options = {"alpha": 0.5, "alpha_grid": DEFAULT_ALPHA_GRID, "smooth_o_proj": True,
                       "smooth_down_proj": True, "auto_tokens": 2048}

    def __init__(self, config, group_size: int):
        super().__init__(config, group_size)
        alpha = self.options["alpha"]
        if alpha != "auto" and not (_is_number(alpha) and 0.0 <= float(alpha) <= 1.0):
            raise ValueError(f"smoothquant: alpha must be a number in [0, 1] or 'auto', got {alpha!r}")
        grid = self.options["alpha_grid"]
        if (not isinstance(grid, (list, tuple)) or not grid
                or not all(_is_number(a) and 0.0 <= float(a) <= 1.0 for a in grid)):
            raise ValueError(f"smoothquant: alpha_grid must be a non-empty list of numbers in [0, 1], got {grid!r}")
        check_bool_options(self.name, self.options, ("smooth_o_proj", "smooth_down_proj"))
        check_int_option(self.name, self.options, "auto_tokens")
        self.alphas: List[Dict[str, float]] = []  # per block: group -> alpha used
        self.structure: Optional[ModelStructure] = None

    def check(self, structure: ModelStructure) -> None:
        super().check(structure)
        config = self.config
        if config.act_bits != ACT_BITS:
            raise ValueError(f"smoothquant quantizes activations per token to int8: pass act_bits=8 "
                             f"(--act-bits 8), got act_bits={config.act_bits}")
        if config.bits not in (4, 8):
            raise ValueError(f"smoothquant produces W8A8 or W4A8; got bits={config.bits}")
        if not config.symmetric:
            raise ValueError("smoothquant needs symmetric weights: integer-activation GEMMs have no weight zero points")
        if config.bits == 8 and self.group_size != -1:
            raise ValueError(f"smoothquant W8A8 quantizes weights per output channel: pass group_size=-1 "
                             f"(--group-size -1), got group size {self.group_size}")
        for block in structure.blocks:  # the factors are folded into the norms: they must scale their output
            for role, norm in block.norms.items():
                check_norm_folds(norm, f"{block.name}.{role}", self.name)
        self.structure = structure

    # ------------------------------------------------------------------------------------------

    def _kv_channel_of_o_input(self, block: DecoderBlock) -> torch.Tensor:
        """For each input channel of o_proj, the v_proj output channel it carries (GQA repeats heads)."""
        structure = self.structure
        head_dim = structure.head_dim
        n_rep = structure.num_heads // structure.num_kv_heads
        channels = torch.arange(block.linears["o_proj"].in_features)
        return (channels // head_dim // n_rep) * head_dim + channels % head_dim

    def _smoothable(self, block: DecoderBlock) -> List[str]:
        groups = ["qkv", "gate_up"]
        if self.options["smooth_o_proj"]:
            v, o = block.linears["v_proj"], block.linears["o_proj"]
            s = self.structure
            if (o.in_features == s.num_heads * s.head_dim and v.out_features == s.num_kv_heads * s.head_dim
                    and s.num_heads % s.num_kv_heads == 0):
                groups.append("o")
        if self.options["smooth_down_proj"]:
            groups.append("down")
        return groups

    @torch.no_grad()
    def _collect(self, block: DecoderBlock, runner: BlockRunner, groups: List[str], keep_tokens: bool):
        """Per-channel max |x| of each group's input over every calibration token, and (for "auto")
        a sample of the input tokens."""
        act_max: Dict[str, torch.Tensor] = {}
        samples: Dict[str, List[torch.Tensor]] = {g: [] for g in groups}
        stride = max(1, -(-runner.n_tokens // int(self.options["auto_tokens"])))
        counter = {g: 0 for g in groups}

        def recorder(group):
            def record(x, _output):
                x = x.detach().reshape(-1, x.shape[-1]).float()
                m = x.abs().amax(dim=0)
                act_max[group] = m if group not in act_max else torch.maximum(act_max[group], m)
                if keep_tokens:  # every stride-th token, the phase shifting from window to window
                    start = counter[group] % stride
                    samples[group].append(x[start::stride].clone())
                    counter[group] += 1
            return record

        hooks = {block.linears[GROUPS[g][0]]: recorder(g) for g in groups}
        runner.run(block.module, hooks)
        return act_max, {g: torch.cat(xs) for g, xs in samples.items() if xs}

    @torch.no_grad()
    def _search_alpha(self, x: torch.Tensor, readers: Sequence[nn.Linear], act_max: torch.Tensor,
                      weight_max: torch.Tensor, expand: Optional[torch.Tensor] = None) -> float:
        """The alpha of ``alpha_grid`` whose smoothed, fake-quantized group (weights RTN, activations
        per-token int8) has the smallest summed squared output error against the float Linears on
        the tokens ``x``. ``expand`` maps the factors onto the input channels (GQA's o_proj)."""
        weights = [linear.weight.detach().float() for linear in readers]
        targets = [x @ w.T for w in weights]
        best, best_error = None, None
        for alpha in self.options["alpha_grid"]:
            s = smoothing_factors(act_max, weight_max, float(alpha))
            if expand is not None:
                s = s[expand]
            xq = fake_quantize_tokens(x / s[None, :])
            error = 0.0
            for w, target in zip(weights, targets):
                wq = reference.dequantize_weight(self.rtn(w * s[None, :]))
                error += float((xq @ wq.T - target).pow(2).sum())
            if best_error is None or error < best_error:
                best, best_error = float(alpha), error
        return best

    @torch.no_grad()
    def smooth_block(self, block: DecoderBlock, runner: BlockRunner) -> Dict[str, float]:
        """Fold the smoothing factors into the block's norms and Linears (the float block computes
        the same function afterwards); returns the alpha used per group."""
        groups = self._smoothable(block)
        auto = self.options["alpha"] == "auto"
        act_max, tokens = self._collect(block, runner, groups, keep_tokens=auto)
        for group in groups:
            check_finite_inputs(act_max[group], block.linear_names[GROUPS[group][0]])
        linears = block.linears
        # Every tensor the folds may change, by name, so that an overflow can leave the block as it was.
        touched = {block.linear_names[role]: linear for role, linear in linears.items()}
        touched.update({f"{block.name}.{role}": norm for role, norm in block.norms.items()})
        saved = {name: [(t, t.data) for t in (module.weight, getattr(module, "bias", None)) if t is not None]
                 for name, module in touched.items()}
        used = {}
        for group in groups:
            readers = [linears[role] for role in GROUPS[group][1]]
            a = act_max[group]
            if group == "o":
                # One factor per v_proj output channel, shared by the o_proj columns it feeds.
                kv_of = self._kv_channel_of_o_input(block).to(a.device)
                n_kv = linears["v_proj"].out_features
                a_kv = torch.zeros(n_kv, device=a.device).scatter_reduce(0, kv_of, a, "amax")
                w_kv = torch.zeros(n_kv, device=a.device).scatter_reduce(0, kv_of, column_max(readers), "amax")
                alpha = (self._search_alpha(tokens[group], readers, a_kv, w_kv, kv_of) if auto
                         else float(self.options["alpha"]))
                s_kv = smoothing_factors(a_kv, w_kv, alpha)
                scale_output_channels(linears["v_proj"], s_kv)
                scale_input_channels(linears["o_proj"], s_kv[kv_of])
            else:
                w = column_max(readers)
                alpha = self._search_alpha(tokens[group], readers, a, w) if auto else float(self.options["alpha"])
                s = smoothing_factors(a, w, alpha)
                source = {"qkv": block.norms["input_layernorm"], "gate_up": block.norms["post_attention_layernorm"],
                          "down": linears["up_proj"]}[group]
                scale_output_channels(source, s)
                for linear in readers:
                    scale_input_channels(linear, s)
            used[group] = alpha
        overflowed = [name for name, tensors in saved.items() if not all(bool(torch.isfinite(t).all())
                                                                          for t, _ in tensors)]
        if overflowed:
            for tensors in saved.values():
                for t, data in tensors:
                    t.data = data
            raise ValueError(f"smoothquant: folding the smoothing factors (alphas {used}) overflows the weights "
                             f"of {overflowed} in {linears['q_proj'].weight.dtype} (an input channel never active "
                             f"in calibration gets a factor near {EPS:g} ** alpha); use a smaller alpha, or a "
                             f"float32/bfloat16 model")
        return used

    def quantize_block(self, block: DecoderBlock, runner: Optional[BlockRunner]) -> Dict[str, QuantizedWeight]:
        if runner is None:
            raise ValueError("smoothquant needs calibration data")
        self.alphas.append(self.smooth_block(block, runner))
        quantized = {}
        for role in ALL_ROLES:
            quantized[role] = self.rtn(block.linears[role].weight)
            set_fake_quantized(block.linears[role], quantized[role])
        return quantized

    def layer_options(self, block: DecoderBlock, role: str) -> dict:
        return {"act_bits": ACT_BITS}

    def extra_config(self) -> Dict[str, object]:
        options = dict(self.options)
        options["alpha_grid"] = list(options["alpha_grid"])
        return {"options": options, "alphas": self.alphas}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
