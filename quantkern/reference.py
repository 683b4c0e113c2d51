"""Plain-PyTorch ground truth for every quantkern op (CPU and GPU).

Every fast kernel (CUDA or Triton) is tested against these functions on random inputs. They favour
clarity over speed, compute in fp32 (exact integer arithmetic through float64 where integers are
multiplied), and define the exact semantics: rounding is round-half-to-even, divisions are IEEE fp32.
"""

from __future__ import annotations

from typing import Optional

import torch

from .format import (
    QuantizedWeight,
    check_bits,
    group_length,
    implicit_zero,
    pack_int4,
    pack_int4_signed,
    unpack_int4_signed,
)

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_float(name: str, x: torch.Tensor, dtypes=FLOAT_DTYPES) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {x.dtype}")


def check_features(op: str, x: torch.Tensor) -> int:
    """x's last dimension (its features), checked to exist and be non-empty: the one check every per-row op
    (quantizers, rotations, the KV quantizer) runs first, on every backend. A row of no features has no
    scale nor rotation, and the kernels' ``x.reshape(-1, 0)`` would fail with an error that says nothing of it."""
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least one dimension (the features), got a 0-d tensor")
    if x.shape[-1] == 0:
        raise ValueError(f"{op}: x has no features: its last dimension is empty (shape {tuple(x.shape)}); "
                         "expected at least one")
    return x.shape[-1]


def _check_clip_ratio(clip_ratio: float) -> float:
    if not 0.0 < float(clip_ratio) <= 1.0:
        raise ValueError(f"clip_ratio must be in (0, 1], got {clip_ratio!r}")
    return float(clip_ratio)


# ----------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------

def _grouped(w: torch.Tensor, group_len: int) -> torch.Tensor:
    n, k = w.shape
    return w.reshape(n, k // group_len, group_len)


def weight_quant_params(w: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                        scale_dtype: torch.dtype = torch.float16):
    """Round-to-nearest scales (``scale_dtype``, [N, G]) and zero codes (uint8 [N, G] or None) of ``w``.

    Symmetric: ``scale = absmax / (2**(bits-1) - 1)`` around the implicit zero ``2**(bits-1)``.
    Asymmetric: the range ``[min(w, 0), max(w, 0)]`` over ``2**bits - 1`` steps, integer zero code.
    """
    _check_float("w", w)
    check_bits(bits)
    if w.dim() != 2:
        raise ValueError(f"w must be 2-D [out_features, in_features], got shape {tuple(w.shape)}")
    if scale_dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"scale_dtype must be float16 or bfloat16, got {scale_dtype}")
    glen = group_length(group_size, w.shape[1])
    groups = _grouped(w.float(), glen)
    if symmetric:
        qmax = implicit_zero(bits) - 1
        scale = groups.abs().amax(dim=-1) / qmax
        zeros = None
    else:
        levels = (1 << bits) - 1
        wmin = groups.amin(dim=-1).clamp(max=0)
        wmax = groups.amax(dim=-1).clamp(min=0)
        scale = (wmax - wmin) / levels
    scale = torch.where(scale == 0, torch.ones_like(scale), scale).to(scale_dtype)
    if not torch.isfinite(scale).all():  # a NaN / inf weight, or a range beyond scale_dtype (fp16: 65504)
        row, group = (~torch.isfinite(scale)).nonzero()[0].tolist()
        cause = ("it holds a NaN or inf weight" if not torch.isfinite(groups[row, group]).all()
                 else f"its range overflows {scale_dtype} (bfloat16 scales reach 3e38)")
        raise ValueError(f"weight row {row}, group {group} has no finite scale: {cause}")
    if not symmetric:
        zeros = torch.clamp(torch.round(-wmin / scale.float()), 0, levels).to(torch.uint8)
    return scale, zeros


def quantize_weight_with_params(w: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                                bits: int, group_size: int) -> QuantizedWeight:
    """Quantize ``w`` [N, K] onto given scales/zeros (quantizers such as GPTQ and AWQ choose them)."""
    _check_float("w", w)
    n, k = w.shape
    glen = group_length(group_size, k)
    zero = (zeros.float() if zeros is not None else
            torch.full(scales.shape, float(implicit_zero(bits)), device=w.device))
    levels = (1 << bits) - 1
    codes = torch.round(_grouped(w.float(), glen) / scales.float()[..., None]) + zero[..., None]
    codes = codes.clamp(0, levels).to(torch.uint8).reshape(n, k)
    qweight = pack_int4(codes) if bits == 4 else codes
    return QuantizedWeight(qweight, scales, zeros, bits, group_size, k, n)


def quantize_weight(w: torch.Tensor, bits: int = 4, group_size: int = 128, symmetric: bool = True,
                    scale_dtype: torch.dtype = torch.float16) -> QuantizedWeight:
    """Round-to-nearest (RTN) quantization of a weight [out_features, in_features]."""
    scales, zeros = weight_quant_params(w, bits, group_size, symmetric, scale_dtype)
    return quantize_weight_with_params(w, scales, zeros, bits, group_size)


def dequantize_weight(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(code - zero) * scale`` in fp32, returned as ``dtype`` [N, K]."""
    codes = _grouped(qw.codes().float(), qw.group_length)
    zero = qw.zero_codes().float()[..., None]
    w = (codes - zero) * qw.scales.float()[..., None]
    return w.reshape(qw.out_features, qw.in_features).to(dtype)


def _check_linear_input(x: torch.Tensor, in_features: int, bias: Optional[torch.Tensor], out_features: int):
    _check_float("x", x)
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"x must have last dimension {in_features} (in_features), got shape {tuple(x.shape)}")
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor) or not bias.is_floating_point():
        raise TypeError(f"bias must be a floating-point torch.Tensor or None, got "
                        f"{bias.dtype if isinstance(bias, torch.Tensor) else type(bias).__name__}")
    if tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
    if bias.device != x.device:
        raise ValueError(f"bias is on {bias.device} but x on {x.device}")


def weight_only_linear(x: torch.Tensor, qw: QuantizedWeight, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """W4A16 / W8A16: ``x @ dequant(W).T + bias``, computed in fp32, returned in ``x.dtype``."""
    _check_linear_input(x, qw.in_features, bias, qw.out_features)
    y = x.float() @ dequantize_weight(qw).T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Activations: per-token symmetric quantization
# ----------------------------------------------------------------------------------------------

def quantize_per_token(x: torch.Tensor, bits: int, clip_ratio: float = 1.0):
    """Symmetric per-row quantization of ``x`` [M, K] to int8 or packed int4.

    ``scale = absmax(row) * clip_ratio / qmax`` (fp32, in that order; 1 for all-zero rows),
    ``q = clamp(round_half_even(x / scale), -qmax, qmax)`` with qmax = 127 or 7.
    Returns ``(q, scale)``: q int8 [M, K] (bits=8) or uint8 [M, K/2] signed nibbles, element 2j in the
    low nibble (bits=4); scale fp32 [M].
    """
    _check_float("x", x)
    check_bits(bits)
    clip = _check_clip_ratio(clip_ratio)
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [tokens, features], got shape {tuple(x.shape)}")
    if bits == 4 and x.shape[1] % 2:
        raise ValueError(f"int4 activations need an even number of features, got {x.shape[1]}")
    qmax = implicit_zero(bits) - 1
    xf = x.float()
    absmax = xf.abs().amax(dim=-1) if x.shape[1] else xf.new_zeros(x.shape[0])
    # Both operands as fp32 tensors: on CUDA, torch computes ``tensor / python_number`` as a
    # multiplication by the reciprocal, which is not the IEEE division the kernels implement.
    as_tensor = lambda v: torch.tensor(float(v), dtype=torch.float32, device=x.device)  # noqa: E731
    scale = absmax * as_tensor(clip) / as_tensor(qmax)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.clamp(torch.round(xf / scale[:, None]), -qmax, qmax).to(torch.int8)
    if bits == 4:
        q = pack_int4_signed(q)
    return q, scale


def dequantize_per_token(q: torch.Tensor, scale: torch.Tensor, bits: int,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of ``quantize_per_token`` (up to rounding): ``q * scale``."""
    values = unpack_int4_signed(q) if bits == 4 else q
    return (values.float() * scale.float()[:, None]).to(dtype)


# ----------------------------------------------------------------------------------------------
# Integer GEMM with scale epilogue: W8A8, W4A4 and W4A8
# ----------------------------------------------------------------------------------------------

def int_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact ``a @ b.T`` of int8 matrices a [M, K], b [N, K] as int32 [M, N].

    Computed in float64, where every partial sum (|sum| <= K * 128 * 128 < 2**53) is exact.
    """
    for name, t in (("a", a), ("b", b)):
        if t.dtype != torch.int8 or t.dim() != 2:
            raise TypeError(f"{name} must be a 2-D int8 tensor, got {t.dtype} with shape {tuple(t.shape)}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"inner dimensions differ: a {tuple(a.shape)}, b {tuple(b.shape)}")
    return (a.double() @ b.double().T).to(torch.int32)


def signed_weight_values(qw: QuantizedWeight) -> torch.Tensor:
    """Symmetric weight codes as signed integers (code - 2**(bits-1)), int8 [N, K]."""
    if not qw.symmetric:
        raise ValueError("integer-activation GEMMs (W4A4, W8A8) need symmetric weights (no zero points)")
    return (qw.codes().to(torch.int16) - implicit_zero(qw.bits)).to(torch.int8)


def quantized_activation_linear(x: torch.Tensor, qw: QuantizedWeight, act_bits: int,
                                bias: Optional[torch.Tensor] = None, clip_ratio: float = 1.0) -> torch.Tensor:
    """W8A8 / W4A4 / W4A8 linear: per-token symmetric activation quantization, int32 accumulation per weight
    group, then the epilogue ``y = sx * sum_g(acc_g * sw_g) + bias`` in fp32, returned in ``x.dtype``."""
    _check_linear_input(x, qw.in_features, bias, qw.out_features)
    lead = x.shape[:-1]
    q, sx = quantize_per_token(x.reshape(-1, qw.in_features), act_bits, clip_ratio)
    xq = unpack_int4_signed(q) if act_bits == 4 else q
    return linear_from_activation_codes(xq, sx, qw, bias, x.dtype).reshape(*lead, qw.out_features)


def linear_from_activation_codes(codes: torch.Tensor, token_scales: torch.Tensor, qw: QuantizedWeight,
                                 bias: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
    """The integer part of ``quantized_activation_linear`` for given activation codes (signed, one per entry,
    [T, K]) and per-token scales (fp32 [T]): int32 accumulation per weight group and the fp32 epilogue."""
    wq = signed_weight_values(qw)
    glen = qw.group_length
    y = torch.zeros(codes.shape[0], qw.out_features, dtype=torch.float32, device=codes.device)
    for g in range(qw.n_groups):
        cols = slice(g * glen, (g + 1) * glen)
        acc = int_matmul(codes[:, cols], wq[:, cols])
        y += acc.float() * qw.scales[:, g].float()[None, :]
    y = y * token_scales[:, None]
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def w8a8_linear(x, qw: QuantizedWeight, bias=None, clip_ratio: float = 1.0):
    if qw.bits != 8:
        raise ValueError(f"w8a8_linear needs 8-bit weights, got {qw.bits}-bit")
    return quantized_activation_linear(x, qw, 8, bias, clip_ratio)


def w4a4_linear(x, qw: QuantizedWeight, bias=None, clip_ratio: float = 1.0):
    if qw.bits != 4:
        raise ValueError(f"w4a4_linear needs 4-bit weights, got {qw.bits}-bit")
    return quantized_activation_linear(x, qw, 4, bias, clip_ratio)


# ----------------------------------------------------------------------------------------------
# Hadamard transform
# ----------------------------------------------------------------------------------------------

def hadamard(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal Hadamard transform along the last dimension (``x @ H.T / sqrt(n)``).

    True Hadamard matrices for 2^k and 12/20/28/36/40 x 2^k; other sizes raise (the documented
    block-diagonal fallback is ``quantkern.rotation.block_hadamard_transform``)."""
    from .rotation import hadamard_transform

    return hadamard_transform(x, normalize=True)


def check_block_rotation(x: torch.Tensor, rotation: torch.Tensor, op: str = "block_rotate") -> int:
    """The checks of a dense per-block rotation's inputs (this module's and the kernels'); returns b."""
    _check_float("x", x, FLOAT_DTYPES + (torch.float64,))
    check_features(op, x)  # an empty last dimension is a multiple of every block size
    if not isinstance(rotation, torch.Tensor) or not rotation.is_floating_point():
        raise TypeError(f"rotation must be a floating-point tensor, got "
                        f"{rotation.dtype if isinstance(rotation, torch.Tensor) else type(rotation).__name__}")
    if rotation.dim() not in (2, 3) or rotation.shape[-1] != rotation.shape[-2] or rotation.shape[-1] == 0:
        raise ValueError(f"rotation must be [b, b] (one matrix for every block) or [K / b, b, b] (one per block), "
                         f"got shape {tuple(rotation.shape)}")
    b, features = rotation.shape[-1], x.shape[-1]
    if features % b:
        raise ValueError(f"x's last dimension ({features}) is not a multiple of the rotation's block size {b}")
    if rotation.dim() == 3 and rotation.shape[0] != features // b:
        raise ValueError(f"rotation has {rotation.shape[0]} blocks, x's last dimension has {features // b} of size {b}")
    if rotation.device != x.device:
        raise ValueError(f"rotation is on {rotation.device}, x on {x.device}")
    return b


def block_rotate(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Dense rotation of each block of b consecutive entries of x's last dim: block j becomes
    ``x_j @ R_j.T``, with ``R_j = rotation`` ([b, b]: the same matrix for every block, e.g. a PCA rotation
    of head_dim shared by the heads) or ``rotation[j]`` ([K / b, b, b]: one per block, e.g. per head).
    Accumulated in fp32 (fp64 for fp64 x), returned in x's dtype."""
    b = check_block_rotation(x, rotation)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    blocks = x.to(compute).reshape(*x.shape[:-1], x.shape[-1] // b, b)
    rotated = torch.einsum("...jk,...jck->...jc", blocks, rotation.to(compute).expand(x.shape[-1] // b, b, b))
    return rotated.reshape(x.shape).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Act-order input gather
# ----------------------------------------------------------------------------------------------

def check_permute_columns_input(x: torch.Tensor, permutation: torch.Tensor) -> None:
    """The checks of ``permute_columns`` on every backend (the permutation's values are not read: see there)."""
    _check_float("x", x)
    features = check_features("permute_columns", x)
    if not isinstance(permutation, torch.Tensor):
        raise TypeError(f"permutation must be a torch.Tensor, got {type(permutation).__name__}")
    if permutation.dtype != torch.int64 or tuple(permutation.shape) != (features,):
        raise ValueError(f"permute_columns: permutation must be int64 of shape ({features},) for x of shape "
                         f"{tuple(x.shape)}, got {permutation.dtype} {tuple(permutation.shape)}")
    if permutation.device != x.device:
        raise ValueError(f"permute_columns: x is on {x.device} but permutation on {permutation.device}")


def permute_columns(x: torch.Tensor, permutation: torch.Tensor) -> torch.Tensor:
    """``x[..., permutation]``: the input gather of act-order layers (``QuantLinear.input_permutation``)."""
    check_permute_columns_input(x, permutation)
    return x.index_select(-1, permutation)


# ----------------------------------------------------------------------------------------------
# KV cache: asymmetric per (token, head) quantization over head_dim
# ----------------------------------------------------------------------------------------------

def _check_kv_input(x: torch.Tensor, bits: int) -> None:
    """The checks of a KV quantizer's input (this one and quantkern.ops.quantize_kv's kernels)."""
    _check_float("x", x)
    check_bits(bits)
    check_features("quantize_kv", x)  # head_dim = 0: no min / max to take
    if bits == 4 and x.shape[-1] % 2:
        raise ValueError(f"int4 KV needs an even head_dim, got {x.shape[-1]}")


def quantize_kv(x: torch.Tensor, bits: int):
    """Asymmetric quantization of ``x`` [..., head_dim] over its last dim (one group per token and head).

    ``scale = (max - min) / (2**bits - 1)`` and ``offset = min`` are rounded to ``x.dtype`` (fp16/bf16,
    fp32 stays fp32) first, then ``code = clamp(round((x - offset) / scale), 0, 2**bits - 1)``; 4-bit
    codes are packed two per byte (``format.pack_int4``). Returns ``(codes, scale, offset)`` with
    scale/offset of shape [...]. Dequantization: ``code * scale + offset``.
    """
    _check_kv_input(x, bits)
    levels = (1 << bits) - 1
    xf = x.float()
    lo, hi = xf.amin(dim=-1), xf.amax(dim=-1)
    # An fp32 tensor divisor: on CUDA, ``tensor / python_number`` is a multiplication by the
    # reciprocal (see quantize_per_token), which differs in the last bit for fp32 x.
    scale = ((hi - lo) / torch.tensor(float(levels), dtype=torch.float32, device=x.device)).to(x.dtype).float()
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    offset = lo.to(x.dtype).float()
    codes = torch.clamp(torch.round((xf - offset[..., None]) / scale[..., None]), 0, levels).to(torch.uint8)
    if bits == 4:
        codes = pack_int4(codes)
    return codes, scale.to(x.dtype), offset.to(x.dtype)


def dequantize_kv(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int,
                  dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    from .format import unpack_int4

    values = unpack_int4(codes) if bits == 4 else codes
    out = values.float() * scale.float()[..., None] + offset.float()[..., None]
    return out.to(dtype or scale.dtype)
