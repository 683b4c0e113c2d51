"""Weight layouts of the integer-activation GEMMs (``csrc/int_gemm.cu``, ``triton_kernels/int_gemm.py``).

``prepare_int_weight`` turns a canonical symmetric ``QuantizedWeight`` (``quantkern.format``) into the
tensors the kernels read, once, at load time, in plain torch (CPU or GPU tensors alike):

* ``w``: the signed weight values as rows ``[N, K]`` along K (the tensor cores' "col" operand as is):

  - W8A8: int8 ``[N, K]``, ``code - 128`` (= ``code ^ 0x80`` reinterpreted).
  - W4A4: uint8 ``[N, K/2]`` signed two's-complement nibbles, element 2j in the low nibble of byte j
    (the same order as ``quantize_per_token``'s int4 activations): ``code ^ 8`` per nibble.
  - W4A8 (CUDA; also W4A4 on sm_90, see ``has_int4_tensor_cores``): as W4A4 but K permuted inside every
    32-chunk: physical nibble ``p = 8t + 2j + h``
    (t, j < 4; h < 2) holds logical ``k = 16h + 4t + j``. The kernel widens a word of 8 nibbles to int8
    lanes (low nibbles, then high nibbles), which then sit exactly where the int8 activation fragment
    of ``mma.m16n8k32`` has them. The Triton W4A8 path uses the natural order.

* CUDA only, tiled (``tile_int_weight``): those rows of bytes are cut into units of 64 rows x 128 k
  (64 bytes a row for int4, 128 for int8), each unit stored contiguously: ``w[N_pad/64, K_pad/128, 64,
  128*bits/8]`` with N zero-padded to a multiple of 64 and K to a multiple of 128. The kernel's k-tile is
  128 and its weight tiles are 64, 128 or 256 rows, so every pipeline stage reads whole contiguous 4 or
  8 KB units (full DRAM bursts instead of 64-byte pieces of rows 4-16 KB apart).
* ``w_scale``: fp32 ``[G, N]``, the transposed canonical scales (exact widening of fp16/bf16).
* ``group_len``: channels per scale group (``K`` for per-channel).
* How the GEMM takes the activation codes (``activations_packed``): ``packed_activations`` (int4 codes two per
  byte, as ``quantize_per_token`` packs them; else W4A4 on sm_90 takes them one per byte), and
  ``packed_activations_max_tokens``: W4A4 on sm_90 with per-channel weights takes packed codes up to that many
  tokens anyway (the few-token kernel widens them in registers: half the activation bytes and registers).

``unpack_int_weight`` undoes it (signed int8 ``[N, K]``), for the tests.
"""

from __future__ import annotations

from typing import Optional

import torch

from .format import QuantizedWeight

UNIT_ROWS = 64   # rows of one unit of the CUDA layout
TILE_K = 128     # k values of one unit


def unsupported_reason(in_features: int, out_features: int, group_size: int, bits: int, act_bits: int) -> Optional[str]:
    """Why the integer GEMMs cannot serve a layer (None if they can)."""
    k, n = int(in_features), int(out_features)
    if (bits, act_bits) not in ((8, 8), (4, 4), (4, 8)):
        return f"integer GEMMs serve W8A8, W4A4 and W4A8, not W{bits}A{act_bits}"
    if k % 32:
        return f"the integer GEMMs need in_features to be a multiple of 32, got {k}"
    if k > 65536:
        return f"the integer GEMMs need in_features <= 65536, got {k}"
    if n % 8:
        return f"the integer GEMMs need out_features to be a multiple of 8, got {n}"
    glen = k if group_size in (None, 0, -1) else int(group_size)
    if glen % 32:
        return f"the integer GEMMs need a group length that is a multiple of 32, got {glen}"
    return None


def permute_w4a8(values: torch.Tensor) -> torch.Tensor:
    """Signed int8 ``[N, K]`` in logical order -> physical order of the CUDA W4A8 layout (see module doc)."""
    n, k = values.shape
    v = values.reshape(n, k // 32, 2, 4, 4)        # (n, chunk, h, t, j): logical k = 16h + 4t + j
    return v.permute(0, 1, 3, 4, 2).reshape(n, k)  # physical p = 8t + 2j + h


def unpermute_w4a8(values: torch.Tensor) -> torch.Tensor:
    n, k = values.shape
    v = values.reshape(n, k // 32, 4, 4, 2)        # (n, chunk, t, j, h)
    return v.permute(0, 1, 4, 2, 3).reshape(n, k)


def _pack_signed_nibbles(values: torch.Tensor) -> torch.Tensor:
    nib = (values & 0xF).to(torch.uint8)
    return nib[:, 0::2] | (nib[:, 1::2] << 4)


def _unpack_signed_nibbles(packed: torch.Tensor) -> torch.Tensor:
    lo = (packed & 0xF).to(torch.int8)
    hi = (packed >> 4).to(torch.int8)
    v = torch.stack((lo, hi), dim=-1).flatten(-2)
    return torch.where(v >= 8, v - 16, v)


def tile_int_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Row-major weight bytes ``[N, K*bits/8]`` (int8 or packed uint8) -> the CUDA tiled layout (module doc)."""
    n, row = w.shape
    k = row * 8 // bits
    n_pad = -(-n // UNIT_ROWS) * UNIT_ROWS
    k_tiles = -(-k // TILE_K)
    unit_row = TILE_K * bits // 8
    padded = torch.zeros(n_pad, k_tiles * unit_row, dtype=w.dtype, device=w.device)
    padded[:n, :row] = w
    return padded.reshape(n_pad // UNIT_ROWS, UNIT_ROWS, k_tiles, unit_row).permute(0, 2, 1, 3).contiguous()


def untile_int_weight(tiled: torch.Tensor, n: int, k: int, bits: int) -> torch.Tensor:
    """Inverse of ``tile_int_weight``: ``[N, K*bits/8]``."""
    units, k_tiles, rows, unit_row = tiled.shape
    flat = tiled.permute(0, 2, 1, 3).reshape(units * rows, k_tiles * unit_row)
    return flat[:n, :k * bits // 8]


def prepare_int_weight(qw: QuantizedWeight, act_bits: int, backend: str = "cuda") -> dict:
    """Repack ``qw`` (symmetric, 4- or 8-bit) for the integer GEMM with ``act_bits`` activations."""
    if not isinstance(qw, QuantizedWeight):
        raise TypeError(f"weight must be a QuantizedWeight, got {type(qw).__name__}")
    if not qw.symmetric:
        raise ValueError("integer-activation GEMMs (W4A4, W8A8, W4A8) need symmetric weights (no zero points)")
    reason = unsupported_reason(qw.in_features, qw.out_features, qw.group_size, qw.bits, act_bits)
    if reason:
        raise ValueError(reason)
    from .reference import signed_weight_values

    values = signed_weight_values(qw)  # int8 [N, K], logical order
    # The int8 activation codes the CUDA GEMM reads: W8A8, W4A8, and W4A4 on GPUs without int4 tensor cores.
    gemm_act_bits = 8 if act_bits == 8 or (backend == "cuda" and not has_int4_tensor_cores(values.device)) else 4
    if backend == "cuda" and gemm_act_bits == 4 and qw.group_length < qw.in_features and qw.group_length % 64:
        # The native int4 mma steps 64 k at a time: quantkern::int_gemm refuses such groups on every call.
        from .backends import MissingKernelError

        raise MissingKernelError(f"the CUDA W4A4 GEMM needs a group length that is a multiple of 64 on "
                                 f"sm_80-sm_89 (int4 tensor cores), got {qw.group_length}")
    if qw.bits == 8:
        w = values.contiguous()
    else:
        if gemm_act_bits == 8 and backend == "cuda":
            values = permute_w4a8(values)
        w = _pack_signed_nibbles(values).contiguous()
    if backend == "cuda":
        w = tile_int_weight(w, qw.bits)
    packed_max_tokens = 0
    if (backend == "cuda" and (qw.bits, act_bits, gemm_act_bits) == (4, 4, 8) and qw.group_length == qw.in_features
            and values.is_cuda):
        from .layout_cuda import wgmma_kernel_available

        if wgmma_kernel_available(values.device):  # (the few-token kernel's test: csrc/int_gemm.cu, use_small_m)
            from . import _C

            packed_max_tokens = int(_C.build_info()["int_small_m_max_tokens"])
    return {
        "w": w,
        "w_scale": qw.scales.float().t().contiguous(),
        "group_len": qw.group_length,
        "bits": qw.bits,
        "act_bits": act_bits,
        "gemm_act_bits": gemm_act_bits,
        "packed_activations": gemm_act_bits == act_bits,  # False: int4 codes one per byte (ops.quantize_per_token)
        "packed_activations_max_tokens": packed_max_tokens,  # ...but packed up to this many tokens
        "layout": ("cuda-tiled-w4a8" if (qw.bits == 4 and gemm_act_bits == 8) else "cuda-tiled")
        if backend == "cuda" else "natural",
        "in_features": qw.in_features,
        "out_features": qw.out_features,
    }


def unpack_int_weight(prepared: dict) -> torch.Tensor:
    """Signed int8 ``[N, K]`` values in logical order, from ``prepare_int_weight``'s tensors."""
    w = prepared["w"]
    if prepared["layout"].startswith("cuda-tiled"):
        w = untile_int_weight(w, prepared["out_features"], prepared["in_features"], prepared["bits"])
    if prepared["bits"] == 8:
        return w
    values = _unpack_signed_nibbles(w)
    if prepared["layout"] == "cuda-tiled-w4a8":
        values = unpermute_w4a8(values)
    return values


def has_int4_tensor_cores(device: torch.device) -> bool:
    """Whether a CUDA device multiplies int4 natively (sm_80 to sm_89). Hopper (sm_90) has int8 tensor
    cores only: there W4A4 runs as W4A8 on the int4 codes stored one per byte (the same int32 sums), or, at up
    to 16 tokens, on its packed codes widened to int8 in registers (``activations_packed``)."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 8


def activations_packed(prepared: dict, tokens: int) -> bool:
    """Whether the GEMM of a prepared weight takes ``tokens`` rows of int4 activation codes packed two per byte
    (``quantize_per_token(..., packed=True)``) rather than one per byte."""
    return bool(prepared.get("packed_activations", True)) or tokens <= prepared.get("packed_activations_max_tokens", 0)


def int_gemm_cuda(q: torch.Tensor, sx: torch.Tensor, prepared: dict, bias: Optional[torch.Tensor],
                  out_dtype: torch.dtype, split_k: int = 0, config: int = 0) -> torch.Tensor:
    """``torch.ops.quantkern.int_gemm`` on quantized activations ``(q, sx)`` and a prepared weight;
    q as ``ops.quantize_per_token(x, prepared["act_bits"], packed=activations_packed(prepared, len(x)))`` makes
    it (uint8 q: packed int4 codes). ``config``: 0 automatic; 1-5 the mma.sync tiles; 6, 7 the sm_90 wgmma kernel
    (128 / 256 tokens); 8 the sm_90 few-token kernel (csrc/int_small_m.cu)."""
    a_bits = 4 if q.dtype == torch.uint8 else 8
    return torch.ops.quantkern.int_gemm(q, sx, prepared["w"], prepared["w_scale"], bias, a_bits, prepared["bits"],
                                        prepared["group_len"], out_dtype, split_k, config,
                                        prepared["layout"] == "cuda-tiled-w4a8")
