"""Saving and reading quantized checkpoints (format: docs/FORMAT.md).

A checkpoint directory holds ``model.safetensors`` (QuantLinear buffers plus the unquantized
tensors), ``config.json`` with a versioned ``quantization_config``, the tokenizer files, and
``quantization_metadata.json`` (method, bits, group size, activation/KV bits, rotation,
calibration, tag, versions, timings). Writes are atomic: everything goes to a temporary sibling
directory that is renamed into place only when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch

from .format import FORMAT_VERSION, LAYOUT, SUPPORTED_GROUP_SIZES, SUPPORTED_SCALE_DTYPES, SUPPORTED_WEIGHT_BITS
from .version import __version__

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
METADATA_FILE = "quantization_metadata.json"
QUANT_METHOD = "quantkern"

# Display names of methods, as the seeds' tags spell them (e.g. GPTQ_w4_g128_headfp16).
METHOD_NAMES = {
    "rtn": "RTN", "gptq": "GPTQ", "awq": "AWQ", "smoothquant": "SmoothQuant", "quarot": "QuaRot",
    "hqq": "HQQ", "adaround": "AdaRound", "autoround": "AutoRound", "brecq": "BRECQ",
    "compressed-tensors": "CompressedTensors",
}


def quant_tag(method: str, bits: int, group_size: int, act_bits: Optional[int] = None,
              kv_bits: Optional[int] = None, lm_head_fp16: bool = True) -> str:
    """The naming tag, e.g. ``GPTQ_w4_g128_headfp16`` or ``QuaRot_w4_pc_a4_kv4_headfp16``."""
    parts = [METHOD_NAMES.get(method, method), f"w{bits}", "pc" if group_size == -1 else f"g{group_size}"]
    if act_bits:
        parts.append(f"a{act_bits}")
    if kv_bits:
        parts.append(f"kv{kv_bits}")
    if lm_head_fp16:
        parts.append("headfp16")
    return "_".join(parts)


def quantization_config(method: str, bits: int, group_size: int, symmetric: bool, act_bits=None,
                        kv_bits=None, rotation=None, modules_not_converted=("lm_head",), *,
                        act_clip_ratio: float = 1.0, kv_rotate_keys: bool = False, layers=None) -> dict:
    """The ``quantization_config`` entry of config.json (versioned).

    ``act_bits`` / ``act_clip_ratio`` are the defaults of every quantized layer; ``layers`` maps the
    names of layers that deviate (other activation bits or clip ratio, an input rotation) to their
    ``{"act_bits", "act_clip_ratio", "input_rotation"}``. ``save_quantized`` fills it in from the
    model (``layer_overrides``), so callers need not. ``kv_bits`` / ``kv_rotate_keys``: the model's
    KV cache quantization (``quantkern.kv_cache``), enabled again by ``load_quantized``."""
    return {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "layout": LAYOUT,
        "method": method,
        "bits": bits,
        "group_size": group_size,
        "symmetric": symmetric,
        "act_bits": act_bits,
        "act_clip_ratio": float(act_clip_ratio),
        "kv_bits": kv_bits,
        "kv_rotate_keys": bool(kv_rotate_keys),
        "rotation": rotation,
        "modules_not_converted": list(modules_not_converted),
        "layers": dict(layers or {}),
    }


LAYER_ATTRIBUTES = ("act_bits", "act_clip_ratio", "input_rotation")  # per-layer, beyond the weight
# The dtypes docs/FORMAT.md gives a quantized layer's tensors (the bias: any floating-point dtype).
STORED_DTYPES = {"qweight": (torch.uint8,), "scales": SUPPORTED_SCALE_DTYPES, "zeros": (torch.uint8,),
                 "bias": (torch.float16, torch.bfloat16, torch.float32), "input_permutation": (torch.int64,)}


def layer_overrides(model: torch.nn.Module, act_bits=None, act_clip_ratio: float = 1.0) -> dict:
    """``{name: {"act_bits", "act_clip_ratio", "input_rotation"}}`` of the model's QuantLinear layers
    whose attributes differ from the defaults (``act_bits``, ``act_clip_ratio``, no input rotation)."""
    from .nn import QuantLinear

    defaults = {"act_bits": act_bits, "act_clip_ratio": float(act_clip_ratio), "input_rotation": None}
    overrides = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            attributes = {key: getattr(module, key) for key in LAYER_ATTRIBUTES}
            if attributes != defaults:
                overrides[name] = attributes
    return overrides


def _with_model_settings(model: torch.nn.Module, qconfig: dict) -> dict:
    """``qconfig`` with the model's per-layer overrides; refuses KV settings that contradict the model's."""
    from .kv_cache import kv_quantization_settings

    overrides = layer_overrides(model, qconfig.get("act_bits"), qconfig.get("act_clip_ratio", 1.0))
    given = qconfig.get("layers") or {}
    if given and given != overrides:
        raise ValueError("quantization_config['layers'] does not describe the model's QuantLinear layers; "
                         "leave it out: save_quantized fills it in from the model")
    kv = kv_quantization_settings(model)
    if kv is not None and (kv["bits"] != qconfig.get("kv_bits")
                           or kv["rotate_keys"] != qconfig.get("kv_rotate_keys", False)):
        raise ValueError(f"the model quantizes its KV cache with {kv} but quantization_config has "
                         f"kv_bits={qconfig.get('kv_bits')}, kv_rotate_keys={qconfig.get('kv_rotate_keys', False)}")
    return {**qconfig, "layers": overrides}


def build_metadata(qconfig: dict, source: str, calibration: Optional[dict], timings: dict,
                   lm_head_fp16: bool = True) -> dict:
    return {
        "tag": quant_tag(qconfig["method"], qconfig["bits"], qconfig["group_size"], qconfig["act_bits"],
                         qconfig["kv_bits"], lm_head_fp16),
        "method": qconfig["method"],
        "bits": qconfig["bits"],
        "group_size": qconfig["group_size"],
        "symmetric": qconfig["symmetric"],
        "act_bits": qconfig["act_bits"],
        "kv_bits": qconfig["kv_bits"],
        "rotation": qconfig["rotation"],
        "lm_head_fp16": lm_head_fp16,
        "calibration": calibration or {"samples": 0, "seq_len": None, "sha256": None, "source": None},
        "source_model": source,
        "quantkern_version": __version__,
        "torch_version": torch.__version__,
        "format_version": FORMAT_VERSION,
        "timings_s": timings,
    }


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def check_destination(dst, overwrite: bool) -> None:
    """Refuse a ``dst`` that exists, unless ``overwrite`` and it is a quantkern checkpoint: replacing deletes
    it, so an arbitrary directory (a model, a home directory, ``.``) is never replaced."""
    dst = Path(dst)
    if not dst.exists() and not dst.is_symlink():
        # Fail now, not after the slow work: the first existing ancestor must be a writable directory.
        ancestor = dst.absolute().parent
        while not ancestor.exists():
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise NotADirectoryError(f"cannot write {dst}: {ancestor} is not a directory")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise PermissionError(f"cannot write {dst}: {ancestor} is not writable")
        return
    if not overwrite:
        raise FileExistsError(f"{dst} already exists; pass --overwrite (overwrite=True) to replace it")
    if not (dst.is_dir() and (dst / METADATA_FILE).is_file()):
        raise FileExistsError(f"{dst} exists and is not a quantkern checkpoint (no {METADATA_FILE}): "
                              "--overwrite replaces only checkpoints; choose another destination")


def save_quantized(model: torch.nn.Module, dst, qconfig: dict, metadata: dict, tokenizer=None,
                   overwrite: bool = False) -> Path:
    """Write a quantized model to ``dst`` atomically: into a staging directory beside it, flushed to disk, then
    renamed into place. An existing ``dst`` is refused, unless ``overwrite`` and it is a quantkern checkpoint
    (``check_destination``, checked again just before the rename: a directory that appeared meanwhile is never
    replaced without leave); it is then replaced, and restored if the replacement fails."""
    from safetensors.torch import save_model

    dst = Path(dst).resolve()
    check_destination(dst, overwrite)
    qconfig = check_quantization_config(_with_model_settings(model, qconfig), "quantization_config to save")
    if not isinstance(metadata, dict) or not isinstance(metadata.get("tag"), str):
        raise ValueError("metadata to save needs a 'tag' string (read_metadata and `quantkern info` expect one)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        save_model(model, str(staging / WEIGHTS_FILE), metadata={"format": "pt", "quant_method": QUANT_METHOD})
        config = model.config.to_dict()
        config["quantization_config"] = qconfig
        _write_json(staging / CONFIG_FILE, config)
        _write_json(staging / METADATA_FILE, metadata)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
        _apply_umask(staging)
        _sync_tree(staging)  # the data on disk before the rename makes it visible
        check_destination(dst, overwrite)
        if dst.exists():
            backup_dir = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
            os.replace(dst, backup_dir / dst.name)
            try:
                os.replace(staging, dst)
            except BaseException:
                os.replace(backup_dir / dst.name, dst)  # the old checkpoint back in place
                shutil.rmtree(backup_dir, ignore_errors=True)
                raise
            shutil.rmtree(backup_dir, ignore_errors=True)  # (the new checkpoint is in place: not an error)
        else:
            os.replace(staging, dst)
        _fsync(dst.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dst


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # (some file systems cannot sync a directory)
        pass
    finally:
        os.close(fd)


def _sync_tree(directory: Path) -> None:
    for path in directory.rglob("*"):
        _fsync(path)
    _fsync(directory)


def _apply_umask(directory: Path) -> None:
    # mkdtemp makes the staging directory private (0700); give the result the usual permissions.
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def read_metadata(directory) -> dict:
    """``quantization_metadata.json`` of a checkpoint, with clear errors for missing or corrupt files."""
    path = Path(directory) / METADATA_FILE
    if not Path(directory).is_dir():
        raise FileNotFoundError(f"{directory} is not a directory")
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {directory} is not a quantkern checkpoint")
    metadata = _read_json(path)
    if not isinstance(metadata.get("tag"), str):
        raise ValueError(f"{path} is corrupt: no 'tag' string")
    return metadata


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is corrupt: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} is corrupt: a JSON object expected, got {type(data).__name__}")
    return data


# What every loader reads from a quantization_config without a default.
REQUIRED_QCONFIG_KEYS = ("bits", "group_size", "symmetric", "act_bits", "modules_not_converted")


def check_quantization_config(qconfig, source) -> dict:
    """``qconfig`` if it is a quantkern ``quantization_config`` of a format version and layout we read,
    else a ValueError naming ``source`` (a checkpoint directory, or a description)."""
    if not isinstance(qconfig, dict) or qconfig.get("quant_method") != QUANT_METHOD:
        raise ValueError(f"{source} is not a quantkern checkpoint (config.json has no "
                         f"quantization_config with quant_method '{QUANT_METHOD}')")
    version = qconfig.get("format_version")
    if version != FORMAT_VERSION or qconfig.get("layout") != LAYOUT:
        newer = type(version) is int and version > FORMAT_VERSION
        raise ValueError(f"{source} has format {version}/{qconfig.get('layout')}; "
                         f"this quantkern {__version__} reads {FORMAT_VERSION}/{LAYOUT}"
                         + (" (the checkpoint is of a newer format: upgrade quantkern)" if newer else ""))
    missing = [key for key in REQUIRED_QCONFIG_KEYS if key not in qconfig]
    if missing:
        raise ValueError(f"{source}: quantization_config lacks {missing}; the checkpoint is corrupt")
    if not isinstance(qconfig["symmetric"], bool):
        raise ValueError(f"{source}: quantization_config symmetric must be true or false, "
                         f"got {qconfig['symmetric']!r}")
    problems = _qconfig_value_problems(qconfig)
    if problems:
        raise ValueError(f"{source}: quantization_config has {'; '.join(problems)}; the checkpoint is corrupt")
    return qconfig


def _is_int(value, allowed) -> bool:
    return type(value) is int and value in allowed  # (not bool, not "4", not 4.0)


def _qconfig_value_problems(qconfig: dict) -> list:
    """What is malformed in the values of a quantization_config whose keys are there (a list of phrases)."""
    problems = []
    if not _is_int(qconfig["bits"], SUPPORTED_WEIGHT_BITS):
        problems.append(f"bits {qconfig['bits']!r} (expected one of {SUPPORTED_WEIGHT_BITS})")
    if not _is_int(qconfig["group_size"], SUPPORTED_GROUP_SIZES):
        problems.append(f"group_size {qconfig['group_size']!r} (expected one of {SUPPORTED_GROUP_SIZES})")
    for key in ("act_bits", "kv_bits"):
        if qconfig.get(key) is not None and not _is_int(qconfig[key], (4, 8)):
            problems.append(f"{key} {qconfig[key]!r} (expected null, 4 or 8)")
    clip = qconfig.get("act_clip_ratio", 1.0)
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not 0 < clip <= 1:
        problems.append(f"act_clip_ratio {clip!r} (expected a number in (0, 1])")
    if not isinstance(qconfig.get("kv_rotate_keys", False), bool):
        problems.append(f"kv_rotate_keys {qconfig['kv_rotate_keys']!r} (expected true or false)")
    skip = qconfig["modules_not_converted"]
    if not isinstance(skip, (list, tuple)) or not all(isinstance(name, str) for name in skip):
        problems.append(f"modules_not_converted {skip!r} (expected a list of names)")
    layers = qconfig.get("layers")
    if layers is not None and not (isinstance(layers, dict) and all(
            isinstance(settings, dict) and set(settings) <= set(LAYER_ATTRIBUTES) for settings in layers.values())):
        problems.append(f"layers {layers!r} (expected {{name: {{{', '.join(LAYER_ATTRIBUTES)}}}}})")
    if qconfig.get("rotation") is not None and not isinstance(qconfig["rotation"], str):
        problems.append(f"rotation {qconfig['rotation']!r} (expected null or a name)")
    return problems


def read_quantization_config(directory) -> dict:
    """config.json, with its ``quantization_config`` checked (``check_quantization_config``)."""
    config = _read_json(Path(directory) / CONFIG_FILE)
    check_quantization_config(config.get("quantization_config"), directory)
    if not isinstance(config.get("model_type"), str):
        raise ValueError(f"{Path(directory) / CONFIG_FILE} has no model_type: not a Hugging Face model config")
    return config


def build_quantlinear_skeletons(model: torch.nn.Module, qconfig: dict, tensors, source) -> None:
    """Replace, in place, every ``nn.Linear`` of ``model`` (but ``modules_not_converted``) by an empty
    ``QuantLinear`` made as the checkpoint says: bits, group size, symmetry, activation bits, clip ratio
    and input rotation from ``qconfig`` (its defaults and per-layer ``layers``); the scales' dtype and
    whether there is a bias from the checkpoint's tensors. ``tensors`` maps checkpoint names to tensors
    (meta tensors will do: only names, dtypes and shapes are read). The scale dtype is not in
    ``qconfig``: each layer adopts the dtype its checkpoint tensor has, so that loading never casts it.

    Both loaders build their layers here: ``load_quantized`` and ``from_pretrained`` (through
    ``quantkern.hf_integration``). Raises ValueError naming ``source`` where a layer's tensors are
    missing, unexpected, or of another shape than ``qconfig`` implies, and where ``layers`` names a layer
    that is not converted."""
    from .nn import QuantLinear, linear_layers, set_submodule

    converted = linear_layers(model, skip=qconfig["modules_not_converted"])
    overrides = qconfig.get("layers") or {}
    # save_quantized writes overrides only for the layers it quantized: any other name means the config
    # belongs to another model (or was edited), and its settings would be dropped without a word.
    unknown = sorted(set(overrides) - {name for name, _ in converted})
    if unknown:
        raise ValueError(f"{source}: quantization_config['layers'] has settings for {unknown}, which are not "
                         "quantized layers of this model; the checkpoint is corrupt")
    for name, module in converted:
        prefix = f"{name}."
        scales = tensors.get(prefix + "scales")
        if scales is None:
            raise ValueError(f"{source} has no quantized weight for {name}")
        attributes = {"act_bits": qconfig["act_bits"], "act_clip_ratio": qconfig.get("act_clip_ratio", 1.0),
                      "input_rotation": None, **overrides.get(name, {})}
        try:
            layer = QuantLinear(
                module.in_features, module.out_features, qconfig["bits"], qconfig["group_size"],
                qconfig["symmetric"], attributes["act_bits"], bias=prefix + "bias" in tensors,
                scale_dtype=scales.dtype, act_clip_ratio=attributes["act_clip_ratio"],
                input_rotation=attributes["input_rotation"], input_permutation=prefix + "input_permutation" in tensors)
        except ValueError as error:  # settings of quantization_config that no layer can have
            raise ValueError(f"{source}: {name} as quantization_config describes it: {error}") from None
        if qconfig["symmetric"] and prefix + "zeros" in tensors:
            raise ValueError(f"{source} has zero points for {name}, but its quantization_config says symmetric")
        for key, expected in layer.state_dict().items():
            stored = tensors.get(prefix + key)
            if stored is None:
                raise ValueError(f"{source} has no {prefix + key}")
            if tuple(stored.shape) != tuple(expected.shape):
                raise ValueError(f"{source}: {prefix + key} has shape {tuple(stored.shape)}, but quantization_config "
                                 f"(bits {qconfig['bits']}, group_size {qconfig['group_size']}) implies "
                                 f"{tuple(expected.shape)}")
            allowed = STORED_DTYPES.get(key)
            if allowed is not None and stored.dtype not in allowed:
                raise ValueError(f"{source}: {prefix + key} is {stored.dtype}; the format stores it as "
                                 f"{' or '.join(map(str, allowed))}")
        zeros = tensors.get(prefix + "zeros")
        if zeros is not None and not zeros.is_meta and zeros.numel() and int(zeros.max()) >= 1 << qconfig["bits"]:
            raise ValueError(f"{source}: {prefix}zeros holds {int(zeros.max())}, outside the {qconfig['bits']}-bit "
                             f"code range 0..{(1 << qconfig['bits']) - 1}")
        set_submodule(model, name, layer)


def empty_model(config_dict: dict, source=None) -> torch.nn.Module:
    """The causal LM of a config.json's contents, its parameters on "meta" (rotary buffers computed), for a
    loader to fill with ``assign_tensors``. ``source`` (the config.json) names it in the error for a model_type
    that transformers does not know."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.for_model(**config_dict)
    except (ValueError, KeyError) as error:
        reason = str(error) if len(str(error)) <= 120 else str(error)[:120] + "..."
        raise ValueError(f"{source or 'config.json'}: model_type {config_dict.get('model_type')!r} is not one this "
                         f"transformers knows ({reason})") from None
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config)


def assign_tensors(model: torch.nn.Module, tensors: dict, source) -> None:
    """Give a model built on "meta" its tensors (``load_state_dict(assign=True)``); ValueError naming ``source``
    for a tensor the model does not have or a parameter left without one. Tied parameters (embed_tokens and
    lm_head) are stored once: each tied name gets the tensor of whichever name is present."""
    model.tie_weights()
    names_of = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(name)
    for names in names_of.values():
        present = [name for name in names if name in tensors]
        for name in names if present else ():
            tensors.setdefault(name, tensors[present[0]])
    try:
        incompatible = model.load_state_dict(tensors, strict=False, assign=True)
    except RuntimeError as error:  # a tensor of another shape (or a dtype a parameter cannot take)
        raise ValueError(f"{source} does not fit the model its config.json describes: {error}") from None
    if incompatible.unexpected_keys:
        raise ValueError(f"{source} holds tensors the model does not have: {incompatible.unexpected_keys[:5]}")
    model.tie_weights()
    still_empty = [name for name, p in model.named_parameters() if p.is_meta]
    if still_empty:
        raise ValueError(f"{source} is missing tensors: {still_empty[:5]}")


def load_quantized(directory, device="cpu", dtype: Optional[torch.dtype] = None):
    """Load a checkpoint written by ``save_quantized``: ``(model, tokenizer)`` with ``QuantLinear``
    layers. ``dtype`` is that of the unquantized tensors (default: fp32 on CPU, fp16 elsewhere)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from .kv_cache import CONFIG_ATTR as KV_CONFIG_ATTR, enable_kv_quantization
    from .nn import cast_unquantized_parameters

    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory")
    config_dict = read_quantization_config(directory)
    qconfig = config_dict.pop("quantization_config")
    config_dict.pop(KV_CONFIG_ATTR, None)  # saved from model.config; re-enabled from qconfig below
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path} is missing")
    try:
        tensors = load_file(str(weights_path))
    except SafetensorError as error:
        raise ValueError(f"{weights_path} is corrupt: {error}") from None

    model = empty_model(config_dict, directory / CONFIG_FILE)
    build_quantlinear_skeletons(model, qconfig, tensors, weights_path)
    assign_tensors(model, tensors, weights_path)
    dtype = dtype or (torch.float32 if torch.device(device).type == "cpu" else torch.float16)
    cast_unquantized_parameters(model, dtype)
    model = model.to(device).eval()
    if qconfig.get("kv_bits"):
        enable_kv_quantization(model, qconfig["kv_bits"], rotate_keys=qconfig.get("kv_rotate_keys", False))
    tokenizer = None
    if (directory / "tokenizer_config.json").is_file():
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(directory))
        except (OSError, ValueError) as error:  # (json's errors are ValueErrors)
            raise ValueError(f"{directory}: its tokenizer files are corrupt: {error}") from None
    return model, tokenizer


def directory_size(directory) -> int:
    return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())
