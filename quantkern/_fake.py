"""Fake (meta) implementations of the extension's ops, so torch.compile can trace them without running them.

Each function gives the output shapes and dtypes of one op; the Triton custom ops reuse them.
"""

import torch


def quantize_per_token_fake(x: torch.Tensor, bits: int, clip_ratio: float):
    tokens, features = x.shape
    if bits == 4:
        q = x.new_empty((tokens, features // 2), dtype=torch.uint8)
    else:
        q = x.new_empty((tokens, features), dtype=torch.int8)
    return q, x.new_empty((tokens,), dtype=torch.float32)


def w4a16_gemm_fake(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros, bias,
                    locks: torch.Tensor, group_size: int, split_k: int = 0, tile_m: int = 0):
    # y [M, N] in x's dtype; N = scales.size(1) (scales are [K / group, N] in the kernel's layout).
    return x.new_empty((x.shape[0], scales.shape[1]))


def register_extension_fakes() -> None:
    """Called once, right after quantkern._C is loaded (its ops must exist first)."""
    torch.library.register_fake("quantkern::quantize_per_token")(quantize_per_token_fake)
    torch.library.register_fake("quantkern::w4a16_gemm")(w4a16_gemm_fake)
