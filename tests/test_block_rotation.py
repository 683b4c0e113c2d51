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
    q_ref, s_ref = reference.quantize_per_token(reference.block_rotate(x, rotation), bits, clip)
    assert q.dtype == q_ref.dtype and q.shape == q_ref.shape and scales.shape == s_ref.shape
    # The scale comes from the absmax of the rotated values rounded to x's dtype: that rounding can move by
    # one unit of x's dtype where the fp32 sums differ in their last bits.
    assert torch.allclose(scales, s_ref, rtol=tolerance(dtype, b), atol=0)
    diff = (codes_of(q, bits) - codes_of(q_ref, bits)).abs()
    if diff.numel():
        assert diff.max().item() <= 1  # one step at a rounding boundary, no more
        # int8 codes of bf16 rows are finer than bf16 itself (127 steps against 8 significant bits): more of
        # them sit at a boundary (measured up to 1.3% of codes over 400 draws at 17 x 576, b = 64).
        assert diff.float().mean().item() < (0.03 if bits == 8 and dtype == torch.bfloat16 else 0.01)
    if rows > 2:
        assert torch.equal(scales[1], torch.ones((), device=DEVICE)) and not codes_of(q[1], bits).any()


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
