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


def register_extension_fakes() -> None:
    """Called once, right after quantkern._C is loaded (its ops must exist first)."""
    torch.library.register_fake("quantkern::quantize_per_token")(quantize_per_token_fake)

