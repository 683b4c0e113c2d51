"""The CUDA W4A16 GEMM (csrc/w4a16_gemm.cu) and its weight layout (quantkern/layout_cuda.py).

CPU tests check the offline repack without a GPU: the shuffle is undone and must give back the
canonical codes, and a pure-torch emulation of what each mma lane reads reproduces the reference.
GPU tests (marked ``gpu``) compare the op with ``reference.weight_only_linear`` over the models'
shapes, group sizes, sym/asym, fp16/bf16, with and without bias, and check determinism,
torch.compile, CUDA graphs and the input checks.
"""

import pytest
import torch

from quantkern import backends, reference
from quantkern.format import QuantizedWeight, pack_int4
from quantkern.layout_cuda import (
    pack_codes_w4a16,
    STAGED_SCALE_MAX,
    STAGED_SCALE_MIN,
    prepare_w4a16,
    unpack_w4a16_codes,
    unsupported_reason,
    w4a16_linear,
    wgmma_kernel_available,
)

cuda_ext = backends.status("cuda")
needs_extension = pytest.mark.skipif(not cuda_ext.available, reason=f"CUDA extension missing: {cuda_ext.reason}")

# (K, N) pairs of the models the kernel serves (Llama-3 8B / 70B, Qwen2.5 0.5B-3B, SmolLM2-135M).
MODEL_SHAPES = [
    (4096, 4096), (4096, 14336), (14336, 4096), (4096, 1024), (8192, 8192), (8192, 28672), (28672, 8192),
    (896, 4864), (4864, 896), (896, 896), (896, 128), (2048, 11008), (11008, 2048), (3072, 8192),
    (576, 1536), (1536, 576), (576, 576), (576, 192),
]
# (3584, 18944), Qwen2.5-7B's MLP: 592 blocks of the small-M kernel, its 2-warp blocks on 128-132 SMs.
GPU_SHAPES = [(4096, 14336), (14336, 4096), (896, 4864), (4864, 896), (576, 1536), (1536, 576), (1024, 3072),
              (3584, 18944)]
TOKENS = [1, 2, 7, 16, 33, 64, 128, 512, 2048]
GROUPS = [32, 64, 128, -1]


def random_qweight(k, n, group_size, symmetric, scale_dtype=torch.float16, device="cpu", seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8, device=device)
    glen = k if group_size == -1 else group_size
    groups = k // glen
    scales = (torch.rand(n, groups, generator=gen, device=device) * 0.02 + 0.001).to(scale_dtype)
    zeros = (None if symmetric else
             torch.randint(0, 16, (n, groups), generator=gen, dtype=torch.uint8, device=device))
    return QuantizedWeight(pack_int4(codes), scales, zeros, 4, group_size, k, n)


def fits(k, group_size):
    return group_size == -1 or k % group_size == 0


# ----------------------------------------------------------------------------------------------
# CPU: layout and refusals
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k,n", [(64, 16), (128, 48), (576, 192), (1536, 576), (896, 128)])
def test_repack_round_trips(k, n):
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    packed = pack_codes_w4a16(codes)
    assert packed.dtype == torch.int32 and tuple(packed.shape) == (n // 16, 2 * k)
    assert torch.equal(unpack_w4a16_codes(packed, k, n), codes)


def test_repack_places_each_code_where_the_mma_fragments_want_it():
    # Follow the kernels: lane (g, t), k-step kk of unit (ns, kt) reads word kk of its uint4. Register
    # i = 2 jk + jn is (word >> 4i) & 0x000F000F: channel 16 ns + 8 jn + g, k = 64 kt + 16 kk + 8 jk + 2t
    # in the low half, k + 1 in the high half. The large-M kernel uses it as B fragment register jk
    # of n8-tile jn; the small-M kernel (csrc/w4a16_small_m.cu) as A fragment register i (16 channels
    # x 16 k), and in fp16 takes registers 1 and 3 in place (q & 0x00F000F0: 16 x the codes).
    k, n = 128, 32
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    words = pack_codes_w4a16(codes).reshape(n // 16, k // 64, 32, 4).to(torch.int64) & 0xFFFFFFFF
    for ns in range(n // 16):
        for kt in range(k // 64):
            for lane in range(32):
                g, t = divmod(lane, 4)
                for kk in range(4):
                    word = int(words[ns, kt, lane, kk])
                    registers = [(word >> (4 * i)) & 0x000F000F for i in range(4)]
                    in_place = [word & 0x00F000F0, (word >> 8) & 0x00F000F0]
                    assert [v << 4 for v in registers[1::2]] == in_place
                    for i, v in enumerate(registers):
                        jk, jn = divmod(i, 2)
                        row = 16 * ns + 8 * jn + g
                        col = 64 * kt + 16 * kk + 8 * jk + 2 * t
                        assert v & 0xF == codes[row, col]
                        assert v >> 16 == codes[row, col + 1]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("symmetric", [True, False])
def test_small_m_offset_removal_reproduces_the_reference(dtype, symmetric):
    # The small-M kernel multiplies x by MAGIC + f * code (fp16: MAGIC 1024, f = 1 for channels 0..7
    # of a strip and 16 for 8..15; bf16: 128, f = 1) and removes the offset per group in fp32:
    # acc += s / f * D - s * (MAGIC / f + zero) * sum(x). The same algebra in fp32 on the CPU.
    k, n, m, group = 256, 32, 3, 64
    qw = random_qweight(k, n, group, symmetric, scale_dtype=dtype)
    prepared = prepare_w4a16(qw, dtype)
    codes = unpack_w4a16_codes(prepared["qweight"], k, n).float()
    scales = prepared["scales"].float()
    zeros = prepared["zeros"].float() if prepared["zeros"] is not None else torch.full_like(scales, 8.0)
    magic = 1024.0 if dtype == torch.float16 else 128.0
    f = torch.ones(n)
    if dtype == torch.float16:
        f[(torch.arange(n) % 16) >= 8] = 16.0
    x = torch.randn(m, k).to(dtype).float()
    acc = torch.zeros(m, n)
    for grp in range(k // group):
        cols = slice(grp * group, (grp + 1) * group)
        d = x[:, cols] @ (magic + f[:, None] * codes[:, cols]).T
        sx = x[:, cols].sum(dim=1, keepdim=True)
        acc += scales[grp] / f * d - scales[grp] * (magic / f + zeros[grp]) * sx
    expected = reference.weight_only_linear(x, qw)
    # fp32 cancellation of the offset costs ~1e-5 here (fp16's MAGIC 1024); a wrong factor is O(1).
    assert rel_err(acc, expected) <= 1e-4


def emulate_kernel(x, prepared):
    """What the kernel computes, in fp32 on CPU: per 32-channel piece of each group,
    pacc = x @ (code - zero), acc += pacc * scale. Reads only the prepared (kernel) tensors."""
    k, n = prepared["in_features"], prepared["out_features"]
    codes = unpack_w4a16_codes(prepared["qweight"], k, n).float()  # [N, K]
    scales = prepared["scales"].float()  # [G, N]
    zeros = prepared["zeros"].float() if prepared["zeros"] is not None else torch.full_like(scales, 8.0)
    glen = k // scales.shape[0]
    acc = torch.zeros(x.shape[0], n)
    for k0 in range(0, k, 32):
        grp = k0 // glen
        w = codes[:, k0:k0 + 32] - zeros[grp][:, None]
        acc += (x[:, k0:k0 + 32].float() @ w.T) * scales[grp][None, :]
    return acc


@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_prepared_tensors_reproduce_the_reference(group_size, symmetric, dtype):
    k, n = 576, 192
    if not fits(k, group_size):
        group_size = 64
    qw = random_qweight(k, n, group_size, symmetric, scale_dtype=dtype)
    prepared = prepare_w4a16(qw, dtype)
    assert prepared["scales"].dtype == dtype and tuple(prepared["scales"].shape) == (qw.n_groups, n)
    assert (prepared["zeros"] is None) == symmetric
    assert prepared["locks"].dtype == torch.int32 and not prepared["locks"].any()
    x = torch.randn(5, k).to(dtype)
    expected = reference.weight_only_linear(x.float(), qw)
    got = emulate_kernel(x, prepared)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k,n", MODEL_SHAPES)
@pytest.mark.parametrize("group_size", GROUPS)
def test_model_shapes_are_served(k, n, group_size):
    if not fits(k, group_size):
        assert "does not divide" in unsupported_reason(k, n, group_size)
    else:
        assert unsupported_reason(k, n, group_size) is None


@pytest.mark.parametrize("k,n,group_size,match", [
    (96, 64, 32, "multiple of 64"),
    (576, 200, 64, "multiple of 16"),
    (576, 64, 128, "does not divide"),
    (576, 64, 48, "group_size must be one of"),
    (0, 64, -1, "positive"),
])
def test_unsupported_shapes_are_refused_with_a_reason(k, n, group_size, match):
    reason = unsupported_reason(k, n, group_size)
    assert reason is not None and match in reason


def test_prepare_refuses_what_it_cannot_serve():
    qw = random_qweight(96, 64, 32, True)
    with pytest.raises(ValueError, match="multiple of 64"):
        prepare_w4a16(qw, torch.float16)
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        prepare_w4a16(random_qweight(128, 64, 32, True), torch.float32)
    codes = torch.randint(0, 256, (64, 128), dtype=torch.uint8)
    w8 = QuantizedWeight(codes, torch.ones(64, 4, dtype=torch.float16), None, 8, 32, 128, 64)
    with pytest.raises(ValueError, match="4-bit"):
        prepare_w4a16(w8, torch.float16)


def test_prepare_says_whether_bf16_scales_fit_fp16():
    # bf16 weights may run on the Hopper kernel's fp16 path where every scale converts exactly (0 included);
    # 15.875 is the largest bf16 value below STAGED_SCALE_MAX (4094 / 256).
    qw = random_qweight(128, 64, 64, False, scale_dtype=torch.bfloat16)
    assert prepare_w4a16(qw, torch.bfloat16)["scales_fit_fp16"]
    assert not prepare_w4a16(qw, torch.float16)["scales_fit_fp16"]  # (fp16 runs the fp16 path anyway)
    for scale, fits_fp16 in [(0.0, True), (STAGED_SCALE_MIN, True), (STAGED_SCALE_MIN / 2, False),
                             (15.875, True), (-15.875, True), (16.0, False), (STAGED_SCALE_MAX * 2, False),
                             (float("nan"), False), (float("inf"), False)]:
        scales = qw.scales.clone()
        scales[3, 1] = scale
        edited = QuantizedWeight(qw.qweight, scales, qw.zeros, 4, 64, 128, 64)
        assert prepare_w4a16(edited, torch.bfloat16)["scales_fit_fp16"] == fits_fp16, scale


# Opt-in shared memory per block: the H100 / H200 (132 SMs), the A100 (108 SMs) and the RTX 4090 (128 SMs).
HOPPER_SMEM, AMPERE_SMEM, ADA_SMEM = 232448, 166912, 101376


@needs_extension
@pytest.mark.parametrize(
    "m,n,k,group,symmetric,sms,smem,warps,splits,weight_ring,paired",
    [
        # Blocks of 32 channels that fit one per SM: 16-warp blocks, K split up to one block per SM; between one
        # and two per SM, 8-warp blocks (one wave: Qwen2.5-0.5B's 4864, 152 blocks; Llama's 8192, 256).
        (1, 4864, 896, 128, True, 132, HOPPER_SMEM, 8, 1, False, False),
        (1, 8192, 8192, 128, True, 132, HOPPER_SMEM, 8, 1, False, False),
        (1, 4224, 4096, 128, True, 132, HOPPER_SMEM, 16, 1, False, False),
        (1, 4225, 4096, 128, True, 132, HOPPER_SMEM, 8, 1, False, False),
        (1, 4096, 4096, 128, True, 132, HOPPER_SMEM, 16, 1, False, False),
        (1, 2048, 8192, 128, True, 132, HOPPER_SMEM, 16, 2, False, False),
        (1, 1536, 576, -1, True, 132, HOPPER_SMEM, 16, 1, False, False),
        # Two token tiles: 16 warps' activation rings (131 KB) do not fit sm_89's 99 KB: 8-warp blocks.
        (16, 4096, 4096, 128, True, 132, HOPPER_SMEM, 16, 1, False, False),
        (16, 4096, 4096, 128, True, 128, ADA_SMEM, 8, 1, False, False),
        # More than one wave of 8-warp blocks, one wave of 4-warp blocks (Llama's 14336: 448 blocks).
        (1, 14336, 4096, 128, True, 132, HOPPER_SMEM, 4, 1, False, False),
        (16, 14336, 4096, 32, True, 128, ADA_SMEM, 4, 1, False, False),
        (1, 8449, 4096, 128, True, 132, HOPPER_SMEM, 4, 1, False, False),
        (1, 8448, 4096, 128, True, 132, HOPPER_SMEM, 8, 1, False, False),
        # More than one wave of 4-warp blocks, one wave of 2-warp blocks, at one token tile (M <= 8) and
        # groups other than 32 (Llama's 28672: 896 blocks; Qwen2.5-7B's 18944: 592).
        (1, 28672, 8192, 128, True, 132, HOPPER_SMEM, 2, 1, False, False),
        (8, 28672, 8192, -1, True, 132, HOPPER_SMEM, 2, 1, False, False),
        (4, 18944, 3584, 64, True, 128, ADA_SMEM, 2, 1, False, False),
        (1, 16928, 4096, 128, True, 132, HOPPER_SMEM, 2, 1, False, False),
        (1, 16896, 4096, 128, True, 132, HOPPER_SMEM, 4, 1, False, False),
        (1, 33792, 4096, 128, True, 132, HOPPER_SMEM, 2, 1, False, False),
        # More than one wave either way (or two token tiles, or group 32): 8-warp blocks.
        (1, 33824, 4096, 128, True, 132, HOPPER_SMEM, 8, 1, False, False),
        (9, 28672, 8192, 128, True, 128, ADA_SMEM, 8, 1, False, False),
        (1, 28672, 8192, 32, True, 132, HOPPER_SMEM, 8, 1, False, False),
        # The weight ring: below 5 tokens, group 32 with zero points, where an SM holds 16 warps' rings (Hopper,
        # not sm_80/86/89).
        (4, 4096, 4096, 32, False, 132, HOPPER_SMEM, 16, 1, True, False),
        (1, 28672, 8192, 32, False, 132, HOPPER_SMEM, 8, 1, True, False),
        (1, 2048, 8192, 32, False, 132, HOPPER_SMEM, 16, 2, True, False),
        (4, 4096, 4096, 32, True, 132, HOPPER_SMEM, 16, 1, False, False),
        (1, 4096, 4096, 128, False, 132, HOPPER_SMEM, 16, 1, False, False),
        (1, 4096, 4096, -1, False, 132, HOPPER_SMEM, 16, 1, False, False),
        (5, 4096, 4096, 32, False, 132, HOPPER_SMEM, 16, 1, False, False),
        (1, 4096, 4096, 32, False, 108, AMPERE_SMEM, 8, 1, False, False),
        (1, 28672, 8192, 32, False, 128, ADA_SMEM, 8, 1, False, False),
        # Warp pairs (two token tiles, 9-16 tokens a tile) on 64-channel blocks where those fill at least 7/8 of
        # the SMs and a block of 16 paired warps fits (Hopper): Llama's 8192 (128 blocks), 28672 (448: 4 warps).
        (16, 8192, 8192, 128, True, 132, HOPPER_SMEM, 16, 1, False, True),
        (9, 28672, 8192, 128, True, 132, HOPPER_SMEM, 4, 1, False, True),
        (16, 14336, 4096, 32, False, 132, HOPPER_SMEM, 8, 1, False, True),
        (32, 4864, 896, 64, True, 132, HOPPER_SMEM, 8, 1, False, True),
        (16, 7424, 4096, 128, True, 132, HOPPER_SMEM, 16, 1, False, True),
        # Not: 115 blocks of 64 channels are fewer than 7/8 of 132 SMs (4096: 64; Qwen's 4864 at 16 tokens: 76),
        # nor on sm_89, where 16 paired warps' rings do not fit a block.
        (16, 7360, 4096, 128, True, 132, HOPPER_SMEM, 8, 1, False, False),
        (16, 4864, 896, 128, True, 132, HOPPER_SMEM, 8, 1, False, False),
        (16, 8192, 8192, 128, True, 128, ADA_SMEM, 8, 1, False, False),
    ],
)
def test_small_m_launch_plan(m, n, k, group, symmetric, sms, smem, warps, splits, weight_ring, paired):
    from quantkern import _C

    plan = _C.w4a16_small_m_plan(m, n, k, group, symmetric, sms, smem)
    assert plan == {"warps": warps, "splits": splits, "weight_ring": weight_ring, "paired": paired}


@needs_extension
@pytest.mark.parametrize(
    "m,n,k,hopper,float16,kernel",
    [
        # Up to 16 tokens: the small-M kernel everywhere.
        (1, 28672, 8192, True, True, "small_m"),
        (16, 4096, 4096, False, True, "small_m"),
        # Beyond, without wgmma: the mma.sync kernel, whatever the shape.
        (17, 4864, 896, False, True, "mma_sync"),
        (2048, 4096, 4096, False, False, "mma_sync"),
        # On Hopper: the small-M kernel for small weights (at most 2^24 codes) up to 32 tokens ...
        (32, 4864, 896, True, True, "small_m"),
        (32, 4096, 4096, True, False, "small_m"),
        (32, 4112, 4096, True, True, "wgmma64"),
        (33, 4096, 4096, True, True, "wgmma64"),
        (32, 8192, 8192, True, True, "wgmma64"),
        # ... for tiny ones (at most 2^23 codes) up to 64 ...
        (64, 4864, 896, True, True, "small_m"),
        (64, 3072, 1024, True, False, "small_m"),
        (65, 4864, 896, True, True, "wgmma128"),
        # ... and for N <= 1536 up to 128 tokens.
        (128, 896, 4864, True, True, "small_m"),
        (128, 1536, 576, True, False, "small_m"),
        (129, 896, 4864, True, True, "wgmma64"),
        (128, 1552, 4096, True, True, "wgmma64"),
        # The wgmma kernel's token tiles: 64 up to 64 tokens; for small weights from 65 tokens (129 above 2^23
        # codes) the cost model's (see test_modelled_wgmma_plan), in fp16 64 before ...
        (65, 4096, 4096, True, True, "wgmma64"),
        (128, 4096, 4096, True, True, "wgmma64"),
        (129, 4096, 4096, True, True, "wgmma128"),
        (512, 4096, 4096, True, True, "wgmma128"),
        (1024, 4096, 4096, True, True, "wgmma256"),
        (65, 3072, 1024, True, True, "wgmma64"),
        (256, 3072, 1024, True, True, "wgmma64"),
        (512, 3072, 1024, True, True, "wgmma128"),
        (512, 896, 4864, True, True, "wgmma128"),
        (512, 4864, 896, True, True, "wgmma256"),
        (2048, 576, 1536, True, True, "wgmma128"),
        (2048, 896, 4864, True, True, "wgmma256"),
        # ... bf16 (its own path, below 1024 tokens for small weights): the model's tile, or 128 ...
        (128, 4864, 896, True, False, "wgmma64"),
        (512, 3072, 1024, True, False, "wgmma128"),
        (65, 4096, 4096, True, False, "wgmma128"),
        # ... else 128 up to 128 tokens, then 256 (fp16) or 128 (bf16).
        (65, 4096, 14336, True, True, "wgmma128"),
        (129, 4096, 14336, True, True, "wgmma256"),
        (2048, 28672, 8192, True, True, "wgmma256"),
        (2048, 28672, 8192, True, False, "wgmma128"),
    ],
)
def test_automatic_kernel_choice(m, n, k, hopper, float16, kernel):
    from quantkern import _C

    assert _C.w4a16_automatic_kernel(m, n, k, hopper, float16) == kernel


@needs_extension
@pytest.mark.parametrize("m,n,k,float16,fits_fp16,kernel", [
    (2048, 8192, 8192, False, True, "wgmma256_staged"),  # bf16 from 256 tokens: fp16's tiles
    (256, 8192, 8192, False, True, "wgmma256_staged"),
    (255, 8192, 8192, False, True, "wgmma128"),
    (1023, 4096, 4096, False, True, "wgmma128"),         # weights of at most 2^24 codes: from 1024 tokens
    (1024, 4096, 4096, False, True, "wgmma256_staged"),
    (2048, 4096, 4096, False, False, "wgmma128"),        # scales out of fp16's range: the bf16 path
    (2048, 4096, 4096, True, True, "wgmma256"),          # (the flag means nothing for fp16)
    (1024, 3072, 1024, False, True, "wgmma256_staged"),  # a tiny weight: fp16's tile rule (the cost model)
    (16, 4096, 4096, False, True, "small_m"),
])
def test_automatic_kernel_stages_bf16(m, n, k, float16, fits_fp16, kernel):
    from quantkern import _C

    assert _C.w4a16_automatic_kernel(m, n, k, True, float16, scales_fit_fp16=fits_fp16) == kernel


@needs_extension
def test_automatic_token_tiles_follow_the_device_s_sm_count():
    from quantkern import _C

    # 896 x 4864 at 512 tokens (the cost model): 38 x 2 blocks of 256 tokens fill 132 SMs better than 38 x 4 of 128
    # (two on some SMs), which 160 SMs hold one each.
    assert _C.w4a16_automatic_kernel(512, 4864, 896, True, True, sm_count=132) == "wgmma256"
    assert _C.w4a16_automatic_kernel(512, 4864, 896, True, True, sm_count=160) == "wgmma128"


@needs_extension
@pytest.mark.parametrize(
    "m,n,k,tokens,bf16_path,plan_tokens,splits",
    [
        # The best of eight forced plans measured on the H100 (docs/PERF.md, session 26; 1024 x 576 x 1536 within
        # 2% of it):
        (512, 1536, 576, 0, False, 64, 1),
        (1024, 1536, 576, 0, False, 128, 1),
        (2048, 576, 1536, 0, False, 128, 1),
        (1024, 576, 1536, 0, False, 128, 3),
        (512, 3072, 1024, 0, False, 128, 1),
        (2048, 1024, 3072, 0, False, 128, 1),
        (1024, 1024, 3072, 0, False, 128, 2),
        (1024, 896, 4864, 0, False, 128, 2),
        (2048, 896, 4864, 0, False, 256, 2),
        # 65-256 tokens (measured: the best of six forced plans, 4096 x 4096 at 256 included):
        (128, 4864, 896, 0, False, 64, 1),
        (256, 4864, 896, 0, False, 128, 1),
        (256, 3072, 1024, 0, False, 64, 1),
        (128, 3072, 1024, 0, False, 64, 2),
        (256, 4096, 4096, 0, False, 128, 2),
        # bf16's path (one 128-token block per SM, no 256-token tile; measured: the best of six forced plans) ...
        (128, 4864, 896, 0, True, 64, 1),
        (128, 3072, 1024, 0, True, 64, 2),
        (512, 4864, 896, 0, True, 64, 1),
        (512, 4096, 4096, 0, True, 128, 1),
        # ... and where fp16 takes 256-token tiles (not measured in bf16):
        (2048, 896, 4864, 0, True, 128, 1),
        # Many tiles: no split.
        (8192, 896, 4864, 0, False, 256, 1),
        # A fixed tile: its splits (at most 4, the most measured, though K = 1536's 24 k-tiles would allow 6).
        (1024, 896, 4864, 64, False, 64, 2),
        (2048, 576, 1536, 256, False, 256, 2),
        (257, 576, 1536, 64, False, 64, 4),
    ],
)
def test_modelled_wgmma_plan(m, n, k, tokens, bf16_path, plan_tokens, splits):
    from quantkern import _C

    plan = _C.w4a16_modelled_wgmma_plan(m, n, k, tokens, bf16_path=bf16_path)
    assert plan == {"tokens": plan_tokens, "splits": splits}


@needs_extension
def test_modelled_wgmma_plan_refuses_bad_arguments():
    from quantkern import _C

    with pytest.raises(RuntimeError, match="tokens must be"):
        _C.w4a16_modelled_wgmma_plan(512, 1536, 576, 32)
    with pytest.raises(RuntimeError, match="multiple of 64"):
        _C.w4a16_modelled_wgmma_plan(512, 1536, 500)
    with pytest.raises(RuntimeError, match="no 256-token tile"):
        _C.w4a16_modelled_wgmma_plan(512, 1536, 576, 256, bf16_path=True)


@needs_extension
def test_op_is_registered_and_refuses_cpu_tensors():
    from quantkern import _C

    assert "w4a16_gemm" in _C.build_info()["kernels"]
    prepared = prepare_w4a16(random_qweight(128, 64, 64, True), torch.float16)
    with pytest.raises(NotImplementedError):
        w4a16_linear(torch.randn(2, 128).half(), prepared)


def test_fake_gives_the_output_shape():
    from quantkern._fake import w4a16_gemm_fake

    prepared = prepare_w4a16(random_qweight(128, 48, 64, False, scale_dtype=torch.bfloat16), torch.bfloat16)
    x = torch.empty(3, 128, dtype=torch.bfloat16, device="meta")
    y = w4a16_gemm_fake(x, prepared["qweight"], prepared["scales"], prepared["zeros"], None, prepared["locks"], 64)
    assert y.shape == (3, 48) and y.dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------------

def rel_err(y, ref):
    return ((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def run_case(k, n, m, group_size, symmetric, dtype, with_bias, seed=0, weight=None):
    qw = weight or random_qweight(k, n, group_size, symmetric, scale_dtype=dtype, device="cuda", seed=seed)
    prepared = prepare_w4a16(qw, dtype)
    gen = torch.Generator(device="cuda").manual_seed(seed + 1)
    x = torch.randn(m, k, device="cuda", generator=gen).to(dtype)
    bias = (torch.randn(n, device="cuda", generator=gen) * 0.1).to(dtype) if with_bias else None
    y = w4a16_linear(x, prepared, bias)
    y_ref = x.float() @ reference.dequantize_weight(qw).T + (bias.float() if with_bias else 0.0)
    return y, y_ref, (x, prepared, bias)


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("k,n", GPU_SHAPES)
def test_matches_reference_over_tokens(k, n, group_size, symmetric, dtype):
    from quantkern import _C

    if not fits(k, group_size):
        pytest.skip(f"group {group_size} does not divide K={k}")
    qw = random_qweight(k, n, group_size, symmetric, scale_dtype=dtype, device="cuda")
    for i, m in enumerate(TOKENS):
        y, y_ref, _ = run_case(k, n, m, group_size, symmetric, dtype, with_bias=i % 2 == 1, seed=i, weight=qw)
        assert y.shape == (m, n) and y.dtype == dtype
        assert torch.isfinite(y).all()
        err = rel_err(y, y_ref)
        assert err <= 2e-3, f"M={m}: relative error {err:.2e}"
        # The scales are applied in fp32, so apart from accumulation order the only rounding is y's
        # own: against the reference rounded to x's dtype the error is far below that rounding. The
        # small-M kernel (M <= 16) removes the conversion offset after the mma (MAGIC * sum(x), see
        # csrc/w4a16_small_m.cu), which Hopper's mma accumulation rounds: measured up to 1.9e-4 there
        # against 8e-5 for the large-M kernel.
        # The Hopper (wgmma) kernel in fp16 multiplies the scale into the 16-bit weight operand (each
        # weight rounded to 11 bits, see csrc/w4a16_wgmma.cu): measured up to 3.3e-4 there (H100).
        err_rounded = rel_err(y, y_ref.to(dtype))
        kernel = _C.w4a16_automatic_kernel(m, n, k, wgmma_kernel_available(), dtype == torch.float16,
                                           scales_fit_fp16=True)
        # bf16 staged as fp16 rounds the weight operand to 11 bits too: with zero points (code - zero) * scale can
        # need 12 (1.1e-4 relative error before y's rounding, in a CPU emulation), enough to flip bf16 roundings:
        # 6e-4 against the rounded reference in that emulation (0 without zero points; the GPU's fp32 accumulation
        # adds to it: up to 3.8e-4 without zero points measured on the H100 at K = 28672).
        wgmma_fp16 = kernel.startswith("wgmma") and dtype == torch.float16
        bound = (4e-4 if kernel == "small_m" else 6e-4 if wgmma_fp16 else 1e-3 if kernel.endswith("_staged")
                 else 2e-4)
        assert err_rounded <= bound, f"M={m}: relative error {err_rounded:.2e} against the rounded reference"


@pytest.mark.gpu
@needs_extension
# (192, 80): an odd number of 16-channel strips and of 64-deep k-tiles (the small-M kernel's edges).
@pytest.mark.parametrize("k,n", [(4096, 4096), (576, 576), (8192, 1024), (192, 80)])
@pytest.mark.parametrize("tile_m", [1, 3, 4, 16, 64, 128])
@pytest.mark.parametrize("split_k", [1, 3, 8])
def test_every_tile_and_split_agrees(k, n, tile_m, split_k):
    if tile_m in (3, 4, 5) and not wgmma_kernel_available():
        pytest.skip("the wgmma kernel needs an sm_90 GPU and an extension built for 9.0a")
    for m in (1, 17, 100):
        y, y_ref, (x, prepared, bias) = run_case(k, n, m, 64, False, torch.bfloat16, with_bias=True)
        y = w4a16_linear(x, prepared, bias, split_k=split_k, tile_m=tile_m)
        # (Against the reference rounded to bf16: at K = 192 bf16's own rounding of y is ~2e-3.)
        assert rel_err(y, y_ref.to(y.dtype)) <= 2e-3
        assert not prepared["locks"].any()  # the scratch counters are restored


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
# (192, 80) and (576, 1536): an odd number of k-tiles (the last chunk's missing tile re-reads scale rows);
# (4096, 14336): 4-warp blocks, (8192, 1024): K split.
@pytest.mark.parametrize("k,n", [(192, 80), (576, 1536), (4096, 4096), (8192, 1024), (4096, 14336)])
def test_small_m_weight_ring_matches_register_stages(k, n, dtype):
    # Below 5 tokens on Hopper, group 32 with zero points, the small-M kernel streams weights, scales and
    # zeros through each warp's shared-memory ring (tile_m 1 or automatic); tile_m 2 runs the same kernel
    # with register stages. Same sums in the same order: the same bits.
    from quantkern import _C

    group_size, symmetric = 32, False
    props = torch.cuda.get_device_properties(0)
    plan = _C.w4a16_small_m_plan(1, n, k, group_size, symmetric, props.multi_processor_count,
                                 props.shared_memory_per_block_optin)
    if not plan["weight_ring"]:
        pytest.skip("the weight ring needs 16 warps' rings per SM (Hopper's shared memory)")
    qw = random_qweight(k, n, group_size, symmetric, scale_dtype=dtype, device="cuda")
    for m in (1, 2, 3, 4):
        for split_k in (0, 3):
            _, y_ref, (x, prepared, bias) = run_case(k, n, m, group_size, symmetric, dtype, with_bias=m % 2 == 0,
                                                     seed=m, weight=qw)
            y_ring = w4a16_linear(x, prepared, bias, split_k=split_k, tile_m=1)
            y_registers = w4a16_linear(x, prepared, bias, split_k=split_k, tile_m=2)
            assert torch.equal(y_ring, y_registers), (m, split_k)
            # (Against the fp32 reference a bf16 output's own rounding alone reaches ~2e-3: 192 x 80 measured
            # 2.15e-3; the bound of test_matches_reference_over_tokens is against the rounded reference.)
            assert rel_err(y_ring, y_ref.to(dtype)) <= 4e-4, (m, split_k)
            assert not prepared["locks"].any()


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group_size,symmetric", [(32, False), (64, True), (128, True), (-1, False)])
# (192, 80) and (576, 1536): an odd number of k-tiles (the last chunk has no second tile of activations).
@pytest.mark.parametrize("k,n", [(192, 80), (576, 1536), (4096, 4096), (8192, 1024)])
def test_small_m_partial_token_tiles(k, n, group_size, symmetric, dtype):
    # From 5 tokens the small-M kernel stages activations in each warp's ring, where rows past M read as zeros.
    # Every count of rows in a last token tile of one or two 8-token tiles, and a second token tile (M = 17,
    # 31), against the reference.
    if not fits(k, group_size):
        pytest.skip(f"group {group_size} does not divide K={k}")
    qw = random_qweight(k, n, group_size, symmetric, scale_dtype=dtype, device="cuda")
    for m in (5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 31):
        _, y_ref, (x, prepared, bias) = run_case(k, n, m, group_size, symmetric, dtype, with_bias=m % 2 == 0,
                                                 seed=m, weight=qw)
        y = w4a16_linear(x, prepared, bias, tile_m=1)  # (forced: M = 17 and 31 may go elsewhere automatically)
        assert torch.isfinite(y).all()
        assert rel_err(y, y_ref.to(dtype)) <= 4e-4, f"M={m}"
        assert not prepared["locks"].any()


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group_size,symmetric", [(32, False), (64, True), (128, True), (-1, False)])
# (576, 8192): an odd number of k-tiles; (192, 8240): 2 chunks for up to 8 pairs (pairs without a chunk), 515
# strips (the last block's second warp of each pair has one strip left, then none); (4096, 14336): 4-warp blocks.
@pytest.mark.parametrize("k,n", [(576, 8192), (192, 8240), (4096, 14336)])
def test_small_m_warp_pairs_match_the_reference(k, n, group_size, symmetric, dtype):
    # From 9 tokens a tile, where 64-channel blocks fill the SMs, the small-M kernel's warps work in pairs that
    # share each chunk's activations (PAIRED in csrc/w4a16_small_m.cu): every count of rows in a last token tile
    # of two 8-token tiles, and two token tiles (M = 17, 31), against the reference; the same bits twice.
    from quantkern import _C

    if not fits(k, group_size):
        pytest.skip(f"group {group_size} does not divide K={k}")
    props = torch.cuda.get_device_properties(0)
    qw = random_qweight(k, n, group_size, symmetric, scale_dtype=dtype, device="cuda")
    for m in (9, 10, 11, 12, 13, 14, 15, 16, 17, 31):
        plan = _C.w4a16_small_m_plan(m, n, k, group_size, symmetric, props.multi_processor_count,
                                     props.shared_memory_per_block_optin)
        if not plan["paired"]:
            pytest.skip(f"no warp pairs for {m} x {k} x {n} on this GPU ({props.multi_processor_count} SMs)")
        _, y_ref, (x, prepared, bias) = run_case(k, n, m, group_size, symmetric, dtype, with_bias=m % 2 == 0,
                                                 seed=m, weight=qw)
        y = w4a16_linear(x, prepared, bias, tile_m=1)  # (forced: M = 17 and 31 may go elsewhere automatically)
        assert torch.isfinite(y).all()
        assert rel_err(y, y_ref.to(dtype)) <= 4e-4, f"M={m}"
        assert torch.equal(y, w4a16_linear(x, prepared, bias, tile_m=1)), f"M={m}"
        assert not prepared["locks"].any()


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
# (6208, 80): per channel, 97 k-tiles (the last chunk has one), 3 strips (the second block half empty);
# (8192, 48): group 128. Unsplit, every warp of a 16-warp block takes 3-4 chunks.
@pytest.mark.parametrize("k,n,group_size", [(6208, 80, -1), (8192, 48, 128)])
def test_small_m_early_refill(k, n, group_size, dtype):
    # Below 5 tokens, symmetric, one scale row per chunk: the small-M kernel loads the weights of a warp's
    # chunk two ahead as soon as each k-tile's registers are read (EARLY_REFILL in csrc/w4a16_small_m.cu),
    # which only runs where a warp has at least 3 chunks.
    qw = random_qweight(k, n, group_size, True, scale_dtype=dtype, device="cuda")
    for m in (1, 2, 3, 4):
        _, y_ref, (x, prepared, bias) = run_case(k, n, m, group_size, True, dtype, with_bias=m % 2 == 0,
                                                 seed=m, weight=qw)
        y = w4a16_linear(x, prepared, bias, split_k=1, tile_m=1)
        assert rel_err(y, y_ref.to(dtype)) <= 4e-4, f"M={m}"
        assert torch.equal(y, w4a16_linear(x, prepared, bias, split_k=1, tile_m=1))


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group_size", [32, 128, -1])
@pytest.mark.parametrize("tile_m", [3, 4, 5])
def test_wgmma_kernel_edges(tile_m, group_size, dtype):
    # Token counts around the 64 / 128-token tiles, a partial last channel block (N = 80, 208), K of
    # one k-tile and of an odd count; splits that start inside a group (per-channel, group 128 with 3).
    if not wgmma_kernel_available():
        pytest.skip("the wgmma kernel needs an sm_90 GPU and an extension built for 9.0a")
    if tile_m == 5 and dtype == torch.bfloat16:
        pytest.skip("256-token tiles are for float16")
    for k, n in [(64, 80), (192, 208), (4096, 1024)]:
        if not fits(k, group_size):
            continue
        for m in (17, 63, 64, 65, 127, 129, 255, 257):
            for split_k in (1, 3):
                for symmetric in (True, False):
                    y, y_ref, (x, prepared, bias) = run_case(k, n, m, group_size, symmetric, dtype,
                                                             with_bias=m % 2 == 1)
                    y = w4a16_linear(x, prepared, bias, split_k=split_k, tile_m=tile_m)
                    err = rel_err(y, y_ref.to(dtype))
                    assert err <= 2e-3, f"K={k} N={n} M={m} split {split_k}: relative error {err:.2e}"
                    assert not prepared["locks"].any()


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tile_m,tokens", [(3, 64), (4, 128)])
def test_wgmma_fewer_tokens_than_a_tile_give_the_full_tile_s_rows(tile_m, tokens, dtype):
    # One token tile of M < tokens copies only the x rows that exist (a box of M rounded up to 8 rows) and zeroes
    # the tile's other rows once: each output row is the same sum as in a full tile, bit for bit (every token is
    # its own wgmma column), with splits and a partial channel block.
    if not wgmma_kernel_available():
        pytest.skip("the wgmma kernel needs an sm_90 GPU and an extension built for 9.0a")
    k, n = 1024, 208
    _, _, (x_full, prepared, bias) = run_case(k, n, tokens, 128, False, dtype, with_bias=True)
    for split_k in (1, 3):
        y_full = w4a16_linear(x_full, prepared, bias, split_k=split_k, tile_m=tile_m)
        for m in (17, 24, 33, tokens - 1):
            y = w4a16_linear(x_full[:m].clone(), prepared, bias, split_k=split_k, tile_m=tile_m)
            assert torch.equal(y, y_full[:m]), f"M={m} split {split_k}"


def staged_and_bf16_path(x, prepared, bias, tile_m=0, split_k=0):
    """The op on bf16 x twice: as prepared (staged as fp16 where it qualifies) and with scales_fit_fp16 off (where
    256-token tiles, tile_m 5, are refused: 128 instead)."""
    plain = dict(prepared, scales_fit_fp16=False)
    return (w4a16_linear(x, prepared, bias, tile_m=tile_m, split_k=split_k),
            w4a16_linear(x, plain, bias, tile_m=4 if tile_m == 5 else tile_m, split_k=split_k))


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("group_size", [32, 128, -1])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("k,n", [(4096, 4096), (14336, 4096), (576, 1536), (192, 208)])
def test_bf16_staged_as_fp16_matches_the_reference(k, n, group_size, symmetric):
    # From 256 tokens on the wgmma kernel (1024 for weights of at most 2^24 codes), bf16 x runs as exact fp16 rows
    # times powers of two; the bf16 path (scales_fit_fp16 off) is the comparison. Partial token tiles, a partial
    # channel block (N = 208), splits.
    if not wgmma_kernel_available():
        pytest.skip("the wgmma kernel needs an sm_90 GPU and an extension built for 9.0a")
    if not fits(k, group_size):
        pytest.skip(f"group {group_size} does not divide K={k}")
    from quantkern import _C

    qw = random_qweight(k, n, group_size, symmetric, scale_dtype=torch.bfloat16, device="cuda")
    m0 = 256 if k * n > 2 ** 24 else 1024  # the first staged token count
    cases = [(m0, 0, 0), (m0 + 44, 0, 0), (2048, 0, 0), (m0 + 1, 5, 3), (m0 + 255, 4, 2)]
    for i, (m, tile_m, split_k) in enumerate(cases):
        y, y_ref, (x, prepared, bias) = run_case(k, n, m, group_size, symmetric, torch.bfloat16,
                                                 with_bias=i % 2 == 0, seed=i, weight=qw)
        assert prepared["scales_fit_fp16"]
        assert _C.w4a16_automatic_kernel(m, n, k, True, False, scales_fit_fp16=True).endswith("_staged")
        staged, plain = staged_and_bf16_path(x, prepared, bias, tile_m=tile_m, split_k=split_k)
        if tile_m == 0:
            assert torch.equal(staged, y)
        for out in (staged, plain):
            assert rel_err(out, y_ref) <= 2e-3
        # (the 11-bit weight operand: see test_matches_reference_over_tokens)
        assert rel_err(staged, y_ref.to(torch.bfloat16)) <= 1e-3
        assert rel_err(plain, y_ref.to(torch.bfloat16)) <= 2e-4
        assert torch.equal(w4a16_linear(x, prepared, bias, tile_m=tile_m, split_k=split_k), staged)
        assert not prepared["locks"].any()
    with pytest.raises(RuntimeError, match="tile_m 5"):  # 256-token tiles for bf16 only when staged
        w4a16_linear(x[:255].contiguous(), prepared, tile_m=5)


@pytest.mark.gpu
@needs_extension
def test_bf16_staging_keeps_every_row_s_range():
    # Each row's power of two: huge rows (beyond fp16's range), tiny ones, zeros, and non-finite values (which stay
    # in their own row). Reference in float64, row by row.
    if not wgmma_kernel_available():
        pytest.skip("the wgmma kernel needs an sm_90 GPU and an extension built for 9.0a")
    from quantkern import _C

    k, n, m = 1024, 512, 1100
    assert _C.w4a16_automatic_kernel(m, n, k, True, False, scales_fit_fp16=True).endswith("_staged")
    qw = random_qweight(k, n, 128, False, scale_dtype=torch.bfloat16, device="cuda")
    prepared = prepare_w4a16(qw, torch.bfloat16)
    x = torch.randn(m, k, device="cuda")
    x[1] *= 1e30
    x[2] *= 1e-30
    x[3] = 0
    x[4, 7] = 1e36
    x[5] *= 3e4
    x[6, :100] *= 1e20
    x[7] *= 2.0 ** -60
    x = x.to(torch.bfloat16)
    y, plain = staged_and_bf16_path(x, prepared, None)
    ref = x.double() @ reference.dequantize_weight(qw).double().T
    row_err = (y.double() - ref).norm(dim=1) / ref.norm(dim=1).clamp_min(1e-300)
    assert row_err[3] == 0 and (y[3] == 0).all()
    others = torch.cat([row_err[:3], row_err[4:]])
    assert others.max() <= 3e-3, row_err[:8]
    assert torch.isfinite(y).all() and torch.isfinite(plain).all()
    x[9, 5] = float("nan")
    x[10, 6] = float("inf")
    y, plain = staged_and_bf16_path(x, prepared, None)
    for out in (y, plain):
        assert out[9].isnan().all() and not torch.isfinite(out[10]).any()
        assert torch.isfinite(out[11:]).all() and torch.isfinite(out[:9]).all()


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("m", [1, 16, 64, 2048])
def test_is_deterministic(m):
    y, _, (x, prepared, bias) = run_case(4096, 4096, m, 128, False, torch.float16, with_bias=True)
    for _ in range(3):
        assert torch.equal(w4a16_linear(x, prepared, bias), y)


@pytest.mark.gpu
@needs_extension
def test_under_torch_compile_and_cuda_graph():
    y, y_ref, (x, prepared, bias) = run_case(1536, 576, 16, 32, False, torch.float16, with_bias=True)

    compiled = torch.compile(lambda t: w4a16_linear(t, prepared, bias), fullgraph=True)
    assert torch.equal(compiled(x), y)

    static_x = x.clone()
    w4a16_linear(static_x, prepared, bias)  # warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = w4a16_linear(static_x, prepared, bias)
    new_x = torch.randn_like(x)
    static_x.copy_(new_x)
    graph.replay()
    graph.replay()  # the split-K counters must be reset between replays
    torch.cuda.synchronize()
    assert torch.equal(static_y, w4a16_linear(new_x, prepared, bias))


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("k,m,group_size,symmetric", [
    (4096, 1, 128, True),   # one wave of 16-warp blocks, split K (partials and counters)
    (576, 4, 64, True),     # split K over many small blocks
    (1536, 16, 32, False),  # two token tiles, the activation ring
    (4096, 2, 32, False),   # group 32 with zeros: the weight ring
])
def test_dependent_calls_see_the_previous_output(k, m, group_size, symmetric):
    # On sm_90, inside CUDA-graph capture, a small-M call right after another is launched as its programmatic
    # dependent and streams its first weights before that kernel has finished. Here each call reads the
    # previous one's output (and reuses its split-K counters) and must give what calls run one by one give,
    # from a new input at every replay (a kernel reading its input too early would see the last replay's).
    torch.manual_seed(0)
    w = torch.randn(k, k, device="cuda") / k ** 0.5  # about norm-preserving: 8 layers stay finite in fp16
    prepared = prepare_w4a16(reference.quantize_weight(w, 4, group_size, symmetric=symmetric), torch.float16)

    def chain(t):  # GEMM after GEMM, nothing in between
        outs = []
        for _ in range(8):
            t = w4a16_linear(t, prepared)
            outs.append(t)
        return outs

    def one_by_one(t):
        outs = []
        for _ in range(8):
            t = w4a16_linear(t, prepared)
            torch.cuda.synchronize()
            outs.append(t.clone())
        return outs

    check_graph_replays(chain, one_by_one, (m, k), torch.float16)


def check_graph_replays(chain, one_by_one, shape, dtype, replays=3):
    """``chain`` (input -> list of outputs) captured in a CUDA graph and replayed on a new input each time, and run
    eagerly, must give exactly ``one_by_one``'s outputs for that input (calls separated by synchronizations): a
    kernel that read its input too early would see the last replay's."""
    static_x = torch.randn(*shape, device="cuda", dtype=dtype)
    chain(static_x)  # warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_outs = chain(static_x)
    for _ in range(replays):
        x = torch.randn(*shape, device="cuda", dtype=dtype)
        static_x.copy_(x)
        graph.replay()
        torch.cuda.synchronize()
        want = one_by_one(x)
        assert want[-1].isfinite().all() and want[-1].abs().amax() > 0
        for got, expected in zip(static_outs, want):
            assert torch.equal(got, expected)
        for got, expected in zip(chain(x), want):  # eager, back to back
            assert torch.equal(got, expected)


@pytest.mark.gpu
@needs_extension
def test_misaligned_input_is_served():
    y, y_ref, (x, prepared, bias) = run_case(576, 1536, 3, 64, True, torch.float16, with_bias=False)
    base = torch.empty(x.numel() + 1, device="cuda", dtype=x.dtype)
    shifted = base[1:].view_as(x)
    shifted.copy_(x)
    assert torch.equal(w4a16_linear(shifted, prepared), y)


@pytest.mark.gpu
@needs_extension
def test_zero_tokens():
    prepared = prepare_w4a16(random_qweight(576, 1536, 64, True, device="cuda"), torch.float16)
    y = w4a16_linear(torch.empty(0, 576, device="cuda", dtype=torch.float16), prepared)
    assert y.shape == (0, 1536)


@pytest.mark.gpu
@needs_extension
def test_op_checks_its_input():
    prepared = prepare_w4a16(random_qweight(256, 64, 64, False, device="cuda"), torch.float16)
    x = torch.randn(8, 256, device="cuda", dtype=torch.float16)
    op = torch.ops.quantkern.w4a16_gemm
    args = lambda **kw: {**dict(x=x, qweight=prepared["qweight"], scales=prepared["scales"],  # noqa: E731
                               zeros=prepared["zeros"], bias=None, locks=prepared["locks"], group_size=64), **kw}
    cases = [
        (args(x=x.float()), "float16 or bfloat16"),
        (args(x=x.bfloat16()), "scales must have x's dtype"),
        (args(x=x[:, :128]), "contiguous"),
        (args(x=x.t().contiguous().t()), "contiguous"),
        (args(x=x[None]), "2-D"),
        (args(x=x[:, :192].contiguous()), "qweight must have shape"),
        (args(x=x.cpu()), "CUDA tensor"),
        (args(qweight=prepared["qweight"].float()), "int32"),
        (args(group_size=32), "scales must have shape"),
        (args(group_size=48), "group_size must be"),
        (args(zeros=prepared["zeros"].float()), "zeros must have x's dtype"),
        (args(bias=torch.zeros(63, device="cuda", dtype=torch.float16)), "bias must have shape"),
        (args(bias=torch.zeros(64, device="cuda")), "bias must have x's dtype"),
        (args(tile_m=32), "tile_m"),
        (args(tile_m=6), "tile_m"),
        (args(tile_m=-1), "tile_m"),
    ]
    for kwargs, match in cases:
        with pytest.raises(RuntimeError, match=match):
            op(**kwargs)
    with pytest.raises(TypeError, match="prepared for"):
        w4a16_linear(x.bfloat16(), prepared)
