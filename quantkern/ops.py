"""One public function per op. Each validates its inputs, picks a backend (``quantkern.backends``)
and runs it. The meaning of every op is its function in ``quantkern.reference``.

Backend choice: the ``backend=`` argument, else ``QUANTKERN_BACKEND``, else automatic (cuda, then
triton, on CUDA tensors; reference on CPU tensors). A CUDA tensor with no fast kernel raises
``MissingKernelError`` instead of silently running the reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

import torch

from . import reference
from .backends import MissingKernelError, select  # noqa: F401  (MissingKernelError is public here)
from .format import QuantizedWeight, check_bits

__all__ = [
    "MissingKernelError",
    "PreparedWeight",
    "prepare_weight_only",
    "quantize_per_token",
    "weight_only_linear",
    "w8a8_linear",
    "w4a4_linear",
    "w4a8_linear",
    "quantized_activation_linear",
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


@dataclass(frozen=True)
class PreparedWeight:
    """A quantized weight repacked once, at load time, into one backend's kernel layout.

    ``tensors`` holds the backend's layout (opaque outside it); the reference backend keeps the
    canonical ``QuantizedWeight`` in ``source``. ``dtype`` is the activation dtype it serves.
    """

    backend: str
    device: torch.device
    dtype: torch.dtype
    bits: int
    group_size: int
    in_features: int
    out_features: int
    tensors: dict = field(default_factory=dict)
    source: Optional[QuantizedWeight] = None


def _w4a16_module(backend: str):
    if backend == "cuda":
        from . import layout_cuda as module
    else:
        from .triton_kernels import w4a16 as module
    return module


def weight_only_unsupported_reason(bits: int, group_size: int, in_features: int, out_features: int,
                                   backend: str) -> Optional[str]:
    """Why ``backend``'s W4A16 kernel cannot serve this layer (None if it can); quantizers ask first."""
    if backend == "reference":
        return None
    if bits != 4:
        return f"the {backend} weight-only kernels are 4-bit; W{bits}A16 runs on the reference backend only"
    module = _w4a16_module(backend)
    check = getattr(module, "unsupported_reason", None)
    return check(in_features, out_features, group_size) if check else None


def prepare_weight_only(weight: QuantizedWeight, dtype: torch.dtype = torch.float16,
                        backend: Optional[str] = None) -> PreparedWeight:
    """Repack ``weight`` for the backend that will run it on its device (once, at load time)."""
    if not isinstance(weight, QuantizedWeight):
        raise TypeError(f"weight must be a QuantizedWeight, got {type(weight).__name__}")
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"dtype must be float16, bfloat16 or float32, got {dtype}")
    chosen = select("weight_only_linear", weight.device, backend)
    meta = dict(device=weight.device, dtype=dtype, bits=weight.bits, group_size=weight.group_size,
                in_features=weight.in_features, out_features=weight.out_features)
    if chosen == "reference":
        return PreparedWeight("reference", source=weight, **meta)
    if dtype == torch.float32:
        raise TypeError(f"the {chosen} W4A16 kernels take float16 or bfloat16 activations, not float32")
    reason = weight_only_unsupported_reason(weight.bits, weight.group_size, weight.in_features,
                                            weight.out_features, chosen)
    if reason:
        raise MissingKernelError(f"weight_only_linear ({weight.in_features} -> {weight.out_features}): {reason}")
    return PreparedWeight(chosen, tensors=_w4a16_module(chosen).prepare_w4a16(weight, dtype), **meta)


def weight_only_linear(x: torch.Tensor, weight: Union[QuantizedWeight, PreparedWeight],
                       bias: Optional[torch.Tensor] = None, backend: Optional[str] = None) -> torch.Tensor:
    """W4A16 / W8A16 linear: ``x @ dequant(weight).T + bias`` (see ``reference.weight_only_linear``).

    Pass a ``PreparedWeight`` (``prepare_weight_only``; ``QuantLinear`` keeps one): a bare
    ``QuantizedWeight`` is repacked on every call, which is fine for a one-off and slow in a loop.
    """
    if isinstance(weight, QuantizedWeight):
        weight = prepare_weight_only(weight, x.dtype if isinstance(x, torch.Tensor) else torch.float16, backend)
    elif not isinstance(weight, PreparedWeight):
        raise TypeError(f"weight must be a QuantizedWeight or PreparedWeight, got {type(weight).__name__}")
    elif backend is not None and backend != weight.backend:
        raise ValueError(f"weight was prepared for the {weight.backend} backend, not {backend!r}")
    if weight.backend == "reference":
        return reference.weight_only_linear(x, weight.source, bias)
    reference._check_linear_input(x, weight.in_features, bias, weight.out_features)
    if x.dtype != weight.dtype:
        raise TypeError(f"x is {x.dtype} but the weight was prepared for {weight.dtype} activations")
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    lead = x.shape[:-1]
    x2d = x.reshape(-1, weight.in_features).contiguous()
    y = _w4a16_module(weight.backend).w4a16_linear(x2d, weight.tensors, bias)
    return y.reshape(*lead, weight.out_features)


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


def w4a8_linear(x: torch.Tensor, weight: QuantizedWeight, bias: Optional[torch.Tensor] = None,
                clip_ratio: float = 1.0, backend: Optional[str] = None) -> torch.Tensor:
    """W4A8: per-token int8 activations times symmetric int4 weights, int32 accumulation, fp epilogue."""
    _reference_only("w4a8_linear", x.device, backend)
    if weight.bits != 4:
        raise ValueError(f"w4a8_linear needs 4-bit weights, got {weight.bits}-bit")
    return reference.quantized_activation_linear(x, weight, 8, bias, clip_ratio)


# (weight bits, activation bits) -> op: the integer-activation modes quantkern supports.
ACTIVATION_MODES = {(8, 8): w8a8_linear, (4, 4): w4a4_linear, (4, 8): w4a8_linear}


def quantized_activation_linear(x: torch.Tensor, weight: QuantizedWeight, act_bits: int,
                                bias: Optional[torch.Tensor] = None, clip_ratio: float = 1.0,
                                backend: Optional[str] = None) -> torch.Tensor:
    """W8A8, W4A4 or W4A8 by ``(weight.bits, act_bits)``; see ``reference.quantized_activation_linear``."""
    if not isinstance(weight, QuantizedWeight):
        raise TypeError(f"weight must be a QuantizedWeight, got {type(weight).__name__}")
    op = ACTIVATION_MODES.get((weight.bits, act_bits))
    if op is None:
        raise ValueError(f"supported activation modes are W8A8, W4A4 and W4A8; got W{weight.bits}A{act_bits}")
    return op(x, weight, bias, clip_ratio, backend)


def hadamard(x: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
    """Orthonormal Hadamard transform along the last dim (``x @ H.T / sqrt(n)``), a true Hadamard
    matrix for 2^k and 12/20/28/36/40 x 2^k."""
    _reference_only("hadamard", x.device, backend)
    return reference.hadamard(x)


def quantize_kv(x: torch.Tensor, bits: int, backend: Optional[str] = None):
    """Asymmetric per (token, head) KV quantization over head_dim; see ``reference.quantize_kv``."""
    _reference_only("quantize_kv", x.device, backend)
    return reference.quantize_kv(x, bits)
