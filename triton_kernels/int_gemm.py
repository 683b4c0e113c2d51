"""Integer GEMMs W8A8 / W4A4 / W4A8 in Triton: int8 ``tl.dot`` with int32 accumulation and the fused epilogue.

Semantics: ``quantkern.reference.quantized_activation_linear`` after ``quantize_per_token``:
``y = sx[m] * sum_g(acc_g[m, n] * sw[g, n]) (+ bias[n])`` in fp32, cast to fp16/bf16, where ``acc_g`` is
the exact int32 sum over weight group g (all of K for per-channel weights).

Layout (``quantkern.layout_int.prepare_int_weight(qw, act_bits, backend="triton")``, once at load time):
  a        int8 [M, K] or uint8 [M, K/2] (int4: signed nibbles, element 2j in the low nibble of byte j);
           ``quantize_per_token``'s output as is.  sx fp32 [M].
  w        int8 [N, K] (W8A8) or uint8 [N, K/2] signed nibbles in the natural order (W4A4, W4A8).
  w_scale  fp32 [G, N].  bias fp32 [N] or None.
Int4 operands are unpacked in registers: ``(p << 4) >> 4`` (arithmetic, as int8) gives the low nibble,
``p >> 4`` the high one, interleaved back with ``tl.join`` + reshape into natural k order.

Tiling: one program per (BLOCK_M x BLOCK_N) output tile; the K loop runs group by group (BLOCK_K divides
the group length, so a K tile never straddles a group), accumulates int32 with ``tl.dot`` and flushes
``acc * sw_g`` into an fp32 accumulator at each group's end. Pipeline: ``num_stages`` software-pipelines
the loads. ``OUT_ACC`` (per-channel only) stores the raw int32 accumulator instead (the test hook).
Configs by M (no autotuning): 16x64 for M <= 16, 64x128 up to 128, 128x128 beyond; small blocks under
TRITON_INTERPRET=1.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from ._host import cdiv, triton_op


@triton.jit
def _load_int8_tile(ptr, rows, k0, n_rows, K, stride, BITS: tl.constexpr, BLOCK_R: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    """int8 [BLOCK_R, BLOCK_K]: the signed values of rows ``rows``, k in [k0, k0 + BLOCK_K) (zero outside)."""
    if BITS == 8:
        offs = k0 + tl.arange(0, BLOCK_K)
        mask = (rows[:, None] < n_rows) & (offs[None, :] < K)
        v = tl.load(ptr + rows[:, None].to(tl.int64) * stride + offs[None, :], mask=mask, other=0)
    else:
        offs = k0 // 2 + tl.arange(0, BLOCK_K // 2)  # bytes: two k values each
        mask = (rows[:, None] < n_rows) & (offs[None, :] < K // 2)
        p = tl.load(ptr + rows[:, None].to(tl.int64) * stride + offs[None, :], mask=mask, other=0)
        p = p.to(tl.int8, bitcast=True)
        lo = (p << 4) >> 4  # arithmetic shifts of int8: sign-extended low nibble (element 2j)
        hi = p >> 4         # high nibble (element 2j + 1)
        v = tl.reshape(tl.join(lo, hi), (BLOCK_R, BLOCK_K))
    return v


@triton.jit
def _int_gemm_kernel(a_ptr, sx_ptr, w_ptr, sw_ptr, b_ptr, y_ptr,
                     M, N, K, GLEN, stride_a, stride_w, stride_y,
                     A_BITS: tl.constexpr, W_BITS: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_ACC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    yacc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    n_groups = K // GLEN
    for g in range(0, n_groups):
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for kk in range(0, GLEN, BLOCK_K):
            k0 = g * GLEN + kk
            a = _load_int8_tile(a_ptr, offs_m, k0, M, K, stride_a, A_BITS, BLOCK_M, BLOCK_K)
            w = _load_int8_tile(w_ptr, offs_n, k0, N, K, stride_w, W_BITS, BLOCK_N, BLOCK_K)
            acc = tl.dot(a, tl.trans(w), acc, out_dtype=tl.int32)
        sw = tl.load(sw_ptr + g * N + offs_n, mask=offs_n < N, other=0.0)
        yacc = yacc + acc.to(tl.float32) * sw[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_y + offs_n[None, :]
    if OUT_ACC:
        tl.store(y_ptrs, acc, mask=mask)
    else:
        sx = tl.load(sx_ptr + offs_m, mask=offs_m < M, other=0.0)
        y = yacc * sx[:, None]
        if HAS_BIAS:
            y = y + tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0)[None, :]
        tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _config(m: int, glen: int) -> dict:
    bk = 64 if glen % 64 == 0 else 32
    if _interpreting():
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=1)
    if m <= 16:
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=bk, num_warps=4, num_stages=4)
    if m <= 128:
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=bk, num_warps=4, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=bk, num_warps=8, num_stages=3)


def _check(a, w, a_bits: int, w_bits: int) -> int:
    if (a_bits, w_bits) not in ((8, 8), (4, 4), (8, 4)):
        raise ValueError(f"supported (a_bits, w_bits) are (8, 8), (4, 4), (8, 4); got ({a_bits}, {w_bits})")
    for name, t, bits in (("a", a, a_bits), ("w", w, w_bits)):
        want = torch.int8 if bits == 8 else torch.uint8
        if t.dtype != want or t.dim() != 2:
            raise TypeError(f"{name} must be a 2-D {want} tensor, got {t.dtype} with shape {tuple(t.shape)}")
    k = a.shape[1] * (8 // a_bits)
    if k != w.shape[1] * (8 // w_bits):
        raise ValueError(f"a and w disagree on K: {tuple(a.shape)} vs {tuple(w.shape)}")
    if k % 32:
        raise ValueError(f"K must be a multiple of 32, got {k}")
    return k


def _launch(a, sx, w, w_scale, bias, a_bits: int, w_bits: int, glen: int, out: torch.Tensor, out_acc: bool):
    m, n = a.shape[0], w.shape[0]
    k = a.shape[1] * (8 // a_bits)
    if m == 0 or n == 0:
        return out
    cfg = _config(m, glen)
    grid = (cdiv(m, cfg["BLOCK_M"]), cdiv(n, cfg["BLOCK_N"]))
    _int_gemm_kernel[grid](
        a, sx, w, w_scale, bias if bias is not None else w_scale, out,
        m, n, k, glen, a.stride(0), w.stride(0), out.stride(0),
        A_BITS=a_bits, W_BITS=w_bits, HAS_BIAS=bias is not None, OUT_ACC=out_acc, **cfg)
    return out


def _int_gemm_fake(a, a_scale, w, w_scale, bias, a_bits: int, w_bits: int, group_len: int,
                   out_dtype: torch.dtype) -> torch.Tensor:
    return a.new_empty((a.shape[0], w.shape[0]), dtype=out_dtype)


@triton_op("quantkern_triton::int_gemm", _int_gemm_fake)
def _int_gemm_op(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                 bias: Optional[torch.Tensor], a_bits: int, w_bits: int, group_len: int,
                 out_dtype: torch.dtype) -> torch.Tensor:
    out = _int_gemm_fake(a, a_scale, w, w_scale, bias, a_bits, w_bits, group_len, out_dtype)
    return _launch(a, a_scale, w, w_scale, bias, a_bits, w_bits, group_len, out, False)


def int_gemm(q: torch.Tensor, sx: torch.Tensor, prepared: dict, bias: Optional[torch.Tensor],
             out_dtype: torch.dtype) -> torch.Tensor:
    """Triton backend of the integer linear ops: quantized activations ``(q, sx)`` times a weight prepared by
    ``quantkern.layout_int.prepare_int_weight(..., backend="triton")``; bias fp32 [N] or None."""
    if prepared.get("layout") != "natural":
        raise ValueError("the Triton integer GEMM takes weights prepared with backend='triton' (natural order)")
    k = _check(q, prepared["w"], prepared["act_bits"], prepared["bits"])
    if k % prepared["group_len"]:
        raise ValueError(f"group length {prepared['group_len']} does not divide K = {k}")
    return _int_gemm_op(q.contiguous(), sx.contiguous(), prepared["w"], prepared["w_scale"], bias,
                        prepared["act_bits"], prepared["bits"], prepared["group_len"], out_dtype)


def int_gemm_acc(a: torch.Tensor, w: torch.Tensor, a_bits: int, w_bits: int) -> torch.Tensor:
    """The exact int32 accumulator ``a @ w^T`` (signed values; int4 packed, natural order): the test hook."""
    k = _check(a, w, a_bits, w_bits)
    out = torch.empty(a.shape[0], w.shape[0], dtype=torch.int32, device=a.device)
    dummy = torch.ones(1, w.shape[0], dtype=torch.float32, device=a.device)
    return _launch(a.contiguous(), dummy, w.contiguous(), dummy, None, a_bits, w_bits, k, out, True)
