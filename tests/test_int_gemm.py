"""Integer GEMMs (W8A8, W4A4, W4A8): the weight layout (CPU), the Triton kernels (GPU, or CPU under
TRITON_INTERPRET=1, small shapes) and the CUDA kernels (GPU, marked ``gpu``) against the reference:
the int32 accumulator bit-exact with ``reference.int_matmul``, the linear ops with
``reference.quantized_activation_linear``."""

import pytest
import torch
from torch import nn

from quantkern import backends, ops, reference
from quantkern.format import pack_int4_signed
from quantkern.layout_int import (activations_packed, permute_w4a8, prepare_int_weight, tile_int_weight,
                                  unpack_int_weight, untile_int_weight, unpermute_w4a8)
from quantkern.nn import QuantLinear

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MODES = [(8, 8), (4, 4), (4, 8)]  # (weight bits, activation bits)


def random_values(rows, cols, bits, device="cpu"):
    lo, hi = (-128, 128) if bits == 8 else (-8, 8)
    return torch.randint(lo, hi, (rows, cols), dtype=torch.int8, device=device)


def packed(values, bits):
    return values if bits == 8 else pack_int4_signed(values)


def record_calls(monkeypatch, names):
    """Wrap the ``quantkern.ops`` functions ``names``; returns the list of the names called, in order."""
    calls = []
    for name in names:
        original = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _f=original, _n=name, **kw: calls.append(_n) or _f(*a, **kw))
    return calls


def relative_error(y, ref):
    return ((y.float() - ref.float()).norm() / ref.float().norm().clamp(min=1e-30)).item()


# ----------------------------------------------------------------------------------------------
# Layout (CPU)
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits,act_bits", MODES)
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("group", [-1, 32, 128])
def test_prepare_int_weight_round_trips(bits, act_bits, backend, group):
    qw = reference.quantize_weight(torch.randn(24, 256), bits, group)
    prepared = prepare_int_weight(qw, act_bits, backend)
    assert torch.equal(unpack_int_weight(prepared), reference.signed_weight_values(qw))
    assert prepared["w_scale"].dtype == torch.float32 and prepared["w_scale"].shape == (qw.n_groups, 24)
    assert torch.equal(prepared["w_scale"], qw.scales.float().t())
    assert prepared["group_len"] == qw.group_length


def test_w4a8_permutation_is_the_documented_one():
    v = torch.arange(64, dtype=torch.int8).reshape(1, 64)
    p = permute_w4a8(v)
    for t in range(4):
        for j in range(4):
            for h in range(2):
                assert p[0, 8 * t + 2 * j + h] == 16 * h + 4 * t + j  # physical p holds logical k
                assert p[0, 32 + 8 * t + 2 * j + h] == 32 + 16 * h + 4 * t + j
    assert torch.equal(unpermute_w4a8(p), v)


def test_small_m_fragments_emulated_on_the_cpu():
    """scripts/emulate_int_small_m.py rebuilds csrc/int_small_m.cu's mma fragments (which weight and activation
    bytes each lane feeds each step, the packed int4 codes' byte permutes included) and checks the sums."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "emulate_int_small_m.py"
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("exact") == 6 and "W4A4" in result.stdout


def test_activations_packed_follows_the_prepared_weight():
    assert activations_packed({"packed_activations": True}, 4096)
    few = {"packed_activations": False, "packed_activations_max_tokens": 16}
    assert activations_packed(few, 1) and activations_packed(few, 16) and not activations_packed(few, 17)
    # Prepared away from an sm_90 GPU (here on the CPU): one per byte, or packed at every M.
    for act_bits in (4, 8):
        prepared = prepare_int_weight(reference.quantize_weight(torch.randn(64, 256), 4, -1), act_bits, "cuda")
        assert prepared["packed_activations_max_tokens"] == 0


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("n,k", [(8, 32), (72, 160), (128, 256)])
def test_cuda_tiling_round_trips_and_pads(bits, n, k):
    w = packed(random_values(n, k, bits), bits)
    tiled = tile_int_weight(w, bits)
    assert tiled.shape == (-(-n // 64), -(-k // 128), 64, 128 * bits // 8)
    assert torch.equal(untile_int_weight(tiled, n, k, bits), w)
    assert int(tiled.abs().sum() if bits == 8 else tiled.sum()) == int(w.abs().sum() if bits == 8 else w.sum())
    # unit (u, t) holds rows 64u.., k-tile t contiguously
    row = 128 * bits // 8
    assert torch.equal(tiled[0, 0, : min(n, 64), : min(row, w.shape[1])], w[:64, :row])


def test_prepare_refuses_asymmetric_and_odd_shapes():
    with pytest.raises(ValueError, match="symmetric"):
        prepare_int_weight(reference.quantize_weight(torch.randn(8, 64), 4, -1, symmetric=False), 4)
    with pytest.raises(ValueError, match="multiple of 32"):
        prepare_int_weight(reference.quantize_weight(torch.randn(8, 48), 8, -1), 8)
    with pytest.raises(ValueError, match="multiple of 8"):
        prepare_int_weight(reference.quantize_weight(torch.randn(6, 64), 8, -1), 8)


# ----------------------------------------------------------------------------------------------
# Triton (GPU, or the CPU interpreter with small shapes)
# ----------------------------------------------------------------------------------------------

triton_ok = pytest.mark.skipif(not backends.status("triton").available, reason="triton missing")
# CPU: small shapes, and the real widths as K (SmolLM2 576, Qwen 896 / 4864, Llama 4096) or N (576) at one program's
# worth of the other dimensions (the interpreter runs a K step in about 3 ms).
TRITON_SHAPES = [(1, 64, 8), (5, 128, 48), (17, 96, 40), (1, 576, 8), (2, 896, 8), (1, 4864, 8), (1, 4096, 8),
                 (3, 64, 576)] if DEVICE == "cpu" else \
    [(1, 576, 896), (5, 896, 576), (33, 4096, 256), (130, 4864, 128), (300, 576, 4864)]


@triton_ok
@pytest.mark.parametrize("w_bits,a_bits", MODES)
@pytest.mark.parametrize("m,k,n", TRITON_SHAPES)
def test_triton_int32_accumulator_is_exact(w_bits, a_bits, m, k, n):
    from quantkern.triton_kernels.int_gemm import int_gemm_acc

    a, w = random_values(m, k, a_bits, DEVICE), random_values(n, k, w_bits, DEVICE)
    acc = int_gemm_acc(packed(a, a_bits), packed(w, w_bits), a_bits, w_bits)
    assert torch.equal(acc.cpu(), reference.int_matmul(a.cpu(), w.cpu()))


@triton_ok
@pytest.mark.parametrize("bits,act_bits", MODES)
@pytest.mark.parametrize("group", [-1, 32, 64])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_linear_matches_reference(bits, act_bits, group, dtype):
    m, k, n = (3, 128, 40) if DEVICE == "cpu" else (37, 896, 576)
    qw = reference.quantize_weight(torch.randn(n, k, device=DEVICE), bits, group, scale_dtype=dtype)
    x = torch.randn(2, m, k, device=DEVICE).to(dtype)
    bias = torch.randn(n, device=DEVICE).to(dtype)
    prepared = ops.prepare_int_weight(qw, act_bits, dtype, backend="triton")
    y = ops.quantized_activation_linear(x, prepared, act_bits, bias, 0.9)
    expected = reference.quantized_activation_linear(x, qw, act_bits, bias, 0.9)
    assert y.shape == expected.shape and y.dtype == dtype
    # bf16 output: a one-ulp difference in the final cast is 4e-3 (the interpreter's fp32 -> bf16 cast
    # does not always round like torch's); fp16 under the interpreter rounds step by step like the reference.
    assert relative_error(y, expected) < (2e-3 if dtype == torch.float16 else 8e-3)
    if DEVICE == "cpu" and dtype == torch.float16:
        assert torch.equal(y, expected)


@triton_ok
@pytest.mark.parametrize("bits,act_bits", MODES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_rotated_linear_quantizes_in_one_fused_pass(bits, act_bits, dtype, monkeypatch):
    """input_rotation="hadamard": the Triton path rotates and quantizes in one hadamard_quantize call (no
    separate ops.hadamard), and computes what the reference does with the rotation first."""
    m, k, n = (3, 128, 40) if DEVICE == "cpu" else (37, 896, 576)
    qw = reference.quantize_weight(torch.randn(n, k, device=DEVICE), bits, -1, scale_dtype=dtype)
    x = torch.randn(2, m, k, device=DEVICE).to(dtype)
    bias = torch.randn(n, device=DEVICE).to(dtype)
    prepared = ops.prepare_int_weight(qw, act_bits, dtype, backend="triton")
    calls = record_calls(monkeypatch, ("hadamard", "hadamard_quantize", "quantize_per_token"))
    y = ops.quantized_activation_linear(x, prepared, act_bits, bias, 0.9, input_rotation="hadamard")
    assert calls == ["hadamard_quantize"]
    expected = reference.quantized_activation_linear(reference.hadamard(x), qw, act_bits, bias, 0.9)
    assert y.shape == expected.shape and y.dtype == dtype
    # As in test_triton_linear_matches_reference (bf16: the interpreter's final cast); on a GPU the fused
    # kernel's summation order can also move a code by one step at a rounding boundary.
    assert relative_error(y, expected) < (2e-3 if dtype == torch.float16 else 8e-3)
    if DEVICE == "cpu" and dtype == torch.float16:
        assert torch.equal(y, expected)


def test_rotated_linear_with_unpacked_int4_codes_fuses_too(monkeypatch):
    """W4A4 on sm_90 takes int4 codes one per byte past 16 tokens: the layer asks the fused op for them."""
    prepared = ops.PreparedWeight("triton", torch.device("cpu"), torch.float16, 4, -1, 64, 16,
                                  tensors={"act_bits": 4, "packed_activations": False})
    calls = []
    real_fused = ops.hadamard_quantize
    monkeypatch.setattr(ops, "hadamard_quantize", lambda x, bits, clip, backend=None, packed=True:
                        calls.append(("hadamard_quantize", backend, packed)) or
                        real_fused(x, bits, clip, "reference", packed=packed))
    monkeypatch.setattr(ops, "hadamard", lambda *a, **kw: pytest.fail("the rotation runs fused"))
    monkeypatch.setattr(ops, "quantize_per_token", lambda *a, **kw: pytest.fail("the rotation runs fused"))
    seen = {}
    monkeypatch.setattr(ops, "_int_gemm_fn", lambda backend: lambda q, sx, tensors, bias, dtype:
                        seen.update(q=q, sx=sx) or torch.zeros(q.shape[0], 16, dtype=dtype))
    x = torch.randn(5, 64).half()
    ops.quantized_activation_linear(x, prepared, 4, input_rotation="hadamard")
    assert calls == [("hadamard_quantize", "triton", False)]
    q, sx = reference.quantize_per_token(reference.hadamard(x), 4)
    assert torch.equal(seen["q"], reference.unpack_int4_signed(q)) and torch.equal(seen["sx"], sx)


def test_rotated_linear_reference_path_and_bad_rotation():
    qw = reference.quantize_weight(torch.randn(16, 64), 8, -1)
    x = torch.randn(3, 64)
    y = ops.quantized_activation_linear(x, qw, 8, input_rotation="hadamard", backend="reference")
    assert torch.equal(y, reference.quantized_activation_linear(reference.hadamard(x), qw, 8))
    with pytest.raises(ValueError, match="input_rotation"):
        ops.quantized_activation_linear(x, qw, 8, input_rotation="pca", backend="reference")


# ----------------------------------------------------------------------------------------------
# CUDA (GPU)
# ----------------------------------------------------------------------------------------------

cuda_ext = backends.status("cuda")
needs_cuda_kernel = pytest.mark.skipif("w4a4_linear" not in cuda_ext.kernels,
                                       reason=f"CUDA int_gemm missing: {cuda_ext.reason}")

# (M, K, N): the models' sizes (576, 896, 4864, 4096, 14336), partial tiles, K % 64 == 32.
CUDA_SHAPES = [(1, 576, 896), (5, 896, 576), (16, 4096, 4096), (33, 4864, 896), (7, 14336, 576),
               (130, 576, 4864), (300, 896, 1216), (1, 160, 24), (64, 4096, 14336)]


@pytest.mark.gpu
@needs_cuda_kernel
@pytest.mark.parametrize("w_bits,a_bits", MODES)
@pytest.mark.parametrize("m,k,n", CUDA_SHAPES)
@pytest.mark.parametrize("config,split_k", [(0, 0), (1, 1), (1, 3), (2, 1), (3, 1), (3, 2)])
def test_cuda_int32_accumulator_is_exact(w_bits, a_bits, m, k, n, config, split_k):
    a, w = random_values(m, k, a_bits), random_values(n, k, w_bits)
    expected = reference.int_matmul(a, w)
    wq = permute_w4a8(w) if (w_bits, a_bits) == (4, 8) else w
    tiled = tile_int_weight(packed(wq, w_bits), w_bits).cuda()
    acc = torch.ops.quantkern.int_gemm_acc(packed(a, a_bits).cuda(), tiled, n, a_bits, w_bits, split_k, config)
    assert torch.equal(acc.cpu(), expected)


# The few-token kernel's plan (csrc/int_small_m.cu, host code: no GPU needed). Warps per 32-channel block: the
# most with which the blocks run in one wave (with int8 activation codes an SM holds 16 warps of int4 one-tile
# blocks, 12 of int8 one-tile ones and of int4 two-tile blocks of 2 warps, 8 of the other two-tile ones; with packed
# int4 codes 16 at both; blocks of 8 warps one per SM); K split over a cluster only while the doubled grid still
# runs in one wave and each warp keeps two k-tiles.
@needs_cuda_kernel
@pytest.mark.parametrize("m,n,k,w_bits,split_k,sms,warps,splits,a_bits", [
    (1, 8192, 8192, 4, 0, 132, 8, 1, 8),     # 256 blocks: 2 of 8 warps per SM
    (1, 28672, 8192, 4, 0, 132, 2, 1, 8),    # 896 blocks: 8 of 2 warps per SM
    (1, 14336, 4096, 4, 0, 132, 4, 1, 8),    # 448 blocks
    (1, 4096, 14336, 4, 0, 132, 16, 1, 8),   # 128 blocks: one of 16 warps per SM
    (1, 8192, 8192, 4, 0, 114, 4, 1, 8),     # the same on 114 SMs: 8-warp blocks would take two waves
    (16, 8192, 8192, 4, 0, 132, 4, 1, 8),    # two token tiles: 4-warp blocks two per SM
    (16, 8192, 8192, 4, 0, 114, 2, 2, 8),    # on 114 SMs 228 such blocks < 256: 2-warp blocks six per SM, K in two
    (16, 18944, 3584, 4, 0, 132, 2, 1, 8),   # 592 blocks: 2-warp blocks six per SM
    (16, 28672, 8192, 4, 0, 132, 1, 1, 8),   # 896 blocks of one warp, eight per SM
    (1, 28672, 8192, 8, 0, 132, 1, 1, 8),    # int8 weights, one tile: 792 two-warp slots < 896 blocks
    (16, 8192, 8192, 8, 0, 132, 4, 1, 8),
    (1, 576, 14336, 4, 0, 132, 16, 2, 8),    # 18 blocks: K split in two (four would leave warps < 2 k-tiles)
    (1, 576, 14336, 4, 3, 132, 16, 3, 8),    # a split asked for
    (1, 576, 256, 4, 8, 132, 16, 2, 8),      # at most one split per k-tile
    # Packed int4 activations (W4A4): 16 warps per SM at two token tiles too.
    (16, 8192, 8192, 4, 0, 132, 8, 1, 4),    # 256 blocks: 2 of 8 warps per SM (int8 codes: 4 warps)
    (16, 28672, 8192, 4, 0, 132, 2, 1, 4),   # 896 blocks: 8 of 2 warps per SM (int8 codes: 1 warp)
    (16, 4096, 14336, 4, 0, 132, 16, 1, 4),  # 128 blocks: one of 16 warps per SM
    (1, 28672, 8192, 4, 0, 132, 2, 1, 4),    # one token tile: as with int8 codes
])
def test_small_m_plan(m, n, k, w_bits, split_k, sms, warps, splits, a_bits):
    from quantkern import _C

    assert _C.int_small_m_plan(m, n, k, w_bits, split_k, sms, a_bits) == {"warps": warps, "splits": splits}


# The sm_90 wgmma kernel (configs 6 and 7: 128- and 256-token tiles): int8 activations (W8A8, W4A8, and
# W4A4 as int4 codes one per byte), per-channel weights. Partial channel blocks (N = 24, 72, 200: a single or
# odd weight unit), partial token tiles, K not a multiple of the 128-deep k-tile (160, 4864), split K.
on_hopper = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
needs_wgmma = pytest.mark.skipif(not on_hopper, reason="the wgmma kernel needs an sm_90 GPU")
WGMMA_SHAPES = [(65, 160, 24), (130, 576, 896), (257, 896, 4864), (300, 4864, 200), (1000, 4096, 72),
                (2048, 14336, 576), (129, 4096, 14336)]


# The sm_90 few-token kernel (config 8, automatic up to M = 16): int8 activations, per-channel weights,
# 16 tokens a block (grid.z walks more: M = 40), K split over the blocks of a cluster (1 to 8). Partial
# channel blocks (N = 24, 72, 200: one or an odd number of weight units), K not a multiple of the 128-deep
# k-tile (160, 4864), the models' sizes.
# The last six take the narrow blocks on a 132-SM GPU (csrc/int_small_m.cu's plan, warps per block for int4 /
# int8 weights): one token tile, 384 blocks of 32 channels 4 / 4, 640 blocks 2 / 2, 1088 blocks 1 / 1; two token
# tiles, 192 blocks 4 / 4, 544 blocks 2 / 1, 832 blocks 1 / 1.
SMALL_M_SHAPES = [(1, 160, 24), (5, 576, 896), (8, 896, 72), (9, 4864, 200), (16, 4096, 4096), (16, 14336, 576),
                  (40, 576, 1216), (3, 8192, 8192), (2, 384, 12288), (4, 128, 20480), (1, 256, 34816),
                  (10, 128, 6144), (12, 256, 17408), (16, 256, 26624)]
HOPPER_ACC_CASES = ([shape + cfg for shape in WGMMA_SHAPES for cfg in [(6, 1), (7, 1), (6, 0), (7, 3)]] +
                    [shape + (8, split) for shape in SMALL_M_SHAPES for split in (0, 1, 3, 8)])


@pytest.mark.gpu
@needs_cuda_kernel
@needs_wgmma
@pytest.mark.parametrize("w_bits", [4, 8])
@pytest.mark.parametrize("m,k,n,config,split_k", HOPPER_ACC_CASES)
def test_hopper_int32_accumulator_is_exact(w_bits, m, k, n, config, split_k):
    """The wgmma kernel (configs 6, 7) and the few-token kernel (8), forced, against int_matmul."""
    a, w = random_values(m, k, 8), random_values(n, k, w_bits)
    wq = permute_w4a8(w) if w_bits == 4 else w
    tiled = tile_int_weight(packed(wq, w_bits), w_bits).cuda()
    acc = torch.ops.quantkern.int_gemm_acc(a.cuda(), tiled, n, 8, w_bits, split_k, config)
    assert torch.equal(acc.cpu(), reference.int_matmul(a, w))


@pytest.mark.gpu
@needs_cuda_kernel
@needs_wgmma
@pytest.mark.parametrize("m,k,n", SMALL_M_SHAPES + [(16, 14336, 4096), (1, 65536, 64)])
@pytest.mark.parametrize("config,split_k", [(0, 0), (8, 1), (8, 3), (8, 8)])
def test_small_m_packed_int4_accumulator_is_exact(m, k, n, config, split_k):
    """W4A4 on sm_90 at few tokens: packed int4 activation codes (widened in registers) against the W4A8-layout
    weights, automatic (config 0) and forced, against int_matmul; extreme codes (-8 x -8 at K = 65536: 2^30 after
    the kernel's 256x widening) included."""
    a, w = random_values(m, k, 4), random_values(n, k, 4)
    a[0, :k // 2], w[0, :k // 2], w[-1, k // 2:] = -8, -8, 7
    tiled = tile_int_weight(packed(permute_w4a8(w), 4), 4).cuda()
    run = lambda: torch.ops.quantkern.int_gemm_acc(packed(a, 4).cuda(), tiled, n, 4, 4, split_k, config, True)  # noqa
    if config == 0 and m > 16:  # past the few-token kernel's M no kernel takes this pair
        with pytest.raises(RuntimeError, match="few-token kernel"):
            run()
        return
    assert torch.equal(run().cpu(), reference.int_matmul(a, w))


@pytest.mark.gpu
@needs_cuda_kernel
@needs_wgmma
@pytest.mark.parametrize("bits,act_bits", MODES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
# (100, 4096, 1024): 8 blocks of 128 tokens x 128 channels, which the automatic plan splits 8 ways over K.
@pytest.mark.parametrize("m,k,n", [(65, 576, 200), (300, 896, 4864), (2048, 4096, 576), (100, 4096, 1024)])
def test_wgmma_linear_is_bit_identical_to_the_reference(bits, act_bits, dtype, m, k, n):
    prepared = assert_hopper_linear_matches_reference(bits, act_bits, dtype, m, k, n,
                                                      [(6, 1), (7, 1), (6, 4), (7, 0)])
    assert prepared["gemm_act_bits"] == 8  # sm_90: W4A4 runs on int8 tensor cores
    assert prepared["packed_activations"] == (act_bits == 8)
    # ...but takes packed codes at few tokens (the few-token kernel), here the prefill's M one per byte.
    assert prepared["packed_activations_max_tokens"] == (16 if (bits, act_bits) == (4, 4) else 0)
    assert not activations_packed(prepared, m) or act_bits == 8


def assert_hopper_linear_matches_reference(bits, act_bits, dtype, m, k, n, configs):
    """The automatic choice and each forced (config, split_k), with and without bias, against the
    reference bit for bit; returns the prepared tensors."""
    qw = reference.quantize_weight(torch.randn(n, k, device="cuda"), bits, -1, scale_dtype=dtype)
    x = (torch.randn(m, k, device="cuda") * 3).to(dtype)
    bias = torch.randn(n, device="cuda").to(dtype)
    prepared = ops.prepare_int_weight(qw, act_bits, dtype, backend="cuda")
    expected = reference.quantized_activation_linear(x, qw, act_bits, bias, 0.9)
    assert torch.equal(ops.quantized_activation_linear(x, prepared, act_bits, bias, 0.9), expected)  # automatic
    from quantkern.layout_int import int_gemm_cuda

    q, sx = ops.quantize_per_token(x, act_bits, 0.9, packed=activations_packed(prepared.tensors, m))
    for config, split_k in configs:
        y = int_gemm_cuda(q, sx, prepared.tensors, bias.float(), dtype, split_k, config)
        assert torch.equal(y, expected), (config, split_k)
    config, split_k = configs[-1]
    y = int_gemm_cuda(q, sx, prepared.tensors, None, dtype, split_k, config)
    assert torch.equal(y, reference.quantized_activation_linear(x, qw, act_bits, None, 0.9))
    return prepared.tensors


@pytest.mark.gpu
@needs_cuda_kernel
@needs_wgmma
@pytest.mark.parametrize("bits,act_bits", MODES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,k,n", [(1, 576, 200), (7, 4864, 896), (16, 4096, 576)])
def test_small_m_linear_is_bit_identical_to_the_reference(bits, act_bits, dtype, m, k, n, monkeypatch):
    packed_args = []  # what the layer asked the quantizer for
    quantize = ops.quantize_per_token
    monkeypatch.setattr(ops, "quantize_per_token",
                        lambda *args, **kw: packed_args.append(kw["packed"]) or quantize(*args, **kw))
    assert_hopper_linear_matches_reference(bits, act_bits, dtype, m, k, n, [(8, 1), (8, 2), (8, 8)])
    assert packed_args[0] is True  # W4A4: packed int4 codes at few tokens (8-bit codes: no packing either way)
    if (bits, act_bits) == (4, 4):  # int4 codes one per byte (the W4A8 instances) give the same bits
        from quantkern.layout_int import int_gemm_cuda

        qw = reference.quantize_weight(torch.randn(n, k, device="cuda"), 4, -1, scale_dtype=dtype)
        prepared = ops.prepare_int_weight(qw, 4, dtype, backend="cuda").tensors
        x = (torch.randn(m, k, device="cuda") * 3).to(dtype)
        expected = reference.quantized_activation_linear(x, qw, 4, None, 0.9)
        for packed_codes in (True, False):
            q, sx = ops.quantize_per_token(x, 4, 0.9, packed=packed_codes)
            assert q.dtype == (torch.uint8 if packed_codes else torch.int8)
            assert torch.equal(int_gemm_cuda(q, sx, prepared, None, dtype), expected), packed_codes


@pytest.mark.gpu
@needs_cuda_kernel
@needs_wgmma
def test_small_m_kernel_under_cuda_graph():
    # Captured right after the quantization kernel it depends on (programmatic dependent launch).
    qw = reference.quantize_weight(torch.randn(4096, 4096, device="cuda"), 4, -1, scale_dtype=torch.bfloat16)
    prepared = ops.prepare_int_weight(qw, 4, torch.bfloat16, backend="cuda")
    x = torch.randn(16, 4096, device="cuda", dtype=torch.bfloat16)
    run = lambda: ops.quantized_activation_linear(x, prepared, 4, None)  # noqa: E731
    run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = run()
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        expected = reference.quantized_activation_linear(x, qw, 4, None)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, expected)


@pytest.mark.gpu
@needs_cuda_kernel
@needs_wgmma
@pytest.mark.parametrize("m,k", [(1, 4096), (16, 576), (1, 14336)])  # (14336: the quantizer's cluster kernel)
def test_chained_linears_under_cuda_graph(m, k):
    # Layer after layer in a captured graph, each layer reading the previous one's output (each GEMM is launched as
    # its quantizer's programmatic dependent); a new input at every replay.
    torch.manual_seed(0)
    weights = [reference.quantize_weight(torch.randn(k, k, device="cuda") / k ** 0.5, 4, -1,
                                         scale_dtype=torch.bfloat16) for _ in range(3)]
    prepared = [ops.prepare_int_weight(qw, 4, torch.bfloat16, backend="cuda") for qw in weights]

    def chain(t, reference_path=False):
        for qw, p in zip(weights, prepared):
            t = (reference.quantized_activation_linear(t, qw, 4, None) if reference_path
                 else ops.quantized_activation_linear(t, p, 4, None))
        return t

    static_x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    chain(static_x)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = chain(static_x)
    for _ in range(3):
        static_x.copy_(torch.randn_like(static_x))
        expected = chain(static_x, reference_path=True)
        graph.replay()
        torch.cuda.synchronize()
        assert expected.isfinite().all() and torch.equal(y, expected)


@pytest.mark.gpu
@needs_cuda_kernel
@needs_wgmma
def test_packed_int4_codes_with_w4a8_weights_only_at_few_tokens():
    """Only the few-token kernel takes packed int4 codes against the sm_90 (W4A8-layout) weights: past its M, or
    forced onto another kernel, the op refuses, and the layer quantizes one code per byte there."""
    from quantkern.layout_int import int_gemm_cuda

    qw = reference.quantize_weight(torch.randn(64, 256, device="cuda"), 4, -1, scale_dtype=torch.float16)
    prepared = ops.prepare_int_weight(qw, 4, torch.float16, backend="cuda")
    assert prepared.tensors["layout"] == "cuda-tiled-w4a8"
    x = torch.randn(17, 256, device="cuda", dtype=torch.float16)
    q, sx = ops.quantize_per_token(x, 4, packed=True)
    with pytest.raises(RuntimeError, match="few-token kernel"):
        int_gemm_cuda(q, sx, prepared.tensors, None, torch.float16)
    with pytest.raises(RuntimeError, match="few-token kernel"):
        int_gemm_cuda(q[:4], sx[:4], prepared.tensors, None, torch.float16, 1, 6)
    assert not activations_packed(prepared.tensors, 17)
    y = ops.quantized_activation_linear(x, prepared, 4)
    assert torch.equal(y, reference.quantized_activation_linear(x, qw, 4))


@pytest.mark.gpu
@needs_cuda_kernel
@needs_wgmma
@pytest.mark.parametrize("config,m", [(6, 100), (7, 300), (8, 4)])
def test_hopper_configs_refuse_what_they_cannot_run(config, m):
    """The wgmma (6, 7) and few-token (8) kernels take int8 activations and per-channel weights only."""
    from quantkern.layout_int import int_gemm_cuda

    qw = reference.quantize_weight(torch.randn(64, 256, device="cuda"), 4, 128)
    grouped = ops.prepare_int_weight(qw, 4, torch.float16, backend="cuda").tensors
    q, sx = ops.quantize_per_token(torch.randn(m, 256, device="cuda", dtype=torch.float16), 4, packed=False)
    with pytest.raises(RuntimeError, match="per-channel"):
        int_gemm_cuda(q, sx, grouped, None, torch.float16, 1, config)
    a = pack_int4_signed(random_values(m, 256, 4)).cuda()
    tiled = tile_int_weight(pack_int4_signed(random_values(64, 256, 4)), 4).cuda()
    with pytest.raises(RuntimeError, match="int8 activations"):
        torch.ops.quantkern.int_gemm_acc(a, tiled, 64, 4, 4, 1, config)


@pytest.mark.gpu
@needs_cuda_kernel
@pytest.mark.parametrize("bits,act_bits", MODES)
@pytest.mark.parametrize("group", [-1, 32, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,k,n", [(1, 576, 896), (9, 4096, 576), (70, 896, 4864), (257, 4864, 896)])
def test_cuda_linear_matches_reference(bits, act_bits, group, dtype, m, k, n):
    if group > 0 and k % group:
        k = 1024
    qw = reference.quantize_weight(torch.randn(n, k, device="cuda"), bits, group, scale_dtype=dtype)
    x = (torch.randn(m, k, device="cuda") * 3).to(dtype)
    bias = torch.randn(n, device="cuda").to(dtype)
    prepared = ops.prepare_int_weight(qw, act_bits, dtype, backend="cuda")
    expected = reference.quantized_activation_linear(x, qw, act_bits, bias, 0.9)
    y = ops.quantized_activation_linear(x, prepared, act_bits, bias, 0.9)
    assert y.dtype == dtype and y.shape == expected.shape
    assert relative_error(y, expected) < 1e-3
    # One split (or exact int32 split-K per-channel): the epilogue rounds exactly like the reference.
    from quantkern.layout_int import int_gemm_cuda

    q, sx = ops.quantize_per_token(x, act_bits, 0.9, packed=activations_packed(prepared.tensors, m))
    exact = int_gemm_cuda(q, sx, prepared.tensors, bias.float(), dtype, split_k=1)
    assert torch.equal(exact, expected)
    if group == -1:
        assert torch.equal(y, expected)
        # 128x128, 128x256 and 256x128 tiles (which take W4A4's codes one per byte on sm_90 at every M)
        q, sx = ops.quantize_per_token(x, act_bits, 0.9, packed=prepared.tensors["packed_activations"])
        for config in (3, 4, 5):
            assert torch.equal(int_gemm_cuda(q, sx, prepared.tensors, bias.float(), dtype, 1, config), expected)


@pytest.mark.gpu
@needs_cuda_kernel
@pytest.mark.parametrize("bits,act_bits", MODES)
def test_quantlinear_runs_the_integer_kernels_on_the_gpu(bits, act_bits):
    torch.manual_seed(0)
    linear = nn.Linear(896, 576, bias=True).cuda().half()
    layer = QuantLinear.from_linear(linear, bits=bits, group_size=-1, act_bits=act_bits).cuda()
    x = torch.randn(3, 5, 896, device="cuda", dtype=torch.float16)
    y = layer(x)
    assert layer._prepared.backend == "cuda" and y.shape == (3, 5, 576)
    expected = reference.quantized_activation_linear(x, layer.weight.to("cuda"), act_bits, layer.bias)
    assert torch.equal(y, expected)
    # torch.compile sees the ops without graph breaks.
    compiled = torch.compile(layer, fullgraph=True)
    assert torch.equal(compiled(x), y)


@pytest.mark.gpu
@needs_cuda_kernel
@pytest.mark.parametrize("bits,act_bits", MODES)
def test_quantlinear_with_hadamard_rotation_on_the_gpu(bits, act_bits, monkeypatch):
    try:
        backends.select("hadamard", torch.device("cuda"))
    except backends.MissingKernelError as error:
        pytest.skip(f"no GPU Hadamard kernel yet: {error}")
    linear = nn.Linear(2048, 512).cuda().half()
    layer = QuantLinear.from_linear(linear, bits=bits, group_size=-1, act_bits=act_bits, rotate=True).cuda()
    x = torch.randn(8, 2048, device="cuda", dtype=torch.float16)
    calls = record_calls(monkeypatch, ("hadamard", "hadamard_quantize", "quantize_per_token"))
    y = layer(x)
    assert calls == ["hadamard_quantize"]  # one fused pass
    # The GEMM is exact on the codes the fused pass produced...
    q, token_scales = ops.hadamard_quantize(x, act_bits)
    codes = reference.unpack_int4_signed(q) if act_bits == 4 else q
    expected = reference.linear_from_activation_codes(codes, token_scales, layer.weight.to("cuda"), layer.bias,
                                                      x.dtype)
    assert torch.equal(y, expected)
    # ...which are the two-call reference's but where a rotated value lies at a rounding boundary: the
    # tensor-core rotation rounds its partial sums to fp16 (test_hadamard_kernels checks them closely).
    ref_q, ref_scales = reference.quantize_per_token(reference.hadamard(x), act_bits)
    ref_codes = reference.unpack_int4_signed(ref_q) if act_bits == 4 else ref_q
    code_diff = (codes.int() - ref_codes.int()).abs()
    assert code_diff.max() <= 1 and code_diff.float().mean() < 0.03  # (H200, int4: 1.1% of codes)
    torch.testing.assert_close(token_scales, ref_scales, rtol=8e-3, atol=0)
