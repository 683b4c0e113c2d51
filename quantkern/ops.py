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
from .backends import MissingKernelError, requested_backend, select  # noqa: F401  (MissingKernelError is public here)
from .format import QuantizedWeight, check_bits

__all__ = [
    "MissingKernelError",
    "PreparedWeight",
    "prepare_weight_only",
    "prepare_int_weight",
    "quantize_per_token",
    "weight_only_linear",
    "w8a8_linear",
    "w4a4_linear",
    "w4a8_linear",
    "quantized_activation_linear",
    "hadamard",
    "hadamard_quantize",
    "block_rotate",
    "block_rotate_quantize",
    "quantize_kv",
    "permute_columns",
]


def _cuda_op(name: str):
    return getattr(torch.ops.quantkern, name)


def _triton_op(name: str):
    from .triton_kernels import KERNELS

    return KERNELS[name]


def _activation_rows(op: str, x: torch.Tensor, bits: int, clip_ratio: float):
    """Checks shared by the activation quantizers (``op`` names the one called); returns x as contiguous
    rows [M, K], the leading shape, and the checked clip ratio."""
    reference._check_float("x", x)
    check_bits(bits)
    clip_ratio = reference._check_clip_ratio(clip_ratio)
    features = reference.check_features(op, x)
    if bits == 4 and features % 2:
        raise ValueError(f"int4 activations need an even number of features, got {features}")
    return x.reshape(-1, features).contiguous(), x.shape[:-1], clip_ratio


def quantize_per_token(x: torch.Tensor, bits: int = 8, clip_ratio: float = 1.0, backend: Optional[str] = None,
                       packed: bool = True):
    """Symmetric per-token quantization of ``x`` [..., K] (fp16/bf16/fp32) to int8 or packed int4.

    Returns ``(q, scales)``: q int8 [..., K] (bits=8) or uint8 [..., K/2] (bits=4, signed nibbles,
    element 2j in the low nibble); scales fp32 [...]. Non-contiguous inputs are copied first.
    ``packed=False`` with bits=4: the same int4 codes as int8 [..., K], one per byte (how the sm_90
    integer GEMMs take W4A4 activations past a few tokens: Hopper's tensor cores have no int4 mode;
    ``layout_int.activations_packed`` says which a prepared weight takes).
    """
    rows, lead, clip_ratio = _activation_rows("quantize_per_token", x, bits, clip_ratio)
    chosen = select("quantize_per_token", x.device, backend)
    if chosen == "cuda":
        q, scales = _cuda_op("quantize_per_token")(rows, bits, clip_ratio, packed)
    else:
        quantize = _triton_op("quantize_per_token") if chosen == "triton" else reference.quantize_per_token
        q, scales = quantize(rows, bits, clip_ratio)
        if bits == 4 and not packed:
            q = reference.unpack_int4_signed(q)
    return q.reshape(*lead, q.shape[-1]), scales.reshape(lead)


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


def _check_weight(weight) -> None:
    if not isinstance(weight, (QuantizedWeight, PreparedWeight)):
        raise TypeError(f"weight must be a QuantizedWeight or PreparedWeight, got {type(weight).__name__}")


def _check_same_device(x: torch.Tensor, weight: PreparedWeight) -> None:
    # (Else a torch error from deep inside the matmul, or, for a Triton kernel, a launch on the wrong device.)
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device} but the weight on {weight.device}: move one of them")


def _w4a16_module(backend: str):
    if backend == "cuda":
        from . import layout_cuda as module
    else:
        from .triton_kernels import w4a16 as module
    return module


def weight_only_unsupported_reason(bits: int, group_size: int, in_features: int, out_features: int,
                                   backend: str) -> Optional[str]:
    """Why ``backend``'s W4A16 kernel cannot serve this layer (None if it can); quantizers ask first."""
    from .backends import check_backend_name

    if check_backend_name(backend, allow_auto=False) == "reference":
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
    # x first: a bare QuantizedWeight is prepared for x's dtype, and prepare_weight_only's error would then
    # speak of its dtype argument, not of x.
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"weight_only_linear: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in reference.FLOAT_DTYPES:
        raise TypeError(f"weight_only_linear: x must be float16 or bfloat16 (or float32 on the reference backend), "
                        f"got {x.dtype}")
    if isinstance(weight, QuantizedWeight):
        weight = prepare_weight_only(weight, x.dtype, backend)
    elif not isinstance(weight, PreparedWeight):
        raise TypeError(f"weight must be a QuantizedWeight or PreparedWeight, got {type(weight).__name__}")
    elif backend is not None and backend != weight.backend:
        raise ValueError(f"weight was prepared for the {weight.backend} backend, not {backend!r}")
    if "act_bits" in weight.tensors:  # prepare_int_weight's: its layer quantizes the activations too
        raise ValueError(f"weight was prepared for {weight.tensors['act_bits']}-bit activations (prepare_int_weight): "
                         "run it with quantized_activation_linear, or prepare it with prepare_weight_only")
    _check_same_device(x, weight)
    if weight.backend == "reference":
        return reference.weight_only_linear(x, weight.source, bias)
    reference._check_linear_input(x, weight.in_features, bias, weight.out_features)
    if x.dtype != weight.dtype:
        raise TypeError(f"x is {x.dtype} but the weight was prepared for {weight.dtype} activations")
    if bias is not None:  # (the kernels read it as a contiguous [N] vector)
        bias = bias.to(x.dtype).contiguous()
    lead = x.shape[:-1]
    x2d = x.reshape(-1, weight.in_features).contiguous()
    y = _w4a16_module(weight.backend).w4a16_linear(x2d, weight.tensors, bias)
    return y.reshape(*lead, weight.out_features)


# (weight bits, activation bits) -> public op name of the integer-activation modes.
_INT_OPS = {(8, 8): "w8a8_linear", (4, 4): "w4a4_linear", (4, 8): "w4a8_linear"}


def _int_gemm_fn(backend: str):
    if backend == "cuda":
        from .layout_int import int_gemm_cuda as fn
    else:
        from .triton_kernels.int_gemm import int_gemm as fn
    return fn


def prepare_int_weight(weight: QuantizedWeight, act_bits: int, dtype: torch.dtype = torch.float16,
                       backend: Optional[str] = None) -> PreparedWeight:
    """Repack a symmetric ``weight`` once for the W8A8 / W4A4 / W4A8 kernel that will run it on its device
    (``quantkern.layout_int``); ``dtype`` is the activation (and output) dtype it will serve."""
    if not isinstance(weight, QuantizedWeight):
        raise TypeError(f"weight must be a QuantizedWeight, got {type(weight).__name__}")
    op = _INT_OPS.get((weight.bits, act_bits))
    if op is None:
        raise ValueError(f"supported activation modes are W8A8, W4A4 and W4A8; got W{weight.bits}A{act_bits}")
    chosen = select(op, weight.device, backend)
    meta = dict(device=weight.device, dtype=dtype, bits=weight.bits, group_size=weight.group_size,
                in_features=weight.in_features, out_features=weight.out_features)
    if chosen == "reference":
        return PreparedWeight("reference", source=weight, tensors={"act_bits": act_bits}, **meta)
    from .layout_int import prepare_int_weight as _prepare, unsupported_reason

    reason = unsupported_reason(weight.in_features, weight.out_features, weight.group_size, weight.bits, act_bits)
    if reason:
        raise MissingKernelError(f"{op} ({weight.in_features} -> {weight.out_features}): {reason}")
    return PreparedWeight(chosen, tensors=_prepare(weight, act_bits, chosen), source=None, **meta)


def _int_linear(x: torch.Tensor, weight: Union[QuantizedWeight, PreparedWeight], act_bits: int,
                bias: Optional[torch.Tensor], clip_ratio: float, backend: Optional[str],
                input_rotation: Optional[str] = None) -> torch.Tensor:
    """Per-token activation quantization (``quantize_per_token``; with ``input_rotation="hadamard"`` the
    fused ``hadamard_quantize``) + the integer GEMM with its epilogue."""
    if input_rotation not in (None, "hadamard"):
        raise ValueError(f"input_rotation must be None or 'hadamard', got {input_rotation!r}")
    if isinstance(weight, QuantizedWeight):
        weight = prepare_int_weight(weight, act_bits, x.dtype if isinstance(x, torch.Tensor) else torch.float16,
                                    backend)
    elif not isinstance(weight, PreparedWeight):
        raise TypeError(f"weight must be a QuantizedWeight or PreparedWeight, got {type(weight).__name__}")
    elif backend is not None and backend != weight.backend:
        raise ValueError(f"weight was prepared for the {weight.backend} backend, not {backend!r}")
    elif weight.tensors.get("act_bits") != act_bits:
        raise ValueError(f"weight was prepared for {weight.tensors.get('act_bits')}-bit activations, not {act_bits}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    _check_same_device(x, weight)
    if weight.backend == "reference":
        if input_rotation == "hadamard":
            reference._check_float("x", x)
            x = reference.hadamard(x)  # rounded to x's dtype, as the kernels' fused op sees it
        return reference.quantized_activation_linear(x, weight.source, act_bits, bias, clip_ratio)
    reference._check_linear_input(x, weight.in_features, bias, weight.out_features)
    clip_ratio = reference._check_clip_ratio(clip_ratio)
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"the {weight.backend} integer GEMMs take float16 or bfloat16 activations, not {x.dtype}")
    lead = x.shape[:-1]
    x2d = x.reshape(-1, weight.in_features).contiguous()
    # The activation quantizer: the CUDA kernel where built, else Triton (never the reference on a GPU).
    quantizer_backend = None if weight.backend == "cuda" else weight.backend
    from .layout_int import activations_packed

    packed = activations_packed(weight.tensors, x2d.shape[0])
    if input_rotation == "hadamard":
        # One pass over the activations: rotation, per-token scale and codes in one kernel.
        q, sx = hadamard_quantize(x2d, act_bits, clip_ratio, backend=quantizer_backend, packed=packed)
    else:
        q, sx = quantize_per_token(x2d, act_bits, clip_ratio, backend=quantizer_backend, packed=packed)
    if bias is not None:
        bias = bias.float().contiguous()
    y = _int_gemm_fn(weight.backend)(q, sx, weight.tensors, bias, x.dtype)
    return y.reshape(*lead, weight.out_features)


def w8a8_linear(x: torch.Tensor, weight: Union[QuantizedWeight, PreparedWeight], bias: Optional[torch.Tensor] = None,
                clip_ratio: float = 1.0, backend: Optional[str] = None) -> torch.Tensor:
    """W8A8: per-token int8 activations times symmetric int8 weights, int32 accumulation, fp epilogue.

    Pass a ``PreparedWeight`` (``prepare_int_weight``; ``QuantLinear`` keeps one): a bare
    ``QuantizedWeight`` is repacked on every call."""
    _check_weight(weight)
    if weight.bits != 8:
        raise ValueError(f"w8a8_linear needs 8-bit weights, got {weight.bits}-bit")
    return _int_linear(x, weight, 8, bias, clip_ratio, backend)


def w4a4_linear(x: torch.Tensor, weight: Union[QuantizedWeight, PreparedWeight], bias: Optional[torch.Tensor] = None,
                clip_ratio: float = 1.0, backend: Optional[str] = None) -> torch.Tensor:
    """W4A4: per-token int4 activations times symmetric int4 weights, int32 accumulation, fp epilogue."""
    _check_weight(weight)
    if weight.bits != 4:
        raise ValueError(f"w4a4_linear needs 4-bit weights, got {weight.bits}-bit")
    return _int_linear(x, weight, 4, bias, clip_ratio, backend)


def w4a8_linear(x: torch.Tensor, weight: Union[QuantizedWeight, PreparedWeight], bias: Optional[torch.Tensor] = None,
                clip_ratio: float = 1.0, backend: Optional[str] = None) -> torch.Tensor:
    """W4A8: per-token int8 activations times symmetric int4 weights, int32 accumulation, fp epilogue."""
    _check_weight(weight)
    if weight.bits != 4:
        raise ValueError(f"w4a8_linear needs 4-bit weights, got {weight.bits}-bit")
    return _int_linear(x, weight, 8, bias, clip_ratio, backend)


# (weight bits, activation bits) -> op: the integer-activation modes quantkern supports.
ACTIVATION_MODES = {(8, 8): w8a8_linear, (4, 4): w4a4_linear, (4, 8): w4a8_linear}


def quantized_activation_linear(x: torch.Tensor, weight: Union[QuantizedWeight, PreparedWeight], act_bits: int,
                                bias: Optional[torch.Tensor] = None, clip_ratio: float = 1.0,
                                backend: Optional[str] = None, input_rotation: Optional[str] = None) -> torch.Tensor:
    """W8A8, W4A4 or W4A8 by ``(weight.bits, act_bits)``; see ``reference.quantized_activation_linear``.

    ``input_rotation="hadamard"``: the layer's input is rotated first (``hadamard(x)``, rounded to x's dtype),
    which on a GPU runs fused with the activation quantization (``hadamard_quantize``)."""
    _check_weight(weight)
    if (weight.bits, act_bits) not in ACTIVATION_MODES:
        raise ValueError(f"supported activation modes are W8A8, W4A4 and W4A8; got W{weight.bits}A{act_bits}")
    return _int_linear(x, weight, act_bits, bias, clip_ratio, backend, input_rotation)


def _check_hadamard_order(op: str, features: int) -> None:
    """The same error on every backend for a row length with no Hadamard matrix (the Triton hadamard_quantize
    failed with "cannot unpack non-iterable NoneType object")."""
    from .rotation import _SUPPORTED_FORMS, is_hadamard_size

    if not is_hadamard_size(features):
        raise ValueError(f"{op}: no Hadamard matrix of order {features} (x's last dimension); supported: "
                         f"{_SUPPORTED_FORMS}. Pass block_size= for the transform of each block of that many "
                         f"entries (rotation.largest_hadamard_block)")


def hadamard(x: torch.Tensor, backend: Optional[str] = None, block_size: Optional[int] = None) -> torch.Tensor:
    """Orthonormal Hadamard transform along the last dim (``x @ H.T / sqrt(n)``), a true Hadamard
    matrix for 2^k and 12/20/28/36/40 x 2^k (``reference.hadamard``); returned in x's dtype.

    ``block_size``: the same transform on each consecutive block of that many entries instead
    (``rotation.block_hadamard_transform``; the CUDA kernel takes powers of two >= 8).
    GPU kernels: csrc/hadamard.cu (one pass, fp32 accumulation), else triton_kernels/hadamard.py.
    """
    from .rotation import _check_input, block_hadamard_transform, check_block_size

    _check_input(x, "hadamard")
    if block_size is not None:
        block_size = check_block_size(block_size, x.shape[-1])
    else:
        _check_hadamard_order("hadamard", x.shape[-1])
    chosen = select("hadamard", x.device, backend)
    if chosen == "reference":
        return block_hadamard_transform(x, block_size) if block_size else reference.hadamard(x)
    op = _cuda_op("hadamard") if chosen == "cuda" else _triton_op("hadamard")
    return op(x.contiguous(), int(block_size or 0))


def hadamard_quantize(x: torch.Tensor, bits: int = 4, clip_ratio: float = 1.0, backend: Optional[str] = None,
                      block_size: Optional[int] = None, packed: bool = True):
    """Fused online rotation + per-token quantization: ``quantize_per_token(hadamard(x), bits, clip_ratio)``.

    The reference (and the fp32 CUDA kernel) round the rotated activations to x's dtype before quantizing,
    as the two calls ``hadamard`` then ``quantize_per_token`` do, so the fused op is a drop-in for that pair:
    one pass over memory on the GPU. ``QuantLinear(input_rotation="hadamard")`` with quantized activations
    runs it (``quantized_activation_linear(..., input_rotation="hadamard")``).
    Returns ``(q, scales)`` in quantize_per_token's layout (int8 [..., K] or uint8 [..., K/2]; fp32 [...]);
    ``packed=False`` with bits=4: the int4 codes one per byte, int8 [..., K] (the sm_90 W4A4 GEMMs' input past a
    few tokens).
    CUDA: fp16/bf16 rows of 1024, 2048, 4096, 8192, 16384 and 14336 entries run on tensor cores
    (csrc/hadamard_mma.cu, sm_80+), which round intermediate sums to x's dtype: a code can differ from the
    two-call path's where the rotated value lies within a few units in the last place of x's dtype of a
    rounding boundary (by 1 for int4; by a few for int8 codes of bf16 rows). Elsewhere the fp32-butterfly
    kernel is bit-exact with the two-call reference for n = 2^k, and for m * 2^k agrees to fp32 rounding
    (a code can differ by 1 at a rounding boundary).
    """
    rows, lead, clip_ratio = _activation_rows("hadamard_quantize", x, bits, clip_ratio)
    if block_size is not None:
        from .rotation import check_block_size

        block_size = check_block_size(block_size, rows.shape[-1])
    else:
        _check_hadamard_order("hadamard_quantize", rows.shape[-1])
    chosen = select("hadamard_quantize", x.device, backend)
    if chosen == "reference":
        from .rotation import block_hadamard_transform

        rotated = block_hadamard_transform(rows, block_size) if block_size else reference.hadamard(rows)
        q, scales = reference.quantize_per_token(rotated, bits, clip_ratio)
    elif chosen == "cuda" and not block_size and _fused_rotation_is_slower(rows.shape[-1]):
        q, scales = _cuda_op("quantize_per_token")(_cuda_op("hadamard")(rows, 0), bits, clip_ratio, packed)
    elif chosen == "cuda":
        q, scales = _cuda_op("hadamard_quantize")(rows, bits, clip_ratio, int(block_size or 0), packed)
    else:
        q, scales = _triton_op("hadamard_quantize")(rows, bits, clip_ratio, int(block_size or 0))
    if bits == 4 and not packed and chosen != "cuda":
        q = reference.unpack_int4_signed(q)
    return q.reshape(*lead, q.shape[-1]), scales.reshape(lead)


def _fused_rotation_is_slower(features: int) -> bool:
    """Short rows with a non-power-of-two Hadamard order (m * 2^k, 2^k <= 32: 576 = 36 x 16, 896 = 28 x 32)
    leave the fused CUDA kernel's final round with fewer than 32 busy threads per row; there the two CUDA
    kernels in a row are faster (H100, 576 x 2048 rows: 19.5 us against 32.4 us fused) and give the same
    result as the reference composition."""
    from .rotation import hadamard_factorization

    factors = hadamard_factorization(features)
    return factors is not None and factors[0] > 1 and factors[1] <= 5


def block_rotate(x: torch.Tensor, rotation: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
    """Dense rotation of each block of b consecutive entries of x's last dim by ``rotation`` ([b, b], shared
    by the blocks, or [K / b, b, b], one per block: e.g. PCA rotations of head_dim blocks); see
    ``reference.block_rotate``. GPU kernel: triton_kernels/block_rotation.py."""
    reference.check_block_rotation(x, rotation)
    chosen = select("block_rotate", x.device, backend)
    if chosen == "reference":
        return reference.block_rotate(x, rotation)
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    return _triton_op("block_rotate")(rows, rotation.float().contiguous()).reshape(x.shape)


# The widest rows for which the automatic choice takes csrc/block_rotation.cu. On the H100 (docs/PERF.md, sessions 36
# and 37, both kernels in one run) it was faster than the Triton kernel at 576, 4096 and 8192 at 1-8,192 rows, and
# since session 37's clusters of 16 at decode also at 14336 at 1-2,048 rows (1 and 16 rows: 8.8 / 8.7 against 11.9 /
# 9.9 us; 8,192 rows in session 36: 421.1 against 497.9). Wider rows were not timed.
CUDA_BLOCK_ROTATION_AUTO_MAX_K = 14336


def block_rotate_quantize(x: torch.Tensor, rotation: torch.Tensor, bits: int = 4, clip_ratio: float = 1.0,
                          backend: Optional[str] = None):
    """Fused dense per-block rotation + per-token quantization:
    ``quantize_per_token(block_rotate(x, rotation), bits, clip_ratio)``, the rotated values rounded to x's
    dtype before quantizing (as the two calls do). Returns ``(q, scales)`` in quantize_per_token's layout.
    GPU kernels: csrc/block_rotation.cu (one pass over memory) for fp16/bf16 rows with one [b, b] rotation for
    every block, b = 64 or 128, where a tile of 4 rows fits the GPU's shared memory (``_C.block_rotation_fits``:
    rows of up to about 28,000 entries on an H100, 12,000 on an RTX 4090); otherwise
    triton_kernels/block_rotation.py (two launches), also when the automatic choice is the cuda backend. The
    automatic choice takes the CUDA kernel for rows of at most ``CUDA_BLOCK_ROTATION_AUTO_MAX_K`` entries only.
    Asking for ``backend="cuda"`` where its kernel does not apply raises ``MissingKernelError``."""
    op = "block_rotate_quantize"
    rows, lead, clip_ratio = _activation_rows(op, x, bits, clip_ratio)
    reference.check_block_rotation(x, rotation, op)
    chosen = select(op, x.device, backend)
    rotation32 = rotation.float().contiguous()
    if chosen == "cuda":
        fits = _cuda_block_rotation_fits(rows, rotation32)
        if requested_backend(backend) == "cuda":
            if not fits:
                raise MissingKernelError(
                    f"{op}: the CUDA kernel takes fp16/bf16 rows and one [b, b] rotation with b = 64 or 128 that "
                    f"fits the GPU's shared memory; got {rows.dtype} rows of {rows.shape[-1]} and a rotation of "
                    f"shape {tuple(rotation.shape)}: use backend='triton'")
        elif not fits or rows.shape[-1] > CUDA_BLOCK_ROTATION_AUTO_MAX_K:
            chosen = select(op, x.device, "triton")
    if chosen == "reference":
        q, scales = reference.quantize_per_token(reference.block_rotate(rows, rotation), bits, clip_ratio)
    elif chosen == "cuda":
        q, scales = _cuda_op(op)(rows, rotation32, bits, clip_ratio)
    else:
        q, scales = _triton_op(op)(rows, rotation32, bits, clip_ratio)
    return q.reshape(*lead, q.shape[-1]), scales.reshape(lead)


def _cuda_block_rotation_fits(rows: torch.Tensor, rotation: torch.Tensor) -> bool:
    """Whether csrc/block_rotation.cu takes these rows and this fp32 rotation."""
    return (rows.dtype in (torch.float16, torch.bfloat16) and rotation.dim() == 2
            and _block_rotation_fits_device(rows.shape[-1], rotation.shape[-1], rows.device.index))


@torch.compiler.assume_constant_result  # a pybind11 call: torch.compile takes its answer as a constant
def _block_rotation_fits_device(features: int, block: int, device_index: int) -> bool:
    from . import _C

    return bool(_C.block_rotation_fits(features, block, device_index))


def quantize_kv(x: torch.Tensor, bits: int, backend: Optional[str] = None):
    """Asymmetric per (token, head) KV quantization over head_dim; see ``reference.quantize_kv``.

    Returns ``(codes, scale, offset)``: codes uint8 [..., D] (8 bits) or [..., D/2] (4 bits, element
    2j in the low nibble), scale and offset [...] in x's dtype. GPU kernel: triton_kernels/kv_quant.py.
    """
    reference._check_kv_input(x, bits)
    chosen = select("quantize_kv", x.device, backend)
    if chosen == "reference":
        return reference.quantize_kv(x, bits)
    if chosen != "triton":  # (no CUDA kernel: select never picks one, and a GPU never falls back to the reference)
        raise MissingKernelError(f"quantize_kv: no {chosen} kernel")
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    codes, scale, offset = _triton_op("quantize_kv")(rows, bits)
    lead = x.shape[:-1]
    return codes.reshape(*lead, codes.shape[-1]), scale.reshape(lead), offset.reshape(lead)


def permute_columns(x: torch.Tensor, permutation: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
    """``x[..., permutation]`` (``x.index_select(-1, permutation)``): the input gather of act-order layers
    (``QuantLinear.input_permutation``), in x's dtype.

    ``permutation``: int64 [K] on x's device, a permutation of 0..K-1. Its values are not checked here (that would
    cost a device sync per call): layers check theirs where they are built or loaded (``nn.check_permutation``),
    and the CUDA kernel stops with a device error on an entry outside [0, K).
    GPU kernels: csrc/permute.cu (up to 16 rows a column per thread, after which a few-token W4A16 GEMM starts
    early under CUDA graphs: programmatic dependent launch; from 17 rows the rows staged in shared memory; rows
    over 96 KiB go to torch's index_select); else triton_kernels/permute.py.
    """
    reference.check_permute_columns_input(x, permutation)
    chosen = select("permute_columns", x.device, backend)
    if chosen == "reference":
        return reference.permute_columns(x, permutation)
    op = _cuda_op("permute_columns") if chosen == "cuda" else _triton_op("permute_columns")
    features = x.shape[-1]
    return op(x.reshape(-1, features).contiguous(), permutation.contiguous()).reshape(x.shape)
