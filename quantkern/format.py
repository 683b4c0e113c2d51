"""The one canonical packed format for quantized weights (specified byte by byte in docs/FORMAT.md).

Quantizers produce it, checkpoints store it, and ``QuantLinear`` repacks it once at load time into
whatever layout its kernel wants. Kernel-specific layouts (tensor-core interleaving) are never stored:
they are derived at load time, so one checkpoint serves every GPU and backend. ``LAYOUT`` names this
layout and is written into every checkpoint, so a future stored layout can be told apart.

Weights ``W[N, K]`` (``N`` = out_features, ``K`` = in_features) are quantized in groups of
``group_size`` consecutive input channels (``-1`` = one group per output channel, "per-channel"):

* codes are unsigned integers in ``[0, 2**bits - 1]``;
* ``W[n, k] ~= (code[n, k] - zero[n, g]) * scale[n, g]`` with ``g = k // group_length``;
* symmetric quantization has the implicit zero ``2**(bits-1)`` (8 for int4, 128 for int8) and stores
  no zero tensor; asymmetric stores one integer zero code per group;
* 4-bit codes are packed two per byte along K: element ``2j`` in the low nibble of byte ``j``,
  element ``2j+1`` in the high nibble (independent of endianness, unlike int32 packing);
* 8-bit codes are stored one per byte.

Runtime int4 *activations* and the int4 KV cache use signed two's-complement nibbles in the same
nibble order (``pack_int4_signed``), which is what integer tensor cores consume.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Optional

import torch

FORMAT_VERSION = 1
LAYOUT = "canonical-v1"
SUPPORTED_WEIGHT_BITS = (4, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128, -1)  # -1: per-channel (one group spans all of K)
SUPPORTED_SCALE_DTYPES = (torch.float16, torch.bfloat16)
PER_CHANNEL = -1


GROUP_SIZE_TYPE = "an int (32, 64, 128, or -1 for per-channel)"


def as_int(name: str, value, expected: str = "an int") -> int:
    """``value`` as an int; a float or bool is refused (``64.0 in (32, 64)`` holds, then 64.0 reached reshape;
    ``int(64.5)`` ran as 64)."""
    if not isinstance(value, bool):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise TypeError(f"{name} must be {expected}, got {type(value).__name__} {value!r}")


def check_bits(bits: int, allowed=SUPPORTED_WEIGHT_BITS) -> int:
    bits = as_int("bits", bits)
    if bits not in allowed:
        raise ValueError(f"bits must be one of {allowed}, got {bits!r}")
    return bits


def group_length(group_size: int, in_features: int) -> int:
    """Number of input channels sharing one scale; validates ``group_size`` against ``in_features``."""
    if group_size is None:
        return in_features
    group_size = as_int("group_size", group_size, GROUP_SIZE_TYPE)
    if group_size in (0, PER_CHANNEL):
        return in_features
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(
            f"group_size must be one of {SUPPORTED_GROUP_SIZES} (-1 = per-channel), got {group_size!r}"
        )
    if in_features % group_size != 0:
        raise ValueError(
            f"group_size {group_size} does not divide in_features {in_features}; "
            f"choose a group size that divides it (e.g. 64 or 32 for a hidden size of 576) or -1 (per-channel)"
        )
    return group_size


def canonical_group_size(group_size: Optional[int]) -> int:
    """The spelling stored in checkpoints: a positive group size, or -1 for per-channel."""
    return PER_CHANNEL if group_size in (None, 0, PER_CHANNEL) else int(group_size)


def implicit_zero(bits: int) -> int:
    """Zero code of symmetric quantization: the middle of the unsigned code range."""
    return 1 << (bits - 1)


def _check_uint8(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.uint8:
        raise TypeError(f"{name} must be uint8, got {t.dtype}")


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack unsigned 4-bit codes (uint8 values 0..15) pairwise along the last dim: [..., K] -> [..., K/2]."""
    _check_uint8("codes", codes)
    if codes.shape[-1] % 2:
        raise ValueError(f"the last dimension must be even to pack int4, got {codes.shape[-1]}")
    if codes.numel() and int(codes.max()) > 15:
        raise ValueError("int4 codes must lie in 0..15")
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_int4``: [..., K/2] uint8 -> [..., K] uint8 codes 0..15."""
    _check_uint8("packed", packed)
    low = packed & 0xF
    high = packed >> 4
    return torch.stack((low, high), dim=-1).flatten(-2)


def pack_int4_signed(values: torch.Tensor) -> torch.Tensor:
    """Pack signed int4 values (int8 in -8..7) as two's-complement nibbles: [..., K] int8 -> [..., K/2] uint8."""
    if values.dtype != torch.int8:
        raise TypeError(f"values must be int8, got {values.dtype}")
    if values.shape[-1] % 2:
        raise ValueError(f"the last dimension must be even to pack int4, got {values.shape[-1]}")
    nibbles = (values & 0xF).to(torch.uint8)
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack_int4_signed(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_int4_signed``: [..., K/2] uint8 -> [..., K] int8 in -8..7."""
    nibbles = unpack_int4(packed).to(torch.int8)
    return torch.where(nibbles >= 8, nibbles - 16, nibbles)


@dataclass
class QuantizedWeight:
    """A quantized ``[out_features, in_features]`` weight in the canonical format.

    ``qweight``: uint8 ``[N, K/2]`` (4-bit, packed) or ``[N, K]`` (8-bit) unsigned codes.
    ``scales``: fp16/bf16 ``[N, n_groups]``. ``zeros``: uint8 ``[N, n_groups]`` codes, or ``None``
    for symmetric quantization (implicit zero ``2**(bits-1)``).
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: Optional[torch.Tensor]
    bits: int
    group_size: int
    in_features: int
    out_features: int

    def __post_init__(self) -> None:
        self.group_size = canonical_group_size(self.group_size)
        self.validate()

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    @property
    def group_length(self) -> int:
        return group_length(self.group_size, self.in_features)

    @property
    def n_groups(self) -> int:
        return self.in_features // self.group_length

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def validate(self) -> None:
        check_bits(self.bits)
        n, k = self.out_features, self.in_features
        groups = k // group_length(self.group_size, k)
        packed_k = k // 2 if self.bits == 4 else k
        if self.bits == 4 and k % 2:
            raise ValueError(f"4-bit weights need an even in_features, got {k}")
        _check_uint8("qweight", self.qweight)
        if tuple(self.qweight.shape) != (n, packed_k):
            raise ValueError(f"qweight must have shape {(n, packed_k)}, got {tuple(self.qweight.shape)}")
        if self.scales.dtype not in SUPPORTED_SCALE_DTYPES:
            raise TypeError(f"scales must be float16 or bfloat16, got {self.scales.dtype}")
        if tuple(self.scales.shape) != (n, groups):
            raise ValueError(f"scales must have shape {(n, groups)}, got {tuple(self.scales.shape)}")
        if self.zeros is not None:
            _check_uint8("zeros", self.zeros)
            if tuple(self.zeros.shape) != (n, groups):
                raise ValueError(f"zeros must have shape {(n, groups)}, got {tuple(self.zeros.shape)}")
        tensors = [self.qweight, self.scales] + ([self.zeros] if self.zeros is not None else [])
        if len({t.device for t in tensors}) != 1:
            raise ValueError("qweight, scales and zeros must be on one device")

    def codes(self) -> torch.Tensor:
        """Unsigned codes, uint8 ``[N, K]``."""
        return unpack_int4(self.qweight) if self.bits == 4 else self.qweight

    def zero_codes(self) -> torch.Tensor:
        """Zero codes per group, uint8 ``[N, n_groups]`` (the implicit zero when symmetric)."""
        if self.zeros is not None:
            return self.zeros
        return torch.full_like(self.scales, implicit_zero(self.bits), dtype=torch.uint8)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros) if t is not None)

    def to(self, device) -> "QuantizedWeight":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return QuantizedWeight(move(self.qweight), move(self.scales), move(self.zeros), self.bits,
                               self.group_size, self.in_features, self.out_features)

    def tensors(self, prefix: str) -> dict:
        """The safetensors entries of this weight under ``prefix`` (e.g. ``model.layers.0.mlp.up_proj``)."""
        out = {f"{prefix}.qweight": self.qweight, f"{prefix}.scales": self.scales}
        if self.zeros is not None:
            out[f"{prefix}.zeros"] = self.zeros
        return out

    @classmethod
    def from_tensors(cls, tensors: dict, prefix: str, bits: int, group_size: int,
                     in_features: int, out_features: int) -> "QuantizedWeight":
        missing = [f"{prefix}.{name}" for name in ("qweight", "scales") if f"{prefix}.{name}" not in tensors]
        if missing:
            raise KeyError(f"checkpoint is missing tensors {missing}")
        return cls(tensors[f"{prefix}.qweight"], tensors[f"{prefix}.scales"], tensors.get(f"{prefix}.zeros"),
                   bits, group_size, in_features, out_features)
