"""The Triton W4A16 GEMM (triton_kernels/w4a16.py) against ``reference.weight_only_linear``.

On a GPU if there is one, else under TRITON_INTERPRET=1 (set by conftest.py). The interpreter is slow,
so on CPU the big Llama shapes run at M = 1 only and the (shape, group size) grid cycles through the
(M, dtype, symmetry, bias) combinations instead of taking their product; a GPU runs every combination
and more M values.
"""

import itertools

import pytest
import torch

from quantkern import reference
from quantkern.format import QuantizedWeight, pack_int4
from quantkern.triton_kernels.w4a16 import (CONFIGS, _as_triton_configs, _launch, _prune, _w4a16_gemm_op,
                                            prepare_w4a16, w4a16_linear)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"
TOL = 2e-3

SMOLLM2 = [(576, 1536), (1536, 576), (576, 576)]
QWEN = [(896, 4864), (4864, 896), (1024, 3072)]
LLAMA = [(4096, 14336), (14336, 4096), (4096, 4096)]
M_VALUES = [1, 5, 16, 33] + ([64, 128, 512, 2048] if ON_GPU else [])
GROUPS = [32, 64, 128, -1]
DTYPES = [torch.float16, torch.bfloat16]


def random_weight(k, n, group_size, symmetric, scale_dtype, seed=0):
    """A random canonical 4-bit weight: every code 0..15, random positive scales, random zero codes."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    groups = 1 if group_size == -1 else k // group_size
    scales = (torch.rand(n, groups, generator=gen) * 0.04 + 0.005).to(scale_dtype)
    zeros = None if symmetric else torch.randint(0, 16, (n, groups), generator=gen, dtype=torch.uint8)
    qw = QuantizedWeight(pack_int4(codes), scales, zeros, 4, group_size, k, n)
    return qw.to(DEVICE)


def rel_err(y, ref):
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


def check(k, n, m, group_size, symmetric, dtype, with_bias, seed=0):
    qw = random_weight(k, n, group_size, symmetric, dtype, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(m, k, generator=gen).to(dtype).to(DEVICE)
    bias = torch.randn(n, generator=gen).to(dtype).to(DEVICE) if with_bias else None
    y = w4a16_linear(x, prepare_w4a16(qw, dtype), bias)
    ref = reference.weight_only_linear(x, qw, bias)
    assert y.dtype == dtype and y.shape == (m, n) and y.device == x.device
    assert torch.isfinite(y).all()
    err = rel_err(y, ref)
    assert err <= TOL, (f"relative error {err:.3g} > {TOL} "
                        f"(K={k}, N={n}, M={m}, g={group_size}, sym={symmetric}, {dtype})")


def _grid(shapes, m_values):
    """(K, N, group) for every valid group size; the other parameters cycle on CPU, multiply on GPU."""
    combos = list(itertools.product(m_values, DTYPES, (True, False), (False, True)))
    cases, i = [], 0
    for k, n in shapes:
        for g in GROUPS:
            if g != -1 and k % g:
                continue
            chosen = combos if ON_GPU else [combos[(i * 5 + j * 11) % len(combos)] for j in range(3)]
            i += 1
            cases += [(k, n, g, *c) for c in chosen]
    return cases


def _id(case):
    k, n, g, m, dtype, sym, bias = case
    return f"K{k}-N{n}-g{g}-M{m}-{str(dtype)[6:]}-{'sym' if sym else 'asym'}{'-bias' if bias else ''}"


GRID = _grid(SMOLLM2 + QWEN, M_VALUES)


@pytest.mark.parametrize("case", GRID, ids=[_id(c) for c in GRID])
def test_real_shapes(case):
    k, n, g, m, dtype, sym, bias = case
    check(k, n, m, g, sym, dtype, bias)


@pytest.mark.parametrize("m", M_VALUES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("with_bias", [False, True])
def test_every_combination_on_a_small_layer(m, dtype, symmetric, with_bias):
    check(576, 576, m, 64, symmetric, dtype, with_bias)


LLAMA_CASES = ([(k, n, m, g, sym, dt, b) for (k, n) in LLAMA for m in M_VALUES for g in (128, -1)
                for (sym, dt, b) in ((True, torch.float16, False), (False, torch.bfloat16, True))]
               if ON_GPU else
               [(4096, 14336, 1, 128, True, torch.float16, True), (14336, 4096, 1, 128, False, torch.bfloat16, False),
                (4096, 4096, 1, -1, False, torch.bfloat16, True)])


@pytest.mark.parametrize("k,n,m,g,sym,dtype,with_bias", LLAMA_CASES)
def test_llama_shapes(k, n, m, g, sym, dtype, with_bias):
    check(k, n, m, g, sym, dtype, with_bias)


@pytest.mark.parametrize("k,n,g", [(130, 72, -1), (200, 40, -1), (96, 24, 32), (64, 8, 64)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_awkward_shapes(k, n, g, dtype):
    # K not a multiple of 8 / of BLOCK_K (padded weights, masked x), N not a multiple of the tile.
    check(k, n, 3, g, False, dtype, True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("g", [64, -1])
@pytest.mark.parametrize("cfg", [dict(CONFIGS["small"][3], BLOCK_N=256),
                                 dict(CONFIGS["small"][6], BLOCK_N=256, SPLIT_K=5),
                                 CONFIGS["large"][1]], ids=["splitk4", "splitk5", "large"])
def test_forced_configs(dtype, g, cfg):
    # Split-K (fp32 atomics; 9 K tiles over 4 splits leaves one empty, 18 over 5 are uneven; bias from
    # split 0) and a large-M tile, whatever the interpreter would choose.
    k, n, m = 576, 1536, 17
    qw = random_weight(k, n, g, False, dtype, seed=3)
    x = torch.randn(m, k).to(dtype).to(DEVICE)
    bias = torch.randn(n).to(dtype).to(DEVICE)
    p = prepare_w4a16(qw, dtype)
    y = _launch(x, p["qweight"], p["scales"], p["zeros"], bias, p["group_len"], k, config=cfg)
    assert y.dtype == dtype and rel_err(y, reference.weight_only_linear(x, qw, bias)) <= TOL


@pytest.mark.parametrize("cfg", [dict(CONFIGS["small"][3], BLOCK_N=256),
                                 dict(CONFIGS["small"][6], BLOCK_N=256, SPLIT_K=5)], ids=["splitk4", "splitk5"])
def test_split_k_is_deterministic_and_leaves_locks_zero(cfg):
    # The last split of a tile sums the partials in split order: the same result on every run, and the
    # prepared weight's locks are zero again afterwards (the next call relies on it).
    k, n, m = 576, 1536, 17
    qw = random_weight(k, n, 64, True, torch.float16, seed=4)
    p = prepare_w4a16(qw, torch.float16)
    x = torch.randn(m, k).half().to(DEVICE)
    bias = torch.randn(n).half().to(DEVICE)
    ys = [_launch(x, p["qweight"], p["scales"], None, bias, 64, k, p["locks"], config=cfg) for _ in range(3)]
    assert all(torch.equal(ys[0], y) for y in ys[1:])
    assert not p["locks"].any()
    assert rel_err(ys[0], reference.weight_only_linear(x, qw, bias)) <= TOL


@pytest.mark.parametrize("cfg", CONFIGS["medium"], ids=[f"m{c['BLOCK_M']}n{c['BLOCK_N']}k{c['BLOCK_K']}s{c['SPLIT_K']}"
                                                        for c in CONFIGS["medium"]])
@pytest.mark.parametrize("m", [40, 100])
def test_medium_split_k_configs(cfg, m):
    # The split-K epilogue at 32 < M <= 128: several row tiles, a partial last one, bias, asymmetric bf16.
    k, n = 576, 1536
    qw = random_weight(k, n, 64, False, torch.bfloat16, seed=7)
    x = torch.randn(m, k).to(torch.bfloat16).to(DEVICE)
    bias = torch.randn(n).to(torch.bfloat16).to(DEVICE)
    p = prepare_w4a16(qw, torch.bfloat16)
    ys = [_launch(x, p["qweight"], p["scales"], p["zeros"], bias, 64, k, p["locks"], config=cfg) for _ in range(2)]
    assert torch.equal(ys[0], ys[1]) and not p["locks"].any()
    assert rel_err(ys[0], reference.weight_only_linear(x, qw, bias)) <= TOL


def test_mixed_scale_dtype_and_strided_rows():
    # bf16 checkpoint scales serving fp16 activations (scales kept exact), x a column slice (row stride > K).
    qw = random_weight(576, 1536, 32, True, torch.bfloat16, seed=5)
    wide = torch.randn(7, 1000).half().to(DEVICE)
    x = wide[:, :576]
    y = w4a16_linear(x, prepare_w4a16(qw, torch.float16))
    assert rel_err(y, reference.weight_only_linear(x, qw)) <= TOL


def test_empty_batch():
    qw = random_weight(64, 32, 32, True, torch.float16)
    y = w4a16_linear(torch.empty(0, 64, dtype=torch.float16, device=DEVICE), prepare_w4a16(qw, torch.float16))
    assert y.shape == (0, 32) and y.dtype == torch.float16


def test_prepare_is_pure_and_idempotent():
    qw = random_weight(576, 1536, 64, False, torch.float16, seed=7)
    before = [t.clone() for t in (qw.qweight, qw.scales, qw.zeros)]
    a = prepare_w4a16(qw, torch.float16)
    b = prepare_w4a16(qw, torch.float16)
    for t, t0 in zip((qw.qweight, qw.scales, qw.zeros), before):
        assert torch.equal(t, t0)
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]) and a[key].data_ptr() != b[key].data_ptr()
            assert all(a[key].data_ptr() != t.data_ptr() for t in (qw.qweight, qw.scales, qw.zeros))
        else:
            assert a[key] == b[key]
    assert prepare_w4a16(a, torch.float16) is a
    with pytest.raises(TypeError, match="prepared for"):
        prepare_w4a16(a, torch.bfloat16)
    # The packed layout: word (j, n) holds codes 8j .. 8j+7 of row n, code 8j+i in bits 4i..4i+3.
    codes = qw.codes().cpu().to(torch.int64)
    words = a["qweight"].cpu().to(torch.int64) & 0xFFFFFFFF
    unpacked = torch.stack([(words >> (4 * i)) & 0xF for i in range(8)], dim=1).reshape(-1, 1536)
    assert torch.equal(unpacked[:576].T, codes)


def test_torch_compile_fullgraph():
    qw = random_weight(576, 576, 64, False, torch.float16, seed=9)
    p = prepare_w4a16(qw, torch.float16)
    bias = torch.randn(576).half().to(DEVICE)

    def f(x):
        return w4a16_linear(x, p, bias) * 2

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    x = torch.randn(5, 576).half().to(DEVICE)
    assert torch.equal(compiled(x), f(x))


def test_opcheck():
    qw = random_weight(64, 32, 32, False, torch.bfloat16, seed=11)
    p = prepare_w4a16(qw, torch.bfloat16)
    x = torch.randn(3, 64).to(torch.bfloat16).to(DEVICE)
    bias = torch.randn(32).to(torch.bfloat16).to(DEVICE)
    torch.library.opcheck(_w4a16_gemm_op.op, (x, p["qweight"], p["scales"], p["zeros"], bias, p["group_len"], 64),
                          test_utils=("test_schema", "test_faketensor"))


def test_bad_inputs():
    qw = random_weight(64, 32, 32, True, torch.float16)
    p = prepare_w4a16(qw, torch.float16)
    x = torch.randn(3, 64).half().to(DEVICE)
    with pytest.raises(TypeError, match="prepared for"):
        w4a16_linear(x.bfloat16(), p)
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        _w4a16_gemm_op(x.float(), p["qweight"], p["scales"], None, None, 32, 64)
    with pytest.raises(ValueError, match="in_features 64"):
        w4a16_linear(torch.randn(3, 48).half().to(DEVICE), p)
    with pytest.raises(ValueError, match="2-D"):
        w4a16_linear(x[None], p)
    with pytest.raises(ValueError, match="2-D"):
        w4a16_linear(x[0], p)
    with pytest.raises(ValueError, match="bias"):
        w4a16_linear(x, p, torch.randn(31).half().to(DEVICE))
    with pytest.raises(TypeError, match="prepare_w4a16"):
        w4a16_linear(x, {"scales": p["scales"]})
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        prepare_w4a16(qw, torch.float32)
    with pytest.raises(TypeError, match="QuantizedWeight"):
        prepare_w4a16(torch.zeros(4, 4), torch.float16)
    w8 = reference.quantize_weight(torch.randn(32, 64), bits=8, group_size=32)
    with pytest.raises(ValueError, match="4-bit"):
        prepare_w4a16(w8, torch.float16)


@pytest.mark.parametrize("bucket", ["small", "medium", "large"])
@pytest.mark.parametrize("k,group_len", [(576, 32), (576, 64), (4096, 128), (576, 576), (130, 130)])
@pytest.mark.parametrize("m", [1, 16, 33, 2048])
def test_autotune_pruning_keeps_valid_configs(bucket, k, group_len, m):
    kept = _prune(_as_triton_configs(CONFIGS[bucket]), dict(M=m, K=k, GROUP_LEN=group_len))
    assert kept
    for c in kept:
        bk = c.kwargs["BLOCK_K"]
        assert group_len == k or group_len % bk == 0


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 48])
def test_autotuned_config_is_reused(monkeypatch, m):
    # The first call per key autotunes; later calls launch the autotuner's choice directly. Both must
    # give the same result, bit for bit, and the cached choice must be the autotuner's.
    from quantkern.triton_kernels import w4a16 as tw

    monkeypatch.delenv("QUANTKERN_TRITON_AUTOTUNE", raising=False)
    monkeypatch.setattr(tw, "_TUNED_CONFIGS", {})
    k, n = 256, 384
    qw = random_weight(k, n, 128, True, torch.float16, seed=5)
    p = prepare_w4a16(qw, torch.float16)
    x = torch.randn(m, k).half().to(DEVICE)
    first = w4a16_linear(x, p)
    assert len(tw._TUNED_CONFIGS) == 1
    (tuned,) = tw._TUNED_CONFIGS.values()
    autotuner = tw._AUTOTUNED["small" if m <= tw.SMALL_M else "medium" if m <= tw.MEDIUM_M else "large"]
    assert {key: tuned[key] for key in autotuner.best_config.kwargs} == autotuner.best_config.kwargs
    second = w4a16_linear(x, p)
    assert torch.equal(first, second)
    for y in (first, second):
        assert rel_err(y, reference.weight_only_linear(x, qw)) <= TOL


def test_qweight_must_hold_the_padded_k():
    # The kernel reads whole K tiles of words, up to K rounded up to K_ALIGN (prepare_w4a16 pads to it): a qweight
    # of ceil(K / 8) rows passed the check before, and its last tile's loads ran past the tensor's end.
    qw = random_weight(200, 40, -1, True, torch.float16)
    p = prepare_w4a16(qw, torch.float16)
    assert p["qweight"].shape == (32, 40)
    x = torch.randn(3, 200).half().to(DEVICE)
    with pytest.raises(ValueError, match="qweight"):
        _w4a16_gemm_op(x, p["qweight"][:25].contiguous(), p["scales"], None, None, 200, 200)


def test_strided_weight_tensors_are_refused():
    # The kernel indexes qweight, scales and zeros as contiguous [rows, N]: a transposed view of the canonical
    # [N, G] scales (equal values as [G, N]) gave a relative error of 1.04, silently, before.
    qw = random_weight(128, 48, 32, False, torch.float16)
    p = prepare_w4a16(qw, torch.float16)
    x = torch.randn(3, 128).half().to(DEVICE)
    assert torch.equal(qw.scales.t(), p["scales"]) and torch.equal(qw.zeros.t(), p["zeros"])
    with pytest.raises(ValueError, match="contiguous"):
        _w4a16_gemm_op(x, p["qweight"], qw.scales.t(), p["zeros"], None, 32, 128)
    with pytest.raises(ValueError, match="contiguous"):
        _w4a16_gemm_op(x, p["qweight"], p["scales"], qw.zeros.t(), None, 32, 128)
    qweight = torch.stack((p["qweight"], p["qweight"]), dim=-1)[..., 0]  # equal values, strides (2N, 2)
    with pytest.raises(ValueError, match="contiguous"):
        _w4a16_gemm_op(x, qweight, p["scales"], p["zeros"], None, 32, 128)


def test_strided_bias():
    # ops.weight_only_linear passes the caller's bias as is; the kernel read a strided one as contiguous (relative
    # error 1.3 before).
    from quantkern import ops

    qw = random_weight(128, 48, 32, True, torch.float16)
    x = torch.randn(3, 128).half().to(DEVICE)
    bias = (torch.randn(96) * 10).half().to(DEVICE)[::2]
    y = ops.weight_only_linear(x, ops.prepare_weight_only(qw, torch.float16, backend="triton"), bias)
    assert rel_err(y, reference.weight_only_linear(x, qw, bias)) <= TOL
