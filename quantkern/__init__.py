"""quantkern: custom GPU kernels for low-bit LLM inference.

Public surface:
- ``quantkern.ops``: one function per op (CUDA extension, Triton or plain-PyTorch reference backend).
- ``quantkern.reference``: the plain-PyTorch ground truth every kernel is tested against.
- ``quantkern.format``: the one packed on-disk format (see docs/FORMAT.md).
- ``quantkern.nn``: ``QuantLinear`` and model surgery.

transformers is imported only by the modules that need it.
"""

import torch  # noqa: F401  (loads libtorch/libc10 first: the extension quantkern._C links against them)

from .version import __version__

__all__ = ["__version__"]
