"""The CUDA W4A16 kernel's weight layout (``csrc/w4a16_gemm.cu``): the offline repack and the call.

``prepare_w4a16`` turns a canonical 4-bit ``QuantizedWeight`` (``quantkern.format``) into the tensors
the kernel reads, once, at load time, in plain torch (CPU or GPU tensors alike):

* ``qweight`` int32 ``[N/16, 2K]``. Output channels are cut into strips of 16, input channels into
  tiles of 64. Strip ``ns``, k-tile ``kt`` is one 512-byte unit (int32 offset ``(ns*K/64 + kt)*128``)
  of 32 lanes x 4 words; word ``kk`` of lane ``(g = lane // 4, t = lane % 4)`` holds 8 nibbles,
  nibble ``p = 4h + 2*jk + jn`` being::

      code[n = 16*ns + 8*jn + g, k = 64*kt + 16*kk + 8*jk + 2*t + h]

  which is exactly the B fragment of ``mma.m16n8k16`` (register ``jk`` of n8-tile ``jn``) once the
  large-M kernel takes ``(word >> 4(2*jk + jn)) & 0x000F000F`` (low half: h = 0, high half: h = 1),
  and the A fragment (16 channels x 16 k) of the small-M kernel, which multiplies with the weights
  as the left operand (register ``2*jk + jn``).
* ``scales`` ``[G, N]`` in the activation dtype (transposed canonical scales, ``G = K / group``).
* ``zeros`` ``[G, N]`` in the activation dtype (the zero codes, exact small integers), or ``None``
  for symmetric weights (implicit zero 8).
* ``scales_fit_fp16`` (bfloat16 only): whether every scale ``s`` is 0 or has ``STAGED_SCALE_MIN <= |s| <=
  STAGED_SCALE_MAX``; then, from 256 tokens (1024 for weights of at most 2^24 codes: ``stages_bf16`` in
  ``csrc/w4a16_gemm.cu``), the Hopper kernel runs bf16 activations as exact fp16 copies on its fp16 path
  (``csrc/w4a16_wgmma.cu``, "bf16 activations staged as fp16"), else on its slower bf16 path.
* ``locks`` int32 zeros: scratch counters of the kernel's split-K reduction (restored to zero by every
  call; do not share one prepared weight between calls running concurrently on different streams).

``unpack_w4a16_codes`` undoes the shuffle (used by the tests to check the layout without a GPU).
"""

from __future__ import annotations

from typing import Optional

import torch

from .format import QuantizedWeight, group_length

K_TILE = 64   # the kernel's k-tile: in_features must be a multiple of it
N_STRIP = 16  # the kernel's weight strip: out_features must be a multiple of it
LOCKS = 4096  # split-K counters per prepared weight (one per output tile of a split-K call)
ACTIVATION_DTYPES = (torch.float16, torch.bfloat16)
# The scales that convert exactly to fp16 once multiplied by 2^8 (kStagedScaleShift in csrc/w4a16_common.cuh),
# with (code - zero) * scale finite: 2^-(14 + 8) (fp16's smallest normal) to 4094 * 2^-8 (16 x that below 65504).
STAGED_SCALE_MIN = 2.0 ** -22
STAGED_SCALE_MAX = 4094 * 2.0 ** -8


def unsupported_reason(in_features: int, out_features: int, group_size: int) -> Optional[str]:
    """Why the CUDA W4A16 kernel cannot serve a ``[out_features, in_features]`` weight, or None if it can."""
    k, n = int(in_features), int(out_features)
    if k <= 0 or n <= 0:
        return f"in_features and out_features must be positive, got K={k}, N={n}"
    try:
        glen = group_length(group_size, k)
    except ValueError as error:
        return f"group_size {group_size!r} does not fit in_features {k}: {error}"
    if k % K_TILE:
        return (f"the CUDA W4A16 kernel needs in_features to be a multiple of {K_TILE} "
                f"(its k-tile), got {k}")
    if n % N_STRIP:
        return (f"the CUDA W4A16 kernel needs out_features to be a multiple of {N_STRIP} "
                f"(its weight strip), got {n}")
    if glen % 32:
        return f"the CUDA W4A16 kernel needs a group length that is a multiple of 32, got {glen}"
    return None


def _check_servable(qw: QuantizedWeight) -> None:
    if qw.bits != 4:
        raise ValueError(f"the CUDA W4A16 kernel takes 4-bit weights, got {qw.bits}-bit")
    reason = unsupported_reason(qw.in_features, qw.out_features, qw.group_size)
    if reason is not None:
        raise ValueError(reason)


def pack_codes_w4a16(codes: torch.Tensor) -> torch.Tensor:
    """Unsigned 4-bit codes uint8 ``[N, K]`` -> the kernel's int32 ``[N/16, 2K]`` (see the module doc)."""
    if codes.dtype != torch.uint8 or codes.dim() != 2:
        raise TypeError(f"codes must be a 2-D uint8 tensor, got {codes.dtype} with shape {tuple(codes.shape)}")
    n, k = codes.shape
    if n % N_STRIP or k % K_TILE:
        raise ValueError(f"codes must have N % {N_STRIP} == 0 and K % {K_TILE} == 0, got shape {(n, k)}")
    # n = 16 ns + 8 jn + g ; k = 64 kt + 16 kk + 8 jk + 2 t + h
    c = codes.reshape(n // 16, 2, 8, k // 64, 4, 2, 4, 2)    # (ns, jn, g, kt, kk, jk, t, h)
    c = c.permute(0, 3, 2, 6, 4, 7, 5, 1)                     # (ns, kt, g, t, kk, h, jk, jn)
    nib = c.reshape(-1, 8).to(torch.int64)                    # nibble p = 4h + 2jk + jn
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=codes.device)
    words = (nib << shifts).sum(dim=1)                        # 0 .. 2^32 - 1
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)
    return words.reshape(n // 16, 2 * k)


def unpack_w4a16_codes(qweight: torch.Tensor, in_features: int, out_features: int) -> torch.Tensor:
    """Inverse of ``pack_codes_w4a16``: the kernel's int32 ``[N/16, 2K]`` -> uint8 codes ``[N, K]``."""
    n, k = int(out_features), int(in_features)
    if qweight.dtype != torch.int32 or tuple(qweight.shape) != (n // 16, 2 * k):
        raise ValueError(f"qweight must be int32 of shape {(n // 16, 2 * k)}, "
                         f"got {qweight.dtype} {tuple(qweight.shape)}")
    words = qweight.reshape(-1, 1).to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=qweight.device)
    nib = ((words >> shifts) & 0xF).to(torch.uint8)            # (ns, kt, g, t, kk, h, jk, jn) flattened
    c = nib.reshape(n // 16, k // 64, 8, 4, 4, 2, 2, 2)
    c = c.permute(0, 7, 2, 1, 4, 6, 3, 5)                     # back to (ns, jn, g, kt, kk, jk, t, h)
    return c.reshape(n, k).contiguous()


def scales_fit_fp16(scales: torch.Tensor) -> bool:
    """Whether every scale is 0 or within [STAGED_SCALE_MIN, STAGED_SCALE_MAX] in magnitude (one device sync)."""
    magnitudes = scales.float().abs()
    fits = (magnitudes == 0) | ((magnitudes >= STAGED_SCALE_MIN) & (magnitudes <= STAGED_SCALE_MAX))
    return bool(fits.all())


def prepare_w4a16(qw: QuantizedWeight, dtype: torch.dtype) -> dict:
    """Repack a 4-bit ``QuantizedWeight`` for ``w4a16_linear`` with activations of ``dtype``.

    Runs once at load time, on the weight's device. The scales are converted to ``dtype``: exact when
    they already have it (the usual case), rounded otherwise (fp16 scales served to bf16 activations
    lose 3 bits of mantissa).
    """
    if dtype not in ACTIVATION_DTYPES:
        raise TypeError(f"the CUDA W4A16 kernel serves float16 or bfloat16 activations, got {dtype}")
    if not isinstance(qw, QuantizedWeight):
        raise TypeError(f"qw must be a QuantizedWeight, got {type(qw).__name__}")
    _check_servable(qw)
    n, k = qw.out_features, qw.in_features
    qweight = pack_codes_w4a16(qw.codes())
    scales = qw.scales.t().to(dtype).contiguous()
    zeros = None if qw.zeros is None else qw.zeros.t().to(dtype).contiguous()
    return {
        "qweight": qweight,
        "scales": scales,
        "zeros": zeros,
        "locks": torch.zeros(LOCKS, dtype=torch.int32, device=qw.device),
        "group_size": int(qw.group_size),  # canonical: 32, 64, 128 or -1 (per-channel)
        "in_features": k,
        "out_features": n,
        "dtype": dtype,
        "scales_fit_fp16": dtype == torch.bfloat16 and scales_fit_fp16(scales),
    }


def w4a16_linear(x2d: torch.Tensor, prepared: dict, bias: Optional[torch.Tensor] = None, *,
                 split_k: int = 0, tile_m: int = 0) -> torch.Tensor:
    """``x2d [M, K] @ dequant(W).T (+ bias)`` on the CUDA kernel; ``prepared`` from ``prepare_w4a16``.

    ``split_k`` / ``tile_m`` override the kernel's automatic choice (0), for tuning. ``tile_m``: 1 the
    small-M kernel (``csrc/w4a16_small_m.cu``), 2 the same without its weight ring (register stages only),
    3, 4 or 5 the Hopper wgmma kernel with 64, 128 or 256 (fp16) tokens per tile (``csrc/w4a16_wgmma.cu``;
    only where ``wgmma_kernel_available()``), 16, 64 or 128 the mma.sync kernel's token tiles
    (``csrc/w4a16_gemm.cu``). Automatic
    (``quantkern._C.w4a16_automatic_kernel`` says which): the small-M kernel up to 16 tokens, then the wgmma
    kernel on an sm_90 GPU (except small weights at up to 32-128 tokens: the small-M kernel again; for weights of
    up to 2^24 codes from 65 or 129 tokens its tile and K splits come from a cost model,
    ``quantkern._C.w4a16_modelled_wgmma_plan``), the mma.sync kernel elsewhere.
    """
    if x2d.dtype != prepared["dtype"]:
        raise TypeError(f"x has dtype {x2d.dtype} but the weight was prepared for {prepared['dtype']}")
    if x2d.dim() != 2 or x2d.shape[1] != prepared["in_features"]:
        raise ValueError(f"x must be 2-D [tokens, {prepared['in_features']}], got shape {tuple(x2d.shape)}")
    return torch.ops.quantkern.w4a16_gemm(x2d, prepared["qweight"], prepared["scales"], prepared["zeros"], bias,
                                          prepared["locks"], prepared["group_size"], split_k, tile_m,
                                          prepared.get("scales_fit_fp16", False))


def wgmma_kernel_available(device=None) -> bool:
    """Whether the op runs its Hopper (wgmma) kernel on ``device``: an sm_90 GPU and an extension whose
    arch list has 9.0a (the same test as the op's own dispatch, ``wgmma_available`` in csrc/w4a16_gemm.cu)."""
    if not torch.cuda.is_available():
        return False
    try:
        from . import _C
    except ImportError:
        return False
    return torch.cuda.get_device_capability(device) == (9, 0) and "9.0a" in _C.build_info()["archs"]
