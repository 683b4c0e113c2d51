"""One public function per op. Each validates its inputs, picks a backend (``quantkern.backends``)
and runs it. The meaning of every op is its function in ``quantkern.reference``.

Backend choice: the ``backend=`` argument, else ``QUANTKERN_BACKEND``, else automatic (cuda, then
triton, on CUDA tensors; reference on CPU tensors). A CUDA tensor with no fast kernel raises
``MissingKernelError`` instead of silently running the reference.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import reference
from .backends import MissingKernelError, select  # noqa: F401  (MissingKernelError is public here)
from .format import QuantizedWeight, check_bits

__all__ = [
    "MissingKernelError",
    "quantize_per_token",
    "weight_only_linear",
    "w8a8_linear",
    "w4a4_linear",
    "hadamard",
    "quantize_kv",
]


def _cuda_op(name: str):
    return getattr(torch.ops.quantkern, name)


def _triton_op(name: str):
    from .triton_kernels import KERNELS

    return KERNELS[name]


def quantize_per_token(x: torch.Tensor, bits: int = 8, clip_ratio: float = 1.0, backend: Optional[str] = None):
    """Symmetric per-token quantization of ``x`` [..., K] (fp16/bf16/fp32) to int8 or packed int4.

    Returns ``(q, scales)``: q int8 [..., K] (bits=8) or uint8 [..., K/2] (bits=4, signed nibbles,
    element 2j in the low nibble); scales fp32 [...]. Non-contiguous inputs are copied first.
    """
    reference._check_float("x", x)
    check_bits(bits)
    clip_ratio = reference._check_clip_ratio(clip_ratio)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (the features)")
    features = x.shape[-1]
    if bits == 4 and features % 2:
        raise ValueError(f"int4 activations need an even number of features, got {features}")
    lead = x.shape[:-1]
    rows = x.reshape(-1, features).contiguous()
    chosen = select("quantize_per_token", x.device, backend)
    if chosen == "cuda":
        q, scales = _cuda_op("quantize_per_token")(rows, bits, clip_ratio)
    elif chosen == "triton":
        q, scales = _triton_op("quantize_per_token")(rows, bits, clip_ratio)
    else:
        q, scales = reference.quantize_per_token(rows, bits, clip_ratio)
    return q.reshape(*lead, q.shape[-1]), scales.reshape(lead)


def _reference_only(op: str, device: torch.device, backend: Optional[str]) -> None:
    # Ops whose fast kernels are not written yet: the reference runs on CPU or when asked for;
    # select() raises MissingKernelError on a CUDA tensor otherwise.
    select(op, device, backend)


def weight_only_linear(x: torch.Tensor, weight: QuantizedWeight, bias: Optional[torch.Tensor] = None,
                       backend: Optional[str] = None) -> torch.Tensor:
    """W4A16 / W8A16 linear: ``x @ dequant(weight).T + bias`` (see ``reference.weight_only_linear``)."""
    _reference_only("weight_only_linear", x.device, backend)
    return reference.weight_only_linear(x, weight, bias)


def w8a8_linear(x: torch.Tensor, weight: QuantizedWeight, bias: Optional[torch.Tensor] = None,
                clip_ratio: float = 1.0, backend: Optional[str] = None) -> torch.Tensor:
    """W8A8: per-token int8 activations times symmetric int8 weights, int32 accumulation, fp epilogue."""
    _reference_only("w8a8_linear", x.device, backend)
    return reference.w8a8_linear(x, weight, bias, clip_ratio)


def w4a4_linear(x: torch.Tensor, weight: QuantizedWeight, bias: Optional[torch.Tensor] = None,
                clip_ratio: float = 1.0, backend: Optional[str] = None) -> torch.Tensor:
    """W4A4: per-token int4 activations times symmetric int4 weights, int32 accumulation, fp epilogue."""
    _reference_only("w4a4_linear", x.device, backend)
    return reference.w4a4_linear(x, weight, bias, clip_ratio)


def hadamard(x: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
    """Orthonormal Hadamard transform along the last dim (``x @ H.T / sqrt(n)``), a true Hadamard
    matrix for 2^k and 12/20/28/36/40 x 2^k."""
    _reference_only("hadamard", x.device, backend)
    return reference.hadamard(x)


def quantize_kv(x: torch.Tensor, bits: int, backend: Optional[str] = None):
    """Asymmetric per (token, head) KV quantization over head_dim; see ``reference.quantize_kv``."""
    _reference_only("quantize_kv", x.device, backend)
    return reference.quantize_kv(x, bits)
