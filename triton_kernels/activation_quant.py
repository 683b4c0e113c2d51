"""Per-token symmetric activation quantization (int8, or int4 packed two per byte) in Triton.

Semantics: ``quantkern.reference.quantize_per_token`` (bit-exact: IEEE fp32 division, round half
to even). Tiling: one program per row (token); the row is walked in chunks of ``BLOCK`` elements
(int8) or ``BLOCK`` byte pairs (int4). Pipeline: pass 1 reduces the row's absmax, pass 2 re-reads the
row (from L2 for real hidden sizes), quantizes and stores. NaN propagates as in the reference (torch.amax):
the absmax is an integer max over the bits of |x| (``_abs_bits``: NaN above +inf, one instruction per step as a
float max), so a row holding NaN gets a NaN scale, and the clamp of the codes propagates NaN, which converts to
code 0 (the reference's float -> int8 cast; the CUDA kernels' __float2int_rn). Layout: x [M, K] row-major (any row
stride, unit column stride); q int8 [M, K] or uint8 [M, K/2] with element 2j in the low nibble;
scales fp32 [M].
"""

import torch
import triton
import triton.language as tl

from quantkern._fake import quantize_per_token_fake

from ._host import next_power_of_2, triton_op

MAX_BLOCK = 2048


@triton.jit
def _round_half_even(v):
    # floor(v + 0.5) is exact here (|v| is small); ties (r - v == 0.5) go to the even neighbour.
    r = tl.floor(v + 0.5)
    is_tie = (r - v) == 0.5
    is_odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(is_tie & is_odd, r - 1.0, r)


@triton.jit
def _abs_bits(v):
    """The bits of fp32 |v| as int32 (sign bit cleared): ordered as |v| for numbers, and every NaN above +inf,
    so a max over them is torch.amax's NaN-propagating absmax (tl.max has no propagate_nan; a custom
    tl.reduce combine would run element by element under the interpreter). Bitcast back with
    ``.to(tl.float32, bitcast=True)``: for rows without NaN the same value as a float max of tl.abs."""
    return v.to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def _quantize(v, scale, QMAX: tl.constexpr):
    # NaN (x NaN, a NaN scale, or inf / inf) passes the clamp and converts to 0: on a GPU cvt.rzi.s32.f32 gives 0;
    # the interpreter's numpy cast gives INT_MIN, whose low byte and nibble (all that is stored) are 0.
    q = _round_half_even(tl.math.div_rn(v, scale))
    q = tl.maximum(q, -QMAX, propagate_nan=tl.PropagateNan.ALL)
    return tl.minimum(q, QMAX, propagate_nan=tl.PropagateNan.ALL).to(tl.int32)


@triton.jit
def _quantize_per_token_kernel(x_ptr, q_ptr, scale_ptr, K, stride_x_row, stride_q_row, clip_ratio,
                               BITS: tl.constexpr, BLOCK: tl.constexpr):
    QMAX: tl.constexpr = 2 ** (BITS - 1) - 1
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x_row
    q_row = q_ptr + row * stride_q_row

    absmax = tl.zeros([BLOCK], dtype=tl.int32)  # bits of |x| (_abs_bits): NaN propagates
    for start in range(0, K, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        v = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        absmax = tl.maximum(absmax, _abs_bits(v))
    absmax = tl.max(absmax, axis=0).to(tl.float32, bitcast=True)
    scale = tl.math.div_rn(absmax * clip_ratio, QMAX * 1.0)
    scale = tl.where(scale == 0.0, 1.0, scale)
    tl.store(scale_ptr + row, scale)

    if BITS == 8:
        for start in range(0, K, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < K
            v = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(q_row + offs, _quantize(v, scale, QMAX).to(tl.int8), mask=mask)
    else:
        pairs = K // 2
        for start in range(0, pairs, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < pairs
            even = tl.load(x_row + 2 * offs, mask=mask, other=0.0).to(tl.float32)
            odd = tl.load(x_row + 2 * offs + 1, mask=mask, other=0.0).to(tl.float32)
            byte = (_quantize(even, scale, QMAX) & 0xF) | ((_quantize(odd, scale, QMAX) & 0xF) << 4)
            tl.store(q_row + offs, byte.to(tl.uint8), mask=mask)


@triton_op("quantkern_triton::quantize_per_token", quantize_per_token_fake)
def _quantize_per_token_op(x: torch.Tensor, bits: int, clip_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    tokens, features = x.shape
    if bits == 4 and features % 2:  # (quantkern.ops checks it first; the kernel would drop the last column)
        raise ValueError(f"int4 activations need an even number of features, got {features}")
    q, scales = quantize_per_token_fake(x, bits, clip_ratio)
    if tokens == 0:
        return q, scales
    if x.stride(1) != 1:  # the kernel takes any row stride, unit column stride
        x = x.contiguous()
    work = features // 2 if bits == 4 else features
    block = min(next_power_of_2(max(work, 1)), MAX_BLOCK)
    _quantize_per_token_kernel[(tokens,)](
        x, q, scales, features, x.stride(0), q.stride(0), float(clip_ratio),
        BITS=bits, BLOCK=block, num_warps=8 if block >= 1024 else 4)
    return q, scales


def quantize_per_token(x: torch.Tensor, bits: int, clip_ratio: float = 1.0):
    """Triton backend of ``quantkern.ops.quantize_per_token`` for a 2-D ``x`` (copied first if its columns are
    strided)."""
    return _quantize_per_token_op(x, bits, clip_ratio)
