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


# ----------------------------------------------------------------------------------------------
# NaN and +-inf: the Triton quantizers propagate them as the reference (and the CUDA kernels) do: a row
# holding NaN gets a NaN scale (quantize_kv: NaN scale and offset) and code 0; a row holding inf an inf scale.
# ----------------------------------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")


def rows_with_special_values(features, dtype, seed=0):
    """Five rows of small integers (so that any fp32 summation order rotates them exactly): NaN last (the last
    chunk of a multi-chunk row), +inf, a normal row, -inf first, then NaN first with +inf last."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-8, 9, (5, features), generator=g).float()
    x[0, -1] = NAN
    x[1, 1] = INF
    x[3, 0] = -INF
    x[4, 0], x[4, -1] = NAN, INF
    return x.to(DEVICE, dtype)


def assert_same_as_reference(got, want):
    """Bit-exact, NaN where the reference has NaN (the codes are integers: plain equality)."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True)


def assert_nan_and_inf_scales(scales):
    assert scales[0].isnan() and scales[4].isnan(), scales
    assert scales[1].isinf() and scales[3].isinf(), scales
    assert scales[2].isfinite(), scales


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, interpreter
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("features", [130, 4864])  # one chunk; three chunks of 2048 (int8) / two of pairs (int4)
def test_quantize_per_token_propagates_nan_and_inf(bits, dtype, features):
    x = rows_with_special_values(features, dtype)
    q, scales = ops.quantize_per_token(x, bits, 0.9, backend="triton")
    q_ref, s_ref = reference.quantize_per_token(x, bits, 0.9)
    assert_same_as_reference((q, scales), (q_ref, s_ref))
    assert_nan_and_inf_scales(scales)
    assert not q[[0, 1, 3, 4]].any()  # NaN / inf scales: every code 0 (NaN -> 0, finite / inf -> 0)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, interpreter
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("head_dim", [64, 96])  # 96: masked lanes in the row's tile
def test_quantize_kv_propagates_nan_and_inf(bits, dtype, head_dim):
    x = rows_with_special_values(head_dim, dtype)
    codes, scale, offset = ops.quantize_kv(x, bits, backend="triton")
    assert_same_as_reference((codes, scale, offset), reference.quantize_kv(x, bits))
    assert_nan_and_inf_scales(scale)
    assert offset[0].isnan() and offset[4].isnan() and offset[3] == -INF
    assert offset[1].isfinite() and offset[2].isfinite()
    assert not codes[[0, 1, 3, 4]].any()


# (features, block_size, chunked): the full-tile kernel (64; 40 = 40 x 1: padded rows and columns; int4 takes the
# two-pass fallback), the chunked kernel forced (576 = 36 x 16: padded rows, 0 * inf = NaN there, which must stay
# out of the absmax), blocked mode (two passes).
HADAMARD_CASES = [(64, 0, False), (40, 0, False), (576, 0, True), (128, 32, False)]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, interpreter
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("features,block_size,chunked", HADAMARD_CASES)
def test_hadamard_quantize_propagates_nan_and_inf(bits, dtype, features, block_size, chunked, monkeypatch):
    import importlib

    from quantkern.rotation import block_hadamard_transform

    if chunked:
        monkeypatch.setattr(importlib.import_module("quantkern.triton_kernels.hadamard"), "FORCE_CHUNKED", True)
    x = rows_with_special_values(features, dtype)
    got = ops.hadamard_quantize(x, bits, 0.9, backend="triton", block_size=block_size or None)
    rotated = block_hadamard_transform(x, block_size) if block_size else reference.hadamard(x)
    assert_same_as_reference(got, reference.quantize_per_token(rotated, bits, 0.9))
    # NaN spreads over the (block of the) row: NaN scale; one inf: +-inf outputs, an inf scale.
    assert_nan_and_inf_scales(got[1])
    assert not got[0][[0, 1, 3, 4]].any()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, interpreter
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("features,b,exact", [(96, 48, True), (64, 16, False)])
def test_block_rotate_quantize_propagates_nan_and_inf(bits, dtype, features, b, exact):
    """b = 48: +-1/8 entries, one per block (exact in every dtype: the normal row is rotated exactly too), the
    last chunk of 64 outputs padded (0 * inf there must stay out of the absmax). b = 16: a random orthogonal
    matrix shared by the blocks (fp32 sums in another order: the normal row is zero)."""
    g = torch.Generator().manual_seed(1)
    if exact:
        rotation = (torch.randint(0, 2, (features // b, b, b), generator=g).float() * 2 - 1) / 8
    else:
        rotation = torch.linalg.qr(torch.randn(b, b, generator=g, dtype=torch.float64))[0].float()
    x = rows_with_special_values(features, dtype)
    if not exact:
        x[2] = 0
    got = ops.block_rotate_quantize(x, rotation.to(DEVICE), bits, 0.9, backend="triton")
    expected = reference.quantize_per_token(reference.block_rotate(x, rotation.to(DEVICE)), bits, 0.9)
    if dtype == torch.float32:
        assert_same_as_reference(got, expected)
        assert_nan_and_inf_scales(got[1])
    else:
        # Documented (triton_kernels/block_rotation.py): the split dots' x * R_lo turns a row's +-inf outputs into
        # NaN, so the +-inf rows' scales are NaN or inf (the reference: inf); everything else is the reference's.
        assert_same_as_reference((got[0], got[1][[0, 2, 4]]), (expected[0], expected[1][[0, 2, 4]]))
        assert got[1][[0, 4]].isnan().all() and not got[1][[1, 3]].isfinite().any()
    assert not got[0][[0, 1, 3, 4]].any()


# ----------------------------------------------------------------------------------------------
# The Triton entry points called directly (quantkern.triton_kernels, the KERNELS table, torch.ops.quantkern_triton)
# with strided inputs: quantkern.ops copies its inputs to contiguous rows first, these must too (their kernels
# index rows as row * K + column); they gave wrong values, silently, before.
# ----------------------------------------------------------------------------------------------

def _strided_inputs(rows, features, dtype):
    """x [rows, features] three ways: every other column of a wider tensor, a transpose, a column slice."""
    g = torch.Generator().manual_seed(3)
    wide = (torch.randn(rows, 2 * features, generator=g) * 3).to(DEVICE, dtype)
    tall = (torch.randn(features, rows, generator=g) * 3).to(DEVICE, dtype)
    return {"every other column": wide[:, ::2], "transposed": tall.t(), "column slice": wide[:, 3:features + 3]}


@pytest.mark.parametrize("layout", ["every other column", "transposed", "column slice"])
def test_direct_triton_calls_take_strided_inputs(layout):
    from quantkern import triton_kernels as tk

    x = _strided_inputs(5, 64, torch.float16)[layout]
    assert not x.is_contiguous() or layout == "column slice"
    for bits in (8, 4):
        assert_same_as_reference(tk.quantize_per_token(x, bits, 0.9), reference.quantize_per_token(x, bits, 0.9))
        assert_same_as_reference(tk.quantize_kv(x, bits), reference.quantize_kv(x, bits))
        rotated = reference.hadamard(x)
        assert_same_as_reference(tk.hadamard_quantize(x, bits, 0.9), reference.quantize_per_token(rotated, bits, 0.9))
    torch.testing.assert_close(tk.hadamard(x), reference.hadamard(x), rtol=2 ** -10, atol=1e-3)
    # Both operands strided: the permutation too, every other entry of a [64, 2] tensor.
    permutation = torch.randperm(64, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    strided_permutation = torch.stack((permutation, permutation), dim=-1)[:, 0]
    assert not strided_permutation.is_contiguous()
    assert torch.equal(tk.permute_columns(x, strided_permutation), reference.permute_columns(x, permutation))
    rotation = hadamard_rotation_of(16).to(DEVICE)  # +-1/4: exact in fp16, any summation order
    torch.testing.assert_close(tk.block_rotate(x, rotation), reference.block_rotate(x, rotation), rtol=0, atol=0)
    for bits in (8, 4):
        assert_same_as_reference(tk.block_rotate_quantize(x, rotation, bits, 0.9),
                                 reference.quantize_per_token(reference.block_rotate(x, rotation), bits, 0.9))


def hadamard_rotation_of(b):
    from quantkern.rotation import hadamard_matrix

    return (hadamard_matrix(b, dtype=torch.float32) / b ** 0.5).contiguous()


def test_direct_triton_calls_refuse_what_their_kernels_cannot_run():
    """The checks of quantkern.ops, repeated by the Triton entry points where their kernels would otherwise fail
    with an unrelated error or leave outputs unwritten."""
    from quantkern import triton_kernels as tk

    x = torch.randn(2, 100, device=DEVICE, dtype=torch.float16)
    for bits in (8, 4):  # (int4 went through the fallback test first: "cannot unpack non-iterable NoneType object")
        with pytest.raises(ValueError, match="n = 100"):
            tk.hadamard_quantize(x, bits)
    # int4 with an odd number of features: the last column was dropped from the codes.
    odd = torch.randn(3, 9, device=DEVICE, dtype=torch.float16)
    with pytest.raises(ValueError, match="even number of features"):
        tk.quantize_per_token(odd, 4)
    with pytest.raises(ValueError, match="even head_dim"):
        tk.quantize_kv(odd, 4)
    # A last dimension that is not a multiple of the block: its tail was never written (torch.empty's values).
    rotation = hadamard_rotation_of(16).to(DEVICE)
    with pytest.raises(ValueError, match="multiple of the rotation's block size"):
        tk.block_rotate(x, rotation)
    with pytest.raises(ValueError, match="multiple of the rotation's block size"):
        tk.block_rotate_quantize(x, rotation, 8)
    with pytest.raises(ValueError, match="blocks"):
        tk.block_rotate(x[:, :96], rotation.expand(4, 16, 16).contiguous())
