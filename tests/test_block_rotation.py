"""Dense per-block rotation (e.g. PCA rotations of head_dim blocks), alone and fused with per-token
quantization: the reference from first principles, then the Triton kernel against it (on a GPU if there is
one, else under TRITON_INTERPRET=1)."""

import pytest
import torch

from quantkern import backends, ops, reference
from quantkern.rotation import block_hadamard_transform, hadamard_matrix
from tests.test_hadamard_kernels import quantize_rotated_written_out

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
triton_ok = pytest.mark.skipif(not backends.status("triton").available, reason="triton missing")


def orthogonal(b, blocks=None, seed=0):
    """A random orthogonal [b, b] matrix, or [blocks, b, b] of them (as a PCA of each block would give)."""
    g = torch.Generator().manual_seed(seed)
    make = lambda: torch.linalg.qr(torch.randn(b, b, generator=g, dtype=torch.float64))[0].float()  # noqa: E731
    return make() if blocks is None else torch.stack([make() for _ in range(blocks)])


# ----------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shared", [True, False])
def test_reference_is_a_block_diagonal_matrix_product(shared):
    b, k = 16, 64
    rotation = orthogonal(b, None if shared else k // b)
    x = torch.randn(3, 2, k, dtype=torch.float64)
    blocks = [rotation if shared else rotation[j] for j in range(k // b)]
    expected = x @ torch.block_diag(*blocks).double().T
    assert torch.allclose(reference.block_rotate(x.float(), rotation).double(), expected, atol=1e-5)
    y = reference.block_rotate(x, rotation)  # fp64 stays fp64
    assert y.dtype == torch.float64 and torch.allclose(y, expected, atol=1e-12)
    # Orthogonal blocks keep each block's norm.
    assert torch.allclose(y.reshape(3, 2, k // b, b).norm(dim=-1), x.reshape(3, 2, k // b, b).norm(dim=-1))


def test_reference_with_identity_and_hadamard_blocks():
    x = torch.randn(5, 128).half()
    assert torch.equal(reference.block_rotate(x, torch.eye(32)), x)
    h = hadamard_matrix(32).float() / 32 ** 0.5
    assert torch.allclose(reference.block_rotate(x.float(), h), block_hadamard_transform(x.float(), 32), atol=1e-5)


@pytest.mark.parametrize("bits", [4, 8])
def test_fused_reference_is_the_two_calls(bits):
    # Expected from the dense block-diagonal matrix in fp64, not reference.block_rotate (the reference branch's
    # own code); a 3-D x for the op's reshape. Own generator: a fixed draw (bf16 codes of 200 draws all equal the
    # fp64 path's exactly).
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 256, generator=g).bfloat16()
    x[1, 2] = 0  # all-zero row: scale 1
    rotation = orthogonal(64, 4)
    q, s = ops.block_rotate_quantize(x, rotation, bits, 0.9, backend="reference")
    exact = x.double() @ torch.block_diag(*rotation).double().T
    q_ref, s_ref = quantize_rotated_written_out(exact, torch.bfloat16, bits, 0.9)
    assert q.shape == (2, 3, 128 if bits == 4 else 256) and s.shape == (2, 3)
    assert torch.equal(s, s_ref) and torch.equal(q, q_ref)


@pytest.mark.parametrize("call,message", [
    (lambda x: ops.block_rotate(x, torch.randn(4, 5)), r"\[b, b\]"),
    (lambda x: ops.block_rotate(x, torch.randn(64)), r"\[b, b\]"),
    (lambda x: ops.block_rotate(x, torch.randn(5, 5)), "not a multiple of the rotation's block size 5"),
    (lambda x: ops.block_rotate(x, torch.randn(3, 16, 16)), "rotation has 3 blocks"),
    (lambda x: ops.block_rotate(x, torch.eye(16, dtype=torch.int32)), "floating-point"),
    (lambda x: ops.block_rotate(x.int(), torch.eye(16)), "x must have dtype"),
    (lambda x: ops.block_rotate(x, torch.eye(16, device="meta")), "rotation is on meta"),
    (lambda x: ops.block_rotate_quantize(x, torch.eye(16), bits=3), "bits"),
    (lambda x: ops.block_rotate_quantize(x, torch.eye(16), clip_ratio=0.0), "clip"),
])
def test_bad_inputs_are_refused_clearly(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call(torch.randn(2, 64))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_an_empty_last_dimension_is_refused_on_every_backend(backend):
    # K = 0 is a multiple of every block size: it was a silent empty result (reference) or a reshape error (triton).
    x, rotation = torch.zeros(3, 0, device=DEVICE), torch.eye(4, device=DEVICE)
    message = r": x has no features: its last dimension is empty \(shape \(3, 0\)\)"
    with pytest.raises(ValueError, match="^block_rotate" + message):
        ops.block_rotate(x, rotation, backend=backend)
    with pytest.raises(ValueError, match="^block_rotate_quantize" + message):
        ops.block_rotate_quantize(x, rotation, backend=backend)


# ----------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------

# (rows, K, b): SmolLM2 (576 = 9 heads x 64), Qwen2.5-0.5B (896 = 14 x 64), Llama-3 (4096 = 32 x 128),
# head_dim 96 and 256, small blocks (below tl.dot's 16), rows for 16-, 64- and 128-row programs (the last
# tile partial), and no rows.
SHAPES = [(1, 576, 64), (17, 576, 64), (3, 896, 64), (2, 4096, 128), (5, 192, 96), (2, 512, 256),
          (33, 64, 8), (4, 12, 6), (130, 256, 64), (0, 128, 64)]


def tolerance(dtype, b):
    """Relative difference allowed between two fp32 summation orders of b products of unit-scale values,
    rounded to dtype: one unit in the last place of fp16 / bf16, or b fp32 roundings for fp32 rows."""
    return {torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}.get(dtype, 4 * b * 2 ** -24)


def codes_of(q, bits):
    return (reference.unpack_int4_signed(q) if bits == 4 else q).int()


@triton_ok
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows,k,b", SHAPES)
def test_triton_block_rotate_matches_the_reference(rows, k, b, dtype, shared):
    x = torch.randn(rows, k, device=DEVICE).to(dtype)
    rotation = orthogonal(b, None if shared else k // b).to(DEVICE)
    y = ops.block_rotate(x, rotation, backend="triton")
    expected = reference.block_rotate(x, rotation)
    assert y.dtype == dtype and y.shape == x.shape
    # Another fp32 summation order: the sums differ by fp32 roundings, then x's dtype rounds them.
    tol = tolerance(dtype, b)
    assert torch.allclose(y.float(), expected.float(), rtol=tol, atol=tol)


def assert_fused_result_matches_the_reference(q, scales, x, rotation, bits, clip):
    """The bounds every fused kernel meets: its own split of R and fp32 summation order, against the reference."""
    q_ref, s_ref = reference.quantize_per_token(reference.block_rotate(x, rotation), bits, clip)
    assert q.dtype == q_ref.dtype and q.shape == q_ref.shape and scales.shape == s_ref.shape
    # The scale comes from the absmax of the rotated values rounded to x's dtype: that rounding can move by
    # one unit of x's dtype where the fp32 sums differ in their last bits.
    assert torch.allclose(scales, s_ref, rtol=tolerance(x.dtype, rotation.shape[-1]), atol=0)
    diff = (codes_of(q, bits) - codes_of(q_ref, bits)).abs()
    if diff.numel():
        assert diff.max().item() <= 1  # one step at a rounding boundary, no more
        # int8 codes of bf16 rows are finer than bf16 itself (127 steps against 8 significant bits): more of
        # them sit at a boundary (measured up to 1.3% of codes over 400 draws at 17 x 576, b = 64).
        assert diff.float().mean().item() < (0.03 if bits == 8 and x.dtype == torch.bfloat16 else 0.01)
    if x.shape[0] > 2:  # the callers zero row 1: an all-zero row takes the scale-1 path
        assert torch.equal(scales[1], torch.ones((), device=x.device)) and not codes_of(q[1], bits).any()


@triton_ok
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows,k,b", SHAPES)
def test_triton_fused_rotation_and_quantization_match_the_reference(rows, k, b, dtype, shared, bits):
    # A fixed draw per case (an unseeded one made the mean bound below fail about once in 100 runs).
    generator = torch.Generator().manual_seed(rows * 100003 + k * 101 + b)
    x = (torch.randn(rows, k, generator=generator) * 3).to(DEVICE, dtype)
    if rows > 2:
        x[1] = 0  # an all-zero row takes the scale-1 path
    rotation = orthogonal(b, None if shared else k // b, seed=1).to(DEVICE)
    clip = 0.9 if shared else 1.0
    q, scales = ops.block_rotate_quantize(x, rotation, bits, clip, backend="triton")
    assert_fused_result_matches_the_reference(q, scales, x, rotation, bits, clip)


@triton_ok
def test_triton_fused_op_keeps_the_leading_shape():
    x = torch.randn(2, 3, 128, device=DEVICE, dtype=torch.float16)
    rotation = orthogonal(64).to(DEVICE)
    q, scales = ops.block_rotate_quantize(x, rotation, 4, backend="triton")
    assert q.shape == (2, 3, 64) and scales.shape == (2, 3)
    q2, s2 = ops.block_rotate_quantize(x.reshape(6, 128), rotation, 4, backend="triton")
    assert torch.equal(q.reshape(6, 64), q2) and torch.equal(scales.reshape(6), s2)


@triton_ok
def test_triton_refuses_what_it_cannot_run():
    x = torch.randn(2, 12, device=DEVICE, dtype=torch.float16)
    with pytest.raises(ValueError, match="block size must be even"):
        ops.block_rotate_quantize(x, torch.eye(3, device=DEVICE), 4, backend="triton")
    with pytest.raises(ValueError, match="at most 1024"):
        ops.block_rotate(torch.randn(1, 2048, device=DEVICE), torch.eye(2048, device=DEVICE), backend="triton")


@pytest.mark.gpu
@triton_ok
def test_gpu_compile_and_cuda_graph_capture():
    x = torch.randn(40, 896, device="cuda", dtype=torch.float16)
    rotation = orthogonal(64, 14).cuda()
    eager = ops.block_rotate_quantize(x, rotation, 4)
    compiled = torch.compile(lambda t: ops.block_rotate_quantize(t, rotation, 4), fullgraph=True)(x)
    assert all(torch.equal(a, b) for a, b in zip(eager, compiled))
    graph = torch.cuda.CUDAGraph()
    ops.block_rotate_quantize(x, rotation, 4)  # warm-up (compiles the kernel) outside the capture
    with torch.cuda.graph(graph):
        captured = ops.block_rotate_quantize(x, rotation, 4)
    graph.replay()
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(eager, captured))


# ----------------------------------------------------------------------------------------------
# CUDA kernel (csrc/block_rotation.cu): fp16/bf16 rows, one [b, b] rotation for every block, b = 64 or 128
# ----------------------------------------------------------------------------------------------

cuda_status = backends.status("cuda")
needs_cuda_kernel = pytest.mark.skipif(
    not (torch.cuda.is_available() and "block_rotate_quantize" in cuda_status.kernels),
    reason=f"no CUDA block_rotate_quantize kernel here: {cuda_status.reason}")

# (rows, K, b): tiles of 4 and 8 rows (the last one partial, or past M), SmolLM2 (576 = 9 x 64: a last step of one
# block), Qwen2.5-0.5B (896), Llama-3-8B and -70B (4096, 8192), one step and many, clusters of 1-16 CTAs on the
# H100 for few rows (16 for one or two tiles: 3 and 16 rows of 4096, 2 of 8192, 1 of 14336), none for many rows of up
# to 4096, and for many wide rows clusters of 2 (8192) and 4 (14336: 28 of its 112 steps a CTA) that keep two CTAs an
# SM; no rows.
CUDA_SHAPES = [(1, 576, 64), (5, 576, 64), (3, 192, 64), (17, 896, 64), (3, 4096, 128), (16, 4096, 128),
               (33, 4096, 128), (2, 8192, 128), (20, 8192, 128), (9, 128, 128), (300, 2048, 64), (1100, 1024, 128),
               (300, 8192, 128), (1, 14336, 128), (300, 14336, 128), (0, 256, 64)]


@pytest.mark.gpu
@needs_cuda_kernel
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows,k,b", CUDA_SHAPES)
def test_cuda_fused_rotation_and_quantization_match_the_reference(rows, k, b, dtype, bits):
    generator = torch.Generator().manual_seed(rows * 100003 + k * 101 + b)
    x = (torch.randn(rows, k, generator=generator) * 3).to("cuda", dtype)
    if rows > 2:
        x[1] = 0  # an all-zero row takes the scale-1 path
    rotation = orthogonal(b, seed=1).cuda()
    clip = 0.9 if bits == 4 else 1.0
    q, scales = ops.block_rotate_quantize(x, rotation, bits, clip, backend="cuda")
    assert_fused_result_matches_the_reference(q, scales, x, rotation, bits, clip)
    again = ops.block_rotate_quantize(x, rotation, bits, clip, backend="cuda")
    assert torch.equal(again[0], q) and torch.equal(again[1], scales)  # the same bits every run


@pytest.mark.gpu
@needs_cuda_kernel
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_kernel_rows_of_exact_values_give_the_reference_bits(dtype):
    # +-1/8 and 0 entries in R and small integers in x: every product and sum is exact in any order, so the
    # kernel's codes and scales must equal the reference's bit for bit (no rounding-boundary slack).
    g = torch.Generator().manual_seed(3)
    rotation = ((torch.randint(0, 3, (128, 128), generator=g).float() - 1) / 8).cuda()
    x = torch.randint(-8, 9, (37, 4096), generator=g).float().to("cuda", dtype)
    for bits in (4, 8):
        got = ops.block_rotate_quantize(x, rotation, bits, 0.9, backend="cuda")
        want = reference.quantize_per_token(reference.block_rotate(x, rotation), bits, 0.9)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.gpu
@needs_cuda_kernel
@pytest.mark.parametrize("b", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_kernel_with_the_identity_gives_quantize_per_token_bits(dtype, b):
    # R = I rotates every row to itself exactly, so codes and scales must be quantize_per_token's bit for bit. Random
    # values put some of the 300,000 quotients near a rounding boundary, where the kernel's multiplication by the
    # inverse scale must fall back to the division (csrc/per_token_quant.cuh, quantize_code_by_inverse).
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(75, 4096, generator=g) * 3).to("cuda", dtype)
    for bits, clip in ((4, 1.0), (8, 0.9)):
        got = ops.block_rotate_quantize(x, torch.eye(b, device="cuda"), bits, clip, backend="cuda")
        want = reference.quantize_per_token(x, bits, clip)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.gpu
@needs_cuda_kernel
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_kernel_nan_and_inf_rows(dtype):
    from tests.test_triton_kernels import rows_with_special_values

    rotation = orthogonal(64, seed=2).cuda()
    x = rows_with_special_values(128, dtype).cuda()
    x[2] = 0
    q, scales = ops.block_rotate_quantize(x, rotation, 4, 0.9, backend="cuda")
    # NaN rows: NaN scale; +-inf rows: inf * R_lo = NaN (documented, as the Triton kernel), so NaN or inf; the
    # codes of every such row are 0, as the reference's.
    assert scales[[0, 4]].isnan().all() and not scales[[1, 3]].isfinite().any()
    assert torch.equal(scales[2], torch.ones((), device="cuda")) and not q.any()


@pytest.mark.gpu
@needs_cuda_kernel
def test_cuda_kernel_takes_misaligned_inputs_and_keeps_the_leading_shape():
    base = torch.randn(1 + 6 * 256, device="cuda", dtype=torch.float16)
    x = base[1:].view(2, 3, 256)  # a storage offset of one element: copied to aligned rows first
    rotation = orthogonal(64).cuda()
    q, scales = ops.block_rotate_quantize(x, rotation, 4, backend="cuda")
    q2, s2 = ops.block_rotate_quantize(x.clone().reshape(6, 256), rotation, 4, backend="cuda")
    r_base = torch.zeros(1 + 64 * 64, device="cuda")
    r_base[1:] = rotation.flatten()
    q3, s3 = torch.ops.quantkern.block_rotate_quantize(x.reshape(6, 256), r_base[1:].view(64, 64), 4, 1.0)
    assert q.shape == (2, 3, 128) and scales.shape == (2, 3)
    assert torch.equal(q.reshape(6, 128), q2) and torch.equal(scales.reshape(6), s2)
    assert torch.equal(q3, q2) and torch.equal(s3, s2)  # a misaligned rotation too


@pytest.mark.parametrize("k,backend,env,fits,expected", [
    (4096, None, None, True, "cuda"),                           # the automatic choice up to the cut-off
    (2 * ops.CUDA_BLOCK_ROTATION_AUTO_MAX_K, None, None, True, "triton"),  # past it
    (2 * ops.CUDA_BLOCK_ROTATION_AUTO_MAX_K, "cuda", None, True, "cuda"),  # asked for: any width that fits
    (2 * ops.CUDA_BLOCK_ROTATION_AUTO_MAX_K, None, "cuda", True, "cuda"),  # asked for through the environment
    (4096, None, None, False, "triton"),                        # where the CUDA kernel does not apply
    (4096, "cuda", None, False, backends.MissingKernelError),
])
def test_dispatch_between_the_cuda_and_triton_kernels(monkeypatch, k, backend, env, fits, expected):
    # ops.block_rotate_quantize's choice alone, on the CPU: select() as on a GPU with both backends built, the
    # kernels replaced by recorders.
    ran = []

    def recorder(name):
        def kernel(rows, rotation, bits, clip_ratio):
            ran.append(name)
            return torch.zeros(rows.shape[0], rows.shape[1] // 2, dtype=torch.uint8), torch.ones(rows.shape[0])
        return kernel

    monkeypatch.setattr(ops, "select", lambda op, device, backend=None: backend or env or "cuda")
    monkeypatch.setattr(ops, "_cuda_block_rotation_fits", lambda rows, rotation: fits)
    monkeypatch.setattr(ops, "_cuda_op", lambda op: recorder("cuda"))
    monkeypatch.setattr(ops, "_triton_op", lambda op: recorder("triton"))
    if env is None:
        monkeypatch.delenv("QUANTKERN_BACKEND", raising=False)
    else:
        monkeypatch.setenv("QUANTKERN_BACKEND", env)
    call = lambda: ops.block_rotate_quantize(torch.zeros(2, k), torch.eye(128), 4, backend=backend)  # noqa: E731
    if expected is backends.MissingKernelError:
        with pytest.raises(backends.MissingKernelError, match="use backend='triton'"):
            call()
        assert ran == []
    else:
        call()
        assert ran == [expected]


@pytest.mark.gpu
@needs_cuda_kernel
def test_automatic_choice_takes_triton_where_the_cuda_kernel_does_not_apply_or_is_slower():
    x = torch.randn(5, 576, device="cuda", dtype=torch.float16)
    # One rotation per block, b = 96, fp32 rows.
    for rotation, rows in ((orthogonal(64, 9).cuda(), x), (orthogonal(96).cuda(), x),
                           (orthogonal(64).cuda(), x.float())):
        auto = ops.block_rotate_quantize(rows, rotation, 4)
        triton = ops.block_rotate_quantize(rows, rotation, 4, backend="triton")
        assert torch.equal(auto[0], triton[0]) and torch.equal(auto[1], triton[1])
        with pytest.raises(backends.MissingKernelError, match="use backend='triton'"):
            ops.block_rotate_quantize(rows, rotation, 4, backend="cuda")
    shared = orthogonal(64).cuda().contiguous()  # and the CUDA kernel where it applies (QR gives columns)
    auto = ops.block_rotate_quantize(x, shared, 4)
    cuda = torch.ops.quantkern.block_rotate_quantize(x, shared, 4, 1.0)
    assert torch.equal(auto[0], cuda[0]) and torch.equal(auto[1], cuda[1])
    # Rows wider than CUDA_BLOCK_ROTATION_AUTO_MAX_K take Triton unless the cuda backend is asked for (one block
    # wider: the CUDA kernel takes rows of up to about 28,000 on the H100).
    wide = torch.randn(3, ops.CUDA_BLOCK_ROTATION_AUTO_MAX_K + 128, device="cuda", dtype=torch.float16)
    shared = orthogonal(128).cuda().contiguous()
    auto = ops.block_rotate_quantize(wide, shared, 4)
    triton = ops.block_rotate_quantize(wide, shared, 4, backend="triton")
    assert torch.equal(auto[0], triton[0]) and torch.equal(auto[1], triton[1])
    asked = ops.block_rotate_quantize(wide, shared, 4, backend="cuda")
    cuda = torch.ops.quantkern.block_rotate_quantize(wide, shared, 4, 1.0)
    assert torch.equal(asked[0], cuda[0]) and torch.equal(asked[1], cuda[1])


@pytest.mark.gpu
@needs_cuda_kernel
@pytest.mark.parametrize("call,message", [
    (lambda x, r: torch.ops.quantkern.block_rotate_quantize(x.float(), r, 4, 1.0), "float16 or bfloat16"),
    (lambda x, r: torch.ops.quantkern.block_rotate_quantize(x, r.double(), 4, 1.0), "float32"),
    (lambda x, r: torch.ops.quantkern.block_rotate_quantize(x, torch.eye(96, device="cuda"), 4, 1.0), "64 or 128"),
    (lambda x, r: torch.ops.quantkern.block_rotate_quantize(x, r.expand(4, 64, 64).contiguous(), 4, 1.0),
     r"one \[b, b\] matrix"),
    (lambda x, r: torch.ops.quantkern.block_rotate_quantize(x, r.cpu(), 4, 1.0), "rotation"),
    (lambda x, r: torch.ops.quantkern.block_rotate_quantize(x[:, :192], r, 4, 1.0), "contiguous"),
    (lambda x, r: torch.ops.quantkern.block_rotate_quantize(x, r, 3, 1.0), "bits"),
])
def test_cuda_kernel_refuses_bad_inputs_clearly(call, message):
    x, rotation = torch.randn(2, 256, device="cuda", dtype=torch.float16), orthogonal(64).cuda().contiguous()
    with pytest.raises(RuntimeError, match=message):
        call(x, rotation)


@pytest.mark.gpu
@needs_cuda_kernel
def test_cuda_kernel_under_compile_and_cuda_graph_capture():
    x = torch.randn(40, 4096, device="cuda", dtype=torch.bfloat16)
    rotation = orthogonal(128).cuda().contiguous()
    eager = ops.block_rotate_quantize(x, rotation, 4)
    assert torch.equal(eager[0], torch.ops.quantkern.block_rotate_quantize(x, rotation, 4, 1.0)[0])  # CUDA ran
    compiled = torch.compile(lambda t: ops.block_rotate_quantize(t, rotation, 4), fullgraph=True)(x)
    assert all(torch.equal(a, b) for a, b in zip(eager, compiled))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = ops.block_rotate_quantize(x, rotation, 4)
    graph.replay()
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(eager, captured))


# ----------------------------------------------------------------------------------------------
# csrc/block_rotation.cu's bookkeeping on the CPU: which lane holds which k, the R swizzle, the outputs' places
# ----------------------------------------------------------------------------------------------

def emulate_block_rotation_kernel(x, rotation, tokens):
    """The kernel's rotation step for one tile, register by register, with mma.m16n8k16's fragment semantics
    (PTX ISA: lane 4g + t holds A rows g, g + 8 at columns 2t, 2t + 1, 2t + 8, 2t + 9; B column g at rows 2t, 2t + 1,
    2t + 8, 2t + 9; D rows g, g + 8 at columns 2t, 2t + 1). x [tokens, K], rotation [b, b] in fp64; returns the
    tile as the kernel writes it back (fp64 sums, no rounding: this checks places, not precision)."""
    k = x.shape[1]
    b = rotation.shape[0]
    tile = x.clone()
    for j in range(k // b):
        block_x = x[:, j * b:(j + 1) * b]
        results = {}  # (out0, lane) -> the lane's 4 sums
        for out0 in range(0, b, 16):  # one warp per 16 outputs, R's rows out0 .. out0 + 15 held as A operands
            acc = torch.zeros(32, 4, dtype=torch.float64)
            for c in range(b // 32):
                for step in range(2):  # k 32c + 8t + 4 step + 0..3
                    a = torch.zeros(16, 16, dtype=torch.float64)
                    bmat = torch.zeros(16, 8, dtype=torch.float64)
                    for lane in range(32):
                        g, t = lane // 4, lane % 4
                        ks = 32 * c + 8 * t + 4 * step
                        r_g, r_g8 = rotation[out0 + g, ks:ks + 4], rotation[out0 + g + 8, ks:ks + 4]
                        # a0 = r_g[0:2], a1 = r_g8[0:2], a2 = r_g[2:4], a3 = r_g8[2:4]
                        a[g, 2 * t:2 * t + 2], a[g + 8, 2 * t:2 * t + 2] = r_g[0:2], r_g8[0:2]
                        a[g, 2 * t + 8:2 * t + 10], a[g + 8, 2 * t + 8:2 * t + 10] = r_g[2:4], r_g8[2:4]
                        # b0, b1: token g's 16-byte load, words of this step (zeros past the tile's rows)
                        xs = block_x[g, ks:ks + 4] if g < tokens else torch.zeros(4, dtype=torch.float64)
                        bmat[2 * t:2 * t + 2, g], bmat[2 * t + 8:2 * t + 10, g] = xs[0:2], xs[2:4]
                    d = a @ bmat
                    for lane in range(32):
                        g, t = lane // 4, lane % 4
                        acc[lane] += torch.stack([d[g, 2 * t], d[g, 2 * t + 1], d[g + 8, 2 * t], d[g + 8, 2 * t + 1]])
            for lane in range(32):
                results[out0, lane] = acc[lane]
        for (out0, lane), y in results.items():  # the exchange with lane g ^ 1, then the pair stores
            g, t = lane // 4, lane % 4
            other = results[out0, lane ^ 4]
            token = 2 * t + (g & 1)
            pair, pair8 = ((other[1], y[1]), (other[3], y[3])) if g & 1 else ((y[0], other[0]), (y[2], other[2]))
            column = j * b + out0 + (g & ~1)
            if token < tokens:
                tile[token, column:column + 2] = torch.stack(pair)
                tile[token, column + 8:column + 10] = torch.stack(pair8)
    return tile


@pytest.mark.parametrize("tokens,b", [(8, 64), (8, 128), (4, 64)])
def test_kernel_bookkeeping_gives_each_block_times_r_transposed(tokens, b):
    g = torch.Generator().manual_seed(tokens + b)
    k = 2 * b
    x = torch.randn(tokens, k, generator=g, dtype=torch.float64)
    rotation = torch.randn(b, b, generator=g, dtype=torch.float64)
    got = emulate_block_rotation_kernel(x, rotation, tokens)
    expected = reference.block_rotate(x, rotation)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
