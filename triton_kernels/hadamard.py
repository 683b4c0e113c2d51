"""Online Hadamard rotation, alone and fused with per-token quantization, in Triton.

Semantics: ``quantkern.reference.hadamard`` (``x @ H.T / sqrt(n)`` with ``H = rotation.hadamard_matrix(n)``,
accumulated in fp32, returned in x's dtype) and, fused, ``reference.quantize_per_token`` of that result
rounded to x's dtype (the QuantLinear path: ``ops.hadamard`` then the quantizer), same output layout as
``quantize_per_token`` (int8 [M, K] or uint8 [M, K/2], element 2j in the low nibble; fp32 scales [M]).

Tiling: one program per row. The row of n = R * C entries is loaded as an [R, C] tile (row-major: entry
r * C + c), with C a power of two and R = n / C = m * 2^r (the split with the smallest padded tiles; n <= 16384,
so both are at most 128 x 128); since
``H = kron(H_m, H_{2^k}) = kron(H_R, H_C)`` (Sylvester matrices are Kronecker powers), the transform is
``Y = H_R X H_C^T`` (two ``tl.dot`` in IEEE fp32, no tf32). H_R (the dense base-matrix step, for every m,
not only powers of two) and H_C are +-1 matrices built once per size on the host from
``rotation.hadamard_matrix`` and zero-padded to powers of two >= 16 (tl.dot's minimum); padded rows and
columns of X are masked to zero. The summation order differs from the reference's butterfly, so results
agree to fp32 rounding (codes: up to rounding-boundary ties). Pipeline: load -> two dots -> scale ->
(store) or (round to dtype, absmax, scale, quantize, pack pairs along C, store). NaN and inf follow the reference:
the absmax is an integer max over the bits of |y| (``activation_quant._abs_bits``: NaN above +inf), so a row
holding NaN gets a NaN scale and code 0 everywhere; padded entries (0 * inf is NaN in a row holding inf) are
masked out of it.

Shared memory: the two dots stage three fp32 tiles, 4 (RP^2 + RP CP + CP^2) bytes (``full_tile_shared_bytes``;
192 KB at 14336 and 16384, 112 KB at 8192), more than an RTX 4090 (sm_89: 99 KB per block) or an A100 (163 KB)
allows. Where the full tile does not fit the device, the row goes through ``_hadamard_chunked_kernel``: output
columns in chunks of BN, each the sum over C-chunks of BK of ``(H_R X_k) H_C[k, n]``, H_R X_k itself summed
over chunks of BK of H_R's columns (H_R and X in x's dtype: +-1 times x is exact, so this first dot with fp32
accumulation equals the fp32 one up to summation order; the second in IEEE fp32): 24-56 KB of shared memory on
sm_89 (tests/test_triton_compile.py). Quantized rows take two passes over the chunks (absmax, then codes),
recomputing them. Never run on a GPU that needs it (no sm_89 machine here); forced by
tests/test_hadamard_kernels.py, it passed under the interpreter and on the H200 (2026-12-03).

Fallbacks (documented, two passes): int4 when C == 1 (n = 12, 20, 28, 36, 40: no even C split), and
blocked mode with quantization (per-block rotation, per-row scale): the Triton Hadamard, then the Triton
``quantize_per_token``. Blocked mode without quantization is a reshape to rows of one block.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from quantkern._fake import hadamard_fake, hadamard_quantize_fake
from quantkern.backends import triton_interpreting
from quantkern.rotation import hadamard_factorization, hadamard_matrix, is_hadamard_size

from .activation_quant import _abs_bits
from .activation_quant import _quantize as _code  # per-token rounding, shared with quantize_per_token
from .activation_quant import quantize_per_token as _quantize_per_token
from ._host import next_power_of_2, triton_op

MAX_N = 16384  # two 128 x 128 fp32 tiles at most; larger rows: the CUDA kernel


@triton.jit
def _rounded(y, dtype: tl.constexpr, IS_BF16: tl.constexpr):
    """fp32 y rounded to nearest-even in ``dtype``, as fp32. bf16 is rounded with integer arithmetic
    (finite values and inf; NaN is passed through, since a NaN's payload can carry into the sign and exponent,
    e.g. a GPU's canonical NaN 0x7FFFFFFF would become -0.0): the CPU interpreter's float -> bf16 cast
    truncates, the GPU's rounds."""
    if IS_BF16:
        bits = y.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return tl.where(y == y, bits.to(tl.float32, bitcast=True), y)
    else:
        return y.to(dtype).to(tl.float32)


@triton.jit
def _hadamard_kernel(x_ptr, hr_ptr, hc_ptr, out_ptr, scale_ptr, norm, clip_ratio,
                     R: tl.constexpr, C: tl.constexpr, RP: tl.constexpr, CP: tl.constexpr,
                     QUANT: tl.constexpr, BITS: tl.constexpr, IS_BF16: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    n: tl.constexpr = R * C
    r = tl.arange(0, RP)
    c = tl.arange(0, CP)
    mask = (r[:, None] < R) & (c[None, :] < C)
    offs = r[:, None] * C + c[None, :]
    x = tl.load(x_ptr + row * n + offs, mask=mask, other=0.0)
    xf = x.to(tl.float32)
    hr = tl.load(hr_ptr + r[:, None] * RP + tl.arange(0, RP)[None, :])
    hc = tl.load(hc_ptr + c[:, None] * CP + c[None, :])
    # Y = H_R X H_C^T; H_C (Sylvester) is symmetric.
    y = tl.dot(hr, xf, input_precision="ieee")
    y = tl.dot(y, hc, input_precision="ieee")
    y = y * norm
    if not QUANT:
        tl.store(out_ptr + row * n + offs, _rounded(y, x.dtype, IS_BF16).to(x.dtype), mask=mask)
    else:
        QMAX: tl.constexpr = 2 ** (BITS - 1) - 1
        yr = _rounded(y, x.dtype, IS_BF16)
        yr = tl.where(mask, yr, 0.0)  # padded rows and columns: 0 * x, NaN where x holds inf
        absmax = tl.max(tl.max(_abs_bits(yr), axis=1), axis=0).to(tl.float32, bitcast=True)  # NaN propagates
        scale = tl.math.div_rn(absmax * clip_ratio, QMAX * 1.0)
        scale = tl.where(scale == 0.0, 1.0, scale)
        tl.store(scale_ptr + row, scale)
        codes = _code(yr, scale, QMAX)
        if BITS == 8:
            tl.store(out_ptr + row * n + offs, codes.to(tl.int8), mask=mask)
        else:
            lo, hi = tl.split(tl.reshape(codes, (RP, CP // 2, 2)))
            byte = (lo & 0xF) | ((hi & 0xF) << 4)
            c2 = tl.arange(0, CP // 2)
            mask2 = (r[:, None] < R) & (c2[None, :] < C // 2)
            tl.store(out_ptr + row * (n // 2) + r[:, None] * (C // 2) + c2[None, :], byte.to(tl.uint8), mask=mask2)


@triton.jit
def _chunk_of_rotation(x_ptr, hr_ptr, hc_ptr, row, n0, R: tl.constexpr, C: tl.constexpr, RP: tl.constexpr,
                       CP: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, DOT_IN_FP32: tl.constexpr):
    """Columns n0 .. n0 + BN of Y = H_R X H_C^T for one row, fp32 [RP, BN]. The first dot runs in x's dtype
    (+-1 times x is exact, fp32 accumulation) unless DOT_IN_FP32; H_R is read in column chunks of BK (so no
    whole RP x RP tile sits in shared memory: fp32 rows fit sm_89 too)."""
    n: tl.constexpr = R * C
    dtype = tl.float32 if DOT_IN_FP32 else x_ptr.dtype.element_ty
    r = tl.arange(0, RP)
    cols = n0 + tl.arange(0, BN)
    acc = tl.zeros([RP, BN], dtype=tl.float32)
    for k0 in range(0, CP, BK):
        ks = k0 + tl.arange(0, BK)
        y1 = tl.zeros([RP, BK], dtype=tl.float32)  # H_R X[:, ks]
        for j0 in range(0, RP, BK):
            js = j0 + tl.arange(0, BK)
            hr = tl.load(hr_ptr + r[:, None] * RP + js[None, :]).to(dtype)  # +-1 and 0: exact in any dtype
            xk = tl.load(x_ptr + row * n + js[:, None] * C + ks[None, :], mask=(js[:, None] < R) & (ks[None, :] < C),
                         other=0.0)
            y1 += tl.dot(hr, xk.to(dtype), input_precision="ieee", out_dtype=tl.float32)
        hck = tl.load(hc_ptr + ks[:, None] * CP + cols[None, :])  # H_C^T = H_C (symmetric)
        acc += tl.dot(y1, hck, input_precision="ieee")
    return acc


@triton.jit
def _hadamard_chunked_kernel(x_ptr, hr_ptr, hc_ptr, out_ptr, scale_ptr, norm, clip_ratio,
                             R: tl.constexpr, C: tl.constexpr, RP: tl.constexpr, CP: tl.constexpr,
                             BK: tl.constexpr, BN: tl.constexpr, QUANT: tl.constexpr, BITS: tl.constexpr,
                             IS_BF16: tl.constexpr, DOT_IN_FP32: tl.constexpr):
    # DOT_IN_FP32: the first dot on fp32 operands (the CPU interpreter's bf16 dot is wrong; same math on a GPU).
    row = tl.program_id(0).to(tl.int64)
    n: tl.constexpr = R * C
    dtype = x_ptr.dtype.element_ty
    r = tl.arange(0, RP)
    if not QUANT:
        for n0 in range(0, CP, BN):
            y = _chunk_of_rotation(x_ptr, hr_ptr, hc_ptr, row, n0, R, C, RP, CP, BK, BN, DOT_IN_FP32) * norm
            cols = n0 + tl.arange(0, BN)
            tl.store(out_ptr + row * n + r[:, None] * C + cols[None, :], _rounded(y, dtype, IS_BF16).to(dtype),
                     mask=(r[:, None] < R) & (cols[None, :] < C))
    else:
        QMAX: tl.constexpr = 2 ** (BITS - 1) - 1
        absmax = 0  # bits of |y| (_abs_bits): NaN propagates
        for n0 in range(0, CP, BN):  # pass 1: the row's absmax
            y = _chunk_of_rotation(x_ptr, hr_ptr, hc_ptr, row, n0, R, C, RP, CP, BK, BN, DOT_IN_FP32)
            y = _rounded(y * norm, dtype, IS_BF16)
            cols = n0 + tl.arange(0, BN)
            y = tl.where((r[:, None] < R) & (cols[None, :] < C), y, 0.0)  # padded: 0 * x, NaN where x holds inf
            absmax = tl.maximum(absmax, tl.max(tl.max(_abs_bits(y), axis=1), axis=0))
        absmax = absmax.to(tl.float32, bitcast=True)
        scale = tl.math.div_rn(absmax * clip_ratio, QMAX * 1.0)
        scale = tl.where(scale == 0.0, 1.0, scale)
        tl.store(scale_ptr + row, scale)
        for n0 in range(0, CP, BN):  # pass 2: the same chunks again, quantized
            y = _chunk_of_rotation(x_ptr, hr_ptr, hc_ptr, row, n0, R, C, RP, CP, BK, BN, DOT_IN_FP32)
            y = _rounded(y * norm, dtype, IS_BF16)
            codes = _code(y, scale, QMAX)
            cols = n0 + tl.arange(0, BN)
            if BITS == 8:
                tl.store(out_ptr + row * n + r[:, None] * C + cols[None, :], codes.to(tl.int8),
                         mask=(r[:, None] < R) & (cols[None, :] < C))
            else:
                lo, hi = tl.split(tl.reshape(codes, (RP, BN // 2, 2)))
                byte = (lo & 0xF) | ((hi & 0xF) << 4)
                pairs = n0 // 2 + tl.arange(0, BN // 2)
                tl.store(out_ptr + row * (n // 2) + r[:, None] * (C // 2) + pairs[None, :], byte.to(tl.uint8),
                         mask=(r[:, None] < R) & (pairs[None, :] < C // 2))


def full_tile_shared_bytes(n: int) -> int:
    """Shared memory of ``_hadamard_kernel`` for rows of n: its dots stage three fp32 tiles (checked against the
    compiler's figure for sm_89 in tests/test_triton_compile.py)."""
    _, _, rp, cp = _split(n)
    return 4 * (rp * rp + rp * cp + cp * cp)


def _chunk_tiles(n: int):
    """(BK, BN) of the chunked kernel (BK also chunks H_R's columns: RP and CP are powers of two >= 16)."""
    _, _, rp, cp = _split(n)
    return min(rp, cp, 32), min(cp, 64)


def _split(n: int):
    """(R, C, RP, CP): n = R * C with C a power of two, R = m * 2^r, chosen so that the padded (power of two,
    >= 16) tile sizes RP and CP are as small as possible (the two +-1 matrices live in registers)."""
    m, k = hadamard_factorization(n)
    best = None
    for r in range(k + 1):
        rows, cols = m << r, 1 << (k - r)
        rp, cp = max(16, next_power_of_2(rows)), max(16, cols)
        key = (max(rp, cp), rp * rp + cp * cp)
        if best is None or key < best[0]:
            best = (key, (rows, cols, rp, cp))
    return best[1]


@functools.lru_cache(maxsize=None)
def _matrices(n: int, device: str):
    r, c, rp, cp = _split(n)
    hr = torch.zeros(rp, rp, dtype=torch.float32)
    hr[:r, :r] = hadamard_matrix(r, dtype=torch.float32)
    hc = torch.zeros(cp, cp, dtype=torch.float32)
    hc[:c, :c] = hadamard_matrix(c, dtype=torch.float32)
    return hr.to(device), hc.to(device)


def _check_size(n: int) -> None:
    if not is_hadamard_size(n) or n > MAX_N:
        raise ValueError(f"the Triton Hadamard kernel supports n = 2^k or m * 2^k (m in 12, 20, 28, 36, 40) "
                         f"up to {MAX_N}, got n = {n}")


# Tests set this to force the chunked kernel (under the interpreter there is no device to measure).
FORCE_CHUNKED = False


@functools.lru_cache(maxsize=None)
def _shared_memory_per_block(device_index: int) -> int:
    """The limit Triton checks kernels against when it loads them on this device."""
    from triton.runtime import driver

    return driver.active.utils.get_device_properties(device_index)["max_shared_mem"]


def _use_chunked(n: int, device: torch.device) -> bool:
    if FORCE_CHUNKED:
        return True
    if device.type != "cuda":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return full_tile_shared_bytes(n) > _shared_memory_per_block(index)


def _launch(x: torch.Tensor, out: torch.Tensor, scales, quant: bool, bits: int, clip_ratio: float) -> None:
    rows, n = x.shape
    r, c, rp, cp = _split(n)
    hr, hc = _matrices(n, str(x.device))
    args = (x, hr, hc, out, scales if scales is not None else out, float(1.0 / math.sqrt(n)), float(clip_ratio))
    shape = dict(R=r, C=c, RP=rp, CP=cp, QUANT=quant, BITS=bits, IS_BF16=x.dtype == torch.bfloat16,
                 num_warps=8 if n >= 4096 else 4)
    if _use_chunked(n, x.device):
        bk, bn = _chunk_tiles(n)
        dot_in_fp32 = triton_interpreting() and x.dtype == torch.bfloat16
        _hadamard_chunked_kernel[(rows,)](*args, BK=bk, BN=bn, DOT_IN_FP32=dot_in_fp32, **shape)
    else:
        _hadamard_kernel[(rows,)](*args, **shape)


@triton_op("quantkern_triton::hadamard", hadamard_fake)
def _hadamard_op(x: torch.Tensor, block_size: int = 0) -> torch.Tensor:
    x = x.contiguous()  # the kernels index rows as row * n
    n = x.shape[-1]
    size = block_size or n
    _check_size(size)
    rows = x.reshape(-1, size)
    out = torch.empty_like(rows)
    if rows.shape[0]:
        _launch(rows, out, None, False, 8, 1.0)
    return out.view(x.shape)


def _hadamard_quantize_fake(x: torch.Tensor, bits: int, clip_ratio: float, block_size: int = 0):
    return hadamard_quantize_fake(x, bits, clip_ratio, block_size)  # (packed codes: the op's only layout)


@triton_op("quantkern_triton::hadamard_quantize", _hadamard_quantize_fake)
def _hadamard_quantize_op(x: torch.Tensor, bits: int, clip_ratio: float,
                          block_size: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.contiguous()  # the kernels index rows as row * n
    rows, n = x.shape
    if not block_size:
        _check_size(n)  # (before _split, which fails with a TypeError on a size with no Hadamard matrix)
    if block_size or (bits == 4 and _split(n)[1] == 1):
        # Two-pass fallbacks (see the module docstring).
        return _quantize_per_token(_hadamard_op(x, block_size), bits, clip_ratio)
    q, scales = hadamard_quantize_fake(x, bits, clip_ratio, block_size)
    if rows:
        _launch(x, q, scales, True, bits, clip_ratio)
    return q, scales


def hadamard(x: torch.Tensor, block_size: int = 0) -> torch.Tensor:
    """Triton backend of ``quantkern.ops.hadamard`` for ``x`` [..., n] (copied first if not contiguous)."""
    return _hadamard_op(x, block_size)


def hadamard_quantize(x: torch.Tensor, bits: int, clip_ratio: float = 1.0, block_size: int = 0):
    """Triton backend of ``quantkern.ops.hadamard_quantize`` for a 2-D ``x`` (copied first if not contiguous)."""
    return _hadamard_quantize_op(x, bits, clip_ratio, block_size)
