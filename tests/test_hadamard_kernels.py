"""Online rotation kernels (csrc/hadamard.cu, triton_kernels/hadamard.py) against the reference.

``hadamard``: ``reference.hadamard`` (x @ H.T / sqrt(n), H = rotation.hadamard_matrix(n)).
``hadamard_quantize``: ``reference.quantize_per_token(reference.hadamard(x), ...)`` -- the rotated row is
rounded to x's dtype before quantization, as QuantLinear's ``ops.hadamard`` + quantizer path does.

Triton tests run on the GPU when there is one, else under TRITON_INTERPRET=1 on small shapes (conftest.py).
CUDA tests are marked ``gpu``. For n = 2^k (and blocked mode) the fp32-butterfly CUDA kernel does the
reference's butterfly in the reference's order and is asserted bit-exact; for m * 2^k, and for Triton (two fp32
dots), the rotated values agree to fp32 rounding, and quantization codes may differ by 1 at rounding-boundary
ties. The tensor-core ``hadamard_quantize`` (fp16/bf16 rows of the sizes in build_info, csrc/hadamard_mma.cu)
rounds intermediate sums to x's dtype: its codes are checked against the exactly (fp64) rotated row.
"""

import importlib

import pytest
import torch

from quantkern import backends, ops, reference
from quantkern.format import unpack_int4_signed
from quantkern.rotation import block_hadamard_transform, hadamard_matrix, hadamard_transform, is_hadamard_size

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
cuda_ext = backends.status("cuda")
has_cuda_kernel = cuda_ext.available and "hadamard" in cuda_ext.kernels
needs_cuda_kernel = pytest.mark.skipif(not has_cuda_kernel, reason=f"no CUDA hadamard kernel: {cuda_ext.reason}")
# Row lengths whose fp16/bf16 hadamard_quantize runs on tensor cores (on sm_80+): the extension says which.
TENSOR_CORE_SIZES = set(backends.cuda_build_info().get("hadamard_quantize_tensor_core_sizes", ()))
UNIT_ROUNDOFF = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
# Within fp32 rounding of the reference before the final cast: at most one ulp of the output dtype.
ROTATION_TOL = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 1e-5}

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# Powers of two and m * 2^k for every base m (576 = 36 x 16, 896 = 28 x 32, 1536 = 12 x 128,
# 14336 = 28 x 512, ...). 4864 = 19 x 256 and 11008 = 43 x 256 have no Hadamard matrix: blocked mode.
CUDA_SIZES = [1, 2, 4, 8, 12, 16, 20, 40, 64, 96, 128, 160, 256, 576, 896, 1024, 1280, 1536, 2048, 4096, 5120,
              8192, 14336, 16384, 18432, 20480, 24576, 28672, 32768]
# (On the GPU every shape and dtype is a Triton compilation: a short list there; the interpreter takes more.)
TRITON_SIZES = [576, 4096, 14336] if GPU else [1, 2, 8, 12, 20, 40, 64, 96, 576, 896, 1024, 1536]
TRITON_DTYPES = [torch.float16, torch.bfloat16] if GPU else DTYPES
TRITON_BITS = [4] if GPU else [4, 8]


def codes_of(q, bits):
    return unpack_int4_signed(q).int() if bits == 4 else q.int()


def assert_rotation_close(y, ref, exact=False, per_row=False):
    """|y - ref| <= tol |ref| + tol * absmax, within fp32 rounding of the reference before the final cast (about
    one ulp of the output dtype). absmax is the whole tensor's, or with ``per_row`` each row's own: scaled by
    random_rows' x20 outlier row, the whole tensor's let a bf16 Hadamard with one column's sign flipped pass.
    The Triton tests take per_row (IEEE fp32 dots on a GPU too); the CUDA tests keep the whole tensor's."""
    assert y.dtype == ref.dtype and y.shape == ref.shape
    if exact:
        assert torch.equal(y, ref)
        return
    tol = ROTATION_TOL[y.dtype]
    y, ref = y.float(), ref.float()
    absmax = ref.abs().amax(-1, keepdim=True) if per_row else ref.abs().max()
    excess = (y - ref).abs() - (tol * ref.abs() + tol * absmax + 1e-30)
    assert excess.numel() == 0 or excess.max().item() <= 0, f"{(excess > 0).sum()} entries off, worst {excess.max()}"


def assert_quant_close(q, s, q_ref, s_ref, bits, exact=False):
    assert q.dtype == q_ref.dtype and q.shape == q_ref.shape and s.shape == s_ref.shape
    if exact:
        assert torch.equal(s, s_ref)
        assert torch.equal(q, q_ref)
        return
    torch.testing.assert_close(s, s_ref, rtol=8e-3, atol=0)
    diff = (codes_of(q, bits) - codes_of(q_ref, bits)).abs()
    assert diff.numel() == 0 or diff.max().item() <= 1
    assert diff.numel() == 0 or (diff != 0).float().mean().item() <= 0.01  # rare rounding-boundary ties


def on_tensor_cores(n, dtype):
    return n in TENSOR_CORE_SIZES and dtype in UNIT_ROUNDOFF and torch.cuda.get_device_capability()[0] >= 8


def assert_codes_round_the_exact_rotation(q, s, x, bits, clip, s_ref, q_ref):
    """The tensor-core path: scales within rounding of the two-kernel path's; each code is the rounding of the
    exactly (fp64) rotated value over the kernel's own scale, clamped, up to the error of the intermediate
    roundings to x's dtype (one or two, csrc/hadamard_mma.cu says where), whose size in code units is about
    qmax * u * |y| / amax (a bound of 6 qmax u); and on average the codes are as close to the exact values as
    the two-kernel path's."""
    torch.testing.assert_close(s, s_ref, rtol=8e-3, atol=0)
    qmax = 7 if bits == 4 else 127
    exact = hadamard_transform(x.double().cpu()).float() if x.shape[0] else x.float().cpu()
    target = (exact.double() / s.double().cpu()[:, None]).clamp(-qmax, qmax)
    n = x.shape[1]
    # stage A's sums, then the H28 step's operands (14336) or the chunk stage's (2^k, fp16 rows only)
    roundings = 2 if n & (n - 1) or x.dtype == torch.float16 else 1
    slack = 6 * qmax * UNIT_ROUNDOFF[x.dtype] * roundings
    error = (codes_of(q, bits).cpu().double() - target).abs()
    assert error.max().item() <= 0.5 + slack
    ref_error = (codes_of(q_ref, bits).cpu().double() - target).abs()
    assert error.mean().item() <= ref_error.mean().item() + slack / 6


def random_rows(rows, n, dtype, device=DEVICE):
    x = torch.randn(rows, n, device=device) * 3
    if rows > 1:
        x[0, : max(1, n // 7)] *= 20  # an outlier channel block, what the rotation is for
    return x.to(dtype)


# ------------------------------------------------------------------------------------------------
# Triton (CPU interpreter in CI)
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", TRITON_DTYPES)
@pytest.mark.parametrize("n", TRITON_SIZES)
def test_triton_hadamard_matches_reference(n, dtype):
    x = random_rows(3, n, dtype)
    assert_rotation_close(ops.hadamard(x, backend="triton"), reference.hadamard(x), per_row=True)


@pytest.mark.parametrize("bits", TRITON_BITS)
@pytest.mark.parametrize("dtype", TRITON_DTYPES)
@pytest.mark.parametrize("n", [n for n in TRITON_SIZES if n > 1])
def test_triton_hadamard_quantize_matches_reference(n, dtype, bits):
    x = random_rows(4, n, dtype)
    if x.shape[0] > 2:
        x[2] = 0  # all-zero row: scale 1
    clip = 0.9 if n % 3 else 1.0
    q, s = ops.hadamard_quantize(x, bits, clip, backend="triton")
    q_ref, s_ref = reference.quantize_per_token(reference.hadamard(x), bits, clip)
    assert_quant_close(q, s, q_ref, s_ref, bits)


# Sizes whose full tile outgrows a GPU's shared memory (8192: 112 KB, 14336 / 16384: 192 KB; sm_89 allows
# 99 KB), and small ones: the chunked kernel must give the same results as the full-tile one.
CHUNKED_SIZES = [576, 4096, 8192, 14336] if not GPU else [576, 896, 4096, 8192, 12288, 14336, 16384]


@pytest.mark.parametrize("dtype", TRITON_DTYPES)
@pytest.mark.parametrize("n", CHUNKED_SIZES)
def test_triton_chunked_kernel_matches_reference(n, dtype, monkeypatch):
    # (the module: the package's attribute `hadamard` is the function of that name)
    monkeypatch.setattr(importlib.import_module("quantkern.triton_kernels.hadamard"), "FORCE_CHUNKED", True)
    x = random_rows(3, n, dtype)
    x[1] = 0  # all-zero row: scale 1
    assert_rotation_close(ops.hadamard(x, backend="triton"), reference.hadamard(x), per_row=True)
    for bits in (4, 8):
        q, s = ops.hadamard_quantize(x, bits, 0.9, backend="triton")
        q_ref, s_ref = reference.quantize_per_token(reference.hadamard(x), bits, 0.9)
        assert_quant_close(q, s, q_ref, s_ref, bits)


def test_triton_full_tile_shared_memory_rule():
    from quantkern.triton_kernels.hadamard import _use_chunked, full_tile_shared_bytes

    assert [full_tile_shared_bytes(n) // 1024 for n in (576, 4096, 8192, 14336, 16384)] == [21, 48, 112, 192, 192]
    assert not _use_chunked(14336, torch.device("cpu"))  # the interpreter: the full tile


def test_triton_blocked_and_leading_dims():
    x = random_rows(6, 4864, torch.float16).view(2, 3, 4864)  # 4864 = 19 x 256: no Hadamard of order 4864
    y = ops.hadamard(x, backend="triton", block_size=256)
    assert_rotation_close(y, block_hadamard_transform(x, 256), per_row=True)
    q, s = ops.hadamard_quantize(x, 4, backend="triton", block_size=256)
    q_ref, s_ref = reference.quantize_per_token(block_hadamard_transform(x, 256).view(6, 4864), 4)
    assert q.shape == (2, 3, 2432) and s.shape == (2, 3)
    assert_quant_close(q.view(6, 2432), s.view(6), q_ref, s_ref, 4)


def test_unsupported_sizes_are_refused():
    assert not is_hadamard_size(4864) and not is_hadamard_size(11008)  # 19 x 256, 43 x 256
    x = torch.randn(2, 4864, device=DEVICE, dtype=torch.float16)
    with pytest.raises(ValueError, match="Hadamard"):
        ops.hadamard(x, backend="triton")
    with pytest.raises(ValueError, match="Hadamard"):
        ops.hadamard(x.cpu())  # the reference


def quantize_rotated_written_out(rotated, dtype, bits, clip):
    """reference.quantize_per_token's formula, written out here, of a rotated row rounded to x's dtype (as the
    two-call path rounds it): fp32 scale absmax * clip / qmax (1 for zero rows), codes round-half-even and clamped,
    int4 as two's-complement nibbles, element 2j in the low one."""
    y = rotated.to(dtype).float()
    qmax = 7 if bits == 4 else 127
    scale = y.abs().amax(-1) * torch.tensor(clip, dtype=torch.float32) / torch.tensor(float(qmax))
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    codes = torch.round(y / scale[..., None]).clamp(-qmax, qmax).to(torch.int8)
    if bits == 8:
        return codes, scale
    nibbles = (codes & 0xF).to(torch.uint8)
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4), scale


@pytest.mark.parametrize("bits", [4, 8])
def test_reference_backend_of_the_fused_op_is_the_two_call_path(bits):
    # Expected from a dense fp64 rotation, not reference.hadamard (the reference branch's own code); a 3-D x for
    # the op's reshape. Own generator: a fixed draw (bf16 codes of 200 draws all equal the fp64 path's exactly).
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 576, generator=g) * 3
    x[0, 0, :82] *= 20  # an outlier block
    x[1, 1] = 0  # all-zero row: scale 1
    x = x.bfloat16()
    q, s = ops.hadamard_quantize(x, bits, 0.95, backend="reference")
    exact = x.double() @ hadamard_matrix(576).T / 576 ** 0.5
    q_ref, s_ref = quantize_rotated_written_out(exact, torch.bfloat16, bits, 0.95)
    assert q.shape == (2, 3, 288 if bits == 4 else 576) and s.shape == (2, 3)
    assert torch.equal(s, s_ref) and torch.equal(q, q_ref)


def test_fake_impls_give_the_output_shapes():
    from quantkern._fake import hadamard_fake, hadamard_quantize_fake

    x = torch.empty(5, 64, device="meta", dtype=torch.float16)
    assert hadamard_fake(x).shape == (5, 64)
    q, s = hadamard_quantize_fake(x, 4, 1.0)
    assert q.shape == (5, 32) and q.dtype == torch.uint8 and s.shape == (5,) and s.dtype == torch.float32


# ------------------------------------------------------------------------------------------------
# CUDA
# ------------------------------------------------------------------------------------------------

@needs_cuda_kernel
def test_cuda_op_refuses_cpu_tensors_cleanly():
    with pytest.raises(NotImplementedError):
        torch.ops.quantkern.hadamard(torch.randn(2, 8), 0)


@pytest.mark.gpu
@needs_cuda_kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", CUDA_SIZES)
def test_cuda_hadamard_matches_reference(n, dtype):
    x = random_rows(5, n, dtype)
    y = ops.hadamard(x, backend="cuda")
    pow2 = n & (n - 1) == 0 and n != 4  # n = 4 runs the small dense kernel (another summation order)
    assert_rotation_close(y, reference.hadamard(x), exact=pow2)


@pytest.mark.gpu
@needs_cuda_kernel
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [n for n in CUDA_SIZES if n > 1])
def test_cuda_hadamard_quantize_matches_reference(n, dtype, bits):
    rows = 37 if n <= 4096 else 9
    x = random_rows(rows, n, dtype)
    x[2] = 0
    clip = 0.9 if n % 3 else 1.0
    q, s = torch.ops.quantkern.hadamard_quantize(x, bits, clip, 0)  # the fused kernel itself, for every n
    q_ref, s_ref = reference.quantize_per_token(reference.hadamard(x), bits, clip)
    q2, s2 = ops.hadamard_quantize(x, bits, clip, backend="cuda")  # (short m * 2^k rows: two kernels)
    if on_tensor_cores(n, dtype):
        assert_codes_round_the_exact_rotation(q, s, x, bits, clip, s_ref, q_ref)
        assert torch.equal(q2, q) and torch.equal(s2, s)
        return
    pow2 = n & (n - 1) == 0 and n != 4  # n = 4 runs the small dense kernel (another summation order)
    assert_quant_close(q, s, q_ref, s_ref, bits, exact=pow2)
    assert_quant_close(q2, s2, q_ref, s_ref, bits, exact=pow2)


@pytest.mark.gpu
@needs_cuda_kernel
@pytest.mark.parametrize("n,block", [(896, 128), (4864, 256), (11008, 256), (4096, 64), (576, 64), (14336, 128),
                                     (64, 8)])
def test_cuda_blocked_mode(n, block):
    x = random_rows(6, n, torch.float16)
    assert_rotation_close(ops.hadamard(x, backend="cuda", block_size=block), block_hadamard_transform(x, block),
                          exact=True)
    q, s = ops.hadamard_quantize(x, 4, 0.9, backend="cuda", block_size=block)
    q_ref, s_ref = reference.quantize_per_token(block_hadamard_transform(x, block), 4, 0.9)
    assert_quant_close(q, s, q_ref, s_ref, 4, exact=True)


@pytest.mark.gpu
@needs_cuda_kernel
def test_cuda_refuses_unsupported_sizes_clearly():
    for n in (4864, 11008, 65536, 48 * 4096):
        with pytest.raises(RuntimeError, match="supported sizes"):
            torch.ops.quantkern.hadamard(torch.randn(2, n, device="cuda", dtype=torch.float16), 0)
    with pytest.raises(RuntimeError, match="block_size"):
        torch.ops.quantkern.hadamard(torch.randn(2, 96, device="cuda"), 12)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_unpacked_int4_codes_are_the_packed_ones_one_per_byte(backend):
    if backend == "triton" and not backends.status("triton").available:
        pytest.skip("triton missing")
    x = random_rows(5, 256, torch.float16)
    q, s = ops.hadamard_quantize(x, 4, 0.9, backend=backend)
    q_unpacked, s2 = ops.hadamard_quantize(x, 4, 0.9, backend=backend, packed=False)
    assert q_unpacked.dtype == torch.int8 and q_unpacked.shape == x.shape
    assert torch.equal(q_unpacked, unpack_int4_signed(q)) and torch.equal(s, s2)


@pytest.mark.gpu
@needs_cuda_kernel
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n,block", [(4096, 0), (14336, 0), (16384, 0), (2048, 0), (576, 0), (896, 0),
                                     (28672, 0), (4864, 256)])
def test_cuda_unpacked_int4_codes_are_the_packed_ones_one_per_byte(n, block, dtype):
    """packed=False (the sm_90 W4A4 GEMM's input): the tensor-core kernels store each code in a byte, the
    fp32-butterfly path spreads its packed bytes; either way exactly the packed op's codes and scales."""
    x = random_rows(300, n, dtype)
    x[1] = 0
    x[2, 7] = 1e4  # one huge entry: with clip 0.5 most of the row's codes clamp at +-7
    for clip in (1.0, 0.5):
        q, s = torch.ops.quantkern.hadamard_quantize(x, 4, clip, block)
        q_unpacked, s2 = torch.ops.quantkern.hadamard_quantize(x, 4, clip, block, False)
        assert q_unpacked.dtype == torch.int8 and q_unpacked.shape == x.shape
        assert torch.equal(s, s2)
        assert torch.equal(q_unpacked, unpack_int4_signed(q)), (n, block, dtype, clip)
        assert q_unpacked.abs().max().item() <= 7


@pytest.mark.gpu
@needs_cuda_kernel
def test_cuda_fused_op_agrees_with_the_quantlinear_path():
    # QuantLinear(input_rotation="hadamard") rotates with ops.hadamard (x's dtype), then quantizes.
    for n, dtype in [(4096, torch.float16), (14336, torch.bfloat16), (576, torch.float16), (4096, torch.float32)]:
        x = random_rows(64, n, dtype)
        q, s = ops.hadamard_quantize(x, 4)
        q2, s2 = ops.quantize_per_token(ops.hadamard(x), 4)
        if on_tensor_cores(n, dtype):
            assert_codes_round_the_exact_rotation(q, s, x, 4, 1.0, s2, q2)
        else:
            assert_quant_close(q, s, q2, s2, 4, exact=n & (n - 1) == 0)


@pytest.mark.gpu
@needs_cuda_kernel
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [4096, 14336])
def test_cuda_tensor_core_path_edge_rows(n, dtype):
    """Zero rows, a row with one huge entry (fp16: no overflow in the rounded intermediates), tiny values,
    clipping, many rows (grid), and deterministic results across runs."""
    if not on_tensor_cores(n, dtype):
        pytest.skip("no tensor-core path for this size / dtype / device")
    x = random_rows(300, n, dtype)
    x[1] = 0
    x[3] = 0
    x[3, 5] = 60000.0 if dtype == torch.float16 else 1e30
    x[4] *= 1e-3
    for bits, clip in [(4, 1.0), (4, 0.8), (8, 0.9)]:
        q, s = torch.ops.quantkern.hadamard_quantize(x, bits, clip, 0)
        q_ref, s_ref = reference.quantize_per_token(reference.hadamard(x), bits, clip)
        assert s[1].item() == 1.0 and not codes_of(q[1:2], bits).any()
        assert torch.isfinite(s).all()
        assert_codes_round_the_exact_rotation(q, s, x, bits, clip, s_ref, q_ref)
        again = torch.ops.quantkern.hadamard_quantize(x, bits, clip, 0)
        assert torch.equal(again[0], q) and torch.equal(again[1], s)


@pytest.mark.gpu
@needs_cuda_kernel
@pytest.mark.parametrize("n", [4096, 8192, 14336])
def test_cuda_tensor_core_path_many_rows_per_block(n):
    """Persistent blocks loop over rows, the next row's loads in flight: with 4 rows or more per block each row's
    codes and scale are those of a call where each block takes one row."""
    dtype = torch.float16
    if not on_tensor_cores(n, dtype):
        pytest.skip("no tensor-core path for this size / dtype / device")
    # More than 4 rows a block wherever at most 8 blocks fit an SM.
    rows = 4 * 8 * torch.cuda.get_device_properties(0).multi_processor_count + 5
    x = random_rows(rows, n, dtype)
    for bits, packed in [(4, True), (8, True)]:
        q, s = torch.ops.quantkern.hadamard_quantize(x, bits, 1.0, 0, packed)
        for start in range(0, rows, 128):  # 128 rows: fewer than the blocks that fit, so one row a block
            stop = min(rows, start + 128)
            q_part, s_part = torch.ops.quantkern.hadamard_quantize(x[start:stop], bits, 1.0, 0, packed)
            assert torch.equal(q[start:stop], q_part) and torch.equal(s[start:stop], s_part), (bits, start)


@pytest.mark.gpu
@needs_cuda_kernel
def test_cuda_misaligned_input_and_leading_dims():
    base = torch.randn(3 * 2 * 1024 + 1, device="cuda", dtype=torch.float16)
    x = base[1:].view(3, 2, 1024)  # 2-byte offset: not 16-byte aligned
    assert_rotation_close(ops.hadamard(x, backend="cuda"), reference.hadamard(x), exact=True)
    q, s = ops.hadamard_quantize(x, 8, backend="cuda")
    q_ref, s_ref = reference.quantize_per_token(reference.hadamard(x.reshape(6, 1024)), 8)
    assert_codes_round_the_exact_rotation(q.view(6, 1024), s.view(6), x.reshape(6, 1024), 8, 1.0, s_ref, q_ref)
    assert ops.hadamard(torch.empty(0, 4096, device="cuda", dtype=torch.float16)).shape == (0, 4096)


@pytest.mark.gpu
@needs_cuda_kernel
def test_cuda_under_compile_fullgraph_and_cuda_graph():
    x = random_rows(16, 4096, torch.float16)
    y_ref = reference.hadamard(x)
    q_ref, s_ref = reference.quantize_per_token(y_ref, 4)

    q_eager, s_eager = ops.hadamard_quantize(x, 4)

    compiled = torch.compile(lambda t: (ops.hadamard(t), ops.hadamard_quantize(t, 4)), fullgraph=True)
    y, (q, s) = compiled(x)
    assert torch.equal(y, y_ref) and torch.equal(q, q_eager) and torch.equal(s, s_eager)
    assert_codes_round_the_exact_rotation(q, s, x, 4, 1.0, s_ref, q_ref)

    static_x = x.clone()
    ops.hadamard_quantize(static_x, 4)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_q, out_s = ops.hadamard_quantize(static_x, 4)
    fresh = random_rows(16, 4096, torch.float16)
    static_x.copy_(fresh)
    graph.replay()
    torch.cuda.synchronize()
    q_eager, s_eager = ops.hadamard_quantize(fresh, 4)
    assert torch.equal(out_q, q_eager) and torch.equal(out_s, s_eager)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [4096])
def test_triton_under_compile_fullgraph(n):
    x = random_rows(8, n, torch.bfloat16)
    compiled = torch.compile(lambda t: ops.hadamard_quantize(t, 4, backend="triton"), fullgraph=True)
    q, s = compiled(x)
    q_ref, s_ref = reference.quantize_per_token(reference.hadamard(x), 4)
    assert_quant_close(q, s, q_ref, s_ref, 4)
