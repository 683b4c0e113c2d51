"""quantkern: custom GPU kernels for low-bit LLM inference.

Public surface:
- ``quantkern.ops``: one function per op (CUDA extension, Triton or plain-PyTorch reference backend).
- ``quantkern.reference``: the plain-PyTorch ground truth every kernel is tested against.
- ``quantkern.format``: the one packed on-disk format (see docs/FORMAT.md).
- ``quantkern.nn``: ``QuantLinear`` and model surgery (``quantkern.replace_linear``; ``quantkern.fuse_projections``
  runs q/k/v and gate/up as one GEMM each).
- ``quantkern.quantizers``: RTN, GPTQ, AWQ, SmoothQuant, QuaRot (``quantkern.quantize_model``).
- ``quantkern.io``: checkpoints (``quantkern.save_quantized``, ``quantkern.load_quantized``); after
  ``import quantkern``, ``transformers.AutoModelForCausalLM.from_pretrained`` reads them too.

transformers is imported only by the modules that need it.
"""

import torch  # noqa: F401  (loads libtorch/libc10 first: the extension quantkern._C links against them)

from ._hf_registration import install as _install_hf_quantizer
from .version import __version__

__all__ = ["__version__", "replace_linear", "fuse_projections", "unfuse_projections", "quantize_model",
           "QuantizeConfig", "load_quantized", "save_quantized"]

# The top-level conveniences and the public submodules, imported on first use so that ``import quantkern``
# stays light (``quantkern.nn.QuantLinear`` works after a plain ``import quantkern``).
_LAZY = {"replace_linear": "nn", "fuse_projections": "nn", "unfuse_projections": "nn",
         "quantize_model": "quantizers", "QuantizeConfig": "quantizers", "load_quantized": "io", "save_quantized": "io"}
_SUBMODULES = ("ops", "reference", "format", "nn", "quantizers", "io", "rotation", "kv_cache", "backends")


def __getattr__(name):
    import importlib

    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'quantkern' has no attribute {name!r}")

# AutoModelForCausalLM.from_pretrained(dir) for quantkern checkpoints (quantkern.hf_integration),
# registered when transformers' quantizer registry loads (never imports transformers here).
_install_hf_quantizer()
