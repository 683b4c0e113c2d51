"""Triton kernels of quantkern, shipped as ``quantkern.triton_kernels`` (never as a top-level
``triton_kernels`` module, which would collide with Triton's own package of that name).

``KERNELS`` maps each public op name (see ``quantkern.backends.OPS``) to its Triton implementation.
"""

from .activation_quant import quantize_per_token
from .block_rotation import block_rotate, block_rotate_quantize
from .hadamard import hadamard, hadamard_quantize
from .int_gemm import int_gemm
from .kv_quant import quantize_kv
from .permute import permute_columns
from .w4a16 import w4a16_linear

KERNELS = {
    "quantize_per_token": quantize_per_token,
    "weight_only_linear": w4a16_linear,
    "hadamard": hadamard,
    "hadamard_quantize": hadamard_quantize,
    "block_rotate": block_rotate,
    "block_rotate_quantize": block_rotate_quantize,
    # The integer-activation ops run quantize_per_token, then int_gemm (see quantkern.ops._int_linear).
    "w8a8_linear": int_gemm,
    "w4a4_linear": int_gemm,
    "w4a8_linear": int_gemm,
    "quantize_kv": quantize_kv,
    "permute_columns": permute_columns,
}
