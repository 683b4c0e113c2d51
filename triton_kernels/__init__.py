"""Triton kernels of quantkern, shipped as ``quantkern.triton_kernels`` (never as a top-level
``triton_kernels`` module, which would collide with Triton's own package of that name).

``KERNELS`` maps each public op name (see ``quantkern.backends.OPS``) to its Triton implementation.
"""

from .activation_quant import quantize_per_token
from .w4a16 import w4a16_linear

KERNELS = {
    "quantize_per_token": quantize_per_token,
    "weight_only_linear": w4a16_linear,
}
