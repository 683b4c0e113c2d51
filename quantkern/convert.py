"""Import 4-bit GPTQ, AWQ and AutoRound checkpoints, and llm-compressor's compressed-tensors (W4A16, W4A8, W8A8),
into quantkern's format, so that they run on quantkern's kernels.

Most quantized checkpoints on the Hugging Face hub come from GPTQ (auto-gptq, GPTQModel, optimum), AWQ (AutoAWQ),
AutoRound, or llm-compressor (compressed-tensors, vLLM's format: its GPTQ, AWQ and SmoothQuant recipes).
``convert_checkpoint(src, dst)`` reads such a directory (config.json with its ``quantization_config``, the
safetensors files, the tokenizer) and writes a quantkern checkpoint (docs/FORMAT.md) with the same codes, scales
and zero points: nothing is requantized, and the converted model computes what the source's dequantized weights
compute. ``quantkern convert SRC --dst DST`` is the command.

Source layouts read (a layer ``W[N, K]``, ``G`` groups; codes are unsigned 0..15 unless said):

* GPTQ (``quant_method: "gptq"``, ``checkpoint_format`` "gptq" or "gptq_v2"): ``qweight`` int32 ``[K/8, N]``,
  word ``r`` of column ``n`` holding codes of input channels ``8r .. 8r+7`` in nibbles 0..7; ``qzeros`` int32
  ``[G, N/8]``, word ``c`` of group ``g`` holding the zeros of output channels ``8c .. 8c+7``; ``scales``
  ``[G, N]``; ``g_idx`` int32 ``[K]`` (optional). The "gptq" (v1) format stores ``zero - 1``: each packed word
  minus 0x11111111 as a whole (GPTQModel's v2-to-v1 step), so a zero of 0 borrows from the nibble above it; adding
  the word back, as GPTQModel's v1-to-v2 step does when transformers loads such a checkpoint, recovers every zero.
  (auto-gptq's own packer ORed a zero of 0 in as -1, which also overwrote the nibbles above it, and AutoRound's
  clamps it to 0; such a checkpoint converts to what that load computes.) "gptq_v2" stores the zeros themselves.
* AWQ (``quant_method: "awq"``, ``version: "gemm"``): ``qweight`` int32 ``[K, N/8]`` and ``qzeros`` int32
  ``[G, N/8]``, both packed along N with the nibble order 0, 2, 4, 6, 1, 3, 5, 7 (nibble ``i`` of word ``c``
  holds channel ``8c + AWQ_ORDER[i]``); ``scales`` ``[G, N]``.
* AutoRound (``quant_method: "auto-round"``): its ``packing_format`` names one of the layouts above:
  "auto_round:auto_gptq" (and "auto_round:gptq") is GPTQ v1, "auto_round" and "auto_round:gptqmodel" GPTQ v2,
  "auto_round:auto_awq" AWQ. Layers that its ``extra_config`` quantizes otherwise (other bits or groups) are
  refused; layers it leaves in floating point stay so.
* compressed-tensors (``quant_method: "compressed-tensors"``, status "compressed", one weight scheme for every
  config group): "pack-quantized" 4-bit weights are ``weight_packed`` int32 ``[N, K/8]`` (nibble ``i`` of word
  ``w`` holds input channel ``8w + i``, stored as the signed value plus 8), ``weight_scale`` ``[N, G]`` (``G =
  1`` per channel), with asymmetric schemes ``weight_zero_point`` (signed, plus 8) packed the same way along N
  (int32 ``[N/8, G]``; older versions: int8 ``[N, G]`` unpacked), ``weight_shape`` ``[N, K]`` and, for
  act-order "group", ``weight_g_idx`` as GPTQ's ``g_idx``; "int-quantized" 8-bit weights are the signed int8
  ``weight`` itself. Dynamic per-token symmetric int activations (``input_activations``: 8 or 4 bits, strategy
  "token") become quantkern's per-token activation quantization: W4A8, W8A8, W4A4. Static activation scales,
  float (FP8, FP4) schemes, KV cache schemes, sparsity and transforms are refused.

GPTQ's act-order (``desc_act``) groups input channels out of order (``g_idx``): sorted by group they are contiguous,
so the converted layer holds its columns in that order and permutes its input to match (``QuantLinear``'s
``input_permutation``, one gather per call; q/k/v and gate/up share one order, since GPTQ derives it from their
shared input, and stay fusable). down_proj's gather is folded away: its input is ``act(gate_proj x) * up_proj x``,
elementwise, so gate_proj's and up_proj's output channels (rows of codes, scales, zeros and bias) are stored in
down_proj's order instead, and down_proj reads its input as it comes (the same products; one gather fewer per block,
each 5-6 us per call at decode on the H100 beside a 5-15 us layer: docs/PERF.md, session 17).

What is refused, with the reason: bit widths other than 4 (8 with quantized activations); group sizes other than
32, 64, 128 and per-channel; a ``g_idx`` whose groups do not each hold ``group_size`` channels; packings meant for
other kernels (GPTQ "marlin" or ``is_marlin_format``, AWQ "gemv", "exllama", ..., transformers' AWQ backend
"llm-awq"); GPTQModel's codes packed into other words than int32 (``pack_dtype``) and its ``dynamic`` rules that give
some layers other bits or groups; layers the CUDA kernels cannot serve; a mix of converted
and float layers under one name (``model.layers.0.mlp.down_proj`` quantized but ``model.layers.1.mlp.down_proj``
not), which quantkern's ``modules_not_converted`` cannot say.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Dict, Optional

import torch

from .format import SUPPORTED_GROUP_SIZES, QuantizedWeight, group_length, implicit_zero, pack_int4

FORMATS = ("gptq", "awq", "auto-round", "compressed-tensors")  # the quant_method values read here
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ word holds channel AWQ_ORDER[i] of its eight
GPTQ_V1_ZERO_OFFSET = 0x11111111  # one per nibble: GPTQ v1 stores each word of zero points minus this
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # fp32 ones are rounded to fp16: stored 16-bit
# AutoRound's packing_format -> the layout it writes (see auto_round_extension's qlinear_torch / qlinear_torch_zp)
AUTOROUND_PACKINGS = {"auto_round:auto_gptq": "gptq_v1", "auto_round:gptq": "gptq_v1", "auto_round": "gptq_v2",
                      "auto_round:gptqmodel": "gptq_v2", "auto_round:auto_awq": "awq", "auto_round:awq": "awq"}
# Each reader: the tensor whose presence marks a quantized layer, and every source tensor of such a layer.
READERS = {
    "gptq_v1": ("qweight", ("qweight", "qzeros", "scales", "g_idx")),
    "gptq_v2": ("qweight", ("qweight", "qzeros", "scales", "g_idx")),
    "awq": ("qweight", ("qweight", "qzeros", "scales")),
    "ct_packed": ("weight_packed", ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape",
                                    "weight_g_idx")),
    "ct_int": ("weight_scale", ("weight", "weight_scale", "weight_zero_point", "weight_g_idx")),
}


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


def _format(method, reader, layout, bits, group_size, qconfig, act_bits=None, symmetric=None) -> dict:
    """What the converter needs to know of a source: quantkern's method name, the reader of its layers, the
    source's own name of its layout, the weight and activation bits, the group size, and the symmetry where the
    source declares it (None: found from the zeros)."""
    return {"method": method, "reader": reader, "layout": layout, "bits": bits, "act_bits": act_bits,
            "group_size": group_size, "symmetric": symmetric, "source_config": qconfig}


def _gptq_or_awq_format(method: str, qconfig: dict, source) -> dict:
    bits = qconfig.get("bits", qconfig.get("w_bit"))  # (AutoAWQ's own names: w_bit, q_group_size)
    group_size = qconfig.get("group_size", qconfig.get("q_group_size"))
    pack_dtype = str(qconfig.get("pack_dtype", "int32")).lower().replace("torch.", "")
    if pack_dtype != "int32":  # GPTQModel can pack into int8, int16 or int64 words
        raise UnsupportedCheckpointError(f"{source}: pack_dtype {pack_dtype!r}; this converter reads codes packed "
                                         "into int32 words")
    # GPTQModel's per-layer overrides ("dynamic": {regex: {...}}; a "-:" regex leaves layers in floating point)
    for pattern, settings in (qconfig.get("dynamic") or {}).items():
        own = {"bits": bits, "group_size": group_size}
        differs = {key: settings[key] for key in own if isinstance(settings, dict) and key in settings
                   and settings[key] != own[key]}
        if differs and not str(pattern).startswith("-:"):
            raise UnsupportedCheckpointError(f"{source}: layers matching {pattern!r} are quantized with {differs}, "
                                             f"unlike the others ({own}); quantkern's checkpoints have one setting "
                                             "for all")
    if method == "gptq":
        layout = str(qconfig.get("checkpoint_format", "gptq")).lower()
        if qconfig.get("is_marlin_format"):  # (auto-gptq's older spelling of checkpoint_format "marlin")
            layout = "marlin"
        if layout not in ("gptq", "gptq_v2"):
            raise UnsupportedCheckpointError(f"{source}: GPTQ checkpoint_format {layout!r} is packed for another "
                                             "kernel; this converter reads 'gptq' and 'gptq_v2'")
        return _format("gptq", "gptq_v1" if layout == "gptq" else "gptq_v2", layout, bits, group_size, qconfig)
    layout = str(qconfig.get("version", "gemm")).lower()
    if str(qconfig.get("backend", "autoawq")).lower() == "llm-awq":  # (transformers' AwqConfig: mit-han-lab's packing)
        layout = "llm-awq"
    if layout != "gemm":
        raise UnsupportedCheckpointError(f"{source}: AWQ version {layout!r} is packed for another kernel; this "
                                         "converter reads 'gemm'")
    return _format("awq", "awq", layout, bits, group_size, qconfig)


def _autoround_format(qconfig: dict, source) -> dict:
    packing = str(qconfig.get("packing_format", "auto_round:auto_gptq")).lower()
    if packing not in AUTOROUND_PACKINGS:
        raise UnsupportedCheckpointError(f"{source}: AutoRound packing_format {packing!r} is not one this converter "
                                         f"reads ({', '.join(AUTOROUND_PACKINGS)})")
    data_type = str(qconfig.get("data_type", "int")).lower()
    # (integer codes with integer zero points; not "int_asym_float_zp" nor the double-quantized "*_dq")
    if data_type not in ("int", "int_sym", "int_asym") or int(qconfig.get("act_bits", 16) or 16) < 16:
        raise UnsupportedCheckpointError(f"{source}: AutoRound data_type {data_type!r} with act_bits "
                                         f"{qconfig.get('act_bits')}; this converter reads integer weight-only "
                                         "checkpoints")
    bits, group_size = qconfig.get("bits"), qconfig.get("group_size")
    own = {"bits": bits, "group_size": group_size, "sym": qconfig.get("sym", True), "data_type": data_type}
    for layer, settings in (qconfig.get("extra_config") or {}).items():
        if int(settings.get("bits", bits) or 16) >= 16:
            continue  # left in floating point: found as such by its tensors
        differs = {key: settings[key] for key in own if key in settings and settings[key] != own[key]}
        if differs:
            raise UnsupportedCheckpointError(f"{source}: {layer} is quantized with {differs}, unlike the other "
                                             f"layers ({own}); quantkern's checkpoints have one setting for all")
    return _format("autoround", AUTOROUND_PACKINGS[packing], packing, bits, group_size, qconfig)


def _compressed_tensors_scheme(group: dict, top_format, where: str):
    """One config group of a compressed-tensors config as (format, weight bits, group size, symmetric, act
    bits), refusing what quantkern cannot run as the source does."""
    weights, inputs = group.get("weights") or {}, group.get("input_activations")
    layout = str(group.get("format") or top_format or "").lower()
    if layout not in ("pack-quantized", "int-quantized", "naive-quantized"):
        raise UnsupportedCheckpointError(f"{where}: format {layout or None!r}; this converter reads compressed-"
                                         "tensors' 'pack-quantized' and 'int-quantized' integer weights")
    if str(weights.get("type", "int")).lower() != "int" or weights.get("dynamic"):
        raise UnsupportedCheckpointError(f"{where}: {weights.get('type')} weights (dynamic: "
                                         f"{weights.get('dynamic')}); this converter reads static integer weights")
    strategy = str(weights.get("strategy") or "").lower()
    if strategy == "group":
        group_size = weights.get("group_size")
    elif strategy == "channel":
        group_size = -1
    else:
        raise UnsupportedCheckpointError(f"{where}: weight strategy {strategy!r}; quantkern's format has scales per "
                                         "group or per channel")
    act_bits = None
    if inputs is not None:
        if (str(inputs.get("type", "int")).lower() != "int" or not inputs.get("symmetric", True)
                or str(inputs.get("strategy")).lower() != "token" or inputs.get("dynamic") is not True):
            raise UnsupportedCheckpointError(
                f"{where}: input activations {inputs.get('type')} {inputs.get('strategy')} (symmetric: "
                f"{inputs.get('symmetric')}, dynamic: {inputs.get('dynamic')}); quantkern quantizes activations "
                "to integers per token, symmetric and dynamic")
        act_bits = inputs.get("num_bits")
    if group.get("output_activations") is not None:
        raise UnsupportedCheckpointError(f"{where}: quantized output activations; quantkern has none")
    return layout, weights.get("num_bits"), group_size, bool(weights.get("symmetric", True)), act_bits


def _compressed_tensors_format(qconfig: dict, source) -> dict:
    status = qconfig.get("quantization_status", "compressed")
    if status != "compressed":
        raise UnsupportedCheckpointError(f"{source}: compressed-tensors quantization_status {status!r}: the weights "
                                         "are stored in floating point; this converter reads 'compressed' ones")
    for key, what in (("kv_cache_scheme", "a KV cache scheme"), ("transform_config", "transforms (rotations)")):
        if qconfig.get(key):
            raise UnsupportedCheckpointError(f"{source}: {what} ({key}); this converter does not read them")
    sparsity = qconfig.get("sparsity_config") or {}
    if str(sparsity.get("format", "dense")).lower() != "dense":
        raise UnsupportedCheckpointError(f"{source}: sparsity format {sparsity.get('format')!r}; quantkern's "
                                         "kernels are dense")
    groups = qconfig.get("config_groups") or {}
    if not groups:
        raise UnsupportedCheckpointError(f"{source}: compressed-tensors config without config_groups")
    schemes = {_compressed_tensors_scheme(group, qconfig.get("format"), f"{source}: config group {name}")
               for name, group in groups.items()}
    if len(schemes) > 1:
        raise UnsupportedCheckpointError(f"{source}: config groups with different schemes {sorted(schemes, key=str)}"
                                         "; quantkern's checkpoints have one setting for all layers")
    layout, bits, group_size, symmetric, act_bits = schemes.pop()
    if layout == "pack-quantized" and bits != 4:
        raise UnsupportedCheckpointError(f"{source}: {bits}-bit pack-quantized weights; quantkern's are 4-bit or "
                                         "8-bit with quantized activations")
    if act_bits is not None and not symmetric:
        raise UnsupportedCheckpointError(f"{source}: asymmetric weights with quantized activations; quantkern's "
                                         "integer GEMMs need symmetric weights")
    reader = "ct_packed" if layout == "pack-quantized" else "ct_int"
    return _format("compressed-tensors", reader, layout, bits, group_size, qconfig, act_bits, symmetric)


def source_quantization_config(config: dict, source) -> dict:
    """The source's ``quantization_config``, checked: what ``convert_layer`` needs to read its layers (``_format``)."""
    qconfig = config.get("quantization_config")
    if not isinstance(qconfig, dict):
        raise UnsupportedCheckpointError(f"{source}: config.json has no quantization_config; this converter reads "
                                         f"{', '.join(FORMATS)} checkpoints")
    method = str(qconfig.get("quant_method", "")).lower()
    if method == "quantkern":
        raise UnsupportedCheckpointError(f"{source} is a quantkern checkpoint already: load it as it is")
    if method in ("gptq", "awq"):
        fmt = _gptq_or_awq_format(method, qconfig, source)
    elif method == "auto-round":
        fmt = _autoround_format(qconfig, source)
    elif method == "compressed-tensors":
        fmt = _compressed_tensors_format(qconfig, source)
    else:
        raise UnsupportedCheckpointError(f"{source}: quant_method {qconfig.get('quant_method')!r} is not one this "
                                         f"converter reads ({', '.join(FORMATS)})")
    bits, act_bits = fmt["bits"], fmt["act_bits"]
    if not (bits == 4 or (bits == 8 and act_bits == 8)):
        raise UnsupportedCheckpointError(f"{source}: {bits}-bit weights{'' if act_bits else ' (weight-only)'}; "
                                         "quantkern's weight-only kernels are 4-bit, its integer GEMMs W4A4, W4A8 "
                                         "and W8A8")
    if act_bits not in (None, 4, 8):
        raise UnsupportedCheckpointError(f"{source}: {act_bits}-bit activations; quantkern quantizes them to 4 or 8")
    if fmt["group_size"] not in SUPPORTED_GROUP_SIZES:
        raise UnsupportedCheckpointError(f"{source}: group_size {fmt['group_size']!r}; quantkern's format has groups "
                                         f"of {', '.join(map(str, SUPPORTED_GROUP_SIZES))} (-1: per channel)")
    return fmt


def _expect(tensor: torch.Tensor, name: str, shape: tuple, dtypes: tuple, where: str, geometry: str) -> None:
    if tuple(tensor.shape) != shape:
        raise UnsupportedCheckpointError(f"{where}: {name} has shape {tuple(tensor.shape)}, but {geometry} stores "
                                         f"{shape}")
    if tensor.dtype not in dtypes:
        raise UnsupportedCheckpointError(f"{where}: {name} is {tensor.dtype}, expected "
                                         f"{' or '.join(map(str, dtypes))}")


def _group_order(g_idx: Optional[torch.Tensor], k: int, glen: int, where: str) -> Optional[torch.Tensor]:
    """None where ``g_idx`` (input channel -> its group) is absent or in order; else the permutation that sorts the
    input channels by group (GPTQ's act-order), each group checked to hold ``glen`` channels."""
    if g_idx is None or torch.equal(g_idx.to(torch.int64), torch.arange(k, device=g_idx.device) // glen):
        return None
    groups = k // glen
    g_idx = g_idx.to(torch.int64)
    if (g_idx.shape != (k,) or int(g_idx.min()) < 0 or int(g_idx.max()) >= groups
            or not bool((torch.bincount(g_idx, minlength=groups) == glen).all())):
        raise UnsupportedCheckpointError(f"{where}: g_idx does not give each of the {groups} groups {glen} input "
                                         "channels")
    return torch.argsort(g_idx, stable=True)


def _gptq_awq_layer(tensors, prefix, fmt, k, n, glen, where):
    """GPTQ / AWQ (and AutoRound's) tensors -> (codes [N, K], zeros [N, G], scales [N, G], g_idx or None)."""
    groups = k // glen
    missing = [s for s in ("qweight", "qzeros", "scales") if f"{prefix}.{s}" not in tensors]
    if missing:
        raise UnsupportedCheckpointError(f"{where}: missing {', '.join(missing)}")
    qweight, qzeros, scales = (tensors[f"{prefix}.{s}"] for s in ("qweight", "qzeros", "scales"))
    geometry = f"a {n} x {k} layer in groups of {fmt['group_size']}"
    awq = fmt["reader"] == "awq"
    _expect(qweight, "qweight", (k, n // 8) if awq else (k // 8, n), (torch.int32,), where, geometry)
    _expect(qzeros, "qzeros", (groups, n // 8), (torch.int32,), where, geometry)
    _expect(scales, "scales", (groups, n), SCALE_DTYPES, where, geometry)
    if awq:
        return (_awq_unshuffle(unpack_int32_nibbles(qweight)).t(), _awq_unshuffle(unpack_int32_nibbles(qzeros)).t(),
                scales.t(), None)
    codes = unpack_int32_nibbles(qweight.t()).reshape(n, k)  # row n: words of 8 input channels each
    if fmt["reader"] == "gptq_v1":  # zero - 1, subtracted from each packed word as a whole; add it back
        qzeros = to_int32(qzeros.to(torch.int64) + GPTQ_V1_ZERO_OFFSET)
    return codes, unpack_int32_nibbles(qzeros).t(), scales.t(), tensors.get(f"{prefix}.g_idx")


def _signed_to_codes(values: torch.Tensor, name: str, bits: int, where: str) -> torch.Tensor:
    """compressed-tensors' signed int8 values -> quantkern's unsigned codes (value + 2^(bits-1)), range checked."""
    offset = implicit_zero(bits)
    if values.numel() and (int(values.min()) < -offset or int(values.max()) >= offset):
        raise UnsupportedCheckpointError(f"{where}: {name} holds values outside the {bits}-bit range")
    return (values.to(torch.int16) + offset).to(torch.uint8)


def _compressed_tensors_layer(tensors, prefix, fmt, k, n, glen, where):
    """compressed-tensors' tensors -> (codes [N, K], zeros [N, G] or None, scales [N, G], g_idx or None)."""
    groups, bits = k // glen, fmt["bits"]
    geometry = f"a {n} x {k} layer in groups of {fmt['group_size']}"
    weight_name = "weight_packed" if fmt["reader"] == "ct_packed" else "weight"
    missing = [s for s in (weight_name, "weight_scale") if f"{prefix}.{s}" not in tensors]
    if not fmt["symmetric"] and f"{prefix}.weight_zero_point" not in tensors:
        missing.append("weight_zero_point")
    if missing:
        raise UnsupportedCheckpointError(f"{where}: missing {', '.join(missing)}")
    weight, scales = tensors[f"{prefix}.{weight_name}"], tensors[f"{prefix}.weight_scale"]
    _expect(scales, "weight_scale", (n, groups), SCALE_DTYPES, where, geometry)
    if f"{prefix}.weight_shape" in tensors and tensors[f"{prefix}.weight_shape"].tolist() != [n, k]:
        raise UnsupportedCheckpointError(f"{where}: weight_shape {tensors[f'{prefix}.weight_shape'].tolist()}, but "
                                         f"the model's layer is {n} x {k}")
    if fmt["reader"] == "ct_packed":
        _expect(weight, "weight_packed", (n, k // 8), (torch.int32,), where, geometry)
        codes = unpack_int32_nibbles(weight)
    else:
        _expect(weight, "weight", (n, k), (torch.int8,), where, geometry)
        codes = _signed_to_codes(weight, "weight", bits, where)
    zeros = None
    if not fmt["symmetric"]:
        zero_point = tensors[f"{prefix}.weight_zero_point"]
        if zero_point.dtype == torch.int32 and bits == 4:  # packed along N like the weight along K
            _expect(zero_point, "weight_zero_point", (n // 8, groups), (torch.int32,), where, geometry)
            zeros = unpack_int32_nibbles(zero_point.t()).t()
        else:  # one signed value per group (8-bit, and 4-bit before compressed-tensors packed them)
            _expect(zero_point, "weight_zero_point", (n, groups), (torch.int8,), where, geometry)
            zeros = _signed_to_codes(zero_point, "weight_zero_point", bits, where)
    return codes, zeros, scales, tensors.get(f"{prefix}.weight_g_idx")


def convert_layer(tensors: Dict[str, torch.Tensor], prefix: str, fmt: dict, in_features: int, out_features: int):
    """One source layer (``prefix.qweight`` etc. in ``tensors``) as ``(QuantizedWeight, input permutation or
    None)``: a canonical weight with explicit zero codes unless the source declares its scheme symmetric
    (``convert_checkpoint`` drops them where every zero is the implicit one), its columns in the order of the
    permutation where act-order grouped them out of order."""
    k, n, bits = in_features, out_features, fmt["bits"]
    glen = group_length(fmt["group_size"], k)
    where = f"{prefix} ({fmt['method']})"
    if k % 8 or n % 8:
        raise UnsupportedCheckpointError(f"{where}: a {n} x {k} layer; packed int4 words need both multiples of 8")
    read = _compressed_tensors_layer if fmt["reader"].startswith("ct_") else _gptq_awq_layer
    codes, zeros, scales, g_idx = read(tensors, prefix, fmt, k, n, glen, where)
    permutation = _group_order(g_idx, k, glen, where)
    if permutation is not None:  # act-order: sorted by group, the channels form contiguous groups
        codes = codes[:, permutation]
    if scales.dtype not in (torch.float16, torch.bfloat16):
        scales = scales.to(torch.float16)  # (the formats read here store 16-bit scales; fp32 ones are rounded)
    packed = pack_int4(codes.contiguous()) if bits == 4 else codes.contiguous()
    zeros = None if zeros is None else zeros.contiguous()
    return QuantizedWeight(packed, scales.contiguous(), zeros, bits, fmt["group_size"], k, n), permutation


def _permute_rows(qw: QuantizedWeight, order: torch.Tensor) -> QuantizedWeight:
    """``qw`` with its output channels (rows) in ``order``: row j of the result is row ``order[j]``."""
    return QuantizedWeight(qw.qweight[order].contiguous(), qw.scales[order].contiguous(),
                           None if qw.zeros is None else qw.zeros[order].contiguous(), qw.bits, qw.group_size,
                           qw.in_features, qw.out_features)


def _fold_down_proj_permutations(model, weights: dict, tensors: Dict[str, torch.Tensor]) -> int:
    """Where a block's down_proj permutes its input (act-order), store its gate_proj's and up_proj's output channels
    in that order instead (``weights``: name -> (QuantizedWeight, permutation), updated in place, and their biases
    in ``tensors``), so that down_proj needs no gather: ``act(gate x) * up x`` is elementwise. Returns how many
    down_proj permutations were folded (blocks whose gate/up are not both converted keep theirs)."""
    from .models import UnsupportedModelError, model_structure

    try:
        blocks = model_structure(model).blocks
    except UnsupportedModelError:
        return 0  # a structure quantkern does not know: every layer keeps its own gather
    folded = 0
    for block in blocks:
        names = block.linear_names
        down, gate, up = names["down_proj"], names["gate_proj"], names["up_proj"]
        if down not in weights or weights[down][1] is None or gate not in weights or up not in weights:
            continue
        order = weights[down][1]
        for name in (gate, up):
            qw, own_permutation = weights[name]
            weights[name] = (_permute_rows(qw, order), own_permutation)
            if f"{name}.bias" in tensors:
                tensors[f"{name}.bias"] = tensors[f"{name}.bias"][order]
        weights[down] = (weights[down][0], None)
        folded += 1
    return folded


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


def _kernel_problem(fmt: dict, in_features: int, out_features: int) -> Optional[str]:
    """Why the CUDA kernels that would run this layer cannot serve it (None if they can)."""
    from . import ops
    from .layout_int import unsupported_reason

    if fmt["act_bits"] is None:
        return ops.weight_only_unsupported_reason(4, fmt["group_size"], in_features, out_features, "cuda")
    return unsupported_reason(in_features, out_features, fmt["group_size"], fmt["bits"], fmt["act_bits"])


def convert_checkpoint(src, dst, overwrite: bool = False, progress: bool = False) -> Path:
    """Write the quantized checkpoint ``src`` (GPTQ, AWQ, AutoRound, compressed-tensors) as the quantkern
    checkpoint ``dst`` (atomically, through ``quantkern.io.save_quantized``); returns ``dst``. Raises
    ``UnsupportedCheckpointError`` (a ValueError) for what cannot be converted (module docstring), before anything
    is written."""
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

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
    marker, suffixes = READERS[fmt["reader"]]

    model = empty_model(config_dict, src / "config.json")
    linears = linear_layers(model, skip=())
    quantized = [(name, module) for name, module in linears if f"{name}.{marker}" in tensors]
    if not quantized:
        raise UnsupportedCheckpointError(f"{src}: no tensor named <layer>.{marker} for any Linear layer of this "
                                         f"{model.config.model_type} model")
    def last(name):
        return name.rsplit(".", 1)[-1]
    float_names = sorted({last(name) for name, _ in linears} - {last(name) for name, _ in quantized})
    mixed = sorted(name for name, _ in linears if f"{name}.{marker}" not in tensors and last(name) not in float_names)
    if mixed:
        raise UnsupportedCheckpointError(f"{src}: layers {mixed[:3]} are in floating point while others of their "
                                         "name are quantized; quantkern's checkpoints leave layers out by name only")

    weights = {}
    for name, module in tqdm(quantized, desc="converting", unit="layer", disable=not progress):
        reason = _kernel_problem(fmt, module.in_features, module.out_features)
        if reason:
            raise UnsupportedCheckpointError(f"{src}: {name}: {reason}")
        weights[name] = convert_layer(tensors, name, fmt, module.in_features, module.out_features)
    folded = _fold_down_proj_permutations(model, weights, tensors)
    # One symmetry for the whole checkpoint (a format-wide setting): symmetric where the source says so, or where
    # every zero is the implicit one.
    bits = fmt["bits"]
    symmetric = all(qw.zeros is None or bool((qw.zeros == implicit_zero(bits)).all()) for qw, _ in weights.values())
    for name, (qw, permutation) in weights.items():
        if symmetric:
            qw = QuantizedWeight(qw.qweight, qw.scales, None, bits, qw.group_size, qw.in_features, qw.out_features)
        bias = tensors.get(f"{name}.bias")
        set_submodule(model, name, QuantLinear.from_quantized(qw, bias, act_bits=fmt["act_bits"],
                                                              input_permutation=permutation))
        for suffix in suffixes + ("bias",):
            tensors.pop(f"{name}.{suffix}", None)

    assign_tensors(model, tensors, src)  # the unquantized tensors: embeddings, norms, lm_head

    qconfig = quantization_config(fmt["method"], bits, fmt["group_size"], symmetric, act_bits=fmt["act_bits"],
                                  modules_not_converted=float_names)
    metadata = build_metadata(qconfig, src.name, None, {"convert": round(time.perf_counter() - start, 2)},
                              lm_head_fp16="lm_head" in float_names)
    source_method = str(fmt["source_config"].get("quant_method")).lower()
    permuted = sum(permutation is not None for _, permutation in weights.values())
    metadata["method_config"] = {"imported_from": {"format": source_method, "layout": fmt["layout"],
                                                   "layers": len(weights), "quantization_config": fmt["source_config"],
                                                   "input_permutations": permuted,
                                                   "down_proj_permutations_folded": folded}}
    tokenizer = AutoTokenizer.from_pretrained(str(src)) if (src / "tokenizer_config.json").is_file() else None
    return save_quantized(model.eval(), dst, qconfig, metadata, tokenizer=tokenizer, overwrite=overwrite)
