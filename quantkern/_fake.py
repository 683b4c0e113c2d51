"""Fake (meta) implementations of the extension's ops, so torch.compile can trace them without running them.

Each function gives the output shapes and dtypes of one op; the Triton custom ops reuse them.
"""

import torch


def quantize_per_token_fake(x: torch.Tensor, bits: int, clip_ratio: float, packed: bool = True):
    tokens, features = x.shape
    if bits == 4 and packed:
        q = x.new_empty((tokens, features // 2), dtype=torch.uint8)
    else:
        q = x.new_empty((tokens, features), dtype=torch.int8)
    return q, x.new_empty((tokens,), dtype=torch.float32)


def w4a16_gemm_fake(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros, bias,
                    locks: torch.Tensor, group_size: int, split_k: int = 0, tile_m: int = 0,
                    scales_fit_fp16: bool = False):
    # y [M, N] in x's dtype; N = scales.size(1) (scales are [K / group, N] in the kernel's layout).
    return x.new_empty((x.shape[0], scales.shape[1]))


def int_gemm_fake(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias,
                  a_bits: int, w_bits: int, group_len: int, out_dtype: torch.dtype, split_k: int = 0,
                  config: int = 0, w4a8_layout: bool = False):
    # y [M, N] in out_dtype; N = w_scale.size(1) (w is tiled and padded, see quantkern.layout_int).
    return a.new_empty((a.shape[0], w_scale.shape[1]), dtype=out_dtype)


def int_gemm_acc_fake(a: torch.Tensor, w: torch.Tensor, n: int, a_bits: int, w_bits: int, split_k: int = 0,
                      config: int = 0, w4a8_layout: bool = False):
    return a.new_empty((a.shape[0], n), dtype=torch.int32)


def hadamard_fake(x: torch.Tensor, block_size: int = 0):
    return torch.empty_like(x)


def hadamard_quantize_fake(x: torch.Tensor, bits: int, clip_ratio: float, block_size: int = 0, packed: bool = True):
    # Same outputs as quantize_per_token: q int8 [M, K] / uint8 [M, K/2], scales fp32 [M].
    return quantize_per_token_fake(x, bits, clip_ratio, packed)


def block_rotate_quantize_fake(x: torch.Tensor, rotation: torch.Tensor, bits: int, clip_ratio: float):
    return quantize_per_token_fake(x, bits, clip_ratio)


def permute_columns_fake(x: torch.Tensor, permutation: torch.Tensor):
    return torch.empty_like(x)


# Every op of csrc/bindings.cpp's TORCH_LIBRARY(quantkern, ...) and its fake (tests/test_cuda_kernels.py checks that
# the two lists agree and that each fake takes its schema's arguments).
FAKES = {
    "quantize_per_token": quantize_per_token_fake,
    "w4a16_gemm": w4a16_gemm_fake,
    "int_gemm": int_gemm_fake,
    "int_gemm_acc": int_gemm_acc_fake,
    "permute_columns": permute_columns_fake,
    "hadamard": hadamard_fake,
    "hadamard_quantize": hadamard_quantize_fake,
    "block_rotate_quantize": block_rotate_quantize_fake,
}
# Absent from extensions built before csrc/hadamard.cu, csrc/permute.cu and csrc/block_rotation.cu.
_OPTIONAL = ("hadamard", "hadamard_quantize", "permute_columns", "block_rotate_quantize")


_registered = False


def register_extension_fakes() -> None:
    """Called right after quantkern._C is loaded (its ops must exist first); registers once per process."""
    global _registered
    if _registered:
        return
    _registered = True
    for name, fake in FAKES.items():
        if name not in _OPTIONAL or hasattr(torch.ops.quantkern, name):
            torch.library.register_fake(f"quantkern::{name}")(fake)


# csrc/bindings.cpp names this module (m.set_python_module) as the home of the fakes, and torch.compile's error for
# an op without one says to import it: importing it registers them wherever the extension is loaded (also when
# quantkern._C was imported directly, without quantkern.backends).
if hasattr(torch.ops.quantkern, "quantize_per_token"):
    register_extension_fakes()
