"""Asymmetric KV-cache quantization, one group per (token, head), int8 or int4 packed two per byte, in Triton.

Semantics: ``quantkern.reference.quantize_kv``, bit-exact: fp32 max - min, IEEE division by the level
count, scale and offset rounded to x's dtype (a zero scale becomes 1), codes = round half to even of
(x - offset) / scale (IEEE division), clamped to [0, 2**bits - 1]. NaN propagates as in the reference
(torch.amin / amax): the row's min and max reduce with NaN-propagating min / max (``_min_nan`` / ``_max_nan``:
min.NaN / max.NaN on a GPU, one instruction a step as before; under the interpreter a custom tl.reduce combine
runs element by element, slower), so a row holding NaN gets NaN scale and offset, and the clamp of the codes
propagates NaN, which converts to code 0 (the reference's float -> uint8 cast). Tiling: one program per ROWS rows
(a row is one token's one head: head_dim values, held whole in registers as a [ROWS, BLOCK_D] tile,
BLOCK_D the next power of two); int4 loads the even and odd elements as two half-width tiles so that
the packed byte is formed in registers. Layout: x [R, D] contiguous; codes uint8 [R, D] (int8) or
[R, D/2] with element 2j in the low nibble (int4); scale and offset [R] in x's dtype.
"""

import torch
import triton
import triton.language as tl

from .activation_quant import _round_half_even
from .hadamard import _rounded
from ._host import cdiv, next_power_of_2, triton_op

ROWS = 16  # rows per program: head_dim is small (64-256), so one row alone would leave lanes idle


@triton.jit
def _max_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _min_nan(a, b):
    return tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _row_codes(v, offset, scale, LEVELS: tl.constexpr):
    # NaN (x NaN, a NaN scale or offset, inf / inf) passes the clamp and converts to 0: on a GPU cvt.rzi.s32.f32
    # gives 0; the interpreter's numpy cast gives INT_MIN, whose low byte (all that is stored) is 0.
    q = _round_half_even(tl.math.div_rn(v - offset[:, None], scale[:, None]))
    q = tl.maximum(q, 0.0, propagate_nan=tl.PropagateNan.ALL)
    return tl.minimum(q, LEVELS * 1.0, propagate_nan=tl.PropagateNan.ALL).to(tl.int32)


@triton.jit
def _quantize_kv_kernel(x_ptr, codes_ptr, scale_ptr, offset_ptr, R, D, BITS: tl.constexpr,
                        IS_BF16: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr, BLOCK: tl.constexpr):
    LEVELS: tl.constexpr = 2 ** BITS - 1
    rows = tl.program_id(0) * ROWS_PER_PROGRAM + tl.arange(0, ROWS_PER_PROGRAM)
    row_ok = rows < R
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * D
    cols = tl.arange(0, BLOCK)  # int8: elements; int4: element pairs
    if BITS == 8:
        mask = row_ok[:, None] & (cols < D)[None, :]
        v = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        lo = tl.reduce(tl.where(mask, v, float("inf")), 1, _min_nan)
        hi = tl.reduce(tl.where(mask, v, float("-inf")), 1, _max_nan)
    else:
        mask = row_ok[:, None] & (cols < D // 2)[None, :]
        even = tl.load(x_rows + 2 * cols[None, :], mask=mask, other=0.0).to(tl.float32)
        odd = tl.load(x_rows + 2 * cols[None, :] + 1, mask=mask, other=0.0).to(tl.float32)
        lo = _min_nan(tl.reduce(tl.where(mask, even, float("inf")), 1, _min_nan),
                      tl.reduce(tl.where(mask, odd, float("inf")), 1, _min_nan))
        hi = _max_nan(tl.reduce(tl.where(mask, even, float("-inf")), 1, _max_nan),
                      tl.reduce(tl.where(mask, odd, float("-inf")), 1, _max_nan))
    lo = tl.where(row_ok, lo, 0.0)  # rows past R: finite values, never stored
    hi = tl.where(row_ok, hi, 0.0)
    dtype = x_ptr.dtype.element_ty
    scale = _rounded(tl.math.div_rn(hi - lo, LEVELS * 1.0), dtype, IS_BF16)  # to x's dtype, back to fp32
    scale = tl.where(scale == 0.0, 1.0, scale)
    offset = lo  # an element of x: already in x's dtype
    tl.store(scale_ptr + rows, scale.to(dtype), mask=row_ok)
    tl.store(offset_ptr + rows, offset.to(dtype), mask=row_ok)
    if BITS == 8:
        codes = _row_codes(v, offset, scale, LEVELS)
        tl.store(codes_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :], codes.to(tl.uint8), mask=mask)
    else:
        byte = _row_codes(even, offset, scale, LEVELS) | (_row_codes(odd, offset, scale, LEVELS) << 4)
        tl.store(codes_ptr + rows.to(tl.int64)[:, None] * (D // 2) + cols[None, :], byte.to(tl.uint8), mask=mask)


def _quantize_kv_fake(x: torch.Tensor, bits: int):
    rows, d = x.shape
    codes = x.new_empty((rows, d // 2 if bits == 4 else d), dtype=torch.uint8)
    return codes, x.new_empty((rows,)), x.new_empty((rows,))


@triton_op("quantkern_triton::quantize_kv", _quantize_kv_fake)
def _quantize_kv_op(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows, d = x.shape
    if bits == 4 and d % 2:  # (quantkern.ops checks it first; the kernel would drop the last column)
        raise ValueError(f"int4 KV needs an even head_dim, got {d}")
    codes, scale, offset = _quantize_kv_fake(x, bits)
    if rows == 0:
        return codes, scale, offset
    x = x.contiguous()  # the kernel indexes rows as row * D
    block = next_power_of_2(max(d // 2 if bits == 4 else d, 1))
    _quantize_kv_kernel[(cdiv(rows, ROWS),)](x, codes, scale, offset, rows, d, BITS=bits,
                                             IS_BF16=x.dtype == torch.bfloat16,
                                             ROWS_PER_PROGRAM=ROWS, BLOCK=block)
    return codes, scale, offset


def quantize_kv(x: torch.Tensor, bits: int):
    """Triton backend of ``quantkern.ops.quantize_kv`` for a 2-D ``x`` [rows, head_dim] (copied first if not
    contiguous)."""
    return _quantize_kv_op(x, bits)
