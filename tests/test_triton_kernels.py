"""Triton kernels against the reference: on a GPU if there is one, else under TRITON_INTERPRET=1."""

import pytest
import torch

from quantkern import ops, reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Hidden sizes of SmolLM2 (576, 1536), Qwen (896, 4864), Llama-3 (4096, 14336), and awkward ones.
TOKEN_SHAPES = [(1, 576), (3, 1536), (5, 896), (2, 4864), (4, 4096), (2, 14336), (7, 2), (3, 130), (0, 64)]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tokens,features", TOKEN_SHAPES)
def test_quantize_per_token_is_bit_exact(bits, dtype, tokens, features):
    x = (torch.randn(tokens, features, device=DEVICE) * 5).to(dtype)
    if tokens > 1:
        x[1] = 0  # an all-zero row takes the scale-1 path
    clip = 0.9 if features % 3 else 1.0
    q, scales = ops.quantize_per_token(x, bits, clip, backend="triton")
    q_ref, s_ref = reference.quantize_per_token(x, bits, clip)
    assert q.dtype == q_ref.dtype and q.shape == q_ref.shape
    assert torch.equal(scales, s_ref)
    assert torch.equal(q, q_ref)


# (rows = tokens x heads, head_dim): SmolLM2 / Llama heads of 64 and 128, Qwen's 128, odd-sized ones.
KV_SHAPES = [(1, 64), (3, 128), (37, 64), (5, 96), (2, 256), (16, 2), (0, 64)]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows,head_dim", KV_SHAPES)
def test_quantize_kv_is_bit_exact(bits, dtype, rows, head_dim):
    x = (torch.randn(rows, head_dim, device=DEVICE) * 3 + 0.5).to(dtype)
    if rows > 2:
        x[2] = 1.25  # a constant row takes the scale-1 path
    codes, scale, offset = ops.quantize_kv(x, bits, backend="triton")
    ref = reference.quantize_kv(x, bits)
    for got, want in zip((codes, scale, offset), ref):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got, want)


def test_quantize_kv_keeps_the_leading_shape():
    x = torch.randn(2, 3, 5, 64, device=DEVICE, dtype=torch.float16)  # [batch, heads, tokens, head_dim]
    codes, scale, offset = ops.quantize_kv(x, 4, backend="triton")
    assert codes.shape == (2, 3, 5, 32) and scale.shape == offset.shape == (2, 3, 5)
    assert all(torch.equal(a, b) for a, b in zip((codes, scale, offset), reference.quantize_kv(x, 4)))


def test_quantize_per_token_ties_round_to_even():
    # x / scale lands exactly on .5 for these values: 127 * (k + 0.5) / 127 with scale 1.
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.0]], device=DEVICE)
    q, _ = ops.quantize_per_token(x, 8, backend="triton")
    assert q.tolist() == [[127, 0, 2, 2, 0, -2, -2, 3]]
