"""GPTQ: second-order weight quantization of one Linear layer (Frantar et al., 2022, arXiv:2210.17323).

GPTQ minimises the layer's output error ``||X W^T - X Q^T||^2`` over calibration inputs ``X``. Its only
statistic of the inputs is the Hessian of that loss, ``H = 2/n * X^T X`` [K, K]
(``HessianAccumulator`` collects it batch by batch). ``gptq_quantize`` then quantizes the columns
(input channels) of ``W`` [N, K] one at a time, for all N rows at once:

1. *Dead inputs* (``H[i, i] == 0``: the channel was always zero) cannot affect the output; their
   weights are set to zero and ``H[i, i]`` to the mean diagonal of the live inputs (1 if none is
   live) so that ``H`` stays invertible. (The reference sets it to 1, which makes the dampening
   below depend on the scale of ``H``: with small activations the dead channels' 1s dominate
   ``mean(diag(H))``, over-dampen, and GPTQ silently degrades towards RTN.)
2. *Dampening*: ``damp * mean(diag(H))`` is added to the diagonal, which keeps the inverse well
   conditioned when ``X`` has fewer independent directions than ``K``.
3. ``U = cholesky(H^-1)`` (upper). Row ``i`` of ``U`` holds, for column ``i``, exactly the inverse-Hessian
   entries of the optimal-brain-surgeon update once columns ``< i`` are fixed, so one factorisation
   replaces the ``K`` rank-1 downdates of ``H^-1`` of the original OBS/OBQ algorithm.
4. For each column ``i`` in turn: ``q = dequant(quant(w_i))``, ``err = (w_i - q) / U[i, i]``, and every
   column not yet quantized absorbs the error, ``W[:, j] -= err * U[i, j]`` for ``j > i`` (error
   feedback: later columns compensate the rounding of earlier ones through the input correlations).
5. *Lazy batch updates*: the feedback is applied at once inside a block of ``block_size`` columns and
   to the rest of ``W`` as one matrix product per block (same result, far fewer memory passes).

Quantization grid (identical rules to ``quantkern.reference.weight_quant_params``): per group of
``group_size`` consecutive input channels (or per output channel, ``group_size=-1``), symmetric
``scale = absmax / (2**(bits-1) - 1)`` around the implicit zero code, or asymmetric ``min/max`` with an
integer zero code. Scales are rounded to ``scale_dtype`` *before* they quantize anything, and the error
feedback uses ``(code - zero) * scale`` computed exactly as ``reference.dequantize_weight`` does, so the
checkpoint dequantizes bit-exactly to the weights GPTQ compensated for.

Options:

* ``static_groups=False`` (default): a group's scale/zero are computed from the *current* weights (with
  all error feedback received so far) when the group's first column is reached.
  ``static_groups=True``: all groups' parameters are computed once, up front, from the original weights.
* ``act_order=True``: columns are quantized in order of decreasing ``diag(H)`` (most important
  inputs first, while the most columns remain to absorb their error); the result is un-permuted.
  The canonical format has no ``g_idx``: a group is always ``group_size`` *contiguous* input channels
  in their original order. Dynamic groups under act_order would need a ``g_idx`` (groups in
  permuted order), so **act_order with a group size other than -1 always uses static groups**
  (``static_groups`` is forced to True); per-channel (``group_size=-1``) is unaffected.
* ``damp``: relative dampening. If the Cholesky factorisation fails, it is retried a few times with
  ten times the dampening (with a warning), then a ``ValueError`` is raised.
* ``block_size``: columns per lazy-update block; it changes speed, not the result (up to float
  rounding). With dynamic groups it is rounded to a multiple of the group length, so that each group
  lies inside one block and its parameters see every update made before its first column.

Everything is computed in fp32 on the weight's device (CPU or CUDA); ``weight`` may be fp16/bf16/fp32.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Dict, Optional, Tuple

import torch

from ..format import QuantizedWeight, check_bits, group_length, implicit_zero, pack_int4
from ..models import SEQUENTIAL_GROUPS, DecoderBlock
from ..reference import weight_quant_params
from .base import (BlockRunner, Quantizer, check_bool_options, check_int_option, check_positive_option,
                   set_fake_quantized)

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
CHOLESKY_RETRIES = 4  # after the first try, each retry multiplies the dampening by 10


class HessianAccumulator:
    """Running ``H = 2/n * sum x x^T`` over the calibration inputs of one Linear.

    ``add_batch(x)`` takes inputs ``[..., in_features]`` of any float dtype; every vector along the
    last dimension (every token) is one sample, so ``n_samples`` counts tokens. The sum is kept in
    ``dtype`` (fp32 by default, fp64 for very long calibration runs) on ``device`` (default: the
    device of the first batch). ``H`` is the normalised fp32 Hessian, ready for ``gptq_quantize``.
    """

    def __init__(self, in_features: int, device=None, dtype: torch.dtype = torch.float32):
        if not isinstance(in_features, int) or in_features <= 0:
            raise ValueError(f"in_features must be a positive int, got {in_features!r}")
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype must be float32 or float64, got {dtype}")
        self.in_features = in_features
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else None
        self.n_samples = 0
        self._sum: Optional[torch.Tensor] = None  # sum of x x^T, [K, K]

    def add_batch(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must have last dimension {self.in_features} (in_features), "
                             f"got shape {tuple(x.shape)}")
        if self.device is None:
            self.device = x.device
        rows = x.detach().reshape(-1, self.in_features).to(device=self.device, dtype=self.dtype)
        if self._sum is None:
            self._sum = torch.zeros(self.in_features, self.in_features, dtype=self.dtype, device=self.device)
        self._sum.addmm_(rows.T, rows)
        self.n_samples += rows.shape[0]

    @property
    def H(self) -> torch.Tensor:
        if self.n_samples == 0:
            raise RuntimeError("HessianAccumulator has no samples: call add_batch with calibration inputs first")
        return (self._sum * (2.0 / self.n_samples)).float()


def _check_args(weight, hessian, bits, group_size, damp, block_size, scale_dtype) -> int:
    """Validates everything up front; returns the group length."""
    for name, t in (("weight", weight), ("hessian", hessian)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    k = weight.shape[1]
    if tuple(hessian.shape) != (k, k):
        raise ValueError(f"hessian must have shape {(k, k)} to match weight {tuple(weight.shape)} "
                         f"([in_features, in_features]), got {tuple(hessian.shape)}")
    if hessian.device != weight.device:
        raise ValueError(f"hessian is on {hessian.device} but weight is on {weight.device}; move one of them")
    check_bits(bits)
    if bits == 4 and k % 2:
        raise ValueError(f"4-bit weights need an even in_features, got {k}")
    glen = group_length(group_size, k)
    if scale_dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"scale_dtype must be float16 or bfloat16, got {scale_dtype}")
    if not (isinstance(damp, (int, float)) and math.isfinite(damp) and damp > 0):
        raise ValueError(f"damp must be a positive number (relative to mean(diag(H)), e.g. 0.01), got {damp!r}")
    if not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if not torch.isfinite(hessian).all():
        raise ValueError("hessian contains NaN or Inf (overflow in the calibration inputs?)")
    if not torch.isfinite(weight).all():
        raise ValueError("weight contains NaN or Inf")
    return glen


def _upper_cholesky_of_inverse(h: torch.Tensor, damp: float) -> torch.Tensor:
    """``cholesky(inverse(H + damp * mean(diag(H)) * I))``, upper; more dampening on failure."""
    mean_diag = torch.diagonal(h).mean()
    for attempt in range(CHOLESKY_RETRIES + 1):
        d = damp * 10.0 ** attempt
        damped = h.clone()
        torch.diagonal(damped).add_(d * mean_diag)
        lower, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            # cholesky_inverse gives H^-1 from H's factor; the second factorisation is of H^-1.
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if int(info) == 0 and torch.isfinite(upper).all():
                if attempt:
                    warnings.warn(f"GPTQ: the Hessian was not positive definite with damp={damp}; "
                                  f"succeeded with damp={d:g}", RuntimeWarning, stacklevel=3)
                return upper
    raise ValueError(f"GPTQ: Cholesky factorisation of the Hessian failed even with damp={d:g} "
                     f"(tried damp={damp} x 10^0..{CHOLESKY_RETRIES}); the Hessian is far from positive "
                     f"definite: was it accumulated from the layer's real inputs (HessianAccumulator)?")


def _group_params(w: torch.Tensor, bits: int, symmetric: bool, scale_dtype: torch.dtype):
    """Scale (scale_dtype [N]) and zero code (fp32 [N]) of one group ``w`` [N, group_len], by the RTN rules."""
    scale, zeros = weight_quant_params(w, bits, -1, symmetric, scale_dtype)
    zero = zeros.float() if zeros is not None else torch.full_like(scale, implicit_zero(bits), dtype=torch.float32)
    return scale[:, 0], zero[:, 0]


def _gptq(weight: torch.Tensor, hessian: torch.Tensor, bits: int = 4, group_size: int = 128,
          symmetric: bool = True, act_order: bool = False, static_groups: bool = False, damp: float = 0.01,
          block_size: int = 128, scale_dtype: torch.dtype = torch.float16,
          group_params: Optional[Callable] = None) -> Tuple[QuantizedWeight, torch.Tensor]:
    """``gptq_quantize``, also returning the fp32 weights [N, K] that GPTQ's loop quantized to."""
    glen = _check_args(weight, hessian, bits, group_size, damp, block_size, scale_dtype)
    group_params = group_params or _group_params
    n, k = weight.shape
    per_channel = glen == k
    if act_order and not per_channel:
        static_groups = True  # no g_idx in the format: groups must be contiguous in the original order
    levels = (1 << bits) - 1
    dev = weight.device

    w = weight.detach().float().clone()
    h = hessian.detach().float().clone()

    # Dead inputs: the output does not depend on these weights, so zero them; a diagonal entry keeps H
    # invertible. (A Gram matrix's zero-diagonal rows are zero already; clearing them makes sure.) The
    # entry is the live inputs' mean diagonal, not 1, so that H and c * H give the same result.
    diag = torch.diagonal(h)
    dead = diag == 0
    fill = diag[~dead].mean() if bool((~dead).any()) else torch.tensor(1.0, device=dev)
    h[dead, :] = 0
    h[:, dead] = 0
    h[dead, dead] = fill
    w[:, dead] = 0

    n_groups = k // glen
    scales = torch.empty(n, n_groups, dtype=scale_dtype, device=dev)
    zeros = torch.empty(n, n_groups, dtype=torch.float32, device=dev)  # zero codes, fp32 for the arithmetic
    if static_groups or per_channel:
        # Per-channel has one group starting at column 0, so dynamic == static there.
        for g in range(n_groups):
            scales[:, g], zeros[:, g] = group_params(w[:, g * glen:(g + 1) * glen], bits, symmetric, scale_dtype)
        dynamic = False
    else:
        dynamic = True
        block_size = max(glen, block_size // glen * glen)  # each group inside one block

    if act_order:
        perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)
        w = w[:, perm]
        h = h[perm][:, perm]
    else:
        perm = torch.arange(k, device=dev)
    # Group (in original column order) of each processed column; a list, so the loop never syncs a GPU.
    group_of = (perm // glen).tolist()

    u = _upper_cholesky_of_inverse(h, damp)
    del h

    codes = torch.empty(n, k, dtype=torch.uint8, device=dev)
    deq = torch.empty(n, k, dtype=torch.float32, device=dev)
    for b0 in range(0, k, block_size):
        b1 = min(b0 + block_size, k)
        wb = w[:, b0:b1].clone()  # receives the feedback of this block's columns immediately
        errs = torch.empty(n, b1 - b0, dtype=torch.float32, device=dev)
        ub = u[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = b0 + i
            if dynamic and col % glen == 0:
                g = col // glen
                scales[:, g], zeros[:, g] = group_params(wb[:, i:i + glen], bits, symmetric, scale_dtype)
            g = group_of[col]
            scale, zero = scales[:, g].float(), zeros[:, g]
            x = wb[:, i]
            # Same fp32 operations as reference.quantize_weight_with_params / dequantize_weight.
            code = torch.clamp(torch.round(x / scale) + zero, 0, levels)
            q = (code - zero) * scale
            codes[:, col] = code.to(torch.uint8)
            deq[:, col] = q
            err = (x - q) / ub[i, i]
            wb[:, i:] -= err[:, None] * ub[i, i:][None, :]
            errs[:, i] = err
        # Lazy batch update: the whole block's feedback to the columns after it, in one product.
        w[:, b1:] -= errs @ u[b0:b1, b1:]

    if act_order:
        inverse = torch.argsort(perm)
        codes = codes[:, inverse]
        deq = deq[:, inverse]

    zero_codes = None if symmetric else zeros.to(torch.uint8)
    qweight = pack_int4(codes) if bits == 4 else codes
    qw = QuantizedWeight(qweight.contiguous(), scales, zero_codes, bits, group_size, k, n)
    return qw, deq


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int = 4, group_size: int = 128,
                  symmetric: bool = True, act_order: bool = False, static_groups: bool = False,
                  damp: float = 0.01, block_size: int = 128,
                  scale_dtype: torch.dtype = torch.float16,
                  group_params: Optional[Callable] = None) -> QuantizedWeight:
    """GPTQ-quantize ``weight`` [out_features, in_features] given the input Hessian [in, in].

    ``hessian`` is ``HessianAccumulator.H`` (any positive multiple of ``X^T X`` gives the same result).
    Returns the canonical ``QuantizedWeight`` on the weight's device. With ``act_order=True`` and
    ``group_size != -1``, static groups are always used (see the module docstring). Raises
    ``TypeError``/``ValueError`` on invalid input and ``ValueError`` if the Hessian cannot be
    factorised even after increasing the dampening.

    ``group_params(w [N, group_len], bits, symmetric, scale_dtype) -> (scale [N], zero code fp32 [N])``
    chooses each group's grid (default: the RTN absmax / min-max rules); QuaRot passes an MSE clip
    search here.
    """
    qw, _ = _gptq(weight, hessian, bits, group_size, symmetric, act_order, static_groups, damp,
                  block_size, scale_dtype, group_params)
    return qw


# ----------------------------------------------------------------------------------------------
# The method: GPTQ over a whole model, block by block (driver: quantkern.quantizers.base)
# ----------------------------------------------------------------------------------------------

class GPTQQuantizer(Quantizer):
    """GPTQ on every Linear of every block.

    ``true_sequential`` (default): the block's Linears are quantized in the order data reaches them
    (``models.SEQUENTIAL_GROUPS``: q/k/v, then o, then gate/up, then down), and each stage's Hessian
    is collected with every earlier stage already quantized, so later layers compensate for the
    earlier layers' error too. Layers that read the same input (q/k/v; gate/up) share one Hessian.
    Otherwise all Hessians come from one pass over the unquantized block."""

    name = "gptq"
    default_options = {"damp": 0.01, "act_order": True, "static_groups": False, "true_sequential": True,
                       "block_size": 128}

    def __init__(self, config, group_size: int):
        super().__init__(config, group_size)
        check_positive_option(self.name, self.options, "damp")
        check_bool_options(self.name, self.options, ("act_order", "static_groups", "true_sequential"))
        check_int_option(self.name, self.options, "block_size")
        if self.options["act_order"] and group_size != -1:  # as _gptq forces it: the metadata records what ran
            self.options["static_groups"] = True

    def hessians(self, block: DecoderBlock, runner: BlockRunner, groups) -> dict:
        """One pass of the block over the calibration inputs: the input Hessian of each group."""
        accumulators = {}
        for roles in groups:
            first = block.linears[roles[0]]
            accumulators[roles] = HessianAccumulator(first.in_features, device=first.weight.device)
        # Stop each forward at the last hooked Linear: q/k/v's Hessian needs only the input norm.
        order = [roles for roles in SEQUENTIAL_GROUPS if roles in accumulators]
        runner.run(block.module, hooks={block.linears[roles[0]]: _adder(acc) for roles, acc in accumulators.items()},
                   stop_after=block.linears[order[-1][0]])
        return {roles: acc.H for roles, acc in accumulators.items()}

    def quantize_weight(self, weight: torch.Tensor, hessian: torch.Tensor) -> QuantizedWeight:
        o = self.options
        return gptq_quantize(weight, hessian, self.config.bits, self.group_size, self.config.symmetric,
                             bool(o["act_order"]), bool(o["static_groups"]), float(o["damp"]),
                             int(o["block_size"]), self.config.scale_dtype)

    def quantize_block(self, block: DecoderBlock, runner: Optional[BlockRunner]) -> Dict[str, QuantizedWeight]:
        if self.options["true_sequential"]:
            stages = [[roles] for roles in SEQUENTIAL_GROUPS]
        else:
            stages = [list(SEQUENTIAL_GROUPS)]
        quantized = {}
        for stage in stages:
            for roles, hessian in self.hessians(block, runner, stage).items():
                for role in roles:
                    linear = block.linears[role]
                    try:
                        quantized[role] = self.quantize_weight(linear.weight.data, hessian)
                    except ValueError as error:  # a NaN Hessian or a failed factorisation: say where
                        raise ValueError(f"{block.linear_names[role]}: {error}") from None
                    set_fake_quantized(linear, quantized[role])
        return quantized


def _adder(accumulator: HessianAccumulator):
    return lambda x, _output: accumulator.add_batch(x)
