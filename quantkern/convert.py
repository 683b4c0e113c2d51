"""Import GPTQ and AWQ checkpoints into quantkern's format, so that they run on quantkern's kernels.

Most 4-bit checkpoints on the Hugging Face hub come from GPTQ (auto-gptq, GPTQModel, optimum) or AWQ (AutoAWQ).
``convert_checkpoint(src, dst)`` reads such a directory (config.json with its ``quantization_config``, the
safetensors files, the tokenizer) and writes a quantkern checkpoint (docs/FORMAT.md) with the same codes, scales
and zero points: nothing is requantized, and the converted model computes what the source's dequantized weights
compute. ``quantkern convert SRC --dst DST`` is the command.

Source layouts read (4-bit only; a layer ``W[N, K]``, ``G`` groups):

* GPTQ (``quant_method: "gptq"``, ``checkpoint_format`` "gptq" or "gptq_v2"): ``qweight`` int32 ``[K/8, N]``,
  word ``r`` of column ``n`` holding codes of input channels ``8r .. 8r+7`` in nibbles 0..7; ``qzeros`` int32
  ``[G, N/8]``, word ``c`` of group ``g`` holding the zeros of output channels ``8c .. 8c+7``; ``scales``
  ``[G, N]``; ``g_idx`` int32 ``[K]`` (optional). The "gptq" (v1) format stores ``zero - 1``: each packed word
  minus 0x11111111 as a whole (GPTQModel's v2-to-v1 step), so a zero of 0 borrows from the nibble above it; adding
  the word back, as GPTQModel's v1-to-v2 step does when transformers loads such a checkpoint, recovers every zero.
  (auto-gptq's own packer ORed a zero of 0 in as -1, which also overwrote the nibbles above it; such a checkpoint
  converts to what that load computes.) "gptq_v2" stores the zeros themselves.
* AWQ (``quant_method: "awq"``, ``version: "gemm"``): ``qweight`` int32 ``[K, N/8]`` and ``qzeros`` int32
  ``[G, N/8]``, both packed along N with the nibble order 0, 2, 4, 6, 1, 3, 5, 7 (nibble ``i`` of word ``c``
  holds channel ``8c + AWQ_ORDER[i]``); ``scales`` ``[G, N]``.

GPTQ's act-order (``desc_act``) groups input channels out of order (``g_idx``): sorted by group they are contiguous,
so the converted layer holds its columns in that order and permutes its input to match (``QuantLinear``'s
``input_permutation``, one gather per call; q/k/v and gate/up share one order, since GPTQ derives it from their
shared input, and stay fusable).

What is refused, with the reason: other bit widths; group sizes other than 32, 64, 128 and per-channel; a
``g_idx`` whose groups do not each hold ``group_size`` channels; packings meant for other kernels (GPTQ "marlin",
AWQ "gemv", "exllama", ...); layers the CUDA W4A16 kernel cannot serve; a mix of converted and float layers under
one name (``model.layers.0.mlp.down_proj`` quantized but ``model.layers.1.mlp.down_proj`` not), which quantkern's
``modules_not_converted`` cannot say.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Dict

import torch

from .format import SUPPORTED_GROUP_SIZES, QuantizedWeight, group_length, implicit_zero, pack_int4

FORMATS = ("gptq", "awq")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ word holds channel AWQ_ORDER[i] of its eight
GPTQ_V1_ZERO_OFFSET = 0x11111111  # one per nibble: GPTQ v1 stores each word of zero points minus this
SOURCE_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")  # a quantized layer's tensors in the source


class UnsupportedCheckpointError(ValueError):
    """The source checkpoint is not one this converter reads (the message says why)."""


def to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 values -> the int32 of their low 32 bits (two's complement)."""
    return ((words + 2**31) % 2**32 - 2**31).to(torch.int32)


def unpack_int32_nibbles(words: torch.Tensor) -> torch.Tensor:
    """int32 ``[..., W]`` -> uint8 ``[..., 8 W]``: nibble i of each word (bits 4i..4i+3) as element 8w + i."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=words.device)
    nibbles = (words.to(torch.int32).unsqueeze(-1) >> shifts) & 0xF
    return nibbles.reshape(*words.shape[:-1], words.shape[-1] * 8).to(torch.uint8)


def _awq_unshuffle(codes: torch.Tensor) -> torch.Tensor:
    """Undo AWQ's nibble order along the last dim: element 8c + i holds channel 8c + AWQ_ORDER[i]."""
    grouped = codes.reshape(*codes.shape[:-1], -1, 8)
    channels = torch.empty_like(grouped)
    channels[..., list(AWQ_ORDER)] = grouped
    return channels.reshape(codes.shape)


def source_quantization_config(config: dict, source) -> dict:
    """The source's ``quantization_config`` with its format checked: (format, group size) readable here."""
    qconfig = config.get("quantization_config")
    if not isinstance(qconfig, dict):
        raise UnsupportedCheckpointError(f"{source}: config.json has no quantization_config; this converter reads "
                                         f"GPTQ and AWQ checkpoints ({', '.join(FORMATS)})")
    method = str(qconfig.get("quant_method", "")).lower()
    if method == "quantkern":
        raise UnsupportedCheckpointError(f"{source} is a quantkern checkpoint already: load it as it is")
    if method not in FORMATS:
        raise UnsupportedCheckpointError(f"{source}: quant_method {qconfig.get('quant_method')!r} is not one this "
                                         f"converter reads ({', '.join(FORMATS)})")
    bits = qconfig.get("bits", qconfig.get("w_bit"))  # (AutoAWQ's own names: w_bit, q_group_size)
    if bits != 4:
        raise UnsupportedCheckpointError(f"{source}: {bits}-bit weights; quantkern's weight-only kernels are 4-bit")
    if method == "gptq":
        layout = str(qconfig.get("checkpoint_format", "gptq")).lower()
        if layout not in ("gptq", "gptq_v2"):
            raise UnsupportedCheckpointError(f"{source}: GPTQ checkpoint_format {layout!r} is packed for another "
                                             "kernel; this converter reads 'gptq' and 'gptq_v2'")
    else:
        layout = str(qconfig.get("version", "gemm")).lower()
        if layout != "gemm":
            raise UnsupportedCheckpointError(f"{source}: AWQ version {layout!r} is packed for another kernel; this "
                                             "converter reads 'gemm'")
    group_size = qconfig.get("group_size", qconfig.get("q_group_size"))
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise UnsupportedCheckpointError(f"{source}: group_size {group_size!r}; quantkern's format has groups of "
                                         f"{', '.join(map(str, SUPPORTED_GROUP_SIZES))} (-1: per channel)")
    return {"format": method, "layout": layout, "group_size": group_size, "source_config": qconfig}


def convert_layer(tensors: Dict[str, torch.Tensor], prefix: str, fmt: dict, in_features: int, out_features: int):
    """One source layer (``prefix.qweight`` etc. in ``tensors``) as ``(QuantizedWeight, input permutation or
    None)``: a canonical asymmetric weight (explicit zero codes; ``convert_checkpoint`` drops them where every
    zero is 8), its columns in the order of the permutation where GPTQ's act-order grouped them out of order."""
    k, n, group_size = in_features, out_features, fmt["group_size"]
    permutation = None
    glen = group_length(group_size, k)
    groups = k // glen
    where = f"{prefix} ({fmt['format']})"
    if k % 8 or n % 8:
        raise UnsupportedCheckpointError(f"{where}: a {n} x {k} layer; packed int4 words need both multiples of 8")
    missing = [s for s in ("qweight", "qzeros", "scales") if f"{prefix}.{s}" not in tensors]
    if missing:
        raise UnsupportedCheckpointError(f"{where}: missing {', '.join(missing)}")
    qweight, qzeros, scales = (tensors[f"{prefix}.{s}"] for s in ("qweight", "qzeros", "scales"))
    if fmt["format"] == "gptq":
        shapes = {"qweight": (k // 8, n), "qzeros": (groups, n // 8), "scales": (groups, n)}
    else:
        shapes = {"qweight": (k, n // 8), "qzeros": (groups, n // 8), "scales": (groups, n)}
    for name, tensor in (("qweight", qweight), ("qzeros", qzeros), ("scales", scales)):
        if tuple(tensor.shape) != shapes[name]:
            raise UnsupportedCheckpointError(f"{where}: {name} has shape {tuple(tensor.shape)}, but a {n} x {k} "
                                             f"layer in groups of {group_size} stores {shapes[name]}")
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise UnsupportedCheckpointError(f"{where}: qweight and qzeros must be int32, got {qweight.dtype} and "
                                         f"{qzeros.dtype}")
    if fmt["format"] == "gptq":
        codes = unpack_int32_nibbles(qweight.t()).reshape(n, k)  # row n: words of 8 input channels each
        if fmt["layout"] == "gptq":  # v1: zero - 1, subtracted from each packed word as a whole; add it back
            qzeros = to_int32(qzeros.to(torch.int64) + GPTQ_V1_ZERO_OFFSET)
        zeros = unpack_int32_nibbles(qzeros)  # [G, N]
        g_idx = tensors.get(f"{prefix}.g_idx")
        if g_idx is not None and not torch.equal(g_idx.to(torch.int64), torch.arange(k, device=g_idx.device) // glen):
            # Act-order (desc_act): groups of channels in another order. Sorted by group, the channels form
            # contiguous groups; the layer then reads its input in that order (QuantLinear.input_permutation).
            g_idx = g_idx.to(torch.int64)
            if (g_idx.shape != (k,) or int(g_idx.min()) < 0 or int(g_idx.max()) >= groups
                    or not bool((torch.bincount(g_idx, minlength=groups) == glen).all())):
                raise UnsupportedCheckpointError(f"{where}: g_idx does not give each of the {groups} groups "
                                                 f"{glen} input channels")
            permutation = torch.argsort(g_idx, stable=True)
            codes = codes[:, permutation]
    else:
        codes = _awq_unshuffle(unpack_int32_nibbles(qweight)).t()  # [K, N] -> [N, K]
        zeros = _awq_unshuffle(unpack_int32_nibbles(qzeros))
    scales = scales.t().contiguous()
    if scales.dtype not in (torch.float16, torch.bfloat16):
        scales = scales.to(torch.float16)
    qw = QuantizedWeight(pack_int4(codes.contiguous()), scales, zeros.t().contiguous(), 4, group_size, k, n)
    return qw, permutation


def _read_tensors(src: Path) -> Dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = src / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"{index} is corrupt: {error}") from None
    else:
        files = [path.name for path in sorted(src.glob("*.safetensors"))]
    if not files:
        raise FileNotFoundError(f"{src} has no .safetensors files (.bin checkpoints are not read: convert them to "
                                "safetensors first)")
    tensors = {}
    for name in files:
        try:
            tensors.update(load_file(str(src / name)))
        except (SafetensorError, FileNotFoundError) as error:
            raise ValueError(f"{src / name} is missing or corrupt: {error}") from None
    return tensors


def convert_checkpoint(src, dst, overwrite: bool = False, progress: bool = False) -> Path:
    """Write the GPTQ or AWQ checkpoint ``src`` as the quantkern checkpoint ``dst`` (atomically, through
    ``quantkern.io.save_quantized``); returns ``dst``. Raises ``UnsupportedCheckpointError`` (a ValueError) for
    what cannot be converted (module docstring), before anything is written."""
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from . import ops
    from .io import (_read_json, assign_tensors, build_metadata, check_destination, empty_model, quantization_config,
                     save_quantized)
    from .nn import QuantLinear, linear_layers, set_submodule

    start = time.perf_counter()
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"{src} is not a directory")
    check_destination(Path(dst).resolve(), overwrite)
    config_dict = _read_json(src / "config.json")
    fmt = source_quantization_config(config_dict, src)
    config_dict.pop("quantization_config")
    tensors = _read_tensors(src)

    model = empty_model(config_dict)
    linears = linear_layers(model, skip=())
    quantized = [(name, module) for name, module in linears if f"{name}.qweight" in tensors]
    if not quantized:
        raise UnsupportedCheckpointError(f"{src}: no tensor named <layer>.qweight for any Linear layer of this "
                                         f"{model.config.model_type} model")
    def last(name):
        return name.rsplit(".", 1)[-1]
    float_names = sorted({last(name) for name, _ in linears} - {last(name) for name, _ in quantized})
    mixed = sorted(name for name, _ in linears if f"{name}.qweight" not in tensors and last(name) not in float_names)
    if mixed:
        raise UnsupportedCheckpointError(f"{src}: layers {mixed[:3]} are in floating point while others of their "
                                         "name are quantized; quantkern's checkpoints leave layers out by name only")

    weights = {}
    for name, module in tqdm(quantized, desc="converting", unit="layer", disable=not progress):
        reason = ops.weight_only_unsupported_reason(4, fmt["group_size"], module.in_features, module.out_features,
                                                    "cuda")
        if reason:
            raise UnsupportedCheckpointError(f"{src}: {name}: {reason}")
        weights[name] = convert_layer(tensors, name, fmt, module.in_features, module.out_features)
    # One symmetry for the whole checkpoint (a format-wide setting): symmetric where every zero is the implicit 8.
    symmetric = all(bool((qw.zeros == implicit_zero(4)).all()) for qw, _ in weights.values())
    for name, (qw, permutation) in weights.items():
        if symmetric:
            qw = QuantizedWeight(qw.qweight, qw.scales, None, 4, qw.group_size, qw.in_features, qw.out_features)
        bias = tensors.get(f"{name}.bias")
        set_submodule(model, name, QuantLinear.from_quantized(qw, bias, input_permutation=permutation))
        for suffix in SOURCE_SUFFIXES + ("bias",):
            tensors.pop(f"{name}.{suffix}", None)

    assign_tensors(model, tensors, src)  # the unquantized tensors: embeddings, norms, lm_head

    qconfig = quantization_config(fmt["format"], 4, fmt["group_size"], symmetric, modules_not_converted=float_names)
    metadata = build_metadata(qconfig, src.name, None, {"convert": round(time.perf_counter() - start, 2)},
                              lm_head_fp16="lm_head" in float_names)
    metadata["method_config"] = {"imported_from": {"format": fmt["format"], "layout": fmt["layout"],
                                                   "layers": len(weights), "quantization_config": fmt["source_config"]}}
    tokenizer = AutoTokenizer.from_pretrained(str(src)) if (src / "tokenizer_config.json").is_file() else None
    return save_quantized(model.eval(), dst, qconfig, metadata, tokenizer=tokenizer, overwrite=overwrite)
