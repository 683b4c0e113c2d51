"""The CUDA extension's kernels against the reference, on the GPU (marked ``gpu``), plus the
checks that need only the built extension (its ops exist and refuse CPU tensors cleanly)."""

import pytest
import torch

from quantkern import backends, ops, reference

cuda_ext = backends.status("cuda")
needs_extension = pytest.mark.skipif(not cuda_ext.available, reason=f"CUDA extension missing: {cuda_ext.reason}")

# On sm_90 rows of more than 1024 16-byte vectors split over a thread-block cluster when the rows are few
# (csrc/activation_quant.cu): 14336 (7 blocks), 32768 and 65536 in fp16 / bf16 (8 blocks, 2 and 4 vectors a
# thread), 8192 in fp32 (16 rows x 8 blocks); one block a row for 40 x 14336 (280 blocks), fp32 65536 (too long)
# and the shorter rows.
TOKEN_SHAPES = [(1, 576), (3, 1536), (5, 896), (2, 4864), (4, 4096), (2, 14336), (3, 32768), (1, 65536),
                (16, 8192), (40, 14336), (7, 2), (3, 130), (5, 1000), (2, 1030), (0, 64), (257, 576)]


@needs_extension
def test_extension_reports_its_build():
    from quantkern import _C

    info = _C.build_info()
    assert "quantize_per_token" in info["kernels"]
    assert info["archs"] and info["cuda_version"] and info["torch_version"]


@needs_extension
def test_extension_op_refuses_cpu_tensors_cleanly():
    with pytest.raises(NotImplementedError):
        torch.ops.quantkern.quantize_per_token(torch.randn(2, 8), 8, 1.0)


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tokens,features", TOKEN_SHAPES)
def test_quantize_per_token_is_bit_exact(bits, dtype, tokens, features):
    x = (torch.randn(tokens, features, device="cuda") * 5).to(dtype)
    if tokens > 1:
        x[1] = 0
    clip = 0.9 if features % 3 else 1.0
    q, scales = ops.quantize_per_token(x, bits, clip, backend="cuda")
    q_ref, s_ref = reference.quantize_per_token(x, bits, clip)
    assert torch.equal(scales, s_ref)
    assert torch.equal(q, q_ref)
    if bits == 4:  # the same codes one per byte (the sm_90 W4A4 path)
        q8, scales8 = ops.quantize_per_token(x, bits, clip, backend="cuda", packed=False)
        assert q8.dtype == torch.int8 and torch.equal(q8, reference.unpack_int4_signed(q_ref))
        assert torch.equal(scales8, s_ref)


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows,features", [(4, 16392), (4, 14336), (70, 14336)])
def test_quantize_per_token_special_values_are_bit_exact(bits, rows, features):
    """NaN and infinite entries and an all-zero row, in the cluster path (few rows, on sm_90) and one block a row."""
    x = torch.randn(rows, features, device="cuda", dtype=torch.bfloat16)
    x[0, features - 1] = float("nan")
    x[1, 7] = float("inf")
    x[2] = 0
    q, scales = ops.quantize_per_token(x, bits, 0.8, backend="cuda")
    q_ref, s_ref = reference.quantize_per_token(x, bits, 0.8)
    torch.testing.assert_close(scales, s_ref, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(q, q_ref)


@pytest.mark.gpu
@needs_extension
def test_quantize_per_token_misaligned_input_takes_the_scalar_path():
    base = torch.randn(4 * 577 + 1, device="cuda", dtype=torch.float16)
    x = base[1:].view(4, 577)[:, :576]  # rows start at odd element offsets
    q, s = ops.quantize_per_token(x, 4, backend="cuda")
    q_ref, s_ref = reference.quantize_per_token(x.contiguous(), 4)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    q8, _ = ops.quantize_per_token(x, 4, backend="cuda", packed=False)
    assert torch.equal(q8, reference.unpack_int4_signed(q_ref))
    raw = torch.ops.quantkern.quantize_per_token(base[1:1 + 3 * 576].view(3, 576), 8, 1.0)
    assert torch.equal(raw[0], reference.quantize_per_token(base[1:1 + 3 * 576].view(3, 576), 8)[0])


@pytest.mark.gpu
@needs_extension
def test_quantize_per_token_is_deterministic():
    # (Which stream it runs on: tests/test_streams_gpu.py.)
    x = torch.randn(64, 4096, device="cuda", dtype=torch.bfloat16)
    first = ops.quantize_per_token(x, 4)
    second = ops.quantize_per_token(x, 4)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.gpu
@needs_extension
def test_quantize_per_token_under_cuda_graph_and_compile():
    x = torch.randn(16, 4096, device="cuda", dtype=torch.float16)
    expected = reference.quantize_per_token(x, 8)

    compiled = torch.compile(lambda t: ops.quantize_per_token(t, 8), fullgraph=True)
    q, s = compiled(x)
    assert torch.equal(q, expected[0]) and torch.equal(s, expected[1])

    static_x = x.clone()
    ops.quantize_per_token(static_x, 8)  # warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_q, static_s = ops.quantize_per_token(static_x, 8)
    new_x = torch.randn_like(x)
    static_x.copy_(new_x)
    graph.replay()
    new_expected = reference.quantize_per_token(new_x, 8)
    assert torch.equal(static_q, new_expected[0]) and torch.equal(static_s, new_expected[1])


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("call,match", [
    (lambda x: torch.ops.quantkern.quantize_per_token(x, 3, 1.0), "bits"),
    (lambda x: torch.ops.quantkern.quantize_per_token(x[:, :7].contiguous(), 4, 1.0), "even"),
    (lambda x: torch.ops.quantkern.quantize_per_token(x, 8, 0.0), "clip_ratio"),
    (lambda x: torch.ops.quantkern.quantize_per_token(x.double(), 8, 1.0), "float16, bfloat16 or float32"),
    (lambda x: torch.ops.quantkern.quantize_per_token(x[None], 8, 1.0), "2-D"),
    (lambda x: torch.ops.quantkern.quantize_per_token(x.t(), 8, 1.0), "contiguous"),
])
def test_extension_op_checks_its_input(call, match):
    x = torch.randn(8, 64, device="cuda", dtype=torch.float16)
    with pytest.raises(RuntimeError, match=match):
        call(x)
