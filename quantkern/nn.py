"""``QuantLinear`` and model surgery: the one place where quantizers' output meets the kernels.

A ``QuantLinear`` holds a weight in the canonical packed format (``quantkern.format``) as buffers
named like the checkpoint's tensors (``qweight``, ``scales``, ``zeros``, ``bias``), so its
``state_dict`` is the checkpoint. ``forward`` calls ``quantkern.ops``: on CPU tensors the reference
path, on CUDA tensors a fast kernel or ``MissingKernelError`` (never a silent fp16 fallback).
"""

from __future__ import annotations

import warnings
from typing import Iterable, NamedTuple, Optional

import torch
from torch import nn

from . import ops, reference
from .format import GROUP_SIZE_TYPE, QuantizedWeight, as_int, canonical_group_size, check_bits, group_length
from .models import SEQUENTIAL_GROUPS
from .rotation import is_hadamard_size

AUTO_GROUP_SIZES = (128, 64, 32)
INPUT_ROTATIONS = ("hadamard",)  # online rotations of a layer's input (None: no rotation)


def check_layer_options(in_features: int, out_features: int, bits: int, symmetric: bool, act_bits: Optional[int],
                        act_clip_ratio: float, input_rotation: Optional[str]) -> float:
    """Raise a clear error for an unsupported combination; returns the clip ratio as a float."""
    if in_features < 1 or out_features < 1:
        raise ValueError(f"a quantized layer needs in_features and out_features >= 1, got {in_features} -> "
                         f"{out_features}")
    check_bits(bits)
    if bits == 4 and in_features % 2:
        raise ValueError(f"4-bit weights are packed two per byte: in_features must be even, got {in_features}")
    if act_bits is not None:
        check_bits(act_bits)
        if (bits, act_bits) not in ops.ACTIVATION_MODES:
            raise ValueError(f"supported activation modes are W4A4, W8A8, W4A8 and weight-only; got W{bits}A{act_bits}")
        if not symmetric:
            raise ValueError("W4A4, W8A8 and W4A8 need symmetric weights")
    act_clip_ratio = reference._check_clip_ratio(act_clip_ratio)
    if act_bits is None and act_clip_ratio != 1.0:
        raise ValueError(f"act_clip_ratio={act_clip_ratio} needs quantized activations (act_bits 4 or 8)")
    if input_rotation not in (None,) + INPUT_ROTATIONS:
        raise ValueError(f"input_rotation must be None or one of {INPUT_ROTATIONS}, got {input_rotation!r}")
    if input_rotation == "hadamard" and not is_hadamard_size(in_features):
        raise ValueError(f"input_rotation='hadamard' needs a Hadamard matrix of order in_features={in_features}; "
                         f"supported orders are 2^k and 12/20/28/36/40 x 2^k")
    return act_clip_ratio


def check_group_size(group_size) -> int:
    """``group_size`` as an int (None and 0 mean per-channel, -1), else a TypeError (``format.as_int``)."""
    return canonical_group_size(None if group_size is None else as_int("group_size", group_size, GROUP_SIZE_TYPE))


def check_permutation(permutation: torch.Tensor, length: int, name: str) -> None:
    """ValueError unless ``permutation`` is an int64 permutation of ``0 .. length - 1``."""
    if permutation.dtype != torch.int64 or tuple(permutation.shape) != (length,):
        raise ValueError(f"{name} must be int64 of shape ({length},), got {permutation.dtype} "
                         f"{tuple(permutation.shape)}")
    if not torch.equal(permutation.sort().values.cpu(), torch.arange(length)):
        raise ValueError(f"{name} is not a permutation of 0..{length - 1}")


def prepare_for_kernel(weight: QuantizedWeight, act_bits: Optional[int], dtype: torch.dtype,
                       backend: Optional[str]):
    """``weight`` in the layout of the kernel that runs it on its device (an ``ops.PreparedWeight``)."""
    if act_bits is None:
        return ops.prepare_weight_only(weight, dtype, backend)
    return ops.prepare_int_weight(weight, act_bits, dtype, backend)  # W8A8 / W4A4 / W4A8 (layout_int)


def is_stale(prepared, dtype: torch.dtype, device: torch.device, backend: Optional[str]) -> bool:
    """Whether ``prepared`` cannot serve activations of ``dtype`` on ``device`` (``cuda`` meaning the current
    one) with ``backend`` (None: any): none yet, or made for another dtype, device or backend."""
    return (prepared is None or prepared.dtype != dtype or prepared.device.type != device.type
            or device.index not in (None, prepared.device.index) or prepared.backend != (backend or prepared.backend))


class QuantLinear(nn.Module):
    """A Linear layer with quantized weights: W4A16/W8A16 (``act_bits=None``), W8A8, W4A4 or W4A8.

    ``act_clip_ratio`` scales each token's absmax before activation quantization (QuaRot: 0.9).
    ``input_rotation="hadamard"`` applies the orthonormal Hadamard transform ``H`` to the input's last
    dim online, before any activation quantization; the stored weight is then ``W @ H.T`` (so that
    ``(W H^T)(H x) = W x``), which ``from_linear(..., rotate=True)`` produces.
    ``input_permutation=True`` adds a buffer ``input_permutation`` (int64 [in_features], a permutation): the layer
    computes ``W' x[..., input_permutation]``, its stored weight ``W'`` being the original's columns in that order.
    Imported GPTQ act-order weights need it (``quantkern.convert``): their groups are contiguous only in that order.
    """

    def __init__(self, in_features: int, out_features: int, bits: int = 4, group_size: int = 128,
                 symmetric: bool = True, act_bits: Optional[int] = None, bias: bool = False,
                 scale_dtype: torch.dtype = torch.float16, device=None, act_clip_ratio: float = 1.0,
                 input_rotation: Optional[str] = None, input_permutation: bool = False):
        super().__init__()
        act_clip_ratio = check_layer_options(in_features, out_features, bits, symmetric, act_bits, act_clip_ratio,
                                             input_rotation)
        if input_permutation and input_rotation is not None:
            raise ValueError("a layer either permutes or rotates its input, not both")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.act_bits = bits, act_bits
        self.act_clip_ratio, self.input_rotation = act_clip_ratio, input_rotation
        self.group_size = check_group_size(group_size)
        groups = in_features // group_length(self.group_size, in_features)
        packed = in_features // 2 if bits == 4 else in_features
        self.register_buffer("qweight", torch.zeros(out_features, packed, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=scale_dtype, device=device))
        self.register_buffer("zeros", None if symmetric else
                             torch.zeros(out_features, groups, dtype=torch.uint8, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=scale_dtype, device=device) if bias else None)
        self.register_buffer("input_permutation",
                             torch.arange(in_features, device=device) if input_permutation else None)
        self.backend: Optional[str] = None  # None: automatic choice (see quantkern.backends)
        self._prepared = None  # ops.PreparedWeight: the weight in its kernel's layout, made once
        self._kernel_bias = None  # the bias in the prepared weight's device and dtype (stored bias: its own dtype)
        self._fusion = None  # (ProjectionFusion, index of this layer in it) once fuse_projections ran

    def prepare(self, dtype: Optional[torch.dtype] = None, backend: Optional[str] = None, device=None):
        """Repack the weight once into the layout of the kernel that will run it on ``device``
        (default: where the buffers are), for activations of ``dtype`` (default: the scales' dtype).
        Forward does this on first use; call it explicitly before torch.compile or CUDA-graph capture.

        Once a GPU kernel holds the weight in its own layout, the canonical buffers (what
        ``state_dict`` saves) are parked in host memory, so the device holds the weight once.
        A layer fused with its siblings (``fuse_projections``) prepares their stacked weight; a
        ``backend`` then applies to all of them, as they run in one kernel call."""
        if backend is not None:
            from .backends import check_backend_name

            backend = check_backend_name(backend)  # checked before it is kept: a bad name would stick
        if self._fusion is not None:
            self._fusion[0].prepare(dtype, backend, device)
            return self
        if backend is not None:
            self.backend = backend
        device = kernel_device(self) if device is None else device  # not the buffers': they may be parked
        self._prepared = prepare_for_kernel(self.weight.to(torch.device(device)), self.act_bits,
                                            dtype or self.scales.dtype, self.backend)
        # Cast once here, not in every call (a bf16-stored bias with fp16 activations; .to() is a no-op otherwise).
        self._kernel_bias = None if self.bias is None else self.bias.to(self._prepared.device, self._prepared.dtype)
        self._park_canonical_buffers(self._prepared)
        return self

    def _park_canonical_buffers(self, prepared) -> None:
        if prepared.backend != "reference":
            for name in ("qweight", "scales", "zeros"):
                buffer = getattr(self, name)
                if buffer is not None and buffer.device.type != "cpu":
                    setattr(self, name, buffer.cpu())

    def _prepared_for(self, x: torch.Tensor):
        if is_stale(self._prepared, x.dtype, x.device, self.backend):
            self.prepare(x.dtype, device=x.device)
        return self._prepared

    def _apply(self, fn, recurse=True):
        # .to()/.cuda() move the canonical buffers: the prepared copy is stale. .half()/.float()
        # change the compute dtype, not the stored format: the scales and the bias keep their dtype
        # (docs/FORMAT.md; prepare casts a copy of the bias for the kernel). Else .half() of bf16 storage
        # would round the bias, or make inf of one beyond fp16's range, and .float() would save an fp32 bias.
        # Kept by moving the original, not by casting back: fp16 -> bf16 -> fp16 loses 3 mantissa bits.
        self._forget_prepared()
        stored = {id(t) for t in (self.scales, self.bias) if t is not None}

        def apply_keeping_storage_dtype(t: torch.Tensor) -> torch.Tensor:
            moved = fn(t)
            return t.to(moved.device) if id(t) in stored and moved.dtype != t.dtype else moved

        return super()._apply(apply_keeping_storage_dtype, recurse)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):
        if not local_metadata.get("assign_to_params_buffers", False):
            # load_state_dict copies into the buffers, casting: bf16 scales beyond fp16's range became inf.
            for name in ("scales", "bias"):
                buffer, incoming = getattr(self, name), state_dict.get(prefix + name)
                if buffer is not None and isinstance(incoming, torch.Tensor) and incoming.dtype != buffer.dtype:
                    raise ValueError(f"{prefix + name} is {incoming.dtype} but the layer stores {buffer.dtype}: "
                                     f"build it with scale_dtype={incoming.dtype}, or load with assign=True")
        self._forget_prepared()
        result = super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)
        permutation = self.input_permutation
        if permutation is not None and not permutation.is_meta:
            check_permutation(permutation, self.in_features, f"{prefix}input_permutation")
        return result

    def _forget_prepared(self) -> None:
        self._prepared = self._kernel_bias = None
        if self._fusion is not None:
            self._fusion[0].forget_prepared()

    @property
    def weight(self) -> QuantizedWeight:
        return QuantizedWeight(self.qweight, self.scales, self.zeros, self.bits, self.group_size,
                               self.in_features, self.out_features)

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: Optional[torch.Tensor] = None,
                       act_bits: Optional[int] = None, act_clip_ratio: float = 1.0,
                       input_rotation: Optional[str] = None,
                       input_permutation: Optional[torch.Tensor] = None) -> "QuantLinear":
        """Wrap an already quantized weight. With ``input_rotation``, ``qw`` must already be the
        quantized ``W @ H.T`` (quantizers rotate before they quantize); with ``input_permutation``, the
        quantized columns of ``W`` in that order."""
        if input_permutation is not None:
            check_permutation(input_permutation, qw.in_features, "input_permutation")
        layer = cls(qw.in_features, qw.out_features, qw.bits, qw.group_size, qw.symmetric, act_bits,
                    bias is not None, qw.scales.dtype, device=qw.device, act_clip_ratio=act_clip_ratio,
                    input_rotation=input_rotation, input_permutation=input_permutation is not None)
        if input_permutation is not None:
            layer.input_permutation.copy_(input_permutation)
        layer.qweight.copy_(qw.qweight)
        layer.scales.copy_(qw.scales)
        if qw.zeros is not None:
            layer.zeros.copy_(qw.zeros)
        if bias is not None:
            stored = bias.detach().to(qw.scales.dtype).clone()
            if not torch.isfinite(stored).all() and torch.isfinite(bias).all():
                raise ValueError(f"the bias overflows {qw.scales.dtype}, the layer's storage dtype: quantize with "
                                 "scale_dtype=torch.bfloat16")
            layer.bias = stored
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 4, group_size: int = 128, symmetric: bool = True,
                    act_bits: Optional[int] = None, scale_dtype: Optional[torch.dtype] = None,
                    act_clip_ratio: float = 1.0, rotate: bool = False) -> "QuantLinear":
        """Round-to-nearest quantization of ``linear`` (quantizers pass their own tensors to ``from_quantized``).

        ``rotate=True``: quantize ``W @ H.T`` (H the orthonormal Hadamard matrix of order in_features,
        rotated in fp32) and rotate the input online (``input_rotation="hadamard"``), so the layer
        still computes ``W x``; the rotation spreads outlier channels before quantization."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected torch.nn.Linear, got {type(linear).__name__}")
        if linear.weight.is_meta:
            raise ValueError("the linear's weight is on the meta device: there are no values to quantize (load the "
                             "model's weights first, or build an empty QuantLinear to load a checkpoint into)")
        if scale_dtype is None:
            scale_dtype = torch.bfloat16 if linear.weight.dtype == torch.bfloat16 else torch.float16
        rotation = "hadamard" if rotate else None
        group_size = check_group_size(group_size)
        check_layer_options(linear.in_features, linear.out_features, bits, symmetric, act_bits, act_clip_ratio,
                            rotation)
        weight = linear.weight.detach()
        if rotate:  # rows of W @ H.T are H applied to the rows of W
            weight = reference.hadamard(weight.float())
        qw = reference.quantize_weight(weight, bits, group_size, symmetric, scale_dtype)
        return cls.from_quantized(qw, linear.bias, act_bits, act_clip_ratio, rotation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Checked before the weight is prepared for x's dtype: prepare's error would speak of its dtype argument.
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"QuantLinear: x must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in reference.FLOAT_DTYPES:
            raise TypeError(f"QuantLinear: x must be float16 or bfloat16 (or float32 on the CPU reference path), "
                            f"got {x.dtype}")
        if self._fusion is not None:
            fusion, index = self._fusion
            return fusion.output(x, index)
        prepared = self._prepared_for(x)
        return self._linear(x, prepared, self._kernel_bias)

    def _linear(self, x: torch.Tensor, prepared, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """This layer's computation on a prepared weight (its own, or its fusion's stacked one)."""
        if self.input_permutation is not None:  # (a fusion's members share it: _fusion_key)
            x = ops.permute_columns(x, self.input_permutation, backend=self.backend)
        if self.act_bits is None:
            if self.input_rotation == "hadamard":
                x = ops.hadamard(x, backend=self.backend)  # MissingKernelError on CUDA without a kernel
            return ops.weight_only_linear(x, prepared, bias)
        # The rotation runs fused with the activation quantization (ops.hadamard_quantize) where it can.
        return ops.quantized_activation_linear(x, prepared, self.act_bits, bias,
                                               self.act_clip_ratio, input_rotation=self.input_rotation)

    def extra_repr(self) -> str:
        group = "per-channel" if self.group_size == -1 else self.group_size
        mode = f"W{self.bits}A{self.act_bits or 16}"
        kind = "symmetric" if self.zeros is None else "asymmetric"
        acts = f", act_clip_ratio={self.act_clip_ratio:g}" if self.act_bits is not None else ""
        prepared = self._fusion[0].prepared if self._fusion else self._prepared
        backend = self.backend or "auto" + (f" ({prepared.backend} on {prepared.device})" if prepared else "")
        return (f"in_features={self.in_features}, out_features={self.out_features}, {mode}{acts}, "
                f"input_rotation={self.input_rotation}, "
                + ("input_permutation, " if self.input_permutation is not None else "")
                + f"group_size={group}, {kind}, bias={self.bias is not None}, "
                f"backend={backend}"
                + (f", fused: part {self._fusion[1] + 1} of {len(self._fusion[0].members)}" if self._fusion else ""))


def linear_layers(model: nn.Module, skip: Iterable[str] = ("lm_head",)) -> list:
    """``(name, module)`` of every ``nn.Linear`` in ``model`` whose name's last part is not in ``skip``
    (names; a single name may be given as a string)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    skip = {skip} if isinstance(skip, str) else set(skip)
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] not in skip]


def choose_group_size(layers: list, requested) -> int:
    """``requested`` if given; for "auto"/None the largest of 128, 64, 32 dividing every layer's in_features."""
    if isinstance(requested, str) and requested != "auto":
        if not requested.lstrip("-").isdigit():
            raise ValueError(f"group_size must be an int (32, 64, 128, or -1 for per-channel) or 'auto', "
                             f"got {requested!r}")
        requested = int(requested)  # as a command line gives it
    if requested not in (None, "auto"):
        return check_group_size(requested)
    for size in AUTO_GROUP_SIZES:
        if all(module.in_features % size == 0 for _, module in layers):
            return size
    return -1


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def cast_unquantized_parameters(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the floating-point parameters left unquantized (embeddings, norms, lm_head) to ``dtype``.

    Buffers are left alone: QuantLinear's already have their storage dtype, and others (rotary
    inverse frequencies) are not saved and must keep their precision."""
    for param in model.parameters():
        if param.is_floating_point():
            param.data = param.data.to(dtype)


def replace_linear(model: nn.Module, bits: int = 4, group_size=128, symmetric: bool = True,
                   act_bits: Optional[int] = None, skip: Iterable[str] = ("lm_head",),
                   scale_dtype: Optional[torch.dtype] = None, progress: bool = False,
                   kernel_shapes: str = "cuda") -> nn.Module:
    """Swap every ``nn.Linear`` of ``model`` (except names ending in ``skip``, by default lm_head,
    the seeds' ``headfp16``) for an RTN-quantized ``QuantLinear`` with ``scale_dtype`` scales (default:
    bf16 for bf16 layers, else fp16). Checks every layer first, so that a bad group size, or a W4A16
    shape the ``kernel_shapes`` backend's kernel cannot serve ("cuda"; "reference" checks nothing),
    fails now, before anything is replaced, rather than at inference; and builds every replacement
    before swapping any, so that any other error leaves the model as it was. Returns ``model``."""
    layers = linear_layers(model, skip)
    if not layers:
        raise ValueError("the model has no nn.Linear layers to quantize")
    group_size = choose_group_size(layers, group_size)
    for name, module in layers:
        try:
            group_length(group_size, module.in_features)
        except ValueError as error:
            raise ValueError(f"{name}: {error}") from None
        if act_bits is None:
            reason = ops.weight_only_unsupported_reason(bits, group_size, module.in_features,
                                                        module.out_features, kernel_shapes)
            if reason:
                raise ValueError(f"{name}: {reason} (pass kernel_shapes='reference' to quantize anyway)")
    iterator = layers
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(layers, desc=f"RTN W{bits} g{group_size}", unit="layer")
    replacements = [(name, QuantLinear.from_linear(module, bits, group_size, symmetric, act_bits, scale_dtype))
                    for name, module in iterator]
    for name, quantized in replacements:
        set_submodule(model, name, quantized)
    return model


# Sibling layers that read the same input (models.SEQUENTIAL_GROUPS): q/k/v_proj and gate/up_proj.
FUSABLE_ROLES = tuple(group for group in SEQUENTIAL_GROUPS if len(group) > 1)


def kernel_device(layer: QuantLinear) -> torch.device:
    """Where ``layer`` runs: its prepared weight's device once prepared (the canonical buffers may then be
    parked in host memory), else its buffers'."""
    if layer._fusion is not None:
        fusion = layer._fusion[0]
        return fusion.prepared.device if fusion.prepared is not None else fusion.device or layer.qweight.device
    return layer._prepared.device if layer._prepared is not None else layer.qweight.device


def _fusion_key(layer: QuantLinear) -> dict:
    """What siblings must share to run as one GEMM: the weight's format, the activation handling, the kernel."""
    return {"in_features": layer.in_features, "bits": layer.bits, "group_size": layer.group_size,
            "symmetric": layer.zeros is None, "act_bits": layer.act_bits, "act_clip_ratio": layer.act_clip_ratio,
            "input_rotation": layer.input_rotation, "scale_dtype": layer.scales.dtype, "backend": layer.backend,
            "device": kernel_device(layer),
            "input_permutation": None if layer.input_permutation is None else tuple(layer.input_permutation.tolist())}


def _version_counter(x: torch.Tensor) -> Optional[int]:
    """x's version counter, which moves when x is changed in place; None where none can be read (while Dynamo
    traces, and for inference tensors, made under torch.inference_mode): there the tensor's identity alone counts."""
    if torch.compiler.is_compiling() or x.is_inference():
        return None
    return x._version


class _GroupOutputs(NamedTuple):
    input: torch.Tensor
    version: Optional[int]
    outputs: tuple  # each member's output: views of one [..., sum of out_features] tensor
    unread: int  # bit i set: member i has not taken its output yet


class ProjectionFusion:
    """Sibling ``QuantLinear`` layers that read the same input (q/k/v_proj; gate/up_proj) run as one
    GEMM over their weights stacked along out_features: one kernel launch instead of three or two, and
    with quantized activations one activation quantization.

    Each member keeps its own canonical buffers, so ``state_dict`` and checkpoints do not change; the
    stacked weight exists only in the kernel's layout (``prepared``; on the reference backend that is a
    second copy of the weights: fusion is for the GPU kernels). The members' settings are taken as they are
    when fused (``fuse_projections`` checks they agree); change a member after ``unfuse_projections``.

    The model calls the members one after another with the same input tensor: the first call computes
    every member's output, the others take theirs (``_GroupOutputs``), and once each has, nothing is kept.
    Any other call computes anew: another input tensor, the same one changed in place since (its version
    counter moved: ``_version_counter``), or a member asking again, which starts a new pass. So outputs are
    always right; a model whose members read different inputs (cross-attention) gets a warning, as each of
    its calls runs the whole stacked GEMM: do not fuse such modules."""

    def __init__(self, members):
        self.members = list(members)
        self.prepared = None  # ops.PreparedWeight of the stacked weight
        self.bias = None  # the stacked bias (zeros for members without one), on the kernel's device
        self._pending: Optional[_GroupOutputs] = None  # replaced whole, never edited: read it once per call
        self._warned = False
        # Where the group runs until prepared (None: where the members' buffers are). Taken before attach()
        # drops the members' prepared weights: their buffers may be parked in host memory.
        self.device: Optional[torch.device] = kernel_device(self.members[0])

    def attach(self) -> "ProjectionFusion":
        for index, member in enumerate(self.members):
            member._fusion = (self, index)
            member._prepared = None  # the stacked copy replaces the members' own
        return self

    def forget_prepared(self) -> None:  # the members' buffers moved (.to()) or were reloaded
        self.prepared = self.device = None

    def __getstate__(self):  # deepcopy / pickle: pending outputs belong to a step in progress, not to the model
        return {**self.__dict__, "_pending": None}

    def stacked_weight(self, device) -> QuantizedWeight:
        weights = [member.weight.to(device) for member in self.members]
        first = weights[0]
        return QuantizedWeight(torch.cat([w.qweight for w in weights]), torch.cat([w.scales for w in weights]),
                               None if first.zeros is None else torch.cat([w.zeros for w in weights]),
                               first.bits, first.group_size, first.in_features,
                               sum(w.out_features for w in weights))

    def prepare(self, dtype: Optional[torch.dtype], backend: Optional[str], device) -> None:
        first = self.members[0]
        if backend is not None:
            for member in self.members:
                member.backend = backend
        device = torch.device(kernel_device(first) if device is None else device)
        dtype = dtype or first.scales.dtype
        if not is_stale(self.prepared, dtype, device, first.backend):
            return  # each member's prepare() lands here: the group's stacked weight is made once
        self.prepared = prepare_for_kernel(self.stacked_weight(device), first.act_bits, dtype, first.backend)
        biases = [member.bias for member in self.members]
        self.bias = None if all(b is None for b in biases) else torch.cat([
            torch.zeros(m.out_features, dtype=dtype, device=device) if b is None else b.to(device, dtype)
            for m, b in zip(self.members, biases)])
        for member in self.members:
            member._park_canonical_buffers(self.prepared)

    def output(self, x: torch.Tensor, index: int) -> torch.Tensor:
        version, bit = _version_counter(x), 1 << index
        pending = self._pending
        if pending is None or pending.input is not x or pending.version != version or not pending.unread & bit:
            # A member yet to read its output, called with another tensor: the members do not share their input.
            if pending is not None and pending.unread & bit and pending.input is not x and not self._warned:
                self._warned = True
                warnings.warn(f"fused projections of {len(self.members)} layers ({self.members[0].extra_repr()}) "
                              "were called with different inputs: each call runs the whole stacked GEMM; "
                              "fuse only layers that read one tensor (unfuse_projections undoes it)", stacklevel=3)
            first = self.members[0]
            if is_stale(self.prepared, x.dtype, x.device, first.backend):
                self.prepare(x.dtype, None, x.device)
            stacked = first._linear(x, self.prepared, self.bias)
            pending = _GroupOutputs(x, version, stacked.split([member.out_features for member in self.members], -1),
                                    (1 << len(self.members)) - 1)
        unread = pending.unread & ~bit
        self._pending = pending._replace(unread=unread) if unread else None
        return pending.outputs[index]


def _detach(layer: QuantLinear) -> None:
    """Make ``layer`` run alone again, prepared where its group ran (its own weight, from the canonical buffers)."""
    fusion = layer._fusion[0]
    layer._fusion = None
    layer._prepared = None
    if fusion.prepared is not None:
        layer.prepare(fusion.prepared.dtype, device=fusion.prepared.device)


def fuse_projections(model: nn.Module) -> dict:
    """Run each group of sibling ``QuantLinear`` layers that read the same input (``q_proj``/``k_proj``/
    ``v_proj`` of a self-attention module; ``gate_proj``/``up_proj`` of an MLP) as one GEMM
    (``ProjectionFusion``), for decoder-only models on the GPU kernels. An inference-time change: weights,
    ``state_dict`` and checkpoints stay per layer; ``unfuse_projections`` undoes it. Call it before
    torch.compile or CUDA-graph capture; each group's stacked weight is prepared where its layers ran, by
    ``prepare`` on any member or on first use. Calling it again keeps the groups already fused.

    Siblings fuse when they share the format, activation handling, backend and device (``_fusion_key``).
    Returns ``{"fused": [group names], "skipped": {group name: reason}}``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    fused, skipped = [], {}
    for parent_name, parent in model.named_modules():
        prefix = f"{parent_name}." if parent_name else ""
        for roles in FUSABLE_ROLES:
            members = [getattr(parent, role, None) for role in roles]
            quantized = [isinstance(member, QuantLinear) for member in members]
            if not any(quantized):
                continue
            label = prefix + "{" + ",".join(roles) + "}"
            current = members[0]._fusion if quantized[0] else None
            if current is not None and current[0].members == members:
                fused.append(label)  # fused already, with these very layers
                continue
            for member in members:  # out of any group they were in (a sibling may have been replaced since)
                if isinstance(member, QuantLinear) and member._fusion is not None:
                    _detach(member)
            if not all(quantized):
                skipped[label] = "not every layer of the group is a QuantLinear"
                continue
            keys = [_fusion_key(member) for member in members]
            differing = [key for key in keys[0] if any(k[key] != keys[0][key] for k in keys)]
            if differing:
                skipped[label] = f"the layers differ in {', '.join(differing)}"
                continue
            ProjectionFusion(members).attach()
            fused.append(label)
    return {"fused": fused, "skipped": skipped}


def unfuse_projections(model: nn.Module) -> int:
    """Undo ``fuse_projections``: every layer runs alone again, prepared where its group ran.
    Returns the number of layers unfused."""
    layers = [module for module in model.modules() if isinstance(module, QuantLinear) and module._fusion is not None]
    for layer in layers:
        _detach(layer)
    return len(layers)
