"""The reference ops against first principles: error bounds, exact integer arithmetic, definitions."""

import math

import pytest
import torch

from quantkern import reference
from quantkern.format import unpack_int4_signed

# Real models' in/out features: SmolLM2 (576, 1536), Qwen2.5/3 (896, 4864, 1024, 3072), Llama-3 (4096, 14336).
REAL_SHAPES = [(576, 1536), (1536, 576), (896, 4864), (4864, 896), (1024, 3072), (4096, 128), (128, 14336)]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_round_trip_error_is_within_half_a_step(bits, group_size, symmetric):
    n, k = 48, 384
    # Seeded: an unlucky row of magnitude ~1e-4 puts its fp16 scale in the subnormal range, whose
    # coarse spacing the bounds below do not cover (about one draw in 500 did, unseeded).
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=gen) * torch.rand(n, 1, generator=gen) * 2
    qw = reference.quantize_weight(w, bits, group_size, symmetric, torch.float16)
    deq = reference.dequantize_weight(qw)
    step = qw.scales.float().repeat_interleave(qw.group_length, dim=1)
    err = (w - deq).abs()
    slack = step * 2e-3 + 1e-6  # the fp16 rounding of the scale, felt at the ends of the range
    if symmetric:
        assert (err <= step * 0.5 + slack).all()
    else:
        # The integer zero point shifts the grid by up to half a step, so the range's ends may miss
        # by up to one step; everything else is rounded to nearest.
        assert (err <= step + slack).all()
        assert (err <= step * 0.5 + slack).float().mean() > 0.95
    codes = qw.codes()
    assert int(codes.max()) <= (1 << bits) - 1


def test_symmetric_codes_are_centred_and_use_the_range():
    w = torch.tensor([[-7.0, -3.5, 0.0, 7.0]])
    qw = reference.quantize_weight(w, bits=4, group_size=-1, symmetric=True)
    assert qw.scales.item() == 1.0
    assert reference.dequantize_weight(qw).tolist() == [[-7.0, -4.0, 0.0, 7.0]]  # -3.5 rounds half to even
    assert qw.codes().tolist() == [[1, 4, 8, 15]]


def test_asymmetric_range_includes_zero_exactly():
    w = torch.rand(16, 64) + 1.0  # all positive: the grid still represents 0 exactly
    qw = reference.quantize_weight(w, 4, 32, symmetric=False)
    assert qw.zeros is not None and int(qw.zeros.max()) == 0
    zero_w = torch.zeros(1, 64)
    deq = reference.dequantize_weight(reference.quantize_weight(zero_w, 4, 32, symmetric=False))
    assert torch.equal(deq, zero_w)


def test_quantize_weight_rejects_bad_input():
    with pytest.raises(ValueError, match="does not divide"):
        reference.quantize_weight(torch.randn(4, 576), group_size=128)
    with pytest.raises(ValueError, match="2-D"):
        reference.quantize_weight(torch.randn(4, 4, 64), group_size=32)
    with pytest.raises(TypeError, match="dtype"):
        reference.quantize_weight(torch.randint(0, 3, (4, 64)), group_size=32)
    with pytest.raises(TypeError, match="scale_dtype"):
        reference.quantize_weight(torch.randn(4, 64), group_size=32, scale_dtype=torch.float32)


@pytest.mark.parametrize("k,n", REAL_SHAPES)
def test_weight_only_linear_equals_fp64_matmul_of_dequantized_weight(k, n):
    w = torch.randn(n, k) / math.sqrt(k)
    qw = reference.quantize_weight(w, 4, 64 if k % 128 else 128)
    x = torch.randn(3, 5, k)
    bias = torch.randn(n)
    y = reference.weight_only_linear(x, qw, bias)
    expected = x.double() @ reference.dequantize_weight(qw, torch.float64).T + bias.double()
    assert y.shape == (3, 5, n)
    assert torch.allclose(y.double(), expected, rtol=1e-5, atol=1e-5)


def test_weight_only_linear_rejects_bad_shapes():
    qw = reference.quantize_weight(torch.randn(8, 64), 4, 32)
    with pytest.raises(ValueError, match="last dimension 64"):
        reference.weight_only_linear(torch.randn(2, 63), qw)
    with pytest.raises(ValueError, match="bias must have shape"):
        reference.weight_only_linear(torch.randn(2, 64), qw, torch.randn(7))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_quantize_per_token_definition(bits, dtype):
    x = (torch.randn(9, 576) * 4).to(dtype)
    q, scale = reference.quantize_per_token(x, bits)
    qmax = 2 ** (bits - 1) - 1
    values = unpack_int4_signed(q) if bits == 4 else q
    assert values.dtype == torch.int8 and values.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == (9,)
    assert torch.equal(scale, x.float().abs().amax(-1) / qmax)
    assert int(values.abs().max()) == qmax  # the largest element of each row maps to +-qmax
    err = (values.double() * scale.double()[:, None] - x.double()).abs()
    # Half a step, plus the fp32 rounding of x / scale (|x / scale| <= 127: under 1e-5 of a step).
    assert (err <= scale.double()[:, None] * (0.5 + 1e-5)).all()


def test_quantize_per_token_clip_ratio_saturates():
    x = torch.tensor([[10.0, 5.0, -2.0, 0.5]])
    q, scale = reference.quantize_per_token(x, 8, clip_ratio=0.5)
    assert scale.item() == pytest.approx(5.0 / 127)
    assert q.tolist()[0][:2] == [127, 127]


def test_quantize_per_token_zero_rows_and_errors():
    q, scale = reference.quantize_per_token(torch.zeros(2, 8), 4)
    assert scale.tolist() == [1.0, 1.0] and q.eq(0).all()
    with pytest.raises(ValueError, match="even"):
        reference.quantize_per_token(torch.randn(2, 7), 4)
    with pytest.raises(ValueError, match="clip_ratio"):
        reference.quantize_per_token(torch.randn(2, 8), 8, clip_ratio=0.0)
    with pytest.raises(ValueError, match="bits"):
        reference.quantize_per_token(torch.randn(2, 8), 3)
    with pytest.raises(TypeError, match="dtype"):
        reference.quantize_per_token(torch.randn(2, 8).to(torch.float64), 8)


def test_int_matmul_is_exact_against_python_integers():
    a = torch.randint(-128, 128, (5, 300), dtype=torch.int8)
    b = torch.randint(-128, 128, (4, 300), dtype=torch.int8)
    c = reference.int_matmul(a, b)
    expected = [[sum(int(x) * int(y) for x, y in zip(ra, rb)) for rb in b.tolist()] for ra in a.tolist()]
    assert c.dtype == torch.int32 and c.tolist() == expected


def test_int_matmul_extreme_values_at_llama_width():
    k = 14336
    a = torch.full((2, k), -128, dtype=torch.int8)
    b = torch.full((3, k), -128, dtype=torch.int8)
    assert reference.int_matmul(a, b).eq(128 * 128 * k).all()


@pytest.mark.parametrize("act_bits,group_size", [(8, -1), (4, -1), (4, 128), (4, 32)])
def test_integer_linear_equals_its_definition(act_bits, group_size):
    k, n = 512, 96
    w = torch.randn(n, k) / math.sqrt(k)
    qw = reference.quantize_weight(w, act_bits, group_size, symmetric=True)
    x = torch.randn(7, k, dtype=torch.bfloat16)
    bias = torch.randn(n)
    op = reference.w8a8_linear if act_bits == 8 else reference.w4a4_linear
    y = op(x, qw, bias)
    # Definition in float64: dequantized activations times dequantized weights.
    q, sx = reference.quantize_per_token(x, act_bits)
    xd = reference.dequantize_per_token(q, sx, act_bits, torch.float64)
    expected = xd @ reference.dequantize_weight(qw, torch.float64).T + bias.double()
    assert y.dtype == torch.bfloat16
    assert torch.allclose(y.double(), expected, rtol=1e-2, atol=1e-2)


def test_integer_linear_needs_symmetric_weights_of_its_width():
    asym = reference.quantize_weight(torch.randn(8, 64), 4, 32, symmetric=False)
    with pytest.raises(ValueError, match="symmetric"):
        reference.w4a4_linear(torch.randn(2, 64), asym)
    w4 = reference.quantize_weight(torch.randn(8, 64), 4, 32)
    with pytest.raises(ValueError, match="8-bit"):
        reference.w8a8_linear(torch.randn(2, 64), w4)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_kv_round_trip_within_half_a_step(bits, dtype):
    x = (torch.randn(2, 4, 17, 64) * 3).to(dtype)  # [batch, heads, tokens, head_dim]
    codes, scale, offset = reference.quantize_kv(x, bits)
    assert codes.shape == (2, 4, 17, 64 // 2 if bits == 4 else 64)
    assert scale.shape == offset.shape == (2, 4, 17) and scale.dtype == dtype
    back = reference.dequantize_kv(codes, scale, offset, bits, torch.float32)
    step = scale.float()[..., None]
    # Half a step, plus the rounding of scale/offset to the storage dtype.
    slack = 2 ** -8 if dtype != torch.float32 else 1e-5
    assert ((back - x.float()).abs() <= step * (0.5 + slack * 16) + x.float().abs().amax() * slack).all()


def test_hadamard_reference_is_orthonormal_on_real_sizes():
    for n in (576, 1536, 4096, 14336):
        x = torch.randn(3, n)
        y = reference.hadamard(x)
        assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-4)
    # Any permutation keeps norms: compare with the dense definition x @ H.T / sqrt(n), in fp64 (measured
    # max difference 5e-15), for the 36 x 16 and 12 x 128 constructions (dense 4096+ matrices are slow).
    from quantkern.rotation import hadamard_matrix

    for n in (576, 1536):
        x = torch.randn(3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
        torch.testing.assert_close(reference.hadamard(x), x @ hadamard_matrix(n).T / math.sqrt(n), rtol=0, atol=1e-12)
    with pytest.raises(ValueError):
        reference.hadamard(torch.randn(2, 4864))  # 19 x 256: no Hadamard matrix of that order here
