"""W4A16 GEMM in Triton: ``y[M, N] = x[M, K] @ dequant(W)^T (+ bias)``, fp32 accumulation.

Semantics: ``quantkern.reference.weight_only_linear`` for 4-bit weights (group 32/64/128 or
per-channel, symmetric with the implicit zero code 8 or asymmetric with uint8 zero codes); x and y
are float16 or bfloat16; ``dequant = (code - zero) * scale``.

Layout (``prepare_w4a16``, once at load time, plain torch; canonical format in docs/FORMAT.md):
  qweight  int32 [K_pad / 8, N]  word (j, n) holds codes k = 8j .. 8j+7 of output row n, code 8j+i
           in bits 4i..4i+3; K is zero-padded to a multiple of K_ALIGN (128) so that no K tile needs
           a weight mask. Transposed so that a K tile's words are contiguous along N (coalesced loads).
  scales   [G, N] in the checkpoint's scale dtype (fp16/bf16, kept exact: never re-rounded).
  zeros    uint8 [G, N] zero codes, or absent (symmetric: implicit zero 8).
  locks    int32 [lock_count(N)] zeros: split-K counters, one per output tile of M <= MEDIUM_M.

Tiling: one program per (BLOCK_M x BLOCK_N) output tile and K split (grid (tiles, SPLIT_K)), output
tiles swizzled in groups of GROUP_M rows for L2 reuse of the weight stream. Each K step loads an
x tile [BLOCK_M, BLOCK_K] and a [BLOCK_K/8, BLOCK_N] tile of int32 words (each word loaded once,
16-byte vectors along N; loading a [BLOCK_K, BLOCK_N] tile of duplicated word addresses instead
made the software pipeline stage 8x the bytes in shared memory, 233 KB for 16x128x128), broadcasts
it to [BLOCK_K/8, 8, BLOCK_N], shifts by 4*i and masks, reshapes to [BLOCK_K, BLOCK_N] (row 8j + i)
and feeds ``tl.dot`` (fp16/bf16 inputs, fp32 accumulator; wgmma for BLOCK_M >= 64 on sm_90). BLOCK_K divides
the group length, so a K tile lies in one group. Where the scale is applied (SCALE_MODE, chosen per call):
  0 ONE_GROUP  per-channel (one group over K): the loop accumulates x @ (code - zero) exactly and the
               scale is applied once, in fp32, in the epilogue.
  1 IN_TILE    fp16 x and fp16 scales, grouped: w = (code - zero) * scale rounded once to fp16 in
               registers (the product of a 4-bit integer and an fp16 scale loses < 2^-12), then an
               in-place ``tl.dot`` accumulate (best for tensor-core pipelining at large M).
  2 AFTER_DOT  bf16 (or mixed) grouped: ``acc += dot(x, code - zero) * scale`` in fp32. Rounding the
               dequantized weight to bf16 would cost ~1e-3 relative error, too close to the 2e-3
               budget; integers -15..15 are exact in bf16, so this path is exact up to fp32 sums.
Epilogue: bias (fp32) added, cast to x's dtype, masked store. Split-K (M <= MEDIUM_M: decode/GEMV
shapes, and N = 4096 at M = 64, have too few output tiles to fill an H100's 132 SMs): each split stores an
fp32 partial tile to a workspace [SPLIT_K, M, N] and counts itself in its tile's lock (``locks``: int32 zeros
owned by the prepared weight, zero again after every call); the last split sums the partials in split order
(deterministic), adds the bias and stores y. No zeroed buffer, no atomics on y, no cast afterwards:
those were two more kernel launches, and 15-19 us of host time a call on the H200 machine's CPU.

Pipeline: ``num_stages`` software-pipelines the K loop's global loads (cp.async / TMA on Hopper);
unpack and dequant run on the CUDA cores between ``tl.dot`` issues. Configs are data (``CONFIGS``),
autotuned per (M bucket, N, K, group length, dtypes) on a GPU; under TRITON_INTERPRET=1 one config
is chosen by a rule instead (benchmarking in the interpreter is meaningless and slow).
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from quantkern.format import QuantizedWeight, implicit_zero

from ._host import cdiv, next_power_of_2, triton_op

K_ALIGN = 128  # qweight's K is padded to a multiple of this (the largest BLOCK_K)
SMALL_M = 32    # M <= SMALL_M: the "small" configs (narrow tiles, split-K: partials, last split reduces)
MEDIUM_M = 128  # SMALL_M < M <= MEDIUM_M: the "large" configs and the "medium" split-K ones; above: "large"

ONE_GROUP, IN_TILE, AFTER_DOT = 0, 1, 2


def _cfg(bm, bn, bk, split_k, warps, stages, group_m=8):
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split_k, GROUP_M=group_m,
                num_warps=warps, num_stages=stages)


# Autotune candidates (H100-oriented), keyed on (M bucket, N, K, group length, dtypes). Configs whose
# BLOCK_K does not divide the group length, or whose BLOCK_M is far above M, are pruned per call;
# every group length keeps at least the BLOCK_K = 32 entries.
CONFIGS = {
    # M <= 32 (decode, small batches): memory bound on the int4 weight stream. Narrow N tiles and
    # split-K to launch enough CTAs; BLOCK_M = 16 is the smallest tl.dot tile.
    "small": [
        _cfg(16, 64, 128, 4, 4, 4),
        _cfg(16, 128, 128, 2, 4, 4),
        _cfg(16, 64, 64, 8, 4, 4),
        _cfg(16, 128, 64, 4, 4, 4),
        _cfg(16, 32, 128, 8, 4, 4),
        _cfg(16, 64, 32, 8, 4, 5),
        _cfg(16, 128, 32, 4, 4, 5),
        _cfg(32, 64, 64, 4, 4, 4),
        _cfg(32, 128, 32, 4, 4, 4),
    ],
    # 32 < M <= MEDIUM_M: the "large" tiles, plus split-K variants for layers with few output tiles
    # (N = 4096 at M = 64 is 32 tiles of 64 x 128: a quarter of an H100's SMs).
    "medium": [
        _cfg(64, 128, 64, 4, 4, 4),
        _cfg(64, 128, 64, 8, 4, 4),
        _cfg(64, 64, 64, 8, 4, 4),
        _cfg(32, 128, 64, 8, 4, 4),
        _cfg(64, 128, 32, 8, 4, 5),
        _cfg(128, 128, 64, 4, 8, 3),
        _cfg(64, 256, 64, 4, 8, 3),
    ],
    # M > 32 (alone above MEDIUM_M): compute bound towards large M; classic tensor-core tiles, no split-K.
    "large": [
        _cfg(64, 128, 64, 1, 4, 4),
        _cfg(64, 128, 32, 1, 4, 5),
        _cfg(64, 256, 64, 1, 8, 3),
        _cfg(128, 128, 64, 1, 8, 3),
        _cfg(128, 128, 32, 1, 4, 4),
        _cfg(128, 256, 64, 1, 8, 3),
        _cfg(128, 128, 128, 1, 8, 3),
        _cfg(128, 256, 32, 1, 8, 4),
    ],
}


def _m_bucket(m: int) -> int:
    return 16 if m <= 16 else min(next_power_of_2(m), 4096)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# ----------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------

@triton.jit
def _w4a16_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, partial_ptr, lock_ptr,
                  M, N, K, stride_xm, stride_ym, stride_partial, GROUP_LEN, M_BUCKET,
                  HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, SCALE_MODE: tl.constexpr,
                  DOT_IN_FP32: tl.constexpr, EVEN_K: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr):
    # M_BUCKET is only an autotune key.
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pids_per_group = GROUP_M * num_pid_n
    first_m = (pid // pids_per_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % pids_per_group) % group_rows
    pid_n = (pid % pids_per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Wrapped indices keep every load in bounds without masks; the store is masked. (No contiguity
    # hints: they would be false in a wrapped tile; with N % 16 == 0, Triton's specialization on N
    # already proves 16-element contiguity for vector loads.)
    rm = offs_m % M
    rn = offs_n % N
    offs_k = tl.arange(0, BLOCK_K)

    num_kb = tl.cdiv(K, BLOCK_K)
    kb_per_split = tl.cdiv(num_kb, SPLIT_K)
    kb_start = pid_k * kb_per_split
    kb_end = tl.minimum(kb_start + kb_per_split, num_kb)

    k0 = kb_start * BLOCK_K
    x_ptrs = x_ptr + rm[:, None].to(tl.int64) * stride_xm + (k0 + offs_k)[None, :]
    offs_kw = tl.arange(0, BLOCK_K // 8)
    w_ptrs = w_ptr + (k0 // 8 + offs_kw)[:, None].to(tl.int64) * N + rn[None, :]
    shifts = (tl.arange(0, 8) * 4)[None, :, None]

    zero = 8  # symmetric: the implicit zero code
    if SCALE_MODE == 0:
        scale = tl.load(s_ptr + rn).to(tl.float32)
        if HAS_ZEROS:
            zero = tl.load(z_ptr + rn).to(tl.int32)[None, :]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(kb_start, kb_end):
        if EVEN_K:
            a = tl.load(x_ptrs)
        else:
            a = tl.load(x_ptrs, mask=(kb * BLOCK_K + offs_k)[None, :] < K, other=0.0)
        # [BLOCK_K/8, BLOCK_N] words -> [BLOCK_K/8, 8, BLOCK_N] nibbles -> [BLOCK_K, BLOCK_N], row k = 8j + i.
        words = tl.load(w_ptrs)
        codes = tl.reshape((words[:, None, :] >> shifts) & 0xF, (BLOCK_K, BLOCK_N))
        zk = zero
        if SCALE_MODE != 0:
            g_off = ((kb * BLOCK_K) // GROUP_LEN) * N
            sg = tl.load(s_ptr + g_off + rn)
            if HAS_ZEROS:
                zk = tl.load(z_ptr + g_off + rn).to(tl.int32)[None, :]
        # Integers -15..15 convert exactly. int -> bf16 goes through fp32 (as the GPU converts
        # anyway; Triton's CPU interpreter reinterprets bits on a direct int -> bf16 cast).
        if DOT_IN_FP32:
            # CPU interpreter only (its tl.dot multiplies bf16 bit patterns as integers): both
            # operands in fp32, exact for bf16 values, so the result is the same.
            a = a.to(tl.float32)
            w = (codes - zk).to(tl.float32)
            if SCALE_MODE == 2:
                acc += tl.dot(a, w, input_precision="ieee") * sg[None, :].to(tl.float32)
            else:
                acc = tl.dot(a, w, acc, input_precision="ieee")
        elif SCALE_MODE == 1:
            w = (codes - zk).to(tl.float16) * sg[None, :].to(tl.float16)
            acc = tl.dot(a, w, acc)
        else:
            if a.dtype == tl.bfloat16:
                w = (codes - zk).to(tl.float32).to(tl.bfloat16)
            else:
                w = (codes - zk).to(a.dtype)
            if SCALE_MODE == 2:
                acc += tl.dot(a, w) * sg[None, :].to(tl.float32)
            else:
                acc = tl.dot(a, w, acc)
        x_ptrs += BLOCK_K
        w_ptrs += (BLOCK_K // 8) * N

    if SCALE_MODE == 0:
        acc = acc * scale[None, :]
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn).to(tl.float32)[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        # Split K: each split stores its fp32 partial tile, then counts itself in the tile's lock; the
        # last to arrive sums the partials in split order (the same sum whichever split is last: results
        # are bit-identical across runs), adds the bias, stores y and resets the lock for the next call.
        # The barrier orders every thread's partial stores before the (one-thread, acq_rel) count.
        tile = offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
        tl.store(partial_ptr + pid_k * stride_partial + tile, acc, mask=mask)
        tl.debug_barrier()
        arrived = tl.atomic_add(lock_ptr + pid, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for split in tl.static_range(SPLIT_K):
                total += tl.load(partial_ptr + split * stride_partial + tile, mask=mask, other=0.0,
                                 cache_modifier=".cg")
            if HAS_BIAS:
                total += tl.load(b_ptr + rn).to(tl.float32)[None, :]
            tl.store(y_ptrs, total.to(y_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(lock_ptr + pid, 0)


MAX_SPLIT_K = {name: max(c["SPLIT_K"] for c in CONFIGS[name]) for name in CONFIGS}


def _lock_count_for(m: int, n: int, cfg: dict) -> int:
    """Split-K locks a launch of ``cfg`` needs: one per output tile."""
    return cdiv(m, cfg["BLOCK_M"]) * cdiv(n, cfg["BLOCK_N"])


@functools.lru_cache(maxsize=None)
def lock_count(n: int) -> int:
    """Locks a prepared weight holds: enough for any "small" or "medium" config at the M it serves."""
    return max([_lock_count_for(SMALL_M, n, c) for c in CONFIGS["small"]]
               + [_lock_count_for(MEDIUM_M, n, c) for c in CONFIGS["medium"]])


def _config_fits(cfg: dict, group_len: int, n_groups: int, m: int) -> bool:
    bk = cfg["BLOCK_K"]
    if n_groups > 1 and (bk > group_len or group_len % bk):
        return False
    return cfg["BLOCK_M"] <= max(16, _m_bucket(m))


def _prune(configs, named_args, **kwargs):
    m, k, group_len = named_args["M"], named_args["K"], named_args["GROUP_LEN"]
    n_groups = k // group_len
    kept = [c for c in configs if _config_fits(c.all_kwargs(), group_len, n_groups, m)]
    # Split-K beyond the number of K tiles only adds empty programs.
    kept = [c for c in kept if c.kwargs["SPLIT_K"] <= max(1, cdiv(k, c.kwargs["BLOCK_K"]))] or kept
    if not kept:  # BLOCK_K = 32 configs always fit; keep the smallest BLOCK_M of them
        kept = sorted((c for c in configs if c.kwargs["BLOCK_K"] == 32), key=lambda c: c.kwargs["BLOCK_M"])[:1]
    return kept


def _as_triton_configs(dicts):
    return [triton.Config({k: v for k, v in d.items() if not k.startswith("num_")},
                          num_warps=d["num_warps"], num_stages=d["num_stages"]) for d in dicts]


_heuristics = triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
_KEY = ["M_BUCKET", "N", "K", "GROUP_LEN"]
_AUTOTUNED = {
    "small": triton.autotune(_as_triton_configs(CONFIGS["small"]), key=_KEY,
                             prune_configs_by={"early_config_prune": _prune})(_heuristics(_w4a16_kernel)),
    "medium": triton.autotune(_as_triton_configs(CONFIGS["large"] + CONFIGS["medium"]), key=_KEY,
                              prune_configs_by={"early_config_prune": _prune})(_heuristics(_w4a16_kernel)),
    "large": triton.autotune(_as_triton_configs(CONFIGS["large"]), key=_KEY,
                             prune_configs_by={"early_config_prune": _prune})(_heuristics(_w4a16_kernel)),
}
_TUNED_CONFIGS: dict = {}  # _launch's key -> the autotuner's choice (Config.all_kwargs())


def _untuned_config(m: int, group_len: int, n_groups: int) -> dict:
    """One modest GPU config, for QUANTKERN_TRITON_AUTOTUNE=0 (test runs: no autotune compile storm)."""
    bk = 64 if n_groups == 1 else min(64, group_len)
    return _cfg(16 if m <= 16 else 64, 128, bk, 1, 4, 3)


def _interpreter_config(m: int, n: int, k: int, group_len: int, n_groups: int) -> dict:
    """One config for the CPU interpreter: big tiles (fewer programs and loop trips), no split-K."""
    bk = 128 if n_groups == 1 else min(128, group_len)
    bm = min(64, max(16, next_power_of_2(m)))
    bn = min(256, max(32, next_power_of_2(n)))
    return _cfg(bm, bn, bk, 1, 4, 1)


# ----------------------------------------------------------------------------------------------
# Host side: repack, checks, launch, custom op
# ----------------------------------------------------------------------------------------------

def unsupported_reason(in_features: int, out_features: int, group_size: int) -> Optional[str]:
    """Why this kernel cannot serve a 4-bit layer of this shape (None: it can serve any valid one)."""
    if in_features <= 0 or out_features <= 0:
        return f"empty layer ({in_features} -> {out_features})"
    if in_features % 2:
        return f"4-bit weights need an even in_features, got {in_features}"
    return None


def prepare_w4a16(qw: QuantizedWeight, dtype: torch.dtype = torch.float16) -> dict:
    """Repack a canonical 4-bit ``QuantizedWeight`` into this kernel's layout (see the module doc).

    Pure: ``qw`` is not modified and equal inputs give equal outputs; an already prepared dict is
    returned unchanged (idempotent). ``dtype`` is the activation dtype the result serves.
    """
    if isinstance(qw, dict) and "qweight" in qw and "group_len" in qw:
        if qw["dtype"] != dtype:
            raise TypeError(f"weight was prepared for {qw['dtype']} activations, not {dtype}")
        return qw
    if not isinstance(qw, QuantizedWeight):
        raise TypeError(f"qw must be a QuantizedWeight, got {type(qw).__name__}")
    if qw.bits != 4:
        raise ValueError(f"the Triton W4A16 kernel needs 4-bit weights, got {qw.bits}-bit")
    if dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"the Triton W4A16 kernel takes float16 or bfloat16 activations, got {dtype}")
    qw.validate()
    n, k = qw.out_features, qw.in_features
    k_pad = cdiv(k, K_ALIGN) * K_ALIGN
    codes = qw.codes().to(torch.int64)                               # [N, K] 0..15 (a new tensor)
    codes = torch.nn.functional.pad(codes, (0, k_pad - k), value=implicit_zero(4))
    shifts = torch.arange(0, 32, 4, device=codes.device, dtype=torch.int64)
    words = (codes.reshape(n, k_pad // 8, 8) << shifts).sum(dim=-1)  # [N, K_pad/8] in 0 .. 2^32 - 1
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)
    prepared = {
        "qweight": words.t().contiguous(),                           # [K_pad/8, N] int32
        "scales": qw.scales.t().contiguous(),                        # [G, N] fp16/bf16, exact
        "zeros": None if qw.zeros is None else qw.zeros.t().contiguous(),  # [G, N] uint8
        "locks": torch.zeros(lock_count(n), dtype=torch.int32, device=qw.scales.device),  # split-K scratch
        "group_len": qw.group_length,
        "in_features": k,
        "out_features": n,
        "dtype": dtype,
    }
    return prepared


def _check_inputs(x, qweight, scales, zeros, bias, group_len: int, in_features: int, locks=None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"x must be float16 or bfloat16, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [tokens, in_features], got shape {tuple(x.shape)}")
    if x.shape[1] != in_features:
        raise ValueError(f"x has {x.shape[1]} features but the weight has in_features {in_features}")
    # K tiles read whole words up to K rounded up to K_ALIGN (prepare_w4a16's padding): no weight mask.
    k_pad = cdiv(in_features, K_ALIGN) * K_ALIGN
    if qweight.dtype != torch.int32 or qweight.dim() != 2 or qweight.shape[0] * 8 < k_pad:
        raise ValueError(f"qweight must be int32 [K_pad/8, N] (from prepare_w4a16), got {qweight.dtype} "
                         f"{tuple(qweight.shape)}")
    n = qweight.shape[1]
    if group_len <= 0 or in_features % group_len:
        raise ValueError(f"group length {group_len} does not divide in_features {in_features}")
    groups = in_features // group_len
    if tuple(scales.shape) != (groups, n) or scales.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"scales must be fp16/bf16 [{groups}, {n}], got {scales.dtype} {tuple(scales.shape)}")
    if zeros is not None and (tuple(zeros.shape) != (groups, n) or zeros.dtype != torch.uint8):
        raise ValueError(f"zeros must be uint8 [{groups}, {n}], got {zeros.dtype} {tuple(zeros.shape)}")
    if bias is not None and (tuple(bias.shape) != (n,) or not bias.dtype.is_floating_point):
        raise ValueError(f"bias must be a float tensor of shape ({n},), got {bias.dtype} {tuple(bias.shape)}")
    if locks is not None and (locks.dtype != torch.int32 or locks.dim() != 1):
        raise ValueError(f"locks must be a 1-D int32 tensor of zeros (from prepare_w4a16), got {locks.dtype} "
                         f"{tuple(locks.shape)}")
    devices = {t.device for t in (x, qweight, scales, zeros, bias, locks) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"x, the prepared weight and bias must be on one device, got {sorted(map(str, devices))}")
    # The kernel indexes them as contiguous [rows, N] (prepare_w4a16 makes them so); a copy here on every call of a
    # strided weight would hide a slow path.
    for name, t in (("qweight", qweight), ("scales", scales), ("zeros", zeros)):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (as prepare_w4a16 makes it), got strides {t.stride()}")


def _launch(x, qweight, scales, zeros, bias, group_len: int, in_features: int,
            locks: Optional[torch.Tensor] = None, config: Optional[dict] = None) -> torch.Tensor:
    """Run the kernel; ``config`` (a ``CONFIGS``-style dict) forces one config (tests, tuning).
    ``locks``: the prepared weight's split-K counters (None: fresh zeros, one more launch)."""
    m, k = x.shape
    n = qweight.shape[1]
    if m == 0:
        return x.new_empty((0, n))
    if x.stride(1) != 1:
        x = x.contiguous()
    if bias is not None and bias.stride(0) != 1:  # (ops.weight_only_linear passes the caller's bias as is)
        bias = bias.contiguous()
    n_groups = k // group_len
    if n_groups == 1:
        mode = ONE_GROUP
    elif x.dtype == torch.float16 and scales.dtype == torch.float16:
        mode = IN_TILE
    else:
        mode = AFTER_DOT
    interpreting = _interpreting()
    if x.device.type != "cuda" and not interpreting:
        raise RuntimeError(f"the Triton W4A16 kernel needs CUDA tensors (or TRITON_INTERPRET=1), got {x.device}")
    # The CPU interpreter truncates fp32 -> bf16 casts: there the kernel stores fp32 and torch rounds.
    fp32_out = interpreting and x.dtype == torch.bfloat16
    y = torch.empty((m, n), dtype=torch.float32 if fp32_out else x.dtype, device=x.device)
    bucket = _m_bucket(m)
    key = None
    # The config: forced, else chosen by rule (interpreter, QUANTKERN_TRITON_AUTOTUNE=0), else the
    # autotuner's choice for this key. The autotuner runs on a key's first call only; later calls launch
    # its choice directly, which skips the autotuner's and the heuristics' per-call Python (16-21 us a
    # call on the H200 machine's CPU). The key holds everything the autotuner's own key does.
    if config is not None:
        if not _config_fits(config, group_len, n_groups, 1 << 30):
            raise ValueError(f"config BLOCK_K={config['BLOCK_K']} does not divide the group length {group_len}")
        chosen = config
    elif interpreting:
        chosen = _interpreter_config(m, n, k, group_len, n_groups)
    elif os.environ.get("QUANTKERN_TRITON_AUTOTUNE") == "0":
        chosen = _untuned_config(m, group_len, n_groups)
    else:
        key = (bucket, n, k, group_len, x.dtype, qweight.dtype, scales.dtype,
               zeros is not None and zeros.dtype, bias is not None and bias.dtype, y.dtype)
        chosen = _TUNED_CONFIGS.get(key)  # None: this key's first call, which autotunes
    # Split K (M <= MEDIUM_M): partial tiles, and the prepared weight's locks (or fresh zeros).
    tuner = "small" if m <= SMALL_M else "medium" if m <= MEDIUM_M else "large"
    splits = chosen["SPLIT_K"] if chosen is not None else MAX_SPLIT_K[tuner]
    if splits > 1:
        partials = torch.empty((splits, m, n), dtype=torch.float32, device=x.device)
        needed = _lock_count_for(m, n, chosen) if chosen is not None else lock_count(n)
        if locks is None or needed > locks.numel():
            locks = torch.zeros(needed, dtype=torch.int32, device=x.device)
    else:
        partials = locks = y  # never touched with SPLIT_K == 1
    zeros_arg = zeros if zeros is not None else scales  # never read when HAS_ZEROS is False
    bias_arg = bias if bias is not None else scales     # never read when HAS_BIAS is False
    args = (x, qweight, scales, zeros_arg, bias_arg, y, partials, locks, m, n, k, x.stride(0), y.stride(0), m * n,
            group_len, bucket)
    flags = dict(HAS_ZEROS=zeros is not None, HAS_BIAS=bias is not None, SCALE_MODE=mode,
                 DOT_IN_FP32=interpreting and x.dtype == torch.bfloat16)

    def grid(meta):
        return (cdiv(m, meta["BLOCK_M"]) * cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])

    if chosen is not None:
        _w4a16_kernel[grid(chosen)](*args, **flags, **chosen, EVEN_K=k % chosen["BLOCK_K"] == 0)
    else:
        autotuner = _AUTOTUNED[tuner]
        autotuner[grid](*args, **flags)
        _TUNED_CONFIGS[key] = autotuner.best_config.all_kwargs()
    return y.to(x.dtype) if fp32_out else y


def _w4a16_gemm_fake(x, qweight, scales, zeros, bias, group_len: int, in_features: int,
                     locks: Optional[torch.Tensor] = None) -> torch.Tensor:
    _check_inputs(x, qweight, scales, zeros, bias, group_len, in_features, locks)
    return x.new_empty((x.shape[0], qweight.shape[1]))


@triton_op("quantkern_triton::w4a16_gemm", _w4a16_gemm_fake)
def _w4a16_gemm_op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                   bias: Optional[torch.Tensor], group_len: int, in_features: int,
                   locks: Optional[torch.Tensor] = None) -> torch.Tensor:
    # locks is scratch, zero again when the kernel ends (as the CUDA op's): not declared as mutated.
    _check_inputs(x, qweight, scales, zeros, bias, group_len, in_features, locks)
    return _launch(x, qweight, scales, zeros, bias, group_len, in_features, locks)


def w4a16_linear(x2d: torch.Tensor, prepared: dict, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x2d @ dequant(W)^T + bias`` for a 2-D fp16/bf16 ``x2d`` and a ``prepare_w4a16`` result."""
    if not isinstance(prepared, dict) or "qweight" not in prepared:
        raise TypeError("prepared must be the dict returned by prepare_w4a16")
    if isinstance(x2d, torch.Tensor) and x2d.dtype != prepared["dtype"]:
        raise TypeError(f"x is {x2d.dtype} but the weight was prepared for {prepared['dtype']} activations")
    return _w4a16_gemm_op(x2d, prepared["qweight"], prepared["scales"], prepared["zeros"], bias,
                          prepared["group_len"], prepared["in_features"], prepared["locks"])
