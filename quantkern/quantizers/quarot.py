"""QuaRot: outlier-free 4-bit inference by rotating the model (Ashkboos et al., 2024, arXiv:2404.00456).

Activations of LLMs have a few huge outlier channels, which ruin per-token 4-bit quantization.
An orthogonal rotation ``Q`` spreads every channel over all others (a Hadamard matrix mixes them
all with equal weight), so rotated activations have no outliers, and the rotation can be folded
into the weights so that the float model computes exactly the same function. QuaRot does it in
four places; all but two are free at inference (fused into weights offline):

1. *Fold the norms.* RMSNorm ``g * x / rms(x)`` only commutes with a rotation of ``x`` without its
   weight ``g``. Each norm's ``g`` is multiplied into the columns of the Linears that read its output
   (``input_layernorm`` into q/k/v, ``post_attention_layernorm`` into gate/up, the final norm into
   lm_head) and the norm's weight set to 1 (saved as such, so a checkpoint needs no special norm).
   A tied lm_head is untied first (it gets its own weight; ``config.tie_word_embeddings = False``, so
   the checkpoint loads back untied), since the embeddings and the head are transformed differently.
2. *Rotate the residual stream* by ``Q`` [hidden, hidden]: every residual vector ``h`` becomes ``h Q``.
   Embeddings ``E <- E Q``; Linears reading the residual (q, k, v, gate, up, lm_head) ``W <- W Q``;
   Linears writing it (o_proj, down_proj) ``W <- Q^T W``, ``b <- Q^T b``. RMSNorm (now weightless)
   commutes with ``Q`` since ``rms(h Q) = rms(h)``. ``Q`` (``QuantizeConfig.rotation``):

   * ``"hadamard"`` (default): ``H diag(s) / sqrt(n)``, the Hadamard matrix of order hidden with
     random column signs (``rotation.random_hadamard_matrix``, seeded by ``QuantizeConfig.seed``).
   * ``"pca"``: ``V``, the eigenvectors (decreasing eigenvalue) of the second moment ``sum x x^T`` of
     the *normalised* residual vectors ``x = h / ||h||`` of the calibration windows, accumulated over
     the inputs of every block and of the final norm (that is, over everything the Linears read:
     they see ``h / rms(h)``; normalising also keeps the late layers, whose residual norm is far
     larger, from drowning out the early ones). The embeddings' outputs alone (``pca_source =
     "embeddings"``) are an option. PCA by itself concentrates the variance in the first channels,
     i.e. it *creates* outlier channels, which is bad for per-token quantization; so by default
     (``pca_hadamard=True``) ``Q = V H_rand``: diagonalise, then spread with the random Hadamard.
3. *Online Hadamard before down_proj*: the MLP's intermediate activations (inputs of down_proj) are
   rotated at inference by the normalised Hadamard ``H`` of order intermediate_size
   (``QuantLinear(input_rotation="hadamard")``) and ``W_down <- W_down H^T``, so
   ``(x H^T)(W_down H^T)^T = x W_down^T``.
4. *Values and o_proj*: v_proj's output is rotated per head by the head_dim Hadamard ``H_d`` (offline:
   ``W_v <- (I_kv (x) H_d) W_v``). Attention mixes each head's value vectors linearly, so o_proj's input
   arrives rotated per head by ``B = I_heads (x) H_d`` and ``W_o <- W_o B^T`` undoes it exactly; this
   rotation is what helps the (value) KV cache quantization. For o_proj's own input quantization,
   QuaRot adds an online Hadamard across heads, ``H_heads (x) I_d``, so that the total rotation of
   o_proj's input is ``H_heads (x) H_d``, a Hadamard of order heads * head_dim. That needs a Hadamard
   of order ``heads``, which does not exist for SmolLM2's 9 heads. What is done here instead: an
   online *full* Hadamard ``H`` of order heads * head_dim (576 = 36 x 16 for SmolLM2) before o_proj,
   ``W_o <- W_o B^T H^T``. It is equivalent in exactness (any orthogonal online rotation whose
   transpose is fused into W_o leaves the model unchanged) and at least as good at spreading
   outliers (a full Hadamard mixes all channels, the Kronecker one too; per-head blocks alone
   would not mix across heads). The cost is one transform of size 576 instead of size 9.
   Keys: QuaRot rotates queries and keys after RoPE by ``H_d`` (scores unchanged) before key
   quantization; ``kv_cache.enable_kv_quantization(rotate_keys=True)`` does exactly that.

During calibration the model is still float, but down_proj's and o_proj's weights already include
``H^T``: forward pre-hooks apply ``reference.hadamard`` to their inputs (the same transform the
``QuantLinear`` applies), so the float model is exact, and GPTQ's Hessians are those of the rotated
inputs the quantized layers will see. The hooks disappear with the float Linears they sit on.

Then, block by block and within a block group by group in true-sequential order
(``models.SEQUENTIAL_GROUPS``: q/k/v, o, gate/up, down), one pass over the calibration windows
collects the group's input statistics, and its weights are quantized:

* ``weights="gptq"`` (default, QuaRot's recommendation): ``gptq.gptq_quantize`` with the Hessian of the
  group's (rotated) inputs; ``weights="rtn"``: round to nearest (no calibration needed for the
  Hadamard rotation when nothing below needs it either).
* ``weight_clip`` (True; QuaRot's ``--w_clip``): each row's (group's) range is shrunk to the ratio in
  ``1 .. 0.21`` minimising ``sum |Q(w) - w|^2.4`` (``mse_clip_group_params``), for RTN and, through
  ``gptq_quantize(group_params=...)``, for GPTQ's groups. Rotated weights are close to Gaussian,
  so clipping their few extreme values pays at 4 bits.
* ``gptq_quantized_inputs`` (True; with ``act_bits``): GPTQ minimises the error of what the quantized
  layer computes, ``||X W^T - Q(X) W_q^T||^2`` with ``Q`` its own per-token activation quantization,
  instead of ``||X W^T - X W_q^T||^2``: GPTQ of the least-squares target ``W* = W C H^-1``
  (``H = Q(X)^T Q(X)``, ``C = X^T Q(X)``, a ridge ``gptq_target_ridge`` towards ``W``) with the Hessian ``H``
  (``_quantize_group_for_quantized_inputs``; GPTAQ's asymmetric calibration, arXiv:2504.02692).
* Symmetric weights are required when activations are quantized (integer GEMM).

Activations (``act_bits`` 4 or 8) are quantized per token, symmetric, with a clip ratio: with
``act_clip_search`` (True) each Linear gets the ratio of ``ACT_CLIP_GRID`` minimising its output error
``||Q_c(X) W_q^T - X W_q^T||^2`` over ``act_clip_tokens`` calibration tokens (on rotated, Gaussian-like
inputs the optimum is near 0.8, lower for o_proj/down_proj); otherwise ``act_clip_ratio`` (QuaRot: 0.9)
for every layer. With ``calibrate_quantized_activations`` (True) each group's inputs are
fake-quantized (a forward pre-hook, after any online Hadamard) as soon as the group is done, so later
groups and later blocks are calibrated on what the quantized model computes rather than on float
activations. ``kv_bits`` 4 or 8 quantizes keys (after RoPE, Hadamard-rotated with ``rotate_keys``)
and values per token and head (``kv_cache.enable_kv_quantization``). The lm_head stays in float
unless ``keep_lm_head_fp16=False`` (it is a plain Linear holding the folded, rotated weights).

Why GPTQ matters more with the rotation than without: folding the norms moves their gains into the
weights. SmolLM2's residual has a massive activation (channel 507, up to 100x the median token norm
on a window's first token); after rotation, weight rounding noise meets that token's whole energy,
so plain RTN W4 per-channel is *worse* rotated than not (GPL-3, 3 windows: 86.5 vs 39.6), while GPTQ,
which sees the direction in its Hessian, recovers (26.5 on the full text).

Options (``QuantizeConfig.options``): ``weights`` ("gptq" | "rtn"), ``weight_clip`` (True),
``act_clip_search`` (True), ``act_clip_ratio`` (0.9, without the search), ``act_clip_tokens`` (2048),
``calibrate_quantized_activations`` (True), ``online_hadamard`` (True: steps 3 and 4's online
rotations; False keeps only the offline ones), ``rotate_keys`` (True), ``pca_source`` ("blocks" |
"embeddings"), ``pca_hadamard`` (True), ``gptq_damp`` (0.01), ``gptq_quantized_inputs`` (True),
``gptq_target_ridge`` (0.1), ``gptq_act_order`` (True),
``gptq_static_groups`` (False; forced True, and recorded so, with ``gptq_act_order`` and a group size,
as in ``gptq.gptq_quantize``), ``gptq_block_size`` (128). ``QuantizeConfig.seed`` seeds the random
Hadamard's signs.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import nn

from .. import reference
from ..format import QuantizedWeight, group_length, implicit_zero
from ..models import SEQUENTIAL_GROUPS, DecoderBlock, ModelStructure
from ..rotation import block_diagonal_hadamard, hadamard_transform, is_hadamard_size, pca_rotation, random_signs
from .base import (BlockRunner, Quantizer, _device_of, _first_block_inputs, check_bool_options, check_finite_inputs,
                   check_int_option, check_positive_option, set_fake_quantized)

ROTATIONS = ("hadamard", "pca")
READERS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # read the residual stream
WRITERS = ("o_proj", "down_proj")  # add into the residual stream
ONLINE_ROLES = ("o_proj", "down_proj")  # get an online Hadamard of their input
BOOL_OPTIONS = ("act_clip_search", "calibrate_quantized_activations", "weight_clip", "online_hadamard", "rotate_keys",
                "pca_hadamard", "gptq_quantized_inputs", "gptq_act_order", "gptq_static_groups")
ACT_CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5)  # searched per layer


# ----------------------------------------------------------------------------------------------
# The float-model transforms (usable on their own; each leaves the model's function unchanged)
# ----------------------------------------------------------------------------------------------

def _named_modules(structure: ModelStructure) -> Dict[int, str]:
    return {id(module): name for name, module in structure.model.named_modules()}


def norms_of(structure: ModelStructure) -> List[tuple]:
    """``(qualified name, norm module)`` of every norm QuaRot folds: two per block and the final norm."""
    names = _named_modules(structure)
    norms = [(f"{block.name}.{role}", norm) for block in structure.blocks for role, norm in block.norms.items()]
    norms.append((names.get(id(structure.final_norm), "final norm"), structure.final_norm))
    return norms


@torch.no_grad()
def check_rms_norm(norm: nn.Module, name: str) -> None:
    """Raise ValueError naming ``name`` unless ``norm(x) == weight * x / rms(x)`` (RMSNorm: a weight,
    no bias, no mean subtraction, no ``1 + weight``): only that form can be folded and rotated."""
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        raise ValueError(f"{name}: QuaRot needs RMSNorm-like norms with a weight vector; "
                         f"{type(norm).__name__} has none")
    if getattr(norm, "bias", None) is not None:
        raise ValueError(f"{name}: {type(norm).__name__} has a bias; QuaRot folds RMSNorm-like norms (weight, no bias)")
    # Large values with a non-zero mean: eps is negligible and a LayerNorm (mean subtraction) shows.
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(4, weight.shape[0], generator=generator) * 4 + 3).to(device=weight.device, dtype=weight.dtype)
    expected = weight.float() * x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True))
    got = norm(x).float()
    atol = 1e-3 * float(weight.abs().max())
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-2, atol=atol):
        raise ValueError(f"{name}: {type(norm).__name__} does not compute weight * x / rms(x); QuaRot folds "
                         f"and rotates RMSNorm-like norms only")


def _set_weight(linear: nn.Linear, weight64: torch.Tensor) -> None:
    linear.weight.data = weight64.to(device=linear.weight.device, dtype=linear.weight.dtype)


def _weight64(linear: nn.Module) -> torch.Tensor:
    return linear.weight.detach().to(torch.float64)


@torch.no_grad()
def untie_lm_head(structure: ModelStructure) -> None:
    """Give a tied lm_head its own copy of the embedding matrix, and record the model as untied."""
    if not structure.tied_lm_head:
        return
    head = structure.lm_head
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
    config = getattr(structure.model, "config", None)
    if config is not None:
        config.tie_word_embeddings = False  # so that tie_weights() and load_quantized keep them apart
    if isinstance(getattr(structure.model, "all_tied_weights_keys", None), dict):
        structure.model.all_tied_weights_keys = {}


@torch.no_grad()
def fold_norms(structure: ModelStructure) -> None:
    """Multiply each norm's weight into the columns of the Linears reading it; set the norms to 1."""
    for block in structure.blocks:
        pairs = (("input_layernorm", ("q_proj", "k_proj", "v_proj")),
                 ("post_attention_layernorm", ("gate_proj", "up_proj")))
        for norm_role, roles in pairs:
            norm = block.norms[norm_role]
            gain = norm.weight.detach().to(torch.float64)
            for role in roles:
                linear = block.linears[role]
                _set_weight(linear, _weight64(linear) * gain.to(linear.weight.device)[None, :])
            norm.weight.data.fill_(1.0)
    if structure.lm_head is not None:
        untie_lm_head(structure)
        gain = structure.final_norm.weight.detach().to(torch.float64)
        head = structure.lm_head
        _set_weight(head, _weight64(head) * gain.to(head.weight.device)[None, :])
    structure.final_norm.weight.data.fill_(1.0)


class Rotation:
    """An orthogonal ``Q = V R`` [n, n]: ``V`` dense (or the identity when None), ``R = H diag(s) / sqrt(n)``
    the random Hadamard (or the identity when ``signs`` is None). ``R`` is applied with the fast
    transform, so rotating the embedding and lm_head (vocab x hidden) costs little. Float64."""

    def __init__(self, n: int, dense: Optional[torch.Tensor] = None, signs: Optional[torch.Tensor] = None):
        self.n, self.dense, self.signs = n, dense, signs

    def right(self, w: torch.Tensor) -> torch.Tensor:
        """``w @ Q`` for ``w`` [..., n] (float64)."""
        if self.dense is not None:
            w = w @ self.dense.to(w.device)
        if self.signs is not None:
            w = hadamard_transform(w, normalize=True, transpose=True) * self.signs.to(w.device)
        return w

    def left_transposed(self, w: torch.Tensor) -> torch.Tensor:
        """``Q^T @ w`` for ``w`` [n, ...] (float64): ``(w^T Q)^T``."""
        return self.right(w.T).T

    def matrix(self) -> torch.Tensor:
        return self.right(torch.eye(self.n, dtype=torch.float64))


def _as_rotation(q) -> Rotation:
    return q if isinstance(q, Rotation) else Rotation(q.shape[0], dense=q.to(torch.float64))


def _right(linear: nn.Module, q: Rotation) -> None:
    """``W <- W Q`` (the Linear reads rotated inputs)."""
    _set_weight(linear, q.right(_weight64(linear)))


def _left(linear: nn.Linear, q: Rotation) -> None:
    """``W <- Q^T W``, ``b <- Q^T b`` (the Linear's output gets rotated: ``y -> y Q``)."""
    _set_weight(linear, q.left_transposed(_weight64(linear)))
    if linear.bias is not None:
        linear.bias.data = q.right(linear.bias.detach().to(torch.float64)[None, :])[0].to(linear.bias.dtype)


@torch.no_grad()
def rotate_residual(structure: ModelStructure, q) -> None:
    """Rotate the residual stream by the orthogonal ``q`` (a ``Rotation`` or a [hidden, hidden]
    matrix). Norms must be folded and a tied lm_head untied first."""
    if structure.tied_lm_head:
        raise ValueError("untie the lm_head (fold_norms does) before rotating the residual stream")
    q = _as_rotation(q)
    embed = structure.embed_tokens
    embed.weight.data = q.right(_weight64(embed)).to(embed.weight.dtype)
    for block in structure.blocks:
        for role in READERS:
            _right(block.linears[role], q)
        for role in WRITERS:
            _left(block.linears[role], q)
    if structure.lm_head is not None:
        _right(structure.lm_head, q)


@torch.no_grad()
def rotate_values(structure: ModelStructure) -> None:
    """Rotate v_proj's output per head by the head_dim Hadamard ``H_d``; fuse ``H_d^T`` into o_proj."""
    d = structure.head_dim
    for block in structure.blocks:
        v, o = block.linears["v_proj"], block.linears["o_proj"]
        _left(v, _as_rotation(block_diagonal_hadamard(d, v.out_features // d).T))  # W_v <- B_kv W_v
        _right(o, _as_rotation(block_diagonal_hadamard(d, o.in_features // d).T))  # W_o <- W_o B^T


def fake_quantize_tokens(rows: torch.Tensor, bits: int, clip_ratio: float) -> torch.Tensor:
    """``rows`` [M, K] quantized per token as a QuantLinear quantizes its input
    (``reference.quantize_per_token``) and dequantized back to ``rows``' dtype."""
    q, scale = reference.quantize_per_token(rows, bits, clip_ratio)
    return reference.dequantize_per_token(q, scale, bits, rows.dtype)


class _FakeActivationQuantization:
    """Forward pre-hook: a float Linear's input through ``fake_quantize_tokens``, for calibrating on
    the quantized model."""

    def __init__(self, bits: int, clip_ratio: float):
        self.bits, self.clip_ratio = bits, clip_ratio

    def __call__(self, module, args):
        x = args[0]
        y = fake_quantize_tokens(x.reshape(-1, x.shape[-1]), self.bits, self.clip_ratio).reshape(x.shape)
        return (y,) + tuple(args[1:])


class _QuantizedKVDuringCalibration:
    """Forward pre-hook of an attention module: a fresh ``kv_cache.QuantKVCache`` for each call, so
    that the calibration windows attend to quantized keys and values as the final model will."""

    def __init__(self, bits: int, rotate_keys: bool):
        self.bits, self.rotate_keys = bits, rotate_keys

    def __call__(self, module, args, kwargs):
        from ..kv_cache import CACHE_ARGUMENT_NAMES, QuantKVCache, cache_argument_name

        # Under the name this forward takes (cache or past_key_values), in place of whatever the caller
        # passed under any of the names: a None under the new name would win over a deprecated one.
        for name in CACHE_ARGUMENT_NAMES:
            kwargs.pop(name, None)
        kwargs[cache_argument_name(module.forward)] = QuantKVCache(None, self.bits, self.rotate_keys,
                                                                   backend="reference")
        return args, kwargs


def _hadamard_pre_hook(module, args):
    return (reference.hadamard(args[0]),) + tuple(args[1:])


@torch.no_grad()
def fuse_online_hadamards(structure: ModelStructure, roles=ONLINE_ROLES, hooks: bool = True) -> list:
    """``W <- W H^T`` for each role's Linear (H the normalised Hadamard of order in_features) and, with
    ``hooks``, a forward pre-hook applying ``H`` to its input so the float model stays exact.
    Returns the hook handles (they die with the float Linears when those are replaced)."""
    handles = []
    for block in structure.blocks:
        for role in roles:
            linear = block.linears[role]
            # Rows of W H^T are H applied to each row of W.
            _set_weight(linear, hadamard_transform(_weight64(linear), normalize=True))
            if hooks:
                handles.append(linear.register_forward_pre_hook(_hadamard_pre_hook))
    return handles


@torch.no_grad()
def residual_second_moment(structure: ModelStructure, windows: torch.Tensor, device="cpu",
                           source: str = "blocks", progress: bool = False) -> torch.Tensor:
    """``sum x x^T`` (float64) of the normalised residual vectors ``x = h / ||h||`` over the calibration
    windows: at every block's input and the final norm's input (``"blocks"``), or at the embeddings'
    output only (``"embeddings"``). Runs the float model block by block on ``device``."""
    if source not in ("blocks", "embeddings"):
        raise ValueError(f"pca_source must be 'blocks' or 'embeddings', got {source!r}")
    total = torch.zeros(structure.hidden_size, structure.hidden_size, dtype=torch.float64)

    def add(states):
        for h in states:
            x = h.reshape(-1, h.shape[-1]).to(torch.float64)
            x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            total.add_((x.T @ x).cpu())

    if source == "embeddings":
        embed = structure.embed_tokens
        add(embed(w.to(embed.weight.device)[None]) for w in windows)
        return total
    from tqdm.auto import tqdm

    runner = _first_block_inputs(structure, windows, device)
    add(runner.inputs)
    for block in tqdm(structure.blocks, desc="PCA statistics", unit="block", disable=not progress):
        home = _device_of(block.module)
        block.module.to(device)
        runner.inputs = runner.run(block.module, keep_outputs=True)
        block.module.to(home)
        add(runner.inputs)
    return total


def residual_rotation(structure: ModelStructure, kind: str = "hadamard", seed: int = 0,
                      windows: Optional[torch.Tensor] = None, device="cpu", pca_source: str = "blocks",
                      pca_hadamard: bool = True, progress: bool = False) -> Rotation:
    """The orthogonal ``Q`` of the residual stream (``Rotation.matrix()`` is [hidden, hidden]); see
    the module docstring. The random Hadamard factor is ``rotation.random_hadamard_matrix(hidden, seed)``."""
    n = structure.hidden_size
    if kind == "hadamard":
        return Rotation(n, signs=random_signs(n, seed))
    if kind != "pca":
        raise ValueError(f"rotation must be one of {ROTATIONS}, got {kind!r}")
    if windows is None:
        raise ValueError("rotation='pca' needs calibration windows")
    v = pca_rotation(residual_second_moment(structure, windows, device, pca_source, progress))
    return Rotation(n, dense=v, signs=random_signs(n, seed) if pca_hadamard else None)


def quarot_transform(structure: ModelStructure, rotation: str = "hadamard", seed: int = 0,
                     windows: Optional[torch.Tensor] = None, device="cpu", online_hadamard: bool = True,
                     pca_source: str = "blocks", pca_hadamard: bool = True, progress: bool = False) -> list:
    """Steps 1-4 of the module docstring on a float model, in place; its outputs are unchanged (up to
    rounding). Returns the online rotations' pre-hook handles."""
    for name, norm in norms_of(structure):
        check_rms_norm(norm, name)
    # PCA statistics come from the untouched model (folding and rotating do not change the residual).
    q = residual_rotation(structure, rotation, seed, windows, device, pca_source, pca_hadamard, progress)
    fold_norms(structure)
    rotate_residual(structure, q)
    rotate_values(structure)
    return fuse_online_hadamards(structure) if online_hadamard else []


# ----------------------------------------------------------------------------------------------
# Weight clipping (QuaRot's ``--w_clip``, from the GPTQ code's ``find_params(mse=True)``)
# ----------------------------------------------------------------------------------------------

WEIGHT_CLIP_GRID, WEIGHT_CLIP_MAX_SHRINK, WEIGHT_CLIP_NORM = 100, 0.8, 2.4


@torch.no_grad()
def mse_clip_group_params(w: torch.Tensor, bits: int, symmetric: bool, scale_dtype: torch.dtype):
    """Scale (``scale_dtype`` [N]) and zero code (fp32 [N]) of one group ``w`` [N, group_len] whose range
    is shrunk, per row, to the ratio ``p`` in ``1, 0.99, ..., 0.21`` that minimises ``sum |Q(w) - w|^2.4``.

    Same contract as GPTQ's RTN ``_group_params`` (the scale is rounded to ``scale_dtype`` before it
    quantizes anything; symmetric: implicit zero code) so that it can replace it. Clipping the few
    largest weights of a row makes the step finer for all the others; at 4 bits per channel that is
    usually a large net gain, and GPTQ's error feedback compensates the clipped weights."""
    levels = (1 << bits) - 1
    wf = w.float()
    if symmetric:
        absmax = wf.abs().amax(dim=1)
        low, high = -absmax, absmax
    else:
        low, high = wf.amin(dim=1).clamp(max=0), wf.amax(dim=1).clamp(min=0)
    best_error = torch.full_like(high, float("inf"))
    best_scale = torch.ones_like(high)
    best_zero = torch.zeros_like(high)
    for step in range(int(WEIGHT_CLIP_MAX_SHRINK * WEIGHT_CLIP_GRID)):
        ratio = 1.0 - step / WEIGHT_CLIP_GRID
        if symmetric:
            scale = ratio * high / (implicit_zero(bits) - 1)
        else:
            scale = ratio * (high - low) / levels
        scale = torch.where(scale == 0, torch.ones_like(scale), scale).to(scale_dtype).float()
        if symmetric:
            zero = torch.full_like(scale, float(implicit_zero(bits)))
        else:
            zero = torch.clamp(torch.round(-ratio * low / scale), 0, levels)
        codes = torch.clamp(torch.round(wf / scale[:, None]) + zero[:, None], 0, levels)
        error = ((codes - zero[:, None]) * scale[:, None] - wf).abs().pow(WEIGHT_CLIP_NORM).sum(dim=1)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale.to(scale_dtype), best_zero


def mse_clip_quantize(w: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                      scale_dtype: torch.dtype) -> QuantizedWeight:
    """Round to nearest on the clipped grids of ``mse_clip_group_params``, group by group."""
    n, k = w.shape
    glen = group_length(group_size, k)
    groups = w.detach().reshape(n * (k // glen), glen)
    scale, zero = mse_clip_group_params(groups, bits, symmetric, scale_dtype)
    zeros = None if symmetric else zero.reshape(n, k // glen).to(torch.uint8)
    return reference.quantize_weight_with_params(w.detach(), scale.reshape(n, k // glen), zeros, bits, group_size)


@torch.no_grad()
def quantized_input_target(weight: torch.Tensor, h: torch.Tensor, c: torch.Tensor, ridge: float) -> torch.Tensor:
    """The weights ``W*`` [N, K] (fp32) that GPTQ quantizes, with Hessian ``h``, for a layer whose input is
    quantized at inference: ``(W C + r W)(H + r I)^-1``, ``H = h = Q(X)^T Q(X)``, ``C = c = X^T Q(X)``,
    ``r = ridge * mean(diag(H))``; see ``QuaRotQuantizer._quantize_group_for_quantized_inputs``. The ridge
    pulls ``W*`` towards ``W`` where the calibration inputs have little energy (without it the fit would
    shrink the weights to zero there)."""
    h, c = h.double(), c.to(h.device).double()
    w = weight.detach().to(device=h.device, dtype=torch.float64)
    r = ridge * float(h.diagonal().mean())
    eye = torch.eye(h.shape[0], dtype=torch.float64, device=h.device)
    return torch.linalg.solve(h + r * eye, (c.T + r * eye) @ w.T).T.float()  # H symmetric


# ----------------------------------------------------------------------------------------------
# The method
# ----------------------------------------------------------------------------------------------

class QuaRotQuantizer(Quantizer):
    name = "quarot"
    default_options = {
        "weights": "gptq",
        "act_clip_ratio": 0.9,
        "act_clip_search": True,
        "act_clip_tokens": 2048,
        "calibrate_quantized_activations": True,
        "weight_clip": True,
        "online_hadamard": True,
        "rotate_keys": True,
        "pca_source": "blocks",
        "pca_hadamard": True,
        "gptq_damp": 0.01,
        "gptq_quantized_inputs": True,
        "gptq_target_ridge": 0.1,
        "gptq_act_order": True,
        "gptq_static_groups": False,
        "gptq_block_size": 128,
    }

    def __init__(self, config, group_size):
        super().__init__(config, group_size)
        check_bool_options(self.name, self.options, BOOL_OPTIONS)
        check_int_option(self.name, self.options, "act_clip_tokens")
        check_int_option(self.name, self.options, "gptq_block_size")
        check_positive_option(self.name, self.options, "gptq_damp")
        if self.options["gptq_act_order"] and group_size != -1:  # as gptq_quantize forces it: record what runs
            self.options["gptq_static_groups"] = True
        self.rotation = config.rotation or "hadamard"
        # Hadamard + RTN needs no data: skip cutting calibration windows then.
        self.search_clips = config.act_bits is not None and bool(self.options["act_clip_search"])
        self.needs_calibration = self.options["weights"] == "gptq" or self.rotation == "pca" or self.search_clips
        self.hooks: list = []
        self._kv_hooks: list = []
        self.clips: Dict[str, float] = {}  # Linear's qualified name -> searched activation clip ratio

    def check(self, structure: ModelStructure) -> None:
        config, options = self.config, self.options
        if self.rotation not in ROTATIONS:
            raise ValueError(f"quarot: rotation must be one of {ROTATIONS}, got {config.rotation!r}")
        if config.bits not in (4, 8):
            raise ValueError(f"quarot: weights must be 4 or 8 bits, got {config.bits}")
        if config.act_bits not in (None, 4, 8):
            raise ValueError(f"quarot: act_bits must be 4, 8 or None, got {config.act_bits}")
        if config.kv_bits not in (None, 4, 8):
            raise ValueError(f"quarot: kv_bits must be 4, 8 or None, got {config.kv_bits}")
        if config.act_bits is not None and not config.symmetric:
            raise ValueError("quarot: quantized activations (integer GEMM) need symmetric weights; "
                             "drop --asymmetric or --act-bits")
        if options["weights"] not in ("gptq", "rtn"):
            raise ValueError(f"quarot: option weights must be 'gptq' or 'rtn', got {options['weights']!r}")
        reference._check_clip_ratio(options["act_clip_ratio"])
        if structure.lm_head is None:
            raise ValueError("quarot: the model has no lm_head (an nn.Linear output embedding): the final norm's "
                             "weight and the residual rotation would be left in its outputs; quantize the "
                             "...ForCausalLM model")
        ridge = options["gptq_target_ridge"]
        if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not ridge >= 0:
            raise ValueError(f"quarot: option gptq_target_ridge must be a number >= 0, got {ridge!r}")
        if options["pca_source"] not in ("blocks", "embeddings"):
            raise ValueError(f"quarot: option pca_source must be 'blocks' or 'embeddings', "
                             f"got {options['pca_source']!r}")
        for name, norm in norms_of(structure):
            check_rms_norm(norm, f"quarot: {name}")
        if not is_hadamard_size(structure.hidden_size):
            raise ValueError(f"quarot: no Hadamard matrix of order hidden_size={structure.hidden_size}")
        if not is_hadamard_size(structure.head_dim):
            raise ValueError(f"quarot: no Hadamard matrix of order head_dim={structure.head_dim}")
        if options["online_hadamard"]:
            for block in structure.blocks:
                for role in ONLINE_ROLES:
                    linear = block.linears[role]
                    if not is_hadamard_size(linear.in_features):
                        raise ValueError(f"quarot: {block.linear_names[role]}: no Hadamard matrix of order "
                                         f"in_features={linear.in_features} for the online rotation "
                                         f"(set option online_hadamard=False)")

    def prepare_model(self, structure: ModelStructure, windows: Optional[torch.Tensor],
                      progress: bool = False) -> None:
        self.hooks = quarot_transform(structure, self.rotation, self.config.seed, windows, self.config.device,
                                      self.options["online_hadamard"], self.options["pca_source"],
                                      self.options["pca_hadamard"], progress)

    def _gptq(self, linear: nn.Linear, hessian: torch.Tensor, weight: Optional[torch.Tensor] = None,
              name: str = "") -> QuantizedWeight:
        """GPTQ of ``weight`` (default: the Linear's own) with the input Hessian ``hessian``; its errors
        (a NaN Hessian, a failed factorisation) are prefixed with the layer's ``name``."""
        from .gptq import gptq_quantize

        weight = linear.weight.detach() if weight is None else weight.to(linear.weight.device)
        try:
            return gptq_quantize(weight, hessian.to(linear.weight.device), self.config.bits,
                                 self.group_size, self.config.symmetric, self.options["gptq_act_order"],
                                 self.options["gptq_static_groups"], self.options["gptq_damp"],
                                 self.options["gptq_block_size"], self.config.scale_dtype,
                                 group_params=mse_clip_group_params if self.options["weight_clip"] else None)
        except ValueError as error:
            raise ValueError(f"{name}: {error}" if name else str(error)) from None

    def _rtn(self, linear: nn.Linear) -> QuantizedWeight:
        if self.options["weight_clip"]:
            return mse_clip_quantize(linear.weight, self.config.bits, self.group_size, self.config.symmetric,
                                     self.config.scale_dtype)
        return self.rtn(linear.weight)

    def quantize_block(self, block: DecoderBlock, runner: Optional[BlockRunner]) -> Dict[str, QuantizedWeight]:
        """Group by group in true-sequential order (q/k/v, o, gate/up, down): one pass over the
        calibration windows collects the group's input Hessian (GPTQ) and a sample of its inputs
        (clip search); then its weights are quantized, its clip ratios chosen, and, with
        ``calibrate_quantized_activations``, a pre-hook fake-quantizes its inputs from then on, so that
        later groups and the next blocks are calibrated on what the quantized model computes."""
        gptq = self.options["weights"] == "gptq"
        simulate = self.config.act_bits is not None and self.options["calibrate_quantized_activations"]
        if self.config.kv_bits is not None and self.options["calibrate_quantized_activations"]:
            # Attention over quantized keys/values from here on (removed in finalize).
            self._kv_hooks.append(block.attention.register_forward_pre_hook(
                _QuantizedKVDuringCalibration(self.config.kv_bits, bool(self.options["rotate_keys"])),
                with_kwargs=True))
        quantized_inputs = (gptq and runner is not None and self.config.act_bits is not None
                            and bool(self.options["gptq_quantized_inputs"]))
        quantized = {}
        for group in SEQUENTIAL_GROUPS:
            if quantized_inputs:
                quantized.update(self._quantize_group_for_quantized_inputs(block, runner, group))
            else:
                first = block.linears[group[0]]  # the group's Linears share one input
                hessian, sample = None, None
                if runner is not None and (gptq or self.search_clips):
                    hessian, sample = self._group_statistics(block, runner, first, gptq)
                    if sample is not None:
                        check_finite_inputs(sample, block.linear_names[group[0]])
                for role in group:
                    linear = block.linears[role]
                    quantized[role] = (self._gptq(linear, hessian, name=block.linear_names[role]) if gptq
                                       else self._rtn(linear))
                    set_fake_quantized(linear, quantized[role])
                    if self.search_clips:
                        self.clips[block.linear_names[role]] = self._best_clip(linear, sample)
            if simulate:
                for role in group:
                    block.linears[role].register_forward_pre_hook(_FakeActivationQuantization(
                        self.config.act_bits, self._clip(block, role)))
        return quantized

    @torch.no_grad()
    def _quantize_group_for_quantized_inputs(self, block: DecoderBlock, runner: BlockRunner,
                                             group) -> Dict[str, QuantizedWeight]:
        """GPTQ for a Linear whose input is quantized at inference (option ``gptq_quantized_inputs``).

        Plain GPTQ minimises ``||X W^T - X W_q^T||^2`` on the inputs ``X`` the layer would see unquantized,
        but the quantized layer computes ``Q(X) W_q^T``, ``Q`` the per-token activation quantization with
        the layer's clip ratio (at 4 bits a large error of its own). This minimises the error of what runs,
        ``||X W^T - Q(X) W_q^T||^2``. With ``H = Q(X)^T Q(X)`` and ``C = X^T Q(X)`` its unconstrained
        minimiser is ``W* = W C H^-1`` (least squares), and, the residual of that fit being orthogonal to
        ``Q(X)``, the objective is a constant plus ``||Q(X) (W* - W_q)^T||^2``: exactly GPTQ of ``W*`` with
        the Hessian ``H``. ``W*`` is regularised towards ``W``, ``W* = (W C + r W)(H + r I)^-1`` with
        ``r = gptq_target_ridge * mean(diag(H))``, so that directions the calibration inputs hardly visit
        keep their weights (without it the fit overfits: on a truncated SmolLM2, ridge 0.01 was worse than
        plain GPTQ, 0.03-0.3 better). (The "asymmetric calibration" idea of GPTAQ, Li et al.
        2025, arXiv:2504.02692, here for the layer's own activation quantization.) The clip ratios are
        searched first, on the float weights, since ``Q`` depends on them."""
        first = block.linears[group[0]]  # the group's Linears share one input
        bits = self.config.act_bits
        if self.search_clips:
            _, sample = self._group_statistics(block, runner, first, gptq=False)
            check_finite_inputs(sample, block.linear_names[group[0]])
            for role in group:
                self.clips[block.linear_names[role]] = self._best_clip(block.linears[role], sample)
        clips = {role: self._clip(block, role) for role in group}
        k, device = first.in_features, first.weight.device
        # clip ratio -> (H, C), float64 sums of per-window float32 products, on the layer's device
        stats = {clip: (torch.zeros(k, k, dtype=torch.float64, device=device),
                        torch.zeros(k, k, dtype=torch.float64, device=device))
                 for clip in set(clips.values())}

        def record(x, _output):
            rows = x.reshape(-1, k).float().to(device)
            for clip, (h, c) in stats.items():
                xq = fake_quantize_tokens(rows, bits, clip)
                h.add_((xq.T @ xq).double())
                c.add_((rows.T @ xq).double())

        runner.run(block.module, hooks={first: record}, stop_after=first)
        quantized = {}
        for role in group:
            linear = block.linears[role]
            h, c = stats[clips[role]]
            for statistic in (h, c):
                check_finite_inputs(statistic, block.linear_names[role])
            target = quantized_input_target(linear.weight, h, c, float(self.options["gptq_target_ridge"]))
            quantized[role] = self._gptq(linear, h.float(), target, name=block.linear_names[role])
            set_fake_quantized(linear, quantized[role])
        return quantized

    @torch.no_grad()
    def _group_statistics(self, block: DecoderBlock, runner: BlockRunner, first: nn.Linear, gptq: bool):
        """One pass of the block: the Hessian of ``first``'s inputs (if ``gptq``) and its first
        ``act_clip_tokens`` input tokens (if the clip search is on)."""
        from .gptq import HessianAccumulator

        accumulator = HessianAccumulator(first.in_features) if gptq else None
        limit = int(self.options["act_clip_tokens"])
        sample = []

        def record(x, _output):
            if accumulator is not None:
                accumulator.add_batch(x)
            taken = sum(t.shape[0] for t in sample)
            if self.search_clips and taken < limit:
                sample.append(x.reshape(-1, x.shape[-1])[:limit - taken].float())

        runner.run(block.module, hooks={first: record}, stop_after=first)
        return (accumulator.H if accumulator is not None else None), (torch.cat(sample) if sample else None)

    @torch.no_grad()
    def _best_clip(self, linear: nn.Linear, x: torch.Tensor) -> float:
        """The activation clip ratio of ``ACT_CLIP_GRID`` minimising ``||Q_c(X) W^T - X W^T||^2`` over
        the sampled inputs ``X`` (after any online rotation), ``W`` the layer's current weights: the
        quantized ones (plain GPTQ, RTN), or the float ones before GPTQ for quantized inputs."""
        weight = linear.weight.detach().float()
        x = x.to(weight.device)
        exact = x @ weight.T
        errors = []
        for ratio in ACT_CLIP_GRID:
            xq = fake_quantize_tokens(x, self.config.act_bits, ratio)
            errors.append(float((xq @ weight.T - exact).pow(2).sum()))
        return ACT_CLIP_GRID[min(range(len(errors)), key=errors.__getitem__)]

    def layer_options(self, block: DecoderBlock, role: str) -> dict:
        act_bits = self.config.act_bits
        online = self.options["online_hadamard"] and role in ONLINE_ROLES
        return {"act_bits": act_bits,
                "act_clip_ratio": self._clip(block, role) if act_bits else 1.0,
                "input_rotation": "hadamard" if online else None}

    def _clip(self, block: DecoderBlock, role: str) -> float:
        return float(self.clips.get(block.linear_names[role], self.options["act_clip_ratio"]))

    def finalize(self, structure: ModelStructure) -> None:
        self.hooks = []
        for handle in self._kv_hooks:
            handle.remove()
        self._kv_hooks = []
        if self.config.kv_bits is not None:
            from ..kv_cache import enable_kv_quantization

            enable_kv_quantization(structure.model, self.config.kv_bits, rotate_keys=self.options["rotate_keys"])

    def extra_config(self) -> Dict[str, object]:
        return {"options": dict(self.options), "rotation": self.rotation,
                "act_clip_ratio": float(self.options["act_clip_ratio"]) if self.config.act_bits else 1.0,
                "act_clip_ratios": dict(self.clips),  # searched, per layer (empty without the search)
                "kv_rotate_keys": bool(self.options["rotate_keys"]) if self.config.kv_bits else False}
