"""Dense per-block rotation of activations, alone and fused with per-token quantization, in Triton.

Semantics: ``quantkern.reference.block_rotate`` (each block j of b consecutive entries of a row becomes
``x_j @ R_j.T``, R_j the shared [b, b] matrix or the j-th of [K / b, b, b]; accumulated in fp32, returned
in x's dtype) and, fused, ``reference.quantize_per_token`` of that result rounded to x's dtype (what
``quantize_per_token(block_rotate(x, R))`` computes), in quantize_per_token's layout (int8 [M, K] or uint8
[M, K/2], element 2j in the low nibble; fp32 scales [M]). Use: an online dense rotation of head_dim blocks
(e.g. a PCA basis of each head's activations, ``quantkern.rotation.pca_rotation``) where a per-head Hadamard
is the fixed alternative. No quantizer or QuantLinear applies it online yet.

Tiling: one program per (BM rows, block j): grid (M / BM, K / b), BM = 16..128 by M (tl.dot's minimum M is
16), so that a single token still spreads over K / b programs. A block of b entries is walked in chunks of
T = min(max(16, next power of two of b), 64) outputs, each the sum over input chunks of T entries of
``tl.dot(x [BM, T], R_j^T [T, T])`` (entries past b masked to zero). int4: the even and the odd outputs of a
chunk of T pairs are two dots against the even and the odd rows of R_j, so that the pairs pack into bytes
with no reshuffle.
Precision: fp16/bf16 rows run on tensor cores in x's dtype with R split in two, R = R_hi + R_lo, both in
x's dtype (about 22 significant bits for fp16, 16 for bf16): two dots with exact products and fp32 sums,
an error far below the output's own rounding to x's dtype. fp32 rows use IEEE fp32 dots. The summation order
differs from the reference's einsum, so values agree to fp32 rounding (codes: up to rounding-boundary ties,
one step). NaN and inf: a row holding NaN rotates to NaN and gets a NaN scale and code 0, as in the reference;
a row holding +-inf does too in fp32 (+-inf outputs, inf scale; padded outputs, 0 * inf = NaN, are kept out
of the absmax). fp16 / bf16 rows (split dots): x * R_lo is inf * 0 where R is exact in x's dtype, or an inf of
the other sign than x * R_hi (R_lo's sign is R's rounding error's), so such a row's outputs are NaN where the
reference has +-inf, its scale NaN where the reference's is inf (the codes are 0 either way). Keeping x's
infinities out of the R_lo dot would fix that at the cost of a second dot operand (staged apart in shared memory).
Pipeline: ``block_rotate`` is one kernel; each program stores its [BM, b] tile. ``block_rotate_quantize`` is
two launches of the same kernel over the same grid, with nothing rotated written in between: (1) each
program's rows' absmax over its block, reduced and folded into an int32 buffer by (atomic) max on the bits of
|y| (``activation_quant._abs_bits``: non-negative floats order as their bits, NaN above +inf, so the result
does not depend on the programs' order and NaN propagates as in the reference); (2) the rotation again, the
per-token scale from the row's absmax (NaN for a row holding NaN, whose codes are then 0), the codes stored;
block 0's programs store the scales. So x is read twice (the second time often from L2), the codes written once,
the math done twice.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from quantkern._fake import quantize_per_token_fake

from quantkern.backends import triton_interpreting

from ._host import next_power_of_2, triton_op
from .activation_quant import _abs_bits, _quantize
from .hadamard import _rounded

MAX_BLOCK = 1024  # entries per rotated block (head_dim-sized blocks are the use)
MAX_BM = 128  # rows per program at most
# What a launch does (MODE), and how the dots run (DOT_MODE); constexpr globals, which kernels may read.
ROTATE, ABSMAX, CODES = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
FP32_DOT, SPLIT_DOT, SPLIT_DOT_IN_FP32 = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)


@triton.jit
def _rotated_chunk(x_row_ptrs, row_ok, r_block_ptr, out0, B: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
                   BN: tl.constexpr, STRIDE: tl.constexpr, OFFSET: tl.constexpr, IS_BF16: tl.constexpr,
                   DOT_MODE: tl.constexpr):
    """[BM, BN] fp32: outputs c = STRIDE * (out0 + n) + OFFSET (n < BN) of one block, i.e. the dot of the
    block's x [BM, b] with rows c of R (zero for c >= b), rounded to x's dtype (the value the quantizer sees).
    SPLIT_DOT_IN_FP32 (the CPU interpreter, whose bf16 dot is wrong): the split dots' exact products in fp32."""
    cols = STRIDE * (out0 + tl.arange(0, BN)) + OFFSET
    col_ok = cols < B
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, B, BK):
        ks = k0 + tl.arange(0, BK)
        k_ok = ks < B
        x = tl.load(x_row_ptrs + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        # R_j^T[k, c] = R_j[c, k]
        rt = tl.load(r_block_ptr + cols[None, :] * B + ks[:, None], mask=k_ok[:, None] & col_ok[None, :],
                     other=0.0)
        if DOT_MODE == FP32_DOT:
            acc += tl.dot(x.to(tl.float32), rt, input_precision="ieee")
        else:
            r_hi = rt.to(x.dtype)
            r_lo = (rt - r_hi.to(tl.float32)).to(x.dtype)
            if DOT_MODE == SPLIT_DOT:
                acc = tl.dot(x, r_hi, acc)
                acc = tl.dot(x, r_lo, acc)
            else:
                x32 = x.to(tl.float32)
                acc += tl.dot(x32, r_hi.to(tl.float32), input_precision="ieee")
                acc += tl.dot(x32, r_lo.to(tl.float32), input_precision="ieee")
    return _rounded(acc, x_row_ptrs.dtype.element_ty, IS_BF16)


@triton.jit
def _block_rotation_kernel(x_ptr, r_ptr, out_ptr, scale_ptr, absmax_ptr, M, K, r_block_stride, clip_ratio,
                           B: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr,
                           MODE: tl.constexpr, BITS: tl.constexpr, IS_BF16: tl.constexpr, DOT_MODE: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    block = tl.program_id(1)
    row_ok = rows < M
    x_block = x_ptr + rows[:, None] * K + block * B  # [BM, 1] pointers to the rows' block
    r_block = r_ptr + block * r_block_stride
    if MODE == ROTATE:
        for n0 in range(0, B, BN):
            y = _rotated_chunk(x_block, row_ok, r_block, n0, B, BM, BK, BN, 1, 0, IS_BF16, DOT_MODE)
            cols = n0 + tl.arange(0, BN)
            tl.store(out_ptr + rows[:, None] * K + block * B + cols[None, :], y.to(out_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & (cols < B)[None, :])
    else:
        QMAX: tl.constexpr = 2 ** (BITS - 1) - 1
        # int8: a chunk is BN outputs; int4: BN pairs (its even and its odd outputs, two dots).
        PAIRS: tl.constexpr = BITS == 4
        PER_CHUNK: tl.constexpr = 2 * BN if PAIRS else BN
        STRIDE: tl.constexpr = 2 if PAIRS else 1
        if MODE == ABSMAX:
            PADDED: tl.constexpr = (B // STRIDE) % BN != 0  # outputs past b in the last chunk: 0 * x, NaN for inf x
            absmax = tl.zeros([BM], dtype=tl.int32)  # bits of |y| (_abs_bits): NaN propagates
            for c0 in range(0, B, PER_CHUNK):
                out_ok = (c0 // STRIDE + tl.arange(0, BN) < B // STRIDE)[None, :]  # values (int8) or pairs (int4)
                first = _rotated_chunk(x_block, row_ok, r_block, c0 // STRIDE, B, BM, BK, BN, STRIDE, 0, IS_BF16,
                                       DOT_MODE)
                if PADDED:
                    first = tl.where(out_ok, first, 0.0)
                absmax = tl.maximum(absmax, tl.max(_abs_bits(first), axis=1))
                if PAIRS:
                    odd = _rotated_chunk(x_block, row_ok, r_block, c0 // 2, B, BM, BK, BN, 2, 1, IS_BF16, DOT_MODE)
                    if PADDED:
                        odd = tl.where(out_ok, odd, 0.0)
                    absmax = tl.maximum(absmax, tl.max(_abs_bits(odd), axis=1))
            tl.atomic_max(absmax_ptr + rows, absmax, mask=row_ok)
        else:
            absmax = tl.load(absmax_ptr + rows, mask=row_ok, other=0).to(tl.float32, bitcast=True)
            scale = tl.math.div_rn(absmax * clip_ratio, QMAX * 1.0)
            scale = tl.where(scale == 0.0, 1.0, scale)
            if block == 0:
                tl.store(scale_ptr + rows, scale, mask=row_ok)
            scale_tile = scale[:, None]
            for c0 in range(0, B, PER_CHUNK):
                first = _rotated_chunk(x_block, row_ok, r_block, c0 // STRIDE, B, BM, BK, BN, STRIDE, 0, IS_BF16,
                                       DOT_MODE)
                codes = _quantize(first, scale_tile, QMAX)
                outs = c0 // STRIDE + tl.arange(0, BN)  # output columns: values (int8) or pairs (int4)
                if PAIRS:
                    odd = _rotated_chunk(x_block, row_ok, r_block, c0 // 2, B, BM, BK, BN, 2, 1, IS_BF16, DOT_MODE)
                    codes = (codes & 0xF) | ((_quantize(odd, scale_tile, QMAX) & 0xF) << 4)
                tl.store(out_ptr + rows[:, None] * (K // STRIDE) + block * (B // STRIDE) + outs[None, :],
                         codes.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (outs < B // STRIDE)[None, :])


def _check(x: torch.Tensor, rotation: torch.Tensor, quant: bool, bits: int) -> int:
    b = rotation.shape[-1]
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"the Triton block rotation takes float16, bfloat16 or float32 x, got {x.dtype}")
    if quant and bits == 4 and b % 2:
        raise ValueError(f"int4 codes pack pairs of a block: the block size must be even, got {b}")
    if b > MAX_BLOCK:
        raise ValueError(f"the Triton block rotation takes blocks of at most {MAX_BLOCK} entries, got {b}")
    if rotation.dtype != torch.float32 or not rotation.is_contiguous():
        raise ValueError("the Triton block rotation takes a contiguous fp32 rotation (quantkern.ops converts it)")
    # (reference.check_block_rotation's shape checks, which quantkern.ops runs first: the grid covers K // b blocks)
    features = x.shape[-1]
    if features % b:
        raise ValueError(f"x's last dimension ({features}) is not a multiple of the rotation's block size {b}")
    if rotation.dim() == 3 and rotation.shape[0] != features // b:
        raise ValueError(f"rotation has {rotation.shape[0]} blocks, x's last dimension has {features // b} of size {b}")
    return b


def rows_per_program(rows: int) -> int:
    return min(MAX_BM, max(16, next_power_of_2(rows)))


def _launch(x: torch.Tensor, rotation: torch.Tensor, out: torch.Tensor, scales, quant: bool, bits: int,
            clip_ratio: float) -> None:
    rows, k = x.shape
    b = _check(x, rotation, quant, bits)
    tile = min(max(16, next_power_of_2(b)), 64)  # BK and BN (pairs for int4): dot tiles of at most BM x 64 x 64
    bm = rows_per_program(rows)
    grid = (-(-rows // bm), k // b)
    if x.dtype == torch.float32:
        dot_mode = FP32_DOT
    else:
        dot_mode = SPLIT_DOT_IN_FP32 if triton_interpreting() else SPLIT_DOT
    meta = dict(B=b, BM=bm, BK=tile, BN=tile, BITS=bits, IS_BF16=x.dtype == torch.bfloat16, DOT_MODE=dot_mode,
                num_warps=4 if bm <= 32 else 8)
    stride = b * b if rotation.dim() == 3 else 0
    if not quant:
        _block_rotation_kernel[grid](x, rotation, out, out, out, rows, k, stride, 1.0, MODE=ROTATE, **meta)
        return
    absmax_bits = torch.zeros(rows, dtype=torch.int32, device=x.device)
    args = (x, rotation, out, scales, absmax_bits, rows, k, stride, float(clip_ratio))
    _block_rotation_kernel[grid](*args, MODE=ABSMAX, **meta)
    _block_rotation_kernel[grid](*args, MODE=CODES, **meta)


def _block_rotate_fake(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape)  # contiguous, as the op's output


def _block_rotate_quantize_fake(x: torch.Tensor, rotation: torch.Tensor, bits: int, clip_ratio: float):
    return quantize_per_token_fake(x, bits, clip_ratio)


@triton_op("quantkern_triton::block_rotate", _block_rotate_fake)
def _block_rotate_op(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()  # the kernel indexes rows as row * K
    out = torch.empty_like(x)
    if x.shape[0]:
        _launch(x, rotation, out, None, False, 8, 1.0)
    return out


@triton_op("quantkern_triton::block_rotate_quantize", _block_rotate_quantize_fake)
def _block_rotate_quantize_op(x: torch.Tensor, rotation: torch.Tensor, bits: int,
                              clip_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.contiguous()  # the kernel indexes rows as row * K
    q, scales = quantize_per_token_fake(x, bits, clip_ratio)
    if x.shape[0]:
        _launch(x, rotation, q, scales, True, bits, clip_ratio)
    return q, scales


def block_rotate(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Triton backend of ``quantkern.ops.block_rotate`` for a 2-D ``x`` (copied first if not contiguous) and a
    contiguous fp32 ``rotation``."""
    return _block_rotate_op(x, rotation)


def block_rotate_quantize(x: torch.Tensor, rotation: torch.Tensor, bits: int, clip_ratio: float = 1.0):
    """Triton backend of ``quantkern.ops.block_rotate_quantize`` for a 2-D ``x`` (copied first if not contiguous)."""
    return _block_rotate_quantize_op(x, rotation, bits, clip_ratio)
