"""quantkern: custom GPU kernels for low-bit LLM inference.

Public surface:
- ``quantkern.ops``: one function per op (CUDA extension, Triton or plain-PyTorch reference backend).
- ``quantkern.reference``: the plain-PyTorch ground truth every kernel is tested against.
- ``quantkern.format``: the one packed on-disk format (see docs/FORMAT.md).
- ``quantkern.nn``: ``QuantLinear`` and model surgery.

Heavy dependencies (transformers) are imported only by the modules that need them.
"""

from .version import __version__

__all__ = ["__version__"]
