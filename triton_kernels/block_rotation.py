"""Dense per-block rotation of activations, alone and fused with per-token quantization, in Triton.

Semantics: ``quantkern.reference.block_rotate`` (each block j of b consecutive entries of a row becomes
``x_j @ R_j.T``, R_j the shared [b, b] matrix or the j-th of [K / b, b, b]; accumulated in fp32, returned
in x's dtype) and, fused, ``reference.quantize_per_token`` of that result rounded to x's dtype (what
``quantize_per_token(block_rotate(x, R))`` computes), in quantize_per_token's layout (int8 [M, K] or uint8
[M, K/2], element 2j in the low nibble; fp32 scales [M]). Use: an online dense rotation of head_dim blocks
(e.g. a PCA basis of each head's activations, ``quantkern.rotation.pca_rotation``) where a per-head Hadamard
is the fixed alternative. No quantizer or QuantLinear applies it online yet.

Tiling: one program per BM = 16 rows (tl.dot's minimum M). A block of b entries is walked in chunks of
T = min(max(16, next power of two of b), 64) outputs, each the sum over input chunks of T entries of
``tl.dot(x [BM, T], R_j^T [T, T])`` (IEEE fp32, no tf32; entries past b masked to zero). int4: the even and
the odd outputs of a chunk of T pairs are two dots against the even and the odd rows of R_j, so that the
pairs pack into bytes with no reshuffle. Pipeline (fused): pass 1 computes every block's rotation and
reduces each row's absmax of the values rounded to x's dtype; pass 2 recomputes them (the rows' x and R come
from L2 again), quantizes and stores codes. The recomputation doubles the math, not the HBM traffic of x:
a program's rows are 16 x K entries (256 KB at K = 8192 in fp16). sm_90 build (AOT, triton 3.8): 158-252
registers, no spills. The summation order differs from the reference's einsum, so values agree to fp32
rounding (codes: up to rounding-boundary ties, one step).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from quantkern._fake import quantize_per_token_fake

from ._host import next_power_of_2, triton_op
from .activation_quant import _quantize
from .hadamard import _rounded

BM = 16  # rows per program (tl.dot's minimum M)
MAX_BLOCK = 1024  # entries per rotated block (head_dim-sized blocks are the use)


@triton.jit
def _rotated_chunk(x_row_ptrs, row_ok, r_block_ptr, out0, B: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
                   BN: tl.constexpr, STRIDE: tl.constexpr, OFFSET: tl.constexpr, IS_BF16: tl.constexpr):
    """[BM, BN] fp32: outputs c = STRIDE * (out0 + n) + OFFSET (n < BN) of one block, i.e. the dot of the
    block's x [BM, b] with rows c of R (zero for c >= b), rounded to x's dtype (the value the quantizer sees)."""
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
        acc += tl.dot(x.to(tl.float32), rt, input_precision="ieee")
    return _rounded(acc, x_row_ptrs.dtype.element_ty, IS_BF16)


@triton.jit
def _block_rotation_kernel(x_ptr, r_ptr, out_ptr, scale_ptr, M, K, r_block_stride, clip_ratio,
                           B: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr,
                           QUANT: tl.constexpr, BITS: tl.constexpr, IS_BF16: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    row_ok = rows < M
    x_rows = x_ptr + rows[:, None] * K  # [BM, 1] row pointers
    n_blocks = K // B
    if not QUANT:
        for j in range(n_blocks):
            for n0 in range(0, B, BN):
                y = _rotated_chunk(x_rows + j * B, row_ok, r_ptr + j * r_block_stride, n0, B, BM, BK, BN, 1, 0,
                                   IS_BF16)
                cols = n0 + tl.arange(0, BN)
                tl.store(out_ptr + rows[:, None] * K + j * B + cols[None, :], y.to(out_ptr.dtype.element_ty),
                         mask=row_ok[:, None] & (cols < B)[None, :])
    else:
        QMAX: tl.constexpr = 2 ** (BITS - 1) - 1
        # int8: a chunk is BN outputs; int4: BN pairs (its even and its odd outputs, two dots).
        PAIRS: tl.constexpr = BITS == 4
        PER_CHUNK: tl.constexpr = 2 * BN if PAIRS else BN
        STRIDE: tl.constexpr = 2 if PAIRS else 1
        absmax = tl.zeros([BM], dtype=tl.float32)
        for j in range(n_blocks):  # pass 1: each row's absmax
            for c0 in range(0, B, PER_CHUNK):
                first = _rotated_chunk(x_rows + j * B, row_ok, r_ptr + j * r_block_stride, c0 // STRIDE, B, BM, BK,
                                       BN, STRIDE, 0, IS_BF16)
                absmax = tl.maximum(absmax, tl.max(tl.abs(first), axis=1))
                if PAIRS:
                    odd = _rotated_chunk(x_rows + j * B, row_ok, r_ptr + j * r_block_stride, c0 // 2, B, BM, BK,
                                         BN, 2, 1, IS_BF16)
                    absmax = tl.maximum(absmax, tl.max(tl.abs(odd), axis=1))
        scale = tl.math.div_rn(absmax * clip_ratio, QMAX * 1.0)
        scale = tl.where(scale == 0.0, 1.0, scale)
        tl.store(scale_ptr + rows, scale, mask=row_ok)
        scale_tile = scale[:, None]
        for j in range(n_blocks):  # pass 2: the same values again, quantized and stored
            for c0 in range(0, B, PER_CHUNK):
                first = _rotated_chunk(x_rows + j * B, row_ok, r_ptr + j * r_block_stride, c0 // STRIDE, B, BM, BK,
                                       BN, STRIDE, 0, IS_BF16)
                codes = _quantize(first, scale_tile, QMAX)
                outs = c0 // STRIDE + tl.arange(0, BN)  # output columns: values (int8) or pairs (int4)
                if PAIRS:
                    odd = _rotated_chunk(x_rows + j * B, row_ok, r_ptr + j * r_block_stride, c0 // 2, B, BM, BK,
                                         BN, 2, 1, IS_BF16)
                    codes = (codes & 0xF) | ((_quantize(odd, scale_tile, QMAX) & 0xF) << 4)
                tl.store(out_ptr + rows[:, None] * (K // STRIDE) + j * (B // STRIDE) + outs[None, :],
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
    return b


def _launch(x: torch.Tensor, rotation: torch.Tensor, out: torch.Tensor, scales, quant: bool, bits: int,
            clip_ratio: float) -> None:
    rows, k = x.shape
    b = _check(x, rotation, quant, bits)
    tile = min(max(16, next_power_of_2(b)), 64)  # BK and BN (pairs for int4): dot tiles of at most 16 x 64 x 64
    _block_rotation_kernel[(triton.cdiv(rows, BM),)](
        x, rotation, out, scales if scales is not None else out, rows, k, b * b if rotation.dim() == 3 else 0,
        float(clip_ratio), B=b, BM=BM, BK=tile, BN=tile, QUANT=quant, BITS=bits, IS_BF16=x.dtype == torch.bfloat16,
        num_warps=4)


def _block_rotate_fake(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def _block_rotate_quantize_fake(x: torch.Tensor, rotation: torch.Tensor, bits: int, clip_ratio: float):
    return quantize_per_token_fake(x, bits, clip_ratio)


@triton_op("quantkern_triton::block_rotate", _block_rotate_fake)
def _block_rotate_op(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(x)
    if x.shape[0]:
        _launch(x, rotation, out, None, False, 8, 1.0)
    return out


@triton_op("quantkern_triton::block_rotate_quantize", _block_rotate_quantize_fake)
def _block_rotate_quantize_op(x: torch.Tensor, rotation: torch.Tensor, bits: int,
                              clip_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    q, scales = quantize_per_token_fake(x, bits, clip_ratio)
    if x.shape[0]:
        _launch(x, rotation, q, scales, True, bits, clip_ratio)
    return q, scales


def block_rotate(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Triton backend of ``quantkern.ops.block_rotate`` for a 2-D contiguous ``x`` and an fp32 ``rotation``."""
    return _block_rotate_op(x, rotation)


def block_rotate_quantize(x: torch.Tensor, rotation: torch.Tensor, bits: int, clip_ratio: float = 1.0):
    """Triton backend of ``quantkern.ops.block_rotate_quantize`` for a 2-D contiguous ``x``."""
    return _block_rotate_quantize_op(x, rotation, bits, clip_ratio)
