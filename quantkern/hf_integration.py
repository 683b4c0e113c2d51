"""``transformers`` integration: ``AutoModelForCausalLM.from_pretrained(dir)`` for quantkern checkpoints.

After ``import quantkern``, a checkpoint written by ``quantkern.io.save_quantized`` (config.json's
``quantization_config`` has ``quant_method: "quantkern"``; docs/FORMAT.md) loads with plain
transformers::

    import quantkern  # registers the quantizer (see quantkern/_hf_registration.py)
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(dir, dtype=torch.float16, device_map="cuda")

This module defines the two classes transformers' registry asks for and ``register()``:

* ``QuantkernConfig`` (a ``QuantizationConfigMixin``): the checkpoint's ``quantization_config``,
  kept as is (every key an attribute, so ``to_dict`` gives back the same dict), checked on
  construction: a config of another format version or layout, or one lacking required keys, is a
  clear ValueError before any model is built.
* ``QuantkernHfQuantizer`` (an ``HfQuantizer``), which transformers calls around its own loading:

  - before weight loading (the model is an empty skeleton on the meta device), every ``nn.Linear``
    but ``modules_not_converted`` becomes an empty ``QuantLinear``, built by the same function as
    ``io.load_quantized`` uses (``io.build_quantlinear_skeletons``). The scales' dtype and the bias
    come from the checkpoint itself: the quantizer reads the safetensors headers (names, dtypes,
    shapes; no data) of the checkpoint files. Why: transformers casts every floating-point tensor it
    loads to the dtype of the module's empty tensor, so a layer made with fp16 scales would silently
    turn a bf16 checkpoint's scales into fp16; a layer made from the header has the checkpoint's
    dtype, and loading then copies the tensors unchanged. (The config does not state the scale dtype.)
  - transformers then loads the tensors into the buffers (``qweight``, ``scales``, ``zeros``, ``bias``)
    by name, ties ``lm_head`` to the embeddings where the config says so, and places everything as
    ``device_map`` says; the unquantized tensors take ``dtype`` (default: the config's dtype).
  - after loading, KV cache quantization (``kv_bits``, ``kv_rotate_keys``) is enabled with
    ``quantkern.kv_cache.enable_kv_quantization``, as ``load_quantized`` does.

  On CUDA, the QuantLinear layers run quantkern's kernels (no dequantizing fallback), as with
  ``load_quantized``.

What transformers does not allow, or what is left out:

* No on-the-fly quantization: ``from_pretrained(fp_model, quantization_config=QuantkernConfig(...))``
  is refused (``requires_calibration``: transformers then accepts pre-quantized checkpoints only);
  quantize with ``python -m quantkern quantize`` or ``quantkern.quantizers.quantize_model``.
* The registry has no way to take an entry back or to register lazily. ``register()`` is idempotent
  (an earlier registration by this module, e.g. before an ``importlib.reload``, is replaced) and
  leaves a foreign class registered under "quantkern" in place, with a warning.
* ``device_map`` with "disk" offloading is refused (QuantLinear buffers are not parameters that
  accelerate's disk offload streams in).
* ``model.save_pretrained(dir2)`` works: the quantizer is serializable, the QuantLinear buffers are
  the state dict, and config.json gets the same ``quantization_config``; the result loads back with
  ``from_pretrained`` and ``io.load_quantized``. transformers gives a quantizer no hook to write other
  files, so ``quantization_metadata.json`` (which ``quantkern info`` / ``quantkern eval`` read) is not
  written, nor the tokenizer unless saved separately; ``quantkern.io.save_quantized`` writes the
  complete checkpoint. A checkpoint sharded by ``max_shard_size`` loads with ``from_pretrained`` only
  (``load_quantized`` reads a single ``model.safetensors``).
"""

from __future__ import annotations

import importlib
import warnings

import torch
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .io import QUANT_METHOD, build_quantlinear_skeletons, check_quantization_config

__all__ = ["QuantkernConfig", "QuantkernHfQuantizer", "register"]

# Keys that checkpoints written before they existed lack (docs/FORMAT.md gives these defaults).
DEFAULTS = {"act_clip_ratio": 1.0, "kv_bits": None, "kv_rotate_keys": False, "rotation": None, "layers": {}}
CONFIG_SOURCE = "the checkpoint"

# safetensors header dtype names; only the floating-point ones matter (the scales' and bias' dtype).
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class QuantkernConfig(QuantizationConfigMixin):
    """config.json's ``quantization_config`` of a quantkern checkpoint (keys: docs/FORMAT.md,
    ``quantkern.io.quantization_config``). Every key is an attribute; ``to_dict`` returns them."""

    def __init__(self, **kwargs):
        kwargs = {"quant_method": QUANT_METHOD, **kwargs}
        check_quantization_config(kwargs, CONFIG_SOURCE)  # format, and the keys without a default
        for key, value in {**DEFAULTS, **kwargs}.items():
            setattr(self, key, value)
        self.quant_method = QUANT_METHOD


def _checkpoint_tensors(checkpoint_files) -> dict:
    """``{name: meta tensor}`` with the dtype and shape of every tensor of the checkpoint files,
    read from their safetensors headers (no data is read)."""
    from safetensors import SafetensorError, safe_open

    if not checkpoint_files:
        raise ValueError("a quantkern checkpoint loads from its files (from_pretrained(directory)); "
                         "from_pretrained(None, state_dict=...) is not supported")
    tensors = {}
    for path in checkpoint_files:
        if not str(path).endswith(".safetensors"):
            raise ValueError(f"quantkern checkpoints are safetensors files; got {path}")
        try:
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():
                    header = handle.get_slice(name)
                    dtype = _SAFETENSORS_DTYPES.get(header.get_dtype())
                    if dtype is None:  # (the loader's dtype checks name the others: fp8 codes, say)
                        raise ValueError(f"{path}: {name} is of dtype {header.get_dtype()}, which no quantkern "
                                         "checkpoint holds")
                    tensors[name] = torch.empty(header.get_shape(), dtype=dtype, device="meta")
        except SafetensorError as error:  # as load_quantized says it: the file named, not a bare header error
            raise ValueError(f"{path} is corrupt: {error}") from None
    return tensors


class QuantkernHfQuantizer(HfQuantizer):
    """Loads quantkern checkpoints in ``from_pretrained``: QuantLinear skeletons before the weights
    are loaded, KV cache quantization after (see the module docstring)."""

    requires_calibration = True  # pre-quantized checkpoints only: no quantization inside from_pretrained
    quantization_config: QuantkernConfig

    def validate_environment(self, *args, device_map=None, **kwargs):
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("quantkern checkpoints cannot be offloaded to disk (device_map has 'disk'): "
                             "QuantLinear keeps its weight in buffers, which disk offloading does not stream")

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        tensors = _checkpoint_tensors(checkpoint_files)
        source = checkpoint_files[0] if len(checkpoint_files) == 1 else f"the checkpoint ({checkpoint_files[0]}, ...)"
        build_quantlinear_skeletons(model, self.quantization_config.to_dict(), tensors, source)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        from .kv_cache import CONFIG_ATTR, enable_kv_quantization

        config = self.quantization_config
        if config.kv_bits:
            enable_kv_quantization(model, config.kv_bits, rotate_keys=config.kv_rotate_keys)
        elif hasattr(model.config, CONFIG_ATTR):
            delattr(model.config, CONFIG_ATTR)  # quantization_config decides, as in load_quantized
        return model

    def get_state_dict_and_metadata(self, model):
        # save_pretrained: the module state dict as is; the safetensors metadata save_quantized writes.
        return None, {"quant_method": QUANT_METHOD}

    def is_serializable(self):
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Register ``QuantkernConfig`` and ``QuantkernHfQuantizer`` under "quantkern" with transformers.

    Idempotent: registering again (re-import, ``importlib.reload``) replaces this module's earlier
    classes; a class registered under "quantkern" by someone else is left in place, with a warning."""
    auto = importlib.import_module("transformers.quantizers.auto")
    registrations = ((auto.AUTO_QUANTIZATION_CONFIG_MAPPING, auto.register_quantization_config, QuantkernConfig),
                     (auto.AUTO_QUANTIZER_MAPPING, auto.register_quantizer, QuantkernHfQuantizer))
    for mapping, _, cls in registrations:
        current = mapping.get(QUANT_METHOD)
        if current is not None and current is not cls and getattr(current, "__module__", None) != __name__:
            warnings.warn(f"transformers already has {current.__module__}.{current.__qualname__} registered as "
                          f"'{QUANT_METHOD}'; quantkern's Hugging Face integration is not registered")
            return
    for mapping, register_fn, cls in registrations:
        if mapping.get(QUANT_METHOD) is not cls:
            mapping.pop(QUANT_METHOD, None)  # an earlier version of this module's class (reload)
            register_fn(QUANT_METHOD)(cls)


register()
