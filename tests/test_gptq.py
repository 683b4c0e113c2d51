"""GPTQ (quantkern.quantizers.gptq) against RTN, against a naive optimal-brain-surgeon loop, and the format."""

import warnings

import pytest
import torch

from quantkern import reference
from quantkern.quantizers.gptq import HessianAccumulator, _gptq, gptq_quantize

N_OUT = 32  # few output rows keep the tests fast; the column loop is what costs


def correlated_inputs(k: int, n_tokens: int, seed: int, mixing_seed: int = 1) -> torch.Tensor:
    """Tokens ``Z @ A`` (correlated features, one fixed ``A`` per ``mixing_seed``) with 4 outlier channels."""
    a = torch.randn(k, k, generator=torch.Generator().manual_seed(mixing_seed)) / k ** 0.5
    x = torch.randn(n_tokens, k, generator=torch.Generator().manual_seed(seed)) @ a
    x[:, :4] *= 8.0
    return x


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    acc = HessianAccumulator(x.shape[-1])
    acc.add_batch(x)
    return acc.H


def output_error(x: torch.Tensor, w: torch.Tensor, qw) -> float:
    return float(((x @ w.T - x @ reference.dequantize_weight(qw).T) ** 2).sum())


@pytest.fixture(scope="module")
def calibration_576():
    x_calib = correlated_inputs(576, 2048, seed=2)
    x_test = correlated_inputs(576, 2048, seed=3)  # held out, same distribution
    w = torch.randn(N_OUT, 576, generator=torch.Generator().manual_seed(4)) * 0.05
    return w, hessian_of(x_calib), x_calib, x_test


@pytest.mark.parametrize("group_size", [32, 64, -1])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_correlated_inputs(calibration_576, group_size, symmetric, act_order):
    w, h, x_calib, x_test = calibration_576
    qw = gptq_quantize(w, h, bits=4, group_size=group_size, symmetric=symmetric, act_order=act_order)
    rtn = reference.quantize_weight(w, 4, group_size, symmetric)
    # Measured about 0.31-0.39x on the calibration set and 0.40-0.49x held out.
    assert output_error(x_calib, w, qw) < 0.6 * output_error(x_calib, w, rtn)
    assert output_error(x_test, w, qw) < 0.8 * output_error(x_test, w, rtn)


@pytest.fixture(scope="module")
def calibration_1536():
    """SmolLM2's MLP width (the down_proj input), with 32 output rows."""
    x = correlated_inputs(1536, 2048, seed=5)
    w = torch.randn(N_OUT, 1536, generator=torch.Generator().manual_seed(6)) * 0.05
    return w, hessian_of(x), x


@pytest.mark.parametrize("group_size", [64, -1])
def test_gptq_beats_rtn_at_a_real_hidden_size(calibration_1536, group_size):
    w, h, x = calibration_1536
    qw = gptq_quantize(w, h, bits=4, group_size=group_size, symmetric=True)
    assert output_error(x, w, qw) < 0.6 * output_error(x, w, reference.quantize_weight(w, 4, group_size))


def test_gptq_8bit_beats_rtn(calibration_576):
    w, h, x_calib, _ = calibration_576
    qw = gptq_quantize(w, h, bits=8, group_size=64, symmetric=False, act_order=True)
    assert output_error(x_calib, w, qw) < 0.6 * output_error(x_calib, w, reference.quantize_weight(w, 8, 64, False))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, -1])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("static_groups", [False, True])
def test_checkpoint_dequantizes_to_the_weights_gptq_used(bits, group_size, symmetric, act_order, static_groups):
    x = correlated_inputs(128, 512, seed=7)
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(8))
    qw, used = _gptq(w, hessian_of(x), bits, group_size, symmetric, act_order, static_groups, block_size=48)
    assert torch.equal(reference.dequantize_weight(qw), used)  # bit-exact, not approximately


def naive_gptq(w, h, bits, group_size, symmetric, damp=0.01, order=None, static_params=None):
    """Optimal brain surgeon, one column at a time, in fp64: quantize column i, spread its error over the
    remaining columns through H^-1, then remove i from H^-1 by a rank-1 downdate (no Cholesky, no blocks).
    ``static_params`` (scales, zero codes) fixes the grid; otherwise a group's grid is set from the
    current weights when its first column comes up."""
    k = w.shape[1]
    glen = k if group_size == -1 else group_size
    w = w.double().clone()
    h = h.double().clone()
    h += damp * torch.diagonal(h).mean() * torch.eye(k, dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    levels = (1 << bits) - 1
    order = list(range(k)) if order is None else order
    remaining = torch.ones(k, dtype=torch.bool)
    out = torch.zeros_like(w)
    grid = {}
    for i in order:
        g = i // glen
        if static_params is not None:
            scale, zero = static_params[0][:, g].double(), static_params[1][:, g].double()
        else:
            if i % glen == 0:
                s, z = reference.weight_quant_params(w[:, i:i + glen].float(), bits, -1, symmetric)
                grid[g] = (s[:, 0].double(), (z[:, 0] if z is not None else torch.full_like(s[:, 0], 1 << (bits - 1))).double())
            scale, zero = grid[g]
        q = (torch.clamp(torch.round(w[:, i] / scale) + zero, 0, levels) - zero) * scale
        out[:, i] = q
        err = (w[:, i] - q) / hinv[i, i]
        remaining[i] = False
        w[:, remaining] -= err[:, None] * hinv[i, remaining][None, :]
        hinv -= hinv[:, i:i + 1] @ hinv[i:i + 1, :] / hinv[i, i]
    return out


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("act_order,static_groups", [(False, False), (False, True), (True, True)])
@pytest.mark.parametrize("block_size", [16, 48, 64, 1000])  # below, across, at and above the group length
def test_gptq_matches_naive_optimal_brain_surgeon(symmetric, act_order, static_groups, block_size):
    """Cholesky + lazy blocks compute the same thing as the plain OBS loop, for any block size."""
    k, group_size = 192, 32
    x = correlated_inputs(k, 1024, seed=9)
    h = hessian_of(x)
    w = torch.randn(N_OUT, k, generator=torch.Generator().manual_seed(10)) * 0.05
    qw, used = _gptq(w, h, 4, group_size, symmetric, act_order, static_groups, block_size=block_size)
    order = torch.argsort(torch.diagonal(h), descending=True, stable=True).tolist() if act_order else None
    params = None
    if static_groups:
        params = (qw.scales, qw.zero_codes())
        assert torch.equal(qw.scales, reference.weight_quant_params(w, 4, group_size, symmetric)[0])
    expected = naive_gptq(w, h, 4, group_size, symmetric, order=order, static_params=params)
    # fp32 vs fp64 may flip the rounding of a value sitting on a grid midpoint; nearly all must agree.
    same = torch.isclose(used.double(), expected, rtol=0, atol=1e-6)
    assert same.float().mean() > 0.99
    step = qw.scales.float().repeat_interleave(group_size, dim=1)
    assert ((used.double() - expected).abs() <= 1.01 * step + 1e-6).all()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, -1])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("static_groups", [False, True])
def test_identity_hessian_gives_exactly_rtn(bits, group_size, symmetric, static_groups):
    """Uncorrelated inputs: no error feedback at all, so GPTQ must be RTN bit for bit."""
    k = 576
    w = torch.randn(24, k, generator=torch.Generator().manual_seed(11))
    qw = gptq_quantize(w, torch.eye(k), bits, group_size, symmetric, static_groups=static_groups)
    rtn = reference.quantize_weight(w, bits, group_size, symmetric)
    assert torch.equal(qw.qweight, rtn.qweight)
    assert torch.equal(qw.scales, rtn.scales)
    assert (qw.zeros is None and rtn.zeros is None) or torch.equal(qw.zeros, rtn.zeros)


@pytest.mark.parametrize("group_size", [64, -1])
def test_diagonal_hessian_with_act_order_gives_exactly_rtn(group_size):
    """A diagonal H with distinct entries permutes the columns but feeds back no error: a sharp check
    that act_order's permutation, its static groups and the un-permutation line up."""
    k = 576
    h = torch.diag(torch.rand(k, generator=torch.Generator().manual_seed(12)) + 0.1)
    w = torch.randn(N_OUT, k, generator=torch.Generator().manual_seed(13))
    qw = gptq_quantize(w, h, 4, group_size, symmetric=False, act_order=True)
    rtn = reference.quantize_weight(w, 4, group_size, symmetric=False)
    assert torch.equal(qw.qweight, rtn.qweight)
    assert torch.equal(qw.scales, rtn.scales)
    assert torch.equal(qw.zeros, rtn.zeros)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("weight_dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16])
def test_output_is_canonical(bits, symmetric, weight_dtype, scale_dtype):
    k, n = 128, 8
    x = correlated_inputs(k, 256, seed=14)
    w = (torch.randn(n, k, generator=torch.Generator().manual_seed(15)) * 0.05).to(weight_dtype)
    qw = gptq_quantize(w, hessian_of(x), bits, 32, symmetric, scale_dtype=scale_dtype)
    assert (qw.bits, qw.group_size, qw.in_features, qw.out_features) == (bits, 32, k, n)
    assert qw.qweight.dtype == torch.uint8
    assert tuple(qw.qweight.shape) == ((n, k // 2) if bits == 4 else (n, k))
    assert qw.scales.dtype == scale_dtype and tuple(qw.scales.shape) == (n, k // 32)
    assert (qw.zeros is None) == symmetric
    if not symmetric:
        assert qw.zeros.dtype == torch.uint8 and tuple(qw.zeros.shape) == (n, k // 32)
    assert int(qw.codes().max()) <= (1 << bits) - 1
    # Round trip through the checkpoint tensors.
    back = type(qw).from_tensors(qw.tensors("layer"), "layer", bits, 32, k, n)
    assert torch.equal(reference.dequantize_weight(back), reference.dequantize_weight(qw))


def test_defaults_are_4bit_group_128_symmetric(calibration_1536):
    w, h, x = calibration_1536
    qw = gptq_quantize(w, h)
    assert (qw.bits, qw.group_size, qw.zeros) == (4, 128, None)
    assert tuple(qw.scales.shape) == (N_OUT, 12)
    assert output_error(x, w, qw) < 0.6 * output_error(x, w, reference.quantize_weight(w, 4, 128))


@pytest.mark.parametrize("act_order", [False, True])
def test_dead_inputs_get_zero_weights(act_order):
    k = 128
    x = correlated_inputs(k, 512, seed=18)
    dead = [5, 6, 77, 127]
    x[:, dead] = 0
    w = torch.randn(N_OUT, k, generator=torch.Generator().manual_seed(19))
    h = hessian_of(x)
    assert (torch.diagonal(h)[dead] == 0).all()
    qw, used = _gptq(w, h, 4, 32, False, act_order)
    deq = reference.dequantize_weight(qw)
    assert torch.isfinite(deq).all()
    assert (deq[:, dead] == 0).all()
    assert torch.equal(deq, used)
    # The live columns still benefit from GPTQ.
    assert output_error(x, w, qw) < 0.6 * output_error(x, w, reference.quantize_weight(w, 4, 32, False))


@pytest.mark.parametrize("act_order", [False, True])
def test_dead_inputs_keep_the_result_independent_of_the_hessians_scale(act_order):
    """H and c * H must give the same GPTQ: dead channels used to get H[i, i] = 1, which dominated the
    dampening of a small-scale H (small activations) and silently degraded GPTQ towards RTN."""
    k = 128
    x = correlated_inputs(k, 512, seed=18)
    x[:, [5, 6, 77, 127]] = 0
    w = torch.randn(N_OUT, k, generator=torch.Generator().manual_seed(19))
    h = hessian_of(x)
    _, used = _gptq(w, h, 4, 32, True, act_order)
    for c in (1e-6, 1e4):
        _, scaled = _gptq(w, h * c, 4, 32, True, act_order)
        assert torch.equal(scaled, used), c


def test_all_zero_weight_and_rank_deficient_hessian():
    k = 64
    x = correlated_inputs(k, 16, seed=20)  # 16 tokens: H has rank 16 of 64, only dampening makes it invertible
    qw = gptq_quantize(torch.zeros(4, k), hessian_of(x), 4, 32, symmetric=False)
    assert (reference.dequantize_weight(qw) == 0).all()
    w = torch.randn(4, k)
    assert torch.isfinite(reference.dequantize_weight(gptq_quantize(w, hessian_of(x), 4, 32))).all()


def test_cholesky_failure_retries_with_more_dampening_then_raises():
    k = 64
    v = torch.ones(k, 1) / k ** 0.5
    w = torch.randn(4, k)
    # Eigenvalue -0.5 along v, positive diagonal: fails at damp 0.01 and 0.1, succeeds at 1.0.
    h = torch.eye(k) - 1.5 * (v @ v.T)
    with pytest.warns(RuntimeWarning, match="damp=1"):
        qw = gptq_quantize(w, h, 4, 32)
    assert torch.isfinite(reference.dequantize_weight(qw)).all()
    # Eigenvalue about -62 with a diagonal of 0.03: no dampening in reach repairs that.
    h = torch.eye(k) - 0.97 * k * (v @ v.T)
    with pytest.raises(ValueError, match="Cholesky factorisation of the Hessian failed"):
        gptq_quantize(w, h, 4, 32)
    # A healthy Hessian warns about nothing.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gptq_quantize(w, torch.eye(k), 4, 32)


def test_bad_inputs_raise_clear_errors():
    w, h = torch.randn(8, 64), torch.eye(64)
    with pytest.raises(ValueError, match=r"hessian must have shape \(64, 64\)"):
        gptq_quantize(w, torch.eye(32))
    with pytest.raises(ValueError, match=r"hessian must have shape"):
        gptq_quantize(w, torch.ones(64, 32))
    with pytest.raises(ValueError, match="2-D"):
        gptq_quantize(torch.randn(2, 8, 64), h)
    with pytest.raises(ValueError, match="does not divide"):
        gptq_quantize(torch.randn(8, 576), torch.eye(576), group_size=128)
    with pytest.raises(ValueError, match="group_size must be one of"):
        gptq_quantize(w, h, group_size=48)
    with pytest.raises(ValueError, match="bits must be one of"):
        gptq_quantize(w, h, bits=3)
    with pytest.raises(ValueError, match="even in_features"):
        gptq_quantize(torch.randn(8, 63), torch.eye(63), group_size=-1)
    bad = h.clone()
    bad[3, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        gptq_quantize(w, bad, group_size=32)
    bad[3, 5] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        gptq_quantize(w, bad, group_size=32)
    bad_w = w.clone()
    bad_w[0, 0] = float("nan")
    with pytest.raises(ValueError, match="weight contains NaN"):
        gptq_quantize(bad_w, h, group_size=32)
    with pytest.raises(ValueError, match="damp"):
        gptq_quantize(w, h, group_size=32, damp=0)
    with pytest.raises(ValueError, match="block_size"):
        gptq_quantize(w, h, group_size=32, block_size=0)
    with pytest.raises(TypeError, match="scale_dtype"):
        gptq_quantize(w, h, group_size=32, scale_dtype=torch.float32)
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        gptq_quantize(w.numpy(), h, group_size=32)
    with pytest.raises(TypeError, match="floating-point"):
        gptq_quantize(torch.ones(8, 64, dtype=torch.int32), h, group_size=32)


def test_hessian_accumulator_matches_definition():
    k = 48
    batches = [torch.randn(3, 5, k), torch.randn(7, k).half(), torch.randn(2, 2, 2, k).bfloat16()]
    acc = HessianAccumulator(k)
    for b in batches:
        acc.add_batch(b)
    x = torch.cat([b.reshape(-1, k).double() for b in batches])
    assert acc.n_samples == x.shape[0] == 30
    assert acc.H.dtype == torch.float32
    torch.testing.assert_close(acc.H.double(), 2.0 / x.shape[0] * x.T @ x, rtol=1e-5, atol=1e-5)
    acc64 = HessianAccumulator(k, dtype=torch.float64)
    for b in batches:
        acc64.add_batch(b)
    torch.testing.assert_close(acc64.H.double(), 2.0 / x.shape[0] * x.T @ x, rtol=1e-6, atol=1e-6)


def test_hessian_accumulator_rejects_bad_input():
    acc = HessianAccumulator(16)
    with pytest.raises(RuntimeError, match="no samples"):
        acc.H
    with pytest.raises(ValueError, match="last dimension 16"):
        acc.add_batch(torch.randn(4, 15))
    with pytest.raises(TypeError, match="floating-point"):
        acc.add_batch(torch.ones(4, 16, dtype=torch.int64))
    with pytest.raises(ValueError, match="in_features"):
        HessianAccumulator(0)


@pytest.mark.parametrize("symmetric", [True, False])
def test_group_params_choose_each_groups_grid(symmetric):
    """A custom ``group_params`` (QuaRot's clip search) decides the scales GPTQ quantizes to; the
    default is the RTN rule."""
    torch.manual_seed(0)
    w = torch.randn(32, 128)
    x = correlated_inputs(128, 512, seed=1)
    h = hessian_of(x)
    default = gptq_quantize(w, h, 4, 64, symmetric)
    rtn_scales, _ = reference.weight_quant_params(w, 4, 64, symmetric, torch.float16)
    # The first group's grid comes from the unchanged weights (later ones see GPTQ's feedback).
    assert torch.equal(default.scales[:, 0], rtn_scales[:, 0])

    def halved(group, bits, sym, scale_dtype):
        from quantkern.quantizers.gptq import _group_params
        scale, zero = _group_params(group, bits, sym, scale_dtype)
        return (scale.float() * 0.5).to(scale_dtype), zero

    clipped = gptq_quantize(w, h, 4, -1, symmetric, group_params=halved)
    plain = gptq_quantize(w, h, 4, -1, symmetric)
    assert torch.equal(clipped.scales, (plain.scales.float() * 0.5).to(plain.scales.dtype))
